//! [`SwarmSession`]: text generation over a swarm the client only knows by one or more
//! addresses, with failover. This is what `neuroshard generate --peers`, the Python `Client`
//! and the C `ns_client_*` functions run.
//!
//! Connecting asks the first entry node that answers for the model info (model id, layer count,
//! context length, tokenizer and chat template), so the client needs no model file. Each
//! generation fetches the swarm's signed announcements from an entry, plans a route, opens a
//! session on it and runs [`crate::generate`] through it. A failed step is retried on a route
//! re-planned around the failed node, asking every entry in turn for the current swarm.

use crate::client::{BlockingSession, Client, RemoteSession, Replanner};
use crate::error::{Error, Result};
use crate::generate::{
    generate_from, generate_until, FinishReason, GenerationConfig, GenerationOutput, StopStrings,
};
use crate::model::sampling::SamplingParams;
use crate::model::tokenizer::{ChatMessage, Tokenizer};
use crate::net::endpoint::resolve_peer_addr;
use crate::net::peers::{PeerInfo, PeerSet, TrackRecord};
use crate::net::proto::{ModelInfo, RouteHop};
use crate::net::route::RouteOptions;
use crate::net::{now_ms, NetError, NodeId};
use crate::protocol::client_session::SessionStats;
use crate::wire::Codec;
use iroh::EndpointAddr;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

/// How a [`SwarmSession`] talks to the swarm.
#[derive(Debug, Clone, PartialEq)]
pub struct SwarmOptions {
    /// Codec of the hidden states between hops.
    pub codec: Codec,
    /// How long one step may take before the client probes the route and fails over.
    pub step_timeout: Duration,
    /// Most failovers for one step.
    pub max_failovers: u32,
    /// The model id this client insists on (`--model-id`): entries that serve another
    /// model are skipped, and with them every node of another model. `None` trusts the
    /// first entry that answers (trust on first use).
    pub model_id: Option<String>,
    /// Replicas per range (`--redundancy K`): with 2 or more, each range runs on that many
    /// nodes, every receiver votes on their outputs and the client on the last range's
    /// logits (see `docs/trust.md`). 1 (the default) runs one node per range. Replicated
    /// sessions need f16 or f32 frames and do not fail over yet: a vote goes on without a
    /// minority of failed replicas.
    pub redundancy: usize,
    /// Nodes this client trusts from the start (`--trust ID`): their votes count as trusted
    /// replicas'.
    pub trust: Vec<NodeId>,
    /// A trained LoRA adapter every hop runs with (`--adapter NAME`); `None`: the base
    /// weights. Each hop keeps the adapter version it opened the session with. Sessions with
    /// an adapter run unreplicated for now.
    pub adapter: Option<String>,
}

impl Default for SwarmOptions {
    fn default() -> Self {
        SwarmOptions {
            codec: Codec::F16,
            step_timeout: Duration::from_secs(30),
            max_failovers: 3,
            model_id: None,
            redundancy: 1,
            trust: Vec::new(),
            adapter: None,
        }
    }
}

/// A text generation request: the prompt's form, sampling and stopping rules.
#[derive(Debug, Clone, PartialEq)]
pub struct TextRequest {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Sampling (greedy by default).
    pub sampling: SamplingParams,
    /// Stop strings: generation ends where the text first contains one (it is not returned).
    pub stop: Vec<String>,
    /// Wrap the prompt in the model's chat template as a user message.
    pub chat: bool,
    /// System message for `chat` (default: the template's own).
    pub system: Option<String>,
    /// Keep going through end-of-sequence tokens.
    pub ignore_eos: bool,
}

impl Default for TextRequest {
    fn default() -> Self {
        TextRequest {
            max_tokens: 128,
            sampling: SamplingParams::greedy(),
            stop: Vec::new(),
            chat: false,
            system: None,
            ignore_eos: false,
        }
    }
}

