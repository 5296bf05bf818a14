//! Gossip membership health: when a node should rejoin the swarm's topic, and through whom.
//!
//! A node can silently fall out of the gossip mesh: its neighbours die, and a dead neighbour
//! is only reported down once its QUIC connection times out, long after the announcements it
//! relayed have expired. A node that waited for the neighbour count alone would by then know
//! no live peer to rejoin through and stay partitioned for good. So the rule here is:
//!
//! - unhealthy = fewer than [`MIN_NEIGHBOURS`] neighbours, or no announcement heard from any
//!   other node for longer than the quiet limit (a few announce periods);
//! - rejoin through the peers seen most recently, expired ones included (a peer seen a minute
//!   ago is a better bet than none), then the bootstrap peers the node started with.
//!
//! IO-less like the rest of `net`: time comes in as milliseconds.

use super::NodeId;
use std::collections::{HashMap, HashSet};

/// Below this many gossip neighbours a node rejoins.
pub(crate) const MIN_NEIGHBOURS: usize = 2;
/// Peers seen within this window are rejoin candidates even after their announcement expired.
pub(crate) const RECENT_WINDOW_MS: u64 = 10 * 60 * 1000;
/// At most this many peers are remembered.
const MAX_REMEMBERED: usize = 256;
/// At most this many peers are asked per rejoin.
pub(crate) const MAX_REJOIN: usize = 6;

/// What a node knows about its place in the gossip mesh.
#[derive(Debug, Clone)]
pub(crate) struct Membership {
    me: NodeId,
    neighbours: HashSet<NodeId>,
    /// Last time an announcement of another node arrived.
    last_heard_ms: u64,
    /// Other nodes by the last time their announcement arrived.
    recent: HashMap<NodeId, u64>,
    bootstrap: Vec<NodeId>,
}

impl Membership {
    /// A node `me` that joined through `bootstrap` at `now_ms` (the quiet limit counts from
    /// here, so a fresh node is not judged before it had a chance to hear anyone).
    pub(crate) fn new(me: NodeId, bootstrap: Vec<NodeId>, now_ms: u64) -> Membership {
        Membership {
            me,
            neighbours: HashSet::new(),
            last_heard_ms: now_ms,
            recent: HashMap::new(),
            bootstrap: bootstrap.into_iter().filter(|b| *b != me).collect(),
        }
    }

    /// Gossip reported a new direct neighbour.
    pub(crate) fn neighbour_up(&mut self, node: NodeId) {
        if node != self.me {
            self.neighbours.insert(node);
        }
    }

    /// Gossip reported a neighbour gone.
    pub(crate) fn neighbour_down(&mut self, node: NodeId) {
        self.neighbours.remove(&node);
    }

    /// Current number of direct neighbours.
    #[cfg(test)]
    pub(crate) fn neighbours(&self) -> usize {
        self.neighbours.len()
    }

    /// A valid announcement of `node` arrived at `now_ms`.
    pub(crate) fn heard_from(&mut self, node: NodeId, now_ms: u64) {
        if node == self.me {
            return;
        }
        self.last_heard_ms = self.last_heard_ms.max(now_ms);
        self.recent.insert(node, now_ms);
        if self.recent.len() > MAX_REMEMBERED {
            // Forget the stalest; amortised, since this runs only past the bound.
            let mut by_age: Vec<(NodeId, u64)> = self.recent.drain().collect();
            by_age.sort_by_key(|(_, t)| std::cmp::Reverse(*t));
            by_age.truncate(MAX_REMEMBERED / 2);
            self.recent = by_age.into_iter().collect();
        }
    }

    /// Whether the node should rejoin: too few neighbours, or nothing heard for `quiet_ms`.
    pub(crate) fn needs_rejoin(&self, now_ms: u64, quiet_ms: u64) -> bool {
        self.neighbours.len() < MIN_NEIGHBOURS
            || now_ms.saturating_sub(self.last_heard_ms) > quiet_ms
    }

