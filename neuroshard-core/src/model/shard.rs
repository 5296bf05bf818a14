//! The layers of one shard: embeddings (first shard), a contiguous run of decoder blocks, and
//! the final norm + LM head (last shard).
//!
//! A tied LM head on the last shard is loaded from the embedding tensor and keeps the
//! embedding's parameter name, so gradients of the two copies merge by name; on a shard that
//! holds both ends the very same variable is used twice and autograd sums the two parts.

use crate::error::{Error, Result};
use crate::model::config::{Architecture, ModelConfig, RopeLayout};
use crate::model::decode::with_f32;
use crate::model::gpt2::{layer_norm, Gpt2Block};
use crate::model::kv_cache::LayerKv;
use crate::model::layers::{
    ComputeMode, LayerNorm, Linear, Param, Pass, RmsNorm, Rope, WeightLayout,
};
use crate::model::llama::{LlamaBlock, RawScratch};
use crate::model::weights::WeightFile;
use candle_core::Tensor;
use std::ops::Range;

// One value per layer, built once at load: the size difference between variants is irrelevant.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
enum Block {
    Llama(LlamaBlock),
    Gpt2(Gpt2Block),
}

#[derive(Debug, Clone)]
struct Embeddings {
    tokens: Param,
    /// Learned absolute positions (GPT-2).
    positions: Option<Param>,
}

#[derive(Debug, Clone)]
enum FinalNorm {
    Rms(RmsNorm),
    Layer(LayerNorm),
}

#[derive(Debug, Clone)]
struct Head {
    norm: FinalNorm,
    lm_head: Linear,
}

/// What a shard receives.
#[derive(Debug, Clone)]
pub enum ShardInput {
    /// Token ids `[batch, seq]` (u32 or i64): only for a range starting at layer 0.
    Tokens(Tensor),
    /// Hidden states `[batch, seq, hidden]` in f32, from the previous shard.
    Hidden(Tensor),
}

impl ShardInput {
    /// Token ids `[batch, seq]` from a flat row-major slice (for bindings without tensors).
    pub fn tokens_from_slice(ids: &[u32], batch: usize, seq: usize) -> Result<ShardInput> {
        check_len(ids.len(), &[batch, seq], "token ids")?;
        Ok(ShardInput::Tokens(Tensor::from_slice(
            ids,
            (batch, seq),
            &candle_core::Device::Cpu,
        )?))
    }

    /// Hidden states `[batch, seq, width]` from a flat row-major f32 slice.
    pub fn hidden_from_slice(
        values: &[f32],
        batch: usize,
        seq: usize,
        width: usize,
    ) -> Result<ShardInput> {
        check_len(values.len(), &[batch, seq, width], "hidden states")?;
        Ok(ShardInput::Hidden(Tensor::from_slice(
            values,
            (batch, seq, width),
            &candle_core::Device::Cpu,
        )?))
    }
}

/// `len` must be the product of `dims`.
fn check_len(len: usize, dims: &[usize], what: &str) -> Result<()> {
    let want = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if want != Some(len) {
        return Err(Error::BadInput(format!(
            "{what}: {len} values do not fill the shape {dims:?}"
        )));
    }
    Ok(())
}

/// What a shard returns.
#[derive(Debug, Clone)]
pub enum ShardOutput {
    /// Hidden states `[batch, seq, hidden]` for the next shard.
    Hidden(Tensor),
    /// Logits `[batch, seq', vocab]` (seq' = seq or 1, see [`LogitsSelection`]).
    Logits(Tensor),
}

impl ShardOutput {
    /// The tensor inside, whichever it is.
    pub fn tensor(&self) -> &Tensor {
        match self {
            ShardOutput::Hidden(t) | ShardOutput::Logits(t) => t,
        }
    }

    /// Whether the output is logits (the last shard) rather than hidden states.
    pub fn is_logits(&self) -> bool {
        matches!(self, ShardOutput::Logits(_))
    }

    /// The values as f32, row-major, with their shape (for bindings without tensors).
    pub fn to_f32_vec(&self) -> Result<(Vec<f32>, Vec<usize>)> {
        let t = self.tensor();
        let dims = t.dims().to_vec();
        let values = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok((values, dims))
    }

    /// Turns the output into the next shard's input (logits cannot be fed on).
    pub fn into_next_input(self) -> Result<ShardInput> {
        match self {
            ShardOutput::Hidden(t) => Ok(ShardInput::Hidden(t)),
            ShardOutput::Logits(_) => Err(Error::BadInput(
                "logits cannot be fed to another shard".into(),
            )),
        }
    }
}

