//! Fuzzing of the protocol machines: random calls in random order, from random senders, with
//! random positions. Whatever a peer sends and in whatever order the driver calls them, the
//! machines must not panic and must keep their rules:
//!
//! - a client believes a result only from the route's last hop, for the awaited position;
//! - a client excludes only nodes that were named in a failure or found dead by a probe,
//!   and every step's recovery ends within its budget;
//! - a hop accepts steps only from its feeder, within the step limit; the chunks it lets
//!   through are contiguous, within the step, and the output fate fits the hop's place
//!   (sent on before the last hop, sampled once at the step's end on the last hop).

use super::client_session::{ClientSession, Failure, Recovery, Report, Verdict, MAX_EVENTS};
use super::hop_session::{ChunkOutput, HopState, Refused, StepInput, Ticket};
use super::sim::Rng;
use crate::net::refusal::Reason;
use crate::net::NodeId;

/// Cases per machine (each a sequence of calls).
const CASES: u64 = 100_000;
/// Calls per case.
const CALLS: usize = 24;

/// Six nodes: any of them may be on a route, send reports or be blamed.
fn nodes() -> Vec<NodeId> {
    (1..=6u8)
        .map(|seed| iroh::SecretKey::from_bytes(&[seed; 32]).public())
        .collect()
}

const REASONS: [Reason; 4] = [
    Reason::SuccessorUnreachable,
    Reason::Compute,
    Reason::Malformed,
    Reason::OverLimit,
];

#[test]
fn the_client_machine_keeps_its_rules_under_any_call_sequence() {
    let nodes = nodes();
    let mut rng = Rng(0x5eed_c11e);
    let (mut results, mut give_ups) = (0u64, 0u64);
    for case in 0..CASES {
        let route_len = 1 + rng.below(3) as usize;
        let mut route: Vec<NodeId> = (0..route_len).map(|_| rng.pick(&nodes)).collect();
        route.dedup();
        let budget = rng.below(4) as u32;
        let mut s = ClientSession::new(case, route.clone(), budget);
        // Nodes the machine had a reason to give up on: named in a failure, or dead.
        let mut accused: Vec<NodeId> = Vec::new();
        let mut awaited: Option<u32> = None;
        let mut probes_this_step = 0u32;
        for _ in 0..CALLS {
            match rng.below(8) {
                0 => {
                    let want = rng.below(8) as u32;
                    s.begin_step(want);
                    awaited = Some(want);
                }
                1 | 2 => {
                    let from = rng.pick(&nodes);
                    let position = rng.below(8) as u32;
                    let report = match rng.below(4) {
                        0 => Report::Token { position },
                        1 => Report::Logits { position },
                        2 => Report::Error {
                            blamed: rng.pick(&nodes),
                            reason: rng.pick(&REASONS),
                        },
                        _ => Report::Leaving,
                    };
                    let verdict = s.report(from, report);
                    let last = route.last().copied();
                    match verdict {
                        Verdict::Result => {
                            assert_eq!(Some(from), last, "a result from a non-last hop");
                            assert_eq!(Some(position), awaited, "a result for another position");
                            results += 1;
                        }
                        Verdict::Failed(Failure::Blamed {
                            blamed, accuser, ..
                        }) => {
                            assert!(route.contains(&from), "an error from outside the route");
                            assert!(route.contains(&blamed), "blame outside the route");
                            if let Some(a) = accuser {
                                assert_eq!(a, from);
                            }
                        }
                        Verdict::Leaving => assert!(route.contains(&from)),
                        Verdict::Failed(Failure::Unattributed)
                        | Verdict::Stale
                        | Verdict::Refused(_) => {}
                    }
                }
                3 => {
                    let failure = if rng.below(2) == 0 {
                        Failure::Unattributed
                    } else {
                        let blamed = rng.pick(&nodes);
                        let accuser = (rng.below(2) == 0).then(|| rng.pick(&nodes));
                        accused.push(blamed);
                        accused.extend(accuser);
                        Failure::Blamed {
                            blamed,
                            accuser,
                            reason: None,
                        }
                    };
                    match s.step_failed(failure) {
                        Recovery::Probe => {
                            probes_this_step += 1;
                            assert!(
                                probes_this_step <= budget,
                                "{probes_this_step} tries on a budget of {budget}"
                            );
                        }
                        Recovery::GiveUp(_) => {
                            give_ups += 1;
                            probes_this_step = 0;
                        }
                        other => panic!("a failure answered {other:?}"),
                    }
                }
                4 => {
                    let dead: Vec<NodeId> = nodes
                        .iter()
                        .copied()
                        .filter(|_| rng.below(4) == 0)
                        .collect();
                    accused.extend(dead.iter().copied());
                    if let Recovery::Replan { exclude } = s.probed(&dead) {
                        for n in &exclude {
                            assert!(accused.contains(n), "excluded a node nobody named");
                        }
                    }
                }
                5 => {
                    let len = 1 + rng.below(3) as usize;
                    route = (0..len).map(|_| rng.pick(&nodes)).collect();
                    route.dedup();
                    if rng.below(2) == 0 {
                        s.rerouted(route.clone());
                    } else {
                        s.moved(route.clone());
                    }
                }
                6 => {
                    s.refilled(rng.below(2) == 0);
                }
                _ => {
                    s.step_succeeded();
                    probes_this_step = 0;
                }
            }
            assert!(s.events().len() <= MAX_EVENTS);
            for n in s.failed() {
                assert!(accused.contains(n), "gave up on a node nobody named");
            }
        }
    }
    // The sequences reached the interesting outcomes, not only refusals.
    assert!(results > 1_000, "{results} results");
    assert!(give_ups > 1_000, "{give_ups} give-ups");
}

