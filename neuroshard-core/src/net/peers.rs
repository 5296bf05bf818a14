//! [`PeerSet`]: the live view of the swarm, fed by signed announcements.
//!
//! IO-less: every method takes the current time in ms, so expiry and replay rules are tested
//! with a simulated clock.

use super::announce::{Announcement, SignedAnnouncement, PROTOCOL_VERSION};
use super::{NetError, NodeId};
use std::collections::HashMap;

/// How far in the future an announcement may be dated (clock skew tolerance).
pub const MAX_CLOCK_SKEW_MS: u64 = 30_000;

/// What the PeerSet knows about one node.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerEntry {
    /// The node's newest accepted announcement.
    pub announcement: Announcement,
    /// The same, as signed by the node (forwarded to clients that ask for peers).
    pub signed: SignedAnnouncement,
    /// Smoothed measured round-trip latency to the node, if measured.
    pub latency_ms: Option<f64>,
    /// Banned until this time (ms), if banned.
    pub banned_until_ms: Option<u64>,
}

impl PeerEntry {
    /// Whether the node can take a new session now.
    pub fn usable(&self, now_ms: u64) -> bool {
        let a = &self.announcement;
        a.expires_ms > now_ms
            && self.banned_until_ms.is_none_or(|t| t <= now_ms)
            && a.load < a.capacity
    }
}

/// One node of the swarm as a user sees it (what `neuroshard peers` prints).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PeerInfo {
    /// The node id (hex of its public key).
    pub id: String,
    /// Layers it serves, `start..end`.
    pub layers: std::ops::Range<usize>,
    /// Sessions open on it.
    pub load: u32,
    /// Sessions it accepts.
    pub capacity: u32,
    /// Where to dial it, as `<id>@<ip:port>,...` (a valid `--peers` value).
    pub address: String,
    /// Milliseconds until its announcement expires.
    pub expires_in_ms: u64,
}

/// The swarm as this node sees it: one entry per node of our model and protocol.
#[derive(Debug, Clone)]
pub struct PeerSet {
    model_id: String,
    peers: HashMap<NodeId, PeerEntry>,
    /// Newest timestamp ever accepted per node; kept after expiry so an old announcement
    /// replayed later is still refused.
    newest: HashMap<NodeId, u64>,
}

impl PeerSet {
    /// An empty view for nodes serving `model_id`.
    pub fn new(model_id: impl Into<String>) -> Self {
        PeerSet {
            model_id: model_id.into(),
            peers: HashMap::new(),
            newest: HashMap::new(),
        }
    }

    /// Every node as a [`PeerInfo`], ordered by layers then id.
    pub fn infos(&self, now_ms: u64) -> Vec<PeerInfo> {
        let mut rows: Vec<PeerInfo> = self
            .peers
            .iter()
            .map(|(id, e)| {
                let a = &e.announcement;
                let addr = a
                    .addrs
                    .iter()
                    .fold(iroh::EndpointAddr::new(*id), |addr, s| {
                        addr.with_ip_addr(*s)
                    });
                PeerInfo {
                    id: id.to_string(),
                    layers: a.layers.start as usize..a.layers.end as usize,
                    load: a.load,
                    capacity: a.capacity,
                    address: super::endpoint::format_peer_addr(&addr),
                    expires_in_ms: a.expires_ms.saturating_sub(now_ms),
                }
            })
            .collect();
        rows.sort_by(|a, b| {
            (a.layers.start, a.layers.end, &a.id).cmp(&(b.layers.start, b.layers.end, &b.id))
        });
        rows
    }

    /// The model this swarm runs.
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// Verifies and applies an announcement. Returns the node id when accepted.
    pub fn insert(&mut self, signed: &SignedAnnouncement, now_ms: u64) -> Result<NodeId, NetError> {
        let ann = signed.verify()?;
        let node = ann.node;
        let short = || node.fmt_short().to_string();
        if ann.protocol_version != PROTOCOL_VERSION {
            return Err(NetError::WrongProtocol {
                node: short(),
                theirs: ann.protocol_version,
                ours: PROTOCOL_VERSION,
            });
        }
        if ann.model_id != self.model_id {
            return Err(NetError::WrongModel {
                node: short(),
                theirs: ann.model_id,
                ours: self.model_id.clone(),
            });
        }
        if ann.expires_ms <= now_ms {
            return Err(NetError::Expired {
                node: short(),
                expires_ms: ann.expires_ms,
                now_ms,
            });
        }
        if ann.timestamp_ms > now_ms + MAX_CLOCK_SKEW_MS {
            return Err(NetError::FromTheFuture {
                node: short(),
                ahead_ms: ann.timestamp_ms - now_ms,
            });
        }
        if let Some(&last) = self.newest.get(&node) {
            if ann.timestamp_ms <= last {
                return Err(NetError::Replayed {
                    node: short(),
                    timestamp_ms: ann.timestamp_ms,
                    last_ms: last,
                });
            }
        }
        self.newest.insert(node, ann.timestamp_ms);
        match self.peers.get_mut(&node) {
            Some(entry) => {
                entry.announcement = ann;
                entry.signed = signed.clone();
            }
            None => {
                self.peers.insert(
                    node,
                    PeerEntry {
                        announcement: ann,
                        signed: signed.clone(),
                        latency_ms: None,
                        banned_until_ms: None,
                    },
                );
            }
        }
        Ok(node)
    }

    /// Forgets nodes whose announcement expired; returns them.
    pub fn expire(&mut self, now_ms: u64) -> Vec<NodeId> {
        let gone: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(_, e)| e.announcement.expires_ms <= now_ms)
            .map(|(id, _)| *id)
            .collect();
        for id in &gone {
            self.peers.remove(id);
        }
        gone
    }

    /// Removes a node at once (it said goodbye, or is known dead).
    pub fn remove(&mut self, node: &NodeId) -> bool {
        self.peers.remove(node).is_some()
    }

    /// Keeps `node` out of routes until `until_ms`.
    pub fn ban(&mut self, node: &NodeId, until_ms: u64) {
        if let Some(e) = self.peers.get_mut(node) {
            e.banned_until_ms = Some(until_ms);
        }
    }

    /// Folds a latency measurement into the node's estimate (exponential moving average).
    pub fn record_latency(&mut self, node: &NodeId, ms: f64) {
        if let Some(e) = self.peers.get_mut(node) {
            e.latency_ms = Some(match e.latency_ms {
                Some(prev) => 0.8 * prev + 0.2 * ms,
                None => ms,
            });
        }
    }

    /// One node's entry.
    pub fn get(&self, node: &NodeId) -> Option<&PeerEntry> {
        self.peers.get(node)
    }

    /// Every known node.
    pub fn iter(&self) -> impl Iterator<Item = (&NodeId, &PeerEntry)> {
        self.peers.iter()
    }

    /// Number of known nodes.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether no node is known.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}
