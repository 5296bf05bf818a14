//! Trust: redundant execution, voting, reputation and signed receipts, against lying nodes.
//!
//! A replicated range runs each step on k replicas. Every receiver of their outputs (each
//! replica of the next range, or the client for the last one) runs the same [`Consensus`]
//! rule on the k signed ballots, so honest receivers go on with identical bytes and no single
//! node decides. IO-less like the session machines (`protocol/`): the network code hands ballots in and acts
//! on the verdicts; `consensus/sim.rs` (tests) runs it against lying replicas.
//!
//! - [`compare`]: `exact` (blake3 of the bytes) and `tolerant` (per-position relative L2 and
//!   max-abs over every coordinate) comparison of two outputs.
//! - [`vote`]: the fixed rule (largest pairwise-agreeing group, a strict majority of k; the
//!   group's lowest node id's bytes go forward).
//! - [`receipt`]: ed25519 receipts chained per node, replay and window checks, fraud proofs
//!   (one signer, one input, two outputs) and upstream proofs (one sender, two frames).
//! - [`reputation`]: scores, probation, bans with backoff, pinned trust, who votes and who
//!   referees, persisted across restarts.
//!
//! Evidence rule: a node loses score only on evidence anyone can check: its own signed
//! receipt for an input against a majority's signed receipts for the same input
//! ([`DeviationEvidence`]), or a [`FraudProof`]. A ballot that cannot be pinned on its sender
//! (a bad signature, a receipt for another output, a different input hash without the
//! upstream's signature on it) is only a missed answer: a temporary ban, like a timeout.

#[cfg(any(test, feature = "adversary", feature = "internals"))]
pub mod adversary;
pub mod compare;
pub mod receipt;
pub mod reputation;
#[cfg(test)]
mod sim;
pub mod vote;

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

pub use compare::{distance, Comparison, Distance, FrameDtype, Tolerance, VoteOutput};
pub use receipt::{
    FraudProof, Hash, InputContext, Receipt, ReceiptChain, ReceiptCheck, ReceiptError, SignedFrame,
    SignedReceipt, UpstreamProof, Work,
};
pub use reputation::{Reputation, ReputationPolicy, Standing, TrustState, Voters};
pub use vote::{refereed_tally, tally, Accepted, Ballot, VoteOutcome, MAX_REDUNDANCY};

use crate::net::NodeId;

/// One replica's signed answer for one step, as a receiver got it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignedBallot {
    /// The connection's authenticated peer (who sent it).
    pub from: NodeId,
    /// The output frame's element type.
    pub dtype: FrameDtype,
    /// Values per position.
    pub width: usize,
    /// The output frame's payload bytes.
    pub bytes: Vec<u8>,
    /// What the sender computed from; its receipt's input hash is this one's hash.
    pub input: InputContext,
    /// The sender's receipt for it.
    pub receipt: SignedReceipt,
    /// The sender's signature on these bytes as a frame it sent. Receivers share the claims
    /// they got: two claims by one sender for one step with different bytes prove it sent
    /// two inputs ([`UpstreamProof`]), even when its receipt names neither.
    pub frame: Option<SignedFrame>,
    /// The sender's upstream's signature on the input frame it was given, when it has one:
    /// replicas fed different inputs by one upstream show it with this.
    pub upstream: Option<SignedFrame>,
}

/// Receipts and outputs that show a deviation: anyone re-runs the vote on them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviationEvidence {
    /// The replicas the vote expected.
    pub expected: Vec<NodeId>,
    /// The comparison the vote used.
    pub comparison: Comparison,
    /// The ballots, the accused's among them.
    pub ballots: Vec<SignedBallot>,
    /// The node shown to deviate.
    pub accused: NodeId,
}

impl DeviationEvidence {
    /// Checks the evidence: every receipt verifies, names its ballot's bytes and the same
    /// input, and the vote over them puts `accused` outside an accepted majority.
    pub fn verify(&self) -> Result<NodeId, ReceiptError> {
        let mut step = None;
        let mut ballots = Vec::with_capacity(self.ballots.len());
        for b in &self.ballots {
            let (receipt, output) = checked_ballot(b, true)?;
            let key = b.input.step_key();
            if *step.get_or_insert(key) != key {
                return Err(ReceiptError::NotAProof("ballots for different inputs"));
            }
            ballots.push(Ballot {
                node: receipt.node,
                output,
            });
        }
        match tally(&self.expected, &ballots, &self.comparison) {
            VoteOutcome::Accepted(a) if a.deviating.contains(&self.accused) => Ok(self.accused),
            _ => Err(ReceiptError::NotAProof(
                "the vote does not single out the accused",
            )),
        }
    }
}

