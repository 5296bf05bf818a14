//! LoRA adapters on the quantised SmolLM2 base (Q4_1 blocks in exact mode): a fresh adapter
//! changes nothing, the adapter's gradients (and the input gradient a frozen block matrix
//! passes upstream) equal those of the same adapter on the dequantised f32 base, and a few
//! AdamW steps of the adapter alone lower a text's loss.

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use neuroshard_core::{
    AdamWConfig, ComputeMode, EngineOptions, Error, ForwardRequest, LoraConfig, OutputGrad,
    ShardEngine, ShardInput,
};

fn load(layers: std::ops::Range<usize>, mode: ComputeMode) -> ShardEngine {
    ShardEngine::load(
        smollm2(),
        layers,
        EngineOptions {
            mode,
            ..EngineOptions::default()
        },
    )
    .expect("load SmolLM2")
}

fn prompt_ids() -> Vec<u32> {
    smollm2_prompt_and_greedy().0
}

/// The prompt's hidden states after layers `0..end` (the input of a later slice).
fn hidden_after(end: usize, ids: &[u32]) -> Tensor {
    load(0..end, ComputeMode::Exact)
        .forward(ForwardRequest::new(tokens(ids)))
        .expect("the first layers")
        .tensor()
        .clone()
}

fn tokens(ids: &[u32]) -> ShardInput {
    ShardInput::tokens_from_slice(ids, 1, ids.len()).expect("tokens")
}

#[test]
fn a_fresh_adapter_leaves_the_logits_unchanged_and_names_are_checked() {
    let engine = load(26..30, ComputeMode::Exact);
    let ids = prompt_ids();
    let hidden = hidden_after(26, &ids);
    let base = engine
        .forward(ForwardRequest::new(ShardInput::Hidden(hidden.clone())))
        .expect("base");
    let adapter = engine
        .create_adapter("fresh", LoraConfig::default())
        .expect("adapter");
    // q_proj and v_proj of 4 layers, A and B each.
    assert_eq!(adapter.tensors().len(), 16);
    let with = engine
        .forward(ForwardRequest::new(ShardInput::Hidden(hidden.clone())).adapter("fresh"))
        .expect("with the adapter");
    assert_eq!(max_abs_diff(base.tensor(), with.tensor()), 0.0);
    // An unknown adapter is an error, never the base weights; names are unique.
    let err = engine
        .forward(ForwardRequest::new(ShardInput::Hidden(hidden)).adapter("other"))
        .unwrap_err();
    assert!(matches!(err, Error::BadInput(_)), "{err}");
    assert!(engine
        .create_adapter("fresh", LoraConfig::default())
        .is_err());
    let bad = LoraConfig {
        rank: 0,
        ..LoraConfig::default()
    };
    assert!(engine.create_adapter("zero", bad).is_err());
    let nowhere = LoraConfig {
        targets: vec!["no_such_proj".into()],
        ..LoraConfig::default()
    };
    assert!(engine.create_adapter("nowhere", nowhere).is_err());
    assert_eq!(engine.adapter_names(), vec!["fresh".to_string()]);
}

#[test]
fn adapter_gradients_on_the_quantised_base_equal_those_on_the_f32_base() {
    let ids = prompt_ids();
    let hidden = hidden_after(12, &ids);
    let config = LoraConfig {
        rank: 4,
        targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        ..LoraConfig::default()
    };
    let mut results = Vec::new();
    for mode in [ComputeMode::Exact, ComputeMode::F32] {
        let engine = load(12..14, mode);
        let adapter = engine.create_adapter("t", config.clone()).expect("adapter");
        // The same non-zero B on both, so that A gets a gradient too.
        for (i, (name, t)) in adapter.tensors().into_iter().enumerate() {
            if name.contains("lora_B") {
                let v = Tensor::from_vec(
                    pseudo_random(t.elem_count(), i as u64, 0.05),
                    t.shape(),
                    &Device::Cpu,
                )
                .expect("b");
                adapter.set_tensor(&name, &v).expect("set B");
            }
        }
        let out = engine
            .train_forward_adapter(1, ShardInput::Hidden(hidden.clone()), "t")
            .expect("train forward");
        let g = Tensor::from_vec(
            pseudo_random(out.tensor().elem_count(), 77, 1.0),
            out.tensor().shape(),
            &Device::Cpu,
        )
        .expect("g");
        let back = engine.backward(1, OutputGrad::Output(g)).expect("backward");
        let grads = engine.gradients().expect("gradients");
        assert_eq!(grads.len(), 12, "A and B of 3 matrices in 2 layers");
        results.push((back.grad_input.expect("input gradient"), grads));
    }
    let (quant, dense) = (&results[0], &results[1]);
    let r = rel_error(&quant.0, &dense.0);
    eprintln!("input gradient: relative error {r:.2e}");
    assert!(
        r <= 1e-3,
        "input gradient through the blocks: relative error {r}"
    );
    for ((name, gq), (name_f, gf)) in quant.1.iter().zip(&dense.1) {
        assert_eq!(name, name_f);
        let r = rel_error(gq, gf);
        eprintln!("{name}: relative error {r:.2e}");
        assert!(r <= 1e-3, "{name}: relative error {r}");
        assert!(
            gq.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0,
            "{name}"
        );
    }
}

