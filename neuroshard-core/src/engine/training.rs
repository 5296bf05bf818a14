//! Training on one slice: a tracked forward per micro-batch, backward from the next shard's
//! gradient (or from the loss on the last shard), gradient accumulation, and an AdamW step.
//!
//! Parameters are f32 variables (dequantised even when the file is GGUF), so training needs
//! [`ComputeMode::Exact`]. Gradients are keyed by Hugging Face parameter name; a tied LM head
//! on the last shard carries the embedding's name, so merging gradients across shards by name
//! adds the two parts of a tied matrix, as PyTorch does in one process.

use super::optimizer::{AdamW, AdamWConfig};
use super::{ForwardRequest, ShardEngine, WeightVersion};
use crate::error::{Error, Result};
use crate::model::layers::Pass;
use crate::model::lora::LoraAdapter;
use crate::model::shard::{ShardInput, ShardOutput};
use candle_core::{DType, Tensor, Var, D};
use std::collections::HashMap;
use std::sync::Arc;

/// Where the gradient of a shard's output comes from.
#[derive(Debug, Clone)]
pub enum OutputGrad {
    /// Last shard: mean next-token cross-entropy against these ids `[batch, seq]`, shifted by
    /// one as Hugging Face does (`labels = input_ids`).
    CausalLmLabels(Tensor),
    /// Any shard: the gradient of the loss w.r.t. this shard's output, from the next shard.
    Output(Tensor),
}

/// Result of a backward pass.
#[derive(Debug, Clone)]
pub struct BackwardOutput {
    /// Gradient w.r.t. the shard's input hidden states (`None` on the first shard, whose
    /// input is token ids).
    pub grad_input: Option<Tensor>,
    /// The loss, when computed here (last shard).
    pub loss: Option<f32>,
}

#[derive(Debug)]
struct Pending {
    input: Option<Var>,
    output: Tensor,
    /// The adapter this micro-batch trains (`None`: the slice's own weights).
    adapter: Option<Arc<LoraAdapter>>,
    /// What its graph holds, estimated ([`ShardEngine::train_activation_bytes`]).
    bytes: u64,
}

/// Per-engine training state.
#[derive(Debug, Default)]
pub(crate) struct TrainState {
    pending: HashMap<u64, Pending>,
    /// Accumulated gradients by name: the slice's parameter names, or an adapter's PEFT names.
    pub(super) grads: HashMap<String, Tensor>,
    /// What the accumulation trains: `Some(name)` for an adapter, `None` for the slice's own
    /// weights. One target per accumulation, so a step never mixes them.
    pub(super) target: Option<Option<String>>,
    pub(super) optimizer: AdamW,
    /// One optimizer per adapter: two adapters never share moments or step counts.
    pub(super) adapter_optimizers: HashMap<String, AdamW>,
    /// The update computed by a prepare, waiting for its commit or abort.
    pub(super) prepared: Option<super::staged::PreparedStep>,
    /// The most [`ShardEngine::pending_train_bytes`] has been.
    peak_pending_bytes: u64,
}

impl TrainState {
    /// Estimated bytes the pending forwards' graphs hold.
    fn pending_bytes(&self) -> u64 {
        self.pending.values().map(|p| p.bytes).sum()
    }
}

/// Mean next-token cross-entropy with labels shifted by one (Hugging Face convention).
pub fn causal_lm_loss(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (b, seq, vocab) = logits.dims3()?;
    if ids.dims() != [b, seq] {
        return Err(Error::Training(format!(
            "labels have shape {:?}, logits {:?}",
            ids.dims(),
            logits.dims()
        )));
    }
    if seq < 2 {
        return Err(Error::Training(
            "need at least 2 positions for a next-token loss".into(),
        ));
    }
    let logits = logits
        .narrow(1, 0, seq - 1)?
        .reshape((b * (seq - 1), vocab))?;
    let labels = ids
        .to_dtype(DType::U32)?
        .narrow(1, 1, seq - 1)?
        .flatten_all()?;
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = log_probs.gather(&labels.unsqueeze(1)?, 1)?;
    Ok(picked.mean_all()?.neg()?)
}

