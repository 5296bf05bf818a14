//! Blocking handles over one runtime owned by the library, for hosts without an async runtime:
//! the Python and C bindings, and simple Rust programs.
//!
//! The runtime (one IO worker; compute runs on blocking threads and the compute pool) starts on
//! the first call that needs it, never at load time, and lives until the process exits. Every
//! call here blocks the calling thread; none may be made from inside a tokio runtime.
//!
//! ```no_run
//! # fn main() -> neuroshard_core::Result<()> {
//! use neuroshard_core::blocking::{Client, LocalSwarm};
//! use neuroshard_core::{EngineOptions, SwarmOptions, TextRequest};
//!
//! let swarm = LocalSwarm::start("SmolLM2-135M-Instruct.Q4_1.gguf", 3, 1, EngineOptions::default())?;
//! let client = Client::connect(&[swarm.address()], SwarmOptions::default())?;
//! let out = client.generate("The future of AI is", &TextRequest::default())?;
//! println!("{}", out.output.text);
//! # Ok(()) }
//! ```

use crate::engine::EngineOptions;
use crate::error::{Error, Result};
use crate::net::peers::PeerInfo;
use crate::swarm_session::{
    LogitsSession, SwarmGeneration, SwarmOptions, SwarmSession, TextRequest,
};
use crate::Tokenizer;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::Duration;

static RUNTIME: OnceLock<std::result::Result<tokio::runtime::Runtime, String>> = OnceLock::new();

/// The library's runtime, started on first use.
pub fn runtime() -> Result<&'static tokio::runtime::Runtime> {
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                // One IO worker: compute runs on blocking threads and the compute pool, and a
                // second worker only competes with the matmuls on small machines.
                .worker_threads(1)
                .thread_name("neuroshard-io")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| Error::Internal(format!("starting the runtime: {e}")))
}

/// Runs `future` to completion on the library's runtime.
fn block_on<F: std::future::Future>(future: F) -> Result<F::Output> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(Error::Internal(
            "neuroshard_core::blocking called from inside a tokio runtime: use the async API"
                .into(),
        ));
    }
    Ok(runtime()?.block_on(future))
}

/// Resolves peer addresses (`<id>@<ip:port>` or plain `host:port`).
pub fn resolve_peers(peers: &[String]) -> Result<Vec<iroh::EndpointAddr>> {
    block_on(crate::resolve_peers(peers))?
}

/// A node serving a slice of layers (see [`crate::NodeBuilder`]).
#[derive(Debug)]
pub struct Node {
    node: Option<crate::Node>,
}

impl Node {
    /// Loads the slice and starts the node as `builder` says.
    pub fn start(builder: crate::NodeBuilder) -> Result<Node> {
        let node = block_on(builder.spawn())??;
        Ok(Node { node: Some(node) })
    }

    fn node(&self) -> Result<&crate::Node> {
        self.node
            .as_ref()
            .ok_or_else(|| Error::Generation("the node is closed".into()))
    }

    /// The address line (`<id>@<ip:port>`) others pass as a peer.
    pub fn address(&self) -> Result<String> {
        Ok(self.node()?.address())
    }

    /// The swarm as this node sees it.
    pub fn peers(&self) -> Result<Vec<PeerInfo>> {
        Ok(self.node()?.peer_infos())
    }

    /// The async handle, for what this facade does not cover.
    pub fn inner(&self) -> Result<&crate::Node> {
        self.node()
    }

