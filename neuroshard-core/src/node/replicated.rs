//! Replicated hops (the Trust issue): each range of a replicated session runs on k replicas,
//! and every receiver votes on their outputs.
//!
//! ```text
//! client ──Step──► A1 A2 A3 ──Ballot×9──► B1 B2 B3 ──Ballot×3 (logits)──► client
//!                  (range 0)  every B votes  (range 1)   the client votes
//! ```
//!
//! A replica of the first range computes from the client's tokens. A replica of a later
//! range collects the ballots of the previous range's replicas for a step (a [`BallotBox`]),
//! votes with the node's [`Consensus`] once every replica it still routes to has answered
//! (or a strict majority and a grace period, or the deadline), and computes on the accepted
//! bytes: the same fixed rule on every receiver, so honest receivers compute on identical
//! bytes and nobody decides alone. Each replica signs a receipt for what it computed (its
//! chain of receipts is the node's [`ReceiptChain`]) and its frame, and sends both with its
//! output to every receiver. What a vote finds (evidence, missing replicas, no majority) goes
//! to the client as a `VoteReport`; the client checks the evidence itself.
//!
//! Each replica keeps the hidden states it sent (the session's `sent` record, as a plain hop
//! does). Should the next range's vote split, the client adds a referee to that range by a
//! signed re-open of the session, and a replica it trusts replays those states into the
//! referee (`Replay`, a `Fill` the referee takes from any replica of the previous range);
//! see `client/replicated.rs`, `add_referee`.
//!
//! Replicated steps run as one chunk each (the engine still chunks long inputs inside), so a
//! long prompt does not pipeline across hops chunk by chunk as an unreplicated one does.

use super::{HopSession, Inner};
use crate::consensus::receipt::{extend_prefix, FrameClaim, RECEIPT_VERSION};
use crate::consensus::{
    FrameDtype, Hash, InputContext, SignedBallot, SignedFrame, VoteOutcome, Work,
};
use crate::model::shard::{ShardInput, ShardOutput};
use crate::net::admission::ReplicaPlace;
use crate::net::gossip;
use crate::net::proto::{BallotClaim, Message, RouteHop};
use crate::net::{lock, now_ms, NodeId, Reason};
use crate::protocol::hop_session::{ChunkOutput, Refused, StepInput, Ticket};
use crate::wire::{decode_frame, encode_frame, read_frame, Codec, FrameMeta, OwnedFrame};
use candle_core::{Device, Tensor};
use iroh::endpoint::RecvStream;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest a receiver waits for the ballots of one step: this, plus
/// [`VOTE_DEADLINE_PER_POSITION`] per position of the step.
pub(crate) const VOTE_DEADLINE: Duration = Duration::from_secs(30);
/// Extra wait per position of a step (long prompts take longer to compute).
pub(crate) const VOTE_DEADLINE_PER_POSITION: Duration = Duration::from_millis(10);
/// Once a strict majority has answered, the rest get at least this long (or as long again
/// as the majority took, if longer) before the vote runs without them.
pub(crate) const VOTE_GRACE: Duration = Duration::from_millis(500);
/// Steps whose ballots a hop holds at once per session (older ones are dropped).
const MAX_BOXES: usize = 8;
/// How long one ballot may take to reach one receiver (a dial included): a dead receiver
/// costs the others nothing, as every receiver's send runs at once.
const BALLOT_SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Ballots one sender may put in one box: a second one shows equivocation, more are noise.
const MAX_PER_SENDER: usize = 2;
/// Steps a hop remembers having voted on, so a late ballot opens no new vote.
const REMEMBERED_VOTES: usize = 64;

