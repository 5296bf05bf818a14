//! GPT-2 decoder layers: pre-LayerNorm, fused QKV `Conv1D`, GELU (tanh) MLP.
//!
//! Ports `GPT2Block` of Hugging Face transformers (`models/gpt2/modeling_gpt2.py`). `Conv1D`
//! stores weights as `[in, out]`, so projections compute x W rather than x Wᵀ.

use crate::error::Result;
use crate::model::config::ModelConfig;
use crate::model::kv_cache::LayerKv;
use crate::model::layers::{
    attention, merge_heads, split_heads, ComputeMode, KeysValues, LayerNorm, Linear, Param, Pass,
    WeightLayout,
};
use crate::model::weights::WeightFile;
use candle_core::{Tensor, D};

/// One GPT-2 block.
#[derive(Debug, Clone)]
pub(crate) struct Gpt2Block {
    ln_1: LayerNorm,
    c_attn: Linear,
    c_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    mlp_proj: Linear,
    heads: usize,
    head_dim: usize,
}

pub(crate) fn layer_norm(
    file: &WeightFile,
    prefix: &str,
    h: usize,
    eps: f64,
    mode: ComputeMode,
) -> Result<LayerNorm> {
    Ok(LayerNorm {
        weight: Param::load(file, &format!("{prefix}.weight"), &[h], mode)?,
        bias: Param::load(file, &format!("{prefix}.bias"), &[h], mode)?,
        eps: eps as f32,
    })
}

fn conv1d(
    file: &WeightFile,
    prefix: &str,
    inp: usize,
    out: usize,
    mode: ComputeMode,
) -> Result<Linear> {
    let name = format!("{prefix}.weight");
    // Exact mode keeps the file's [in, out] layout (gradients then match Hugging Face's);
    // fast mode stores every matrix as [out, in] rows of blocks for the kernels.
    let (weight, layout) = match mode {
        // Dense, in the file's layout (a quantised [in, out] matrix is not a kernel's rows).
        ComputeMode::Exact | ComputeMode::F32 => (
            Param::load(file, &name, &[inp, out], ComputeMode::F32)?,
            WeightLayout::InOut,
        ),
        ComputeMode::Fast => (
            Param::load_transposed(file, &name, &[inp, out], mode)?,
            WeightLayout::OutIn,
        ),
    };
    Ok(Linear {
        weight,
        bias: Some(Param::load(file, &format!("{prefix}.bias"), &[out], mode)?),
        layout,
    })
}

impl Gpt2Block {
    pub(crate) fn load(
        file: &WeightFile,
        cfg: &ModelConfig,
        layer: usize,
        mode: ComputeMode,
    ) -> Result<Self> {
        let p = format!("transformer.h.{layer}");
        let h = cfg.hidden_size;
        Ok(Gpt2Block {
            ln_1: layer_norm(file, &format!("{p}.ln_1"), h, cfg.norm_eps, mode)?,
            c_attn: conv1d(file, &format!("{p}.attn.c_attn"), h, 3 * h, mode)?,
            c_proj: conv1d(file, &format!("{p}.attn.c_proj"), h, h, mode)?,
            ln_2: layer_norm(file, &format!("{p}.ln_2"), h, cfg.norm_eps, mode)?,
            c_fc: conv1d(
                file,
                &format!("{p}.mlp.c_fc"),
                h,
                cfg.intermediate_size,
                mode,
            )?,
            mlp_proj: conv1d(
                file,
                &format!("{p}.mlp.c_proj"),
                cfg.intermediate_size,
                h,
                mode,
            )?,
            heads: cfg.num_heads,
            head_dim: cfg.head_dim,
        })
    }

    /// `x`: `[b, seq, hidden]` at positions `start..start+seq`.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        start: usize,
        cache: Option<&mut LayerKv>,
        pass: Pass,
    ) -> Result<Tensor> {
        let h = self.ln_1.forward(x, pass)?;
        let qkv = self.c_attn.forward(&h, pass)?;
        let width = self.heads * self.head_dim;
        let q = split_heads(&qkv.narrow(D::Minus1, 0, width)?, self.heads, self.head_dim)?;
        let k = split_heads(
            &qkv.narrow(D::Minus1, width, width)?,
            self.heads,
            self.head_dim,
        )?;
        let v = split_heads(
            &qkv.narrow(D::Minus1, 2 * width, width)?,
            self.heads,
            self.head_dim,
        )?;
        let attn = match cache {
            Some(cache) => {
                cache.write(start, &k, &v)?;
                attention(&q, KeysValues::Cache(cache), start, pass)?
            }
            None => attention(&q, KeysValues::Tensors(&k, &v), 0, pass)?,
        };
        let x = (x + self.c_proj.forward(&merge_heads(&attn)?, pass)?)?;
        let h = self.ln_2.forward(&x, pass)?;
        // HF "gelu_new" is the tanh approximation, which is candle's `gelu`.
        let m = self
            .mlp_proj
            .forward(&self.c_fc.forward(&h, pass)?.gelu()?, pass)?;
        Ok((&x + m)?)
    }

    pub(crate) fn params(&self) -> Vec<&Param> {
        let mut out = vec![
            &self.ln_1.weight,
            &self.ln_1.bias,
            &self.ln_2.weight,
            &self.ln_2.bias,
        ];
        for l in self.linears() {
            out.extend(l.params());
        }
        out
    }

    /// The block's projections, in parameter order.
    pub(crate) fn linears(&self) -> Vec<&Linear> {
        vec![&self.c_attn, &self.c_proj, &self.c_fc, &self.mlp_proj]
    }
}
