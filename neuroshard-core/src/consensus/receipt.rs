//! Signed receipts: what a hop says it computed, in a form anyone can check later.
//!
//! - A [`Receipt`] names the node, the session, the positions, the hash of the input it was
//!   given (an [`InputContext`]: session, positions, prefix chain, weight version, codec,
//!   build id, kernel path and the input frame's hash), the hash of its output frame, its
//!   weight version, the time and the hash of the node's previous receipt, so one node's
//!   receipts form a chain ([`ReceiptChain`], [`verify_chain`]).
//! - [`ReceiptCheck`] rejects forged (bad signature), replayed and out-of-window receipts.
//! - [`FraudProof`]: one signer, one input hash, two different outputs. Anyone verifies it
//!   with the two receipts alone, so it travels by gossip and needs nobody's word.
//! - [`SignedFrame`]: every sender signs the hash of each frame it sends. A receiver that
//!   blames its upstream must show two frames the upstream signed for the same positions
//!   with different bytes ([`UpstreamProof`]); without the signatures nobody is blamed.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::net::NodeId;

/// A blake3 hash.
pub type Hash = [u8; 32];

/// Version of the receipt and signed-frame encodings (inside the signed body).
pub const RECEIPT_VERSION: u8 = 1;

/// Default window around the receiver's clock inside which a receipt's time must fall.
pub const DEFAULT_RECEIPT_WINDOW_MS: u64 = 10 * 60 * 1000;

/// Why a receipt, a chain or a proof was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiptError {
    /// The body does not decode, or has another version.
    #[error("malformed receipt: {0}")]
    Malformed(String),
    /// The signature is not the named node's over the body.
    #[error("receipt signature is not {0}'s")]
    BadSignature(String),
    /// This exact receipt was already accepted.
    #[error("replayed receipt from {0}")]
    Replayed(String),
    /// The receipt's time is outside the window around the receiver's clock.
    #[error("receipt time {time_ms} ms is outside the window around {now_ms} ms")]
    OutOfWindow {
        /// The receipt's claimed time.
        time_ms: u64,
        /// The receiver's clock.
        now_ms: u64,
    },
    /// Receipt `index` of a chain does not point at the one before it, or has another signer.
    #[error("receipt {index} does not continue the chain")]
    BrokenChain {
        /// Position in the list handed to [`verify_chain`].
        index: usize,
    },
    /// Two receipts or frames that do not prove anything (the reason says why).
    #[error("not a proof: {0}")]
    NotAProof(&'static str),
}

/// Everything a hop's input hash commits to: two receipts with the same input hash claim to
/// have computed from exactly the same thing, so different outputs are fraud.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputContext {
    /// The inference session.
    pub session: u64,
    /// First position of the step.
    pub position: u64,
    /// Positions in the step.
    pub count: u32,
    /// The session's prefix chain before this step ([`extend_prefix`]).
    pub prefix: Hash,
    /// blake3 of the hop's weight version.
    pub weight: Hash,
    /// The input frame's codec byte.
    pub codec: u8,
    /// The build that computes (crate version and target).
    pub build_id: String,
    /// The kernel path that computes (`scalar`, `avx2`, ...).
    pub kernel_path: String,
    /// blake3 of the input frame's bytes.
    pub frame: Hash,
}

impl InputContext {
    /// The input hash a receipt carries.
    pub fn hash(&self) -> Hash {
        let body = postcard::to_allocvec(self).unwrap_or_default();
        blake3::derive_key("neuroshard receipt input v1", &body)
    }
}

impl InputContext {
    /// What the replica declares it computes with: a hash of its build id and kernel path
    /// (nodes name the SIMD path, compute mode, thread count and chunk invariance in it).
    /// Empty declarations declare nothing (`None`).
    pub fn declaration(&self) -> Option<Hash> {
        if self.build_id.is_empty() || self.kernel_path.is_empty() {
            return None;
        }
        let body = postcard::to_allocvec(&(&self.build_id, &self.kernel_path)).unwrap_or_default();
        Some(blake3::derive_key("neuroshard declaration v1", &body))
    }

