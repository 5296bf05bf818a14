//! Generate text with a model split into in-process shards.
//!
//! `cargo run --release --example generate -- MODEL.gguf "The future of AI is"`

use neuroshard_core::runtime::{init, RuntimeConfig};
use neuroshard_core::{generate, EngineOptions, GenerationConfig, LocalPipeline};

fn main() -> neuroshard_core::Result<()> {
    init(&RuntimeConfig::default());
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let prompt = args.next().unwrap_or_else(|| "The future of AI is".into());
    // Three shards in one process: layers 0..10, 10..20, 20..30.
    let mut pipeline = LocalPipeline::load(&model, &[10, 20], EngineOptions::default())?;
    let tokenizer = pipeline.tokenizer()?;
    let ids = tokenizer.encode(&prompt)?;
    let config = GenerationConfig {
        max_tokens: 24,
        ..GenerationConfig::default()
    };
    let out = generate(
        &mut pipeline,
        Some(&tokenizer),
        &ids,
        &config,
        &mut |piece| print!("{piece}"),
    )?;
    println!(
        "\n[{} tokens, {:.1} tokens/s]",
        out.tokens.len(),
        out.decode_tokens_per_sec()
    );
    Ok(())
}
