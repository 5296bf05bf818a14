//! [`Client`]: opens inference sessions on a route of nodes and drives them step by step.
//!
//! The client signs a session-open and sends it to every hop, then per step sends token ids to
//! the first hop and waits (with a deadline) for the last hop's token or any hop's error.
//! [`BlockingSession`] adapts a session to [`crate::generate`]'s synchronous loop.
// Items the `internals` feature re-exports for this crate's own tests and benches stay `pub`.
#![cfg_attr(not(feature = "internals"), allow(unreachable_pub, dead_code))]

use crate::generate::TokenBackend;
use crate::model::sampling::SamplingParams;
use crate::net::connections::Connections;
use crate::net::endpoint::{bind, EndpointOptions};
use crate::net::peers::PeerSet;
use crate::net::peers::MAX_PEERS;
use crate::net::proto::{
    read_message_limited, request_on, route_nodes, write_message, Message, RouteHop, SessionOpen,
    SignedOpen,
};
use crate::net::proto::{
    ModelInfo, NodeStats, MAX_CONTROL, MAX_MODEL_INFO, MAX_STEP_POSITIONS, PEERS_PAGE,
};
use crate::net::recovery::{plan_refill, RefillPlan};
use crate::net::route::RouteOptions;
use crate::net::{lock, now_ms, NetError, NodeId, Reason};
use crate::protocol::client_session::{
    ClientSession, Failure, GiveUp, Recovery, Report, SessionStats, Verdict,
};
use crate::wire::{read_frame, Codec, DEFAULT_MAX_FRAME};
use iroh::endpoint::Connection;
use iroh::{Endpoint, EndpointAddr, SecretKey};
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

mod replicated;

/// What a hop sends a session's client, routed to the session's inbox with the sender's
/// authenticated id (the session accepts each kind only from the route members allowed to
/// send it).
#[derive(Debug)]
struct FromHop {
    /// The node that sent it (iroh authenticated the connection).
    from: NodeId,
    item: Inbound,
}

/// What a hop sends a session's client.
#[derive(Debug)]
enum Inbound {
    /// A control message (`Token`, `Error`, `Leaving`).
    Message(Message),
    /// The logits predicting `position` (sessions opened with `return_logits`).
    Logits {
        /// Position predicted.
        position: u32,
        /// One value per vocabulary entry.
        values: Vec<f32>,
    },
    /// One last-range replica's signed logits for the step `..step_end` (replicated sessions).
    Ballot {
        /// The attempt of the step.
        attempt: u64,
        /// Position after the step's last input (the logits predict it).
        step_end: u32,
        /// The ballot, its sender the connection's authenticated peer.
        ballot: Box<crate::consensus::SignedBallot>,
    },
}

type Inbox = mpsc::UnboundedSender<FromHop>;

struct Inner {
    endpoint: Endpoint,
    key: SecretKey,
    conns: Connections,
    sessions: Mutex<HashMap<u64, Inbox>>,
    /// The client's votes over last-range logits, the evidence it checked and its
    /// reputation table (which nodes its routes may use).
    trust: Mutex<crate::consensus::Consensus>,
}

/// What a session asks of its hops beyond the route, codec and sampling.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SessionExtras {
    /// The last hop returns each step's logits instead of sampling
    /// ([`RemoteSession::step_logits`]).
    pub return_logits: bool,
    /// A trained LoRA adapter to run with (`None`: the base weights). Each hop keeps the
    /// version it opened with until the session ends.
    pub adapter: Option<String>,
}

/// A client endpoint that can run sessions on any route.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.inner.endpoint.id().fmt_short().to_string())
            .finish()
    }
}

impl Client {
    /// Binds a client endpoint (offline loopback by default).
    pub async fn new(key: SecretKey, options: EndpointOptions) -> Result<Client, NetError> {
        let endpoint = bind(key.clone(), &options).await?;
        Ok(Client {
            inner: Arc::new(Inner {
                endpoint,
                key,
                conns: Connections::default(),
                sessions: Mutex::new(HashMap::new()),
                trust: Mutex::default(),
            }),
        })
    }

    /// A client with a fresh key on the default endpoint (offline, 127.0.0.1, any port).
    pub async fn bind_default() -> Result<Client, NetError> {
        Client::new(SecretKey::generate(), EndpointOptions::default()).await
    }

    /// The client's node id.
    pub fn id(&self) -> NodeId {
        self.inner.endpoint.id()
    }

