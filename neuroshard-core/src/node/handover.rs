//! Leaving the swarm gracefully: KV-cache hand-over to a replica, so sessions continue without
//! a replay.
//!
//! 1. [`Node::begin_leave`] stops announcing and refuses new sessions, and tells each live
//!    session's client which replica of the hop's layers can take the session (`Leaving`):
//!    the least-loaded one that answers a ping (announcements outlive dead nodes by their TTL).
//! 2. At its next step boundary (nothing in flight) the client signs a session-open with the
//!    replica in the leaving node's place, naming the hand-over `(leaving, replica)`, and sends
//!    it to every hop of the new route; then it asks the leaving node to `Handover`.
//! 3. The leaving node sends `Import` with the session's K/V per layer (f32, exact) and the
//!    hidden states it had sent; the replica accepts it only from the node the client named.
//! 4. The client closes the session on the leaving node; [`LeaveHandle::finish`] returns once
//!    every session is gone or the grace period is over (sessions left fail over as usual).

use super::relay::FILL_TIMEOUT;
use super::{HopSession, Inner, Node};
use crate::net::proto::{read_message, request_on, write_message, Message, RouteHop, MAX_CONTROL};
use crate::net::{lock, now_ms, NodeId, Reason};
use crate::wire::{read_frame, write_frame, Codec, FrameMeta, DEFAULT_MAX_FRAME};
use candle_core::Tensor;
use iroh::endpoint::RecvStream;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// A node that has started leaving (see [`Node::begin_leave`]).
#[derive(Debug)]
pub struct LeaveHandle {
    node: Node,
    /// Sessions whose client was told where to move.
    pub notified: usize,
    /// Sessions for which no replica was known (they fail over when the node stops).
    pub without_replica: usize,
}

/// How leaving went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaveReport {
    /// Sessions whose clients were told to move.
    pub notified: usize,
    /// Sessions handed over to a replica.
    pub handed_over: u64,
    /// Sessions still open when the grace period ended (their clients fail over).
    pub left_behind: usize,
}

impl Node {
    /// Starts a graceful exit: stops announcing, refuses new sessions and tells every live
    /// session's client which replica can take its KV cache. Returns once the clients were
    /// notified; [`LeaveHandle::finish`] waits for the hand-overs and shuts the node down.
    pub async fn begin_leave(&self) -> LeaveHandle {
        let inner = &self.inner;
        inner.leaving.store(true, Ordering::Relaxed);
        let sessions: Vec<Arc<HopSession>> = lock(&inner.sessions).values().cloned().collect();
        let (mut notified, mut without_replica) = (0, 0);
        for hop in sessions {
            let replacement = inner.live_replacement_for(&hop).await;
            if replacement.is_none() {
                without_replica += 1;
            }
            let msg = Message::Leaving {
                session: hop.open.session,
                node: inner.endpoint.id(),
                replacement,
            };
            if inner.notify_client(&hop, &msg).await.is_ok() {
                notified += 1;
            }
        }
        LeaveHandle {
            node: self.clone(),
            notified,
            without_replica,
        }
    }
}

impl LeaveHandle {
    /// Waits until every session was handed over or closed, at most `grace`, then shuts the
    /// node down.
    pub async fn finish(self, grace: Duration) -> LeaveReport {
        let inner = &self.node.inner;
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            // Registered before the check, so a removal in between still wakes us.
            let changed = inner.sessions_changed.notified();
            if lock(&inner.sessions).is_empty() {
                break;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                break;
            }
        }
        let left_behind = lock(&inner.sessions).len();
        self.node.shutdown().await;
        LeaveReport {
            notified: self.notified,
            handed_over: inner.counters.handovers_out.load(Ordering::Relaxed),
            left_behind,
        }
    }
}

/// How long a candidate replica may take to answer a ping before the next one is tried.
const REPLICA_PING_TIMEOUT: Duration = Duration::from_millis(800);

impl Inner {
    /// The least-loaded replica for the hop that answers a ping. An announcement outlives
    /// its node by up to its TTL, so proposing a replica unchecked can send the client to a
    /// dead node and turn a clean hand-over into a failover.
    async fn live_replacement_for(&self, hop: &HopSession) -> Option<RouteHop> {
        for candidate in self.replacements_for(hop) {
            let alive = tokio::time::timeout(REPLICA_PING_TIMEOUT, async {
                let conn = self.connection(candidate.node, &candidate.addrs).await?;
                request_on(&conn, &Message::Ping, MAX_CONTROL).await
            })
            .await;
            if matches!(alive, Ok(Ok(Message::Ok))) {
                return Some(candidate);
            }
        }
        None
    }

    /// Usable replicas that hold the hop's layers and are not on the route already, least
    /// loaded first.
    fn replacements_for(&self, hop: &HopSession) -> Vec<RouteHop> {
        let me = self.endpoint.id();
        let want = &hop.open.route[hop.index].layers;
        let now = now_ms();
        let peers = lock(&self.peers);
        let mut found: Vec<(u32, RouteHop)> = peers
            .iter()
            .filter(|(id, e)| {
                let a = &e.announcement;
                **id != me
                    && e.usable(now)
                    && a.layers.start <= want.start
                    && a.layers.end >= want.end
                    && !hop.open.route.iter().any(|h| h.node == **id)
            })
            .map(|(id, e)| {
                let hop = RouteHop {
                    node: *id,
                    layers: want.clone(),
                    addrs: e.announcement.addrs.clone(),
                };
                (e.announcement.load, hop)
            })
            .collect();
        found.sort_by_key(|(load, _)| *load);
        found.into_iter().map(|(_, hop)| hop).collect()
    }

