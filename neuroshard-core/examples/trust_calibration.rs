//! Honest variation and attack magnitudes for the tolerant vote, on a real model.
//!
//! `trust_calibration MODEL REF.bin [--mode exact|f32]` writes the reference: SmolLM2 in 3
//! ranges (even slices), a fixed prompt and 8 greedy decode steps; for every range and step
//! the input it got and the output it gave (hidden states, or the last position's logits).
//!
//! `trust_calibration MODEL REF.bin --against OUT.json [--mode exact|f32]` recomputes every
//! range on the reference's inputs (as a replica of the vote does: every replica computes on
//! the accepted bytes) under this process's mode, threads and kernel path
//! (`NEUROSHARD_KERNEL_PATH`, `RAYON_NUM_THREADS`), and writes per range the worst distance
//! to the reference, with f32 and with f16 frames, and the distances of each attack applied
//! to the reference (noise, scale, zeros, stale, skip-layer) with the same metric.
//! `benches/trust_calibration.sh` runs the matrix and writes `target/bench/trust_calibration.json`.

use neuroshard_core::consensus::adversary::{self, Gaussian};
use neuroshard_core::consensus::{distance, Distance, VoteOutput};
use neuroshard_core::internals::KernelPath;
use neuroshard_core::runtime::{init, RuntimeConfig};
use neuroshard_core::{
    even_slices, ComputeMode, EngineOptions, ForwardRequest, ShardEngine, ShardInput, ShardOutput,
    WeightFile,
};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

const PROMPT: &str = "The history of the printing press begins in the fifteenth century, when \
Johannes Gutenberg combined movable metal type, oil-based inks and a wooden press into a system \
that could produce books quickly and cheaply.";
const DECODE: usize = 8;

#[derive(Serialize, Deserialize)]
struct Record {
    range: usize,
    step: usize,
    start: usize,
    /// Token ids (first range) or hidden states in.
    tokens: Vec<u32>,
    input: Vec<f32>,
    output: Vec<f32>,
    width: usize,
}

type Fail = Box<dyn std::error::Error>;

fn engines(model: &str, mode: ComputeMode) -> Result<Vec<ShardEngine>, Fail> {
    let file = Arc::new(WeightFile::open(model)?);
    let layers = file.config().num_layers;
    let options = EngineOptions {
        mode,
        chunk_invariant: true,
        ..EngineOptions::default()
    };
    Ok(even_slices(layers, 3)
        .into_iter()
        .map(|r| ShardEngine::from_file(file.clone(), r, options.clone(), &mut |_, _| {}))
        .collect::<neuroshard_core::Result<_>>()?)
}

fn run_range(
    engine: &ShardEngine,
    record: &Record,
    session: u64,
    skip: Option<usize>,
) -> Result<Vec<f32>, Fail> {
    let seq = if record.tokens.is_empty() {
        record.input.len() / engine.config().hidden_size
    } else {
        record.tokens.len()
    };
    let input = || -> neuroshard_core::Result<ShardInput> {
        if record.tokens.is_empty() {
            ShardInput::hidden_from_slice(&record.input, 1, seq, engine.config().hidden_size)
        } else {
            ShardInput::tokens_from_slice(&record.tokens, 1, seq)
        }
    };
    let layers = engine.layers();
    let out = match skip {
        None => engine.forward(
            ForwardRequest::new(input()?)
                .session(session, record.start)
                .last_logits_only(),
        )?,
        Some(skipped) => {
            // Two passes around the skipped layer (its KV stays unwritten).
            let first = engine.forward(
                ForwardRequest::new(input()?)
                    .session(session, record.start)
                    .layers(layers.start..skipped),
            )?;
            engine.forward(
                ForwardRequest::new(first.into_next_input()?)
                    .session(session, record.start)
                    .layers(skipped + 1..layers.end)
                    .last_logits_only(),
            )?
        }
    };
    let (values, _) = out.to_f32_vec()?;
    Ok(values)
}

