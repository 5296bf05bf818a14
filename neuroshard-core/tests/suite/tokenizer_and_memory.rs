//! SmolLM2's tokenizer rebuilt from GGUF metadata, its chat template, and proof that a shard
//! reads and keeps only its slice (loaded bytes and peak RSS of a separate process).

use crate::common::*;
use neuroshard_core::{ChatMessage, Tokenizer, WeightFile};

fn smollm2_tokenizer() -> Tokenizer {
    let file = WeightFile::open(smollm2()).expect("open");
    Tokenizer::for_model(&file).expect("tokenizer")
}

#[test]
fn gguf_tokenizer_matches_reference_ids_and_text() {
    let tok = smollm2_tokenizer();
    let reference = reference_json("smollm2");
    let prompt = reference["prompt"].as_str().expect("prompt");
    assert_eq!(
        tok.encode(prompt).expect("encode"),
        ids_from_json(&reference["input_ids"])
    );
    let text = tok
        .decode(&ids_from_json(&reference["greedy_ids"]))
        .expect("decode");
    assert_eq!(text, reference["greedy_text"].as_str().expect("text"));
    // Digits are split one by one (SmolLM2's pre-tokenizer), so "2024" is four tokens.
    let digits = tok.encode("2024").expect("encode");
    assert_eq!(digits.len(), 4, "{digits:?}");
    assert_eq!(tok.decode(&digits).expect("decode"), "2024");
    assert!(
        tok.eos_token_ids().contains(&2),
        "{:?}",
        tok.eos_token_ids()
    );
}

#[test]
fn chat_template_renders_chatml() {
    let tok = smollm2_tokenizer();
    let text = tok
        .apply_chat_template(&[ChatMessage::new("user", "Hi!")], true)
        .expect("template");
    assert!(text.starts_with("<|im_start|>system\n"), "{text}");
    assert!(
        text.ends_with("<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"),
        "{text}"
    );
    // Special tokens in the rendered text are single ids, not split into pieces.
    let ids = tok.encode(&text).expect("encode");
    let im_start = ids
        .iter()
        .filter(|&&i| tok.id_to_token(i).as_deref() == Some("<|im_start|>"))
        .count();
    assert_eq!(im_start, 3);
}

fn shard_info(start: usize, end: usize) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_neuroshard"))
        .args(["shard-info", "--model"])
        .arg(smollm2())
        .args([
            "--start",
            &start.to_string(),
            "--end",
            &end.to_string(),
            "--threads",
            "1",
        ])
        .output()
        .expect("run neuroshard shard-info");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

#[test]
fn a_middle_shard_reads_and_keeps_only_its_slice() {
    let middle = shard_info(10, 20);
    let full = shard_info(0, 30);
    let bytes = |v: &serde_json::Value| v["stats"]["bytes_loaded"].as_u64().expect("bytes");
    let rss = |v: &serde_json::Value| v["peak_rss_bytes"].as_u64().expect("rss");
    let tensors = middle["stats"]["tensors_loaded"].as_u64().expect("tensors");
    // 10 layers x 9 tensors, no embedding, norm or head.
    assert_eq!(tensors, 90);
    assert_eq!(middle["output_shape"], serde_json::json!([1, 8, 576]));
    eprintln!(
        "10..20: {} bytes read, peak RSS {}; 0..30: {} bytes read, peak RSS {}",
        bytes(&middle),
        rss(&middle),
        bytes(&full),
        rss(&full)
    );
    // A third of the layers and no embedding (the largest tensor): well under half the bytes.
    assert!(bytes(&middle) * 2 < bytes(&full), "loaded bytes");
    assert!(rss(&middle) * 2 < rss(&full), "peak RSS");
}

