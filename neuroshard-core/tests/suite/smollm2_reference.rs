//! The real SmolLM2-135M-Instruct (Q4_1 GGUF) against `fixtures/smollm2/reference.json`:
//! top-5 logits after the prompt and 24 greedy tokens, unsplit and split at 10 and 10,20, in
//! the default exact mode (Q4_1 blocks x f32 activations) and the f32 reference mode.

use crate::common::*;
use candle_core::{Device, Tensor};
use neuroshard_core::{ComputeMode, EngineOptions};

fn top5(logits: &[f32]) -> Vec<(u32, f32)> {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    idx.into_iter()
        .take(5)
        .map(|i| (i as u32, logits[i]))
        .collect()
}

#[test]
fn smollm2_exact_reproduces_reference_for_every_split() {
    let path = smollm2();
    let reference = reference_json("smollm2");
    let prompt = ids_from_json(&reference["input_ids"]);
    let want_ids = ids_from_json(&reference["last_logits_top5_ids"]);
    let want_vals: Vec<f32> = reference["last_logits_top5_values"]
        .as_array()
        .expect("values")
        .iter()
        .map(|v| v.as_f64().expect("f") as f32)
        .collect();
    let greedy = ids_from_json(&reference["greedy_ids"]);
    for (mode, cuts) in [
        (ComputeMode::Exact, &[][..]),
        (ComputeMode::Exact, &[10]),
        (ComputeMode::Exact, &[10, 20]),
        (ComputeMode::F32, &[][..]),
        (ComputeMode::F32, &[10, 20]),
    ] {
        let options = EngineOptions {
            mode,
            ..EngineOptions::default()
        };
        let chain = load_chain(&path, 30, cuts, &options);
        let ids = Tensor::from_slice(&prompt, (1, prompt.len()), &Device::Cpu).expect("ids");
        let logits = run_chain(&chain, &ids, |r| r.last_logits_only());
        let last: Vec<f32> = logits.flatten_all().expect("flat").to_vec1().expect("vec");
        let top = top5(&last);
        for (i, (id, val)) in top.iter().enumerate() {
            assert_eq!(
                *id, want_ids[i],
                "{mode:?} split {cuts:?}: top-5 ids {top:?}"
            );
            assert!(
                (val - want_vals[i]).abs() < 1e-3,
                "{mode:?} split {cuts:?}: top-5 {top:?} vs {want_vals:?}"
            );
        }
        assert_eq!(
            greedy_chain(&chain, &prompt, greedy.len(), 1),
            greedy,
            "{mode:?} split {cuts:?}"
        );
        for shard in &chain {
            assert!(
                shard.stats().layer_positions > 0,
                "shard {:?} never ran",
                shard.layers()
            );
        }
    }
}

/// Teacher-forced agreement of the kernel modes (exact, fast) with the f32 reference mode on
/// several prompts: the next-token argmax at every position of prompt + greedy continuation.
#[test]
fn smollm2_kernel_modes_agree_with_f32() {
    use neuroshard_core::{ForwardRequest, ShardEngine, ShardInput};
    let path = smollm2();
    let prompts = [
        "The future of AI is",
        "Once upon a time, in a small village by the sea,",
        "def fibonacci(n):",
        "The capital of France is",
    ];
    let load = |mode| {
        let options = EngineOptions {
            mode,
            ..EngineOptions::default()
        };
        ShardEngine::load(&path, 0..30, options).expect("engine")
    };
    let tokenizer = neuroshard_core::LocalPipeline::load(&path, &[], EngineOptions::default())
        .expect("load")
        .tokenizer()
        .expect("tokenizer");
    let reference = load(ComputeMode::F32);
    for (mode, min_agreement) in [(ComputeMode::Exact, 0.99), (ComputeMode::Fast, 0.97)] {
        let engine = load(mode);
        let (mut same, mut total) = (0usize, 0usize);
        let mut greedy_equal = 0;
        for prompt in prompts {
            let ids = tokenizer.encode(prompt).expect("encode");
            let continuation = greedy_chain(std::slice::from_ref(&reference), &ids, 24, 3);
            let other = greedy_chain(std::slice::from_ref(&engine), &ids, 24, 3);
            greedy_equal += usize::from(continuation == other);
            let mut all = ids.clone();
            all.extend(&continuation);
            let t = Tensor::from_slice(&all, (1, all.len()), &Device::Cpu).expect("ids");
            let argmaxes = |e: &ShardEngine| -> Vec<u32> {
                let out = e
                    .forward(ForwardRequest::new(ShardInput::Tokens(t.clone())))
                    .expect("forward");
                let logits = out.tensor().squeeze(0).expect("squeeze");
                logits.argmax(1).expect("argmax").to_vec1().expect("vec")
            };
            let (a, b) = (argmaxes(&reference), argmaxes(&engine));
            same += a.iter().zip(&b).filter(|(x, y)| x == y).count();
            total += a.len();
        }
        let agreement = same as f64 / total as f64;
        eprintln!(
            "{mode:?} vs f32: teacher-forced top-1 agreement {agreement:.4} over {total} \
             positions, {greedy_equal}/4 greedy continuations identical"
        );
        assert!(
            agreement >= min_agreement,
            "{mode:?} top-1 agreement {agreement}"
        );
    }
}

/// The per-token path (KV-cached steps of a few positions on plain buffers) computes what the
/// tensor path computes: a 5-token prompt and three single-token steps through a session on a
/// split chain, against the same positions recomputed from scratch without a cache (the tensor
/// path), logits for every position.
#[test]
fn smollm2_per_token_path_equals_tensor_path() {
    let path = smollm2();
    let (prompt, greedy) = smollm2_prompt_and_greedy();
    let chain = load_chain(&path, 30, &[12], &EngineOptions::default());
    for s in &chain {
        s.open_session(7).expect("open");
    }
    let mut tokens: Vec<u32> = prompt[..5].to_vec();
    let mut pos = 0;
    let mut step = tokens.clone();
    for next in greedy.iter().take(4) {
        let ids = Tensor::from_slice(&step, (1, step.len()), &Device::Cpu).expect("ids");
        let cached = run_chain(&chain, &ids, |r| r.session(7, pos));
        let all = Tensor::from_slice(&tokens, (1, tokens.len()), &Device::Cpu).expect("ids");
        let fresh = run_chain(&chain, &all, |r| r);
        let fresh = fresh
            .narrow(1, pos, step.len())
            .expect("narrow")
            .contiguous()
            .expect("contiguous");
        let diff = max_abs_diff(&cached, &fresh);
        assert!(diff < 2e-3, "position {pos}: max |Δlogit| {diff}");
        pos += step.len();
        step = vec![*next];
        tokens.push(*next);
    }
}
