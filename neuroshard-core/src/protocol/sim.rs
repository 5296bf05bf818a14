//! A deterministic simulator of one client and a swarm of hops, without sockets: the real
//! [`ClientSession`] and [`HopState`] machines (and the real refill planner) over a virtual
//! network with a virtual clock, against seeded fault schedules.
//!
//! The model is a stand-in with the property that matters: a hop's output at position `p`
//! depends on its input there and on every input it cached at `0..p`, so a hop whose KV cache
//! is missing or wrong (a skipped refill, a replay from the wrong place) gives other tokens,
//! and the run's text stops matching the reference computed without any network.
//!
//! Faults: nodes that crash at a step, hops that stall past the client's deadline (their late
//! stream arrives after the retry), hops that drop a step and falsely blame their successor,
//! hops that forge tokens, lost step messages, late tokens, steps whose every message is
//! duplicated or delayed at random (reordered), and outsiders that send tokens, errors and
//! leaving notices. Every schedule must keep the invariants in
//! [`check_run`]: forged or foreign reports never change the text, honest nodes are never
//! excluded, every step ends, and a swarm that still has an honest replica of every range
//! (with no more faults than the retry budget) finishes with the reference text.

use super::client_session::{ClientSession, Failure, Recovery, Report, Verdict};
use super::hop_session::{ChunkOutput, HopState, Refused, StepInput};
use crate::net::proto::{route_nodes as ids, RouteHop};
use crate::net::recovery::{plan_refill, RefillPlan};
use crate::net::refusal::Reason;
use crate::net::NodeId;
use std::collections::{BinaryHeap, HashMap};

/// Layer ranges of the simulated model; each has `REPLICAS` nodes.
const RANGES: [std::ops::Range<u32>; 3] = [0..2, 2..4, 4..6];
const REPLICAS: usize = 3;
const VOCAB: u64 = 1000;
/// Positions per step (longer inputs are split, as `RemoteSession::step_any` does).
const MAX_STEP: usize = 4;
/// Positions per chunk inside a step (the hops' prefill chunk).
const CHUNK: usize = 2;
/// Ticks the client waits for a step's result.
const DEADLINE: u64 = 40;
/// Failures one step may recover from (the client's default).
const MAX_FAILOVERS: u32 = 3;
/// Ticks a message takes.
const LATENCY: u64 = 1;
/// Bound on processed events per run: a run past it hangs.
const MAX_EVENTS: usize = 20_000;

fn mix(a: u64, b: u64) -> u64 {
    let mut x = a ^ b.rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// One range's transformation of position `p`: its input there and a digest of its cached
/// inputs at `0..p`.
fn hop_output(range: usize, cached: &[u64], p: usize) -> u64 {
    let prefix = cached[..p].iter().fold(range as u64, |h, v| mix(h, *v));
    mix(prefix, cached[p])
}

/// The token predicted after `context`, computed without any network.
fn reference_token(context: &[u32]) -> u32 {
    let mut values: Vec<u64> = context.iter().map(|t| *t as u64).collect();
    for range in 0..RANGES.len() {
        values = (0..values.len())
            .map(|p| hop_output(range, &values, p))
            .collect();
    }
    (values[values.len() - 1] % VOCAB) as u32
}

/// splitmix64: a tiny seeded generator (no dependency, stable across versions); the fuzzer
/// uses it too.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0, 0)
    }

    /// A value in `0..n`.
    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// One of `items` (not empty).
    pub(super) fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// One fault of a schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// The node stops answering anything from the client's step `at` on.
    Crash { node: usize, at: usize },
    /// At step `at` the hop drops the step and blames its successor (if it has one).
    FalseBlame { node: usize, at: usize },
    /// The hop sends the client a forged token for every step it relays.
    Forge { node: usize },
    /// The client's step message of step `at` is lost.
    DropStep { at: usize },
    /// The result of step `at` arrives after the client's deadline.
    LateToken { at: usize },
    /// At step `at` a node off the route sends a token, an error and a leaving notice.
    Outsider { at: usize },
    /// The node's next message at step `at` leaves twice the client's deadline late.
    Stall { node: usize, at: usize },
    /// Every message of step `at` is delivered twice.
    Duplicate { at: usize },
    /// Every message of step `at` is delayed by 0–3 ticks at random, so they cross.
    Reorder { at: usize },
}

