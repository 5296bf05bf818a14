//! Swarm robustness on 127.0.0.1: 8 concurrent clients x 32 tokens through one 3-node route
//! (all outputs equal the single-process ones, decode steps batched on the nodes, no session
//! left afterwards), and hostile input
//! from peers (garbage, unknown session, huge length prefix, out-of-vocabulary tokens) answered
//! or dropped while the node keeps serving.

use crate::common::*;
use neuroshard_core::internals::BlockingSession;
use neuroshard_core::internals::{write_message, Message, INFER_ALPN};
use neuroshard_core::net::endpoint::{bind, EndpointOptions};
use neuroshard_core::net::NetError;
use neuroshard_core::wire::Codec;
use neuroshard_core::Client;
use neuroshard_core::LocalPipeline;
use neuroshard_core::LocalSwarm;
use neuroshard_core::{generate, ComputeMode, EngineOptions, GenerationConfig, SamplingParams};
use std::time::Duration;

fn fast() -> EngineOptions {
    EngineOptions {
        mode: ComputeMode::Fast,
        ..EngineOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_clients_get_correct_text_and_leave_no_session() {
    let swarm = LocalSwarm::start(&smollm2(), 3, 1, EngineOptions::default(), &mut |_| {})
        .await
        .expect("swarm");
    let tokenizer = swarm.tokenizer().clone();
    let config = GenerationConfig {
        max_tokens: 32,
        ignore_eos: true,
        ..GenerationConfig::default()
    };
    // Single-process references (same mode, same greedy decoding).
    let expected: Vec<Vec<u32>> = {
        let (tokenizer, config) = (tokenizer.clone(), config.clone());
        tokio::task::spawn_blocking(move || {
            let mut local =
                LocalPipeline::load(smollm2(), &[], EngineOptions::default()).expect("local");
            EIGHT_PROMPTS
                .iter()
                .map(|p| {
                    local.reset().expect("reset");
                    let ids = tokenizer.encode(p).expect("enc");
                    generate(&mut local, None, &ids, &config, &mut |_| {})
                        .expect("gen")
                        .tokens
                })
                .collect()
        })
        .await
        .expect("join")
    };
    let route = swarm.plan().expect("route");
    let mut tasks = Vec::new();
    for (i, prompt) in EIGHT_PROMPTS.iter().enumerate() {
        let ids = tokenizer.encode(prompt).expect("enc");
        let (route, model_id, config) = (route.clone(), swarm.model_id.clone(), config.clone());
        tasks.push(tokio::spawn(async move {
            let client = new_client().await;
            let session = client
                .open_session(
                    route,
                    &model_id,
                    Codec::F16,
                    SamplingParams::greedy(),
                    ids.clone(),
                )
                .await
                .expect("open");
            let handle = tokio::runtime::Handle::current();
            let (tokens, mut session) = tokio::task::spawn_blocking(move || {
                let mut backend = BlockingSession::new(session, handle, 8192);
                let out =
                    generate(&mut backend, None, &ids, &config, &mut |_| {}).expect("generate");
                (out.tokens, backend.session)
            })
            .await
            .expect("join");
            session.close().await;
            client.shutdown().await;
            (i, tokens)
        }));
    }
    let all = tokio::time::timeout(Duration::from_secs(240), async {
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("task"));
        }
        out
    })
    .await
    .expect("8 clients finish in time");
    for (i, tokens) in all {
        assert_eq!(tokens, expected[i], "client {i} ({:?})", EIGHT_PROMPTS[i]);
    }
    for node in &swarm.nodes {
        assert_eq!(
            node.engine().stats().sessions_open,
            0,
            "{node:?} kept a session"
        );
        assert_eq!(node.stats().steps, 8 * 32, "{node:?}");
    }
    // Eight sessions decoding at once: their steps met on the nodes and ran as batches (each
    // still equal to its single-process text, checked above). The nodes share this process's
    // cores, so a node's batch holds on for the sessions another node is computing, and the
    // sessions merge into large batches instead of small groups chasing each other round the
    // route (`node/batcher.rs`).
    let (batches, batched) = swarm.nodes.iter().fold((0, 0), |(b, s), n| {
        let stats = n.engine().stats();
        (b + stats.decode_batches, s + stats.batched_steps)
    });
    let per_batch = batched as f64 / batches.max(1) as f64;
    eprintln!("8 clients over 3 in-process nodes: {per_batch:.2} decode steps per batch");
    assert!(
        per_batch >= 5.0,
        "8 concurrent sessions formed batches of {per_batch:.2} steps on average"
    );
    swarm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers_get_refused_and_the_node_keeps_serving() {
    let swarm = LocalSwarm::start(&smollm2(), 3, 1, fast(), &mut |_| {})
        .await
        .expect("swarm");
    let route = swarm.plan().expect("route");
    let target = &route[1];
    let attacker = bind(iroh::SecretKey::generate(), &EndpointOptions::default())
        .await
        .expect("attacker");
    let addr = target
        .addrs
        .iter()
        .fold(iroh::EndpointAddr::new(target.node), |a, s| {
            a.with_ip_addr(*s)
        });
    let conn = attacker.connect(addr, INFER_ALPN).await.expect("connect");
    // Garbage on a data stream; a 4 GiB length prefix; a hidden state for an unknown session.
    let mut garbage = conn.open_uni().await.expect("uni");
    let _ = garbage.write_all(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3]).await;
    let _ = garbage.finish();
    let mut huge = conn.open_uni().await.expect("uni");
    let _ = huge.write_all(&u32::MAX.to_le_bytes()).await;
    let _ = huge.finish();
    let mut unknown = conn.open_uni().await.expect("uni");
    let _ = write_message(
        &mut unknown,
        &Message::Hidden {
            session: 424242,
            attempt: 1,
            start_pos: 0,
            step_end: 1,
        },
    )
    .await;
    let _ = unknown.finish();
    // A garbage request gets an error reply, not a hang.
    let (mut send, mut recv) = conn.open_bi().await.expect("bi");
    // Variant 0xff does not exist.
    let _ = send.write_all(&[4, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]).await;
    let _ = send.finish();
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        neuroshard_core::internals::read_message(&mut recv),
    )
    .await
    .expect("reply in time")
    .expect("a reply");
    assert!(matches!(reply, Message::Error { .. }), "{reply:?}");
    let node = swarm
        .nodes
        .iter()
        .find(|n| n.id() == target.node)
        .expect("node");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while node.stats().rejected < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node did not refuse the hostile streams"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Out-of-vocabulary tokens from a real client: a typed error naming the first hop.
    let client = new_client().await;
    let mut session = client
        .open_session(
            route.clone(),
            &swarm.model_id,
            Codec::F16,
            SamplingParams::greedy(),
            vec![1],
        )
        .await
        .expect("open");
    session.step_timeout = Duration::from_secs(10);
    // Recovery and hand-over requests for that session from a node that is neither its client
    // nor the hop's predecessor, nor named in a hand-over: refused with an error reply.
    let sid = session.id();
    let forged = [
        Message::Replay {
            session: sid,
            upto: 1,
            through: 2,
        },
        Message::Fill {
            session: sid,
            start_pos: 0,
            through: 2,
            tokens: Vec::new(),
        },
        Message::Handover {
            session: sid,
            to: route[0].clone(),
        },
        Message::Import {
            session: sid,
            layers: route[1].layers.clone(),
            positions: 1,
            sent_rows: 0,
        },
        Message::Close { session: sid },
    ];
    for msg in forged {
        let (mut send, mut recv) = conn.open_bi().await.expect("bi");
        write_message(&mut send, &msg).await.expect("send");
        let _ = send.finish();
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            neuroshard_core::internals::read_message(&mut recv),
        )
        .await
        .expect("reply in time")
        .expect("a reply");
        assert!(matches!(reply, Message::Error { .. }), "{msg:?}: {reply:?}");
    }
    assert_eq!(node.stats().sessions_open, 1, "the session survived");
    assert_eq!(node.stats().handovers_in, 0);
    let err = session.step(&[999_999], 0).await.unwrap_err();
    assert!(
        matches!(err, NetError::HopFailed { node: Some(n), .. } if n == route[0].node),
        "{err}"
    );
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    // The same session and the nodes still work.
    let reference = reference_json("smollm2");
    let token = session
        .step(&ids_from_json(&reference["input_ids"]), 0)
        .await
        .expect("step");
    assert_eq!(token, ids_from_json(&reference["greedy_ids"])[0]);
    session.close().await;
    client.shutdown().await;
    attacker.close().await;
    swarm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_node_refuses_clearly_and_idle_sessions_expire() {
    let options = EngineOptions {
        max_sessions: 1,
        session_idle_timeout: Duration::from_millis(300),
        ..fast()
    };
    let swarm = LocalSwarm::start(&smollm2(), 1, 1, options, &mut |_| {})
        .await
        .expect("swarm");
    let route = swarm.plan().expect("route");
    let node = swarm.nodes[0].clone();
    let open = |client: Client| {
        let (route, model) = (route.clone(), swarm.model_id.clone());
        async move {
            client
                .open_session(route, &model, Codec::F16, SamplingParams::greedy(), vec![1])
                .await
        }
    };
    let a = new_client().await;
    let b = new_client().await;
    let _held = open(a.clone()).await.expect("first session");
    let err = open(b.clone()).await.unwrap_err();
    assert!(
        matches!(err, NetError::HopFailed { node: Some(n), .. } if n == node.id()),
        "{err}"
    );
    assert!(err.to_string().contains("full"), "{err}");
    // The first client vanishes without closing: its session expires and frees the slot.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while node.stats().sessions_open > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "idle session never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(node.engine().stats().sessions_open, 0);
    let mut session = open(b.clone()).await.expect("slot free again");
    session.close().await;
    a.shutdown().await;
    b.shutdown().await;
    swarm.shutdown().await;
}
