//! [`ShardEngine`]: one contiguous layer slice `[start, end)` of one model — forward with
//! per-session KV caches, backward, and an AdamW step on the slice.
//!
//! The engine is `Sync`: sessions are locked individually, so a node can serve several clients
//! from one engine. Everything a caller can get wrong (layer range, input kind, width, dtype,
//! position, session) is checked before any state changes and reported as a typed [`Error`].

pub(crate) mod adapters;
mod checkpoint;
mod optimizer;
mod sessions;
mod staged;
mod training;

pub use optimizer::AdamWConfig;
pub use sessions::SessionId;
pub use staged::TrainedVersion;
pub use training::{causal_lm_loss, BackwardOutput, OutputGrad};

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::kv_cache::{KvDtype, LayerKv};
use crate::model::layers::{ComputeMode, Pass};
use crate::model::lora::LoraAdapter;
use crate::model::shard::{LogitsSelection, ShardInput, ShardModel, ShardOutput};
use crate::model::weights::WeightFile;
use candle_core::{DType, Tensor};
use sessions::{SessionLimits, SessionTable};
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How to load and run a shard.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// `Exact` (f32, reproduces references; required for training) or `Fast` (f16 weights).
    pub mode: ComputeMode,
    /// Most sessions open at once; opening one more fails with [`Error::SessionsFull`].
    pub max_sessions: usize,
    /// Most positions per session; defaults to the model's context length.
    pub max_session_len: Option<usize>,
    /// Sessions unused this long are dropped when the table needs room or on
    /// [`ShardEngine::expire_idle_sessions`].
    pub session_idle_timeout: Duration,
    /// Element type of the sessions' key/value caches (f16 halves their memory).
    pub kv_dtype: KvDtype,
    /// Longer session inputs run this many positions at a time (chunked prefill: memory for
    /// one chunk's activations, not the whole prompt's); 0 runs every input in one pass.
    pub prefill_chunk: usize,
    /// Run every product on the block kernels, prefill chunks included, so that each
    /// position's outputs have the same bits however its input is chunked (a chunk of 1 or
    /// one pass of 6,000) or batched. Off (the default), chunks of 16 positions or more take
    /// the faster dense product of dequantised weights, which rounds differently: logits then
    /// differ from a one-pass run by up to ~2e-4 when a chunk is shorter than 16. On, a
    /// 512-token prefill runs at ~0.7x (SmolLM2 Q4_1, 2 threads: 214-226 against 300-333
    /// tokens/s). Replicas compared bit for bit (exact voting) should turn this on.
    pub chunk_invariant: bool,
    /// Refuse to load unless the model's id equals this one ([`Error::WrongWeights`]):
    /// `--model-id` on the command line.
    pub expected_model_id: Option<String>,
    /// A manifest file to check the slice's tensors against, instead of hashing the whole
    /// file once (see [`WeightFile::identity`]): `--manifest` on the command line.
    pub manifest: Option<std::path::PathBuf>,
}

/// Default [`EngineOptions::prefill_chunk`]: long enough that the dense products keep every
/// core busy, short enough that a chunk's activations stay a few MB.
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            mode: ComputeMode::Exact,
            max_sessions: 64,
            max_session_len: None,
            session_idle_timeout: Duration::from_secs(600),
            kv_dtype: KvDtype::F32,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            chunk_invariant: false,
            expected_model_id: None,
            manifest: None,
        }
    }
}

/// Identifies exactly which weights produced an output: later protocols carry it in
/// announcements, session-opens and receipts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct WeightVersion {
    /// The base model's id, which commits to every weight byte (see
    /// [`WeightFile::identity`]), as its 32 bytes.
    pub model_hash: [u8; 32],
    /// The slice these weights belong to.
    pub layers: Range<usize>,
    /// Optimizer steps applied to the slice since loading.
    pub updates: u64,
}

impl std::fmt::Display for WeightVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let short: String = self.model_hash[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        write!(
            f,
            "{short}/{}..{}/u{}",
            self.layers.start, self.layers.end, self.updates
        )
    }
}

