//! [`PeerSet`]: the live view of the swarm, fed by signed announcements.
//!
//! IO-less: every method takes the current time in ms, so expiry and replay rules are tested
//! with a simulated clock.

use super::announce::{Announcement, SignedAnnouncement, PROTOCOL_VERSION};
use super::{NetError, NodeId};
use std::collections::HashMap;

/// How far in the future an announcement may be dated (clock skew tolerance).
pub const MAX_CLOCK_SKEW_MS: u64 = 30_000;
/// Longest an announcement may stay valid after it was made: a node must re-announce, so
/// a dead or lying node leaves every view within this time.
pub const MAX_ANNOUNCE_TTL_MS: u64 = 5 * 60_000;
/// Most nodes one view holds: past it, unknown nodes are refused until entries expire (a
/// flood of fresh identities cannot grow it without bound).
pub const MAX_PEERS: usize = 4096;
/// Sessions a node must have served without failing before it counts as proven.
pub const PROBATION_SESSIONS: u32 = 3;
/// Route-cost penalty of a node on probation (ms): proven nodes win ties by far, an unproven
/// one is still used where nothing else holds its layers.
pub const PROBATION_PENALTY_MS: f64 = 50.0;
/// Route-cost penalty per unit of failure rate (ms): a node failing half its sessions costs
/// as much as 100 ms of latency.
pub const FAILURE_PENALTY_MS: f64 = 200.0;

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
    /// Sessions (or steps) through this node that completed, as this view recorded them.
    pub successes: u32,
    /// Failures this view blamed on the node (after probing).
    pub failures: u32,
}

impl PeerEntry {
    /// Whether the node is still on probation: too few successes recorded here to trust a
    /// route to it over proven nodes.
    pub fn on_probation(&self) -> bool {
        self.successes < PROBATION_SESSIONS
    }

    /// Failures over recorded outcomes (0 when nothing was recorded).
    pub fn failure_rate(&self) -> f64 {
        let total = self.successes + self.failures;
        if total == 0 {
            0.0
        } else {
            self.failures as f64 / total as f64
        }
    }

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

/// How sessions through each node ended, as one client saw them. It outlives the
/// [`PeerSet`]s fetched from entry nodes (each is a fresh view), and is applied to each before
/// planning ([`TrackRecord::apply`]), so probation and failure rates carry over.
#[derive(Debug, Clone, Default)]
pub struct TrackRecord {
    outcomes: HashMap<NodeId, (u32, u32)>,
}

impl TrackRecord {
    /// Records a session through `node` that ended well (`ok`) or failed on it. At most
    /// [`MAX_PEERS`] nodes are tracked; past that, new nodes stay untracked (on probation).
    pub fn record(&mut self, node: NodeId, ok: bool) {
        if !self.outcomes.contains_key(&node) && self.outcomes.len() >= MAX_PEERS {
            return;
        }
        let (good, bad) = self.outcomes.entry(node).or_default();
        if ok {
            *good = good.saturating_add(1);
        } else {
            *bad = bad.saturating_add(1);
        }
    }

    /// Sets every tracked node's outcomes in `peers`.
    pub fn apply(&self, peers: &mut PeerSet) {
        for (node, &(successes, failures)) in &self.outcomes {
            if let Some(e) = peers.peers.get_mut(node) {
                e.successes = successes;
                e.failures = failures;
            }
        }
    }
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

    /// A copy holding only the nodes `keep` selects (with their replay marks): what a
    /// session keeps to re-plan among the holders of its layers, without the whole view.
    pub fn subset(&self, keep: impl Fn(&NodeId) -> bool) -> PeerSet {
        PeerSet {
            model_id: self.model_id.clone(),
            peers: self
                .peers
                .iter()
                .filter(|(id, _)| keep(id))
                .map(|(id, e)| (*id, e.clone()))
                .collect(),
            newest: self
                .newest
                .iter()
                .filter(|(id, _)| keep(id))
                .map(|(id, t)| (*id, *t))
                .collect(),
        }
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
        if ann.versions.len() > super::announce::MAX_ANNOUNCED_VERSIONS
            || ann.versions.iter().any(|v| {
                v.adapter
                    .as_ref()
                    .is_some_and(|n| n.is_empty() || n.len() > 128)
            })
        {
            return Err(NetError::Refused {
                node: short(),
                why: format!(
                    "{} announced versions (at most {} with names of 1..=128 bytes)",
                    ann.versions.len(),
                    super::announce::MAX_ANNOUNCED_VERSIONS
                ),
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
        if ann.expires_ms.saturating_sub(ann.timestamp_ms) > MAX_ANNOUNCE_TTL_MS {
            return Err(NetError::Refused {
                node: short(),
                why: format!(
                    "announcement valid for {} ms, at most {MAX_ANNOUNCE_TTL_MS} accepted",
                    ann.expires_ms.saturating_sub(ann.timestamp_ms)
                ),
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
        if !self.peers.contains_key(&node) && self.peers.len() >= MAX_PEERS {
            self.expire(now_ms);
            if self.peers.len() >= MAX_PEERS {
                return Err(NetError::Refused {
                    node: short(),
                    why: format!("this view already holds {MAX_PEERS} nodes"),
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
                        successes: 0,
                        failures: 0,
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
        // A replay of anything older than the longest TTL is refused as expired anyway, so
        // the replay marks of nodes no longer present can go.
        let horizon = now_ms.saturating_sub(MAX_ANNOUNCE_TTL_MS + MAX_CLOCK_SKEW_MS);
        let peers = &self.peers;
        self.newest
            .retain(|node, ts| *ts >= horizon || peers.contains_key(node));
        gone
    }

    /// Replay marks kept (nodes seen, present or recently gone).
    pub fn replay_marks(&self) -> usize {
        self.newest.len()
    }

    /// Records how a session (or step) through `node` ended: `ok`, or a failure blamed on it.
    /// Route cost rises with the failure rate, and a node leaves probation after
    /// [`PROBATION_SESSIONS`] successes.
    pub fn record_outcome(&mut self, node: &NodeId, ok: bool) {
        if let Some(e) = self.peers.get_mut(node) {
            if ok {
                e.successes = e.successes.saturating_add(1);
            } else {
                e.failures = e.failures.saturating_add(1);
            }
        }
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
