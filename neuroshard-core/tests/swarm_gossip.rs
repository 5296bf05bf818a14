//! Gossip discovery on 127.0.0.1: nodes joining through any peer (a chain A <- B <- C) appear
//! in every node's PeerSet; a client learns the swarm and the tokenizer from one entry node and
//! generates; a node that stops announcing disappears after its announcements expire. Waits are
//! wait-until loops with deadlines.

mod common;

use common::*;
use neuroshard_core::client::{BlockingSession, Client};
use neuroshard_core::net::endpoint::EndpointOptions;
use neuroshard_core::net::proto::RouteHop;
use neuroshard_core::net::RouteOptions;
use neuroshard_core::node::{Node, NodeOptions};
use neuroshard_core::wire::Codec;
use neuroshard_core::{
    generate, ComputeMode, EngineOptions, GenerationConfig, SamplingParams, ShardEngine, Tokenizer,
};
use std::sync::Arc;
use std::time::Duration;

async fn wait_until(what: &str, deadline: Duration, mut check: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + deadline;
    while !check() {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_find_each_other_and_forget_the_dead() {
    let path = smollm2();
    let options = |bootstrap| NodeOptions {
        bootstrap,
        announce_every: Duration::from_millis(300),
        announce_ttl: Duration::from_millis(1500),
        ..NodeOptions::default()
    };
    let mut nodes: Vec<Node> = Vec::new();
    for range in [0..10, 10..20, 20..30] {
        let engine = ShardEngine::load(
            &path,
            range,
            EngineOptions {
                mode: ComputeMode::Fast,
                ..EngineOptions::default()
            },
        )
        .expect("load");
        // Each node knows only the previous one.
        let bootstrap = nodes.last().map(|n| vec![n.addr()]).unwrap_or_default();
        nodes.push(
            Node::spawn_with(
                Arc::new(engine),
                iroh::SecretKey::generate(),
                options(bootstrap),
            )
            .await
            .expect("node"),
        );
    }
    wait_until("every node sees all three", Duration::from_secs(20), || {
        nodes.iter().all(|n| n.peers().len() == 3)
    })
    .await;

    // A client with no model file: model info and peers from the first node only.
    let client = Client::new(iroh::SecretKey::generate(), EndpointOptions::default())
        .await
        .expect("client");
    let entry = nodes[2].addr();
    let info = client.fetch_model_info(&entry).await.expect("model info");
    assert_eq!(info.layers, 30);
    let tokenizer = Tokenizer::import(&info.tokenizer).expect("tokenizer");
    let reference = reference_json("smollm2");
    let prompt = tokenizer
        .encode(reference["prompt"].as_str().expect("prompt"))
        .expect("enc");
    assert_eq!(prompt, ids_from_json(&reference["input_ids"]));
    let peers = client
        .fetch_peers(&entry, &info.model_id)
        .await
        .expect("peers");
    assert_eq!(peers.len(), 3);
    let route: Vec<RouteHop> = peers
        .plan_route(30, now_ms(), &RouteOptions::default())
        .expect("route")
        .to_hops();
    assert_eq!(route.len(), 3);
    let session = client
        .open_session(
            route,
            &info.model_id,
            Codec::F16,
            SamplingParams::greedy(),
            prompt.clone(),
        )
        .await
        .expect("open");
    let handle = tokio::runtime::Handle::current();
    let (out, mut session) = tokio::task::spawn_blocking(move || {
        let mut backend = BlockingSession::new(session, handle, info.context_len as usize);
        let config = GenerationConfig {
            max_tokens: 24,
            ignore_eos: true,
            ..GenerationConfig::default()
        };
        (
            generate(
                &mut backend,
                Some(&tokenizer),
                &prompt,
                &config,
                &mut |_| {},
            )
            .expect("generate"),
            backend.session,
        )
    })
    .await
    .expect("join");
    // Fast mode agrees with exact on this prompt (tests/smollm2_reference.rs).
    assert_eq!(out.text, reference["greedy_text"].as_str().expect("text"));
    session.close().await;

    // The last node dies: the others forget it once its announcement expires.
    let dead = nodes.pop().expect("node");
    dead.shutdown().await;
    wait_until(
        "the dead node expires everywhere",
        Duration::from_secs(20),
        || {
            nodes
                .iter()
                .all(|n| n.peers().get(&dead.id()).is_none() && n.peers().len() == 2)
        },
    )
    .await;
    client.shutdown().await;
    for n in &nodes {
        n.shutdown().await;
    }
}