    /// `Handover` from the session's client: sends the session's cache to `to`.
    pub(super) async fn hand_over(
        self: &Arc<Self>,
        remote: NodeId,
        session: u64,
        to: RouteHop,
    ) -> Message {
        let Some(hop) = lock(&self.sessions).get(&session).cloned() else {
            return self.error_msg(
                session,
                Reason::UnknownSession,
                format!("unknown session {session}"),
            );
        };
        if remote != hop.open.client {
            self.counters.rejected.fetch_add(1, Ordering::Relaxed);
            return self.error_msg(
                session,
                Reason::NotAllowed,
                "only the session's client may move it".into(),
            );
        }
        match self.send_cache(&hop, &to).await {
            Ok(()) => {
                self.counters.handovers_out.fetch_add(1, Ordering::Relaxed);
                Message::Ok
            }
            Err(e) => self.error_msg(
                session,
                Reason::SuccessorUnreachable,
                format!("hand-over to {}: {e}", to.node.fmt_short()),
            ),
        }
    }

    async fn send_cache(&self, hop: &HopSession, to: &RouteHop) -> Result<(), String> {
        let session = hop.open.session;
        let layers = hop.layers();
        let kv = self
            .engine
            .export_session(session, layers.clone())
            .map_err(|e| e.to_string())?;
        let positions = kv.first().map(|(k, _)| k.dim(2).unwrap_or(0)).unwrap_or(0);
        let (sent_rows, sent) = {
            let sent = lock(&hop.sent);
            let n = sent.positions().min(positions);
            let rows = sent.prefix(n).unwrap_or_default().to_vec();
            (n, (rows, sent.width()))
        };
        let conn = self
            .connection(to.node, &to.addrs)
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let msg = Message::Import {
            session,
            layers: layers.start as u32..layers.end as u32,
            positions: positions as u32,
            sent_rows: sent_rows as u32,
        };
        write_message(&mut send, &msg)
            .await
            .map_err(|e| e.to_string())?;
        let meta = FrameMeta {
            session,
            position: 0,
        };
        for (k, v) in &kv {
            for t in [k, v] {
                let t = t.contiguous().map_err(|e| e.to_string())?;
                write_frame(&mut send, &t, Codec::F32, meta, true)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        if sent_rows > 0 {
            let (rows, width) = sent;
            let t = Tensor::from_vec(rows, (1, sent_rows, width), &candle_core::Device::Cpu)
                .map_err(|e| e.to_string())?;
            write_frame(&mut send, &t, Codec::F32, meta, true)
                .await
                .map_err(|e| e.to_string())?;
        }
        send.finish().map_err(|e| e.to_string())?;
        match tokio::time::timeout(FILL_TIMEOUT, read_message(&mut recv)).await {
            Ok(Ok(Message::Ok)) => Ok(()),
            Ok(Ok(Message::Error { message, .. })) => Err(message),
            Ok(Ok(other)) => Err(format!("unexpected reply {other:?}")),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no reply to the import".into()),
        }
    }

    /// `Import` from a leaving node: accepted only when the session's current open names the
    /// hand-over from `remote` to this node, for exactly this hop's layers.
    pub(super) async fn import(
        self: &Arc<Self>,
        remote: NodeId,
        session: u64,
        layers: Range<u32>,
        positions: u32,
        sent_rows: u32,
        recv: &mut RecvStream,
    ) -> Message {
        match self
            .import_inner(remote, session, layers, positions, sent_rows, recv)
            .await
        {
            Ok(()) => {
                self.counters.handovers_in.fetch_add(1, Ordering::Relaxed);
                Message::Ok
            }
            Err(e) => {
                self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                self.error_msg(session, Reason::NotAllowed, e)
            }
        }
    }

    async fn import_inner(
        &self,
        remote: NodeId,
        session: u64,
        layers: Range<u32>,
        positions: u32,
        sent_rows: u32,
        recv: &mut RecvStream,
    ) -> Result<(), String> {
        let hop = lock(&self.sessions)
            .get(&session)
            .cloned()
            .ok_or_else(|| format!("unknown session {session}"))?;
        if hop.open.handover != Some((remote, self.endpoint.id())) {
            return Err("the session's open does not authorise this hand-over".into());
        }
        let ours = hop.layers();
        if ours != (layers.start as usize..layers.end as usize) {
            return Err(format!(
                "cache for layers {layers:?}, this hop runs {ours:?}"
            ));
        }
        let mut kv = Vec::with_capacity(ours.len());
        for _ in ours.clone() {
            let k = read_tensor(recv).await?;
            let v = read_tensor(recv).await?;
            kv.push((k, v));
        }
        let sent = if sent_rows > 0 {
            let t = read_tensor(recv).await?;
            let width = t.dims().last().copied().unwrap_or(0);
            if t.dims() != [1, sent_rows as usize, width] {
                return Err(format!("sent states of shape {:?}", t.dims()));
            }
            let rows: Vec<f32> = t
                .flatten_all()
                .and_then(|t| t.to_vec1())
                .map_err(|e| e.to_string())?;
            Some((width, rows))
        } else {
            None
        };
        let len = self
            .engine
            .import_session(session, ours, kv)
            .map_err(|e| e.to_string())?;
        if len != positions as usize {
            return Err(format!("announced {positions} positions, received {len}"));
        }
        if let Some((width, rows)) = sent {
            lock(&hop.sent).replace(width, rows);
        }
        Ok(())
    }
}

/// Reads one f32 frame as a tensor.
async fn read_tensor(recv: &mut RecvStream) -> Result<Tensor, String> {
    let frame = read_frame(recv, DEFAULT_MAX_FRAME)
        .await
        .map_err(|e| e.to_string())?;
    frame.as_frame().to_tensor().map_err(|e| e.to_string())
}