    /// What the step computed from, without who computed it (build id and kernel path):
    /// replicas of one vote may run different builds, so the vote groups ballots by this
    /// key, while fraud needs the whole [`InputContext::hash`].
    pub fn step_key(&self) -> Hash {
        let mut without_build = self.clone();
        without_build.build_id.clear();
        without_build.kernel_path.clear();
        let body = postcard::to_allocvec(&without_build).unwrap_or_default();
        blake3::derive_key("neuroshard receipt step v1", &body)
    }

    /// [`InputContext::step_key`] without the prefix chain: the step's own input (session,
    /// positions, weight, codec and frame). A referee that joined a session after a vote
    /// found no majority replayed positions `0..p` from its predecessor's kept hidden states,
    /// so its prefix chain is its own (it never saw the original steps); refereed votes
    /// therefore group ballots by this key, and the referee's replayed KV cache stands for
    /// the prefix.
    pub fn replay_key(&self) -> Hash {
        let mut without_prefix = self.clone();
        without_prefix.prefix = [0; 32];
        without_prefix.step_key()
    }
}

/// The prefix chain after a step whose accepted input hash is `input`: it commits to every
/// earlier step, so a receipt for position p also pins the prefix its KV cache holds.
pub fn extend_prefix(prefix: &Hash, input: &Hash) -> Hash {
    let mut h = blake3::Hasher::new_derive_key("neuroshard prefix chain v1");
    h.update(prefix);
    h.update(input);
    *h.finalize().as_bytes()
}

/// blake3 of a weight version's canonical encoding (what receipts carry).
pub fn weight_hash(version: &crate::WeightVersion) -> Hash {
    let body = postcard::to_allocvec(version).unwrap_or_default();
    blake3::derive_key("neuroshard weight version v1", &body)
}

/// What a hop signs about one step it computed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// [`RECEIPT_VERSION`].
    pub version: u8,
    /// The signer.
    pub node: NodeId,
    /// What it computed: session, positions, input, output and weights.
    pub work: Work,
    /// Signer's clock, Unix milliseconds.
    pub time_ms: u64,
    /// [`SignedReceipt::hash`] of the signer's previous receipt (zeros for its first).
    pub prev: Hash,
}

/// A [`Receipt`] with the signer's ed25519 signature over its encoding.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SignedReceipt {
    /// postcard-encoded [`Receipt`].
    pub body: Vec<u8>,
    /// ed25519 signature of `body` by `Receipt::node`.
    pub signature: Vec<u8>,
}

pub(crate) fn verify_signed(
    node: &NodeId,
    body: &[u8],
    signature: &[u8],
) -> Result<(), ReceiptError> {
    let bad = || ReceiptError::BadSignature(node.fmt_short().to_string());
    let sig: [u8; 64] = signature.try_into().map_err(|_| bad())?;
    node.verify(body, &iroh::Signature::from_bytes(&sig))
        .map_err(|_| bad())
}

/// `value`'s postcard encoding and `key`'s signature over it.
pub(crate) fn sign_body(value: &impl Serialize, key: &iroh::SecretKey) -> (Vec<u8>, Vec<u8>) {
    let body = postcard::to_allocvec(value).unwrap_or_default();
    let signature = key.sign(&body).to_bytes().to_vec();
    (body, signature)
}

/// Decodes a signed body and checks its version (not its signature).
fn decode_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
    version: impl Fn(&T) -> u8,
) -> Result<T, ReceiptError> {
    let value: T =
        postcard::from_bytes(body).map_err(|e| ReceiptError::Malformed(e.to_string()))?;
    let v = version(&value);
    if v != RECEIPT_VERSION {
        return Err(ReceiptError::Malformed(format!(
            "version {v} (expected {RECEIPT_VERSION})"
        )));
    }
    Ok(value)
}

impl SignedReceipt {
    /// Signs `receipt` (whose `node` must be `key`'s public key to verify).
    pub fn sign(receipt: &Receipt, key: &iroh::SecretKey) -> Self {
        let (body, signature) = sign_body(receipt, key);
        SignedReceipt { body, signature }
    }

