//! [`Trainer`]: drives training over a route of nodes. Per step it sends every micro-batch's
//! tokens to the first hop at once (the hops pipeline them), waits until every hop's
//! gradients are complete, then commits in two phases: each hop prepares its update and
//! reports the version it would make; the trainer signs one certificate naming all of them and
//! sends it to every hop. A failure before the certificate aborts the step everywhere.

use super::examples::{examples_from_conversation, examples_from_text, LearnOptions};
use super::proto::{
    CommitCertificate, JobSpec, Outcome, SignedCommit, TrainMessage, TrainTarget, TRAIN_ALPN,
};
use crate::engine::{AdamWConfig, TrainedVersion};
use crate::error::{Error, Result};
use crate::net::connections::Connections;
use crate::net::proto::{read_postcard, request_on, send_uni, write_postcard, MAX_CONTROL};
use crate::net::{NetError, NodeId, RouteHop};
use crate::wire::{read_frame, Codec};
use crate::Client;
use candle_core::Tensor;
use std::collections::BTreeMap;
use std::ops::ControlFlow;

/// How a [`Trainer`] trains.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOptions {
    /// What trains: a LoRA adapter (the default, `notes` at rank 8) or the full slices.
    pub target: TrainTarget,
    /// Codec of the hidden-state and gradient frames between hops (f32 by default: exact).
    pub codec: Codec,
    /// The optimizer.
    pub adamw: AdamWConfig,
    /// Longest one step's forward and backward may take before the trainer aborts it (a
    /// hop died or stalled).
    pub step_timeout: std::time::Duration,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            target: TrainTarget::Adapter {
                name: "notes".into(),
                config: crate::LoraConfig::default(),
            },
            codec: Codec::F32,
            adamw: AdamWConfig::default(),
            step_timeout: std::time::Duration::from_secs(300),
        }
    }
}

/// What one step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// Mean of the micro-batches' losses, before the update.
    pub loss: f32,
    /// Token positions trained on.
    pub tokens: usize,
    /// Every hop's version after the step, first hop first.
    pub versions: Vec<TrainedVersion>,
}

/// A training job over one route.
#[derive(Debug)]
pub struct Trainer {
    client: Client,
    conns: Connections,
    spec: JobSpec,
    /// Steps sent so far (a step's messages carry its number).
    step: u64,
    /// The versions every hop serves now, first hop first.
    versions: Vec<TrainedVersion>,
    /// Versions left prepared by an earlier job, as the hops reported them at the start.
    in_doubt: Vec<Option<TrainedVersion>>,
    /// Longest a step's forward and backward may take before the trainer aborts it.
    step_timeout: std::time::Duration,
}

/// A hop's refusal as an error.
fn refused(hop: &RouteHop, what: &str, reply: TrainMessage) -> Error {
    let message = match reply {
        TrainMessage::Error { message, .. } => message,
        other => format!("unexpected reply `{}`", other.kind()),
    };
    Error::Net(NetError::HopFailed {
        node: Some(hop.node),
        reason: None,
        reporter: None,
        message: format!("{what}: {message}"),
    })
}

impl Trainer {
    /// Begins job `job` on `route` (whole slices covering the model, first to last) for the
    /// model `model_id`: every hop checks that it allows this trainer, takes its lease and
    /// creates the adapter where missing.
    pub async fn begin(
        client: Client,
        model_id: &str,
        route: Vec<RouteHop>,
        options: TrainOptions,
    ) -> Result<Trainer> {
        if route.is_empty() {
            return Err(Error::Training(
                "a training route needs at least one hop".into(),
            ));
        }
        let job = rand_job();
        let spec = JobSpec {
            job,
            model_id: model_id.to_string(),
            route,
            target: options.target,
            codec: options.codec,
            adamw: options.adamw,
        };
        let mut trainer = Trainer {
            client,
            conns: Connections::for_alpn(TRAIN_ALPN),
            spec,
            step: 0,
            versions: Vec::new(),
            in_doubt: Vec::new(),
            step_timeout: options.step_timeout,
        };
        let begin = TrainMessage::Begin(trainer.spec.clone());
        let replies = trainer.on_every_hop(&begin).await;
        for (hop, reply) in trainer.spec.route.iter().zip(replies) {
            match reply? {
                TrainMessage::Begun { version, in_doubt } => {
                    trainer.versions.push(version);
                    trainer.in_doubt.push(in_doubt);
                }
                other => return Err(refused(hop, "begin", other)),
            }
        }
        Ok(trainer)
    }