impl TextRequest {
    /// The token-level part of the request.
    pub fn generation_config(&self) -> GenerationConfig {
        GenerationConfig {
            max_tokens: self.max_tokens,
            sampling: self.sampling,
            stop_tokens: Vec::new(),
            ignore_eos: self.ignore_eos,
        }
    }
}

/// What a generation over the swarm produced and how it got there.
#[derive(Debug, Clone)]
pub struct SwarmGeneration {
    /// Tokens, text, timings and why it stopped.
    pub output: GenerationOutput,
    /// Failovers, refills, replays and hand-overs.
    pub recovery: SessionStats,
    /// What went wrong during recoveries, in order (for logs).
    pub events: Vec<String>,
    /// The route the session ended on.
    pub route: Vec<RouteHop>,
    /// Replicated sessions: the replicas of each range (empty otherwise).
    pub replicas: Vec<Vec<RouteHop>>,
    /// Replicated sessions: what the votes found (deviations, missing replicas, proofs).
    pub votes: Vec<String>,
}

/// Called with each printable piece; `ControlFlow::Break` stops the generation.
pub type OnText = Box<dyn FnMut(&str) -> ControlFlow<()> + Send>;

struct Inner {
    client: Client,
    /// The entry that served the model info first, then the others.
    entries: Vec<EndpointAddr>,
    info: ModelInfo,
    tokenizer: Tokenizer,
    options: SwarmOptions,
    /// How generations through each node ended (route cost: probation, failure rate).
    track: Arc<std::sync::Mutex<TrackRecord>>,
}

/// A client's handle on one swarm: generate and stream text, or step a session that returns
/// logits. Cheap to clone; several generations may run at once.
#[derive(Clone)]
pub struct SwarmSession {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SwarmSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwarmSession")
            .field("model_id", &self.inner.info.model_id)
            .field("layers", &self.inner.info.layers)
            .finish_non_exhaustive()
    }
}

/// Resolves peer addresses given as `<id>@<ip:port>` or plain `host:port` (see
/// [`resolve_peer_addr`]), off the async runtime's workers.
pub async fn resolve_peers(peers: &[String]) -> Result<Vec<EndpointAddr>> {
    if peers.is_empty() {
        return Err(Error::Net(NetError::Malformed(
            "no peer address given (pass at least one node address)".into(),
        )));
    }
    let peers = peers.to_vec();
    tokio::task::spawn_blocking(move || {
        peers
            .iter()
            .map(|p| resolve_peer_addr(p).map_err(Error::from))
            .collect()
    })
    .await
    .map_err(|e| Error::Internal(format!("resolving peers: {e}")))?
}

