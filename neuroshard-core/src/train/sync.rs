//! Adapter sync: a replica left behind on an adapter's version (or without the adapter) fetches
//! it from a peer that holds the same layers, instead of serving a stale one.
//!
//! The node that has it answers `GetAdapter` with the certificate of the commit that made its
//! state, the adapter's shape and its tensors (f32 frames). The replica adopts them only when
//! a trainer it allows (`--trainer`) signed the certificate, the certificate names that very
//! state (model, layers, adapter, steps, hash) for some hop, the step count is newer than its
//! own, and the tensors hash to the state: a peer cannot make it serve weights that no trainer
//! it allows committed. The certificate is kept, so the replica can pass the adapter on in
//! turn. AdamW's moments are not part of a version (nothing certifies them): a synced adapter
//! starts a fresh optimizer.
//!
//! Until it has synced, a replica behind a newer version on its layers is left out of routes
//! for that adapter (`net/route.rs`). Sync needs no job and no trainer online, and a node
//! never syncs a target that a job's lease or a prepared step holds.

#![cfg_attr(not(feature = "internals"), allow(unreachable_pub))]

use super::hop::{read_tensor, TrainService};
use super::proto::{CommitCertificate, Outcome, SignedCommit, TrainMessage};
use crate::engine::adapters::AdoptedAdapter;
use crate::engine::TrainedVersion;
use crate::net::peers::PeerSet;
use crate::net::proto::{read_postcard, write_postcard, MAX_CONTROL};
use crate::net::{lock, NodeId};
use crate::wire::DEFAULT_MAX_FRAME;
use iroh::endpoint::SendStream;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// The lease a sync holds on its adapter (no job has this id: jobs are random, and a `Begin`
/// meeting it is refused until the sync ends).
pub(crate) const SYNC_LEASE: u64 = u64::MAX;
/// Longest one adapter fetch may take.
const SYNC_DEADLINE: Duration = Duration::from_secs(120);
/// Most tensors an adapter may have (two per matrix; 7 matrices × 256 layers is 3,584).
const MAX_ADAPTER_TENSORS: usize = 8192;

/// One adapter to fetch: from `peer`, which announces it at `steps`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SyncPlan {
    /// The adapter.
    pub adapter: String,
    /// The peer that announces the newest version.
    pub peer: NodeId,
    /// Where to reach it.
    pub addrs: Vec<SocketAddr>,
    /// Its step count there.
    pub steps: u64,
}

/// The adapters this node (`me`) should fetch: each adapter that a usable peer holding exactly
/// this node's layers announces at more steps than this node has (or that this node lacks),
/// from the peer announcing the most steps (the lowest id among equals).
pub fn adapters_to_sync(me: &NodeId, peers: &PeerSet, now_ms: u64) -> Vec<SyncPlan> {
    let Some(own) = peers.iter().find(|(id, _)| *id == me).map(|(_, e)| e) else {
        return Vec::new();
    };
    let own = &own.announcement;
    let mut best: HashMap<String, SyncPlan> = HashMap::new();
    let mut holders: Vec<_> = peers
        .iter()
        .filter(|(id, e)| *id != me && e.usable(now_ms) && e.announcement.layers == own.layers)
        .collect();
    holders.sort_by_key(|(id, _)| *id.as_bytes());
    for (id, e) in holders {
        for v in &e.announcement.versions {
            let Some(name) = &v.adapter else { continue };
            let ours = own.version_of(Some(name)).map(|o| o.steps);
            if ours.is_some_and(|s| s >= v.steps) {
                continue;
            }
            if best.get(name).is_none_or(|b| v.steps > b.steps) {
                best.insert(
                    name.clone(),
                    SyncPlan {
                        adapter: name.clone(),
                        peer: *id,
                        addrs: e.announcement.addrs.clone(),
                        steps: v.steps,
                    },
                );
            }
        }
    }
    let mut plans: Vec<SyncPlan> = best.into_values().collect();
    plans.sort_by(|a, b| a.adapter.cmp(&b.adapter));
    plans
}