    /// Begins a job on a route planned through the swarm `swarm` is connected to: whole
    /// slices covering the model, the cheapest chain first.
    pub async fn on_swarm(swarm: &crate::SwarmSession, options: TrainOptions) -> Result<Trainer> {
        let peers = swarm.peer_set(&[]).await?;
        let route = peers
            .plan_route(
                swarm.layers(),
                crate::net::now_ms(),
                &crate::net::route::RouteOptions::default(),
            )?
            .to_hops();
        Trainer::begin(swarm.client().clone(), swarm.model_id(), route, options).await
    }

    /// Teaches `examples` (token id sequences, each at least 2 long) for `steps` steps of
    /// `micro_batches` micro-batches of one sequence each, cycling through the examples;
    /// `on_step` sees every step's report, and [`ControlFlow::Break`] from it stops after that
    /// step (the reports so far are returned). [`Trainer::learn_text`] and
    /// [`Trainer::learn_conversation`] cut a text or a chat into examples first.
    pub async fn learn(
        &mut self,
        examples: &[Vec<u32>],
        steps: usize,
        micro_batches: usize,
        mut on_step: impl FnMut(usize, &StepReport) -> ControlFlow<()>,
    ) -> Result<Vec<StepReport>> {
        if examples.is_empty() || examples.iter().any(|e| e.len() < 2) {
            return Err(Error::Training(
                "give at least one example of 2 or more tokens".into(),
            ));
        }
        let micro_batches = micro_batches.max(1);
        let mut reports = Vec::with_capacity(steps);
        for step in 0..steps {
            let batch: Vec<Vec<Vec<u32>>> = (0..micro_batches)
                .map(|m| vec![examples[(step * micro_batches + m) % examples.len()].clone()])
                .collect();
            let report = self.step(&batch).await?;
            let flow = on_step(step, &report);
            reports.push(report);
            if flow.is_break() {
                break;
            }
        }
        Ok(reports)
    }

    /// Learns `text`, cut as `how` says ([`examples_from_text`]), for `how.steps` steps.
    pub async fn learn_text(
        &mut self,
        tokenizer: &crate::Tokenizer,
        text: &str,
        how: &LearnOptions,
        on_step: impl FnMut(usize, &StepReport) -> ControlFlow<()>,
    ) -> Result<Vec<StepReport>> {
        let examples = examples_from_text(tokenizer, text, how.seq_len, how.lines)?;
        self.learn(&examples, how.steps, how.micro_batches, on_step)
            .await
    }

    /// Learns a conversation in one call: the messages rendered with the model's chat
    /// template ([`examples_from_conversation`]), for `how.steps` steps (`how.lines` is not
    /// used: a conversation is cut in windows of `how.seq_len`).
    pub async fn learn_conversation(
        &mut self,
        tokenizer: &crate::Tokenizer,
        messages: &[crate::ChatMessage],
        how: &LearnOptions,
        on_step: impl FnMut(usize, &StepReport) -> ControlFlow<()>,
    ) -> Result<Vec<StepReport>> {
        let examples = examples_from_conversation(tokenizer, messages, how.seq_len)?;
        self.learn(&examples, how.steps, how.micro_batches, on_step)
            .await
    }

    /// The mean next-token loss over `examples` (one per micro-batch, `micro_batches` per
    /// pass), with no update: each pass's gradients are dropped (a held-back perplexity is
    /// `exp` of it).
    pub async fn evaluate(&mut self, examples: &[Vec<u32>], micro_batches: usize) -> Result<f32> {
        if examples.is_empty() {
            return Err(Error::Training("nothing to evaluate".into()));
        }
        let (mut sum, mut count) = (0.0f64, 0usize);
        for chunk in examples.chunks(micro_batches.max(1)) {
            let batch: Vec<Vec<Vec<u32>>> = chunk.iter().map(|e| vec![e.clone()]).collect();
            let (loss, _) = self.accumulate(&batch).await?;
            self.abort_step().await;
            sum += loss as f64 * chunk.len() as f64;
            count += chunk.len();
        }
        Ok((sum / count as f64) as f32)
    }