/// What one replica of a replicated session keeps besides the plain hop state.
pub(super) struct Replication {
    /// Where it sits: its range, its feeders and its receivers.
    pub(super) place: ReplicaPlace,
    /// blake3 of the weight version of the range it runs (what its receipts name).
    weight: Hash,
    boxes: Mutex<Boxes>,
    /// Signalled whenever a ballot lands in a box.
    arrived: tokio::sync::Notify,
    /// The prefix chain by position: `(end, chain)` after each accepted step.
    prefix: Mutex<Vec<(u32, Hash)>>,
    /// Receivers a ballot of this session did not reach: this replica sends them no more
    /// (they still get the other replicas' ballots; the vote goes on without them).
    unreachable: Mutex<Vec<NodeId>>,
    /// The last row this replica sent (the `stale` behaviour repeats it).
    #[cfg(any(feature = "adversary", feature = "internals"))]
    last_row: Mutex<Option<Vec<f32>>>,
}

/// A ballot's sender, frame and frame claim, kept beside the ballot the vote consumes.
type Received = (NodeId, OwnedFrame, Option<SignedFrame>);

/// The ballots of one step, as they arrive.
struct BallotBox {
    step_end: u32,
    ballots: Vec<(SignedBallot, OwnedFrame)>,
    opened: Instant,
}

#[derive(Default)]
struct Boxes {
    by_step: BTreeMap<(u64, u32), BallotBox>,
    voted: VecDeque<(u64, u32)>,
}

impl Replication {
    pub(super) fn new(place: ReplicaPlace, weight: Hash) -> Self {
        Replication {
            place,
            weight,
            boxes: Mutex::default(),
            arrived: tokio::sync::Notify::new(),
            prefix: Mutex::default(),
            unreachable: Mutex::default(),
            #[cfg(any(feature = "adversary", feature = "internals"))]
            last_row: Mutex::default(),
        }
    }

    /// Carries what a re-open must not lose from the session's previous replication state:
    /// the prefix chain (the KV cache stays, so must the chain that pins it) and the
    /// receivers found unreachable.
    pub(super) fn inherit(&self, previous: &Replication) {
        *lock(&self.prefix) = lock(&previous.prefix).clone();
        *lock(&self.unreachable) = lock(&previous.unreachable).clone();
    }

    /// Extends the prefix chain over a fill of positions `start..end` whose input hashes to
    /// `frame`: a referee that joined after a split replayed them from its predecessor's
    /// kept hidden states, so its chain is its own and commits to what it was fed.
    pub(super) fn filled(&self, session: u64, codec: u8, start: u32, end: u32, frame: Hash) {
        let Some(prefix) = self.prefix_at(start) else {
            return;
        };
        let ctx = InputContext {
            session,
            position: start as u64,
            count: end - start,
            prefix,
            weight: self.weight,
            codec,
            build_id: String::new(),
            kernel_path: String::new(),
            frame,
        };
        lock(&self.prefix).push((end, extend_prefix(&prefix, &ctx.step_key())));
    }

    /// The prefix chain before a step at `start`: the chain after the step that ended there
    /// (later entries are dropped: a retry or a rewound conversation overwrites them).
    fn prefix_at(&self, start: u32) -> Option<Hash> {
        let mut chain = lock(&self.prefix);
        chain.retain(|(end, _)| *end <= start);
        match (start, chain.last()) {
            (0, _) => Some([0; 32]),
            (s, Some((end, h))) if *end == s => Some(*h),
            _ => None,
        }
    }

    /// Puts a ballot in its step's box; `true` when it opened the box (its caller drives the
    /// vote).
    fn deposit(
        &self,
        attempt: u64,
        start: u32,
        end: u32,
        ballot: (SignedBallot, OwnedFrame),
    ) -> bool {
        let key = (attempt, start);
        let opened = {
            let mut boxes = lock(&self.boxes);
            if boxes.voted.contains(&key) {
                return false;
            }
            let opened = !boxes.by_step.contains_key(&key);
            if opened && boxes.by_step.len() >= MAX_BOXES {
                // The oldest attempt goes: its driver finds its box gone and stops.
                if let Some(oldest) = boxes.by_step.keys().next().copied() {
                    boxes.by_step.remove(&oldest);
                }
            }
            let b = boxes.by_step.entry(key).or_insert_with(|| BallotBox {
                step_end: end,
                ballots: Vec::new(),
                opened: Instant::now(),
            });
            let from = ballot.0.from;
            let mine = b.ballots.iter().filter(|(x, _)| x.from == from).count();
            if b.step_end == end && mine < MAX_PER_SENDER {
                b.ballots.push(ballot);
            }
            opened
        };
        self.arrived.notify_waiters();
        opened
    }

