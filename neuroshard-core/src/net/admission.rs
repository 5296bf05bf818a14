//! Checks a hop runs on a session-open before it sets anything up, IO-less (time is passed
//! in): the route must be a contiguous chain over every layer that names this node, and an
//! open must be fresh (inside the replay window, its nonce not seen before).

use super::proto::RouteHop;
use super::{NodeId, Reason};
use std::collections::{HashMap, HashSet};

/// How long a signed session-open stays acceptable after the client signed it, by default.
pub(crate) const DEFAULT_OPEN_WINDOW_MS: u64 = 60_000;
/// How far in the future an open may be dated (clocks of honest peers disagree a little).
pub(crate) const OPEN_CLOCK_SKEW_MS: u64 = 10_000;
/// Most remembered nonces: beyond it, opens are refused until old ones leave the window (a
/// flood of fresh opens cannot grow the table without bound).
pub(crate) const MAX_REMEMBERED_OPENS: usize = 1 << 16;

/// A refusal: the typed reason and what people read.
pub(crate) type Refusal = (Reason, String);

/// Checks `route` for a model of `num_layers` layers and returns this node's index in it.
///
/// The route must cover layers `0..num_layers` in order, each hop starting where the one
/// before ended, with no empty hop and no node twice; and it must name `me`. A hop can then
/// trust that its predecessor and successor are the nodes the client chose.
pub(crate) fn check_route(
    route: &[RouteHop],
    num_layers: u32,
    me: NodeId,
) -> Result<usize, Refusal> {
    check_chain(route, num_layers)?;
    route.iter().position(|h| h.node == me).ok_or_else(|| {
        (
            Reason::BadRoute,
            "this node is not on the session's route".into(),
        )
    })
}

/// Checks that `route` is a contiguous chain over layers `0..num_layers` with no node twice
/// ([`check_route`] without the hop's own place).
fn check_chain(route: &[RouteHop], num_layers: u32) -> Result<(), Refusal> {
    let bad = |what: String| (Reason::BadRoute, what);
    if route.is_empty() || route.len() > num_layers as usize {
        return Err(bad(format!(
            "a route of {} hops for a model of {num_layers} layers",
            route.len()
        )));
    }
    let mut next = 0u32;
    let mut nodes = HashSet::with_capacity(route.len());
    for (i, hop) in route.iter().enumerate() {
        if hop.layers.start != next || hop.layers.end <= hop.layers.start {
            return Err(bad(format!(
                "hop {i} runs layers {:?}, expected a range starting at {next}",
                hop.layers
            )));
        }
        if !nodes.insert(hop.node) {
            return Err(bad(format!(
                "node {} appears twice in the route",
                hop.node.fmt_short()
            )));
        }
        next = hop.layers.end;
    }
    if next != num_layers {
        return Err(bad(format!(
            "the route ends at layer {next}, the model has {num_layers}"
        )));
    }
    Ok(())
}

/// Where a replica sits in a replicated session (see [`check_replicas`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReplicaPlace {
    /// The range (route index) this node replicates.
    pub(crate) stage: usize,
    /// The replicas of the previous range, whose ballots this node votes on (empty on the
    /// first range: the client feeds it tokens).
    pub(crate) feeders: Vec<NodeId>,
    /// Where this node's outputs go: the next range's replicas (empty on the last range:
    /// the client).
    pub(crate) receivers: Vec<RouteHop>,
    /// The previous range's referee, one of `feeders` outside their vote (audited sessions).
    pub(crate) feeder_referee: Option<NodeId>,
}

