//! Building blocks shared by the model families: parameters, linear layers, norms, rotary
//! embeddings and causal attention over a position-indexed KV cache.
//!
//! Every block has two forward flavours selected by [`Pass::track`]: inference uses candle's fused
//! kernels (`softmax_last_dim`, `rms_norm`, `rope`), which have no backward; training uses the
//! differentiable compositions (`softmax`, `rms_norm_slow`, `rope_slow`), because candle silently
//! drops gradients through the fused ones (see DESIGN.md, "Verified facts and traps").

use crate::error::Error;
use crate::error::Result;
use crate::kernels::QuantMatrix;
use crate::model::attention::{attention as tiled_attention, AttentionShape, KvRows};
use crate::model::kv_cache::LayerKv;
use crate::model::lora::LoraAdapter;
use crate::model::weights::{RawTensor, WeightFile};
use candle_core::{DType, Device, Tensor, Var, D};
use std::sync::Arc;

/// How the engine stores weights and computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeMode {
    /// The default: weight matrices stored in the file as Q4_0/Q4_1/Q8_0 blocks stay in those
    /// blocks and are multiplied by f32 activations with f32 accumulation (`kernels.rs`):
    /// the same arithmetic as dequantising first, in a different summation order, at a
    /// fraction of the memory traffic. Every other tensor is dense f32 (and trainable).
    #[default]
    Exact,
    /// Everything dequantised to f32 once at load, candle's dense matmuls: the reference path,
    /// and the one that trains quantised models.
    F32,
    /// Like `Exact`, and dense matrices are re-quantised to Q8_0 too (an approximation:
    /// smaller and faster for f16/f32 files). Inference only.
    Fast,
}

impl std::str::FromStr for ComputeMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "exact" => Ok(ComputeMode::Exact),
            "f32" => Ok(ComputeMode::F32),
            "fast" => Ok(ComputeMode::Fast),
            other => Err(format!(
                "unknown mode `{other}` (expected exact, f32 or fast)"
            )),
        }
    }
}

/// Per-call options threaded through every block's forward.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pass<'a> {
    /// Build the autograd graph through trainable variables (training forward).
    pub(crate) track: bool,
    /// The LoRA adapter the call runs with (`None`: the base weights).
    pub(crate) adapter: Option<&'a LoraAdapter>,
}

impl Pass<'static> {
    /// Inference on the base weights.
    pub(crate) const INFERENCE: Pass<'static> = Pass {
        track: false,
        adapter: None,
    };
}

/// One named model parameter.
///
/// Dense parameters: `dense` is a detached view sharing storage with `var` (so optimizer
/// updates are seen without copies) and `var` is what training differentiates through (not in
/// fast mode). Quantised matrices (exact and fast mode) are kept as blocks in `quant`: the
/// GGUF blocks themselves when the kernels support the format, or (fast mode only) Q8_0.
#[derive(Debug, Clone)]
pub(crate) struct Param {
    pub(crate) name: String,
    dense: Option<Tensor>,
    pub(crate) var: Option<Var>,
    pub(crate) quant: Option<Arc<QuantMatrix>>,
}

impl Param {
    /// Builds a parameter from a raw tensor; `transpose` turns a GPT-2 `[in, out]` matrix into
    /// `[out, in]` (fast mode only, where every matrix is stored that way).
    pub(crate) fn from_raw(name: &str, raw: &RawTensor, mode: ComputeMode) -> Result<Self> {
        let matrix = raw.dims().len() == 2;
        if mode != ComputeMode::F32 && matrix {
            let quant = match raw {
                RawTensor::Quantized(q) => QuantMatrix::from_qtensor(q)?,
                RawTensor::Dense(_) => None,
            };
            let quant = match (quant, mode) {
                (Some(q), _) => Some(q),
                (None, ComputeMode::Fast) => {
                    QuantMatrix::quantize_q8_0(&raw.to_dense(DType::F32)?)?
                }
                (None, _) => None,
            };
            if let Some(q) = quant {
                return Ok(Param {
                    name: name.to_string(),
                    dense: None,
                    var: None,
                    quant: Some(Arc::new(q)),
                });
            }
        }
        let var = Var::from_tensor(&raw.to_dense(DType::F32)?)?;
        Ok(Param {
            name: name.to_string(),
            dense: Some(var.as_tensor().detach()),
            var: (mode != ComputeMode::Fast).then_some(var),
            quant: None,
        })
    }

