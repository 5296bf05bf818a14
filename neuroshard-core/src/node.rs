//! [`Node`]: a [`ShardEngine`] slice served over iroh with the inference protocol.
//!
//! A hop accepts a signed session-open from a client, then `Step`s from that client (first hop)
//! or `Hidden` frames from its predecessor in the route (iroh authenticates the sender's id),
//! runs its layers with the session's KV cache, and forwards the new hidden state to its
//! successor, or, on the last hop, samples the next token and sends it to the client. Errors go
//! to the client naming this hop. Compute runs on tokio's blocking pool.

use crate::engine::{ForwardRequest, ShardEngine};
use crate::model::sampling::sample;
use crate::model::shard::{ShardInput, ShardOutput};
use crate::model::tokenizer::Tokenizer;
use crate::net::announce::{Announcement, SignedAnnouncement, PROTOCOL_VERSION};
use crate::net::endpoint::{bind, EndpointOptions};
use crate::net::peers::PeerSet;
use crate::net::proto::ModelInfo;
use crate::net::proto::{
    read_message, write_message, Message, SessionOpen, SignedOpen, DIAL_TIMEOUT, INFER_ALPN,
};
use crate::net::{lock, now_ms, NetError, NodeId};
use crate::wire::{read_frame, write_frame, Codec, FrameMeta, DEFAULT_MAX_FRAME};
use candle_core::{Device, Tensor};
use iroh::address_lookup::MemoryLookup;
use iroh::endpoint::Connection;
use iroh::protocol::{AcceptError, ProtocolHandler, Router};
use iroh::{Endpoint, EndpointAddr, SecretKey};
use iroh_gossip::api::Event;
use iroh_gossip::{Gossip, TopicId};
use n0_future::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Counters of what a node did (tests read them to see who served which step).
#[derive(Debug, Default)]
pub struct NodeCounters {
    /// Steps this node computed (one per `Step`/`Hidden` message processed).
    pub steps: AtomicU64,
    /// Messages refused (wrong sender, unknown session, malformed).
    pub rejected: AtomicU64,
    /// Sessions opened.
    pub sessions_opened: AtomicU64,
}

struct HopSession {
    open: SessionOpen,
    index: usize,
    codec: Codec,
    /// Last hop only: prompt + sampled tokens, for the repetition penalty.
    context: Mutex<Vec<u32>>,
}

