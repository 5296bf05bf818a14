//! Per-peer caps a node enforces before it spends anything on a peer: connections (per peer
//! and in total), streams in flight, and the rate of requests.
//!
//! The request-rate bucket and the stream counts are IO-less (time is passed in). The
//! connection gate is an iroh endpoint hook: it runs once a QUIC handshake has authenticated
//! the peer's key, before any protocol sees the connection, so a refused connection costs the
//! node one handshake. It covers every protocol of the endpoint (inference and gossip).
//!
//! Per-peer caps alone fall to fresh keys (a key costs nothing), so every per-peer cap has a
//! node-wide bound beside it: total connections here, the session capacity and memory budget
//! in admission, and the QUIC transport limits of [`super::endpoint::TransportLimits`].

use super::admission::Refusal;
use super::{lock, now_ms, NodeId, Reason};
use iroh::endpoint::WeakConnectionHandle;
use iroh::endpoint::{AfterHandshakeOutcome, Connection, EndpointHooks, Side, VarInt};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The QUIC application close code of a connection refused by [`ConnectionGate`] (its reason
/// text starts with `over-limit`).
pub const OVER_LIMIT_CLOSE_CODE: u32 = 429;

/// Caps on what one peer, and all peers together, may hold on a node. Every field is a
/// [`crate::NodeOptions`] setting; the defaults serve a few dozen clients from a laptop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeerLimits {
    /// Incoming connections one peer may hold at once (an honest client or node needs one
    /// per protocol).
    pub max_connections_per_peer: usize,
    /// Incoming connections of all peers together.
    pub max_connections: usize,
    /// Streams (requests and data) one peer may have in flight here at once, over all its
    /// connections; past it, a request is answered `over-limit` and a data stream is stopped.
    pub max_streams_per_peer: usize,
    /// Requests (bi streams) one peer may send per second, on average.
    pub requests_per_second: u32,
    /// Requests one peer may send at once after being quiet (the bucket's size).
    pub request_burst: u32,
}

impl Default for PeerLimits {
    fn default() -> Self {
        PeerLimits {
            max_connections_per_peer: 4,
            max_connections: 256,
            max_streams_per_peer: 128,
            requests_per_second: 100,
            request_burst: 200,
        }
    }
}

/// Most peers whose request rate is tracked at once; full buckets (peers quiet for a while)
/// are forgotten first, since they hold no state.
const MAX_TRACKED_PEERS: usize = 1 << 16;

/// A token bucket per peer: each request takes one token, tokens come back at the configured
/// rate up to the burst.
#[derive(Debug)]
pub(crate) struct RequestRate {
    per_second: f64,
    burst: f64,
    buckets: HashMap<NodeId, Bucket>,
}

/// One peer's request budget: `tokens` left, and `strikes` (refusals, draining at the same
/// rate as tokens return), as of `at_ms`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    strikes: f64,
    at_ms: u64,
}

/// Refusals one undecodable message counts as (see [`RequestRate::strike_malformed`]):
/// with the default burst of 200, the 21st garbage message gets its sender banned.
pub(crate) const MALFORMED_STRIKES: f64 = 10.0;

/// How long a peer that ignores its refusals stays banned.
pub(crate) const BAN_MS: u64 = 10_000;

impl RequestRate {
    /// Buckets for `limits`' rate and burst.
    pub(crate) fn new(limits: &PeerLimits) -> Self {
        RequestRate {
            per_second: f64::from(limits.requests_per_second.max(1)),
            burst: f64::from(limits.request_burst.max(1)),
            buckets: HashMap::new(),
        }
    }

    /// Takes one token of `peer`'s bucket at `now_ms`, or refuses with `over-limit`.
    pub(crate) fn admit(&mut self, peer: NodeId, now_ms: u64) -> Result<(), Refusal> {
        if self.buckets.len() >= MAX_TRACKED_PEERS && !self.buckets.contains_key(&peer) {
            self.prune(now_ms);
            if self.buckets.len() >= MAX_TRACKED_PEERS {
                return Err((
                    Reason::OverLimit,
                    "too many peers are sending requests; retry later".into(),
                ));
            }
        }
        let per_second = self.per_second;
        let bucket = self.bucket(peer, now_ms);
        if bucket.tokens < 1.0 {
            bucket.strikes += 1.0;
            return Err((
                Reason::OverLimit,
                format!("more than {per_second} requests per second from this peer"),
            ));
        }
        bucket.tokens -= 1.0;
        Ok(())
    }