/// Which positions the LM head is applied to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogitsSelection {
    /// Every position (training, scoring).
    #[default]
    All,
    /// Only the last position (generation: saves a vocab-sized matmul per prompt token).
    Last,
}

/// One shard's parameters and the code to run any sub-range of them.
#[derive(Debug, Clone)]
pub(crate) struct ShardModel {
    pub(crate) config: ModelConfig,
    pub(crate) layers: Range<usize>,
    embed: Option<Embeddings>,
    blocks: Vec<Block>,
    head: Option<Head>,
    rope: Option<Rope>,
    /// Products of this many rows or more take the dense path ([`crate::model::layers::project`]).
    dense_from: usize,
    /// The embedding's name when the model ties it to the LM head: a slice holding one end
    /// only has half of that matrix's gradient (the swarm adds the halves).
    tied: Option<String>,
}

impl ShardModel {
    /// Loads layers `layers` (plus embeddings / head at the ends) from `file`.
    /// `progress(done, total)` is called after each loaded block.
    pub(crate) fn load(
        file: &WeightFile,
        layers: Range<usize>,
        mode: ComputeMode,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let cfg = file.config().clone();
        if layers.start >= layers.end || layers.end > cfg.num_layers {
            return Err(Error::SliceOutOfRange {
                start: layers.start,
                end: layers.end,
                layers: cfg.num_layers,
            });
        }
        let h = cfg.hidden_size;
        let (embed_name, pos_name, norm_name) = match cfg.architecture {
            Architecture::Llama => ("model.embed_tokens.weight", None, "model.norm"),
            Architecture::Gpt2 => (
                "transformer.wte.weight",
                Some("transformer.wpe.weight"),
                "transformer.ln_f",
            ),
        };
        let first = layers.start == 0;
        let last = layers.end == cfg.num_layers;
        let tied = cfg.tie_word_embeddings || !file.contains("lm_head.weight");
        let embed = if first {
            Some(Embeddings {
                tokens: Param::load(file, embed_name, &[cfg.vocab_size, h], mode)?,
                positions: match pos_name {
                    Some(name) => Some(Param::load(file, name, &[cfg.max_positions, h], mode)?),
                    None => None,
                },
            })
        } else {
            None
        };
        let total = layers.len();
        let mut blocks = Vec::with_capacity(total);
        for (i, layer) in layers.clone().enumerate() {
            blocks.push(match cfg.architecture {
                Architecture::Llama => Block::Llama(LlamaBlock::load(file, &cfg, layer, mode)?),
                Architecture::Gpt2 => Block::Gpt2(Gpt2Block::load(file, &cfg, layer, mode)?),
            });
            progress(i + 1, total);
        }
        let head = if last {
            let norm = match cfg.architecture {
                Architecture::Llama => FinalNorm::Rms(RmsNorm {
                    weight: Param::load(file, &format!("{norm_name}.weight"), &[h], mode)?,
                    eps: cfg.norm_eps as f32,
                }),
                Architecture::Gpt2 => {
                    FinalNorm::Layer(layer_norm(file, norm_name, h, cfg.norm_eps, mode)?)
                }
            };
            let weight = match (&embed, tied) {
                // Same variable on a shard holding both ends: gradients add up by themselves.
                (Some(e), true) => e.tokens.clone(),
                (None, true) => Param::load(file, embed_name, &[cfg.vocab_size, h], mode)?,
                (_, false) => Param::load(file, "lm_head.weight", &[cfg.vocab_size, h], mode)?,
            };
            Some(Head {
                norm,
                lm_head: Linear {
                    weight,
                    bias: None,
                    layout: WeightLayout::OutIn,
                },
            })
        } else {
            None
        };
        let rope = match cfg.architecture {
            Architecture::Llama => Some(Rope::new(
                cfg.head_dim,
                cfg.rope_theta,
                cfg.max_positions,
                cfg.rope_layout == RopeLayout::Interleaved,
            )?),
            Architecture::Gpt2 => None,
        };
        Ok(ShardModel {
            config: cfg,
            layers,
            embed,
            blocks,
            head,
            rope,
            dense_from: crate::model::layers::DENSE_GEMM_ROWS,
            tied: tied.then(|| embed_name.to_string()),
        })
    }

    /// Adds 1%-style noise to one weight matrix of the first block (`wrong-weights`, the
    /// trust tests' lie); returns its name.
    #[cfg(any(feature = "adversary", feature = "internals"))]
    pub(crate) fn perturb_weight(&mut self, fraction: f32, seed: u64) -> Result<String> {
        match self.blocks.first_mut() {
            Some(Block::Llama(b)) => b.perturb_down(fraction, seed),
            _ => Err(crate::Error::BadInput(
                "wrong-weights needs a Llama block in the slice".into(),
            )),
        }
    }

