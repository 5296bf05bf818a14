//! `neuroshard node`: serve a slice of layers until Ctrl-C / SIGTERM, then leave gracefully.

use crate::common::{data_dir, tokio_runtime, EngineArgs};
use neuroshard_core::net::endpoint::{load_or_create_key, EndpointOptions};
use neuroshard_core::net::limits::PeerLimits;
use neuroshard_core::{
    adopt_peer_manifest, resolve_peers, Client, ComputeMode, Error, Node, NodeOptions, ShardEngine,
    WeightFile,
};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What one node lets peers use (defaults fit a laptop; see docs/security.md).
#[derive(clap::Args, Debug)]
struct LimitArgs {
    /// Memory for sessions' KV caches and replay states, in MB; an open that does not fit is
    /// refused `over-limit` (default: bounded by the session count alone).
    #[arg(long)]
    memory_budget_mb: Option<u64>,
    /// Sessions one client identity may hold open at once.
    #[arg(long, default_value_t = NodeOptions::default().max_sessions_per_client)]
    max_sessions_per_client: usize,
    /// Incoming connections held at once, from all peers.
    #[arg(long, default_value_t = PeerLimits::default().max_connections)]
    max_connections: usize,
    /// Incoming connections held at once from one peer.
    #[arg(long, default_value_t = PeerLimits::default().max_connections_per_peer)]
    max_connections_per_peer: usize,
    /// Streams (requests and steps) in flight from one peer.
    #[arg(long, default_value_t = PeerLimits::default().max_streams_per_peer)]
    max_streams_per_peer: usize,
    /// Requests per second from one peer (steps excepted), with a burst of twice that.
    #[arg(long, default_value_t = PeerLimits::default().requests_per_second)]
    requests_per_second: u32,
}

impl LimitArgs {
    /// These limits on top of `options`.
    fn apply(&self, options: NodeOptions) -> NodeOptions {
        NodeOptions {
            memory_budget: self.memory_budget_mb.map(|mb| mb.saturating_mul(1 << 20)),
            max_sessions_per_client: self.max_sessions_per_client,
            limits: PeerLimits {
                max_connections: self.max_connections,
                max_connections_per_peer: self.max_connections_per_peer,
                max_streams_per_peer: self.max_streams_per_peer,
                requests_per_second: self.requests_per_second,
                request_burst: self.requests_per_second.saturating_mul(2),
            },
            ..options
        }
    }
}

/// Flags of `neuroshard node`.
#[derive(clap::Args, Debug)]
pub(crate) struct NodeArgs {
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
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    limits: LimitArgs,
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
    /// A node id this node trusts from the start in the votes it runs (repeatable).
    #[arg(long = "trust")]
    trust: Vec<neuroshard_core::net::NodeId>,
    /// A trainer identity allowed to train this node (repeatable; `neuroshard id --key-file K`
    /// prints one). Without it the node refuses every training job.
    #[arg(long = "trainer")]
    trainers: Vec<neuroshard_core::net::NodeId>,
    /// Directory of training checkpoints: committed adapters (and the slice's own weights,
    /// when they train) are saved there after every step, and loaded from there at start (a
    /// restart goes on from the last commit).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Most memory (MiB) the graphs of training micro-batches waiting for their backward may
    /// hold here (estimated); a larger micro-batch is refused and its step aborted.
    #[arg(long, default_value_t = neuroshard_core::train::DEFAULT_TRAIN_MEMORY >> 20)]
    train_memory_mib: u64,
    /// The node's reputation table (the votes it ran as a receiver), loaded at start and
    /// saved every 30 s and on stop. Default: next to the key file.
    #[arg(long)]
    reputation: Option<PathBuf>,
    /// Lie in replicated sessions, for tests and demos of the trust machinery: noise, scale,
    /// skip-layer, wrong-weights, stale, zeros, slow, equivocate or bad-upstream (docs/trust.md).
    #[cfg(feature = "adversary")]
    #[arg(long)]
    behaviour: Option<neuroshard_core::consensus::adversary::Behaviour>,
}

