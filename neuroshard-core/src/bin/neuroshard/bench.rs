//! `neuroshard bench`: prefill and decode tokens/s in one process, as JSON records.

use crate::common::{load_pipeline, machine_name, write_json, EngineArgs};
use neuroshard_core::{generate, ComputeMode, Error, GenerationConfig, LogitsBackend};
use std::path::PathBuf;
use std::time::Instant;

/// Flags of `neuroshard bench`.
#[derive(clap::Args, Debug)]
pub(crate) struct BenchArgs {
    /// Model path.
    #[arg(long)]
    model: PathBuf,
    /// Modes to measure.
    #[arg(long, value_delimiter = ',', default_value = "f32,exact,fast")]
    modes: Vec<ComputeMode>,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens to decode.
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    /// Measure decode after the whole prompt (decode at that context length) instead of after
    /// an 8-token prompt.
    #[arg(long)]
    decode_after_prompt: bool,
    /// Repetitions (best is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Write results here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    engine: EngineArgs,
}

pub(crate) fn run(args: BenchArgs, threads: usize) -> Result<(), Error> {
    let BenchArgs {
        model,
        modes,
        prompt_tokens,
        decode_tokens,
        decode_after_prompt,
        reps,
        json,
        engine,
    } = args;
    let machine = machine_name();
    let mut results = Vec::new();
    for mode in modes {
        let mut pipeline = load_pipeline(&model, &[], engine.options(mode))?;
        let tokenizer = pipeline.tokenizer()?;
        // A realistic prompt: English text repeated to the requested length.
        let base = tokenizer.encode(
            "The history of computing is a story of machines that learned to share work. \
             Early computers filled rooms; later, networks of small machines cooperated. ",
        )?;
        let prompt: Vec<u32> = base
            .iter()
            .cycle()
            .take(prompt_tokens.max(1))
            .copied()
            .collect();
        let short: Vec<u32> = if decode_after_prompt {
            prompt.clone()
        } else {
            prompt.iter().take(8).copied().collect()
        };
        let (mut best_prefill, mut best_decode) = (0f64, 0f64);
        // The greedy tokens, so a comparison (benches/llamacpp_compare) can check them.
        let mut decoded = Vec::new();
        for rep in 0..reps.max(1) {
            pipeline.reset()?;
            let t0 = Instant::now();
            pipeline.next_logits(&prompt, 0)?;
            let prefill = prompt.len() as f64 / t0.elapsed().as_secs_f64();
            pipeline.reset()?;
            let config = GenerationConfig {
                max_tokens: decode_tokens,
                ignore_eos: true,
                ..GenerationConfig::default()
            };
            let out = generate(
                &mut pipeline,
                Some(&tokenizer),
                &short,
                &config,
                &mut |_| {},
            )?;
            let decode = out.decode_tokens_per_sec();
            eprintln!(
                "{mode:?} rep {}: prefill {prefill:.1} tok/s ({} tokens), decode {decode:.1} tok/s ({} tokens)",
                rep + 1,
                prompt.len(),
                out.tokens.len()
            );
            best_prefill = best_prefill.max(prefill);
            best_decode = best_decode.max(decode);
            decoded = out.tokens;
        }
        let name = format!("{mode:?}").to_lowercase();
        for (metric, value) in [("prefill", best_prefill), ("decode", best_decode)] {
            let mut record = serde_json::json!({
                "name": format!("smollm2_single_process_{metric}_{name}"),
                "unit": "tokens/s",
                "value": (value * 10.0).round() / 10.0,
                "machine": machine,
                "threads": threads,
                "prompt_tokens": prompt.len(),
                "decode_tokens": decode_tokens,
                "decode_context": short.len(),
                "peak_rss_bytes": neuroshard_core::runtime::peak_rss_bytes(),
            });
            if metric == "decode" {
                record["decode_token_ids"] = serde_json::json!(decoded);
            }
            results.push(record);
        }
        println!("{name}: prefill {best_prefill:.1} tok/s, decode {best_decode:.1} tok/s (best of {reps})");
    }
    if let Some(path) = json {
        write_json(&path, &serde_json::Value::Array(results))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