/// Checks a replicated session's layout and returns this node's place in it.
///
/// `route` must be a valid chain ([`check_route`]'s rule); `replicas[i]` must list between 1
/// and [`crate::consensus::MAX_REDUNDANCY`] nodes, each running exactly `route[i].layers`,
/// `route[i]` among them, no node twice in the session (ranges may have different counts:
/// each receiver votes over the replicas of the range before it).
/// Votes run over f16 or f32 frames only, so the codec must be one of them. `referees` is
/// empty or names, per range, at most one of its replicas as the range's referee: not the
/// route hop, and besides it 1..=`MAX_REDUNDANCY` voters.
pub(crate) fn check_replicas(
    route: &[RouteHop],
    replicas: &[Vec<RouteHop>],
    referees: &[Option<NodeId>],
    num_layers: u32,
    codec: u8,
    me: NodeId,
) -> Result<ReplicaPlace, Refusal> {
    let bad = |what: String| (Reason::BadRoute, what);
    check_chain(route, num_layers)?;
    if replicas.len() != route.len() {
        return Err(bad(format!(
            "{} replica sets for a route of {} ranges",
            replicas.len(),
            route.len()
        )));
    }
    if !referees.is_empty() && referees.len() != route.len() {
        return Err(bad(format!(
            "{} referee entries for a route of {} ranges",
            referees.len(),
            route.len()
        )));
    }
    let max = crate::consensus::MAX_REDUNDANCY;
    let mut nodes = HashSet::new();
    for (i, (hop, set)) in route.iter().zip(replicas).enumerate() {
        let referee = referees.get(i).copied().flatten();
        let voters = set.len().saturating_sub(usize::from(referee.is_some()));
        if set.is_empty() || voters == 0 || voters > max {
            return Err(bad(format!(
                "range {i} has {voters} voting replicas (accepted: 1..={max})"
            )));
        }
        if !set.iter().any(|r| r.node == hop.node) {
            return Err(bad(format!("range {i}'s replicas leave out its route hop")));
        }
        if let Some(r) = referee {
            if r == hop.node || !set.iter().any(|x| x.node == r) {
                return Err(bad(format!(
                    "range {i}'s referee must be one of its replicas, not its route hop"
                )));
            }
        }
        for r in set {
            if r.layers != hop.layers {
                return Err(bad(format!(
                    "a replica of range {i} runs layers {:?}, the range is {:?}",
                    r.layers, hop.layers
                )));
            }
            if !nodes.insert(r.node) {
                return Err(bad(format!(
                    "node {} appears twice in the session",
                    r.node.fmt_short()
                )));
            }
        }
    }
    if codec != crate::wire::Codec::F16 as u8 && codec != crate::wire::Codec::F32 as u8 {
        return Err((
            Reason::Malformed,
            "replicated sessions vote over f16 or f32 frames: a quantised codec is not voted on"
                .into(),
        ));
    }
    let stage = replicas
        .iter()
        .position(|set| set.iter().any(|r| r.node == me))
        .ok_or_else(|| bad("this node is not among the session's replicas".into()))?;
    Ok(ReplicaPlace {
        stage,
        feeders: match stage {
            0 => Vec::new(),
            s => replicas[s - 1].iter().map(|r| r.node).collect(),
        },
        receivers: replicas.get(stage + 1).cloned().unwrap_or_default(),
        feeder_referee: stage
            .checked_sub(1)
            .and_then(|s| referees.get(s).copied().flatten()),
    })
}

/// Remembers the session-opens accepted inside the replay window, so a captured open cannot
/// be sent again: (client, nonce) pairs with their timestamps, pruned as they age out.
#[derive(Debug)]
pub(crate) struct OpenReplayGuard {
    window_ms: u64,
    seen: HashMap<(NodeId, u64), u64>,
    oldest_ms: u64,
}

impl OpenReplayGuard {
    /// A guard accepting opens dated at most `window_ms` ago.
    pub(crate) fn new(window_ms: u64) -> Self {
        OpenReplayGuard {
            window_ms,
            seen: HashMap::new(),
            oldest_ms: 0,
        }
    }

    /// Accepts an open by `client` with `nonce`, dated `timestamp_ms`, at time `now_ms`; it is
    /// then remembered until it leaves the window.
    pub(crate) fn admit(
        &mut self,
        client: NodeId,
        nonce: u64,
        timestamp_ms: u64,
        now_ms: u64,
    ) -> Result<(), Refusal> {
        if timestamp_ms > now_ms.saturating_add(OPEN_CLOCK_SKEW_MS) {
            return Err((
                Reason::Replayed,
                format!(
                    "session-open dated {} ms in the future",
                    timestamp_ms - now_ms
                ),
            ));
        }
        let horizon = now_ms.saturating_sub(self.window_ms);
        if timestamp_ms < horizon {
            return Err((
                Reason::Replayed,
                format!(
                    "session-open signed {} ms ago, outside the {} ms replay window",
                    now_ms - timestamp_ms,
                    self.window_ms
                ),
            ));
        }
        if self.seen.contains_key(&(client, nonce)) {
            return Err((
                Reason::Replayed,
                "session-open replayed (its nonce was seen)".into(),
            ));
        }
        // Aged-out entries are harmless (their opens are refused as stale anyway), so they
        // go in batches, half a window at a time, not one scan per open.
        if self.seen.len() >= MAX_REMEMBERED_OPENS
            || self.oldest_ms.saturating_add(self.window_ms / 2) < horizon
        {
            self.prune(horizon);
        }
        if self.seen.len() >= MAX_REMEMBERED_OPENS {
            return Err((
                Reason::OverLimit,
                format!("more than {MAX_REMEMBERED_OPENS} session-opens inside the replay window"),
            ));
        }
        self.oldest_ms = if self.seen.is_empty() {
            timestamp_ms
        } else {
            self.oldest_ms.min(timestamp_ms)
        };
        self.seen.insert((client, nonce), timestamp_ms);
        Ok(())
    }

