//! Runs one checked [`Job`] on the swarm: takes a kept conversation that shares the prompt's
//! prefix (or opens a session), generates on a blocking thread, and streams [`Event`]s to the
//! HTTP handler. A handler that goes away (the client disconnected) drops the receiver; the
//! next piece then fails to send, the generation stops, and its session is closed on every
//! hop instead of being kept.

use super::api::Job;
use super::conversations::SamplingWish;
use super::errors::ApiError;
use super::swarm_view::RouteRecord;
use super::State;
use crate::generate::{FinishReason, GenerationConfig, StopStrings};
use std::hash::{BuildHasher, Hasher};
use std::ops::ControlFlow;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tokio::sync::OwnedSemaphorePermit;

/// What the handler receives.
#[derive(Debug)]
pub(crate) enum Event {
    /// Generated text, final (stop strings already held back and cut).
    Text(String),
    /// The end: the whole result, or why it failed.
    Done(Result<Finished, ApiError>),
}

/// A finished generation.
#[derive(Debug, Clone)]
pub(crate) struct Finished {
    /// The whole text (cut before any stop string).
    pub(crate) text: String,
    /// OpenAI's `finish_reason`: `stop` or `length`.
    pub(crate) finish_reason: &'static str,
    pub(crate) prompt_tokens: usize,
    /// Prompt tokens a kept conversation already held (not computed again).
    pub(crate) cached_tokens: usize,
    pub(crate) completion_tokens: usize,
    /// Decode speed after the first token.
    pub(crate) tokens_per_sec: f64,
}

/// Starts `job` (holding `permit`, its generation slot, until it ends).
pub(crate) fn start(
    state: Arc<State>,
    job: Job,
    permit: OwnedSemaphorePermit,
) -> mpsc::UnboundedReceiver<Event> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let _permit = permit;
        let started = Instant::now();
        let metrics = &state.metrics;
        metrics.generations_active.fetch_add(1, Ordering::Relaxed);
        let result = run(&state, job, tx.clone(), started).await;
        metrics.generations_active.fetch_sub(1, Ordering::Relaxed);
        metrics.request_duration.observe(started.elapsed());
        if let Ok(done) = &result {
            metrics
                .prompt_tokens
                .fetch_add(done.prompt_tokens as u64, Ordering::Relaxed);
            metrics
                .cached_prompt_tokens
                .fetch_add(done.cached_tokens as u64, Ordering::Relaxed);
            metrics
                .completion_tokens
                .fetch_add(done.completion_tokens as u64, Ordering::Relaxed);
        }
        let _ = tx.send(Event::Done(result));
    });
    rx
}

/// A random seed for requests that name none.
fn random_seed() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