fn reference(model: &str, mode: ComputeMode, path: &str) -> Result<(), Fail> {
    let engines = engines(model, mode)?;
    let tokenizer = neuroshard_core::Tokenizer::for_model(engines[0].weight_file())?;
    let mut context = tokenizer.encode(PROMPT)?;
    let mut records = Vec::new();
    let mut start = 0;
    for e in &engines {
        e.open_session(1)?;
    }
    for step in 0..=DECODE {
        let tokens: Vec<u32> = context[start..].to_vec();
        let mut input = ShardInput::tokens_from_slice(&tokens, 1, tokens.len())?;
        for (range, e) in engines.iter().enumerate() {
            let (in_values, _) = match &input {
                ShardInput::Hidden(t) => (t.flatten_all()?.to_vec1::<f32>()?, ()),
                ShardInput::Tokens(_) => (Vec::new(), ()),
            };
            let out = e.forward(
                ForwardRequest::new(input)
                    .session(1, start)
                    .last_logits_only(),
            )?;
            let (values, shape) = out.to_f32_vec()?;
            records.push(Record {
                range,
                step,
                start,
                tokens: if range == 0 {
                    tokens.clone()
                } else {
                    Vec::new()
                },
                input: in_values,
                output: values.clone(),
                width: *shape.last().unwrap_or(&1),
            });
            input = match out {
                ShardOutput::Hidden(_) => out.into_next_input()?,
                ShardOutput::Logits(_) => {
                    let next = values
                        .iter()
                        .enumerate()
                        .max_by(|a, b| a.1.total_cmp(b.1))
                        .map(|(i, _)| i as u32)
                        .unwrap_or(0);
                    start = context.len();
                    context.push(next);
                    break;
                }
            };
        }
    }
    std::fs::write(path, postcard::to_allocvec(&records)?)?;
    eprintln!(
        "reference: {} records, text: {:?}",
        records.len(),
        tokenizer.decode(&context[context.len() - DECODE - 1..])?
    );
    Ok(())
}

fn f16_rounded(values: &[f32]) -> Vec<f32> {
    values
        .iter()
        .map(|v| half::f16::from_f32(*v).to_f32())
        .collect()
}

#[derive(Serialize)]
struct Worst {
    range: usize,
    kind: String,
    rel_l2: f32,
    max_abs: f32,
}

fn worse(a: Distance, b: Distance) -> Distance {
    Distance {
        rel_l2: a.rel_l2.max(b.rel_l2),
        max_abs: a.max_abs.max(b.max_abs),
    }
}

/// The mildest over steps (for attacks: the one closest to passing).
fn milder(a: Distance, b: Distance) -> Distance {
    if b.rel_l2 < a.rel_l2 {
        b
    } else {
        a
    }
}