    /// `peer`'s bucket, refilled (and its strikes drained) up to `now_ms`.
    fn bucket(&mut self, peer: NodeId, now_ms: u64) -> &mut Bucket {
        let (per_second, burst) = (self.per_second, self.burst);
        let bucket = self.buckets.entry(peer).or_insert(Bucket {
            tokens: burst,
            strikes: 0.0,
            at_ms: now_ms,
        });
        let elapsed = now_ms.saturating_sub(bucket.at_ms) as f64 / 1000.0 * per_second;
        bucket.tokens = (bucket.tokens + elapsed).min(burst);
        bucket.strikes = (bucket.strikes - elapsed).max(0.0);
        bucket.at_ms = now_ms;
        bucket
    }

    /// Counts a message from `peer` that does not decode (a garbage request or data
    /// stream) as [`MALFORMED_STRIKES`] refusals: an honest peer of this protocol version
    /// never sends one, so a handful of them is a flood, and the peer is banned long before
    /// a burst of them has cost the node a burst of replies. Peers past the table's cap are
    /// not tracked (their requests are refused anyway).
    pub(crate) fn strike_malformed(&mut self, peer: NodeId, now_ms: u64) {
        if self.buckets.len() >= MAX_TRACKED_PEERS && !self.buckets.contains_key(&peer) {
            return;
        }
        self.bucket(peer, now_ms).strikes += MALFORMED_STRIKES;
    }

    /// Whether `peer` goes on sending after its refusals: more than a burst of them
    /// recently. Such a peer is disconnected and banned for [`BAN_MS`], since answering each
    /// of its requests would cost more than the requests.
    pub(crate) fn ignores_refusals(&self, peer: &NodeId) -> bool {
        self.buckets
            .get(peer)
            .is_some_and(|b| b.strikes > self.burst)
    }

    /// Forgets the buckets that have refilled by `now_ms` (they hold nothing to remember).
    fn prune(&mut self, now_ms: u64) {
        let (per_second, burst) = (self.per_second, self.burst);
        self.buckets.retain(|_, b| {
            b.tokens + now_ms.saturating_sub(b.at_ms) as f64 / 1000.0 * per_second < burst
        });
    }

    /// Peers tracked now.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

/// Streams in flight per peer, capped; a [`StreamPermit`] holds one until it drops.
#[derive(Debug)]
pub(crate) struct StreamGate {
    max_per_peer: usize,
    in_flight: Mutex<HashMap<NodeId, usize>>,
}

/// One stream of a peer counted in a [`StreamGate`] while it lives.
#[derive(Debug)]
pub(crate) struct StreamPermit {
    gate: Arc<StreamGate>,
    peer: NodeId,
}

impl StreamGate {
    /// A gate letting each peer have `max_per_peer` streams in flight.
    pub(crate) fn new(max_per_peer: usize) -> Arc<Self> {
        Arc::new(StreamGate {
            max_per_peer,
            in_flight: Mutex::new(HashMap::new()),
        })
    }

    /// Counts one more stream of `peer`, or refuses when it has the maximum in flight.
    pub(crate) fn try_acquire(self: &Arc<Self>, peer: NodeId) -> Result<StreamPermit, Refusal> {
        let mut in_flight = lock(&self.in_flight);
        let n = in_flight.entry(peer).or_default();
        if *n >= self.max_per_peer {
            return Err((
                Reason::OverLimit,
                format!(
                    "this peer has {} streams in flight here, at most {} allowed",
                    *n, self.max_per_peer
                ),
            ));
        }
        *n += 1;
        Ok(StreamPermit {
            gate: self.clone(),
            peer,
        })
    }

    /// Streams of `peer` in flight now.
    #[cfg(test)]
    fn in_flight(&self, peer: &NodeId) -> usize {
        lock(&self.in_flight).get(peer).copied().unwrap_or(0)
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut in_flight = lock(&self.gate.in_flight);
        if let Some(n) = in_flight.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                in_flight.remove(&self.peer);
            }
        }
    }
}

/// Counts connections by peer, and decides whether one more may be held.
#[derive(Debug, Default)]
struct ConnectionTable {
    by_peer: HashMap<NodeId, Vec<WeakConnectionHandle>>,
    /// Peers refused until the given time (ms since the epoch).
    banned: HashMap<NodeId, u64>,
    /// The socket addresses banned peers used, refused before the handshake (a redial from
    /// them costs the node one refusal packet, no cryptography) until the given time.
    banned_addrs: HashMap<std::net::SocketAddr, u64>,
}

impl ConnectionTable {
    /// Forgets connections that are closed or dropped, and bans that ended.
    fn prune(&mut self) {
        let now = now_ms();
        self.banned.retain(|_, until| *until > now);
        self.banned_addrs.retain(|_, until| *until > now);
        self.by_peer.retain(|_, conns| {
            conns.retain(|weak| {
                weak.upgrade()
                    .is_some_and(|conn| conn.close_reason().is_none())
            });
            !conns.is_empty()
        });
    }