    /// The endpoint (a trainer dials its own protocol on it).
    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.inner.endpoint
    }

    /// The client's key (a trainer signs its commits with it).
    pub(crate) fn key(&self) -> &SecretKey {
        &self.inner.key
    }

    /// Signs and sends a session-open to every hop of `route`; fails (naming the hop) if any
    /// hop refuses, closing the session on the hops that accepted.
    pub async fn open_session(
        &self,
        route: Vec<RouteHop>,
        model_id: &str,
        codec: Codec,
        sampling: SamplingParams,
        prompt: Vec<u32>,
    ) -> Result<RemoteSession, NetError> {
        self.open_session_with(
            route,
            model_id,
            codec,
            sampling,
            prompt,
            &SessionExtras::default(),
        )
        .await
    }

    /// [`Client::open_session`] with `extras`: logits instead of tokens, an adapter.
    pub async fn open_session_with(
        &self,
        route: Vec<RouteHop>,
        model_id: &str,
        codec: Codec,
        sampling: SamplingParams,
        prompt: Vec<u32>,
        extras: &SessionExtras,
    ) -> Result<RemoteSession, NetError> {
        let open = self.new_open(route, model_id, codec, sampling, prompt, extras);
        self.open_signed(open, &self.inner.key).await
    }

    /// A fresh session-open of this client (new session id, nonce and time) on `route`, with
    /// `extras` (logits, adapter).
    fn new_open(
        &self,
        route: Vec<RouteHop>,
        model_id: &str,
        codec: Codec,
        sampling: SamplingParams,
        prompt: Vec<u32>,
        extras: &SessionExtras,
    ) -> SessionOpen {
        SessionOpen {
            session: random_u64(),
            client: self.id(),
            model_id: model_id.to_string(),
            route,
            codec: codec as u8,
            sampling,
            prompt,
            timestamp_ms: now_ms(),
            nonce: random_u64(),
            handover: None,
            return_logits: extras.return_logits,
            adapter: extras.adapter.clone(),
            replicas: Vec::new(),
            referees: Vec::new(),
        }
    }

    /// Sends an already built open, signed with `signer` (tests use a wrong signer).
    pub async fn open_signed(
        &self,
        open: SessionOpen,
        signer: &SecretKey,
    ) -> Result<RemoteSession, NetError> {
        let signed = SignedOpen::sign(&open, signer)?;
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.inner.sessions).insert(open.session, tx);
        let machine = ClientSession::new(open.session, route_nodes(&open.route), 0);
        let mut session = RemoteSession {
            client: self.clone(),
            fed: open.prompt.clone(),
            open,
            rx,
            step_timeout: Duration::from_secs(30),
            step_timeout_per_position: DEFAULT_STEP_TIMEOUT_PER_POSITION,
            max_step_positions: MAX_STEP_POSITIONS as usize,
            opened: Vec::new(),
            leaving: Vec::new(),
            machine,
            attempt: 0,
            trust: replicated::SessionTrust::default(),
            audit_plan: None,
        };
        let members: Vec<RouteHop> = session.open.members().into_iter().cloned().collect();
        for hop in members {
            // A hop that never answers must not hang the open: it counts as unreachable.
            let reply = tokio::time::timeout(
                session.step_timeout,
                self.request(&hop, &Message::Open(signed.clone())),
            )
            .await
            .unwrap_or_else(|_| {
                Err(NetError::Timeout {
                    what: format!(
                        "the reply to the session-open from {}",
                        hop.node.fmt_short()
                    ),
                    ms: session.step_timeout.as_millis() as u64,
                })
            });
            match reply {
                Ok(Message::Ok) => session.opened.push(hop),
                Ok(Message::Error {
                    reason, message, ..
                }) => {
                    session.close().await;
                    return Err(refused_by(&hop, reason, message));
                }
                Ok(other) => {
                    session.close().await;
                    return Err(NetError::Malformed(format!("unexpected reply {other:?}")));
                }
                Err(e) => {
                    session.close().await;
                    // Name the unreachable hop so a caller can plan around it.
                    return Err(hop_failed(&hop, e.to_string()));
                }
            }
        }
        Ok(session)
    }

    /// Plans a route for a `layers`-layer model from `peers` and opens a session on it; a hop
    /// that refuses or cannot be reached is excluded and the route re-planned (at most 3
    /// times). Returns the session and the nodes given up on.
    #[allow(clippy::too_many_arguments)]
    pub async fn open_on_swarm(
        &self,
        peers: &PeerSet,
        layers: usize,
        model_id: &str,
        codec: Codec,
        sampling: SamplingParams,
        prompt: Vec<u32>,
        exclude: Vec<NodeId>,
    ) -> Result<(RemoteSession, Vec<NodeId>), NetError> {
        self.open_on_swarm_with(
            peers,
            layers,
            model_id,
            codec,
            sampling,
            prompt,
            exclude,
            &SessionExtras::default(),
        )
        .await
    }

    /// [`Client::open_on_swarm`] with `extras`: logits instead of tokens, an adapter.
    #[allow(clippy::too_many_arguments)]
    pub async fn open_on_swarm_with(
        &self,
        peers: &PeerSet,
        layers: usize,
        model_id: &str,
        codec: Codec,
        sampling: SamplingParams,
        prompt: Vec<u32>,
        mut exclude: Vec<NodeId>,
        extras: &SessionExtras,
    ) -> Result<(RemoteSession, Vec<NodeId>), NetError> {
        let mut last = None;
        for _ in 0..4 {
            let opts = RouteOptions {
                exclude: exclude.clone(),
                adapter: extras.adapter.clone(),
                ..RouteOptions::default()
            };
            let route: Vec<RouteHop> = peers.plan_route(layers, now_ms(), &opts)?.to_hops();
            match self
                .open_session_with(route, model_id, codec, sampling, prompt.clone(), extras)
                .await
            {
                Ok(session) => return Ok((session, exclude)),
                Err(e @ NetError::HopFailed { node: Some(n), .. }) => {
                    exclude.push(n);
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| NetError::Io("could not open a session".into())))
    }

    /// One request/response on a bi stream.
    async fn request(&self, hop: &RouteHop, msg: &Message) -> Result<Message, NetError> {
        let conn = self.connection(hop.node, &hop.addrs).await?;
        request_on(&conn, msg, MAX_CONTROL).await
    }

    /// A live connection to `node`, dialed at `addrs` if needed. Each new connection gets a
    /// task that routes the tokens and errors hops send back to their sessions.
    async fn connection(
        &self,
        node: NodeId,
        addrs: &[std::net::SocketAddr],
    ) -> Result<Connection, NetError> {
        let (conn, dialed) = self
            .inner
            .conns
            .get_or_dial(&self.inner.endpoint, node, addrs)
            .await?;
        if !dialed {
            return Ok(conn);
        }
        let node_id = node;
        let inner = self.inner.clone();
        let incoming = conn.clone();
        tokio::spawn(async move {
            while let Ok(mut recv) = incoming.accept_uni().await {
                let inner = inner.clone();
                tokio::spawn(async move {
                    // Vote reports carry evidence (every ballot of a vote): larger than a
                    // control message, still bounded.
                    let Ok(msg) =
                        read_message_limited(&mut recv, replicated::MAX_VOTE_REPORT).await
                    else {
                        return;
                    };
                    let session = match &msg {
                        Message::Token { session, .. }
                        | Message::Error { session, .. }
                        | Message::Logits { session, .. }
                        | Message::Ballot { session, .. }
                        | Message::VoteReport { session, .. } => *session,
                        // Only a node may say that it itself is leaving.
                        Message::Leaving { session, node, .. } if *node == node_id => *session,
                        _ => return,
                    };
                    let item = match msg {
                        Message::Logits { position, .. } => {
                            match read_frame(&mut recv, DEFAULT_MAX_FRAME).await {
                                Ok(frame) => match frame.as_frame().to_f32() {
                                    Ok(values) => Inbound::Logits {
                                        position,
                                        values: values.into_owned(),
                                    },
                                    Err(_) => return,
                                },
                                Err(_) => return,
                            }
                        }
                        Message::Ballot {
                            attempt,
                            start_pos,
                            step_end,
                            claim,
                            ..
                        } => match replicated::read_logits_ballot(
                            &mut recv, node_id, session, start_pos, *claim,
                        )
                        .await
                        {
                            Some(ballot) => Inbound::Ballot {
                                attempt,
                                step_end,
                                ballot: Box::new(ballot),
                            },
                            None => return,
                        },
                        other => Inbound::Message(other),
                    };
                    if let Some(tx) = lock(&inner.sessions).get(&session) {
                        let _ = tx.send(FromHop {
                            from: node_id,
                            item,
                        });
                    }
                });
            }
        });
        Ok(conn)
    }

    /// One request/response with any node by address (`limit`: largest reply accepted).
    async fn request_addr(
        &self,
        addr: &EndpointAddr,
        msg: &Message,
        limit: usize,
    ) -> Result<Message, NetError> {
        let addrs: Vec<std::net::SocketAddr> = addr.ip_addrs().copied().collect();
        let conn = self.connection(addr.id, &addrs).await?;
        request_on(&conn, msg, limit).await
    }

    /// The swarm as `entry` sees it: its signed announcements, verified into a fresh PeerSet
    /// for `model_id` (a lying entry cannot forge other nodes' announcements).
    pub async fn fetch_peers(
        &self,
        entry: &EndpointAddr,
        model_id: &str,
    ) -> Result<PeerSet, NetError> {
        let mut peers = PeerSet::new(model_id);
        // Page through the entry's view; a page over the limit or past MAX_PEERS in all ends
        // it (a hostile entry cannot make the client hold more).
        let mut from = 0usize;
        while from < MAX_PEERS {
            let request = Message::GetPeers { from: from as u32 };
            let reply = self.request_addr(entry, &request, MAX_CONTROL).await?;
            let Message::Peers(page) = reply else {
                return Err(NetError::Malformed(format!(
                    "expected peers, got {reply:?}"
                )));
            };
            if page.len() > PEERS_PAGE {
                return Err(NetError::Malformed(format!(
                    "a page of {} peers, at most {PEERS_PAGE} expected",
                    page.len()
                )));
            }
            let now = now_ms();
            for signed in &page {
                // Invalid or foreign announcements are skipped, not fatal.
                let _ = peers.insert(signed, now);
            }
            if page.len() < PEERS_PAGE {
                break;
            }
            from += page.len();
        }
        Ok(peers)
    }

    /// Round-trip time of one `Ping` to `hop` (the network part of a step, for benchmarks).
    pub async fn ping(&self, hop: &RouteHop) -> Result<Duration, NetError> {
        let t0 = std::time::Instant::now();
        match self.request(hop, &Message::Ping).await? {
            Message::Ok => Ok(t0.elapsed()),
            other => Err(hop_failed(hop, format!("unexpected reply {other:?}"))),
        }
    }

    /// A node's counters (what it computed, replayed, handed over).
    pub async fn fetch_stats(&self, node: &EndpointAddr) -> Result<NodeStats, NetError> {
        match self
            .request_addr(node, &Message::GetStats, MAX_CONTROL)
            .await?
        {
            Message::Stats(stats) => Ok(*stats),
            other => Err(NetError::Malformed(format!(
                "expected stats, got {other:?}"
            ))),
        }
    }

    /// Model id, layer count and tokenizer from an entry node: no model file needed.
    pub async fn fetch_model_info(&self, entry: &EndpointAddr) -> Result<ModelInfo, NetError> {
        match self
            .request_addr(entry, &Message::GetModelInfo, MAX_MODEL_INFO)
            .await?
        {
            Message::ModelInfo(info) => {
                info.check()?;
                Ok(info)
            }
            // The entry answered for itself, whoever it names.
            Message::Error {
                reason, message, ..
            } => Err(blamed_by(entry.id, entry.id, reason, message)),
            other => Err(NetError::Malformed(format!(
                "expected model info, got {other:?}"
            ))),
        }
    }

    /// Asks `node` for the manifest it checks its weights against (per-tensor hashes). The
    /// reply is only well-formed here; whether it is the pinned model's is for
    /// `WeightFile::use_peer_manifest` to decide.
    pub async fn fetch_manifest(
        &self,
        node: &EndpointAddr,
    ) -> Result<crate::model::identity::ModelManifest, NetError> {
        match self
            .request_addr(node, &Message::GetManifest, MAX_MODEL_INFO)
            .await?
        {
            Message::Manifest(manifest) => {
                manifest
                    .check()
                    .map_err(|e| NetError::Malformed(e.to_string()))?;
                Ok(manifest)
            }
            Message::Error {
                reason, message, ..
            } => Err(blamed_by(node.id, node.id, reason, message)),
            other => Err(NetError::Malformed(format!(
                "expected a manifest, got {}",
                other.kind()
            ))),
        }
    }

    /// Closes the endpoint.
    pub async fn shutdown(&self) {
        self.inner.endpoint.close().await;
    }
}

