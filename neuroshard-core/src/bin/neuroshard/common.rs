//! What several subcommands share: sampling flags, the runtime, model loading, printing.

use neuroshard_core::{
    ComputeMode, EngineOptions, Error, KvDtype, LocalPipeline, SamplingParams,
    DEFAULT_PREFILL_CHUNK,
};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Sampling flags of `generate` and `swarm`.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct SamplingArgs {
    /// Sampling temperature; 0 = greedy (the default, reproducible).
    #[arg(long, default_value_t = 0.0)]
    pub(crate) temperature: f32,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub(crate) top_k: usize,
    /// Nucleus sampling threshold (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) top_p: f32,
    /// Penalty for tokens already in the context (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) repeat_penalty: f32,
    /// Seed of the sampler (draws depend only on seed and position).
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
}

impl SamplingArgs {
    pub(crate) fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repeat_penalty,
            seed: self.seed,
        }
    }
}

/// The CLI's async runtime: one IO worker. Compute runs on tokio's blocking pool and rayon's
/// threads; a second IO worker only competes with the matmuls on small machines (3-node
/// loopback swarm on 2 cores, fast mode: 0.85x -> 0.91x single-process decode).
pub(crate) fn tokio_runtime() -> Result<tokio::runtime::Runtime, Error> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?)
}

/// Writes a generated piece to stdout at once (a closed pipe, e.g. `| head`, is not worth
/// aborting the generation for).
pub(crate) fn print_piece(piece: &str) {
    let mut stdout = std::io::stdout();
    let _ = stdout.write_all(piece.as_bytes());
    let _ = stdout.flush();
}

/// Engine flags of the subcommands that load layers.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct EngineArgs {
    /// Element type of the sessions' KV cache: f32, or f16 (half the memory).
    #[arg(long, default_value = "f32")]
    pub(crate) kv_dtype: KvDtype,
    /// Long prompts run this many positions at a time, pipelined across nodes (0: one pass).
    #[arg(long, default_value_t = DEFAULT_PREFILL_CHUNK)]
    pub(crate) prefill_chunk: usize,
    /// Keep prefill on the block kernels too, so outputs have the same bits however a prompt
    /// is chunked (slower prefill; for replicas compared bit for bit).
    #[arg(long)]
    pub(crate) chunk_invariant: bool,
    /// Insist on this model id (64 hex digits, as `neuroshard model-id MODEL` prints): a
    /// node refuses to load other weights, a client ignores entries and nodes that serve
    /// another model and checks the tokenizer and template it receives against the id.
    #[arg(long)]
    pub(crate) model_id: Option<String>,
    /// Check the slice's tensors against this manifest (`neuroshard model-id MODEL
    /// --manifest-out FILE`) instead of hashing the whole model file once. Without it, a
    /// `node` with `--model-id` and `--peers` and no cached manifest takes one from a peer,
    /// once it hashes to that id.
    #[arg(long)]
    pub(crate) manifest: Option<PathBuf>,
}

impl EngineArgs {
    /// Engine options with these flags and compute mode `mode`.
    pub(crate) fn options(&self, mode: ComputeMode) -> EngineOptions {
        EngineOptions {
            mode,
            kv_dtype: self.kv_dtype,
            prefill_chunk: self.prefill_chunk,
            chunk_invariant: self.chunk_invariant,
            expected_model_id: self.model_id.clone(),
            manifest: self.manifest.clone(),
            ..EngineOptions::default()
        }
    }
}

/// Loads the model as in-process shards cut at `split`, with progress on stderr.
pub(crate) fn load_pipeline(
    model: &Path,
    split: &[usize],
    options: EngineOptions,
) -> Result<LocalPipeline, Error> {
    let t0 = Instant::now();
    let mode = options.mode;
    let pipeline =
        LocalPipeline::load_with_progress(model, split, options, &mut |shard, done, total| {
            eprint!("\rloading shard {shard}: {done}/{total} layers   ");
            if done == total {
                eprintln!();
            }
        })?;
    let ranges: Vec<String> = pipeline
        .shards()
        .iter()
        .map(|s| format!("{}..{}", s.layers().start, s.layers().end))
        .collect();
    let bytes: u64 = pipeline
        .shards()
        .iter()
        .map(|s| s.stats().bytes_loaded)
        .sum();
    eprintln!(
        "loaded {} as shards [{}] in {:.2}s ({:.1} MB read, mode {:?})",
        model.display(),
        ranges.join(", "),
        t0.elapsed().as_secs_f64(),
        bytes as f64 / 1e6,
        mode
    );
    Ok(pipeline)
}

