//! Slice-only weight loading from GGUF and Hugging Face safetensors.
//!
//! A node must not pay for layers it does not serve, so [`WeightFile::open`] reads only the
//! metadata (GGUF header, or safetensors header + `config.json`) and [`WeightFile::load`] reads
//! one tensor at a time: a GGUF tensor with one seek + read of exactly its bytes, a safetensors
//! tensor from a memory map (only its pages are touched). Every tensor read is counted so tests
//! can prove a shard loaded its slice and nothing else.
//!
//! Tensors are addressed by their Hugging Face name (`model.layers.3.self_attn.q_proj.weight`);
//! for GGUF the name is translated to llama.cpp's (`blk.3.attn_q.weight`).

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::identity::{self, Digest, ModelIdentity, ModelManifest, TensorDigest};
use crate::model::tokenizer::TokenizerInfo;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// On-disk format of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFormat {
    /// A single `.gguf` file (llama.cpp): metadata, tokenizer and (quantised) tensors.
    Gguf,
    /// A Hugging Face directory: `config.json` + `model.safetensors` (or a sharded index).
    Safetensors,
}

/// A tensor as read from disk, before the compute mode decides how to hold it.
#[derive(Debug)]
pub enum RawTensor {
    /// A GGUF tensor still in its quantised blocks (or F16/F32 in GGUF layout).
    Quantized(QTensor),
    /// A dense tensor (safetensors), in the file's dtype.
    Dense(Tensor),
}

impl RawTensor {
    /// Dequantises / converts to a dense tensor of `dtype`.
    pub fn to_dense(&self, dtype: DType) -> Result<Tensor> {
        let dense = match self {
            RawTensor::Quantized(q) => match dtype {
                DType::F16 => q.dequantize_f16(&Device::Cpu)?,
                _ => q.dequantize(&Device::Cpu)?,
            },
            RawTensor::Dense(t) => t.clone(),
        };
        Ok(dense.to_dtype(dtype)?)
    }

    /// Shape of the tensor (GGUF dims are reported in row-major order, like safetensors).
    pub fn dims(&self) -> Vec<usize> {
        match self {
            RawTensor::Quantized(q) => q.shape().dims().to_vec(),
            RawTensor::Dense(t) => t.dims().to_vec(),
        }
    }
}

enum Backend {
    Gguf {
        content: gguf_file::Content,
        file: Mutex<BufReader<File>>,
    },
    Safetensors {
        tensors: MmapedSafetensors,
    },
}

/// An opened model: its config, its identity hash, and lazy per-tensor access.
pub struct WeightFile {
    path: PathBuf,
    format: ModelFormat,
    config: ModelConfig,
    model_hash: [u8; 32],
    /// Names the cached manifest of exactly this file: header hash, lengths, mtimes.
    cache_key: Digest,
    backend: Backend,
    /// Per-tensor hashes every later load is checked against, once known.
    manifest: OnceLock<Arc<ModelManifest>>,
    identity: OnceLock<ModelIdentity>,
    /// The tokenizer as entry nodes serve it, exported once: the id hashes exactly these bytes.
    served_tokenizer: OnceLock<std::result::Result<TokenizerInfo, String>>,
    tensors_loaded: AtomicU64,
    bytes_loaded: AtomicU64,
    tensors_verified: AtomicU64,
}

/// Manifests computed in this process, by cache key (tests and `LocalSwarm` open the same
/// file many times).
fn manifest_memo() -> &'static Mutex<HashMap<Digest, Arc<ModelManifest>>> {
    static MEMO: OnceLock<Mutex<HashMap<Digest, Arc<ModelManifest>>>> = OnceLock::new();
    MEMO.get_or_init(Mutex::default)
}

/// Feeds a file's length and modification time into a cache key: a file rewritten in place
/// (a fine-tune with the same tensor table) gets a new key, so a stale manifest is not used.
fn hash_file_stamp(hasher: &mut blake3::Hasher, meta: &std::fs::Metadata) {
    hasher.update(&meta.len().to_le_bytes());
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    hasher.update(&mtime.to_le_bytes());
}