    /// Stops the node (also done on drop). Closing twice is not an error.
    pub fn close(&mut self) -> Result<()> {
        if let Some(node) = self.node.take() {
            block_on(node.shutdown())?;
        }
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// A whole swarm in this process (see [`crate::LocalSwarm`]).
#[derive(Debug)]
pub struct LocalSwarm {
    swarm: Option<crate::LocalSwarm>,
}

impl LocalSwarm {
    /// Loads the model once and starts `nodes` slices x `replicas` nodes on 127.0.0.1.
    pub fn start(
        model: impl AsRef<Path>,
        nodes: usize,
        replicas: usize,
        options: EngineOptions,
    ) -> Result<LocalSwarm> {
        let path = model.as_ref().to_path_buf();
        let swarm = block_on(crate::LocalSwarm::start(
            &path,
            nodes,
            replicas,
            options,
            &mut |_| {},
        ))??;
        Ok(LocalSwarm { swarm: Some(swarm) })
    }

    fn swarm(&self) -> Result<&crate::LocalSwarm> {
        self.swarm
            .as_ref()
            .ok_or_else(|| Error::Generation("the swarm is closed".into()))
    }

    /// The first node's address line: what a client passes as its peer. Empty once closed.
    pub fn address(&self) -> String {
        self.swarm.as_ref().map(|s| s.address()).unwrap_or_default()
    }

    /// Every node's address line.
    pub fn addresses(&self) -> Result<Vec<String>> {
        Ok(self.swarm()?.addresses())
    }

    /// The async handle, for what this facade does not cover.
    pub fn inner(&self) -> Result<&crate::LocalSwarm> {
        self.swarm()
    }

    /// Stops every node (also done on drop).
    pub fn close(&mut self) -> Result<()> {
        if let Some(swarm) = self.swarm.take() {
            block_on(swarm.shutdown())?;
        }
        Ok(())
    }
}

impl Drop for LocalSwarm {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// A client of one swarm: generate, stream, step a logits session, list peers. `Sync`:
/// several threads may generate through one client at once.
#[derive(Debug, Clone)]
pub struct Client {
    session: SwarmSession,
}

impl Client {
    /// Binds a client endpoint (offline loopback) and connects through the first of `peers`
    /// (`<id>@<ip:port>` or plain `host:port`) that serves the model info.
    pub fn connect(peers: &[String], options: SwarmOptions) -> Result<Client> {
        let session = block_on(async {
            let entries = crate::resolve_peers(peers).await?;
            let client = crate::Client::bind_default().await?;
            SwarmSession::connect(client, entries, options).await
        })??;
        Ok(Client { session })
    }

    /// The async handle.
    pub fn swarm_session(&self) -> &SwarmSession {
        &self.session
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        self.session.tokenizer()
    }

    /// Generates text for `prompt`; blocks until done.
    pub fn generate(&self, prompt: &str, request: &TextRequest) -> Result<SwarmGeneration> {
        self.stream(prompt, request)?.wait()
    }

    /// Starts generating text for `prompt` and returns the pieces as they come. Dropping the
    /// stream stops the generation after the current token.
    pub fn stream(&self, prompt: &str, request: &TextRequest) -> Result<TextStream> {
        let (tx, rx) = mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let session = self.session.clone();
        let (prompt, request) = (prompt.to_string(), request.clone());
        let pieces = tx.clone();
        let stop = cancel.clone();
        runtime()?.spawn(async move {
            let on_text = Box::new(move |piece: &str| {
                if stop.load(Ordering::Relaxed)
                    || pieces.send(StreamEvent::Piece(piece.to_string())).is_err()
                {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            });
            let result = session.generate_text(&prompt, &request, on_text).await;
            let _ = tx.send(StreamEvent::Done(Box::new(result)));
        });
        Ok(TextStream {
            rx,
            cancel,
            ended: false,
            outcome: None,
        })
    }

    /// Opens a session whose last hop returns logits (see [`LogitsSession`]).
    pub fn session(&self, max_length: Option<usize>) -> Result<BlockingLogitsSession> {
        let session = block_on(self.session.open_logits_session(max_length))??;
        Ok(BlockingLogitsSession {
            session: Some(session),
        })
    }

    /// The nodes of the swarm and what they serve.
    pub fn peers(&self) -> Result<Vec<PeerInfo>> {
        block_on(self.session.peers())?
    }

    /// Closes the client's endpoint (sessions in flight fail).
    pub fn close(&self) -> Result<()> {
        block_on(self.session.client().shutdown())
    }
}

/// A training job over a swarm, blocking (see [`crate::Trainer`]): connect with the trainer's
/// key, learn texts or conversations, evaluate held-back text, end. Every hop must allow the
/// key's id (`node --trainer ID`).
#[derive(Debug)]
pub struct Trainer {
    trainer: Option<crate::Trainer>,
    session: SwarmSession,
}

impl Trainer {
    /// Connects through the first of `peers` that answers, with `key` as the trainer's
    /// identity, and begins a job on a route that covers the model. A step an earlier run of
    /// this key left prepared on every hop is committed first.
    pub fn connect(
        peers: &[String],
        key: crate::SecretKey,
        options: crate::TrainOptions,
    ) -> Result<Trainer> {
        let (trainer, session) = block_on(async {
            let entries = crate::resolve_peers(peers).await?;
            let client =
                crate::Client::new(key, crate::net::endpoint::EndpointOptions::default()).await?;
            let session =
                SwarmSession::connect(client.clone(), entries, SwarmOptions::default()).await?;
            let begun = async {
                let mut trainer = crate::Trainer::on_swarm(&session, options).await?;
                trainer.resolve_in_doubt().await?;
                Ok::<_, Error>(trainer)
            };
            match begun.await {
                Ok(trainer) => Ok((trainer, session)),
                Err(e) => {
                    client.shutdown().await;
                    Err(e)
                }
            }
        })??;
        Ok(Trainer {
            trainer: Some(trainer),
            session,
        })
    }

    fn job(&mut self) -> Result<&mut crate::Trainer> {
        self.trainer
            .as_mut()
            .ok_or_else(|| Error::Training("this trainer has ended its job".into()))
    }

    /// The trainer's node id (what nodes allow with `--trainer`).
    pub fn id(&self) -> crate::net::NodeId {
        self.session.client().id()
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        self.session.tokenizer()
    }

    /// The route the job trains, first hop first.
    pub fn route(&self) -> Vec<crate::net::RouteHop> {
        self.trainer
            .as_ref()
            .map(|t| t.route().to_vec())
            .unwrap_or_default()
    }

    /// Every hop's current version, first hop first.
    pub fn versions(&self) -> Vec<crate::engine::TrainedVersion> {
        self.trainer
            .as_ref()
            .map(|t| t.versions().to_vec())
            .unwrap_or_default()
    }

    /// Learns `text` (see [`crate::Trainer::learn_text`]); `on_step` sees each step's report
    /// and may stop training after it.
    pub fn learn_text(
        &mut self,
        text: &str,
        how: &crate::LearnOptions,
        on_step: impl FnMut(usize, &crate::StepReport) -> ControlFlow<()>,
    ) -> Result<Vec<crate::StepReport>> {
        let tokenizer = self.session.tokenizer().clone();
        let trainer = self.job()?;
        block_on(trainer.learn_text(&tokenizer, text, how, on_step))?
    }

    /// Learns a conversation (see [`crate::Trainer::learn_conversation`]).
    pub fn learn_conversation(
        &mut self,
        messages: &[crate::ChatMessage],
        how: &crate::LearnOptions,
        on_step: impl FnMut(usize, &crate::StepReport) -> ControlFlow<()>,
    ) -> Result<Vec<crate::StepReport>> {
        let tokenizer = self.session.tokenizer().clone();
        let trainer = self.job()?;
        block_on(trainer.learn_conversation(&tokenizer, messages, how, on_step))?
    }

    /// The mean next-token loss of `text`, cut as `how` says, with no update (a held-back
    /// perplexity is its `exp`).
    pub fn evaluate_text(&mut self, text: &str, how: &crate::LearnOptions) -> Result<f32> {
        let examples = crate::train::examples_from_text(
            self.session.tokenizer(),
            text,
            how.seq_len,
            how.lines,
        )?;
        let trainer = self.job()?;
        block_on(trainer.evaluate(&examples, how.micro_batches))?
    }

    /// Ends the job (the hops release its lease) and closes the endpoint. Ending twice is
    /// fine.
    pub fn close(&mut self) -> Result<()> {
        let Some(trainer) = self.trainer.take() else {
            return Ok(());
        };
        let client = self.session.client().clone();
        block_on(async move {
            let ended = trainer.end().await;
            client.shutdown().await;
            ended
        })?
    }
}

impl Drop for Trainer {
    fn drop(&mut self) {
        if self.trainer.is_some() && tokio::runtime::Handle::try_current().is_err() {
            let _ = self.close();
        }
    }
}

/// What a [`TextStream`] delivers.
#[derive(Debug)]
pub enum StreamEvent {
    /// A printable piece of text.
    Piece(String),
    /// The generation ended: its result.
    Done(Box<Result<SwarmGeneration>>),
}

/// Pieces of a generation in flight ([`Client::stream`]). As an iterator it yields the
/// pieces, then an error if the generation failed; [`TextStream::result`] holds the outcome
/// once the iteration ended.
#[derive(Debug)]
pub struct TextStream {
    rx: mpsc::Receiver<StreamEvent>,
    cancel: Arc<AtomicBool>,
    /// Set once the `Done` event was read.
    ended: bool,
    /// The successful outcome, once read.
    outcome: Option<SwarmGeneration>,
}

impl TextStream {
    /// The next event, waiting at most `timeout`; `None` if nothing came in time (a host can
    /// check for interrupts between waits) or once the end was delivered.
    pub fn next_timeout(&mut self, timeout: Duration) -> Option<StreamEvent> {
        if self.ended {
            return None;
        }
        let event = match self.rx.recv_timeout(timeout) {
            Ok(event) => event,
            Err(mpsc::RecvTimeoutError::Timeout) => return None,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                StreamEvent::Done(Box::new(Err(task_lost())))
            }
        };
        if matches!(event, StreamEvent::Done(_)) {
            self.ended = true;
        }
        Some(event)
    }

    /// Stops the generation after the current token.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// Whether the end was delivered.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// The successful outcome, once the iteration ended without an error.
    pub fn result(&self) -> Option<&SwarmGeneration> {
        self.outcome.as_ref()
    }

    /// Waits for the end and returns the result (pieces not read yet are skipped).
    pub fn wait(mut self) -> Result<SwarmGeneration> {
        for piece in self.by_ref() {
            piece?;
        }
        self.outcome.take().ok_or_else(task_lost)
    }
}

fn task_lost() -> Error {
    Error::Internal("the generation task ended without a result".into())
}

impl Iterator for TextStream {
    type Item = Result<String>;

    fn next(&mut self) -> Option<Result<String>> {
        loop {
            let event = match self.next_timeout(Duration::from_secs(3600)) {
                Some(event) => event,
                None if self.ended => return None,
                None => continue,
            };
            match event {
                StreamEvent::Piece(piece) => return Some(Ok(piece)),
                StreamEvent::Done(result) => {
                    return match *result {
                        Ok(out) => {
                            self.outcome = Some(out);
                            None
                        }
                        Err(e) => Some(Err(e)),
                    }
                }
            }
        }
    }
}

impl Drop for TextStream {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// A [`LogitsSession`] driven from a thread outside any runtime.
#[derive(Debug)]
pub struct BlockingLogitsSession {
    session: Option<LogitsSession>,
}

impl BlockingLogitsSession {
    fn session(&mut self) -> Result<&mut LogitsSession> {
        self.session
            .as_mut()
            .ok_or_else(|| Error::Generation("the session is closed".into()))
    }

    /// Feeds `tokens` at the current position; returns the logits predicting the next one.
    pub fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        // The session drives its own IO through the runtime's handle.
        runtime()?;
        self.session()?.step(tokens)
    }

    /// Positions fed so far.
    pub fn position(&self) -> usize {
        self.session.as_ref().map_or(0, |s| s.position())
    }

    /// Goes back to `position`.
    pub fn rewind(&mut self, position: usize) -> Result<()> {
        self.session()?.rewind(position)
    }

    /// Most positions the session may use.
    pub fn max_length(&self) -> usize {
        self.session.as_ref().map_or(0, |s| s.max_length())
    }

    /// Closes the session on every hop (also done on drop).
    pub fn close(&mut self) {
        if let Some(mut session) = self.session.take() {
            session.close();
        }
    }
}

impl Drop for BlockingLogitsSession {
    fn drop(&mut self) {
        self.close();
    }
}