/// What travels.
#[derive(Debug, Clone)]
enum Payload {
    /// Step input of the client's attempt `attempt`: token ids or hidden values at
    /// `start..start + values.len()`, in chunks.
    Step {
        attempt: u64,
        start: usize,
        values: Vec<u64>,
    },
    /// A report to the client, with the token when it carries one.
    Report { report: Report, token: u32 },
}

#[derive(Debug, Clone)]
struct Envelope {
    at: u64,
    seq: u64,
    from: NodeId,
    /// `None`: the client.
    to: Option<usize>,
    session: u64,
    payload: Payload,
}

impl PartialEq for Envelope {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Envelope {}
impl PartialOrd for Envelope {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Envelope {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Earliest first out of the max-heap.
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// A hop's state for the session: the protocol machine, the route it was opened with, the
/// cached inputs and what it sent on.
#[derive(Debug)]
struct HopSlot {
    machine: HopState,
    index: usize,
    route: Vec<NodeId>,
    kv: Vec<u64>,
    sent: Vec<u64>,
}

impl HopSlot {
    /// Caches `values` at `start..` and returns range `range`'s outputs there. `None`: the
    /// write would leave a gap (the engine's `PositionGap`).
    fn compute(&mut self, range: usize, start: usize, values: &[u64]) -> Option<Vec<u64>> {
        if start > self.kv.len() {
            return None;
        }
        self.kv.truncate(start);
        self.kv.extend_from_slice(values);
        Some(
            (start..start + values.len())
                .map(|p| hop_output(range, &self.kv, p))
                .collect(),
        )
    }
}

#[derive(Debug)]
struct SimNode {
    id: NodeId,
    range: usize,
    crashed: bool,
    sessions: HashMap<u64, HopSlot>,
}

/// How a run ended.
#[derive(Debug)]
struct Run {
    /// Tokens generated (all of them when it finished).
    tokens: Vec<u32>,
    /// `None`: finished; otherwise why recovery stopped.
    gave_up: Option<String>,
    /// Nodes the client excluded.
    excluded: Vec<NodeId>,
    stats: super::client_session::SessionStats,
}

struct World {
    nodes: Vec<SimNode>,
    client: NodeId,
    outsider: NodeId,
    queue: BinaryHeap<Envelope>,
    now: u64,
    seq: u64,
    session: u64,
    /// Faults not used up yet (one-shot faults are removed when they strike).
    faults: Vec<Fault>,
    /// The client's generation step.
    step_no: usize,
    /// Attempts the client sent (`RemoteSession`'s attempt numbers).
    attempts: u64,
    /// Jitter of reordered steps.
    rng: Rng,
    events: usize,
}

fn node_id(seed: u64) -> NodeId {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8] = 0x5a;
    iroh::SecretKey::from_bytes(&bytes).public()
}

/// The result of one attempt at a step.
type Attempt = Result<u32, Failure>;

impl World {
    fn new(faults: Vec<Fault>) -> Self {
        let nodes = (0..RANGES.len() * REPLICAS)
            .map(|i| SimNode {
                id: node_id(100 + i as u64),
                range: i / REPLICAS,
                crashed: false,
                sessions: HashMap::new(),
            })
            .collect();
        World {
            nodes,
            client: node_id(1),
            outsider: node_id(2),
            queue: BinaryHeap::new(),
            now: 0,
            seq: 0,
            session: 77,
            faults,
            step_no: 0,
            attempts: 0,
            rng: Rng(0x0dd_5eed),
            events: 0,
        }
    }

