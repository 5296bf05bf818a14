//! [`Node`]: a [`ShardEngine`] slice served over iroh with the inference protocol.
//!
//! A hop accepts a signed session-open from a client, then `Step`s from that client (first hop)
//! or `Hidden` frames from its predecessor in the route (iroh authenticates the sender's id),
//! runs its layers with the session's KV cache, and forwards the new hidden state to its
//! successor, or, on the last hop, samples the next token and sends it to the client. Errors go
//! to the client naming this hop. Compute runs on tokio's blocking pool.
//!
//! Submodules: [`relay`] (the data path: steps, fills, replays), [`handover`] (leaving the
//! swarm and moving KV caches), `sent` (the hidden states a hop sent, for replays).

mod batcher;
mod handover;
mod manifest;
#[cfg(feature = "internals")]
pub(crate) mod misbehaviour;
mod relay;
mod replicated;
mod sent;

pub use handover::{LeaveHandle, LeaveReport};
pub use manifest::adopt_peer_manifest;

use crate::engine::ShardEngine;
use crate::net::admission::{
    check_replicas, check_route, OpenReplayGuard, Refusal, DEFAULT_OPEN_WINDOW_MS,
};
use crate::net::announce::{
    announced_versions, Announcement, SignedAnnouncement, PROTOCOL_VERSION,
};
use crate::net::connections::Connections;
use crate::net::endpoint::{bind, EndpointOptions};
use crate::net::gossip::{self, GossipItem};
use crate::net::limits::{ConnectionGate, PeerLimits, RequestRate, StreamGate, StreamPermit};
use crate::net::membership::Membership;
use crate::net::peers::PeerSet;
use crate::net::proto::{
    read_message, write_message, Message, ModelInfo, NodeStats, SessionOpen, SignedOpen,
    INFER_ALPN, MAX_STEP_POSITIONS, PEERS_PAGE,
};
use crate::net::{lock, now_ms, NetError, NodeId, Reason};
use crate::protocol::hop_session::HopState;
use crate::wire::Codec;
use iroh::address_lookup::MemoryLookup;
use iroh::endpoint::Connection;
use iroh::protocol::{AcceptError, ProtocolHandler, Router};
use iroh::{Endpoint, EndpointAddr, SecretKey};
use iroh_gossip::api::Event;
use iroh_gossip::{Gossip, TopicId};
use iroh_mdns_address_lookup::{DiscoveryEvent, MdnsAddressLookup};
use n0_future::StreamExt;
use sent::SentStates;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// mDNS service name: only NeuroShard nodes answer each other.
const MDNS_SERVICE: &str = "neuroshard";

/// Counters of what a node did (tests read them to see who served which step).
#[derive(Debug, Default)]
pub(crate) struct NodeCounters {
    /// Steps this node computed (one per `Step`/`Hidden` message processed).
    pub(crate) steps: AtomicU64,
    /// Messages refused (wrong sender, unknown session, malformed).
    pub(crate) rejected: AtomicU64,
    /// Sessions opened.
    pub(crate) sessions_opened: AtomicU64,
    /// Fill requests computed (KV cache refilled after a failover).
    pub(crate) fills: AtomicU64,
    /// Replay requests served (sent hidden states re-sent to a new successor).
    pub(crate) replays: AtomicU64,
    /// Sessions handed to a replica when leaving.
    pub(crate) handovers_out: AtomicU64,
    /// Sessions received from a leaving node.
    pub(crate) handovers_in: AtomicU64,
    /// Microseconds spent computing steps and fills.
    pub(crate) compute_us: AtomicU64,
    /// Hidden-state frame bytes sent to successors.
    pub(crate) hidden_bytes_sent: AtomicU64,
    /// Hidden-state frame bytes received from predecessors.
    pub(crate) hidden_bytes_received: AtomicU64,
    /// Pieces of evidence against nodes this node verified and applied (from its votes,
    /// clients and gossip).
    pub(crate) proofs_taken: AtomicU64,
    /// Refusals and failures this node reported, by reason.
    pub(crate) refusals: Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

impl NodeCounters {
    /// Counts one refusal or failure reported for `reason`.
    pub(crate) fn refused(&self, reason: Reason) {
        *lock(&self.refusals).entry(reason.name()).or_default() += 1;
    }

    /// A snapshot (`sessions_open` is filled in by the node).
    pub(crate) fn snapshot(&self) -> NodeStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NodeStats {
            steps: get(&self.steps),
            fills: get(&self.fills),
            replays: get(&self.replays),
            handovers_out: get(&self.handovers_out),
            handovers_in: get(&self.handovers_in),
            rejected: get(&self.rejected),
            sessions_opened: get(&self.sessions_opened),
            sessions_open: 0,
            compute_us: get(&self.compute_us),
            hidden_bytes_sent: get(&self.hidden_bytes_sent),
            hidden_bytes_received: get(&self.hidden_bytes_received),
            proofs_taken: get(&self.proofs_taken),
            refusals: lock(&self.refusals)
                .iter()
                .map(|(reason, n)| (reason.to_string(), *n))
                .collect(),
            ..NodeStats::default()
        }
    }
}

struct HopSession {
    open: SessionOpen,
    index: usize,
    codec: Codec,
    /// Last hop only: prompt + sampled tokens, for the repetition penalty.
    context: Mutex<Vec<u32>>,
    /// Hidden states sent to the successor, by position (kept across re-opens that keep the
    /// hop's layers, so a replacement successor can be refilled from here).
    sent: Arc<Mutex<SentStates>>,
    /// The IO-less hop machine: who may feed this hop, how a step's chunks follow one
    /// another and where each chunk's output goes.
    state: Mutex<HopState>,
    /// Replicated sessions: this replica's place, its ballot boxes and its prefix chain.
    replication: Option<replicated::Replication>,
    /// The adapter version the session runs with, held from its open (training commits
    /// newer versions beside it).
    adapter: Option<Arc<crate::model::lora::LoraAdapter>>,
}

impl HopSession {
    /// Layers this hop runs for the session.
    fn layers(&self) -> std::ops::Range<usize> {
        let l = &self.open.route[self.index].layers;
        l.start as usize..l.end as usize
    }

    /// The only node allowed to feed this hop: the client (first hop) or the predecessor.
    fn feeder(&self) -> NodeId {
        lock(&self.state).feeder()
    }
}

