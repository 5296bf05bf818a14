//! An OpenAI-compatible HTTP server over a swarm (`neuroshard serve`): a thin layer over
//! [`SwarmSession`].
//!
//! Endpoints: `POST /v1/chat/completions` and `POST /v1/completions` (streaming over SSE, or
//! one JSON answer), `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text).
//! Errors have OpenAI's JSON shape and status codes ([`errors`]). Requests are limited in
//! size, in how many run at once (429 beyond) and in time. With an API key set, every route
//! but `/health` wants `Authorization: Bearer <key>`.
//!
//! Prefix reuse ([`conversations`]): recent conversations' sessions stay open, and a request
//! whose prompt extends one's tokens only sends its new tokens through the swarm.

mod api;
mod conversations;
mod errors;
mod generation;
mod metrics;
mod swarm_view;

use crate::error::{Error, Result};
use crate::swarm_session::SwarmSession;
use api::{ChatRequest, CompletionRequest, Endpoint, Job, Limits};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State as AxumState};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use conversations::Conversations;
use errors::ApiError;
use generation::{Event, Finished};
use metrics::Metrics;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{oneshot, Semaphore};

/// How the server behaves; the defaults suit a laptop serving a few users.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeOptions {
    /// Clients must send `Authorization: Bearer <key>` (every route but `/health`).
    pub api_key: Option<String>,
    /// Name served besides the swarm's model id (`/v1/models`, the `model` field).
    pub model_name: Option<String>,
    /// Largest request body, in bytes.
    pub max_request_bytes: usize,
    /// Generations at once; more get 429.
    pub max_concurrent: usize,
    /// Longest a generation runs; it then ends with `finish_reason: "length"`.
    pub request_timeout: Duration,
    /// `max_tokens` when a request names none.
    pub default_max_tokens: usize,
    /// Conversations kept open for prefix reuse (0: none).
    pub kept_conversations: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            api_key: None,
            model_name: None,
            max_request_bytes: 1 << 20,
            max_concurrent: 16,
            request_timeout: Duration::from_secs(300),
            default_max_tokens: 512,
            kept_conversations: 16,
        }
    }
}

/// A node's last probed (compute µs, steps) and its ms per step between probes.
type StepTime = (u64, u64, Option<f64>);

/// What every handler shares.
#[derive(Debug)]
pub(crate) struct State {
    swarm: SwarmSession,
    options: ServeOptions,
    /// The names a request's `model` may take: the swarm's model id first.
    served: Vec<String>,
    slots: Arc<Semaphore>,
    conversations: Conversations,
    metrics: Metrics,
    /// The route of the current or last generation (the web page's swarm panel).
    route: std::sync::Mutex<Option<swarm_view::RouteRecord>>,
    /// Per node id: the last probed (compute µs, steps) and the compute time per step, in ms,
    /// between the last two probes that saw steps.
    step_times: std::sync::Mutex<std::collections::HashMap<String, StepTime>>,
}

impl State {
    /// A node's compute time per step in ms from its latest counters: over the steps since
    /// the previous probe, or its lifetime mean on the first; the last value while idle.
    fn step_time(&self, node: &str, stats: &crate::net::NodeStats) -> Option<f64> {
        let steps = stats.steps + stats.fills;
        let mut times = crate::net::lock(&self.step_times);
        let entry = times.entry(node.to_string()).or_insert((0, 0, None));
        let (d_us, d_steps) = (
            stats.compute_us.saturating_sub(entry.0),
            steps.saturating_sub(entry.1),
        );
        if d_steps > 0 {
            entry.2 = Some(d_us as f64 / d_steps as f64 / 1000.0);
        }
        entry.0 = stats.compute_us;
        entry.1 = steps;
        entry.2
    }
}