/// A trusted referee's replay of a vote's input, with the vote's ballots: the accused's
/// signed output disagrees with the referee's. Signed by everyone involved, so anyone can
/// re-run [`refereed_tally`]; it counts only for a verifier that trusts the referee.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefereeEvidence {
    /// The replicas the vote expected.
    pub expected: Vec<NodeId>,
    /// The comparison the vote used.
    pub comparison: Comparison,
    /// The vote's ballots, the accused's among them.
    pub ballots: Vec<SignedBallot>,
    /// The referee's ballot for the same step.
    pub referee: SignedBallot,
    /// The node the referee overruled.
    pub accused: NodeId,
}

impl RefereeEvidence {
    /// Checks the signatures and that the referee's rule puts `accused` among the deviating;
    /// returns (accused, referee). Whether the referee is trusted is the verifier's call.
    pub fn verify(&self) -> Result<(NodeId, NodeId), ReceiptError> {
        let (referee_receipt, referee_output) = checked_ballot(&self.referee, true)?;
        if self.expected.contains(&referee_receipt.node) {
            return Err(ReceiptError::NotAProof("a referee inside the vote"));
        }
        // The referee may have replayed the prefix from kept states: its chain is its own.
        let step = self.referee.input.replay_key();
        let mut ballots = Vec::with_capacity(self.ballots.len());
        for b in &self.ballots {
            let (receipt, output) = checked_ballot(b, true)?;
            if b.input.replay_key() != step {
                return Err(ReceiptError::NotAProof("ballots for different inputs"));
            }
            ballots.push(Ballot {
                node: receipt.node,
                output,
            });
        }
        let referee = Ballot {
            node: referee_receipt.node,
            output: referee_output,
        };
        match refereed_tally(&self.expected, &ballots, &referee, &self.comparison) {
            VoteOutcome::Accepted(a) if a.deviating.contains(&self.accused) => {
                Ok((self.accused, referee.node))
            }
            _ => Err(ReceiptError::NotAProof(
                "the referee does not overrule the accused",
            )),
        }
    }
}

/// A ballot whose receipt is the sender's own and names the bytes sent and the input, and
/// whose signature verifies (checked only when `signature`: see [`Consensus::vote`]).
fn checked_ballot(
    b: &SignedBallot,
    signature: bool,
) -> Result<(Receipt, VoteOutput), ReceiptError> {
    checked_ballot_with(b, signature, None)
}

/// [`checked_ballot`], reusing `same`: the output of another ballot whose bytes are
/// identical (hashing a 49,152-value logits row costs more than comparing it).
fn checked_ballot_with(
    b: &SignedBallot,
    signature: bool,
    same: Option<&VoteOutput>,
) -> Result<(Receipt, VoteOutput), ReceiptError> {
    let receipt = if signature {
        b.receipt.verify()?
    } else {
        b.receipt.decode_unverified()?
    };
    if receipt.node != b.from {
        return Err(ReceiptError::NotAProof("a receipt signed by another node"));
    }
    let output = match same {
        Some(o) => o.clone(),
        None => VoteOutput::from_bytes(b.dtype, b.width, &b.bytes)
            .ok_or(ReceiptError::NotAProof("a frame that is not whole values"))?,
    };
    let output = VoteOutput {
        declared: b.input.declaration(),
        ..output
    };
    if output.hash != receipt.work.output {
        return Err(ReceiptError::NotAProof("a receipt for other bytes"));
    }
    if b.input.hash() != receipt.work.input {
        return Err(ReceiptError::NotAProof("a receipt for another input"));
    }
    Ok((receipt, output))
}

/// Evidence a vote produced, for gossip and for the node's records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Evidence {
    /// A replica's output deviated from an accepted majority.
    Deviation(DeviationEvidence),
    /// A replica signed two outputs for one input.
    Fraud(FraudProof),
    /// An upstream sent different inputs to two replicas.
    Upstream(UpstreamProof),
    /// A trusted referee's replay overruled a replica (a split vote, or an audited one).
    Refereed(Box<RefereeEvidence>),
}

