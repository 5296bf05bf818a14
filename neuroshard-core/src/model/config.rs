//! Model hyper-parameters, read from a Hugging Face `config.json` or from GGUF metadata.
//!
//! Both formats are normalised into one [`ModelConfig`] so the model code never cares where the
//! weights came from. The only layout difference that survives is [`RopeLayout`]: llama.cpp's
//! converter permutes the rows of Q and K so that rotary embeddings rotate adjacent pairs, while
//! Hugging Face rotates the two halves of each head.

use crate::error::{Error, Result};
use candle_core::quantized::gguf_file;
use serde::{Deserialize, Serialize};

/// The transformer families the engine implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama-style decoder: RMSNorm, RoPE, grouped-query attention, SiLU-gated MLP.
    Llama,
    /// GPT-2: LayerNorm, learned positions, Conv1D projections, GELU (tanh) MLP.
    Gpt2,
}

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RopeLayout {
    /// Hugging Face: dimension `i` pairs with `i + head_dim / 2` (rotate-half).
    Halves,
    /// GGUF / llama.cpp: dimension `2i` pairs with `2i + 1` (Q and K rows were permuted).
    Interleaved,
}

/// Normalised hyper-parameters of one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Model family.
    pub architecture: Architecture,
    /// Vocabulary size (rows of the embedding matrix).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Number of transformer layers.
    pub num_layers: usize,
    /// Number of query heads.
    pub num_heads: usize,
    /// Number of key/value heads (equal to `num_heads` without GQA).
    pub num_kv_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Width of the MLP's inner layer.
    pub intermediate_size: usize,
    /// Epsilon of RMSNorm / LayerNorm.
    pub norm_eps: f64,
    /// RoPE base frequency (Llama only).
    pub rope_theta: f64,
    /// RoPE pairing of dimensions (Llama only).
    pub rope_layout: RopeLayout,
    /// Longest sequence the model supports (learned positions for GPT-2, context for Llama).
    pub max_positions: usize,
    /// Whether the LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token, if the model has one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens: generation stops on any of them.
    pub eos_token_ids: Vec<u32>,
}

/// The subset of Hugging Face `config.json` fields we read (both families share one struct;
/// GPT-2 uses its own field names, mapped through `alias`).
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    vocab_size: usize,
    #[serde(alias = "n_embd")]
    hidden_size: usize,
    #[serde(alias = "n_layer")]
    num_hidden_layers: usize,
    #[serde(alias = "n_head")]
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(alias = "n_inner")]
    intermediate_size: Option<usize>,
    rms_norm_eps: Option<f64>,
    layer_norm_epsilon: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<serde_json::Value>,
    rope_scaling: Option<serde_json::Value>,
    #[serde(alias = "n_positions")]
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
    hidden_act: Option<String>,
    activation_function: Option<String>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
}

/// Token ids in `config.json` may be a number, a list or null.
fn token_ids(value: &Option<serde_json::Value>) -> Vec<u32> {
    match value {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| v as u32).into_iter().collect(),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_u64().map(|v| v as u32))
            .collect(),
        _ => Vec::new(),
    }
}