/// Default [`RemoteSession::step_timeout_per_position`]: a prompt is allowed 25 ms per
/// position on top of the base deadline (40 positions/s: far below any hop's prefill speed).
pub(crate) const DEFAULT_STEP_TIMEOUT_PER_POSITION: Duration = Duration::from_millis(25);

/// An open session on a route.
pub struct RemoteSession {
    client: Client,
    open: SessionOpen,
    rx: mpsc::UnboundedReceiver<FromHop>,
    /// Deadline for one step of one position; a step of `n` positions (a prompt) gets
    /// `step_timeout + n · step_timeout_per_position`.
    pub step_timeout: Duration,
    /// Extra time per position of a step (see `step_timeout`).
    pub step_timeout_per_position: Duration,
    /// Most positions per step: longer inputs go as several steps (default
    /// [`crate::net::MAX_STEP_POSITIONS`], what nodes accept by default).
    pub max_step_positions: usize,
    opened: Vec<RouteHop>,
    /// Token ids fed so far, by position (the context a replacement hop needs).
    fed: Vec<u32>,
    /// Hops that announced they are leaving, with the replica they proposed.
    leaving: Vec<(NodeId, Option<RouteHop>)>,
    /// The IO-less session machine: which reports to believe, how a failed step recovers,
    /// the recovery counters and the event log.
    machine: ClientSession,
    /// Steps sent so far (each one's attempt number): hops drop attempts older than one
    /// they have run, so a stalled stream cannot overwrite a retry's newer positions.
    attempt: u64,
    /// Replicated sessions: missing-replica reports and what the votes found.
    trust: replicated::SessionTrust,
    /// An unaudited replicated session: how to re-open it audited when a vote finds no
    /// majority (taken by the first such replay).
    audit_plan: Option<Box<replicated::AuditPlan>>,
}

