//! A deterministic simulator of replicated ranges voting, without sockets: the real
//! [`Consensus`] (comparison, vote rule, receipts, reputation, evidence) on every replica and
//! on the client, over a stand-in model whose replicas differ the way honest builds do.
//!
//! The model: 6 layers in 3 ranges of 3 replicas each, hidden width 32, vocabulary 40. A
//! layer maps position p to `x + 0.5 tanh(W x + 0.3 mean(cached inputs at 0..p))`, so an
//! output depends on its input and on the replica's KV-like cache. Honest replicas differ
//! by float rounding: their dot products sum in another order, and some send f16 frames.
//!
//! Each step the client picks the replicas of every range from its reputation table, sends
//! the tokens (signed frames) to the first range, and every receiver (each replica of the
//! next range, then the client) votes on the k ballots it got and computes on the accepted
//! bytes. After each step everyone gossips the evidence, receipts and frame claims it saw,
//! and every participant verifies and applies them.

use super::adversary::{self, Behaviour, Gaussian};
use super::compare::{FrameDtype, VoteOutput};
use super::receipt::{
    extend_prefix, FrameClaim, InputContext, ReceiptChain, SignedFrame, Work, RECEIPT_VERSION,
};
use super::reputation::{Reputation, ReputationPolicy, TrustState};
use super::{Comparison, Consensus, Evidence, SignedBallot, VoteOutcome};
use crate::net::NodeId;

const WIDTH: usize = 32;
const VOCAB: usize = 40;
const LAYERS: usize = 6;
const RANGES: [std::ops::Range<usize>; 3] = [0..2, 2..4, 4..6];
const REPLICAS: usize = 3;
const PROMPT: [u32; 4] = [3, 17, 5, 29];
const DECODE: usize = 8;
/// Virtual milliseconds per step.
const STEP_MS: u64 = 100;
const T0: u64 = 1_800_000_000_000;
const SESSION: u64 = 77;

struct Model {
    embed: Vec<f32>,
    layers: Vec<Vec<f32>>,
    head: Vec<f32>,
}

fn matrix(g: &mut Gaussian, rows: usize, scale: f32) -> Vec<f32> {
    (0..rows * WIDTH).map(|_| scale * g.sample()).collect()
}

fn model() -> Model {
    let mut g = Gaussian::new(2026);
    Model {
        embed: matrix(&mut g, VOCAB, 1.0),
        layers: (0..LAYERS)
            .map(|_| matrix(&mut g, WIDTH, 1.0 / (WIDTH as f32).sqrt()))
            .collect(),
        head: matrix(&mut g, VOCAB, 1.0),
    }
}

/// How an honest build rounds: the summation order of its dot products and its frames.
#[derive(Debug, Clone, Copy)]
struct Build {
    order: u8,
    f16_frames: bool,
}

fn dot(order: u8, w: &[f32], x: &[f32]) -> f32 {
    match order % 3 {
        0 => w.iter().zip(x).map(|(a, b)| a * b).sum(),
        1 => w.iter().zip(x).rev().map(|(a, b)| a * b).sum(),
        _ => {
            let mut lanes = [0f32; 4];
            for (i, (a, b)) in w.iter().zip(x).enumerate() {
                lanes[i % 4] += a * b;
            }
            (lanes[0] + lanes[2]) + (lanes[1] + lanes[3])
        }
    }
}

struct Replica {
    id: NodeId,
    key: iroh::SecretKey,
    range: usize,
    build: Build,
    behaviour: Option<Behaviour>,
    /// Its own copy of the first layer of its range (`wrong-weights` perturbs it).
    first_layer: Vec<f32>,
    /// Per layer of its range, the input at each position (position-indexed).
    cache: Vec<Vec<Vec<f32>>>,
    chain: ReceiptChain,
    consensus: Consensus,
    /// The prefix chain of the inputs it accepted.
    prefix: [u8; 32],
    last_output: Option<Vec<f32>>,
}

