//! Replicated sessions on 127.0.0.1 (Trust): SmolLM2 in two ranges of three replicas, real
//! nodes and a real client. Every receiver votes on the previous range's signed outputs, the
//! client on the last range's logits; a lying replica is outvoted at its first lie, its
//! evidence is checked by the client, it is banned from the client's routes, and the text
//! stays the honest reference text.

use crate::common::*;
use neuroshard_core::consensus::adversary::Behaviour;
use neuroshard_core::consensus::TrustState;
use neuroshard_core::net::{now_ms, PeerSet};
use neuroshard_core::wire::Codec;
use neuroshard_core::{Client, LocalSwarm, Node, RemoteSession, SamplingParams};

/// The swarm's announcements as a client's PeerSet.
fn peers_of(swarm: &LocalSwarm) -> PeerSet {
    let mut peers = PeerSet::new(swarm.model_id.clone());
    for ann in swarm.announcements().expect("announcements") {
        peers.insert(&ann, now_ms()).expect("insert");
    }
    peers
}

/// Greedy tokens from `prompt`, step by step through a replicated session.
async fn greedy(session: &mut RemoteSession, prompt: &[u32], tokens: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(tokens);
    let mut next = session.step(prompt, 0).await.expect("prompt step");
    for i in 0..tokens {
        out.push(next);
        if i + 1 == tokens {
            break;
        }
        next = session
            .step(&[next], prompt.len() + i)
            .await
            .expect("decode step");
    }
    out
}

async fn open(client: &Client, swarm: &LocalSwarm, k: usize, prompt: &[u32]) -> RemoteSession {
    open_on(client, &peers_of(swarm), &swarm.model_id, k, prompt).await
}

/// A greedy replicated session with f16 frames, `k` replicas per range, planned from `peers`.
async fn open_on(
    client: &Client,
    peers: &PeerSet,
    model_id: &str,
    k: usize,
    prompt: &[u32],
) -> RemoteSession {
    client
        .open_replicated(
            peers,
            30,
            model_id,
            Codec::F16,
            SamplingParams::greedy(),
            prompt.to_vec(),
            k,
            false,
        )
        .await
        .expect("open a replicated session")
}

