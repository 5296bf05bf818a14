//! Three nodes on 127.0.0.1 (in one process) serve SmolLM2 layers 0-10, 10-20, 20-30; a client
//! generates through the chained relay (client -> A -> B -> C -> client, f16 frames) and gets the
//! reference tokens. Security: a hidden-state frame from a node that is not the hop's
//! predecessor is refused, and a session-open not signed by the client is refused.

mod common;

use common::*;
use neuroshard_core::internals::BlockingSession;
use neuroshard_core::internals::{write_message, Message, SessionOpen, INFER_ALPN};
use neuroshard_core::net::endpoint::EndpointOptions;
use neuroshard_core::wire::{write_frame, Codec, FrameMeta};
use neuroshard_core::RouteHop;
use neuroshard_core::{
    generate, EngineOptions, GenerationConfig, SamplingParams, ShardEngine, Tokenizer,
};
use neuroshard_core::{model_id, Node};
use std::sync::Arc;
use std::time::Duration;

async fn spawn_nodes() -> Vec<Node> {
    let path = smollm2();
    let mut nodes = Vec::new();
    for range in [0..10, 10..20, 20..30] {
        let engine =
            Arc::new(ShardEngine::load(&path, range, EngineOptions::default()).expect("load"));
        nodes.push(
            Node::spawn(
                engine,
                iroh::SecretKey::generate(),
                EndpointOptions::default(),
            )
            .await
            .expect("node"),
        );
    }
    nodes
}

fn route(nodes: &[Node]) -> Vec<RouteHop> {
    nodes
        .iter()
        .map(|n| {
            let layers = n.engine().layers();
            RouteHop {
                node: n.id(),
                layers: layers.start as u32..layers.end as u32,
                addrs: n.addr().ip_addrs().copied().collect(),
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_generate_the_reference_text() {
    let nodes = spawn_nodes().await;
    let client = new_client().await;
    let (prompt, expected) = smollm2_prompt_and_greedy();
    let mid = model_id(nodes[0].engine());
    let session = client
        .open_session(
            route(&nodes),
            &mid,
            Codec::F16,
            SamplingParams::greedy(),
            prompt.clone(),
        )
        .await
        .expect("open");
    let tokenizer = Tokenizer::for_model(nodes[0].engine().weight_file()).expect("tokenizer");
    let handle = tokio::runtime::Handle::current();
    let max_tokens = expected.len();
    let (out, mut session) = tokio::task::spawn_blocking(move || {
        let mut backend = BlockingSession::new(session, handle, 8192);
        let config = GenerationConfig {
            max_tokens,
            ignore_eos: true,
            ..GenerationConfig::default()
        };
        let out = generate(
            &mut backend,
            Some(&tokenizer),
            &prompt,
            &config,
            &mut |_| {},
        )
        .expect("generate");
        (out, backend.session)
    })
    .await
    .expect("join");
    assert_eq!(out.tokens, expected);
    let reference = reference_json("smollm2");
    assert_eq!(out.text, reference["greedy_text"].as_str().expect("text"));
    for node in &nodes {
        // Prefill + one step per generated token after the first.
        assert_eq!(node.stats().steps, expected.len() as u64, "{node:?}");
        assert_eq!(node.engine().stats().sessions_open, 1);
    }
    session.close().await;
    for node in &nodes {
        assert_eq!(
            node.engine().stats().sessions_open,
            0,
            "session closed on every hop"
        );
    }
    client.shutdown().await;
    for n in &nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_from_a_non_predecessor_and_unsigned_opens_are_refused() {
    let nodes = spawn_nodes().await;
    let client = new_client().await;
    let mid = model_id(nodes[0].engine());
    let hops = route(&nodes);

    // A session-open signed by another key than the client it names.
    let open = SessionOpen {
        session: 77,
        client: client.id(),
        model_id: mid.clone(),
        route: hops.clone(),
        codec: Codec::F16 as u8,
        sampling: SamplingParams::greedy(),
        prompt: vec![1, 2],
        timestamp_ms: 0,
        handover: None,
        return_logits: false,
    };
    let err = client
        .open_signed(open, &iroh::SecretKey::generate())
        .await
        .unwrap_err();
    assert!(
        matches!(err, neuroshard_core::net::NetError::HopFailed { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("bad signature"), "{err}");
    assert_eq!(nodes[0].engine().stats().sessions_open, 0);

    // A valid session; then an intruder (not hop A) sends hop B a hidden state for it.
    let mut session = client
        .open_session(
            hops.clone(),
            &mid,
            Codec::F16,
            SamplingParams::greedy(),
            vec![504, 1774],
        )
        .await
        .expect("open");
    let intruder = neuroshard_core::net::endpoint::bind(
        iroh::SecretKey::generate(),
        &EndpointOptions::default(),
    )
    .await
    .expect("intruder");
    let b = &hops[1];
    let addr = b
        .addrs
        .iter()
        .fold(iroh::EndpointAddr::new(b.node), |a, s| a.with_ip_addr(*s));
    let conn = intruder.connect(addr, INFER_ALPN).await.expect("connect");
    let mut send = conn.open_uni().await.expect("uni");
    write_message(
        &mut send,
        &Message::Hidden {
            session: session.id(),
            start_pos: 0,
        },
    )
    .await
    .expect("msg");
    let hidden = candle_core::Tensor::zeros(
        (1, 2, 576),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .expect("t");
    // B may refuse after reading the message and stop the stream before the frame is written.
    let _ = write_frame(&mut send, &hidden, Codec::F16, FrameMeta::default(), false).await;
    let _ = send.finish();
    // Wait (bounded) until B has processed and refused it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while nodes[1].stats().rejected == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "B never refused the intruder's frame"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        nodes[1].stats().steps,
        0,
        "B computed nothing for the intruder"
    );
    assert_eq!(nodes[1].engine().session_len(session.id()).expect("len"), 0);
    // The real session still works afterwards.
    let token = session.step(&[504, 1774], 0).await.expect("step");
    assert!(token < 49152);
    session.close().await;
    intruder.close().await;
    client.shutdown().await;
    for n in &nodes {
        n.shutdown().await;
    }
}