struct Inner {
    engine: Arc<ShardEngine>,
    /// One-position steps of all sessions go through here and run as batches.
    batcher: batcher::DecodeBatcher,
    endpoint: Endpoint,
    model_id: String,
    sessions: Mutex<HashMap<u64, Arc<HopSession>>>,
    conns: Connections,
    counters: NodeCounters,
    /// The training protocol's side of this node.
    train: Arc<crate::train::hop::TrainService>,
    /// The swarm as gossip has shown it (this node's own announcement included).
    peers: Mutex<PeerSet>,
    /// Addresses learned from announcements, for gossip and for dialing by id.
    lookup: MemoryLookup,
    /// Built on first request (a tokenizer export is a few MB).
    model_info: OnceLock<Result<ModelInfo, String>>,
    /// Tasks answering plain `host:port` peers with the address line (stopped on shutdown).
    address_line: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Gossip neighbours and recently heard peers: when and through whom to rejoin.
    membership: Mutex<Membership>,
    /// Set when the node leaves: no more announcements or new sessions.
    leaving: AtomicBool,
    /// Signalled whenever a session is removed (a leaving node waits for its sessions).
    sessions_changed: tokio::sync::Notify,
    /// Session-opens accepted inside the replay window (a captured open is refused).
    opens_seen: Mutex<OpenReplayGuard>,
    /// See [`NodeOptions::read_deadline`].
    read_deadline: Duration,
    /// See [`NodeOptions::max_sessions_per_client`].
    max_sessions_per_client: usize,
    /// See [`NodeOptions::max_step_positions`].
    max_step_positions: usize,
    /// Streams in flight per peer ([`PeerLimits::max_streams_per_peer`]).
    streams: Arc<StreamGate>,
    /// Requests per second per peer ([`PeerLimits::requests_per_second`]).
    request_rate: Mutex<RequestRate>,
    /// Incoming connections, capped per peer and in total (an endpoint hook).
    gate: ConnectionGate,
    /// Multi-position steps computing at once ([`NodeOptions::compute_slots`]).
    pub(crate) compute_slots: tokio::sync::Semaphore,
    /// See [`NodeOptions::memory_budget`].
    memory_budget: Option<u64>,
    /// How this node lies (hostile-peer tests only).
    #[cfg(feature = "internals")]
    misbehaviour: Mutex<misbehaviour::Misbehaviour>,
    /// How this replica lies in votes (`node --behaviour`, feature `adversary`).
    #[cfg(any(feature = "adversary", feature = "internals"))]
    behaviour: Mutex<Option<crate::consensus::adversary::Behaviour>>,
    /// The votes this node ran as a receiver and its chain of receipts.
    trust: Mutex<NodeTrust>,
    /// Where this node publishes proofs against nodes (set once it joined the topic).
    gossip: Mutex<Option<iroh_gossip::api::GossipSender>>,
    /// What receipts name as the build that computes.
    build_id: String,
    /// What receipts name as the kernel path that computes (with the mode, thread count and
    /// chunk invariance: replicas declaring the same one must produce the same bytes).
    kernel_path: String,
}

/// A node's side of the Trust machinery: the votes it runs as a receiver and the receipts it
/// signs.
struct NodeTrust {
    consensus: crate::consensus::Consensus,
    chain: crate::consensus::ReceiptChain,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("id", &self.endpoint.id().fmt_short().to_string())
            .finish_non_exhaustive()
    }
}

/// The inference protocol as an iroh [`ProtocolHandler`].
#[derive(Debug, Clone)]
struct InferProtocol(Arc<Inner>);

impl ProtocolHandler for InferProtocol {
    async fn accept(&self, connection: Connection) -> Result<(), AcceptError> {
        self.0.clone().serve_connection(connection).await;
        Ok(())
    }
}

/// How a node joins and announces itself.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Endpoint binding (loopback, any port, offline by default).
    pub endpoint: EndpointOptions,
    /// Peers to join the swarm through (any node of the swarm will do).
    pub bootstrap: Vec<EndpointAddr>,
    /// How often the node re-announces itself.
    pub announce_every: Duration,
    /// How long an announcement stays valid: peers forget a node that stops announcing.
    pub announce_ttl: Duration,
    /// Sessions the node accepts at once (announced as its capacity).
    pub capacity: u32,
    /// How long a signed session-open stays acceptable: older ones, and any seen before,
    /// are refused as replays.
    pub open_window: Duration,
    /// How long a peer may take to send a whole request, or the header of a data stream,
    /// once it opened the stream: a slow sender (slow-loris) is cut off after it.
    pub read_deadline: Duration,
    /// Sessions one client may hold on this node at once (a flood from one identity is
    /// refused while others are served).
    pub max_sessions_per_client: usize,
    /// Most positions one step may carry here (clients split longer inputs into steps of
    /// [`crate::net::MAX_STEP_POSITIONS`]); a longer step is refused with
    /// `over-limit` before anything is computed.
    pub max_step_positions: usize,
    /// Node-wide memory for sessions, in bytes: each session reserves its longest KV cache
    /// ([`ShardEngine::kv_bytes_per_session`]) and the hidden states it may keep for replays;
    /// an open that does not fit is refused with `over-limit`. `None`: sessions are bounded
    /// by `capacity` alone.
    pub memory_budget: Option<u64>,
    /// Per-peer caps on connections, streams and request rate, and the node-wide connection
    /// cap.
    pub limits: PeerLimits,
    /// Prompt steps (more than one position) computing at once; more wait their turn without
    /// holding a thread. Each uses every compute thread, so more only split the cores; decode
    /// steps run in the decode batch beside them.
    pub compute_slots: usize,
    /// Who may train this node, and where it keeps its training checkpoints.
    pub train: crate::train::TrainPolicy,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            endpoint: EndpointOptions::default(),
            bootstrap: Vec::new(),
            announce_every: Duration::from_secs(2),
            announce_ttl: Duration::from_secs(10),
            capacity: 64,
            open_window: Duration::from_millis(DEFAULT_OPEN_WINDOW_MS),
            read_deadline: Duration::from_secs(10),
            max_sessions_per_client: 16,
            max_step_positions: MAX_STEP_POSITIONS as usize,
            memory_budget: None,
            limits: PeerLimits::default(),
            compute_slots: 2,
            train: crate::train::TrainPolicy::default(),
        }
    }
}

