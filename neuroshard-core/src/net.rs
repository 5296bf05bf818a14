//! Networking: signed announcements, the live view of the swarm ([`PeerSet`]) and route
//! planning.
//!
//! Following iroh-gossip's `proto/` pattern, everything here is an IO-less state machine: time is
//! passed in as milliseconds and no function touches a socket, so the logic is tested
//! deterministically (no sleeps) and the iroh layer stays a thin shell around it.
//!
//! - [`announce`]: what a node says about itself, signed with its iroh key;
//! - [`peers`]: the PeerSet: accepts/rejects announcements, expiry, bans, latency;
//! - `membership`: when a node rejoins the gossip mesh and through whom;
//! - [`route`]: plans the lowest-latency chain of hops covering every layer;
//! - [`endpoint`]: the iroh endpoint (offline by default) and the node's persistent key;
//! - [`limits`]: per-peer caps on connections, streams and request rate;
//! - [`refusal`]: the typed reasons a hop gives when it refuses or fails;
//! - `proto`: messages of the inference protocol (internal; the data types a user sees are
//!   re-exported here: [`RouteHop`], [`ModelInfo`], [`NodeStats`]).

pub(crate) mod admission;
pub mod announce;
pub(crate) mod connections;
pub mod endpoint;
pub(crate) mod gossip;
pub mod limits;
pub(crate) mod membership;
pub mod peers;
pub(crate) mod proto;
pub(crate) mod recovery;
pub mod refusal;
pub mod route;

pub use announce::{
    announced_versions, AnnouncedVersion, Announcement, SignedAnnouncement, MAX_ANNOUNCED_VERSIONS,
    PROTOCOL_VERSION,
};
pub use peers::{PeerEntry, PeerInfo, PeerSet, TrackRecord};
pub use proto::{ModelInfo, NodeStats, RouteHop, INFER_ALPN, MAX_STEP_POSITIONS, PEERS_PAGE};
pub use refusal::{Reason, REASON_CODES_VERSION};
pub use route::{Hop, ReplicatedRange, Route, RouteOptions};

/// Current time in ms since the Unix epoch (announcements, expiry and session-opens use it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Locks a mutex whose data stays consistent even if a holder panicked (single inserts and
/// removes), so a poisoned lock is recovered instead of propagated.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A node's short id, or `?`, for [`NetError::HopFailed`]'s message.
fn short_id(node: &Option<NodeId>) -> String {
    node.map(|n| n.fmt_short().to_string())
        .unwrap_or_else(|| "?".into())
}

/// ` (reason)` for [`NetError::HopFailed`]'s message.
fn reason_suffix(reason: Option<Reason>) -> String {
    reason.map(|r| format!(" ({r})")).unwrap_or_default()
}

/// Node identity: the node's iroh public key.
pub type NodeId = iroh::PublicKey;

/// Errors of the networking layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// A control message could not be decoded.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The signature does not match the claimed node id.
    #[error("bad signature from {0}")]
    BadSignature(String),
    /// The announcement's expiry has passed.
    #[error("announcement from {node} expired at {expires_ms} (now {now_ms})")]
    Expired {
        /// Short node id.
        node: String,
        /// When it expired (ms since the Unix epoch).
        expires_ms: u64,
        /// Current time (ms).
        now_ms: u64,
    },
    /// An announcement not newer than one already accepted from the same node.
    #[error("replayed announcement from {node}: timestamp {timestamp_ms} <= {last_ms}")]
    Replayed {
        /// Short node id.
        node: String,
        /// The announcement's timestamp.
        timestamp_ms: u64,
        /// The newest timestamp seen from that node.
        last_ms: u64,
    },
    /// Timestamped too far in the future (clock skew beyond tolerance, or forged).
    #[error("announcement from {node} is dated {ahead_ms} ms in the future")]
    FromTheFuture {
        /// Short node id.
        node: String,
        /// How far ahead of our clock.
        ahead_ms: u64,
    },
    /// An announcement refused by policy (a TTL too long, a full view).
    #[error("announcement from {node} refused: {why}")]
    Refused {
        /// Short node id.
        node: String,
        /// Why.
        why: String,
    },
    /// Another protocol version.
    #[error("node {node} speaks protocol {theirs}, we speak {ours}")]
    WrongProtocol {
        /// Short node id.
        node: String,
        /// Their version.
        theirs: u16,
        /// Our version.
        ours: u16,
    },
    /// Another model.
    #[error("node {node} serves model {theirs}, this swarm runs {ours}")]
    WrongModel {
        /// Short node id.
        node: String,
        /// Their model id.
        theirs: String,
        /// Ours.
        ours: String,
    },
    /// Binding, dialing or a local file failed.
    #[error("io: {0}")]
    Io(String),
    /// A hop refused a request or failed a step.
    #[error("hop {} failed{}: {message}", short_id(.node), reason_suffix(*.reason))]
    HopFailed {
        /// The failing node, when known.
        node: Option<NodeId>,
        /// The hop's typed reason, when a hop gave one (none: it could not be reached, or
        /// its reply made no sense).
        reason: Option<Reason>,
        /// The route member that reported the failure, when it was not the failing node
        /// itself (a hop blaming its successor): failover probes the blamed node before it
        /// believes the report.
        reporter: Option<NodeId>,
        /// Its message.
        message: String,
    },
    /// No answer within the deadline.
    #[error("timed out after {ms} ms waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The deadline.
        ms: u64,
    },
    /// No chain of usable hops covers every layer.
    #[error("no route covers layers {from}..{to}: {reason}")]
    NoRoute {
        /// First uncovered layer.
        from: usize,
        /// One past the last layer needed.
        to: usize,
        /// What is missing.
        reason: String,
    },
}