/// What one vote decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// The tally over the ballots that could be pinned on their senders.
    pub outcome: VoteOutcome,
    /// The accepted bytes (the winner's ballot), when a majority agreed.
    pub accepted: Option<SignedBallot>,
    /// Evidence found in this vote (already applied to the reputation table).
    pub evidence: Vec<Evidence>,
    /// Expected replicas whose ballots could not count (missing, unverifiable, or for another
    /// input); each got a temporary ban.
    pub unaccounted: Vec<NodeId>,
    /// When no majority formed: the ballots that counted, for a referee's replay to settle
    /// ([`Consensus::settle`]). Empty otherwise.
    pub held: Vec<SignedBallot>,
}

/// The trust machinery one node or client runs: comparison rule, receipt checks, reputation
/// and the evidence it has seen.
pub struct Consensus {
    comparison: Comparison,
    reputation: Reputation,
    receipts: ReceiptCheck,
    /// (signer, input hash) -> a receipt it signed for that input: a second output for the
    /// same key is a fraud proof.
    signed_inputs: HashMap<(NodeId, Hash), (SignedReceipt, u64)>,
    /// (sender, session, position, count) -> a frame it signed: a second frame for the same
    /// step is an upstream proof.
    signed_frames: HashMap<(NodeId, u64, u64, u32), (SignedFrame, u64)>,
    /// Ids of the evidence already applied, so gossip that echoes it does not apply it twice.
    applied: HashMap<Hash, u64>,
    window_ms: u64,
    pruned_at: u64,
}

/// A stable id for a piece of evidence: blake3 of its encoding, and for a deviation of the
/// accused and the step alone, so that the receivers of one vote, each holding its own copy
/// of the ballots, make it count once.
pub fn evidence_id(evidence: &Evidence) -> Hash {
    let body = match evidence {
        Evidence::Deviation(d) => {
            let step = d.ballots.first().map(|b| b.input.step_key());
            postcard::to_allocvec(&(d.accused, step)).unwrap_or_default()
        }
        Evidence::Refereed(r) => {
            postcard::to_allocvec(&("refereed", r.accused, r.referee.input.step_key()))
                .unwrap_or_default()
        }
        other => postcard::to_allocvec(other).unwrap_or_default(),
    };
    blake3::derive_key("neuroshard evidence v1", &body)
}

impl Consensus {
    /// A consensus under `comparison` with an existing reputation table.
    pub fn new(comparison: Comparison, reputation: Reputation) -> Self {
        Consensus {
            comparison,
            reputation,
            receipts: ReceiptCheck::default(),
            signed_inputs: HashMap::new(),
            signed_frames: HashMap::new(),
            applied: HashMap::new(),
            window_ms: receipt::DEFAULT_RECEIPT_WINDOW_MS,
            pruned_at: 0,
        }
    }

    /// The comparison rule.
    pub fn comparison(&self) -> &Comparison {
        &self.comparison
    }

    /// The reputation table.
    pub fn reputation(&self) -> &Reputation {
        &self.reputation
    }

    /// The reputation table, to pin nodes or expire bans.
    pub fn reputation_mut(&mut self) -> &mut Reputation {
        &mut self.reputation
    }

    /// Forgets what is older than the receipt window (its replays fail the window anyway):
    /// memory stays bounded by one window's receipts.
    fn prune(&mut self, now_ms: u64) {
        if now_ms.saturating_sub(self.pruned_at) <= self.window_ms {
            return;
        }
        let horizon = now_ms.saturating_sub(self.window_ms);
        self.signed_inputs.retain(|_, (_, t)| *t >= horizon);
        self.signed_frames.retain(|_, (_, t)| *t >= horizon);
        self.applied.retain(|_, t| *t >= horizon);
        self.pruned_at = now_ms;
    }

    /// Remembers a receipt seen anywhere (a ballot, gossip); returns the fraud proof when its
    /// signer already signed another output for the same input.
    pub fn observe(&mut self, signed: &SignedReceipt, now_ms: u64) -> Option<FraudProof> {
        // A receipt already remembered needs no second signature check (gossip echoes).
        let unverified = signed.decode_unverified().ok()?;
        let known = self
            .signed_inputs
            .get(&(unverified.node, unverified.work.input));
        if known.is_some_and(|(k, _)| k == signed) {
            return None;
        }
        let receipt = signed.verify().ok()?;
        self.remember(signed, &receipt, now_ms)
    }

