//! The client's side of a replicated session (`--redundancy K`): it plans k replicas per
//! range, feeds the first range's replicas, votes on the last range's signed logits, samples
//! the token itself, and checks every piece of evidence the receivers report before its
//! reputation table acts on it. See `node/replicated.rs` for the nodes' side.

use super::{Client, FromHop, Inbound, RemoteSession, SessionExtras, StepResult};
use crate::consensus::reputation::StandingRow;
use crate::consensus::{Evidence, FrameDtype, ReputationPolicy, SignedBallot, VoteOutcome};
use crate::model::sampling::{sample, SamplingParams};
use crate::net::peers::PeerSet;
use crate::net::proto::{BallotClaim, Message, RouteHop};
use crate::net::route::RouteOptions;
use crate::net::{lock, now_ms, NetError, NodeId, Reason};
use crate::wire::{read_frame, Codec, DEFAULT_MAX_FRAME};
use iroh::endpoint::RecvStream;
use std::collections::HashMap;
use std::time::Duration;

/// Largest vote report a client reads (its evidence holds every ballot of one vote).
pub(super) const MAX_VOTE_REPORT: usize = 32 << 20;
/// Once a strict majority of the last range has answered, the rest get at least this long
/// (or as long again as the majority took) before the client votes without them.
const VOTE_GRACE: Duration = Duration::from_millis(500);
/// Longest the client waits for one node to take a proof it shares.
const PROOF_SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest the client waits for a step to reach one replica of the first range (a dial
/// included); every replica's send runs at once.
const STEP_SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// What a replicated session keeps between steps.
#[derive(Debug, Default)]
pub(super) struct SessionTrust {
    /// (range, step start, missing node) -> the receivers that reported it missing.
    missing: HashMap<(u32, u32, NodeId), Vec<NodeId>>,
    /// Votes this session's client took part in (its own and the reports it checked).
    pub(super) votes: u64,
    /// What the votes found, for logs and the event list (bounded).
    pub(super) findings: Vec<String>,
    /// Proofs this client found that the session's nodes have not been sent yet.
    to_share: Vec<Evidence>,
    /// First-range replicas a step did not reach: the session sends them no more steps
    /// (their cache lacks that step; the vote goes on without them).
    unreachable: Vec<NodeId>,
    /// Every node that held each range's layers when the session was planned: where a
    /// referee comes from when a range's vote splits.
    pub(super) holders: Vec<Vec<RouteHop>>,
    /// The range whose vote split in the last step that failed without a majority.
    pub(super) split: Option<usize>,
}

/// What an unaudited replicated session needs to re-open itself audited: the holders of its
/// planned ranges from the swarm view it was planned on (not the whole view: a swarm may
/// announce thousands of nodes), the layer count and the redundancy.
#[derive(Debug)]
pub(super) struct AuditPlan {
    peers: PeerSet,
    layers: usize,
    k: usize,
}

/// Whether `e` is a replicated step that ended without a majority.
pub(super) fn no_majority(e: &NetError) -> bool {
    matches!(
        e,
        NetError::HopFailed {
            reason: Some(Reason::NoMajority),
            ..
        }
    )
}

/// Findings kept per session (the oldest go first).
const MAX_FINDINGS: usize = 64;

impl SessionTrust {
    pub(super) fn note(&mut self, finding: String) {
        tracing::info!("{finding}");
        if self.findings.len() >= MAX_FINDINGS {
            self.findings.remove(0);
        }
        self.findings.push(finding);
    }
}

/// Reads the logits frame of a last-range ballot into a [`SignedBallot`] from `from`; `None`
/// for a frame that is not f32 logits `[1, 1, vocab]` of this session.
pub(super) async fn read_logits_ballot(
    recv: &mut RecvStream,
    from: NodeId,
    session: u64,
    start_pos: u32,
    claim: BallotClaim,
) -> Option<SignedBallot> {
    let frame = tokio::time::timeout(Duration::from_secs(30), read_frame(recv, DEFAULT_MAX_FRAME))
        .await
        .ok()?
        .ok()?;
    let header = frame.header();
    let &[1, 1, vocab] = &header.dims[..] else {
        return None;
    };
    if header.codec != Codec::F32 || header.session != session || header.position != start_pos {
        return None;
    }
    Some(SignedBallot {
        from,
        dtype: FrameDtype::F32,
        width: vocab,
        bytes: frame.payload().to_vec(),
        input: claim.input,
        receipt: claim.receipt,
        frame: Some(claim.frame),
        upstream: claim.upstream,
    })
}

impl Client {
    /// The client's reputation table (what its replicated sessions' votes and the evidence
    /// it checked showed), by node id.
    pub fn trust_table(&self) -> Vec<StandingRow> {
        lock(&self.inner.trust).reputation().table(now_ms())
    }

    /// Trusts `node` from now on (`--trust ID`): its votes count as a trusted replica's.
    pub fn trust(&self, node: NodeId) {
        lock(&self.inner.trust).reputation_mut().pin(node, now_ms());
    }

    /// Replaces the client's reputation table with the one saved at `path` (a missing file
    /// is an empty table; a corrupt one an error: bans are never silently forgotten).
    pub fn load_reputation(&self, path: &std::path::Path) -> Result<(), NetError> {
        let mut consensus = lock(&self.inner.trust);
        let policy = consensus.reputation().policy().clone();
        let table = crate::consensus::Reputation::load(path, policy)
            .map_err(|e| NetError::Io(format!("reading {}: {e}", path.display())))?;
        *consensus.reputation_mut() = table;
        Ok(())
    }

    /// Saves the client's reputation table to `path` (JSON, replaced atomically), so its
    /// scores and bans survive a restart.
    pub fn save_reputation(&self, path: &std::path::Path) -> Result<(), NetError> {
        lock(&self.inner.trust)
            .reputation()
            .save(path, now_ms())
            .map_err(|e| NetError::Io(format!("writing {}: {e}", path.display())))
    }

    /// Sets how often a session on trusted single replicas is replicated anyway (a spot
    /// check; default 5%, `ReputationPolicy::spot_check_rate`).
    pub fn set_spot_check_rate(&self, rate: f64) {
        let mut consensus = lock(&self.inner.trust);
        let policy = ReputationPolicy {
            spot_check_rate: rate.clamp(0.0, 1.0),
            ..consensus.reputation().policy().clone()
        };
        consensus.reputation_mut().set_policy(policy);
    }

    /// Whether a session whose route is `nodes` is spot-checked: every node is trusted in
    /// this client's table and the draw (made now, at open, so the whole session's prefix is
    /// replicated and checkable) falls under the spot-check rate.
    pub fn spot_check_due(&self, nodes: &[NodeId]) -> bool {
        let consensus = lock(&self.inner.trust);
        let table = consensus.reputation();
        let now = now_ms();
        !nodes.is_empty()
            && nodes
                .iter()
                .all(|n| table.state(n, now) == crate::consensus::TrustState::Trusted)
            && table.spot_check(super::random_u64())
    }

    /// Whether this client's routes may use `node` now (not banned by its table).
    pub fn may_route(&self, node: &NodeId) -> bool {
        lock(&self.inner.trust)
            .reputation()
            .may_route(node, now_ms())
    }

    /// Plans a replicated route with `k` replicas per range from `peers` (nodes this
    /// client's table bans are left out; the voters of each range follow the reputation
    /// rule: at most one node on probation once trusted ones exist) and opens a session on
    /// it. Each receiver votes on the previous range's outputs; the client votes on the
    /// last range's logits and samples the token itself.
    #[allow(clippy::too_many_arguments)]
    pub async fn open_replicated(
        &self,
        peers: &PeerSet,
        layers: usize,
        model_id: &str,
        codec: Codec,
        sampling: SamplingParams,
        prompt: Vec<u32>,
        k: usize,
        return_logits: bool,
    ) -> Result<RemoteSession, NetError> {
        self.open_replicated_with(
            peers,
            layers,
            model_id,
            codec,
            sampling,
            prompt,
            k,
            &SessionExtras {
                return_logits,
                adapter: None,
            },
            false,
        )
        .await
    }

    /// Whether a replicated session opened now is audited: the spot-check draw, made at open
    /// so that the referee computes the whole session beside the voters.
    pub fn audit_due(&self) -> bool {
        lock(&self.inner.trust)
            .reputation()
            .spot_check(super::random_u64())
    }

    /// [`Client::open_replicated`] for an audited session: each range whose holders include
    /// a node this client trusts gets it as a referee, chosen before the voters (who then
    /// come from the other holders): it computes every step beside them, outside their vote,
    /// and every receiver that trusts it judges by its ballot (`Consensus::judge`), so two
    /// colluding replicas of three are overruled at their first vote. Ranges without such a
    /// node run unaudited.
    #[allow(clippy::too_many_arguments)]
    pub async fn open_audited(
        &self,
        peers: &PeerSet,
        layers: usize,
        model_id: &str,
        codec: Codec,
        sampling: SamplingParams,
        prompt: Vec<u32>,
        k: usize,
        return_logits: bool,
    ) -> Result<RemoteSession, NetError> {
        self.open_replicated_with(
            peers,
            layers,
            model_id,
            codec,
            sampling,
            prompt,
            k,
            &SessionExtras {
                return_logits,
                adapter: None,
            },
            true,
        )
        .await
    }

    /// [`Client::open_replicated`] (`audit` false) or [`Client::open_audited`] (true), with
    /// `extras`: logits, and an adapter whose replicas vote only with replicas on their own
    /// version of it (the plan groups them by announced version).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn open_replicated_with(
        &self,
        peers: &PeerSet,
        layers: usize,
        model_id: &str,
        codec: Codec,
        sampling: SamplingParams,
        prompt: Vec<u32>,
        k: usize,
        extras: &SessionExtras,
        audit: bool,
    ) -> Result<RemoteSession, NetError> {
        if !(matches!(codec, Codec::F16 | Codec::F32)) {
            return Err(NetError::Malformed(format!(
                "replicated sessions vote over f16 or f32 frames, not {codec:?}"
            )));
        }
        let now = now_ms();
        let banned: Vec<NodeId> = peers
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| !self.may_route(id))
            .collect();
        let opts = RouteOptions {
            exclude: banned,
            adapter: extras.adapter.clone(),
            ..RouteOptions::default()
        };
        let plan = peers.plan_replicated(layers, k, now, &opts)?;
        let mut route = Vec::with_capacity(plan.len());
        let mut replicas = Vec::with_capacity(plan.len());
        let mut referees = Vec::with_capacity(plan.len());
        let mut holders = Vec::with_capacity(plan.len());
        for crate::net::route::ReplicatedRange {
            layers: range,
            hops,
        } in plan
        {
            let mut candidates: Vec<NodeId> = hops.iter().map(|h| h.node).collect();
            let table = lock(&self.inner.trust);
            // The referee first (a trusted node), the voters from the other holders: a
            // referee must be outside the vote, and audits are worth most where the voters
            // are unproven.
            let referee = audit
                .then(|| table.reputation().choose_referee(&candidates, &[], now))
                .flatten()
                .filter(|_| candidates.len() > 1);
            candidates.retain(|n| Some(*n) != referee);
            let voters = table
                .reputation()
                .choose_voters(&candidates, k, now)
                .map_err(|e| NetError::NoRoute {
                    from: range.start,
                    to: range.end,
                    reason: e.to_string(),
                })?;
            drop(table);
            let hop_of = |n: &NodeId| {
                hops.iter().find(|h| h.node == *n).map(|h| RouteHop {
                    node: h.node,
                    layers: h.layers.start as u32..h.layers.end as u32,
                    addrs: h.addrs.clone(),
                })
            };
            holders.push(hops.iter().filter_map(|h| hop_of(&h.node)).collect());
            let mut chosen: Vec<RouteHop> = voters.nodes.iter().filter_map(hop_of).collect();
            route.push(chosen[0].clone());
            chosen.extend(referee.as_ref().and_then(hop_of));
            replicas.push(chosen);
            referees.push(referee);
        }
        let mut open = self.new_open(route, model_id, codec, sampling, prompt, extras);
        open.replicas = replicas;
        if referees.iter().any(Option::is_some) {
            open.referees = referees;
        }
        let mut session = self.open_signed(open, &self.inner.key).await?;
        session.trust.holders = holders;
        if !audit {
            let planned: std::collections::HashSet<NodeId> = session
                .trust
                .holders
                .iter()
                .flatten()
                .map(|h| h.node)
                .collect();
            session.audit_plan = Some(Box::new(AuditPlan {
                peers: peers.subset(|id| planned.contains(id)),
                layers,
                k,
            }));
        }
        Ok(session)
    }
}