impl SwarmSession {
    /// Connects through the first of `entries` that serves the model info.
    pub async fn connect(
        client: Client,
        entries: Vec<EndpointAddr>,
        options: SwarmOptions,
    ) -> Result<SwarmSession> {
        if let Some(pinned) = &options.model_id {
            crate::model::identity::check_model_id(pinned)?;
        }
        let mut last_error = None;
        for (i, entry) in entries.iter().enumerate() {
            match client.fetch_model_info(entry).await {
                // The info is self-consistent (checked on receipt), so a matching id means
                // the tokenizer and template are the pinned model's too.
                Ok(info)
                    if options
                        .model_id
                        .as_ref()
                        .is_some_and(|m| *m != info.model_id) =>
                {
                    last_error = Some(NetError::WrongModel {
                        node: entry.id.fmt_short().to_string(),
                        theirs: info.model_id,
                        ours: options.model_id.clone().unwrap_or_default(),
                    });
                }
                Ok(info) => {
                    let tokenizer = Tokenizer::import(&info.tokenizer)?;
                    let mut ordered = vec![entry.clone()];
                    ordered.extend(
                        entries
                            .iter()
                            .enumerate()
                            .filter(|(j, e)| *j != i && e.id != entry.id)
                            .map(|(_, e)| e.clone()),
                    );
                    return Ok(SwarmSession {
                        inner: Arc::new(Inner {
                            client,
                            entries: ordered,
                            info,
                            tokenizer,
                            options,
                            track: Arc::default(),
                        }),
                    });
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(match last_error {
            Some(e) => e.into(),
            None => NetError::Malformed("no peer address given".into()).into(),
        })
    }

    /// The client endpoint the session uses.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The model's tokenizer (from the entry node).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.inner.tokenizer
    }

    /// The model id every hop must serve.
    pub fn model_id(&self) -> &str {
        &self.inner.info.model_id
    }

    /// Transformer layers in the model.
    pub fn layers(&self) -> usize {
        self.inner.info.layers as usize
    }

    /// Longest session the entry accepts (prompt and generated tokens).
    pub fn context_len(&self) -> usize {
        self.inner.info.context_len as usize
    }

    /// The entry node that served the model info.
    pub fn entry(&self) -> &EndpointAddr {
        &self.inner.entries[0]
    }

    /// The options the session was connected with.
    pub fn options(&self) -> &SwarmOptions {
        &self.inner.options
    }

    /// The swarm's verified announcements, from the first entry that answers and is not in
    /// `avoid`.
    pub async fn peer_set(&self, avoid: &[NodeId]) -> Result<PeerSet, NetError> {
        let mut peers = fetch_peer_set(
            &self.inner.client,
            &self.inner.entries,
            self.model_id(),
            avoid,
        )
        .await?;
        crate::net::lock(&self.inner.track).apply(&mut peers);
        Ok(peers)
    }

    /// The nodes of the swarm and what they serve, ordered by layers.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>> {
        Ok(self.peer_set(&[]).await?.infos(now_ms()))
    }

    /// `text` as prompt token ids: wrapped in the chat template first when `chat` is set.
    pub fn encode_prompt(&self, text: &str, chat: bool, system: Option<&str>) -> Result<Vec<u32>> {
        encode_prompt(&self.inner.tokenizer, text, chat, system)
    }

    /// Generates from `prompt` (token ids) through a freshly planned route with failover,
    /// streaming printable pieces to `on_text`. Must be called on a tokio runtime; the
    /// generation loop runs on a blocking thread.
    pub async fn generate(
        &self,
        prompt: Vec<u32>,
        config: GenerationConfig,
        on_text: OnText,
    ) -> Result<SwarmGeneration> {
        self.prepare(prompt, config.sampling)
            .await?
            .run(config, on_text)
            .await
    }

    /// Plans a route and opens a session for `prompt` without running it yet, so the caller
    /// can see the route first ([`PreparedGeneration::route`]).
    pub async fn prepare(
        &self,
        prompt: Vec<u32>,
        sampling: SamplingParams,
    ) -> Result<PreparedGeneration> {
        let (session, failed) = self.open(&prompt, sampling, false).await?;
        Ok(PreparedGeneration {
            backend: self.backend(session, failed),
            tokenizer: self.inner.tokenizer.clone(),
            prompt,
            track: self.inner.track.clone(),
        })
    }

    /// Generates text for `prompt` as `request` says (chat template, stop strings), streaming
    /// the pieces that are final to `on_text`. The returned text stops before any stop string.
    pub async fn generate_text(
        &self,
        prompt: &str,
        request: &TextRequest,
        on_text: OnText,
    ) -> Result<SwarmGeneration> {
        let ids = self.encode_prompt(prompt, request.chat, request.system.as_deref())?;
        // Shared with the generation thread, so the held-back tail can be flushed after it.
        let sink = Arc::new(std::sync::Mutex::new((
            StopStrings::new(request.stop.iter().cloned()),
            on_text,
        )));
        let filtered: OnText = {
            let sink = sink.clone();
            Box::new(move |piece| {
                let mut guard = crate::net::lock(&sink);
                let (stops, on_text) = &mut *guard;
                let (text, stop) = stops.push(piece);
                let flow = if text.is_empty() {
                    ControlFlow::Continue(())
                } else {
                    on_text(&text)
                };
                if stop {
                    ControlFlow::Break(())
                } else {
                    flow
                }
            })
        };
        let mut result = self
            .generate(ids, request.generation_config(), filtered)
            .await?;
        let stop_at = request
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| result.output.text.find(s.as_str()))
            .min();
        match stop_at {
            Some(at) => {
                result.output.text.truncate(at);
                result.output.finish = FinishReason::Stop;
            }
            None => {
                let mut guard = crate::net::lock(&sink);
                let (stops, on_text) = &mut *guard;
                let tail = stops.finish();
                if !tail.is_empty() {
                    let _ = on_text(&tail);
                }
            }
        }
        Ok(result)
    }

