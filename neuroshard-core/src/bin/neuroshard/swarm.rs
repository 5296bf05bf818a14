//! `neuroshard swarm`: a whole swarm in this process, and one generation through it.

use crate::common::{
    machine_name, print_piece, route_line, tokio_runtime, write_json, EngineArgs, SamplingArgs,
};
use neuroshard_core::{
    encode_prompt, Client, Codec, ComputeMode, Error, GenerationConfig, LocalSwarm,
};
use std::path::PathBuf;
use std::time::Instant;

/// Flags of `neuroshard swarm`.
#[derive(clap::Args, Debug)]
pub(crate) struct SwarmArgs {
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
    #[command(flatten)]
    engine: EngineArgs,
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
}

pub(crate) fn run(args: SwarmArgs) -> Result<(), Error> {
    tokio_runtime()?.block_on(async move {
        let t0 = Instant::now();
        let options = args.engine.options(args.mode);
        let swarm = LocalSwarm::start(&args.model, args.nodes, args.replicas, options, &mut |line| {
            eprintln!("{line}")
        })
        .await?;
        let route = swarm.plan()?;
        eprintln!(
            "swarm of {} nodes up in {:.2}s; route: {}",
            swarm.nodes.len(),
            t0.elapsed().as_secs_f64(),
            route_line(&route)
        );
        let client = Client::bind_default().await?;
        let prompt = encode_prompt(swarm.tokenizer(), &args.prompt, args.chat, None)?;
        let config = GenerationConfig {
            max_tokens: args.max_tokens,
            sampling: args.sampling.params(),
            stop_tokens: Vec::new(),
            ignore_eos: args.ignore_eos,
        };
        let out = swarm
            .generate(&client, prompt, config, args.codec, Box::new(print_piece))
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
        if let Some(path) = &args.json {
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
            write_json(path, &report)?;
        }
        client.shutdown().await;
        swarm.shutdown().await;
        Ok(())
    })
}
