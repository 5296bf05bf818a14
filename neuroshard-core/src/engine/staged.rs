//! Optimizer steps in two phases, so a swarm never ends half-stepped: a *prepare* computes the
//! AdamW update of the accumulated gradients into new tensors without touching the weights
//! (and names the state it would make with a hash), a *commit* installs exactly that state, an
//! *abort* drops it. Between the two, every forward still runs the old version.
//!
//! A committed adapter is a new [`LoraAdapter`] beside the old one (copy on commit): sessions
//! and forwards that already hold the old one keep their version until they end. The slice's
//! own weights (full training) change in place.

use super::training::TrainState;
use super::ShardEngine;
use crate::error::{Error, Result};
use crate::model::identity::hex;
use crate::model::lora::LoraAdapter;
use candle_core::Tensor;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// What a slice's trainable weights are at one moment: the base model, the slice, the adapter
/// (`None`: the slice's own weights), a hash of the trainable state and its optimizer steps.
/// The base model id never changes with training; replicas compare these before they vote on
/// each other (the same version computes the same function).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct TrainedVersion {
    /// The base model's id as its 32 bytes (never changes with training).
    pub model_hash: [u8; 32],
    /// The slice.
    pub layers: Range<usize>,
    /// The adapter's name, or `None` for the slice's own weights.
    pub adapter: Option<String>,
    /// blake3 over every trainable tensor (name, shape, little-endian f32 values), in the
    /// engine's parameter order (an adapter's: PEFT name order).
    pub state: [u8; 32],
    /// Optimizer steps applied.
    pub steps: u64,
}

impl std::fmt::Display for TrainedVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}..{}/{}@{}#{}",
            hex(&self.model_hash[..6]),
            self.layers.start,
            self.layers.end,
            self.adapter.as_deref().unwrap_or("base"),
            self.steps,
            hex(&self.state[..6])
        )
    }
}

/// An update computed by [`ShardEngine::prepare_step`], not yet installed.
#[derive(Debug)]
pub(crate) struct PreparedStep {
    /// The new value of every trainable tensor, in hash order.
    pub(crate) values: Vec<(String, Tensor)>,
    /// The new AdamW moments of the tensors that had gradients.
    pub(crate) moments: Vec<(String, Tensor, Tensor)>,
    /// The version committing makes.
    pub(crate) version: TrainedVersion,
}

/// blake3 over named tensors, in the order given.
pub(crate) fn state_hash<'a>(
    tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
) -> Result<[u8; 32]> {
    let mut h = blake3::Hasher::new_derive_key("neuroshard adapter state v1");
    for (name, t) in tensors {
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        for d in t.dims() {
            h.update(&(*d as u64).to_le_bytes());
        }
        let values: Vec<f32> = t
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1()?;
        for v in values {
            h.update(&v.to_le_bytes());
        }
    }
    Ok(*h.finalize().as_bytes())
}

impl ShardEngine {
    /// The trainable tensors of `adapter` (`None`: the slice's own f32 weights), by name in
    /// hash order.
    pub(crate) fn trainable_tensors(&self, adapter: Option<&LoraAdapter>) -> Vec<(String, Tensor)> {
        match adapter {
            Some(a) => a.tensors(),
            None => self
                .model
                .params()
                .into_iter()
                .filter_map(|p| Some((p.name.clone(), p.var.as_ref()?.as_tensor().detach())))
                .collect(),
        }
    }

    /// The current version of `adapter` (`None`: the slice's own weights; a quantised slice
    /// has no trainable tensors of its own, and its state is the hash of nothing).
    pub fn trained_version(&self, adapter: Option<&str>) -> Result<TrainedVersion> {
        let held = self.adapter_for(adapter)?;
        let tensors = self.trainable_tensors(held.as_deref());
        let steps = match &held {
            Some(a) => a.steps(),
            None => self.updates.load(Ordering::SeqCst),
        };
        let base = self.version();
        Ok(TrainedVersion {
            model_hash: base.model_hash,
            layers: base.layers,
            adapter: adapter.map(str::to_string),
            state: state_hash(tensors.iter().map(|(n, t)| (n.as_str(), t)))?,
            steps,
        })
    }

    /// The versions this slice serves: its own weights first, then every adapter by name
    /// (each one hashed at most once per step count, then cached).
    pub fn served_versions(&self) -> Result<Vec<TrainedVersion>> {
        let mut targets = vec![None];
        targets.extend(self.adapter_names().into_iter().map(Some));
        targets
            .iter()
            .map(|t| self.current_version(t.as_deref()))
            .collect()
    }