impl ShardEngine {
    pub(super) fn train_state(&self) -> Result<std::sync::MutexGuard<'_, TrainState>> {
        self.training
            .lock()
            .map_err(Error::poisoned("training state"))
    }

    /// Estimated bytes a tracked forward of `batch` sequences of `seq` positions keeps on this
    /// slice until its backward: per layer and position, about 16 hidden-size and 4
    /// intermediate-size f32 activations (norms, projections, residuals, the MLP's gates),
    /// plus the attention scores and probabilities (`2 · heads · seq` per position). The LM
    /// head's logits on the last slice come on top. An estimate, for budgets and stats: the
    /// graph itself is candle's.
    pub fn train_activation_bytes(&self, batch: usize, seq: usize) -> u64 {
        let c = &self.model.config;
        let positions = (batch * seq) as u64;
        let per_position = 16 * c.hidden_size as u64
            + 4 * c.intermediate_size as u64
            + 2 * (c.num_heads * seq) as u64;
        let layers = self.layers().len() as u64;
        let logits = if self.is_last() {
            2 * c.vocab_size as u64
        } else {
            0
        };
        4 * positions * (layers * per_position + logits)
    }

    /// Estimated bytes the forwards waiting for their backward hold now, and the most they
    /// have held.
    pub fn pending_train_bytes(&self) -> Result<(u64, u64)> {
        let state = self.train_state()?;
        let held = state.pending_bytes();
        Ok((held, state.peak_pending_bytes))
    }

    /// Forward for training micro-batch `batch` (positions from 0, no KV cache); the graph is
    /// kept until [`ShardEngine::backward`] is called with the same id. Trains the slice's own
    /// weights, which must be f32 (`--mode f32`).
    pub fn train_forward(&self, batch: u64, input: ShardInput) -> Result<ShardOutput> {
        self.check_full_training()?;
        self.train_forward_with(batch, input, None)
    }

    /// Whether the slice's own weights can train: every parameter held as f32.
    pub(crate) fn check_full_training(&self) -> Result<()> {
        match self.model.params().into_iter().find(|p| p.var.is_none()) {
            Some(p) => Err(Error::Training(format!(
                "parameter `{}` is held quantised ({:?} mode); training the weights needs f32: \
                 load the shard with --mode f32, or train a LoRA adapter on it",
                p.name, self.options.mode
            ))),
            None => Ok(()),
        }
    }

    /// Forward for training micro-batch `batch` of the LoRA adapter `adapter`: the base
    /// weights stay frozen (quantised blocks included: they pass input gradients through the
    /// blocks, `quant_linear.rs`), and only the adapter's factors accumulate gradients.
    pub fn train_forward_adapter(
        &self,
        batch: u64,
        input: ShardInput,
        adapter: &str,
    ) -> Result<ShardOutput> {
        let adapter = self.adapter_for(Some(adapter))?;
        self.train_forward_with(batch, input, adapter)
    }

    fn train_forward_with(
        &self,
        batch: u64,
        input: ShardInput,
        adapter: Option<Arc<LoraAdapter>>,
    ) -> Result<ShardOutput> {
        let target = adapter.as_ref().map(|a| a.name().to_string());
        {
            let mut state = self.train_state()?;
            match &state.target {
                Some(t)
                    if *t != target && !(state.grads.is_empty() && state.pending.is_empty()) =>
                {
                    return Err(Error::Training(format!(
                        "gradients for {} are being accumulated; step or zero them before \
                         training {}",
                        describe_target(t),
                        describe_target(&target)
                    )))
                }
                _ => state.target = Some(target),
            }
        }
        let (range, input, seq) = self.validate(&ForwardRequest::new(input))?;
        let batch_size = super::input_batch(&input);
        let (input, input_var) = match input {
            ShardInput::Hidden(h) => {
                let var = Var::from_tensor(&h)?;
                (ShardInput::Hidden(var.as_tensor().clone()), Some(var))
            }
            tokens => (tokens, None),
        };
        let output = self.model.forward(
            &input,
            0,
            range.clone(),
            None,
            crate::model::shard::LogitsSelection::All,
            Pass {
                track: true,
                adapter: adapter.as_deref(),
            },
        )?;
        self.count(batch_size, seq, range.len());
        let detached = match &output {
            ShardOutput::Hidden(t) => ShardOutput::Hidden(t.detach()),
            ShardOutput::Logits(t) => ShardOutput::Logits(t.detach()),
        };
        let bytes = self.train_activation_bytes(batch_size, seq);
        let mut state = self.train_state()?;
        state.pending.insert(
            batch,
            Pending {
                input: input_var,
                output: output.tensor().clone(),
                adapter,
                bytes,
            },
        );
        let held = state.pending_bytes();
        state.peak_pending_bytes = state.peak_pending_bytes.max(held);
        Ok(detached)
    }

    /// Back-propagates micro-batch `batch`, accumulating parameter gradients on this shard and
    /// returning the gradient for the previous shard.
    pub fn backward(&self, batch: u64, grad: OutputGrad) -> Result<BackwardOutput> {
        let pending = self.train_state()?.pending.remove(&batch).ok_or_else(|| {
            Error::Training(format!("no forward pending for micro-batch {batch}"))
        })?;
        let (objective, loss) = match grad {
            OutputGrad::CausalLmLabels(ids) => {
                if !self.is_last() {
                    return Err(Error::Training(
                        "labels can only be given to the last shard; send it the output gradient"
                            .into(),
                    ));
                }
                let loss = causal_lm_loss(&pending.output, &ids)?;
                let value = loss.to_scalar::<f32>()?;
                (loss, Some(value))
            }
            OutputGrad::Output(g) => {
                if g.dims() != pending.output.dims() {
                    return Err(Error::Training(format!(
                        "output gradient has shape {:?}, the output was {:?}",
                        g.dims(),
                        pending.output.dims()
                    )));
                }
                let g = g.to_dtype(DType::F32)?.detach();
                ((&pending.output * g)?.sum_all()?, None)
            }
        };
        let grads = objective.backward()?;
        let mut state = self.train_state()?;
        let trained: Vec<(String, &Var)> = match &pending.adapter {
            Some(adapter) => adapter.vars(),
            None => self
                .model
                .params()
                .into_iter()
                .filter_map(|p| Some((p.name.clone(), p.var.as_ref()?)))
                .collect(),
        };
        for (name, var) in trained {
            if let Some(g) = grads.get(var.as_tensor()) {
                let total = match state.grads.remove(&name) {
                    Some(prev) => (prev + g)?,
                    None => g.clone(),
                };
                state.grads.insert(name, total);
            }
        }
        let grad_input = match &pending.input {
            Some(var) => grads.get(var.as_tensor()).cloned(),
            None => None,
        };
        Ok(BackwardOutput { grad_input, loss })
    }

    /// Accumulated gradients, by parameter name in parameter order (or, while an adapter
    /// trains, by its PEFT tensor names in name order).
    pub fn gradients(&self) -> Result<Vec<(String, Tensor)>> {
        let state = self.train_state()?;
        let names: Vec<String> = match self.training_adapter(&state)? {
            Some(adapter) => adapter.vars().into_iter().map(|(n, _)| n).collect(),
            None => self.model.params().iter().map(|p| p.name.clone()).collect(),
        };
        Ok(names
            .into_iter()
            .filter_map(|n| state.grads.get(&n).map(|g| (n.clone(), g.clone())))
            .collect())
    }

    /// The adapter the current accumulation trains, if any.
    pub(super) fn training_adapter(&self, state: &TrainState) -> Result<Option<Arc<LoraAdapter>>> {
        match &state.target {
            Some(Some(name)) => self.adapter_for(Some(name)),
            _ => Ok(None),
        }
    }

    /// Replaces the accumulated gradient of `name` (e.g. with the sum of both halves of a tied
    /// embedding, or an all-reduced gradient).
    pub fn set_gradient(&self, name: &str, grad: Tensor) -> Result<()> {
        let param = self
            .model
            .params()
            .into_iter()
            .find(|p| p.name == name)
            .ok_or_else(|| Error::Training(format!("this shard has no parameter `{name}`")))?;
        if param.dims() != grad.dims() {
            return Err(Error::Training(format!(
                "gradient for `{name}` has shape {:?}, parameter is {:?}",
                grad.dims(),
                param.dims()
            )));
        }
        self.train_state()?
            .grads
            .insert(name.to_string(), grad.to_dtype(DType::F32)?);
        Ok(())
    }

    /// Drops accumulated gradients and pending forwards.
    pub fn zero_grad(&self) -> Result<()> {
        let mut state = self.train_state()?;
        state.grads.clear();
        state.pending.clear();
        Ok(())
    }

    /// Applies one AdamW step with the accumulated gradients, clears them, and bumps the
    /// weight version: [`ShardEngine::prepare_step`] and [`ShardEngine::commit_prepared`] in
    /// one call (a swarm runs the two phases apart).
    pub fn step(&self, cfg: &AdamWConfig) -> Result<WeightVersion> {
        let prepared = self.prepare_step(cfg)?;
        self.commit_prepared(&prepared.state)?;
        Ok(self.version())
    }

    /// The tied embedding's name when this slice holds one end of it only (the embedding on
    /// a first slice, the LM head on a last one): its gradient here is half of the total, and
    /// the swarm adds the other end's half before a step.
    pub fn tied_half(&self) -> Option<String> {
        self.model.tied_half().map(str::to_string)
    }

    /// Multiplies every accumulated gradient by `factor` (the mean over `M` micro-batches is
    /// the sum of their gradients times `1 / M`).
    pub fn scale_gradients(&self, factor: f64) -> Result<()> {
        let mut state = self.train_state()?;
        for g in state.grads.values_mut() {
            *g = (&*g * factor)?;
        }
        Ok(())
    }
}

/// "the adapter `x`" or "the slice's weights", for errors.
fn describe_target(target: &Option<String>) -> String {
    match target {
        Some(name) => format!("the adapter `{name}`"),
        None => "the slice's weights".into(),
    }
}
