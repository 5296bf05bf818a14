//! The client side of a session, IO-less: which reports to believe while a step is in flight,
//! and how a failed step recovers.
//!
//! The driver (`client::RemoteSession` and `client::BlockingSession` over iroh, the simulator
//! in tests) feeds it what arrived and does what it answers:
//!
//! ```text
//! begin_step(want) ─► report(from, ..) ─► Verdict::Result ─► step_succeeded()
//!                            │
//!                            └─► Verdict::Failed / timeout ─► step_failed(failure)
//!                                                               │ Recovery::Probe
//!                                        probed(dead) ◄─────────┘
//!                                         │ Recovery::Replan{exclude}   │ Recovery::Retry
//!                            rerouted(route) ─► Recovery::Refill ─► refilled(ok)
//!                                                                   │ Retry | Replay
//! ```
//!
//! Rules (see `docs/security.md`):
//! - a result (`Token`, `Logits`) counts only from the route's last hop, and only for the
//!   awaited position; earlier positions are stale results of a retried attempt;
//! - errors and leaving notices count only from route members, and a member may blame only
//!   itself or its successor: blaming anyone else blames the accuser, except a node already
//!   given up on (a late copy of an error acted on: stale);
//! - a blamed node is probed before it is excluded: when it answers, the accuser is excluded
//!   instead, so a lying hop can only remove itself;
//! - a failure that names nobody, after which every hop answers (a lost message), retries on
//!   the same route: hops overwrite the retried positions with the same values;
//! - every failure of a step takes one try from a fixed budget, so recovery always ends.

use crate::net::refusal::Reason;
use crate::net::NodeId;

/// How a session recovered so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Routes re-planned after a failure.
    pub failovers: u64,
    /// New hops refilled from their predecessor's sent hidden states (or, for a new first
    /// hop, from the client's token ids) without recomputing the hops before them.
    pub refills: u64,
    /// Failures recovered by recomputing the whole context from position 0.
    pub full_replays: u64,
    /// Hops moved to a replica with their KV cache (a node left gracefully).
    pub handovers: u64,
    /// Reports ignored because their sender may not send them: tokens from any node but the
    /// last hop, errors and leaving notices from nodes not on the route.
    pub refused_reports: u64,
    /// Failures blamed on a node that answered when probed: the accuser was routed around.
    pub false_blames: u64,
    /// Steps retried on the same route after a failure that named nobody while every hop
    /// still answered (a lost message).
    pub retries: u64,
}

/// Most entries kept in the session's event log (a flood of forged reports cannot grow it).
pub(crate) const MAX_EVENTS: usize = 256;

/// What a hop reported to the client, stripped of its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Report {
    /// A sampled token predicting `position`.
    Token {
        /// Position predicted.
        position: u32,
    },
    /// The logits predicting `position` (sessions opened with `return_logits`).
    Logits {
        /// Position predicted.
        position: u32,
    },
    /// A step failed; the sender blames `blamed` (itself or its successor).
    Error {
        /// The node the sender says failed.
        blamed: NodeId,
        /// Why.
        reason: Reason,
    },
    /// The sender is leaving the swarm (it may propose a replica to hand over to).
    Leaving,
}

/// What to do with a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The awaited result: the step is done.
    Result,
    /// A result for another position (an earlier, retried attempt): ignored.
    Stale,
    /// The sender may not send this: dropped and counted (what it tried, for the log).
    Refused(&'static str),
    /// A route member reports that the step failed.
    Failed(Failure),
    /// A route member is leaving: the driver keeps the notice for the next step boundary.
    Leaving,
}

/// Why a step failed, as far as the client can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// `blamed` failed, says `accuser` (`None`: the failing node itself, or the client that
    /// could not reach it).
    Blamed {
        /// The node said to have failed.
        blamed: NodeId,
        /// The route member that said so, when it is another node.
        accuser: Option<NodeId>,
        /// The typed reason, when a hop gave one.
        reason: Option<Reason>,
    },
    /// Nobody is named: a deadline passed, a stream broke.
    Unattributed,
}

/// What the driver does next for a failed step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Recovery {
    /// Ping every hop of the route within a short deadline, then call
    /// [`ClientSession::probed`] with the ones that did not answer.
    Probe,
    /// Plan a route that avoids `exclude` (every node given up on so far), then call
    /// [`ClientSession::rerouted`] (or give up if no route exists).
    Replan {
        /// Nodes the route must avoid.
        exclude: Vec<NodeId>,
    },
    /// Rebuild the KV caches of the route's new hops from their predecessors, then call
    /// [`ClientSession::refilled`].
    Refill,
    /// Send the failed step again.
    Retry,
    /// Recompute the whole context from position 0 (the refill failed).
    Replay,
    /// Stop: the step fails with the original error.
    GiveUp(GiveUp),
}

