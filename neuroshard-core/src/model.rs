//! Model code: configs, weight loading, the two architectures, KV cache, tokenizer, sampling.

pub mod config;
pub(crate) mod decode;
pub(crate) mod gpt2;
pub mod kv_cache;
pub mod layers;
pub(crate) mod llama;
pub mod sampling;
pub mod shard;
pub mod tokenizer;
pub mod weights;