/// Counters a caller (or a test) can read to see what the engine did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct EngineStats {
    /// Tensors read from the model file.
    pub tensors_loaded: u64,
    /// Bytes of tensor data read from the model file.
    pub bytes_loaded: u64,
    /// Bytes the loaded parameters occupy in memory.
    pub parameter_bytes: u64,
    /// Forward calls (inference and training).
    pub forward_calls: u64,
    /// Input positions processed (batch × sequence, summed over calls).
    pub positions_processed: u64,
    /// Layer × position evaluations: proves which layers actually ran.
    pub layer_positions: u64,
    /// Sessions currently open.
    pub sessions_open: u64,
    /// Bytes held by KV caches of open sessions.
    pub kv_cache_bytes: u64,
    /// Decode batches of two or more sessions run by [`ShardEngine::forward_batch`].
    pub decode_batches: u64,
    /// Session steps that ran inside those batches.
    pub batched_steps: u64,
}

/// One forward call: what to run, on what, for which session.
#[derive(Debug, Clone)]
pub struct ForwardRequest {
    /// Tokens (first layer of the model) or hidden states.
    pub input: ShardInput,
    /// Absolute position of the input's first element.
    pub start_pos: usize,
    /// Session whose KV cache to use; `None` runs without a cache.
    pub session: Option<SessionId>,
    /// Sub-range of the slice to run; `None` runs the whole slice.
    pub layers: Option<Range<usize>>,
    /// LM head on every position or only the last.
    pub logits: LogitsSelection,
    /// The LoRA adapter to run with ([`ShardEngine::create_adapter`]); `None`: the base
    /// weights.
    pub adapter: Option<AdapterRef>,
}

/// Which adapter a forward runs with.
#[derive(Debug, Clone)]
pub enum AdapterRef {
    /// This engine's adapter of that name, as it is now.
    Named(String),
    /// One version of an adapter, held: a session keeps the version it opened with while
    /// training commits newer ones ([`ShardEngine::adapter`] gives it).
    Pinned(Arc<LoraAdapter>),
}

impl ForwardRequest {
    /// A stateless forward of the whole slice at position 0.
    pub fn new(input: ShardInput) -> Self {
        ForwardRequest {
            input,
            start_pos: 0,
            session: None,
            layers: None,
            logits: LogitsSelection::All,
            adapter: None,
        }
    }

    /// Runs with the LoRA adapter `name`.
    pub fn adapter(mut self, name: impl Into<String>) -> Self {
        self.adapter = Some(AdapterRef::Named(name.into()));
        self
    }

    /// Runs with this version of an adapter (taken from [`ShardEngine::adapter`]).
    pub fn pinned_adapter(mut self, adapter: Arc<LoraAdapter>) -> Self {
        self.adapter = Some(AdapterRef::Pinned(adapter));
        self
    }

    /// Uses `session`'s KV cache, writing at positions `start_pos..`.
    pub fn session(mut self, session: SessionId, start_pos: usize) -> Self {
        self.session = Some(session);
        self.start_pos = start_pos;
        self
    }

    /// Runs only `layers` (must lie within the slice).
    pub fn layers(mut self, layers: Range<usize>) -> Self {
        self.layers = Some(layers);
        self
    }

    /// Applies the LM head to the last position only.
    pub fn last_logits_only(mut self) -> Self {
        self.logits = LogitsSelection::Last;
        self
    }
}

#[derive(Debug, Default)]
struct Counters {
    forward_calls: AtomicU64,
    positions: AtomicU64,
    layer_positions: AtomicU64,
    decode_batches: AtomicU64,
    batched_steps: AtomicU64,
}