    /// The projections of the slice's blocks (what LoRA adapters attach to; the LM head is
    /// left out).
    pub(crate) fn linears(&self) -> Vec<&Linear> {
        self.blocks
            .iter()
            .flat_map(|b| match b {
                Block::Llama(b) => b.linears(),
                Block::Gpt2(b) => b.linears(),
            })
            .collect()
    }

    /// The tied embedding's name when this slice holds exactly one end of it (the embedding
    /// on the first slice, the LM head on the last): its gradient here is half of the total.
    pub(crate) fn tied_half(&self) -> Option<&str> {
        let first = self.embed.is_some();
        let last = self.head.is_some();
        (first != last).then_some(self.tied.as_deref()).flatten()
    }

    /// Every parameter once (a tied head shared with the embedding is listed once).
    pub(crate) fn params(&self) -> Vec<&Param> {
        let mut out: Vec<&Param> = Vec::new();
        if let Some(e) = &self.embed {
            out.push(&e.tokens);
            out.extend(e.positions.iter());
        }
        for b in &self.blocks {
            match b {
                Block::Llama(b) => out.extend(b.params()),
                Block::Gpt2(b) => out.extend(b.params()),
            }
        }
        if let Some(h) = &self.head {
            match &h.norm {
                FinalNorm::Rms(n) => out.push(&n.weight),
                FinalNorm::Layer(n) => out.extend([&n.weight, &n.bias]),
            }
            let shared = out.iter().any(|p| p.name == h.lm_head.weight.name);
            if !shared {
                out.push(&h.lm_head.weight);
            }
        }
        out
    }

    /// Embeds token ids `[b, seq]` at positions `start..start+seq`.
    fn embed(&self, ids: &Tensor, start: usize, pass: Pass) -> Result<Tensor> {
        let embed = self.embed.as_ref().ok_or_else(|| {
            Error::BadInput("token ids given to a shard without embeddings".into())
        })?;
        let (b, seq) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        let x = embed
            .tokens
            .rows(&flat, pass)?
            .reshape((b, seq, self.config.hidden_size))?;
        match &embed.positions {
            Some(pos) => {
                let ids: Vec<u32> = (start as u32..(start + seq) as u32).collect();
                let ids = Tensor::from_vec(ids, seq, &candle_core::Device::Cpu)?;
                Ok(x.broadcast_add(&pos.rows(&ids, pass)?)?)
            }
            None => Ok(x),
        }
    }

    /// What the buffer path needs for absolute layers `range`: Llama blocks held as block
    /// matrices, the RoPE tables, and the final RMSNorm and LM head when `range` ends the model;
    /// `None` when some layer does not qualify.
    #[allow(clippy::type_complexity)]
    fn raw_parts(
        &self,
        range: &Range<usize>,
    ) -> Option<(Vec<&LlamaBlock>, &Rope, Option<(&RmsNorm, &Linear)>)> {
        let blocks: Option<Vec<&LlamaBlock>> = range
            .clone()
            .map(|l| match &self.blocks[l - self.layers.start] {
                Block::Llama(b) if b.raw_ready() => Some(b),
                _ => None,
            })
            .collect();
        let head = match (&self.head, range.end == self.config.num_layers) {
            (Some(head), true) => match &head.norm {
                FinalNorm::Rms(norm) => Some((norm, &head.lm_head)),
                FinalNorm::Layer(_) => return None,
            },
            _ => None,
        };
        Some((blocks?, self.rope.as_ref()?, head))
    }

    /// Whether [`ShardModel::forward_decode_batch`] can run layers `range`.
    pub(crate) fn can_batch(&self, range: &Range<usize>) -> bool {
        self.raw_parts(range).is_some()
    }