impl std::fmt::Debug for RemoteSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSession")
            .field("session", &self.open.session)
            .finish_non_exhaustive()
    }
}

impl RemoteSession {
    /// The session id.
    pub fn id(&self) -> u64 {
        self.open.session
    }

    /// Sends `tokens` at positions `start_pos..` to the first hop and waits for the token at
    /// `start_pos + tokens.len()`.
    pub async fn step(&mut self, tokens: &[u32], start_pos: usize) -> Result<u32, NetError> {
        self.step_any(tokens, start_pos).await?.token()
    }

    /// Like [`RemoteSession::step`] for a session opened with `return_logits`: the logits
    /// predicting position `start_pos + tokens.len()`.
    pub async fn step_logits(
        &mut self,
        tokens: &[u32],
        start_pos: usize,
    ) -> Result<Vec<f32>, NetError> {
        self.step_any(tokens, start_pos).await?.logits()
    }

    /// One step of any length: inputs longer than `max_step_positions` go as several steps
    /// (the tokens sampled at the ends of the earlier ones are not used).
    ///
    /// A replicated step whose vote found no majority gets a referee for the range that
    /// split: a trusted node outside the vote joins, replays the prefix from the
    /// predecessor's kept hidden states, and the step is retried for it to decide
    /// (`replicated.rs`, `add_referee`). Where no referee can join that way, the step is
    /// replayed once from position 0 on an audited session (`replay_audited`).
    async fn step_any(&mut self, tokens: &[u32], start_pos: usize) -> Result<StepResult, NetError> {
        let mut result = self.step_chunks(tokens, start_pos).await;
        // Each range takes one referee at most, so this ends.
        while let Err(e) = &result {
            let Some(range) = replicated::no_majority(e)
                .then(|| self.trust.split.take())
                .flatten()
            else {
                break;
            };
            match self.add_referee(range, start_pos).await {
                Ok(done) => {
                    self.trust.note(format!(
                        "no majority in range {range} at position {start_pos}: {done}"
                    ));
                    result = self.step_chunks(tokens, start_pos).await;
                }
                Err(why) => {
                    self.trust.note(format!(
                        "no majority in range {range} at position {start_pos}, no referee \
                         joined: {why}"
                    ));
                    break;
                }
            }
        }
        match result {
            Err(e) if self.audit_plan.is_some() && replicated::no_majority(&e) => {
                self.replay_audited(tokens, start_pos, e).await
            }
            other => other,
        }
    }