    /// This parameter as a dense f32 one with Gaussian noise of `fraction` times its RMS
    /// added (the `wrong-weights` lie of the trust tests).
    #[cfg(any(feature = "adversary", feature = "internals"))]
    pub(crate) fn perturbed(&self, fraction: f32, seed: u64) -> Result<Param> {
        let value = self.value()?;
        let mut values: Vec<f32> = value.flatten_all()?.to_vec1()?;
        let width = values.len();
        let mut noise = crate::consensus::adversary::Gaussian::new(seed);
        crate::consensus::adversary::add_noise(&mut values, width, fraction, &mut noise);
        let var = Var::from_tensor(&Tensor::from_vec(values, value.shape(), value.device())?)?;
        Ok(Param {
            name: self.name.clone(),
            dense: Some(var.as_tensor().detach()),
            var: Some(var),
            quant: None,
        })
    }

    /// Loads and wraps a tensor in one step.
    pub(crate) fn load(
        file: &WeightFile,
        name: &str,
        dims: &[usize],
        mode: ComputeMode,
    ) -> Result<Self> {
        Self::from_raw(name, &file.load(name, dims)?, mode)
    }

    /// Loads an `[in, out]` matrix and stores it as `[out, in]` (GPT-2 `Conv1D` in fast mode).
    pub(crate) fn load_transposed(
        file: &WeightFile,
        name: &str,
        dims: &[usize],
        mode: ComputeMode,
    ) -> Result<Self> {
        let dense = file
            .load(name, dims)?
            .to_dense(DType::F32)?
            .t()?
            .contiguous()?;
        Self::from_raw(name, &RawTensor::Dense(dense), mode)
    }

    /// The dense tensor to compute with for this pass.
    pub(crate) fn get(&self, pass: Pass) -> Result<&Tensor> {
        match (&self.var, pass.track, &self.dense) {
            (Some(var), true, _) => Ok(var.as_tensor()),
            (_, _, Some(dense)) => Ok(dense),
            _ => Err(Error::BadInput(format!(
                "parameter `{}` is only held quantised",
                self.name
            ))),
        }
    }

    /// The current value as a dense f32 tensor.
    pub(crate) fn value(&self) -> Result<Tensor> {
        match (&self.dense, &self.quant) {
            (Some(d), _) => Ok(d.clone()),
            (None, Some(q)) => q.dequantize(),
            (None, None) => Err(Error::BadInput(format!(
                "parameter `{}` has no value",
                self.name
            ))),
        }
    }

    /// Shape of the parameter.
    pub(crate) fn dims(&self) -> Vec<usize> {
        match (&self.dense, &self.quant) {
            (Some(d), _) => d.dims().to_vec(),
            (None, Some(q)) => vec![q.rows(), q.cols()],
            (None, None) => Vec::new(),
        }
    }

    /// Bytes held in memory.
    pub(crate) fn bytes(&self) -> u64 {
        let dense = self
            .dense
            .as_ref()
            .map_or(0, |d| d.elem_count() * d.dtype().size_in_bytes());
        (dense + self.quant.as_ref().map_or(0, |q| q.bytes())) as u64
    }

    /// Rows `ids` of a `[n, width]` matrix as `[ids.len(), width]` f32 (embedding lookup).
    pub(crate) fn rows(&self, ids: &Tensor, pass: Pass) -> Result<Tensor> {
        // Untracked, or frozen (no variable: nothing to differentiate): rows straight from
        // the blocks. A LoRA pass over a quantised base embeds this way.
        if let (Some(q), false) = (&self.quant, pass.track && self.var.is_some()) {
            let ids: Vec<u32> = ids.to_vec1()?;
            let width = q.cols();
            let mut out = vec![0f32; ids.len() * width];
            for (id, row) in ids.iter().zip(out.chunks_exact_mut(width)) {
                q.dequantize_row(*id as usize, row);
            }
            return Ok(Tensor::from_vec(out, (ids.len(), width), &Device::Cpu)?);
        }
        Ok(self.get(pass)?.index_select(ids, 0)?)
    }
}