    /// Waits until the box of `(attempt, start)` is ready to vote on, then takes it: every
    /// feeder in `waiting_for` answered, or a strict majority of `k` did and the grace period
    /// passed, or the deadline did. `None` when the box was dropped.
    async fn collect(
        &self,
        attempt: u64,
        start: u32,
        k: usize,
        waiting_for: &[NodeId],
        deadline: Duration,
    ) -> Option<Vec<(SignedBallot, OwnedFrame)>> {
        let key = (attempt, start);
        // How long after the box opened a strict majority had answered.
        let mut majority_after: Option<Duration> = None;
        loop {
            let notified = self.arrived.notified();
            let wait = {
                let mut boxes = lock(&self.boxes);
                let b = boxes.by_step.get(&key)?;
                let mut answered: Vec<NodeId> = b.ballots.iter().map(|(x, _)| x.from).collect();
                answered.sort();
                answered.dedup();
                let elapsed = b.opened.elapsed();
                if 2 * answered.len() > k && majority_after.is_none() {
                    majority_after = Some(elapsed);
                }
                let all = waiting_for.iter().all(|n| answered.contains(n));
                // The rest get the grace period, or as long again as the majority took.
                let ready_at = majority_after
                    .map(|m| (m + VOTE_GRACE.max(m)).min(deadline))
                    .unwrap_or(deadline);
                if all || elapsed >= ready_at {
                    let taken = boxes.by_step.remove(&key).map(|b| b.ballots);
                    boxes.voted.push_back(key);
                    if boxes.voted.len() > REMEMBERED_VOTES {
                        boxes.voted.pop_front();
                    }
                    return taken;
                }
                ready_at - elapsed
            };
            let _ = tokio::time::timeout(wait.max(Duration::from_millis(1)), notified).await;
        }
    }
}

/// The frame dtype a vote compares, for a frame's codec (quantised frames are not voted on).
fn vote_dtype(codec: Codec) -> Option<FrameDtype> {
    match codec {
        Codec::F16 => Some(FrameDtype::F16),
        Codec::F32 => Some(FrameDtype::F32),
        _ => None,
    }
}

/// The payload of an encoded frame.
fn payload(frame: &[u8]) -> Result<&[u8], String> {
    decode_frame(frame, frame.len())
        .map(|(f, _)| f.payload)
        .map_err(|e| e.to_string())
}

/// blake3 of token ids as little-endian u32 (the first range's input frame hash).
pub(super) fn tokens_hash(tokens: &[u32]) -> Hash {
    let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    *blake3::hash(&bytes).as_bytes()
}

/// The deadline of a vote over a step of `positions` positions.
pub(crate) fn vote_deadline(positions: usize) -> Duration {
    VOTE_DEADLINE + VOTE_DEADLINE_PER_POSITION * positions.min(1 << 20) as u32
}

impl Inner {
    /// A `Step` from the client to a replica of the first range.
    pub(super) async fn replicated_tokens(
        &self,
        hop: &Arc<HopSession>,
        remote: NodeId,
        attempt: u64,
        start_pos: u32,
        tokens: Vec<u32>,
    ) {
        let end = start_pos as usize + tokens.len();
        let begun = lock(&hop.state).begin_step(
            remote,
            StepInput::Tokens,
            attempt,
            start_pos as usize,
            end,
        );
        let ticket = match begun {
            Ok(t) => t,
            Err(Refused::Report(reason, message)) => {
                return self.report_failure(hop, reason, message).await
            }
            Err(_) => return self.reject(),
        };
        let input = match Tensor::from_slice(&tokens, (1, tokens.len()), &Device::Cpu) {
            Ok(t) => ShardInput::Tokens(t),
            Err(e) => {
                return self
                    .report_failure(hop, Reason::Malformed, e.to_string())
                    .await
            }
        };
        let frame = tokens_hash(&tokens);
        if let Err((reason, message)) = self
            .replicated_compute(
                hop, ticket, attempt, start_pos, end as u32, input, frame, None,
            )
            .await
        {
            self.report_failure(hop, reason, message).await;
        }
    }