fn against(model: &str, mode: ComputeMode, path: &str, out: &str) -> Result<(), Fail> {
    let records: Vec<Record> = postcard::from_bytes(&std::fs::read(path)?)?;
    let engines = engines(model, mode)?;
    for e in &engines {
        e.open_session(1)?;
        e.open_session(2)?;
    }
    let zero = Distance {
        rel_l2: 0.0,
        max_abs: 0.0,
    };
    let mut honest = [(zero, zero); 3];
    let kinds = ["noise", "scale", "zeros", "stale", "skip-layer"];
    let mut attacks = vec![vec![Distance::INFINITE; kinds.len()]; 3];
    let mut noise = Gaussian::new(7);
    let mut previous: Vec<Option<Vec<f32>>> = vec![None; 3];
    for rec in &records {
        let engine = &engines[rec.range];
        let reference = VoteOutput::from_f32(rec.output.clone(), rec.width);
        let mine = run_range(engine, rec, 1, None)?;
        let d32 = distance(&reference, &VoteOutput::from_f32(mine.clone(), rec.width));
        let d16 = distance(
            &reference,
            &VoteOutput::from_f32(f16_rounded(&mine), rec.width),
        );
        let (w32, w16) = honest[rec.range];
        honest[rec.range] = (worse(w32, d32), worse(w16, d16));
        // Attacks on the reference output, measured against it.
        let mut lies: Vec<Vec<f32>> = Vec::new();
        let mut v = rec.output.clone();
        adversary::add_noise(&mut v, rec.width, 0.01, &mut noise);
        lies.push(v);
        let mut v = rec.output.clone();
        adversary::scale(&mut v, 1.02);
        lies.push(v);
        let mut v = rec.output.clone();
        adversary::zero_smallest_half(&mut v, rec.width);
        lies.push(v);
        let mut v = rec.output.clone();
        adversary::stale(&mut v, rec.width, previous[rec.range].as_deref());
        lies.push(v);
        let layers = engine.layers();
        lies.push(run_range(
            engine,
            rec,
            2,
            Some(layers.start + layers.len() / 2),
        )?);
        previous[rec.range] = rec.output.chunks(rec.width).last().map(|r| r.to_vec());
        for (k, lie) in lies.into_iter().enumerate() {
            let d = distance(&reference, &VoteOutput::from_f32(lie, rec.width));
            // Stale at the very first decode-free step of one position equals honest: skip
            // the first record of each range for it (no previous output exists).
            if kinds[k] == "stale" && rec.step == 0 && rec.output.len() == rec.width {
                continue;
            }
            attacks[rec.range][k] = milder(attacks[rec.range][k], d);
        }
    }
    // Detection rate against attack magnitude under the default tolerance: the share of
    // (range, step) outputs that a vote would reject.
    let comparison = neuroshard_core::consensus::Comparison::default();
    let mut curve = Vec::new();
    for fraction in [0.0005f32, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.01] {
        let rejected = records
            .iter()
            .filter(|rec| {
                let mut v = rec.output.clone();
                adversary::add_noise(&mut v, rec.width, fraction, &mut noise);
                !comparison.agrees(
                    &VoteOutput::from_f32(rec.output.clone(), rec.width),
                    &VoteOutput::from_f32(v, rec.width),
                )
            })
            .count();
        curve.push(serde_json::json!({"attack": "noise", "magnitude": fraction,
            "detection_rate": rejected as f64 / records.len() as f64}));
    }
    for factor in [1.0005f32, 1.001, 1.0015, 1.002, 1.003, 1.005, 1.02] {
        let rejected = records
            .iter()
            .filter(|rec| {
                let mut v = rec.output.clone();
                adversary::scale(&mut v, factor);
                !comparison.agrees(
                    &VoteOutput::from_f32(rec.output.clone(), rec.width),
                    &VoteOutput::from_f32(v, rec.width),
                )
            })
            .count();
        curve.push(serde_json::json!({"attack": "scale", "magnitude": factor,
            "detection_rate": rejected as f64 / records.len() as f64}));
    }
    let mut rows = Vec::new();
    for range in 0..3 {
        let (w32, w16) = honest[range];
        rows.push(Worst {
            range,
            kind: "honest_f32_frames".into(),
            rel_l2: w32.rel_l2,
            max_abs: w32.max_abs,
        });
        rows.push(Worst {
            range,
            kind: "honest_f16_frames".into(),
            rel_l2: w16.rel_l2,
            max_abs: w16.max_abs,
        });
        for (k, name) in kinds.iter().enumerate() {
            let d = attacks[range][k];
            rows.push(Worst {
                range,
                kind: format!("attack_{name}"),
                rel_l2: d.rel_l2,
                max_abs: d.max_abs,
            });
        }
    }
    for r in &rows {
        eprintln!(
            "range {} {:22} rel_l2 {:.3e} max_abs {:.3e}",
            r.range, r.kind, r.rel_l2, r.max_abs
        );
    }
    let config = serde_json::json!({
        "mode": format!("{mode:?}").to_lowercase(),
        "kernel_path": KernelPath::detect().name(),
        "threads": neuroshard_core::runtime::threads(),
        "rows": rows,
        "detection_curve": curve,
        "vote_cost": vote_cost(&engines, &records)?,
    });
    std::fs::write(out, serde_json::to_vec_pretty(&config)?)?;
    Ok(())
}