impl RemoteSession {
    /// The replicas of each range (empty for an unreplicated session).
    pub fn replicas(&self) -> &[Vec<RouteHop>] {
        &self.open.replicas
    }

    /// The referee of each range of an audited session (empty when none was chosen).
    pub fn referees(&self) -> &[Option<NodeId>] {
        &self.open.referees
    }

    /// What the votes of this session found so far (deviations, missing replicas, proofs).
    pub fn trust_findings(&self) -> &[String] {
        &self.trust.findings
    }

    /// After the vote on range `range` split at `start_pos`: a trusted holder of the range
    /// outside the vote joins the session as its referee, and replays positions
    /// `0..start_pos` from the predecessor's kept hidden states, so that nothing else is
    /// recomputed and the caller can retry the step, which the referee then decides.
    ///
    /// - The session is re-opened under the same id (signed, as any open), with the referee
    ///   among the range's replicas and named in `referees`. The nodes that hold it keep
    ///   their caches and prefix chains, and the referee opens it.
    /// - The predecessor is the client itself for the first range (its tokens, as a `Fill`).
    ///   For a later range it is a replica of the previous range that this client trusts:
    ///   it re-sends the hidden states it sent (`Replay`), so a lying source cannot make the
    ///   referee overrule honest voters.
    ///
    /// Returns what was done, or why no referee could join (the caller then falls back to
    /// [`Self::replay_audited`]).
    pub(super) async fn add_referee(
        &mut self,
        range: usize,
        start_pos: usize,
    ) -> Result<String, String> {
        if self.open.referee(range).is_some() {
            return Err(format!("range {range} already has a referee"));
        }
        let voters: Vec<NodeId> = self
            .open
            .replicas
            .get(range)
            .ok_or_else(|| format!("no range {range}"))?
            .iter()
            .map(|h| h.node)
            .collect();
        let holders = self.trust.holders.get(range).cloned().unwrap_or_default();
        let candidates: Vec<NodeId> = holders.iter().map(|h| h.node).collect();
        let now = now_ms();
        let (referee, source) = {
            let table = lock(&self.client.inner.trust);
            let rep = table.reputation();
            let referee = rep
                .choose_referee(&candidates, &voters, now)
                .and_then(|r| holders.iter().find(|h| h.node == r).cloned())
                .ok_or_else(|| {
                    format!("no trusted holder of range {range} outside its vote to referee it")
                })?;
            let source = match range.checked_sub(1) {
                None => None,
                Some(before) => Some(
                    self.open.replicas[before]
                        .iter()
                        .find(|h| {
                            Some(h.node) != self.open.referee(before)
                                && rep.state(&h.node, now) == crate::consensus::TrustState::Trusted
                        })
                        .cloned()
                        .ok_or_else(|| {
                            format!(
                                "no trusted replica of range {before} keeps the hidden states \
                                 range {range} was fed"
                            )
                        })?,
                ),
            };
            (referee, source)
        };
        // The same session, signed again with the referee added: holders keep their caches.
        let ranges = self.open.replicas.len();
        self.open.replicas[range].push(referee.clone());
        self.open.referees.resize(ranges, None);
        self.open.referees[range] = Some(referee.node);
        self.open.timestamp_ms = now_ms();
        self.open.nonce = super::random_u64();
        let signed = crate::net::proto::SignedOpen::sign(&self.open, &self.client.inner.key)
            .map_err(|e| e.to_string())?;
        let members: Vec<RouteHop> = self.open.members().into_iter().cloned().collect();
        let opens = members
            .iter()
            .map(|hop| async { (hop.node, self.send_open(hop, &signed).await) });
        for (node, reply) in n0_future::join_all(opens.collect::<Vec<_>>()).await {
            match reply {
                Ok(Message::Ok) => {}
                Ok(other) => {
                    return Err(format!(
                        "{} refused the re-open: {other:?}",
                        node.fmt_short()
                    ))
                }
                Err(e) => {
                    return Err(format!(
                        "{} did not take the re-open: {e}",
                        node.fmt_short()
                    ))
                }
            }
        }
        self.opened.push(referee.clone());
        // The referee's catch-up: positions 0..start_pos, from the predecessor's kept states.
        let session = self.open.session;
        let allowed = self.step_timeout + self.step_timeout_per_position * start_pos as u32;
        let (to, msg, from) = match &source {
            _ if start_pos == 0 => return Ok(format!("{} referees it", referee.node.fmt_short())),
            None => {
                let tokens = self
                    .fed
                    .get(..start_pos)
                    .ok_or_else(|| format!("{start_pos} positions not fed yet"))?
                    .to_vec();
                let msg = Message::Fill {
                    session,
                    start_pos: 0,
                    through: 0,
                    tokens,
                };
                (referee.clone(), msg, "the client's tokens".to_string())
            }
            Some(s) => {
                let msg = Message::Replay {
                    session,
                    upto: start_pos as u32,
                    through: range as u32,
                };
                let from = format!("{}'s kept hidden states", s.node.fmt_short());
                (s.clone(), msg, from)
            }
        };
        match tokio::time::timeout(allowed, self.client.request(&to, &msg)).await {
            Ok(Ok(Message::Ok)) => Ok(format!(
                "{} referees it, positions 0..{start_pos} replayed from {from}",
                referee.node.fmt_short()
            )),
            Ok(Ok(other)) => Err(format!("the referee's catch-up failed: {other:?}")),
            Ok(Err(e)) => Err(format!("the referee's catch-up failed: {e}")),
            Err(_) => Err(format!("the referee's catch-up took over {allowed:?}")),
        }
    }

