//! Reputation: each node's local trust score for its peers (the seed's
//! `local_trust_scores`), and who may sit in a vote.
//!
//! The rule (also in `docs/trust.md`):
//! - A node first seen starts on **probation** with score 0.
//! - Each vote it agrees with adds 1 (up to `max_score`). After `promote_after` agreed votes
//!   it is **trusted**.
//! - **Deviation** shown by signed receipts (a majority's receipts against its own, checked by
//!   the [`Consensus`](super::Consensus) before it calls [`Reputation::deviated`]) sets the
//!   score to `min(score, 0) - deviation_penalty`, below the routing threshold, and bans it
//!   for `deviation_ban_ms`, doubled at each repeat. After the ban it is back on probation at
//!   score 0 and must earn trust again.
//! - A **fraud proof** (one signer, one input, two outputs) bans it for good.
//! - A **timeout** is not evidence: it bans the node for `timeout_ban_ms`, doubled at each
//!   consecutive timeout (reset by agreed work), without touching its score.
//! - **Pinned** nodes (`--trust ID`) are trusted from the start and are never banned by votes
//!   or timeouts (the operator vouches for them); a fraud proof still bans them, since it
//!   needs nobody's word.
//! - A node may be routed to when it is not banned and its score is at least
//!   `route_threshold`.
//!
//! Who votes ([`Reputation::choose_voters`]): where a range has trusted replicas, a vote holds
//! at most one probation node and a probation node never serves alone. Where it has none (a
//! new swarm, nothing pinned), its probation nodes vote by plain majority, at least 3 of them
//! when there are 3. Referees are trusted nodes outside the vote. Trusted-only votes of one
//! replica are spot-checked: the session is replicated at open with probability
//! `spot_check_rate`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::net::NodeId;

/// A node's place in the trust order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrustState {
    /// New, or back from a ban: always replicated.
    Probation,
    /// Earned (or pinned) trust.
    Trusted,
    /// Left out of routes until the ban ends.
    Banned,
}

impl std::fmt::Display for TrustState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TrustState::Probation => "probation",
            TrustState::Trusted => "trusted",
            TrustState::Banned => "banned",
        })
    }
}

/// The knobs of the rule (module doc); the defaults suit a public swarm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReputationPolicy {
    /// Agreed votes before a probation node is trusted.
    pub promote_after: u64,
    /// Highest score.
    pub max_score: f64,
    /// Nodes below this score leave routes.
    pub route_threshold: f64,
    /// Subtracted from `min(score, 0)` on evidence of deviation.
    pub deviation_penalty: f64,
    /// First ban after evidence of deviation; doubled at each repeat.
    pub deviation_ban_ms: u64,
    /// First ban after a timeout; doubled at each consecutive timeout.
    pub timeout_ban_ms: u64,
    /// Longest temporary ban.
    pub max_ban_ms: u64,
    /// Probability that a session on trusted single replicas is replicated anyway.
    pub spot_check_rate: f64,
}

impl Default for ReputationPolicy {
    fn default() -> Self {
        ReputationPolicy {
            promote_after: 20,
            max_score: 100.0,
            route_threshold: 0.0,
            deviation_penalty: 50.0,
            deviation_ban_ms: 60 * 60 * 1000,
            timeout_ban_ms: 10_000,
            max_ban_ms: 7 * 24 * 60 * 60 * 1000,
            spot_check_rate: 0.05,
        }
    }
}

/// What one node knows about a peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Standing {
    /// The score (module doc).
    pub score: f64,
    /// Votes agreed with.
    pub agreed: u64,
    /// Deviations shown by evidence.
    pub deviations: u32,
    /// Consecutive timeouts.
    pub timeouts: u32,
    /// Promoted out of probation.
    pub promoted: bool,
    /// Trusted by the operator (`--trust`).
    pub pinned: bool,
    /// Banned until this time (Unix ms; `u64::MAX` for good, 0 for not banned).
    pub banned_until_ms: u64,
    /// Why the state last changed.
    pub reason: String,
    /// When it last changed (Unix ms).
    pub changed_ms: u64,
}