    fn index_of(&self, id: NodeId) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    /// Whether fault `f` strikes now; one-shot faults strike once.
    fn strikes(&mut self, f: Fault) -> bool {
        match self.faults.iter().position(|x| *x == f) {
            Some(i) => {
                let lasting = matches!(
                    f,
                    Fault::Forge { .. } | Fault::Duplicate { .. } | Fault::Reorder { .. }
                );
                if !lasting {
                    self.faults.remove(i);
                }
                true
            }
            None => false,
        }
    }

    fn send(&mut self, from: NodeId, to: Option<usize>, delay: u64, payload: Payload) {
        let at = self.step_no;
        let mut delay = delay;
        if let Some(node) = self.index_of(from) {
            if self.strikes(Fault::Stall { node, at }) {
                delay += 2 * DEADLINE;
            }
        }
        if self.faults.contains(&Fault::Reorder { at }) {
            delay += self.rng.below(4);
        }
        let copies = if self.faults.contains(&Fault::Duplicate { at }) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            self.seq += 1;
            self.queue.push(Envelope {
                at: self.now + delay,
                seq: self.seq,
                from,
                to,
                session: self.session,
                payload: payload.clone(),
            });
        }
    }

    fn report(&mut self, from: NodeId, delay: u64, report: Report, token: u32) {
        self.send(from, None, delay, Payload::Report { report, token });
    }

    /// The planner: the lowest-numbered replica of every range that is not excluded.
    fn plan(&self, exclude: &[NodeId]) -> Option<Vec<RouteHop>> {
        (0..RANGES.len())
            .map(|range| {
                self.nodes
                    .iter()
                    .find(|n| n.range == range && !exclude.contains(&n.id))
                    .map(|n| RouteHop {
                        node: n.id,
                        layers: RANGES[range].clone(),
                        addrs: Vec::new(),
                    })
            })
            .collect()
    }

    /// Opens (or re-opens) the session on `route`: hops that held it keep their caches and
    /// what they sent; a crashed node misses the open.
    fn open(&mut self, route: &[RouteHop]) {
        let route_ids = ids(route);
        for (index, hop) in route.iter().enumerate() {
            let Some(i) = self.index_of(hop.node) else {
                continue;
            };
            let (client, session) = (self.client, self.session);
            let node = &mut self.nodes[i];
            let Some(machine) = HopState::new(client, &route_ids, index, MAX_STEP) else {
                continue;
            };
            if node.crashed {
                continue;
            }
            let slot = node.sessions.entry(session).or_insert(HopSlot {
                machine: machine.clone(),
                index,
                route: Vec::new(),
                kv: Vec::new(),
                sent: Vec::new(),
            });
            let mut machine = machine;
            machine.inherit(&slot.machine);
            slot.machine = machine;
            slot.index = index;
            slot.route = route_ids.clone();
        }
    }

    fn crash_due(&mut self) {
        for node in 0..self.nodes.len() {
            if self.strikes(Fault::Crash {
                node,
                at: self.step_no,
            }) {
                self.nodes[node].crashed = true;
            }
        }
    }

    fn crashed(&self, id: NodeId) -> bool {
        self.index_of(id).is_some_and(|i| self.nodes[i].crashed)
    }

