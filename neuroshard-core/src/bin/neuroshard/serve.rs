//! `neuroshard serve`: the OpenAI-compatible HTTP API over an existing swarm (`--peers`), or
//! over a swarm started in this process (`--model PATH --nodes N`, for demos).

use crate::common::{tokio_runtime, EngineArgs};
use neuroshard_core::{
    resolve_peers, ApiServer, Client, Codec, ComputeMode, Error, LocalSwarm, ServeOptions,
    SwarmOptions, SwarmSession,
};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Flags of `neuroshard serve`.
#[derive(clap::Args, Debug)]
pub(crate) struct ServeArgs {
    /// Serve this swarm: addresses of any of its nodes (`<id>@<ip:port>` or `host:port`).
    #[arg(long, num_args = 1.., required_unless_present = "model")]
    peers: Vec<String>,
    /// Start a swarm of `--nodes` nodes on 127.0.0.1 in this process from this model file,
    /// and serve it.
    #[arg(long, conflicts_with = "peers")]
    model: Option<PathBuf>,
    /// Nodes of the in-process swarm (with --model), each one slice of the layers.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Compute mode of the in-process nodes.
    #[arg(long, default_value = "exact")]
    mode: ComputeMode,
    #[command(flatten)]
    engine: EngineArgs,
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
    /// Codec of hidden states between nodes.
    #[arg(long, default_value = "f16")]
    codec: Codec,
}

pub(crate) fn run(args: ServeArgs) -> Result<(), Error> {
    tokio_runtime()?.block_on(async move {
        let local = match &args.model {
            Some(model) => {
                eprintln!("starting {} nodes from {}", args.nodes, model.display());
                let swarm = LocalSwarm::start(
                    model,
                    args.nodes,
                    1,
                    args.engine.options(args.mode),
                    &mut |line| eprintln!("{line}"),
                )
                .await?;
                Some(swarm)
            }
            None => None,
        };
        let peers = match &local {
            Some(swarm) => swarm.addresses(),
            None => args.peers.clone(),
        };
        let entries = resolve_peers(&peers).await?;
        let client = Client::bind_default().await?;
        let options = SwarmOptions {
            codec: args.codec,
            ..SwarmOptions::default()
        };
        let swarm = SwarmSession::connect(client, entries, options).await?;
        let server = ApiServer::bind(
            args.http,
            swarm,
            ServeOptions {
                api_key: args.api_key.clone(),
                // A local swarm is also served under its file's name (`SmolLM2-...`).
                model_name: args.model_name.clone().or_else(|| {
                    args.model
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
        wait_for_stop().await;
        eprintln!("stopping");
        server.shutdown().await?;
        if let Some(swarm) = local {
            swarm.shutdown().await;
        }
        Ok(())
    })
}

/// Ctrl-C or SIGTERM.
async fn wait_for_stop() {
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