impl Standing {
    fn new(now_ms: u64) -> Self {
        Standing {
            score: 0.0,
            agreed: 0,
            deviations: 0,
            timeouts: 0,
            promoted: false,
            pinned: false,
            banned_until_ms: 0,
            reason: "first seen".into(),
            changed_ms: now_ms,
        }
    }

    /// Its state at `now_ms`.
    pub fn state(&self, now_ms: u64) -> TrustState {
        if self.banned_until_ms > now_ms {
            TrustState::Banned
        } else if self.pinned || self.promoted {
            TrustState::Trusted
        } else {
            TrustState::Probation
        }
    }
}

/// One row of [`Reputation::table`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StandingRow {
    /// The peer.
    pub node: String,
    /// Its state now.
    pub state: TrustState,
    /// What is known about it.
    #[serde(flatten)]
    pub standing: Standing,
}

/// Why choosing a vote's replicas failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VoterError {
    /// No candidate for the range may be routed to.
    #[error("no routable replica for this range")]
    NoReplica,
}

/// The replicas chosen for one range of one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Voters {
    /// The replicas, in route preference order.
    pub nodes: Vec<NodeId>,
    /// Whether the range had no trusted replica, so its vote is a plain majority of
    /// probation nodes.
    pub plain_majority: bool,
}

/// A node's local reputation table.
#[derive(Debug, Clone, Default)]
pub struct Reputation {
    policy: ReputationPolicy,
    nodes: BTreeMap<NodeId, Standing>,
}

#[derive(Serialize, Deserialize)]
struct Persisted {
    version: u32,
    nodes: Vec<StandingRow>,
}

impl Reputation {
    /// An empty table under `policy`.
    pub fn new(policy: ReputationPolicy) -> Self {
        Reputation {
            policy,
            nodes: BTreeMap::new(),
        }
    }

    /// Changes the policy (the table's entries stay as they are).
    pub fn set_policy(&mut self, policy: ReputationPolicy) {
        self.policy = policy;
    }

    /// The policy.
    pub fn policy(&self) -> &ReputationPolicy {
        &self.policy
    }

    fn entry(&mut self, node: NodeId, now_ms: u64) -> &mut Standing {
        self.nodes
            .entry(node)
            .or_insert_with(|| Standing::new(now_ms))
    }

    /// What is known about `node` (None: never seen, so on probation at score 0).
    pub fn standing(&self, node: &NodeId) -> Option<&Standing> {
        self.nodes.get(node)
    }

    /// `node`'s state at `now_ms` (probation when never seen).
    pub fn state(&self, node: &NodeId, now_ms: u64) -> TrustState {
        self.nodes
            .get(node)
            .map_or(TrustState::Probation, |s| s.state(now_ms))
    }

    /// Trusts `node` from now on (`--trust ID`).
    pub fn pin(&mut self, node: NodeId, now_ms: u64) {
        let s = self.entry(node, now_ms);
        if !s.pinned {
            s.pinned = true;
            s.banned_until_ms = s.banned_until_ms.min(now_ms);
            s.reason = "pinned by the operator".into();
            s.changed_ms = now_ms;
        }
    }

    /// `node` agreed with an accepted vote.
    pub fn agreed(&mut self, node: NodeId, now_ms: u64) {
        let policy = self.policy.clone();
        let s = self.entry(node, now_ms);
        s.agreed += 1;
        s.score = (s.score + 1.0).min(policy.max_score);
        s.timeouts = 0;
        if !s.promoted && s.agreed >= policy.promote_after && s.score >= policy.route_threshold {
            s.promoted = true;
            s.reason = format!("trusted after {} agreed votes", s.agreed);
            s.changed_ms = now_ms;
        }
    }

    /// Signed receipts show that `node` deviated from an accepted vote (the caller checked
    /// them); `reason` says how.
    pub fn deviated(&mut self, node: NodeId, reason: &str, now_ms: u64) {
        let policy = self.policy.clone();
        let s = self.entry(node, now_ms);
        s.deviations += 1;
        s.reason = format!("deviated: {reason}");
        s.changed_ms = now_ms;
        if s.pinned {
            // The operator vouches for it: recorded, not acted on.
            return;
        }
        s.score = s.score.min(0.0) - policy.deviation_penalty;
        s.promoted = false;
        let ban = backoff(policy.deviation_ban_ms, s.deviations, policy.max_ban_ms);
        s.banned_until_ms = s.banned_until_ms.max(now_ms.saturating_add(ban));
    }

