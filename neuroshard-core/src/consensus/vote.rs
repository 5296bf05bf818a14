//! The fixed vote rule every receiver applies to the k outputs of one replicated range.
//!
//! No single decider: each receiver (each replica of the next range, or the client for the
//! last range) gets all k outputs and runs [`tally`] on them. The rule depends only on the
//! outputs and the node ids, so honest receivers that see the same outputs reach the same
//! outcome and go on with the same bytes:
//!
//! 1. A group is a set of ballots that pairwise agree under the [`Comparison`] (a clique: the
//!    tolerant relation is not transitive, so "agrees with one member" is not enough).
//! 2. The largest group wins if it is a strict majority of the k replicas expected, and if no
//!    other group of the same size exists. Otherwise there is no majority (a referee decides).
//! 3. The winner's bytes are those of the group's lowest node id.
//!
//! A node that sent two different ballots to the same receiver counts once, as deviating; a
//! ballot from a node outside the expected replicas is ignored.

use super::compare::{Comparison, VoteOutput};
use crate::net::NodeId;

/// Most replicas one vote may have (the clique search is exponential in k).
pub const MAX_REDUNDANCY: usize = 7;

/// One replica's answer, as a receiver got it.
#[derive(Debug, Clone)]
pub struct Ballot {
    /// The replica that computed it.
    pub node: NodeId,
    /// What it computed.
    pub output: VoteOutput,
}

/// A vote's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VoteOutcome {
    /// A strict majority agreed.
    Accepted(Accepted),
    /// No group is a strict majority, or two groups tie: a referee replays and decides.
    NoMajority {
        /// The replicas that answered, ascending.
        answered: Vec<NodeId>,
        /// The expected replicas that did not.
        missing: Vec<NodeId>,
    },
}

/// The winning side of a vote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The lowest node id of the winning group: its bytes go forward.
    pub winner: NodeId,
    /// Every member of the winning group, ascending.
    pub agreeing: Vec<NodeId>,
    /// Replicas that answered outside the winning group (or equivocated), ascending.
    pub deviating: Vec<NodeId>,
    /// Expected replicas that did not answer.
    pub missing: Vec<NodeId>,
}

impl VoteOutcome {
    /// The accepted side, if any.
    pub fn accepted(&self) -> Option<&Accepted> {
        match self {
            VoteOutcome::Accepted(a) => Some(a),
            VoteOutcome::NoMajority { .. } => None,
        }
    }
}

/// Applies the rule (module doc) to the ballots one receiver got from the `expected` replicas.
/// More than [`MAX_REDUNDANCY`] expected replicas is no majority: callers refuse such
/// sessions at open.
pub fn tally(expected: &[NodeId], ballots: &[Ballot], comparison: &Comparison) -> VoteOutcome {
    let Counted {
        expected,
        counted,
        answered,
        missing,
    } = count(expected, ballots);
    let no_majority =
        |answered: Vec<NodeId>, missing: Vec<NodeId>| VoteOutcome::NoMajority { answered, missing };
    if expected.len() > MAX_REDUNDANCY || counted.is_empty() {
        return no_majority(answered, missing);
    }

    let n = counted.len();
    let mut agree = vec![vec![false; n]; n];
    for i in 0..n {
        agree[i][i] = true;
        for j in i + 1..n {
            let a = comparison.agrees(&counted[i].output, &counted[j].output);
            agree[i][j] = a;
            agree[j][i] = a;
        }
    }
    // Every clique by brute force over subsets (n <= 7: at most 127 masks).
    let mut best_size = 0;
    let mut best: Vec<u32> = Vec::new();
    for mask in 1u32..(1 << n) {
        let members: Vec<usize> = (0..n).filter(|i| mask & (1 << i) != 0).collect();
        let clique = members
            .iter()
            .all(|&i| members.iter().all(|&j| agree[i][j]));
        if !clique {
            continue;
        }
        let size = members.len();
        if size > best_size {
            best_size = size;
            best = vec![mask];
        } else if size == best_size {
            best.push(mask);
        }
    }
    if best.len() != 1 || 2 * best_size <= expected.len() {
        return no_majority(answered, missing);
    }
    let mask = best[0];
    let agreeing: Vec<NodeId> = (0..n)
        .filter(|i| mask & (1 << i) != 0)
        .map(|i| counted[i].node)
        .collect();
    accept(agreeing[0], agreeing, &answered, missing)
}

/// The accepted outcome: `winner`'s bytes go forward, and every answer outside `agreeing`
/// deviates.
fn accept(
    winner: NodeId,
    agreeing: Vec<NodeId>,
    answered: &[NodeId],
    missing: Vec<NodeId>,
) -> VoteOutcome {
    let deviating: Vec<NodeId> = answered
        .iter()
        .filter(|id| !agreeing.contains(id))
        .copied()
        .collect();
    VoteOutcome::Accepted(Accepted {
        winner,
        agreeing,
        deviating,
        missing,
    })
}

