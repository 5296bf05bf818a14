//! One hop's view of a session, IO-less: who may feed it, how a step's chunks follow one
//! another, and what each computed chunk becomes.
//!
//! A step covers positions `start..end`. Its input arrives as chunks (token ids from the
//! client on the first hop, hidden-state frames from the predecessor after it), each chunk
//! starting where the previous one ended. The driver (`node/relay.rs`, the simulator in
//! tests) asks the machine before it computes each chunk, and the machine answers where the
//! output goes:
//!
//! ```text
//! begin_step(from, kind, attempt, start, end) ─► ticket
//! chunk(ticket, start, rows) ─► SendOn { opens_stream } | Sample | CacheOnly
//! end_step(ticket)            ─► Ok, or the step ended short (the feeder's stream broke)
//! ```
//!
//! Every step carries the client's attempt number, which grows with every step the client
//! sends (a retry is a new attempt) and travels with the step hop to hop. A newer attempt
//! supersedes one in flight: the old step's next chunk is answered `Superseded` and its driver
//! stops, so two attempts never write the cache at once. An attempt the hop has already seen,
//! or an older one (a duplicate, a stalled stream arriving after its retry), is `Stale`: run
//! late, it would cut the cache back to its own end and drop the newer positions after it. What the KV cache holds stays the engine's
//! business (it refuses a write that leaves a gap, `Error::PositionGap`).
//!
//! The Trust issue puts vote states between "computed" and "sent on" (k replicas' outputs
//! per chunk), the Training issue adds backward steps over recorded positions; both are new
//! variants here, not new code paths in the relay.

use crate::net::refusal::Reason;
use crate::net::NodeId;

/// What feeds a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StepInput {
    /// Token ids from the client (first hop only).
    Tokens,
    /// Hidden states from the predecessor (every hop after the first).
    Hidden,
}

/// A step the machine accepted (its attempt number); chunks name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket(u64);

/// Why a step or a chunk is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Dropped and counted without a reply: the sender may not feed this hop, or sent the
    /// wrong kind of input (an answer would only help a prober).
    Silently,
    /// Reported to the client as this hop's failure, with a typed reason.
    Report(Reason, String),
    /// A newer step of the session replaced this one: stop without a report.
    Superseded,
    /// An attempt this hop has already started, or an older one: dropped without a report
    /// (a duplicate, or a delayed stream of an attempt the client has since retried).
    Stale,
}

/// Where a computed chunk's output goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChunkOutput {
    /// Encoded and sent to the successor; `opens_stream` on the step's first chunk (the
    /// stream carries the step's frames in order).
    SendOn {
        /// This is the step's first chunk.
        opens_stream: bool,
    },
    /// The last hop's last chunk: sample (or return the logits of) the next token.
    Sample,
    /// The last hop's earlier chunks of a long step: they only fill the KV cache.
    CacheOnly,
}

/// A step in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Progress {
    ticket: Ticket,
    start: usize,
    end: usize,
    /// Where the next chunk must start.
    next: usize,
}

/// The hop's machine for one session.
#[derive(Debug, Clone)]
pub(crate) struct HopState {
    /// The only node that may feed this hop: the client (first hop) or the predecessor.
    feeder: NodeId,
    /// This hop's index on the route.
    index: usize,
    /// Hops on the route.
    route_len: usize,
    /// Most positions one step may carry.
    max_step_positions: usize,
    step: Option<Progress>,
    /// The newest attempt started here (0: none yet).
    latest: u64,
}

impl HopState {
    /// The machine for hop `index` of `route` (nodes, first hop first) of a session opened
    /// by `client`. `None` when `index` is not on the route.
    pub(crate) fn new(
        client: NodeId,
        route: &[NodeId],
        index: usize,
        max_step_positions: usize,
    ) -> Option<Self> {
        if index >= route.len() {
            return None;
        }
        let feeder = match index {
            0 => client,
            i => route[i - 1],
        };
        Some(HopState {
            feeder,
            index,
            route_len: route.len(),
            max_step_positions,
            step: None,
            latest: 0,
        })
    }