/// A running server; [`ApiServer::shutdown`] stops it and closes the kept sessions.
#[derive(Debug)]
pub struct ApiServer {
    addr: SocketAddr,
    state: Arc<State>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl ApiServer {
    /// Listens on `addr` (port 0 picks one) and serves `swarm` until shut down.
    pub async fn bind(
        addr: SocketAddr,
        swarm: SwarmSession,
        options: ServeOptions,
    ) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let mut served = vec![swarm.model_id().to_string()];
        served.extend(options.model_name.clone().filter(|n| !served.contains(n)));
        let state = Arc::new(State {
            slots: Arc::new(Semaphore::new(options.max_concurrent.max(1))),
            conversations: Conversations::new(options.kept_conversations),
            metrics: Metrics::default(),
            route: std::sync::Mutex::new(None),
            step_times: std::sync::Mutex::default(),
            served,
            swarm,
            options,
        });
        let app = router(state.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(ApiServer {
            addr,
            state,
            stop: Some(stop),
            task,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The model names it serves (the swarm's model id first).
    pub fn models(&self) -> &[String] {
        &self.state.served
    }

    /// Stops accepting requests, waits for the open ones, and closes the kept sessions.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let served = (&mut self.task)
            .await
            .map_err(|e| Error::Internal(format!("server task: {e}")))?;
        let kept = self.state.conversations.drain();
        tokio::task::spawn_blocking(move || {
            for mut c in kept {
                c.close();
            }
        })
        .await
        .map_err(|e| Error::Internal(format!("closing sessions: {e}")))?;
        Ok(served?)
    }
}

/// The routes.
fn router(state: Arc<State>) -> Router {
    let limit = state.options.max_request_bytes;
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/v1/swarm", get(swarm_json))
        .route("/v1/swarm/events", get(swarm_events))
        .route(
            "/",
            get(|| async { page(INDEX_HTML, "text/html; charset=utf-8") }),
        )
        .route(
            "/chat.js",
            get(|| async { page(CHAT_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/chat.css",
            get(|| async { page(CHAT_CSS, "text/css; charset=utf-8") }),
        )
        .fallback(not_found)
        // Bodies over the limit are refused while being read (never buffered whole); the
        // handlers turn that rejection and JSON errors into OpenAI-shaped errors.
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// `Authorization: Bearer <key>` when a key is set.
fn authorize(state: &State, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.options.api_key else {
        return Ok(());
    };
    let sent = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compared in constant time, so the key cannot be guessed byte by byte from timings.
    match sent {
        Some(s) if constant_time_eq(s.as_bytes(), key.as_bytes()) => Ok(()),
        _ => Err(ApiError::unauthorized()),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Seconds since the Unix epoch (OpenAI's `created`).
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A response id: `prefix` and 24 hex digits.
fn response_id(prefix: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let a = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    format!("{prefix}-{a:016x}{:08x}", unix_now() as u32)
}

/// Counts the response in the metrics and returns it.
fn counted(state: &State, endpoint: &'static str, response: Response) -> Response {
    state.metrics.request(endpoint, response.status().as_u16());
    response
}

async fn chat_completions(
    AxumState(state): AxumState<Arc<State>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let response = match parse_job::<ChatRequest>(&state, &headers, body, Endpoint::Chat) {
        Ok(job) => run_job(state.clone(), job).await,
        Err(e) => e.into_response(),
    };
    counted(&state, Endpoint::Chat.label(), response)
}

async fn completions(
    AxumState(state): AxumState<Arc<State>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let response =
        match parse_job::<CompletionRequest>(&state, &headers, body, Endpoint::Completions) {
            Ok(job) => run_job(state.clone(), job).await,
            Err(e) => e.into_response(),
        };
    counted(&state, Endpoint::Completions.label(), response)
}

/// A request body of either generation endpoint.
trait GenerationRequest: serde::de::DeserializeOwned {
    fn prompt(&self, tokenizer: &crate::Tokenizer) -> Result<Vec<u32>, ApiError>;
    fn common(&self) -> &api::CommonParams;
}

impl GenerationRequest for ChatRequest {
    fn prompt(&self, tokenizer: &crate::Tokenizer) -> Result<Vec<u32>, ApiError> {
        api::chat_prompt(tokenizer, self)
    }
    fn common(&self) -> &api::CommonParams {
        ChatRequest::common(self)
    }
}

impl GenerationRequest for CompletionRequest {
    fn prompt(&self, tokenizer: &crate::Tokenizer) -> Result<Vec<u32>, ApiError> {
        api::completion_prompt(tokenizer, self)
    }
    fn common(&self) -> &api::CommonParams {
        CompletionRequest::common(self)
    }
}

/// Authorises, size-checks and parses a generation request.
fn parse_job<R: GenerationRequest>(
    state: &State,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
) -> Result<Job, ApiError> {
    authorize(state, headers)?;
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::too_large(state.options.max_request_bytes),
        _ => ApiError::invalid(format!("could not read the request body: {e}"), None),
    })?;
    let request: R = serde_json::from_slice(&body).map_err(ApiError::bad_json)?;
    let prompt = request.prompt(state.swarm.tokenizer())?;
    api::job(
        endpoint,
        request.common(),
        prompt,
        &Limits {
            served: &state.served,
            context_len: state.swarm.context_len(),
            default_max_tokens: state.options.default_max_tokens,
        },
    )
}

/// Runs `job` in a free slot: an SSE stream or one JSON answer.
async fn run_job(state: Arc<State>, job: Job) -> Response {
    let Ok(permit) = state.slots.clone().try_acquire_owned() else {
        return ApiError::busy(state.options.max_concurrent).into_response();
    };
    let id = response_id(match job.endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completions => "cmpl",
    });
    let created = unix_now();
    let mut events = generation::start(state.clone(), job.clone(), permit);
    if !job.stream {
        let mut result = None;
        while let Some(event) = events.recv().await {
            if let Event::Done(done) = event {
                result = Some(done);
            }
        }
        return match result {
            Some(Ok(done)) => Json(full_body(&job, &id, created, &done)).into_response(),
            Some(Err(e)) => e.into_response(),
            None => ApiError::internal("the generation ended without a result").into_response(),
        };
    }
    // Streaming: the first event decides the status (an error before any text is a plain
    // error response; later ones end the stream with an error event).
    let first = events.recv().await;
    if let Some(Event::Done(Err(e))) = first {
        return e.into_response();
    }
    let stream = sse_stream(job, id, created, first, events);
    Sse::new(stream).into_response()
}

/// The SSE events of a streamed answer: the role (chat), each piece, the finish, the usage
/// when asked for, `[DONE]`.
fn sse_stream(
    job: Job,
    id: String,
    created: u64,
    first: Option<Event>,
    mut events: tokio::sync::mpsc::UnboundedReceiver<Event>,
) -> impl tokio_stream::Stream<Item = Result<SseEvent, std::convert::Infallible>> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<SseEvent>();
    tokio::spawn(async move {
        let data = |v: serde_json::Value| SseEvent::default().data(v.to_string());
        if job.endpoint == Endpoint::Chat
            && tx
                .send(data(chunk(&job, &id, created, Some(""), None, true)))
                .is_err()
        {
            return;
        }
        let mut next = first;
        while let Some(event) = next.take() {
            match event {
                Event::Text(text) => {
                    if tx
                        .send(data(chunk(&job, &id, created, Some(&text), None, false)))
                        .is_err()
                    {
                        // The client went away: dropping `events` stops the generation.
                        return;
                    }
                }
                Event::Done(Ok(done)) => {
                    let _ = tx.send(data(chunk(
                        &job,
                        &id,
                        created,
                        None,
                        Some(done.finish_reason),
                        false,
                    )));
                    if job.include_usage {
                        let mut usage = chunk(&job, &id, created, None, None, false);
                        usage["choices"] = serde_json::json!([]);
                        usage["usage"] = usage_json(&done);
                        let _ = tx.send(data(usage));
                    }
                    break;
                }
                Event::Done(Err(e)) => {
                    let _ = tx.send(data(e.body()));
                    break;
                }
            }
            next = events.recv().await;
        }
        let _ = tx.send(SseEvent::default().data("[DONE]"));
    });
    tokio_stream::StreamExt::map(tokio_stream::wrappers::UnboundedReceiverStream::new(rx), Ok)
}

/// One streamed chunk: a text piece, or the finish (`text: None`).
fn chunk(
    job: &Job,
    id: &str,
    created: u64,
    text: Option<&str>,
    finish: Option<&str>,
    role: bool,
) -> serde_json::Value {
    match job.endpoint {
        Endpoint::Chat => {
            let mut delta = serde_json::Map::new();
            if role {
                delta.insert("role".into(), "assistant".into());
            }
            if let Some(t) = text {
                delta.insert("content".into(), t.into());
            }
            serde_json::json!({
                "id": id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": job.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            })
        }
        Endpoint::Completions => serde_json::json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": job.model,
            "choices": [{
                "index": 0,
                "text": text.unwrap_or(""),
                "logprobs": null,
                "finish_reason": finish,
            }],
        }),
    }
}

fn usage_json(done: &Finished) -> serde_json::Value {
    serde_json::json!({
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
    })
}

/// The non-streamed answer.
fn full_body(job: &Job, id: &str, created: u64, done: &Finished) -> serde_json::Value {
    match job.endpoint {
        Endpoint::Chat => serde_json::json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": job.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": done.text},
                "logprobs": null,
                "finish_reason": done.finish_reason,
            }],
            "usage": usage_json(done),
        }),
        Endpoint::Completions => serde_json::json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": job.model,
            "choices": [{
                "index": 0,
                "text": done.text,
                "logprobs": null,
                "finish_reason": done.finish_reason,
            }],
            "usage": usage_json(done),
        }),
    }
}