/// The state `client` gives `node` now.
fn state_of(client: &Client, node: &Node) -> TrustState {
    let id = node.id().to_string();
    client
        .trust_table()
        .into_iter()
        .find(|r| r.node == id)
        .map(|r| r.state)
        .unwrap_or(TrustState::Probation)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_replica_is_outvoted_caught_on_evidence_and_leaves_routes() {
    let swarm = smollm2_swarm(2, 3).await;
    let client = new_client().await;
    let (prompt, expected) = smollm2_prompt_and_greedy();
    let n = expected.len().min(8);

    // Honest: every replica agrees, the text is the reference.
    let mut session = open(&client, &swarm, 3, &prompt).await;
    assert_eq!(session.replicas().len(), 2);
    assert!(session.replicas().iter().all(|r| r.len() == 3));
    assert_eq!(greedy(&mut session, &prompt, n).await, &expected[..n]);
    assert!(
        session.trust_findings().is_empty(),
        "honest replicas were flagged: {:?}",
        session.trust_findings()
    );
    session.close().await;
    for node in &swarm.nodes {
        assert_ne!(state_of(&client, node), TrustState::Banned);
    }

    // One replica of each range lies: 1%-RMS noise on its hidden states (range 0, judged by
    // the three replicas of range 1) and 2% scaled logits (range 1, judged by the client).
    let mut session = open(&client, &swarm, 3, &prompt).await;
    let liar = |range: usize| {
        let id = session.replicas()[range][1].node;
        swarm
            .nodes
            .iter()
            .find(|n| n.id() == id)
            .cloned()
            .expect("a swarm node")
    };
    let (hidden_liar, logits_liar) = (liar(0), liar(1));
    hidden_liar.set_behaviour(Some(Behaviour::Noise));
    logits_liar.set_behaviour(Some(Behaviour::Scale));
    assert_eq!(
        greedy(&mut session, &prompt, n).await,
        &expected[..n],
        "the liars changed the text"
    );
    session.close().await;
    // Both were caught at their first lie, on evidence the client checked itself.
    assert_eq!(state_of(&client, &hidden_liar), TrustState::Banned);
    assert_eq!(state_of(&client, &logits_liar), TrustState::Banned);
    let findings = session.trust_findings().join("\n");
    assert!(findings.contains("deviated"), "{findings}");
    for node in &swarm.nodes {
        if node.id() != hidden_liar.id() && node.id() != logits_liar.id() {
            assert_ne!(state_of(&client, node), TrustState::Banned, "{findings}");
        }
    }
    // The receivers of range 0 saw the deviation themselves.
    let judged: Vec<_> = swarm
        .nodes
        .iter()
        .filter(|n| n.engine().layers().start == 15)
        .filter(|n| n.id() != logits_liar.id())
        .collect();
    for receiver in judged {
        let row = receiver
            .trust_table()
            .into_iter()
            .find(|r| r.node == hidden_liar.id().to_string())
            .expect("the receiver knows the liar");
        assert_eq!(row.state, TrustState::Banned, "{row:?}");
    }

    // The liars leave routes: three replicas per range no longer exist, two do.
    assert!(client
        .open_replicated(
            &peers_of(&swarm),
            30,
            &swarm.model_id,
            Codec::F16,
            SamplingParams::greedy(),
            prompt.clone(),
            3,
            false
        )
        .await
        .is_err());
    let mut session = open(&client, &swarm, 2, &prompt).await;
    let members: Vec<_> = session
        .replicas()
        .iter()
        .flatten()
        .map(|h| h.node)
        .collect();
    assert!(!members.contains(&hidden_liar.id()) && !members.contains(&logits_liar.id()));
    assert_eq!(greedy(&mut session, &prompt, 3).await, &expected[..3]);
    session.close().await;
    client.shutdown().await;
    swarm.shutdown().await;
}

/// Ranges of SmolLM2 replicas on 127.0.0.1 (two of three replicas unless a test casts
/// others), spawned here so that one engine can lie in its weights before it serves. They
/// form one gossip mesh (each joins through the first), with an optional bystander: a node
/// of the first range's layers that no route uses.
struct Replicas {
    nodes: Vec<Node>,
    /// The first layer of each range.
    starts: Vec<usize>,
    bystander: Option<Node>,
    model_id: String,
}

impl Replicas {
    /// The replicas; `liar` (range, behaviour) picks the lowest-id replica of that range,
    /// whose engine gets `wrong-weights` before it serves when that is the behaviour.
    async fn start(liar: (usize, Behaviour)) -> (Replicas, Node) {
        Self::start_with(liar, false).await
    }

    /// As [`Replicas::start`], with a bystander when `bystander` is set.
    async fn start_with(liar: (usize, Behaviour), bystander: bool) -> (Replicas, Node) {
        let mut cast = [vec![None; 3], vec![None; 3]];
        cast[liar.0][0] = Some(liar.1);
        let swarm = Self::start_cast(cast, bystander).await;
        let liar = swarm.range(liar.0)[0].clone();
        (swarm, liar)
    }

    /// The 30 layers in N equal ranges (two: 0-15 and 15-30), on `cast[r].len()` replicas
    /// each: the `i`-th lowest node id of range `r` behaves as `cast[r][i]` (honest when
    /// `None`; `wrong-weights` perturbs its engine before it serves), plus a bystander on
    /// the first range's layers when `bystander` is set.
    async fn start_cast<const N: usize>(
        cast: [Vec<Option<Behaviour>>; N],
        bystander: bool,
    ) -> Replicas {
        let mut nodes: Vec<Node> = Vec::new();
        let spawn = |engine: neuroshard_core::ShardEngine, key, first: Option<&Node>| {
            let bootstrap = first.map(|n| vec![n.addr()]).unwrap_or_default();
            Node::spawn_with(
                std::sync::Arc::new(engine),
                key,
                neuroshard_core::NodeOptions {
                    bootstrap,
                    ..Default::default()
                },
            )
        };
        let load = |slice: std::ops::Range<usize>| {
            neuroshard_core::ShardEngine::load(
                smollm2(),
                slice,
                neuroshard_core::EngineOptions::default(),
            )
            .expect("load")
        };
        // The 30 layers cut into N equal ranges.
        let slices: Vec<std::ops::Range<usize>> =
            (0..N).map(|r| 30 * r / N..30 * (r + 1) / N).collect();
        for (roles, slice) in cast.iter().zip(&slices) {
            let mut keys: Vec<iroh::SecretKey> =
                roles.iter().map(|_| iroh::SecretKey::generate()).collect();
            keys.sort_by_key(|k| k.public());
            for (key, role) in keys.into_iter().zip(roles) {
                let mut engine = load(slice.clone());
                if *role == Some(Behaviour::WrongWeights) {
                    engine.perturb_weight(0.01, 0x5eed).expect("perturb");
                }
                let node = spawn(engine, key, nodes.first()).await.expect("node");
                if role.is_some() {
                    node.set_behaviour(*role);
                }
                nodes.push(node);
            }
        }
        let bystander = if bystander {
            let key = iroh::SecretKey::generate();
            Some(
                spawn(load(slices[0].clone()), key, nodes.first())
                    .await
                    .expect("bystander"),
            )
        } else {
            None
        };
        let model_id = neuroshard_core::model_id(nodes[0].engine());
        Replicas {
            nodes,
            starts: slices.iter().map(|s| s.start).collect(),
            bystander,
            model_id,
        }
    }

    /// The replicas of range `r` (0: the first layers), lowest node id first.
    fn range(&self, r: usize) -> Vec<Node> {
        let start = self.starts[r];
        self.nodes
            .iter()
            .filter(|n| n.engine().layers().start == start)
            .cloned()
            .collect()
    }

    fn peers(&self) -> PeerSet {
        let now = now_ms();
        let mut peers = PeerSet::new(self.model_id.clone());
        for n in &self.nodes {
            let layers = n.engine().layers();
            let ann = neuroshard_core::net::Announcement {
                protocol_version: neuroshard_core::net::PROTOCOL_VERSION,
                node: n.id(),
                model_id: self.model_id.clone(),
                versions: Vec::new(),
                layers: layers.start as u32..layers.end as u32,
                capacity: 64,
                load: 0,
                addrs: n.addr().ip_addrs().copied().collect(),
                entry: layers.start == 0,
                timestamp_ms: now,
                expires_ms: now + 60_000,
            };
            let signed =
                neuroshard_core::net::SignedAnnouncement::sign(&ann, n.secret_key()).expect("sign");
            peers.insert(&signed, now).expect("insert");
        }
        peers
    }

    async fn shutdown(&self) {
        for n in self.nodes.iter().chain(&self.bystander) {
            n.shutdown().await;
        }
    }
}

/// One cell of the detection matrix: `behaviour` on the lowest-id replica of `range` (0:
/// judged by the next range's three replicas; 1: a receiver of range 0, judged by the
/// client). Returns the vote after which the client had banned it.
async fn detect(behaviour: Behaviour, range: usize, expected: &[u32], prompt: &[u32]) -> usize {
    let (swarm, liar) = Replicas::start((range, behaviour)).await;
    let client = new_client().await;
    let mut session = open_on(&client, &swarm.peers(), &swarm.model_id, 3, prompt).await;
    let lowest = session.replicas()[range].iter().map(|h| h.node).min();
    assert_eq!(lowest, Some(liar.id()), "the liar is its range's lowest id");
    let mut caught_at = None;
    let mut tokens = Vec::new();
    let mut next = session.step(prompt, 0).await.expect("prompt step");
    for vote in 1..=expected.len() {
        if caught_at.is_none() && state_of(&client, &liar) == TrustState::Banned {
            caught_at = Some(vote);
        }
        tokens.push(next);
        if vote == expected.len() {
            break;
        }
        next = session
            .step(&[next], prompt.len() + vote - 1)
            .await
            .unwrap_or_else(|e| panic!("{behaviour:?} in range {range}: {e}"));
    }
    if caught_at.is_none() && state_of(&client, &liar) == TrustState::Banned {
        caught_at = Some(expected.len());
    }
    let findings = session.trust_findings().join("\n");
    assert_eq!(
        tokens, expected,
        "{behaviour:?} in range {range} changed the text\n{findings}"
    );
    for node in &swarm.nodes {
        if node.id() != liar.id() {
            assert_ne!(
                state_of(&client, node),
                TrustState::Banned,
                "{behaviour:?} in range {range}: an honest node was banned\n{findings}"
            );
        }
    }
    session.close().await;
    client.shutdown().await;
    swarm.shutdown().await;
    caught_at
        .unwrap_or_else(|| panic!("{behaviour:?} in range {range} went undetected\n{findings}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_behaviour_is_caught_within_three_votes_in_either_range() {
    let (prompt, expected) = smollm2_prompt_and_greedy();
    let expected = &expected[..4];
    let mut table = Vec::new();
    for behaviour in Behaviour::ALL {
        for range in [0, 1] {
            // The last range has one receiver, the client: it cannot be shown two outputs.
            let one_receiver =
                range == 1 && matches!(behaviour, Behaviour::Equivocate | Behaviour::BadUpstream);
            if one_receiver {
                continue;
            }
            // Bounded: a cell that does not finish fails by name instead of hanging CI.
            let vote = tokio::time::timeout(
                std::time::Duration::from_secs(120),
                detect(behaviour, range, expected, &prompt),
            )
            .await
            .unwrap_or_else(|_| panic!("{behaviour:?} in range {range}: no result in 120 s"));
            table.push(format!(
                "{:>13} range {range}: banned after vote {vote}",
                behaviour.name()
            ));
            assert!(
                vote <= 3,
                "{behaviour:?} in range {range}: banned only after vote {vote}"
            );
        }
    }
    eprintln!("detection matrix (in process):\n{}", table.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_on_trusted_nodes_are_spot_checked_at_the_set_rate() {
    let swarm = smollm2_swarm(2, 3).await;
    let client = new_client().await;
    for node in &swarm.nodes {
        client.trust(node.id());
    }
    let entries = neuroshard_core::resolve_peers(&swarm.addresses())
        .await
        .expect("addresses");
    let session =
        neuroshard_core::SwarmSession::connect(client.clone(), entries, Default::default())
            .await
            .expect("connect");
    let (prompt, expected) = smollm2_prompt_and_greedy();
    // Rate 1: every session on trusted single replicas runs replicated, and writes the same
    // text; rate 0: none does.
    client.set_spot_check_rate(1.0);
    let prepared = session
        .prepare(prompt.clone(), SamplingParams::greedy())
        .await
        .expect("prepare");
    assert_eq!(prepared.replicas().len(), 2, "not spot-checked");
    let config = neuroshard_core::GenerationConfig {
        max_tokens: 4,
        ignore_eos: true,
        ..Default::default()
    };
    let out = prepared
        .run(
            config.clone(),
            Box::new(|_| std::ops::ControlFlow::Continue(())),
        )
        .await
        .expect("spot-checked generation");
    assert_eq!(out.output.tokens, &expected[..4]);
    assert!(out.votes.is_empty(), "{:?}", out.votes);
    client.set_spot_check_rate(0.0);
    let prepared = session
        .prepare(prompt, SamplingParams::greedy())
        .await
        .expect("prepare");
    assert!(prepared.replicas().is_empty(), "spot-checked at rate 0");
    prepared
        .run(config, Box::new(|_| std::ops::ControlFlow::Continue(())))
        .await
        .expect("plain generation");
    client.shutdown().await;
    swarm.shutdown().await;
}

/// The state `node` gives `accused` now, with the reason of its last change.
fn standing_at(node: &Node, accused: &Node) -> Option<(TrustState, String)> {
    let id = accused.id().to_string();
    node.trust_table()
        .into_iter()
        .find(|r| r.node == id)
        .map(|r| (r.state, format!("{:?}", r.standing)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fraud_proof_spreads_by_gossip_and_every_node_bans_the_signer() {
    let (prompt, expected) = smollm2_prompt_and_greedy();
    let (swarm, liar) = Replicas::start_with((0, Behaviour::Equivocate), true).await;
    let bystander = swarm.bystander.clone().expect("a bystander");
    let client = new_client().await;
    let mut session = open_on(&client, &swarm.peers(), &swarm.model_id, 3, &prompt).await;
    assert!(!session
        .replicas()
        .iter()
        .flatten()
        .any(|h| h.node == bystander.id()));
    assert_eq!(greedy(&mut session, &prompt, 3).await, &expected[..3]);
    session.close().await;
    assert_eq!(state_of(&client, &liar), TrustState::Banned);
    let findings = session.trust_findings().join("\n");
    assert!(findings.contains("fraud proof"), "{findings}");

    // The liar's own range never voted on it, and the bystander was in no route: both know
    // only what the proof shows them, each after checking its signatures.
    let witnesses: Vec<&Node> = swarm
        .nodes
        .iter()
        .filter(|n| n.engine().layers().start == 0 && n.id() != liar.id())
        .chain(std::iter::once(&bystander))
        .collect();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    for witness in &witnesses {
        loop {
            let standing = standing_at(witness, &liar);
            if matches!(standing, Some((TrustState::Banned, _))) {
                let (_, reason) = standing.unwrap_or_else(|| unreachable!());
                assert!(reason.contains("fraud"), "{reason}");
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} never banned the liar: {standing:?}\n{findings}",
                witness.id().fmt_short()
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    assert!(
        bystander.stats().proofs_taken >= 1,
        "{:?}",
        bystander.stats()
    );
    // Honest nodes stay clean everywhere.
    for witness in &witnesses {
        for node in &swarm.nodes {
            if node.id() != liar.id() {
                assert_ne!(
                    standing_at(witness, node).map(|s| s.0),
                    Some(TrustState::Banned)
                );
            }
        }
    }
    client.shutdown().await;
    swarm.shutdown().await;
}

/// Failover of a replicated session: replicas that agreed keep their caches, so when one
/// replica of each range dies mid-session the votes go on with the other two, with no
/// replay anywhere, and the text stays the reference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_session_goes_on_without_a_dead_replica_and_replays_nothing() {
    let swarm = smollm2_swarm(2, 3).await;
    let client = new_client().await;
    let (prompt, expected) = smollm2_prompt_and_greedy();
    let n = expected.len().min(8);
    let mut session = open(&client, &swarm, 3, &prompt).await;
    let mut out = vec![session.step(&prompt, 0).await.expect("prompt step")];
    for i in 0..2 {
        let next = session
            .step(&[out[i]], prompt.len() + i)
            .await
            .expect("decode step");
        out.push(next);
    }
    // The first range's lowest id (its bytes went forward) and one replica of the last
    // range (voted on by the client) die.
    let lowest = |range: usize| {
        session.replicas()[range]
            .iter()
            .map(|h| h.node)
            .min()
            .expect("replicas")
    };
    let dead = [lowest(0), lowest(1)];
    for node in swarm.nodes.iter().filter(|n| dead.contains(&n.id())) {
        node.shutdown().await;
    }
    while out.len() < n {
        let i = out.len() - 1;
        let next = session
            .step(&[out[i]], prompt.len() + i)
            .await
            .expect("a decode step after the failures");
        out.push(next);
    }
    assert_eq!(out, &expected[..n], "the text changed after the failures");
    let findings = session.trust_findings().join("\n");
    session.close().await;
    for node in &swarm.nodes {
        if dead.contains(&node.id()) {
            // Silence is not evidence: a temporary ban, no slashing.
            assert_eq!(state_of(&client, node), TrustState::Banned, "{findings}");
            continue;
        }
        assert_ne!(state_of(&client, node), TrustState::Banned, "{findings}");
        assert_eq!(node.stats().replays, 0, "a survivor replayed");
    }
    let row = client
        .trust_table()
        .into_iter()
        .find(|r| r.node == dead[0].to_string())
        .expect("the dead replica is in the table");
    assert!(row.standing.reason.contains("timed out"), "{row:?}");
    assert_eq!(row.standing.deviations, 0, "{row:?}");
    client.shutdown().await;
    swarm.shutdown().await;
}

/// Range 0 with two colluders (the two lowest ids, scaling their outputs by 1.02 alike) and
/// one honest replica, plus, when `audited`, the operator's own node with the highest id,
/// which the client and every node trust; range 1 honest. A greedy session of 4 tokens,
/// opened audited or not: the swarm, the client, the session and the text.
async fn colluders(audited: bool) -> (Replicas, Client, RemoteSession, Vec<u32>) {
    let (prompt, _) = smollm2_prompt_and_greedy();
    let scale = Some(Behaviour::Scale);
    let mut range0 = vec![scale, scale, None];
    if audited {
        range0.push(None);
    }
    let swarm = Replicas::start_cast([range0, vec![None; 3]], false).await;
    let client = new_client().await;
    if audited {
        let referee = swarm.range(0)[3].id();
        client.trust(referee);
        for node in &swarm.nodes {
            node.trust(referee);
        }
    }
    let (peers, model) = (swarm.peers(), swarm.model_id.clone());
    let (codec, sampling) = (Codec::F16, SamplingParams::greedy());
    let opened = if audited {
        client
            .open_audited(
                &peers,
                30,
                &model,
                codec,
                sampling,
                prompt.clone(),
                3,
                false,
            )
            .await
    } else {
        client
            .open_replicated(
                &peers,
                30,
                &model,
                codec,
                sampling,
                prompt.clone(),
                3,
                false,
            )
            .await
    };
    let mut session = opened.expect("open");
    let tokens = greedy(&mut session, &prompt, 4).await;
    (swarm, client, session, tokens)
}

/// What every receiver of range 0 (the replicas of range 1) holds against `accused`.
fn receivers_state(swarm: &Replicas, accused: &Node) -> Vec<Option<TrustState>> {
    swarm
        .range(1)
        .iter()
        .map(|r| standing_at(r, accused).map(|s| s.0))
        .collect()
}

/// Collusion limits over the network: two colluding replicas of three win an unaudited vote
/// (their bytes go forward, and the honest third is the one outvoted and banned); in an
/// audited session a trusted referee outside the vote overrules them at their first vote,
/// every receiver and the client ban them on its signed evidence, and the text is the honest
/// one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn colluders_win_an_unaudited_vote_and_a_referee_catches_them_in_an_audited_one() {
    let (_, expected) = smollm2_prompt_and_greedy();

    let (swarm, client, mut session, _) = colluders(false).await;
    let range0 = swarm.range(0);
    let findings = session.trust_findings().join("\n");
    assert!(session.referees().is_empty());
    for colluder in &range0[..2] {
        for state in receivers_state(&swarm, colluder) {
            assert_ne!(state, Some(TrustState::Banned), "{findings}");
        }
    }
    for state in receivers_state(&swarm, &range0[2]) {
        assert_eq!(state, Some(TrustState::Banned), "{findings}");
    }
    session.close().await;
    client.shutdown().await;
    swarm.shutdown().await;

    let (swarm, client, mut session, tokens) = colluders(true).await;
    let range0 = swarm.range(0);
    let referee = range0[3].id();
    let findings = session.trust_findings().join("\n");
    assert_eq!(session.referees(), &[Some(referee), None]);
    // Nothing trusted among the voters (the trusted node referees): a plain majority of
    // three, which the colluders would carry.
    assert_eq!(session.replicas()[0].len(), 4);
    assert_eq!(tokens, &expected[..4], "{findings}");
    for colluder in &range0[..2] {
        assert_eq!(
            state_of(&client, colluder),
            TrustState::Banned,
            "{findings}"
        );
        for state in receivers_state(&swarm, colluder) {
            assert_eq!(state, Some(TrustState::Banned), "{findings}");
        }
        let (_, reason) = standing_at(&swarm.range(1)[0], colluder).expect("standing");
        assert!(reason.contains("referee"), "{reason}");
    }
    for honest in &range0[2..] {
        assert_ne!(state_of(&client, honest), TrustState::Banned, "{findings}");
        for state in receivers_state(&swarm, honest) {
            assert_ne!(state, Some(TrustState::Banned), "{findings}");
        }
    }
    session.close().await;
    client.shutdown().await;
    swarm.shutdown().await;
}

/// No majority over the network: with the operator's trusted node in the vote, the
/// one-probation rule gives range 0 two voters, one of them lying (noise): no majority. The
/// client opens the session again audited (the trusted node now referees three unproven
/// voters, two of which lie differently: noise and zeros) and replays the prompt from
/// position 0; the referee settles every vote, both liars are banned on its evidence, and
/// the text is the honest one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vote_without_a_majority_is_replayed_from_position_zero_under_a_referee() {
    let (prompt, expected) = smollm2_prompt_and_greedy();
    let (noise, zeros) = (Some(Behaviour::Noise), Some(Behaviour::Zeros));
    let swarm = Replicas::start_cast([vec![noise, zeros, None, None], vec![None; 3]], false).await;
    let range0 = swarm.range(0);
    let trusted = range0[3].id();
    let client = new_client().await;
    client.trust(trusted);
    for node in &swarm.nodes {
        node.trust(trusted);
    }
    let mut session = open_on(&client, &swarm.peers(), &swarm.model_id, 3, &prompt).await;
    let voters: Vec<_> = session.replicas()[0].iter().map(|h| h.node).collect();
    assert_eq!(
        voters,
        vec![range0[0].id(), trusted],
        "one unproven voter beside the trusted"
    );
    let mut tokens = match session.step(&prompt, 0).await {
        Ok(t) => vec![t],
        Err(e) => panic!("{e}\n{}", session.trust_findings().join("\n")),
    };
    while tokens.len() < 4 {
        let at = prompt.len() + tokens.len() - 1;
        let next = session.step(&tokens[tokens.len() - 1..], at).await;
        tokens.push(next.expect("decode step"));
    }
    let findings = session.trust_findings().join("\n");
    assert_eq!(tokens, &expected[..4], "{findings}");
    assert!(
        findings.contains("replayed on an audited session"),
        "{findings}"
    );
    assert_eq!(session.referees(), &[Some(trusted), None], "{findings}");
    for liar in &range0[..2] {
        assert_eq!(state_of(&client, liar), TrustState::Banned, "{findings}");
    }
    for honest in &range0[2..] {
        assert_ne!(state_of(&client, honest), TrustState::Banned, "{findings}");
    }
    session.close().await;
    client.shutdown().await;
    swarm.shutdown().await;
}

/// A vote that splits mid-session in either range: a trusted holder outside the vote joins
/// as that range's referee and replays positions 0..p from the predecessor's kept hidden
/// states (the client's tokens for range 0, a trusted range-0 replica's sent states for
/// range 1); nothing else recomputes the prefix, the retried step is decided by the
/// referees (range 1's by the client), both liars are banned and the text is the reference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_vote_gets_a_referee_that_replays_the_prefix_from_kept_hidden_states() {
    referees_join_split_votes([true, true]).await;
}

/// The same in three ranges, with the splits in the first two: range 0's split is reported
/// by range 1 while range 2 never hears of the step, so the client must end the step on
/// those reports (waiting for range 2 would end at the deadline, blaming range 2), and
/// range 1's referee is judged by range 2's nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_votes_in_the_first_two_of_three_ranges_get_referees() {
    referees_join_split_votes([true, true, false]).await;
}

/// `N` ranges; each range `r` with `liars[r]` has an unproven replica that starts lying
/// after the first decode step beside two trusted ones (one votes, one stays outside the
/// k = 2 vote); the other ranges have three unproven replicas.
async fn referees_join_split_votes<const N: usize>(liars: [bool; N]) {
    let (prompt, expected) = smollm2_prompt_and_greedy();
    let swarm = Replicas::start_cast([(); N].map(|_| vec![None; 3]), false).await;
    let ranges: Vec<Vec<Node>> = (0..N).map(|r| swarm.range(r)).collect();
    let client = new_client().await;
    for (range, _) in ranges.iter().zip(liars).filter(|(_, liar)| *liar) {
        for trusted in &range[1..] {
            client.trust(trusted.id());
            for node in &swarm.nodes {
                node.trust(trusted.id());
            }
        }
    }
    let mut session = open_on(&client, &swarm.peers(), &swarm.model_id, 2, &prompt).await;
    for (r, range) in ranges.iter().enumerate() {
        let voters: Vec<_> = session.replicas()[r].iter().map(|h| h.node).collect();
        let want: Vec<_> = range[..if liars[r] { 2 } else { 3 }]
            .iter()
            .map(|n| n.id())
            .collect();
        assert_eq!(voters, want, "range {r}");
    }
    assert!(session.referees().iter().all(Option::is_none));
    let mut tokens = vec![session.step(&prompt, 0).await.expect("prompt step")];
    decode_one(&mut session, &mut tokens, prompt.len()).await;
    for (range, _) in ranges.iter().zip(liars).filter(|(_, liar)| *liar) {
        range[0].set_behaviour(Some(Behaviour::Noise));
    }
    let split_at = prompt.len() + tokens.len() - 1;
    while tokens.len() < 4 {
        decode_one(&mut session, &mut tokens, prompt.len()).await;
    }
    let findings = session.trust_findings().join("\n");
    assert_eq!(tokens, &expected[..4], "{findings}");
    // Every step ended on ballots or reports, none at its deadline.
    assert!(!findings.contains("deadline"), "{findings}");
    let referees: Vec<_> = (0..N)
        .map(|r| liars[r].then(|| ranges[r][2].id()))
        .collect();
    assert_eq!(session.referees(), &referees[..], "{findings}");
    // Where each referee's catch-up came from: the client, or range r-1's trusted voter.
    let sources: Vec<Option<&Node>> = (0..N)
        .filter(|&r| liars[r])
        .map(|r| r.checked_sub(1).map(|b| &ranges[b][1]))
        .collect();
    for source in &sources {
        let from = match source {
            None => "the client's tokens".to_string(),
            Some(n) => format!("{}'s kept hidden states", n.id().fmt_short()),
        };
        let line = format!("positions 0..{split_at} replayed from {from}");
        assert!(findings.contains(&line), "{line}\n{findings}");
    }
    // Only the referees computed the prefix again, once each; the sources re-sent it.
    for node in &swarm.nodes {
        let stats = node.stats();
        let referee = referees.contains(&Some(node.id()));
        assert_eq!(stats.fills, referee as u64, "fills of {}", node.id());
        let source = sources.iter().flatten().any(|s| s.id() == node.id());
        assert_eq!(stats.replays, source as u64, "replays of {}", node.id());
    }
    for (r, range) in ranges.iter().enumerate() {
        for (i, node) in range.iter().enumerate() {
            let banned = state_of(&client, node) == TrustState::Banned;
            assert_eq!(
                banned,
                liars[r] && i == 0,
                "range {r}, replica {i}\n{findings}"
            );
        }
    }
    session.close().await;
    client.shutdown().await;
    swarm.shutdown().await;
}

/// One greedy decode step after `tokens` (the prompt was `prompt_len` long).
async fn decode_one(session: &mut RemoteSession, tokens: &mut Vec<u32>, prompt_len: usize) {
    let at = prompt_len + tokens.len() - 1;
    let last = tokens[tokens.len() - 1];
    match session.step(&[last], at).await {
        Ok(t) => tokens.push(t),
        Err(e) => panic!("{e}\n{}", session.trust_findings().join("\n")),
    }
}