    async fn step_chunks(
        &mut self,
        tokens: &[u32],
        start_pos: usize,
    ) -> Result<StepResult, NetError> {
        let cap = self.max_step_positions.max(1);
        let (mut start, mut rest) = (start_pos, tokens);
        while rest.len() > cap {
            self.step_once(&rest[..cap], start).await?;
            start += cap;
            rest = &rest[cap..];
        }
        let result = self.step_once(rest, start).await?;
        // Only the whole step (every chunk) renews the failover budget: a step whose later
        // chunk keeps failing must not earn fresh tries from its earlier chunks.
        self.machine.step_succeeded();
        Ok(result)
    }

    async fn step_once(
        &mut self,
        tokens: &[u32],
        start_pos: usize,
    ) -> Result<StepResult, NetError> {
        if !self.open.replicas.is_empty() {
            return self.step_replicated(tokens, start_pos).await;
        }
        // Reports of an earlier, failed attempt must not be mistaken for this step's; notices
        // of leaving hops are kept.
        while let Ok(FromHop { from, item }) = self.rx.try_recv() {
            if let Inbound::Message(msg @ Message::Leaving { .. }) = item {
                if self.machine.hop_index(from).is_some() {
                    self.note(msg);
                }
            }
        }
        self.fed.truncate(start_pos);
        self.fed.extend_from_slice(tokens);
        // A step boundary: nothing is in flight, so leaving hops can hand their cache over.
        for (node, replacement) in std::mem::take(&mut self.leaving) {
            if let Some(replica) = replacement {
                self.hand_over(node, replica, start_pos).await?;
            }
        }
        let first = self
            .open
            .route
            .first()
            .cloned()
            .ok_or_else(|| NetError::Malformed("empty route".into()))?;
        let conn = self.client.connection(first.node, &first.addrs).await?;
        let mut send = conn
            .open_uni()
            .await
            .map_err(|e| NetError::Io(e.to_string()))?;
        self.attempt += 1;
        let msg = Message::Step {
            session: self.open.session,
            attempt: self.attempt,
            start_pos: start_pos as u32,
            tokens: tokens.to_vec(),
        };
        write_message(&mut send, &msg).await?;
        send.finish().map_err(|e| NetError::Io(e.to_string()))?;
        let want = (start_pos + tokens.len()) as u32;
        self.machine.begin_step(want);
        // A long prompt takes longer: the deadline grows with the positions in flight.
        let allowed = self.step_timeout + self.step_timeout_per_position * tokens.len() as u32;
        let deadline = tokio::time::Instant::now() + allowed;
        loop {
            let item = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .map_err(|_| NetError::Timeout {
                    what: format!("the token at position {want}"),
                    ms: allowed.as_millis() as u64,
                })?;
            let Some(FromHop { from, item }) = item else {
                return Err(NetError::Io("client shut down".into()));
            };
            let report = match &item {
                Inbound::Message(Message::Token { position, .. }) => Report::Token {
                    position: *position,
                },
                Inbound::Logits { position, .. } => Report::Logits {
                    position: *position,
                },
                Inbound::Message(Message::Error { hop, reason, .. }) => Report::Error {
                    blamed: *hop,
                    reason: *reason,
                },
                Inbound::Message(Message::Leaving { .. }) => Report::Leaving,
                Inbound::Message(_) | Inbound::Ballot { .. } => continue,
            };
            match (self.machine.report(from, report), item) {
                (Verdict::Result, Inbound::Message(Message::Token { token, .. })) => {
                    return Ok(StepResult::Token(token))
                }
                (Verdict::Result, Inbound::Logits { values, .. }) => {
                    return Ok(StepResult::Logits(values))
                }
                (Verdict::Leaving, Inbound::Message(msg)) => self.note(msg),
                (
                    Verdict::Failed(Failure::Blamed {
                        blamed, accuser, ..
                    }),
                    Inbound::Message(Message::Error {
                        reason, message, ..
                    }),
                ) => {
                    return Err(NetError::HopFailed {
                        node: Some(blamed),
                        reason: Some(reason),
                        reporter: accuser,
                        message,
                    })
                }
                // Stale results, refused reports (counted by the machine), and pairs the
                // mapping above cannot produce.
                _ => continue,
            }
        }
    }

    /// The current route.
    pub fn route(&self) -> &[RouteHop] {
        &self.open.route
    }

    /// How the session recovered from failures and moves so far.
    pub fn stats(&self) -> SessionStats {
        self.machine.stats()
    }

    /// What went wrong during recoveries, in order (bounded, for logs).
    pub fn events(&self) -> &[String] {
        self.machine.events()
    }

    /// Hands the event log over (a generation's result carries it).
    pub fn take_events(&mut self) -> Vec<String> {
        self.machine.take_events()
    }

    /// Asks every hop of the route whether it is alive (each within `deadline`); returns the
    /// ones that did not answer.
    pub async fn probe(&self, deadline: Duration) -> Vec<NodeId> {
        let mut dead = Vec::new();
        for hop in &self.open.route {
            let alive =
                tokio::time::timeout(deadline, self.client.request(hop, &Message::Ping)).await;
            if !matches!(alive, Ok(Ok(Message::Ok))) {
                dead.push(hop.node);
            }
        }
        dead
    }

