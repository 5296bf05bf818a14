//! LoRA adapters of one engine: creation, lookup, versions and checkpoints.
//!
//! A checkpoint of adapter `NAME` is three files in one directory: `NAME.lora.STEPS.safetensors`
//! (the factors, PEFT names), `NAME.lora.STEPS.optim.safetensors` (AdamW's moments) and
//! `NAME.lora.json` (config, steps, the state hash, the base model and slice, the two file
//! names), written last, so a checkpoint is switched in one rename (see `checkpoint.rs`).

use super::checkpoint::{write_checkpoint, CheckpointFiles};
use super::optimizer::AdamW;
use super::staged::{state_hash, TrainedVersion};
use super::ShardEngine;
use crate::error::{Error, Result};
use crate::model::identity::{hex, parse_hex};
use crate::model::lora::{LoraAdapter, LoraConfig};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The JSON beside a checkpoint's tensors.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct CheckpointMeta {
    format: u32,
    adapter: String,
    config: LoraConfig,
    steps: u64,
    optimizer_steps: u64,
    state: String,
    model_hash: String,
    layers: Range<usize>,
    /// The data files (absent in checkpoints written before they carried the step: then
    /// `NAME.lora.safetensors` and `NAME.optim.safetensors`).
    #[serde(default)]
    files: Option<CheckpointFiles>,
}

/// Writes `bytes` to `path` through a temporary file and a rename (never a torn file).
pub(crate) fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = path.with_extension("tmp");
    write(&tmp)?;
    std::fs::rename(&tmp, path)
        .map_err(|e| Error::Training(format!("cannot write {}: {e}", path.display())))
}

/// The JSON of adapter `name`'s checkpoint in `dir`.
fn checkpoint_meta_path(dir: &Path, name: &str) -> Result<PathBuf> {
    // The name becomes a file name: no separators, no dots at the start.
    if name.contains(['/', '\\']) || name.starts_with('.') {
        return Err(Error::Training(format!(
            "adapter name `{name}` cannot name a checkpoint file"
        )));
    }
    Ok(dir.join(format!("{name}.lora.json")))
}

impl ShardEngine {
    /// Creates the LoRA adapter `name` over this slice's matrices that match `config`'s
    /// targets (`A` seeded, `B` zero: the model's output is unchanged until it trains).
    /// Adapters are namespaced: a request runs with one by name, and the base weights are
    /// shared. An existing adapter of that name is an error.
    pub fn create_adapter(&self, name: &str, config: LoraConfig) -> Result<Arc<LoraAdapter>> {
        if name.is_empty() || name.len() > 128 {
            return Err(Error::Training(format!(
                "adapter names are 1..=128 bytes, not {}",
                name.len()
            )));
        }
        let adapter = Arc::new(LoraAdapter::new(name, config, self.model.linears())?);
        let mut adapters = self.adapters.write().map_err(Error::poisoned("adapters"))?;
        if adapters.contains_key(name) {
            return Err(Error::Training(format!("adapter `{name}` exists already")));
        }
        adapters.insert(name.to_string(), adapter.clone());
        Ok(adapter)
    }

    /// The adapter `name`, if this engine has it.
    pub fn adapter(&self, name: &str) -> Option<Arc<LoraAdapter>> {
        self.adapters.read().ok()?.get(name).cloned()
    }

