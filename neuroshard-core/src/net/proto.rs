//! Messages of the inference protocol (`neuroshard/infer/8`), postcard-encoded.
//!
//! Control requests (open, close) use a bi-directional stream: one request, one reply. The data
//! plane uses one uni-directional stream per message: `Step` (client to first hop), `Hidden`
//! followed by a wire frame (hop to next hop), `Token` (last hop to client), `Error` (any hop
//! to the client, naming itself). Streams are cheap in QUIC, and a message per stream keeps
//! framing trivial and failures isolated.
// Items the `internals` feature re-exports for this crate's own tests and benches stay `pub`.
#![cfg_attr(not(feature = "internals"), allow(unreachable_pub, dead_code))]

use super::{NetError, NodeId, Reason};
use crate::model::sampling::SamplingParams;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::ops::Range;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// ALPN of the inference protocol.
pub const INFER_ALPN: &[u8] = b"neuroshard/infer/8";
/// Largest control message accepted (the prompt travels in `SessionOpen`).
pub(crate) const MAX_CONTROL: usize = 1 << 20;
/// How long dialing a peer may take before it counts as unreachable.
pub(crate) const DIAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What an entry node tells clients about the model, so they need no model file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Model id (routes and announcements must match it).
    pub model_id: String,
    /// Transformer layers in the model.
    pub layers: u32,
    /// Longest session.
    pub context_len: u32,
    /// Tokenizer, chat template, EOS ids.
    pub tokenizer: crate::model::tokenizer::TokenizerInfo,
    /// Header hash and tensors root of the model: with `tokenizer` they hash to `model_id`,
    /// so the client checks that the tokenizer and template are the model's own.
    pub commitment: crate::model::identity::ModelCommitment,
}

/// Largest reply a client accepts for model info (a tokenizer with its merges is a few MB;
/// Gemma's is 33 MB).
pub(crate) const MAX_MODEL_INFO: usize = 64 << 20;
/// Most layers a peer may say a model has: route planning and per-layer tables are sized by
/// it. The largest open models have about 130.
pub(crate) const MAX_MODEL_LAYERS: u32 = 1024;
/// Longest context a peer may claim (4 Mi positions).
pub(crate) const MAX_CONTEXT_LEN: u32 = 1 << 22;
/// Most positions one `Step` (or `Hidden` step) carries: clients split longer inputs into
/// steps of this many positions, and nodes refuse longer ones by default, so one message
/// cannot buy minutes of compute. Within a step, hops still pipeline chunks.
pub const MAX_STEP_POSITIONS: u32 = 2048;
/// Announcements per `Peers` reply: replies stay small, and a client pages through a big
/// swarm (at most [`super::peers::MAX_PEERS`] nodes in all).
pub const PEERS_PAGE: usize = 128;
/// Longest model id accepted (ids are hex digests).
pub(crate) const MAX_MODEL_ID_LEN: usize = 128;

impl ModelInfo {
    /// Checks the numbers an entry node sent before anything is sized by them (the tokenizer
    /// is checked when it is imported: [`crate::Tokenizer::import`]).
    pub fn check(&self) -> Result<(), NetError> {
        let bad = |what: String| Err(NetError::Malformed(format!("model info: {what}")));
        if self.layers == 0 || self.layers > MAX_MODEL_LAYERS {
            return bad(format!(
                "{} layers (accepted: 1..={MAX_MODEL_LAYERS})",
                self.layers
            ));
        }
        if self.context_len == 0 || self.context_len > MAX_CONTEXT_LEN {
            return bad(format!(
                "a context of {} positions (accepted: 1..={MAX_CONTEXT_LEN})",
                self.context_len
            ));
        }
        if self.model_id.is_empty()
            || self.model_id.len() > MAX_MODEL_ID_LEN
            || !self.model_id.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return bad(format!(
                "a model id of {} bytes that is not alphanumeric",
                self.model_id.len()
            ));
        }
        // Sizes first (import checks them again), so the hash below runs on bounded input.
        crate::model::tokenizer::Tokenizer::check_sizes(&self.tokenizer)
            .map_err(|e| NetError::Malformed(format!("model info: {e}")))?;
        let hashed = self.commitment.model_id(Some(&self.tokenizer));
        if hashed != self.model_id {
            return bad(format!(
                "the tokenizer and chat template served hash to model id {hashed}, not to the \
                 {} the entry claims: they are not that model's",
                self.model_id
            ));
        }
        Ok(())
    }
}

