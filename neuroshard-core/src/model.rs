//! Model code: configs, weight loading, the two architectures, KV cache, tokenizer, sampling.

pub(crate) mod attention;
pub(crate) mod config;
pub(crate) mod decode;
pub(crate) mod gpt2;
pub(crate) mod identity;
pub(crate) mod kv_cache;
pub(crate) mod layers;
pub(crate) mod llama;
pub(crate) mod lora;
pub(crate) mod quant_linear;
pub(crate) mod sampling;
pub(crate) mod shard;
#[cfg(target_arch = "x86_64")]
pub(crate) mod simd;
pub(crate) mod tokenizer;
pub(crate) mod weights;