    /// Keeps what a hop sent the session that matters later: leaving notices.
    fn note(&mut self, msg: Message) {
        if let Message::Leaving {
            node, replacement, ..
        } = msg
        {
            self.leaving.push((node, replacement));
        }
    }

    /// Moves the session to `route` (same session id): hops that already hold it keep their
    /// KV cache and adopt the new route; new hops open it; hops no longer on the route are
    /// told to close it. The caller then refills the new hops ([`RemoteSession::refill`]) or
    /// replays from position 0.
    pub async fn reroute(&mut self, route: Vec<RouteHop>) -> Result<(), NetError> {
        self.open_route(route, None).await?;
        self.close_dropped().await;
        Ok(())
    }

    /// Signs an open for `route` (the context so far as its prompt, so a new last hop applies
    /// the repetition penalty to the same tokens) and sends it to every hop. Hops that had
    /// the session stay listed as opened until [`Self::close_dropped`].
    async fn open_route(
        &mut self,
        route: Vec<RouteHop>,
        handover: Option<(NodeId, NodeId)>,
    ) -> Result<(), NetError> {
        self.machine.moved(route_nodes(&route));
        self.open.route = route;
        self.open.prompt = self.fed.clone();
        self.open.handover = handover;
        self.open.timestamp_ms = now_ms();
        self.open.nonce = random_u64();
        let signed = SignedOpen::sign(&self.open, &self.client.inner.key)?;
        let mut opened = Vec::new();
        for hop in self.open.route.clone() {
            let reply = self.send_open(&hop, &signed).await;
            match reply {
                Ok(Message::Ok) => opened.push(hop),
                Ok(Message::Error {
                    reason, message, ..
                }) => return Err(refused_by(&hop, reason, message)),
                Ok(other) => return Err(hop_failed(&hop, format!("unexpected reply {other:?}"))),
                Err(e) => return Err(hop_failed(&hop, e.to_string())),
            }
        }
        for hop in &self.opened {
            if !opened.iter().any(|h| h.node == hop.node) {
                opened.push(hop.clone());
            }
        }
        self.opened = opened;
        Ok(())
    }

    /// Sends the signed open to one hop within the step deadline. The error says whether
    /// the connection or the reply was missing, and after how long, so a stalled hop can be
    /// told from an unreachable one.
    async fn send_open(&self, hop: &RouteHop, signed: &SignedOpen) -> Result<Message, NetError> {
        let started = tokio::time::Instant::now();
        let deadline = started + self.step_timeout;
        let conn = tokio::time::timeout_at(deadline, self.client.connection(hop.node, &hop.addrs))
            .await
            .map_err(|_| NetError::Timeout {
                what: format!("a connection to {}", hop.node.fmt_short()),
                ms: self.step_timeout.as_millis() as u64,
            })??;
        let connected_ms = started.elapsed().as_millis();
        tokio::time::timeout_at(
            deadline,
            request_on(&conn, &Message::Open(signed.clone()), MAX_CONTROL),
        )
        .await
        .map_err(|_| NetError::Timeout {
            what: format!("the reply to the session-open (connected after {connected_ms} ms)"),
            ms: self.step_timeout.as_millis() as u64,
        })?
    }

    /// Tells hops no longer on the route to free the session (best effort).
    async fn close_dropped(&mut self) {
        let session = self.open.session;
        let route = self.open.route.clone();
        let (keep, drop): (Vec<RouteHop>, Vec<RouteHop>) = std::mem::take(&mut self.opened)
            .into_iter()
            .partition(|h| route.iter().any(|r| r.node == h.node));
        self.opened = keep;
        for old in drop {
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                self.client.request(&old, &Message::Close { session }),
            )
            .await;
        }
    }

    /// After the route changed from `old`, fills the KV cache of the hops that are new
    /// (another node, or other layers) with positions `0..done`: the hop before the first new
    /// one replays the hidden states it sent (the client feeds the token ids when the first
    /// hop is new), and the fill runs through the last new hop. Nothing before the first new
    /// hop is recomputed.
    pub async fn refill(&mut self, old: &[RouteHop], done: usize) -> Result<(), NetError> {
        let route = &self.open.route;
        let session = self.open.session;
        let (target, msg) = match plan_refill(old, route, done) {
            RefillPlan::Nothing => return Ok(()),
            RefillPlan::FromClient { upto, through } => {
                let tokens = self
                    .fed
                    .get(..upto)
                    .ok_or_else(|| NetError::Malformed(format!("{upto} positions not fed yet")))?
                    .to_vec();
                let msg = Message::Fill {
                    session,
                    start_pos: 0,
                    through: through as u32,
                    tokens,
                };
                (route[0].clone(), msg)
            }
            RefillPlan::FromHop {
                from,
                upto,
                through,
            } => {
                let msg = Message::Replay {
                    session,
                    upto: upto as u32,
                    through: through as u32,
                };
                (route[from].clone(), msg)
            }
        };
        let reply = tokio::time::timeout(
            self.step_timeout.max(Duration::from_secs(120)),
            self.client.request(&target, &msg),
        )
        .await
        .unwrap_or_else(|_| Err(NetError::Io("no reply to the refill".into())));
        match reply {
            Ok(Message::Ok) => {
                self.machine.stats_mut().refills += 1;
                Ok(())
            }
            // A fill's failure travels back along the chain: the blamed node must be the target
            // or a hop after it, or the target takes the blame itself.
            Ok(Message::Error {
                hop,
                reason,
                message,
                ..
            }) => {
                let at = |n: NodeId| route.iter().position(|h| h.node == n);
                let blamed = match (at(target.node), at(hop)) {
                    (Some(i), Some(j)) if j >= i => hop,
                    _ => target.node,
                };
                Err(blamed_by(target.node, blamed, reason, message))
            }
            Ok(other) => Err(hop_failed(&target, format!("unexpected reply {other:?}"))),
            Err(e) => Err(hop_failed(&target, e.to_string())),
        }
    }

    /// Moves the hop run by `leaving` to `replica` with its KV cache (`done` positions). An
    /// unusable proposal is ignored (the node's exit is then handled as a failure); a failed
    /// hand-over falls back to refilling the replica.
    async fn hand_over(
        &mut self,
        leaving: NodeId,
        replica: RouteHop,
        done: usize,
    ) -> Result<(), NetError> {
        let Some(i) = self.open.route.iter().position(|h| h.node == leaving) else {
            return Ok(());
        };
        let old = self.open.route.clone();
        if replica.layers != old[i].layers || old.iter().any(|h| h.node == replica.node) {
            return Ok(());
        }
        let mut route = old.clone();
        route[i] = replica.clone();
        self.open_route(route, Some((leaving, replica.node)))
            .await?;
        let msg = Message::Handover {
            session: self.open.session,
            to: replica,
        };
        let moved =
            tokio::time::timeout(self.step_timeout, self.client.request(&old[i], &msg)).await;
        if matches!(moved, Ok(Ok(Message::Ok))) {
            self.machine.stats_mut().handovers += 1;
        } else {
            self.machine.log(format!(
                "hand-over from {} failed ({moved:?}); refilling the replica",
                leaving.fmt_short()
            ));
            self.refill(&old, done).await?;
        }
        self.close_dropped().await;
        Ok(())
    }

    /// Closes the session on every hop that opened it (best effort: a dead hop is skipped).
    pub async fn close(&mut self) {
        if !self.open.replicas.is_empty() {
            self.absorb_pending_reports();
        }
        lock(&self.client.inner.sessions).remove(&self.open.session);
        for hop in std::mem::take(&mut self.opened) {
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                self.client.request(
                    &hop,
                    &Message::Close {
                        session: self.open.session,
                    },
                ),
            )
            .await;
        }
    }
}