    /// Records `signed` (decoded as `receipt`, its signature not necessarily checked yet)
    /// under its signer and input; a different receipt already there makes a fraud proof if
    /// both verify. Of two where one does not verify, the one that does is kept.
    fn remember(
        &mut self,
        signed: &SignedReceipt,
        receipt: &Receipt,
        now_ms: u64,
    ) -> Option<FraudProof> {
        self.prune(now_ms);
        let key = (receipt.node, receipt.work.input);
        match self.signed_inputs.get(&key) {
            Some((earlier, _)) if earlier == signed => None,
            Some((earlier, _)) => {
                let earlier = earlier.clone();
                if let Ok(proof) = FraudProof::new(earlier.clone(), signed.clone()) {
                    return Some(proof);
                }
                if earlier.verify().is_err() && signed.verify().is_ok() {
                    self.signed_inputs.insert(key, (signed.clone(), now_ms));
                }
                None
            }
            None => {
                self.signed_inputs.insert(key, (signed.clone(), now_ms));
                None
            }
        }
    }

    /// Remembers a frame claim seen anywhere; returns the upstream proof when its sender
    /// already signed other bytes for the same step.
    pub fn observe_frame(&mut self, signed: &SignedFrame, now_ms: u64) -> Option<UpstreamProof> {
        let unverified: receipt::FrameClaim = postcard::from_bytes(&signed.body).ok()?;
        let key = (
            unverified.sender,
            unverified.session,
            unverified.position,
            unverified.count,
        );
        let known = self.signed_frames.get(&key);
        if known.is_some_and(|(k, _)| k == signed) {
            return None;
        }
        signed.verify().ok()?;
        self.prune(now_ms);
        match self.signed_frames.get(&key) {
            Some((earlier, _)) => receipt::blame_upstream(Some(earlier), Some(signed)),
            None => {
                self.signed_frames.insert(key, (signed.clone(), now_ms));
                None
            }
        }
    }

    /// Whether `evidence` (or the same deviation seen by another receiver) was applied.
    pub fn knows(&self, evidence: &Evidence) -> bool {
        self.applied.contains_key(&evidence_id(evidence))
    }

    /// Applies evidence (from gossip, or found here): verified first, never taken on the
    /// sender's word; evidence already applied returns its node without applying it again.
    pub fn apply(&mut self, evidence: &Evidence, now_ms: u64) -> Result<NodeId, ReceiptError> {
        let node = match evidence {
            Evidence::Fraud(p) => p.verify()?,
            Evidence::Upstream(p) => p.verify()?,
            Evidence::Deviation(d) => d.verify()?,
            Evidence::Refereed(r) => {
                let (accused, referee) = r.verify()?;
                // A referee's replay is one node's word: it counts where that node is trusted.
                if self.reputation.state(&referee, now_ms) != TrustState::Trusted {
                    return Err(ReceiptError::NotAProof(
                        "a referee this node does not trust",
                    ));
                }
                accused
            }
        };
        self.prune(now_ms);
        if self.applied.insert(evidence_id(evidence), now_ms).is_some() {
            return Ok(node);
        }
        match evidence {
            Evidence::Fraud(_) => {
                self.reputation
                    .fraud(node, "signed two outputs for one input", now_ms)
            }
            Evidence::Upstream(_) => {
                self.reputation
                    .fraud(node, "signed two inputs sent for one step", now_ms)
            }
            Evidence::Deviation(d) => {
                let how = deviation_detail(&d.ballots, node);
                self.reputation.deviated(node, &how, now_ms)
            }
            Evidence::Refereed(r) => {
                let how = format!(
                    "overruled by the trusted referee {}",
                    r.referee.from.fmt_short()
                );
                self.reputation.deviated(node, &how, now_ms)
            }
        }
        Ok(node)
    }

    /// The receivers of one vote report that `node` sent them no ballot that counts. A
    /// timeout is not evidence, so one receiver's word bans nobody: the temporary ban applies
    /// when more than half of the vote's `receivers` report it. Returns whether it applied.
    pub fn missing_reported(
        &mut self,
        node: NodeId,
        reporters: &[NodeId],
        receivers: &[NodeId],
        now_ms: u64,
    ) -> bool {
        let mut counted: Vec<&NodeId> =
            reporters.iter().filter(|r| receivers.contains(r)).collect();
        counted.sort();
        counted.dedup();
        let applies = 2 * counted.len() > receivers.len();
        if applies {
            self.reputation.timed_out(node, now_ms);
        }
        applies
    }