#[test]
fn a_few_adapter_steps_lower_the_loss_and_leave_the_base_alone() {
    let ids = prompt_ids();
    let hidden = hidden_after(26, &ids);
    let engine = load(26..30, ComputeMode::Exact);
    engine
        .create_adapter("learn", LoraConfig::default())
        .expect("adapter");
    let base_before = engine
        .forward(ForwardRequest::new(ShardInput::Hidden(hidden.clone())))
        .expect("base")
        .tensor()
        .clone();
    let labels = Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu).expect("labels");
    let cfg = AdamWConfig {
        lr: 1e-2,
        ..AdamWConfig::default()
    };
    let mut losses = Vec::new();
    for step in 0..5 {
        engine
            .train_forward_adapter(step, ShardInput::Hidden(hidden.clone()), "learn")
            .expect("train forward");
        let out = engine
            .backward(step, OutputGrad::CausalLmLabels(labels.clone()))
            .expect("backward");
        losses.push(out.loss.expect("loss on the last shard"));
        engine.step(&cfg).expect("step");
    }
    eprintln!("adapter training losses: {losses:?}");
    assert!(
        losses[4] < 0.9 * losses[0],
        "the adapter learns the text: losses {losses:?}"
    );
    assert_eq!(engine.adapter("learn").expect("adapter").steps(), 5);
    // The base weights serve on unchanged, and the engine's weight version did not move.
    let base_after = engine
        .forward(ForwardRequest::new(ShardInput::Hidden(hidden.clone())))
        .expect("base")
        .tensor()
        .clone();
    assert_eq!(max_abs_diff(&base_before, &base_after), 0.0);
    assert_eq!(engine.version().updates, 0);
    // A session runs the adapter too (the KV-cache path, prefill chunks included), and a
    // pinned version keeps its bits after a newer one is committed.
    let stateless = engine
        .forward(ForwardRequest::new(ShardInput::Hidden(hidden.clone())).adapter("learn"))
        .expect("adapter forward")
        .tensor()
        .clone();
    assert!(
        max_abs_diff(&stateless, &base_after) > 1e-3,
        "the adapter changes the logits"
    );
    let pinned = engine.adapter("learn").expect("adapter");
    engine.open_session(77).expect("session");
    let cached = engine
        .forward(
            ForwardRequest::new(ShardInput::Hidden(hidden.clone()))
                .session(77, 0)
                .pinned_adapter(pinned.clone()),
        )
        .expect("session forward")
        .tensor()
        .clone();
    assert!(
        max_abs_diff(&cached, &stateless) < 1e-4,
        "the session path runs the adapter"
    );
    engine
        .train_forward_adapter(99, ShardInput::Hidden(hidden.clone()), "learn")
        .expect("train forward");
    engine
        .backward(99, OutputGrad::CausalLmLabels(labels.clone()))
        .expect("backward");
    engine.step(&cfg).expect("step");
    let old_version = engine
        .forward(ForwardRequest::new(ShardInput::Hidden(hidden.clone())).pinned_adapter(pinned))
        .expect("pinned forward")
        .tensor()
        .clone();
    assert_eq!(
        max_abs_diff(&old_version, &stateless),
        0.0,
        "the pinned version held"
    );
    // Training the slice's own (quantised) weights still needs f32.
    let err = engine
        .train_forward(
            9,
            ShardInput::Hidden(Tensor::zeros((1, 2, 576), DType::F32, &Device::Cpu).unwrap()),
        )
        .unwrap_err();
    assert!(err.to_string().contains("LoRA adapter"), "{err}");
}