    /// A hop receives a step's input from `from`.
    fn deliver_step(
        &mut self,
        to: usize,
        from: NodeId,
        attempt: u64,
        start: usize,
        values: Vec<u64>,
    ) {
        let (session, step_no) = (self.session, self.step_no);
        let (id, range) = (self.nodes[to].id, self.nodes[to].range);
        if self.nodes[to].crashed {
            return;
        }
        let Some(slot) = self.nodes[to].sessions.get_mut(&session) else {
            return;
        };
        let input = if slot.index == 0 {
            StepInput::Tokens
        } else {
            StepInput::Hidden
        };
        let end = start + values.len();
        let ticket = match slot.machine.begin_step(from, input, attempt, start, end) {
            Ok(t) => t,
            Err(Refused::Report(reason, _)) => {
                return self.report(id, LATENCY, Report::Error { blamed: id, reason }, 0)
            }
            Err(_) => return,
        };
        let successor = slot.route.get(slot.index + 1).copied();
        let mut forward = Vec::new();
        let mut result = None;
        let mut pos = start;
        let mut failed = None;
        for chunk in values.chunks(CHUNK) {
            let decision = slot.machine.chunk(ticket, pos, chunk.len());
            let Some(out) = slot.compute(range, pos, chunk) else {
                failed = Some(Reason::Compute);
                break;
            };
            match decision {
                Ok(ChunkOutput::SendOn { .. }) => {
                    slot.sent.truncate(pos);
                    slot.sent.extend_from_slice(&out);
                    forward.extend_from_slice(&out);
                }
                Ok(ChunkOutput::Sample) => result = out.last().copied(),
                Ok(ChunkOutput::CacheOnly) => {}
                Err(Refused::Report(reason, _)) => {
                    failed = Some(reason);
                    break;
                }
                Err(_) => return,
            }
            pos += chunk.len();
        }
        if failed.is_none() {
            if let Err(Refused::Report(reason, _)) = slot.machine.end_step(ticket) {
                failed = Some(reason);
            }
        }
        if let Some(reason) = failed {
            return self.report(id, LATENCY, Report::Error { blamed: id, reason }, 0);
        }
        if successor.is_some() && self.strikes(Fault::Forge { node: to }) {
            let forged = Report::Token {
                position: end as u32,
            };
            self.report(id, LATENCY, forged, 999);
        }
        match (successor, result) {
            (Some(next), _) => {
                let liar = self.strikes(Fault::FalseBlame {
                    node: to,
                    at: step_no,
                });
                let next_index = self.index_of(next);
                if liar || self.crashed(next) || next_index.is_none() {
                    let report = Report::Error {
                        blamed: next,
                        reason: Reason::SuccessorUnreachable,
                    };
                    return self.report(id, LATENCY, report, 0);
                }
                let payload = Payload::Step {
                    attempt,
                    start,
                    values: forward,
                };
                self.send(id, next_index, LATENCY, payload);
            }
            (None, Some(value)) => {
                let report = Report::Token {
                    position: end as u32,
                };
                let late = self.strikes(Fault::LateToken { at: step_no });
                let delay = if late { 2 * DEADLINE } else { LATENCY };
                self.report(id, delay, report, (value % VOCAB) as u32);
            }
            (None, None) => {}
        }
    }

    /// Sends the step `tokens` at `start` (split into steps of at most `MAX_STEP`) and waits
    /// for each one's result, as `RemoteSession::step_any` does.
    fn attempt(
        &mut self,
        machine: &mut ClientSession,
        route: &[RouteHop],
        start: usize,
        tokens: &[u32],
    ) -> Attempt {
        let mut token = 0;
        for (k, part) in tokens.chunks(MAX_STEP).enumerate() {
            let at = start + k * MAX_STEP;
            token = self.attempt_one(machine, route, at, part)?;
        }
        Ok(token)
    }

    fn attempt_one(
        &mut self,
        machine: &mut ClientSession,
        route: &[RouteHop],
        start: usize,
        tokens: &[u32],
    ) -> Attempt {
        let first = route[0].node;
        let want = (start + tokens.len()) as u32;
        machine.begin_step(want);
        if self.crashed(first) {
            // The client cannot reach the first hop.
            return Err(Failure::Blamed {
                blamed: first,
                accuser: None,
                reason: None,
            });
        }
        if self.strikes(Fault::Outsider { at: self.step_no }) {
            let outsider = self.outsider;
            self.report(outsider, LATENCY, Report::Token { position: want }, 5);
            let error = Report::Error {
                blamed: first,
                reason: Reason::Compute,
            };
            self.report(outsider, LATENCY, error, 0);
            self.report(outsider, LATENCY, Report::Leaving, 0);
        }
        self.attempts += 1;
        if !self.strikes(Fault::DropStep { at: self.step_no }) {
            let values = tokens.iter().map(|t| *t as u64).collect();
            let (client, to) = (self.client, self.index_of(first));
            let attempt = self.attempts;
            let payload = Payload::Step {
                attempt,
                start,
                values,
            };
            self.send(client, to, LATENCY, payload);
        }
        let deadline = self.now + DEADLINE;
        while self.queue.peek().is_some_and(|e| e.at <= deadline) {
            let Some(env) = self.queue.pop() else { break };
            self.now = env.at;
            self.events += 1;
            assert!(self.events < MAX_EVENTS, "the run does not end");
            if env.session != self.session {
                continue;
            }
            match (env.to, env.payload) {
                (
                    Some(i),
                    Payload::Step {
                        attempt,
                        start,
                        values,
                    },
                ) => self.deliver_step(i, env.from, attempt, start, values),
                (None, Payload::Report { report, token }) => {
                    match machine.report(env.from, report) {
                        Verdict::Result => return Ok(token),
                        Verdict::Failed(f) => return Err(f),
                        Verdict::Stale | Verdict::Refused(_) | Verdict::Leaving => {}
                    }
                }
                _ => {}
            }
        }
        self.now = deadline;
        Err(Failure::Unattributed)
    }