impl Replica {
    fn compute(&mut self, m: &Model, input: &[Vec<f32>], start: usize) -> Vec<Vec<f32>> {
        let range = RANGES[self.range].clone();
        let mut rows: Vec<Vec<f32>> = input.to_vec();
        for (li, l) in range.clone().enumerate() {
            let skip = self.behaviour == Some(Behaviour::SkipLayer) && li == 1;
            let w = if li == 0 {
                &self.first_layer
            } else {
                &m.layers[l]
            };
            let cache = &mut self.cache[li];
            cache.truncate(start);
            for row in rows.iter_mut() {
                let p = cache.len();
                let mut ctx = [0f32; WIDTH];
                for c in cache.iter() {
                    ctx.iter_mut().zip(c).for_each(|(a, b)| *a += b / p as f32);
                }
                cache.push(row.clone());
                if skip {
                    continue;
                }
                let out: Vec<f32> = (0..WIDTH)
                    .map(|i| {
                        let z = dot(self.build.order, &w[i * WIDTH..(i + 1) * WIDTH], row);
                        row[i] + 0.5 * (z + 0.3 * ctx[i]).tanh()
                    })
                    .collect();
                *row = out;
            }
        }
        if self.range == RANGES.len() - 1 {
            rows = rows
                .iter()
                .map(|h| {
                    (0..VOCAB)
                        .map(|v| dot(self.build.order, &m.head[v * WIDTH..(v + 1) * WIDTH], h))
                        .collect()
                })
                .collect();
        }
        rows
    }
}

fn flat(rows: &[Vec<f32>]) -> Vec<f32> {
    rows.iter().flatten().copied().collect()
}

fn encode(values: &[f32], f16: bool) -> (FrameDtype, Vec<u8>) {
    if f16 {
        let bytes = values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        (FrameDtype::F16, bytes)
    } else {
        (
            FrameDtype::F32,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
    }
}

fn decode_rows(ballot: &SignedBallot) -> Vec<Vec<f32>> {
    let out = VoteOutput::from_bytes(ballot.dtype, ballot.width, &ballot.bytes).expect("whole");
    out.values
        .chunks(ballot.width)
        .map(|r| r.to_vec())
        .collect()
}

/// What one run measured.
#[derive(Debug, Default)]
struct RunReport {
    tokens: Vec<u32>,
    /// Verdicts over all receivers.
    votes: usize,
    /// Verdicts in which an honest node was called deviating, unaccounted, or no majority
    /// formed (false positives).
    false_positives: usize,
    /// Votes the liar took part in before the client's table banned it (None: never).
    identified_after: Option<usize>,
    /// Whether the liar sat in any vote after it was banned.
    routed_after_ban: bool,
    liar_state: Option<TrustState>,
    liar_may_route: bool,
    /// Banned for good (a fraud or upstream proof reached the client).
    liar_banned_for_good: bool,
    /// Votes a dishonest replica's bytes won.
    liars_won: usize,
    /// Votes without a majority that a referee's replay settled.
    settled: usize,
    /// Honest replicas the client may not route to at the end.
    honest_banned: usize,
}

struct Swarm {
    model: Model,
    replicas: Vec<Replica>,
    client: Consensus,
    client_key: iroh::SecretKey,
    /// Indices of the dishonest replicas (colluding when more than one lies the same way).
    liars: Vec<usize>,
    /// Replicas per vote the client asks for.
    k: usize,
}

/// Who lies, and how the swarm is trusted.
struct Setup {
    /// (behaviour, range, rank by node id within the range) of each dishonest replica.
    liars: Vec<(Behaviour, usize, usize)>,
    /// Replicas per range.
    per_range: usize,
    /// Replicas per vote (1 with nothing trusted: a plain majority of 3 probation nodes).
    k: usize,
    /// Every table pins the highest id of each range (the operator's own node, which
    /// referees) and trusts the others as earned (20 agreed votes before this session).
    trusted: bool,
}

impl Setup {
    /// The swarm of the detection matrix: 3 probation replicas per range, at most one liar,
    /// the lowest or the highest id of its range.
    fn matrix(liar: Option<(Behaviour, usize, bool)>) -> Self {
        Setup {
            liars: liar
                .map(|(b, range, lowest)| (b, range, if lowest { 0 } else { REPLICAS - 1 }))
                .into_iter()
                .collect(),
            per_range: REPLICAS,
            k: 1,
            trusted: false,
        }
    }
}

fn key_for(seed: u64, i: usize) -> iroh::SecretKey {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8] = i as u8;
    bytes[9] = 0xc5;
    iroh::SecretKey::from_bytes(&bytes)
}

fn policy() -> ReputationPolicy {
    ReputationPolicy::default()
}

impl Swarm {
    /// 9 replicas with builds drawn from `seed`; the liar (if any) in `range`, holding the
    /// lowest node id of its range when `lowest`.
    fn new(seed: u64, liar: Option<(Behaviour, usize, bool)>) -> Self {
        Self::with(seed, Setup::matrix(liar))
    }

