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
use crate::model::shard::{ShardInput, ShardOutput};
use candle_core::{DType, Tensor, Var, D};
use std::collections::HashMap;
use std::sync::atomic::Ordering;

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
}

/// Per-engine training state.
#[derive(Debug, Default)]
pub(crate) struct TrainState {
    pending: HashMap<u64, Pending>,
    grads: HashMap<String, Tensor>,
    optimizer: AdamW,
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
    fn train_state(&self) -> Result<std::sync::MutexGuard<'_, TrainState>> {
        self.training
            .lock()
            .map_err(Error::poisoned("training state"))
    }

    /// Forward for training micro-batch `batch` (positions from 0, no KV cache); the graph is
    /// kept until [`ShardEngine::backward`] is called with the same id.
    pub fn train_forward(&self, batch: u64, input: ShardInput) -> Result<ShardOutput> {
        if let Some(p) = self.model.params().into_iter().find(|p| p.var.is_none()) {
            return Err(Error::Training(format!(
                "parameter `{}` is held quantised ({:?} mode); training needs f32 weights: \
                 load the shard with --mode f32",
                p.name, self.options.mode
            )));
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
            Pass { track: true },
        )?;
        self.count(batch_size, seq, range.len());
        let detached = match &output {
            ShardOutput::Hidden(t) => ShardOutput::Hidden(t.detach()),
            ShardOutput::Logits(t) => ShardOutput::Logits(t.detach()),
        };
        self.train_state()?.pending.insert(
            batch,
            Pending {
                input: input_var,
                output: output.tensor().clone(),
            },
        );
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
        for p in self.model.params() {
            let Some(var) = &p.var else { continue };
            if let Some(g) = grads.get(var.as_tensor()) {
                let total = match state.grads.remove(&p.name) {
                    Some(prev) => (prev + g)?,
                    None => g.clone(),
                };
                state.grads.insert(p.name.clone(), total);
            }
        }
        let grad_input = match &pending.input {
            Some(var) => grads.get(var.as_tensor()).cloned(),
            None => None,
        };
        Ok(BackwardOutput { grad_input, loss })
    }

    /// Accumulated gradients, by parameter name, in parameter order.
    pub fn gradients(&self) -> Result<Vec<(String, Tensor)>> {
        let state = self.train_state()?;
        Ok(self
            .model
            .params()
            .into_iter()
            .filter_map(|p| {
                state
                    .grads
                    .get(&p.name)
                    .map(|g| (p.name.clone(), g.clone()))
            })
            .collect())
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
    /// weight version.
    pub fn step(&self, cfg: &AdamWConfig) -> Result<WeightVersion> {
        let mut state = self.train_state()?;
        if state.grads.is_empty() {
            return Err(Error::Training(
                "no gradients accumulated; run backward first".into(),
            ));
        }
        let grads = std::mem::take(&mut state.grads);
        state.optimizer.begin_step();
        for p in self.model.params() {
            if let (Some(var), Some(g)) = (&p.var, grads.get(&p.name)) {
                state.optimizer.update(&p.name, var, g, cfg)?;
            }
        }
        drop(state);
        self.updates.fetch_add(1, Ordering::SeqCst);
        Ok(self.version())
    }
}
