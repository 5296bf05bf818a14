//! Effect of the wire codecs on the real model: SmolLM2 (exact mode) in 3 shards whose hidden
//! states cross every hop as encoded frames. For 4 prompts x 24 greedy steps, compared with f32
//! frames: next-token agreement (teacher-forced on the f32 continuation) and mean KL divergence
//! of the next-token distributions. Teacher-forced agreement of 1.0 means the free-running
//! greedy text is identical.

use crate::common::*;
use candle_core::{Device, Tensor};
use neuroshard_core::wire::{decode_frame, encode_frame, Codec, FrameMeta};
use neuroshard_core::{
    EngineOptions, ForwardRequest, ShardEngine, ShardInput, ShardOutput, Tokenizer,
};

const PROMPTS: [&str; 4] = [
    "The future of AI is",
    "Once upon a time, in a small village by the sea,",
    "To make a good cup of tea, you need",
    "The capital of France is",
];
const STEPS: usize = 24;

/// Runs `feed` (prompt, then one token per step) through the chain with every hidden state
/// sent through a frame of `codec`; returns the next-token log-probabilities after each step.
fn run(
    chain: &[ShardEngine],
    codec: Codec,
    prompt: &[u32],
    forced: Option<&[u32]>,
    session: u64,
) -> (Vec<u32>, Vec<Vec<f32>>) {
    for s in chain {
        s.open_session(session).expect("open");
    }
    let (mut tokens, mut dists) = (Vec::new(), Vec::new());
    let mut feed = prompt.to_vec();
    let mut pos = 0;
    for step in 0..STEPS {
        let ids = Tensor::from_slice(&feed, (1, feed.len()), &Device::Cpu).expect("ids");
        let mut input = ShardInput::Tokens(ids);
        let mut logits = None;
        for shard in chain {
            match shard
                .forward(
                    ForwardRequest::new(input.clone())
                        .session(session, pos)
                        .last_logits_only(),
                )
                .expect("forward")
            {
                ShardOutput::Hidden(h) => {
                    let frame = encode_frame(
                        &h,
                        codec,
                        FrameMeta {
                            session,
                            position: pos as u32,
                        },
                        false,
                    )
                    .expect("encode");
                    let (decoded, _) = decode_frame(&frame, 1 << 26).expect("decode");
                    input = ShardInput::Hidden(decoded.to_tensor().expect("tensor"));
                }
                ShardOutput::Logits(l) => logits = Some(l),
            }
        }
        let logits: Vec<f32> = logits
            .expect("logits")
            .flatten_all()
            .expect("f")
            .to_vec1()
            .expect("v");
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
        dists.push(logits.iter().map(|l| l - lse).collect());
        let next = argmax(&logits);
        tokens.push(next);
        pos += feed.len();
        feed = vec![forced.map_or(next, |f| f[step])];
    }
    for s in chain {
        s.close_session(session).expect("close");
    }
    (tokens, dists)
}

fn kl(p_log: &[f32], q_log: &[f32]) -> f64 {
    p_log
        .iter()
        .zip(q_log)
        .map(|(&p, &q)| (p.exp() as f64) * (p as f64 - q as f64))
        .sum()
}

#[test]
fn codecs_on_smollm2_three_shards() {
    let path = smollm2();
    let options = EngineOptions::default();
    let chain = load_chain(&path, 30, &[10, 20], &options);
    let tokenizer = Tokenizer::for_model(chain[0].weight_file()).expect("tokenizer");
    let mut report = Vec::new();
    let mut results = std::collections::HashMap::new();
    for codec in [Codec::F16, Codec::Q8, Codec::Q4] {
        let (mut same, mut total, mut kl_sum) = (0usize, 0usize, 0f64);
        for (i, prompt) in PROMPTS.iter().enumerate() {
            let ids = tokenizer.encode(prompt).expect("encode");
            let (reference, ref_dists) = run(&chain, Codec::F32, &ids, None, 100 + i as u64);
            let (tokens, dists) = run(&chain, codec, &ids, Some(&reference), 200 + i as u64);
            same += tokens
                .iter()
                .zip(&reference)
                .filter(|(a, b)| a == b)
                .count();
            total += reference.len();
            kl_sum += ref_dists
                .iter()
                .zip(&dists)
                .map(|(p, q)| kl(p, q))
                .sum::<f64>();
        }
        let agreement = same as f64 / total as f64;
        let mean_kl = kl_sum / total as f64;
        report.push(format!(
            "{codec:?}: token agreement {agreement:.4} ({same}/{total}), mean KL {mean_kl:.2e}"
        ));
        results.insert(codec, (agreement, mean_kl));
    }
    eprintln!(
        "codec effect vs f32 frames (SmolLM2 exact, 3 shards, 4 prompts x {STEPS} steps):\n  {}",
        report.join("\n  ")
    );
    let (f16_agree, f16_kl) = results[&Codec::F16];
    assert_eq!(f16_agree, 1.0, "f16 frames must give the f32 tokens");
    assert!(f16_kl < 1e-4, "f16 KL {f16_kl}");
    let (q8_agree, q8_kl) = results[&Codec::Q8];
    assert!(q8_agree >= 0.95, "q8 agreement {q8_agree}");
    assert!(q8_kl < 1e-2, "q8 KL {q8_kl}");
    let (q4_agree, q4_kl) = results[&Codec::Q4];
    assert!(q4_agree >= 0.75, "q4 agreement {q4_agree}");
    assert!(q4_kl < 0.3, "q4 KL {q4_kl}");
}
