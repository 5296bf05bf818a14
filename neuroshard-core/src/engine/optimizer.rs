//! AdamW with PyTorch semantics (decoupled weight decay, bias correction), applied to one
//! shard's parameters from gradients the engine accumulated.

use crate::error::Result;
use candle_core::Tensor;
use std::collections::HashMap;

/// AdamW hyper-parameters (PyTorch defaults).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// Exponential decay of the first moment.
    pub beta1: f64,
    /// Exponential decay of the second moment.
    pub beta2: f64,
    /// Added to the denominator for numerical stability.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// First and second moments of every parameter that has been stepped.
#[derive(Debug, Default)]
pub(crate) struct AdamW {
    moments: HashMap<String, (Tensor, Tensor)>,
    pub(crate) steps: u64,
}

impl AdamW {
    /// The AdamW update of parameter `name` (value `current`, gradient `grad`) at step `t`
    /// (1-based), computed without changing anything: the new value and the new moments.
    pub(crate) fn compute(
        &self,
        name: &str,
        current: &Tensor,
        grad: &Tensor,
        cfg: &AdamWConfig,
        t: u64,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let t = t as i32;
        let (m, v) = match self.moments.get(name) {
            Some((m, v)) => (m.clone(), v.clone()),
            None => (grad.zeros_like()?, grad.zeros_like()?),
        };
        let m = ((m * cfg.beta1)? + (grad * (1.0 - cfg.beta1))?)?;
        let v = ((v * cfg.beta2)? + (grad.sqr()? * (1.0 - cfg.beta2))?)?;
        let m_hat = (&m / (1.0 - cfg.beta1.powi(t)))?;
        let v_hat = (&v / (1.0 - cfg.beta2.powi(t)))?;
        // PyTorch: p *= 1 - lr * wd; p -= lr * m_hat / (sqrt(v_hat) + eps)
        let decayed = (current * (1.0 - cfg.lr * cfg.weight_decay))?;
        let update = ((m_hat / (v_hat.sqrt()? + cfg.eps)?)? * cfg.lr)?;
        Ok(((decayed - update)?, m, v))
    }

    /// Installs the moments of `name` that [`AdamW::compute`] returned (a committed step).
    pub(crate) fn install(&mut self, name: &str, m: Tensor, v: Tensor) {
        self.moments.insert(name.to_string(), (m, v));
    }

    /// The moments as tensors named `<param>.m` and `<param>.v` (a checkpoint).
    pub(crate) fn export(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::with_capacity(2 * self.moments.len());
        for (name, (m, v)) in &self.moments {
            out.insert(format!("{name}.m"), m.clone());
            out.insert(format!("{name}.v"), v.clone());
        }
        Ok(out)
    }

    /// The optimizer [`AdamW::export`] wrote, after `steps` steps.
    pub(crate) fn import(mut tensors: HashMap<String, Tensor>, steps: u64) -> Result<Self> {
        let mut moments = HashMap::new();
        let names: Vec<String> = tensors
            .keys()
            .filter_map(|k| k.strip_suffix(".m").map(str::to_string))
            .collect();
        for name in names {
            let m = tensors.remove(&format!("{name}.m"));
            let v = tensors.remove(&format!("{name}.v"));
            match (m, v) {
                (Some(m), Some(v)) if m.dims() == v.dims() => {
                    moments.insert(name, (m, v));
                }
                _ => {
                    return Err(crate::error::Error::Training(format!(
                        "optimizer state of `{name}` is incomplete"
                    )))
                }
            }
        }
        Ok(AdamW { moments, steps })
    }
}