    fn total(&self) -> usize {
        self.by_peer.values().map(Vec::len).sum()
    }
}

/// The decision on one more connection of a peer that holds `held`, with `total` held by all.
fn admit_connection(held: usize, total: usize, limits: &PeerLimits) -> Result<(), String> {
    if held >= limits.max_connections_per_peer {
        return Err(format!(
            "over-limit: this peer holds {held} connections here, at most {} allowed",
            limits.max_connections_per_peer
        ));
    }
    if total >= limits.max_connections {
        return Err(format!(
            "over-limit: this node holds {total} connections, its maximum"
        ));
    }
    Ok(())
}

/// The endpoint hook that refuses incoming connections past [`PeerLimits`]' connection caps,
/// closing them with [`OVER_LIMIT_CLOSE_CODE`] and a reason that starts with `over-limit`.
/// Outgoing connections are not counted.
#[derive(Debug, Clone)]
pub struct ConnectionGate {
    limits: PeerLimits,
    table: Arc<Mutex<ConnectionTable>>,
    refused: Arc<AtomicU64>,
}

impl ConnectionGate {
    /// A gate enforcing `limits`' connection caps.
    pub fn new(limits: PeerLimits) -> Self {
        ConnectionGate {
            limits,
            table: Arc::default(),
            refused: Arc::default(),
        }
    }

    /// Connections refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Incoming connections held now.
    pub fn held(&self) -> usize {
        let mut table = lock(&self.table);
        table.prune();
        table.total()
    }

    /// Closes every connection of `peer` with [`OVER_LIMIT_CLOSE_CODE`] and refuses its new
    /// ones for [`BAN_MS`]. `false` when it was banned already (the streams still in flight
    /// of a banned peer change nothing).
    pub(crate) fn disconnect(&self, peer: NodeId, why: &str) -> bool {
        let mut table = lock(&self.table);
        let now = now_ms();
        if table.banned.get(&peer).is_some_and(|until| *until > now) {
            return false;
        }
        let until = now + BAN_MS;
        table.banned.insert(peer, until);
        for weak in table.by_peer.remove(&peer).unwrap_or_default() {
            if let Some(conn) = weak.upgrade() {
                for path in conn.paths().iter() {
                    if let iroh::TransportAddr::Ip(addr) = path.remote_addr() {
                        table.banned_addrs.insert(*addr, until);
                    }
                }
                conn.close(
                    VarInt::from_u32(OVER_LIMIT_CLOSE_CODE),
                    format!("over-limit: {why}").as_bytes(),
                );
            }
        }
        true
    }

    /// The router's filter of incoming connections: refuses those from the socket address of
    /// a banned peer before any handshake work.
    pub fn incoming_filter(&self) -> iroh::protocol::IncomingFilter {
        let (table, refused) = (self.table.clone(), self.refused.clone());
        Arc::new(move |incoming: &iroh::endpoint::Incoming| {
            if let iroh::endpoint::IncomingAddr::Ip(addr) = incoming.remote_addr() {
                let now = now_ms();
                if lock(&table)
                    .banned_addrs
                    .get(&addr)
                    .is_some_and(|until| *until > now)
                {
                    refused.fetch_add(1, Ordering::Relaxed);
                    return iroh::protocol::IncomingFilterOutcome::Reject;
                }
            }
            iroh::protocol::IncomingFilterOutcome::Accept
        })
    }

    fn check(&self, conn: &Connection) -> Result<(), String> {
        let peer = conn.remote_id();
        let mut table = lock(&self.table);
        table.prune();
        if let Some(until) = table.banned.get(&peer) {
            return Err(format!(
                "over-limit: this peer is banned for {} ms more, for ignoring refusals",
                until.saturating_sub(now_ms())
            ));
        }
        let held = table.by_peer.get(&peer).map_or(0, Vec::len);
        admit_connection(held, table.total(), &self.limits)?;
        table
            .by_peer
            .entry(peer)
            .or_default()
            .push(conn.weak_handle());
        Ok(())
    }
}

