//! A node that pinned a model id gets the model's manifest from a peer instead of hashing the
//! whole model file: it then reads and checks only its own slice's tensors.

use crate::client::Client;
use crate::error::{Error, Result};
use crate::model::weights::WeightFile;
use crate::net::NodeId;
use iroh::EndpointAddr;

/// Asks `peers` in turn for their manifest and adopts the first one that hashes to
/// `expected_id` with this file's tokenizer and template ([`WeightFile::use_peer_manifest`]).
/// Returns the peer whose manifest was adopted.
///
/// A peer that is unreachable, refuses, or sends a manifest of another model is skipped (its
/// manifest is never used: a lying peer can only make the node ask the next one). When the
/// pinned model's manifest arrives but this file's header differs, the file is not the pinned
/// model and [`Error::WrongWeights`] ends the search. When no peer has a manifest that hashes
/// to the id, the error lists what each one answered.
pub async fn adopt_peer_manifest(
    client: &Client,
    peers: &[EndpointAddr],
    file: &WeightFile,
    expected_id: &str,
) -> Result<NodeId> {
    crate::model::identity::check_model_id(expected_id)?;
    let mut answers = Vec::new();
    for peer in peers {
        let manifest = match client.fetch_manifest(peer).await {
            Ok(m) => m,
            Err(e) => {
                answers.push(format!("{}: {e}", peer.id.fmt_short()));
                continue;
            }
        };
        match file.use_peer_manifest(manifest, expected_id) {
            Ok(()) => return Ok(peer.id),
            Err(e @ Error::WrongWeights { .. }) => return Err(e),
            Err(e) => answers.push(format!("{}: {e}", peer.id.fmt_short())),
        }
    }
    Err(Error::InvalidConfig(format!(
        "no peer sent a manifest of model {expected_id} (asked {}: {})",
        peers.len(),
        if answers.is_empty() {
            "no peers given".to_string()
        } else {
            answers.join("; ")
        }
    )))
}