async fn models(AxumState(state): AxumState<Arc<State>>, headers: HeaderMap) -> Response {
    let response = match authorize(&state, &headers) {
        Ok(()) => {
            let created = unix_now();
            let data: Vec<serde_json::Value> = state
                .served
                .iter()
                .map(|name| {
                    serde_json::json!({
                        "id": name,
                        "object": "model",
                        "created": created,
                        "owned_by": "neuroshard",
                        "context_length": state.swarm.context_len(),
                    })
                })
                .collect();
            Json(serde_json::json!({"object": "list", "data": data})).into_response()
        }
        Err(e) => e.into_response(),
    };
    counted(&state, "models", response)
}

/// `ok` while an entry node answers with the swarm's announcements; 503 otherwise.
async fn health(AxumState(state): AxumState<Arc<State>>) -> Response {
    let peers = tokio::time::timeout(Duration::from_secs(5), state.swarm.peers()).await;
    let response = match peers {
        Ok(Ok(peers)) => {
            let layers = state.swarm.layers();
            let mut covered = vec![false; layers];
            for p in &peers {
                for l in p.layers.clone().filter(|&l| l < layers) {
                    covered[l] = true;
                }
            }
            let complete = covered.iter().all(|&c| c);
            let status = if complete {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (
                status,
                Json(serde_json::json!({
                    "status": if complete { "ok" } else { "incomplete" },
                    "model": state.swarm.model_id(),
                    "nodes": peers.len(),
                    "layers": layers,
                    "layers_covered": covered.iter().filter(|&&c| c).count(),
                })),
            )
                .into_response()
        }
        Ok(Err(e)) => ApiError::unavailable(e).into_response(),
        Err(_) => ApiError::unavailable("no entry node answered within 5 s").into_response(),
    };
    counted(&state, "health", response)
}

async fn metrics_text(AxumState(state): AxumState<Arc<State>>, headers: HeaderMap) -> Response {
    let response = match authorize(&state, &headers) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            state.metrics.render(state.conversations.len()),
        )
            .into_response(),
        Err(e) => e.into_response(),
    };
    counted(&state, "metrics", response)
}

