//! Hostile peers on 127.0.0.1 (real nodes, real client): route members that forge tokens or
//! blame an honest successor, replayed and malformed session-opens, and an entry node that
//! serves absurd model info. Each attack gets a typed refusal or is routed around, and the
//! honest client still gets the reference text.

use crate::common::*;
use neuroshard_core::internals::{Message, Misbehaviour, SessionOpen, SignedOpen, INFER_ALPN};
use neuroshard_core::net::endpoint::{bind, EndpointOptions};
use neuroshard_core::net::{now_ms, ModelInfo, NetError, Reason, RouteHop};
use neuroshard_core::wire::Codec;
use neuroshard_core::{GenerationConfig, SamplingParams, Tokenizer, WeightFile};
use std::time::Duration;

fn greedy_config(tokens: usize) -> GenerationConfig {
    GenerationConfig {
        max_tokens: tokens,
        ignore_eos: true,
        ..GenerationConfig::default()
    }
}

/// `tokens` greedy tokens from `prompt` through the swarm, with the session's recovery stats.
async fn greedy_generation(
    swarm: &neuroshard_core::LocalSwarm,
    client: &neuroshard_core::Client,
    prompt: &[u32],
    tokens: usize,
) -> neuroshard_core::Result<(
    neuroshard_core::GenerationOutput,
    neuroshard_core::SessionStats,
)> {
    swarm
        .generate_with_stats(
            client,
            prompt.to_vec(),
            greedy_config(tokens),
            Codec::F16,
            Box::new(|_| {}),
        )
        .await
}