    /// Opens a session whose last hop returns logits, for callers that decode themselves
    /// (beam search, constrained decoding): see [`LogitsSession::step`]. `max_length` bounds
    /// the positions the session may use (default and upper bound: the context length).
    pub async fn open_logits_session(&self, max_length: Option<usize>) -> Result<LogitsSession> {
        let limit = max_length
            .unwrap_or(self.context_len())
            .min(self.context_len());
        let (session, failed) = self.open(&[], SamplingParams::greedy(), true).await?;
        Ok(LogitsSession {
            backend: Some(self.backend(session, failed)),
            context: Vec::new(),
            max_length: limit,
        })
    }

    /// Opens a session that stays open across generations ([`Conversation`]): a chat that
    /// resends its whole history each turn then only computes the new tokens. The last hop
    /// samples with `sampling` for the conversation's life; a repetition penalty is refused,
    /// since that hop only sees the tokens it sampled, not the later turns' prompts.
    pub async fn open_conversation(&self, sampling: SamplingParams) -> Result<Conversation> {
        sampling.validate()?;
        if sampling.repetition_penalty != 1.0 {
            return Err(Error::Generation(
                "a kept conversation cannot use a repetition penalty".into(),
            ));
        }
        let (session, failed) = self.open(&[], sampling, false).await?;
        Ok(Conversation {
            backend: Some(self.backend(session, failed)),
            tokenizer: self.inner.tokenizer.clone(),
            sampling,
            cached: Vec::new(),
        })
    }

    /// Plans a route and opens a session on it (refusing hops are planned around).
    async fn open(
        &self,
        prompt: &[u32],
        sampling: SamplingParams,
        return_logits: bool,
    ) -> Result<(RemoteSession, Vec<NodeId>), NetError> {
        let peers = self.peer_set(&[]).await?;
        let options = &self.inner.options;
        // Spot checks: a session on trusted single replicas is now and then replicated (3 per
        // range) from its first position, so trusted nodes stay checked; where 3 replicas
        // of each range do not exist, it runs as planned.
        let mut redundancy = options.redundancy;
        let for_adapter = RouteOptions {
            adapter: options.adapter.clone(),
            ..RouteOptions::default()
        };
        if redundancy < 2 {
            let plain = peers.plan_route(self.layers(), now_ms(), &for_adapter);
            let nodes: Vec<NodeId> = plain
                .map(|r| r.hops.iter().map(|h| h.node).collect())
                .unwrap_or_default();
            // The draw first: the replicated plan is only worth making for a session drawn.
            let checkable = || {
                peers
                    .plan_replicated(self.layers(), 3, now_ms(), &for_adapter)
                    .is_ok()
            };
            if self.inner.client.spot_check_due(&nodes) && checkable() {
                tracing::info!("spot check: this session runs on 3 replicas per range");
                redundancy = 3;
            }
        }
        if redundancy >= 2 {
            for node in &options.trust {
                self.inner.client.trust(*node);
            }
            // Audits, drawn at the spot-check rate: a trusted node outside the vote
            // referees each range where one exists (docs/trust.md, "Referees").
            let client = &self.inner.client;
            let audit = client.audit_due();
            if audit {
                tracing::info!("audit: ranges with a trusted node outside the vote get a referee");
            }
            let mut session = client
                .open_replicated_with(
                    &peers,
                    self.layers(),
                    self.model_id(),
                    options.codec,
                    sampling,
                    prompt.to_vec(),
                    redundancy,
                    &crate::client::SessionExtras {
                        return_logits,
                        adapter: options.adapter.clone(),
                    },
                    audit,
                )
                .await?;
            session.step_timeout = options.step_timeout;
            return Ok((session, Vec::new()));
        }
        let (mut session, failed) = self
            .inner
            .client
            .open_on_swarm_with(
                &peers,
                self.layers(),
                self.model_id(),
                self.inner.options.codec,
                sampling,
                prompt.to_vec(),
                Vec::new(),
                &crate::client::SessionExtras {
                    return_logits,
                    adapter: self.inner.options.adapter.clone(),
                },
            )
            .await?;
        session.step_timeout = self.inner.options.step_timeout;
        Ok((session, failed))
    }