    /// The swarm `setup` describes, with builds drawn from `seed`.
    fn with(seed: u64, setup: Setup) -> Self {
        let m = model();
        let mut g = Gaussian::new(seed ^ 0x5eed);
        let per_range = setup.per_range;
        let mut keys: Vec<iroh::SecretKey> = (0..per_range * RANGES.len())
            .map(|i| key_for(seed, i))
            .collect();
        keys.sort_by_key(|k| k.public());
        let mut replicas = Vec::new();
        let mut liars = Vec::new();
        for (range, layers) in RANGES.iter().enumerate() {
            // Keys of this range, ascending; each liar takes its rank.
            let mut range_keys: Vec<iroh::SecretKey> = keys
                .iter()
                .skip(range)
                .step_by(RANGES.len())
                .cloned()
                .collect();
            range_keys.sort_by_key(|k| k.public());
            for (r, key) in range_keys.into_iter().enumerate() {
                let behaviour = setup
                    .liars
                    .iter()
                    .find(|(_, lr, rank)| *lr == range && *rank == r)
                    .map(|(b, _, _)| *b);
                if behaviour.is_some() {
                    liars.push(replicas.len());
                }
                let build = Build {
                    order: (seed as usize + replicas.len()) as u8 % 3,
                    f16_frames: (seed as usize + 2 * replicas.len()) % 3 == 0,
                };
                let mut first_layer = m.layers[layers.start].clone();
                if behaviour == Some(Behaviour::WrongWeights) {
                    let n = first_layer.len();
                    adversary::add_noise(&mut first_layer, n, 0.01, &mut g);
                }
                replicas.push(Replica {
                    id: key.public(),
                    chain: ReceiptChain::new(key.clone(), [0; 32]),
                    key,
                    range,
                    build,
                    behaviour,
                    first_layer,
                    cache: vec![Vec::new(); layers.len()],
                    consensus: Consensus::new(Comparison::default(), Reputation::new(policy())),
                    prefix: [0; 32],
                    last_output: None,
                });
            }
        }
        let mut swarm = Swarm {
            model: m,
            replicas,
            client: Consensus::new(Comparison::default(), Reputation::new(policy())),
            client_key: key_for(seed, 200),
            liars,
            k: setup.k,
        };
        if setup.trusted {
            swarm.trust_all(per_range);
        }
        swarm
    }

    /// In every table: the highest id of each range pinned, the others trusted as earned.
    fn trust_all(&mut self, per_range: usize) {
        let ids: Vec<(NodeId, bool)> = self
            .replicas
            .iter()
            .enumerate()
            .map(|(i, x)| (x.id, i % per_range == per_range - 1))
            .collect();
        let promote = policy().promote_after;
        let mut everyone: Vec<&mut Consensus> =
            self.replicas.iter_mut().map(|x| &mut x.consensus).collect();
        everyone.push(&mut self.client);
        for c in everyone {
            for (id, pinned) in &ids {
                if *pinned {
                    c.reputation_mut().pin(*id, T0);
                } else {
                    for _ in 0..promote {
                        c.reputation_mut().agreed(*id, T0);
                    }
                }
            }
        }
    }

    fn is_liar(&self, id: &NodeId) -> bool {
        self.liars.iter().any(|&l| self.replicas[l].id == *id)
    }

    /// The trusted replica of `range` outside `voters` that the client names referee.
    fn referee_for(&self, range: usize, voters: &[usize], now: u64) -> Option<usize> {
        let candidates: Vec<NodeId> = self
            .replicas
            .iter()
            .filter(|x| x.range == range)
            .map(|x| x.id)
            .collect();
        let voting: Vec<NodeId> = voters.iter().map(|&i| self.replicas[i].id).collect();
        let id = self
            .client
            .reputation()
            .choose_referee(&candidates, &voting, now)?;
        self.replicas.iter().position(|x| x.id == id)
    }

    /// Replica `i` replays `history` (the steps its predecessor kept, oldest first) from an
    /// empty cache, as a referee called on no majority; returns its ballots for the last.
    fn replay(
        &mut self,
        i: usize,
        history: &[KeptStep],
        receivers: usize,
        noise: &mut Gaussian,
    ) -> Option<Vec<SignedBallot>> {
        let rep = &mut self.replicas[i];
        rep.cache.iter_mut().for_each(Vec::clear);
        rep.prefix = [0; 32];
        rep.last_output = None;
        let mut last = None;
        for step in history {
            last = self.ballots(
                i,
                &step.input,
                step.frame,
                step.upstream.as_ref(),
                step.start,
                receivers,
                noise,
            );
        }
        last
    }