struct Inner {
    engine: Arc<ShardEngine>,
    endpoint: Endpoint,
    model_id: String,
    sessions: Mutex<HashMap<u64, Arc<HopSession>>>,
    conns: Mutex<HashMap<NodeId, Connection>>,
    counters: NodeCounters,
    /// The swarm as gossip has shown it (this node's own announcement included).
    peers: Mutex<PeerSet>,
    /// Addresses learned from announcements, for gossip and for dialing by id.
    lookup: MemoryLookup,
    /// Built on first request (a tokenizer export is a few MB).
    model_info: OnceLock<Result<ModelInfo, String>>,
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
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            endpoint: EndpointOptions::default(),
            bootstrap: Vec::new(),
            announce_every: Duration::from_secs(2),
            announce_ttl: Duration::from_secs(10),
            capacity: 64,
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

/// The model id nodes and clients agree on: hex of the model hash.
pub fn model_id(engine: &ShardEngine) -> String {
    engine.weight_file().model_hash()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Node {
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
        endpoint_options.alpns = vec![INFER_ALPN.to_vec(), iroh_gossip::ALPN.to_vec()];
        endpoint_options.lookup = Some(lookup.clone());
        let endpoint = bind(key, &endpoint_options).await?;
        let model_id = model_id(&engine);
        let inner = Arc::new(Inner {
            peers: Mutex::new(PeerSet::new(model_id.clone())),
            model_id,
            engine,
            endpoint: endpoint.clone(),
            sessions: Mutex::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            counters: NodeCounters::default(),
            lookup,
            model_info: OnceLock::new(),
        });
        let gossip = Gossip::builder().spawn(endpoint.clone());
        let router = Router::builder(endpoint)
            .accept(INFER_ALPN, InferProtocol(inner.clone()))
            .accept(iroh_gossip::ALPN, gossip.clone())
            .spawn();
        let topic = TopicId::from_bytes(*blake3::hash(inner.model_id.as_bytes()).as_bytes());
        let bootstrap = options.bootstrap.iter().map(|a| a.id).collect();
        let (sender, mut receiver) = gossip
            .subscribe(topic, bootstrap)
            .await
            .map_err(|e| NetError::Io(format!("joining gossip: {e}")))?
            .split();
        // Announce now and periodically; forget peers whose announcements expired.
        let announcer = inner.clone();
        tokio::spawn(async move {
            loop {
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
                tokio::time::sleep(options.announce_every).await;
            }
        });
        // Verify what gossip delivers into the PeerSet; invalid announcements are dropped.
        let listener = inner.clone();
        tokio::spawn(async move {
            while let Some(event) = receiver.next().await {
                let Ok(Event::Received(msg)) = event else {
                    continue;
                };
                let Ok(signed) = SignedAnnouncement::from_bytes(&msg.content) else {
                    continue;
                };
                let accepted = lock(&listener.peers).insert(&signed, now_ms());
                if accepted.is_ok() {
                    if let Ok(ann) = signed.verify() {
                        let addr = ann
                            .addrs
                            .iter()
                            .fold(EndpointAddr::new(ann.node), |a, s| a.with_ip_addr(*s));
                        listener.lookup.add_endpoint_info(addr);
                    }
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

    /// What the node did so far.
    pub fn counters(&self) -> &NodeCounters {
        &self.inner.counters
    }

    /// A snapshot of the swarm as this node sees it.
    pub fn peers(&self) -> PeerSet {
        lock(&self.inner.peers).clone()
    }

    /// Stops accepting, closes the endpoint (peers see the node gone).
    pub async fn shutdown(&self) {
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
            weight_updates: self.engine.version().updates,
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

    fn model_info(&self) -> Result<ModelInfo, String> {
        self.model_info
            .get_or_init(|| {
                let tokenizer = Tokenizer::for_model(self.engine.weight_file())
                    .and_then(|t| t.export())
                    .map_err(|e| e.to_string())?;
                Ok(ModelInfo {
                    model_id: self.model_id.clone(),
                    layers: self.engine.config().num_layers as u32,
                    context_len: self.engine.max_session_len() as u32,
                    tokenizer,
                })
            })
            .clone()
    }

    async fn serve_connection(self: Arc<Self>, conn: Connection) {
        let remote = conn.remote_id();
        lock(&self.conns).insert(remote, conn.clone());
        loop {
            tokio::select! {
                bi = conn.accept_bi() => match bi {
                    Ok((mut send, mut recv)) => {
                        let inner = self.clone();
                        tokio::spawn(async move {
                            let reply = match read_message(&mut recv).await {
                                Ok(msg) => inner.handle_request(remote, msg).await,
                                Err(e) => inner.error_msg(0, e.to_string()),
                            };
                            let _ = write_message(&mut send, &reply).await;
                            let _ = send.finish();
                        });
                    }
                    Err(_) => break,
                },
                uni = conn.accept_uni() => match uni {
                    Ok(recv) => {
                        let inner = self.clone();
                        tokio::spawn(async move { inner.handle_data(remote, recv).await });
                    }
                    Err(_) => break,
                },
            }
        }
        let mut conns = lock(&self.conns);
        if conns
            .get(&remote)
            .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            conns.remove(&remote);
        }
    }

    fn error_msg(&self, session: u64, message: String) -> Message {
        Message::Error {
            session,
            hop: self.endpoint.id(),
            message,
        }
    }

    async fn handle_request(&self, remote: NodeId, msg: Message) -> Message {
        match msg {
            Message::Open(signed) => match self.open(remote, &signed) {
                Ok(()) => Message::Ok,
                Err(e) => {
                    self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                    self.error_msg(0, e)
                }
            },
            Message::Ping => Message::Ok,
            Message::GetPeers => {
                let me = self.endpoint.id();
                let peers = lock(&self.peers);
                let mut list: Vec<_> = peers
                    .iter()
                    .map(|(id, e)| (*id == me, e.signed.clone()))
                    .collect();
                list.sort_by_key(|(mine, _)| !*mine);
                Message::Peers(list.into_iter().map(|(_, s)| s).collect())
            }
            Message::GetModelInfo => match self.model_info() {
                Ok(info) => Message::ModelInfo(info),
                Err(e) => self.error_msg(0, e),
            },
            Message::Close { session } => {
                let owned = lock(&self.sessions)
                    .get(&session)
                    .map(|s| s.open.client == remote);
                match owned {
                    Some(true) => {
                        lock(&self.sessions).remove(&session);
                        let _ = self.engine.close_session(session);
                        Message::Ok
                    }
                    _ => self.error_msg(session, format!("unknown session {session}")),
                }
            }
            other => self.error_msg(0, format!("unexpected request {other:?}")),
        }
    }

    fn open(&self, remote: NodeId, signed: &SignedOpen) -> Result<(), String> {
        let open = signed.verify().map_err(|e| e.to_string())?;
        if open.client != remote {
            return Err("a session-open must be sent by the client that signed it".into());
        }
        if open.model_id != self.model_id {
            return Err(format!(
                "model {} requested, this node serves {}",
                open.model_id, self.model_id
            ));
        }
        let me = self.endpoint.id();
        let index = open
            .route
            .iter()
            .position(|h| h.node == me)
            .ok_or("this node is not on the session's route")?;
        let layers = &open.route[index].layers;
        let slice = self.engine.layers();
        if (layers.start as usize) < slice.start
            || layers.end as usize > slice.end
            || layers.start >= layers.end
        {
            return Err(format!(
                "route asks layers {layers:?}, this node holds {slice:?}"
            ));
        }
        let codec = Codec::from_u8(open.codec).map_err(|e| e.to_string())?;
        // The same client re-opening a session it holds here is a re-route after a failure:
        // adopt the new route and keep the KV cache (replayed positions overwrite it).
        let existing = lock(&self.sessions)
            .get(&open.session)
            .map(|s| s.open.client);
        match existing {
            Some(client) if client == remote => {}
            Some(_) => {
                return Err(format!(
                    "session {} belongs to another client",
                    open.session
                ))
            }
            None => self
                .engine
                .open_session(open.session)
                .map_err(|e| e.to_string())?,
        }
        self.counters
            .sessions_opened
            .fetch_add(1, Ordering::Relaxed);
        let session = open.session;
        let context = Mutex::new(open.prompt.clone());
        lock(&self.sessions).insert(
            session,
            Arc::new(HopSession {
                open,
                index,
                codec,
                context,
            }),
        );
        Ok(())
    }

    async fn handle_data(self: Arc<Self>, remote: NodeId, mut recv: iroh::endpoint::RecvStream) {
        let msg = match read_message(&mut recv).await {
            Ok(m) => m,
            Err(_) => {
                self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let (session_id, start_pos) = match &msg {
            Message::Step {
                session, start_pos, ..
            }
            | Message::Hidden { session, start_pos } => (*session, *start_pos),
            _ => {
                self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let Some(hop) = lock(&self.sessions).get(&session_id).cloned() else {
            self.counters.rejected.fetch_add(1, Ordering::Relaxed);
            return;
        };
        // Only the session's client may start a step, only the predecessor may send hidden
        // states: iroh has authenticated `remote`.
        let expected = if hop.index == 0 {
            hop.open.client
        } else {
            hop.open.route[hop.index - 1].node
        };
        let input = match msg {
            Message::Step { tokens, .. } if hop.index == 0 && remote == expected => {
                Tensor::from_slice(&tokens, (1, tokens.len()), &Device::Cpu).map(ShardInput::Tokens)
            }
            Message::Hidden { .. } if hop.index > 0 && remote == expected => {
                match read_frame(&mut recv, DEFAULT_MAX_FRAME).await {
                    Ok(frame) => match frame.as_frame().to_tensor() {
                        Ok(t) => Ok(ShardInput::Hidden(t)),
                        Err(e) => return self.report(&hop, e.to_string()).await,
                    },
                    Err(e) => return self.report(&hop, e.to_string()).await,
                }
            }
            _ => {
                self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let input = match input {
            Ok(i) => i,
            Err(e) => return self.report(&hop, e.to_string()).await,
        };
        let fed = match &input {
            ShardInput::Tokens(t) | ShardInput::Hidden(t) => t.dim(1).unwrap_or(0),
        };
        let layers = hop.open.route[hop.index].layers.clone();
        let engine = self.engine.clone();
        let req = ForwardRequest::new(input)
            .session(session_id, start_pos as usize)
            .layers(layers.start as usize..layers.end as usize)
            .last_logits_only();
        let out = tokio::task::spawn_blocking(move || engine.forward(req)).await;
        let out = match out {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => return self.report(&hop, e.to_string()).await,
            Err(e) => return self.report(&hop, format!("compute task failed: {e}")).await,
        };
        self.counters.steps.fetch_add(1, Ordering::Relaxed);
        let result = match out {
            ShardOutput::Hidden(h) => self.forward_hidden(&hop, start_pos, &h).await,
            ShardOutput::Logits(l) => self.send_token(&hop, start_pos as usize + fed, &l).await,
        };
        if let Err((failed, e)) = result {
            self.report_node(&hop, failed, e.to_string()).await;
        }
    }

    /// Sends the hidden state to the successor. A failure to reach it blames the successor,
    /// so the client replaces that node, not this one.
    async fn forward_hidden(
        &self,
        hop: &HopSession,
        start_pos: u32,
        hidden: &Tensor,
    ) -> Result<(), (NodeId, NetError)> {
        let me = self.endpoint.id();
        let next = hop.open.route.get(hop.index + 1).ok_or_else(|| {
            (
                me,
                NetError::Malformed("hidden state produced by the last hop".into()),
            )
        })?;
        let blame = |e: String| {
            (
                next.node,
                NetError::Io(format!("successor unreachable: {e}")),
            )
        };
        let conn = self
            .connection(next.node, &next.addrs)
            .await
            .map_err(|e| blame(e.to_string()))?;
        let mut send = conn.open_uni().await.map_err(|e| blame(e.to_string()))?;
        let session = hop.open.session;
        write_message(&mut send, &Message::Hidden { session, start_pos })
            .await
            .map_err(|e| blame(e.to_string()))?;
        write_frame(
            &mut send,
            hidden,
            hop.codec,
            FrameMeta {
                session,
                position: start_pos,
            },
            false,
        )
        .await
        .map_err(|e| blame(e.to_string()))?;
        send.finish().map_err(|e| blame(e.to_string()))
    }

    /// Samples the token at `position` (one past the last input position) and sends it to the
    /// client. The draw depends only on (seed, position), like local generation.
    async fn send_token(
        &self,
        hop: &HopSession,
        position: usize,
        logits: &Tensor,
    ) -> Result<(), (NodeId, NetError)> {
        let me = self.endpoint.id();
        self.send_token_inner(hop, position, logits)
            .await
            .map_err(|e| (me, e))
    }

    async fn send_token_inner(
        &self,
        hop: &HopSession,
        position: usize,
        logits: &Tensor,
    ) -> Result<(), NetError> {
        let row: Vec<f32> = logits
            .flatten_all()
            .and_then(|l| l.to_vec1())
            .map_err(|e| NetError::Malformed(e.to_string()))?;
        let token = {
            let mut context = lock(&hop.context);
            // Positions 0..position are the tokens fed so far; a retried step overwrites.
            context.truncate(position);
            let t = sample(&row, &hop.open.sampling, position, &context)
                .map_err(|e| NetError::Malformed(e.to_string()))?;
            context.push(t);
            t
        };
        let conn = self.connection(hop.open.client, &[]).await?;
        let mut send = conn
            .open_uni()
            .await
            .map_err(|e| NetError::Io(e.to_string()))?;
        write_message(
            &mut send,
            &Message::Token {
                session: hop.open.session,
                position: position as u32,
                token,
            },
        )
        .await?;
        send.finish().map_err(|e| NetError::Io(e.to_string()))
    }

    /// Tells the client this hop failed on its session.
    async fn report(&self, hop: &HopSession, message: String) {
        self.report_node(hop, self.endpoint.id(), message).await
    }

    /// Tells the client that `failed` (this hop or its successor) failed on its session.
    async fn report_node(&self, hop: &HopSession, failed: NodeId, message: String) {
        self.counters.rejected.fetch_add(1, Ordering::Relaxed);
        if let Ok(conn) = self.connection(hop.open.client, &[]).await {
            if let Ok(mut send) = conn.open_uni().await {
                let msg = Message::Error {
                    session: hop.open.session,
                    hop: failed,
                    message,
                };
                let _ = write_message(&mut send, &msg).await;
                let _ = send.finish();
            }
        }
    }

    /// A live connection to `node`: cached (either direction), or dialed at `addrs`.
    async fn connection(
        &self,
        node: NodeId,
        addrs: &[std::net::SocketAddr],
    ) -> Result<Connection, NetError> {
        if let Some(c) = lock(&self.conns).get(&node) {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        lock(&self.conns).remove(&node);
        let addr = addrs
            .iter()
            .fold(EndpointAddr::new(node), |a, s| a.with_ip_addr(*s));
        let conn = tokio::time::timeout(DIAL_TIMEOUT, self.endpoint.connect(addr, INFER_ALPN))
            .await
            .map_err(|_| NetError::Timeout {
                what: format!("dialing {}", node.fmt_short()),
                ms: DIAL_TIMEOUT.as_millis() as u64,
            })?
            .map_err(|e| NetError::Io(format!("dialing {}: {e}", node.fmt_short())))?;
        lock(&self.conns).insert(node, conn.clone());
        Ok(conn)
    }
}