/// A snapshot of a node's counters and memory (operators and tests read them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeStats {
    /// Steps computed (`Step` or `Hidden` messages processed).
    pub steps: u64,
    /// Fill requests computed (replays after a failover).
    pub fills: u64,
    /// Replay requests served (hidden states re-sent to a new successor).
    pub replays: u64,
    /// Sessions whose KV cache this node handed to a replica.
    pub handovers_out: u64,
    /// Sessions whose KV cache this node received from a leaving node.
    pub handovers_in: u64,
    /// Messages refused.
    pub rejected: u64,
    /// Sessions opened (re-opens included).
    pub sessions_opened: u64,
    /// Sessions open now.
    pub sessions_open: u64,
    /// Time spent computing steps and fills, in microseconds.
    pub compute_us: u64,
    /// Bytes held by the KV caches of the open sessions (allocated capacity).
    pub kv_cache_bytes: u64,
    /// Bytes held by the hidden states kept for replays (what this hop sent to its successor,
    /// per open session, so a replacement successor can be refilled).
    pub sent_state_bytes: u64,
    /// Hidden-state frame bytes sent to successors (steps, fills and replays).
    pub hidden_bytes_sent: u64,
    /// Hidden-state frame bytes received from predecessors.
    pub hidden_bytes_received: u64,
    /// Decode batches of two or more sessions' steps run together.
    pub decode_batches: u64,
    /// Session steps that ran inside those batches.
    pub batched_steps: u64,
    /// Refusals and failures this node reported, by reason ([`Reason::name`]).
    pub refusals: std::collections::BTreeMap<String, u64>,
    /// Evidence against nodes this node verified and applied: found in its own votes, sent
    /// by clients, or delivered by gossip.
    pub proofs_taken: u64,
    /// Training micro-batches this node ran forward.
    pub train_forwards: u64,
    /// Training micro-batches this node ran backward.
    pub train_backwards: u64,
    /// Training steps committed here.
    pub train_commits: u64,
    /// Training steps aborted here.
    pub train_aborts: u64,
    /// Training jobs holding a lease here now.
    pub train_jobs: u64,
    /// Estimated bytes the graphs of training micro-batches waiting for their backward hold
    /// now (bounded by the node's training memory budget).
    pub train_pending_bytes: u64,
    /// The most `train_pending_bytes` has been.
    pub train_peak_bytes: u64,
    /// Adapters this node fetched from a same-layers peer that held a newer certified state.
    pub adapter_syncs: u64,
    /// Adapter fetches that failed or were refused (a certificate no allowed trainer signed,
    /// tensors that do not hash to it, a peer gone).
    pub adapter_sync_failures: u64,
}

/// One hop of a session's route, as the client planned it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteHop {
    /// The node running the hop.
    pub node: NodeId,
    /// Layers it runs.
    pub layers: Range<u32>,
    /// Where to dial it.
    pub addrs: Vec<SocketAddr>,
}

/// The nodes of `route`, first hop first (what the protocol machines know of a route).
pub(crate) fn route_nodes(route: &[RouteHop]) -> Vec<NodeId> {
    route.iter().map(|h| h.node).collect()
}