    /// Rebuilds the caches of the hops new on `new` after `done` positions, as
    /// `RemoteSession::refill` does; `false` when a hop on the way is gone.
    fn refill(&mut self, old: &[RouteHop], new: &[RouteHop], done: usize, context: &[u32]) -> bool {
        let (mut values, from, through) = match plan_refill(old, new, done) {
            RefillPlan::Nothing => return true,
            RefillPlan::FromClient { upto, through } => (
                context[..upto]
                    .iter()
                    .map(|t| *t as u64)
                    .collect::<Vec<_>>(),
                0,
                through,
            ),
            RefillPlan::FromHop {
                from,
                upto,
                through,
            } => {
                let Some(i) = self.index_of(new[from].node) else {
                    return false;
                };
                let node = &self.nodes[i];
                let sent = node.sessions.get(&self.session).map(|s| &s.sent);
                match sent {
                    Some(sent) if !node.crashed && sent.len() >= upto => {
                        (sent[..upto].to_vec(), from + 1, through)
                    }
                    _ => return false,
                }
            }
        };
        for hop in &new[from..=through] {
            let Some(i) = self.index_of(hop.node) else {
                return false;
            };
            let (range, crashed) = (self.nodes[i].range, self.nodes[i].crashed);
            let Some(slot) = self.nodes[i].sessions.get_mut(&self.session) else {
                return false;
            };
            if crashed {
                return false;
            }
            let Some(out) = slot.compute(range, 0, &values) else {
                return false;
            };
            if slot.index + 1 < new.len() {
                slot.sent = out.clone();
            }
            values = out;
        }
        true
    }