/// The CPU model and core count, for benchmark records.
pub(crate) fn machine_name() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    format!("{cpu} ({cores} cores)")
}

/// Where node keys live by default.
pub(crate) fn data_dir() -> PathBuf {
    std::env::var_os("NEUROSHARD_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_DATA_HOME").map(|d| PathBuf::from(d).join("neuroshard")))
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share/neuroshard"))
        })
        .unwrap_or_else(|| PathBuf::from(".neuroshard"))
}

/// Writes `value` as pretty JSON to `path`, creating its directory.
pub(crate) fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), Error> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(
        path,
        serde_json::to_string_pretty(value).unwrap_or_default(),
    )?;
    Ok(())
}

/// A route as `id[start..end] -> ...` (tests read this line).
pub(crate) fn route_line(route: &[neuroshard_core::RouteHop]) -> String {
    route
        .iter()
        .map(|h| {
            format!(
                "{}[{}..{}]",
                h.node.fmt_short(),
                h.layers.start,
                h.layers.end
            )
        })
        .collect::<Vec<_>>()
        .join(" -> ")
}

/// Ctrl-C or SIGTERM.
pub(crate) async fn wait_for_shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Which swarm `serve` and `chat` talk to: an existing one (`--peers`), or one they start in
/// this process (`--model`, `--nodes`).
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct SwarmSource {
    /// An existing swarm: addresses of any of its nodes (`<id>@<ip:port>` or `host:port`).
    #[arg(long, num_args = 1.., required_unless_present = "model")]
    pub(crate) peers: Vec<String>,
    /// Or start a swarm of `--nodes` nodes on 127.0.0.1 in this process from this model file.
    #[arg(long, conflicts_with = "peers")]
    pub(crate) model: Option<std::path::PathBuf>,
    /// Nodes of the in-process swarm (with --model), each one slice of the layers.
    #[arg(long, default_value_t = 3)]
    pub(crate) nodes: usize,
    /// Compute mode of the in-process nodes.
    #[arg(long, default_value = "exact")]
    pub(crate) mode: ComputeMode,
    #[command(flatten)]
    pub(crate) engine: EngineArgs,
    /// Codec of hidden states between nodes.
    #[arg(long, default_value = "f16")]
    pub(crate) codec: neuroshard_core::Codec,
    /// Replicas per range of every session: with 2 or more, each range runs on that many
    /// nodes and every receiver votes (docs/trust.md). With --model the in-process swarm
    /// starts that many replicas of each slice.
    #[arg(long, default_value_t = 1)]
    pub(crate) redundancy: usize,
}

impl SwarmSource {
    /// Starts the in-process swarm if asked for, and connects to the swarm.
    pub(crate) async fn connect(
        &self,
    ) -> Result<
        (
            Option<neuroshard_core::LocalSwarm>,
            neuroshard_core::SwarmSession,
        ),
        Error,
    > {
        let local = match &self.model {
            Some(model) => {
                eprintln!("starting {} nodes from {}", self.nodes, model.display());
                Some(
                    neuroshard_core::LocalSwarm::start(
                        model,
                        self.nodes,
                        self.redundancy.max(1),
                        self.engine.options(self.mode),
                        &mut |line| eprintln!("{line}"),
                    )
                    .await?,
                )
            }
            None => None,
        };
        let peers = match &local {
            Some(swarm) => swarm.addresses(),
            None => self.peers.clone(),
        };
        let entries = neuroshard_core::resolve_peers(&peers).await?;
        let client = neuroshard_core::Client::bind_default().await?;
        let options = neuroshard_core::SwarmOptions {
            codec: self.codec,
            model_id: self.engine.model_id.clone(),
            redundancy: self.redundancy.max(1),
            ..neuroshard_core::SwarmOptions::default()
        };
        let swarm = neuroshard_core::SwarmSession::connect(client, entries, options).await?;
        Ok((local, swarm))
    }
}