#[test]
fn the_hop_machine_keeps_its_rules_under_any_call_sequence() {
    let nodes = nodes();
    let mut rng = Rng(0x5eed_0b0b);
    let (mut sampled, mut sent_on) = (0u64, 0u64);
    for _ in 0..CASES {
        let route_len = 1 + rng.below(3) as usize;
        let route: Vec<NodeId> = nodes[1..=route_len].to_vec();
        let client = nodes[0];
        let index = rng.below(route_len as u64 + 1) as usize;
        let max_step = 1 + rng.below(6) as usize;
        let Some(mut hop) = HopState::new(client, &route, index, max_step) else {
            assert!(index >= route_len, "a hop on the route got no machine");
            continue;
        };
        let last = index + 1 == route_len;
        // Tickets handed out, with their step and what passed so far.
        let mut steps: Vec<(Ticket, usize, usize, usize, bool)> = Vec::new();
        let mut newest = 0u64;
        for _ in 0..CALLS {
            match rng.below(3) {
                0 => {
                    // Mostly well-formed steps from the feeder, so that chunks get exercised;
                    // the rest from anyone, of any kind and size.
                    let wild = rng.below(4) == 0;
                    let from = if wild { rng.pick(&nodes) } else { hop.feeder() };
                    let input = if (index == 0) != (wild && rng.below(2) == 0) {
                        StepInput::Tokens
                    } else {
                        StepInput::Hidden
                    };
                    let start = rng.below(8) as usize;
                    let end = if wild {
                        rng.below(16) as usize
                    } else {
                        start + 1 + rng.below(max_step as u64) as usize
                    };
                    // Mostly a new attempt, sometimes a repeated or older one.
                    let attempt = if wild {
                        rng.below(newest + 2)
                    } else {
                        newest + 1
                    };
                    match hop.begin_step(from, input, attempt, start, end) {
                        Ok(ticket) => {
                            assert!(attempt > newest, "a stale attempt began");
                            newest = attempt;
                            assert_eq!(from, hop.feeder());
                            assert_eq!(input == StepInput::Tokens, index == 0);
                            assert!(end > start && end - start <= max_step);
                            steps.push((ticket, start, end, start, false));
                        }
                        Err(Refused::Report(Reason::OverLimit, _)) => {
                            assert!(end - start > max_step)
                        }
                        Err(_) => {}
                    }
                }
                1 if !steps.is_empty() => {
                    let k = rng.below(steps.len() as u64) as usize;
                    let (ticket, _, end, next, _) = steps[k];
                    // Mostly the expected chunk, sometimes any.
                    let start = if rng.below(3) == 0 {
                        rng.below(16) as usize
                    } else {
                        next
                    };
                    let rows = rng.below(4) as usize;
                    match hop.chunk(ticket, start, rows) {
                        Ok(fate) => {
                            assert_eq!(k, steps.len() - 1, "a superseded step went on");
                            assert_eq!(start, next, "a chunk out of order");
                            assert!(rows > 0 && start + rows <= end);
                            let done = start + rows == end;
                            match fate {
                                ChunkOutput::SendOn { opens_stream } => {
                                    assert!(!last);
                                    assert_eq!(opens_stream, start == steps[k].1);
                                    sent_on += 1;
                                }
                                ChunkOutput::Sample => {
                                    assert!(last && done && !steps[k].4, "sampled twice");
                                    steps[k].4 = true;
                                    sampled += 1;
                                }
                                ChunkOutput::CacheOnly => assert!(last && !done),
                            }
                            steps[k].3 = start + rows;
                        }
                        Err(Refused::Superseded) => {}
                        Err(Refused::Report(..)) => {
                            assert_eq!(k, steps.len() - 1, "an old step reported");
                        }
                        Err(Refused::Silently | Refused::Stale) => {
                            panic!("a chunk refused as a step")
                        }
                    }
                }
                _ if !steps.is_empty() => {
                    let k = rng.below(steps.len() as u64) as usize;
                    let (ticket, _, end, next, _) = steps[k];
                    match hop.end_step(ticket) {
                        Ok(()) => assert_eq!(next, end, "a short step ended well"),
                        Err(Refused::Report(..)) => assert!(next < end),
                        Err(_) => {}
                    }
                }
                _ => {}
            }
        }
    }
    assert!(sampled > 1_000, "{sampled} samples");
    assert!(sent_on > 1_000, "{sent_on} chunks sent on");
}