    /// The receipt as bytes (postcard): how it is stored and handed to other languages.
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// A receipt from [`SignedReceipt::to_bytes`] (not yet verified).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ReceiptError> {
        postcard::from_bytes(bytes).map_err(|e| ReceiptError::Malformed(e.to_string()))
    }

    /// Decodes the body and checks its signature.
    pub fn verify(&self) -> Result<Receipt, ReceiptError> {
        let receipt = self.decode_unverified()?;
        verify_signed(&receipt.node, &self.body, &self.signature)?;
        Ok(receipt)
    }

    /// Decodes the body without checking the signature: for a receipt that arrived from
    /// its signer over an authenticated connection, where the signature matters only once
    /// the receipt becomes evidence (then [`SignedReceipt::verify`]).
    pub fn decode_unverified(&self) -> Result<Receipt, ReceiptError> {
        decode_body(&self.body, |r: &Receipt| r.version)
    }

    /// The receipt's identity: what the signer's next receipt names as `prev`.
    pub fn hash(&self) -> Hash {
        *blake3::hash(&self.body).as_bytes()
    }
}

/// The fields of a receipt that describe the work (the chain adds node, time and `prev`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Work {
    /// The inference session.
    pub session: u64,
    /// First position of the step.
    pub position: u64,
    /// Positions in the step.
    pub count: u32,
    /// [`InputContext::hash`].
    pub input: Hash,
    /// blake3 of the output frame.
    pub output: Hash,
    /// [`weight_hash`].
    pub weight: Hash,
}

/// One node's receipt chain: each receipt names the one before it.
pub struct ReceiptChain {
    key: iroh::SecretKey,
    head: Hash,
}

impl ReceiptChain {
    /// A chain signed by `key`, starting at `head` (zeros for a new node; a restarted node
    /// continues from its persisted head).
    pub fn new(key: iroh::SecretKey, head: Hash) -> Self {
        ReceiptChain { key, head }
    }

    /// A new chain signed by the 32-byte secret key `secret` (a node's key file holds one).
    pub fn from_secret(secret: &[u8; 32]) -> Self {
        ReceiptChain::new(iroh::SecretKey::from_bytes(secret), [0; 32])
    }

    /// The signer's node id.
    pub fn node(&self) -> crate::net::NodeId {
        self.key.public()
    }

    /// The hash of the last receipt issued (what the next one names).
    pub fn head(&self) -> Hash {
        self.head
    }

    /// Signs a receipt for `work` at `time_ms` and moves the head to it.
    pub fn issue(&mut self, work: &Work, time_ms: u64) -> SignedReceipt {
        let receipt = Receipt {
            version: RECEIPT_VERSION,
            node: self.key.public(),
            work: work.clone(),
            time_ms,
            prev: self.head,
        };
        let signed = SignedReceipt::sign(&receipt, &self.key);
        self.head = signed.hash();
        signed
    }
}

/// Checks that `receipts` are one signer's consecutive receipts: every signature verifies and
/// each one's `prev` is the hash of the one before.
pub fn verify_chain(receipts: &[SignedReceipt]) -> Result<Vec<Receipt>, ReceiptError> {
    let mut out: Vec<Receipt> = Vec::with_capacity(receipts.len());
    for (index, signed) in receipts.iter().enumerate() {
        let r = signed.verify()?;
        if let (Some(before), Some(prev)) = (out.last(), index.checked_sub(1)) {
            if r.node != before.node || r.prev != receipts[prev].hash() {
                return Err(ReceiptError::BrokenChain { index });
            }
        }
        out.push(r);
    }
    Ok(out)
}

/// A receiver's gate for receipts: signature, time window, no replay. Its memory is bounded
/// by the receipts of one window (older entries are pruned: their replays fail the window).
pub struct ReceiptCheck {
    window_ms: u64,
    seen: HashMap<Hash, u64>,
    pruned_at: u64,
}

impl ReceiptCheck {
    /// A check accepting receipts within `window_ms` of the receiver's clock.
    pub fn new(window_ms: u64) -> Self {
        ReceiptCheck {
            window_ms,
            seen: HashMap::new(),
            pruned_at: 0,
        }
    }

    /// Accepts `signed` once, if its signature verifies and its time is in the window.
    pub fn check(&mut self, signed: &SignedReceipt, now_ms: u64) -> Result<Receipt, ReceiptError> {
        let receipt = signed.verify()?;
        self.check_verified(signed, &receipt, now_ms)?;
        Ok(receipt)
    }

