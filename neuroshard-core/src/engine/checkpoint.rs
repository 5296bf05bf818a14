//! Checkpoints of the slice's own weights (full training), and the file discipline every
//! training checkpoint follows: the tensors and the optimizer moments go into files whose
//! names carry the step (`STEM.STEPS.safetensors`, `STEM.STEPS.optim.safetensors`), the JSON
//! that names them is written last (atomically), and only then are older steps' files
//! removed. A crash at any point leaves the JSON naming a complete older or newer checkpoint,
//! never tensors of one step under the description of another.
//!
//! The slice's checkpoint is `slice.json` with its two files; a node restarted with
//! `--checkpoint DIR` loads it over the weights it read from the model file, so full training
//! goes on from the last committed step.

use super::adapters::write_atomically;
use super::optimizer::AdamW;
use super::staged::{state_hash, TrainedVersion};
use super::ShardEngine;
use crate::error::{Error, Result};
use crate::model::identity::hex;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

/// Stem of the slice checkpoint's files.
const SLICE_STEM: &str = "slice";

/// The two data files of one checkpoint, by name inside its directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct CheckpointFiles {
    /// The trainable tensors.
    pub(crate) tensors: String,
    /// AdamW's moments.
    pub(crate) optimizer: String,
}

/// Writes `tensors` and `moments` of step `steps` under `stem` in `dir`, then `meta_path`
/// (produced by `meta` from the file names, written last), then removes the files of other
/// steps of `stem`.
pub(crate) fn write_checkpoint(
    dir: &Path,
    stem: &str,
    steps: u64,
    tensors: &HashMap<String, Tensor>,
    moments: &HashMap<String, Tensor>,
    meta_path: &Path,
    meta: impl FnOnce(CheckpointFiles) -> Result<Vec<u8>>,
) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Training(format!("cannot create {}: {e}", dir.display())))?;
    let files = CheckpointFiles {
        tensors: format!("{stem}.{steps}.safetensors"),
        optimizer: format!("{stem}.{steps}.optim.safetensors"),
    };
    write_atomically(&dir.join(&files.tensors), |p| {
        Ok(candle_core::safetensors::save(tensors, p)?)
    })?;
    write_atomically(&dir.join(&files.optimizer), |p| {
        Ok(candle_core::safetensors::save(moments, p)?)
    })?;
    let body = meta(files.clone())?;
    write_atomically(meta_path, |p| {
        std::fs::write(p, &body)
            .map_err(|e| Error::Training(format!("cannot write {}: {e}", p.display())))
    })?;
    remove_other_steps(dir, stem, &files);
    Ok(())
}

/// Removes `STEM.N.safetensors` and `STEM.N.optim.safetensors` files other than `keep`.
fn remove_other_steps(dir: &Path, stem: &str, keep: &CheckpointFiles) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefix = format!("{stem}.");
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        let step = rest
            .strip_suffix(".optim.safetensors")
            .or_else(|| rest.strip_suffix(".safetensors"));
        let is_step_file =
            step.is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
        if is_step_file && name != keep.tensors && name != keep.optimizer {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// `slice.json`: what the slice checkpoint holds.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SliceMeta {
    format: u32,
    files: CheckpointFiles,
    steps: u64,
    optimizer_steps: u64,
    state: String,
    model_hash: String,
    layers: Range<usize>,
}

fn slice_meta_path(dir: &Path) -> PathBuf {
    dir.join(format!("{SLICE_STEM}.json"))
}