    /// Peers to rejoin through when [`Self::needs_rejoin`]: the most recently seen first
    /// (within [`RECENT_WINDOW_MS`]), then bootstrap peers; no duplicates, never `me`, at
    /// most [`MAX_REJOIN`]. Empty when the node is healthy.
    pub(crate) fn rejoin_candidates(&self, now_ms: u64, quiet_ms: u64) -> Vec<NodeId> {
        if !self.needs_rejoin(now_ms, quiet_ms) {
            return Vec::new();
        }
        let mut recent: Vec<(NodeId, u64)> = self
            .recent
            .iter()
            .filter(|(_, t)| now_ms.saturating_sub(**t) <= RECENT_WINDOW_MS)
            .map(|(id, t)| (*id, *t))
            .collect();
        recent.sort_by_key(|(_, t)| std::cmp::Reverse(*t));
        let mut out: Vec<NodeId> = Vec::new();
        for id in recent
            .into_iter()
            .map(|(id, _)| id)
            .chain(self.bootstrap.iter().copied())
        {
            if out.len() == MAX_REJOIN {
                break;
            }
            if id != self.me && !out.contains(&id) {
                out.push(id);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(seed: u8) -> NodeId {
        iroh::SecretKey::from_bytes(&[seed; 32]).public()
    }

    #[test]
    fn healthy_node_does_not_rejoin() {
        let mut m = Membership::new(id(0), vec![id(1)], 1_000);
        m.neighbour_up(id(1));
        m.neighbour_up(id(2));
        m.heard_from(id(1), 2_000);
        assert!(!m.needs_rejoin(3_000, 6_000));
        assert!(m.rejoin_candidates(3_000, 6_000).is_empty());
    }

    #[test]
    fn too_few_neighbours_rejoins_through_recent_peers_then_bootstrap() {
        let mut m = Membership::new(id(0), vec![id(9), id(0)], 0);
        m.heard_from(id(1), 100);
        m.heard_from(id(2), 300);
        m.heard_from(id(3), 200);
        m.neighbour_up(id(2));
        assert_eq!(
            m.rejoin_candidates(400, 6_000),
            vec![id(2), id(3), id(1), id(9)],
            "newest first, bootstrap last, never itself"
        );
    }

    #[test]
    fn silence_with_stale_neighbours_triggers_rejoin_through_expired_peers() {
        // Two neighbours still counted (their deaths not detected yet), but nothing heard for
        // longer than the quiet limit: rejoin through peers whose announcements expired.
        let mut m = Membership::new(id(0), vec![], 0);
        m.neighbour_up(id(1));
        m.neighbour_up(id(2));
        m.heard_from(id(1), 1_000);
        m.heard_from(id(4), 2_000);
        assert!(!m.needs_rejoin(7_000, 6_000));
        assert_eq!(m.rejoin_candidates(20_000, 6_000), vec![id(4), id(1)]);
        m.neighbour_down(id(1));
        m.neighbour_down(id(2));
        assert_eq!(m.neighbours(), 0);
    }

    #[test]
    fn peers_outside_the_window_are_forgotten_and_memory_is_bounded() {
        let mut m = Membership::new(id(0), vec![], 0);
        m.heard_from(id(1), 0);
        let later = RECENT_WINDOW_MS + 1;
        assert!(m.rejoin_candidates(later, 6_000).is_empty());
        for i in 0..(MAX_REMEMBERED as u64 + 10) {
            let key = iroh::SecretKey::from_bytes(&{
                let mut b = [7u8; 32];
                b[..8].copy_from_slice(&i.to_le_bytes());
                b
            });
            m.heard_from(key.public(), later + i);
        }
        assert!(m.recent.len() <= MAX_REMEMBERED);
        assert_eq!(m.rejoin_candidates(later + 400, 6_000).len(), MAX_REJOIN);
    }

    #[test]
    fn own_announcements_and_self_neighbour_are_ignored() {
        let mut m = Membership::new(id(0), vec![], 0);
        m.heard_from(id(0), 50_000);
        m.neighbour_up(id(0));
        assert_eq!(m.neighbours(), 0);
        assert!(m.needs_rejoin(50_000, 6_000), "own voice is not news");
    }
}
