//! `neuroshard` command line: generate text with a (locally split) model, inspect what a shard
//! costs, and benchmark decode/prefill speed.
//!
//! Generated text goes to stdout, everything else (progress, timings) to stderr, so the output
//! can be piped.

use clap::{Parser, Subcommand};
use neuroshard_core::client::BlockingSession;
use neuroshard_core::client::Client;
use neuroshard_core::generate::LocalPipeline;
use neuroshard_core::net::endpoint::{
    format_peer_addr, load_or_create_key, resolve_peer_addr, EndpointOptions,
};
use neuroshard_core::net::{now_ms, RouteOptions};
use neuroshard_core::node::{Node, NodeOptions};
use neuroshard_core::swarm::LocalSwarm;
use neuroshard_core::wire::Codec;
use neuroshard_core::{
    generate, runtime, ChatMessage, ComputeMode, EngineOptions, Error, ForwardRequest,
    GenerationConfig, SamplingParams, ShardEngine, ShardInput, Tokenizer,
};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "neuroshard",
    version,
    about = "Run one language model split across many machines"
)]
struct Cli {
    /// Compute threads (default: RAYON_NUM_THREADS or the number of cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct SamplingArgs {
    /// Sampling temperature; 0 = greedy (the default, reproducible).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling threshold (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Penalty for tokens already in the context (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Seed of the sampler (draws depend only on seed and position).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation of a prompt; prints only the generated text to stdout.
    Generate {
        /// Model: a .gguf file or a Hugging Face directory (config.json + safetensors).
        /// Not needed with --peers.
        #[arg(long, required_unless_present = "peers")]
        model: Option<PathBuf>,
        /// Generate through a swarm: addresses of any nodes (`<id>@<ip:port>` as printed by
        /// `neuroshard node`, or plain `host:port`). The tokenizer and route come from the
        /// first that answers; the others are asked when re-planning after a failure.
        #[arg(long, num_args = 1..)]
        peers: Vec<String>,
        /// Codec of hidden states between nodes (with --peers): f32, f16, bf16, q8, q4.
        #[arg(long, default_value = "f16")]
        codec: Codec,
        /// The prompt text.
        #[arg(long)]
        prompt: String,
        /// Most tokens to generate.
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Run as in-process shards cut at these layers, e.g. `10,20`.
        #[arg(long, value_delimiter = ',')]
        split: Vec<usize>,
        /// exact (default: quantised blocks x f32 activations, reproduces the references),
        /// f32 (everything dequantised: the reference path, trains) or fast (also re-quantises
        /// f16/f32 matrices to Q8_0: approximate).
        #[arg(long, default_value = "exact")]
        mode: ComputeMode,
        /// Wrap the prompt in the model's chat template as a user message.
        #[arg(long)]
        chat: bool,
        /// System message for --chat (default: the template's own).
        #[arg(long)]
        system: Option<String>,
        /// Do not stop at end-of-sequence tokens.
        #[arg(long)]
        ignore_eos: bool,
        /// With --peers: how long one step may take before the client probes the route and
        /// fails over (a stalled node).
        #[arg(long, default_value_t = 30_000)]
        step_timeout_ms: u64,
    },
    /// Start a whole swarm on 127.0.0.1 in this process (each node its own iroh endpoint) and
    /// generate through it: client -> node -> node -> ... -> client.
    Swarm {
        /// Model path.
        #[arg(long)]
        model: PathBuf,
        /// Number of slices the layers are cut into (one node each).
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Nodes per slice (the route planner picks among replicas).
        #[arg(long, default_value_t = 1)]
        replicas: usize,
        /// The prompt text.
        #[arg(long)]
        prompt: String,
        /// Most tokens to generate.
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Compute mode of every node.
        #[arg(long, default_value = "exact")]
        mode: ComputeMode,
        /// Codec of hidden states between nodes: f32, f16, bf16, q8, q4.
        #[arg(long, default_value = "f16")]
        codec: Codec,
        /// Wrap the prompt in the model's chat template.
        #[arg(long)]
        chat: bool,
        /// Do not stop at end-of-sequence tokens.
        #[arg(long)]
        ignore_eos: bool,
        /// Also write the run's timings as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Serve a slice of layers to the swarm. Prints this node's address (`<id>@<ip:port>`) as
    /// the first line on stdout; others pass it to --peers. Stops cleanly on Ctrl-C / SIGTERM.
    Node {
        /// Model path.
        #[arg(long)]
        model: PathBuf,
        /// First layer of the slice.
        #[arg(long)]
        start: usize,
        /// One past the last layer of the slice.
        #[arg(long)]
        end: usize,
        /// UDP port to listen on (0: any free port).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// IP address to bind (127.0.0.1 keeps the node local; 0.0.0.0 for a LAN).
        #[arg(long, default_value = "127.0.0.1")]
        bind: std::net::IpAddr,
        /// Nodes to join the swarm through (`<id>@<ip:port>` or plain `host:port`).
        #[arg(long, num_args = 1..)]
        peers: Vec<String>,
        /// Key file holding the node identity (created if missing). Default: a file per
        /// slice and port in the data directory.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Compute mode.
        #[arg(long, default_value = "exact")]
        mode: ComputeMode,
        /// Accepted for compatibility with the seed's CLI: every node serves model info.
        #[arg(long)]
        entry: bool,
        /// Use n0's public relays for NAT traversal (off: direct addresses only).
        #[arg(long)]
        relays: bool,
        /// Ask the router for a port mapping (UPnP / NAT-PMP / PCP).
        #[arg(long)]
        portmapper: bool,
        /// Find other nodes on the local network with mDNS (then --peers is optional).
        #[arg(long)]
        mdns: bool,
        /// On Ctrl-C / SIGTERM: how long to wait for live sessions to move to replicas (KV
        /// hand-over) before stopping.
        #[arg(long, default_value_t = 10)]
        grace_secs: u64,
    },
    /// Print the swarm as a node sees it.
    Peers {
        /// Address of any node (`<id>@<ip:port>` or plain `host:port`).
        #[arg(long, num_args = 1..)]
        peers: Vec<String>,
    },
    /// Load one slice, run one forward, and report what it read and holds (JSON).
    ShardInfo {
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
    },
    /// Measure prefill and decode tokens/s in one process and write JSON.
    Bench {
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
        /// Repetitions (best is reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Write results here as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Must happen before any tensor work (see runtime::init_threads).
    let threads = runtime::init_threads(cli.threads);
    if let Some(available) = runtime::lowered_from() {
        eprintln!(
            "note: only {threads} of {available} cores are idle: computing with {threads} \
             thread(s) (--threads N overrides)"
        );
    }
    let result = match cli.command {
        Command::Generate {
            model,
            peers,
            codec,
            prompt,
            max_tokens,
            sampling,
            split,
            mode,
            chat,
            system,
            ignore_eos,
            step_timeout_ms,
        } => {
            if peers.is_empty() {
                match model {
                    Some(model) => cmd_generate(GenerateArgs {
                        model,
                        prompt,
                        max_tokens,
                        sampling,
                        split,
                        mode,
                        chat,
                        system,
                        ignore_eos,
                        threads,
                    }),
                    None => Err(Error::Generation("pass --model or --peers".into())),
                }
            } else {
                cmd_generate_remote(RemoteArgs {
                    peers,
                    codec,
                    prompt,
                    max_tokens,
                    sampling,
                    chat,
                    system,
                    ignore_eos,
                    step_timeout: std::time::Duration::from_millis(step_timeout_ms),
                })
            }
        }
        Command::Node {
            model,
            start,
            end,
            port,
            bind,
            peers,
            key_file,
            mode,
            entry: _,
            relays,
            portmapper,
            mdns,
            grace_secs,
        } => cmd_node(NodeArgs {
            model,
            start,
            end,
            port,
            bind,
            peers,
            key_file,
            mode,
            relays,
            portmapper,
            mdns,
            grace: std::time::Duration::from_secs(grace_secs),
        }),
        Command::Peers { peers } => cmd_peers(peers),
        Command::ShardInfo {
            model,
            start,
            end,
            mode,
        } => cmd_shard_info(model, start, end, mode),
        Command::Swarm {
            model,
            nodes,
            replicas,
            prompt,
            max_tokens,
            sampling,
            mode,
            codec,
            chat,
            ignore_eos,
            json,
        } => cmd_swarm(SwarmArgs {
            model,
            nodes,
            replicas,
            prompt,
            max_tokens,
            sampling,
            mode,
            codec,
            chat,
            ignore_eos,
            json,
        }),
        Command::Bench {
            model,
            modes,
            prompt_tokens,
            decode_tokens,
            reps,
            json,
        } => cmd_bench(
            model,
            modes,
            prompt_tokens,
            decode_tokens,
            reps,
            json,
            threads,
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

struct GenerateArgs {
    model: PathBuf,
    prompt: String,
    max_tokens: usize,
    sampling: SamplingArgs,
    split: Vec<usize>,
    mode: ComputeMode,
    chat: bool,
    system: Option<String>,
    ignore_eos: bool,
    threads: usize,
}

fn load_pipeline(
    model: &PathBuf,
    split: &[usize],
    mode: ComputeMode,
) -> Result<LocalPipeline, Error> {
    let t0 = Instant::now();
    let pipeline = LocalPipeline::load_with_progress(
        model,
        split,
        EngineOptions {
            mode,
            ..EngineOptions::default()
        },
        &mut |shard, done, total| {
            eprint!("\rloading shard {shard}: {done}/{total} layers   ");
            if done == total {
                eprintln!();
            }
        },
    )?;
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

fn cmd_generate(args: GenerateArgs) -> Result<(), Error> {
    let mut pipeline = load_pipeline(&args.model, &args.split, args.mode)?;
    let tokenizer = pipeline.tokenizer()?;
    let text = chat_or_plain(&tokenizer, &args.prompt, args.chat, args.system.as_deref())?;
    let prompt = tokenizer.encode(&text)?;
    let config = GenerationConfig {
        max_tokens: args.max_tokens,
        sampling: args.sampling.params(),
        stop_tokens: Vec::new(),
        ignore_eos: args.ignore_eos,
    };
    let mut stdout = std::io::stdout();
    let out = generate(
        &mut pipeline,
        Some(&tokenizer),
        &prompt,
        &config,
        &mut |piece| {
            // A closed pipe (e.g. `| head`) is not an error worth aborting generation for.
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        },
    )?;
    println!();
    eprintln!(
        "{} prompt tokens, {} generated ({:?}); prefill {:.1} tok/s, decode {:.1} tok/s, {} threads{}",
        out.prompt_tokens,
        out.tokens.len(),
        out.finish,
        out.prefill_tokens_per_sec(),
        out.decode_tokens_per_sec(),
        args.threads,
        if runtime::work_was_narrowed() {
            " (one at times: another program kept a core busy)"
        } else {
            ""
        }
    );
    Ok(())
}

struct SwarmArgs {
    model: PathBuf,
    nodes: usize,
    replicas: usize,
    prompt: String,
    max_tokens: usize,
    sampling: SamplingArgs,
    mode: ComputeMode,
    codec: Codec,
    chat: bool,
    ignore_eos: bool,
    json: Option<PathBuf>,
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repeat_penalty,
            seed: self.seed,
        }
    }
}

fn chat_or_plain(
    tokenizer: &Tokenizer,
    prompt: &str,
    chat: bool,
    system: Option<&str>,
) -> Result<String, Error> {
    if !chat {
        return Ok(prompt.to_string());
    }
    let mut messages = Vec::new();
    if let Some(system) = system {
        messages.push(ChatMessage::new("system", system));
    }
    messages.push(ChatMessage::new("user", prompt));
    tokenizer.apply_chat_template(&messages, true)
}

fn cmd_swarm(args: SwarmArgs) -> Result<(), Error> {
    let runtime = tokio_runtime()?;
    runtime.block_on(async move {
        let t0 = Instant::now();
        let options = EngineOptions {
            mode: args.mode,
            ..EngineOptions::default()
        };
        let swarm = LocalSwarm::start(&args.model, args.nodes, args.replicas, options, &mut |line| eprintln!("{line}")).await?;
        let route = swarm.plan()?;
        eprintln!(
            "swarm of {} nodes up in {:.2}s; route: {}",
            swarm.nodes.len(),
            t0.elapsed().as_secs_f64(),
            route
                .iter()
                .map(|h| format!("{}[{}..{}]", h.node.fmt_short(), h.layers.start, h.layers.end))
                .collect::<Vec<_>>()
                .join(" -> ")
        );
        let client = Client::new(iroh::SecretKey::generate(), EndpointOptions::default()).await?;
        let text = chat_or_plain(swarm.tokenizer(), &args.prompt, args.chat, None)?;
        let prompt = swarm.tokenizer().encode(&text)?;
        let config = GenerationConfig {
            max_tokens: args.max_tokens,
            sampling: args.sampling.params(),
            stop_tokens: Vec::new(),
            ignore_eos: args.ignore_eos,
        };
        let out = swarm
            .generate(
                &client,
                prompt,
                config,
                args.codec,
                Box::new(|piece: &str| {
                    let mut stdout = std::io::stdout();
                    let _ = stdout.write_all(piece.as_bytes());
                    let _ = stdout.flush();
                }),
            )
            .await?;
        println!();
        eprintln!(
            "{} prompt tokens, {} generated ({:?}) through {} hops; prefill {:.1} tok/s, decode {:.1} tok/s",
            out.prompt_tokens,
            out.tokens.len(),
            out.finish,
            route.len(),
            out.prefill_tokens_per_sec(),
            out.decode_tokens_per_sec()
        );
        if let Some(path) = args.json {
            // Per hop: median Ping round trip (network) and mean compute per step.
            let mut hops = Vec::new();
            for hop in &route {
                let mut rtts = Vec::new();
                for _ in 0..21 {
                    rtts.push(client.ping(hop).await?.as_secs_f64() * 1e3);
                }
                rtts.sort_by(f64::total_cmp);
                let stats = swarm
                    .nodes
                    .iter()
                    .find(|n| n.id() == hop.node)
                    .map(|n| n.stats())
                    .unwrap_or_default();
                hops.push(serde_json::json!({
                    "node": hop.node.fmt_short().to_string(),
                    "layers": [hop.layers.start, hop.layers.end],
                    "ping_rtt_ms_median": rtts[rtts.len() / 2],
                    "compute_ms_per_step": stats.compute_us as f64 / 1e3 / stats.steps.max(1) as f64,
                    "steps": stats.steps,
                }));
            }
            let report = serde_json::json!({
                "per_hop": hops,
                "hops": route.len(),
                "nodes": swarm.nodes.len(),
                "codec": format!("{:?}", args.codec).to_lowercase(),
                "mode": args.mode,
                "prompt_tokens": out.prompt_tokens,
                "generated": out.tokens.len(),
                "prefill_tokens_per_sec": out.prefill_tokens_per_sec(),
                "decode_tokens_per_sec": out.decode_tokens_per_sec(),
                "machine": machine_name(),
            });
            std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap_or_default())?;
        }
        client.shutdown().await;
        swarm.shutdown().await;
        Ok(())
    })
}

/// The CLI's async runtime: one IO worker. Compute runs on tokio's blocking pool and rayon's
/// threads; a second IO worker only competes with the matmuls on small machines (3-node
/// loopback swarm on 2 cores, fast mode: 0.85x -> 0.91x single-process decode).
fn tokio_runtime() -> Result<tokio::runtime::Runtime, Error> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?)
}

fn parse_peers(peers: &[String]) -> Result<Vec<iroh::EndpointAddr>, Error> {
    peers
        .iter()
        .map(|p| resolve_peer_addr(p).map_err(Error::from))
        .collect()
}

struct NodeArgs {
    model: PathBuf,
    start: usize,
    end: usize,
    port: u16,
    bind: std::net::IpAddr,
    peers: Vec<String>,
    key_file: Option<PathBuf>,
    mode: ComputeMode,
    relays: bool,
    portmapper: bool,
    mdns: bool,
    grace: std::time::Duration,
}

fn data_dir() -> PathBuf {
    std::env::var_os("NEUROSHARD_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_DATA_HOME").map(|d| PathBuf::from(d).join("neuroshard")))
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share/neuroshard"))
        })
        .unwrap_or_else(|| PathBuf::from(".neuroshard"))
}