/// Weight orientation in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WeightLayout {
    /// PyTorch `nn.Linear`: `[out, in]`, y = x Wᵀ.
    OutIn,
    /// GPT-2 `Conv1D`: `[in, out]`, y = x W.
    InOut,
}

/// A dense projection with optional bias.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    pub(crate) weight: Param,
    pub(crate) bias: Option<Param>,
    pub(crate) layout: WeightLayout,
}

/// From this many input rows on, a quantised matrix is dequantised for a dense gemm (unless
/// the engine is chunk-invariant, see [`crate::engine::EngineOptions::chunk_invariant`]).
pub(crate) const DENSE_GEMM_ROWS: usize = 16;

/// `x Wᵢᵀ` for each matrix `Wᵢ`, `x` holding `rows` rows: the block kernels below
/// `dense_from` rows (decode), dequantised weights and the dense gemm from there on (prefill
/// chunks); the one choice for the buffer path and [`Linear::forward`] alike. The two round
/// differently, so `dense_from = usize::MAX` keeps every row's bits independent of `rows`.
pub(crate) fn project(
    parts: &[&QuantMatrix],
    x: &[f32],
    rows: usize,
    dense_from: usize,
) -> Result<Vec<Vec<f32>>> {
    if rows < dense_from {
        return QuantMatrix::matmul_fused(parts, x, rows);
    }
    let cols = x.len() / rows.max(1);
    let xt = Tensor::from_slice(x, (rows, cols), &candle_core::Device::Cpu)?;
    parts
        .iter()
        .map(|w| Ok(xt.matmul(&w.dequantize()?.t()?)?.flatten_all()?.to_vec1()?))
        .collect()
}

