//! Llama decoder layers (SmolLM2, TinyLlama, Llama 2/3 style): pre-RMSNorm, grouped-query
//! attention with RoPE, SiLU-gated MLP.
//!
//! Ports `LlamaDecoderLayer` of Hugging Face transformers (`models/llama/modeling_llama.py`).
//! Parameters keep their Hugging Face names whatever the file format.

use crate::error::{Error, Result};
use crate::kernels::QuantMatrix;
use crate::model::attention::AttentionShape;
use crate::model::config::ModelConfig;
use crate::model::decode;
use crate::model::kv_cache::LayerKv;
use crate::model::layers::{
    attention, merge_heads, project, split_heads, ComputeMode, KeysValues, Linear, Param, Pass,
    RmsNorm, Rope, WeightLayout,
};
use crate::model::weights::WeightFile;
use candle_core::Tensor;
use rayon::prelude::*;

/// One session's rows of a batched decode step (see [`LlamaBlock::forward_raw_batch`]): its
/// position, its cache of the layer, its query, key and value rows and its attention output.
struct SessionRows<'a> {
    start: usize,
    cache: &'a mut LayerKv,
    q: &'a mut [f32],
    k: &'a mut [f32],
    v: &'a [f32],
    out: &'a mut [f32],
}

/// The outputs of a fused projection call as an array of its `N` parts.
fn exactly<T, const N: usize>(outputs: Vec<T>, what: &str) -> Result<[T; N]> {
    outputs
        .try_into()
        .map_err(|_| Error::BadInput(format!("{what} projection count")))
}

/// Buffers reused across the layers of one [`LlamaBlock::forward_raw`] pass, and the row
/// count from which its products take the dense path (see [`project`]).
#[derive(Debug)]
pub(crate) struct RawScratch {
    h: Vec<f32>,
    attn: Vec<f32>,
    dense_from: usize,
}