fn cmd_node(args: NodeArgs) -> Result<(), Error> {
    let bootstrap = parse_peers(&args.peers)?;
    let key_path = args.key_file.clone().unwrap_or_else(|| {
        data_dir().join(format!(
            "node-{}-{}-{}.key",
            args.start, args.end, args.port
        ))
    });
    let key = load_or_create_key(&key_path)?;
    let t0 = Instant::now();
    let engine = ShardEngine::load_with_progress(
        &args.model,
        args.start..args.end,
        EngineOptions {
            mode: args.mode,
            ..EngineOptions::default()
        },
        |done, total| {
            eprint!("\rloading layers: {done}/{total}   ");
            if done == total {
                eprintln!();
            }
        },
    )?;
    eprintln!(
        "loaded layers {}..{} of {} in {:.2}s ({:.1} MB read)",
        args.start,
        args.end,
        args.model.display(),
        t0.elapsed().as_secs_f64(),
        engine.stats().bytes_loaded as f64 / 1e6
    );
    tokio_runtime()?.block_on(async move {
        let options = NodeOptions {
            endpoint: EndpointOptions {
                bind: std::net::SocketAddr::new(args.bind, args.port),
                relays: args.relays,
                portmapper: args.portmapper,
                mdns: args.mdns,
                ..EndpointOptions::default()
            },
            bootstrap,
            ..NodeOptions::default()
        };
        let node = Node::spawn_with(std::sync::Arc::new(engine), key, options).await?;
        // First stdout line: the address to pass to --peers.
        println!("{}", format_peer_addr(&node.addr()));
        let _ = std::io::stdout().flush();
        eprintln!(
            "node {} serving layers {}..{} (key {}); Ctrl-C to stop",
            node.id().fmt_short(),
            args.start,
            args.end,
            key_path.display()
        );
        wait_for_shutdown_signal().await;
        // Graceful: stop announcing, move live sessions (with their KV caches) to replicas.
        let leave = node.begin_leave().await;
        eprintln!(
            "leaving: {} session(s) told to move ({} without a known replica); waiting up to {}s",
            leave.notified,
            leave.without_replica,
            args.grace.as_secs()
        );
        let report = leave.finish(args.grace).await;
        eprintln!(
            "stopped: {} session(s) handed over, {} left to fail over",
            report.handed_over, report.left_behind
        );
        Ok(())
    })
}

