//! Announcements: what a node tells the swarm about itself, signed with its iroh secret key.
//!
//! The body is postcard-encoded and signed as bytes, so verification never depends on
//! re-serialising (which could differ between versions).

use super::{NetError, NodeId};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::ops::Range;

/// Version of the NeuroShard protocols this build speaks.
pub const PROTOCOL_VERSION: u16 = 7;

/// A node's self-description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// Protocol version the node speaks.
    pub protocol_version: u16,
    /// The announcing node (must match the signature).
    pub node: NodeId,
    /// Model identity (hex of the model hash): nodes of other models are ignored.
    pub model_id: String,
    /// Update counter of the node's weights (0 = base weights).
    pub weight_updates: u64,
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