/// What the client asks every hop to set up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionOpen {
    /// Session id (chosen by the client, random).
    pub session: u64,
    /// The client: the only node allowed to send steps, and where tokens go.
    pub client: NodeId,
    /// Model the session runs.
    pub model_id: String,
    /// The route, first hop first.
    pub route: Vec<RouteHop>,
    /// Wire codec byte for hidden states between hops (see [`crate::wire::Codec`]).
    pub codec: u8,
    /// Sampling, applied by the last hop.
    pub sampling: SamplingParams,
    /// Prompt ids (the last hop needs the context for the repetition penalty).
    pub prompt: Vec<u32>,
    /// When the client made the request (ms since the Unix epoch). Hops refuse opens dated
    /// outside their replay window.
    pub timestamp_ms: u64,
    /// Random, fresh for every open the client signs: a hop refuses a (client, nonce) it has
    /// seen inside the replay window, so a captured open cannot be sent again.
    pub nonce: u64,
    /// KV hand-over this open authorises: `(from, to)` lets node `to` import the session's
    /// cache from node `from` (a node that is leaving the swarm).
    pub handover: Option<(NodeId, NodeId)>,
    /// The last hop returns the logits of each step (`Logits` + an f32 frame) instead of
    /// sampling a token: the client decodes itself (beam search, constrained decoding).
    pub return_logits: bool,
    /// Weights on top of the base model the session runs: a trained adapter's name, or
    /// `None` for the base weights (which `model_id` names). Nodes serve the base only
    /// until training lands, and refuse other adapters.
    pub adapter: Option<String>,
    /// Replicated sessions (`--redundancy K`, K >= 2): `replicas[i]` lists every node that
    /// runs `route[i].layers` (`route[i]` among them). Each replica sends its output, as a
    /// [`Message::Ballot`], to every replica of the next range (or, from the last range,
    /// its logits to the client), and every receiver votes ([`crate::consensus`]). Empty
    /// for an unreplicated session.
    pub replicas: Vec<Vec<RouteHop>>,
    /// Audited sessions: `referees[i]`, when set, is one of `replicas[i]` that computes every
    /// step of range `i` beside the voters but is outside their vote: its ballot is the
    /// reference for every receiver that trusts it (`Consensus::refereed_vote`), so a
    /// colluding majority is overruled and a vote without a majority still ends. Empty, or
    /// one entry per range.
    pub referees: Vec<Option<NodeId>>,
}

impl SessionOpen {
    /// The referee of range `i`, if the session is audited there.
    pub fn referee(&self, i: usize) -> Option<NodeId> {
        self.referees.get(i).copied().flatten()
    }

    /// Most replicas of any range (1 for an unreplicated session).
    pub fn redundancy(&self) -> usize {
        self.replicas.iter().map(Vec::len).max().unwrap_or(1).max(1)
    }

    /// Every node of the session: each range's replicas, or the route's hops.
    pub fn members(&self) -> Vec<&RouteHop> {
        if self.replicas.is_empty() {
            self.route.iter().collect()
        } else {
            self.replicas.iter().flatten().collect()
        }
    }
}

/// What travels with one replica's output ([`Message::Ballot`]): what it computed from, its
/// signed receipt, its signature on the frame as sent, and its upstream's signature on the
/// input it was given (see [`crate::consensus::SignedBallot`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BallotClaim {
    /// What the replica computed from.
    pub input: crate::consensus::InputContext,
    /// Its receipt (input hash, output hash, weight version, chain).
    pub receipt: crate::consensus::SignedReceipt,
    /// Its signature on the frame payload it sent to this receiver.
    pub frame: crate::consensus::SignedFrame,
    /// The accepted input's sender's signature on it (none on the first range, fed by the
    /// client's tokens).
    pub upstream: Option<crate::consensus::SignedFrame>,
}

/// A [`SessionOpen`] signed by the client's key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedOpen {
    /// postcard-encoded [`SessionOpen`].
    pub body: Vec<u8>,
    /// ed25519 signature of `body` by the client.
    pub signature: Vec<u8>,
}

impl SignedOpen {
    /// Signs `open` with the client's key.
    pub fn sign(open: &SessionOpen, key: &iroh::SecretKey) -> Result<Self, NetError> {
        let body = postcard::to_allocvec(open).map_err(|e| NetError::Malformed(e.to_string()))?;
        Ok(SignedOpen {
            signature: key.sign(&body).to_bytes().to_vec(),
            body,
        })
    }