/// Why recovery stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GiveUp {
    /// Failover is off for this session.
    Disabled,
    /// The step used up its tries.
    Exhausted {
        /// Tries it had.
        tries: u32,
    },
}

/// Where a step is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// No step in flight.
    Idle,
    /// Waiting for the result predicting `want`.
    Awaiting { want: u32 },
    /// A step failed; probing the route.
    Probing { failure: Failure },
    /// Waiting for a route that avoids the failed nodes.
    Replanning,
    /// Waiting for the new hops' refill.
    Refilling,
}

/// The client's machine for one session.
#[derive(Debug, Clone)]
pub(crate) struct ClientSession {
    session: u64,
    /// Nodes of the route, first hop first.
    route: Vec<NodeId>,
    phase: Phase,
    /// Failures of the current step so far.
    tries: u32,
    /// Most failures one step may recover from (0: failover off).
    max_failovers: u32,
    /// Nodes given up on for this session.
    failed: Vec<NodeId>,
    stats: SessionStats,
    events: Vec<String>,
}

impl ClientSession {
    /// A session on `route` that recovers from at most `max_failovers` failures per step.
    pub(crate) fn new(session: u64, route: Vec<NodeId>, max_failovers: u32) -> Self {
        ClientSession {
            session,
            route,
            phase: Phase::Idle,
            tries: 0,
            max_failovers,
            failed: Vec::new(),
            stats: SessionStats::default(),
            events: Vec::new(),
        }
    }

    #[cfg(test)]
    /// The route's nodes.
    pub(crate) fn route(&self) -> &[NodeId] {
        &self.route
    }

    /// How the session recovered so far.
    pub(crate) fn stats(&self) -> SessionStats {
        self.stats
    }

    /// Counters the driver updates for work it did (refills, hand-overs).
    pub(crate) fn stats_mut(&mut self) -> &mut SessionStats {
        &mut self.stats
    }

    /// Nodes given up on so far.
    pub(crate) fn failed(&self) -> &[NodeId] {
        &self.failed
    }

    /// Treats `nodes` as failed from the start: every re-plan avoids them (nodes that could
    /// not be reached while the session was being opened).
    pub(crate) fn exclude(&mut self, nodes: &[NodeId]) {
        for n in nodes {
            if !self.failed.contains(n) {
                self.failed.push(*n);
            }
        }
    }

    /// Most failures one step recovers from.
    pub(crate) fn set_max_failovers(&mut self, max: u32) {
        self.max_failovers = max;
    }

    /// What went wrong during recoveries, in order (bounded).
    pub(crate) fn events(&self) -> &[String] {
        &self.events
    }

    /// Hands the event log over (the generation's result carries it).
    pub(crate) fn take_events(&mut self) -> Vec<String> {
        std::mem::take(&mut self.events)
    }

    /// Adds a line to the event log, unless it is full.
    pub(crate) fn log(&mut self, line: String) {
        if self.events.len() < MAX_EVENTS {
            self.events.push(line);
        }
    }

    /// Where `node` is on the route.
    pub(crate) fn hop_index(&self, node: NodeId) -> Option<usize> {
        self.route.iter().position(|n| *n == node)
    }

    /// A step that predicts position `want` was sent (a first try or a retry).
    pub(crate) fn begin_step(&mut self, want: u32) {
        if matches!(self.phase, Phase::Idle) {
            self.tries = 0;
        }
        self.phase = Phase::Awaiting { want };
    }

    /// Classifies a report `from` a node while a step is in flight.
    pub(crate) fn report(&mut self, from: NodeId, report: Report) -> Verdict {
        let last = self.route.last().copied();
        let verdict = match report {
            // Results come from the route's last hop only: any other node (a route member
            // included) could be steering the text.
            Report::Token { .. } | Report::Logits { .. } if Some(from) != last => {
                Verdict::Refused("a token")
            }
            Report::Token { position } | Report::Logits { position } => match self.phase {
                Phase::Awaiting { want } if position == want => Verdict::Result,
                _ => Verdict::Stale,
            },
            Report::Leaving if self.hop_index(from).is_some() => Verdict::Leaving,
            Report::Leaving => Verdict::Refused("a leaving notice"),
            // Blame of a node given up on already, now off the route: a late copy of an
            // error that was acted on (or a member repeating it); it changes nothing.
            Report::Error { blamed, .. }
                if self.failed.contains(&blamed) && self.hop_index(blamed).is_none() =>
            {
                Verdict::Stale
            }
            Report::Error { blamed, reason } => match self.blame_of(from, blamed) {
                Some(blamed) => Verdict::Failed(Failure::Blamed {
                    blamed,
                    accuser: (blamed != from).then_some(from),
                    reason: Some(reason),
                }),
                None => Verdict::Refused("an error"),
            },
        };
        if let Verdict::Refused(what) = verdict {
            self.stats.refused_reports += 1;
            tracing::warn!(
                session = self.session,
                peer = %from.fmt_short(),
                "ignored {what} from a node that may not send it"
            );
            self.log(format!(
                "ignored {what} from {}, which may not send it",
                from.fmt_short()
            ));
        }
        verdict
    }

