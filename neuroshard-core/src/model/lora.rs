//! LoRA adapters: a low-rank update `ΔW = (α / r) · B A` beside a frozen weight matrix, so a
//! quantised base (the GGUF blocks served in exact mode) can learn without touching its blocks.
//! `y = x Wᵀ + (α / r) · (x Aᵀ) Bᵀ`, with `A: [r, in]` initialised small and random and
//! `B: [out, r]` initialised to zero, so a fresh adapter leaves the model's output unchanged
//! (the PEFT convention; tensor names follow PEFT too: `<module>.lora_A.weight`).
//!
//! An adapter covers the matrices of one slice whose module name ends with one of its
//! `targets` (`q_proj`, `v_proj` by default). It is selected per forward through [`Pass`]:
//! a session names the adapter it runs, and the base weights are shared by every adapter.

use crate::error::{Error, Result};
use crate::model::layers::Linear;
use candle_core::{Device, Tensor, Var};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// Shape and placement of a new adapter.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    /// The rank `r` of the update (1..=256).
    pub rank: usize,
    /// The scale numerator: the update is multiplied by `alpha / rank`.
    pub alpha: f32,
    /// Module names the adapter covers: a matrix `…​.<target>.weight` gets a pair.
    pub targets: Vec<String>,
    /// Seed of `A`'s initialisation: replicas of a range create identical adapters.
    pub seed: u64,
}

impl Default for LoraConfig {
    /// Rank 8, alpha 16, on the attention's query and value projections (PEFT's default for
    /// Llama), seed 0.
    fn default() -> Self {
        LoraConfig {
            rank: 8,
            alpha: 16.0,
            targets: vec!["q_proj".into(), "v_proj".into()],
            seed: 0,
        }
    }
}

/// The two trainable factors beside one frozen matrix.
#[derive(Debug)]
pub(crate) struct LoraPair {
    /// `[r, in]`.
    pub(crate) a: Var,
    /// `[out, r]`.
    pub(crate) b: Var,
}

/// One named adapter over the matrices of one slice.
#[derive(Debug)]
pub struct LoraAdapter {
    name: String,
    config: LoraConfig,
    /// By the base matrix's parameter name (`model.layers.3.self_attn.q_proj.weight`).
    pairs: BTreeMap<String, LoraPair>,
    /// Optimizer steps applied to it.
    steps: AtomicU64,
}

/// Largest rank an adapter may have.
pub const MAX_LORA_RANK: usize = 256;

