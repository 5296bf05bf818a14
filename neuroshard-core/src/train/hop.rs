//! The training side of a node: it serves `neuroshard/train/1` for the trainers it allows.
//!
//! A job holds this node's lease on its target (the slice's own weights, or one adapter), so
//! two trainers never interleave steps on it. Per micro-batch, the hop runs a tracked forward
//! and relays the hidden states on (the last hop computes the loss and starts backward right
//! away); gradients come back from the successor, and the hop's backward sends the gradient of
//! its input to the predecessor. Micro-batches pipeline: each hop computes in arrival order
//! (one FIFO lock per job), so while hop 2 works on micro-batch 0, hop 1 already runs
//! micro-batch 1 (GPipe's schedule, with the last hop going backward as soon as a forward
//! ends). A step's gradients are complete once every micro-batch has gone backward here; the
//! two ends of a tied embedding then swap their halves and add them in the same order, so both
//! copies get bit-identical updates. Steps then commit in two phases (`engine/staged.rs`,
//! `certificate.rs`).

use super::durable::{self, PreparedRecord};
use super::proto::{
    JobSpec, Outcome, SignedCommit, TrainMessage, TrainTarget, MAX_MICRO_BATCHES,
    MAX_MICRO_POSITIONS, MAX_TIED_FRAME, TRAIN_ALPN,
};
use crate::engine::{OutputGrad, ShardEngine};
use crate::net::connections::Connections;
use crate::net::proto::{read_postcard, request_on, send_uni, write_postcard, MAX_CONTROL};
use crate::net::{lock, NodeId};
use crate::wire::{encode_frame, read_frame, FrameMeta, DEFAULT_MAX_FRAME};
use crate::ShardInput;
use candle_core::{Device, Tensor};
use iroh::endpoint::{Connection, RecvStream, SendStream};
use iroh::protocol::{AcceptError, ProtocolHandler};
use iroh::Endpoint;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Longest a hop waits for a step's gradients to complete (a `Sync`), or for the other half
/// of a tied gradient: the trainer gives up earlier on any error it hears of.
const STEP_DEADLINE: Duration = Duration::from_secs(600);
/// What a node that is neither an allowed trainer nor a hop of a job's route hears.
const NOT_KNOWN: &str = "not a trainer or a training peer of this node";
/// Adapter states a node sends at once (`GetAdapter`, open to any node of the swarm).
const ADAPTER_SENDS: usize = 2;
/// Streams one peer may have open on this protocol at once.
const MAX_STREAMS_PER_CONNECTION: usize = 64;

/// Training counters of a node.
#[derive(Debug, Default)]
pub(crate) struct TrainCounters {
    pub(crate) forwards: AtomicU64,
    pub(crate) backwards: AtomicU64,
    pub(crate) commits: AtomicU64,
    pub(crate) aborts: AtomicU64,
    pub(crate) syncs: AtomicU64,
    pub(crate) sync_failures: AtomicU64,
}

/// How a node trains: who may train it and where it keeps checkpoints.
#[derive(Debug, Clone, Default)]
pub struct TrainPolicy {
    /// Trainer identities allowed to train this node (`--trainer ID`); empty: nobody.
    pub trainers: Vec<NodeId>,
    /// Directory of committed checkpoints (`--checkpoint DIR`): adapters and the slice are
    /// saved there after every commit, and loaded from there at start.
    pub checkpoint: Option<PathBuf>,
    /// Bytes the graphs of micro-batches waiting for their backward may hold here, estimated
    /// ([`ShardEngine::train_activation_bytes`]); a micro-batch that would pass it is refused
    /// before it runs, and the step aborts. `None`: [`DEFAULT_TRAIN_MEMORY`].
    pub memory_budget: Option<u64>,
}

/// Default training memory budget of a hop: 4 GiB of pending activations.
pub const DEFAULT_TRAIN_MEMORY: u64 = 4 << 30;

/// Where one step stands on this hop.
#[derive(Debug, Default)]
struct Progress {
    step: u64,
    /// Micro-batches in the step (0 until its first message).
    micros: u32,
    backward_done: u32,
    loss_sum: f64,
    losses: u32,
    /// Gradients complete (tied halves added).
    complete: bool,
    error: Option<String>,
}

/// One job this hop serves.
#[derive(Debug)]
struct Job {
    spec: JobSpec,
    trainer: NodeId,
    /// This hop's index in the route.
    index: usize,
    /// Compute runs in arrival order, one item at a time (tokio's mutex is FIFO).
    compute: tokio::sync::Mutex<()>,
    progress: Mutex<Progress>,
    /// The other end's half of the tied gradient, by step.
    tied_in: Mutex<HashMap<u64, Tensor>>,
    changed: tokio::sync::Notify,
}

impl Job {
    fn is_first(&self) -> bool {
        self.index == 0
    }

    fn is_last(&self) -> bool {
        self.index + 1 == self.spec.route.len()
    }

    /// Enters step `step` of `micros` micro-batches (a later step starts afresh; an earlier
    /// one is refused).
    fn enter(&self, step: u64, micros: Option<u32>) -> Result<(), String> {
        let mut p = lock(&self.progress);
        if step < p.step {
            return Err(format!("step {step} is over (now at {})", p.step));
        }
        if step > p.step {
            *p = Progress {
                step,
                ..Progress::default()
            };
        }
        if let Some(m) = micros {
            if m == 0 || m > MAX_MICRO_BATCHES {
                return Err(format!(
                    "{m} micro-batches (accepted: 1..={MAX_MICRO_BATCHES})"
                ));
            }
            if p.micros != 0 && p.micros != m {
                return Err(format!(
                    "step {step} has {} micro-batches, not {m}",
                    p.micros
                ));
            }
            p.micros = m;
        }
        Ok(())
    }