/// The web chat, embedded in the binary (no external asset).
const INDEX_HTML: &str = include_str!("server/web/index.html");
const CHAT_JS: &str = include_str!("server/web/chat.js");
const CHAT_CSS: &str = include_str!("server/web/chat.css");

/// A page asset, under a policy that only lets this server's own script and style run: model
/// output that somehow became HTML could neither run inline script or event handlers nor
/// load anything.
fn page(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                 base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The swarm panel's data, once.
async fn swarm_json(AxumState(state): AxumState<Arc<State>>, headers: HeaderMap) -> Response {
    match authorize(&state, &headers) {
        Ok(()) => Json(swarm_view::snapshot(&state).await).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The swarm panel's data now and every second after, as SSE, until the client leaves.
async fn swarm_events(AxumState(state): AxumState<Arc<State>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&state, &headers) {
        return e.into_response();
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<SseEvent>(2);
    tokio::spawn(async move {
        loop {
            let view = swarm_view::snapshot(&state).await;
            if tx
                .send(SseEvent::default().data(view.to_string()))
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(SWARM_VIEW_PERIOD).await;
        }
    });
    let stream = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::ReceiverStream::new(rx),
        Ok::<_, std::convert::Infallible>,
    );
    Sse::new(stream).into_response()
}

/// How often the swarm panel refreshes.
const SWARM_VIEW_PERIOD: Duration = Duration::from_secs(1);

async fn not_found() -> Response {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        code: Some("unknown_url"),
        param: None,
        message: "no such endpoint (see /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics)".into(),
    }
    .into_response()
}
