//! Why a hop refused a request or failed a step: the typed reason that travels in
//! `Message::Error`, between nodes and from a node to a client.
//!
//! Reasons travel as stable numeric codes (version [`REASON_CODES_VERSION`] of the table
//! below), not as strings: a receiver acts on the code (refuse, reroute, blame) and shows the
//! free-text detail only to people. A code a receiver does not know (a newer node) decodes
//! as [`Reason::Unknown`] instead of failing the whole message, so the table can grow
//! without a protocol break. The Trust and Training issues add codes (a failed vote, a
//! training lease held) at the end.

use serde::{Deserialize, Serialize};

/// Version of the reason-code table; bumped when a code's meaning changes (new codes at the
/// end need no bump: older peers read them as [`Reason::Unknown`]).
pub const REASON_CODES_VERSION: u16 = 1;

/// Why a hop refused or failed (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "u16", into = "u16")]
pub enum Reason {
    /// The request could not be decoded, or a field is out of range.
    Malformed,
    /// The session is not open on this hop.
    UnknownSession,
    /// The sender may not do this (not the session's client, not the hop's predecessor).
    NotAllowed,
    /// A signature does not verify.
    BadSignature,
    /// The session-open names another model (or other weights) than this node serves.
    WrongModel,
    /// The route is not a contiguous chain over every layer, or does not name this node, or
    /// asks layers this node does not hold.
    BadRoute,
    /// A session-open seen before (same client and nonce), or dated outside the replay
    /// window.
    Replayed,
    /// A limit was reached: sessions, memory, positions per step, rate.
    OverLimit,
    /// The node is leaving the swarm and takes no new sessions.
    Leaving,
    /// Computing the step failed on this hop (for example a token outside the vocabulary).
    Compute,
    /// This hop's successor could not be reached or refused the hidden states; the error
    /// blames the successor.
    SuccessorUnreachable,
    /// A message this node does not expect here.
    Unexpected,
    /// The replicas of the range feeding this hop did not agree (no strict majority of the
    /// session's redundancy): a replicated step stops rather than compute on a minority.
    NoMajority,
    /// A code this build does not know (sent by a newer peer).
    Unknown(u16),
}

impl Reason {
    /// The reason's wire code.
    pub fn code(self) -> u16 {
        match self {
            Reason::Malformed => 1,
            Reason::UnknownSession => 2,
            Reason::NotAllowed => 3,
            Reason::BadSignature => 4,
            Reason::WrongModel => 5,
            Reason::BadRoute => 6,
            Reason::Replayed => 7,
            Reason::OverLimit => 8,
            Reason::Leaving => 9,
            Reason::Compute => 10,
            Reason::SuccessorUnreachable => 11,
            Reason::Unexpected => 12,
            Reason::NoMajority => 13,
            Reason::Unknown(code) => code,
        }
    }

    /// A short stable name (logs, counters, error messages).
    pub fn name(self) -> &'static str {
        match self {
            Reason::Malformed => "malformed",
            Reason::UnknownSession => "unknown-session",
            Reason::NotAllowed => "not-allowed",
            Reason::BadSignature => "bad-signature",
            Reason::WrongModel => "wrong-model",
            Reason::BadRoute => "bad-route",
            Reason::Replayed => "replayed",
            Reason::OverLimit => "over-limit",
            Reason::Leaving => "leaving",
            Reason::Compute => "compute",
            Reason::SuccessorUnreachable => "successor-unreachable",
            Reason::Unexpected => "unexpected",
            Reason::NoMajority => "no-majority",
            Reason::Unknown(_) => "unknown",
        }
    }

    /// Whether the reporting hop blames its successor rather than itself.
    pub fn blames_successor(self) -> bool {
        matches!(self, Reason::SuccessorUnreachable)
    }
}

impl From<u16> for Reason {
    fn from(code: u16) -> Self {
        match code {
            1 => Reason::Malformed,
            2 => Reason::UnknownSession,
            3 => Reason::NotAllowed,
            4 => Reason::BadSignature,
            5 => Reason::WrongModel,
            6 => Reason::BadRoute,
            7 => Reason::Replayed,
            8 => Reason::OverLimit,
            9 => Reason::Leaving,
            10 => Reason::Compute,
            11 => Reason::SuccessorUnreachable,
            12 => Reason::Unexpected,
            13 => Reason::NoMajority,
            other => Reason::Unknown(other),
        }
    }
}

impl From<Reason> for u16 {
    fn from(reason: Reason) -> u16 {
        reason.code()
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Unknown(code) => write!(f, "unknown reason {code}"),
            other => f.write_str(other.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_and_unknown_codes_survive() {
        for code in 0..=64u16 {
            let reason = Reason::from(code);
            assert_eq!(reason.code(), code);
            let bytes = postcard::to_allocvec(&reason).expect("encode");
            let back: Reason = postcard::from_bytes(&bytes).expect("decode");
            assert_eq!(back, reason);
        }
        assert_eq!(Reason::from(11), Reason::SuccessorUnreachable);
        assert!(Reason::SuccessorUnreachable.blames_successor());
        assert!(!Reason::Compute.blames_successor());
        assert_eq!(Reason::from(999).to_string(), "unknown reason 999");
    }
}