    fn fail(&self, step: u64, message: String) {
        let mut p = lock(&self.progress);
        if p.step == step && p.error.is_none() {
            p.error = Some(message);
        }
        drop(p);
        self.changed.notify_waiters();
    }

    /// Waits until `done(progress)` holds for step `step`, or an error, or the deadline.
    async fn wait_for(&self, step: u64, done: impl Fn(&Progress) -> bool) -> Result<(), String> {
        let wait = async {
            loop {
                let notified = self.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                {
                    let p = lock(&self.progress);
                    if p.step > step {
                        return Err(format!("step {step} was replaced by step {}", p.step));
                    }
                    if p.step == step {
                        if let Some(e) = &p.error {
                            return Err(e.clone());
                        }
                        if done(&p) {
                            return Ok(());
                        }
                    }
                }
                notified.await;
            }
        };
        tokio::time::timeout(STEP_DEADLINE, wait)
            .await
            .map_err(|_| {
                format!(
                    "step {step} did not complete within {} s",
                    STEP_DEADLINE.as_secs()
                )
            })?
    }
}

/// The training service of one node.
#[derive(Debug)]
pub(crate) struct TrainService {
    pub(super) engine: Arc<ShardEngine>,
    pub(super) endpoint: Endpoint,
    model_id: String,
    pub(super) policy: TrainPolicy,
    pub(super) conns: Connections,
    jobs: Mutex<HashMap<u64, Arc<Job>>>,
    /// The job holding each target's lease (`None`: the slice's own weights).
    pub(super) leases: Mutex<HashMap<Option<String>, u64>>,
    /// Decided steps, by (job, step count after the step).
    pub(super) outcomes: Mutex<HashMap<(u64, u64), Outcome>>,
    /// A prepared step found on disk at start, whose outcome this node does not know yet.
    in_doubt: Mutex<Option<PreparedRecord>>,
    /// Held while the in-doubt step is being resolved: the start-up task and a `Begin` may
    /// both try, and only one may decide (the other then finds nothing in doubt).
    resolving: tokio::sync::Mutex<()>,
    read_deadline: Duration,
    pub(crate) counters: TrainCounters,
    /// Woken when a served version changes (a commit, a new adapter): the node announces at
    /// once, so routes for an adapter see it without waiting for the next period.
    pub(crate) versions_changed: tokio::sync::Notify,
    /// Bounds the adapter states sent at once.
    adapter_sends: tokio::sync::Semaphore,
    /// Adapter fetches that failed, not tried again (a peer that cannot prove its state).
    pub(super) failed_syncs: Mutex<HashMap<super::sync::SyncPlan, u32>>,
    /// Held while syncing adapters: one sync pass at a time.
    pub(super) syncing: tokio::sync::Mutex<()>,
}

/// The micro-batch's id in the engine's pending forwards.
fn micro_id(step: u64, micro: u32) -> u64 {
    (step << 12) | micro as u64
}

/// What a forward produced.
enum Forwarded {
    /// Hidden states for the next hop.
    Hidden(Tensor),
    /// The last hop went backward at once: the loss and the gradient for the previous hop.
    Backward {
        loss: Option<f32>,
        grad: Option<Tensor>,
    },
}

impl TrainService {
    pub(crate) fn new(
        engine: Arc<ShardEngine>,
        endpoint: Endpoint,
        model_id: String,
        policy: TrainPolicy,
        read_deadline: Duration,
    ) -> Arc<Self> {
        Arc::new(TrainService {
            engine,
            endpoint,
            model_id,
            policy,
            conns: Connections::for_alpn(TRAIN_ALPN),
            jobs: Mutex::default(),
            leases: Mutex::default(),
            outcomes: Mutex::default(),
            in_doubt: Mutex::default(),
            resolving: tokio::sync::Mutex::new(()),
            read_deadline,
            counters: TrainCounters::default(),
            versions_changed: tokio::sync::Notify::new(),
            adapter_sends: tokio::sync::Semaphore::new(ADAPTER_SENDS),
            failed_syncs: Mutex::default(),
            syncing: tokio::sync::Mutex::new(()),
        })
    }

