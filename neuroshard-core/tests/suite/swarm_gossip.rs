//! Gossip discovery on 127.0.0.1: nodes joining through any peer (a chain A <- B <- C) appear
//! in every node's PeerSet; a client learns the swarm and the tokenizer from one entry node and
//! generates; a node that stops announcing disappears after its announcements expire. Waits are
//! wait-until loops with deadlines.

use crate::common::*;
use neuroshard_core::internals::BlockingSession;
use neuroshard_core::net::endpoint::resolve_peer_addr;
use neuroshard_core::net::endpoint::EndpointOptions;
use neuroshard_core::net::{now_ms, NetError, RouteOptions};
use neuroshard_core::wire::Codec;
use neuroshard_core::RouteHop;
use neuroshard_core::{
    generate, ComputeMode, EngineOptions, GenerationConfig, SamplingParams, ShardEngine, Tokenizer,
};
use neuroshard_core::{Node, NodeOptions};
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
    let client = new_client().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_host_port_resolves_to_the_node_id() {
    let engine = ShardEngine::load(smollm2(), 0..1, EngineOptions::default()).expect("engine");
    let node = Node::spawn(
        Arc::new(engine),
        iroh::SecretKey::generate(),
        EndpointOptions::default(),
    )
    .await
    .expect("node");
    let sock = *node.addr().ip_addrs().next().expect("bound socket");
    let plain = sock.to_string();
    let resolved = tokio::task::spawn_blocking(move || resolve_peer_addr(&plain))
        .await
        .expect("task")
        .expect("resolve");
    assert_eq!(resolved.id, node.id());
    assert!(resolved.ip_addrs().any(|a| *a == sock));
    node.shutdown().await;
    // Nothing answers there any more: a typed error, not a hang.
    let plain = sock.to_string();
    let gone = tokio::task::spawn_blocking(move || resolve_peer_addr(&plain))
        .await
        .expect("task");
    assert!(matches!(gone, Err(NetError::Io(_))), "{gone:?}");
    let garbage = tokio::task::spawn_blocking(|| resolve_peer_addr("not an address"))
        .await
        .expect("task");
    assert!(
        matches!(garbage, Err(NetError::Malformed(_))),
        "{garbage:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_mdns_find_each_other_without_peers() {
    let options = || NodeOptions {
        endpoint: EndpointOptions {
            mdns: true,
            ..EndpointOptions::default()
        },
        ..NodeOptions::default()
    };
    let mut nodes = Vec::new();
    for layers in [0..15, 15..30] {
        let engine =
            ShardEngine::load(smollm2(), layers, EngineOptions::default()).expect("engine");
        nodes.push(
            Node::spawn_with(Arc::new(engine), iroh::SecretKey::generate(), options())
                .await
                .expect("node"),
        );
    }
    let ids: Vec<_> = nodes.iter().map(|n| n.id()).collect();
    wait_until("both nodes see each other", Duration::from_secs(30), || {
        nodes.iter().all(|n| {
            let peers = n.peers();
            ids.iter()
                .all(|id| peers.iter().any(|(p, e)| p == id && e.usable(now_ms())))
        })
    })
    .await;
    for n in &nodes {
        n.shutdown().await;
    }
}