    /// Decodes and checks that the named client signed it.
    pub fn verify(&self) -> Result<SessionOpen, NetError> {
        let open: SessionOpen =
            postcard::from_bytes(&self.body).map_err(|e| NetError::Malformed(e.to_string()))?;
        let sig: [u8; 64] = self
            .signature
            .as_slice()
            .try_into()
            .map_err(|_| NetError::BadSignature(open.client.fmt_short().to_string()))?;
        open.client
            .verify(&self.body, &iroh::Signature::from_bytes(&sig))
            .map_err(|_| NetError::BadSignature(open.client.fmt_short().to_string()))?;
        Ok(open)
    }
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Request (bi stream): set up a session on this hop.
    Open(SignedOpen),
    /// Request (bi stream): are you alive? Replied with `Ok`.
    Ping,
    /// Request (bi stream): one page of the signed announcements this node knows, from
    /// index `from` (replied with `Peers`, at most [`PEERS_PAGE`] of them).
    GetPeers {
        /// Index of the first announcement wanted (the node's own is index 0).
        from: u32,
    },
    /// Reply: a page of signed announcements, the node's own first, then by node id. A page
    /// shorter than [`PEERS_PAGE`] is the last.
    Peers(Vec<super::SignedAnnouncement>),
    /// Request (bi stream): what a client needs to run the model (replied with `ModelInfo`).
    GetModelInfo,
    /// Reply: model id, layer count, context length, tokenizer.
    ModelInfo(ModelInfo),
    /// Request (bi stream): drop a session.
    Close {
        /// The session.
        session: u64,
    },
    /// Reply to a request.
    Ok,
    /// Reply to a request, or an error report to the client (uni stream).
    Error {
        /// The session concerned (0 if none).
        session: u64,
        /// The node blamed: the reporter itself, or its successor when `reason` is
        /// [`Reason::SuccessorUnreachable`]. Clients accept nothing else (see `client.rs`).
        hop: NodeId,
        /// Why, as a typed code.
        reason: Reason,
        /// Details for people (logs, error messages); never acted on.
        message: String,
    },
    /// Client to first hop: token ids at positions `start_pos..`.
    Step {
        /// The session.
        session: u64,
        /// The client's attempt number: grows with every step it sends in the session (a
        /// retry is a new attempt). Hops drop attempts they have seen or older ones.
        attempt: u64,
        /// Position of the first token.
        start_pos: u32,
        /// The tokens.
        tokens: Vec<u32>,
    },
    /// Hop to next hop: hidden states at positions `start_pos..step_end`; wire frames follow
    /// on the same stream, one per chunk of a long step, in position order.
    Hidden {
        /// The session.
        session: u64,
        /// The attempt of the client's step this relays (see [`Message::Step`]).
        attempt: u64,
        /// Position of the first row.
        start_pos: u32,
        /// Position after the step's last row: the last hop samples the token there.
        step_end: u32,
    },
    /// Request (bi stream), client to hop `i`: send the hidden states you sent for positions
    /// `0..upto` again, as a `Fill`, to your current successor (it replaced a failed node).
    Replay {
        /// The session.
        session: u64,
        /// Positions to replay.
        upto: u32,
        /// Index of the last hop that needs the fill.
        through: u32,
    },
    /// Request (bi stream): compute positions `start_pos..` into the KV cache without sampling,
    /// and pass the result on while this hop's index is below `through`. To the first hop
    /// (from the client) `tokens` holds the input; to any other hop (from its predecessor)
    /// `tokens` is empty and a wire frame follows. Replied after the whole fill is done.
    Fill {
        /// The session.
        session: u64,
        /// Position of the first row.
        start_pos: u32,
        /// Index of the last hop to fill.
        through: u32,
        /// Input ids (first hop only).
        tokens: Vec<u32>,
    },
    /// Hop to client (uni stream): this node is leaving the swarm; `replacement` holds the
    /// same layers and can take the session's KV cache.
    Leaving {
        /// The session.
        session: u64,
        /// The leaving node (checked against the connection's authenticated id).
        node: NodeId,
        /// A replica of the hop's layers, if the node knows one.
        replacement: Option<RouteHop>,
    },
    /// Request (bi stream), client to a leaving hop: hand the session's KV cache to `to`
    /// (already opened there by a session-open naming this hand-over).
    Handover {
        /// The session.
        session: u64,
        /// The replica taking over.
        to: RouteHop,
    },
    /// Request (bi stream), leaving hop to its replica: the session's cache for `layers`,
    /// `positions` long. `2 x layers` wire frames follow (K then V per layer, f32), then one
    /// frame of the hidden states the hop had sent, if `sent_rows > 0`.
    Import {
        /// The session.
        session: u64,
        /// Layers of the cache.
        layers: Range<u32>,
        /// Positions cached.
        positions: u32,
        /// Rows of sent hidden states that follow.
        sent_rows: u32,
    },
    /// Request (bi stream): the node's counters (replied with `Stats`).
    GetStats,
    /// Reply: what the node did so far.
    Stats(Box<NodeStats>),
    /// Last hop to client (uni stream), for sessions opened with `return_logits`: the logits
    /// predicting `position`; an f32 wire frame `[1, 1, vocab]` follows.
    Logits {
        /// The session.
        session: u64,
        /// Position the logits predict (one past the step's last input).
        position: u32,
    },
    /// Replica to receiver (uni stream), replicated sessions only: one replica's output for
    /// the step `start_pos..step_end` (one wire frame follows: the hidden states, f16 or f32;
    /// from the last range, the f32 logits `[1, 1, vocab]` predicting `step_end`).
    Ballot {
        /// The session.
        session: u64,
        /// The attempt of the client's step.
        attempt: u64,
        /// Position of the step's first row.
        start_pos: u32,
        /// Position after the step's last row.
        step_end: u32,
        /// Input context, receipt and signatures.
        claim: Box<BallotClaim>,
    },
    /// Receiver to client (uni stream), replicated sessions only: what a vote found. The
    /// client checks the evidence itself ([`crate::consensus::Consensus::apply`]); a missing
    /// replica counts only when most of the vote's receivers report it.
    VoteReport {
        /// The session.
        session: u64,
        /// The step's first position.
        start_pos: u32,
        /// The range whose replicas were voted on.
        range: u32,
        /// Signed evidence against deviating, equivocating or lying replicas.
        evidence: Vec<crate::consensus::Evidence>,
        /// Expected replicas whose ballots did not count.
        missing: Vec<NodeId>,
        /// Whether a majority agreed.
        accepted: bool,
        /// The frame claims of the ballots that did not count: two receivers' claims by
        /// one sender for one step with different frames prove it sent two.
        claims: Vec<crate::consensus::SignedFrame>,
    },
    /// Last hop to client: the sampled token at `position`.
    Token {
        /// The session.
        session: u64,
        /// Position of the token.
        position: u32,
        /// The token id.
        token: u32,
    },
    /// Request (bi stream), anyone to a node: evidence against a node (a client found it in
    /// vote reports). The node verifies it, applies it, and gossips fraud and upstream
    /// proofs to the swarm; replied `Ok`, or `Error` (`malformed`) when it proves nothing.
    Evidence(crate::consensus::Evidence),
    /// Request (bi stream): the manifest (per-tensor hashes) this node checked its weights
    /// against, replied with `Manifest`. A node that must not hash a whole model file fetches
    /// it from a peer and checks it against the id it pinned (`WeightFile::use_peer_manifest`).
    GetManifest,
    /// Reply: a model manifest. Nothing in it is believed until it hashes to a pinned id.
    Manifest(crate::model::identity::ModelManifest),
}