#[test]
fn an_adapter_checkpoint_restores_its_version_and_training_goes_on_identically() {
    let ids = prompt_ids();
    let hidden = hidden_after(28, &ids);
    let labels = Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu).expect("labels");
    let cfg = AdamWConfig {
        lr: 1e-2,
        ..AdamWConfig::default()
    };
    let train = |engine: &ShardEngine, step: u64| {
        engine
            .train_forward_adapter(step, ShardInput::Hidden(hidden.clone()), "ckpt")
            .expect("train forward");
        engine
            .backward(step, OutputGrad::CausalLmLabels(labels.clone()))
            .expect("backward");
        engine.step(&cfg).expect("step");
    };
    let dir = std::env::temp_dir().join(format!("neuroshard-lora-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let first = load(28..30, ComputeMode::Exact);
    first
        .create_adapter("ckpt", LoraConfig::default())
        .expect("adapter");
    let fresh = first.adapter_version("ckpt").expect("version");
    train(&first, 0);
    train(&first, 1);
    let saved = first.save_adapter("ckpt", &dir).expect("save");
    assert_eq!(saved.steps, 2);
    assert_ne!(saved.state, fresh.state, "training changed the state");
    // A restarted node: the same version, the same outputs, and the next step (optimizer
    // moments included) gives the same factors, bit for bit.
    let second = load(28..30, ComputeMode::Exact);
    assert_eq!(second.load_adapter("ckpt", &dir).expect("load"), saved);
    let out = |engine: &ShardEngine| {
        engine
            .forward(ForwardRequest::new(ShardInput::Hidden(hidden.clone())).adapter("ckpt"))
            .expect("forward")
            .tensor()
            .clone()
    };
    assert_eq!(max_abs_diff(&out(&first), &out(&second)), 0.0);
    train(&first, 2);
    train(&second, 2);
    assert_eq!(
        first.adapter_version("ckpt").expect("v"),
        second.adapter_version("ckpt").expect("v")
    );
    // Another slice, or altered tensors, are refused.
    let other = load(26..28, ComputeMode::Exact);
    let err = other.load_adapter("ckpt", &dir).unwrap_err();
    assert!(err.to_string().contains("saved for layers"), "{err}");
    let tensors_path = dir.join(format!("ckpt.lora.{}.safetensors", saved.steps));
    let mut tensors = candle_core::safetensors::load(&tensors_path, &Device::Cpu).expect("read");
    let name = tensors
        .keys()
        .find(|n| n.contains("lora_A"))
        .cloned()
        .expect("an A");
    let altered = (tensors[&name].clone() * 1.001).expect("scale");
    tensors.insert(name, altered);
    candle_core::safetensors::save(&tensors, &tensors_path).expect("write");
    let err = load(28..30, ComputeMode::Exact)
        .load_adapter("ckpt", &dir)
        .unwrap_err();
    assert!(err.to_string().contains("do not hash"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The input gradient through blocks on a real model's matrices: every matrix of the
/// tiny-llama fixture quantised to Q4_0, Q4_1 and Q8_0 gives `dy W` over its blocks equal to
/// the product on its dequantised copy (1e-5 relative).
#[cfg(feature = "internals")]
#[test]
fn the_transposed_product_over_blocks_holds_on_a_fixture_models_matrices() {
    use candle_core::quantized::{GgmlDType, QTensor};
    use neuroshard_core::internals::QuantMatrix;
    let path = fixtures().join("tiny-llama").join("model.safetensors");
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).expect("fixture");
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut checked = 0;
    for name in names {
        let w = tensors[name].to_dtype(DType::F32).expect("f32");
        let &[rows, cols] = w.dims() else { continue };
        if cols % 32 != 0 {
            continue;
        }
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&w, dtype).expect("quantize");
            let dense = q.dequantize(&Device::Cpu).expect("dequantize");
            let qm = QuantMatrix::from_qtensor(&q)
                .expect("ok")
                .expect("a block format");
            let m = 3;
            let dy = pseudo_random(m * rows, rows as u64, 1.0);
            let got = qm.matmul_transposed(&dy, m).expect("transposed product");
            let got = Tensor::from_vec(got, (m, cols), &Device::Cpu).expect("got");
            let want = Tensor::from_vec(dy, (m, rows), &Device::Cpu)
                .expect("dy")
                .matmul(&dense)
                .expect("dense product");
            let r = rel_error(&got, &want);
            assert!(r <= 1e-5, "{name} as {dtype:?}: relative error {r}");
            checked += 1;
        }
    }
    assert!(checked >= 3 * 9, "{checked} matrix-format pairs checked");
}
