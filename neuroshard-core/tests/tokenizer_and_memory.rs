//! SmolLM2's tokenizer rebuilt from GGUF metadata, its chat template, and proof that a shard
//! reads and keeps only its slice (loaded bytes and peak RSS of a separate process).

mod common;

use common::*;
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
