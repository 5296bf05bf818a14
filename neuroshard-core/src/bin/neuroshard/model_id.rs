//! `neuroshard model-id`: a model file's id, and its manifest for slice-only nodes.

use neuroshard_core::{Error, WeightFile};
use std::path::PathBuf;
use std::time::Instant;

/// Flags of `neuroshard model-id`.
#[derive(clap::Args, Debug)]
pub(crate) struct ModelIdArgs {
    /// Model path (a `.gguf` file or a Hugging Face safetensors directory).
    model: PathBuf,
    /// Also write the manifest (per-tensor hashes) here: nodes given it with `--manifest`
    /// check their slice against it without reading the rest of the file.
    #[arg(long)]
    manifest_out: Option<PathBuf>,
    /// Hash the file again even when a cached manifest exists.
    #[arg(long)]
    rehash: bool,
}

pub(crate) fn run(args: ModelIdArgs) -> Result<(), Error> {
    let t0 = Instant::now();
    let file = WeightFile::open(&args.model)?;
    if args.rehash {
        eprintln!("hashing every tensor of {}", args.model.display());
        file.use_manifest(file.compute_manifest()?)?;
    }
    let identity = file.identity()?;
    let manifest = file.manifest()?;
    let bytes: u64 = manifest.tensors.iter().map(|t| t.bytes).sum();
    eprintln!(
        "{} tensors, {:.1} MB of weights, in {:.2}s{}",
        manifest.tensors.len(),
        bytes as f64 / 1e6,
        t0.elapsed().as_secs_f64(),
        file.manifest_cache_path()
            .map(|p| format!("; manifest cached at {}", p.display()))
            .unwrap_or_default()
    );
    if let Some(path) = &args.manifest_out {
        manifest.write(path)?;
        eprintln!("manifest written to {}", path.display());
    }
    println!("{}", identity.id);
    Ok(())
}