/// A node serving every SmolLM2 layer with the options `options` builds from its engine, with
/// its one-hop route and model id.
pub(crate) async fn whole_model_node(
    options: impl FnOnce(&neuroshard_core::ShardEngine) -> neuroshard_core::NodeOptions,
) -> (neuroshard_core::Node, Vec<RouteHop>, String) {
    let engine = neuroshard_core::ShardEngine::load(
        smollm2(),
        0..30,
        neuroshard_core::EngineOptions::default(),
    )
    .expect("load");
    let options = options(&engine);
    let node = neuroshard_core::Node::spawn_with(
        std::sync::Arc::new(engine),
        iroh::SecretKey::generate(),
        options,
    )
    .await
    .expect("node");
    let route = vec![RouteHop {
        node: node.id(),
        layers: 0..30,
        addrs: node.addr().ip_addrs().copied().collect(),
    }];
    let model_id = neuroshard_core::model_id(node.engine());
    (node, route, model_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_members_can_neither_forge_tokens_nor_get_an_honest_node_excluded() {
    let swarm = smollm2_swarm(3, 2).await;
    let client = new_client().await;
    let (prompt, expected) = smollm2_prompt_and_greedy();
    let last_layers = swarm.nodes.iter().map(|n| n.engine().layers().end).max();

    // Every node that is not a last hop sends the client its own token for every step,
    // before the honest token can arrive. Only the last hop's tokens count.
    let forged = expected[0] + 1;
    for node in &swarm.nodes {
        if Some(node.engine().layers().end) != last_layers {
            node.misbehave(Misbehaviour::ForgeToken(forged));
        }
    }
    let (out, stats) = greedy_generation(&swarm, &client, &prompt, expected.len())
        .await
        .expect("generate despite forged tokens");
    assert_eq!(out.tokens, expected, "forged tokens steered the text");
    // Two forging hops per step; the prompt step and every decode step.
    assert!(
        stats.refused_reports >= expected.len() as u64,
        "forged tokens were not seen and refused: {stats:?}"
    );
    assert_eq!(stats.failovers, 0, "{stats:?}");
    for node in &swarm.nodes {
        node.misbehave(Misbehaviour::Honest);
    }

    // The planned middle hop drops every step and blames its healthy successor. The client
    // probes the blamed node, finds it alive, and routes around the accuser instead.
    let route = swarm.plan().expect("plan");
    let accuser = swarm
        .nodes
        .iter()
        .find(|n| n.id() == route[1].node)
        .cloned()
        .expect("middle hop");
    accuser.misbehave(Misbehaviour::BlameSuccessor);
    let accuser_steps = accuser.stats().steps;
    let (out, stats) = greedy_generation(&swarm, &client, &prompt, expected.len())
        .await
        .expect("generate despite a false blame");
    assert_eq!(out.tokens, expected, "text changed after the false blame");
    assert_eq!(stats.false_blames, 1, "{stats:?}");
    assert_eq!(stats.failovers, 1, "{stats:?}");
    assert_eq!(accuser.stats().steps, accuser_steps, "the accuser computed");
    client.shutdown().await;
    swarm.shutdown().await;
}

/// A greedy session with f16 frames that `client` opens on `route`.
pub(crate) async fn open_greedy(
    client: &neuroshard_core::Client,
    route: Vec<RouteHop>,
    model_id: &str,
) -> Result<neuroshard_core::RemoteSession, NetError> {
    client
        .open_session(
            route,
            model_id,
            Codec::F16,
            SamplingParams::greedy(),
            Vec::new(),
        )
        .await
}

/// One request on a fresh bi stream of `conn`, with a deadline.
pub(crate) async fn ask(conn: &iroh::endpoint::Connection, msg: &Message) -> Message {
    let (mut send, mut recv) = conn.open_bi().await.expect("bi");
    neuroshard_core::internals::write_message(&mut send, msg)
        .await
        .expect("send");
    let _ = send.finish();
    tokio::time::timeout(
        Duration::from_secs(10),
        neuroshard_core::internals::read_message(&mut recv),
    )
    .await
    .expect("a reply in time")
    .expect("a reply")
}

pub(crate) fn reason_of(reply: &Message) -> Reason {
    match reply {
        Message::Error { reason, .. } => *reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_stale_and_malformed_session_opens_get_typed_refusals() {
    let swarm = smollm2_swarm(3, 1).await;
    let route = swarm.plan().expect("plan");
    let target = route[1].clone();
    let key = iroh::SecretKey::generate();
    let endpoint = bind(key.clone(), &EndpointOptions::default())
        .await
        .expect("bind");
    let addr = target
        .addrs
        .iter()
        .fold(iroh::EndpointAddr::new(target.node), |a, s| {
            a.with_ip_addr(*s)
        });
    let conn = endpoint.connect(addr, INFER_ALPN).await.expect("connect");
    let open = |route: Vec<RouteHop>, timestamp_ms: u64, nonce: u64| SessionOpen {
        session: nonce,
        client: key.public(),
        model_id: swarm.model_id.clone(),
        route,
        codec: Codec::F16 as u8,
        sampling: SamplingParams::greedy(),
        prompt: vec![1],
        timestamp_ms,
        nonce,
        handover: None,
        return_logits: false,
        adapter: None,
        replicas: Vec::new(),
        referees: Vec::new(),
    };
    let signed = |o: &SessionOpen| Message::Open(SignedOpen::sign(o, &key).expect("sign"));

    let fresh = signed(&open(route.clone(), now_ms(), 1));
    assert!(matches!(ask(&conn, &fresh).await, Message::Ok));
    // The very same signed open again: a replay.
    assert_eq!(reason_of(&ask(&conn, &fresh).await), Reason::Replayed);
    // Signed two minutes ago, or a minute ahead: outside the window.
    let stale = signed(&open(route.clone(), now_ms() - 120_000, 2));
    assert_eq!(reason_of(&ask(&conn, &stale).await), Reason::Replayed);
    let ahead = signed(&open(route.clone(), now_ms() + 60_000, 3));
    assert_eq!(reason_of(&ask(&conn, &ahead).await), Reason::Replayed);
    // Routes that are not a contiguous chain over every layer.
    let mut gap = route.clone();
    gap[1].layers.start += 1;
    let mut short = route.clone();
    short.pop();
    let mut twice = route.clone();
    twice[0].node = target.node;
    for (name, bad) in [("gap", gap), ("short", short), ("twice", twice)] {
        let reply = ask(&conn, &signed(&open(bad, now_ms(), 4))).await;
        assert_eq!(reason_of(&reply), Reason::BadRoute, "{name}: {reply:?}");
    }
    // Another model; a signature by another key; someone else's open.
    let mut other_model = open(route.clone(), now_ms(), 5);
    other_model.model_id = "00ff00ff00ff00ff".into();
    assert_eq!(
        reason_of(&ask(&conn, &signed(&other_model)).await),
        Reason::WrongModel
    );
    let forged = SignedOpen::sign(
        &open(route.clone(), now_ms(), 6),
        &iroh::SecretKey::generate(),
    )
    .expect("sign");
    assert_eq!(
        reason_of(&ask(&conn, &Message::Open(forged)).await),
        Reason::BadSignature
    );
    let mut theirs = open(route.clone(), now_ms(), 7);
    let victim = iroh::SecretKey::generate();
    theirs.client = victim.public();
    let theirs = Message::Open(SignedOpen::sign(&theirs, &victim).expect("sign"));
    assert_eq!(reason_of(&ask(&conn, &theirs).await), Reason::NotAllowed);
    let node = swarm
        .nodes
        .iter()
        .find(|n| n.id() == target.node)
        .expect("node");
    assert_eq!(
        node.stats().sessions_open,
        1,
        "only the fresh open was taken"
    );
    let stats = node.stats();
    assert!(stats.rejected >= 9, "{stats:?}");
    assert_eq!(stats.refusals.get("replayed"), Some(&3), "{stats:?}");
    assert_eq!(stats.refusals.get("bad-route"), Some(&3), "{stats:?}");
    assert_eq!(stats.refusals.get("wrong-model"), Some(&1), "{stats:?}");

    // An honest client on the same nodes still gets the reference text.
    let client = new_client().await;
    let (prompt, expected) = smollm2_prompt_and_greedy();
    let out = swarm
        .generate(
            &client,
            prompt,
            greedy_config(expected.len()),
            Codec::F16,
            Box::new(|_| {}),
        )
        .await
        .expect("honest generation");
    assert_eq!(out.tokens, expected);
    client.shutdown().await;
    endpoint.close().await;
    swarm.shutdown().await;
}

/// An entry node that answers every request with `reply`.
async fn fake_entry(reply: Message) -> (iroh::Endpoint, iroh::EndpointAddr) {
    let options = EndpointOptions {
        alpns: vec![INFER_ALPN.to_vec()],
        ..EndpointOptions::default()
    };
    let endpoint = bind(iroh::SecretKey::generate(), &options)
        .await
        .expect("bind");
    let addr = neuroshard_core::net::endpoint::dial_addr(&endpoint);
    let server = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            let Ok(conn) = incoming.await else { continue };
            let reply = reply.clone();
            tokio::spawn(async move {
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let _ = neuroshard_core::internals::read_message(&mut recv).await;
                    let _ = neuroshard_core::internals::write_message(&mut send, &reply).await;
                    let _ = send.finish();
                }
            });
        }
    });
    (endpoint, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_model_info_and_hostile_templates_are_refused_before_use() {
    let file = WeightFile::open(smollm2()).expect("model");
    let tokenizer = Tokenizer::for_model(&file).expect("tokenizer");
    let identity = file.identity().expect("identity");
    let honest = ModelInfo {
        model_id: identity.id.clone(),
        layers: 30,
        context_len: 8192,
        tokenizer: tokenizer.export().expect("export"),
        commitment: identity.commitment,
    };
    let mut other_template = honest.tokenizer.clone();
    other_template.chat_template = Some("{{ messages[0].content }}".into());
    let client = new_client().await;
    let mut cases = Vec::new();
    for (name, info) in [
        (
            "u32::MAX layers",
            ModelInfo {
                layers: u32::MAX,
                ..honest.clone()
            },
        ),
        (
            "0 layers",
            ModelInfo {
                layers: 0,
                ..honest.clone()
            },
        ),
        (
            "huge context",
            ModelInfo {
                context_len: u32::MAX,
                ..honest.clone()
            },
        ),
        (
            "a template that is not the model's",
            ModelInfo {
                tokenizer: other_template,
                ..honest.clone()
            },
        ),
        (
            "odd model id",
            ModelInfo {
                model_id: "../../etc/passwd".into(),
                ..honest.clone()
            },
        ),
    ] {
        let (entry, addr) = fake_entry(Message::ModelInfo(info)).await;
        let err = client.fetch_model_info(&addr).await.unwrap_err();
        assert!(matches!(err, NetError::Malformed(_)), "{name}: {err}");
        cases.push(entry);
    }
    // An oversized template or tokenizer is refused at import, before any rendering.
    let mut big_template = honest.tokenizer.clone();
    big_template.chat_template = Some("x".repeat(300 << 10));
    let err = Tokenizer::import(&big_template).unwrap_err();
    assert!(err.to_string().contains("chat template"), "{err}");
    let mut many_eos = honest.tokenizer.clone();
    many_eos.eos_ids = (0..1000).collect();
    assert!(Tokenizer::import(&many_eos).is_err());
    // Templates that would loop for minutes or render gigabytes fail fast.
    let messages = [neuroshard_core::ChatMessage::new("user", "hi")];
    for (name, template) in [
        (
            "endless loop",
            "{% for i in range(1000000000) %}{% for j in range(1000000000) %}{% endfor %}{% endfor %}",
        ),
        (
            "huge output",
            "{% set x = 'a' * 90000000 %}{% for i in range(1000) %}{{ x }}{% endfor %}",
        ),
        ("deep recursion", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"),
    ] {
        let mut info = honest.tokenizer.clone();
        info.chat_template = Some(template.into());
        let hostile = Tokenizer::import(&info).expect("import");
        let started = std::time::Instant::now();
        let err = hostile.apply_chat_template(&messages, true).unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{name}: took {:?}",
            started.elapsed()
        );
        assert!(!err.to_string().is_empty(), "{name}");
    }
    // The honest template still renders.
    let text = tokenizer
        .apply_chat_template(&messages, true)
        .expect("honest template");
    assert!(text.contains("hi"));
    let honest_entry = fake_entry(Message::ModelInfo(honest.clone())).await;
    let info = client
        .fetch_model_info(&honest_entry.1)
        .await
        .expect("honest info");
    assert_eq!(info, honest);
    client.shutdown().await;
    for entry in cases {
        entry.close().await;
    }
    honest_entry.0.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_streams_are_cut_off_and_honest_steps_still_run() {
    let (node, route, model_id) = whole_model_node(|_| neuroshard_core::NodeOptions {
        read_deadline: Duration::from_millis(300),
        ..neuroshard_core::NodeOptions::default()
    })
    .await;
    let attacker = bind(iroh::SecretKey::generate(), &EndpointOptions::default())
        .await
        .expect("attacker");
    let conn = attacker
        .connect(node.addr(), INFER_ALPN)
        .await
        .expect("connect");
    // Streams that start a message and never finish it: two bytes of a length prefix each.
    let streams = 40;
    let mut held = Vec::new();
    for _ in 0..streams {
        let (mut send, recv) = conn.open_bi().await.expect("bi");
        send.write_all(&[8, 0]).await.expect("write");
        let mut uni = conn.open_uni().await.expect("uni");
        uni.write_all(&[8, 0]).await.expect("write");
        held.push((send, recv, uni));
    }
    // Every one is cut off after the deadline: the node counts it, and a request stream is
    // answered with a typed refusal.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while node.stats().rejected < 2 * streams {
        assert!(
            tokio::time::Instant::now() < deadline,
            "slow streams not cut off: {:?}",
            node.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        neuroshard_core::internals::read_message(&mut held[0].1),
    )
    .await
    .expect("a reply in time")
    .expect("a reply");
    assert_eq!(reason_of(&reply), Reason::OverLimit, "{reply:?}");
    assert_eq!(
        node.stats().refusals.get("over-limit"),
        Some(&streams),
        "{:?}",
        node.stats()
    );

    // An honest client still gets the reference token from the same node.
    let client = new_client().await;
    let mut session = open_greedy(&client, route, &model_id).await.expect("open");
    let (prompt, expected) = smollm2_prompt_and_greedy();
    assert_eq!(session.step(&prompt, 0).await.expect("step"), expected[0]);
    session.close().await;
    client.shutdown().await;
    drop(held);
    attacker.close().await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_past_the_per_client_cap_or_the_memory_budget_are_refused() {
    let (node, route, model_id) = whole_model_node(|engine| {
        // The last hop keeps no hidden states: a session reserves its longest KV cache.
        let per_session = engine.kv_bytes_per_session();
        assert!(per_session > 0);
        neuroshard_core::NodeOptions {
            max_sessions_per_client: 2,
            memory_budget: Some(3 * per_session + per_session / 2),
            ..neuroshard_core::NodeOptions::default()
        }
    })
    .await;
    let open = |client: &neuroshard_core::Client| {
        let (client, route, model_id) = (client.clone(), route.clone(), model_id.clone());
        async move { open_greedy(&client, route, &model_id).await }
    };
    let over_limit = |r: Result<neuroshard_core::RemoteSession, NetError>| match r {
        Err(NetError::HopFailed {
            reason: Some(Reason::OverLimit),
            message,
            ..
        }) => message,
        other => panic!("expected an over-limit refusal, got {other:?}"),
    };
    let (a, b, c) = (new_client().await, new_client().await, new_client().await);
    let mut held = vec![open(&a).await.expect("a1"), open(&a).await.expect("a2")];
    let refused = over_limit(open(&a).await);
    assert!(refused.contains("at most 2"), "{refused}");
    held.push(open(&b).await.expect("b1"));
    let refused = over_limit(open(&c).await);
    assert!(refused.contains("memory budget"), "{refused}");
    assert_eq!(node.stats().sessions_open, 3);
    assert_eq!(node.stats().refusals.get("over-limit"), Some(&2));
    // Closing one frees its reservation, and the refused client gets in; its session works.
    held.remove(0).close().await;
    let mut session = open(&c).await.expect("c1 after a close");
    let (prompt, expected) = smollm2_prompt_and_greedy();
    assert_eq!(session.step(&prompt, 0).await.expect("step"), expected[0]);
    session.close().await;
    for mut s in held {
        s.close().await;
    }
    for client in [a, b, c] {
        client.shutdown().await;
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_steps_are_refused_and_clients_split_long_inputs() {
    let (node, route, model_id) = whole_model_node(|_| neuroshard_core::NodeOptions {
        max_step_positions: 2,
        ..neuroshard_core::NodeOptions::default()
    })
    .await;
    let client = new_client().await;
    let (prompt, expected) = smollm2_prompt_and_greedy();
    let mut session = client
        .open_session(
            route,
            &model_id,
            Codec::F16,
            SamplingParams::greedy(),
            prompt.clone(),
        )
        .await
        .expect("open");
    session.step_timeout = Duration::from_secs(10);
    // The whole 5-token prompt in one step: refused before any compute.
    let steps_before = node.stats().steps;
    match session.step(&prompt, 0).await {
        Err(NetError::HopFailed {
            reason: Some(Reason::OverLimit),
            message,
            ..
        }) => assert!(message.contains("at most 2"), "{message}"),
        other => panic!("expected an over-limit refusal, got {other:?}"),
    }
    assert_eq!(
        node.stats().steps,
        steps_before,
        "the long step was computed"
    );
    // Split into steps of 2, 2 and 1, the prompt gives the reference continuation.
    session.max_step_positions = 2;
    let mut context = prompt.clone();
    for want in &expected[..4] {
        let start = if context.len() == prompt.len() {
            0
        } else {
            context.len() - 1
        };
        let token = session.step(&context[start..], start).await.expect("step");
        assert_eq!(token, *want);
        context.push(token);
    }
    assert!(node.stats().steps >= 3 + 3, "{:?}", node.stats());
    session.close().await;
    client.shutdown().await;
    node.shutdown().await;
}
