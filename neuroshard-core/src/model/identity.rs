//! Model identity: a model id that commits to every weight byte, the tokenizer and the chat
//! template.
//!
//! The id is built in two levels, so that each party checks only what it holds:
//! - A **manifest** lists the blake3 hash of every tensor's stored bytes. Its Merkle root
//!   (`tensors`) and the hash of the file's header (`header`: metadata and tensor table) form
//!   the [`ModelCommitment`].
//! - The **model id** hashes the commitment with the tokenizer and the chat template as
//!   NeuroShard serves them ([`ModelCommitment::model_id`]).
//!
//! A node gets the manifest once (computed from the whole file, then cached, or given with
//! `--manifest`) and afterwards hashes each tensor of its own slice as it loads it, against the
//! manifest: it never reads tensors it does not serve. A client that has no model file gets the
//! commitment and the tokenizer from an entry node, recomputes the id and compares it with the
//! one it pinned, so an entry cannot serve another tokenizer or template under a known id.
//!
//! The id names the base weights and never changes; trained adapters are versioned on top of
//! it (see DESIGN.md, "Training").

use crate::error::{Error, Result};
use crate::model::tokenizer::TokenizerInfo;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A blake3 digest.
pub(crate) type Digest = [u8; 32];

/// Version of the manifest format and of the id derivation. A change of either changes every
/// id, so it is part of the hashed data.
pub const MODEL_ID_VERSION: u32 = 1;

/// Length of a model id in hex digits (a full 256-bit digest: ids are pinned by users and
/// compared across an open network, so they are not truncated).
pub(crate) const MODEL_ID_HEX_LEN: usize = 64;

/// Largest manifest file read from disk (a model with 100,000 tensors stays far below).
const MAX_MANIFEST_BYTES: u64 = 64 << 20;

/// Lowercase hex of a digest (or of any bytes: a digest's prefix in a short label).
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses 64 hex digits into a digest.
pub(crate) fn parse_hex(text: &str) -> Option<Digest> {
    if text.len() != MODEL_ID_HEX_LEN || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The hash of one tensor's stored bytes, under the name the file stores it by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorDigest {
    /// The tensor's name in the file (`blk.3.attn_q.weight` in GGUF).
    pub name: String,
    /// Length of its stored data in bytes (quantised size for GGUF).
    pub bytes: u64,
    /// blake3 of that data, as hex.
    pub hash: String,
}

impl TensorDigest {
    /// The digest of `data` stored under `name`.
    pub fn of(name: &str, data: &[u8]) -> Self {
        TensorDigest {
            name: name.to_string(),
            bytes: data.len() as u64,
            hash: hex(blake3::hash(data).as_bytes()),
        }
    }
}

/// Per-tensor hashes of one model file: what a node checks its slice against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelManifest {
    /// [`MODEL_ID_VERSION`] it was computed with.
    pub version: u32,
    /// blake3 of the file's header (metadata and tensor table), as hex.
    pub header: String,
    /// Every tensor of the file, sorted by name.
    pub tensors: Vec<TensorDigest>,
}

/// What an entry node sends so that a client can recompute the model id from the tokenizer
/// and template it received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelCommitment {
    /// blake3 of the file's header.
    pub header: Digest,
    /// Merkle root of the per-tensor hashes.
    pub tensors: Digest,
}

fn leaf_hash(digest: &TensorDigest, data: &Digest) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(&[0]);
    h.update(&(digest.name.len() as u64).to_le_bytes());
    h.update(digest.name.as_bytes());
    h.update(&digest.bytes.to_le_bytes());
    h.update(data);
    *h.finalize().as_bytes()
}

/// Merkle root of `leaves`: pairs hash upward (an odd last node moves up unchanged); leaves
/// and inner nodes are domain-separated, so no leaf can pose as a subtree.
pub(crate) fn merkle_root(leaves: &[Digest]) -> Digest {
    if leaves.is_empty() {
        return *blake3::hash(b"neuroshard/empty-tree").as_bytes();
    }
    let mut level = leaves.to_vec();
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|pair| match pair {
                [l, r] => {
                    let mut h = blake3::Hasher::new();
                    h.update(&[1]);
                    h.update(l);
                    h.update(r);
                    *h.finalize().as_bytes()
                }
                [single] => *single,
                _ => unreachable!("chunks(2) yields one or two items"),
            })
            .collect();
    }
    level[0]
}