    /// Loads the slice and the adapters checkpointed in the policy's directory (a restart goes on from the
    /// last committed step), the decisions it knew, and a prepared step left in doubt.
    /// Returns the adapters' names.
    pub(crate) fn restore(&self) -> crate::Result<Vec<String>> {
        let Some(dir) = &self.policy.checkpoint else {
            return Ok(Vec::new());
        };
        let mut names = Vec::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
            Err(e) => {
                return Err(crate::Error::Training(format!(
                    "cannot read checkpoint directory {}: {e}",
                    dir.display()
                )))
            }
        };
        if ShardEngine::has_slice_checkpoint(dir) {
            let version = self.engine.load_slice(dir)?;
            tracing::info!("restored the slice's trained weights {version} from the checkpoint");
        }
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().to_string();
            if let Some(name) = file.strip_suffix(".lora.json") {
                self.engine.load_adapter(name, dir)?;
                names.push(name.to_string());
            }
        }
        names.sort();
        lock(&self.outcomes).extend(durable::load_decisions(dir)?);
        if let Some((record, tensors)) = durable::load_prepared(dir)? {
            let key = (record.job, record.version.steps);
            let decided = matches!(
                lock(&self.outcomes).get(&key),
                Some(Outcome::Committed(_) | Outcome::Aborted)
            );
            if decided {
                // Decided before the crash, the files not yet cleared.
                durable::clear_prepared(dir);
            } else {
                match self.engine.import_prepared(tensors, record.version.clone()) {
                    Ok(()) => {
                        tracing::warn!(
                            "restarted in doubt: step {} was prepared and not decided; asking \
                             the route's other hops",
                            record.version
                        );
                        lock(&self.outcomes).insert(key, Outcome::InDoubt);
                        *lock(&self.in_doubt) = Some(record);
                    }
                    // The checkpoint moved past it: it was committed and saved.
                    Err(e) => {
                        tracing::info!("dropped a stale prepared step: {e}");
                        durable::clear_prepared(dir);
                    }
                }
            }
        }
        Ok(names)
    }

    /// Asks the other hops of an in-doubt step's route for its outcome, until one knows it or
    /// `patience` passes: a certificate commits it; an abort, or a hop that never prepared it
    /// (which then never will), aborts it. While every hop is in doubt too, the trainer
    /// decides ([`super::Trainer::resolve_in_doubt`]).
    pub(crate) async fn resolve_from_peers(self: Arc<Self>, patience: Duration) {
        let _one_at_a_time = self.resolving.lock().await;
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let Some(record) = lock(&self.in_doubt).clone() else {
                return;
            };
            let me = self.endpoint.id();
            let ask = TrainMessage::GetOutcome {
                job: record.job,
                step: record.version.steps,
            };
            let others: Vec<_> = record.route.iter().filter(|h| h.node != me).collect();
            let mut in_doubt = 0;
            for hop in &others {
                let reply = tokio::time::timeout(Duration::from_secs(3), async {
                    let (conn, _) = self
                        .conns
                        .get_or_dial_patiently(&self.endpoint, hop.node, &hop.addrs)
                        .await
                        .map_err(|e| e.to_string())?;
                    request(&conn, &ask).await
                })
                .await;
                let decided = match reply {
                    Ok(Ok(TrainMessage::Outcome(Outcome::Committed(signed)))) => {
                        self.commit_in_doubt(&record, signed)
                    }
                    Ok(Ok(TrainMessage::Outcome(Outcome::Aborted | Outcome::Unknown))) => {
                        self.abort_in_doubt(&record)
                    }
                    Ok(Ok(TrainMessage::Outcome(Outcome::InDoubt))) => {
                        in_doubt += 1;
                        continue;
                    }
                    _ => continue,
                };
                match decided {
                    Ok(what) => tracing::info!("in-doubt step {}: {what}", record.version),
                    Err(e) => tracing::warn!("in-doubt step {}: {e}", record.version),
                }
                return;
            }
            if in_doubt == others.len() || tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Commits the in-doubt step on a certificate a peer showed.
    fn commit_in_doubt(
        &self,
        record: &PreparedRecord,
        signed: SignedCommit,
    ) -> Result<String, String> {
        let cert = signed.verify(&record.trainer).map_err(|e| e.to_string())?;
        if cert.version_of(&self.endpoint.id()) != Some(&record.version) {
            return Err("the certificate names another version for this node".into());
        }
        let key = (cert.job, record.version.steps);
        let version = self.finish_commit(record.version.adapter.as_deref(), key, signed)?;
        Ok(format!("committed {version} on a peer's certificate"))
    }

    /// Aborts the in-doubt step.
    fn abort_in_doubt(&self, record: &PreparedRecord) -> Result<String, String> {
        self.finish_abort((record.job, record.version.steps))?;
        Ok("aborted: the route's other hops did not commit it".into())
    }

    /// Installs the prepared step under certificate `signed`, saves the checkpoint and the
    /// decision, and forgets the prepared files.
    fn finish_commit(
        &self,
        adapter: Option<&str>,
        key: (u64, u64),
        signed: SignedCommit,
    ) -> Result<crate::engine::TrainedVersion, String> {
        let prepared = self
            .engine
            .prepared_version()
            .map_err(|e| e.to_string())?
            .ok_or("no prepared step to commit")?;
        let version = self
            .engine
            .commit_prepared(&prepared.state)
            .map_err(|e| e.to_string())?;
        let outcome = Outcome::Committed(signed);
        lock(&self.outcomes).insert(key, outcome.clone());
        *lock(&self.in_doubt) = None;
        self.counters.commits.fetch_add(1, Ordering::Relaxed);
        self.versions_changed.notify_one();
        if let Some(dir) = &self.policy.checkpoint {
            let saved = match adapter {
                Some(name) => self.engine.save_adapter(name, dir),
                None => self.engine.save_slice(dir),
            };
            saved.map_err(|e| format!("committed {version}, but saving it failed: {e}"))?;
            durable::save_decision(dir, key, &outcome).map_err(|e| e.to_string())?;
            durable::clear_prepared(dir);
        }
        Ok(version)
    }

    /// Drops the prepared step and the gradients, and records the abort of `key`.
    fn finish_abort(&self, key: (u64, u64)) -> Result<(), String> {
        self.engine.abort_prepared().map_err(|e| e.to_string())?;
        self.engine.zero_grad().map_err(|e| e.to_string())?;
        lock(&self.outcomes).insert(key, Outcome::Aborted);
        *lock(&self.in_doubt) = None;
        self.counters.aborts.fetch_add(1, Ordering::Relaxed);
        if let Some(dir) = &self.policy.checkpoint {
            durable::clear_prepared(dir);
            durable::save_decision(dir, key, &Outcome::Aborted).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn job(&self, job: u64) -> Result<Arc<Job>, String> {
        lock(&self.jobs)
            .get(&job)
            .cloned()
            .ok_or_else(|| format!("no training job {job} on this node"))
    }

    /// Whether this node allows any trainer (only then can it train, or adopt a synced
    /// adapter: only a trainer it allows can certify one).
    pub(crate) fn allows_trainers(&self) -> bool {
        !self.policy.trainers.is_empty()
    }

    /// Whether `remote` may open streams here: an allowed trainer, or a member of a job's
    /// route.
    fn knows(&self, remote: &NodeId) -> bool {
        self.policy.trainers.contains(remote)
            || lock(&self.jobs)
                .values()
                .any(|j| j.spec.route.iter().any(|h| h.node == *remote))
    }

    async fn serve_connection(self: Arc<Self>, conn: Connection) {
        let remote = conn.remote_id();
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS_PER_CONNECTION));
        loop {
            tokio::select! {
                bi = conn.accept_bi() => match bi {
                    Ok((send, recv)) => {
                        let Ok(permit) = slots.clone().try_acquire_owned() else { continue };
                        let me = self.clone();
                        tokio::spawn(async move {
                            me.serve_request(remote, send, recv).await;
                            drop(permit);
                        });
                    }
                    Err(_) => break,
                },
                uni = conn.accept_uni() => match uni {
                    // Data streams only from trainers and the routes' hops.
                    Ok(mut recv) if !self.knows(&remote) => {
                        let _ = recv.stop(1u32.into());
                    }
                    Ok(recv) => {
                        let Ok(permit) = slots.clone().try_acquire_owned() else { continue };
                        let me = self.clone();
                        tokio::spawn(async move {
                            me.serve_data(remote, recv).await;
                            drop(permit);
                        });
                    }
                    Err(_) => break,
                },
            }
        }
    }

    pub(super) fn error(&self, message: impl Into<String>) -> TrainMessage {
        TrainMessage::Error {
            hop: self.endpoint.id(),
            message: message.into(),
        }
    }

    async fn serve_request(
        self: Arc<Self>,
        remote: NodeId,
        mut send: SendStream,
        mut recv: RecvStream,
    ) {
        let request = tokio::time::timeout(
            self.read_deadline,
            read_postcard::<_, TrainMessage>(&mut recv, MAX_CONTROL),
        )
        .await;
        let reply = match request {
            // Any node of the swarm may ask what became of a step, or for an adapter's state
            // (a replica syncing it); the rest is for trainers and the routes' hops.
            Ok(Ok(msg))
                if !matches!(
                    msg,
                    TrainMessage::GetOutcome { .. } | TrainMessage::GetAdapter { .. }
                ) && !self.knows(&remote) =>
            {
                self.error(NOT_KNOWN)
            }
            Ok(Ok(TrainMessage::GetAdapter { name })) => {
                match self.adapter_sends.try_acquire() {
                    Ok(_permit) => self.send_adapter(&name, &mut send).await,
                    Err(_) => {
                        let busy = self.error("busy sending adapters; ask again later");
                        let _ = write_postcard(&mut send, &busy).await;
                    }
                }
                let _ = send.finish();
                return;
            }
            Ok(Ok(TrainMessage::GetGradients { job })) => {
                // The only reply with frames after it.
                self.send_gradients(remote, job, &mut send).await;
                let _ = send.finish();
                return;
            }
            Ok(Ok(msg)) => {
                let what = msg.kind();
                let reply = self.handle_request(remote, msg).await;
                if let TrainMessage::Error { message, .. } = &reply {
                    tracing::warn!(peer = %remote.fmt_short(), request = what, "training request refused: {message}");
                }
                reply
            }
            Ok(Err(e)) => self.error(format!("unreadable request: {e}")),
            Err(_) => self.error("request not received in time"),
        };
        let _ = tokio::time::timeout(self.read_deadline, write_postcard(&mut send, &reply)).await;
        let _ = send.finish();
    }

    async fn handle_request(self: &Arc<Self>, remote: NodeId, msg: TrainMessage) -> TrainMessage {
        let result = match msg {
            TrainMessage::Begin(spec) => self.begin(remote, spec).await,
            TrainMessage::Sync { job, step } => self.sync(remote, job, step).await,
            TrainMessage::Prepare { job, step } => self.prepare(remote, job, step).await,
            TrainMessage::Commit(signed) => self.commit(remote, signed).await,
            TrainMessage::Abort { job, step } => self.abort(remote, job, step),
            TrainMessage::GetOutcome { job, step } => {
                Ok(TrainMessage::Outcome(self.outcome(job, step)))
            }
            TrainMessage::End { job } => self.end(remote, job),
            other => Err(format!("unexpected training request `{}`", other.kind())),
        };
        result.unwrap_or_else(|e| self.error(e))
    }

    /// The job `job`, when `remote` is its trainer.
    fn trainer_job(&self, remote: NodeId, job: u64) -> Result<Arc<Job>, String> {
        let j = self.job(job)?;
        if j.trainer != remote {
            return Err(format!("job {job} belongs to another trainer"));
        }
        Ok(j)
    }

    async fn begin(
        self: &Arc<Self>,
        remote: NodeId,
        spec: JobSpec,
    ) -> Result<TrainMessage, String> {
        if !self.policy.trainers.contains(&remote) {
            return Err(format!(
                "trainer {} is not allowed here: start the node with --trainer {remote} to allow it",
                remote.fmt_short()
            ));
        }
        if spec.model_id != self.model_id {
            return Err(format!(
                "this node serves model {}, not {}",
                self.model_id, spec.model_id
            ));
        }
        let me = self.endpoint.id();
        let index = spec
            .route
            .iter()
            .position(|h| h.node == me)
            .ok_or("this node is not on the job's route")?;
        let layers = self.engine.layers();
        let mine = &spec.route[index].layers;
        if mine.start as usize != layers.start || mine.end as usize != layers.end {
            return Err(format!(
                "training runs whole slices: this node holds layers {layers:?}, the route gives it {mine:?}"
            ));
        }
        let layer_count = self.engine.config().num_layers as u32;
        let contiguous = spec
            .route
            .windows(2)
            .all(|w| w[0].layers.end == w[1].layers.start);
        if spec.route.first().map(|h| h.layers.start) != Some(0)
            || spec.route.last().map(|h| h.layers.end) != Some(layer_count)
            || !contiguous
        {
            return Err(format!(
                "the route does not cover layers 0..{layer_count} in order"
            ));
        }
        let target = spec.target.adapter().map(str::to_string);
        match &spec.target {
            TrainTarget::Full => self
                .engine
                .check_full_training()
                .map_err(|e| e.to_string())?,
            TrainTarget::Adapter { name, config } => match self.engine.adapter(name) {
                Some(held) if held.config() != config => {
                    return Err(format!(
                        "adapter `{name}` exists here with another shape ({:?})",
                        held.config()
                    ))
                }
                Some(_) => {}
                None => {
                    self.engine
                        .create_adapter(name, config.clone())
                        .map_err(|e| e.to_string())?;
                    self.versions_changed.notify_one();
                    // Step 0 on disk too: a step prepared before the first commit can then
                    // be taken back after a restart.
                    if let Some(dir) = &self.policy.checkpoint {
                        self.engine
                            .save_adapter(name, dir)
                            .map_err(|e| e.to_string())?;
                    }
                }
            },
        }
        {
            let mut leases = lock(&self.leases);
            let mut jobs = lock(&self.jobs);
            if let Some(held) = leases.get(&target).copied() {
                if held == super::sync::SYNC_LEASE {
                    return Err(format!(
                        "{} is being synced from a peer; begin again in a moment",
                        target_label(&target)
                    ));
                }
                match jobs.get(&held) {
                    Some(old) if old.trainer != remote => {
                        return Err(format!(
                            "{} is being trained by {} (job {held}); one trainer at a time",
                            target_label(&target),
                            old.trainer.fmt_short()
                        ))
                    }
                    // The same trainer starting over takes its lease back.
                    _ => {
                        jobs.remove(&held);
                    }
                }
            }
            leases.insert(target.clone(), spec.job);
            jobs.insert(
                spec.job,
                Arc::new(Job {
                    trainer: remote,
                    index,
                    spec,
                    compute: tokio::sync::Mutex::new(()),
                    progress: Mutex::default(),
                    tied_in: Mutex::default(),
                    changed: tokio::sync::Notify::new(),
                }),
            );
        }
        // Connections to the route's hops are kept across jobs: a closed one is never reused
        // (`Connections::get`), and retiring live ones at every job would pile them up until
        // the peer's per-peer connection cap refuses the next dial (a relay then stalls).
        // Whatever an earlier job left pending is dropped; a prepared step stays (in doubt),
        // unless the route's other hops know its outcome.
        self.engine.zero_grad().map_err(|e| e.to_string())?;
        if lock(&self.in_doubt).is_some() {
            self.clone()
                .resolve_from_peers(Duration::from_secs(5))
                .await;
        }
        Ok(TrainMessage::Begun {
            version: self
                .engine
                .trained_version(target.as_deref())
                .map_err(|e| e.to_string())?,
            in_doubt: self.engine.prepared_version().map_err(|e| e.to_string())?,
        })
    }

    async fn sync(&self, remote: NodeId, job: u64, step: u64) -> Result<TrainMessage, String> {
        let j = self.trainer_job(remote, job)?;
        j.wait_for(step, |p| p.complete).await?;
        let p = lock(&j.progress);
        Ok(TrainMessage::Accumulated {
            loss_sum: p.loss_sum,
            losses: p.losses,
        })
    }

    async fn prepare(&self, remote: NodeId, job: u64, step: u64) -> Result<TrainMessage, String> {
        let j = self.trainer_job(remote, job)?;
        j.wait_for(step, |p| p.complete).await?;
        let next = self
            .engine
            .trained_version(j.spec.target.adapter())
            .map_err(|e| e.to_string())?
            .steps
            + 1;
        if let Some(o @ (Outcome::Aborted | Outcome::Committed(_))) =
            lock(&self.outcomes).get(&(job, next))
        {
            return Err(format!(
                "step {next} of job {job} was decided already ({o:?})"
            ));
        }
        let engine = self.engine.clone();
        let adamw = j.spec.adamw;
        let _compute = j.compute.lock().await;
        let version = tokio::task::spawn_blocking(move || engine.prepare_step(&adamw))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        if let Some(dir) = &self.policy.checkpoint {
            let saved = self
                .engine
                .export_prepared()
                .map_err(|e| e.to_string())
                .and_then(|p| {
                    let (tensors, _) = p.ok_or("the prepared step vanished")?;
                    let record = PreparedRecord {
                        job,
                        trainer: j.trainer,
                        route: j.spec.route.clone(),
                        version: version.clone(),
                    };
                    durable::save_prepared(dir, &record, &tensors).map_err(|e| e.to_string())
                });
            if let Err(e) = saved {
                let _ = self.engine.abort_prepared();
                return Err(format!("could not keep the prepared step: {e}"));
            }
        }
        lock(&self.outcomes).insert((job, version.steps), Outcome::InDoubt);
        Ok(TrainMessage::Prepared(version))
    }

    async fn commit(&self, remote: NodeId, signed: SignedCommit) -> Result<TrainMessage, String> {
        let cert = signed.verify(&remote).map_err(|e| e.to_string())?;
        let j = self.trainer_job(remote, cert.job)?;
        let me = self.endpoint.id();
        let named = cert
            .version_of(&me)
            .ok_or("the commit certificate does not name this node")?
            .clone();
        let current = self
            .engine
            .trained_version(j.spec.target.adapter())
            .map_err(|e| e.to_string())?;
        if current == named {
            // A retried commit: already done.
            return Ok(TrainMessage::Committed(current));
        }
        let prepared = self.engine.prepared_version().map_err(|e| e.to_string())?;
        if prepared.as_ref() != Some(&named) {
            return Err(format!(
                "the certificate names {named} for this node, which prepared {}",
                prepared.map_or("nothing".to_string(), |p| p.to_string())
            ));
        }
        let version =
            self.finish_commit(j.spec.target.adapter(), (cert.job, named.steps), signed)?;
        Ok(TrainMessage::Committed(version))
    }

    fn abort(&self, remote: NodeId, job: u64, step: u64) -> Result<TrainMessage, String> {
        let j = self.trainer_job(remote, job)?;
        let next = self
            .engine
            .prepared_version()
            .map_err(|e| e.to_string())?
            .map(|v| v.steps);
        match next {
            Some(steps) => self.finish_abort((job, steps))?,
            None => self.engine.zero_grad().map_err(|e| e.to_string())?,
        }
        j.fail(step, format!("step {step} was aborted"));
        Ok(TrainMessage::Ok)
    }

    /// What this hop knows of step count `step` of `job`. A step it never prepared is
    /// marked aborted here, so it never prepares it later: the asker may abort on this answer.
    fn outcome(&self, job: u64, step: u64) -> Outcome {
        lock(&self.outcomes)
            .entry((job, step))
            .or_insert(Outcome::Aborted)
            .clone()
    }

    fn end(&self, remote: NodeId, job: u64) -> Result<TrainMessage, String> {
        let j = self.trainer_job(remote, job)?;
        lock(&self.jobs).remove(&job);
        let target = j.spec.target.adapter().map(str::to_string);
        let mut leases = lock(&self.leases);
        if leases.get(&target) == Some(&job) {
            leases.remove(&target);
        }
        drop(leases);
        self.engine.zero_grad().map_err(|e| e.to_string())?;
        Ok(TrainMessage::Ok)
    }

    async fn send_gradients(&self, remote: NodeId, job: u64, send: &mut SendStream) {
        let grads = match self
            .trainer_job(remote, job)
            .and_then(|_| self.engine.gradients().map_err(|e| e.to_string()))
        {
            Ok(g) => g,
            Err(e) => {
                let _ = write_postcard(send, &self.error(e)).await;
                return;
            }
        };
        let names = grads.iter().map(|(n, _)| n.clone()).collect();
        if write_postcard(send, &TrainMessage::Gradients(names))
            .await
            .is_err()
        {
            return;
        }
        write_f32_frames(send, job, grads).await;
    }

    /// Serves one data stream: a forward, backward or tied-gradient message and its frame.
    async fn serve_data(self: Arc<Self>, remote: NodeId, mut recv: RecvStream) {
        let msg = tokio::time::timeout(
            self.read_deadline,
            read_postcard::<_, TrainMessage>(&mut recv, MAX_CONTROL),
        )
        .await;
        let msg = match msg {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                tracing::debug!(peer = %remote.fmt_short(), "unreadable training data: {e}");
                return;
            }
            Err(_) => return,
        };
        let (job, step) = match &msg {
            TrainMessage::Tokens { job, step, .. }
            | TrainMessage::Hidden { job, step, .. }
            | TrainMessage::Grad { job, step, .. }
            | TrainMessage::TiedGrad { job, step, .. } => (*job, *step),
            other => {
                tracing::debug!(peer = %remote.fmt_short(), "unexpected training data `{}`", other.kind());
                return;
            }
        };
        let Ok(j) = self.job(job) else {
            tracing::debug!(peer = %remote.fmt_short(), "training data for unknown job {job}");
            return;
        };
        if let Err(e) = self.clone().handle_data(&j, remote, msg, &mut recv).await {
            tracing::warn!(peer = %remote.fmt_short(), job, step, "training step failed: {e}");
            j.fail(step, format!("hop {}: {e}", self.endpoint.id().fmt_short()));
        }
    }

    async fn handle_data(
        self: Arc<Self>,
        j: &Arc<Job>,
        remote: NodeId,
        msg: TrainMessage,
        recv: &mut RecvStream,
    ) -> Result<(), String> {
        let route = &j.spec.route;
        match msg {
            TrainMessage::Tokens {
                step,
                micro,
                micros,
                batch,
                ids,
                ..
            } => {
                if remote != j.trainer || !j.is_first() {
                    return Err("tokens come from the trainer, to the first hop".into());
                }
                j.enter(step, Some(micros))?;
                self.forward(j, step, micro, batch, ids, None).await
            }
            TrainMessage::Hidden {
                step,
                micro,
                micros,
                batch,
                ids,
                ..
            } => {
                if j.is_first() || remote != route[j.index - 1].node {
                    return Err(format!(
                        "hidden states from {}, not from the previous hop",
                        remote.fmt_short()
                    ));
                }
                j.enter(step, Some(micros))?;
                let hidden = read_tensor(recv, DEFAULT_MAX_FRAME).await?;
                self.forward(j, step, micro, batch, ids, Some(hidden)).await
            }
            TrainMessage::Grad { step, micro, .. } => {
                if j.is_last() || remote != route[j.index + 1].node {
                    return Err(format!(
                        "a gradient from {}, not from the next hop",
                        remote.fmt_short()
                    ));
                }
                j.enter(step, None)?;
                let grad = read_tensor(recv, DEFAULT_MAX_FRAME).await?;
                let engine = self.engine.clone();
                let id = micro_id(step, micro);
                let guard = j.compute.lock().await;
                let out = tokio::task::spawn_blocking(move || {
                    engine.backward(id, OutputGrad::Output(grad))
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
                drop(guard);
                self.counters.backwards.fetch_add(1, Ordering::Relaxed);
                if let Some(g) = out.grad_input {
                    self.send_to(
                        j,
                        j.index - 1,
                        TrainMessage::Grad {
                            job: j.spec.job,
                            step,
                            micro,
                        },
                        Some(&g),
                    )
                    .await?;
                }
                self.micro_done(j, step, None).await
            }
            TrainMessage::TiedGrad { step, name, .. } => {
                let other = if j.is_first() { route.len() - 1 } else { 0 };
                if route.len() < 2 || remote != route[other].node || !(j.is_first() || j.is_last())
                {
                    return Err(
                        "a tied gradient from a node that is not the other end of the route".into(),
                    );
                }
                if self.engine.tied_half().as_deref() != Some(name.as_str()) {
                    return Err(format!("this slice holds no half of a tied `{name}`"));
                }
                let half = read_tensor(recv, MAX_TIED_FRAME).await?;
                lock(&j.tied_in).insert(step, half);
                j.changed.notify_waiters();
                Ok(())
            }
            other => Err(format!("unexpected `{}`", other.kind())),
        }
    }

    /// Runs micro-batch `micro`'s forward (and on the last hop its backward) and relays the
    /// result.
    async fn forward(
        self: &Arc<Self>,
        j: &Arc<Job>,
        step: u64,
        micro: u32,
        batch: u32,
        ids: Vec<u32>,
        hidden: Option<Tensor>,
    ) -> Result<(), String> {
        let batch_n = batch as usize;
        if batch_n == 0
            || ids.is_empty()
            || ids.len() % batch_n != 0
            || ids.len() > MAX_MICRO_POSITIONS
        {
            return Err(format!(
                "{} token ids do not make {batch} sequences (at most {MAX_MICRO_POSITIONS} ids)",
                ids.len()
            ));
        }
        let seq = ids.len() / batch_n;
        let labels = Tensor::from_vec(ids.clone(), (batch_n, seq), &Device::Cpu)
            .map_err(|e| e.to_string())?;
        let input = match hidden {
            Some(h) => ShardInput::Hidden(
                h.to_dtype(candle_core::DType::F32)
                    .map_err(|e| e.to_string())?,
            ),
            None => ShardInput::Tokens(labels.clone()),
        };
        let engine = self.engine.clone();
        let adapter = j.spec.target.adapter().map(str::to_string);
        let last = j.is_last();
        let id = micro_id(step, micro);
        let guard = j.compute.lock().await;
        // Micro-batches wait here for their backward: bound what their graphs hold.
        let budget = self.policy.memory_budget.unwrap_or(DEFAULT_TRAIN_MEMORY);
        let needed = self.engine.train_activation_bytes(batch_n, seq);
        let (held, _) = self
            .engine
            .pending_train_bytes()
            .map_err(|e| e.to_string())?;
        if held + needed > budget {
            return Err(format!(
                "training memory: micro-batch {micro} ({batch_n} x {seq} positions) needs about \
                 {needed} bytes with {held} held, over this node's budget of {budget} \
                 (--train-memory-mib); use shorter sequences or fewer micro-batches"
            ));
        }
        let out = tokio::task::spawn_blocking(move || -> crate::Result<Forwarded> {
            let out = match &adapter {
                Some(name) => engine.train_forward_adapter(id, input, name)?,
                None => engine.train_forward(id, input)?,
            };
            if last {
                let b = engine.backward(id, OutputGrad::CausalLmLabels(labels))?;
                return Ok(Forwarded::Backward {
                    loss: b.loss,
                    grad: b.grad_input,
                });
            }
            Ok(Forwarded::Hidden(out.tensor().clone()))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        drop(guard);
        self.counters.forwards.fetch_add(1, Ordering::Relaxed);
        let job = j.spec.job;
        match out {
            Forwarded::Hidden(h) => {
                let micros = lock(&j.progress).micros;
                let msg = TrainMessage::Hidden {
                    job,
                    step,
                    micro,
                    micros,
                    batch,
                    ids,
                };
                self.send_to(j, j.index + 1, msg, Some(&h)).await
            }
            Forwarded::Backward { loss, grad } => {
                self.counters.backwards.fetch_add(1, Ordering::Relaxed);
                if let (Some(g), false) = (grad, j.is_first()) {
                    self.send_to(
                        j,
                        j.index - 1,
                        TrainMessage::Grad { job, step, micro },
                        Some(&g),
                    )
                    .await?;
                }
                self.micro_done(j, step, loss).await
            }
        }
    }

    /// Counts one micro-batch's backward; after the step's last one, completes its gradients.
    async fn micro_done(
        self: &Arc<Self>,
        j: &Arc<Job>,
        step: u64,
        loss: Option<f32>,
    ) -> Result<(), String> {
        let micros = {
            let mut p = lock(&j.progress);
            if p.step != step {
                return Err(format!("step {step} ended before its backward did"));
            }
            p.backward_done += 1;
            if let Some(l) = loss {
                p.loss_sum += l as f64;
                p.losses += 1;
            }
            if p.backward_done < p.micros {
                return Ok(());
            }
            p.micros
        };
        self.complete(j, step, micros).await?;
        lock(&j.progress).complete = true;
        j.changed.notify_waiters();
        Ok(())
    }

    /// Averages the step's gradients over its micro-batches and adds the tied halves.
    async fn complete(
        self: &Arc<Self>,
        j: &Arc<Job>,
        step: u64,
        micros: u32,
    ) -> Result<(), String> {
        if micros > 1 {
            self.engine
                .scale_gradients(1.0 / micros as f64)
                .map_err(|e| e.to_string())?;
        }
        let Some(name) = self.engine.tied_half() else {
            return Ok(());
        };
        if j.spec.route.len() < 2 || j.spec.target != TrainTarget::Full {
            return Ok(());
        }
        let own = self
            .engine
            .gradients()
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, g)| g)
            .ok_or_else(|| format!("no gradient for the tied `{name}`"))?;
        let other = if j.is_first() {
            j.spec.route.len() - 1
        } else {
            0
        };
        let msg = TrainMessage::TiedGrad {
            job: j.spec.job,
            step,
            name: name.clone(),
        };
        self.send_to(j, other, msg, Some(&own)).await?;
        let their = {
            let wait = async {
                loop {
                    let notified = j.changed.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    if let Some(t) = lock(&j.tied_in).remove(&step) {
                        return t;
                    }
                    notified.await;
                }
            };
            tokio::time::timeout(STEP_DEADLINE, wait)
                .await
                .map_err(|_| format!("the other half of the tied `{name}` did not come"))?
        };
        // Both ends add in the same order (first hop's half + last hop's), so both copies of
        // the matrix get bit-identical gradients and updates.
        let sum = if j.is_first() {
            &own + &their
        } else {
            &their + &own
        }
        .map_err(|e| e.to_string())?;
        self.engine
            .set_gradient(&name, sum)
            .map_err(|e| e.to_string())
    }

    /// Sends `msg` (and `tensor` as a frame in the job's codec) to hop `index` of the route.
    async fn send_to(
        self: &Arc<Self>,
        j: &Job,
        index: usize,
        msg: TrainMessage,
        tensor: Option<&Tensor>,
    ) -> Result<(), String> {
        let hop = &j.spec.route[index];
        let frame = match tensor {
            Some(t) => {
                let codec = match msg {
                    // Tied halves travel exactly: both ends must add the same bits.
                    TrainMessage::TiedGrad { .. } => crate::Codec::F32,
                    _ => j.spec.codec,
                };
                let meta = FrameMeta {
                    session: j.spec.job,
                    position: 0,
                };
                Some(encode_frame(t, codec, meta, false).map_err(|e| e.to_string())?)
            }
            None => None,
        };
        let send = async {
            // Each side sends on connections it dialed and serves those it accepted, so a
            // dialed connection needs no serving loop.
            let (conn, _) = self
                .conns
                .get_or_dial_patiently(&self.endpoint, hop.node, &hop.addrs)
                .await
                .map_err(|e| e.to_string())?;
            send_uni(&conn, &msg, frame.as_deref())
                .await
                .map_err(|e| e.to_string())
        };
        tokio::time::timeout(STEP_DEADLINE, send)
            .await
            .map_err(|_| format!("sending to {} timed out", hop.node.fmt_short()))?
            .map_err(|e| format!("sending `{}` to {}: {e}", msg.kind(), hop.node.fmt_short()))
    }

    /// Counters for the node's stats.
    pub(crate) fn jobs_open(&self) -> usize {
        lock(&self.jobs).len()
    }
}

/// One request on a new bi stream of `conn`, one reply.
async fn request(conn: &Connection, msg: &TrainMessage) -> Result<TrainMessage, String> {
    request_on(conn, msg, MAX_CONTROL)
        .await
        .map_err(|e| e.to_string())
}

/// Writes `tensors` as exact f32 frames, in order (after a reply that names them); stops at
/// the first failure (the reader then misses frames and reports it).
pub(super) async fn write_f32_frames(
    send: &mut SendStream,
    job: u64,
    tensors: Vec<(String, Tensor)>,
) {
    for (_, t) in tensors {
        let Ok(frame) = encode_frame(
            &t,
            crate::Codec::F32,
            FrameMeta {
                session: job,
                position: 0,
            },
            false,
        ) else {
            return;
        };
        if tokio::io::AsyncWriteExt::write_all(send, &frame)
            .await
            .is_err()
        {
            return;
        }
    }
}

/// A training target in messages: `adapter `NAME`` or `the slice`.
fn target_label(target: &Option<String>) -> String {
    target
        .as_deref()
        .map_or("the slice".to_string(), |a| format!("adapter `{a}`"))
}

/// Reads one frame of at most `max` bytes as a tensor.
pub(super) async fn read_tensor(recv: &mut RecvStream, max: usize) -> Result<Tensor, String> {
    let frame = read_frame(recv, max).await.map_err(|e| e.to_string())?;
    frame.as_frame().to_tensor().map_err(|e| e.to_string())
}

/// The protocol handler the node's router runs for [`TRAIN_ALPN`].
#[derive(Debug, Clone)]
pub(crate) struct TrainProtocol(pub(crate) Arc<TrainService>);

impl ProtocolHandler for TrainProtocol {
    async fn accept(&self, connection: Connection) -> Result<(), AcceptError> {
        self.0.clone().serve_connection(connection).await;
        Ok(())
    }
}