/// A running node: one slice, one endpoint, the inference protocol and gossip discovery.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
    router: Router,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.inner.endpoint.id().fmt_short().to_string())
            .field("layers", &self.inner.engine.layers())
            .finish()
    }
}

/// The model id nodes and clients agree on ([`ShardEngine::model_id`]).
pub fn model_id(engine: &ShardEngine) -> String {
    engine.model_id().to_string()
}

/// Where a [`NodeBuilder`] gets its slice.
#[derive(Debug, Clone)]
enum EngineSource {
    /// Load these layers of the model file at spawn time.
    File {
        path: std::path::PathBuf,
        layers: Option<std::ops::Range<usize>>,
        options: crate::engine::EngineOptions,
    },
    /// An engine loaded already.
    Loaded(Arc<ShardEngine>),
}

/// Builds a [`Node`]: `Node::builder(model).layers(0..10).peers(addrs).spawn().await`.
///
/// Defaults: the whole model, exact mode, a fresh key, 127.0.0.1 on any free port, offline
/// (no relays, port mapping or mDNS), no bootstrap peers.
#[derive(Debug, Clone)]
pub struct NodeBuilder {
    source: EngineSource,
    key: Option<SecretKey>,
    options: NodeOptions,
}

impl NodeBuilder {
    /// Serves layers `layers` (`start..end`) of the model file.
    pub fn layers(mut self, layers: std::ops::Range<usize>) -> Self {
        if let EngineSource::File { layers: l, .. } = &mut self.source {
            *l = Some(layers);
        }
        self
    }

    /// How the engine loads and runs (mode, session limits); ignored for a loaded engine.
    pub fn engine_options(mut self, engine: crate::engine::EngineOptions) -> Self {
        if let EngineSource::File { options, .. } = &mut self.source {
            *options = engine;
        }
        self
    }

    /// The compute mode (exact by default); ignored for a loaded engine.
    pub fn mode(mut self, mode: crate::model::layers::ComputeMode) -> Self {
        if let EngineSource::File { options, .. } = &mut self.source {
            options.mode = mode;
        }
        self
    }

    /// The node's identity (default: a fresh random key).
    pub fn key(mut self, key: SecretKey) -> Self {
        self.key = Some(key);
        self
    }

    /// The UDP port to listen on (0: any free port).
    pub fn port(mut self, port: u16) -> Self {
        self.options.endpoint.bind.set_port(port);
        self
    }

    /// The IP address to bind (127.0.0.1 by default; 0.0.0.0 for a LAN).
    pub fn bind_ip(mut self, ip: std::net::IpAddr) -> Self {
        self.options.endpoint.bind.set_ip(ip);
        self
    }

    /// Nodes to join the swarm through (any node of the swarm will do).
    pub fn peers(mut self, peers: Vec<EndpointAddr>) -> Self {
        self.options.bootstrap = peers;
        self
    }

    /// Use n0's public relays (NAT traversal).
    pub fn relays(mut self, on: bool) -> Self {
        self.options.endpoint.relays = on;
        self
    }

    /// Ask the router for a port mapping (UPnP / NAT-PMP / PCP).
    pub fn portmapper(mut self, on: bool) -> Self {
        self.options.endpoint.portmapper = on;
        self
    }

    /// Find nodes on the local network with mDNS.
    pub fn mdns(mut self, on: bool) -> Self {
        self.options.endpoint.mdns = on;
        self
    }

    /// Who may train this node, and where it keeps training checkpoints (`--trainer`,
    /// `--checkpoint`).
    pub fn train(mut self, policy: crate::train::TrainPolicy) -> Self {
        self.options.train = policy;
        self
    }

    /// Every other setting at once (announce period and TTL, capacity, endpoint).
    pub fn options(mut self, options: NodeOptions) -> Self {
        self.options = options;
        self
    }

    /// Loads the slice (on a blocking thread, off the async runtime's workers), binds the
    /// endpoint, joins the swarm and starts serving.
    pub async fn spawn(self) -> crate::Result<Node> {
        let engine = match self.source {
            EngineSource::Loaded(engine) => engine,
            EngineSource::File {
                path,
                layers,
                options,
            } => {
                let engine = tokio::task::spawn_blocking(move || {
                    let file = Arc::new(crate::model::weights::WeightFile::open(&path)?);
                    let layers = layers.unwrap_or(0..file.config().num_layers);
                    ShardEngine::from_file(file, layers, options, &mut |_, _| {})
                })
                .await
                .map_err(|e| crate::Error::Internal(format!("engine load task failed: {e}")))??;
                Arc::new(engine)
            }
        };
        let key = self.key.unwrap_or_else(SecretKey::generate);
        Ok(Node::spawn_with(engine, key, self.options).await?)
    }
}

impl Node {
    /// A builder for a node serving (a slice of) the model file at `model`.
    pub fn builder(model: impl Into<std::path::PathBuf>) -> NodeBuilder {
        NodeBuilder {
            source: EngineSource::File {
                path: model.into(),
                layers: None,
                options: crate::engine::EngineOptions::default(),
            },
            key: None,
            options: NodeOptions::default(),
        }
    }

    /// A builder for a node serving an engine loaded already.
    pub fn builder_for(engine: Arc<ShardEngine>) -> NodeBuilder {
        NodeBuilder {
            source: EngineSource::Loaded(engine),
            key: None,
            options: NodeOptions::default(),
        }
    }

    /// Binds an endpoint with `key` and serves `engine` (no bootstrap peers) until
    /// [`Node::shutdown`].
    pub async fn spawn(
        engine: Arc<ShardEngine>,
        key: SecretKey,
        endpoint: EndpointOptions,
    ) -> Result<Node, NetError> {
        Self::spawn_with(
            engine,
            key,
            NodeOptions {
                endpoint,
                ..NodeOptions::default()
            },
        )
        .await
    }