pub(crate) fn run(args: NodeArgs) -> Result<(), Error> {
    let key_path = args.key_file.clone().unwrap_or_else(|| {
        data_dir().join(format!(
            "node-{}-{}-{}.key",
            args.start, args.end, args.port
        ))
    });
    let key = load_or_create_key(&key_path)?;
    let runtime = tokio_runtime()?;
    let t0 = Instant::now();
    let file = Arc::new(WeightFile::open(&args.model)?);
    // A pinned id and peers to ask: a node with no manifest at hand gets it from a peer and
    // checks it against the id, instead of hashing the whole file.
    if let (Some(expected), None, false) = (
        &args.engine.model_id,
        &args.engine.manifest,
        args.peers.is_empty(),
    ) {
        if file.known_manifest()?.is_none() {
            let from = runtime.block_on(async {
                let peers = resolve_peers(&args.peers).await?;
                let client = Client::bind_default().await?;
                let from = adopt_peer_manifest(&client, &peers, &file, expected).await;
                client.shutdown().await;
                from
            })?;
            eprintln!(
                "manifest of model {expected} from peer {} ({} tensors): only this slice's \
                 tensors are read and hashed",
                from.fmt_short(),
                file.manifest()?.tensors.len()
            );
        }
    }
    #[allow(unused_mut)]
    let mut engine = ShardEngine::from_file(
        file,
        args.start..args.end,
        args.engine.options(args.mode),
        &mut |done, total| {
            eprint!("\rloading layers: {done}/{total}   ");
            if done == total {
                eprintln!();
            }
        },
    )?;
    eprintln!(
        "loaded layers {}..{} of {} in {:.2}s ({:.1} MB read, {} tensors checked against \
         model id {})",
        args.start,
        args.end,
        args.model.display(),
        t0.elapsed().as_secs_f64(),
        engine.stats().bytes_loaded as f64 / 1e6,
        engine.weight_file().tensors_verified(),
        engine.model_id()
    );
    #[cfg(feature = "adversary")]
    if args.behaviour == Some(neuroshard_core::consensus::adversary::Behaviour::WrongWeights) {
        let name = engine.perturb_weight(0.01, 0x5eed)?;
        eprintln!("wrong-weights: 1%-RMS noise on {name}");
    }
    runtime.block_on(async move {
        let bootstrap = if args.peers.is_empty() {
            Vec::new()
        } else {
            resolve_peers(&args.peers).await?
        };
        let options = args.limits.apply(NodeOptions {
            endpoint: EndpointOptions {
                bind: std::net::SocketAddr::new(args.bind, args.port),
                relays: args.relays,
                portmapper: args.portmapper,
                mdns: args.mdns,
                ..EndpointOptions::default()
            },
            bootstrap,
            train: neuroshard_core::train::TrainPolicy {
                trainers: args.trainers.clone(),
                checkpoint: args.checkpoint.clone(),
                memory_budget: Some(args.train_memory_mib << 20),
            },
            ..NodeOptions::default()
        });
        let node = Node::builder_for(Arc::new(engine))
            .key(key)
            .options(options)
            .spawn()
            .await?;
        let reputation = args
            .reputation
            .clone()
            .unwrap_or_else(|| key_path.with_extension("reputation.json"));
        node.load_reputation(&reputation)?;
        for id in &args.trust {
            node.trust(*id);
        }
        let saver = {
            let (node, path) = (node.clone(), reputation.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    if let Err(e) = node.save_reputation(&path) {
                        eprintln!("{e}");
                    }
                }
            })
        };
        #[cfg(feature = "adversary")]
        if let Some(b) = args.behaviour {
            eprintln!("this node lies in replicated sessions: {}", b.name());
            node.set_behaviour(Some(b));
        }
        // First stdout line: the address to pass to --peers.
        println!("{}", node.address());
        let _ = std::io::stdout().flush();
        eprintln!(
            "node {} serving layers {}..{} (key {}); Ctrl-C to stop",
            node.id().fmt_short(),
            args.start,
            args.end,
            key_path.display()
        );
        crate::common::wait_for_shutdown_signal().await;
        // Graceful: stop announcing, move live sessions (with their KV caches) to replicas.
        let leave = node.begin_leave().await;
        eprintln!(
            "leaving: {} session(s) told to move ({} without a known replica); waiting up to {}s",
            leave.notified, leave.without_replica, args.grace_secs
        );
        let report = leave.finish(Duration::from_secs(args.grace_secs)).await;
        saver.abort();
        node.save_reputation(&reputation)?;
        eprintln!(
            "stopped: {} session(s) handed over, {} left to fail over",
            report.handed_over, report.left_behind
        );
        Ok(())
    })
}