/// What the last hop returned for a step.
enum StepResult {
    Token(u32),
    Logits(Vec<f32>),
}

impl StepResult {
    /// The sampled token of a session that samples.
    fn token(self) -> Result<u32, NetError> {
        match self {
            StepResult::Token(token) => Ok(token),
            StepResult::Logits(_) => Err(NetError::Malformed(
                "the last hop sent logits to a session that samples".into(),
            )),
        }
    }

    /// The logits of a session opened with `return_logits`.
    fn logits(self) -> Result<Vec<f32>, NetError> {
        match self {
            StepResult::Logits(values) => Ok(values),
            StepResult::Token(_) => Err(NetError::Malformed(
                "the last hop sampled a token for a session that asked for logits".into(),
            )),
        }
    }
}

/// A hop could not be reached, or its reply made no sense.
fn hop_failed(hop: &RouteHop, message: String) -> NetError {
    NetError::HopFailed {
        node: Some(hop.node),
        reason: None,
        reporter: None,
        message,
    }
}

/// `hop` refused a request of this client, for `reason`.
fn refused_by(hop: &RouteHop, reason: Reason, message: String) -> NetError {
    NetError::HopFailed {
        node: Some(hop.node),
        reason: Some(reason),
        reporter: None,
        message,
    }
}

/// `reporter` says that `blamed` (itself, or a node after it) failed, for `reason`.
fn blamed_by(reporter: NodeId, blamed: NodeId, reason: Reason, message: String) -> NetError {
    NetError::HopFailed {
        node: Some(blamed),
        reason: Some(reason),
        reporter: (reporter != blamed).then_some(reporter),
        message,
    }
}

/// What the session machine makes of a failed step's error: a named node (with its accuser,
/// when another node named it) or nobody (a deadline, a broken stream).
fn failure_of(error: &NetError) -> Failure {
    match error {
        NetError::HopFailed {
            node: Some(blamed),
            reason,
            reporter,
            ..
        } => Failure::Blamed {
            blamed: *blamed,
            accuser: *reporter,
            reason: *reason,
        },
        _ => Failure::Unattributed,
    }
}

/// A random 64-bit value (session ids, open nonces): unpredictable to other peers.
fn random_u64() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// Re-plans a route avoiding the given nodes (failover).
pub type Replanner = Box<dyn FnMut(&[NodeId]) -> Result<Vec<RouteHop>, NetError> + Send>;

/// Runs a [`RemoteSession`] from synchronous code (e.g. [`crate::generate`] on a blocking
/// thread) through a tokio runtime handle. Do not use it on a runtime worker thread.
///
/// With a `replanner`, a failed step fails over, as the session machine
/// (`protocol::client_session`) directs: every hop is probed, and the failed one (named by the
/// error and still silent, or found by the probe) is excluded; a node blamed by another but
/// answering gets its accuser excluded instead. The route is re-planned without them, the
/// session moved to it, the new hops refilled from their predecessor's sent hidden states
/// ([`RemoteSession::refill`]) and the step retried; if the refill fails, the whole context is
/// replayed from position 0. A failure that names nobody while every hop answers retries on
/// the same route. KV caches are position-indexed and draws depend only on (seed, position),
/// so the text continues exactly as it would have without the failure.
pub struct BlockingSession {
    /// The session.
    pub session: RemoteSession,
    /// Runtime the session's IO runs on.
    pub handle: tokio::runtime::Handle,
    /// Context length of the model.
    pub context_len: usize,
    /// Re-plans around failed nodes; `None` disables failover.
    replanner: Option<Replanner>,
}