    /// A vote without a majority (`failure`) in an unaudited session: the session is opened
    /// again audited (a trusted node outside the vote referees each range where one exists)
    /// and positions `0..start_pos + tokens.len()` are replayed on it, so the referee computes
    /// the whole prefix and decides the step, and the replicas it overrules are slashed on
    /// its signed evidence. The old session is closed. Without a referee anywhere, `failure`
    /// stands. Runs once per session.
    pub(super) async fn replay_audited(
        &mut self,
        tokens: &[u32],
        start_pos: usize,
        failure: NetError,
    ) -> Result<StepResult, NetError> {
        let Some(plan) = self.audit_plan.take() else {
            return Err(failure);
        };
        let mut context = self.fed[..start_pos.min(self.fed.len())].to_vec();
        context.extend_from_slice(tokens);
        let codec =
            Codec::from_u8(self.open.codec).map_err(|e| NetError::Malformed(e.to_string()))?;
        let extras = SessionExtras {
            return_logits: self.open.return_logits,
            adapter: self.open.adapter.clone(),
        };
        let audited = self
            .client
            .open_replicated_with(
                &plan.peers,
                plan.layers,
                &self.open.model_id,
                codec,
                self.open.sampling,
                self.open.prompt.clone(),
                plan.k,
                &extras,
                true,
            )
            .await;
        let mut audited = match audited {
            Ok(s) if !s.open.referees.is_empty() => s,
            Ok(mut s) => {
                s.close().await;
                self.trust.note(format!(
                    "no majority at position {start_pos}, and no trusted node outside the vote \
                     to referee it"
                ));
                return Err(failure);
            }
            Err(e) => {
                self.trust.note(format!(
                    "no majority at position {start_pos}; audit not opened: {e}"
                ));
                return Err(failure);
            }
        };
        audited.step_timeout = self.step_timeout;
        audited.step_timeout_per_position = self.step_timeout_per_position;
        audited.max_step_positions = self.max_step_positions;
        let referees: Vec<String> = audited
            .open
            .referees
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.map(|r| format!("range {i}: {}", r.fmt_short())))
            .collect();
        let mut old = std::mem::replace(self, audited);
        old.close().await;
        self.trust.votes += old.trust.votes;
        let mut findings = std::mem::take(&mut old.trust.findings);
        findings.append(&mut self.trust.findings);
        self.trust.findings = findings;
        self.trust.note(format!(
            "no majority at position {start_pos}: positions 0..{} replayed on an audited \
             session (referees {})",
            context.len(),
            referees.join(", ")
        ));
        self.step_chunks(&context, 0).await
    }

    /// A replicated step: the tokens go to every replica of the first range, the last
    /// range's replicas send their signed logits, and the client votes and samples.
    pub(super) async fn step_replicated(
        &mut self,
        tokens: &[u32],
        start_pos: usize,
    ) -> Result<StepResult, NetError> {
        self.absorb_pending_reports();
        self.fed.truncate(start_pos);
        self.fed.extend_from_slice(tokens);
        self.attempt += 1;
        let msg = Message::Step {
            session: self.open.session,
            attempt: self.attempt,
            start_pos: start_pos as u32,
            tokens: tokens.to_vec(),
        };
        let first = self.open.replicas.first().cloned().unwrap_or_default();
        let sends = first
            .iter()
            .filter(|hop| !self.trust.unreachable.contains(&hop.node))
            .map(|hop| async {
                let sent = tokio::time::timeout(STEP_SEND_TIMEOUT, self.send_step(hop, &msg));
                (hop.node, sent.await)
            });
        let mut sent = 0;
        for (node, result) in n0_future::join_all(sends.collect::<Vec<_>>()).await {
            let failure = match result {
                Ok(Ok(())) => {
                    sent += 1;
                    continue;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no delivery in {STEP_SEND_TIMEOUT:?}"),
            };
            self.trust.unreachable.push(node);
            self.trust.note(format!(
                "step not delivered to {}: {failure}",
                node.fmt_short()
            ));
        }
        if 2 * sent <= first.len() {
            return Err(NetError::HopFailed {
                node: None,
                reason: Some(Reason::NoMajority),
                reporter: None,
                message: format!(
                    "the step reached {sent} of the first range's {} replicas",
                    first.len()
                ),
            });
        }
        let want = (start_pos + tokens.len()) as u32;
        // The last range's replicas; an audited range's referee among them is outside the vote.
        let last = self.open.replicas.len().saturating_sub(1);
        let referee = self.open.referee(last);
        let senders: Vec<NodeId> = self
            .open
            .replicas
            .last()
            .map(|r| r.iter().map(|h| h.node).collect())
            .unwrap_or_default();
        let expected: Vec<NodeId> = senders
            .iter()
            .filter(|n| Some(**n) != referee)
            .copied()
            .collect();
        let waiting_for: Vec<NodeId> = senders
            .iter()
            .filter(|n| self.client.may_route(n))
            .copied()
            .collect();
        // Last-range replicas that reported a failure instead of a ballot.
        let mut failed: Vec<NodeId> = Vec::new();
        // By range: the replicas that found no majority in the vote on their input.
        let mut split_reports: Vec<Vec<NodeId>> = vec![Vec::new(); self.open.replicas.len()];
        self.trust.split = None;
        let allowed = self.step_timeout + self.step_timeout_per_position * tokens.len() as u32;
        let started = tokio::time::Instant::now();
        let deadline = started + allowed;
        let mut ballots: Vec<SignedBallot> = Vec::new();
        let mut first_at: Option<tokio::time::Instant> = None;
        let mut majority_after: Option<Duration> = None;
        let members: Vec<NodeId> = self.open.members().iter().map(|h| h.node).collect();
        loop {
            let mut answered: Vec<NodeId> = ballots.iter().map(|b| b.from).collect();
            answered.sort();
            answered.dedup();
            if waiting_for.iter().all(|n| answered.contains(n)) && !answered.is_empty() {
                break;
            }
            // Most replicas of a range found no majority upstream: the ranges after it get
            // no ballots and would only run into their deadline.
            if self.split_range(&split_reports).is_some() {
                break;
            }
            // Everyone still awaited failed the step (no majority upstream, say): nothing
            // more will come, so the deadline is not worth waiting for.
            if waiting_for
                .iter()
                .all(|n| answered.contains(n) || failed.contains(n))
            {
                break;
            }
            if let (Some(t0), None) = (first_at, majority_after) {
                if 2 * answered.len() > senders.len() {
                    majority_after = Some(t0.elapsed());
                }
            }
            let ready_at = match (first_at, majority_after) {
                (Some(t0), Some(m)) => (t0 + m + VOTE_GRACE.max(m)).min(deadline),
                _ => deadline,
            };
            let item = match tokio::time::timeout_at(ready_at, self.rx.recv()).await {
                Err(_) if ready_at >= deadline => {
                    self.trust.note(format!(
                        "the deadline of the step at {start_pos} ({allowed:?}) passed with \
                         {} of {} ballots",
                        answered.len(),
                        senders.len()
                    ));
                    break;
                }
                Err(_) => break,
                Ok(None) => return Err(NetError::Io("client shut down".into())),
                Ok(Some(item)) => item,
            };
            match item {
                FromHop {
                    from,
                    item:
                        Inbound::Ballot {
                            attempt,
                            step_end,
                            ballot,
                        },
                } if attempt == self.attempt
                    && step_end == want
                    && senders.contains(&from)
                    && ballots.iter().filter(|b| b.from == from).count() < 2 =>
                {
                    first_at.get_or_insert_with(tokio::time::Instant::now);
                    ballots.push(*ballot);
                }
                FromHop {
                    from,
                    item: Inbound::Message(msg @ Message::VoteReport { .. }),
                } => self.absorb_report(from, msg),
                FromHop {
                    from,
                    item:
                        Inbound::Message(Message::Error {
                            reason, message, ..
                        }),
                } if members.contains(&from) => {
                    // One replica's failure is a missed ballot, not the step's end.
                    self.trust.note(format!(
                        "{} failed the step ({reason}): {message}",
                        from.fmt_short()
                    ));
                    if senders.contains(&from) && !failed.contains(&from) {
                        failed.push(from);
                    }
                    if reason == Reason::NoMajority {
                        if let Some(r) = self.range_of(from) {
                            if !split_reports[r].contains(&from) {
                                split_reports[r].push(from);
                            }
                        }
                    }
                }
                _ => continue,
            }
        }
        if let Some(receivers) = self.split_range(&split_reports) {
            // The receivers of range `receivers` found no majority: the split is the range
            // before them.
            self.trust.split = Some(receivers - 1);
            return Err(NetError::HopFailed {
                node: None,
                reason: Some(Reason::NoMajority),
                reporter: None,
                message: format!(
                    "the replicas of range {receivers} found no majority among range {}'s \
                     outputs at {start_pos}: {}",
                    receivers - 1,
                    self.trust.findings.last().cloned().unwrap_or_default()
                ),
            });
        }
        if ballots.is_empty() && !failed.is_empty() {
            // The last range reported failures (a split vote upstream, say) and sent nothing:
            // no vote to run, and nobody to blame for a missing ballot.
            return Err(NetError::HopFailed {
                node: None,
                reason: Some(Reason::NoMajority),
                reporter: None,
                message: format!(
                    "the last range's replicas failed the step at {want}: {}",
                    self.trust.findings.last().cloned().unwrap_or_default()
                ),
            });
        }
        let verdict = lock(&self.client.inner.trust).judge(&expected, referee, ballots, now_ms());
        self.trust.votes += 1;
        self.trust.to_share.extend(
            verdict
                .evidence
                .iter()
                .filter(|e| crate::net::gossip::is_gossiped(e))
                .cloned(),
        );
        self.share_proofs();
        let range = self.open.replicas.len().saturating_sub(1) as u32;
        for e in &verdict.evidence {
            self.trust.note(format!(
                "range {range}, position {start_pos}: {}",
                describe(e)
            ));
        }
        for n in &verdict.unaccounted {
            self.trust.note(format!(
                "range {range}, position {start_pos}: no ballot from {} counted",
                n.fmt_short()
            ));
        }
        let Some(winner) = verdict.accepted else {
            self.trust.split = Some(last);
            let message = match verdict.outcome {
                VoteOutcome::NoMajority { answered, missing } => format!(
                    "the last range's replicas did not agree on the logits at {want} \
                     ({} answered, {} missing)",
                    answered.len(),
                    missing.len()
                ),
                VoteOutcome::Accepted(_) => "the accepted ballot went missing".into(),
            };
            return Err(NetError::HopFailed {
                node: None,
                reason: Some(Reason::NoMajority),
                reporter: None,
                message,
            });
        };
        let logits: Vec<f32> = winner
            .bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if self.open.return_logits {
            return Ok(StepResult::Logits(logits));
        }
        // The draw depends only on (seed, position) and the context, exactly as a last hop
        // samples, so a replicated session writes the same text as an unreplicated one.
        let position = want as usize;
        let context = &self.fed[..position.min(self.fed.len())];
        let token = sample(&logits, &self.open.sampling, position, context)
            .map_err(|e| NetError::Malformed(e.to_string()))?;
        Ok(StepResult::Token(token))
    }

    /// The range `node` is a replica of.
    fn range_of(&self, node: NodeId) -> Option<usize> {
        self.open
            .replicas
            .iter()
            .position(|r| r.iter().any(|h| h.node == node))
    }

    /// The first range (after the first: it is fed tokens, not votes) most of whose
    /// replicas reported that the vote on their input found no majority.
    fn split_range(&self, reports: &[Vec<NodeId>]) -> Option<usize> {
        reports
            .iter()
            .zip(&self.open.replicas)
            .enumerate()
            .skip(1)
            .find(|(_, (reported, replicas))| 2 * reported.len() > replicas.len())
            .map(|(r, _)| r)
    }

    /// Sends a step to one replica of the first range.
    async fn send_step(&self, hop: &RouteHop, msg: &Message) -> Result<(), NetError> {
        let conn = self.client.connection(hop.node, &hop.addrs).await?;
        crate::net::proto::send_uni(&conn, msg, None).await
    }

    /// Checks what a receiver reported about a vote: evidence is verified by the client
    /// itself (a receiver's word counts for nothing), receipts and frame claims inside it are
    /// matched against the ones seen before (fraud and upstream proofs), and a replica
    /// counts as missing only when most receivers of its output report it.
    fn absorb_report(&mut self, from: NodeId, msg: Message) {
        let Message::VoteReport {
            start_pos,
            range,
            evidence,
            missing,
            claims,
            ..
        } = msg
        else {
            return;
        };
        let Some(receivers) = self.receivers_of(range as usize) else {
            return;
        };
        if !receivers.contains(&from) {
            return;
        }
        let now = now_ms();
        let mut consensus = lock(&self.client.inner.trust);
        let mut found: Vec<Evidence> = Vec::new();
        for e in &evidence {
            if let Evidence::Deviation(d) = e {
                for b in &d.ballots {
                    if let Some(p) = consensus.observe(&b.receipt, now) {
                        found.push(Evidence::Fraud(p));
                    }
                    if let Some(p) = b
                        .frame
                        .as_ref()
                        .and_then(|f| consensus.observe_frame(f, now))
                    {
                        found.push(Evidence::Upstream(p));
                    }
                }
            }
        }
        for claim in &claims {
            if let Some(p) = consensus.observe_frame(claim, now) {
                found.push(Evidence::Upstream(p));
            }
        }
        let mut applied = Vec::new();
        for e in evidence.iter().chain(&found) {
            if consensus.knows(e) {
                continue;
            }
            match consensus.apply(e, now) {
                Ok(node) => {
                    applied.push(format!("{} ({})", describe(e), node.fmt_short()));
                    if crate::net::gossip::is_gossiped(e) {
                        self.trust.to_share.push(e.clone());
                    }
                }
                Err(err) => tracing::debug!("evidence from {} refused: {err}", from.fmt_short()),
            }
        }
        let mut timed_out = Vec::new();
        for m in missing {
            let reporters = self.trust.missing.entry((range, start_pos, m)).or_default();
            if reporters.contains(&from) {
                continue;
            }
            reporters.push(from);
            // Exactly when a majority of the receivers has reported it (once per step).
            if 2 * reporters.len() > receivers.len() && 2 * (reporters.len() - 1) <= receivers.len()
            {
                let reporters = reporters.clone();
                if consensus.missing_reported(m, &reporters, &receivers, now) {
                    timed_out.push(m);
                }
            }
        }
        drop(consensus);
        self.trust.votes += 1;
        for a in applied {
            self.trust
                .note(format!("range {range}, position {start_pos}: checked {a}"));
        }
        for m in timed_out {
            self.trust.note(format!(
                "range {range}, position {start_pos}: most receivers got no ballot from {}",
                m.fmt_short()
            ));
        }
        // Old steps' missing reports go once the session is well past them.
        let horizon = start_pos.saturating_sub(4096);
        self.trust.missing.retain(|(_, s, _), _| *s >= horizon);
    }

    /// Checks the vote reports that arrived since the last step (reports about earlier steps
    /// are still evidence; anything else is stale), and shares the proofs they gave.
    pub(super) fn absorb_pending_reports(&mut self) {
        while let Ok(FromHop { from, item }) = self.rx.try_recv() {
            if let Inbound::Message(msg @ Message::VoteReport { .. }) = item {
                self.absorb_report(from, msg);
            }
        }
        self.share_proofs();
    }

    /// Sends the proofs found since the last call to every node of the session, in the
    /// background: each verifies them and gossips them on, so replicas that never voted on
    /// the liar (its own range's, any other node's) ban it too. Best effort, each request
    /// bounded by [`PROOF_SEND_TIMEOUT`].
    fn share_proofs(&mut self) {
        if self.trust.to_share.is_empty() {
            return;
        }
        let proofs = std::mem::take(&mut self.trust.to_share);
        let hops: Vec<RouteHop> = self.open.members().into_iter().cloned().collect();
        let client = self.client.clone();
        tokio::spawn(async move {
            for proof in proofs {
                let msg = Message::Evidence(proof);
                for hop in &hops {
                    let sent = tokio::time::timeout(PROOF_SEND_TIMEOUT, client.request(hop, &msg));
                    match sent.await {
                        Ok(Ok(Message::Ok)) => {}
                        Ok(Ok(other)) => tracing::debug!(
                            to = %hop.node.fmt_short(),
                            "proof not taken: {}",
                            other.kind()
                        ),
                        Ok(Err(e)) => {
                            tracing::debug!(to = %hop.node.fmt_short(), "proof not sent: {e}")
                        }
                        Err(_) => tracing::debug!(to = %hop.node.fmt_short(), "proof timed out"),
                    }
                }
            }
        });
    }

    /// The receivers of range `range`'s outputs: the next range's replicas (the client for
    /// the last range). `None` for a range the session does not have.
    fn receivers_of(&self, range: usize) -> Option<Vec<NodeId>> {
        let replicas = &self.open.replicas;
        if range + 1 >= replicas.len() {
            return None;
        }
        Some(replicas[range + 1].iter().map(|h| h.node).collect())
    }
}

/// One line about a piece of evidence.
fn describe(e: &Evidence) -> String {
    match e {
        Evidence::Deviation(d) => format!(
            "{} deviated from the majority (signed receipts)",
            d.accused.fmt_short()
        ),
        Evidence::Fraud(_) => "a replica signed two outputs for one input (fraud proof)".into(),
        Evidence::Upstream(_) => "a sender signed two frames for one step (upstream proof)".into(),
        Evidence::Refereed(r) => format!(
            "{} overruled by the trusted referee {} (signed receipts)",
            r.accused.fmt_short(),
            r.referee.from.fmt_short()
        ),
    }
}