    fn frame_claim(
        key: &iroh::SecretKey,
        start: usize,
        count: usize,
        hash: [u8; 32],
    ) -> SignedFrame {
        SignedFrame::sign(
            &FrameClaim {
                version: RECEIPT_VERSION,
                sender: key.public(),
                session: SESSION,
                position: start as u64,
                count: count as u32,
                frame: hash,
            },
            key,
        )
    }

    /// Replica `i`'s ballots for `receivers` receivers, after computing on `input` (the
    /// accepted frame's hash `frame`, signed by its sender as `upstream` when the sender is
    /// not a vote). `None`: it does not answer in time.
    #[allow(clippy::too_many_arguments)]
    fn ballots(
        &mut self,
        i: usize,
        input: &[Vec<f32>],
        frame: [u8; 32],
        upstream: Option<&SignedFrame>,
        start: usize,
        receivers: usize,
        noise: &mut Gaussian,
    ) -> Option<Vec<SignedBallot>> {
        let m = &self.model;
        let rep = &mut self.replicas[i];
        let mut rows = rep.compute(m, input, start);
        let width = rows[0].len();
        let mut values = flat(&rows);
        match rep.behaviour {
            Some(Behaviour::Noise) => adversary::add_noise(&mut values, width, 0.01, noise),
            Some(Behaviour::Scale) => adversary::scale(&mut values, 1.02),
            Some(Behaviour::Zeros) => adversary::zero_smallest_half(&mut values, width),
            Some(Behaviour::Stale) => {
                adversary::stale(&mut values, width, rep.last_output.as_deref())
            }
            _ => {}
        }
        rows = values.chunks(width).map(|r| r.to_vec()).collect();
        rep.last_output = rows.last().cloned();
        if rep.behaviour == Some(Behaviour::Slow) {
            return None;
        }
        let ctx = InputContext {
            session: SESSION,
            position: start as u64,
            count: input.len() as u32,
            prefix: rep.prefix,
            weight: [rep.range as u8; 32],
            codec: 0,
            build_id: format!("sim-{}", rep.build.order),
            kernel_path: if rep.build.f16_frames {
                "f16".into()
            } else {
                "f32".into()
            },
            frame,
        };
        rep.prefix = extend_prefix(&rep.prefix, &ctx.step_key());
        let honest = flat(&rows);
        let mut outputs = Vec::with_capacity(receivers);
        for r in 0..receivers {
            let lie = r > 0
                && matches!(
                    rep.behaviour,
                    Some(Behaviour::Equivocate | Behaviour::BadUpstream)
                );
            let mut v = honest.clone();
            if lie {
                adversary::add_noise(&mut v, width, 0.05, noise);
            }
            outputs.push(v);
        }
        let (dtype, honest_bytes) = encode(&honest, rep.build.f16_frames);
        let honest_hash = *blake3::hash(&honest_bytes).as_bytes();
        let work = |output: [u8; 32]| Work {
            session: SESSION,
            position: start as u64,
            count: input.len() as u32,
            input: ctx.hash(),
            output,
            weight: ctx.weight,
        };
        let now = T0 + start as u64 * STEP_MS;
        let honest_receipt = rep.chain.issue(&work(honest_hash), now);
        let mut ballots = Vec::with_capacity(receivers);
        for v in outputs {
            let (dtype2, bytes) = encode(&v, rep.build.f16_frames);
            debug_assert_eq!(dtype, dtype2);
            let hash = *blake3::hash(&bytes).as_bytes();
            let receipt = if hash == honest_hash || rep.behaviour == Some(Behaviour::BadUpstream) {
                honest_receipt.clone()
            } else {
                rep.chain.issue(&work(hash), now)
            };
            ballots.push(SignedBallot {
                from: rep.id,
                dtype,
                width,
                frame: Some(Self::frame_claim(&rep.key, start, input.len(), hash)),
                bytes,
                input: ctx.clone(),
                receipt,
                upstream: upstream.cloned(),
            });
        }
        Some(ballots)
    }

    /// Runs prompt + decode greedily, unaudited; returns what it measured.
    fn run(&mut self, seed: u64) -> RunReport {
        self.run_session(seed, false)
    }

    /// The consensus of receiver `rx` of range `r`'s vote: a replica of the next range, or
    /// the client after the last range.
    fn receiver(&mut self, voters: &[Vec<usize>], r: usize, rx: usize) -> &mut Consensus {
        if r + 1 < RANGES.len() {
            &mut self.replicas[voters[r + 1][rx]].consensus
        } else {
            &mut self.client
        }
    }