fn optional_text_hash(domain: &[u8], text: Option<&str>) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(domain);
    match text {
        Some(t) => {
            h.update(&[1]);
            h.update(&(t.len() as u64).to_le_bytes());
            h.update(t.as_bytes());
        }
        None => {
            h.update(&[0]);
        }
    }
    *h.finalize().as_bytes()
}

/// Hash of everything in a tokenizer except its chat template.
fn tokenizer_hash(info: Option<&TokenizerInfo>) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(b"neuroshard/tokenizer");
    if let Some(info) = info {
        h.update(&[1]);
        h.update(&(info.json.len() as u64).to_le_bytes());
        h.update(info.json.as_bytes());
        h.update(&(info.eos_ids.len() as u64).to_le_bytes());
        for id in &info.eos_ids {
            h.update(&id.to_le_bytes());
        }
        match &info.bos {
            Some((id, text)) => {
                h.update(&[1]);
                h.update(&id.to_le_bytes());
                h.update(&(text.len() as u64).to_le_bytes());
                h.update(text.as_bytes());
            }
            None => {
                h.update(&[0]);
            }
        }
        h.update(&[info.add_bos as u8]);
    } else {
        h.update(&[0]);
    }
    *h.finalize().as_bytes()
}

impl ModelCommitment {
    /// The model id: hex of [`ModelCommitment::model_digest`].
    pub fn model_id(&self, tokenizer: Option<&TokenizerInfo>) -> String {
        hex(&self.model_digest(tokenizer))
    }

    /// blake3 over the version, the header hash, the tensors' Merkle root, the tokenizer and
    /// the chat template (`None` for a model without a tokenizer).
    pub fn model_digest(&self, tokenizer: Option<&TokenizerInfo>) -> Digest {
        let mut h = blake3::Hasher::new();
        h.update(b"neuroshard/model-id");
        h.update(&MODEL_ID_VERSION.to_le_bytes());
        h.update(&self.header);
        h.update(&self.tensors);
        h.update(&tokenizer_hash(tokenizer));
        h.update(&optional_text_hash(
            b"neuroshard/chat-template",
            tokenizer.and_then(|t| t.chat_template.as_deref()),
        ));
        *h.finalize().as_bytes()
    }
}

impl ModelManifest {
    /// Builds a manifest from `(name, data hash, bytes)` for every tensor of a file.
    pub(crate) fn new(header: Digest, mut tensors: Vec<TensorDigest>) -> Self {
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        ModelManifest {
            version: MODEL_ID_VERSION,
            header: hex(&header),
            tensors,
        }
    }

