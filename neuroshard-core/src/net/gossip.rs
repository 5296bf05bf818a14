//! What travels on the swarm's gossip topic: nodes' signed announcements, and proofs against
//! nodes (the Trust issue) that every node verifies before it acts on them.
//!
//! A proof is a fraud proof (one signer, two outputs for one input) or an upstream proof
//! (one sender, two frames for one step): a few hundred bytes that anyone can check with
//! the signatures alone, so they spread by gossip and need nobody's word. Deviation
//! evidence carries whole ballots (hidden states, logits) and stays with the vote's
//! receivers and client; it is never gossiped.

use super::SignedAnnouncement;
use crate::consensus::Evidence;

/// Prefix of a proof on the gossip topic (announcements are bare postcard bytes, whose first
/// byte is a length: they never start with these bytes).
const PROOF_TAG: &[u8; 8] = b"nsproof1";

/// The largest gossip message iroh-gossip delivers by default; longer proofs are not sent.
pub(crate) const MAX_GOSSIP_MESSAGE: usize = 4096;

/// One message on the gossip topic.
#[derive(Debug)]
pub(crate) enum GossipItem {
    /// A node's signed announcement.
    Announcement(SignedAnnouncement),
    /// A proof against a node (not yet verified).
    Proof(Evidence),
}

/// Whether `evidence` is a proof that travels by gossip (fraud or upstream proofs).
pub(crate) fn is_gossiped(evidence: &Evidence) -> bool {
    matches!(evidence, Evidence::Fraud(_) | Evidence::Upstream(_))
}

/// The gossip bytes of a proof; `None` for deviation evidence or a proof too long to send.
pub(crate) fn encode_proof(evidence: &Evidence) -> Option<Vec<u8>> {
    if !is_gossiped(evidence) {
        return None;
    }
    let mut bytes = PROOF_TAG.to_vec();
    bytes.extend(postcard::to_allocvec(evidence).ok()?);
    (bytes.len() <= MAX_GOSSIP_MESSAGE).then_some(bytes)
}

/// Decodes a gossip message; `None` for anything else (dropped).
pub(crate) fn decode(bytes: &[u8]) -> Option<GossipItem> {
    if let Some(body) = bytes.strip_prefix(PROOF_TAG.as_slice()) {
        let evidence: Evidence = postcard::from_bytes(body).ok()?;
        return is_gossiped(&evidence).then_some(GossipItem::Proof(evidence));
    }
    SignedAnnouncement::from_bytes(bytes)
        .ok()
        .map(GossipItem::Announcement)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consensus::receipt::{ReceiptChain, Work};
    use crate::consensus::FraudProof;

    fn fraud() -> Evidence {
        let key = iroh::SecretKey::generate();
        let mut chain = ReceiptChain::new(key, [0; 32]);
        let work = |output: u8| Work {
            session: 7,
            position: 3,
            count: 1,
            input: [1; 32],
            output: [output; 32],
            weight: [2; 32],
        };
        let a = chain.issue(&work(1), 1_000);
        let b = chain.issue(&work(2), 1_001);
        Evidence::Fraud(FraudProof::new(a, b).expect("a proof"))
    }

    #[test]
    fn a_fraud_proof_round_trips_within_the_gossip_size() {
        let proof = fraud();
        let bytes = encode_proof(&proof).expect("small enough");
        assert!(bytes.len() < 1024, "{} bytes", bytes.len());
        match decode(&bytes) {
            Some(GossipItem::Proof(p)) => assert_eq!(p, proof),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn announcements_still_decode_and_garbage_is_dropped() {
        let key = iroh::SecretKey::generate();
        let ann = crate::net::Announcement {
            protocol_version: crate::net::PROTOCOL_VERSION,
            node: key.public(),
            model_id: "m".into(),
            versions: Vec::new(),
            layers: 0..1,
            capacity: 1,
            load: 0,
            addrs: vec![],
            entry: true,
            timestamp_ms: 1,
            expires_ms: 2,
        };
        let signed = SignedAnnouncement::sign(&ann, &key).expect("sign");
        let bytes = signed.to_bytes().expect("bytes");
        assert!(matches!(
            decode(&bytes),
            Some(GossipItem::Announcement(s)) if s == signed
        ));
        assert!(decode(b"nsproof1\xff\xff").is_none());
        assert!(decode(&[]).is_none());
    }
}