impl ShardEngine {
    /// Saves the slice's own trainable weights with their optimizer state into `dir` (full
    /// training; the engine must run in f32). Returns the version saved.
    pub fn save_slice(&self, dir: &Path) -> Result<TrainedVersion> {
        self.check_full_training()?;
        let version = self.current_version(None)?;
        let tensors: HashMap<String, Tensor> = self.trainable_tensors(None).into_iter().collect();
        let (moments, optimizer_steps) = {
            let state = self.train_state()?;
            (state.optimizer.export()?, state.optimizer.steps)
        };
        write_checkpoint(
            dir,
            SLICE_STEM,
            version.steps,
            &tensors,
            &moments,
            &slice_meta_path(dir),
            |files| {
                let meta = SliceMeta {
                    format: 1,
                    files,
                    steps: version.steps,
                    optimizer_steps,
                    state: hex(&version.state),
                    model_hash: hex(&version.model_hash),
                    layers: version.layers.clone(),
                };
                serde_json::to_vec_pretty(&meta).map_err(|e| Error::Training(e.to_string()))
            },
        )?;
        Ok(version)
    }

    /// Whether `dir` holds a slice checkpoint.
    pub fn has_slice_checkpoint(dir: &Path) -> bool {
        slice_meta_path(dir).exists()
    }

    /// Loads the slice checkpoint in `dir` over this engine's weights: the same model and
    /// layers, tensors that hash to the saved state, the optimizer's moments and step count.
    /// Nothing changes when any check fails.
    pub fn load_slice(&self, dir: &Path) -> Result<TrainedVersion> {
        self.check_full_training()?;
        let meta_path = slice_meta_path(dir);
        let body = std::fs::read(&meta_path)
            .map_err(|e| Error::Training(format!("cannot read {}: {e}", meta_path.display())))?;
        let meta: SliceMeta = serde_json::from_slice(&body)
            .map_err(|e| Error::Training(format!("{}: {e}", meta_path.display())))?;
        let ours = self.version();
        if meta.format != 1 {
            return Err(Error::Training(format!(
                "{} has format {}, this build reads 1",
                meta_path.display(),
                meta.format
            )));
        }
        if meta.model_hash != hex(&ours.model_hash) || meta.layers != ours.layers {
            return Err(Error::Training(format!(
                "the slice checkpoint in {} is of layers {:?} of model {}; this engine runs \
                 layers {:?} of {}",
                dir.display(),
                meta.layers,
                meta.model_hash,
                ours.layers,
                hex(&ours.model_hash)
            )));
        }
        let tensors_path = dir.join(&meta.files.tensors);
        let tensors = candle_core::safetensors::load(&tensors_path, &Device::Cpu)?;
        let current = self.trainable_tensors(None);
        // Every value, in hash order, checked before any weight changes.
        let mut values = Vec::with_capacity(current.len());
        for (name, now) in &current {
            let saved = tensors.get(name).ok_or_else(|| {
                Error::Training(format!("{} lacks `{name}`", tensors_path.display()))
            })?;
            if saved.dims() != now.dims() {
                return Err(Error::Training(format!(
                    "`{name}` in {} has shape {:?}, the slice {:?}",
                    tensors_path.display(),
                    saved.dims(),
                    now.dims()
                )));
            }
            values.push((name.clone(), saved.to_dtype(now.dtype())?));
        }
        if tensors.len() != current.len() {
            return Err(Error::Training(format!(
                "{} holds {} tensors, the slice trains {}",
                tensors_path.display(),
                tensors.len(),
                current.len()
            )));
        }
        let state = state_hash(values.iter().map(|(n, t)| (n.as_str(), t)))?;
        if hex(&state) != meta.state {
            return Err(Error::Training(format!(
                "the tensors in {} do not hash to the saved state",
                tensors_path.display()
            )));
        }
        let moments =
            candle_core::safetensors::load(dir.join(&meta.files.optimizer), &Device::Cpu)?;
        let optimizer = AdamW::import(moments, meta.optimizer_steps)?;
        let mut train = self.train_state()?;
        self.set_own_weights(&values)?;
        train.optimizer = optimizer;
        self.updates.store(meta.steps, Ordering::SeqCst);
        drop(train);
        Ok(self.remember_installed(None, state, meta.steps))
    }
}