    /// The version of `target` (`None`: the slice's own weights), from a cache valid while
    /// its step count holds: hashing a whole f32 slice costs about a second, and announcements,
    /// checkpoints and commits all ask for it. Whatever installs a new state (a commit, a
    /// checkpoint load, an adopted adapter) replaces its target's entry with the version it
    /// installs, and leaves the other targets' entries alone: an adapter's commit does not
    /// make the next announcement hash the whole slice again.
    pub(crate) fn current_version(&self, target: Option<&str>) -> Result<TrainedVersion> {
        let steps = match target {
            Some(_) => self.adapter_for(target)?.map_or(0, |a| a.steps()),
            None => self.updates.load(Ordering::SeqCst),
        };
        let key = target.map(str::to_string);
        let cached = self
            .version_cache
            .lock()
            .map_err(Error::poisoned("version cache"))?
            .get(&key)
            .filter(|v| v.steps == steps)
            .cloned();
        if let Some(v) = cached {
            return Ok(v);
        }
        let v = self.trained_version(target)?;
        self.remember_version(&v);
        Ok(v)
    }

    /// Keeps `version` as the cached version of its target.
    pub(super) fn remember_version(&self, version: &TrainedVersion) {
        if let Ok(mut cache) = self.version_cache.lock() {
            cache.insert(version.adapter.clone(), version.clone());
        }
    }

    /// Sets the slice's own f32 weights named in `values` (names without a variable are left
    /// alone: a quantised parameter never trains).
    pub(super) fn set_own_weights(&self, values: &[(String, Tensor)]) -> Result<()> {
        let params = self.model.params();
        for (name, value) in values {
            if let Some(var) = params
                .iter()
                .find(|p| &p.name == name)
                .and_then(|p| p.var.as_ref())
            {
                var.set(value)?;
            }
        }
        Ok(())
    }

    /// The version of `target` (`None`: the slice's own weights) that now holds `state`
    /// after `steps` steps, remembered as its current one: for callers that just installed
    /// that state and checked its hash (a checkpoint load, an adopted adapter).
    pub(super) fn remember_installed(
        &self,
        target: Option<&str>,
        state: [u8; 32],
        steps: u64,
    ) -> TrainedVersion {
        let base = self.version();
        let version = TrainedVersion {
            model_hash: base.model_hash,
            layers: base.layers,
            adapter: target.map(str::to_string),
            state,
            steps,
        };
        self.remember_version(&version);
        version
    }

    /// Phase one of a step: computes the AdamW update of the accumulated gradients (clearing
    /// them) without changing any weight, and returns the version committing it would make.
    /// One prepared step at a time: commit or abort it before the next.
    pub fn prepare_step(&self, cfg: &super::AdamWConfig) -> Result<TrainedVersion> {
        let mut state = self.train_state()?;
        if state.prepared.is_some() {
            return Err(Error::Training(
                "a prepared step is waiting for its commit or abort".into(),
            ));
        }
        if state.grads.is_empty() {
            return Err(Error::Training(
                "no gradients accumulated; run backward first".into(),
            ));
        }
        let adapter = self.training_adapter(&state)?;
        let grads = std::mem::take(&mut state.grads);
        let current = self.trainable_tensors(adapter.as_deref());
        let (optimizer, steps) = match &adapter {
            Some(a) => (
                state
                    .adapter_optimizers
                    .entry(a.name().to_string())
                    .or_default(),
                a.steps(),
            ),
            None => (&mut state.optimizer, self.updates.load(Ordering::SeqCst)),
        };
        let t = optimizer.steps + 1;
        let mut values = Vec::with_capacity(current.len());
        let mut moments = Vec::with_capacity(grads.len());
        for (name, value) in current {
            match grads.get(&name) {
                Some(g) => {
                    let (new, m, v) = optimizer.compute(&name, &value, g, cfg, t)?;
                    moments.push((name.clone(), m, v));
                    values.push((name, new));
                }
                None => values.push((name, value)),
            }
        }
        let base = self.version();
        let version = TrainedVersion {
            model_hash: base.model_hash,
            layers: base.layers,
            adapter: adapter.as_ref().map(|a| a.name().to_string()),
            state: state_hash(values.iter().map(|(n, t)| (n.as_str(), t)))?,
            steps: steps + 1,
        };
        state.prepared = Some(PreparedStep {
            values,
            moments,
            version: version.clone(),
        });
        Ok(version)
    }

    /// The version a prepared step would make, if one waits.
    pub fn prepared_version(&self) -> Result<Option<TrainedVersion>> {
        Ok(self
            .train_state()?
            .prepared
            .as_ref()
            .map(|p| p.version.clone()))
    }