    /// Votes over the ballots one receiver got from the `expected` replicas of one step, and
    /// updates the reputation table (module doc for the evidence rule).
    pub fn vote(
        &mut self,
        expected: &[NodeId],
        ballots: Vec<SignedBallot>,
        now_ms: u64,
    ) -> Verdict {
        self.decide(expected, ballots, None, true, now_ms)
    }

    /// Settles a vote that found no majority with a referee's replay of the same step: the
    /// [`Verdict::held`] ballots (checked once already, so not taken for replays) are judged
    /// as in [`Consensus::refereed_vote`]. An untrusted or unfit referee leaves it unsettled.
    pub fn settle(
        &mut self,
        expected: &[NodeId],
        held: Vec<SignedBallot>,
        referee: SignedBallot,
        now_ms: u64,
    ) -> Verdict {
        self.decide(expected, held, Some(referee), false, now_ms)
    }

    /// [`Consensus::vote`] with a referee's ballot for the same step: a node outside the
    /// vote that replayed the input (on no majority, or for an audit). A referee this table
    /// trusts decides by [`refereed_tally`], and every replica it overrules is slashed on
    /// [`RefereeEvidence`]. A referee that is not trusted here, or whose ballot does not
    /// check out or is for another step, is ignored: the plain vote stands.
    pub fn refereed_vote(
        &mut self,
        expected: &[NodeId],
        ballots: Vec<SignedBallot>,
        referee: SignedBallot,
        now_ms: u64,
    ) -> Verdict {
        self.decide(expected, ballots, Some(referee), true, now_ms)
    }

    /// The vote a receiver runs on one step of a range that may be audited: the ballots of
    /// the `expected` voters, and, when the range has a `referee` (one of its replicas outside
    /// the vote) whose ballot is among `ballots`, [`Consensus::refereed_vote`] with it (a
    /// referee this table trusts overrules a colluding majority and settles a split vote; an
    /// untrusted one is ignored). Without the referee's ballot, [`Consensus::vote`].
    pub fn judge(
        &mut self,
        expected: &[NodeId],
        referee: Option<NodeId>,
        ballots: Vec<SignedBallot>,
        now_ms: u64,
    ) -> Verdict {
        let (refereed, voters): (Vec<SignedBallot>, Vec<SignedBallot>) = ballots
            .into_iter()
            .partition(|b| referee.is_some() && Some(b.from) == referee);
        let referee_ballot = refereed.into_iter().next();
        match referee_ballot {
            Some(r) => self.refereed_vote(expected, voters, r, now_ms),
            None => self.vote(expected, voters, now_ms),
        }
    }