impl Linear {
    /// y = x W (+ b) for x of shape `[..., in]`.
    pub(crate) fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let last = dims.len() - 1;
        let rows: usize = dims[..last].iter().product();
        let x2 = x.reshape((rows, dims[last]))?;
        let y = match (&self.weight.quant, pass.track) {
            // Many positions (prefill) take the dense gemm, which reuses each weight across
            // rows far better than the block kernels; a few take the block kernels.
            (Some(q), false) => {
                let flat: Vec<f32> = x2.flatten_all()?.to_vec1()?;
                let mut out = project(&[q], &flat, rows, DENSE_GEMM_ROWS)?;
                Tensor::from_vec(
                    out.pop().unwrap_or_default(),
                    (rows, q.rows()),
                    &Device::Cpu,
                )?
            }
            // Training through a frozen quantised matrix: the block kernels forward, the
            // input gradient through the blocks backward (`quant_linear.rs`).
            (Some(q), true) => crate::model::quant_linear::QuantLinear(q.clone()).apply(&x2)?,
            _ => {
                let w = self.weight.get(pass)?;
                match self.layout {
                    WeightLayout::OutIn => x2.matmul(&w.t()?)?,
                    WeightLayout::InOut => x2.matmul(w)?,
                }
            }
        };
        self.finish_with(&x2, y, dims, pass)
    }

    /// (inputs, outputs) of the projection.
    pub(crate) fn in_out(&self) -> (usize, usize) {
        let dims = self.weight.dims();
        let (a, b) = (
            dims.first().copied().unwrap_or(0),
            dims.get(1).copied().unwrap_or(0),
        );
        match (&self.weight.quant, self.layout) {
            // Block matrices are always `[out, in]`.
            (Some(_), _) | (None, WeightLayout::OutIn) => (b, a),
            (None, WeightLayout::InOut) => (a, b),
        }
    }

    /// Adds the pass's adapter part (when its adapter covers this matrix) and the bias to
    /// `y` (`[rows, out]`, computed from `x2`: `[rows, in]`), and restores the input's
    /// leading dimensions.
    fn finish_with(&self, x2: &Tensor, y: Tensor, dims: Vec<usize>, pass: Pass) -> Result<Tensor> {
        let y = match pass
            .adapter
            .and_then(|a| a.pair(&self.weight.name).map(|p| (a, p)))
        {
            Some((adapter, pair)) => (y + adapter.delta(pair, x2, pass.track)?)?,
            None => y,
        };
        self.finish(y, dims, pass)
    }

    /// Adds the bias to `y` (`[rows, out]`) and restores the input's leading dimensions.
    fn finish(&self, y: Tensor, mut dims: Vec<usize>, pass: Pass) -> Result<Tensor> {
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b.get(pass)?)?,
            None => y,
        };
        let last = dims.len() - 1;
        dims[last] = y.dim(1)?;
        Ok(y.reshape(dims)?)
    }

    pub(crate) fn params(&self) -> impl Iterator<Item = &Param> {
        std::iter::once(&self.weight).chain(self.bias.iter())
    }

    /// Several projections of the same `x` (Q/K/V, gate/up). For a few positions over block
    /// matrices of one format this is one fused kernel call ([`QuantMatrix::matmul_fused`]):
    /// one input preparation and one thread-pool dispatch instead of one per projection.
    /// Otherwise each projection runs on its own; the results are the same either way.
    pub(crate) fn forward_many(linears: &[&Linear], x: &Tensor, pass: Pass) -> Result<Vec<Tensor>> {
        let dims = x.dims().to_vec();
        let last = dims.len() - 1;
        let rows: usize = dims[..last].iter().product();
        let quant: Option<Vec<&QuantMatrix>> =
            linears.iter().map(|l| l.weight.quant.as_deref()).collect();
        let fusable = match &quant {
            Some(q)
                if !pass.track
                    && pass.adapter.is_none()
                    && rows < DENSE_GEMM_ROWS
                    && !q.is_empty() =>
            {
                q.iter()
                    .all(|m| m.format() == q[0].format() && m.cols() == q[0].cols())
            }
            _ => false,
        };
        let Some(quant) = quant.filter(|_| fusable) else {
            return linears.iter().map(|l| l.forward(x, pass)).collect();
        };
        let flat: Vec<f32> = x.reshape((rows, dims[last]))?.flatten_all()?.to_vec1()?;
        let outs = QuantMatrix::matmul_fused(&quant, &flat, rows)?;
        linears
            .iter()
            .zip(quant.iter().zip(outs))
            .map(|(l, (q, y))| {
                l.finish(
                    Tensor::from_vec(y, (rows, q.rows()), &Device::Cpu)?,
                    dims.clone(),
                    pass,
                )
            })
            .collect()
    }
}

/// RMSNorm (Llama): x / sqrt(mean(x²) + eps) * w, computed in f32.
#[derive(Debug, Clone)]
pub(crate) struct RmsNorm {
    pub(crate) weight: Param,
    pub(crate) eps: f32,
}

impl RmsNorm {
    /// The norm of each row of `x` into `out` ([`crate::model::decode`] path, inference).
    pub(crate) fn forward_raw(&self, x: &[f32], out: &mut [f32]) -> Result<()> {
        let w = self.weight.get(Pass::INFERENCE)?;
        crate::model::decode::with_f32(w, |w| crate::model::decode::rms_norm(x, w, self.eps, out))?
    }

    pub(crate) fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let w = self.weight.get(pass)?;
        Ok(if pass.track {
            candle_nn::ops::rms_norm_slow(x, w, self.eps)?
        } else {
            candle_nn::ops::rms_norm(&x.contiguous()?, w, self.eps)?
        })
    }
}

/// LayerNorm (GPT-2) with weight and bias.
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    pub(crate) weight: Param,
    pub(crate) bias: Param,
    pub(crate) eps: f32,
}

impl LayerNorm {
    pub(crate) fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let (w, b) = (self.weight.get(pass)?, self.bias.get(pass)?);
        Ok(if pass.track {
            candle_nn::ops::layer_norm_slow(x, w, b, self.eps)?
        } else {
            candle_nn::ops::layer_norm(&x.contiguous()?, w, b, self.eps)?
        })
    }
}