    /// A `Ballot` from a replica of the previous range: read its frame, put it in the step's
    /// box, and drive the vote when it opened the box.
    pub(super) async fn replicated_ballot(
        self: &Arc<Self>,
        hop: &Arc<HopSession>,
        remote: NodeId,
        msg: Message,
        mut recv: RecvStream,
    ) {
        let Some(rep) = hop.replication.as_ref() else {
            return self.reject();
        };
        let Message::Ballot {
            attempt,
            start_pos,
            step_end,
            claim,
            ..
        } = msg
        else {
            return self.reject();
        };
        if !rep.place.feeders.contains(&remote) || step_end <= start_pos {
            return self.reject();
        }
        let read = tokio::time::timeout(
            self.read_deadline.max(vote_deadline(0)),
            read_frame(&mut recv, crate::wire::DEFAULT_MAX_FRAME),
        )
        .await;
        let Ok(Ok(frame)) = read else {
            return self.reject();
        };
        self.counters.hidden_bytes_received.fetch_add(
            (frame.header().encoded_len() + frame.payload().len()) as u64,
            Ordering::Relaxed,
        );
        let rows = (step_end - start_pos) as usize;
        let header = frame.header();
        let (Some(dtype), &[1, r, width]) = (vote_dtype(header.codec), &header.dims[..]) else {
            return self.reject();
        };
        if r != rows || header.session != hop.open.session || header.position != start_pos {
            return self.reject();
        }
        let BallotClaim {
            input,
            receipt,
            frame: signed_frame,
            upstream,
        } = *claim;
        let ballot = SignedBallot {
            from: remote,
            dtype,
            width,
            bytes: frame.payload().to_vec(),
            input,
            receipt,
            frame: Some(signed_frame),
            upstream,
        };
        if !rep.deposit(attempt, start_pos, step_end, (ballot, frame)) {
            return;
        }
        self.drive_vote(hop, attempt, start_pos, step_end).await;
    }

