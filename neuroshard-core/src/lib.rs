//! NeuroShard core: run and train one language model whose transformer layers are split
//! across many machines.
//!
//! - [`ShardEngine`] holds one contiguous slice of layers and runs forward (with per-session
//!   KV caches), backward and an AdamW step on it; [`LocalPipeline`] chains slices in one
//!   process and [`generate()`] turns any chain into text.
//! - [`Node`] (built with [`NodeBuilder`]) serves a slice over iroh; [`LocalSwarm`] starts a
//!   whole swarm in one process.
//! - [`Client`] + [`SwarmSession`] generate and stream text over a swarm with failover, or
//!   step a [`LogitsSession`] for custom decoding. [`PeerSet`] is the swarm's live view.
//! - [`blocking`] wraps these over one runtime owned by the library (the Python and C
//!   bindings use it); [`runtime::init`] fixes the process's compute threads once.
//! - [`wire`] is the tensor frame format between nodes.
//! - [`consensus`] ([`Consensus`]) checks lying nodes: replicas' outputs compared and voted
//!   on by every receiver, chained signed receipts with fraud proofs, and reputation.
//!
//! ```no_run
//! # async fn demo() -> neuroshard_core::Result<()> {
//! use neuroshard_core::{Client, LocalSwarm, SwarmOptions, SwarmSession, TextRequest};
//!
//! let model = std::path::Path::new("models/SmolLM2-135M-Instruct.Q4_1.gguf");
//! let swarm = LocalSwarm::start(model, 3, 1, Default::default(), &mut |_| {}).await?;
//! let client = Client::bind_default().await?;
//! let entries = neuroshard_core::resolve_peers(&[swarm.address()]).await?;
//! let session = SwarmSession::connect(client, entries, SwarmOptions::default()).await?;
//! let out = session
//!     .generate_text("The future of AI is", &TextRequest::default(), Box::new(|piece| {
//!         print!("{piece}");
//!         std::ops::ControlFlow::Continue(())
//!     }))
//!     .await?;
//! println!("\n{} tokens", out.output.tokens.len());
//! # Ok(()) }
//! ```
//!
//! See `docs/ARCHITECTURE.md` for the map of the code.

#![deny(missing_docs)]
#![warn(unreachable_pub)]

pub mod blocking;
mod chat;
mod client;
pub mod consensus;
mod engine;
mod error;
mod generate;
mod kernels;
mod model;
pub mod net;
mod node;
mod protocol;
pub mod runtime;
#[cfg(feature = "server")]
mod server;
mod splitmix;
mod swarm;
mod swarm_session;
pub mod train;
pub mod wire;

#[cfg(feature = "internals")]
#[doc(hidden)]
pub mod internals;

pub use chat::{ChatReply, ChatSession};
pub use client::{Client, RemoteSession};
pub use consensus::Consensus;
pub use engine::{
    causal_lm_loss, AdamWConfig, AdapterRef, BackwardOutput, EngineOptions, EngineStats,
    ForwardRequest, OutputGrad, SessionId, ShardEngine, TrainedVersion, WeightVersion,
    DEFAULT_PREFILL_CHUNK,
};
pub use error::{Error, ErrorKind, Result};
pub use generate::{
    generate, generate_from, generate_until, split_ranges, FinishReason, GenerationConfig,
    GenerationOutput, LocalPipeline, LogitsBackend, StopStrings,
};
/// Node keys and dialable addresses (iroh's types, re-exported so users need no iroh import).
pub use iroh::{EndpointAddr, SecretKey};
pub use model::config::{Architecture, ModelConfig};
pub use model::identity::{
    check_model_id, ModelCommitment, ModelIdentity, ModelManifest, TensorDigest, MODEL_ID_VERSION,
};
pub use model::kv_cache::KvDtype;
pub use model::layers::ComputeMode;
pub use model::lora::{LoraAdapter, LoraConfig, MAX_LORA_RANK};
pub use model::sampling::SamplingParams;
pub use model::shard::{LogitsSelection, ShardInput, ShardOutput};
pub use model::tokenizer::{ChatMessage, Tokenizer, TokenizerInfo};
pub use model::weights::{ModelFormat, WeightFile};
pub use net::peers::{PeerInfo, PeerSet};
pub use net::{ModelInfo, NetError, NodeId, NodeStats, RouteHop};
pub use node::{
    adopt_peer_manifest, model_id, LeaveHandle, LeaveReport, Node, NodeBuilder, NodeOptions,
};
pub use protocol::client_session::SessionStats;
#[cfg(feature = "server")]
pub use server::{ApiServer, ServeOptions};
pub use swarm::{even_slices, LocalSwarm};
pub use swarm_session::{
    encode_prompt, resolve_peers, Conversation, LogitsSession, OnText, PreparedGeneration,
    SwarmGeneration, SwarmOptions, SwarmSession, TextRequest,
};
pub use train::{LearnOptions, StepReport, TrainOptions, TrainTarget, Trainer};
pub use wire::Codec;

/// This library's version (the crate version).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
