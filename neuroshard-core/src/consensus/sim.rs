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
}

struct Swarm {
    model: Model,
    replicas: Vec<Replica>,
    client: Consensus,
    client_key: iroh::SecretKey,
    liar: Option<usize>,
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
        let m = model();
        let mut g = Gaussian::new(seed ^ 0x5eed);
        let mut keys: Vec<iroh::SecretKey> = (0..REPLICAS * RANGES.len())
            .map(|i| key_for(seed, i))
            .collect();
        keys.sort_by_key(|k| k.public());
        let mut replicas = Vec::new();
        let mut liar_index = None;
        for (range, layers) in RANGES.iter().enumerate() {
            // Keys of this range, ascending; the liar takes the first or the last.
            let mut range_keys: Vec<iroh::SecretKey> = keys
                .iter()
                .skip(range)
                .step_by(RANGES.len())
                .cloned()
                .collect();
            range_keys.sort_by_key(|k| k.public());
            for (r, key) in range_keys.into_iter().enumerate() {
                let behaviour = match liar {
                    Some((b, lr, lowest))
                        if lr == range && r == if lowest { 0 } else { REPLICAS - 1 } =>
                    {
                        liar_index = Some(replicas.len());
                        Some(b)
                    }
                    _ => None,
                };
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
        Swarm {
            model: m,
            replicas,
            client: Consensus::new(Comparison::default(), Reputation::new(policy())),
            client_key: key_for(seed, 200),
            liar: liar_index,
        }
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

    /// Runs prompt + decode greedily; returns what it measured.
    fn run(&mut self, seed: u64) -> RunReport {
        let mut noise = Gaussian::new(seed ^ 0xbad);
        let mut report = RunReport::default();
        let mut context: Vec<u32> = PROMPT.to_vec();
        let mut start = 0;
        let mut banned_at: Option<usize> = None;
        let mut liar_votes = 0;
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
                        .choose_voters(&candidates, 1, now)
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
            if let Some(l) = self.liar {
                if voters.iter().flatten().any(|&v| v == l) {
                    liar_votes += 1;
                    if banned_at.is_some() {
                        report.routed_after_ban = true;
                    }
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
                let mut per_receiver: Vec<Vec<SignedBallot>> = vec![Vec::new(); receivers];
                for (vi, &i) in voters[r].iter().enumerate() {
                    let upstream = (r == 0).then_some(&client_frame);
                    if let Some(bs) = self.ballots(
                        i,
                        &inputs[vi],
                        frame,
                        upstream,
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
                    let consensus = if r + 1 < RANGES.len() {
                        &mut self.replicas[voters[r + 1][rx]].consensus
                    } else {
                        &mut self.client
                    };
                    let verdict = consensus.vote(&expected, ballots, now);
                    report.votes += 1;
                    let honest_flagged = |ids: &[NodeId]| {
                        ids.iter()
                            .any(|id| Some(*id) != self.liar.map(|l| self.replicas[l].id))
                    };
                    let fp = match &verdict.outcome {
                        VoteOutcome::Accepted(a) => {
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
            if let Some(l) = self.liar {
                let id = self.replicas[l].id;
                if banned_at.is_none() && !self.client.reputation().may_route(&id, now + STEP_MS) {
                    banned_at = Some(step);
                    report.identified_after = Some(liar_votes);
                }
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
        if let Some(l) = self.liar {
            let id = self.replicas[l].id;
            let end = T0 + (DECODE as u64 + 1) * STEP_MS;
            report.liar_state = Some(self.client.reputation().state(&id, end));
            report.liar_may_route = self.client.reputation().may_route(&id, end);
            report.liar_banned_for_good = self
                .client
                .reputation()
                .standing(&id)
                .is_some_and(|s| s.banned_until_ms == u64::MAX);
        }
        report
    }
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
