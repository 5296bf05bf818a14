//! Announcements: what a node tells the swarm about itself, signed with its iroh secret key.
//!
//! The body is postcard-encoded and signed as bytes, so verification never depends on
//! re-serialising (which could differ between versions).

use super::{NetError, NodeId};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::ops::Range;

/// Version of the NeuroShard protocols this build speaks.
pub const PROTOCOL_VERSION: u16 = 8;

/// A node's self-description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// Protocol version the node speaks.
    pub protocol_version: u16,
    /// The announcing node (must match the signature).
    pub node: NodeId,
    /// Model identity (hex of the model hash): nodes of other models are ignored.
    pub model_id: String,
    /// What the node's trainable weights are: the slice's own weights first (`adapter`
    /// `None`), then each LoRA adapter it serves, by name. At most [`MAX_ANNOUNCED_VERSIONS`].
    pub versions: Vec<AnnouncedVersion>,
    /// Layers the node holds.
    pub layers: Range<u32>,
    /// Sessions the node accepts at once.
    pub capacity: u32,
    /// Sessions open now.
    pub load: u32,
    /// Direct addresses to dial the node at.
    pub addrs: Vec<SocketAddr>,
    /// Whether the node serves model info (tokenizer, chat template) to clients.
    pub entry: bool,
    /// When the node made this announcement (ms since the Unix epoch); strictly increasing
    /// per node, which is what rejects replays.
    pub timestamp_ms: u64,
    /// When peers should forget the node unless it re-announces (ms since the Unix epoch).
    pub expires_ms: u64,
}

/// Most versions one announcement may carry (the base weights and the adapters).
pub const MAX_ANNOUNCED_VERSIONS: usize = 64;

/// One trained version a node serves: the base weights or one adapter (the model and slice
/// are the announcement's). Routes for an adapter use only nodes that announce it, and the
/// replicas of one range that vote together announce the same version.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AnnouncedVersion {
    /// The adapter's name; `None` for the slice's own weights.
    pub adapter: Option<String>,
    /// Optimizer steps applied.
    pub steps: u64,
    /// blake3 of the trainable state (see [`crate::TrainedVersion`]).
    pub state: [u8; 32],
}

impl From<&crate::TrainedVersion> for AnnouncedVersion {
    fn from(v: &crate::TrainedVersion) -> Self {
        AnnouncedVersion {
            adapter: v.adapter.clone(),
            steps: v.steps,
            state: v.state,
        }
    }
}

impl Announcement {
    /// The version of `adapter` (`None`: the base weights) this node serves, if any.
    pub fn version_of(&self, adapter: Option<&str>) -> Option<&AnnouncedVersion> {
        self.versions
            .iter()
            .find(|v| v.adapter.as_deref() == adapter)
    }

    /// What replicas must share to vote together on sessions of `adapter`: its steps and
    /// state. Untrained base weights (0 steps) all count as one version, whatever their
    /// compute mode (an f32 slice and a quantised one hash different tensors but are the same
    /// model, and the tolerant vote is calibrated for that). `None` when the node does not
    /// serve `adapter`.
    pub fn vote_key(&self, adapter: Option<&str>) -> Option<(u64, [u8; 32])> {
        let v = match self.version_of(adapter) {
            Some(v) => v,
            // Nodes that announce no base version (none do today) serve untrained weights.
            None if adapter.is_none() => return Some((0, [0; 32])),
            None => return None,
        };
        Some(if adapter.is_none() && v.steps == 0 {
            (0, [0; 32])
        } else {
            (v.steps, v.state)
        })
    }
}

/// An announcement with its signature, as sent on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedAnnouncement {
    /// postcard-encoded [`Announcement`].
    pub body: Vec<u8>,
    /// ed25519 signature of `body` by the announcing node's key.
    pub signature: Vec<u8>,
}

impl SignedAnnouncement {
    /// Signs an announcement (its `node` must be `key`'s public key).
    pub fn sign(announcement: &Announcement, key: &iroh::SecretKey) -> Result<Self, NetError> {
        if announcement.node != key.public() {
            return Err(NetError::BadSignature(
                "announcement names another node".into(),
            ));
        }
        let body =
            postcard::to_allocvec(announcement).map_err(|e| NetError::Malformed(e.to_string()))?;
        let signature = key.sign(&body).to_bytes().to_vec();
        Ok(SignedAnnouncement { body, signature })
    }

    /// Decodes the body and checks the signature against the node id it claims.
    pub fn verify(&self) -> Result<Announcement, NetError> {
        let ann: Announcement =
            postcard::from_bytes(&self.body).map_err(|e| NetError::Malformed(e.to_string()))?;
        let sig: [u8; 64] = self
            .signature
            .as_slice()
            .try_into()
            .map_err(|_| NetError::BadSignature(ann.node.fmt_short().to_string()))?;
        ann.node
            .verify(&self.body, &iroh::Signature::from_bytes(&sig))
            .map_err(|_| NetError::BadSignature(ann.node.fmt_short().to_string()))?;
        Ok(ann)
    }

    /// Encodes for the wire (gossip message).
    pub fn to_bytes(&self) -> Result<Vec<u8>, NetError> {
        postcard::to_allocvec(self).map_err(|e| NetError::Malformed(e.to_string()))
    }

    /// Decodes from the wire.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, NetError> {
        postcard::from_bytes(bytes).map_err(|e| NetError::Malformed(e.to_string()))
    }
}

/// What `engine` announces: its served versions, at most [`MAX_ANNOUNCED_VERSIONS`] (the base
/// weights first). A version that cannot be computed is left out and logged: the node then
/// serves no routes for it.
pub fn announced_versions(engine: &crate::ShardEngine) -> Vec<AnnouncedVersion> {
    match engine.served_versions() {
        Ok(versions) => versions
            .iter()
            .take(MAX_ANNOUNCED_VERSIONS)
            .map(AnnouncedVersion::from)
            .collect(),
        Err(e) => {
            tracing::warn!("cannot compute the versions to announce: {e}");
            Vec::new()
        }
    }
}