impl LoraAdapter {
    /// A fresh adapter over every linear of `linears` whose module matches a target: `A`
    /// uniform in `±1/√in` (seeded by the config's seed and the matrix name), `B` zero.
    pub(crate) fn new<'a>(
        name: &str,
        config: LoraConfig,
        linears: impl IntoIterator<Item = &'a Linear>,
    ) -> Result<Self> {
        if config.rank == 0 || config.rank > MAX_LORA_RANK {
            return Err(Error::Training(format!(
                "LoRA rank {} outside 1..={MAX_LORA_RANK}",
                config.rank
            )));
        }
        if !config.alpha.is_finite() || config.alpha <= 0.0 {
            return Err(Error::Training(format!(
                "LoRA alpha {} must be positive",
                config.alpha
            )));
        }
        let mut pairs = BTreeMap::new();
        for linear in linears {
            let weight = &linear.weight.name;
            let module = weight.strip_suffix(".weight").unwrap_or(weight);
            if !config
                .targets
                .iter()
                .any(|t| module.rsplit('.').next() == Some(t.as_str()))
            {
                continue;
            }
            let (inputs, outputs) = linear.in_out();
            let bound = 1.0 / (inputs as f32).sqrt();
            let mut rng = crate::splitmix::SplitMix64::new(config.seed ^ fnv1a(weight.as_bytes()));
            let a: Vec<f32> = (0..config.rank * inputs)
                .map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * bound)
                .collect();
            let a = Tensor::from_vec(a, (config.rank, inputs), &Device::Cpu)?;
            let b = Tensor::zeros(
                (outputs, config.rank),
                candle_core::DType::F32,
                &Device::Cpu,
            )?;
            pairs.insert(
                weight.clone(),
                LoraPair {
                    a: Var::from_tensor(&a)?,
                    b: Var::from_tensor(&b)?,
                },
            );
        }
        if pairs.is_empty() {
            return Err(Error::Training(format!(
                "no matrix of this slice matches the LoRA targets {:?}",
                config.targets
            )));
        }
        Ok(LoraAdapter {
            name: name.to_string(),
            config,
            pairs,
            steps: AtomicU64::new(0),
        })
    }

    /// A new adapter with this one's name and config, holding `values` (by PEFT name, every
    /// tensor of this adapter) in fresh variables, after `steps` steps. A commit installs it
    /// beside the old one, so work already running with the old one keeps its version.
    pub(crate) fn with_values(
        &self,
        values: &std::collections::HashMap<String, Tensor>,
        steps: u64,
    ) -> Result<LoraAdapter> {
        let mut pairs = BTreeMap::new();
        for (weight, pair) in &self.pairs {
            let module = weight.strip_suffix(".weight").unwrap_or(weight);
            let fresh = |factor: &str, old: &Var| -> Result<Var> {
                let name = format!("{module}.{factor}.weight");
                let value = values.get(&name).ok_or_else(|| {
                    Error::Training(format!("the new state of {} lacks `{name}`", self.name))
                })?;
                if value.dims() != old.dims() {
                    return Err(Error::Training(format!(
                        "`{name}` is {:?}, the new value {:?}",
                        old.dims(),
                        value.dims()
                    )));
                }
                Ok(Var::from_tensor(&value.to_dtype(candle_core::DType::F32)?)?)
            };
            pairs.insert(
                weight.clone(),
                LoraPair {
                    a: fresh("lora_A", &pair.a)?,
                    b: fresh("lora_B", &pair.b)?,
                },
            );
        }
        Ok(LoraAdapter {
            name: self.name.clone(),
            config: self.config.clone(),
            pairs,
            steps: AtomicU64::new(steps),
        })
    }

    /// Optimizer steps applied so far.
    pub fn steps(&self) -> u64 {
        self.steps.load(Ordering::SeqCst)
    }

    /// Sets the step count (an adapter loaded from a checkpoint).
    pub(crate) fn set_steps(&self, steps: u64) {
        self.steps.store(steps, Ordering::SeqCst);
    }

    /// The adapter's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How it was made.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// The pair beside the matrix named `weight`, if the adapter covers it.
    pub(crate) fn pair(&self, weight: &str) -> Option<&LoraPair> {
        self.pairs.get(weight)
    }

    /// `(α / r) · (x Aᵀ) Bᵀ` for `x` of shape `[rows, in]`: the adapter's part of the output.
    /// Through the variables when `track` (training), detached otherwise.
    pub(crate) fn delta(&self, pair: &LoraPair, x: &Tensor, track: bool) -> Result<Tensor> {
        let (a, b) = if track {
            (pair.a.as_tensor().clone(), pair.b.as_tensor().clone())
        } else {
            (pair.a.as_tensor().detach(), pair.b.as_tensor().detach())
        };
        let scale = (self.config.alpha / self.config.rank as f32) as f64;
        Ok((x.matmul(&a.t()?)?.matmul(&b.t()?)? * scale)?)
    }

    /// Every trainable tensor with its PEFT name (`<module>.lora_A.weight`, `lora_B`), in
    /// name order, and the variable behind it.
    pub(crate) fn vars(&self) -> Vec<(String, &Var)> {
        let mut out = Vec::with_capacity(2 * self.pairs.len());
        for (weight, pair) in &self.pairs {
            let module = weight.strip_suffix(".weight").unwrap_or(weight);
            out.push((format!("{module}.lora_A.weight"), &pair.a));
            out.push((format!("{module}.lora_B.weight"), &pair.b));
        }
        out
    }

    /// The adapter's tensors by PEFT name (what a checkpoint or a peer's sync holds).
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().detach()))
            .collect()
    }

    /// Replaces the tensor `name` (same shape) with `value`.
    pub fn set_tensor(&self, name: &str, value: &Tensor) -> Result<()> {
        let vars = self.vars();
        let (_, var) = vars
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| Error::Training(format!("adapter {} has no `{name}`", self.name)))?;
        if var.dims() != value.dims() {
            return Err(Error::Training(format!(
                "`{name}` is {:?}, the new value {:?}",
                var.dims(),
                value.dims()
            )));
        }
        var.set(&value.to_dtype(candle_core::DType::F32)?)?;
        Ok(())
    }
}

/// FNV-1a of a name: mixes the matrix into the initialisation seed.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    })
}