impl std::fmt::Debug for WeightFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightFile")
            .field("path", &self.path)
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::ModelFile {
        path: path.to_path_buf(),
        source,
    }
}

/// Maps a Hugging Face Llama tensor name to its llama.cpp GGUF name.
pub(crate) fn gguf_name(hf_name: &str) -> Option<String> {
    let fixed = match hf_name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = hf_name.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let mapped = match suffix {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{mapped}"))
}

/// GGUF types candle can dequantise; anything else is reported as unsupported up front.
fn gguf_dtype_supported(dtype: GgmlDType) -> bool {
    use GgmlDType::*;
    matches!(
        dtype,
        F32 | F16
            | BF16
            | Q4_0
            | Q4_1
            | Q5_0
            | Q5_1
            | Q8_0
            | Q8_1
            | Q2K
            | Q3K
            | Q4K
            | Q5K
            | Q6K
            | Q8K
    )
}

impl WeightFile {
    /// Opens a model: a `.gguf` file, a directory with `config.json` + safetensors, or a
    /// `.safetensors` file with `config.json` beside it. Reads metadata only.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(io_err(path))?;
        if meta.is_dir() {
            return Self::open_safetensors_dir(path);
        }
        let mut magic = [0u8; 4];
        let mut file = File::open(path).map_err(io_err(path))?;
        let got = file.read(&mut magic).map_err(io_err(path))?;
        if got == 4 && &magic == b"GGUF" {
            return Self::open_gguf(path, file);
        }
        if path.extension().is_some_and(|e| e == "safetensors") {
            let dir = path.parent().unwrap_or(Path::new("."));
            return Self::open_safetensors(dir, vec![path.to_path_buf()]);
        }
        Err(Error::UnknownFormat {
            path: path.to_path_buf(),
            reason: "expected a .gguf file (magic `GGUF`) or a Hugging Face model directory \
                     with config.json and *.safetensors"
                .into(),
        })
    }

    fn open_gguf(path: &Path, file: File) -> Result<Self> {
        let mut reader = BufReader::new(file);
        reader.seek(SeekFrom::Start(0)).map_err(io_err(path))?;
        let content = gguf_file::Content::read(&mut reader).map_err(|e| Error::CorruptModel {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let file_meta = reader.get_ref().metadata().map_err(io_err(path))?;
        let file_len = file_meta.len();
        // Every tensor must lie inside the file: catches truncated downloads at open time.
        for (name, info) in &content.tensor_infos {
            if !gguf_dtype_supported(info.ggml_dtype) {
                return Err(Error::UnsupportedDtype {
                    tensor: name.clone(),
                    dtype: format!("{:?}", info.ggml_dtype),
                });
            }
            let elems = info.shape.elem_count();
            let size = (elems / info.ggml_dtype.block_size() * info.ggml_dtype.type_size()) as u64;
            let end = content
                .tensor_data_offset
                .saturating_add(info.offset)
                .saturating_add(size);
            if end > file_len {
                return Err(Error::CorruptModel {
                    path: path.to_path_buf(),
                    reason: format!(
                        "tensor `{name}` ends at byte {end} but the file has {file_len} bytes (truncated?)"
                    ),
                });
            }
        }
        let has_output = content.tensor_infos.contains_key("output.weight");
        let config = ModelConfig::from_gguf(&content, has_output)?;
        // Identity of the base model: the whole header (metadata + tensor table) and the length.
        // Hashing the header, not the tensors, keeps `open` cheap on every node while still
        // distinguishing different files and quantisations.
        let mut hasher = blake3::Hasher::new();
        let mut header = vec![0u8; content.tensor_data_offset as usize];
        reader.seek(SeekFrom::Start(0)).map_err(io_err(path))?;
        reader.read_exact(&mut header).map_err(io_err(path))?;
        hasher.update(&header);
        hasher.update(&file_len.to_le_bytes());
        let model_hash = *hasher.finalize().as_bytes();
        let mut key = blake3::Hasher::new();
        key.update(&model_hash);
        hash_file_stamp(&mut key, &file_meta);
        Ok(WeightFile {
            path: path.to_path_buf(),
            format: ModelFormat::Gguf,
            config,
            model_hash,
            cache_key: *key.finalize().as_bytes(),
            backend: Backend::Gguf {
                content,
                file: Mutex::new(reader),
            },
            manifest: OnceLock::new(),
            identity: OnceLock::new(),
            served_tokenizer: OnceLock::new(),
            tensors_loaded: AtomicU64::new(0),
            bytes_loaded: AtomicU64::new(0),
            tensors_verified: AtomicU64::new(0),
        })
    }

    fn open_safetensors_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let files = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::CorruptModel {
                    path: index.clone(),
                    reason: e.to_string(),
                })?;
            let mut files: Vec<PathBuf> = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .map(|m| {
                    m.values()
                        .filter_map(|v| v.as_str())
                        .map(|f| dir.join(f))
                        .collect()
                })
                .unwrap_or_default();
            files.sort();
            files.dedup();
            files
        } else {
            vec![dir.join("model.safetensors")]
        };
        Self::open_safetensors(dir, files)
    }

    fn open_safetensors(dir: &Path, files: Vec<PathBuf>) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config_text = std::fs::read_to_string(&config_path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                Error::UnknownFormat {
                    path: dir.to_path_buf(),
                    reason: "safetensors weights need a config.json beside them".into(),
                }
            } else {
                Error::ModelFile {
                    path: config_path.clone(),
                    source,
                }
            }
        })?;
        let config = ModelConfig::from_hf_json(&config_text)?;
        let mut hasher = blake3::Hasher::new();
        hasher.update(config_text.as_bytes());
        let mut stamps = blake3::Hasher::new();
        for file in &files {
            let mut f = File::open(file).map_err(io_err(file))?;
            let meta = f.metadata().map_err(io_err(file))?;
            hash_file_stamp(&mut stamps, &meta);
            let len = meta.len();
            let mut n = [0u8; 8];
            f.read_exact(&mut n).map_err(io_err(file))?;
            let header_len = u64::from_le_bytes(n);
            if header_len.saturating_add(8) > len {
                return Err(Error::CorruptModel {
                    path: file.clone(),
                    reason: format!("header length {header_len} exceeds file size {len}"),
                });
            }
            let mut header = vec![0u8; header_len as usize];
            f.read_exact(&mut header).map_err(io_err(file))?;
            hasher.update(&header);
            hasher.update(&len.to_le_bytes());
        }
        // SAFETY: the files are memory-mapped read-only; like every mmap-based loader we rely on
        // them not being truncated while the engine runs.
        let tensors =
            unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| Error::CorruptModel {
                path: dir.to_path_buf(),
                reason: e.to_string(),
            })?;
        let model_hash = *hasher.finalize().as_bytes();
        stamps.update(&model_hash);
        Ok(WeightFile {
            path: dir.to_path_buf(),
            format: ModelFormat::Safetensors,
            config,
            model_hash,
            cache_key: *stamps.finalize().as_bytes(),
            backend: Backend::Safetensors { tensors },
            manifest: OnceLock::new(),
            identity: OnceLock::new(),
            served_tokenizer: OnceLock::new(),
            tensors_loaded: AtomicU64::new(0),
            bytes_loaded: AtomicU64::new(0),
            tensors_verified: AtomicU64::new(0),
        })
    }

    /// The path this model was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF or safetensors.
    pub fn format(&self) -> ModelFormat {
        self.format
    }

    /// The model's normalised hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// blake3 of the model's header data (metadata and tensor table): identical on every
    /// node that opened the same file. It does not cover the weights: see
    /// [`WeightFile::identity`] for the id that does.
    pub fn model_hash(&self) -> [u8; 32] {
        self.model_hash
    }

    /// The model's identity (its id commits to every tensor, the tokenizer and the template).
    ///
    /// The first call gets the manifest: the one given to [`WeightFile::use_manifest`], else
    /// one computed earlier for this very file (by this process, or cached on disk in
    /// `$NEUROSHARD_CACHE_DIR`, else `$XDG_CACHE_HOME/neuroshard`, else
    /// `~/.cache/neuroshard`), else it hashes every tensor of the file once and caches the
    /// result. From then on every [`WeightFile::load`] checks the tensor it reads against the
    /// manifest.
    pub fn identity(&self) -> Result<ModelIdentity> {
        if let Some(id) = self.identity.get() {
            return Ok(id.clone());
        }
        let commitment = self.manifest()?.commitment()?;
        let digest = commitment.model_digest(self.served_tokenizer().ok());
        let identity = ModelIdentity {
            id: identity::hex(&digest),
            digest,
            commitment,
        };
        Ok(self.identity.get_or_init(|| identity).clone())
    }

    /// The tokenizer exported from this file (what entry nodes serve and the model id
    /// hashes), built once; the error text when the file has no usable tokenizer.
    pub(crate) fn served_tokenizer(&self) -> std::result::Result<&TokenizerInfo, String> {
        self.served_tokenizer
            .get_or_init(|| {
                crate::model::tokenizer::Tokenizer::for_model(self)
                    .and_then(|t| t.export())
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Makes `manifest` the one this file's tensors are checked against (a node that must
    /// not read the whole file gets it from whoever published the model). Refused when it
    /// was made for another header, or when a different manifest is in use already.
    pub fn use_manifest(&self, manifest: ModelManifest) -> Result<()> {
        manifest.check()?;
        if manifest.header != identity::hex(&self.model_hash) {
            return Err(self.wrong_weights(format!(
                "the manifest was made for a file with header {}, this file's header hashes \
                 to {}",
                manifest.header,
                identity::hex(&self.model_hash)
            )));
        }
        let manifest = Arc::new(manifest);
        let used = self.manifest.get_or_init(|| manifest.clone());
        if **used != *manifest {
            return Err(Error::InvalidConfig(
                "a different manifest is in use for this model file already".into(),
            ));
        }
        Ok(())
    }

    /// Where the manifest of this file is cached on disk, if a cache directory is known.
    pub fn manifest_cache_path(&self) -> Option<PathBuf> {
        identity::cache_dir().map(|dir| {
            dir.join("manifests")
                .join(format!("{}.json", identity::hex(&self.cache_key)))
        })
    }

    /// The manifest in use, found or computed as [`WeightFile::identity`] describes.
    pub fn manifest(&self) -> Result<Arc<ModelManifest>> {
        if let Some(m) = self.manifest.get() {
            return Ok(m.clone());
        }
        let manifest = match self.known_manifest()? {
            Some(m) => m,
            None => {
                let m = self.compute_manifest()?;
                if let Some(path) = self.manifest_cache_path() {
                    // A cache that cannot be written costs a rehash next time, nothing more.
                    if let Err(e) = m.write(&path) {
                        tracing::debug!(path = %path.display(), error = %e, "manifest not cached");
                    }
                }
                let m = Arc::new(m);
                lock_memo()?.insert(self.cache_key, m.clone());
                m
            }
        };
        Ok(self.manifest.get_or_init(|| manifest).clone())
    }

    /// The manifest this file would use without hashing anything: the one in use, one this
    /// process computed for the same file, or one cached on disk for it. `None` when
    /// [`WeightFile::manifest`] would have to read the whole file.
    pub fn known_manifest(&self) -> Result<Option<Arc<ModelManifest>>> {
        if let Some(m) = self.manifest.get() {
            return Ok(Some(m.clone()));
        }
        if let Some(m) = lock_memo()?.get(&self.cache_key).cloned() {
            return Ok(Some(m));
        }
        let cached = self.manifest_cache_path().and_then(|path| {
            let m = ModelManifest::read(&path).ok()?;
            (m.header == identity::hex(&self.model_hash)).then_some(m)
        });
        Ok(match cached {
            Some(m) => {
                let m = Arc::new(m);
                lock_memo()?.insert(self.cache_key, m.clone());
                Some(m)
            }
            None => None,
        })
    }

    /// Adopts a manifest that a peer sent (`Client::fetch_manifest`), once it proves to be
    /// the pinned model's: with this file's tokenizer and template its commitment must hash
    /// to `expected_id`. Then, as with [`WeightFile::use_manifest`], it must have been made
    /// for this file's header, and every tensor loaded afterwards is checked against it, so
    /// a node never hashes tensors outside its slice.
    ///
    /// Errors: [`Error::InvalidConfig`] when `expected_id` is malformed or the manifest is
    /// not the pinned model's (the peer lies or serves another model: ask another), and
    /// [`Error::WrongWeights`] when it is, but this file's header differs (this file is not
    /// the pinned model).
    pub fn use_peer_manifest(&self, manifest: ModelManifest, expected_id: &str) -> Result<()> {
        identity::check_model_id(expected_id)?;
        manifest.check()?;
        let id = manifest
            .commitment()?
            .model_id(self.served_tokenizer().ok());
        if id != expected_id {
            return Err(Error::InvalidConfig(format!(
                "the peer's manifest hashes to model id {id} with this file's tokenizer and \
                 template, not to the pinned {expected_id}"
            )));
        }
        self.use_manifest(manifest)
    }

    /// Hashes every tensor of the file (reads all of it): the manifest of this file.
    pub fn compute_manifest(&self) -> Result<ModelManifest> {
        let mut digests = Vec::new();
        match &self.backend {
            Backend::Gguf { content, .. } => {
                for name in content.tensor_infos.keys() {
                    digests.push(TensorDigest::of(name, &self.read_gguf_bytes(name)?));
                }
            }
            Backend::Safetensors { tensors } => {
                for (name, view) in tensors.tensors() {
                    digests.push(TensorDigest::of(&name, view.data()));
                }
            }
        }
        Ok(ModelManifest::new(self.model_hash, digests))
    }

    /// Tensors whose bytes were checked against the manifest as they loaded.
    pub fn tensors_verified(&self) -> u64 {
        self.tensors_verified.load(Ordering::Relaxed)
    }

    fn wrong_weights(&self, reason: String) -> Error {
        Error::WrongWeights {
            path: self.path.clone(),
            reason,
        }
    }

    /// Checks one tensor's stored bytes against the manifest, when one is in use.
    fn verify(&self, stored: &str, data: &[u8]) -> Result<()> {
        let Some(manifest) = self.manifest.get() else {
            return Ok(());
        };
        let expected = manifest.tensor(stored).ok_or_else(|| {
            self.wrong_weights(format!("tensor `{stored}` is not in the model's manifest"))
        })?;
        let actual = TensorDigest::of(stored, data);
        if actual != *expected {
            return Err(self.wrong_weights(format!(
                "tensor `{stored}` hashes to {} ({} bytes); the manifest says {} ({} \
                 bytes). The file changed or is not the model its manifest describes{}",
                actual.hash,
                actual.bytes,
                expected.hash,
                expected.bytes,
                self.manifest_cache_path()
                    .map(|p| format!(" (a stale cache? delete {})", p.display()))
                    .unwrap_or_default()
            )));
        }
        self.tensors_verified.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The stored bytes of one GGUF tensor (one seek and one read).
    fn read_gguf_bytes(&self, stored: &str) -> Result<Vec<u8>> {
        let Backend::Gguf { content, file } = &self.backend else {
            return Err(Error::Internal("not a GGUF file".into()));
        };
        let info = content
            .tensor_infos
            .get(stored)
            .ok_or_else(|| Error::MissingTensor(stored.to_string()))?;
        let dtype = info.ggml_dtype;
        let size = info.shape.elem_count() / dtype.block_size() * dtype.type_size();
        let mut data = vec![0u8; size];
        let mut reader = file.lock().map_err(Error::poisoned("weight file reader"))?;
        reader
            .seek(SeekFrom::Start(content.tensor_data_offset + info.offset))
            .and_then(|_| reader.read_exact(&mut data))
            .map_err(io_err(&self.path))?;
        Ok(data)
    }

    /// GGUF metadata (tokenizer, chat template), when the model is a GGUF file.
    pub fn gguf_metadata(&self) -> Option<&gguf_file::Content> {
        match &self.backend {
            Backend::Gguf { content, .. } => Some(content),
            Backend::Safetensors { .. } => None,
        }
    }

    /// Number of tensors read so far.
    pub fn tensors_loaded(&self) -> u64 {
        self.tensors_loaded.load(Ordering::Relaxed)
    }

    /// Bytes of tensor data read so far (as stored on disk: quantised sizes for GGUF).
    pub fn bytes_loaded(&self) -> u64 {
        self.bytes_loaded.load(Ordering::Relaxed)
    }

    /// Resolves a Hugging Face name to the name stored in the file, if present.
    fn file_name(&self, name: &str) -> Option<String> {
        match &self.backend {
            Backend::Gguf { content, .. } => {
                gguf_name(name).filter(|n| content.tensor_infos.contains_key(n))
            }
            Backend::Safetensors { tensors } => {
                // Original GPT-2 checkpoints omit the `transformer.` prefix.
                let candidates = [
                    Some(name.to_string()),
                    name.strip_prefix("transformer.").map(String::from),
                ];
                candidates
                    .into_iter()
                    .flatten()
                    .find(|n| tensors.get(n).is_ok())
            }
        }
    }

    /// Whether the file stores a tensor under this (Hugging Face) name.
    pub fn contains(&self, name: &str) -> bool {
        self.file_name(name).is_some()
    }

    /// Reads one tensor and checks its shape.
    pub fn load(&self, name: &str, expected: &[usize]) -> Result<RawTensor> {
        let stored = self
            .file_name(name)
            .ok_or_else(|| Error::MissingTensor(name.to_string()))?;
        let corrupt = |e: candle_core::Error| Error::CorruptModel {
            path: self.path.clone(),
            reason: format!("tensor `{stored}`: {e}"),
        };
        let (raw, bytes) = match &self.backend {
            Backend::Gguf { content, .. } => {
                let data = self.read_gguf_bytes(&stored)?;
                self.verify(&stored, &data)?;
                let info = &content.tensor_infos[&stored];
                let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
                    info.ggml_dtype,
                    &data,
                    info.shape.dims().to_vec(),
                    &Device::Cpu,
                )
                .map_err(corrupt)?;
                (RawTensor::Quantized(q), data.len() as u64)
            }
            Backend::Safetensors { tensors } => {
                let view = tensors.get(&stored).map_err(corrupt)?;
                let dtype = view.dtype();
                let bytes = view.data().len() as u64;
                if !matches!(
                    dtype,
                    safetensors::Dtype::F32 | safetensors::Dtype::F16 | safetensors::Dtype::BF16
                ) {
                    return Err(Error::UnsupportedDtype {
                        tensor: stored,
                        dtype: format!("{dtype:?}"),
                    });
                }
                self.verify(&stored, view.data())?;
                let t = tensors.load(&stored, &Device::Cpu).map_err(corrupt)?;
                (RawTensor::Dense(t), bytes)
            }
        };
        let dims = raw.dims();
        if dims != expected {
            return Err(Error::TensorShape {
                name: name.to_string(),
                expected: expected.to_vec(),
                actual: dims,
            });
        }
        self.tensors_loaded.fetch_add(1, Ordering::Relaxed);
        self.bytes_loaded.fetch_add(bytes, Ordering::Relaxed);
        Ok(raw)
    }
}

fn lock_memo() -> Result<std::sync::MutexGuard<'static, HashMap<Digest, Arc<ModelManifest>>>> {
    manifest_memo()
        .lock()
        .map_err(Error::poisoned("manifest memo"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_llama_names_to_gguf() {
        assert_eq!(
            gguf_name("model.layers.12.self_attn.k_proj.weight").as_deref(),
            Some("blk.12.attn_k.weight")
        );
        assert_eq!(
            gguf_name("lm_head.weight").as_deref(),
            Some("output.weight")
        );
        assert_eq!(gguf_name("model.layers.1.unknown"), None);
    }
}