    /// Whom a step error from `from`, blaming `blamed`, accuses: a hop reports itself or its
    /// successor. `None` when `from` is not on the route (the report is ignored); a member
    /// blaming any other node is held to have failed itself.
    fn blame_of(&self, from: NodeId, blamed: NodeId) -> Option<NodeId> {
        let i = self.hop_index(from)?;
        let successor = self.route.get(i + 1).copied();
        Some(if blamed == from || Some(blamed) == successor {
            blamed
        } else {
            from
        })
    }

    /// The step's result arrived: the next step starts with a fresh budget.
    pub(crate) fn step_succeeded(&mut self) {
        self.phase = Phase::Idle;
        self.tries = 0;
    }

    /// The step failed (a report, a deadline, a broken stream).
    pub(crate) fn step_failed(&mut self, failure: Failure) -> Recovery {
        if self.max_failovers == 0 {
            self.phase = Phase::Idle;
            return Recovery::GiveUp(GiveUp::Disabled);
        }
        if self.tries >= self.max_failovers {
            self.phase = Phase::Idle;
            return Recovery::GiveUp(GiveUp::Exhausted { tries: self.tries });
        }
        self.tries += 1;
        self.phase = Phase::Probing { failure };
        Recovery::Probe
    }

    /// The probe found `dead` (route members that did not answer). A blamed node that
    /// answers gets its accuser excluded instead.
    pub(crate) fn probed(&mut self, dead: &[NodeId]) -> Recovery {
        // Out of order (no probe was asked for): a driver bug, answered without touching
        // the step in flight.
        let Phase::Probing { failure } = &self.phase else {
            return Recovery::GiveUp(GiveUp::Exhausted { tries: self.tries });
        };
        let failure = failure.clone();
        let mut excluded: Vec<NodeId> = match failure {
            Failure::Blamed {
                blamed,
                accuser: Some(accuser),
                ..
            } if !dead.contains(&blamed) => {
                self.stats.false_blames += 1;
                tracing::warn!(
                    accuser = %accuser.fmt_short(),
                    blamed = %blamed.fmt_short(),
                    "a blamed node answers: routing around its accuser"
                );
                self.log(format!(
                    "{} blamed {}, which answers: routing around {}",
                    accuser.fmt_short(),
                    blamed.fmt_short(),
                    accuser.fmt_short()
                ));
                vec![accuser]
            }
            Failure::Blamed { blamed, .. } => vec![blamed],
            Failure::Unattributed => Vec::new(),
        };
        for n in dead {
            if !excluded.contains(n) && self.hop_index(*n).is_some() {
                excluded.push(*n);
            }
        }
        if excluded.is_empty() {
            // Nobody named and every hop answers: a lost message. Same route, same step.
            self.stats.retries += 1;
            self.phase = Phase::Awaiting { want: u32::MAX };
            return Recovery::Retry;
        }
        for n in excluded {
            if !self.failed.contains(&n) {
                self.failed.push(n);
            }
        }
        self.phase = Phase::Replanning;
        Recovery::Replan {
            exclude: self.failed.clone(),
        }
    }

    /// The session moved to `route` (same session id on the hops that stayed).
    pub(crate) fn rerouted(&mut self, route: Vec<NodeId>) -> Recovery {
        self.route = route;
        self.stats.failovers += 1;
        self.phase = Phase::Refilling;
        Recovery::Refill
    }

    /// The route moved without a failure (a graceful hand-over).
    pub(crate) fn moved(&mut self, route: Vec<NodeId>) {
        self.route = route;
    }

