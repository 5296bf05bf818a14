//! IO-less recovery planning: which hops of a moved session need their KV cache rebuilt, and
//! who feeds them. The client executes the plan ([`crate::client::RemoteSession::refill`]).

use super::proto::RouteHop;

/// How to rebuild the KV caches of the hops that joined a session's route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RefillPlan {
    /// Every hop already holds the session's positions (or none were computed yet).
    Nothing,
    /// The first hop is new: the client feeds token ids `0..upto` to it as a fill that runs
    /// through hop `through`.
    FromClient {
        /// Positions to fill.
        upto: usize,
        /// Index of the last hop to fill.
        through: usize,
    },
    /// Hop `from` (unchanged) replays the hidden states it sent for `0..upto` into its new
    /// successor, and the fill runs through hop `through`.
    FromHop {
        /// Index of the replaying hop in the new route.
        from: usize,
        /// Positions to fill.
        upto: usize,
        /// Index of the last hop to fill.
        through: usize,
    },
}

/// Plans the refill after a session moved from route `old` to `new` with `done` positions
/// computed. A hop is new unless the same node ran the same layers before; everything between
/// the first and the last new hop is filled (hops in between overwrite their cache with the
/// same values, which costs time but keeps the chain simple), nothing before the first new hop
/// is recomputed.
pub(crate) fn plan_refill(old: &[RouteHop], new: &[RouteHop], done: usize) -> RefillPlan {
    let is_new = |h: &RouteHop| !old.iter().any(|o| o.node == h.node && o.layers == h.layers);
    let first = new.iter().position(is_new);
    let last = new.iter().rposition(is_new);
    match (first, last) {
        _ if done == 0 => RefillPlan::Nothing,
        (Some(0), Some(through)) => RefillPlan::FromClient {
            upto: done,
            through,
        },
        (Some(first), Some(through)) => RefillPlan::FromHop {
            from: first - 1,
            upto: done,
            through,
        },
        _ => RefillPlan::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(seed: u8, layers: std::ops::Range<u32>) -> RouteHop {
        RouteHop {
            node: iroh::SecretKey::from_bytes(&[seed; 32]).public(),
            layers,
            addrs: Vec::new(),
        }
    }

    #[test]
    fn only_new_hops_are_filled_from_the_hop_before_them() {
        let (a, b, c) = (hop(1, 0..10), hop(2, 10..20), hop(3, 20..30));
        let old = vec![a.clone(), b.clone(), c.clone()];
        assert_eq!(plan_refill(&old, &old, 12), RefillPlan::Nothing);
        let b2 = hop(4, 10..20);
        assert_eq!(
            plan_refill(&old, &[a.clone(), b2.clone(), c.clone()], 12),
            RefillPlan::FromHop {
                from: 0,
                upto: 12,
                through: 1
            }
        );
        let c2 = hop(5, 20..30);
        assert_eq!(
            plan_refill(&old, &[a.clone(), b.clone(), c2.clone()], 12),
            RefillPlan::FromHop {
                from: 1,
                upto: 12,
                through: 2
            }
        );
        let a2 = hop(6, 0..10);
        assert_eq!(
            plan_refill(&old, &[a2.clone(), b.clone(), c.clone()], 12),
            RefillPlan::FromClient {
                upto: 12,
                through: 0
            }
        );
        // Two new hops with an unchanged one between them: the fill runs through both.
        assert_eq!(
            plan_refill(&old, &[a2, b.clone(), c2], 12),
            RefillPlan::FromClient {
                upto: 12,
                through: 2
            }
        );
        // Nothing computed yet: the retried prefill fills everything.
        assert_eq!(
            plan_refill(&old, &[a.clone(), b2, c.clone()], 0),
            RefillPlan::Nothing
        );
    }

    #[test]
    fn a_node_running_other_layers_counts_as_new() {
        let (a, b, c) = (hop(1, 0..10), hop(2, 10..20), hop(3, 20..30));
        let old = vec![a.clone(), b, c.clone()];
        // `a` now also runs 10..15 and a replica runs 15..20.
        let new = vec![hop(1, 0..15), hop(7, 15..20), c];
        assert_eq!(
            plan_refill(&old, &new, 5),
            RefillPlan::FromClient {
                upto: 5,
                through: 1
            }
        );
        // Dropping a hop entirely (a wider neighbour takes its layers) needs that neighbour filled.
        let merged = vec![a, hop(3, 10..30)];
        assert_eq!(
            plan_refill(&old, &merged, 5),
            RefillPlan::FromHop {
                from: 0,
                upto: 5,
                through: 1
            }
        );
    }
}