    /// A fraud proof against `node` was verified: banned for good, pinned or not.
    pub fn fraud(&mut self, node: NodeId, reason: &str, now_ms: u64) {
        let s = self.entry(node, now_ms);
        s.deviations += 1;
        s.score = -1000.0;
        s.promoted = false;
        s.pinned = false;
        s.banned_until_ms = u64::MAX;
        s.reason = format!("fraud proven: {reason}");
        s.changed_ms = now_ms;
    }

    /// `node` did not answer in time: a temporary ban with exponential backoff. A node
    /// banned already is left as it is: its silence adds nothing (nobody waits for it), and
    /// the reason of its ban stays the evidence's.
    pub fn timed_out(&mut self, node: NodeId, now_ms: u64) {
        if self.state(&node, now_ms) == TrustState::Banned {
            return;
        }
        let policy = self.policy.clone();
        let s = self.entry(node, now_ms);
        s.timeouts = s.timeouts.saturating_add(1);
        if s.pinned {
            return;
        }
        let ban = backoff(policy.timeout_ban_ms, s.timeouts, policy.max_ban_ms);
        s.banned_until_ms = s.banned_until_ms.max(now_ms.saturating_add(ban));
        s.reason = format!(
            "timed out ({} in a row), banned for {} s",
            s.timeouts,
            ban / 1000
        );
        s.changed_ms = now_ms;
    }

    /// Ends the bans that are over: a node banned on evidence comes back on probation at
    /// score 0. Call before routing (cheap).
    pub fn expire_bans(&mut self, now_ms: u64) {
        for s in self.nodes.values_mut() {
            if s.banned_until_ms != 0 && s.banned_until_ms <= now_ms {
                s.banned_until_ms = 0;
                if s.score < 0.0 {
                    s.score = 0.0;
                    s.agreed = 0;
                    s.reason = "ban over: back on probation".into();
                } else {
                    s.reason = "ban over".into();
                }
                s.changed_ms = now_ms;
            }
        }
    }

    /// Whether routes may use `node`.
    pub fn may_route(&self, node: &NodeId, now_ms: u64) -> bool {
        match self.nodes.get(node) {
            None => 0.0 >= self.policy.route_threshold,
            Some(s) => {
                s.banned_until_ms <= now_ms && (s.pinned || s.score >= self.policy.route_threshold)
            }
        }
    }

    /// Whether a session on trusted single replicas is spot-checked, given a uniform random
    /// `draw` made at open (the caller's randomness keeps this machine IO-less).
    pub fn spot_check(&self, draw: u64) -> bool {
        (draw as f64) < self.policy.spot_check_rate * (u64::MAX as f64)
    }

    /// The replicas of one range for one session, from `candidates` in route preference order
    /// (module doc for the rule). `k` is the redundancy asked for (`--redundancy`).
    pub fn choose_voters(
        &self,
        candidates: &[NodeId],
        k: usize,
        now_ms: u64,
    ) -> Result<Voters, VoterError> {
        let k = k.max(1);
        let routable: Vec<NodeId> = candidates
            .iter()
            .filter(|n| self.may_route(n, now_ms))
            .copied()
            .collect();
        if routable.is_empty() {
            return Err(VoterError::NoReplica);
        }
        let (trusted, probation): (Vec<NodeId>, Vec<NodeId>) = routable
            .iter()
            .partition(|n| self.state(n, now_ms) == TrustState::Trusted);
        if trusted.is_empty() {
            let want = k.max(3).min(probation.len());
            return Ok(Voters {
                nodes: probation[..want].to_vec(),
                plain_majority: true,
            });
        }
        let mut nodes: Vec<NodeId> = Vec::with_capacity(k);
        // One probation node earns its trust beside trusted ones, never alone.
        if k >= 2 {
            if let Some(&p) = probation.first() {
                nodes.push(p);
            }
        }
        nodes.extend(trusted.iter().take(k - nodes.len()));
        // Too few trusted replicas to fill k: the vote stays smaller rather than take a
        // second probation node.
        Ok(Voters {
            nodes,
            plain_majority: false,
        })
    }

