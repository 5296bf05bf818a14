//! Helpers shared by the integration tests: fixture paths, shard chains, comparisons.
#![allow(dead_code, unreachable_pub, missing_docs)]

use candle_core::{DType, Device, Tensor};
use neuroshard_core::{EngineOptions, ForwardRequest, ShardEngine, ShardInput, ShardOutput};
use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;

/// `../shared/fixtures` beside the repository (override with NEUROSHARD_FIXTURES).
pub fn fixtures() -> PathBuf {
    if let Ok(dir) = std::env::var("NEUROSHARD_FIXTURES") {
        return PathBuf::from(dir);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures")
}

/// The SmolLM2 GGUF in the models cache (scripts/fetch-model puts it there).
pub fn smollm2() -> PathBuf {
    let dir = std::env::var("NEUROSHARD_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models"));
    let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} missing: run scripts/fetch-model (scripts/test.sh does)",
        path.display()
    );
    path
}

pub fn reference_json(model: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join(model).join("reference.json"))
        .expect("reference.json");
    serde_json::from_str(&text).expect("json")
}

pub fn reference_tensors(model: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join(model).join("reference.safetensors"),
        &Device::Cpu,
    )
    .expect("reference.safetensors")
}

pub fn ids_from_json(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// Cuts `layers` at `cuts` into consecutive ranges: `split(4, &[1, 3])` = 0..1, 1..3, 3..4.
pub fn ranges(layers: usize, cuts: &[usize]) -> Vec<Range<usize>> {
    let mut bounds = vec![0];
    bounds.extend_from_slice(cuts);
    bounds.push(layers);
    bounds.windows(2).map(|w| w[0]..w[1]).collect()
}

pub fn load_chain(
    path: &std::path::Path,
    layers: usize,
    cuts: &[usize],
    options: &EngineOptions,
) -> Vec<ShardEngine> {
    ranges(layers, cuts)
        .into_iter()
        .map(|r| ShardEngine::load(path, r, options.clone()).expect("load shard"))
        .collect()
}

/// Runs `req_for(input)` through every shard in order and returns the last output.
pub fn run_chain(
    chain: &[ShardEngine],
    ids: &Tensor,
    f: impl Fn(ForwardRequest) -> ForwardRequest,
) -> Tensor {
    let mut input = ShardInput::Tokens(ids.clone());
    let mut out = None;
    for shard in chain {
        let o = shard
            .forward(f(ForwardRequest::new(input.clone())))
            .expect("forward");
        out = Some(o.clone());
        if let ShardOutput::Hidden(h) = o {
            input = ShardInput::Hidden(h);
        }
    }
    out.expect("non-empty chain").tensor().clone()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).expect("f32") - b.to_dtype(DType::F32).expect("f32"))
        .expect("sub")
        .abs()
        .expect("abs")
        .flatten_all()
        .expect("flat")
        .max(0)
        .expect("max")
        .to_scalar::<f32>()
        .expect("scalar")
}

pub fn rel_error(g: &Tensor, reference: &Tensor) -> f32 {
    let diff = (g - reference)
        .expect("sub")
        .sqr()
        .expect("sqr")
        .sum_all()
        .expect("sum");
    let norm = reference.sqr().expect("sqr").sum_all().expect("sum");
    (diff.to_scalar::<f32>().expect("s") / norm.to_scalar::<f32>().expect("s").max(1e-30)).sqrt()
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy decoding with a KV cache session on every shard.
pub fn greedy_chain(chain: &[ShardEngine], prompt: &[u32], n: usize, session: u64) -> Vec<u32> {
    for s in chain {
        s.open_session(session).expect("open");
    }
    let mut out = Vec::new();
    let mut tokens = prompt.to_vec();
    let mut pos = 0;
    for _ in 0..n {
        let ids = Tensor::from_slice(&tokens, (1, tokens.len()), &Device::Cpu).expect("ids");
        let logits = run_chain(chain, &ids, |r| r.session(session, pos).last_logits_only());
        let last: Vec<f32> = logits.flatten_all().expect("flat").to_vec1().expect("vec");
        let next = argmax(&last);
        pos += tokens.len();
        out.push(next);
        tokens = vec![next];
    }
    for s in chain {
        s.close_session(session).expect("close");
    }
    out
}

/// The SmolLM2 reference prompt and its greedy continuation, as token ids.
pub fn smollm2_prompt_and_greedy() -> (Vec<u32>, Vec<u32>) {
    let reference = reference_json("smollm2");
    (
        ids_from_json(&reference["input_ids"]),
        ids_from_json(&reference["greedy_ids"]),
    )
}

/// A client with a fresh key on the default (offline, loopback) endpoint.
pub async fn new_client() -> neuroshard_core::Client {
    neuroshard_core::Client::new(
        iroh::SecretKey::generate(),
        neuroshard_core::net::endpoint::EndpointOptions::default(),
    )
    .await
    .expect("client")
}

/// An in-process SmolLM2 swarm: `slices` even slices, `replicas` nodes each (exact mode).
pub async fn smollm2_swarm(slices: usize, replicas: usize) -> neuroshard_core::LocalSwarm {
    neuroshard_core::LocalSwarm::start(
        &smollm2(),
        slices,
        replicas,
        EngineOptions::default(),
        &mut |_| {},
    )
    .await
    .expect("swarm")
}

/// Eight different prompts for concurrent-session tests.
pub const EIGHT_PROMPTS: [&str; 8] = [
    "The future of AI is",
    "Once upon a time",
    "The capital of France is",
    "def fibonacci(n):",
    "My favourite food is",
    "In 1969, astronauts",
    "The best way to learn a language is",
    "Water boils at",
];

/// Deterministic pseudo-random values in [-scale, scale) (an LCG: the same numbers everywhere).
pub fn pseudo_random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale
        })
        .collect()
}

/// The AdamW settings the fixture's reference step used.
pub fn reference_adamw(model: &str) -> neuroshard_core::AdamWConfig {
    let reference = reference_json(model);
    let adamw = &reference["adamw"];
    let betas = adamw["betas"].as_array().expect("betas");
    neuroshard_core::AdamWConfig {
        lr: adamw["lr"].as_f64().expect("lr"),
        beta1: betas[0].as_f64().expect("b1"),
        beta2: betas[1].as_f64().expect("b2"),
        eps: adamw["eps"].as_f64().expect("eps"),
        weight_decay: adamw["weight_decay"].as_f64().expect("wd"),
    }
}

/// Asserts that the gradients (`count` of them, looked up by parameter name) are the
/// fixture's `grad.<name>` tensors, each to 1e-3 relative error.
pub fn assert_reference_gradients(
    what: &str,
    tensors: &HashMap<String, Tensor>,
    count: usize,
    grad: impl Fn(&str) -> Option<Tensor>,
) {
    let ref_grads: Vec<_> = tensors.keys().filter(|k| k.starts_with("grad.")).collect();
    assert_eq!(count, ref_grads.len(), "{what}: gradient count");
    for key in ref_grads {
        let name = &key["grad.".len()..];
        let g = grad(name).unwrap_or_else(|| panic!("{what}: no gradient for {name}"));
        let err = rel_error(&g, &tensors[key]);
        assert!(err < 1e-3, "{what}: gradient {name} relative error {err}");
    }
}