    /// [`ReceiptCheck::check`] for a receipt whose signature the caller verified
    /// (`receipt` is `signed` decoded).
    pub(crate) fn check_verified(
        &mut self,
        signed: &SignedReceipt,
        receipt: &Receipt,
        now_ms: u64,
    ) -> Result<(), ReceiptError> {
        if receipt.time_ms.abs_diff(now_ms) > self.window_ms {
            return Err(ReceiptError::OutOfWindow {
                time_ms: receipt.time_ms,
                now_ms,
            });
        }
        if now_ms.saturating_sub(self.pruned_at) > self.window_ms {
            let horizon = now_ms.saturating_sub(self.window_ms);
            self.seen.retain(|_, t| *t >= horizon);
            self.pruned_at = now_ms;
        }
        if self.seen.insert(signed.hash(), receipt.time_ms).is_some() {
            return Err(ReceiptError::Replayed(receipt.node.fmt_short().to_string()));
        }
        Ok(())
    }

    /// Receipts remembered for replay detection.
    pub fn remembered(&self) -> usize {
        self.seen.len()
    }
}

impl Default for ReceiptCheck {
    fn default() -> Self {
        ReceiptCheck::new(DEFAULT_RECEIPT_WINDOW_MS)
    }
}

/// Proof that a node signed two different outputs for one input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FraudProof {
    /// One receipt.
    pub a: SignedReceipt,
    /// The other, with the same signer and input hash and another output hash.
    pub b: SignedReceipt,
}

impl FraudProof {
    /// The two receipts as a proof, if they are one.
    pub fn new(a: SignedReceipt, b: SignedReceipt) -> Result<Self, ReceiptError> {
        let proof = FraudProof { a, b };
        proof.verify()?;
        Ok(proof)
    }

    /// The node proven to have lied, or why this proves nothing.
    pub fn verify(&self) -> Result<NodeId, ReceiptError> {
        let (a, b) = (self.a.verify()?, self.b.verify()?);
        if a.node != b.node {
            return Err(ReceiptError::NotAProof("two signers"));
        }
        if a.work.input != b.work.input {
            return Err(ReceiptError::NotAProof("two inputs"));
        }
        if a.work.output == b.work.output {
            return Err(ReceiptError::NotAProof("the same output"));
        }
        Ok(a.node)
    }
}

/// A sender's signed claim about a frame it sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameClaim {
    /// [`RECEIPT_VERSION`].
    pub version: u8,
    /// The signer.
    pub sender: NodeId,
    /// The inference session.
    pub session: u64,
    /// First position of the step.
    pub position: u64,
    /// Positions in the step.
    pub count: u32,
    /// blake3 of the frame's bytes.
    pub frame: Hash,
}

/// A [`FrameClaim`] with the sender's signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedFrame {
    /// postcard-encoded [`FrameClaim`].
    pub body: Vec<u8>,
    /// ed25519 signature of `body` by the sender.
    pub signature: Vec<u8>,
}

impl SignedFrame {
    /// Signs `claim` with the sender's key.
    pub fn sign(claim: &FrameClaim, key: &iroh::SecretKey) -> Self {
        let (body, signature) = sign_body(claim, key);
        SignedFrame { body, signature }
    }

    /// Decodes the claim and checks its signature.
    pub fn verify(&self) -> Result<FrameClaim, ReceiptError> {
        let claim = decode_body(&self.body, |c: &FrameClaim| c.version)?;
        verify_signed(&claim.sender, &self.body, &self.signature)?;
        Ok(claim)
    }
}

/// Proof that an upstream sent different bytes for the same positions to two receivers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamProof {
    /// What one receiver got.
    pub a: SignedFrame,
    /// What the other got.
    pub b: SignedFrame,
}

impl UpstreamProof {
    /// The upstream proven to have sent two inputs, or why this proves nothing.
    pub fn verify(&self) -> Result<NodeId, ReceiptError> {
        let (a, b) = (self.a.verify()?, self.b.verify()?);
        if a.sender != b.sender {
            return Err(ReceiptError::NotAProof("two senders"));
        }
        if (a.session, a.position, a.count) != (b.session, b.position, b.count) {
            return Err(ReceiptError::NotAProof("different positions"));
        }
        if a.frame == b.frame {
            return Err(ReceiptError::NotAProof("the same frame"));
        }
        Ok(a.sender)
    }
}