    /// A blocking driver for `session` that fails over by asking the entries for the swarm.
    fn backend(&self, session: RemoteSession, failed: Vec<NodeId>) -> BlockingSession {
        let session_is_replicated = !session.replicas().is_empty();
        let handle = tokio::runtime::Handle::current();
        let me = self.clone();
        let replan_handle = handle.clone();
        let replanner: Replanner = Box::new(move |failed: &[NodeId]| {
            let peers = replan_handle.block_on(me.peer_set(failed))?;
            let opts = RouteOptions {
                exclude: failed.to_vec(),
                adapter: me.inner.options.adapter.clone(),
                ..RouteOptions::default()
            };
            Ok(peers.plan_route(me.layers(), now_ms(), &opts)?.to_hops())
        });
        let mut backend =
            BlockingSession::new(session, handle, self.context_len()).with_failover(replanner);
        backend.exclude(&failed);
        // A replicated session's route is its replica sets: re-planning it as a plain route
        // would drop the votes, so it does not fail over (yet).
        let failovers = if session_is_replicated {
            0
        } else {
            self.inner.options.max_failovers
        };
        backend.set_max_failovers(failovers);
        backend
    }
}

/// A session opened on a planned route, ready to generate ([`SwarmSession::prepare`]).
pub struct PreparedGeneration {
    backend: BlockingSession,
    tokenizer: Tokenizer,
    prompt: Vec<u32>,
    track: Arc<std::sync::Mutex<TrackRecord>>,
}

impl std::fmt::Debug for PreparedGeneration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedGeneration")
            .field("route", &self.route())
            .finish_non_exhaustive()
    }
}

impl PreparedGeneration {
    /// The route the session starts on.
    pub fn route(&self) -> &[RouteHop] {
        self.backend.session.route()
    }

    /// Replicated sessions: the replicas of each range (empty otherwise).
    pub fn replicas(&self) -> &[Vec<RouteHop>] {
        self.backend.session.replicas()
    }

    /// Runs the generation (on a blocking thread) and closes the session.
    pub async fn run(self, config: GenerationConfig, on_text: OnText) -> Result<SwarmGeneration> {
        let PreparedGeneration {
            mut backend,
            tokenizer,
            prompt,
            track,
        } = self;
        let mut on_text = on_text;
        let (out, mut backend) = tokio::task::spawn_blocking(move || {
            let out = generate_until(
                &mut backend,
                Some(&tokenizer),
                &prompt,
                &config,
                &mut *on_text,
            );
            (out, backend)
        })
        .await
        .map_err(|e| Error::Internal(format!("generation task failed: {e}")))?;
        backend.session.close().await;
        {
            // The nodes given up on failed; the final route served the answer.
            let mut track = crate::net::lock(&track);
            for node in backend.failed() {
                track.record(*node, false);
            }
            if out.is_ok() {
                for hop in backend.session.route() {
                    track.record(hop.node, true);
                }
            }
        }
        Ok(SwarmGeneration {
            output: out?,
            recovery: backend.session.stats(),
            events: backend.session.take_events(),
            route: backend.session.route().to_vec(),
            replicas: backend.session.replicas().to_vec(),
            votes: backend.session.trust_findings().to_vec(),
        })
    }
}