impl ModelConfig {
    /// Parses a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let hf: HfConfig = serde_json::from_str(text)
            .map_err(|e| Error::InvalidConfig(format!("config.json: {e}")))?;
        let kind = hf
            .model_type
            .clone()
            .or_else(|| hf.architectures.as_ref().and_then(|a| a.first().cloned()))
            .unwrap_or_default()
            .to_lowercase();
        let architecture = if kind == "gpt2" || kind.starts_with("gpt2") {
            Architecture::Gpt2
        } else if kind == "llama" || kind.starts_with("llama") || kind == "mistral" {
            Architecture::Llama
        } else {
            return Err(Error::UnsupportedArchitecture(kind));
        };
        if hf.attention_bias == Some(true) || hf.mlp_bias == Some(true) {
            return Err(Error::InvalidConfig(
                "Llama attention/MLP biases are not supported".into(),
            ));
        }
        if let Some(scaling) = &hf.rope_scaling {
            if !scaling.is_null() {
                return Err(Error::InvalidConfig(format!(
                    "rope_scaling {scaling} is not supported"
                )));
            }
        }
        let act = hf
            .hidden_act
            .clone()
            .or_else(|| hf.activation_function.clone());
        match (architecture, act.as_deref()) {
            (Architecture::Llama, None | Some("silu")) => {}
            (Architecture::Gpt2, None | Some("gelu_new") | Some("gelu_pytorch_tanh")) => {}
            (_, Some(other)) => {
                return Err(Error::InvalidConfig(format!(
                    "activation `{other}` is not supported"
                )))
            }
        }
        // transformers >= 5 moved rope_theta into `rope_parameters`.
        let rope_theta = hf
            .rope_theta
            .or_else(|| {
                hf.rope_parameters
                    .as_ref()
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(|v| v.as_f64())
            })
            .unwrap_or(10_000.0);
        let num_kv_heads = hf.num_key_value_heads.unwrap_or(hf.num_attention_heads);
        let intermediate_size = hf.intermediate_size.unwrap_or(4 * hf.hidden_size);
        let config = ModelConfig {
            architecture,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads,
            head_dim: hf
                .head_dim
                .unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1)),
            intermediate_size,
            norm_eps: match architecture {
                Architecture::Llama => hf.rms_norm_eps.unwrap_or(1e-6),
                Architecture::Gpt2 => hf.layer_norm_epsilon.unwrap_or(1e-5),
            },
            rope_theta,
            rope_layout: RopeLayout::Halves,
            max_positions: hf.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: hf
                .tie_word_embeddings
                .unwrap_or(architecture == Architecture::Gpt2),
            bos_token_id: token_ids(&hf.bos_token_id).first().copied(),
            eos_token_ids: token_ids(&hf.eos_token_id),
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads the hyper-parameters from GGUF metadata (`general.architecture` = `llama`).
    pub fn from_gguf(content: &gguf_file::Content, has_output_tensor: bool) -> Result<Self> {
        let md = &content.metadata;
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if arch != "llama" {
            return Err(Error::UnsupportedArchitecture(arch));
        }
        let get_u = |key: &str| -> Result<usize> {
            md.get(key)
                .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)))
                .map(|v| v as usize)
                .ok_or_else(|| Error::InvalidConfig(format!("GGUF metadata lacks `{key}`")))
        };
        let get_f = |key: &str| -> Option<f64> {
            md.get(key)
                .and_then(|v| v.to_f32().ok().map(f64::from).or(v.to_f64().ok()))
        };
        let hidden_size = get_u("llama.embedding_length")?;
        let num_heads = get_u("llama.attention.head_count")?;
        let num_kv_heads = get_u("llama.attention.head_count_kv").unwrap_or(num_heads);
        let vocab_size = match get_u("llama.vocab_size") {
            Ok(v) => v,
            Err(_) => content
                .tensor_infos
                .get("token_embd.weight")
                .map(|t| t.shape.dims()[0])
                .ok_or_else(|| Error::MissingTensor("token_embd.weight".into()))?,
        };
        let head_dim =
            get_u("llama.attention.key_length").unwrap_or(hidden_size / num_heads.max(1));
        let token_id = |key: &str| md.get(key).and_then(|v| v.to_u32().ok());
        let config = ModelConfig {
            architecture: Architecture::Llama,
            vocab_size,
            hidden_size,
            num_layers: get_u("llama.block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            intermediate_size: get_u("llama.feed_forward_length")?,
            norm_eps: get_f("llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: get_f("llama.rope.freq_base").unwrap_or(10_000.0),
            rope_layout: RopeLayout::Interleaved,
            max_positions: get_u("llama.context_length").unwrap_or(2048),
            tie_word_embeddings: !has_output_tensor,
            bos_token_id: token_id("tokenizer.ggml.bos_token_id"),
            eos_token_ids: token_id("tokenizer.ggml.eos_token_id")
                .into_iter()
                .collect(),
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the relations the model code relies on.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidConfig(msg));
        if self.num_layers == 0 || self.hidden_size == 0 || self.vocab_size == 0 {
            return bad("layers, hidden size and vocabulary must be non-zero".into());
        }
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.num_heads % self.num_kv_heads != 0
        {
            return bad(format!(
                "{} heads cannot be grouped over {} key/value heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || self.head_dim % 2 != 0 {
            return bad(format!(
                "head_dim {} must be even and non-zero",
                self.head_dim
            ));
        }
        if self.architecture == Architecture::Gpt2
            && self.num_heads * self.head_dim != self.hidden_size
        {
            return bad("GPT-2 needs heads * head_dim == hidden size".into());
        }
        Ok(())
    }

    /// Number of query heads that share one key/value head.
    pub fn kv_groups(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fixture_configs() {
        let llama = ModelConfig::from_hf_json(
            r#"{"model_type":"llama","vocab_size":256,"hidden_size":64,"num_hidden_layers":4,
            "num_attention_heads":4,"num_key_value_heads":2,"intermediate_size":128,
            "rms_norm_eps":1e-5,"rope_parameters":{"rope_theta":500.0},"eos_token_id":[2,3]}"#,
        )
        .expect("llama config");
        assert_eq!(llama.head_dim, 16);
        assert_eq!(llama.kv_groups(), 2);
        assert_eq!(llama.rope_theta, 500.0);
        assert_eq!(llama.eos_token_ids, vec![2, 3]);
        let gpt2 = ModelConfig::from_hf_json(
            r#"{"model_type":"gpt2","vocab_size":256,"n_embd":64,"n_layer":4,"n_head":4,"n_positions":64}"#,
        )
        .expect("gpt2 config");
        assert_eq!(gpt2.intermediate_size, 256);
        assert!(gpt2.tie_word_embeddings);
    }

    #[test]
    fn rejects_unknown_architecture() {
        let err = ModelConfig::from_hf_json(
            r#"{"model_type":"bert","vocab_size":2,"hidden_size":2,"num_hidden_layers":1,"num_attention_heads":1}"#,
        )
        .unwrap_err();
        assert!(matches!(err, Error::UnsupportedArchitecture(a) if a == "bert"));
    }
}