    /// Forgets the opens dated before `horizon` (they would be refused as stale anyway).
    fn prune(&mut self, horizon: u64) {
        self.seen.retain(|_, ts| *ts >= horizon);
        self.oldest_ms = self.seen.values().copied().min().unwrap_or(0);
    }

    /// Opens remembered now.
    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.seen.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(seed: u8) -> NodeId {
        iroh::SecretKey::from_bytes(&[seed; 32]).public()
    }

    fn hop(seed: u8, layers: std::ops::Range<u32>) -> RouteHop {
        RouteHop {
            node: node(seed),
            layers,
            addrs: Vec::new(),
        }
    }

    #[test]
    fn routes_must_be_contiguous_complete_and_name_the_hop() {
        let good = [hop(1, 0..10), hop(2, 10..20), hop(3, 20..30)];
        assert_eq!(check_route(&good, 30, node(2)), Ok(1));
        let refused = |route: &[RouteHop], me: u8| {
            let (reason, message) = check_route(route, 30, node(me)).unwrap_err();
            assert_eq!(reason, Reason::BadRoute, "{message}");
            message
        };
        assert!(refused(&good, 9).contains("not on the session's route"));
        assert!(refused(&[hop(1, 0..10), hop(2, 12..30)], 1).contains("starting at 10"));
        assert!(refused(&[hop(1, 0..10), hop(2, 10..20)], 1).contains("ends at layer 20"));
        assert!(refused(&[hop(1, 5..30)], 1).contains("starting at 0"));
        assert!(refused(&[hop(1, 0..10), hop(1, 10..30)], 1).contains("twice"));
        assert!(refused(&[hop(1, 0..0), hop(2, 0..30)], 2).contains("hop 0"));
        assert!(refused(&[], 1).contains("0 hops"));
        let long: Vec<RouteHop> = (0..31u8).map(|i| hop(i, i as u32..i as u32 + 1)).collect();
        assert!(refused(&long, 1).contains("31 hops"));
    }

    #[test]
    fn replicated_sessions_name_k_replicas_per_range_each_once() {
        let route = [hop(1, 0..10), hop(4, 10..30)];
        let replicas = vec![
            vec![hop(1, 0..10), hop(2, 0..10), hop(3, 0..10)],
            vec![hop(4, 10..30), hop(5, 10..30), hop(6, 10..30)],
        ];
        let f16 = crate::wire::Codec::F16 as u8;
        let place = check_replicas(&route, &replicas, &[], 30, f16, node(5)).unwrap();
        assert_eq!(place.stage, 1);
        assert_eq!(place.feeders, vec![node(1), node(2), node(3)]);
        assert!(place.receivers.is_empty());
        let first = check_replicas(&route, &replicas, &[], 30, f16, node(2)).unwrap();
        assert_eq!((first.stage, first.feeders.len()), (0, 0));
        assert_eq!(first.receivers.len(), 3);
        let refused = |replicas: &[Vec<RouteHop>], codec: u8, me: u8| {
            check_replicas(&route, replicas, &[], 30, codec, node(me))
                .unwrap_err()
                .1
        };
        assert!(refused(&replicas, f16, 9).contains("not among"));
        assert!(refused(&replicas, crate::wire::Codec::Q4 as u8, 1).contains("quantised"));
        assert!(refused(&replicas[..1], f16, 1).contains("1 replica sets"));
        let mut uneven = replicas.clone();
        uneven[1].pop();
        assert_eq!(
            check_replicas(&route, &uneven, &[], 30, f16, node(1)).map(|p| p.receivers.len()),
            Ok(2)
        );
        let mut empty = replicas.clone();
        empty[1].clear();
        assert!(refused(&empty, f16, 1).contains("range 1 has 0"));
        let mut crowd = replicas.clone();
        crowd[0] = (0..8u8).map(|i| hop(10 + i, 0..10)).collect();
        crowd[0][0] = hop(1, 0..10);
        assert!(refused(&crowd, f16, 1).contains("range 0 has 8"));
        let mut twice = replicas.clone();
        twice[1][2] = hop(2, 10..30);
        assert!(refused(&twice, f16, 1).contains("twice"));
        let mut other_layers = replicas.clone();
        other_layers[0][1] = hop(2, 0..12);
        assert!(refused(&other_layers, f16, 1).contains("runs layers"));
        let mut without_hop = replicas.clone();
        without_hop[0][0] = hop(7, 0..10);
        assert!(refused(&without_hop, f16, 1).contains("leave out"));
    }

