//! `neuroshard train`: teach the swarm a text (a LoRA adapter by default, or the full slices),
//! and `neuroshard id`: the identity of a key, for `node --trainer`.

use crate::common::{route_line, tokio_runtime};
use neuroshard_core::net::endpoint::{load_or_create_key, EndpointOptions};
use neuroshard_core::train::{examples_from_conversation, examples_from_text};
use neuroshard_core::{
    resolve_peers, AdamWConfig, ChatMessage, Client, Codec, Error, LoraConfig, SwarmOptions,
    SwarmSession, TrainOptions, TrainTarget, Trainer,
};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

/// Flags of `neuroshard train`.
#[derive(clap::Args, Debug)]
pub(crate) struct TrainArgs {
    /// Nodes of the swarm to train (`<id>@<ip:port>` or `host:port`); each hop must allow
    /// this trainer (`node --trainer ID`).
    #[arg(long, num_args = 1.., required = true)]
    peers: Vec<String>,
    /// The trainer's key (created if missing); `neuroshard id --key-file K` prints its id.
    #[arg(long)]
    key_file: PathBuf,
    /// Plain text to learn.
    #[arg(
        long,
        required_unless_present = "conversation",
        conflicts_with = "conversation"
    )]
    text: Option<PathBuf>,
    /// A conversation to learn instead: a JSON list of `{"role": ..., "content": ...}`
    /// messages, rendered with the model's chat template and cut like --text.
    #[arg(long)]
    conversation: Option<PathBuf>,
    /// Every non-empty line is one example (default: the text in windows of --seq-len).
    #[arg(long)]
    lines: bool,
    /// Optimizer steps.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Learning rate (AdamW).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Tokens per example.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Micro-batches per step (one example each); the hops pipeline them.
    #[arg(long, default_value_t = 4)]
    micro_batches: usize,
    /// The LoRA adapter to train (created on every hop if missing).
    #[arg(long, default_value = "notes")]
    adapter: String,
    /// Rank of a new adapter.
    #[arg(long, default_value_t = 8)]
    lora_rank: usize,
    /// Projections a new adapter covers.
    #[arg(long, value_delimiter = ',', default_value = "q_proj,v_proj")]
    lora_targets: Vec<String>,
    /// Train the slices' own weights instead of an adapter (nodes run --mode f32).
    #[arg(long)]
    full: bool,
    /// Codec of hidden states and gradients between hops: f32, f16, bf16, q8.
    #[arg(long, default_value = "f32")]
    codec: Codec,
    /// Held-back text: its mean loss (and perplexity) is measured before and after training,
    /// without updating anything. Cut like --text.
    #[arg(long)]
    eval_text: Option<PathBuf>,
    /// Write the run (losses per step, held-back losses, tokens/s, versions) as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// What `neuroshard train` learns.
enum Source {
    Text(String),
    Conversation(Vec<ChatMessage>),
}

fn read(path: &PathBuf) -> Result<String, Error> {
    std::fs::read_to_string(path)
        .map_err(|e| Error::Training(format!("cannot read {}: {e}", path.display())))
}

/// The held-back loss (`None` without held-back text), printed with its perplexity.
async fn held_back_loss(
    trainer: &mut Trainer,
    held_back: &[Vec<u32>],
    micro_batches: usize,
    when: &str,
) -> Result<Option<f32>, Error> {
    if held_back.is_empty() {
        return Ok(None);
    }
    let loss = trainer.evaluate(held_back, micro_batches).await?;
    eprintln!(
        "held-back loss {when}: {loss:.4} (perplexity {:.2}) on {} examples",
        loss.exp(),
        held_back.len()
    );
    Ok(Some(loss))
}