    /// Runs prompt + decode greedily. `audit`: the session was drawn for an audit at open,
    /// so each range's referee (a trusted replica outside the vote) computes every step
    /// beside the voters and every receiver judges by it. Unaudited, a referee is called
    /// only on no majority, and replays the range's kept inputs from position 0.
    fn run_session(&mut self, seed: u64, audit: bool) -> RunReport {
        let mut noise = Gaussian::new(seed ^ 0xbad);
        let mut report = RunReport::default();
        let mut context: Vec<u32> = PROMPT.to_vec();
        let mut start = 0;
        let mut banned_at: Option<usize> = None;
        let mut liar_votes = 0;
        // What each range's predecessor kept: the inputs it sent, step by step.
        let mut history: Vec<Vec<KeptStep>> = vec![Vec::new(); RANGES.len()];
        for step in 0..=DECODE {
            let now = T0 + step as u64 * STEP_MS;
            let tokens = &context[start..];
            // The client picks the voters of each range from its own table.
            let voters: Vec<Vec<usize>> = (0..RANGES.len())
                .map(|r| {
                    let candidates: Vec<NodeId> = self
                        .replicas
                        .iter()
                        .filter(|x| x.range == r)
                        .map(|x| x.id)
                        .collect();
                    let chosen = self
                        .client
                        .reputation()
                        .choose_voters(&candidates, self.k, now)
                        .expect("a routable replica");
                    chosen
                        .nodes
                        .iter()
                        .map(|id| {
                            self.replicas
                                .iter()
                                .position(|x| x.id == *id)
                                .expect("known")
                        })
                        .collect()
                })
                .collect();
            if voters
                .iter()
                .flatten()
                .any(|&v| self.is_liar(&self.replicas[v].id))
            {
                liar_votes += 1;
                if banned_at.is_some() {
                    report.routed_after_ban = true;
                }
            }
            // The client's input to the first range: embeddings of the new tokens.
            let embed: Vec<Vec<f32>> = tokens
                .iter()
                .map(|t| self.model.embed[*t as usize * WIDTH..(*t as usize + 1) * WIDTH].to_vec())
                .collect();
            let (_, bytes) = encode(&flat(&embed), false);
            let mut frame = *blake3::hash(&bytes).as_bytes();
            let client_frame = Self::frame_claim(&self.client_key, start, tokens.len(), frame);
            let mut inputs: Vec<Vec<Vec<f32>>> = vec![embed; voters[0].len()];
            let mut gossip_evidence: Vec<Evidence> = Vec::new();
            let mut gossip_receipts = Vec::new();
            let mut gossip_frames = Vec::new();
            let mut logits = None;
            for r in 0..RANGES.len() {
                let expected: Vec<NodeId> =
                    voters[r].iter().map(|&i| self.replicas[i].id).collect();
                let receivers = if r + 1 < RANGES.len() {
                    voters[r + 1].len()
                } else {
                    1
                };
                let upstream = (r == 0).then(|| client_frame.clone());
                history[r].push(KeptStep {
                    start,
                    frame,
                    upstream: upstream.clone(),
                    input: inputs[0].clone(),
                });
                let referee = self.referee_for(r, &voters[r], now);
                // Audited: the referee computes beside the voters (its cache holds the
                // whole prefix, as the audit was drawn at open).
                let mut referee_ballots = match (audit, referee) {
                    (true, Some(x)) => self.ballots(
                        x,
                        &inputs[0],
                        frame,
                        upstream.as_ref(),
                        start,
                        receivers,
                        &mut noise,
                    ),
                    _ => None,
                };
                let mut per_receiver: Vec<Vec<SignedBallot>> = vec![Vec::new(); receivers];
                for (vi, &i) in voters[r].iter().enumerate() {
                    if let Some(bs) = self.ballots(
                        i,
                        &inputs[vi],
                        frame,
                        upstream.as_ref(),
                        start,
                        receivers,
                        &mut noise,
                    ) {
                        for (rx, b) in bs.into_iter().enumerate() {
                            gossip_receipts.push(b.receipt.clone());
                            if let Some(f) = &b.frame {
                                gossip_frames.push(f.clone());
                            }
                            per_receiver[rx].push(b);
                        }
                    }
                }
                let mut next_inputs = Vec::with_capacity(receivers);
                let mut missing: Vec<(NodeId, NodeId)> = Vec::new();
                for (rx, ballots) in per_receiver.into_iter().enumerate() {
                    let judged_by = referee_ballots.as_ref().map(|b| b[rx].clone());
                    let consensus = self.receiver(&voters, r, rx);
                    let mut verdict = match judged_by {
                        Some(by) => consensus.refereed_vote(&expected, ballots, by, now),
                        None => consensus.vote(&expected, ballots, now),
                    };
                    if verdict.accepted.is_none() {
                        // No majority: the referee replays 0..p from the kept inputs.
                        if referee_ballots.is_none() {
                            referee_ballots = referee
                                .and_then(|x| self.replay(x, &history[r], receivers, &mut noise));
                        }
                        if let Some(by) = referee_ballots.as_ref().map(|b| b[rx].clone()) {
                            let held = std::mem::take(&mut verdict.held);
                            let consensus = self.receiver(&voters, r, rx);
                            let settled = consensus.settle(&expected, held, by, now);
                            verdict.evidence.extend(settled.evidence);
                            verdict.outcome = settled.outcome;
                            verdict.accepted = settled.accepted;
                            report.settled += 1;
                        }
                    }
                    report.votes += 1;
                    let honest_flagged = |ids: &[NodeId]| ids.iter().any(|id| !self.is_liar(id));
                    let fp = match &verdict.outcome {
                        VoteOutcome::Accepted(a) => {
                            if self.is_liar(&a.winner) {
                                report.liars_won += 1;
                            }
                            honest_flagged(&a.deviating) || honest_flagged(&verdict.unaccounted)
                        }
                        VoteOutcome::NoMajority { .. } => true,
                    };
                    report.false_positives += fp as usize;
                    gossip_evidence.extend(verdict.evidence.iter().cloned());
                    if r + 1 < RANGES.len() {
                        let reporter = self.replicas[voters[r + 1][rx]].id;
                        missing.extend(verdict.unaccounted.iter().map(|n| (*n, reporter)));
                    }
                    let accepted = verdict.accepted.expect("a majority in every vote");
                    frame = *blake3::hash(&accepted.bytes).as_bytes();
                    next_inputs.push(decode_rows(&accepted));
                }
                if r + 1 < RANGES.len() {
                    // Receivers report missing ballots to the client, which bans only on a
                    // majority of them.
                    let receivers: Vec<NodeId> =
                        voters[r + 1].iter().map(|&i| self.replicas[i].id).collect();
                    for node in &expected {
                        let reporters: Vec<NodeId> = missing
                            .iter()
                            .filter(|(n, _)| n == node)
                            .map(|(_, by)| *by)
                            .collect();
                        if !reporters.is_empty() {
                            self.client
                                .missing_reported(*node, &reporters, &receivers, now);
                        }
                    }
                    inputs = next_inputs;
                } else {
                    logits = next_inputs.pop();
                }
            }
            // Gossip: everyone verifies and applies what anyone saw.
            let mut everyone: Vec<&mut Consensus> =
                self.replicas.iter_mut().map(|x| &mut x.consensus).collect();
            everyone.push(&mut self.client);
            for c in everyone.iter_mut() {
                for e in &gossip_evidence {
                    let _ = c.apply(e, now);
                }
            }
            for c in everyone.iter_mut() {
                let mut found = Vec::new();
                for receipt in &gossip_receipts {
                    found.extend(c.observe(receipt, now).map(Evidence::Fraud));
                }
                for f in &gossip_frames {
                    found.extend(c.observe_frame(f, now).map(Evidence::Upstream));
                }
                for e in found {
                    let _ = c.apply(&e, now);
                }
            }
            let all_banned = !self.liars.is_empty()
                && self.liars.iter().all(|&l| {
                    !self
                        .client
                        .reputation()
                        .may_route(&self.replicas[l].id, now + STEP_MS)
                });
            if banned_at.is_none() && all_banned {
                banned_at = Some(step);
                report.identified_after = Some(liar_votes);
            }
            let logits = logits.expect("the last range answered");
            let last = logits.last().expect("a row");
            let token = (0..VOCAB)
                .max_by(|&a, &b| last[a].total_cmp(&last[b]))
                .expect("a vocabulary") as u32;
            start = context.len();
            context.push(token);
        }
        report.tokens = context[PROMPT.len()..].to_vec();
        let end = T0 + (DECODE as u64 + 1) * STEP_MS;
        let rep = self.client.reputation();
        if let Some(&l) = self.liars.first() {
            report.liar_state = Some(rep.state(&self.replicas[l].id, end));
        }
        let liar_ids: Vec<NodeId> = self.liars.iter().map(|&l| self.replicas[l].id).collect();
        report.liar_may_route = liar_ids.iter().any(|id| rep.may_route(id, end));
        report.liar_banned_for_good = !liar_ids.is_empty()
            && liar_ids.iter().all(|id| {
                rep.standing(id)
                    .is_some_and(|s| s.banned_until_ms == u64::MAX)
            });
        report.honest_banned = self
            .replicas
            .iter()
            .filter(|x| !self.is_liar(&x.id) && !rep.may_route(&x.id, end))
            .count();
        report
    }
}