    fn decide(
        &mut self,
        expected: &[NodeId],
        ballots: Vec<SignedBallot>,
        referee: Option<SignedBallot>,
        fresh: bool,
        now_ms: u64,
    ) -> Verdict {
        let mut evidence = Vec::new();
        // Ballots that can be pinned on their senders, with their outputs.
        let mut pinned: Vec<(VoteOutput, SignedBallot)> = Vec::new();
        for b in ballots {
            if !expected.contains(&b.from) {
                continue;
            }
            // The sender's own frame claim (observe_frame checks its signature; a claim
            // signed by someone else proves nothing about the sender, and the upstream's
            // claim below is the one place for another signer's).
            if let Some(frame) = &b.frame {
                let own = postcard::from_bytes::<receipt::FrameClaim>(&frame.body)
                    .is_ok_and(|c| c.sender == b.from);
                if let Some(proof) = own.then(|| self.observe_frame(frame, now_ms)).flatten() {
                    evidence.push(Evidence::Upstream(proof));
                }
            }
            if let Some(up) = &b.upstream {
                if let Some(proof) = self.observe_frame(up, now_ms) {
                    evidence.push(Evidence::Upstream(proof));
                }
            }
            let same = pinned
                .iter()
                .find(|(_, p)| p.dtype == b.dtype && p.width == b.width && p.bytes == b.bytes)
                .map(|(o, _)| o);
            let Ok((receipt, output)) = checked_ballot_with(&b, false, same) else {
                continue;
            };
            if let Some(proof) = self.remember(&b.receipt, &receipt, now_ms) {
                evidence.push(Evidence::Fraud(proof));
            }
            // A second copy of one ballot is a duplicate; the check would call it a replay.
            let duplicate = pinned.iter().any(|(_, p)| p.receipt == b.receipt);
            if duplicate
                || (fresh
                    && self
                        .receipts
                        .check_verified(&b.receipt, &receipt, now_ms)
                        .is_err())
            {
                continue;
            }
            pinned.push((output, b));
        }
        // The step most ballots computed from; ballots for another one are compared with
        // nobody (their senders were fed other inputs, or lie about them).
        let mut steps: Vec<(Hash, usize)> = Vec::new();
        for (_, b) in &pinned {
            let key = b.input.step_key();
            match steps.iter_mut().find(|(h, _)| *h == key) {
                Some((_, n)) => *n += 1,
                None => steps.push((key, 1)),
            }
        }
        steps.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let main_step = steps.first().map(|(h, _)| *h);
        // A trusted referee's replay fixes the step (the one its predecessor sent).
        let referee = referee
            .filter(|r| !expected.contains(&r.from))
            .filter(|r| self.reputation.state(&r.from, now_ms) == TrustState::Trusted)
            .and_then(|r| {
                let (_, output) = checked_ballot(&r, true).ok()?;
                Some((output, r))
            });
        // A referee that joined after a split replayed the prefix from kept hidden states, so
        // its prefix chain is its own: ballots are matched to it on the step's own input.
        match &referee {
            Some((_, r)) => {
                let step = r.input.replay_key();
                pinned.retain(|(_, b)| b.input.replay_key() == step);
            }
            None => pinned.retain(|(_, b)| Some(b.input.step_key()) == main_step),
        }

        let tally_ballots = |pinned: &[(VoteOutput, SignedBallot)]| -> Vec<Ballot> {
            pinned
                .iter()
                .map(|(o, b)| Ballot {
                    node: b.from,
                    output: o.clone(),
                })
                .collect()
        };
        let judge = |pinned: &[(VoteOutput, SignedBallot)]| match &referee {
            Some((output, r)) => refereed_tally(
                expected,
                &tally_ballots(pinned),
                &Ballot {
                    node: r.from,
                    output: output.clone(),
                },
                &self.comparison,
            ),
            None => tally(expected, &tally_ballots(pinned), &self.comparison),
        };
        let mut outcome = judge(&pinned);
        // The transport authenticates each ballot's sender, so a unanimous vote needs no
        // signature check (the receipts are kept for audits). Signatures matter once a
        // ballot may become evidence: then every one is checked, those that fail count as
        // missed answers, and the vote runs again without them.
        let unanimous = outcome.accepted().is_some_and(|a| a.deviating.is_empty());
        if !unanimous {
            let before = pinned.len();
            pinned.retain(|(_, b)| b.receipt.verify().is_ok());
            if pinned.len() != before {
                outcome = judge(&pinned);
            }
        }
        let unaccounted: Vec<NodeId> = expected
            .iter()
            .filter(|n| !pinned.iter().any(|(_, b)| b.from == **n))
            .copied()
            .collect();
        let mut accepted = None;
        if let VoteOutcome::Accepted(a) = &outcome {
            for n in &a.agreeing {
                self.reputation.agreed(*n, now_ms);
            }
            let ballots: Vec<SignedBallot> = pinned.iter().map(|(_, b)| b.clone()).collect();
            for n in &a.deviating {
                evidence.push(match &referee {
                    Some((_, r)) => Evidence::Refereed(Box::new(RefereeEvidence {
                        expected: expected.to_vec(),
                        comparison: self.comparison,
                        ballots: ballots.clone(),
                        referee: r.clone(),
                        accused: *n,
                    })),
                    None => Evidence::Deviation(DeviationEvidence {
                        expected: expected.to_vec(),
                        comparison: self.comparison,
                        ballots: ballots.clone(),
                        accused: *n,
                    }),
                });
            }
            accepted = pinned
                .iter()
                .map(|(_, b)| b)
                .chain(referee.as_ref().map(|(_, r)| r))
                .find(|b| b.from == a.winner)
                .cloned();
        }
        evidence.retain(|e| self.apply(e, now_ms).is_ok());
        // Settling a held vote: its missing replicas were counted when it first ran.
        if fresh {
            for n in &unaccounted {
                self.reputation.timed_out(*n, now_ms);
            }
        }
        let held = match outcome {
            VoteOutcome::NoMajority { .. } => pinned.into_iter().map(|(_, b)| b).collect(),
            VoteOutcome::Accepted(_) => Vec::new(),
        };
        Verdict {
            outcome,
            accepted,
            evidence,
            unaccounted,
            held,
        }
    }
}