    #[test]
    fn a_referee_is_a_replica_outside_the_vote_and_its_receivers_know_it() {
        let route = [hop(1, 0..10), hop(4, 10..30)];
        let replicas = vec![
            vec![hop(1, 0..10), hop(2, 0..10), hop(3, 0..10), hop(8, 0..10)],
            vec![hop(4, 10..30), hop(5, 10..30), hop(6, 10..30)],
        ];
        let f16 = crate::wire::Codec::F16 as u8;
        let referees = [Some(node(8)), None];
        let receiver = check_replicas(&route, &replicas, &referees, 30, f16, node(5)).unwrap();
        assert_eq!(receiver.feeder_referee, Some(node(8)));
        assert_eq!(receiver.feeders.len(), 4);
        // The referee itself is placed like a replica of its range.
        let referee = check_replicas(&route, &replicas, &referees, 30, f16, node(8)).unwrap();
        assert_eq!((referee.stage, referee.receivers.len()), (0, 3));
        assert_eq!(referee.feeder_referee, None);
        let refused = |referees: &[Option<NodeId>]| {
            check_replicas(&route, &replicas, referees, 30, f16, node(1))
                .unwrap_err()
                .1
        };
        assert!(refused(&[Some(node(1)), None]).contains("not its route hop"));
        assert!(refused(&[Some(node(9)), None]).contains("one of its replicas"));
        assert!(refused(&[Some(node(8))]).contains("1 referee entries"));
        // A range of one replica cannot be all referee.
        let lone = vec![vec![hop(1, 0..10), hop(8, 0..10)], replicas[1].clone()];
        let err = check_replicas(&route, &lone, &referees, 30, f16, node(1)).map(|p| p.stage);
        assert_eq!(err, Ok(0));
        let only = [hop(1, 0..30)];
        let err = check_replicas(
            &only,
            &[vec![hop(1, 0..30)]],
            &[Some(node(1))],
            30,
            f16,
            node(1),
        )
        .unwrap_err();
        assert!(
            err.1.contains("voting") || err.1.contains("route hop"),
            "{}",
            err.1
        );
    }

    #[test]
    fn opens_are_fresh_once_and_the_table_stays_bounded() {
        let now = 1_000_000_000;
        let mut guard = OpenReplayGuard::new(DEFAULT_OPEN_WINDOW_MS);
        assert_eq!(guard.admit(node(1), 7, now, now), Ok(()));
        // The same nonce again, from the same client: refused; from another client: its own.
        assert_eq!(
            guard.admit(node(1), 7, now, now + 5).unwrap_err().0,
            Reason::Replayed
        );
        assert_eq!(guard.admit(node(2), 7, now, now + 5), Ok(()));
        // Outside the window in either direction.
        let stale = guard.admit(node(1), 8, now - DEFAULT_OPEN_WINDOW_MS - 1, now);
        assert!(stale.unwrap_err().1.contains("outside"));
        let future = guard.admit(node(1), 9, now + OPEN_CLOCK_SKEW_MS + 1, now);
        assert!(future.unwrap_err().1.contains("future"));
        // Aged-out opens are forgotten (a replay of them is stale anyway).
        let later = now + 2 * DEFAULT_OPEN_WINDOW_MS;
        assert_eq!(guard.admit(node(3), 1, later, later), Ok(()));
        assert_eq!(guard.remembered(), 1);
        assert_eq!(
            guard.admit(node(1), 7, now, later).unwrap_err().0,
            Reason::Replayed
        );
    }

    #[test]
    fn a_flood_of_fresh_opens_is_refused_past_the_cap() {
        let now = 5_000_000;
        let mut guard = OpenReplayGuard::new(DEFAULT_OPEN_WINDOW_MS);
        for nonce in 0..MAX_REMEMBERED_OPENS as u64 {
            guard
                .admit(node(1), nonce, now, now)
                .expect("under the cap");
        }
        let full = guard.admit(node(1), u64::MAX, now, now).unwrap_err();
        assert_eq!(full.0, Reason::OverLimit);
        // Once the window has passed, the table empties and opens are accepted again.
        let later = now + DEFAULT_OPEN_WINDOW_MS + 1;
        assert_eq!(guard.admit(node(1), u64::MAX, later, later), Ok(()));
        assert_eq!(guard.remembered(), 1);
    }
}