/// The ballots of one vote that count, after the rule's bookkeeping.
struct Counted<'a> {
    /// The expected replicas, ascending, once each.
    expected: Vec<NodeId>,
    /// One ballot per expected replica that answered and did not equivocate, by node id.
    counted: Vec<&'a Ballot>,
    /// Every expected replica that answered (equivocators included), ascending.
    answered: Vec<NodeId>,
    /// The expected replicas that did not answer.
    missing: Vec<NodeId>,
}

/// One ballot per expected node; a second, different ballot from the same node marks it as
/// an equivocator (it counts as deviating, never in a group); outsiders are ignored.
fn count<'a>(expected: &[NodeId], ballots: &'a [Ballot]) -> Counted<'a> {
    let mut expected: Vec<NodeId> = expected.to_vec();
    expected.sort();
    expected.dedup();
    let mut counted: Vec<&Ballot> = Vec::new();
    let mut equivocators: Vec<NodeId> = Vec::new();
    for b in ballots {
        if expected.binary_search(&b.node).is_err() {
            continue;
        }
        match counted.iter().position(|c| c.node == b.node) {
            Some(i) if counted[i].output != b.output => {
                if !equivocators.contains(&b.node) {
                    equivocators.push(b.node);
                }
            }
            Some(_) => {}
            None => counted.push(b),
        }
    }
    counted.retain(|b| !equivocators.contains(&b.node));
    counted.sort_by_key(|b| b.node);
    let mut answered: Vec<NodeId> = counted.iter().map(|b| b.node).collect();
    answered.extend(&equivocators);
    answered.sort();
    let missing: Vec<NodeId> = expected
        .iter()
        .filter(|n| answered.binary_search(n).is_err())
        .copied()
        .collect();
    Counted {
        expected,
        counted,
        answered,
        missing,
    }
}