/// Blame for two receivers' differing inputs: a proof against the upstream when both
/// receivers hold its signature on what they got, and nobody otherwise.
pub fn blame_upstream(a: Option<&SignedFrame>, b: Option<&SignedFrame>) -> Option<UpstreamProof> {
    let proof = UpstreamProof {
        a: a?.clone(),
        b: b?.clone(),
    };
    proof.verify().ok().map(|_| proof)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> iroh::SecretKey {
        iroh::SecretKey::from_bytes(&[seed; 32])
    }

    fn work(position: u64, output: u8) -> Work {
        let input = InputContext {
            session: 7,
            position,
            count: 1,
            prefix: [0; 32],
            weight: [1; 32],
            codec: 0,
            build_id: "test".into(),
            kernel_path: "scalar".into(),
            frame: [position as u8; 32],
        };
        Work {
            session: 7,
            position,
            count: 1,
            input: input.hash(),
            output: [output; 32],
            weight: [1; 32],
        }
    }

    #[test]
    fn a_receipt_verifies_and_a_changed_byte_or_signer_does_not() {
        let mut chain = ReceiptChain::new(key(1), [0; 32]);
        let signed = chain.issue(&work(0, 9), 1_000);
        let r = signed.verify().expect("valid");
        assert_eq!(
            (r.node, r.work.position, r.work.output),
            (key(1).public(), 0, [9; 32])
        );
        let mut forged = signed.clone();
        let last = forged.body.len() - 1;
        forged.body[last] ^= 1;
        assert!(forged.verify().is_err());
        // The same body signed by another key: the named node did not sign it.
        let other = SignedReceipt {
            body: signed.body.clone(),
            signature: key(2).sign(&signed.body).to_bytes().to_vec(),
        };
        assert!(matches!(other.verify(), Err(ReceiptError::BadSignature(_))));
        let short = SignedReceipt {
            body: signed.body,
            signature: vec![0; 3],
        };
        assert!(matches!(short.verify(), Err(ReceiptError::BadSignature(_))));
        assert!(matches!(
            SignedReceipt {
                body: vec![0xff; 5],
                signature: vec![]
            }
            .verify(),
            Err(ReceiptError::Malformed(_))
        ));
    }

    #[test]
    fn receipts_chain_and_a_dropped_or_foreign_link_breaks_it() {
        let mut chain = ReceiptChain::new(key(1), [0; 32]);
        let rs: Vec<SignedReceipt> = (0..4)
            .map(|p| chain.issue(&work(p, 1), 1_000 + p))
            .collect();
        assert_eq!(verify_chain(&rs).expect("a chain").len(), 4);
        assert_eq!(rs[0].verify().map(|r| r.prev), Ok([0; 32]));
        let gap = [rs[0].clone(), rs[2].clone()];
        assert_eq!(
            verify_chain(&gap),
            Err(ReceiptError::BrokenChain { index: 1 })
        );
        let mut other = ReceiptChain::new(key(2), rs[1].hash());
        let foreign = [rs[1].clone(), other.issue(&work(2, 1), 1_002)];
        assert_eq!(
            verify_chain(&foreign),
            Err(ReceiptError::BrokenChain { index: 1 })
        );
    }

    #[test]
    fn replays_and_out_of_window_receipts_are_rejected() {
        let mut chain = ReceiptChain::new(key(1), [0; 32]);
        let mut check = ReceiptCheck::new(60_000);
        let now = 10_000_000;
        let r = chain.issue(&work(0, 1), now - 1_000);
        assert!(check.check(&r, now).is_ok());
        assert!(matches!(
            check.check(&r, now + 1),
            Err(ReceiptError::Replayed(_))
        ));
        let old = chain.issue(&work(1, 1), now - 120_000);
        assert!(matches!(
            check.check(&old, now),
            Err(ReceiptError::OutOfWindow { .. })
        ));
        let future = chain.issue(&work(2, 1), now + 120_000);
        assert!(matches!(
            check.check(&future, now),
            Err(ReceiptError::OutOfWindow { .. })
        ));
        // Pruning forgets receipts older than the window; their replays fail the window.
        let later = now + 200_000;
        let fresh = chain.issue(&work(3, 1), later);
        assert!(check.check(&fresh, later).is_ok());
        assert_eq!(check.remembered(), 1);
        assert!(matches!(
            check.check(&r, later),
            Err(ReceiptError::OutOfWindow { .. })
        ));
    }

    #[test]
    fn two_outputs_for_one_input_prove_fraud_and_nothing_else_does() {
        let mut chain = ReceiptChain::new(key(1), [0; 32]);
        let a = chain.issue(&work(0, 1), 1_000);
        let b = chain.issue(&work(0, 2), 1_001);
        assert_eq!(
            FraudProof::new(a.clone(), b.clone()).map(|p| p.verify()),
            Ok(Ok(key(1).public()))
        );
        // Same output twice (a retry), other positions, or two signers: no proof.
        let again = chain.issue(&work(0, 1), 1_002);
        assert!(FraudProof::new(a.clone(), again).is_err());
        let next = chain.issue(&work(1, 2), 1_003);
        assert!(FraudProof::new(a.clone(), next).is_err());
        let mut other = ReceiptChain::new(key(2), [0; 32]);
        let theirs = other.issue(&work(0, 2), 1_000);
        assert!(FraudProof::new(a, theirs).is_err());
        // A proof whose receipt was tampered with fails.
        let mut bad = FraudProof {
            a: b.clone(),
            b: b.clone(),
        };
        bad.b.body[3] ^= 1;
        assert!(bad.verify().is_err());
    }

    #[test]
    fn upstream_blame_needs_the_upstream_signature_on_both_frames() {
        let claim = |frame: u8| FrameClaim {
            version: RECEIPT_VERSION,
            sender: key(5).public(),
            session: 7,
            position: 3,
            count: 1,
            frame: [frame; 32],
        };
        let a = SignedFrame::sign(&claim(1), &key(5));
        let b = SignedFrame::sign(&claim(2), &key(5));
        let proof = blame_upstream(Some(&a), Some(&b)).expect("a proof");
        assert_eq!(proof.verify(), Ok(key(5).public()));
        // Without one of the signatures, or with a forged one, nobody is blamed.
        assert!(blame_upstream(Some(&a), None).is_none());
        let forged = SignedFrame::sign(&claim(2), &key(6));
        assert!(blame_upstream(Some(&a), Some(&forged)).is_none());
        // The same frame to both receivers: the receivers' inputs did not differ.
        assert!(blame_upstream(Some(&a), Some(&a.clone())).is_none());
    }

    #[test]
    fn the_input_hash_covers_every_field() {
        let base = InputContext {
            session: 1,
            position: 2,
            count: 3,
            prefix: [4; 32],
            weight: [5; 32],
            codec: 0,
            build_id: "b".into(),
            kernel_path: "avx2".into(),
            frame: [6; 32],
        };
        let mut variants = vec![base.clone()];
        let mut v = base.clone();
        v.session = 9;
        variants.push(v);
        let mut v = base.clone();
        v.position = 9;
        variants.push(v);
        let mut v = base.clone();
        v.count = 9;
        variants.push(v);
        let mut v = base.clone();
        v.prefix = [9; 32];
        variants.push(v);
        let mut v = base.clone();
        v.weight = [9; 32];
        variants.push(v);
        let mut v = base.clone();
        v.codec = 1;
        variants.push(v);
        let mut v = base.clone();
        v.build_id = "c".into();
        variants.push(v);
        let mut v = base.clone();
        v.kernel_path = "scalar".into();
        variants.push(v);
        let mut v = base;
        v.frame = [9; 32];
        variants.push(v);
        let hashes: std::collections::HashSet<Hash> = variants.iter().map(|v| v.hash()).collect();
        assert_eq!(hashes.len(), variants.len());
        assert_ne!(
            extend_prefix(&[0; 32], &[1; 32]),
            extend_prefix(&[1; 32], &[0; 32])
        );
    }
}
