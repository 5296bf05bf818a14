//! Commit certificates: the trainer's signed decision that a step's prepared versions become
//! the served ones. A hop commits only on a certificate that its job's trainer signed and that
//! names, for this hop, exactly the version it prepared; a hop left in doubt can take the same
//! certificate from any other hop, since nobody but the trainer can make one.

use super::proto::{CommitCertificate, SignedCommit};
use crate::consensus::receipt::{sign_body, verify_signed};
use crate::engine::TrainedVersion;
use crate::net::{NetError, NodeId};

impl SignedCommit {
    /// `cert` signed with the trainer's `key`.
    pub fn sign(cert: &CommitCertificate, key: &iroh::SecretKey) -> SignedCommit {
        let (body, signature) = sign_body(cert, key);
        SignedCommit {
            trainer: key.public(),
            body,
            signature,
        }
    }

    /// The certificate, when `trainer` signed it.
    pub fn verify(&self, trainer: &NodeId) -> Result<CommitCertificate, NetError> {
        if self.trainer != *trainer {
            return Err(NetError::BadSignature(format!(
                "commit signed by {}, the job's trainer is {}",
                self.trainer.fmt_short(),
                trainer.fmt_short()
            )));
        }
        verify_signed(trainer, &self.body, &self.signature)
            .map_err(|e| NetError::BadSignature(format!("commit certificate: {e}")))?;
        postcard::from_bytes(&self.body)
            .map_err(|e| NetError::Malformed(format!("commit certificate: {e}")))
    }
}

impl CommitCertificate {
    /// The version the certificate names for `node`.
    pub fn version_of(&self, node: &NodeId) -> Option<&TrainedVersion> {
        self.versions
            .iter()
            .find(|(n, _)| n == node)
            .map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(steps: u64) -> TrainedVersion {
        TrainedVersion {
            model_hash: [1; 32],
            layers: 0..2,
            adapter: Some("notes".into()),
            state: [steps as u8; 32],
            steps,
        }
    }

    #[test]
    fn only_the_trainers_signature_over_the_same_body_verifies() {
        let trainer = iroh::SecretKey::from_bytes(&[7; 32]);
        let hop = iroh::SecretKey::from_bytes(&[8; 32]).public();
        let cert = CommitCertificate {
            job: 3,
            step: 1,
            versions: vec![(hop, version(1))],
        };
        let signed = SignedCommit::sign(&cert, &trainer);
        assert_eq!(signed.verify(&trainer.public()).expect("valid"), cert);
        assert_eq!(
            signed
                .verify(&trainer.public())
                .expect("valid")
                .version_of(&hop),
            Some(&version(1))
        );
        // Another signer, even one claiming to be the trainer, is refused.
        let other = iroh::SecretKey::from_bytes(&[9; 32]);
        assert!(signed.verify(&other.public()).is_err());
        let mut forged = SignedCommit::sign(&cert, &other);
        forged.trainer = trainer.public();
        assert!(forged.verify(&trainer.public()).is_err());
        // A changed body breaks the signature.
        let mut altered = signed.clone();
        let changed = CommitCertificate {
            versions: vec![(hop, version(2))],
            ..cert
        };
        altered.body = postcard::to_allocvec(&changed).expect("encode");
        assert!(altered.verify(&trainer.public()).is_err());
    }
}