    /// Carries the attempts seen over from the machine of the session's previous open on
    /// this hop (a re-route keeps the session), so a stale attempt stays stale.
    pub(crate) fn inherit(&mut self, previous: &HopState) {
        self.latest = self.latest.max(previous.latest);
    }

    /// The only node allowed to feed this hop.
    pub(crate) fn feeder(&self) -> NodeId {
        self.feeder
    }

    /// `from` starts attempt `attempt`: a step over positions `start..end` fed by `input`.
    pub(crate) fn begin_step(
        &mut self,
        from: NodeId,
        input: StepInput,
        attempt: u64,
        start: usize,
        end: usize,
    ) -> Result<Ticket, Refused> {
        if from != self.feeder {
            return Err(Refused::Silently);
        }
        let expected = if self.index == 0 {
            StepInput::Tokens
        } else {
            StepInput::Hidden
        };
        if input != expected || end <= start {
            return Err(Refused::Silently);
        }
        let positions = end - start;
        if positions > self.max_step_positions {
            return Err(Refused::Report(
                Reason::OverLimit,
                format!(
                    "a step of {positions} positions, at most {} per step here",
                    self.max_step_positions
                ),
            ));
        }
        if attempt <= self.latest {
            return Err(Refused::Stale);
        }
        self.latest = attempt;
        let ticket = Ticket(attempt);
        self.step = Some(Progress {
            ticket,
            start,
            end,
            next: start,
        });
        Ok(ticket)
    }

    /// The chunk of `rows` positions at `start` of step `ticket` is about to be computed:
    /// where its output goes.
    pub(crate) fn chunk(
        &mut self,
        ticket: Ticket,
        start: usize,
        rows: usize,
    ) -> Result<ChunkOutput, Refused> {
        let progress = match &mut self.step {
            Some(p) if p.ticket == ticket => p,
            _ => return Err(Refused::Superseded),
        };
        if start != progress.next || rows == 0 || start + rows > progress.end {
            return Err(Refused::Report(
                Reason::Malformed,
                format!(
                    "a chunk of {rows} positions at {start}; the step expects {}..{}",
                    progress.next, progress.end
                ),
            ));
        }
        let opens_stream = start == progress.start;
        progress.next = start + rows;
        let done = progress.next == progress.end;
        let last = self.index + 1 == self.route_len;
        Ok(if !last {
            ChunkOutput::SendOn { opens_stream }
        } else if done {
            ChunkOutput::Sample
        } else {
            ChunkOutput::CacheOnly
        })
    }