pub(crate) fn run(args: TrainArgs) -> Result<(), Error> {
    let key = load_or_create_key(&args.key_file)?;
    let source = match (&args.text, &args.conversation) {
        (Some(path), _) => Source::Text(read(path)?),
        (None, Some(path)) => {
            let messages: Vec<ChatMessage> = serde_json::from_str(&read(path)?).map_err(|e| {
                Error::Training(format!(
                    "{}: not a JSON list of {{\"role\", \"content\"}} messages: {e}",
                    path.display()
                ))
            })?;
            Source::Conversation(messages)
        }
        (None, None) => {
            return Err(Error::Training(
                "give --text FILE or --conversation FILE".into(),
            ))
        }
    };
    tokio_runtime()?.block_on(async move {
        let entries = resolve_peers(&args.peers).await?;
        let client = Client::new(key, EndpointOptions::default()).await?;
        let swarm = SwarmSession::connect(client.clone(), entries, SwarmOptions::default()).await?;
        let examples = match &source {
            Source::Text(text) => {
                examples_from_text(swarm.tokenizer(), text, args.seq_len, args.lines)?
            }
            Source::Conversation(messages) => {
                examples_from_conversation(swarm.tokenizer(), messages, args.seq_len)?
            }
        };
        let target = if args.full {
            TrainTarget::Full
        } else {
            TrainTarget::Adapter {
                name: args.adapter.clone(),
                config: LoraConfig {
                    rank: args.lora_rank,
                    targets: args.lora_targets.clone(),
                    ..LoraConfig::default()
                },
            }
        };
        let options = TrainOptions {
            target,
            codec: args.codec,
            adamw: AdamWConfig {
                lr: args.lr,
                ..AdamWConfig::default()
            },
            ..TrainOptions::default()
        };
        let mut trainer = Trainer::on_swarm(&swarm, options).await?;
        eprintln!(
            "training {} on {} examples ({} tokens) through {}; job {:016x}",
            if args.full {
                "the full slices".to_string()
            } else {
                format!("adapter `{}`", args.adapter)
            },
            examples.len(),
            examples.iter().map(Vec::len).sum::<usize>(),
            route_line(trainer.route()),
            trainer.job()
        );
        if trainer.resolve_in_doubt().await? {
            eprintln!("committed the step an earlier run of this trainer left prepared");
        }
        let held_back = match &args.eval_text {
            Some(path) => {
                examples_from_text(swarm.tokenizer(), &read(path)?, args.seq_len, args.lines)?
            }
            None => Vec::new(),
        };
        let eval_before =
            held_back_loss(&mut trainer, &held_back, args.micro_batches, "before").await?;
        let t0 = Instant::now();
        let mut tokens = 0usize;
        let steps = args.steps;
        let result = trainer
            .learn(&examples, steps, args.micro_batches, |i, report| {
                tokens += report.tokens;
                let rate = tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9);
                let done = (i + 1) * 30 / steps.max(1);
                eprint!(
                    "\r[{}{}] step {}/{steps}  loss {:.4}  {rate:.0} tok/s   ",
                    "#".repeat(done),
                    " ".repeat(30 - done),
                    i + 1,
                    report.loss
                );
                let _ = std::io::stderr().flush();
                std::ops::ControlFlow::Continue(())
            })
            .await;
        eprintln!();
        let train_secs = t0.elapsed().as_secs_f64();
        let reports = match result {
            Ok(r) => r,
            Err(e) => {
                client.shutdown().await;
                return Err(e);
            }
        };
        if let (Some(first), Some(last)) = (reports.first(), reports.last()) {
            eprintln!(
                "loss {:.4} -> {:.4} in {} steps ({:.1} s)",
                first.loss,
                last.loss,
                reports.len(),
                train_secs
            );
        }
        let eval_after =
            held_back_loss(&mut trainer, &held_back, args.micro_batches, "after").await?;
        for v in trainer.versions() {
            println!("{v}");
        }
        if let Some(path) = &args.json {
            let report = serde_json::json!({
                "steps": reports.len(),
                "micro_batches": args.micro_batches,
                "seq_len": args.seq_len,
                "examples": examples.len(),
                "losses": reports.iter().map(|r| r.loss).collect::<Vec<_>>(),
                "tokens": tokens,
                "seconds": train_secs,
                "tokens_per_s": tokens as f64 / train_secs.max(1e-9),
                "eval_loss_before": eval_before,
                "eval_loss_after": eval_after,
                "codec": format!("{:?}", args.codec),
                "target": if args.full { "full".to_string() } else { args.adapter.clone() },
                "versions": trainer.versions().iter().map(|v| v.to_string()).collect::<Vec<_>>(),
            });
            std::fs::write(path, serde_json::to_vec_pretty(&report).unwrap_or_default())
                .map_err(|e| Error::Training(format!("cannot write {}: {e}", path.display())))?;
        }
        trainer.end().await?;
        client.shutdown().await;
        Ok(())
    })
}

/// Flags of `neuroshard id`.
#[derive(clap::Args, Debug)]
pub(crate) struct IdArgs {
    /// The key file (created if missing).
    #[arg(long)]
    key_file: PathBuf,
}

/// Prints the node id of a key (what `node --trainer` and `--trust` take).
pub(crate) fn run_id(args: IdArgs) -> Result<(), Error> {
    let key = load_or_create_key(&args.key_file)?;
    println!("{}", key.public());
    Ok(())
}