async fn run(
    state: &Arc<State>,
    job: Job,
    tx: mpsc::UnboundedSender<Event>,
    started: Instant,
) -> Result<Finished, ApiError> {
    let wish = SamplingWish {
        temperature: job.temperature,
        top_p: job.top_p,
        seed: job.seed,
    };
    let mut conversation = match state.conversations.take(&job.prompt, &wish) {
        Some(c) => {
            state
                .metrics
                .conversations_reused
                .fetch_add(1, Ordering::Relaxed);
            c
        }
        None => {
            let c = state
                .swarm
                .open_conversation(wish.params(random_seed()))
                .await
                .map_err(ApiError::from_generation)?;
            state
                .metrics
                .sessions_opened
                .fetch_add(1, Ordering::Relaxed);
            c
        }
    };
    let config = GenerationConfig {
        max_tokens: job.max_tokens,
        sampling: *conversation.sampling(),
        stop_tokens: Vec::new(),
        ignore_eos: false,
    };
    *crate::net::lock(&state.route) = Some(RouteRecord {
        hops: conversation.route(),
        active: true,
        tokens_per_sec: 0.0,
        replicas: conversation.replicas(),
        votes: conversation.votes(),
    });
    let deadline = started + state.options.request_timeout;
    let failovers_before = conversation.recovery().failovers;
    let worker_state = state.clone();
    let (conversation, result) = tokio::task::spawn_blocking(move || {
        let metrics = &worker_state.metrics;
        let mut stops = StopStrings::new(job.stop.iter().cloned());
        let mut last_piece: Option<Instant> = None;
        let mut hit_stop = false;
        let mut timed_out = false;
        let mut on_text = |piece: &str| {
            let (text, stop) = stops.push(piece);
            if !text.is_empty() {
                let now = Instant::now();
                match last_piece {
                    None => metrics.time_to_first_token.observe(now - started),
                    Some(t) => metrics.token_interval.observe(now - t),
                }
                last_piece = Some(now);
                if tx.send(Event::Text(text)).is_err() {
                    return ControlFlow::Break(());
                }
            }
            hit_stop |= stop;
            timed_out = Instant::now() > deadline;
            if stop || timed_out {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        let out = conversation.generate(&job.prompt, &config, &mut on_text);
        let result = out.map(|out| {
            let stop_at = job
                .stop
                .iter()
                .filter_map(|s| out.text.find(s.as_str()))
                .min();
            let mut text = out.text.clone();
            if let Some(at) = stop_at {
                text.truncate(at);
            } else {
                let tail = stops.finish();
                if !tail.is_empty() {
                    let _ = tx.send(Event::Text(tail));
                }
            }
            let finish_reason = match (stop_at.is_some() || hit_stop, out.finish) {
                (true, _) | (false, FinishReason::Stop) => "stop",
                _ => "length",
            };
            Finished {
                text,
                finish_reason,
                prompt_tokens: out.prompt_tokens,
                cached_tokens: out.cached_prompt_tokens,
                completion_tokens: out.tokens.len(),
                tokens_per_sec: out.decode_tokens_per_sec(),
            }
        });
        if tx.is_closed() {
            // The client went away: free the session on every hop now.
            metrics.disconnects.fetch_add(1, Ordering::Relaxed);
            conversation.close();
        }
        if timed_out {
            tracing_note(&format!(
                "request stopped at the {:?} time limit",
                worker_state.options.request_timeout
            ));
        }
        (conversation, result)
    })
    .await
    .map_err(|e| ApiError::internal(format!("generation task failed: {e}")))?;
    state.metrics.failovers.fetch_add(
        conversation.recovery().failovers - failovers_before,
        Ordering::Relaxed,
    );
    *crate::net::lock(&state.route) = Some(RouteRecord {
        hops: conversation.route(),
        active: false,
        tokens_per_sec: result.as_ref().map(|r| r.tokens_per_sec).unwrap_or(0.0),
        replicas: conversation.replicas(),
        votes: conversation.votes(),
    });
    let result = result.map_err(ApiError::from_generation)?;
    if conversation.id().is_some() {
        let route = conversation.route();
        // Evicted conversations close their sessions in the background when dropped.
        drop(state.conversations.put(conversation));
        observe_hops(state.clone(), route);
    }
    Ok(result)
}

/// Server log lines go to stderr, like the CLI's progress output.
fn tracing_note(message: &str) {
    eprintln!("neuroshard serve: {message}");
}

/// Records each hop's compute time per step since the last look, from the nodes' counters
/// (in the background: the answer does not wait for it).
fn observe_hops(state: Arc<State>, route: Vec<crate::net::RouteHop>) {
    tokio::spawn(async move {
        let Ok(peers) = state.swarm.peer_set(&[]).await else {
            return;
        };
        let infos = peers.infos(crate::net::now_ms());
        for hop in route {
            let id = hop.node.to_string();
            let Some(info) = infos.iter().find(|p| p.id == id) else {
                continue;
            };
            let Ok(addrs) =
                crate::swarm_session::resolve_peers(std::slice::from_ref(&info.address)).await
            else {
                continue;
            };
            let Some(addr) = addrs.first() else { continue };
            let fetch = state.swarm.client().fetch_stats(addr);
            let Ok(Ok(stats)) =
                tokio::time::timeout(std::time::Duration::from_secs(2), fetch).await
            else {
                continue;
            };
            let label = format!(
                "node=\"{}\",layers=\"{}-{}\"",
                &id[..id.len().min(16)],
                hop.layers.start,
                hop.layers.end
            );
            state
                .metrics
                .hop_counters(label, stats.compute_us, stats.steps + stats.fills);
        }
    });
}