    /// Collects the step's ballots, votes, reports what the vote found, and computes on the
    /// accepted bytes.
    async fn drive_vote(
        self: &Arc<Self>,
        hop: &Arc<HopSession>,
        attempt: u64,
        start: u32,
        end: u32,
    ) {
        let Some(rep) = hop.replication.as_ref() else {
            return;
        };
        // An audited range's referee computes beside the voters but is outside their vote.
        let referee = rep.place.feeder_referee;
        let expected: Vec<NodeId> = rep
            .place
            .feeders
            .iter()
            .filter(|n| Some(**n) != referee)
            .copied()
            .collect();
        // Feeders this node has banned are not waited for (they still count in the vote's k).
        let waiting_for: Vec<NodeId> = {
            let trust = lock(&self.trust);
            let now = now_ms();
            rep.place
                .feeders
                .iter()
                .filter(|n| trust.consensus.reputation().may_route(n, now))
                .copied()
                .collect()
        };
        let deadline = vote_deadline((end - start) as usize);
        let Some(ballots) = rep
            .collect(
                attempt,
                start,
                rep.place.feeders.len(),
                &waiting_for,
                deadline,
            )
            .await
        else {
            return;
        };
        let (frames, signed): (Vec<Received>, Vec<SignedBallot>) = ballots
            .into_iter()
            .map(|(b, f)| ((b.from, f, b.frame.clone()), b))
            .unzip();
        let verdict = lock(&self.trust)
            .consensus
            .judge(&expected, referee, signed, now_ms());
        let accepted = verdict.accepted.clone();
        self.counters
            .proofs_taken
            .fetch_add(verdict.evidence.len() as u64, Ordering::Relaxed);
        // Proofs (not deviations: those carry whole ballots) go to the whole swarm.
        for e in verdict.evidence.iter().filter(|e| gossip::is_gossiped(e)) {
            self.publish_proof(e).await;
        }
        let notable =
            !verdict.evidence.is_empty() || !verdict.unaccounted.is_empty() || accepted.is_none();
        if notable {
            // Claims of the ballots that did not count: with another receiver's, they can
            // prove that their sender sent two different frames.
            let claims: Vec<SignedFrame> = frames
                .iter()
                .filter(|(from, _, _)| verdict.unaccounted.contains(from))
                .filter_map(|(_, _, c)| c.clone())
                .collect();
            // Only replicas this node waited for count as missing: one it has banned was
            // not waited for, and reporting it would re-ban it for arriving after the vote.
            let missing: Vec<NodeId> = verdict
                .unaccounted
                .iter()
                .filter(|n| waiting_for.contains(n))
                .copied()
                .collect();
            let report = Message::VoteReport {
                session: hop.open.session,
                start_pos: start,
                range: rep.place.stage.saturating_sub(1) as u32,
                evidence: verdict.evidence.clone(),
                missing,
                accepted: accepted.is_some(),
                claims,
            };
            if let Err(e) = self.notify_client(hop, &report).await {
                tracing::debug!("vote report not delivered: {e}");
            }
        }
        let Some(winner) = accepted else {
            let message = match verdict.outcome {
                VoteOutcome::NoMajority { .. } => format!(
                    "the {} replicas of range {} did not agree on positions {start}..{end}",
                    expected.len(),
                    rep.place.stage - 1
                ),
                VoteOutcome::Accepted(_) => "the accepted ballot went missing".into(),
            };
            return self.report_failure(hop, Reason::NoMajority, message).await;
        };
        let Some((_, frame, _)) = frames.into_iter().find(|(from, _, _)| *from == winner.from)
        else {
            return;
        };
        let input = match frame.as_frame().to_tensor() {
            Ok(t) => ShardInput::Hidden(t),
            Err(e) => {
                return self
                    .report_failure(hop, Reason::Malformed, e.to_string())
                    .await
            }
        };
        let feeder = lock(&hop.state).feeder();
        let begun = lock(&hop.state).begin_step(
            feeder,
            StepInput::Hidden,
            attempt,
            start as usize,
            end as usize,
        );
        let ticket = match begun {
            Ok(t) => t,
            Err(Refused::Report(reason, message)) => {
                return self.report_failure(hop, reason, message).await
            }
            Err(_) => return,
        };
        let input_hash = *blake3::hash(&winner.bytes).as_bytes();
        if let Err((reason, message)) = self
            .replicated_compute(
                hop,
                ticket,
                attempt,
                start,
                end,
                input,
                input_hash,
                winner.frame.clone(),
            )
            .await
        {
            self.report_failure(hop, reason, message).await;
        }
    }