/// One contiguous layer slice of one model, ready to serve and train.
pub struct ShardEngine {
    file: Arc<WeightFile>,
    identity: crate::model::identity::ModelIdentity,
    model: ShardModel,
    options: EngineOptions,
    sessions: SessionTable,
    counters: Counters,
    tensors_loaded: u64,
    bytes_loaded: u64,
    updates: AtomicU64,
    training: Mutex<training::TrainState>,
    /// LoRA adapters over this slice, by name.
    adapters: std::sync::RwLock<std::collections::HashMap<String, Arc<LoraAdapter>>>,
    /// Versions computed for announcements, by target, valid while its step count holds
    /// (hashing a whole f32 slice on every announcement would cost a second each time).
    version_cache: Mutex<std::collections::HashMap<Option<String>, staged::TrainedVersion>>,
}

impl std::fmt::Debug for ShardEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardEngine")
            .field("model", &self.file.path())
            .field("layers", &self.model.layers)
            .field("mode", &self.options.mode)
            .finish_non_exhaustive()
    }
}

impl ShardEngine {
    /// Loads layers `layers` of the model at `path`, reading only the tensors they need.
    ///
    /// Loading has no process-wide side effect (no environment change, no thread started):
    /// thread settings belong to the host's one call of [`crate::runtime::init`].
    pub fn load(
        path: impl AsRef<Path>,
        layers: Range<usize>,
        options: EngineOptions,
    ) -> Result<Self> {
        Self::load_with_progress(path, layers, options, |_, _| {})
    }

    /// Like [`ShardEngine::load`], calling `progress(blocks_done, blocks_total)` while loading.
    pub fn load_with_progress(
        path: impl AsRef<Path>,
        layers: Range<usize>,
        options: EngineOptions,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        let file = Arc::new(WeightFile::open(path)?);
        Self::from_file(file, layers, options, &mut progress)
    }