/// "rel_l2 X, max_abs Y against <winner>" for the reputation table's reason column.
fn deviation_detail(ballots: &[SignedBallot], node: NodeId) -> String {
    let outputs: Vec<(NodeId, VoteOutput)> = ballots
        .iter()
        .filter_map(|b| Some((b.from, VoteOutput::from_bytes(b.dtype, b.width, &b.bytes)?)))
        .collect();
    let Some((_, mine)) = outputs.iter().find(|(n, _)| *n == node) else {
        return "outvoted on signed receipts".into();
    };
    // The closest other output: the distance by which it missed the majority.
    let closest = outputs
        .iter()
        .filter(|(n, _)| *n != node)
        .map(|(n, o)| (n, distance(o, mine)))
        .min_by(|a, b| a.1.rel_l2.total_cmp(&b.1.rel_l2));
    match closest {
        Some((n, d)) => format!(
            "outvoted: rel_l2 {:.2e}, max_abs {:.2e} from {}",
            d.rel_l2,
            d.max_abs,
            n.fmt_short()
        ),
        None => "outvoted on signed receipts".into(),
    }
}

impl Default for Consensus {
    fn default() -> Self {
        Consensus::new(Comparison::default(), Reputation::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn key(seed: u8) -> iroh::SecretKey {
        iroh::SecretKey::from_bytes(&[seed; 32])
    }

    fn input() -> InputContext {
        InputContext {
            session: 1,
            position: 0,
            count: 1,
            prefix: [0; 32],
            weight: [0; 32],
            codec: 0,
            build_id: "test".into(),
            kernel_path: "scalar".into(),
            frame: [3; 32],
        }
    }

    fn ballot(seed: u8, values: &[f32]) -> SignedBallot {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let work = Work {
            session: 1,
            position: 0,
            count: 1,
            input: input().hash(),
            output: *blake3::hash(&bytes).as_bytes(),
            weight: [0; 32],
        };
        SignedBallot {
            from: key(seed).public(),
            dtype: FrameDtype::F32,
            width: values.len(),
            bytes,
            input: input(),
            receipt: ReceiptChain::new(key(seed), [0; 32]).issue(&work, NOW),
            frame: None,
            upstream: None,
        }
    }

    fn expected() -> Vec<NodeId> {
        (1..=3).map(|s| key(s).public()).collect()
    }

    #[test]
    fn a_deviation_on_signed_receipts_is_evidence_anyone_can_check_once() {
        let mut receiver = Consensus::default();
        let ballots = vec![
            ballot(1, &[1.0, 2.0]),
            ballot(2, &[1.0, 2.0]),
            ballot(3, &[1.5, 2.0]),
        ];
        let verdict = receiver.vote(&expected(), ballots, NOW);
        let accepted = verdict.outcome.accepted().expect("a majority");
        assert_eq!(accepted.deviating, vec![key(3).public()]);
        assert_eq!(verdict.evidence.len(), 1);
        assert!(!receiver.reputation().may_route(&key(3).public(), NOW));
        // Another node verifies the evidence itself and applies it once.
        let mut other = Consensus::default();
        for _ in 0..2 {
            assert_eq!(other.apply(&verdict.evidence[0], NOW), Ok(key(3).public()));
        }
        assert_eq!(
            other
                .reputation()
                .standing(&key(3).public())
                .map(|s| s.deviations),
            Some(1)
        );
        // Tampered evidence (the accused's bytes changed after signing) proves nothing.
        let Evidence::Deviation(mut forged) = verdict.evidence[0].clone() else {
            panic!("a deviation");
        };
        forged.ballots[2].bytes[0] ^= 1;
        assert!(forged.verify().is_err());
        // Accusing an agreeing replica proves nothing either.
        let Evidence::Deviation(mut framed) = verdict.evidence[0].clone() else {
            panic!("a deviation");
        };
        framed.accused = key(1).public();
        assert!(framed.verify().is_err());
    }

    #[test]
    fn an_unsigned_deviation_is_only_a_missed_answer_and_a_unanimous_vote_checks_no_signature() {
        let mut receiver = Consensus::default();
        let mut liar = ballot(3, &[1.5, 2.0]);
        liar.receipt.signature = vec![0; 64];
        let verdict = receiver.vote(
            &expected(),
            vec![ballot(1, &[1.0, 2.0]), ballot(2, &[1.0, 2.0]), liar],
            NOW,
        );
        let accepted = verdict.outcome.accepted().expect("two agree");
        assert!(accepted.deviating.is_empty());
        assert_eq!(verdict.unaccounted, vec![key(3).public()]);
        assert!(verdict.evidence.is_empty());
        let standing = receiver.reputation().standing(&key(3).public()).cloned();
        assert_eq!(standing.map(|s| (s.score, s.deviations)), Some((0.0, 0)));
        // A unanimous vote goes through without signature checks (the transport
        // authenticated the senders); the receipts stay for audits.
        let mut receiver = Consensus::default();
        let mut unsigned = ballot(3, &[1.0, 2.0]);
        unsigned.receipt.signature = vec![0; 64];
        let verdict = receiver.vote(
            &expected(),
            vec![ballot(1, &[1.0, 2.0]), ballot(2, &[1.0, 2.0]), unsigned],
            NOW,
        );
        assert_eq!(
            verdict.outcome.accepted().map(|a| a.agreeing.len()),
            Some(3)
        );
    }

    #[test]
    fn a_second_output_for_one_input_is_a_fraud_proof_from_gossip() {
        let mut node = Consensus::default();
        let first = ballot(1, &[1.0, 2.0]);
        let second = ballot(1, &[9.0, 2.0]);
        assert!(node.observe(&first.receipt, NOW).is_none());
        assert!(
            node.observe(&first.receipt, NOW).is_none(),
            "an echo is no proof"
        );
        let proof = node.observe(&second.receipt, NOW).expect("a proof");
        assert_eq!(
            node.apply(&Evidence::Fraud(proof), NOW),
            Ok(key(1).public())
        );
        assert_eq!(
            node.reputation().state(&key(1).public(), u64::MAX - 1),
            TrustState::Banned
        );
        // Ballots from outside the vote and replayed receipts do not count.
        let mut receiver = Consensus::default();
        let b = ballot(1, &[1.0]);
        receiver.vote(&expected(), vec![b.clone(), ballot(2, &[1.0])], NOW);
        let replay = receiver.vote(&expected(), vec![b, ballot(9, &[1.0])], NOW);
        assert!(replay.outcome.accepted().is_none());
        assert_eq!(replay.unaccounted.len(), 3);
    }

    /// [`ballot`] computed from `input` instead of the shared one.
    fn ballot_from(seed: u8, values: &[f32], input: InputContext) -> SignedBallot {
        let mut b = ballot(seed, values);
        let work = Work {
            input: input.hash(),
            ..b.receipt.decode_unverified().expect("receipt").work
        };
        b.receipt = ReceiptChain::new(key(seed), [0; 32]).issue(&work, NOW);
        b.input = input;
        b
    }

    #[test]
    fn a_referee_that_replayed_the_prefix_from_kept_states_decides_on_the_step_itself() {
        let mut receiver = Consensus::default();
        let referee = key(7).public();
        receiver.reputation_mut().pin(referee, NOW);
        // The referee joined after a split: its prefix chain is its own, the step is the same.
        let late = InputContext {
            prefix: [9; 32],
            ..input()
        };
        let split = vec![ballot(1, &[1.0, 2.0]), ballot(2, &[5.0, 2.0])];
        let by = ballot_from(7, &[1.0, 2.0], late.clone());
        let pair = &expected()[..2];
        let verdict = receiver.refereed_vote(pair, split.clone(), by.clone(), NOW);
        let accepted = verdict.outcome.accepted().expect("the referee decides");
        assert_eq!(accepted.agreeing, vec![key(1).public()]);
        assert_eq!(accepted.deviating, vec![key(2).public()]);
        // Its evidence checks for anyone, with the referee's own prefix.
        let mut other = Consensus::default();
        other.reputation_mut().pin(referee, NOW);
        assert_eq!(verdict.evidence.len(), 1);
        assert_eq!(other.apply(&verdict.evidence[0], NOW), Ok(key(2).public()));
        // A referee fed another frame for the step compares with nobody: no evidence, and
        // the voters' ballots do not count (they were not for the step the referee ran).
        let elsewhere = InputContext {
            frame: [4; 32],
            ..late
        };
        let mut fresh = Consensus::default();
        fresh.reputation_mut().pin(referee, NOW);
        let off = fresh.refereed_vote(pair, split, ballot_from(7, &[1.0, 2.0], elsewhere), NOW);
        assert!(off.evidence.is_empty(), "{:?}", off.evidence);
        assert_eq!(off.unaccounted, pair.to_vec());
    }
}