    /// Computes an accepted input, signs the receipt and the frame, and sends the ballot to
    /// every receiver (the next range's replicas, or the client with the logits).
    #[allow(clippy::too_many_arguments)]
    async fn replicated_compute(
        &self,
        hop: &Arc<HopSession>,
        ticket: Ticket,
        attempt: u64,
        start: u32,
        end: u32,
        input: ShardInput,
        input_frame: Hash,
        upstream: Option<SignedFrame>,
    ) -> Result<(), (Reason, String)> {
        let rep = hop
            .replication
            .as_ref()
            .ok_or((Reason::Unexpected, "not a replicated session".to_string()))?;
        let rows = (end - start) as usize;
        let fate = match lock(&hop.state).chunk(ticket, start as usize, rows) {
            Ok(f) => f,
            Err(Refused::Report(reason, message)) => return Err((reason, message)),
            Err(_) => return Ok(()),
        };
        let out = self.replica_compute(hop, input, start).await?;
        self.counters.steps.fetch_add(1, Ordering::Relaxed);
        let session = hop.open.session;
        let (tensor, codec, position) = match (out, fate) {
            (ShardOutput::Hidden(h), ChunkOutput::SendOn { .. }) => (h, hop.codec, start),
            (ShardOutput::Logits(l), ChunkOutput::Sample) => {
                let vocab = l.elem_count();
                let l = l
                    .reshape((1, 1, vocab))
                    .map_err(|e| (Reason::Compute, e.to_string()))?;
                (l, Codec::F32, start)
            }
            (_, fate) => {
                return Err((
                    Reason::Compute,
                    format!("the engine's output does not fit the step's fate {fate:?}"),
                ))
            }
        };
        let _ = lock(&hop.state).end_step(ticket);
        let prefix = rep.prefix_at(start).ok_or_else(|| {
            (
                Reason::Malformed,
                format!("a replicated step at {start} leaves a gap in the session's prefix"),
            )
        })?;
        let ctx = InputContext {
            session,
            position: start as u64,
            count: rows as u32,
            prefix,
            weight: rep.weight,
            codec: hop.open.codec,
            build_id: self.build_id.clone(),
            kernel_path: self.kernel_path.clone(),
            frame: input_frame,
        };
        lock(&rep.prefix).push((end, extend_prefix(&prefix, &ctx.step_key())));
        let meta = FrameMeta { session, position };
        let honest = encode_frame(&tensor, codec, meta, false)
            .map_err(|e| (Reason::Compute, e.to_string()))?;
        if !rep.place.receivers.is_empty() {
            // Kept for a referee's replay: should the next range's vote split, a referee that
            // joins it replays positions 0..p from these rows (what the receivers decoded).
            let width = tensor.dims().last().copied().unwrap_or(0);
            let (decoded, _) = decode_frame(&honest, honest.len())
                .map_err(|e| (Reason::Compute, e.to_string()))?;
            let values = decoded
                .to_f32()
                .map_err(|e| (Reason::Compute, e.to_string()))?;
            lock(&hop.sent).record(start as usize, width, &values);
        }
        let receivers: Vec<Option<&RouteHop>> = if rep.place.receivers.is_empty() {
            vec![None]
        } else {
            rep.place.receivers.iter().map(Some).collect()
        };
        let outputs = self.outputs_to_send(hop, &tensor, codec, meta, honest, receivers.len())?;
        let mut signed: Vec<(Hash, crate::consensus::SignedReceipt)> = Vec::new();
        let mut sends = Vec::with_capacity(outputs.len());
        for (i, (receiver, frame)) in receivers.into_iter().zip(outputs).enumerate() {
            let bytes = payload(&frame).map_err(|e| (Reason::Compute, e))?;
            let output = *blake3::hash(bytes).as_bytes();
            let receipt = match signed.iter().find(|(h, _)| *h == output) {
                Some((_, r)) => r.clone(),
                // `bad-upstream` lies under the receipt of its honest output.
                None if i > 0 && self.lies_under_one_receipt() => signed[0].1.clone(),
                None => {
                    let work = Work {
                        session,
                        position: start as u64,
                        count: rows as u32,
                        input: ctx.hash(),
                        output,
                        weight: rep.weight,
                    };
                    let r = lock(&self.trust).chain.issue(&work, now_ms());
                    signed.push((output, r.clone()));
                    r
                }
            };
            let claim = SignedFrame::sign(
                &FrameClaim {
                    version: RECEIPT_VERSION,
                    sender: self.endpoint.id(),
                    session,
                    position: start as u64,
                    count: rows as u32,
                    frame: output,
                },
                self.endpoint.secret_key(),
            );
            let msg = Message::Ballot {
                session,
                attempt,
                start_pos: start,
                step_end: end,
                claim: Box::new(BallotClaim {
                    input: ctx.clone(),
                    receipt,
                    frame: claim,
                    upstream: upstream.clone(),
                }),
            };
            let (node, addrs): (NodeId, &[std::net::SocketAddr]) = match receiver {
                Some(r) => (r.node, &r.addrs),
                None => (hop.open.client, &[]),
            };
            if lock(&rep.unreachable).contains(&node) {
                continue;
            }
            sends.push(async move {
                self.delay_if_slow().await;
                let sent = tokio::time::timeout(
                    BALLOT_SEND_TIMEOUT,
                    self.send_ballot(node, addrs, &msg, &frame),
                )
                .await;
                (node, sent)
            });
        }
        // One receiver out of reach is its own problem: the others still get the ballot.
        for (node, sent) in n0_future::join_all(sends).await {
            let failure = match sent {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no delivery in {BALLOT_SEND_TIMEOUT:?}"),
            };
            tracing::debug!(to = %node.fmt_short(), "ballot not delivered: {failure}");
            lock(&rep.unreachable).push(node);
        }
        Ok(())
    }

