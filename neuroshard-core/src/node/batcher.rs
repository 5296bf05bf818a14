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

use crate::engine::{ForwardRequest, ShardEngine};
use crate::error::{Error, Result};
use crate::model::shard::ShardOutput;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Most steps per batch (the engine's default session limit).
const MAX_BATCH: usize = 64;

/// The longest a batch waits for expected sessions.
const MAX_GATHER: Duration = Duration::from_millis(5);

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
        // Recent sessions that have not stepped again yet.
        let mut missing: HashSet<u64> = previous.union(&last).copied().collect();
        for id in jobs.iter().filter_map(|j| j.req.session) {
            missing.remove(&id);
        }
        let deadline = tokio::time::Instant::now() + (last_compute / 4).min(MAX_GATHER);
        while !missing.is_empty() && jobs.len() < MAX_BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(job)) => {
                    if let Some(id) = job.req.session {
                        missing.remove(&id);
                    }
                    jobs.push(job);
                }
                _ => break,
            }
        }
        previous = std::mem::take(&mut last);
        last = jobs.iter().filter_map(|j| j.req.session).collect();
        let started = Instant::now();
        let (reqs, replies): (Vec<ForwardRequest>, Vec<_>) =
            jobs.into_iter().map(|j| (j.req, j.reply)).unzip();
        let engine = engine.clone();
        let outs = tokio::task::spawn_blocking(move || engine.forward_batch(reqs)).await;
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