/// Ctrl-C or SIGTERM.
async fn wait_for_shutdown_signal() {
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

struct RemoteArgs {
    peers: Vec<String>,
    codec: Codec,
    prompt: String,
    max_tokens: usize,
    sampling: SamplingArgs,
    chat: bool,
    system: Option<String>,
    ignore_eos: bool,
    step_timeout: std::time::Duration,
}

fn cmd_generate_remote(args: RemoteArgs) -> Result<(), Error> {
    let entries = parse_peers(&args.peers)?;
    let runtime = tokio_runtime()?;
    let handle = runtime.handle().clone();
    runtime.block_on(async move {
        let client = Client::new(iroh::SecretKey::generate(), EndpointOptions::default()).await?;
        // The first entry that answers serves the model info.
        let mut answered = None;
        let mut last_error = None;
        for e in &entries {
            match client.fetch_model_info(e).await {
                Ok(info) => {
                    answered = Some((e.clone(), info));
                    break;
                }
                Err(err) => last_error = Some(err),
            }
        }
        let (entry, info) = match (answered, last_error) {
            (Some(found), _) => found,
            (None, Some(err)) => return Err(err.into()),
            (None, None) => return Err(Error::Generation("pass at least one --peers".into())),
        };
        let tokenizer = Tokenizer::import(&info.tokenizer)?;
        let peers = client.fetch_peers(&entry, &info.model_id).await?;
        let text = chat_or_plain(&tokenizer, &args.prompt, args.chat, args.system.as_deref())?;
        let prompt = tokenizer.encode(&text)?;
        let sampling = args.sampling.params();
        // Nodes that refuse or cannot be reached (e.g. dead but not yet expired) are planned around.
        let (session, failed) = client
            .open_on_swarm(
                &peers,
                info.layers as usize,
                &info.model_id,
                args.codec,
                sampling,
                prompt.clone(),
                Vec::new(),
            )
            .await?;
        eprintln!(
            "model {} ({} layers) via {}; route: {}",
            info.model_id,
            info.layers,
            entry.id.fmt_short(),
            session
                .route()
                .iter()
                .map(|h| format!(
                    "{}[{}..{}]",
                    h.node.fmt_short(),
                    h.layers.start,
                    h.layers.end
                ))
                .collect::<Vec<_>>()
                .join(" -> ")
        );
        let (replan_client, model_id, layers) =
            (client.clone(), info.model_id.clone(), info.layers as usize);
        let replan_handle = handle.clone();
        // Failover: ask the entries (the one used so far first) for the current swarm and plan
        // around the failed nodes.
        let mut ask: Vec<_> = vec![entry.clone()];
        ask.extend(entries.iter().filter(|e| e.id != entry.id).cloned());
        let replanner: neuroshard_core::client::Replanner = Box::new(move |failed| {
            let mut peers = Err(neuroshard_core::net::NetError::Io(
                "no entry answered".into(),
            ));
            for e in ask.iter().filter(|e| !failed.contains(&e.id)) {
                peers = replan_handle.block_on(replan_client.fetch_peers(e, &model_id));
                if peers.is_ok() {
                    break;
                }
            }
            let peers = peers?;
            let opts = RouteOptions {
                exclude: failed.to_vec(),
                ..RouteOptions::default()
            };
            Ok(peers.plan_route(layers, now_ms(), &opts)?.to_hops())
        });
        let config = GenerationConfig {
            max_tokens: args.max_tokens,
            sampling,
            stop_tokens: Vec::new(),
            ignore_eos: args.ignore_eos,
        };
        let context_len = info.context_len as usize;
        let mut session = session;
        session.step_timeout = args.step_timeout;
        let (out, mut session) = tokio::task::spawn_blocking(move || {
            let mut backend =
                BlockingSession::new(session, handle, context_len).with_failover(replanner);
            backend.failed = failed;
            let mut stdout = std::io::stdout();
            let out = generate(
                &mut backend,
                Some(&tokenizer),
                &prompt,
                &config,
                &mut |piece| {
                    let _ = stdout.write_all(piece.as_bytes());
                    let _ = stdout.flush();
                },
            );
            (out, backend.session)
        })
        .await
        .map_err(|e| Error::Generation(format!("generation task failed: {e}")))?;
        session.close().await;
        let recovery = session.stats;
        for event in &session.events {
            eprintln!("recovery event: {event}");
        }
        let out = out?;
        println!();
        eprintln!(
            "recovery: {} failovers, {} refills, {} full replays, {} hand-overs",
            recovery.failovers, recovery.refills, recovery.full_replays, recovery.handovers
        );
        eprintln!(
            "{} prompt tokens, {} generated ({:?}); prefill {:.1} tok/s, decode {:.1} tok/s",
            out.prompt_tokens,
            out.tokens.len(),
            out.finish,
            out.prefill_tokens_per_sec(),
            out.decode_tokens_per_sec()
        );
        client.shutdown().await;
        Ok(())
    })
}

fn cmd_peers(peers: Vec<String>) -> Result<(), Error> {
    let entries = parse_peers(&peers)?;
    tokio_runtime()?.block_on(async move {
        let client = Client::new(iroh::SecretKey::generate(), EndpointOptions::default()).await?;
        let entry = &entries[0];
        let info = client.fetch_model_info(entry).await?;
        let set = client.fetch_peers(entry, &info.model_id).await?;
        let now = now_ms();
        let mut rows: Vec<_> = set.iter().collect();
        rows.sort_by_key(|(_, e)| (e.announcement.layers.start, e.announcement.layers.end));
        println!(
            "model {} ({} layers), {} nodes",
            info.model_id,
            info.layers,
            rows.len()
        );
        println!(
            "{:<12} {:>9} {:>9} {:>10} ADDRESSES",
            "NODE", "LAYERS", "LOAD", "EXPIRES"
        );
        for (id, e) in rows {
            let a = &e.announcement;
            let addrs: Vec<String> = a.addrs.iter().map(|s| s.to_string()).collect();
            println!(
                "{:<12} {:>9} {:>9} {:>9.1}s {}",
                id.fmt_short().to_string(),
                format!("{}..{}", a.layers.start, a.layers.end),
                format!("{}/{}", a.load, a.capacity),
                a.expires_ms.saturating_sub(now) as f64 / 1000.0,
                addrs.join(",")
            );
        }
        client.shutdown().await;
        Ok(())
    })
}

fn cmd_shard_info(
    model: PathBuf,
    start: usize,
    end: usize,
    mode: ComputeMode,
) -> Result<(), Error> {
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

fn machine_name() -> String {
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

fn cmd_bench(
    model: PathBuf,
    modes: Vec<ComputeMode>,
    prompt_tokens: usize,
    decode_tokens: usize,
    reps: usize,
    json: Option<PathBuf>,
    threads: usize,
) -> Result<(), Error> {
    let machine = machine_name();
    let mut results = Vec::new();
    for mode in modes {
        let mut pipeline = load_pipeline(&model, &[], mode)?;
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
        let short: Vec<u32> = prompt.iter().take(8).copied().collect();
        let (mut best_prefill, mut best_decode) = (0f64, 0f64);
        // The greedy tokens, so a comparison (benches/llamacpp_compare) can check them.
        let mut decoded = Vec::new();
        for rep in 0..reps.max(1) {
            pipeline.reset()?;
            let t0 = Instant::now();
            use neuroshard_core::LogitsBackend;
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
            });
            if metric == "decode" {
                record["decode_token_ids"] = serde_json::json!(decoded);
            }
            results.push(record);
        }
        println!("{name}: prefill {best_prefill:.1} tok/s, decode {best_decode:.1} tok/s (best of {reps})");
    }
    if let Some(path) = json {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&results).unwrap_or_default(),
        )?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
