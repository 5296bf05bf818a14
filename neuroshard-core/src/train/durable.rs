//! What a hop keeps on disk between the two phases of a step, in its checkpoint directory:
//! the prepared update (`prepared.safetensors`, then `prepared.json`, written last so a torn
//! write is no prepared step at all) and the decisions it knows (`decisions.json`). A node
//! killed after its prepare restarts *in doubt*: it holds the update it promised and asks the
//! route's other hops for the outcome before it serves the target again.

use super::proto::Outcome;
use crate::engine::adapters::write_atomically;
use crate::engine::TrainedVersion;
use crate::error::{Error, Result};
use crate::net::{NodeId, RouteHop};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Decisions kept on disk (the newest).
const KEPT_DECISIONS: usize = 64;

/// A prepared step's description.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct PreparedRecord {
    /// The job that prepared it.
    pub(crate) job: u64,
    /// Its trainer: only this key's certificate commits it.
    pub(crate) trainer: NodeId,
    /// Whom to ask for the outcome.
    pub(crate) route: Vec<RouteHop>,
    /// The version committing makes.
    pub(crate) version: TrainedVersion,
}

fn io(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Training(format!("{}: {e}", path.display()))
}

/// Writes the prepared step durably (tensors first, the record last).
pub(crate) fn save_prepared(
    dir: &Path,
    record: &PreparedRecord,
    tensors: &HashMap<String, Tensor>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    write_atomically(&dir.join("prepared.safetensors"), |p| {
        Ok(candle_core::safetensors::save(tensors, p)?)
    })?;
    let body = serde_json::to_vec_pretty(record).map_err(|e| Error::Training(e.to_string()))?;
    write_atomically(&dir.join("prepared.json"), |p| {
        std::fs::write(p, &body).map_err(|e| io(p, e))
    })
}

/// The prepared step left in `dir`, if any.
pub(crate) fn load_prepared(
    dir: &Path,
) -> Result<Option<(PreparedRecord, HashMap<String, Tensor>)>> {
    let path = dir.join("prepared.json");
    let body = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&path, e)),
    };
    let record: PreparedRecord = serde_json::from_slice(&body).map_err(|e| io(&path, e))?;
    let tensors = candle_core::safetensors::load(dir.join("prepared.safetensors"), &Device::Cpu)?;
    Ok(Some((record, tensors)))
}

/// Removes the prepared step (committed or aborted).
pub(crate) fn clear_prepared(dir: &Path) {
    // The record first: without it the tensors are never read.
    let _ = std::fs::remove_file(dir.join("prepared.json"));
    let _ = std::fs::remove_file(dir.join("prepared.safetensors"));
}

/// Adds a decision about (job, step) to `dir/decisions.json`.
pub(crate) fn save_decision(dir: &Path, key: (u64, u64), outcome: &Outcome) -> Result<()> {
    let mut all = load_decisions(dir)?;
    all.retain(|(k, _)| *k != key);
    all.push((key, outcome.clone()));
    let skip = all.len().saturating_sub(KEPT_DECISIONS);
    let body = serde_json::to_vec(&all[skip..]).map_err(|e| Error::Training(e.to_string()))?;
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    write_atomically(&dir.join("decisions.json"), |p| {
        std::fs::write(p, &body).map_err(|e| io(p, e))
    })
}

/// The decisions kept in `dir`.
pub(crate) fn load_decisions(dir: &Path) -> Result<Vec<((u64, u64), Outcome)>> {
    let path = dir.join("decisions.json");
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| io(&path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io(&path, e)),
    }
}
