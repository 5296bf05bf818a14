//! `neuroshard serve`: the OpenAI-compatible HTTP API over an existing swarm (`--peers`), or
//! over a swarm started in this process (`--model PATH --nodes N`, for demos).

use crate::common::{tokio_runtime, wait_for_shutdown_signal, SwarmSource};
use neuroshard_core::{ApiServer, Error, ServeOptions};
use std::net::SocketAddr;
use std::time::Duration;

/// Flags of `neuroshard serve`.
#[derive(clap::Args, Debug)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    swarm: SwarmSource,
    /// Where the HTTP API listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long, env = "NEUROSHARD_API_KEY")]
    api_key: Option<String>,
    /// A name the model is also served under (besides the swarm's model id).
    #[arg(long)]
    model_name: Option<String>,
    /// Generations at once; more requests get 429.
    #[arg(long, default_value_t = 16)]
    max_concurrent: usize,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_request_bytes: usize,
    /// Longest one generation runs, in seconds.
    #[arg(long, default_value_t = 300)]
    request_timeout_s: u64,
    /// `max_tokens` of requests that name none.
    #[arg(long, default_value_t = 512)]
    default_max_tokens: usize,
    /// Conversations kept open so that a chat's next turn only sends its new tokens.
    #[arg(long, default_value_t = 16)]
    kept_conversations: usize,
}

pub(crate) fn run(args: ServeArgs) -> Result<(), Error> {
    tokio_runtime()?.block_on(async move {
        let (local, swarm) = args.swarm.connect().await?;
        let server = ApiServer::bind(
            args.http,
            swarm,
            ServeOptions {
                api_key: args.api_key.clone(),
                // A local swarm is also served under its file's name (`SmolLM2-...`).
                model_name: args.model_name.clone().or_else(|| {
                    args.swarm
                        .model
                        .as_ref()
                        .and_then(|m| m.file_stem())
                        .map(|s| s.to_string_lossy().into_owned())
                }),
                max_request_bytes: args.max_request_bytes,
                max_concurrent: args.max_concurrent,
                request_timeout: Duration::from_secs(args.request_timeout_s),
                default_max_tokens: args.default_max_tokens,
                kept_conversations: args.kept_conversations,
            },
        )
        .await?;
        // The address line first on stdout, like `neuroshard node` (scripts read it).
        println!("http://{}", server.local_addr());
        eprintln!(
            "serving {} at http://{}/v1 (Ctrl-C stops){}",
            server.models().join(", "),
            server.local_addr(),
            if args.api_key.is_some() {
                "; API key required"
            } else {
                ""
            }
        );
        wait_for_shutdown_signal().await;
        eprintln!("stopping");
        server.shutdown().await?;
        if let Some(swarm) = local {
            swarm.shutdown().await;
        }
        Ok(())
    })
}