    /// One decode position for each of several batch-1 sessions, as one batch: `inputs[i]`
    /// (one token or one hidden row) at position `starts[i]` over `caches[i]` (the session's
    /// caches of every layer of the shard). Returns one output per session, each with exactly
    /// the bits of [`ShardModel::forward`] run for that session alone.
    pub(crate) fn forward_decode_batch(
        &self,
        inputs: &[&ShardInput],
        starts: &[usize],
        range: Range<usize>,
        caches: &mut [&mut [LayerKv]],
    ) -> Result<Vec<ShardOutput>> {
        let pass = Pass::INFERENCE;
        let (blocks, rope, head) = self.raw_parts(&range).ok_or_else(|| {
            Error::BadInput(format!("layers {range:?} cannot run as a decode batch"))
        })?;
        let (h, n) = (self.config.hidden_size, inputs.len());
        let mut x = Vec::with_capacity(n * h);
        for (input, &start) in inputs.iter().zip(starts) {
            let row = match input {
                ShardInput::Tokens(ids) => self.embed(ids, start, pass)?,
                ShardInput::Hidden(row) => row.clone(),
            };
            let before = x.len();
            with_f32(&row, |v| x.extend_from_slice(v))?;
            if x.len() - before != h {
                return Err(Error::BadInput(format!(
                    "a decode batch row of {} values, expected one position of {h}",
                    x.len() - before
                )));
            }
        }
        for (layer, block) in range.clone().zip(blocks) {
            let i = layer - self.layers.start;
            let mut layer_caches: Vec<&mut LayerKv> =
                caches.iter_mut().map(|c| &mut c[i]).collect();
            block.forward_raw_batch(&mut x, starts, rope, &mut layer_caches)?;
        }
        let Some((norm, lm_head)) = head else {
            return x
                .chunks_exact(h)
                .map(|row| {
                    let t = Tensor::from_slice(row, (1, 1, h), &candle_core::Device::Cpu)?;
                    Ok(ShardOutput::Hidden(t))
                })
                .collect();
        };
        let mut normed = vec![0f32; x.len()];
        norm.forward_raw(&x, &mut normed)?;
        match &lm_head.weight.quant {
            // The block kernels give every row its solo bits.
            Some(q) if lm_head.bias.is_none() => {
                let vocab = q.rows();
                let all = q.matmul(&normed, n)?;
                all.chunks_exact(vocab)
                    .map(|row| {
                        let t = Tensor::from_slice(row, (1, 1, vocab), &candle_core::Device::Cpu)?;
                        Ok(ShardOutput::Logits(t))
                    })
                    .collect()
            }
            // A dense head is not batch-invariant: one row at a time, as alone.
            _ => normed
                .chunks_exact(h)
                .map(|row| {
                    let t = Tensor::from_slice(row, (1, 1, h), &candle_core::Device::Cpu)?;
                    Ok(ShardOutput::Logits(lm_head.forward(&t, pass)?))
                })
                .collect(),
        }
    }

    /// Keeps every product of the buffer path on the block kernels, whatever its row count,
    /// so that a position's result has the same bits however its input is chunked.
    pub(crate) fn set_chunk_invariant(&mut self, on: bool) {
        self.dense_from = if on {
            usize::MAX
        } else {
            crate::model::layers::DENSE_GEMM_ROWS
        };
    }

    /// The buffer path ([`LlamaBlock::forward_raw`]): a batch-1 inference step through Llama
    /// layers held as block matrices, on plain buffers from the embedding (or received hidden
    /// state) to the logits. `None` when the step does not qualify; [`ShardModel::forward`]
    /// then takes the tensor path.
    fn forward_raw(
        &self,
        input: &ShardInput,
        start: usize,
        range: Range<usize>,
        caches: &mut [LayerKv],
        logits: LogitsSelection,
    ) -> Result<Option<ShardOutput>> {
        let pass = Pass::INFERENCE;
        let (batch, seq) = match input {
            ShardInput::Tokens(ids) => ids.dims2()?,
            ShardInput::Hidden(h) => {
                let (b, s, _) = h.dims3()?;
                (b, s)
            }
        };
        let (Some((blocks, rope, head)), 1, 1..) = (self.raw_parts(&range), batch, seq) else {
            return Ok(None);
        };
        let h = self.config.hidden_size;
        let x = match input {
            ShardInput::Tokens(ids) => self.embed(ids, start, pass)?,
            ShardInput::Hidden(x) => x.clone(),
        };
        let mut x: Vec<f32> = with_f32(&x, |v| v.to_vec())?;
        if x.len() != seq * h {
            return Err(Error::BadInput(format!(
                "hidden state of {} values for {seq} positions of {h}",
                x.len()
            )));
        }
        let mut scratch = RawScratch::new(self.dense_from);
        for (layer, block) in range.clone().zip(blocks) {
            let cache = &mut caches[layer - self.layers.start];
            block.forward_raw(&mut x, seq, start, rope, cache, &mut scratch)?;
        }
        let Some((norm, lm_head)) = head else {
            return Ok(Some(ShardOutput::Hidden(Tensor::from_vec(
                x,
                (1, seq, h),
                &candle_core::Device::Cpu,
            )?)));
        };
        if logits == LogitsSelection::Last {
            x.drain(..(seq - 1) * h);
        }
        let rows = x.len() / h;
        let mut normed = vec![0f32; x.len()];
        norm.forward_raw(&x, &mut normed)?;
        let logits = match &lm_head.weight.quant {
            Some(q) if lm_head.bias.is_none() => Tensor::from_vec(
                q.matmul(&normed, rows)?,
                (1, rows, q.rows()),
                &candle_core::Device::Cpu,
            )?,
            _ => {
                let normed = Tensor::from_vec(normed, (1, rows, h), &candle_core::Device::Cpu)?;
                lm_head.forward(&normed, pass)?
            }
        };
        Ok(Some(ShardOutput::Logits(logits)))
    }