    /// The step's input ended: `Ok` when every position arrived. The step is over either way.
    pub(crate) fn end_step(&mut self, ticket: Ticket) -> Result<(), Refused> {
        match self.step {
            Some(p) if p.ticket == ticket => {
                self.step = None;
                if p.next == p.end {
                    Ok(())
                } else {
                    Err(Refused::Report(
                        Reason::Malformed,
                        format!("the step's input ended at {} of {}", p.next, p.end),
                    ))
                }
            }
            _ => Err(Refused::Superseded),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(seed: u8) -> NodeId {
        iroh::SecretKey::from_bytes(&[seed; 32]).public()
    }

    #[test]
    fn only_the_feeder_may_start_a_step_with_its_kind_of_input() {
        let (client, a, b) = (node(1), node(2), node(3));
        let route = [a, b];
        let mut first = HopState::new(client, &route, 0, 8).expect("on the route");
        let mut second = HopState::new(client, &route, 1, 8).expect("on the route");
        assert!(HopState::new(client, &route, 2, 8).is_none());
        assert_eq!(first.feeder(), client);
        assert_eq!(second.feeder(), a);
        assert_eq!(
            first.begin_step(a, StepInput::Tokens, 1, 0, 3),
            Err(Refused::Silently)
        );
        assert_eq!(
            first.begin_step(client, StepInput::Hidden, 2, 0, 3),
            Err(Refused::Silently)
        );
        assert_eq!(
            second.begin_step(client, StepInput::Hidden, 3, 0, 3),
            Err(Refused::Silently)
        );
        assert_eq!(
            second.begin_step(a, StepInput::Hidden, 4, 3, 3),
            Err(Refused::Silently)
        );
        assert!(matches!(
            first.begin_step(client, StepInput::Tokens, 5, 0, 9),
            Err(Refused::Report(Reason::OverLimit, _))
        ));
        assert!(first.begin_step(client, StepInput::Tokens, 6, 0, 8).is_ok());
    }

    #[test]
    fn chunks_follow_one_another_and_the_last_hop_samples_after_the_last() {
        let (client, a, b) = (node(1), node(2), node(3));
        let route = [a, b];
        let mut first = HopState::new(client, &route, 0, 8).expect("on the route");
        let t = first
            .begin_step(client, StepInput::Tokens, 7, 4, 10)
            .expect("step");
        assert_eq!(
            first.chunk(t, 4, 4),
            Ok(ChunkOutput::SendOn { opens_stream: true })
        );
        // A gap, an overlap, or a chunk past the step's end is the feeder's fault.
        assert!(matches!(
            first.chunk(t, 9, 1),
            Err(Refused::Report(Reason::Malformed, _))
        ));
        assert!(matches!(
            first.chunk(t, 8, 3),
            Err(Refused::Report(Reason::Malformed, _))
        ));
        assert_eq!(
            first.chunk(t, 8, 2),
            Ok(ChunkOutput::SendOn {
                opens_stream: false
            })
        );
        assert_eq!(first.end_step(t), Ok(()));

        let mut last = HopState::new(client, &route, 1, 8).expect("on the route");
        let t = last
            .begin_step(a, StepInput::Hidden, 8, 0, 5)
            .expect("step");
        assert_eq!(last.chunk(t, 0, 3), Ok(ChunkOutput::CacheOnly));
        assert_eq!(last.chunk(t, 3, 2), Ok(ChunkOutput::Sample));
        // A stream that ends short is reported.
        let t = last
            .begin_step(a, StepInput::Hidden, 9, 5, 7)
            .expect("step");
        assert_eq!(last.chunk(t, 5, 1), Ok(ChunkOutput::CacheOnly));
        assert!(matches!(
            last.end_step(t),
            Err(Refused::Report(Reason::Malformed, _))
        ));
    }

    #[test]
    fn a_newer_step_supersedes_one_in_flight() {
        let (client, a) = (node(1), node(2));
        let mut hop = HopState::new(client, &[a], 0, 8).expect("on the route");
        let old = hop
            .begin_step(client, StepInput::Tokens, 10, 0, 4)
            .expect("step");
        assert_eq!(hop.chunk(old, 0, 2), Ok(ChunkOutput::CacheOnly));
        let retry = hop
            .begin_step(client, StepInput::Tokens, 11, 0, 4)
            .expect("step");
        assert_eq!(hop.chunk(old, 2, 2), Err(Refused::Superseded));
        assert_eq!(hop.end_step(old), Err(Refused::Superseded));
        assert_eq!(hop.chunk(retry, 0, 4), Ok(ChunkOutput::Sample));
        assert_eq!(hop.end_step(retry), Ok(()));
    }

    #[test]
    fn a_duplicate_or_an_older_attempt_is_stale_even_after_a_reopen() {
        let (client, a) = (node(1), node(2));
        let mut hop = HopState::new(client, &[a], 0, 8).expect("on the route");
        let t = hop
            .begin_step(client, StepInput::Tokens, 5, 0, 2)
            .expect("step");
        assert_eq!(hop.chunk(t, 0, 2), Ok(ChunkOutput::Sample));
        assert_eq!(hop.end_step(t), Ok(()));
        for attempt in [5, 4, 1] {
            assert_eq!(
                hop.begin_step(client, StepInput::Tokens, attempt, 0, 2),
                Err(Refused::Stale)
            );
        }
        let mut reopened = HopState::new(client, &[a], 0, 8).expect("on the route");
        reopened.inherit(&hop);
        assert_eq!(
            reopened.begin_step(client, StepInput::Tokens, 5, 0, 2),
            Err(Refused::Stale)
        );
        assert!(reopened
            .begin_step(client, StepInput::Tokens, 6, 2, 3)
            .is_ok());
    }
}