/// The rule when a trusted referee outside the vote replayed the same input (on no majority,
/// or when the vote is audited): the referee's output is the reference. The ballots that
/// agree with it agree; every other answer deviates, however many sent it. The bytes that go
/// forward are those of the lowest agreeing replica, or the referee's own when none agrees.
pub fn refereed_tally(
    expected: &[NodeId],
    ballots: &[Ballot],
    referee: &Ballot,
    comparison: &Comparison,
) -> VoteOutcome {
    let Counted {
        counted,
        answered,
        missing,
        ..
    } = count(expected, ballots);
    let agreeing: Vec<NodeId> = counted
        .iter()
        .filter(|b| b.node != referee.node && comparison.agrees(&b.output, &referee.output))
        .map(|b| b.node)
        .collect();
    let winner = agreeing.first().copied().unwrap_or(referee.node);
    accept(winner, agreeing, &answered, missing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consensus::compare::Tolerance;

    fn id(seed: u8) -> NodeId {
        iroh::SecretKey::from_bytes(&[seed; 32]).public()
    }

    fn ballot(node: NodeId, values: &[f32]) -> Ballot {
        Ballot {
            node,
            output: VoteOutput::from_f32(values.to_vec(), values.len()),
        }
    }

    fn sorted(mut ids: Vec<NodeId>) -> Vec<NodeId> {
        ids.sort();
        ids
    }

    #[test]
    fn two_of_three_win_and_the_lowest_id_of_the_group_goes_forward() {
        let ids = sorted(vec![id(1), id(2), id(3)]);
        // The liar is the lowest id: the winner must still be an honest node.
        let ballots = [
            ballot(ids[0], &[9.0, 9.0]),
            ballot(ids[2], &[1.0, 2.0]),
            ballot(ids[1], &[1.0, 2.0]),
        ];
        let out = tally(&ids, &ballots, &Comparison::default());
        let a = out.accepted().expect("a majority");
        assert_eq!(a.winner, ids[1]);
        assert_eq!(a.agreeing, vec![ids[1], ids[2]]);
        assert_eq!(a.deviating, vec![ids[0]]);
        assert!(a.missing.is_empty());
    }

    #[test]
    fn every_receiver_reaches_the_same_outcome_whatever_the_arrival_order() {
        let ids = sorted(vec![id(4), id(5), id(6)]);
        let ballots = vec![
            ballot(ids[0], &[1.0, 2.0]),
            ballot(ids[1], &[1.0, 2.0 + 1e-6]),
            ballot(ids[2], &[1.5, 2.0]),
        ];
        let first = tally(&ids, &ballots, &Comparison::default());
        let mut reversed = ballots.clone();
        reversed.reverse();
        assert_eq!(first, tally(&ids, &reversed, &Comparison::default()));
        assert_eq!(first.accepted().map(|a| a.winner), Some(ids[0]));
    }

    #[test]
    fn a_chain_of_near_agreements_is_no_majority() {
        // A ~ B and B ~ C but not A ~ C: two groups of two tie.
        let ids = sorted(vec![id(7), id(8), id(9)]);
        let tol = Comparison::Tolerant(Tolerance {
            rel_l2: 0.015,
            max_abs: 1.0,
        });
        let ballots = [
            ballot(ids[0], &[1.0, 1.0]),
            ballot(ids[1], &[1.01, 1.01]),
            ballot(ids[2], &[1.02, 1.02]),
        ];
        assert!(matches!(
            tally(&ids, &ballots, &tol),
            VoteOutcome::NoMajority { .. }
        ));
    }

    #[test]
    fn a_majority_is_of_the_replicas_expected_not_of_those_that_answered() {
        let ids = sorted(vec![id(1), id(2), id(3)]);
        let one = [ballot(ids[0], &[1.0])];
        match tally(&ids, &one, &Comparison::Exact) {
            VoteOutcome::NoMajority { answered, missing } => {
                assert_eq!(answered, vec![ids[0]]);
                assert_eq!(missing, vec![ids[1], ids[2]]);
            }
            other => panic!("{other:?}"),
        }
        let two = [ballot(ids[0], &[1.0]), ballot(ids[2], &[1.0])];
        let a = tally(&ids, &two, &Comparison::Exact);
        assert_eq!(a.accepted().map(|a| a.missing.clone()), Some(vec![ids[1]]));
        // k = 2 that disagree: 1 of 2 is no majority.
        let pair = &ids[..2];
        let split = [ballot(ids[0], &[1.0]), ballot(ids[1], &[2.0])];
        assert!(tally(pair, &split, &Comparison::Exact).accepted().is_none());
    }

    #[test]
    fn an_equivocator_and_outsiders_never_count() {
        let ids = sorted(vec![id(1), id(2), id(3)]);
        let ballots = [
            ballot(ids[0], &[1.0]),
            ballot(ids[0], &[2.0]),
            ballot(ids[1], &[2.0]),
            ballot(id(42), &[2.0]),
            ballot(id(43), &[2.0]),
            ballot(ids[2], &[2.0]),
        ];
        let a = tally(&ids, &ballots, &Comparison::Exact);
        let a = a.accepted().expect("two honest replicas agree");
        assert_eq!(a.agreeing, vec![ids[1], ids[2]]);
        assert_eq!(a.deviating, vec![ids[0]]);
        // The same ballot twice is a duplicate, not an equivocation.
        let dup = [ballot(ids[0], &[1.0]), ballot(ids[0], &[1.0])];
        assert!(tally(&ids[..1], &dup, &Comparison::Exact)
            .accepted()
            .is_some());
    }

    #[test]
    fn too_many_replicas_is_no_majority_rather_than_a_slow_search() {
        let ids: Vec<NodeId> = (1..=8).map(id).collect();
        let ballots: Vec<Ballot> = ids.iter().map(|&n| ballot(n, &[1.0])).collect();
        assert!(tally(&ids, &ballots, &Comparison::Exact)
            .accepted()
            .is_none());
    }
    #[test]
    fn a_trusted_referee_overrules_a_colluding_majority_and_decides_a_split() {
        let ids = sorted(vec![id(1), id(2), id(3)]);
        let referee = ballot(id(9), &[1.0, 2.0]);
        // Two colluders (the lowest ids) agree on a lie and win the plain vote.
        let ballots = [
            ballot(ids[0], &[1.5, 2.5]),
            ballot(ids[1], &[1.5, 2.5]),
            ballot(ids[2], &[1.0, 2.0 + 1e-6]),
        ];
        let plain = tally(&ids, &ballots, &Comparison::default());
        assert_eq!(plain.accepted().map(|a| a.winner), Some(ids[0]));
        let judged = refereed_tally(&ids, &ballots, &referee, &Comparison::default());
        let a = judged.accepted().expect("a referee always decides");
        assert_eq!(a.winner, ids[2]);
        assert_eq!(a.agreeing, vec![ids[2]]);
        assert_eq!(a.deviating, vec![ids[0], ids[1]]);
        // A split with no majority: the referee decides it.
        let split = [
            ballot(ids[0], &[7.0, 7.0]),
            ballot(ids[1], &[1.0, 2.0]),
            ballot(ids[2], &[5.0, 5.0]),
        ];
        assert!(tally(&ids, &split, &Comparison::default())
            .accepted()
            .is_none());
        let a = refereed_tally(&ids, &split, &referee, &Comparison::default());
        let a = a.accepted().expect("decided");
        assert_eq!((a.winner, a.deviating.len()), (ids[1], 2));
        // Nobody agrees with the referee: its own bytes go forward.
        let wrong = [ballot(ids[0], &[7.0, 7.0]), ballot(ids[2], &[5.0, 5.0])];
        let a = refereed_tally(&ids, &wrong, &referee, &Comparison::default());
        let a = a.accepted().expect("decided");
        assert_eq!(a.winner, referee.node);
        assert!(a.agreeing.is_empty());
        assert_eq!(a.missing, vec![ids[1]]);
    }
}