/// What a range's predecessor kept of one step it sent: a referee replays from these.
#[derive(Clone)]
struct KeptStep {
    start: usize,
    frame: [u8; 32],
    upstream: Option<SignedFrame>,
    input: Vec<Vec<f32>>,
}

fn honest_tokens() -> Vec<u32> {
    Swarm::new(1, None).run(1).tokens
}

#[test]
fn honest_replicas_that_round_differently_are_never_flagged_over_a_thousand_votes() {
    let reference = honest_tokens();
    let (mut votes, mut flagged) = (0, 0);
    for seed in 0..20 {
        let report = Swarm::new(seed, None).run(seed);
        votes += report.votes;
        flagged += report.false_positives;
        assert_eq!(report.tokens, reference, "seed {seed}");
    }
    println!("honest votes {votes}, false positives {flagged}");
    assert!(votes >= 1000, "{votes}");
    assert_eq!(flagged, 0);
}

#[test]
fn the_honest_builds_really_differ_so_the_test_above_means_something() {
    // Two honest replicas' first-range outputs differ in bytes (rounding), not in value.
    let mut swarm = Swarm::new(3, None);
    let m = model();
    let input: Vec<Vec<f32>> = PROMPT
        .iter()
        .map(|t| m.embed[*t as usize * WIDTH..(*t as usize + 1) * WIDTH].to_vec())
        .collect();
    let mut noise = Gaussian::new(0);
    let a = swarm
        .ballots(0, &input, [0; 32], None, 0, 1, &mut noise)
        .expect("answers");
    let b = swarm
        .ballots(1, &input, [0; 32], None, 0, 1, &mut noise)
        .expect("answers");
    let (oa, ob) = (
        VoteOutput::from_bytes(a[0].dtype, a[0].width, &a[0].bytes).expect("whole"),
        VoteOutput::from_bytes(b[0].dtype, b[0].width, &b[0].bytes).expect("whole"),
    );
    assert_ne!(oa.hash, ob.hash);
    assert!(!Comparison::Exact.agrees(&oa, &ob));
    assert!(Comparison::default().agrees(&oa, &ob));
}

