//! The data path of a hop: live steps relayed hop to hop, and fills / replays that rebuild the
//! KV cache of a node that replaced a failed one.
//!
//! A step (`Step` from the client, `Hidden` from the predecessor, one uni stream each) is
//! computed, recorded in the hop's [`super::SentStates`] and passed on; the last hop samples and
//! sends the token to the client. A fill (`Fill`, a bi request) is computed into the KV cache
//! and passed on as a fill while the hop's index is below `through`; its reply travels back
//! only once the whole chain is filled, so the client's retried step cannot overtake it.

use super::{HopSession, Inner, NodeCounters};
use crate::engine::ForwardRequest;
use crate::error::Error;
use crate::model::sampling::sample;
use crate::model::shard::{ShardInput, ShardOutput};
use crate::net::proto::{read_message, write_message, Message, RouteHop};
use crate::net::{lock, NetError, NodeId, Reason};
use crate::protocol::hop_session::{ChunkOutput, Refused, StepInput, Ticket};
use crate::wire::{
    decode_frame, encode_frame, read_frame, Codec, FrameMeta, OwnedFrame, DEFAULT_MAX_FRAME,
};
use candle_core::{Device, Tensor};
use iroh::endpoint::{Connection, RecvStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Longest a fill (a whole prefix through several hops) may take before the sender gives up.
pub(super) const FILL_TIMEOUT: Duration = Duration::from_secs(120);

/// A failure: the node to blame, why, and what happened.
pub(super) struct Blame {
    /// This hop, or its successor (or a node further down, for a fill's relayed reply).
    pub(super) node: NodeId,
    pub(super) reason: Reason,
    pub(super) message: String,
}

impl Blame {
    fn new(node: NodeId, reason: Reason, message: impl Into<String>) -> Self {
        Blame {
            node,
            reason,
            message: message.into(),
        }
    }

    /// The successor `next` could not be reached or did not take the hidden states.
    fn successor(next: &RouteHop, what: impl std::fmt::Display) -> Self {
        Blame::new(
            next.node,
            Reason::SuccessorUnreachable,
            format!("successor unreachable: {what}"),
        )
    }

    /// The error a hop sends about `session`.
    fn into_message(self, session: u64) -> Message {
        Message::Error {
            session,
            hop: self.node,
            reason: self.reason,
            message: self.message,
        }
    }
}

impl Inner {
    pub(super) async fn handle_data(self: Arc<Self>, remote: NodeId, mut recv: RecvStream) {
        let msg = match tokio::time::timeout(self.read_deadline, read_message(&mut recv)).await {
            Ok(Ok(m)) => m,
            // Garbage counts heavily against its sender (honest peers never send it).
            Ok(Err(NetError::Malformed(_))) => {
                self.strike_malformed(remote);
                return self.reject();
            }
            // A broken stream, or a header trickling in too slowly (slow-loris): dropped.
            Ok(Err(_)) | Err(_) => return self.reject(),
        };
        let (session, attempt, start_pos, input, end) = match &msg {
            Message::Step {
                session,
                attempt,
                start_pos,
                tokens,
            } => (
                *session,
                *attempt,
                *start_pos,
                StepInput::Tokens,
                *start_pos as usize + tokens.len(),
            ),
            Message::Hidden {
                session,
                attempt,
                start_pos,
                step_end,
            } => (
                *session,
                *attempt,
                *start_pos,
                StepInput::Hidden,
                *step_end as usize,
            ),
            Message::Ballot { session, .. } => {
                let Some(hop) = lock(&self.sessions).get(session).cloned() else {
                    return self.reject();
                };
                return self.replicated_ballot(&hop, remote, msg, recv).await;
            }
            _ => return self.reject(),
        };
        let Some(hop) = lock(&self.sessions).get(&session).cloned() else {
            return self.reject();
        };
        if hop.replication.is_some() {
            // Replicated sessions: the client's tokens feed every replica of the first
            // range; hidden states arrive as ballots, never as `Hidden`.
            return match msg {
                Message::Step { tokens, .. } if remote == hop.open.client => {
                    self.replicated_tokens(&hop, remote, attempt, start_pos, tokens)
                        .await
                }
                _ => self.reject(),
            };
        }
        // The machine checks the sender (iroh has authenticated `remote`: only the client
        // may feed the first hop, only the predecessor the others), the kind of input and
        // the step's size; a newer step supersedes one still in flight.
        let begun = lock(&hop.state).begin_step(remote, input, attempt, start_pos as usize, end);
        let ticket = match begun {
            Ok(ticket) => ticket,
            Err(Refused::Report(reason, message)) => {
                let me = self.endpoint.id();
                return self
                    .report_node(&hop, Blame::new(me, reason, message))
                    .await;
            }
            // A duplicate or a stream overtaken by its retry: not hostile, not to be run.
            Err(Refused::Stale) => {
                tracing::debug!(session, attempt, "dropped a stale step attempt");
                return;
            }
            Err(Refused::Silently | Refused::Superseded) => return self.reject(),
        };
        let source = match msg {
            Message::Step { tokens, .. } => ChunkSource::Tokens {
                tokens,
                next: start_pos as usize,
                // 0: the whole step in one chunk.
                chunk: match self.engine.prefill_chunk() {
                    0 => usize::MAX,
                    c => c,
                },
                end,
            },
            _ => ChunkSource::Frames {
                recv,
                next: start_pos as usize,
                end,
                session,
            },
        };
        #[cfg(feature = "internals")]
        if self.misbehave_on_step(&hop, source.end()).await {
            return;
        }
        if let Err(blame) = self.run_step(&hop, ticket, attempt, source).await {
            self.report_node(&hop, blame).await;
        }
    }

    /// Lies as the test told this node to, before the step `..step_end` runs; `true` when
    /// the lie replaces the step.
    #[cfg(feature = "internals")]
    async fn misbehave_on_step(&self, hop: &HopSession, step_end: usize) -> bool {
        use super::misbehaviour::Misbehaviour;
        let how = *lock(&self.misbehaviour);
        let Some(next) = hop.open.route.get(hop.index + 1) else {
            return false;
        };
        match how {
            Misbehaviour::ForgeToken(token) => {
                let forged = Message::Token {
                    session: hop.open.session,
                    position: step_end as u32,
                    token,
                };
                let _ = self.notify_client(hop, &forged).await;
                false
            }
            Misbehaviour::BlameSuccessor => {
                let lie = Blame::successor(next, "forged: the successor is fine");
                self.report_node(hop, lie).await;
                true
            }
            _ => false,
        }
    }

    /// A live step, chunk by chunk: each chunk is computed and passed on at once on one
    /// stream to the successor (which computes it while this hop computes the next one: long
    /// prompts pipeline across hops); the last hop samples after the step's last chunk.
    ///
    /// The hop machine decides each chunk's fate before it is computed: a chunk out of
    /// order is the feeder's fault, and a step superseded by a newer one stops quietly.
    async fn run_step(
        &self,
        hop: &Arc<HopSession>,
        ticket: Ticket,
        attempt: u64,
        mut source: ChunkSource,
    ) -> Result<(), Blame> {
        let me = self.endpoint.id();
        let session = hop.open.session;
        let step_end = source.end();
        let mut successor: Option<(&RouteHop, iroh::endpoint::SendStream)> = None;
        while let Some(chunk) = source.next(&self.counters).await {
            let (input, start_pos) = chunk.map_err(|e| Blame::new(me, Reason::Malformed, e))?;
            let rows = match &input {
                ShardInput::Tokens(t) | ShardInput::Hidden(t) => t.dim(1).unwrap_or(0),
            };
            let fate = lock(&hop.state).chunk(ticket, start_pos as usize, rows);
            let fate = match fate {
                Ok(fate) => fate,
                Err(Refused::Report(reason, message)) => {
                    return Err(Blame::new(me, reason, message))
                }
                // A retry of this step took over: its driver sends the result.
                Err(Refused::Superseded | Refused::Silently | Refused::Stale) => return Ok(()),
            };
            let out = self.compute(hop, input, start_pos).await?;
            self.counters.steps.fetch_add(1, Ordering::Relaxed);
            match (out, fate) {
                (ShardOutput::Hidden(h), ChunkOutput::SendOn { .. }) => {
                    let frame = self
                        .encode_and_record(hop, start_pos, &h)
                        .map_err(|e| Blame::new(me, Reason::Compute, e))?;
                    let (next, send) = match &mut successor {
                        Some((next, send)) => (*next, send),
                        None => {
                            let next = hop.open.route.get(hop.index + 1).ok_or_else(|| {
                                Blame::new(me, Reason::Compute, "hidden state on the last hop")
                            })?;
                            let msg = Message::Hidden {
                                session,
                                attempt,
                                start_pos,
                                step_end: step_end as u32,
                            };
                            let send = self.open_hidden(next, &msg).await?;
                            let (next, send) = successor.insert((next, send));
                            (*next, send)
                        }
                    };
                    send.write_all(&frame)
                        .await
                        .map_err(|e| Blame::successor(next, e))?;
                    self.counters
                        .hidden_bytes_sent
                        .fetch_add(frame.len() as u64, Ordering::Relaxed);
                }
                (ShardOutput::Logits(l), ChunkOutput::Sample) => self
                    .send_token(hop, step_end, &l)
                    .await
                    .map_err(|e| Blame::new(me, Reason::Compute, e.to_string()))?,
                // Earlier chunks of a long step only fill the cache.
                (ShardOutput::Logits(_), ChunkOutput::CacheOnly) => {}
                (_, fate) => {
                    return Err(Blame::new(
                        me,
                        Reason::Compute,
                        format!("the engine's output does not fit the chunk's fate {fate:?}"),
                    ))
                }
            }
        }
        match lock(&hop.state).end_step(ticket) {
            Ok(()) | Err(Refused::Superseded | Refused::Silently | Refused::Stale) => {}
            Err(Refused::Report(reason, message)) => return Err(Blame::new(me, reason, message)),
        }
        if let Some((next, mut send)) = successor {
            send.finish().map_err(|e| Blame::successor(next, e))?;
        }
        Ok(())
    }

    pub(super) fn reject(&self) {
        self.counters.rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// `Fill` request: checks the sender like a step, computes, passes on; the reply says
    /// whether the whole chain up to `through` was filled.
    pub(super) async fn fill(
        self: &Arc<Self>,
        remote: NodeId,
        session: u64,
        start_pos: u32,
        through: u32,
        tokens: Vec<u32>,
        recv: &mut RecvStream,
    ) -> Message {
        let Some(hop) = lock(&self.sessions).get(&session).cloned() else {
            self.reject();
            return self.error_msg(
                session,
                Reason::UnknownSession,
                format!("unknown session {session}"),
            );
        };
        // A replica of a replicated session (a referee catching up after a split) is fed
        // by any replica of the previous range, which keeps what it sent.
        let may_feed = match &hop.replication {
            Some(rep) if hop.index > 0 => rep.place.feeders.contains(&remote),
            _ => remote == hop.feeder(),
        };
        if !may_feed || (hop.index == 0) == tokens.is_empty() {
            self.reject();
            return self.error_msg(
                session,
                Reason::NotAllowed,
                "fill from a node that does not feed this hop".into(),
            );
        }
        let input = if hop.index == 0 {
            tokens_input(&tokens).map(|t| (t, super::replicated::tokens_hash(&tokens)))
        } else {
            hidden_input_hashed(recv, &self.counters).await
        };
        let result = match input {
            Ok((input, frame)) => {
                let rows = match &input {
                    ShardInput::Tokens(t) | ShardInput::Hidden(t) => t.dim(1).unwrap_or(0),
                };
                let filled = self.run_fill(&hop, input, start_pos, through).await;
                if let (Ok(()), Some(rep)) = (&filled, &hop.replication) {
                    let end = start_pos + rows as u32;
                    rep.filled(session, hop.open.codec, start_pos, end, frame);
                }
                filled
            }
            Err(e) => Err(Blame::new(self.endpoint.id(), Reason::Malformed, e)),
        };
        match result {
            Ok(()) => Message::Ok,
            Err(blame) => blame.into_message(session),
        }
    }

    /// `Replay` request from the session's client: re-sends the hidden states this hop sent
    /// for positions `0..upto` to its (new) successor as a fill.
    pub(super) async fn replay(
        self: &Arc<Self>,
        remote: NodeId,
        session: u64,
        upto: u32,
        through: u32,
    ) -> Message {
        let Some(hop) = lock(&self.sessions).get(&session).cloned() else {
            self.reject();
            return self.error_msg(
                session,
                Reason::UnknownSession,
                format!("unknown session {session}"),
            );
        };
        if remote != hop.open.client {
            self.reject();
            return self.error_msg(
                session,
                Reason::NotAllowed,
                "only the session's client may ask a replay".into(),
            );
        }
        let rows = {
            let sent = lock(&hop.sent);
            match sent.prefix(upto as usize) {
                Some(rows) => Ok((rows.to_vec(), sent.width())),
                None => Err(format!(
                    "asked to replay {upto} positions, {} recorded",
                    sent.positions()
                )),
            }
        };
        let (rows, width) = match rows {
            Ok(r) => r,
            Err(e) => return self.error_msg(session, Reason::Malformed, e),
        };
        if upto == 0 {
            return Message::Ok;
        }
        // In a replicated session the only node ever replayed into is the next range's
        // referee, added after that range's vote split: the replicas that agreed keep their
        // caches, and a lost one is voted without, never replaced.
        let next = match &hop.replication {
            Some(_) => hop.open.referee(hop.index + 1).and_then(|referee| {
                hop.open
                    .replicas
                    .get(hop.index + 1)?
                    .iter()
                    .find(|h| h.node == referee)
            }),
            None => hop.open.route.get(hop.index + 1),
        };
        let Some(next) = next else {
            return self.error_msg(
                session,
                Reason::Unexpected,
                "no successor (or, in a replicated session, no referee) to replay into".into(),
            );
        };
        // The rows are what the successor decoded originally: resend them losslessly.
        let frame = encode_frame(
            &match Tensor::from_vec(rows, (1, upto as usize, width), &Device::Cpu) {
                Ok(t) => t,
                Err(e) => return self.error_msg(session, Reason::Compute, e.to_string()),
            },
            Codec::F32,
            FrameMeta {
                session,
                position: 0,
            },
            false,
        );
        let frame = match frame {
            Ok(f) => f,
            Err(e) => return self.error_msg(session, Reason::Compute, e.to_string()),
        };
        let msg = Message::Fill {
            session,
            start_pos: 0,
            through,
            tokens: Vec::new(),
        };
        self.counters.replays.fetch_add(1, Ordering::Relaxed);
        match self.send_fill(next, &msg, &frame).await {
            Ok(()) => Message::Ok,
            Err(blame) => blame.into_message(session),
        }
    }

    /// Runs `input` at `start_pos` through the hop's layers (logits of the last position on
    /// the last hop) on a blocking thread.
    pub(super) async fn compute(
        &self,
        hop: &HopSession,
        input: ShardInput,
        start_pos: u32,
    ) -> Result<ShardOutput, Blame> {
        let me = self.endpoint.id();
        let rows = match &input {
            ShardInput::Tokens(t) | ShardInput::Hidden(t) => t.dim(1).unwrap_or(0),
        };
        let mut req = ForwardRequest::new(input)
            .session(hop.open.session, start_pos as usize)
            .layers(hop.layers())
            .last_logits_only();
        if let Some(adapter) = &hop.adapter {
            req = req.pinned_adapter(adapter.clone());
        }
        let t0 = std::time::Instant::now();
        // Decode steps batch with other sessions' (bit-identical results); prompts run alone.
        let out = if rows == 1 {
            self.batcher.run(req).await
        } else {
            // Waits its turn without holding a thread: a flood of prompt steps queues here
            // instead of parking the blocking pool.
            let _slot = self
                .compute_slots
                .acquire()
                .await
                .map_err(|e| Blame::new(me, Reason::Compute, e.to_string()))?;
            let engine = self.engine.clone();
            tokio::task::spawn_blocking(move || engine.forward(req))
                .await
                .unwrap_or_else(|e| Err(Error::Internal(format!("compute task failed: {e}"))))
        };
        self.counters
            .compute_us
            .fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
        out.map_err(|e| Blame::new(me, engine_reason(&e), e.to_string()))
    }

    /// A fill: computes `input` at `start_pos` into the KV cache and passes it on as a fill
    /// while this hop's index is below `through`.
    pub(super) async fn run_fill(
        &self,
        hop: &Arc<HopSession>,
        input: ShardInput,
        start_pos: u32,
        through: u32,
    ) -> Result<(), Blame> {
        let me = self.endpoint.id();
        let out = self.compute(hop, input, start_pos).await?;
        self.counters.fills.fetch_add(1, Ordering::Relaxed);
        let ShardOutput::Hidden(h) = out else {
            return Ok(());
        };
        if hop.index as u32 >= through {
            return Ok(());
        }
        let next = hop
            .open
            .route
            .get(hop.index + 1)
            .ok_or_else(|| Blame::new(me, Reason::Compute, "hidden state on the last hop"))?;
        let frame = self
            .encode_and_record(hop, start_pos, &h)
            .map_err(|e| Blame::new(me, Reason::Compute, e))?;
        let msg = Message::Fill {
            session: hop.open.session,
            start_pos,
            through,
            tokens: Vec::new(),
        };
        self.send_fill(next, &msg, &frame).await
    }

    /// Encodes the hidden state with the session's codec and records what the successor will
    /// decode (so a later replay is bit-identical).
    fn encode_and_record(
        &self,
        hop: &HopSession,
        start_pos: u32,
        hidden: &Tensor,
    ) -> Result<Vec<u8>, String> {
        let meta = FrameMeta {
            session: hop.open.session,
            position: start_pos,
        };
        let frame = encode_frame(hidden, hop.codec, meta, false).map_err(|e| e.to_string())?;
        let (decoded, _) = decode_frame(&frame, frame.len()).map_err(|e| e.to_string())?;
        let width = hidden.dims().last().copied().unwrap_or(0);
        let values = decoded.to_f32().map_err(|e| e.to_string())?;
        lock(&hop.sent).record(start_pos as usize, width, &values);
        Ok(frame)
    }

    /// Opens the stream that carries a step's hidden states to the successor and writes its
    /// header; the frames follow chunk by chunk. A failure to reach it blames the successor, so
    /// the client replaces that node, not this one.
    async fn open_hidden(
        &self,
        next: &RouteHop,
        msg: &Message,
    ) -> Result<iroh::endpoint::SendStream, Blame> {
        let blame = |e: String| Blame::successor(next, e);
        let conn = self
            .connection(next.node, &next.addrs)
            .await
            .map_err(|e| blame(e.to_string()))?;
        let mut send = conn.open_uni().await.map_err(|e| blame(e.to_string()))?;
        write_message(&mut send, msg)
            .await
            .map_err(|e| blame(e.to_string()))?;
        Ok(send)
    }

    /// Sends a fill to the successor (bi stream) and waits until the chain behind it is filled.
    async fn send_fill(&self, next: &RouteHop, msg: &Message, frame: &[u8]) -> Result<(), Blame> {
        let blame = |e: String| Blame::successor(next, e);
        let conn = self
            .connection(next.node, &next.addrs)
            .await
            .map_err(|e| blame(e.to_string()))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| blame(e.to_string()))?;
        write_message(&mut send, msg)
            .await
            .map_err(|e| blame(e.to_string()))?;
        send.write_all(frame)
            .await
            .map_err(|e| blame(e.to_string()))?;
        self.counters
            .hidden_bytes_sent
            .fetch_add(frame.len() as u64, Ordering::Relaxed);
        send.finish().map_err(|e| blame(e.to_string()))?;
        match tokio::time::timeout(FILL_TIMEOUT, read_message(&mut recv)).await {
            Ok(Ok(Message::Ok)) => Ok(()),
            // The chain behind the successor failed: pass its blame on.
            Ok(Ok(Message::Error {
                hop,
                reason,
                message,
                ..
            })) => Err(Blame::new(hop, reason, message)),
            Ok(Ok(other)) => Err(blame(format!("unexpected reply {other:?}"))),
            Ok(Err(e)) => Err(blame(e.to_string())),
            Err(_) => Err(blame(format!(
                "no fill reply within {} s",
                FILL_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Samples the token at `position` (one past the last input position) and sends it to the
    /// client. The draw depends only on (seed, position), like local generation.
    async fn send_token(
        &self,
        hop: &HopSession,
        position: usize,
        logits: &Tensor,
    ) -> Result<(), NetError> {
        if hop.open.return_logits {
            return self.send_logits(hop, position, logits).await;
        }
        let row: Vec<f32> = logits
            .flatten_all()
            .and_then(|l| l.to_vec1())
            .map_err(|e| NetError::Malformed(e.to_string()))?;
        let token = {
            let mut context = lock(&hop.context);
            if position < hop.open.prompt.len() {
                // The end of a chunk inside the prompt (a long prompt arrives in several
                // steps): the prompt stays the context, and this token is not fed back.
                sample(&row, &hop.open.sampling, position, &context[..position])
                    .map_err(|e| NetError::Malformed(e.to_string()))?
            } else {
                // Positions 0..position are the tokens fed so far; a retried step overwrites.
                context.truncate(position);
                let t = sample(&row, &hop.open.sampling, position, &context)
                    .map_err(|e| NetError::Malformed(e.to_string()))?;
                context.push(t);
                t
            }
        };
        let msg = Message::Token {
            session: hop.open.session,
            position: position as u32,
            token,
        };
        self.notify_client(hop, &msg).await
    }

    /// Sends the logits predicting `position` to the client (sessions that decode themselves).
    async fn send_logits(
        &self,
        hop: &HopSession,
        position: usize,
        logits: &Tensor,
    ) -> Result<(), NetError> {
        let session = hop.open.session;
        let vocab = logits.elem_count();
        let row = logits
            .reshape((1, 1, vocab))
            .map_err(|e| NetError::Malformed(e.to_string()))?;
        let meta = FrameMeta {
            session,
            position: position as u32,
        };
        let frame = encode_frame(&row, Codec::F32, meta, false)
            .map_err(|e| NetError::Malformed(e.to_string()))?;
        let msg = Message::Logits {
            session,
            position: position as u32,
        };
        let conn = self.connection(hop.open.client, &[]).await?;
        crate::net::proto::send_uni(&conn, &msg, Some(&frame)).await
    }

    /// Sends `msg` to the session's client on a uni stream.
    pub(super) async fn notify_client(
        &self,
        hop: &HopSession,
        msg: &Message,
    ) -> Result<(), NetError> {
        let conn = self.connection(hop.open.client, &[]).await?;
        crate::net::proto::send_uni(&conn, msg, None).await
    }

    /// Tells the client who failed on its session (this hop or its successor), and why.
    async fn report_node(&self, hop: &HopSession, blame: Blame) {
        self.reject();
        self.counters.refused(blame.reason);
        tracing::warn!(
            session = hop.open.session,
            blamed = %blame.node.fmt_short(),
            reason = %blame.reason,
            "step failed: {}",
            blame.message
        );
        let msg = blame.into_message(hop.open.session);
        let _ = self.notify_client(hop, &msg).await;
    }

    /// A live connection to `node`: cached (either direction), or dialed at `addrs`.
    pub(super) async fn connection(
        &self,
        node: NodeId,
        addrs: &[std::net::SocketAddr],
    ) -> Result<Connection, NetError> {
        let (conn, _) = self.conns.get_or_dial(&self.endpoint, node, addrs).await?;
        Ok(conn)
    }
}

/// Token ids as the first hop's input.
fn tokens_input(tokens: &[u32]) -> Result<ShardInput, String> {
    Tensor::from_slice(tokens, (1, tokens.len()), &Device::Cpu)
        .map(ShardInput::Tokens)
        .map_err(|e| e.to_string())
}

/// Where a step's chunks come from: the client's tokens (first hop), cut into chunks of the
/// engine's prefill size, or the predecessor's frames on one stream, read as they arrive.
enum ChunkSource {
    Tokens {
        tokens: Vec<u32>,
        next: usize,
        chunk: usize,
        end: usize,
    },
    Frames {
        recv: RecvStream,
        next: usize,
        end: usize,
        session: u64,
    },
}

impl ChunkSource {
    /// The position after the step's last row.
    fn end(&self) -> usize {
        match self {
            ChunkSource::Tokens { end, .. } | ChunkSource::Frames { end, .. } => *end,
        }
    }

    /// The next chunk and its first position; `None` once the step's rows are all read.
    /// The next chunk; frame bytes read count into `counters`.
    async fn next(&mut self, counters: &NodeCounters) -> Option<Result<(ShardInput, u32), String>> {
        match self {
            ChunkSource::Tokens {
                tokens,
                next,
                chunk,
                end,
            } => {
                if *next >= *end {
                    return None;
                }
                let first = *end - tokens.len();
                let upto = next.saturating_add(*chunk).min(*end);
                let input = tokens_input(&tokens[*next - first..upto - first]);
                let start = *next as u32;
                *next = upto;
                Some(input.map(|i| (i, start)))
            }
            ChunkSource::Frames {
                recv,
                next,
                end,
                session,
            } => {
                if *next >= *end {
                    return None;
                }
                let read = async {
                    let frame = read_frame(recv, DEFAULT_MAX_FRAME)
                        .await
                        .map_err(|e| e.to_string())?;
                    count_received(counters, &frame);
                    let frame = frame.as_frame();
                    let (dims, position) = (&frame.header.dims, frame.header.position as usize);
                    let rows = match dims[..] {
                        [1, rows, _] if rows > 0 => rows,
                        _ => return Err(format!("hidden-state frame of shape {dims:?}")),
                    };
                    // Where the frame sits in the step is the hop machine's to check.
                    if frame.header.session != *session {
                        return Err(format!(
                            "hidden-state frame for session {}, expected session {session}",
                            frame.header.session
                        ));
                    }
                    let input = frame.to_tensor().map_err(|e| e.to_string())?;
                    Ok((ShardInput::Hidden(input), position, rows))
                };
                Some(read.await.map(|(input, position, rows)| {
                    *next = position.saturating_add(rows);
                    (input, position as u32)
                }))
            }
        }
    }
}

/// Counts a received hidden-state frame (header and payload) into `counters`.
fn count_received(counters: &NodeCounters, frame: &OwnedFrame) {
    let bytes = frame.header().encoded_len() + frame.payload().len();
    counters
        .hidden_bytes_received
        .fetch_add(bytes as u64, Ordering::Relaxed);
}

/// A hidden-state frame read from `recv` as a hop's input, with blake3 of its payload (what
/// a replica's prefix chain commits to).
async fn hidden_input_hashed(
    recv: &mut RecvStream,
    counters: &NodeCounters,
) -> Result<(ShardInput, [u8; 32]), String> {
    let frame = read_frame(recv, DEFAULT_MAX_FRAME)
        .await
        .map_err(|e| e.to_string())?;
    count_received(counters, &frame);
    let hash = *blake3::hash(frame.payload()).as_bytes();
    frame
        .as_frame()
        .to_tensor()
        .map(|t| (ShardInput::Hidden(t), hash))
        .map_err(|e| e.to_string())
}

/// The reason a failed engine call gives the client: limits are the caller's to respect, bad
/// input is the caller's fault, anything else failed here.
fn engine_reason(error: &Error) -> Reason {
    use crate::ErrorKind as K;
    match error.kind() {
        K::BadInput | K::HiddenSize | K::HiddenDtype | K::TokenOutOfRange | K::PositionGap => {
            Reason::Malformed
        }
        K::UnknownSession => Reason::UnknownSession,
        K::SessionsFull | K::SessionTooLong => Reason::OverLimit,
        _ => Reason::Compute,
    }
}
