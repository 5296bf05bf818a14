//! `neuroshard shard-info`: what one slice reads and holds.

use neuroshard_core::{
    runtime, ComputeMode, EngineOptions, Error, ForwardRequest, ShardEngine, ShardInput,
};
use std::path::PathBuf;
use std::time::Instant;

/// Flags of `neuroshard shard-info`.
#[derive(clap::Args, Debug)]
pub(crate) struct ShardInfoArgs {
    /// Model path.
    #[arg(long)]
    model: PathBuf,
    /// First layer of the slice.
    #[arg(long)]
    start: usize,
    /// One past the last layer of the slice.
    #[arg(long)]
    end: usize,
    /// Compute mode.
    #[arg(long, default_value = "exact")]
    mode: ComputeMode,
}

pub(crate) fn run(args: ShardInfoArgs) -> Result<(), Error> {
    let ShardInfoArgs {
        model,
        start,
        end,
        mode,
    } = args;
    let t0 = Instant::now();
    let engine = ShardEngine::load(
        &model,
        start..end,
        EngineOptions {
            mode,
            ..EngineOptions::default()
        },
    )?;
    let load_secs = t0.elapsed().as_secs_f64();
    let cfg = engine.config().clone();
    // One forward of 8 positions proves the slice runs.
    let input = if engine.is_first() {
        let ids: Vec<u32> = (0..8)
            .map(|i| (i * 7 + 3) % cfg.vocab_size as u32)
            .collect();
        ShardInput::Tokens(candle_core::Tensor::from_slice(
            &ids,
            (1, 8),
            &candle_core::Device::Cpu,
        )?)
    } else {
        ShardInput::Hidden(candle_core::Tensor::ones(
            (1, 8, cfg.hidden_size),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )?)
    };
    let out = engine.forward(ForwardRequest::new(input))?;
    let file_bytes = std::fs::metadata(&model).map(|m| m.len()).unwrap_or(0);
    let report = serde_json::json!({
        "model": model.display().to_string(),
        "layers": [start, end],
        "model_layers": cfg.num_layers,
        "mode": mode,
        "version": engine.version().to_string(),
        "file_bytes": file_bytes,
        "stats": engine.stats(),
        "output_shape": out.tensor().dims(),
        "peak_rss_bytes": runtime::peak_rss_bytes(),
        "load_secs": load_secs,
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&report).unwrap_or_default()
    );
    Ok(())
}