impl EndpointHooks for ConnectionGate {
    fn after_handshake<'a>(
        &'a self,
        conn: &'a Connection,
    ) -> impl std::future::Future<Output = AfterHandshakeOutcome> + Send + 'a {
        let outcome = if conn.side() == Side::Server {
            match self.check(conn) {
                Ok(()) => AfterHandshakeOutcome::Accept,
                Err(reason) => {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(peer = %conn.remote_id().fmt_short(), "refused a connection: {reason}");
                    AfterHandshakeOutcome::Reject {
                        error_code: VarInt::from_u32(OVER_LIMIT_CLOSE_CODE),
                        reason: reason.into_bytes(),
                    }
                }
            }
        } else {
            AfterHandshakeOutcome::Accept
        };
        async move { outcome }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(seed: u8) -> NodeId {
        iroh::SecretKey::from_bytes(&[seed; 32]).public()
    }

    fn limits() -> PeerLimits {
        PeerLimits {
            max_connections_per_peer: 2,
            max_connections: 3,
            max_streams_per_peer: 2,
            requests_per_second: 10,
            request_burst: 3,
        }
    }

    #[test]
    fn the_request_bucket_allows_the_burst_then_the_rate() {
        let mut rate = RequestRate::new(&limits());
        let (a, b) = (peer(1), peer(2));
        for _ in 0..3 {
            rate.admit(a, 1_000).expect("within the burst");
        }
        let (reason, message) = rate.admit(a, 1_000).expect_err("past the burst");
        assert_eq!(reason, Reason::OverLimit);
        assert!(message.contains("10 requests per second"), "{message}");
        // Another peer has its own bucket.
        rate.admit(b, 1_000).expect("another peer");
        // 100 ms at 10/s gives one token back, not two.
        rate.admit(a, 1_100).expect("refilled one");
        assert!(rate.admit(a, 1_100).is_err());
        // A long pause refills to the burst, never past it.
        for _ in 0..3 {
            rate.admit(a, 60_000).expect("refilled");
        }
        assert!(rate.admit(a, 60_000).is_err());
    }

    #[test]
    fn a_peer_that_sends_on_past_a_burst_of_refusals_is_marked() {
        let mut rate = RequestRate::new(&limits());
        let a = peer(1);
        for _ in 0..3 {
            rate.admit(a, 0).expect("within the burst");
        }
        // The burst is 3: three refusals are tolerated, the fourth marks the peer.
        for _ in 0..3 {
            assert!(rate.admit(a, 0).is_err());
            assert!(!rate.ignores_refusals(&a));
        }
        assert!(rate.admit(a, 0).is_err());
        assert!(rate.ignores_refusals(&a));
        // Strikes drain at the request rate: after a quiet second the peer starts clean.
        rate.admit(a, 1_000).expect("refilled");
        assert!(!rate.ignores_refusals(&a));
    }

    #[test]
    fn undecodable_messages_get_a_peer_marked_within_a_few() {
        let limits = PeerLimits {
            request_burst: 200,
            ..limits()
        };
        let mut rate = RequestRate::new(&limits);
        let (a, b) = (peer(1), peer(2));
        for _ in 0..20 {
            rate.strike_malformed(a, 0);
        }
        // 20 garbage messages are 200 refusals' worth: not yet past the burst.
        assert!(!rate.ignores_refusals(&a));
        rate.strike_malformed(a, 0);
        assert!(rate.ignores_refusals(&a));
        // Other peers are not touched, and the strikes drain like refusals.
        assert!(!rate.ignores_refusals(&b));
        rate.admit(a, 10_000).expect("refilled");
        assert!(!rate.ignores_refusals(&a));
    }

    #[test]
    fn quiet_peers_are_forgotten_when_the_table_is_full() {
        let mut rate = RequestRate::new(&limits());
        for i in 0..MAX_TRACKED_PEERS {
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let id = iroh::SecretKey::from_bytes(&key).public();
            rate.admit(id, 0).expect("admit");
        }
        assert_eq!(rate.tracked(), MAX_TRACKED_PEERS);
        // Nobody has refilled yet: a new peer is refused rather than growing the table.
        assert!(rate.admit(peer(7), 0).is_err());
        // A second later every bucket is full again and forgotten.
        rate.admit(peer(7), 1_000).expect("after pruning");
        assert_eq!(rate.tracked(), 1);
    }

    #[test]
    fn streams_are_capped_per_peer_and_released_on_drop() {
        let gate = StreamGate::new(2);
        let (a, b) = (peer(1), peer(2));
        let first = gate.try_acquire(a).expect("first");
        let _second = gate.try_acquire(a).expect("second");
        let (reason, _) = gate.try_acquire(a).expect_err("third");
        assert_eq!(reason, Reason::OverLimit);
        let _other = gate.try_acquire(b).expect("another peer");
        drop(first);
        assert_eq!(gate.in_flight(&a), 1);
        let _third = gate.try_acquire(a).expect("after a release");
    }

    #[test]
    fn connections_are_capped_per_peer_and_in_total() {
        let limits = limits();
        admit_connection(0, 0, &limits).expect("first");
        admit_connection(1, 1, &limits).expect("second of a peer");
        let refused = admit_connection(2, 2, &limits).expect_err("third of a peer");
        assert!(refused.starts_with("over-limit"), "{refused}");
        assert!(refused.contains("at most 2"), "{refused}");
        let refused = admit_connection(0, 3, &limits).expect_err("node full");
        assert!(refused.contains("its maximum"), "{refused}");
    }
}