    /// Runs the step through the hop's layers; a `skip-layer` liar leaves out the middle
    /// layer of its range (two engine calls around it).
    async fn replica_compute(
        &self,
        hop: &HopSession,
        input: ShardInput,
        start: u32,
    ) -> Result<ShardOutput, (Reason, String)> {
        #[cfg(any(feature = "adversary", feature = "internals"))]
        {
            let skip = self.behaves(Lie::SkipLayer);
            let layers = hop.layers();
            if skip && layers.len() >= 3 {
                let middle = layers.start + layers.len() / 2;
                let engine = self.engine.clone();
                let session = hop.open.session;
                let run = move || -> crate::Result<ShardOutput> {
                    use crate::engine::ForwardRequest;
                    let first = engine.forward(
                        ForwardRequest::new(input)
                            .session(session, start as usize)
                            .layers(layers.start..middle),
                    )?;
                    let ShardOutput::Hidden(h) = first else {
                        return Err(crate::Error::Internal(
                            "logits before the last layer".into(),
                        ));
                    };
                    engine.forward(
                        ForwardRequest::new(ShardInput::Hidden(h))
                            .session(session, start as usize)
                            .layers(middle + 1..layers.end)
                            .last_logits_only(),
                    )
                };
                return tokio::task::spawn_blocking(run)
                    .await
                    .map_err(|e| (Reason::Compute, e.to_string()))?
                    .map_err(|e| (Reason::Compute, e.to_string()));
            }
        }
        self.compute(hop, input, start)
            .await
            .map_err(|b| (b.reason, b.message))
    }

    /// Sends one ballot and its frame on a uni stream.
    async fn send_ballot(
        &self,
        node: NodeId,
        addrs: &[std::net::SocketAddr],
        msg: &Message,
        frame: &[u8],
    ) -> Result<(), crate::net::NetError> {
        let conn = self.connection(node, addrs).await?;
        crate::net::proto::send_uni(&conn, msg, Some(frame)).await?;
        self.counters
            .hidden_bytes_sent
            .fetch_add(frame.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Tells the client that this replica failed the step, and why.
    async fn report_failure(&self, hop: &HopSession, reason: Reason, message: String) {
        self.reject();
        self.counters.refused(reason);
        tracing::warn!(session = hop.open.session, %reason, "replicated step failed: {message}");
        let msg = Message::Error {
            session: hop.open.session,
            hop: self.endpoint.id(),
            reason,
            message,
        };
        let _ = self.notify_client(hop, &msg).await;
    }

    /// The frame each receiver gets: the honest one for all of them, unless this node was
    /// told to lie (feature `adversary`).
    #[cfg_attr(
        not(any(feature = "adversary", feature = "internals")),
        allow(unused_variables)
    )]
    fn outputs_to_send(
        &self,
        hop: &HopSession,
        tensor: &Tensor,
        codec: Codec,
        meta: FrameMeta,
        honest: Vec<u8>,
        receivers: usize,
    ) -> Result<Vec<Vec<u8>>, (Reason, String)> {
        #[cfg(any(feature = "adversary", feature = "internals"))]
        if let Some(lie) = *lock(&self.behaviour) {
            return self.lie(hop, lie, tensor, codec, meta, honest, receivers);
        }
        Ok(vec![honest; receivers])
    }