#[test]
fn tokenizer_json_round_trip_encodes_identically() {
    let tok = smollm2_tokenizer();
    let dir = std::env::temp_dir().join(format!("neuroshard-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("tokenizer.json");
    tok.save_json(&path).expect("save");
    let loaded = Tokenizer::from_file(&path).expect("load tokenizer.json");
    for text in [
        "The future of AI is",
        "Numbers 12345 and  spaces\n\ttabs",
        "<|im_start|>user\nhé ☃<|im_end|>",
    ] {
        assert_eq!(
            loaded.encode(text).expect("enc"),
            tok.encode(text).expect("enc"),
            "{text:?}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn cli_generate_prints_only_the_continuation() {
    let reference = reference_json("smollm2");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_neuroshard"))
        .args(["generate", "--model"])
        .arg(smollm2())
        .args(["--prompt", reference["prompt"].as_str().expect("prompt")])
        .args(["--max-tokens", "24", "--split", "10,20", "--mode", "exact"])
        .output()
        .expect("run neuroshard generate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf8");
    assert_eq!(
        stdout.trim_end_matches('\n'),
        reference["greedy_text"].as_str().expect("text")
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("shards [0..10, 10..20, 20..30]"),
        "{stderr}"
    );

    // Bad input is a clean error with a non-zero exit, not a panic.
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_neuroshard"))
        .args(["generate", "--model", "/nonexistent.gguf", "--prompt", "x"])
        .output()
        .expect("run");
    assert!(!bad.status.success());
    let msg = String::from_utf8_lossy(&bad.stderr);
    // A note about busy cores may come first.
    assert!(
        msg.lines()
            .any(|l| l.starts_with("error: cannot read model file")),
        "{msg}"
    );
    let split = std::process::Command::new(env!("CARGO_BIN_EXE_neuroshard"))
        .args(["generate", "--model"])
        .arg(smollm2())
        .args(["--prompt", "x", "--split", "20,10"])
        .output()
        .expect("run");
    assert!(String::from_utf8_lossy(&split.stderr).contains("layer slice 20..10 is invalid"));
}

#[test]
fn gguf_weights_train_in_f32() {
    use candle_core::{Device, Tensor};
    use neuroshard_core::{
        AdamWConfig, EngineOptions, OutputGrad, ShardEngine, ShardInput, ShardOutput,
    };
    // Two shards of the real Q4_1 model: gradients flow across the cut and one AdamW step on
    // the dequantised f32 weights lowers the loss on the batch.
    let path = smollm2();
    let chain: Vec<ShardEngine> = [0..15, 15..30]
        .into_iter()
        .map(|r| {
            // Training differentiates through f32 weights.
            let options = EngineOptions {
                mode: neuroshard_core::ComputeMode::F32,
                ..EngineOptions::default()
            };
            ShardEngine::load(&path, r, options).expect("load")
        })
        .collect();
    let tok = smollm2_tokenizer();
    let ids = tok
        .encode("The quick brown fox jumps over the lazy dog.")
        .expect("enc");
    let ids = Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu).expect("ids");
    let mut losses = Vec::new();
    for batch in 0..2u64 {
        let hidden = match chain[0]
            .train_forward(batch, ShardInput::Tokens(ids.clone()))
            .expect("fwd")
        {
            ShardOutput::Hidden(h) => h,
            ShardOutput::Logits(_) => panic!("first shard returns hidden states"),
        };
        chain[1]
            .train_forward(batch, ShardInput::Hidden(hidden))
            .expect("fwd");
        let back = chain[1]
            .backward(batch, OutputGrad::CausalLmLabels(ids.clone()))
            .expect("bwd");
        losses.push(back.loss.expect("loss"));
        let grad = back.grad_input.expect("grad wrt hidden input");
        chain[0]
            .backward(batch, OutputGrad::Output(grad))
            .expect("bwd");
        // Tied embedding: both copies get the sum of both parts.
        let name = "model.embed_tokens.weight";
        let g0 = chain[0]
            .gradients()
            .expect("g")
            .into_iter()
            .find(|(n, _)| n == name)
            .expect("embed grad")
            .1;
        let g1 = chain[1]
            .gradients()
            .expect("g")
            .into_iter()
            .find(|(n, _)| n == name)
            .expect("head grad")
            .1;
        let total = (g0 + g1).expect("sum");
        for shard in &chain {
            shard.set_gradient(name, total.clone()).expect("set");
            shard
                .step(&AdamWConfig {
                    lr: 1e-4,
                    ..AdamWConfig::default()
                })
                .expect("step");
        }
    }
    assert!(losses[1] < losses[0], "loss did not fall: {losses:?}");
    assert_eq!(chain[0].version().updates, 2);
    // The two copies of the tied matrix stayed identical.
    let a = chain[0]
        .parameter("model.embed_tokens.weight")
        .expect("embed");
    let b = chain[1]
        .parameter("model.embed_tokens.weight")
        .expect("head");
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

#[test]
fn cli_swarm_generates_the_reference_through_three_nodes() {
    let reference = reference_json("smollm2");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_neuroshard"))
        .args(["swarm", "--model"])
        .arg(smollm2())
        .args(["--nodes", "3", "--replicas", "2", "--max-tokens", "24"])
        .args(["--prompt", reference["prompt"].as_str().expect("prompt")])
        .output()
        .expect("run neuroshard swarm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end_matches('\n'),
        reference["greedy_text"].as_str().expect("text")
    );
    assert!(stderr.contains("swarm of 6 nodes"), "{stderr}");
    assert!(stderr.contains("through 3 hops"), "{stderr}");
}