/// Precomputed RoPE cos/sin tables, `[max_positions, head_dim / 2]`.
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    /// `[max_positions][head_dim / 2]`, row-major.
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    pub(crate) interleaved: bool,
}

impl Rope {
    pub(crate) fn new(
        head_dim: usize,
        theta: f64,
        max_positions: usize,
        interleaved: bool,
    ) -> Result<Self> {
        let half = head_dim / 2;
        // Same formula as transformers: inv_freq = 1 / theta^(2i / d), computed in f32 there too.
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / (theta as f32).powf(2.0 * i as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(Rope {
            cos,
            sin,
            half,
            interleaved,
        })
    }

    /// The cos and sin rows of positions `start..start+seq` (`head_dim / 2` values each).
    pub(crate) fn tables(&self, start: usize, seq: usize) -> Result<(&[f32], &[f32])> {
        let (from, to) = (start * self.half, (start + seq) * self.half);
        if to > self.cos.len() {
            return Err(Error::BadInput(format!(
                "positions {start}..{} exceed the model's {} positions",
                start + seq,
                self.cos.len() / self.half.max(1)
            )));
        }
        Ok((&self.cos[from..to], &self.sin[from..to]))
    }

    /// Rotates `x` of shape `[batch, heads, seq, head_dim]` for positions `start..start+seq`.
    pub(crate) fn apply(&self, x: &Tensor, start: usize, pass: Pass) -> Result<Tensor> {
        let seq = x.dim(2)?;
        let (cos, sin) = self.tables(start, seq)?;
        let cos = Tensor::from_slice(cos, (seq, self.half), &Device::Cpu)?;
        let sin = Tensor::from_slice(sin, (seq, self.half), &Device::Cpu)?;
        Ok(match (pass.track, self.interleaved) {
            (true, false) => candle_nn::rotary_emb::rope_slow(x, &cos, &sin)?,
            (true, true) => candle_nn::rotary_emb::rope_i_slow(x, &cos, &sin)?,
            (false, false) => candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?,
            (false, true) => candle_nn::rotary_emb::rope_i(&x.contiguous()?, &cos, &sin)?,
        })
    }
}

/// Additive causal mask for `seq` queries at positions `start..start+seq` over `start+seq` keys,
/// repeated for `groups` query heads that share a key/value head: `[groups * seq, start + seq]`.
fn causal_mask(seq: usize, start: usize, groups: usize) -> Result<Tensor> {
    let keys = start + seq;
    let mut mask = Vec::with_capacity(groups * seq * keys);
    for _ in 0..groups {
        for i in 0..seq {
            for j in 0..keys {
                mask.push(if j <= start + i {
                    0.0f32
                } else {
                    f32::NEG_INFINITY
                });
            }
        }
    }
    Ok(Tensor::from_vec(mask, (groups * seq, keys), &Device::Cpu)?)
}

/// Where attention reads its keys and values.
#[derive(Debug, Clone, Copy)]
pub(crate) enum KeysValues<'a> {
    /// A session's cache, already holding the queries' own positions.
    Cache(&'a LayerKv),
    /// `[b, kv_heads, keys, d]` tensors of exactly the queries' positions (no session).
    Tensors(&'a Tensor, &'a Tensor),
}

/// Causal attention with grouped-query heads for `q` (`[b, heads, seq, d]`) at positions
/// `start..start+seq`; returns `[b, heads, seq, d]`.
///
/// Inference runs the tiled kernel ([`crate::model::attention`]: no score matrix, memory
/// O(seq)); a tracked pass (training) the differentiable tensor formula.
pub(crate) fn attention(
    q: &Tensor,
    kv: KeysValues<'_>,
    start: usize,
    pass: Pass,
) -> Result<Tensor> {
    if let (KeysValues::Tensors(k, v), true) = (kv, pass.track) {
        return attention_formula(q, k, v, start, pass);
    }
    let (b, heads, seq, d) = q.dims4()?;
    // The kernel reads queries as [seq][heads][d] per batch row.
    let qs: Vec<f32> = q
        .transpose(1, 2)?
        .contiguous()?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let mut out = vec![0f32; qs.len()];
    let step = seq * heads * d;
    let path = crate::kernels::KernelPath::detect();
    let shape = |kv_heads| AttentionShape {
        heads,
        kv_heads,
        head_dim: d,
        start,
    };
    match kv {
        KeysValues::Cache(cache) => {
            let kv_heads = cache.kv_heads();
            if cache.len() != start + seq || cache.batch() != Some(b) {
                return Err(Error::BadInput(format!(
                    "attention for positions {start}..{} over a cache of {} positions",
                    start + seq,
                    cache.len()
                )));
            }
            for (bi, (qb, ob)) in qs
                .chunks_exact(step)
                .zip(out.chunks_exact_mut(step))
                .enumerate()
            {
                let kv = |g| cache.head(bi * kv_heads + g);
                tiled_attention(path, qb, shape(kv_heads), kv, ob);
            }
        }
        KeysValues::Tensors(k, v) => {
            let (kb, kv_heads, keys, kd) = k.dims4()?;
            if (kb, keys, kd) != (b, start + seq, d) || v.dims() != k.dims() {
                return Err(Error::BadInput(format!(
                    "attention of queries {:?} over keys {:?} and values {:?}",
                    q.dims(),
                    k.dims(),
                    v.dims()
                )));
            }
            let flat = |t: &Tensor| -> Result<Vec<f32>> {
                Ok(t.contiguous()?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()?)
            };
            let (kf, vf) = (flat(k)?, flat(v)?);
            let per = keys * d;
            for (bi, (qb, ob)) in qs
                .chunks_exact(step)
                .zip(out.chunks_exact_mut(step))
                .enumerate()
            {
                let kv = |g| {
                    let at = (bi * kv_heads + g) * per;
                    (
                        KvRows::F32(&kf[at..at + per]),
                        KvRows::F32(&vf[at..at + per]),
                    )
                };
                tiled_attention(path, qb, shape(kv_heads), kv, ob);
            }
        }
    }
    Ok(Tensor::from_vec(out, (b, seq, heads, d), &Device::Cpu)?.transpose(1, 2)?)
}

/// Scaled dot-product causal attention with grouped-query heads, as tensor ops (differentiable).
///
/// `q`: `[b, heads, seq, d]`; `k`, `v`: `[b, kv_heads, keys, d]` where the last `seq` keys are
/// the queries' own positions. Instead of repeating K/V per query head (a copy), the query heads
/// of one group are folded into the row dimension: `[b, kv_heads, groups * seq, d]`.
fn attention_formula(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    start: usize,
    pass: Pass,
) -> Result<Tensor> {
    let (b, heads, seq, d) = q.dims4()?;
    let kv_heads = k.dim(1)?;
    let groups = heads / kv_heads;
    let q = q.reshape((b, kv_heads, groups * seq, d))?;
    let scale = 1.0 / (d as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = if seq > 1 {
        scores.broadcast_add(&causal_mask(seq, start, groups)?)?
    } else {
        scores
    };
    let probs = if pass.track {
        candle_nn::ops::softmax(&scores, D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&scores)?
    };
    let out = probs.matmul(v)?; // [b, kv_heads, groups * seq, d]
    Ok(out.reshape((b, heads, seq, d))?)
}

/// Splits `[b, seq, heads * d]` into `[b, heads, seq, d]`.
pub(crate) fn split_heads(x: &Tensor, heads: usize, d: usize) -> Result<Tensor> {
    let (b, seq, _) = x.dims3()?;
    Ok(x.reshape((b, seq, heads, d))?
        .transpose(1, 2)?
        .contiguous()?)
}

/// Merges `[b, heads, seq, d]` back into `[b, seq, heads * d]`.
pub(crate) fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, heads, seq, d) = x.dims4()?;
    Ok(x.transpose(1, 2)?.reshape((b, seq, heads * d))?)
}