    /// Whether this node was told to lie as `which` (`node --behaviour`; never without the
    /// `adversary` feature).
    #[cfg_attr(
        not(any(feature = "adversary", feature = "internals")),
        allow(unused_variables)
    )]
    fn behaves(&self, which: Lie) -> bool {
        #[cfg(any(feature = "adversary", feature = "internals"))]
        if let Some(b) = *lock(&self.behaviour) {
            use crate::consensus::adversary::Behaviour as B;
            return matches!(
                (which, b),
                (Lie::OneReceipt, B::BadUpstream)
                    | (Lie::Late, B::Slow)
                    | (Lie::SkipLayer, B::SkipLayer)
            );
        }
        false
    }

    /// Whether this node sends every receiver the receipt of its honest output, whatever
    /// bytes it sends (`bad-upstream`).
    fn lies_under_one_receipt(&self) -> bool {
        self.behaves(Lie::OneReceipt)
    }

    /// `slow` answers after the receivers' grace period.
    async fn delay_if_slow(&self) {
        #[cfg(any(feature = "adversary", feature = "internals"))]
        if self.behaves(Lie::Late) {
            tokio::time::sleep(SLOW_DELAY).await;
        }
    }

    /// The frames a lying replica sends (see [`crate::consensus::adversary::Behaviour`]).
    #[cfg(any(feature = "adversary", feature = "internals"))]
    #[allow(clippy::too_many_arguments)]
    fn lie(
        &self,
        hop: &HopSession,
        lie: crate::consensus::adversary::Behaviour,
        tensor: &Tensor,
        codec: Codec,
        meta: FrameMeta,
        honest: Vec<u8>,
        receivers: usize,
    ) -> Result<Vec<Vec<u8>>, (Reason, String)> {
        use crate::consensus::adversary::{self as adv, Behaviour as B};
        let compute = |e: String| (Reason::Compute, e);
        let dims = tensor.dims().to_vec();
        let width = dims.last().copied().unwrap_or(1);
        let values: Vec<f32> = tensor
            .flatten_all()
            .and_then(|t| t.to_dtype(candle_core::DType::F32))
            .and_then(|t| t.to_vec1())
            .map_err(|e| compute(e.to_string()))?;
        let encode = |v: &[f32]| {
            crate::wire::encode_slice(v, &dims, codec, meta, false)
                .map_err(|e| compute(e.to_string()))
        };
        let mut noise = adv::Gaussian::new(meta.position as u64 ^ hop.open.session);
        let rep = hop.replication.as_ref();
        let mut lied = values.clone();
        let all_same = match lie {
            B::Noise => {
                adv::add_noise(&mut lied, width, 0.01, &mut noise);
                true
            }
            B::Scale => {
                adv::scale(&mut lied, 1.02);
                true
            }
            B::Zeros => {
                adv::zero_smallest_half(&mut lied, width);
                true
            }
            B::Stale => {
                let previous = rep.and_then(|r| lock(&r.last_row).clone());
                adv::stale(&mut lied, width, previous.as_deref());
                true
            }
            B::Equivocate | B::BadUpstream => false,
            // Computed differently (skip-layer, wrong-weights) or honest bytes sent late.
            B::SkipLayer | B::WrongWeights | B::Slow => return Ok(vec![honest; receivers]),
        };
        if let Some(r) = rep {
            *lock(&r.last_row) = values.chunks(width).last().map(|row| row.to_vec());
        }
        if all_same {
            return Ok(vec![encode(&lied)?; receivers]);
        }
        // The first receiver gets the honest output, every other one its own noisy copy.
        let mut out = vec![honest];
        for _ in 1..receivers {
            let mut v = values.clone();
            adv::add_noise(&mut v, width, 0.05, &mut noise);
            out.push(encode(&v)?);
        }
        Ok(out)
    }
}

/// The lies the replicated data path itself acts out (the value lies are in `lie`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(
    not(any(feature = "adversary", feature = "internals")),
    allow(dead_code)
)]
enum Lie {
    /// `bad-upstream`: one receipt whatever the bytes.
    OneReceipt,
    /// `slow`: ballots sent late.
    Late,
    /// `skip-layer`: the middle layer left out.
    SkipLayer,
}

/// How late a `slow` replica sends its ballots: far past the receivers' grace period, well
/// inside their deadline.
#[cfg(any(feature = "adversary", feature = "internals"))]
const SLOW_DELAY: Duration = Duration::from_secs(2);