    /// Names of the adapters this engine has, sorted.
    pub fn adapter_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .adapters
            .read()
            .map(|a| a.keys().cloned().collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    /// The adapter a request names: an unknown name is an error, never the base weights.
    pub(crate) fn adapter_for(&self, name: Option<&str>) -> Result<Option<Arc<LoraAdapter>>> {
        match name {
            None => Ok(None),
            Some(n) => self
                .adapter(n)
                .map(Some)
                .ok_or_else(|| Error::BadInput(format!("no adapter `{n}` on this slice"))),
        }
    }

    /// One training step of adapter `name` on text `ids` (`[batch, seq]`) for an engine that
    /// holds the whole model: the next-token loss, its gradients, one AdamW step. Returns the
    /// loss before the step. Learning from a conversation in one process is one call of this
    /// per micro-batch (the swarm relays the same steps hop by hop).
    pub fn train_adapter_step(
        &self,
        name: &str,
        ids: &Tensor,
        cfg: &super::AdamWConfig,
    ) -> Result<f32> {
        if !(self.is_first() && self.is_last()) {
            return Err(Error::Training(format!(
                "a one-call training step needs the whole model; this engine holds layers {:?}",
                self.version().layers
            )));
        }
        /// The micro-batch id of a one-call step (never left pending: backward takes it).
        const ONE_CALL: u64 = u64::MAX;
        self.train_forward_adapter(ONE_CALL, crate::ShardInput::Tokens(ids.clone()), name)?;
        let out = self.backward(ONE_CALL, super::OutputGrad::CausalLmLabels(ids.clone()));
        let loss = match out {
            Ok(out) => out.loss,
            Err(e) => {
                self.zero_grad()?;
                return Err(e);
            }
        };
        self.step(cfg)?;
        loss.ok_or_else(|| Error::Internal("the last layer computed no loss".into()))
    }

    /// The current version of adapter `name`.
    pub fn adapter_version(&self, name: &str) -> Result<TrainedVersion> {
        self.trained_version(Some(name))
    }

    /// Saves adapter `name` with its optimizer state into `dir` (created if missing); returns
    /// the version saved. Gradients being accumulated are not part of a checkpoint: save
    /// after a step.
    pub fn save_adapter(&self, name: &str, dir: &Path) -> Result<TrainedVersion> {
        let adapter = self
            .adapter(name)
            .ok_or_else(|| Error::BadInput(format!("no adapter `{name}` on this slice")))?;
        let meta_path = checkpoint_meta_path(dir, name)?;
        let version = self.current_version(Some(name))?;
        let tensors: HashMap<String, Tensor> = adapter.tensors().into_iter().collect();
        let (moments, optimizer_steps) = {
            let state = self.train_state()?;
            match state.adapter_optimizers.get(name) {
                Some(opt) => (opt.export()?, opt.steps),
                None => (HashMap::new(), 0),
            }
        };
        write_checkpoint(
            dir,
            &format!("{name}.lora"),
            version.steps,
            &tensors,
            &moments,
            &meta_path,
            |files| {
                let meta = CheckpointMeta {
                    format: 1,
                    adapter: name.to_string(),
                    config: adapter.config().clone(),
                    steps: version.steps,
                    optimizer_steps,
                    state: hex(&version.state),
                    model_hash: hex(&version.model_hash),
                    layers: version.layers.clone(),
                    files: Some(files),
                };
                serde_json::to_vec_pretty(&meta).map_err(|e| Error::Training(e.to_string()))
            },
        )?;
        Ok(version)
    }

    /// Loads adapter `name`'s checkpoint from `dir` as a new adapter of this engine (its
    /// optimizer state included, so training goes on where it stopped). Refused when the
    /// checkpoint was made for another base model or slice, or when its tensors do not hash
    /// to the state its JSON names (a torn or altered checkpoint).
    pub fn load_adapter(&self, name: &str, dir: &Path) -> Result<TrainedVersion> {
        let meta_path = checkpoint_meta_path(dir, name)?;
        let body = std::fs::read(&meta_path)
            .map_err(|e| Error::Training(format!("cannot read {}: {e}", meta_path.display())))?;
        let meta: CheckpointMeta = serde_json::from_slice(&body)
            .map_err(|e| Error::Training(format!("{}: {e}", meta_path.display())))?;
        let ours = self.version();
        if meta.format != 1 || meta.adapter != name {
            return Err(Error::Training(format!(
                "{} is not a checkpoint of adapter `{name}` (format 1)",
                meta_path.display()
            )));
        }
        if meta.model_hash != hex(&ours.model_hash) || meta.layers != ours.layers {
            return Err(Error::Training(format!(
                "adapter `{name}` was saved for layers {:?} of model {}, this engine runs \
                 layers {:?} of {}",
                meta.layers,
                meta.model_hash,
                ours.layers,
                hex(&ours.model_hash)
            )));
        }
        let files = meta.files.clone().unwrap_or_else(|| CheckpointFiles {
            tensors: format!("{name}.lora.safetensors"),
            optimizer: format!("{name}.optim.safetensors"),
        });
        let (tensors_path, optim_path) = (dir.join(&files.tensors), dir.join(&files.optimizer));
        let tensors = candle_core::safetensors::load(&tensors_path, &Device::Cpu)?;
        let moments = if optim_path.exists() {
            candle_core::safetensors::load(&optim_path, &Device::Cpu)?
        } else {
            HashMap::new()
        };
        let optimizer = AdamW::import(moments, meta.optimizer_steps)?;
        let state = parse_hex(&meta.state).ok_or_else(|| {
            Error::Training(format!("{}: the state is not a hash", meta_path.display()))
        })?;
        let adopted = AdoptedAdapter {
            name,
            config: meta.config.clone(),
            steps: meta.steps,
            state,
            source: &tensors_path.display().to_string(),
        };
        self.adopt_adapter(adopted, &tensors, Some(optimizer), false)
    }

    /// Makes `tensors` (by PEFT name: every tensor the adapter has on this slice) the adapter
    /// `adopted` describes, with `optimizer` (`None`: a fresh one), when they hash to its
    /// state: from a checkpoint,
    /// or from a peer that trained it ([`crate::train`]'s adapter sync). With `replace`, an
    /// adapter of that name gives way (sessions running with it keep it until they close);
    /// otherwise one is an error.
    pub(crate) fn adopt_adapter(
        &self,
        adopted: AdoptedAdapter<'_>,
        tensors: &HashMap<String, Tensor>,
        optimizer: Option<AdamW>,
        replace: bool,
    ) -> Result<TrainedVersion> {
        let AdoptedAdapter {
            name,
            config,
            steps,
            state,
            source,
        } = adopted;
        let adapter = LoraAdapter::new(name, config, self.model.linears())?;
        let expected: Vec<String> = adapter.tensors().into_iter().map(|(n, _)| n).collect();
        if expected.len() != tensors.len() || expected.iter().any(|n| !tensors.contains_key(n)) {
            return Err(Error::Training(format!(
                "{source} does not hold the {} tensors adapter `{name}` has on this slice",
                expected.len()
            )));
        }
        for (n, t) in tensors {
            adapter.set_tensor(n, t)?;
        }
        adapter.set_steps(steps);
        let held = adapter.tensors();
        if state_hash(held.iter().map(|(n, t)| (n.as_str(), t)))? != state {
            return Err(Error::Training(format!(
                "adapter `{name}`: the tensors from {source} do not hash to the state named \
                 for them"
            )));
        }
        {
            let mut adapters = self.adapters.write().map_err(Error::poisoned("adapters"))?;
            if !replace && adapters.contains_key(name) {
                return Err(Error::Training(format!("adapter `{name}` exists already")));
            }
            adapters.insert(name.to_string(), Arc::new(adapter));
        }
        self.train_state()?
            .adapter_optimizers
            .insert(name.to_string(), optimizer.unwrap_or_default());
        Ok(self.remember_installed(Some(name), state, steps))
    }
}

/// What [`ShardEngine::adopt_adapter`] installs besides the tensors.
pub(crate) struct AdoptedAdapter<'a> {
    /// The adapter's name.
    pub(crate) name: &'a str,
    /// Its shape.
    pub(crate) config: LoraConfig,
    /// Its step count.
    pub(crate) steps: u64,
    /// The hash its tensors must have.
    pub(crate) state: [u8; 32],
    /// Where the tensors come from, for errors.
    pub(crate) source: &'a str,
}
