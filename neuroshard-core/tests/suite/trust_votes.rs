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
    client
        .open_replicated(
            &peers_of(swarm),
            30,
            &swarm.model_id,
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