    /// The job's id.
    pub fn job(&self) -> u64 {
        self.spec.job
    }

    /// The route.
    pub fn route(&self) -> &[RouteHop] {
        &self.spec.route
    }

    /// Every hop's current version, first hop first.
    pub fn versions(&self) -> &[TrainedVersion] {
        &self.versions
    }

    /// Versions an earlier job prepared and never decided, per hop (see
    /// [`Trainer::resolve_in_doubt`]).
    pub fn in_doubt(&self) -> &[Option<TrainedVersion>] {
        &self.in_doubt
    }

    /// One whole step: forward and backward of every micro-batch (`[batch][seq]` token ids
    /// each), then the two-phase commit. Returns the loss before the update.
    pub async fn step(&mut self, micro_batches: &[Vec<Vec<u32>>]) -> Result<StepReport> {
        let (loss, tokens) = self.accumulate(micro_batches).await?;
        let versions = self.commit_step().await?;
        Ok(StepReport {
            loss,
            tokens,
            versions,
        })
    }

    /// Forward and backward of every micro-batch of a new step, until each hop's gradients
    /// are complete; returns the mean loss and the positions trained on. Then
    /// [`Trainer::commit_step`] or [`Trainer::abort_step`].
    pub async fn accumulate(&mut self, micro_batches: &[Vec<Vec<u32>>]) -> Result<(f32, usize)> {
        let micros = u32::try_from(micro_batches.len())
            .ok()
            .filter(|m| (1..=super::proto::MAX_MICRO_BATCHES).contains(m))
            .ok_or_else(|| {
                Error::Training(format!(
                    "{} micro-batches (accepted: 1..={})",
                    micro_batches.len(),
                    super::proto::MAX_MICRO_BATCHES
                ))
            })?;
        self.step += 1;
        let step = self.step;
        let mut tokens = 0;
        let first = self.spec.route[0].clone();
        let conn = self.connection(&first).await?;
        for (micro, batch) in micro_batches.iter().enumerate() {
            let seq = batch.first().map_or(0, Vec::len);
            if seq < 2 || batch.iter().any(|s| s.len() != seq) {
                return Err(Error::Training(format!(
                    "micro-batch {micro}: sequences of at least 2 tokens, all of one length"
                )));
            }
            tokens += batch.len() * seq;
            let msg = TrainMessage::Tokens {
                job: self.spec.job,
                step,
                micro: micro as u32,
                micros,
                batch: batch.len() as u32,
                ids: batch.concat(),
            };
            send_uni(&conn, &msg, None).await?;
        }
        let sync = TrainMessage::Sync {
            job: self.spec.job,
            step,
        };
        // Every hop's reply, in order of arrival: the first error ends the wait (the other
        // hops would only reach their deadline).
        let mut pending = futures_unordered(self, &sync);
        let mut loss_sum = 0.0;
        let mut losses = 0;
        let deadline = tokio::time::Instant::now() + self.step_timeout;
        loop {
            let next = tokio::time::timeout_at(deadline, n0_future::StreamExt::next(&mut pending));
            let (i, reply) = match next.await {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(_) => {
                    drop(pending);
                    self.abort_step().await;
                    return Err(Error::Net(NetError::Timeout {
                        what: format!("step {step}'s gradients"),
                        ms: self.step_timeout.as_millis() as u64,
                    }));
                }
            };
            let hop = &self.spec.route[i];
            match reply {
                Ok(TrainMessage::Accumulated {
                    loss_sum: l,
                    losses: n,
                }) => {
                    loss_sum += l;
                    losses += n;
                }
                Ok(other) => {
                    drop(pending);
                    let err = refused(hop, "step", other);
                    self.abort_step().await;
                    return Err(err);
                }
                Err(e) => {
                    drop(pending);
                    self.abort_step().await;
                    return Err(e);
                }
            }
        }
        if losses != micros {
            return Err(Error::Training(format!(
                "the last hop reported {losses} losses for {micros} micro-batches"
            )));
        }
        Ok(((loss_sum / losses as f64) as f32, tokens))
    }