impl RawScratch {
    /// Empty buffers; products of `dense_from` rows or more take the dense path.
    pub(crate) fn new(dense_from: usize) -> Self {
        RawScratch {
            h: Vec::new(),
            attn: Vec::new(),
            dense_from,
        }
    }
}

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
        let [q, k, v] = exactly(
            Linear::forward_many(&[&self.q, &self.k, &self.v], &h, pass)?,
            "q/k/v",
        )?;
        let q = split_heads(&q, self.heads, self.head_dim)?;
        let k = split_heads(&k, self.kv_heads, self.head_dim)?;
        let v = split_heads(&v, self.kv_heads, self.head_dim)?;
        let q = rope.apply(&q, start, pass)?;
        let k = rope.apply(&k, start, pass)?;
        let attn = match cache {
            Some(cache) => {
                cache.write(start, &k, &v)?;
                attention(&q, KeysValues::Cache(cache), start, pass)?
            }
            // Without a cache the keys are only the given positions: the mask starts at 0.
            None => attention(&q, KeysValues::Tensors(&k, &v), 0, pass)?,
        };
        let x = (residual + self.o.forward(&merge_heads(&attn)?, pass)?)?;
        let h = self.post_norm.forward(&x, pass)?;
        let [gate, up] = exactly(
            Linear::forward_many(&[&self.gate, &self.up], &h, pass)?,
            "gate/up",
        )?;
        let mlp = (gate.silu()? * up)?;
        Ok((&x + self.down.forward(&mlp, pass)?)?)
    }

    /// The seven projections as block matrices, when every one of them is (exact and fast
    /// modes on a quantised file): what [`LlamaBlock::forward_raw`] needs.
    fn block_matrices(&self) -> Option<[&QuantMatrix; 7]> {
        fn m(l: &Linear) -> Option<&QuantMatrix> {
            l.weight.quant.as_deref().filter(|_| l.bias.is_none())
        }
        Some([
            m(&self.q)?,
            m(&self.k)?,
            m(&self.v)?,
            m(&self.o)?,
            m(&self.gate)?,
            m(&self.up)?,
            m(&self.down)?,
        ])
    }

    /// Whether [`LlamaBlock::forward_raw`] can run this layer.
    pub(crate) fn raw_ready(&self) -> bool {
        self.block_matrices().is_some()
    }

    /// Inference on plain buffers (the per-token path): `x` holds `seq` rows of the hidden
    /// state for positions `start..start+seq` of a batch-1 session and is updated in place;
    /// the keys and values are appended to `cache`. Same formulas as [`LlamaBlock::forward`]
    /// without tensor ops (see [`crate::model::decode`]).
    pub(crate) fn forward_raw(
        &self,
        x: &mut [f32],
        seq: usize,
        start: usize,
        rope: &Rope,
        cache: &mut LayerKv,
        scratch: &mut RawScratch,
    ) -> Result<()> {
        let [q, k, v, o, gate, up, down] = self
            .block_matrices()
            .ok_or_else(|| Error::BadInput("layer without block matrices".into()))?;
        let (heads, kv_heads, hd) = (self.heads, self.kv_heads, self.head_dim);
        scratch.h.resize(x.len(), 0.0);
        self.input_norm.forward_raw(x, &mut scratch.h)?;
        let [mut qs, mut ks, vs] = exactly(
            project(&[q, k, v], &scratch.h, seq, scratch.dense_from)?,
            "q/k/v",
        )?;
        let (cos, sin) = rope.tables(start, seq)?;
        decode::rope(&mut qs, heads, hd, cos, sin, rope.interleaved);
        decode::rope(&mut ks, kv_heads, hd, cos, sin, rope.interleaved);
        cache.write_rows(start, kv_heads, hd, &ks, &vs)?;
        scratch.attn.resize(seq * heads * hd, 0.0);
        let cached: &LayerKv = cache;
        let shape = AttentionShape {
            heads,
            kv_heads,
            head_dim: hd,
            start,
        };
        crate::model::attention::attention(
            crate::kernels::KernelPath::detect(),
            &qs,
            shape,
            |g| cached.head(g),
            &mut scratch.attn,
        );
        let [attn_out] = exactly(project(&[o], &scratch.attn, seq, scratch.dense_from)?, "o")?;
        decode::add_assign(x, &attn_out);
        self.post_norm.forward_raw(x, &mut scratch.h)?;
        let [mut g, u] = exactly(
            project(&[gate, up], &scratch.h, seq, scratch.dense_from)?,
            "gate/up",
        )?;
        decode::silu_mul(&mut g, &u);
        let [mlp_out] = exactly(project(&[down], &g, seq, scratch.dense_from)?, "down")?;
        decode::add_assign(x, &mlp_out);
        Ok(())
    }

    /// One decode position for each of several sessions at once (`x`: one hidden row per
    /// session, updated in place; `starts[i]` is session i's position, `caches[i]` its cache of
    /// this layer). The projections read and unpack every weight block once for all rows; the
    /// rest is per row. Each row gets exactly the bits [`LlamaBlock::forward_raw`] gives it
    /// alone: the block kernels are batch-invariant (no dense path, whatever the row count) and
    /// attention runs per session as in a solo step.
    pub(crate) fn forward_raw_batch(
        &self,
        x: &mut [f32],
        starts: &[usize],
        rope: &Rope,
        caches: &mut [&mut LayerKv],
    ) -> Result<()> {
        let [q, k, v, o, gate, up, down] = self
            .block_matrices()
            .ok_or_else(|| Error::BadInput("layer without block matrices".into()))?;
        let (heads, kv_heads, hd) = (self.heads, self.kv_heads, self.head_dim);
        let n = starts.len();
        let mut h = vec![0f32; x.len()];
        self.input_norm.forward_raw(x, &mut h)?;
        let [mut qs, mut ks, vs] = exactly(QuantMatrix::matmul_fused(&[q, k, v], &h, n)?, "q/k/v")?;
        let (qw, kw) = (heads * hd, kv_heads * hd);
        let mut attn = vec![0f32; n * qw];
        let shape = |start| AttentionShape {
            heads,
            kv_heads,
            head_dim: hd,
            start,
        };
        // Each session's rope, cache write and attention, exactly as in its solo step. The
        // sessions are independent, so they spread over the pool (run one after another,
        // they left the other cores spinning: +5% aggregate at 8 sessions, paired runs).
        let path = crate::kernels::KernelPath::detect();
        let per_session = |s: SessionRows<'_>| -> Result<()> {
            let (cos, sin) = rope.tables(s.start, 1)?;
            decode::rope(s.q, heads, hd, cos, sin, rope.interleaved);
            decode::rope(s.k, kv_heads, hd, cos, sin, rope.interleaved);
            s.cache.write_rows(s.start, kv_heads, hd, s.k, s.v)?;
            let cached: &LayerKv = s.cache;
            let shape = shape(s.start);
            crate::model::attention::attention(path, s.q, shape, |g| cached.head(g), s.out);
            Ok(())
        };
        let sessions = starts
            .iter()
            .zip(caches.iter_mut())
            .zip(qs.chunks_exact_mut(qw).zip(ks.chunks_exact_mut(kw)))
            .zip(vs.chunks_exact(kw).zip(attn.chunks_exact_mut(qw)))
            .map(|(((&start, cache), (q, k)), (v, out))| SessionRows {
                start,
                cache,
                q,
                k,
                v,
                out,
            });
        if n > 1 && rayon::current_num_threads() > 1 && crate::runtime::spread_work() {
            let sessions: Vec<_> = sessions.collect();
            sessions.into_par_iter().try_for_each(per_session)?;
        } else {
            sessions.into_iter().try_for_each(per_session)?;
        }
        let [attn_out] = exactly(QuantMatrix::matmul_fused(&[o], &attn, n)?, "o")?;
        decode::add_assign(x, &attn_out);
        self.post_norm.forward_raw(x, &mut h)?;
        let [mut g, u] = exactly(QuantMatrix::matmul_fused(&[gate, up], &h, n)?, "gate/up")?;
        decode::silu_mul(&mut g, &u);
        let [mlp_out] = exactly(QuantMatrix::matmul_fused(&[down], &g, n)?, "down")?;
        decode::add_assign(x, &mlp_out);
        Ok(())
    }

    /// Replaces the MLP's down projection with a noisy dense copy (`wrong-weights`).
    #[cfg(any(feature = "adversary", feature = "internals"))]
    pub(crate) fn perturb_down(&mut self, fraction: f32, seed: u64) -> Result<String> {
        self.down.weight = self.down.weight.perturbed(fraction, seed)?;
        Ok(self.down.weight.name.clone())
    }

    pub(crate) fn params(&self) -> Vec<&Param> {
        let mut out = vec![&self.input_norm.weight, &self.post_norm.weight];
        for l in self.linears() {
            out.extend(l.params());
        }
        out
    }

    /// The block's projections, in parameter order.
    pub(crate) fn linears(&self) -> Vec<&Linear> {
        vec![
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
    }
}