    /// A referee for a vote among `voters`: the first trusted routable candidate outside it.
    pub fn choose_referee(
        &self,
        candidates: &[NodeId],
        voters: &[NodeId],
        now_ms: u64,
    ) -> Option<NodeId> {
        candidates.iter().copied().find(|n| {
            !voters.contains(n)
                && self.may_route(n, now_ms)
                && self.state(n, now_ms) == TrustState::Trusted
        })
    }

    /// Every known node with its state at `now_ms`, by node id (`neuroshard peers --json`).
    pub fn table(&self, now_ms: u64) -> Vec<StandingRow> {
        self.nodes
            .iter()
            .map(|(id, s)| StandingRow {
                node: id.to_string(),
                state: s.state(now_ms),
                standing: s.clone(),
            })
            .collect()
    }

    /// Writes the table to `path` (JSON, replaced atomically), so scores survive restarts.
    pub fn save(&self, path: &Path, now_ms: u64) -> std::io::Result<()> {
        let body = serde_json::to_vec_pretty(&Persisted {
            version: 1,
            nodes: self.table(now_ms),
        })
        .map_err(std::io::Error::other)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, body)?;
        std::fs::rename(&tmp, path)
    }

    /// Reads a table written by [`Reputation::save`] under `policy`; a missing file is an
    /// empty table, a corrupt one an error (never silently forgotten bans).
    pub fn load(path: &Path, policy: ReputationPolicy) -> std::io::Result<Self> {
        let mut table = Reputation::new(policy);
        let body = match std::fs::read(path) {
            Ok(body) => body,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(table),
            Err(e) => return Err(e),
        };
        let persisted: Persisted = serde_json::from_slice(&body)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        for row in persisted.nodes {
            let id: NodeId = row.node.parse().map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{e}"))
            })?;
            table.nodes.insert(id, row.standing);
        }
        Ok(table)
    }
}

