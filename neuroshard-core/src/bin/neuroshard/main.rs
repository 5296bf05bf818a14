//! `neuroshard` command line: thin glue over `neuroshard-core`, one module per subcommand.
//!
//! Generated text goes to stdout, everything else (progress, timings) to stderr, so the output
//! can be piped.

mod bench;
mod bench_sessions;
mod chat;
mod common;
mod generate;
mod model_id;
mod node;
mod peers;
mod serve;
mod shard_info;
mod swarm;
mod train;

use clap::{Parser, Subcommand};
use neuroshard_core::runtime::{self, RuntimeConfig};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "neuroshard",
    version,
    about = "Run one language model split across many machines"
)]
struct Cli {
    /// Compute threads (default: RAYON_NUM_THREADS, else the cores idle at start-up).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Log level of NeuroShard's own events on stderr (refused and failed requests with their
    /// reason, failovers): off, error, warn, info, debug or trace. Other crates log errors only.
    #[arg(long, global = true, default_value = "warn")]
    log: tracing_subscriber::filter::LevelFilter,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation of a prompt; prints only the generated text to stdout.
    Generate(generate::GenerateArgs),
    /// Start a whole swarm on 127.0.0.1 in this process (each node its own iroh endpoint) and
    /// generate through it: client -> node -> node -> ... -> client.
    Swarm(swarm::SwarmArgs),
    /// Serve a slice of layers to the swarm. Prints this node's address (`<id>@<ip:port>`) as
    /// the first line on stdout; others pass it to --peers. Stops cleanly on Ctrl-C / SIGTERM.
    Node(node::NodeArgs),
    /// Print the swarm as a node sees it.
    Peers(peers::PeersArgs),
    /// Load one slice, run one forward, and report what it read and holds (JSON).
    ShardInfo(shard_info::ShardInfoArgs),
    /// Measure prefill and decode tokens/s in one process and write JSON.
    Bench(bench::BenchArgs),
    /// Measure aggregate decode tokens/s of many concurrent sessions on an in-process swarm
    /// (nodes batch their steps) and check every session's text against its solo run.
    BenchSessions(bench_sessions::BenchSessionsArgs),
    /// Serve an OpenAI-compatible HTTP API (chat and text completions, streaming, models,
    /// health, Prometheus metrics) over a swarm, or over one started in this process.
    /// Prints the base URL as the first line on stdout.
    Serve(serve::ServeArgs),
    /// Print a model file's id (it commits to every weight, the tokenizer and the chat
    /// template), hashing the whole file once; optionally write its manifest.
    ModelId(model_id::ModelIdArgs),
    /// Chat in the terminal over a swarm (or one started in this process): multi-turn with
    /// the model's chat template; /reset, /system TEXT, /quit; Ctrl-C stops an answer.
    Chat(chat::ChatArgs),
    /// Train the swarm on a text: a LoRA adapter (default) or the full slices, relayed hop
    /// by hop with two-phase commits. Every hop must allow this trainer (`node --trainer`).
    Train(train::TrainArgs),
    /// Print the identity of a key file (created if missing): pass it to `node --trainer`.
    Id(train::IdArgs),
}

/// Logs to stderr: NeuroShard's events at `level`, every other crate's errors only (iroh is
/// chatty below that).
fn init_logging(level: tracing_subscriber::filter::LevelFilter) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    let filter = Targets::new()
        .with_default(LevelFilter::ERROR.min(level))
        .with_target("neuroshard_core", level)
        .with_target("neuroshard", level);
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false);
    let _ = tracing_subscriber::registry()
        .with(layer)
        .with(filter)
        .try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log);
    // The one process-wide thread setting, before any tensor work or thread start. The CLI
    // owns its process, so it also turns on the busy-core watcher.
    let info = runtime::init(&RuntimeConfig {
        threads: cli.threads,
        watch_busy_cores: true,
    });
    if let Some(available) = info.lowered_from {
        eprintln!(
            "note: only {} of {available} cores are idle: computing with {} thread(s) \
             (--threads N overrides)",
            info.threads, info.threads
        );
    }
    let result = match cli.command {
        Command::Generate(args) => generate::run(args, info.threads),
        Command::Swarm(args) => swarm::run(args),
        Command::Node(args) => node::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Train(args) => train::run(args),
        Command::Id(args) => train::run_id(args),
        Command::ModelId(args) => model_id::run(args),
        Command::Peers(args) => peers::run(args),
        Command::ShardInfo(args) => shard_info::run(args),
        Command::Bench(args) => bench::run(args, info.threads),
        Command::BenchSessions(args) => bench_sessions::run(args, info.threads),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