    /// Loads a slice from an already opened model (several shards of one file share it).
    pub fn from_file(
        file: Arc<WeightFile>,
        layers: Range<usize>,
        options: EngineOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        if let Some(path) = &options.manifest {
            file.use_manifest(crate::model::identity::ModelManifest::read(path)?)?;
        }
        // Before any tensor loads: from here on every tensor read is checked against the
        // manifest, and a pinned id fails fast, before the slice is read.
        let identity = file.identity()?;
        if let Some(expected) = &options.expected_model_id {
            crate::model::identity::check_model_id(expected)?;
            if *expected != identity.id {
                return Err(Error::WrongWeights {
                    path: file.path().to_path_buf(),
                    reason: format!(
                        "its model id is {}, but {expected} was asked for",
                        identity.id
                    ),
                });
            }
        }
        let (tensors_before, bytes_before) = (file.tensors_loaded(), file.bytes_loaded());
        let mut model = ShardModel::load(&file, layers.clone(), options.mode, progress)?;
        model.set_chunk_invariant(options.chunk_invariant);
        let max_len = options
            .max_session_len
            .unwrap_or(model.config.max_positions)
            .min(model.config.max_positions);
        let sessions = SessionTable::new(
            layers.len(),
            SessionLimits {
                max_sessions: options.max_sessions,
                max_len,
                idle_timeout: options.session_idle_timeout,
                kv_dtype: options.kv_dtype,
            },
        );
        Ok(ShardEngine {
            tensors_loaded: file.tensors_loaded() - tensors_before,
            bytes_loaded: file.bytes_loaded() - bytes_before,
            file,
            identity,
            model,
            options,
            sessions,
            counters: Counters::default(),
            updates: AtomicU64::new(0),
            training: Mutex::new(training::TrainState::default()),
            adapters: Default::default(),
            version_cache: Mutex::default(),
        })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    /// The opened model file (tokenizer metadata, model hash).
    pub fn weight_file(&self) -> &Arc<WeightFile> {
        &self.file
    }

    /// The model id (64 hex digits), which commits to every weight byte, the tokenizer and
    /// the chat template: nodes and clients of one swarm agree on it.
    pub fn model_id(&self) -> &str {
        &self.identity.id
    }

    /// The model's identity: its id and the commitment entry nodes send to clients.
    pub fn identity(&self) -> &crate::model::identity::ModelIdentity {
        &self.identity
    }

    /// The slice this engine holds.
    pub fn layers(&self) -> Range<usize> {
        self.model.layers.clone()
    }

    /// Whether the slice starts at layer 0 (takes token ids, holds the embeddings).
    pub fn is_first(&self) -> bool {
        self.model.layers.start == 0
    }

    /// Whether the slice ends at the last layer (returns logits, holds the LM head).
    pub fn is_last(&self) -> bool {
        self.model.layers.end == self.model.config.num_layers
    }

    /// The options the engine was loaded with.
    pub fn options(&self) -> &EngineOptions {
        &self.options
    }

    /// The compute mode.
    pub fn mode(&self) -> ComputeMode {
        self.options.mode
    }

    /// Positions per chunk of a long session input ([`EngineOptions::prefill_chunk`]; 0: one
    /// pass). Nodes cut a step into chunks of this size and pipeline them across hops.
    pub fn prefill_chunk(&self) -> usize {
        self.options.prefill_chunk
    }

    /// Longest session this engine accepts.
    pub fn max_session_len(&self) -> usize {
        self.sessions.limits.max_len
    }

    /// KV-cache bytes one session holds at its longest ([`Self::max_session_len`] positions
    /// over this slice's layers): what a node's admission control reserves per session.
    pub fn kv_bytes_per_session(&self) -> u64 {
        let c = self.config();
        let value_bytes = match self.options.kv_dtype {
            crate::KvDtype::F32 => 4,
            crate::KvDtype::F16 => 2,
        };
        let per_position = 2 * c.num_kv_heads * c.head_dim * value_bytes;
        (self.model.layers.len() * per_position * self.max_session_len()) as u64
    }

    /// The weights' identity: base model, slice, optimizer steps.
    pub fn version(&self) -> WeightVersion {
        WeightVersion {
            model_hash: self.identity.digest,
            layers: self.model.layers.clone(),
            updates: self.updates.load(Ordering::SeqCst),
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> EngineStats {
        let parameter_bytes = self.model.params().iter().map(|p| p.bytes()).sum();
        EngineStats {
            tensors_loaded: self.tensors_loaded,
            bytes_loaded: self.bytes_loaded,
            parameter_bytes,
            forward_calls: self.counters.forward_calls.load(Ordering::Relaxed),
            positions_processed: self.counters.positions.load(Ordering::Relaxed),
            layer_positions: self.counters.layer_positions.load(Ordering::Relaxed),
            sessions_open: self.sessions.count() as u64,
            kv_cache_bytes: self.sessions.kv_bytes() as u64,
            decode_batches: self.counters.decode_batches.load(Ordering::Relaxed),
            batched_steps: self.counters.batched_steps.load(Ordering::Relaxed),
        }
    }

    /// Opens session `id` with an empty cache.
    pub fn open_session(&self, id: SessionId) -> Result<()> {
        self.sessions.open(id)
    }

    /// Closes session `id`, freeing its cache.
    pub fn close_session(&self, id: SessionId) -> Result<()> {
        self.sessions.close(id)
    }

    /// Drops the cached positions `len..` of session `id`.
    pub fn truncate_session(&self, id: SessionId, len: usize) -> Result<()> {
        self.sessions.with(id, |s| {
            for cache in &mut s.caches {
                cache.truncate(len)?;
            }
            Ok(())
        })
    }

    /// Positions cached by session `id` (in every layer of the slice).
    pub fn session_len(&self, id: SessionId) -> Result<usize> {
        let n = self.model.layers.len();
        self.sessions.with(id, |s| Ok(s.cached_len(0..n)))
    }

    /// The KV cache of session `id` for the absolute layers `layers` (a sub-range of the
    /// slice), one `(k, v)` pair per layer, each `[1, kv_heads, len, head_dim]`: what a node
    /// hands to a replica when it leaves. Layers with nothing cached are refused.
    pub fn export_session(
        &self,
        id: SessionId,
        layers: Range<usize>,
    ) -> Result<Vec<(Tensor, Tensor)>> {
        let rel = self.relative(&layers)?;
        self.sessions.with(id, |s| {
            s.caches[rel]
                .iter()
                .map(|c| {
                    c.to_tensors()?
                        .ok_or_else(|| Error::BadInput(format!("session {id} has nothing cached")))
                })
                .collect()
        })
    }

    /// Installs a KV cache received from another node into session `id` (opened already) for
    /// the absolute layers `layers`. Every tensor must be `[1, kv_heads, len, head_dim]` in
    /// f32 with the same `len` (at most the session limit); on any mismatch nothing changes.
    pub fn import_session(
        &self,
        id: SessionId,
        layers: Range<usize>,
        kv: Vec<(Tensor, Tensor)>,
    ) -> Result<usize> {
        let rel = self.relative(&layers)?;
        if kv.len() != rel.len() {
            return Err(Error::BadInput(format!(
                "{} layers of KV cache for layers {layers:?}",
                kv.len()
            )));
        }
        let cfg = &self.model.config;
        let len = kv.first().map(|(k, _)| k.dim(2).unwrap_or(0)).unwrap_or(0);
        let want = |len: usize| [1, cfg.num_kv_heads, len, cfg.head_dim];
        for (k, v) in &kv {
            for t in [k, v] {
                if t.dims() != want(len) || t.dtype() != DType::F32 {
                    return Err(Error::BadInput(format!(
                        "KV tensor {:?} {:?}, expected {:?} f32",
                        t.dims(),
                        t.dtype(),
                        want(len)
                    )));
                }
            }
        }
        if len == 0 || len > self.sessions.limits.max_len {
            return Err(Error::BadInput(format!(
                "KV cache of {len} positions (limit {})",
                self.sessions.limits.max_len
            )));
        }
        self.sessions.with(id, |s| {
            // Checked above, so `set` cannot fail half-way; still, keep its error.
            for (cache, (k, v)) in s.caches[rel].iter_mut().zip(kv) {
                cache.set(k, v)?;
            }
            Ok(len)
        })
    }

    /// `layers` (absolute) as indices into the slice's caches, if the slice holds them.
    fn relative(&self, layers: &Range<usize>) -> Result<Range<usize>> {
        let slice = &self.model.layers;
        if layers.start >= layers.end || layers.start < slice.start || layers.end > slice.end {
            return Err(Error::SliceOutOfRange {
                start: layers.start,
                end: layers.end,
                layers: self.model.config.num_layers,
            });
        }
        Ok(layers.start - slice.start..layers.end - slice.start)
    }

    /// Drops sessions idle longer than the configured timeout; returns how many.
    pub fn expire_idle_sessions(&self) -> Result<usize> {
        self.sessions.expire_idle()
    }

    /// Checks the request against the slice and returns the absolute layer range to run and
    /// the input converted to what the model consumes (u32 ids or f32 hidden states).
    fn validate(&self, req: &ForwardRequest) -> Result<(Range<usize>, ShardInput, usize)> {
        let cfg = &self.model.config;
        let slice = self.model.layers.clone();
        let range = req.layers.clone().unwrap_or(slice.clone());
        if range.start >= range.end || range.start < slice.start || range.end > slice.end {
            return Err(Error::SliceOutOfRange {
                start: range.start,
                end: range.end,
                layers: cfg.num_layers,
            });
        }
        let (input, seq) = match &req.input {
            ShardInput::Tokens(ids) => {
                if range.start != 0 {
                    return Err(Error::BadInput(format!(
                        "token ids given to layers {}..{}; only layer 0 takes tokens, later layers take hidden states",
                        range.start, range.end
                    )));
                }
                let (_, seq) = ids.dims2().map_err(|_| {
                    Error::BadInput(format!(
                        "token ids must be [batch, seq], got {:?}",
                        ids.dims()
                    ))
                })?;
                let ids = match ids.dtype() {
                    DType::U32 => ids.clone(),
                    DType::I64 => {
                        let min = ids.flatten_all()?.min(0)?.to_scalar::<i64>().unwrap_or(0);
                        if min < 0 {
                            return Err(Error::BadInput(format!("negative token id {min}")));
                        }
                        ids.to_dtype(DType::U32)?
                    }
                    other => {
                        return Err(Error::BadInput(format!(
                            "token ids must be u32 or i64, got {other:?}"
                        )))
                    }
                };
                if ids.elem_count() > 0 {
                    let max = ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
                    if max as usize >= cfg.vocab_size {
                        return Err(Error::TokenOutOfRange {
                            id: max,
                            vocab: cfg.vocab_size,
                        });
                    }
                }
                (ShardInput::Tokens(ids), seq)
            }
            ShardInput::Hidden(h) => {
                if range.start == 0 {
                    return Err(Error::BadInput(
                        "hidden states given to layer 0, which takes token ids".into(),
                    ));
                }
                if h.dtype() != DType::F32 {
                    return Err(Error::HiddenDtype {
                        expected: "f32".into(),
                        actual: format!("{:?}", h.dtype()).to_lowercase(),
                    });
                }
                let (_, seq, width) = h.dims3().map_err(|_| {
                    Error::BadInput(format!(
                        "hidden states must be [batch, seq, hidden], got {:?}",
                        h.dims()
                    ))
                })?;
                if width != cfg.hidden_size {
                    return Err(Error::HiddenSize {
                        expected: cfg.hidden_size,
                        actual: width,
                    });
                }
                (ShardInput::Hidden(h.clone()), seq)
            }
        };
        if seq == 0 || input_batch(&input) == 0 {
            return Err(Error::BadInput(
                "empty input (batch or sequence is 0)".into(),
            ));
        }
        let end = req.start_pos.saturating_add(seq);
        match req.session {
            Some(session) if end > self.sessions.limits.max_len => {
                return Err(Error::SessionTooLong {
                    session,
                    requested: end,
                    max: self.sessions.limits.max_len,
                })
            }
            None if end > cfg.max_positions => {
                return Err(Error::BadInput(format!(
                    "positions up to {end} exceed the model's context of {}",
                    cfg.max_positions
                )))
            }
            _ => {}
        }
        Ok((range, input, seq))
    }

    fn count(&self, batch: usize, seq: usize, layers: usize) {
        let positions = (batch * seq) as u64;
        self.counters.forward_calls.fetch_add(1, Ordering::Relaxed);
        self.counters
            .positions
            .fetch_add(positions, Ordering::Relaxed);
        self.counters
            .layer_positions
            .fetch_add(positions * layers as u64, Ordering::Relaxed);
    }

    /// Runs the request: tokens or hidden states in, hidden states or logits out.
    pub fn forward(&self, req: ForwardRequest) -> Result<ShardOutput> {
        let (range, input, seq) = self.validate(&req)?;
        let batch = input_batch(&input);
        let adapter = match &req.adapter {
            None => None,
            Some(AdapterRef::Named(name)) => self.adapter_for(Some(name))?,
            Some(AdapterRef::Pinned(held)) => {
                // Another engine's adapter would cover other matrices.
                if self.adapter(held.name()).is_none() {
                    return Err(Error::BadInput(format!(
                        "no adapter `{}` on this slice",
                        held.name()
                    )));
                }
                Some(held.clone())
            }
        };
        let pass = Pass {
            track: false,
            adapter: adapter.as_deref(),
        };
        let rel = (range.start - self.model.layers.start)..(range.end - self.model.layers.start);
        // The compute runs on a rayon worker (`in_pool`): the kernels' parallel loops then
        // include the calling thread instead of parking it on a latch and waking it once per
        // matmul (hundreds per token). The session's lock is taken here, on the caller's
        // thread, never inside the pool: a worker waiting in a join may pick up another
        // request's job, and a job that blocked on a session lock held further up the same
        // worker's stack (two steps of one session at once) would deadlock the pool.
        let out = match req.session {
            None => in_pool(|| {
                self.model
                    .forward(&input, req.start_pos, range.clone(), None, req.logits, pass)
            })?,
            Some(id) => self.sessions.with(id, |s| {
                let cached = s.cached_len(rel.clone());
                if req.start_pos > cached {
                    return Err(Error::PositionGap {
                        session: id,
                        start: req.start_pos,
                        cached,
                    });
                }
                if req.start_pos > 0 {
                    let cached_batch = s.caches[rel.clone()].iter().find_map(LayerKv::batch);
                    if let Some(b) = cached_batch.filter(|&b| b != batch) {
                        return Err(Error::BadInput(format!(
                            "session {id} was opened with batch {b}, got batch {batch}"
                        )));
                    }
                }
                let caches = &mut s.caches;
                in_pool(|| {
                    self.model.forward_chunked(
                        &input,
                        req.start_pos,
                        range.clone(),
                        caches,
                        req.logits,
                        self.options.prefill_chunk,
                        pass,
                    )
                })
            })?,
        };
        self.count(batch, seq, range.len());
        Ok(out)
    }
}

/// Runs `f` on a rayon worker of the compute pool (see [`ShardEngine::forward`]). `f` must
/// never block on a lock: the pool's workers run each other's jobs while they wait.
fn in_pool<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    rayon::scope(|_| f())
}

impl ShardEngine {
    /// Runs several requests, the one-position decode steps of different batch-1 sessions on
    /// the same layers as one batch: every weight block is read and unpacked once for all of
    /// them, and each session's output has exactly the bits of running its request alone
    /// (the kernels are batch-invariant; attention runs per session over its own cache).
    /// Requests that cannot join (prompts, batch > 1, no session, other layers, a session
    /// twice) run one by one. Results come back in request order.
    ///
    /// Like [`ShardEngine::forward`], the sessions are locked on the caller's thread and
    /// only the compute runs in the pool.
    pub fn forward_batch(&self, reqs: Vec<ForwardRequest>) -> Vec<Result<ShardOutput>> {
        let mut results: Vec<Option<Result<ShardOutput>>> = reqs.iter().map(|_| None).collect();
        // (request index, input, session, start) of the steps that can share one batch.
        let mut joined: Vec<(usize, ShardInput, SessionId, usize)> = Vec::new();
        let mut range_of_batch: Option<Range<usize>> = None;
        for (i, req) in reqs.iter().enumerate() {
            let (range, input, seq) = match self.validate(req) {
                Ok(v) => v,
                Err(e) => {
                    results[i] = Some(Err(e));
                    continue;
                }
            };
            let Some(session) = req.session else { continue };
            // The batch runs the base weights; adapter steps run alone.
            let joins = seq == 1
                && req.adapter.is_none()
                && input_batch(&input) == 1
                && range_of_batch.as_ref().is_none_or(|r| *r == range)
                && self.model.can_batch(&range)
                && joined.iter().all(|j| j.2 != session);
            if joins {
                range_of_batch.get_or_insert(range);
                joined.push((i, input, session, req.start_pos));
            }
        }
        if let (Some(range), 2..) = (range_of_batch, joined.len()) {
            for (i, out) in self.run_decode_batch(range, joined) {
                results[i] = Some(out);
            }
        }
        reqs.into_iter()
            .zip(results)
            .map(|(req, done)| done.unwrap_or_else(|| self.forward(req)))
            .collect()
    }

    /// Locks the sessions (in id order, so concurrent batches cannot deadlock), checks each
    /// one's position, runs the batch and counts it. Returns `(request index, result)`.
    fn run_decode_batch(
        &self,
        range: Range<usize>,
        mut joined: Vec<(usize, ShardInput, SessionId, usize)>,
    ) -> Vec<(usize, Result<ShardOutput>)> {
        joined.sort_by_key(|j| j.2);
        let mut done = Vec::new();
        let rel = (range.start - self.model.layers.start)..(range.end - self.model.layers.start);
        let handles: Vec<_> = joined
            .into_iter()
            .filter_map(|(i, input, id, start)| match self.sessions.get(id) {
                Ok(s) => Some((i, input, id, start, s)),
                Err(e) => {
                    done.push((i, Err(e)));
                    None
                }
            })
            .collect();
        let mut members = Vec::new();
        let mut guards = Vec::new();
        for (i, input, id, start, handle) in &handles {
            let guard = match handle.lock().map_err(Error::poisoned("session state")) {
                Ok(g) => g,
                Err(e) => {
                    done.push((*i, Err(e)));
                    continue;
                }
            };
            let cached = guard.cached_len(rel.clone());
            let cached_batch = guard.caches[rel.clone()].iter().find_map(LayerKv::batch);
            if *start > cached {
                done.push((
                    *i,
                    Err(Error::PositionGap {
                        session: *id,
                        start: *start,
                        cached,
                    }),
                ));
            } else if *start > 0 && cached_batch.is_some_and(|b| b != 1) {
                done.push((
                    *i,
                    Err(Error::BadInput(format!(
                        "session {id} was opened with a larger batch, got batch 1"
                    ))),
                ));
            } else {
                members.push((*i, input, *start));
                guards.push(guard);
            }
        }
        for guard in &mut guards {
            guard.last_used = std::time::Instant::now();
        }
        let inputs: Vec<&ShardInput> = members.iter().map(|m| m.1).collect();
        let starts: Vec<usize> = members.iter().map(|m| m.2).collect();
        let mut caches: Vec<&mut [LayerKv]> =
            guards.iter_mut().map(|g| &mut g.caches[..]).collect();
        let batch_range = range.clone();
        let computed = in_pool(|| {
            self.model
                .forward_decode_batch(&inputs, &starts, batch_range, &mut caches)
        });
        match computed {
            Ok(outs) => {
                if members.len() >= 2 {
                    self.counters.decode_batches.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .batched_steps
                        .fetch_add(members.len() as u64, Ordering::Relaxed);
                }
                for (m, out) in members.iter().zip(outs) {
                    self.count(1, 1, range.len());
                    done.push((m.0, Ok(out)));
                }
            }
            Err(e) => {
                let message = e.to_string();
                for m in &members {
                    done.push((
                        m.0,
                        Err(Error::BadInput(format!("decode batch: {message}"))),
                    ));
                }
            }
        }
        done
    }
}

fn input_batch(input: &ShardInput) -> usize {
    match input {
        ShardInput::Tokens(t) | ShardInput::Hidden(t) => t.dims().first().copied().unwrap_or(0),
    }
}

/// Reads a parameter's current value by name (for tests, checkpoints and fingerprints).
impl ShardEngine {
    /// The current value of parameter `name` (Hugging Face naming), if this slice holds it.
    pub fn parameter(&self, name: &str) -> Option<Tensor> {
        self.model
            .params()
            .into_iter()
            .find(|p| p.name == name)
            .and_then(|p| p.value().ok())
    }

    /// Names of every parameter of the slice (a tied head appears under the embedding's name).
    pub fn parameter_names(&self) -> Vec<String> {
        self.model
            .params()
            .into_iter()
            .map(|p| p.name.clone())
            .collect()
    }
}

/// Lies for the trust tests and demos (`node --behaviour wrong-weights`).
#[cfg(any(feature = "adversary", feature = "internals"))]
impl ShardEngine {
    /// Adds Gaussian noise of `fraction` times its RMS to one weight matrix of the slice's
    /// first block (its MLP down projection, made dense f32), before the engine serves;
    /// returns the tensor's name. The weight version stays the same: the engine claims to
    /// run the model's weights, which is the lie.
    pub fn perturb_weight(&mut self, fraction: f32, seed: u64) -> Result<String> {
        self.model.perturb_weight(fraction, seed)
    }
}