/// The median of `runs` timings of `f`, in milliseconds.
fn median_ms(runs: usize, mut f: impl FnMut() -> Result<(), Fail>) -> Result<f64, Fail> {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = std::time::Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// What a k = 3 vote costs a receiver against the step it guards, per range, on one decode
/// position: the range's compute, the receiver's `Consensus::vote` over 3 signed ballots
/// (receipt checks, hashing, pairwise distances, reputation), and one replica's signing.
fn vote_cost(engines: &[ShardEngine], records: &[Record]) -> Result<serde_json::Value, Fail> {
    use neuroshard_core::consensus::{
        Consensus, FrameDtype, InputContext, ReceiptChain, SignedBallot, Work,
    };
    let mut out = Vec::new();
    for (range, engine) in engines.iter().enumerate() {
        let Some(rec) = records
            .iter()
            .rev()
            .find(|r| r.range == range && r.output.len() == r.width)
        else {
            continue;
        };
        let compute = median_ms(21, || {
            run_range(engine, rec, 1, None)?;
            Ok(())
        })?;
        let bytes: Vec<u8> = rec.output.iter().flat_map(|v| v.to_le_bytes()).collect();
        let input = InputContext {
            session: 1,
            position: rec.start as u64,
            count: 1,
            prefix: [0; 32],
            weight: [0; 32],
            codec: 0,
            build_id: neuroshard_core::VERSION.into(),
            kernel_path: KernelPath::detect().name().into(),
            frame: [0; 32],
        };
        let keys: Vec<neuroshard_core::SecretKey> = (1..=3u8)
            .map(|i| neuroshard_core::SecretKey::from_bytes(&[i; 32]))
            .collect();
        let expected: Vec<_> = keys.iter().map(|k| k.public()).collect();
        let now = neuroshard_core::net::now_ms();
        let mut chains: Vec<ReceiptChain> = keys
            .iter()
            .map(|k| ReceiptChain::new(k.clone(), [0; 32]))
            .collect();
        let mut ballots = || -> Vec<SignedBallot> {
            let output = *blake3::hash(&bytes).as_bytes();
            chains
                .iter_mut()
                .map(|chain| {
                    let work = Work {
                        session: 1,
                        position: rec.start as u64,
                        count: 1,
                        input: input.hash(),
                        output,
                        weight: [0; 32],
                    };
                    let receipt = chain.issue(&work, now);
                    SignedBallot {
                        from: receipt.verify().map(|r| r.node).unwrap_or(expected[0]),
                        dtype: FrameDtype::F32,
                        width: rec.width,
                        bytes: bytes.clone(),
                        input: input.clone(),
                        receipt,
                        frame: None,
                        upstream: None,
                    }
                })
                .collect()
        };
        let sign = median_ms(21, || {
            ballots();
            Ok(())
        })? / 3.0;
        let sets: Vec<Vec<SignedBallot>> = (0..21).map(|_| ballots()).collect();
        let mut sets = sets.into_iter();
        let vote = median_ms(21, || {
            let mut consensus = Consensus::default();
            let verdict = consensus.vote(&expected, sets.next().unwrap_or_default(), now);
            if verdict.accepted.is_none() {
                return Err("the cost vote found no majority".into());
            }
            Ok(())
        })?;
        eprintln!(
            "range {range}: compute {compute:.3} ms, vote {vote:.3} ms ({:.1}%), sign {sign:.3} ms",
            100.0 * vote / compute
        );
        out.push(serde_json::json!({"range": range, "width": rec.width,
            "compute_ms": compute, "vote_ms": vote, "sign_ms": sign,
            "vote_over_step": vote / compute}));
    }
    // One decode step runs every range once and one vote per range on its path: the share of
    // the whole step the votes cost.
    let sum = |key: &str| out.iter().filter_map(|r| r[key].as_f64()).sum::<f64>();
    let total = sum("vote_ms") / sum("compute_ms");
    eprintln!(
        "votes of one decode step: {:.1}% of its compute",
        100.0 * total
    );
    Ok(serde_json::json!({"per_range": out, "votes_over_decode_step": total}))
}

fn main() -> Result<(), Fail> {
    init(&RuntimeConfig::default());
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(model), Some(path)) = (args.first(), args.get(1)) else {
        return Err(
            "usage: trust_calibration MODEL REF.bin [--against OUT.json] [--mode M]".into(),
        );
    };
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let mode: ComputeMode = flag("--mode")
        .unwrap_or_else(|| "exact".into())
        .parse()
        .map_err(|e: String| e)?;
    match flag("--against") {
        None => reference(model, mode, path),
        Some(out) => against(model, mode, path, &out),
    }
}
