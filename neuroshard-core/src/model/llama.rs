//! Llama decoder layers (SmolLM2, TinyLlama, Llama 2/3 style): pre-RMSNorm, grouped-query
//! attention with RoPE, SiLU-gated MLP.
//!
//! Ports `LlamaDecoderLayer` of Hugging Face transformers (`models/llama/modeling_llama.py`).
//! Parameters keep their Hugging Face names whatever the file format.

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::kv_cache::LayerKv;
use crate::model::layers::{
    attention, merge_heads, split_heads, ComputeMode, Linear, Param, Pass, RmsNorm, Rope,
    WeightLayout,
};
use crate::model::weights::WeightFile;
use candle_core::Tensor;

/// One Llama decoder layer.
#[derive(Debug, Clone)]
pub(crate) struct LlamaBlock {
    input_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    post_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

fn linear(
    file: &WeightFile,
    name: String,
    out: usize,
    inp: usize,
    mode: ComputeMode,
) -> Result<Linear> {
    Ok(Linear {
        weight: Param::load(file, &name, &[out, inp], mode)?,
        bias: None,
        layout: WeightLayout::OutIn,
    })
}

impl LlamaBlock {
    pub(crate) fn load(
        file: &WeightFile,
        cfg: &ModelConfig,
        layer: usize,
        mode: ComputeMode,
    ) -> Result<Self> {
        let p = format!("model.layers.{layer}");
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let eps = cfg.norm_eps as f32;
        let norm = |name: &str| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: Param::load(file, &format!("{p}.{name}.weight"), &[h], mode)?,
                eps,
            })
        };
        Ok(LlamaBlock {
            input_norm: norm("input_layernorm")?,
            q: linear(
                file,
                format!("{p}.self_attn.q_proj.weight"),
                cfg.num_heads * hd,
                h,
                mode,
            )?,
            k: linear(
                file,
                format!("{p}.self_attn.k_proj.weight"),
                cfg.num_kv_heads * hd,
                h,
                mode,
            )?,
            v: linear(
                file,
                format!("{p}.self_attn.v_proj.weight"),
                cfg.num_kv_heads * hd,
                h,
                mode,
            )?,
            o: linear(
                file,
                format!("{p}.self_attn.o_proj.weight"),
                h,
                cfg.num_heads * hd,
                mode,
            )?,
            post_norm: norm("post_attention_layernorm")?,
            gate: linear(
                file,
                format!("{p}.mlp.gate_proj.weight"),
                cfg.intermediate_size,
                h,
                mode,
            )?,
            up: linear(
                file,
                format!("{p}.mlp.up_proj.weight"),
                cfg.intermediate_size,
                h,
                mode,
            )?,
            down: linear(
                file,
                format!("{p}.mlp.down_proj.weight"),
                h,
                cfg.intermediate_size,
                mode,
            )?,
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: hd,
        })
    }

    /// `x`: `[b, seq, hidden]` at positions `start..start+seq`. With a cache, keys/values are
    /// written at those positions and attention covers the whole cached prefix.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        start: usize,
        rope: &Rope,
        cache: Option<&mut LayerKv>,
        pass: Pass,
    ) -> Result<Tensor> {
        let residual = x;
        let h = self.input_norm.forward(x, pass)?;
        let [q, k, v]: [Tensor; 3] = Linear::forward_many(&[&self.q, &self.k, &self.v], &h, pass)?
            .try_into()
            .map_err(|_| Error::BadInput("q/k/v projection count".into()))?;
        let q = split_heads(&q, self.heads, self.head_dim)?;
        let k = split_heads(&k, self.kv_heads, self.head_dim)?;
        let v = split_heads(&v, self.kv_heads, self.head_dim)?;
        let q = rope.apply(&q, start, pass)?;
        let k = rope.apply(&k, start, pass)?;
        let (k, v, q_start) = match cache {
            Some(cache) => {
                let (k, v) = cache.write(start, &k, &v)?;
                (k, v, start)
            }
            // Without a cache the keys are only the given positions: the mask starts at 0.
            None => (k, v, 0),
        };
        let attn = attention(&q, &k, &v, q_start, pass)?;
        let x = (residual + self.o.forward(&merge_heads(&attn)?, pass)?)?;
        let h = self.post_norm.forward(&x, pass)?;
        let [gate, up]: [Tensor; 2] = Linear::forward_many(&[&self.gate, &self.up], &h, pass)?
            .try_into()
            .map_err(|_| Error::BadInput("gate/up projection count".into()))?;
        let mlp = (gate.silu()? * up)?;
        Ok((&x + self.down.forward(&mlp, pass)?)?)
    }

    pub(crate) fn params(&self) -> Vec<&Param> {
        let mut out = vec![&self.input_norm.weight, &self.post_norm.weight];
        for l in [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ] {
            out.extend(l.params());
        }
        out
    }
}