#[test]
fn every_behaviour_is_caught_within_three_votes_and_the_text_stays_honest() {
    let reference = honest_tokens();
    let mut table = Vec::new();
    for behaviour in Behaviour::ALL {
        // (range, lowest id): first range, a receiver in the middle (lowest id and not),
        // and the last range (voted on by the client, over logits).
        for (range, lowest) in [(0, true), (0, false), (1, true), (1, false), (2, true)] {
            // The last range has one receiver (the client): sending different outputs to
            // different receivers needs two.
            let two_faced = matches!(behaviour, Behaviour::Equivocate | Behaviour::BadUpstream);
            if two_faced && range == RANGES.len() - 1 {
                continue;
            }
            let seed = 11 + range as u64;
            let mut swarm = Swarm::new(seed, Some((behaviour, range, lowest)));
            let report = swarm.run(seed);
            let name = behaviour.name();
            table.push(format!(
                "{name:13} range {range} lowest {lowest:5}: identified after {:?} votes, state {:?}",
                report.identified_after, report.liar_state
            ));
            assert_eq!(
                report.tokens, reference,
                "{name} in range {range}: the text changed"
            );
            let after = report.identified_after.unwrap_or(usize::MAX);
            assert!(
                after <= 3,
                "{name} in range {range}: identified after {after} votes"
            );
            assert!(!report.routed_after_ban, "{name}: routed after its ban");
            assert!(!report.liar_may_route, "{name}: still routable at the end");
            assert_eq!(
                report.false_positives, 0,
                "{name}: an honest node was flagged"
            );
            // Two-faced lies leave signed proofs that gossip brings to the client.
            assert_eq!(report.liar_banned_for_good, two_faced, "{name}: proof");
        }
    }
    println!("{}", table.join("\n"));
}