    /// Every hop's accumulated gradients, merged by name (the two halves of a tied matrix are
    /// already added on both ends, so it appears once). For checks against references.
    pub async fn gradients(&self) -> Result<BTreeMap<String, Tensor>> {
        Ok(self.hop_gradients().await?.into_iter().flatten().collect())
    }

    /// Each hop's accumulated gradients by name, first hop first.
    pub async fn hop_gradients(&self) -> Result<Vec<Vec<(String, Tensor)>>> {
        let mut all = Vec::with_capacity(self.spec.route.len());
        for hop in &self.spec.route {
            let conn = self.connection(hop).await?;
            let (mut send, mut recv) = conn
                .open_bi()
                .await
                .map_err(|e| NetError::Io(e.to_string()))?;
            write_postcard(
                &mut send,
                &TrainMessage::GetGradients { job: self.spec.job },
            )
            .await?;
            send.finish().map_err(|e| NetError::Io(e.to_string()))?;
            let names = match read_postcard::<_, TrainMessage>(&mut recv, MAX_CONTROL).await? {
                TrainMessage::Gradients(names) => names,
                other => return Err(refused(hop, "gradients", other)),
            };
            let mut grads = Vec::with_capacity(names.len());
            for name in names {
                let frame = read_frame(&mut recv, super::proto::MAX_TIED_FRAME).await?;
                grads.push((name, frame.as_frame().to_tensor()?));
            }
            all.push(grads);
        }
        Ok(all)
    }

    /// Commits the accumulated step: every hop prepares its update and reports the version;
    /// the trainer signs one certificate with all of them and sends it to every hop. If a
    /// prepare fails the step is aborted everywhere. Returns the new versions.
    pub async fn commit_step(&mut self) -> Result<Vec<TrainedVersion>> {
        let prepared = self.prepare_step().await?;
        self.commit_prepared(prepared).await
    }

    /// Phase one alone: every hop computes and keeps its update and reports the version it
    /// would make; a failure aborts the step everywhere. Then [`Trainer::commit_prepared`].
    pub async fn prepare_step(&mut self) -> Result<Vec<(NodeId, TrainedVersion)>> {
        let prepare = TrainMessage::Prepare {
            job: self.spec.job,
            step: self.step,
        };
        let replies = self.on_every_hop(&prepare).await;
        let mut prepared = Vec::with_capacity(replies.len());
        for (hop, reply) in self.spec.route.iter().zip(replies) {
            match reply {
                Ok(TrainMessage::Prepared(v)) => prepared.push((hop.node, v)),
                Ok(other) => {
                    let err = refused(hop, "prepare", other);
                    self.abort_step().await;
                    return Err(err);
                }
                Err(e) => {
                    self.abort_step().await;
                    return Err(e);
                }
            }
        }
        Ok(prepared)
    }