    /// [`ShardModel::forward`] over a session's caches, `chunk` positions at a time: a long
    /// prompt then needs memory for one chunk's activations, not the whole prompt's, and every
    /// chunk attends over the cached keys of the ones before it (the results equal one pass:
    /// attention is chunk-invariant, see [`crate::model::attention`]). `chunk == 0` runs the
    /// input in one pass.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward_chunked(
        &self,
        input: &ShardInput,
        start: usize,
        range: Range<usize>,
        caches: &mut [LayerKv],
        logits: LogitsSelection,
        chunk: usize,
        pass: Pass,
    ) -> Result<ShardOutput> {
        let seq = match input {
            ShardInput::Tokens(t) | ShardInput::Hidden(t) => t.dim(1)?,
        };
        if chunk == 0 || seq <= chunk {
            return self.forward(input, start, range, Some(caches), logits, pass);
        }
        let mut pieces = Vec::with_capacity(seq.div_ceil(chunk));
        let mut is_logits = false;
        for s in (0..seq).step_by(chunk) {
            let n = chunk.min(seq - s);
            let part = match input {
                ShardInput::Tokens(t) => ShardInput::Tokens(t.narrow(1, s, n)?),
                ShardInput::Hidden(t) => ShardInput::Hidden(t.narrow(1, s, n)?),
            };
            let last = s + n == seq;
            let out = self.forward(&part, start + s, range.clone(), Some(caches), logits, pass)?;
            is_logits = out.is_logits();
            // With only the last position's logits wanted, earlier chunks' are dropped.
            if last || !(is_logits && logits == LogitsSelection::Last) {
                pieces.push(out.tensor().clone());
            }
        }
        let joined = Tensor::cat(&pieces, 1)?;
        Ok(if is_logits {
            ShardOutput::Logits(joined)
        } else {
            ShardOutput::Hidden(joined)
        })
    }

    /// Runs absolute layers `range` (a sub-range of this shard's) on `input`.
    ///
    /// `caches` holds one entry per layer of the shard (indexed from `self.layers.start`); the
    /// caller has already checked positions, shapes and cache continuity.
    pub(crate) fn forward(
        &self,
        input: &ShardInput,
        start: usize,
        range: Range<usize>,
        mut caches: Option<&mut [LayerKv]>,
        logits: LogitsSelection,
        pass: Pass,
    ) -> Result<ShardOutput> {
        // The buffer path runs the base weights only; an adapter takes the tensor path.
        if let (false, None, Some(caches)) = (pass.track, pass.adapter, caches.as_deref_mut()) {
            if let Some(out) = self.forward_raw(input, start, range.clone(), caches, logits)? {
                return Ok(out);
            }
        }
        let mut x = match input {
            ShardInput::Tokens(ids) => self.embed(ids, start, pass)?,
            ShardInput::Hidden(h) => h.clone(),
        };
        for layer in range.clone() {
            let i = layer - self.layers.start;
            let cache = caches.as_deref_mut().map(|c| &mut c[i]);
            x = match &self.blocks[i] {
                Block::Llama(b) => {
                    let rope = self.rope.as_ref().ok_or_else(|| {
                        Error::InvalidConfig("Llama shard without RoPE tables".into())
                    })?;
                    b.forward(&x, start, rope, cache, pass)?
                }
                Block::Gpt2(b) => b.forward(&x, start, cache, pass)?,
            };
        }
        match (&self.head, range.end == self.config.num_layers) {
            (Some(head), true) => {
                if logits == LogitsSelection::Last {
                    let seq = x.dim(1)?;
                    x = x.narrow(1, seq - 1, 1)?;
                }
                let x = match &head.norm {
                    FinalNorm::Rms(n) => n.forward(&x, pass)?,
                    FinalNorm::Layer(n) => n.forward(&x, pass)?,
                };
                Ok(ShardOutput::Logits(head.lm_head.forward(&x, pass)?))
            }
            _ => Ok(ShardOutput::Hidden(x)),
        }
    }
}
