//! `neuroshard generate`: in-process shards (`--model`) or a swarm (`--peers`).

use crate::common::{
    load_pipeline, print_piece, route_line, tokio_runtime, EngineArgs, SamplingArgs,
};
use neuroshard_core::{
    encode_prompt, generate, resolve_peers, runtime, Client, Codec, ComputeMode, Error,
    GenerationConfig, SwarmOptions, SwarmSession,
};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Duration;

/// Flags of `neuroshard generate`.
#[derive(clap::Args, Debug)]
pub(crate) struct GenerateArgs {
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
    #[command(flatten)]
    engine: EngineArgs,
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
    /// With --peers: replicas per range. With 2 or more, every range runs on that many
    /// nodes, each receiver votes on their outputs, and the client votes on the last range's
    /// logits; nodes that deviate are banned on signed evidence (docs/trust.md).
    #[arg(long, default_value_t = 1)]
    redundancy: usize,
    /// With --peers: run with the trained LoRA adapter of this name (`neuroshard train
    /// --adapter NAME`); without it, the base weights.
    #[arg(long, requires = "peers")]
    adapter: Option<String>,
    /// With --peers: a node id this client trusts from the start (repeatable).
    #[arg(long = "trust")]
    trust: Vec<neuroshard_core::net::NodeId>,
    /// With --peers: write the client's reputation table (score, state and reason per node)
    /// to this JSON file after the generation.
    #[arg(long)]
    trust_report: Option<PathBuf>,
    /// With --peers: the client's reputation table, loaded before and saved after the
    /// generation (default: client-reputation.json in the data directory).
    #[arg(long)]
    reputation: Option<PathBuf>,
}

impl GenerateArgs {
    fn config(&self) -> GenerationConfig {
        GenerationConfig {
            max_tokens: self.max_tokens,
            sampling: self.sampling.params(),
            stop_tokens: Vec::new(),
            ignore_eos: self.ignore_eos,
        }
    }
}

pub(crate) fn run(args: GenerateArgs, threads: usize) -> Result<(), Error> {
    match (&args.model, args.peers.is_empty()) {
        (_, false) => run_remote(args),
        (Some(model), true) => run_local(model.clone(), args, threads),
        (None, true) => Err(Error::Generation("pass --model or --peers".into())),
    }
}

fn run_local(model: PathBuf, args: GenerateArgs, threads: usize) -> Result<(), Error> {
    let mut pipeline = load_pipeline(&model, &args.split, args.engine.options(args.mode))?;
    let tokenizer = pipeline.tokenizer()?;
    let prompt = encode_prompt(&tokenizer, &args.prompt, args.chat, args.system.as_deref())?;
    let out = generate(
        &mut pipeline,
        Some(&tokenizer),
        &prompt,
        &args.config(),
        &mut |piece| print_piece(piece),
    )?;
    println!();
    eprintln!(
        "{} prompt tokens, {} generated ({:?}); prefill {:.1} tok/s, decode {:.1} tok/s, {} threads{}",
        out.prompt_tokens,
        out.tokens.len(),
        out.finish,
        out.prefill_tokens_per_sec(),
        out.decode_tokens_per_sec(),
        threads,
        if runtime::work_was_narrowed() {
            " (one at times: another program kept a core busy)"
        } else {
            ""
        }
    );
    Ok(())
}

fn run_remote(args: GenerateArgs) -> Result<(), Error> {
    tokio_runtime()?.block_on(async move {
        let entries = resolve_peers(&args.peers).await?;
        let client = Client::bind_default().await?;
        let reputation = args
            .reputation
            .clone()
            .unwrap_or_else(|| crate::common::data_dir().join("client-reputation.json"));
        client.load_reputation(&reputation)?;
        let options = SwarmOptions {
            codec: args.codec,
            step_timeout: Duration::from_millis(args.step_timeout_ms),
            model_id: args.engine.model_id.clone(),
            redundancy: args.redundancy.max(1),
            trust: args.trust.clone(),
            adapter: args.adapter.clone(),
            ..SwarmOptions::default()
        };
        let swarm = SwarmSession::connect(client.clone(), entries, options).await?;
        let prompt = swarm.encode_prompt(&args.prompt, args.chat, args.system.as_deref())?;
        let prepared = swarm.prepare(prompt, args.sampling.params()).await?;
        eprintln!(
            "model {} ({} layers) via {}; route: {}",
            swarm.model_id(),
            swarm.layers(),
            swarm.entry().id.fmt_short(),
            route_line(prepared.route())
        );
        for (i, replicas) in prepared.replicas().iter().enumerate() {
            let names: Vec<String> = replicas
                .iter()
                .map(|h| h.node.fmt_short().to_string())
                .collect();
            eprintln!("range {i} replicas: {}", names.join(", "));
        }
        let result = prepared
            .run(
                args.config(),
                Box::new(|piece| {
                    print_piece(piece);
                    ControlFlow::Continue(())
                }),
            )
            .await;
        let out = match result {
            Ok(out) => out,
            Err(e) => {
                client.shutdown().await;
                return Err(e);
            }
        };
        println!();
        for event in &out.events {
            eprintln!("recovery event: {event}");
        }
        for vote in &out.votes {
            eprintln!("vote: {vote}");
        }
        client.save_reputation(&reputation)?;
        if let Some(path) = &args.trust_report {
            let table = serde_json::to_string_pretty(&client.trust_table())
                .map_err(|e| Error::Internal(e.to_string()))?;
            std::fs::write(path, table)
                .map_err(|e| Error::Generation(format!("writing {}: {e}", path.display())))?;
        }
        let r = out.recovery;
        eprintln!(
            "recovery: {} failovers, {} refills, {} full replays, {} hand-overs",
            r.failovers, r.refills, r.full_replays, r.handovers
        );
        let o = &out.output;
        eprintln!(
            "{} prompt tokens, {} generated ({:?}); prefill {:.1} tok/s, decode {:.1} tok/s",
            o.prompt_tokens,
            o.tokens.len(),
            o.finish,
            o.prefill_tokens_per_sec(),
            o.decode_tokens_per_sec()
        );
        client.shutdown().await;
        Ok(())
    })
}