    /// Phase two: signs the certificate naming every hop's prepared version and sends it to
    /// every hop. The decision stands once signed: a hop that misses it (it crashed) takes
    /// it from a peer when it restarts, so an error here names hops that will catch up.
    pub async fn commit_prepared(
        &mut self,
        prepared: Vec<(NodeId, TrainedVersion)>,
    ) -> Result<Vec<TrainedVersion>> {
        let step = prepared.first().map_or(0, |(_, v)| v.steps);
        let cert = CommitCertificate {
            job: self.spec.job,
            step,
            versions: prepared,
        };
        let signed = SignedCommit::sign(&cert, self.client.key());
        let replies = self.on_every_hop(&TrainMessage::Commit(signed)).await;
        let mut versions = Vec::with_capacity(replies.len());
        let mut failed = None;
        for (hop, reply) in self.spec.route.iter().zip(replies) {
            match reply {
                Ok(TrainMessage::Committed(v)) => versions.push(v),
                Ok(other) => failed = failed.or(Some(refused(hop, "commit", other))),
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        self.versions = versions.clone();
        Ok(versions)
    }

    /// Decides a step an earlier job of this trainer prepared and left undecided (it
    /// stopped after the prepares): when every hop holds it in doubt, none can have aborted
    /// it, so it is committed; the hops then serve it. Where only some hops are in doubt,
    /// their peers decide it for them when they begin ([`Trainer::begin`] reports what is
    /// left), and this is an error. Returns whether a step was committed.
    pub async fn resolve_in_doubt(&mut self) -> Result<bool> {
        if self.in_doubt.iter().all(Option::is_none) {
            return Ok(false);
        }
        let all: Option<Vec<(NodeId, TrainedVersion)>> = self
            .spec
            .route
            .iter()
            .zip(&self.in_doubt)
            .map(|(hop, v)| v.clone().map(|v| (hop.node, v)))
            .collect();
        let Some(prepared) = all else {
            return Err(Error::Training(format!(
                "only some hops hold a prepared step in doubt ({:?}); their peers did not \
                 know its outcome: begin again once every hop of that step is reachable",
                self.in_doubt
            )));
        };
        self.in_doubt = vec![None; self.spec.route.len()];
        self.commit_prepared(prepared).await?;
        Ok(true)
    }

    /// Aborts the current step on every hop (its gradients and any prepared update).
    pub async fn abort_step(&self) {
        let abort = TrainMessage::Abort {
            job: self.spec.job,
            step: self.step,
        };
        let _ = self.on_every_hop(&abort).await;
    }

    /// What hop `index` knows of step count `step` of this job.
    pub async fn outcome(&self, index: usize, step: u64) -> Result<Outcome> {
        let hop = &self.spec.route[index];
        match self
            .request(
                hop,
                &TrainMessage::GetOutcome {
                    job: self.spec.job,
                    step,
                },
            )
            .await?
        {
            TrainMessage::Outcome(o) => Ok(o),
            other => Err(refused(hop, "outcome", other)),
        }
    }

    /// Ends the job: every hop releases its lease.
    pub async fn end(self) -> Result<()> {
        let replies = self
            .on_every_hop(&TrainMessage::End { job: self.spec.job })
            .await;
        for (hop, reply) in self.spec.route.iter().zip(replies) {
            match reply? {
                TrainMessage::Ok => {}
                other => return Err(refused(hop, "end", other)),
            }
        }
        Ok(())
    }

    async fn connection(&self, hop: &RouteHop) -> Result<iroh::endpoint::Connection> {
        let (conn, _) = self
            .conns
            .get_or_dial_patiently(self.client.endpoint(), hop.node, &hop.addrs)
            .await?;
        Ok(conn)
    }

    /// One request to `hop`, one reply.
    async fn request(&self, hop: &RouteHop, msg: &TrainMessage) -> Result<TrainMessage> {
        let conn = self.connection(hop).await?;
        Ok(request_on(&conn, msg, MAX_CONTROL).await?)
    }

    /// `msg` to every hop at once; the replies in route order.
    async fn on_every_hop(&self, msg: &TrainMessage) -> Vec<Result<TrainMessage>> {
        let requests = self.spec.route.iter().map(|hop| self.request(hop, msg));
        n0_future::join_all(requests).await
    }
}

/// `msg` to every hop of `trainer`'s route, as a stream of (hop index, reply) in order of
/// arrival.
fn futures_unordered<'a>(
    trainer: &'a Trainer,
    msg: &'a TrainMessage,
) -> n0_future::FuturesUnordered<
    impl std::future::Future<Output = (usize, Result<TrainMessage>)> + 'a,
> {
    trainer
        .spec
        .route
        .iter()
        .enumerate()
        .map(|(i, hop)| async move { (i, trainer.request(hop, msg).await) })
        .collect()
}

/// A job id no other job of this trainer is likely to share.
fn rand_job() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    crate::splitmix::SplitMix64::new(nanos ^ std::process::id() as u64).next_u64()
}
