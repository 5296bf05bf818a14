//! The real SmolLM2-135M-Instruct (Q4_1 GGUF) against `fixtures/smollm2/reference.json`:
//! top-5 logits after the prompt and 24 greedy tokens, unsplit and split at 10 and 10,20.

mod common;

use candle_core::{Device, Tensor};
use common::*;
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
    let options = EngineOptions {
        mode: ComputeMode::Exact,
        ..EngineOptions::default()
    };
    for cuts in [&[][..], &[10], &[10, 20]] {
        let chain = load_chain(&path, 30, cuts, &options);
        let ids = Tensor::from_slice(&prompt, (1, prompt.len()), &Device::Cpu).expect("ids");
        let logits = run_chain(&chain, &ids, |r| r.last_logits_only());
        let last: Vec<f32> = logits.flatten_all().expect("flat").to_vec1().expect("vec");
        let top = top5(&last);
        for (i, (id, val)) in top.iter().enumerate() {
            assert_eq!(*id, want_ids[i], "split {cuts:?}: top-5 ids {top:?}");
            assert!(
                (val - want_vals[i]).abs() < 1e-3,
                "split {cuts:?}: top-5 {top:?} vs {want_vals:?}"
            );
        }
        assert_eq!(
            greedy_chain(&chain, &prompt, greedy.len(), 1),
            greedy,
            "split {cuts:?}"
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

/// Teacher-forced agreement of fast mode with exact on several prompts: the next-token argmax
/// at every position of prompt + exact greedy continuation.
#[test]
fn smollm2_fast_mode_agrees_with_exact() {
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
        let pipeline = neuroshard_core::LocalPipeline::load(&path, &[], options).expect("load");
        (
            pipeline.tokenizer().expect("tokenizer"),
            ShardEngine::load(
                &path,
                0..30,
                EngineOptions {
                    mode,
                    ..EngineOptions::default()
                },
            )
            .expect("engine"),
        )
    };
    let (tokenizer, exact) = load(ComputeMode::Exact);
    let (_, fast) = load(ComputeMode::Fast);
    let (mut same, mut total) = (0usize, 0usize);
    let mut greedy_equal = 0;
    for prompt in prompts {
        let ids = tokenizer.encode(prompt).expect("encode");
        let continuation = greedy_chain(std::slice::from_ref(&exact), &ids, 24, 3);
        let fast_continuation = greedy_chain(std::slice::from_ref(&fast), &ids, 24, 3);
        greedy_equal += usize::from(continuation == fast_continuation);
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
        let (a, b) = (argmaxes(&exact), argmaxes(&fast));
        same += a.iter().zip(&b).filter(|(x, y)| x == y).count();
        total += a.len();
    }
    let agreement = same as f64 / total as f64;
    eprintln!("fast vs exact: teacher-forced top-1 agreement {agreement:.4} over {total} positions, {greedy_equal}/4 greedy continuations identical");
    assert!(agreement >= 0.97, "fast mode top-1 agreement {agreement}");
}