    /// One generation step with failover, as `BlockingSession::step_with_failover` does.
    fn step(
        &mut self,
        machine: &mut ClientSession,
        route: &mut Vec<RouteHop>,
        start: usize,
        context: &[u32],
    ) -> Result<u32, String> {
        let mut replay = false;
        loop {
            let outcome = if replay {
                self.attempt(machine, &route.clone(), 0, context)
            } else {
                self.attempt(machine, &route.clone(), start, &context[start..])
            };
            let failure = match outcome {
                Ok(token) => {
                    machine.step_succeeded();
                    return Ok(token);
                }
                Err(f) => f,
            };
            let mut next = machine.step_failed(failure);
            let mut old = route.clone();
            loop {
                next = match next {
                    Recovery::Probe => {
                        let dead: Vec<NodeId> = ids(route)
                            .into_iter()
                            .filter(|n| self.crashed(*n))
                            .collect();
                        machine.probed(&dead)
                    }
                    Recovery::Replan { exclude } => {
                        let Some(new) = self.plan(&exclude) else {
                            return Err("no route avoids the failed nodes".into());
                        };
                        self.open(&new);
                        old = std::mem::replace(route, new);
                        machine.rerouted(ids(route))
                    }
                    Recovery::Refill => {
                        let ok = self.refill(&old, route, start, context);
                        machine.refilled(ok)
                    }
                    Recovery::Retry => {
                        replay = false;
                        break;
                    }
                    Recovery::Replay => {
                        replay = true;
                        break;
                    }
                    Recovery::GiveUp(why) => return Err(format!("{why:?}")),
                };
            }
        }
    }
}

/// Runs a generation of `count` tokens after `prompt` under `faults`.
fn run(prompt: &[u32], count: usize, faults: Vec<Fault>) -> Run {
    let mut world = World::new(faults);
    let mut route = world.plan(&[]).expect("every range has replicas");
    world.open(&route);
    let mut machine = ClientSession::new(world.session, ids(&route), MAX_FAILOVERS);
    let mut context = prompt.to_vec();
    let mut fed = 0;
    let mut tokens = Vec::new();
    let mut gave_up = None;
    while tokens.len() < count {
        world.crash_due();
        match world.step(&mut machine, &mut route, fed, &context) {
            Ok(token) => {
                fed = context.len();
                context.push(token);
                tokens.push(token);
                world.step_no += 1;
            }
            Err(why) => {
                gave_up = Some(why);
                break;
            }
        }
    }
    Run {
        tokens,
        gave_up,
        excluded: machine.failed().to_vec(),
        stats: machine.stats(),
    }
}

/// The reference continuation, computed without any network.
fn reference(prompt: &[u32], count: usize) -> Vec<u32> {
    let mut context = prompt.to_vec();
    for _ in 0..count {
        let t = reference_token(&context);
        context.push(t);
    }
    context[prompt.len()..].to_vec()
}

/// A seeded schedule: a prompt, a length and up to four faults.
fn schedule(seed: u64) -> (Vec<u32>, usize, Vec<Fault>) {
    let mut rng = Rng(seed);
    let prompt_len = 1 + rng.below(9) as usize;
    let prompt = (0..prompt_len).map(|_| rng.below(VOCAB) as u32).collect();
    let count = 2 + rng.below(5) as usize;
    let nodes = (RANGES.len() * REPLICAS) as u64;
    let faults = (0..rng.below(5))
        .map(|_| {
            let node = rng.below(nodes) as usize;
            let at = rng.below(count as u64) as usize;
            match rng.below(9) {
                0 => Fault::Crash { node, at },
                1 => Fault::FalseBlame { node, at },
                2 => Fault::Forge { node },
                3 => Fault::DropStep { at },
                4 => Fault::LateToken { at },
                5 => Fault::Stall { node, at },
                6 => Fault::Duplicate { at },
                7 => Fault::Reorder { at },
                _ => Fault::Outsider { at },
            }
        })
        .collect();
    (prompt, count, faults)
}

/// Nodes that misbehave or die in `faults` (everyone else must never be excluded).
fn faulty(faults: &[Fault]) -> Vec<usize> {
    faults
        .iter()
        .filter_map(|f| match f {
            Fault::Crash { node, .. } | Fault::FalseBlame { node, .. } | Fault::Forge { node } => {
                Some(*node)
            }
            _ => None,
        })
        .collect()
}

/// Whether the schedule leaves an honest replica of every range and no more failures than a
/// step's budget: then the generation must finish.
fn survivable(faults: &[Fault]) -> bool {
    let bad = faulty(faults);
    let costly = faults
        .iter()
        .filter(|f| {
            !matches!(
                f,
                Fault::Forge { .. }
                    | Fault::Outsider { .. }
                    | Fault::Duplicate { .. }
                    | Fault::Reorder { .. }
            )
        })
        .count();
    (0..RANGES.len()).all(|r| (r * REPLICAS..(r + 1) * REPLICAS).any(|n| !bad.contains(&n)))
        && costly <= MAX_FAILOVERS as usize
}

/// The invariants every schedule keeps.
fn check_run(seed: u64) -> Run {
    let (prompt, count, faults) = schedule(seed);
    let run = run(&prompt, count, faults.clone());
    let want = reference(&prompt, count);
    assert_eq!(
        run.tokens,
        want[..run.tokens.len()],
        "seed {seed}: tokens differ from the reference under {faults:?}"
    );
    let bad = faulty(&faults);
    for excluded in &run.excluded {
        let i = (0..RANGES.len() * REPLICAS)
            .find(|i| node_id(100 + *i as u64) == *excluded)
            .expect("only swarm nodes are excluded");
        assert!(
            bad.contains(&i),
            "seed {seed}: honest node {i} excluded under {faults:?} ({:?})",
            run.stats
        );
    }
    if survivable(&faults) {
        assert_eq!(
            run.gave_up, None,
            "seed {seed}: a survivable schedule failed: {faults:?} ({:?})",
            run.stats
        );
        assert_eq!(run.tokens.len(), count);
    }
    run
}

#[test]
fn a_thousand_fault_schedules_keep_the_text_and_never_exclude_an_honest_node() {
    let (mut finished, mut failovers, mut refused, mut false_blames, mut retries) = (0, 0, 0, 0, 0);
    for seed in 0..1000 {
        let run = check_run(seed);
        finished += usize::from(run.gave_up.is_none());
        failovers += run.stats.failovers;
        refused += run.stats.refused_reports;
        false_blames += run.stats.false_blames;
        retries += run.stats.retries;
    }
    // The schedules really exercise every recovery path.
    eprintln!("sim: {finished}/1000 finished, {failovers} failovers, {refused} refused reports, {false_blames} false blames, {retries} retries");
    assert!(finished > 900, "{finished} of 1000 finished");
    assert!(failovers > 100, "{failovers} failovers");
    assert!(refused > 100, "{refused} refused reports");
    assert!(false_blames > 20, "{false_blames} false blames");
    assert!(retries > 50, "{retries} retries");
}

#[test]
fn a_fault_free_run_gives_the_reference_text() {
    let prompt = [5, 6, 7, 8, 9, 10, 11];
    let run = run(&prompt, 6, Vec::new());
    assert_eq!(run.gave_up, None);
    assert_eq!(run.tokens, reference(&prompt, 6));
    assert_eq!(run.stats, Default::default());
}

#[test]
fn a_crashed_hop_is_routed_around_and_its_replacement_refilled() {
    let prompt = [1, 2, 3, 4, 5];
    // Node 3 is the first replica of the middle range, on the first route.
    let run = run(&prompt, 5, vec![Fault::Crash { node: 3, at: 2 }]);
    assert_eq!(run.gave_up, None);
    assert_eq!(run.tokens, reference(&prompt, 5));
    assert_eq!(run.excluded, vec![node_id(103)]);
    assert_eq!(run.stats.failovers, 1);
}

#[test]
fn a_false_blame_excludes_the_liar_only() {
    let prompt = [1, 2, 3];
    let run = run(&prompt, 4, vec![Fault::FalseBlame { node: 0, at: 1 }]);
    assert_eq!(run.gave_up, None);
    assert_eq!(run.tokens, reference(&prompt, 4));
    assert_eq!(run.excluded, vec![node_id(100)]);
    assert_eq!(run.stats.false_blames, 1);
}

#[test]
fn losing_every_replica_of_a_range_fails_with_a_typed_reason_not_a_hang() {
    let faults = (3..6).map(|node| Fault::Crash { node, at: 1 }).collect();
    let run = run(&[1, 2, 3], 4, faults);
    assert_eq!(run.tokens, reference(&[1, 2, 3], 1));
    assert!(run.gave_up.is_some());
}

#[test]
fn a_stalled_hops_late_stream_does_not_cut_its_successors_cache() {
    // Node 0 (first hop) stalls at step 1: the client times out, finds every hop alive and
    // retries; the stalled stream reaches node 3 some 20 steps later (a step takes 4 ticks,
    // the stall 80), and must be dropped as stale.
    let prompt = [4, 5, 6];
    let run = run(&prompt, 40, vec![Fault::Stall { node: 0, at: 1 }]);
    assert_eq!(run.gave_up, None);
    assert_eq!(run.tokens, reference(&prompt, 40));
    assert_eq!(run.excluded, Vec::<NodeId>::new());
    assert_eq!(run.stats.retries, 1);
}