/// Fetches of one plan tried before it is given up (a peer that cannot prove its state).
const SYNC_TRIES: u32 = 3;

impl TrainService {
    /// Fetches what `plans` names, one at a time (one pass at a time per node), skipping
    /// plans that failed [`SYNC_TRIES`] times. For nodes that allow some trainer
    /// ([`TrainService::allows_trainers`]): only a trainer it allows can certify what it
    /// adopts.
    pub(crate) async fn sync_adapters(self: std::sync::Arc<Self>, plans: Vec<SyncPlan>) {
        let Ok(_one_pass) = self.syncing.try_lock() else {
            return;
        };
        for plan in plans {
            if lock(&self.failed_syncs).get(&plan).copied().unwrap_or(0) >= SYNC_TRIES {
                continue;
            }
            match self.sync_adapter(&plan).await {
                Ok(v) => {
                    self.counters.syncs.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(peer = %plan.peer.fmt_short(), "synced adapter {v}");
                }
                Err(e) => {
                    self.counters.sync_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        peer = %plan.peer.fmt_short(),
                        "cannot sync adapter `{}` ({} steps): {e}",
                        plan.adapter,
                        plan.steps
                    );
                    *lock(&self.failed_syncs).entry(plan).or_default() += 1;
                }
            }
        }
    }

    /// The certificate of the commit that made `version`, among the decisions this node knows
    /// (its own commits, and the certificates of adapters it synced).
    fn certificate_of(&self, version: &TrainedVersion) -> Option<SignedCommit> {
        lock(&self.outcomes).values().find_map(|o| match o {
            Outcome::Committed(signed) => {
                let cert: CommitCertificate = postcard::from_bytes(&signed.body).ok()?;
                cert.versions
                    .iter()
                    .any(|(_, v)| v == version)
                    .then(|| signed.clone())
            }
            _ => None,
        })
    }

    /// Answers `GetAdapter`: the state of adapter `name` with its certificate, then its
    /// tensors as f32 frames (or an error).
    pub(super) async fn send_adapter(&self, name: &str, send: &mut SendStream) {
        let state = self.adapter_state(name);
        let (reply, tensors) = match state {
            Ok(s) => s,
            Err(e) => {
                let _ = write_postcard(send, &self.error(e)).await;
                return;
            }
        };
        if write_postcard(send, &reply).await.is_ok() {
            super::hop::write_f32_frames(send, 0, tensors).await;
        }
    }

    fn adapter_state(
        &self,
        name: &str,
    ) -> Result<(TrainMessage, Vec<(String, candle_core::Tensor)>), String> {
        let adapter = self
            .engine
            .adapter(name)
            .ok_or_else(|| format!("no adapter `{name}` here"))?;
        let version = self
            .engine
            .current_version(Some(name))
            .map_err(|e| e.to_string())?;
        // A commit between the two reads: the tensors would not match the version.
        if adapter.steps() != version.steps {
            return Err(format!(
                "adapter `{name}` changed while being read; ask again"
            ));
        }
        let certificate = self.certificate_of(&version).ok_or_else(|| {
            format!("no commit certificate is known here for adapter `{name}` at {version}")
        })?;
        let tensors = adapter.tensors();
        let reply = TrainMessage::AdapterState {
            certificate,
            config: adapter.config().clone(),
            names: tensors.iter().map(|(n, _)| n.clone()).collect(),
        };
        Ok((reply, tensors))
    }

    /// Fetches `plan`'s adapter from its peer and adopts it (see the module's doc for the
    /// checks). Holds the adapter's lease meanwhile, so no job starts on it.
    pub(crate) async fn sync_adapter(&self, plan: &SyncPlan) -> Result<TrainedVersion, String> {
        let target = Some(plan.adapter.clone());
        {
            let mut leases = lock(&self.leases);
            if leases.contains_key(&target) {
                return Err(format!("adapter `{}` is being trained here", plan.adapter));
            }
            let prepared = self.engine.prepared_version().map_err(|e| e.to_string())?;
            if prepared.is_some_and(|p| p.adapter == target) {
                return Err(format!(
                    "a step of adapter `{}` is prepared here",
                    plan.adapter
                ));
            }
            leases.insert(target.clone(), SYNC_LEASE);
        }
        let result = tokio::time::timeout(SYNC_DEADLINE, self.fetch_and_adopt(plan))
            .await
            .unwrap_or_else(|_| Err("the peer did not send the adapter in time".into()));
        let mut leases = lock(&self.leases);
        if leases.get(&target) == Some(&SYNC_LEASE) {
            leases.remove(&target);
        }
        result
    }

    async fn fetch_and_adopt(&self, plan: &SyncPlan) -> Result<TrainedVersion, String> {
        let name = plan.adapter.as_str();
        let (conn, _) = self
            .conns
            .get_or_dial_patiently(&self.endpoint, plan.peer, &plan.addrs)
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let ask = TrainMessage::GetAdapter {
            name: name.to_string(),
        };
        write_postcard(&mut send, &ask)
            .await
            .map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        let (signed, config, names) = match read_postcard::<_, TrainMessage>(&mut recv, MAX_CONTROL)
            .await
            .map_err(|e| e.to_string())?
        {
            TrainMessage::AdapterState {
                certificate,
                config,
                names,
            } => (certificate, config, names),
            TrainMessage::Error { message, .. } => return Err(message),
            other => return Err(format!("unexpected reply `{}`", other.kind())),
        };
        let (job, version) = self.certified_state(&signed, name)?;
        let ours = self.engine.adapter(name).map(|a| a.steps());
        if ours.is_some_and(|s| s >= version.steps) {
            return Err(format!(
                "the peer's {version} is not newer than this node's {} steps",
                ours.unwrap_or(0)
            ));
        }
        if names.len() > MAX_ADAPTER_TENSORS {
            return Err(format!(
                "{} tensors is too many for an adapter",
                names.len()
            ));
        }
        let mut tensors = HashMap::with_capacity(names.len());
        for n in names {
            let t = read_tensor(&mut recv, DEFAULT_MAX_FRAME).await?;
            if tensors.insert(n.clone(), t).is_some() {
                return Err(format!("tensor `{n}` sent twice"));
            }
        }
        let source = format!("peer {}", plan.peer.fmt_short());
        let adopted = AdoptedAdapter {
            name,
            config,
            steps: version.steps,
            state: version.state,
            source: &source,
        };
        let installed = self
            .engine
            .adopt_adapter(adopted, &tensors, None, true)
            .map_err(|e| e.to_string())?;
        let key = (job, version.steps);
        let outcome = Outcome::Committed(signed);
        lock(&self.outcomes).insert(key, outcome.clone());
        self.versions_changed.notify_one();
        if let Some(dir) = &self.policy.checkpoint {
            self.engine
                .save_adapter(name, dir)
                .map_err(|e| format!("synced {installed}, but saving it failed: {e}"))?;
            super::durable::save_decision(dir, key, &outcome).map_err(|e| e.to_string())?;
        }
        Ok(installed)
    }

    /// The job and the state of adapter `name` on this node's layers that `signed`
    /// certifies, when a trainer this node allows signed it.
    fn certified_state(
        &self,
        signed: &SignedCommit,
        name: &str,
    ) -> Result<(u64, TrainedVersion), String> {
        if !self.policy.trainers.contains(&signed.trainer) {
            return Err(format!(
                "the adapter's certificate is signed by {}, not a trainer of this node",
                signed.trainer.fmt_short()
            ));
        }
        let cert = signed.verify(&signed.trainer).map_err(|e| e.to_string())?;
        let own = self.engine.version();
        cert.versions
            .into_iter()
            .map(|(_, v)| v)
            .find(|v| {
                v.adapter.as_deref() == Some(name)
                    && v.layers == own.layers
                    && v.model_hash == own.model_hash
            })
            .map(|v| (cert.job, v))
            .ok_or_else(|| {
                format!("the certificate names no state of adapter `{name}` for these layers")
            })
    }
}