    /// Phase two: installs the prepared step, which must hash to `state` (what the commit
    /// certificate names). Returns the new version.
    pub fn commit_prepared(&self, state_hash: &[u8; 32]) -> Result<TrainedVersion> {
        let mut state = self.train_state()?;
        match &state.prepared {
            None => return Err(Error::Training("no prepared step to commit".into())),
            Some(p) if p.version.state != *state_hash => {
                return Err(Error::Training(format!(
                    "the commit names another state than the prepared {}",
                    p.version
                )))
            }
            Some(_) => {}
        }
        let Some(prepared) = state.prepared.take() else {
            return Err(Error::Internal("prepared step vanished".into()));
        };
        self.install(&mut state, prepared)
    }

    /// Drops the prepared step (the swarm aborted it); the weights stay as they were.
    pub fn abort_prepared(&self) -> Result<Option<TrainedVersion>> {
        Ok(self.train_state()?.prepared.take().map(|p| p.version))
    }

    /// The prepared step as tensors (`value.<name>`, `m.<name>`, `v.<name>`) and its
    /// version, for a durable copy: a node that restarts in doubt can still commit it.
    pub(crate) fn export_prepared(
        &self,
    ) -> Result<Option<(HashMap<String, Tensor>, TrainedVersion)>> {
        let state = self.train_state()?;
        let Some(p) = &state.prepared else {
            return Ok(None);
        };
        let mut out = HashMap::with_capacity(p.values.len() + 2 * p.moments.len());
        for (name, t) in &p.values {
            out.insert(format!("value.{name}"), t.clone());
        }
        for (name, m, v) in &p.moments {
            out.insert(format!("m.{name}"), m.clone());
            out.insert(format!("v.{name}"), v.clone());
        }
        Ok(Some((out, p.version.clone())))
    }

    /// Takes back a step [`ShardEngine::export_prepared`] wrote, when it is for this slice's
    /// current state of its target and its values hash to the version's state.
    pub(crate) fn import_prepared(
        &self,
        mut tensors: HashMap<String, Tensor>,
        version: TrainedVersion,
    ) -> Result<()> {
        let current = self.trained_version(version.adapter.as_deref())?;
        if version.steps != current.steps + 1
            || version.layers != current.layers
            || version.model_hash != current.model_hash
        {
            return Err(Error::Training(format!(
                "the prepared step {version} does not follow the current {current}"
            )));
        }
        let held = self.adapter_for(version.adapter.as_deref())?;
        let mut values = Vec::new();
        let mut moments = Vec::new();
        for (name, _) in self.trainable_tensors(held.as_deref()) {
            let value = tensors
                .remove(&format!("value.{name}"))
                .ok_or_else(|| Error::Training(format!("the prepared step lacks `{name}`")))?;
            if let (Some(m), Some(v)) = (
                tensors.remove(&format!("m.{name}")),
                tensors.remove(&format!("v.{name}")),
            ) {
                moments.push((name.clone(), m, v));
            }
            values.push((name, value));
        }
        if state_hash(values.iter().map(|(n, t)| (n.as_str(), t)))? != version.state {
            return Err(Error::Training(
                "the prepared step's tensors do not hash to its version".into(),
            ));
        }
        let mut state = self.train_state()?;
        state.target = Some(version.adapter.clone());
        state.prepared = Some(PreparedStep {
            values,
            moments,
            version,
        });
        Ok(())
    }

    /// Installs a computed step: the new tensors, the optimizer's moments and step count.
    fn install(&self, state: &mut TrainState, prepared: PreparedStep) -> Result<TrainedVersion> {
        let PreparedStep {
            values,
            moments,
            version,
        } = prepared;
        let optimizer = match &version.adapter {
            Some(name) => {
                let old = self.adapter_for(Some(name))?.ok_or_else(|| {
                    Error::Internal(format!("adapter `{name}` vanished before its commit"))
                })?;
                let values: HashMap<String, Tensor> = values.into_iter().collect();
                let fresh = Arc::new(old.with_values(&values, version.steps)?);
                self.adapters
                    .write()
                    .map_err(Error::poisoned("adapters"))?
                    .insert(name.clone(), fresh);
                state.adapter_optimizers.entry(name.clone()).or_default()
            }
            None => {
                self.set_own_weights(&values)?;
                self.updates.store(version.steps, Ordering::SeqCst);
                &mut state.optimizer
            }
        };
        for (name, m, v) in moments {
            optimizer.install(&name, m, v);
        }
        optimizer.steps += 1;
        // The prepared values hash to `version.state`: no need to hash them again.
        self.remember_version(&version);
        Ok(version)
    }
}
