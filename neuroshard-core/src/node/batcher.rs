//! Decode batching on a node: one-position steps of different sessions run together through
//! [`ShardEngine::forward_batch`], which reads every weight once per batch and gives each
//! session the bits of its solo step.
//!
//! Continuous batching: a step that finds the engine idle runs at once, and steps that arrive
//! while a batch computes queue up and form the next batch together. On its own that splits
//! concurrent sessions into groups that alternate (8 sessions ran as two batches of ~4: the
//! first group's answers travel while the second computes), so a batch also waits, briefly,
//! for the sessions of the last two batches that have not stepped again yet: at most a quarter
//! of the last batch's compute time and [`MAX_GATHER`]. A lone session never waits (nothing
//! else is expected).
//!
//! Nodes of one process (an in-process swarm) share its cores. There, a small batch that
//! starts while another node's batch computes only slows that batch down, and the sessions it
//! expects are usually in that other batch: 8 sessions over 3 in-process nodes settled into
//! batches of 7 and 1 that chased each other round the route. So while any other batch of
//! the process computes, a batch holds on for its expected sessions (at most [`MAX_HOLD`]),
//! and the groups merge. Separate processes never hold: their nodes may be on separate
//! machines, where groups in different hops compute at the same time.

use crate::engine::{ForwardRequest, ShardEngine};
use crate::error::{Error, Result};
use crate::model::shard::ShardOutput;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Notify};

/// Most steps per batch (the engine's default session limit).
const MAX_BATCH: usize = 64;

/// The longest a batch waits for expected sessions.
const MAX_GATHER: Duration = Duration::from_millis(5);

/// The longest a batch holds on for expected sessions while another batch of this process
/// computes (one trip of the group it waits for round an in-process route).
const MAX_HOLD: Duration = Duration::from_millis(100);

/// Batches computing in this process now, over every node's batcher.
static COMPUTING: AtomicUsize = AtomicUsize::new(0);

/// Woken whenever a batch of this process starts or finishes computing.
static COMPUTE_CHANGED: Notify = Notify::const_new();

/// Counts one batch in [`COMPUTING`] while it lives.
struct Computing;

impl Computing {
    fn start() -> Self {
        COMPUTING.fetch_add(1, Ordering::SeqCst);
        COMPUTE_CHANGED.notify_waiters();
        Computing
    }
}

impl Drop for Computing {
    fn drop(&mut self) {
        COMPUTING.fetch_sub(1, Ordering::SeqCst);
        COMPUTE_CHANGED.notify_waiters();
    }
}

/// One queued step and where its result goes.
struct Job {
    req: ForwardRequest,
    reply: oneshot::Sender<Result<ShardOutput>>,
}

/// The queue in front of the engine's batched decode; the task serving it ends when this
/// handle is dropped.
#[derive(Debug)]
pub(super) struct DecodeBatcher {
    tx: mpsc::UnboundedSender<Job>,
}

impl DecodeBatcher {
    /// Starts the serving task on the current tokio runtime.
    pub(super) fn spawn(engine: Arc<ShardEngine>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(serve(engine, rx));
        DecodeBatcher { tx }
    }

    /// Runs `req` (a one-position step) in the next batch and waits for its result.
    pub(super) async fn run(&self, req: ForwardRequest) -> Result<ShardOutput> {
        let (reply, result) = oneshot::channel();
        self.tx
            .send(Job { req, reply })
            .map_err(|_| Error::Internal("the decode batcher has stopped".into()))?;
        result
            .await
            .map_err(|_| Error::Internal("the decode batcher dropped a step".into()))?
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("session", &self.req.session)
            .finish()
    }
}

/// Takes whatever is queued (at least one step), runs it as one batch on a blocking thread,
/// answers every step, repeats.
async fn serve(engine: Arc<ShardEngine>, mut rx: mpsc::UnboundedReceiver<Job>) {
    // Sessions of the last two batches, and how long the last batch computed.
    let (mut previous, mut last): (HashSet<u64>, HashSet<u64>) = Default::default();
    let mut last_compute = Duration::ZERO;
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        // Recent sessions that have not stepped again yet (and are still open).
        let mut missing: HashSet<u64> = previous.union(&last).copied().collect();
        for id in jobs.iter().filter_map(|j| j.req.session) {
            missing.remove(&id);
        }
        missing.retain(|&id| engine.session_len(id).is_ok());
        gather(
            &mut rx,
            &mut jobs,
            missing,
            (last_compute / 4).min(MAX_GATHER),
        )
        .await;
        previous = std::mem::take(&mut last);
        last = jobs.iter().filter_map(|j| j.req.session).collect();
        let started = Instant::now();
        let (reqs, replies): (Vec<ForwardRequest>, Vec<_>) =
            jobs.into_iter().map(|j| (j.req, j.reply)).unzip();
        let engine = engine.clone();
        let outs = tokio::task::spawn_blocking(move || {
            let _computing = Computing::start();
            engine.forward_batch(reqs)
        })
        .await;
        last_compute = started.elapsed();
        match outs {
            Ok(outs) => {
                for (reply, out) in replies.into_iter().zip(outs) {
                    // A step whose relay task is gone (its session closed) needs no answer.
                    let _ = reply.send(out);
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(Error::Internal(format!("decode batch failed: {e}"))));
                }
            }
        }
    }
}

/// Adds the `missing` sessions' steps to `jobs` as they arrive, for at most `window`. While
/// another batch of this process computes, it waits up to [`MAX_HOLD`] instead; after such a
/// batch starts or ends it keeps waiting at least [`MAX_GATHER`] more (within [`MAX_HOLD`]),
/// the time for that batch's answers to reach the next hop, which then computes them.
async fn gather(
    rx: &mut mpsc::UnboundedReceiver<Job>,
    jobs: &mut Vec<Job>,
    mut missing: HashSet<u64>,
    window: Duration,
) {
    let now = tokio::time::Instant::now();
    let (mut deadline, hold) = (now + window, now + MAX_HOLD);
    while !missing.is_empty() && jobs.len() < MAX_BATCH {
        // Registered before the count is read, so that a change in between is not missed.
        let changed = COMPUTE_CHANGED.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let others = COMPUTING.load(Ordering::SeqCst) > 0;
        let until = if others { hold.max(deadline) } else { deadline };
        tokio::select! {
            job = tokio::time::timeout_at(until, rx.recv()) => match job {
                Ok(Some(job)) => {
                    if let Some(id) = job.req.session {
                        missing.remove(&id);
                    }
                    jobs.push(job);
                }
                _ => return,
            },
            _ = &mut changed => {
                if others {
                    // Another batch started or ended: what it computed goes on to a hop.
                    deadline = deadline.max((tokio::time::Instant::now() + MAX_GATHER).min(hold));
                }
            }
        }
    }
}