/// The verified swarm from the first of `entries` (not in `avoid`) that answers.
async fn fetch_peer_set(
    client: &Client,
    entries: &[EndpointAddr],
    model_id: &str,
    avoid: &[NodeId],
) -> Result<PeerSet, NetError> {
    let mut last = NetError::Io("no entry node answered".into());
    for entry in entries.iter().filter(|e| !avoid.contains(&e.id)) {
        match client.fetch_peers(entry, model_id).await {
            Ok(peers) => return Ok(peers),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// `text` as token ids, wrapped in the chat template as a user message when `chat` is set.
pub fn encode_prompt(
    tokenizer: &Tokenizer,
    text: &str,
    chat: bool,
    system: Option<&str>,
) -> Result<Vec<u32>> {
    if !chat {
        return tokenizer.encode(text);
    }
    let mut messages = Vec::new();
    if let Some(system) = system {
        messages.push(ChatMessage::new("system", system));
    }
    messages.push(ChatMessage::new("user", text));
    tokenizer.encode(&tokenizer.apply_chat_template(&messages, true)?)
}

/// A swarm session whose last hop returns logits: the caller feeds tokens and picks the next
/// one itself. Positions advance with every step; [`LogitsSession::rewind`] goes back (for
/// beam search). Blocking: call it from a thread that is not a tokio worker.
pub struct LogitsSession {
    backend: Option<BlockingSession>,
    /// Every token fed so far, by position.
    context: Vec<u32>,
    max_length: usize,
}

impl std::fmt::Debug for LogitsSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogitsSession")
            .field("position", &self.context.len())
            .field("max_length", &self.max_length)
            .finish_non_exhaustive()
    }
}

impl LogitsSession {
    /// Feeds `tokens` at the current position and returns the logits predicting the next
    /// position (one value per vocabulary entry).
    pub fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(Error::BadInput("step needs at least one token".into()));
        }
        let start = self.context.len();
        let end = start + tokens.len();
        if end > self.max_length {
            return Err(Error::SessionTooLong {
                session: self.id(),
                requested: end,
                max: self.max_length,
            });
        }
        let backend = self
            .backend
            .as_mut()
            .ok_or_else(|| Error::Generation("the session is closed".into()))?;
        let mut context = self.context.clone();
        context.extend_from_slice(tokens);
        let logits = backend.next_logits(tokens, start, &context)?;
        self.context = context;
        Ok(logits)
    }

    /// Positions fed so far.
    pub fn position(&self) -> usize {
        self.context.len()
    }

    /// Goes back to `position` (the next step overwrites the cache from there).
    pub fn rewind(&mut self, position: usize) -> Result<()> {
        if position > self.context.len() {
            return Err(Error::BadInput(format!(
                "cannot rewind to {position}: only {} positions fed",
                self.context.len()
            )));
        }
        self.context.truncate(position);
        Ok(())
    }

    /// Most positions the session may use.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The session id on every hop.
    pub fn id(&self) -> u64 {
        self.backend.as_ref().map_or(0, |b| b.session.id())
    }

    /// Closes the session on every hop (also done on drop, best effort).
    pub fn close(&mut self) {
        if let Some(mut backend) = self.backend.take() {
            let handle = backend.handle.clone();
            handle.block_on(backend.session.close());
        }
    }
}

impl Drop for LogitsSession {
    fn drop(&mut self) {
        if let Some(mut backend) = self.backend.take() {
            // Dropped on a runtime worker, blocking would panic: close in the background.
            let handle = backend.handle.clone();
            handle.spawn(async move { backend.session.close().await });
        }
    }
}

/// A swarm session kept open across generations, with the tokens its route's caches hold.
/// Each [`Conversation::generate`] feeds only what follows the longest common prefix of its
/// prompt and those tokens (rewinding the caches where they diverge), so turn N of a chat
/// does not prefill turns 1..N-1 again. The draws depend only on (seed, position), so the
/// output equals a fresh session's; bit for bit when the nodes are chunk-invariant
/// ([`crate::EngineOptions::chunk_invariant`]), otherwise up to kernel rounding (earlier
/// turns' tokens were computed one at a time, not in one prefill). Blocking: call it from a
/// thread that is not a tokio worker.
pub struct Conversation {
    backend: Option<BlockingSession>,
    tokenizer: Tokenizer,
    sampling: SamplingParams,
    /// Tokens whose keys and values the route's caches hold, by position.
    cached: Vec<u32>,
}