    /// The new hops' refill ended: retry the step, or recompute everything when it failed.
    pub(crate) fn refilled(&mut self, ok: bool) -> Recovery {
        self.phase = Phase::Awaiting { want: u32::MAX };
        if ok {
            Recovery::Retry
        } else {
            self.stats.full_replays += 1;
            Recovery::Replay
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(seed: u8) -> NodeId {
        iroh::SecretKey::from_bytes(&[seed; 32]).public()
    }

    fn session() -> (ClientSession, [NodeId; 4]) {
        let nodes = [node(1), node(2), node(3), node(9)];
        (ClientSession::new(7, nodes[..3].to_vec(), 3), nodes)
    }

    #[test]
    fn results_count_only_from_the_last_hop_and_for_the_awaited_position() {
        let (mut s, [a, b, c, outsider]) = session();
        s.begin_step(5);
        assert_eq!(
            s.report(a, Report::Token { position: 5 }),
            Verdict::Refused("a token")
        );
        assert_eq!(
            s.report(outsider, Report::Logits { position: 5 }),
            Verdict::Refused("a token")
        );
        assert_eq!(s.report(c, Report::Token { position: 4 }), Verdict::Stale);
        assert_eq!(s.report(c, Report::Token { position: 5 }), Verdict::Result);
        assert_eq!(s.stats().refused_reports, 2);
        assert_eq!(s.report(b, Report::Leaving), Verdict::Leaving);
        assert_eq!(
            s.report(outsider, Report::Leaving),
            Verdict::Refused("a leaving notice")
        );
    }

    #[test]
    fn a_member_may_blame_itself_or_its_successor_only() {
        let (mut s, [a, b, c, outsider]) = session();
        s.begin_step(1);
        let reason = Reason::SuccessorUnreachable;
        assert_eq!(
            s.report(a, Report::Error { blamed: b, reason }),
            Verdict::Failed(Failure::Blamed {
                blamed: b,
                accuser: Some(a),
                reason: Some(reason)
            })
        );
        // `a` blaming `c` (not its successor) is held against `a`.
        assert_eq!(
            s.report(a, Report::Error { blamed: c, reason }),
            Verdict::Failed(Failure::Blamed {
                blamed: a,
                accuser: None,
                reason: Some(reason)
            })
        );
        assert_eq!(
            s.report(outsider, Report::Error { blamed: b, reason }),
            Verdict::Refused("an error")
        );
        // Once `b` is given up on and off the route, a late copy of `a`'s error is stale.
        s.step_failed(Failure::Blamed {
            blamed: b,
            accuser: Some(a),
            reason: Some(reason),
        });
        s.probed(&[b]);
        s.rerouted(vec![a, outsider, c]);
        assert_eq!(
            s.report(a, Report::Error { blamed: b, reason }),
            Verdict::Stale
        );
    }

    #[test]
    fn a_blamed_node_that_answers_gets_its_accuser_excluded() {
        let (mut s, [a, b, _, _]) = session();
        s.begin_step(1);
        let failure = Failure::Blamed {
            blamed: b,
            accuser: Some(a),
            reason: Some(Reason::SuccessorUnreachable),
        };
        assert_eq!(s.step_failed(failure.clone()), Recovery::Probe);
        assert_eq!(s.probed(&[]), Recovery::Replan { exclude: vec![a] });
        assert_eq!(s.stats().false_blames, 1);
        // A blamed node that is really dead is excluded itself.
        let (mut s, [a, b, _, _]) = session();
        s.begin_step(1);
        s.step_failed(failure);
        assert_eq!(s.probed(&[b]), Recovery::Replan { exclude: vec![b] });
        assert!(!s.failed().contains(&a));
    }

    #[test]
    fn a_lost_message_retries_on_the_same_route_and_the_budget_ends_recovery() {
        let (mut s, [a, b, c, _]) = session();
        s.begin_step(3);
        for _ in 0..3 {
            assert_eq!(s.step_failed(Failure::Unattributed), Recovery::Probe);
            assert_eq!(s.probed(&[]), Recovery::Retry);
            s.begin_step(3);
        }
        assert_eq!(
            s.step_failed(Failure::Unattributed),
            Recovery::GiveUp(GiveUp::Exhausted { tries: 3 })
        );
        assert_eq!(s.stats().retries, 3);
        assert_eq!(s.route(), &[a, b, c]);
        // A success resets the budget for the next step.
        s.begin_step(3);
        s.step_succeeded();
        s.begin_step(4);
        assert_eq!(s.step_failed(Failure::Unattributed), Recovery::Probe);
    }

    #[test]
    fn a_reroute_refills_and_a_failed_refill_replays() {
        let (mut s, [a, b, c, d]) = session();
        s.begin_step(3);
        s.step_failed(Failure::Unattributed);
        assert_eq!(s.probed(&[b, d]), Recovery::Replan { exclude: vec![b] });
        assert_eq!(s.rerouted(vec![a, d, c]), Recovery::Refill);
        assert_eq!(s.refilled(false), Recovery::Replay);
        assert_eq!(s.stats().failovers, 1);
        assert_eq!(s.stats().full_replays, 1);
        assert_eq!(s.route(), &[a, d, c]);
        let mut off = ClientSession::new(1, vec![a], 0);
        off.begin_step(1);
        assert_eq!(
            off.step_failed(Failure::Unattributed),
            Recovery::GiveUp(GiveUp::Disabled)
        );
    }
}
