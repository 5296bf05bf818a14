//! Three nodes on 127.0.0.1 (in one process) serve SmolLM2 layers 0-10, 10-20, 20-30; a client
//! generates through the chained relay (client -> A -> B -> C -> client, f16 frames) and gets the
//! reference tokens. Security: a hidden-state frame from a node that is not the hop's
//! predecessor is refused, and a session-open not signed by the client is refused.

use crate::common::*;
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
    spawn_nodes_with(EngineOptions::default()).await
}

async fn spawn_nodes_with(options: EngineOptions) -> Vec<Node> {
    let path = smollm2();
    let mut nodes = Vec::new();
    for range in [0..10, 10..20, 20..30] {
        let engine = Arc::new(ShardEngine::load(&path, range, options.clone()).expect("load"));
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
    let steps = reference_text_through(&nodes).await;
    // Prefill + one step per generated token after the first.
    assert_eq!(steps, smollm2_prompt_and_greedy().1.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_in_chunks_pipelines_through_three_nodes() {
    // Chunks of 2 positions: the prompt crosses every hop as several frames on one stream, and
    // the last hop samples only after the last chunk; the text is still the reference.
    let nodes = spawn_nodes_with(EngineOptions {
        prefill_chunk: 2,
        ..EngineOptions::default()
    })
    .await;
    let steps = reference_text_through(&nodes).await;
    let (prompt, expected) = smollm2_prompt_and_greedy();
    assert!(prompt.len() > 4, "a prompt of several chunks");
    assert_eq!(
        steps,
        (prompt.len().div_ceil(2) + expected.len() - 1) as u64
    );
}

/// Generates the reference continuation over `nodes` (one route through all of them), checks
/// the text, closes the session, shuts everything down; returns the steps each hop computed.
async fn reference_text_through(nodes: &[Node]) -> u64 {
    let client = new_client().await;
    let (prompt, expected) = smollm2_prompt_and_greedy();
    let mid = model_id(nodes[0].engine());
    let session = client
        .open_session(
            route(nodes),
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
    let steps = nodes[0].stats().steps;
    for node in nodes {
        assert_eq!(
            node.stats().steps,
            steps,
            "every hop computed every chunk: {node:?}"
        );
        assert_eq!(node.engine().stats().sessions_open, 1);
    }
    session.close().await;
    for node in nodes {
        assert_eq!(
            node.engine().stats().sessions_open,
            0,
            "session closed on every hop"
        );
    }
    client.shutdown().await;
    for n in nodes {
        n.shutdown().await;
    }
    steps
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
        nonce: 77,
        handover: None,
        return_logits: false,
        adapter: None,
        replicas: Vec::new(),
        referees: Vec::new(),
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
            // Newer than any attempt: only the sender makes it refused.
            attempt: u64::MAX,
            start_pos: 0,
            step_end: 2,
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