impl std::fmt::Debug for Conversation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conversation")
            .field("session", &self.backend.as_ref().map(|b| b.session.id()))
            .field("cached", &self.cached.len())
            .finish_non_exhaustive()
    }
}

impl Conversation {
    /// The sampling the last hop applies.
    pub fn sampling(&self) -> &SamplingParams {
        &self.sampling
    }

    /// The tokens the route's caches hold, by position.
    pub fn cached(&self) -> &[u32] {
        &self.cached
    }

    /// How many leading tokens of `prompt` the caches already hold: the common prefix, less
    /// one when it is the whole prompt (the last token must run to produce the next).
    pub fn reusable(&self, prompt: &[u32]) -> usize {
        let common = self
            .cached
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        common.min(prompt.len().saturating_sub(1))
    }

    /// The session id on the route (`None` once closed).
    pub fn id(&self) -> Option<u64> {
        self.backend.as_ref().map(|b| b.session.id())
    }

    /// The route the session is on now (empty once closed).
    pub fn route(&self) -> Vec<RouteHop> {
        self.backend
            .as_ref()
            .map(|b| b.session.route().to_vec())
            .unwrap_or_default()
    }

    /// Replicated conversations: the replicas of each range (empty otherwise).
    pub fn replicas(&self) -> Vec<Vec<RouteHop>> {
        self.backend
            .as_ref()
            .map(|b| b.session.replicas().to_vec())
            .unwrap_or_default()
    }

    /// Replicated conversations: what the votes found so far (deviations, missing replicas,
    /// proofs; empty when every vote agreed).
    pub fn votes(&self) -> Vec<String> {
        self.backend
            .as_ref()
            .map(|b| b.session.trust_findings().to_vec())
            .unwrap_or_default()
    }

    /// Failovers and refills over the conversation's life.
    pub fn recovery(&self) -> SessionStats {
        self.backend
            .as_ref()
            .map(|b| b.session.stats())
            .unwrap_or_default()
    }

    /// Generates from `prompt` (the whole conversation so far, as token ids), computing only
    /// the tokens after [`Conversation::reusable`]`(prompt)`. A failed generation closes the
    /// conversation (later calls fail at once).
    pub fn generate(
        &mut self,
        prompt: &[u32],
        config: &GenerationConfig,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<GenerationOutput> {
        if config.sampling != self.sampling {
            return Err(Error::Generation(
                "a kept conversation samples with the parameters it was opened with".into(),
            ));
        }
        let reuse = self.reusable(prompt);
        let backend = self
            .backend
            .as_mut()
            .ok_or_else(|| Error::Generation("the conversation is closed".into()))?;
        // Until the generation succeeds the caches' content is unknown past `reuse`.
        self.cached.truncate(reuse);
        match generate_from(
            backend,
            Some(&self.tokenizer),
            prompt,
            reuse,
            config,
            on_text,
        ) {
            Ok(out) => {
                self.cached = prompt.to_vec();
                self.cached.extend_from_slice(&out.tokens);
                self.cached.truncate(out.positions_cached());
                Ok(out)
            }
            Err(e) => {
                self.close();
                Err(e)
            }
        }
    }

    /// Closes the session on every hop and waits for it (dropping closes in the background).
    pub fn close(&mut self) {
        if let Some(mut backend) = self.backend.take() {
            let handle = backend.handle.clone();
            handle.block_on(backend.session.close());
        }
    }
}

impl Drop for Conversation {
    fn drop(&mut self) {
        if let Some(mut backend) = self.backend.take() {
            // Dropped on a runtime worker (an evicted conversation), blocking would panic:
            // close in the background.
            let handle = backend.handle.clone();
            handle.spawn(async move { backend.session.close().await });
        }
    }
}
