//! NeuroShard core: run and train one language model whose transformer layers are split
//! across many machines.
//!
//! [`ShardEngine`] holds one contiguous slice of layers and runs forward (with per-session KV
//! caches), backward and an AdamW step on it. See `docs/ARCHITECTURE.md` for the map.

#![deny(missing_docs)]
#![warn(unreachable_pub)]

pub mod client;
pub mod engine;
pub mod error;
pub mod generate;
pub mod kernels;
pub mod model;
pub mod net;
pub mod node;
pub mod runtime;
pub mod swarm;
pub mod wire;

pub use engine::{
    AdamWConfig, BackwardOutput, EngineOptions, EngineStats, ForwardRequest, OutputGrad, SessionId,
    ShardEngine, WeightVersion,
};
pub use error::{Error, Result};
pub use generate::{
    generate, FinishReason, GenerationConfig, GenerationOutput, LocalPipeline, LogitsBackend,
};
pub use model::config::{Architecture, ModelConfig};
pub use model::layers::ComputeMode;
pub use model::sampling::SamplingParams;
pub use model::shard::{LogitsSelection, ShardInput, ShardOutput};
pub use model::tokenizer::{ChatMessage, Tokenizer};
pub use model::weights::{ModelFormat, WeightFile};