    /// The commitment this manifest makes: its header hash and its tensors' Merkle root.
    pub fn commitment(&self) -> Result<ModelCommitment> {
        let header = parse_hex(&self.header)
            .ok_or_else(|| invalid(format!("header hash `{}` is not hex", self.header)))?;
        let mut leaves = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            let data = parse_hex(&t.hash)
                .ok_or_else(|| invalid(format!("tensor `{}`: hash is not hex", t.name)))?;
            leaves.push(leaf_hash(t, &data));
        }
        Ok(ModelCommitment {
            header,
            tensors: merkle_root(&leaves),
        })
    }

    /// The recorded digest of the tensor stored as `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorDigest> {
        self.tensors
            .binary_search_by(|t| t.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.tensors[i])
    }

    /// Checks a manifest read from outside (a file, later a peer): version, sorted unique
    /// names, well-formed hashes.
    pub fn check(&self) -> Result<()> {
        if self.version != MODEL_ID_VERSION {
            return Err(invalid(format!(
                "manifest version {} (this build reads {MODEL_ID_VERSION})",
                self.version
            )));
        }
        if self.tensors.windows(2).any(|w| w[0].name >= w[1].name) {
            return Err(invalid("tensor names are not sorted and unique".into()));
        }
        self.commitment().map(|_| ())
    }

    /// Reads and checks a manifest file.
    pub fn read(path: &Path) -> Result<Self> {
        let len = std::fs::metadata(path)
            .map_err(|source| Error::ModelFile {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        if len > MAX_MANIFEST_BYTES {
            return Err(invalid(format!(
                "{} is {len} bytes, more than a manifest can be ({MAX_MANIFEST_BYTES})",
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|source| Error::ModelFile {
            path: path.to_path_buf(),
            source,
        })?;
        let manifest: ModelManifest =
            serde_json::from_str(&text).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
        manifest.check()?;
        Ok(manifest)
    }

    /// Writes the manifest as JSON, atomically (a temporary file renamed into place), so a
    /// reader never sees half a manifest.
    pub fn write(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::Internal(format!("manifest encoding: {e}")))?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }
}

fn invalid(reason: String) -> Error {
    Error::InvalidConfig(format!("model manifest: {reason}"))
}

/// Where computed manifests are cached: `$NEUROSHARD_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/neuroshard`, else `$HOME/.cache/neuroshard`; `None` when none is set.
pub(crate) fn cache_dir() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("NEUROSHARD_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = var("XDG_CACHE_HOME") {
        return Some(PathBuf::from(dir).join("neuroshard"));
    }
    var("HOME").map(|home| PathBuf::from(home).join(".cache").join("neuroshard"))
}

/// The model's identity once its manifest is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelIdentity {
    /// The model id (64 hex digits).
    pub id: String,
    /// The same id as bytes.
    pub digest: Digest,
    /// Header hash and tensors root, which entry nodes send to clients.
    pub commitment: ModelCommitment,
}

/// Checks that `id` is a well-formed model id (64 lowercase hex digits).
pub fn check_model_id(id: &str) -> Result<()> {
    if id.len() == MODEL_ID_HEX_LEN && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(Error::InvalidConfig(format!(
            "`{id}` is not a model id ({MODEL_ID_HEX_LEN} lowercase hex digits, as \
             `neuroshard model-id MODEL` prints)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(name: &str, data: &[u8]) -> TensorDigest {
        TensorDigest::of(name, data)
    }

    fn manifest() -> ModelManifest {
        ModelManifest::new(
            [7; 32],
            vec![digest("b", b"two"), digest("a", b"one"), digest("c", b"3")],
        )
    }

    #[test]
    fn every_part_changes_the_id() {
        let m = manifest();
        let base = m.commitment().unwrap().model_id(None);
        let mut other = m.clone();
        other.tensors[1] = digest("b", b"twO");
        assert_ne!(other.commitment().unwrap().model_id(None), base);
        let mut other = m.clone();
        other.header = hex(&[8; 32]);
        assert_ne!(other.commitment().unwrap().model_id(None), base);
        let tok = TokenizerInfo {
            json: "{}".into(),
            chat_template: None,
            eos_ids: vec![2],
            bos: None,
            add_bos: false,
        };
        let with_tok = m.commitment().unwrap().model_id(Some(&tok));
        assert_ne!(with_tok, base);
        let templated = TokenizerInfo {
            chat_template: Some("{{ x }}".into()),
            ..tok.clone()
        };
        assert_ne!(m.commitment().unwrap().model_id(Some(&templated)), with_tok);
        let other_eos = TokenizerInfo {
            eos_ids: vec![3],
            ..tok
        };
        assert_ne!(m.commitment().unwrap().model_id(Some(&other_eos)), with_tok);
        assert_eq!(base.len(), MODEL_ID_HEX_LEN);
        check_model_id(&base).unwrap();
    }

    #[test]
    fn merkle_root_depends_on_order_and_count() {
        let l: Vec<Digest> = (0u8..5).map(|i| [i; 32]).collect();
        let root = merkle_root(&l);
        assert_ne!(merkle_root(&l[..4]), root);
        let mut swapped = l.clone();
        swapped.swap(0, 1);
        assert_ne!(merkle_root(&swapped), root);
        assert_eq!(merkle_root(&l[..1]), l[0]);
        assert_ne!(merkle_root(&[]), merkle_root(&l[..1]));
    }

    #[test]
    fn manifests_round_trip_and_bad_ones_are_refused() {
        let dir = std::env::temp_dir().join(format!("ns-manifest-{}", std::process::id()));
        let path = dir.join("m.json");
        let m = manifest();
        m.write(&path).unwrap();
        assert_eq!(ModelManifest::read(&path).unwrap(), m);
        assert_eq!(m.tensor("b").unwrap().bytes, 3);
        assert!(m.tensor("z").is_none());
        let mut unsorted = m.clone();
        unsorted.tensors.swap(0, 1);
        assert!(unsorted.check().is_err());
        let mut bad_hash = m.clone();
        bad_hash.tensors[0].hash = "zz".into();
        assert!(bad_hash.check().is_err());
        std::fs::write(&path, "{not json").unwrap();
        assert!(ModelManifest::read(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(check_model_id("ABC").is_err());
        assert_eq!(parse_hex(&hex(&[0xab; 32])), Some([0xab; 32]));
    }
}