/// Two replicas of the middle range (the lowest ids, so their bytes would go forward) that
/// scale their outputs by 1.02 alike, beside one honest replica; every node trusted, and the
/// operator's own node (pinned) in each range outside the vote, to referee.
fn colluding(seed: u64) -> Swarm {
    Swarm::with(
        seed,
        Setup {
            liars: vec![(Behaviour::Scale, 1, 0), (Behaviour::Scale, 1, 1)],
            per_range: 4,
            k: 3,
            trusted: true,
        },
    )
}

#[test]
fn two_colluding_replicas_of_three_win_every_unaudited_vote() {
    let report = colluding(21).run(21);
    println!("unaudited collusion: {report:?}");
    // Their bytes go forward in every vote of their range (3 receivers a step), and the
    // honest third is outvoted on consistent signed receipts: it is the one banned.
    assert_eq!(report.liars_won, 3 * (DECODE + 1));
    assert!(report.liar_may_route);
    assert_eq!(report.identified_after, None);
    assert_eq!(report.honest_banned, 1);
    assert_eq!(report.settled, 0);
}

#[test]
fn an_audited_session_catches_colluders_at_its_first_vote_and_the_text_stays_honest() {
    let reference = honest_tokens();
    let report = colluding(21).run_session(21, true);
    println!("audited collusion: {report:?}");
    assert_eq!(report.tokens, reference);
    assert_eq!(report.identified_after, Some(1));
    assert_eq!(report.liars_won, 0);
    assert!(!report.liar_may_route && !report.routed_after_ban);
    assert_eq!((report.honest_banned, report.false_positives), (0, 0));
}

#[test]
fn a_split_vote_is_settled_by_a_referee_that_replays_from_position_zero() {
    // Two liars with different lies and one honest replica: no group is a majority. The
    // referee, outside the vote and with no cache, replays the kept inputs and decides.
    let reference = honest_tokens();
    for range in 0..RANGES.len() {
        let seed = 30 + range as u64;
        let mut swarm = Swarm::with(
            seed,
            Setup {
                liars: vec![(Behaviour::Noise, range, 0), (Behaviour::Zeros, range, 1)],
                per_range: 4,
                k: 3,
                trusted: true,
            },
        );
        let report = swarm.run(seed);
        println!("split in range {range}: {report:?}");
        assert_eq!(report.tokens, reference, "range {range}");
        assert!(report.settled >= 1, "range {range}: no referee was called");
        assert_eq!(report.identified_after, Some(1), "range {range}");
        assert_eq!(report.liars_won, 0);
        assert_eq!((report.honest_banned, report.false_positives), (0, 0));
    }
}

#[test]
fn the_audit_rate_is_the_chance_per_session_of_catching_a_coalition() {
    // Sessions drawn for an audit at the policy's spot-check rate, with the real draw rule;
    // each session a fresh swarm with a coalition that lies in every vote.
    let rate = 0.2;
    let draws = Reputation::new(ReputationPolicy {
        spot_check_rate: rate,
        ..policy()
    });
    let draw = |s: usize| {
        let h = blake3::hash(&(s as u64).to_le_bytes());
        u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
    };
    let sessions = 120;
    let mut caught = Vec::with_capacity(sessions);
    for s in 0..sessions {
        let audited = draws.spot_check(draw(s));
        let seed = 100 + s as u64;
        let report = colluding(seed).run_session(seed, audited);
        // Caught exactly when audited: the audit is the only check a majority cannot pass.
        assert_eq!(report.identified_after.is_some(), audited, "session {s}");
        caught.push(audited);
    }
    let rate_measured = caught.iter().filter(|c| **c).count() as f64 / sessions as f64;
    // A coalition that lies in n sessions in a row survives them with (1 - rate)^n.
    let n = 5;
    let windows = caught.windows(n).count();
    let survived = caught.windows(n).filter(|w| w.iter().all(|c| !c)).count();
    let survival = survived as f64 / windows as f64;
    println!(
        "audit rate {rate}: caught in {rate_measured:.3} of {sessions} sessions; survived {n} \
         sessions in a row {survival:.3} (expected {:.3})",
        (1.0 - rate).powi(n as i32)
    );
    let sigma = (rate * (1.0 - rate) / sessions as f64).sqrt();
    assert!(
        (rate_measured - rate).abs() < 4.0 * sigma,
        "{rate_measured}"
    );
}