impl Message {
    /// The message's name, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Open(_) => "open",
            Message::Ping => "ping",
            Message::GetPeers { .. } => "get-peers",
            Message::Peers(_) => "peers",
            Message::GetModelInfo => "get-model-info",
            Message::ModelInfo(_) => "model-info",
            Message::Close { .. } => "close",
            Message::Ok => "ok",
            Message::Error { .. } => "error",
            Message::Step { .. } => "step",
            Message::Hidden { .. } => "hidden",
            Message::Replay { .. } => "replay",
            Message::Fill { .. } => "fill",
            Message::Leaving { .. } => "leaving",
            Message::Handover { .. } => "handover",
            Message::Import { .. } => "import",
            Message::GetStats => "get-stats",
            Message::Stats(_) => "stats",
            Message::Logits { .. } => "logits",
            Message::Token { .. } => "token",
            Message::Ballot { .. } => "ballot",
            Message::VoteReport { .. } => "vote-report",
            Message::Evidence(_) => "evidence",
            Message::GetManifest => "get-manifest",
            Message::Manifest(_) => "manifest",
        }
    }
}

/// Dials `node` at `addrs` for protocol `alpn`, giving up after [`DIAL_TIMEOUT`].
pub(crate) async fn dial_alpn(
    endpoint: &iroh::Endpoint,
    node: NodeId,
    addrs: &[SocketAddr],
    alpn: &[u8],
) -> Result<iroh::endpoint::Connection, NetError> {
    let addr = addrs
        .iter()
        .fold(iroh::EndpointAddr::new(node), |a, s| a.with_ip_addr(*s));
    tokio::time::timeout(DIAL_TIMEOUT, endpoint.connect(addr, alpn))
        .await
        .map_err(|_| NetError::Timeout {
            what: format!("dialing {}", node.fmt_short()),
            ms: DIAL_TIMEOUT.as_millis() as u64,
        })?
        .map_err(|e| NetError::Io(format!("dialing {}: {e}", node.fmt_short())))
}