impl std::fmt::Debug for BlockingSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockingSession")
            .field("session", &self.session)
            .field("failed", &self.failed())
            .finish_non_exhaustive()
    }
}

/// Failures one step recovers from by default.
pub(crate) const DEFAULT_MAX_FAILOVERS: u32 = 3;

impl BlockingSession {
    /// A session without failover.
    pub fn new(session: RemoteSession, handle: tokio::runtime::Handle, context_len: usize) -> Self {
        BlockingSession {
            session,
            handle,
            context_len,
            replanner: None,
        }
    }

    /// Enables failover with `replanner` (at most [`DEFAULT_MAX_FAILOVERS`] per step).
    pub fn with_failover(mut self, replanner: Replanner) -> Self {
        self.replanner = Some(replanner);
        self.session
            .machine
            .set_max_failovers(DEFAULT_MAX_FAILOVERS);
        self
    }

    /// Most failures one step recovers from (0 turns failover off).
    pub fn set_max_failovers(&mut self, max: u32) {
        self.session.machine.set_max_failovers(max);
    }

    /// Treats `nodes` as failed from the start (routes avoid them).
    pub fn exclude(&mut self, nodes: &[NodeId]) {
        self.session.machine.exclude(nodes);
    }

    /// Nodes given up on so far.
    pub fn failed(&self) -> &[NodeId] {
        self.session.machine.failed()
    }

    /// One step with failover, driven by the session machine: probe, re-plan, refill (or
    /// replay `context` from position 0), retry, until the step succeeds or its tries run out.
    fn step_with_failover(
        &mut self,
        tokens: &[u32],
        start_pos: usize,
        context: &[u32],
    ) -> Result<StepResult, NetError> {
        let mut error = match self.block_on_step(tokens, start_pos) {
            Ok(result) => return Ok(result),
            Err(error) => error,
        };
        if self.replanner.is_none() {
            return Err(error);
        }
        let mut recovery = self.session.machine.step_failed(failure_of(&error));
        // The route before the move, for the refill plan (a refill always follows a re-plan,
        // which sets it).
        let mut old = Vec::new();
        loop {
            let outcome = match recovery {
                Recovery::GiveUp(why) => {
                    if let GiveUp::Exhausted { tries } = why {
                        tracing::warn!(tries, "step at {start_pos} failed for good: {error}");
                    }
                    return Err(error);
                }
                Recovery::Probe => {
                    self.session
                        .machine
                        .log(format!("step at {start_pos} failed: {error}"));
                    let dead = self
                        .handle
                        .block_on(self.session.probe(Duration::from_secs(2)));
                    recovery = self.session.machine.probed(&dead);
                    continue;
                }
                Recovery::Replan { exclude } => {
                    let replanner = self
                        .replanner
                        .as_mut()
                        .ok_or_else(|| NetError::Io("failover disabled".into()))?;
                    // No route without the failed nodes: the step fails with why.
                    let route = replanner(&exclude)?;
                    old = self.session.route().to_vec();
                    let ids = route_nodes(&route);
                    match self.handle.block_on(self.session.reroute(route)) {
                        Ok(()) => {
                            recovery = self.session.machine.rerouted(ids);
                            continue;
                        }
                        Err(e) => Err(e),
                    }
                }
                Recovery::Refill => {
                    let refilled = self.handle.block_on(self.session.refill(&old, start_pos));
                    recovery = self.session.machine.refilled(refilled.is_ok());
                    continue;
                }
                Recovery::Retry => self.block_on_step(tokens, start_pos),
                Recovery::Replay => {
                    let end = (start_pos + tokens.len()).min(context.len());
                    self.block_on_step(&context[..end], 0)
                }
            };
            match outcome {
                Ok(result) => return Ok(result),
                Err(e) => {
                    recovery = self.session.machine.step_failed(failure_of(&e));
                    error = e;
                }
            }
        }
    }

    /// Runs one step of the session on the runtime.
    fn block_on_step(&mut self, tokens: &[u32], start_pos: usize) -> Result<StepResult, NetError> {
        self.handle
            .block_on(self.session.step_any(tokens, start_pos))
    }

    /// The logits predicting position `start_pos + tokens.len()`, for a session opened with
    /// `return_logits`; fails over like [`TokenBackend::next_token`]. `context` holds every
    /// token at positions `0..start_pos + tokens.len()`.
    pub fn next_logits(
        &mut self,
        tokens: &[u32],
        start_pos: usize,
        context: &[u32],
    ) -> crate::Result<Vec<f32>> {
        Ok(self
            .step_with_failover(tokens, start_pos, context)?
            .logits()?)
    }
}

impl TokenBackend for BlockingSession {
    fn next_token(
        &mut self,
        tokens: &[u32],
        start_pos: usize,
        context: &[u32],
        _sampling: &SamplingParams,
    ) -> crate::Result<u32> {
        // The last hop samples with the parameters of the session-open and keeps the context.
        Ok(self
            .step_with_failover(tokens, start_pos, context)?
            .token()?)
    }

    fn context_len(&self) -> usize {
        self.context_len
    }
}