    /// Binds, serves, joins the swarm's gossip topic through `options.bootstrap` and announces
    /// itself every `options.announce_every`.
    pub async fn spawn_with(
        engine: Arc<ShardEngine>,
        key: SecretKey,
        options: NodeOptions,
    ) -> Result<Node, NetError> {
        let lookup = MemoryLookup::new();
        for addr in &options.bootstrap {
            lookup.add_endpoint_info(addr.clone());
        }
        let mut endpoint_options = options.endpoint.clone();
        endpoint_options.alpns = vec![
            INFER_ALPN.to_vec(),
            iroh_gossip::ALPN.to_vec(),
            crate::train::TRAIN_ALPN.to_vec(),
        ];
        endpoint_options.lookup = Some(lookup.clone());
        let gate = ConnectionGate::new(options.limits);
        endpoint_options.gate = Some(gate.clone());
        let key_for_receipts = key.clone();
        let engine_for_declaration = engine.clone();
        let endpoint = bind(key, &endpoint_options).await?;
        let address_line = crate::net::endpoint::serve_address_line(&endpoint).await;
        let model_id = model_id(&engine);
        let train = crate::train::hop::TrainService::new(
            engine.clone(),
            endpoint.clone(),
            model_id.clone(),
            options.train.clone(),
            options.read_deadline,
        );
        let restored = train
            .restore()
            .map_err(|e| NetError::Io(format!("restoring training checkpoints: {e}")))?;
        if !restored.is_empty() {
            tracing::info!("restored adapters {restored:?} from the checkpoint directory");
        }
        let inner = Arc::new(Inner {
            train: train.clone(),
            peers: Mutex::new(PeerSet::new(model_id.clone())),
            model_id,
            batcher: batcher::DecodeBatcher::spawn(engine.clone()),
            engine,
            endpoint: endpoint.clone(),
            sessions: Mutex::new(HashMap::new()),
            conns: Connections::default(),
            counters: NodeCounters::default(),
            lookup,
            model_info: OnceLock::new(),
            leaving: AtomicBool::new(false),
            membership: Mutex::new(Membership::new(
                endpoint.id(),
                options.bootstrap.iter().map(|a| a.id).collect(),
                now_ms(),
            )),
            address_line: Mutex::new(address_line),
            sessions_changed: tokio::sync::Notify::new(),
            opens_seen: Mutex::new(OpenReplayGuard::new(options.open_window.as_millis() as u64)),
            read_deadline: options.read_deadline,
            max_sessions_per_client: options.max_sessions_per_client,
            max_step_positions: options.max_step_positions,
            streams: StreamGate::new(options.limits.max_streams_per_peer),
            request_rate: Mutex::new(RequestRate::new(&options.limits)),
            gate,
            compute_slots: tokio::sync::Semaphore::new(options.compute_slots.max(1)),
            memory_budget: options.memory_budget,
            #[cfg(feature = "internals")]
            misbehaviour: Mutex::default(),
            #[cfg(any(feature = "adversary", feature = "internals"))]
            behaviour: Mutex::default(),
            trust: Mutex::new(NodeTrust {
                consensus: crate::consensus::Consensus::default(),
                chain: crate::consensus::ReceiptChain::new(key_for_receipts, [0; 32]),
            }),
            gossip: Mutex::default(),
            build_id: build_id(),
            kernel_path: kernel_declaration(&engine_for_declaration),
        });
        let gossip = Gossip::builder().spawn(endpoint.clone());
        let router = Router::builder(endpoint)
            .incoming_filter(inner.gate.incoming_filter())
            .accept(INFER_ALPN, InferProtocol(inner.clone()))
            .accept(iroh_gossip::ALPN, gossip.clone())
            .accept(
                crate::train::TRAIN_ALPN,
                crate::train::hop::TrainProtocol(train),
            )
            .spawn();
        // A step prepared before a crash and not decided: ask the route's other hops.
        tokio::spawn(
            inner
                .train
                .clone()
                .resolve_from_peers(Duration::from_secs(30)),
        );
        let topic = TopicId::from_bytes(*blake3::hash(inner.model_id.as_bytes()).as_bytes());
        let bootstrap = options.bootstrap.iter().map(|a| a.id).collect();
        let (sender, mut receiver) = gossip
            .subscribe(topic, bootstrap)
            .await
            .map_err(|e| NetError::Io(format!("joining gossip: {e}")))?
            .split();
        *lock(&inner.gossip) = Some(sender.clone());
        if options.endpoint.mdns {
            // Nodes found on the local network become gossip peers: no --peers needed on a LAN.
            let mdns = MdnsAddressLookup::builder()
                .service_name(MDNS_SERVICE)
                .build(inner.endpoint.id())
                .map_err(|e| NetError::Io(format!("starting mDNS: {e}")))?;
            inner
                .endpoint
                .address_lookup()
                .map_err(|e| NetError::Io(e.to_string()))?
                .add(mdns.clone());
            let mut found = mdns.subscribe().await;
            let joiner = sender.clone();
            tokio::spawn(async move {
                while let Some(event) = found.next().await {
                    if let DiscoveryEvent::Discovered { endpoint_info, .. } = event {
                        if joiner
                            .join_peers(vec![endpoint_info.endpoint_id])
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            });
        }
        // Announce now and periodically; forget peers whose announcements expired.
        let announcer = inner.clone();
        tokio::spawn(async move {
            loop {
                if announcer.leaving.load(Ordering::Relaxed) {
                    break;
                }
                announcer.expire_idle_sessions();
                if let Ok(signed) = announcer.announcement(&options) {
                    let now = now_ms();
                    let _ = lock(&announcer.peers).insert(&signed, now);
                    lock(&announcer.peers).expire(now);
                    if let Ok(bytes) = signed.to_bytes() {
                        if sender.broadcast(bytes.into()).await.is_err() {
                            break;
                        }
                    }
                }
                // A replica behind a same-layers peer on an adapter fetches its state (only a
                // node that allows some trainer can adopt one).
                if announcer.train.allows_trainers() {
                    let plans = crate::train::sync::adapters_to_sync(
                        &announcer.endpoint.id(),
                        &lock(&announcer.peers),
                        now_ms(),
                    );
                    if !plans.is_empty() {
                        tokio::spawn(announcer.train.clone().sync_adapters(plans));
                    }
                }
                // Too few neighbours, or silence (dead neighbours are reported late): rejoin
                // through recently seen peers so the view does not decay into a partition.
                let quiet_ms = 3 * options.announce_every.as_millis() as u64;
                let known = lock(&announcer.membership).rejoin_candidates(now_ms(), quiet_ms);
                if !known.is_empty() && sender.join_peers(known).await.is_err() {
                    break;
                }
                // The period, or at once when a trained version changed.
                tokio::select! {
                    _ = tokio::time::sleep(options.announce_every) => {}
                    _ = announcer.train.versions_changed.notified() => {}
                }
            }
        });
        // Verify what gossip delivers into the PeerSet; invalid announcements are dropped.
        let listener = inner.clone();
        tokio::spawn(async move {
            while let Some(event) = receiver.next().await {
                match event {
                    // Invalid announcements and proofs are dropped.
                    Ok(Event::Received(msg)) => match gossip::decode(&msg.content) {
                        Some(GossipItem::Announcement(signed)) => {
                            let _ = listener.learn(&signed);
                        }
                        // Gossip floods the topic already: a proof is not sent on again.
                        Some(GossipItem::Proof(proof)) => {
                            let _ = listener.take_evidence(&proof);
                        }
                        None => {}
                    },
                    Ok(Event::NeighborUp(node)) => {
                        lock(&listener.membership).neighbour_up(node);
                    }
                    Ok(Event::NeighborDown(node)) => {
                        lock(&listener.membership).neighbour_down(node);
                    }
                    _ => {}
                }
            }
        });
        Ok(Node { inner, router })
    }

    /// The node's id.
    pub fn id(&self) -> NodeId {
        self.inner.endpoint.id()
    }

    /// Where to dial the node.
    pub fn addr(&self) -> EndpointAddr {
        crate::net::endpoint::dial_addr(&self.inner.endpoint)
    }

    /// The node's address line, `<id>@<ip:port>`: what other nodes and clients pass as peers.
    pub fn address(&self) -> String {
        crate::net::endpoint::format_peer_addr(&self.addr())
    }

    /// The swarm as this node sees it, one row per node (itself included).
    pub fn peer_infos(&self) -> Vec<crate::net::peers::PeerInfo> {
        lock(&self.inner.peers).infos(now_ms())
    }

    /// The node's secret key (signs its announcements).
    pub fn secret_key(&self) -> &SecretKey {
        self.inner.endpoint.secret_key()
    }

    /// The served slice.
    pub fn engine(&self) -> &Arc<ShardEngine> {
        &self.inner.engine
    }

    /// The model id this node serves.
    pub fn model_id(&self) -> &str {
        &self.inner.model_id
    }

    /// A snapshot of the counters with the number of open sessions.
    pub fn stats(&self) -> NodeStats {
        self.inner.stats()
    }

    /// Incoming connections the node holds now (capped by [`PeerLimits::max_connections`]).
    pub fn connections_held(&self) -> usize {
        self.inner.gate.held()
    }

    /// Makes this node lie from now on (hostile-peer tests; feature `internals` only).
    #[cfg(feature = "internals")]
    #[doc(hidden)]
    pub fn misbehave(&self, how: misbehaviour::Misbehaviour) {
        *lock(&self.inner.misbehaviour) = how;
    }

    /// Makes this replica lie in replicated sessions from now on (`node --behaviour`; feature
    /// `adversary`, for tests and demos of the Trust machinery).
    /// `wrong-weights` changes the weights themselves, so it is chosen before the engine
    /// serves ([`ShardEngine::perturb_weight`], which `node --behaviour wrong-weights`
    /// calls); here it only marks the node as lying.
    #[cfg(any(feature = "adversary", feature = "internals"))]
    pub fn set_behaviour(&self, behaviour: Option<crate::consensus::adversary::Behaviour>) {
        *lock(&self.inner.behaviour) = behaviour;
    }

    /// Trusts `node` from now on in the votes this node runs (`node --trust ID`).
    pub fn trust(&self, node: NodeId) {
        lock(&self.inner.trust)
            .consensus
            .reputation_mut()
            .pin(node, now_ms());
    }

    /// Replaces this node's reputation table with the one saved at `path` (a missing file
    /// is an empty table; a corrupt one an error).
    pub fn load_reputation(&self, path: &std::path::Path) -> Result<(), NetError> {
        let mut trust = lock(&self.inner.trust);
        let policy = trust.consensus.reputation().policy().clone();
        let table = crate::consensus::Reputation::load(path, policy)
            .map_err(|e| NetError::Io(format!("reading {}: {e}", path.display())))?;
        *trust.consensus.reputation_mut() = table;
        Ok(())
    }

    /// Saves this node's reputation table to `path` (JSON, replaced atomically).
    pub fn save_reputation(&self, path: &std::path::Path) -> Result<(), NetError> {
        lock(&self.inner.trust)
            .consensus
            .reputation()
            .save(path, now_ms())
            .map_err(|e| NetError::Io(format!("writing {}: {e}", path.display())))
    }

    /// This node's reputation table as a receiver of votes (replicated sessions), by node id.
    pub fn trust_table(&self) -> Vec<crate::consensus::reputation::StandingRow> {
        lock(&self.inner.trust)
            .consensus
            .reputation()
            .table(now_ms())
    }

    /// Verifies `signed` into the node's PeerSet and address book, as if gossip had delivered
    /// it (an in-process swarm introduces its nodes this way).
    pub fn learn(&self, signed: &SignedAnnouncement) -> Result<NodeId, NetError> {
        self.inner.learn(signed)
    }

    /// A snapshot of the swarm as this node sees it.
    pub fn peers(&self) -> PeerSet {
        lock(&self.inner.peers).clone()
    }

    /// Stops accepting, closes the endpoint (peers see the node gone).
    pub async fn shutdown(&self) {
        for task in lock(&self.inner.address_line).drain(..) {
            task.abort();
        }
        let _ = self.router.shutdown().await;
    }
}

impl Inner {
    /// This node's current signed announcement.
    fn announcement(&self, options: &NodeOptions) -> Result<SignedAnnouncement, NetError> {
        let now = now_ms();
        let layers = self.engine.layers();
        let ann = Announcement {
            protocol_version: PROTOCOL_VERSION,
            node: self.endpoint.id(),
            model_id: self.model_id.clone(),
            versions: announced_versions(&self.engine),
            layers: layers.start as u32..layers.end as u32,
            capacity: options.capacity,
            load: lock(&self.sessions).len() as u32,
            addrs: self.endpoint.bound_sockets(),
            entry: true,
            timestamp_ms: now,
            expires_ms: now + options.announce_ttl.as_millis() as u64,
        };
        SignedAnnouncement::sign(&ann, self.endpoint.secret_key())
    }

    /// Verifies an announcement into the PeerSet and adds its addresses to the address book.
    fn learn(&self, signed: &SignedAnnouncement) -> Result<NodeId, NetError> {
        let now = now_ms();
        let node = lock(&self.peers).insert(signed, now)?;
        lock(&self.membership).heard_from(node, now);
        let ann = signed.verify()?;
        let addr = ann
            .addrs
            .iter()
            .fold(EndpointAddr::new(ann.node), |a, s| a.with_ip_addr(*s));
        self.lookup.add_endpoint_info(addr);
        Ok(node)
    }

    fn model_info(&self) -> Result<ModelInfo, String> {
        self.model_info
            .get_or_init(|| {
                let tokenizer = self.engine.weight_file().served_tokenizer()?.clone();
                Ok(ModelInfo {
                    model_id: self.model_id.clone(),
                    layers: self.engine.config().num_layers as u32,
                    context_len: self.engine.max_session_len() as u32,
                    tokenizer,
                    commitment: self.engine.identity().commitment,
                })
            })
            .clone()
    }

    async fn serve_connection(self: Arc<Self>, conn: Connection) {
        let remote = conn.remote_id();
        self.conns.adopt(remote, &conn);
        loop {
            tokio::select! {
                bi = conn.accept_bi() => match bi {
                    Ok((send, recv)) => {
                        // Admitted here, in the order the peer opened its streams, so the
                        // caps hold exactly whatever the task scheduler does.
                        let admitted = self.admit_request(remote);
                        let inner = self.clone();
                        tokio::spawn(async move {
                            inner.serve_request(remote, admitted, send, recv).await
                        });
                    }
                    Err(_) => break,
                },
                uni = conn.accept_uni() => match uni {
                    Ok(mut recv) => match self.streams.try_acquire(remote) {
                        Ok(permit) => {
                            let inner = self.clone();
                            tokio::spawn(async move {
                                inner.handle_data(remote, recv).await;
                                drop(permit);
                            });
                        }
                        Err((reason, message)) => {
                            self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                            self.counters.refused(reason);
                            tracing::debug!(peer = %remote.fmt_short(), %reason, "stopped a data stream: {message}");
                            let _ = recv.stop(iroh::endpoint::VarInt::from_u32(
                                crate::net::limits::OVER_LIMIT_CLOSE_CODE,
                            ));
                        }
                    },
                    Err(_) => break,
                },
            }
        }
        self.conns.forget(remote, &conn);
    }

    /// A stream permit for one more request of `remote`, within its stream cap and its
    /// request rate.
    fn admit_request(&self, remote: NodeId) -> Result<StreamPermit, Refusal> {
        let permit = self.streams.try_acquire(remote)?;
        let admitted = lock(&self.request_rate).admit(remote, now_ms());
        if let Err(refusal) = admitted {
            self.ban_if_abusive(remote);
            return Err(refusal);
        }
        Ok(permit)
    }

    /// Counts an undecodable request or data stream of `remote` against it (many refusals'
    /// worth: honest peers never send one), banning it once it has too many.
    fn strike_malformed(&self, remote: NodeId) {
        lock(&self.request_rate).strike_malformed(remote, now_ms());
        self.ban_if_abusive(remote);
    }

    /// Disconnects and bans `remote` when it keeps sending past its refusals.
    fn ban_if_abusive(&self, remote: NodeId) {
        if !lock(&self.request_rate).ignores_refusals(&remote) {
            return;
        }
        let banned = self
            .gate
            .disconnect(remote, "kept sending requests past its refusals");
        if banned {
            tracing::warn!(
                peer = %remote.fmt_short(),
                "disconnected and banned for {} s: it kept sending past its refusals",
                crate::net::limits::BAN_MS / 1000
            );
        }
    }

    /// Serves one request stream that [`Inner::admit_request`] admitted (or refused): read
    /// by the read deadline, answered, finished.
    async fn serve_request(
        self: Arc<Self>,
        remote: NodeId,
        admitted: Result<StreamPermit, Refusal>,
        mut send: iroh::endpoint::SendStream,
        mut recv: iroh::endpoint::RecvStream,
    ) {
        let reply = match admitted {
            Err((reason, message)) => {
                // Refused unread: a flood costs the node one small reply per stream. Logged
                // at debug only: a warning per refusal would let a flood fill the log.
                self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(peer = %remote.fmt_short(), %reason, "refused a request: {message}");
                self.error_msg(0, reason, message)
            }
            Ok(_permit) => {
                let request = tokio::time::timeout(self.read_deadline, read_message(&mut recv));
                match request.await {
                    Ok(Ok(msg)) => {
                        let what = msg.kind();
                        let reply = self.handle_request(remote, msg, &mut recv).await;
                        if let Message::Error {
                            reason, message, ..
                        } = &reply
                        {
                            tracing::warn!(
                                peer = %remote.fmt_short(),
                                request = what,
                                %reason,
                                "refused: {message}"
                            );
                        }
                        reply
                    }
                    Ok(Err(e)) => {
                        self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                        if matches!(e, NetError::Malformed(_)) {
                            self.strike_malformed(remote);
                        }
                        self.error_msg(0, Reason::Malformed, e.to_string())
                    }
                    Err(_) => {
                        self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            peer = %remote.fmt_short(),
                            "cut off a request stream past the read deadline"
                        );
                        self.error_msg(
                            0,
                            Reason::OverLimit,
                            format!(
                                "request not received within {} ms",
                                self.read_deadline.as_millis()
                            ),
                        )
                    }
                }
            }
        };
        // Replies go out under the same deadline: a peer that never reads its reply cannot
        // hold the stream (and its permit) open.
        let _ = tokio::time::timeout(self.read_deadline, write_message(&mut send, &reply)).await;
        let _ = send.finish();
    }

    /// This node's refusal of a request about `session`.
    fn error_msg(&self, session: u64, reason: Reason, message: String) -> Message {
        self.counters.refused(reason);
        Message::Error {
            session,
            hop: self.endpoint.id(),
            reason,
            message,
        }
    }

    fn stats(&self) -> NodeStats {
        let engine = self.engine.stats();
        let (sessions_open, sent_state_bytes) = {
            let sessions = lock(&self.sessions);
            let sent: usize = sessions.values().map(|h| lock(&h.sent).bytes()).sum();
            (sessions.len() as u64, sent as u64)
        };
        let mut counted = self.counters.snapshot();
        let pending = self.engine.pending_train_bytes().unwrap_or_default();
        // Connections the endpoint hook refused never reached the protocol: count them here.
        let refused_connections = self.gate.refused();
        if refused_connections > 0 {
            counted.rejected += refused_connections;
            *counted
                .refusals
                .entry(Reason::OverLimit.name().to_string())
                .or_default() += refused_connections;
        }
        NodeStats {
            sessions_open,
            kv_cache_bytes: engine.kv_cache_bytes,
            sent_state_bytes,
            decode_batches: engine.decode_batches,
            batched_steps: engine.batched_steps,
            train_forwards: self.train.counters.forwards.load(Ordering::Relaxed),
            train_backwards: self.train.counters.backwards.load(Ordering::Relaxed),
            train_commits: self.train.counters.commits.load(Ordering::Relaxed),
            train_aborts: self.train.counters.aborts.load(Ordering::Relaxed),
            train_jobs: self.train.jobs_open() as u64,
            train_pending_bytes: pending.0,
            train_peak_bytes: pending.1,
            adapter_syncs: self.train.counters.syncs.load(Ordering::Relaxed),
            adapter_sync_failures: self.train.counters.sync_failures.load(Ordering::Relaxed),
            ..counted
        }
    }

    /// Drops sessions idle past the engine's timeout (a client that vanished without closing)
    /// from the engine and from the hop table.
    fn expire_idle_sessions(&self) {
        if self.engine.expire_idle_sessions().unwrap_or(0) == 0 {
            return;
        }
        let gone: Vec<u64> = lock(&self.sessions)
            .keys()
            .copied()
            .filter(|id| self.engine.session_len(*id).is_err())
            .collect();
        for id in gone {
            self.drop_session(id);
        }
    }

    /// Verifies evidence against a node (from gossip, a client or this node's own vote) and
    /// applies it to this node's reputation table; `Ok(true)` when it was new here. Nothing
    /// is taken on the sender's word.
    fn take_evidence(
        &self,
        evidence: &crate::consensus::Evidence,
    ) -> Result<bool, crate::consensus::ReceiptError> {
        let mut trust = lock(&self.trust);
        if trust.consensus.knows(evidence) {
            return Ok(false);
        }
        trust.consensus.apply(evidence, now_ms())?;
        self.counters.proofs_taken.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Publishes a proof (fraud or upstream) on the swarm's gossip topic, so every node
    /// checks it and bans its signer; deviation evidence is not gossiped.
    async fn publish_proof(&self, evidence: &crate::consensus::Evidence) {
        let Some(bytes) = gossip::encode_proof(evidence) else {
            return;
        };
        let sender = lock(&self.gossip).clone();
        if let Some(sender) = sender {
            if let Err(e) = sender.broadcast(bytes.into()).await {
                tracing::debug!("proof not published: {e}");
            }
        }
    }

    /// Removes a session from this hop (and its KV cache).
    fn drop_session(&self, session: u64) {
        lock(&self.sessions).remove(&session);
        let _ = self.engine.close_session(session);
        self.sessions_changed.notify_waiters();
    }

    async fn handle_request(
        self: &Arc<Self>,
        remote: NodeId,
        msg: Message,
        recv: &mut iroh::endpoint::RecvStream,
    ) -> Message {
        match msg {
            Message::Open(signed) => match self.open(remote, &signed) {
                Ok(()) => Message::Ok,
                Err((reason, message)) => {
                    self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                    self.error_msg(0, reason, message)
                }
            },
            Message::Ping => Message::Ok,
            Message::GetPeers { from } => {
                let me = self.endpoint.id();
                let peers = lock(&self.peers);
                // Own first, then by id: a stable order to page through.
                let mut list: Vec<_> = peers.iter().collect();
                list.sort_by_key(|(id, _)| (**id != me, *id.as_bytes()));
                Message::Peers(
                    list.into_iter()
                        .skip(from as usize)
                        .take(PEERS_PAGE)
                        .map(|(_, e)| e.signed.clone())
                        .collect(),
                )
            }
            Message::GetModelInfo => match self.model_info() {
                Ok(info) => Message::ModelInfo(info),
                Err(e) => self.error_msg(0, Reason::Compute, e),
            },
            Message::Close { session } => {
                let owned = lock(&self.sessions)
                    .get(&session)
                    .map(|s| s.open.client == remote);
                match owned {
                    Some(true) => {
                        self.drop_session(session);
                        Message::Ok
                    }
                    _ => self.error_msg(
                        session,
                        Reason::UnknownSession,
                        format!("unknown session {session}"),
                    ),
                }
            }
            Message::GetStats => Message::Stats(Box::new(self.stats())),
            Message::GetManifest => match self.engine.weight_file().known_manifest() {
                Ok(Some(manifest)) => Message::Manifest((*manifest).clone()),
                Ok(None) => self.error_msg(0, Reason::Compute, "no manifest in use".into()),
                Err(e) => self.error_msg(0, Reason::Compute, e.to_string()),
            },
            Message::Evidence(evidence) => match self.take_evidence(&evidence) {
                Ok(new) => {
                    if new {
                        self.publish_proof(&evidence).await;
                    }
                    Message::Ok
                }
                Err(e) => self.error_msg(0, Reason::Malformed, format!("evidence refused: {e}")),
            },
            Message::Replay {
                session,
                upto,
                through,
            } => self.replay(remote, session, upto, through).await,
            Message::Fill {
                session,
                start_pos,
                through,
                tokens,
            } => {
                self.fill(remote, session, start_pos, through, tokens, recv)
                    .await
            }
            Message::Handover { session, to } => self.hand_over(remote, session, to).await,
            Message::Import {
                session,
                layers,
                positions,
                sent_rows,
            } => {
                self.import(remote, session, layers, positions, sent_rows, recv)
                    .await
            }
            other => self.error_msg(
                0,
                Reason::Unexpected,
                format!("unexpected request {other:?}"),
            ),
        }
    }

    /// Admission control for a new session of `client`: its per-client cap and the node's
    /// memory budget (every open session reserves its longest KV cache and the hidden states
    /// it may keep for replays).
    fn admit_new_session(&self, client: NodeId) -> Result<(), Refusal> {
        let sessions = lock(&self.sessions);
        let held = sessions
            .values()
            .filter(|h| h.open.client == client)
            .count();
        if held >= self.max_sessions_per_client {
            return Err((
                Reason::OverLimit,
                format!(
                    "this client holds {held} sessions here, at most {} allowed",
                    self.max_sessions_per_client
                ),
            ));
        }
        if let Some(budget) = self.memory_budget {
            let per_session = self.session_reservation();
            let reserved = per_session * sessions.len() as u64;
            if reserved + per_session > budget {
                return Err((
                    Reason::OverLimit,
                    format!(
                        "memory budget: {} sessions reserve {reserved} bytes, one more needs \
                         {per_session} of the {budget} allowed",
                        sessions.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Bytes one session may hold here at its longest: its KV cache, plus (on every hop but
    /// the last) the f32 hidden states it keeps for replays.
    fn session_reservation(&self) -> u64 {
        let max_len = self.engine.max_session_len() as u64;
        let sent = if self.engine.is_last() {
            0
        } else {
            max_len * self.engine.config().hidden_size as u64 * 4
        };
        self.engine.kv_bytes_per_session() + sent
    }

    /// Checks a session-open (signature, sender, model, route, freshness) and sets the
    /// session up on this hop.
    fn open(&self, remote: NodeId, signed: &SignedOpen) -> Result<(), Refusal> {
        let open = signed
            .verify()
            .map_err(|e| (Reason::BadSignature, e.to_string()))?;
        if open.client != remote {
            return Err((
                Reason::NotAllowed,
                "a session-open must be sent by the client that signed it".into(),
            ));
        }
        if open.model_id != self.model_id {
            return Err((
                Reason::WrongModel,
                format!(
                    "model {} requested, this node serves {}",
                    open.model_id, self.model_id
                ),
            ));
        }
        let adapter = match &open.adapter {
            None => None,
            Some(_) if !open.replicas.is_empty() => {
                return Err((
                    Reason::BadRoute,
                    "adapter sessions run unreplicated for now".to_string(),
                ))
            }
            Some(name) => Some(self.engine.adapter(name).ok_or_else(|| {
                (
                    Reason::WrongModel,
                    format!("adapter `{name}` requested, this node has no adapter of that name"),
                )
            })?),
        };
        let me = self.endpoint.id();
        let num_layers = self.engine.config().num_layers as u32;
        let place = if open.replicas.is_empty() {
            None
        } else {
            Some(check_replicas(
                &open.route,
                &open.replicas,
                &open.referees,
                num_layers,
                open.codec,
                me,
            )?)
        };
        let index = match &place {
            Some(p) => p.stage,
            None => check_route(&open.route, num_layers, me)?,
        };
        let layers = &open.route[index].layers;
        let slice = self.engine.layers();
        if (layers.start as usize) < slice.start || layers.end as usize > slice.end {
            return Err((
                Reason::BadRoute,
                format!("route asks layers {layers:?}, this node holds {slice:?}"),
            ));
        }
        let codec = Codec::from_u8(open.codec).map_err(|e| (Reason::Malformed, e.to_string()))?;
        let existing_hop = lock(&self.sessions).get(&open.session).cloned();
        if existing_hop.is_none() && self.leaving.load(Ordering::Relaxed) {
            return Err((Reason::Leaving, "this node is leaving the swarm".into()));
        }
        if existing_hop.is_none() {
            self.admit_new_session(open.client)?;
        }
        // Last, so that only opens this node would accept use up a nonce.
        lock(&self.opens_seen).admit(open.client, open.nonce, open.timestamp_ms, now_ms())?;
        // The same client re-opening a session it holds here is a re-route after a failure:
        // adopt the new route and keep the KV cache (replayed positions overwrite it).
        match existing_hop.as_ref().map(|h| h.open.client) {
            Some(client) if client == remote => {}
            Some(_) => {
                return Err((
                    Reason::NotAllowed,
                    format!("session {} belongs to another client", open.session),
                ))
            }
            None => self.engine.open_session(open.session).map_err(|e| {
                let reason = match e.kind() {
                    crate::ErrorKind::SessionsFull => Reason::OverLimit,
                    _ => Reason::Compute,
                };
                (reason, e.to_string())
            })?,
        }
        self.counters
            .sessions_opened
            .fetch_add(1, Ordering::Relaxed);
        let session = open.session;
        let context = Mutex::new(open.prompt.clone());
        // What this hop sent stays valid while its layers stay the same.
        let sent = match &existing_hop {
            Some(old) if old.layers() == (layers.start as usize..layers.end as usize) => {
                old.sent.clone()
            }
            _ => Arc::default(),
        };
        let route = crate::net::proto::route_nodes(&open.route);
        let mut state = HopState::new(open.client, &route, index, self.max_step_positions)
            .ok_or_else(|| {
                (
                    Reason::BadRoute,
                    "this node is not on the route".to_string(),
                )
            })?;
        // Attempts seen before the re-open stay stale after it.
        if let Some(old) = &existing_hop {
            state.inherit(&lock(&old.state));
        }
        // A re-open keeps the adapter version the session started with.
        let adapter = match existing_hop.as_ref().map(|h| h.adapter.clone()) {
            Some(held @ Some(_)) => held,
            _ => adapter,
        };
        let replication = place.map(|place| {
            let version = crate::engine::WeightVersion {
                layers: layers.start as usize..layers.end as usize,
                ..self.engine.version()
            };
            let rep = replicated::Replication::new(
                place,
                crate::consensus::receipt::weight_hash(&version),
            );
            // A re-open (a referee added after a split) keeps the KV cache, so its chain too.
            if let Some(old) = existing_hop.as_ref().and_then(|h| h.replication.as_ref()) {
                rep.inherit(old);
            }
            rep
        });
        lock(&self.sessions).insert(
            session,
            Arc::new(HopSession {
                open,
                index,
                codec,
                context,
                sent,
                state: Mutex::new(state),
                replication,
                adapter,
            }),
        );
        Ok(())
    }
}

/// The build receipts name: crate version, target architecture and OS (replicas that
/// declare the same build and kernel path may vote `exact`).
fn build_id() -> String {
    format!(
        "neuroshard-core {} {}-{}",
        crate::VERSION,
        std::env::consts::ARCH,
        std::env::consts::OS
    )
}

/// The kernel path receipts declare: SIMD path, compute mode, compute threads and whether
/// products are chunk-invariant. Two honest replicas with equal declarations run the same
/// arithmetic, so votes compare them exactly (`VoteOutput::declared`).
fn kernel_declaration(engine: &ShardEngine) -> String {
    format!(
        "{}/{:?}/t{}{}",
        crate::kernels::KernelPath::detect().name(),
        engine.mode(),
        rayon::current_num_threads(),
        if engine.options().chunk_invariant {
            "/chunk-invariant"
        } else {
            ""
        }
    )
    .to_lowercase()
}