/// `base * 2^(n-1)`, capped.
fn backoff(base: u64, n: u32, cap: u64) -> u64 {
    base.saturating_mul(1u64 << n.saturating_sub(1).min(40))
        .min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(seed: u8) -> NodeId {
        iroh::SecretKey::from_bytes(&[seed; 32]).public()
    }

    const T0: u64 = 1_000_000_000;

    #[test]
    fn agreed_work_promotes_and_evidence_bans_then_probation_again() {
        let mut rep = Reputation::new(ReputationPolicy::default());
        let n = id(1);
        assert_eq!(rep.state(&n, T0), TrustState::Probation);
        assert!(rep.may_route(&n, T0));
        for _ in 0..19 {
            rep.agreed(n, T0);
        }
        assert_eq!(rep.state(&n, T0), TrustState::Probation);
        rep.agreed(n, T0);
        assert_eq!(rep.state(&n, T0), TrustState::Trusted);
        rep.deviated(n, "rel_l2 0.3", T0 + 1);
        let s = rep.standing(&n).expect("known");
        assert_eq!(s.score, -50.0);
        assert_eq!(rep.state(&n, T0 + 2), TrustState::Banned);
        assert!(!rep.may_route(&n, T0 + 2));
        assert!(s.reason.contains("rel_l2"));
        // After the hour's ban: probation at score 0, trust to earn again.
        rep.expire_bans(T0 + 3_600_001);
        assert_eq!(rep.state(&n, T0 + 3_600_001), TrustState::Probation);
        assert!(rep.may_route(&n, T0 + 3_600_001));
        // A second deviation bans for twice as long.
        rep.deviated(n, "again", T0 + 4_000_000);
        assert_eq!(
            rep.standing(&n).map(|s| s.banned_until_ms),
            Some(T0 + 4_000_000 + 7_200_000)
        );
    }

    #[test]
    fn timeouts_back_off_exponentially_and_agreed_work_resets_them() {
        let mut rep = Reputation::new(ReputationPolicy::default());
        let n = id(2);
        let mut now = T0;
        for expect in [10_000, 20_000, 40_000] {
            rep.timed_out(n, now);
            assert_eq!(
                rep.standing(&n).map(|s| s.banned_until_ms),
                Some(now + expect)
            );
            now += expect + 1;
            rep.expire_bans(now);
            assert!(rep.may_route(&n, now));
        }
        assert_eq!(
            rep.standing(&n).map(|s| s.score),
            Some(0.0),
            "a timeout is not evidence"
        );
        rep.agreed(n, now);
        rep.timed_out(n, now);
        assert_eq!(
            rep.standing(&n).map(|s| s.banned_until_ms),
            Some(now + 10_000)
        );
    }

    #[test]
    fn pinned_nodes_survive_votes_and_timeouts_but_not_fraud() {
        let mut rep = Reputation::new(ReputationPolicy::default());
        let n = id(3);
        rep.pin(n, T0);
        assert_eq!(rep.state(&n, T0), TrustState::Trusted);
        rep.deviated(n, "outvoted", T0);
        rep.timed_out(n, T0);
        assert!(rep.may_route(&n, T0 + 1));
        rep.fraud(n, "two outputs for one input", T0 + 2);
        assert_eq!(rep.state(&n, u64::MAX - 1), TrustState::Banned);
    }

    #[test]
    fn a_vote_holds_at_most_one_probation_node_once_trust_exists() {
        let mut rep = Reputation::new(ReputationPolicy::default());
        let (t1, t2, p1, p2, p3) = (id(1), id(2), id(3), id(4), id(5));
        // Nobody trusted: plain majority of (at least 3) probation nodes, even for k = 1.
        let v = rep.choose_voters(&[p1, p2, p3], 1, T0).expect("voters");
        assert_eq!(
            v,
            Voters {
                nodes: vec![p1, p2, p3],
                plain_majority: true
            }
        );
        rep.pin(t1, T0);
        rep.pin(t2, T0);
        let all = [p1, t1, p2, t2, p3];
        let v = rep.choose_voters(&all, 3, T0).expect("voters");
        assert_eq!(v.nodes, vec![p1, t1, t2]);
        assert!(!v.plain_majority);
        // k = 1 never puts a probation node alone.
        assert_eq!(
            rep.choose_voters(&all, 1, T0).map(|v| v.nodes),
            Ok(vec![t1])
        );
        // Only one trusted replica: the vote shrinks rather than take two probation nodes.
        assert_eq!(
            rep.choose_voters(&[p1, p2, t1], 3, T0).map(|v| v.nodes),
            Ok(vec![p1, t1])
        );
        // Referees are trusted and outside the vote.
        assert_eq!(rep.choose_referee(&all, &[p1, t1], T0), Some(t2));
        assert_eq!(rep.choose_referee(&all, &[t1, t2], T0), None);
        // Banned nodes leave.
        rep.fraud(p1, "test", T0);
        assert_eq!(rep.choose_voters(&[p1], 1, T0), Err(VoterError::NoReplica));
    }

    #[test]
    fn spot_checks_run_at_the_policy_rate() {
        let rep = Reputation::new(ReputationPolicy::default());
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut hits = 0;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            hits += rep.spot_check(x) as u32;
        }
        assert!((4_500..5_500).contains(&hits), "{hits}");
    }

    #[test]
    fn the_table_survives_a_restart_and_a_corrupt_file_is_an_error() {
        let dir = std::env::temp_dir().join(format!("neuroshard-rep-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("reputation.json");
        let mut rep = Reputation::new(ReputationPolicy::default());
        rep.agreed(id(1), T0);
        rep.deviated(id(2), "scale 1.02", T0);
        rep.pin(id(3), T0);
        rep.save(&path, T0).expect("save");
        let back = Reputation::load(&path, ReputationPolicy::default()).expect("load");
        assert_eq!(back.table(T0), rep.table(T0));
        assert_eq!(back.state(&id(2), T0), TrustState::Banned);
        std::fs::write(&path, b"{not json").expect("write");
        assert!(Reputation::load(&path, ReputationPolicy::default()).is_err());
        let missing = Reputation::load(&dir.join("none.json"), ReputationPolicy::default());
        assert_eq!(missing.map(|r| r.table(T0).len()).ok(), Some(0));
        std::fs::remove_dir_all(&dir).ok();
    }
}