/// Sends `msg` (and `frame` after it, when given) on a new uni stream of `conn`.
pub(crate) async fn send_uni<T: Serialize>(
    conn: &iroh::endpoint::Connection,
    msg: &T,
    frame: Option<&[u8]>,
) -> Result<(), NetError> {
    let io = |e: String| NetError::Io(e);
    let mut send = conn.open_uni().await.map_err(|e| io(e.to_string()))?;
    write_postcard(&mut send, msg).await?;
    if let Some(frame) = frame {
        send.write_all(frame).await.map_err(|e| io(e.to_string()))?;
    }
    send.finish().map_err(|e| io(e.to_string()))
}

/// One request on a new bi stream of `conn`; the reply may be at most `limit` bytes.
///
/// When the stream fails because the peer closed the connection, the error carries the
/// peer's close reason (a refusal says why) rather than quinn's bare "connection lost",
/// which is what a write racing the close reports.
pub(crate) async fn request_on<Req: Serialize, Reply: serde::de::DeserializeOwned>(
    conn: &iroh::endpoint::Connection,
    msg: &Req,
    limit: usize,
) -> Result<Reply, NetError> {
    let exchange = async {
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| NetError::Io(e.to_string()))?;
        write_postcard(&mut send, msg).await?;
        send.finish().map_err(|e| NetError::Io(e.to_string()))?;
        read_postcard(&mut recv, limit).await
    };
    exchange.await.map_err(|e| match (&e, conn.close_reason()) {
        (NetError::Io(_), Some(reason)) => NetError::Io(reason.to_string()),
        _ => e,
    })
}

/// Writes a length-prefixed message.
pub async fn write_message<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &Message,
) -> Result<(), NetError> {
    write_postcard(w, msg).await
}

/// Reads a length-prefixed message (at most [`MAX_CONTROL`] bytes).
pub async fn read_message<R: AsyncRead + Unpin>(r: &mut R) -> Result<Message, NetError> {
    read_message_limited(r, MAX_CONTROL).await
}

/// Reads a length-prefixed message of at most `max` bytes (checked before allocating).
pub(crate) async fn read_message_limited<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Message, NetError> {
    read_postcard(r, max).await
}

/// Writes any control value as a little-endian `u32` length and its postcard bytes (the
/// framing of every protocol's control messages).
pub(crate) async fn write_postcard<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
) -> Result<(), NetError> {
    let body = postcard::to_allocvec(msg).map_err(|e| NetError::Malformed(e.to_string()))?;
    let len =
        u32::try_from(body.len()).map_err(|_| NetError::Malformed("message too large".into()))?;
    w.write_all(&len.to_le_bytes())
        .await
        .map_err(|e| NetError::Io(e.to_string()))?;
    w.write_all(&body)
        .await
        .map_err(|e| NetError::Io(e.to_string()))
}

/// Reads what [`write_postcard`] wrote, at most `max` bytes (checked before allocating).
pub(crate) async fn read_postcard<R: AsyncRead + Unpin, T: serde::de::DeserializeOwned>(
    r: &mut R,
    max: usize,
) -> Result<T, NetError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)
        .await
        .map_err(|e| NetError::Io(e.to_string()))?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(NetError::Malformed(format!(
            "control message of {len} bytes exceeds {max}"
        )));
    }
    // Memory grows with the bytes that really arrive, not with the length a peer claims.
    let mut body = Vec::with_capacity(len.min(64 << 10));
    r.take(len as u64)
        .read_to_end(&mut body)
        .await
        .map_err(|e| NetError::Io(e.to_string()))?;
    if body.len() != len {
        return Err(NetError::Io(format!(
            "control message cut short: {} of {len} bytes",
            body.len()
        )));
    }
    postcard::from_bytes(&body).map_err(|e| NetError::Malformed(e.to_string()))
}
