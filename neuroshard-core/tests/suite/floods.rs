//! Floods on 127.0.0.1 against a real node: one identity that opens too many connections,
//! streams and requests, and a hundred fresh identities at once (a Sybil flood). Each excess
//! gets a typed refusal (`over-limit`, or QUIC close code 429 for connections), the node's
//! accounting stays inside its budget, and an honest session keeps giving the reference text.

use crate::common::*;
use crate::hostile_peers::{ask, open_greedy, reason_of, whole_model_node};
use iroh::endpoint::{ConnectionError, VarInt};
use neuroshard_core::internals::{Message, SessionOpen, SignedOpen, INFER_ALPN};
use neuroshard_core::net::endpoint::{bind, EndpointOptions};
use neuroshard_core::net::limits::{PeerLimits, OVER_LIMIT_CLOSE_CODE};
use neuroshard_core::net::{now_ms, Reason, RouteHop};
use neuroshard_core::wire::Codec;
use neuroshard_core::{NodeOptions, SamplingParams};
use std::time::Duration;

/// An endpoint with a fresh identity, as a new attacker would bind it.
async fn attacker() -> iroh::Endpoint {
    bind(iroh::SecretKey::generate(), &EndpointOptions::default())
        .await
        .expect("attacker endpoint")
}

/// The reason text of a connection the node refused after the handshake (close code 429).
async fn refusal_of(conn: &iroh::endpoint::Connection) -> String {
    match tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("the refused connection closes in time")
    {
        ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, VarInt::from_u32(OVER_LIMIT_CLOSE_CODE));
            String::from_utf8_lossy(&close.reason).into_owned()
        }
        other => panic!("expected an over-limit close, got {other:?}"),
    }
}

/// A request stream that sends two bytes of a length prefix and then nothing: it holds a
/// stream slot until the node's read deadline.
async fn held_request(
    conn: &iroh::endpoint::Connection,
) -> (iroh::endpoint::SendStream, iroh::endpoint::RecvStream) {
    let (mut send, recv) = conn.open_bi().await.expect("bi");
    send.write_all(&[8, 0]).await.expect("write");
    (send, recv)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_identity_cannot_flood_connections_streams_or_requests() {
    let limits = PeerLimits {
        max_connections_per_peer: 2,
        max_connections: 64,
        max_streams_per_peer: 8,
        requests_per_second: 1,
        request_burst: 20,
    };
    let (node, route, model_id) = whole_model_node(|_| NodeOptions {
        limits,
        read_deadline: Duration::from_secs(20),
        ..NodeOptions::default()
    })
    .await;

    // Connections: two from one identity are held, the third and fourth are closed with 429.
    let hoarder = attacker().await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let conn = hoarder
            .connect(node.addr(), INFER_ALPN)
            .await
            .expect("connect");
        assert!(matches!(ask(&conn, &Message::Ping).await, Message::Ok));
        held.push(conn);
    }
    for _ in 0..2 {
        let conn = hoarder
            .connect(node.addr(), INFER_ALPN)
            .await
            .expect("the handshake itself completes");
        let reason = refusal_of(&conn).await;
        assert!(reason.contains("at most 2"), "{reason}");
    }
    assert_eq!(node.connections_held(), 2);

    // Streams: another identity holds eight unfinished requests; its ninth request is
    // answered `over-limit` at once, and its data stream past the cap is stopped with 429.
    let streamer = attacker().await;
    let conn = streamer
        .connect(node.addr(), INFER_ALPN)
        .await
        .expect("connect");
    let mut slow = Vec::new();
    for _ in 0..8 {
        slow.push(held_request(&conn).await);
    }
    let reply = ask(&conn, &Message::Ping).await;
    assert_eq!(reason_of(&reply), Reason::OverLimit, "{reply:?}");
    assert!(format!("{reply:?}").contains("at most 8"), "{reply:?}");
    let mut uni = conn.open_uni().await.expect("uni");
    uni.write_all(&[8, 0]).await.expect("write");
    let stopped = tokio::time::timeout(Duration::from_secs(10), uni.stopped())
        .await
        .expect("the data stream is stopped in time")
        .expect("stopped, not lost");
    assert_eq!(stopped, Some(VarInt::from_u32(OVER_LIMIT_CLOSE_CODE)));

    // Requests: a third identity sends pings one after another. The burst of 20 is answered,
    // and the rate (1 per second) lets no more than a few more through before a refusal.
    let chatterer = attacker().await;
    let conn = chatterer
        .connect(node.addr(), INFER_ALPN)
        .await
        .expect("connect");
    let started = std::time::Instant::now();
    let mut answered = 0u64;
    let refusal = loop {
        match ask(&conn, &Message::Ping).await {
            Message::Ok => answered += 1,
            other => break other,
        }
        assert!(answered <= 40, "the request rate is not enforced");
    };
    assert_eq!(reason_of(&refusal), Reason::OverLimit, "{refusal:?}");
    assert!(
        format!("{refusal:?}").contains("requests per second"),
        "{refusal:?}"
    );
    let refill = started.elapsed().as_secs() + 1;
    assert!(
        (20..=20 + refill).contains(&answered),
        "{answered} pings answered in {:?}",
        started.elapsed()
    );

    // Every excess was counted, and an honest client on its own identity is served.
    let stats = node.stats();
    assert!(
        stats.refusals.get("over-limit").copied().unwrap_or(0) >= 5,
        "{stats:?}"
    );
    honest_first_token(&route, &model_id).await;
    drop((slow, uni));
    for endpoint in [hoarder, streamer, chatterer] {
        endpoint.close().await;
    }
    node.shutdown().await;
}

/// `n` greedy tokens of the reference prompt, from a session a fresh client opens on `route`.
async fn greedy_session(route: &[RouteHop], model_id: &str, n: usize) -> Vec<u32> {
    let client = new_client().await;
    let mut session = open_greedy(&client, route.to_vec(), model_id)
        .await
        .expect("open");
    let (prompt, _) = smollm2_prompt_and_greedy();
    let mut tokens = vec![session.step(&prompt, 0).await.expect("prompt step")];
    for i in 1..n {
        let pos = prompt.len() + i - 1;
        tokens.push(session.step(&[tokens[i - 1]], pos).await.expect("decode"));
    }
    session.close().await;
    client.shutdown().await;
    tokens
}

/// Checks the first greedy token of a fresh client's session on `route` against the
/// reference.
async fn honest_first_token(route: &[RouteHop], model_id: &str) {
    let (_, expected) = smollm2_prompt_and_greedy();
    assert_eq!(greedy_session(route, model_id, 1).await, expected[..1]);
}

/// What one Sybil identity got from the node.
#[derive(Debug, Default)]
struct SybilOutcome {
    /// Its connection was refused with close code 429.
    connection_refused: bool,
    /// Its session-open was accepted.
    session_opened: bool,
    /// Its session-open was refused `over-limit`.
    session_refused: bool,
    /// Pings answered, refused `over-limit`, and cut off when the node disconnected it for
    /// sending on past its refusals.
    pings: (u32, u32, u32),
}

/// One fresh identity: connect, open a session, then fire `pings` requests at once.
async fn sybil(
    node: iroh::EndpointAddr,
    route: Vec<RouteHop>,
    model_id: String,
    pings: usize,
    all_connected: std::sync::Arc<tokio::sync::Barrier>,
) -> (
    iroh::Endpoint,
    Option<iroh::endpoint::Connection>,
    SybilOutcome,
) {
    let key = iroh::SecretKey::generate();
    let endpoint = bind(key.clone(), &EndpointOptions::default())
        .await
        .expect("bind");
    let mut outcome = SybilOutcome::default();
    let conn = endpoint.connect(node, INFER_ALPN).await.expect("handshake");
    // A refused connection is closed right after the handshake; an admitted one answers.
    let open = SessionOpen {
        session: rand_nonce(&key),
        client: key.public(),
        model_id,
        route,
        codec: Codec::F16 as u8,
        sampling: SamplingParams::greedy(),
        prompt: vec![1],
        timestamp_ms: now_ms(),
        nonce: rand_nonce(&key),
        handover: None,
        return_logits: false,
        adapter: None,
        replicas: Vec::new(),
        referees: Vec::new(),
    };
    let signed = Message::Open(SignedOpen::sign(&open, &key).expect("sign"));
    let reply = try_ask(&conn, &signed).await;
    // Every identity has connected and opened before any floods, so no slot freed by a
    // disconnect is taken by a late one.
    all_connected.wait().await;
    let Some(reply) = reply else {
        let reason = refusal_of(&conn).await;
        assert!(reason.contains("over-limit"), "{reason}");
        outcome.connection_refused = true;
        return (endpoint, None, outcome);
    };
    match reply {
        Message::Ok => outcome.session_opened = true,
        other => {
            assert_eq!(reason_of(&other), Reason::OverLimit, "{other:?}");
            outcome.session_refused = true;
        }
    }
    let mut asks = tokio::task::JoinSet::new();
    for _ in 0..pings {
        let conn = conn.clone();
        asks.spawn(async move { try_ask(&conn, &Message::Ping).await });
    }
    while let Some(reply) = asks.join_next().await {
        match reply.expect("ping task") {
            Some(Message::Ok) => outcome.pings.0 += 1,
            Some(other) => {
                assert_eq!(reason_of(&other), Reason::OverLimit, "{other:?}");
                outcome.pings.1 += 1;
            }
            None => outcome.pings.2 += 1,
        }
    }
    if outcome.pings.2 > 0 {
        let reason = refusal_of(&conn).await;
        assert!(reason.contains("past its refusals"), "{reason}");
    }
    (endpoint, Some(conn), outcome)
}

/// A nonce that differs per identity (its public key's first bytes).
fn rand_nonce(key: &iroh::SecretKey) -> u64 {
    let bytes = key.public();
    u64::from_le_bytes(bytes.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// One request, or `None` when the connection is closed before the reply.
async fn try_ask(conn: &iroh::endpoint::Connection, msg: &Message) -> Option<Message> {
    let (mut send, mut recv) = conn.open_bi().await.ok()?;
    neuroshard_core::internals::write_message(&mut send, msg)
        .await
        .ok()?;
    let _ = send.finish();
    tokio::time::timeout(
        Duration::from_secs(10),
        neuroshard_core::internals::read_message(&mut recv),
    )
    .await
    .expect("a reply or a close in time")
    .ok()
}

/// Resident memory of this process, from `/proc/self/status`.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_fresh_identities_get_typed_refusals_and_the_honest_session_runs_on() {
    const SYBILS: usize = 100;
    const MAX_CONNECTIONS: usize = 40;
    const SESSIONS: u64 = 4;
    let mut budget = 0;
    let (node, route, model_id) = whole_model_node(|engine| {
        budget = SESSIONS * engine.kv_bytes_per_session() + engine.kv_bytes_per_session() / 2;
        NodeOptions {
            memory_budget: Some(budget),
            limits: PeerLimits {
                max_connections: MAX_CONNECTIONS,
                requests_per_second: 5,
                request_burst: 10,
                ..PeerLimits::default()
            },
            ..NodeOptions::default()
        }
    })
    .await;

    // The honest session opens before the flood and takes one of the four session slots.
    let client = new_client().await;
    let mut honest = open_greedy(&client, route.clone(), &model_id)
        .await
        .expect("open");
    let (prompt, expected) = smollm2_prompt_and_greedy();
    let mut tokens = vec![honest.step(&prompt, 0).await.expect("prompt step")];

    let rss_before = rss_bytes();
    let mut flood = tokio::task::JoinSet::new();
    let all_connected = std::sync::Arc::new(tokio::sync::Barrier::new(SYBILS));
    for _ in 0..SYBILS {
        let (route, model_id) = (route.clone(), model_id.clone());
        flood.spawn(sybil(
            node.addr(),
            route,
            model_id,
            30,
            all_connected.clone(),
        ));
    }
    let mut kept = Vec::new();
    let mut outcomes = Vec::new();
    while let Some(done) = flood.join_next().await {
        let (endpoint, conn, outcome) = done.expect("sybil task");
        kept.push((endpoint, conn));
        outcomes.push(outcome);
        assert!(node.connections_held() <= MAX_CONNECTIONS);
    }
    let rss_growth = rss_bytes().saturating_sub(rss_before);
    let count = |f: fn(&SybilOutcome) -> bool| outcomes.iter().filter(|o| f(o)).count();
    let admitted = SYBILS - count(|o| o.connection_refused);
    let (pings_ok, pings_refused, pings_cut) = outcomes.iter().fold((0, 0, 0), |(a, r, c), o| {
        (a + o.pings.0, r + o.pings.1, c + o.pings.2)
    });
    let disconnected = count(|o| o.pings.2 > 0);
    eprintln!(
        "sybil flood: {admitted} connections admitted, {} sessions opened, {} refused, \
         pings {pings_ok} answered / {pings_refused} refused / {pings_cut} cut off \
         ({disconnected} identities disconnected), rss +{} MB",
        count(|o| o.session_opened),
        count(|o| o.session_refused),
        rss_growth >> 20
    );
    // The client's own connection holds one of the slots.
    assert!(admitted < MAX_CONNECTIONS, "{admitted} admitted");
    assert!(admitted >= MAX_CONNECTIONS / 2, "{admitted} admitted");
    assert_eq!(count(|o| o.session_opened), SESSIONS as usize - 1);
    assert_eq!(
        count(|o| o.session_refused),
        admitted - (SESSIONS as usize - 1)
    );
    // Each admitted identity has a burst of 10 (one spent on the open) and 5 a second: 30
    // pings at once always meet refusals, and most of them are not answered. An identity
    // that sends on past a burst of refusals is disconnected (checked in `sybil`).
    for o in outcomes.iter().filter(|o| !o.connection_refused) {
        assert!(
            o.pings.1 + o.pings.2 > 0 && o.pings.0 + o.pings.1 + o.pings.2 == 30,
            "{o:?}"
        );
    }
    assert!(pings_refused + pings_cut > pings_ok, "{pings_ok} answered");
    let stats = node.stats();
    assert!(
        stats.kv_cache_bytes + stats.sent_state_bytes <= budget,
        "{stats:?}"
    );
    assert!(rss_growth < 1 << 30, "rss grew by {rss_growth} bytes");

    // The honest session continues through the flood's aftermath and gives the reference text.
    for i in 1..expected.len() {
        let pos = prompt.len() + i - 1;
        tokens.push(honest.step(&[tokens[i - 1]], pos).await.expect("decode"));
    }
    assert_eq!(tokens, expected);
    honest.close().await;
    client.shutdown().await;
    for (endpoint, _) in kept {
        endpoint.close().await;
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_honest_sessions_get_the_reference_text_while_one_client_floods() {
    const HONEST: usize = 16;
    const TOKENS: usize = 8;
    let (node, route, model_id) = whole_model_node(|_| NodeOptions::default()).await;
    let (_, expected) = smollm2_prompt_and_greedy();

    // The flooder sends pings 64 at a time, each batch with a garbage data stream, until
    // every honest session is done.
    let flooder = attacker().await;
    let conn = flooder
        .connect(node.addr(), INFER_ALPN)
        .await
        .expect("connect");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let done = done.clone();
        tokio::spawn(async move {
            let (mut answered, mut refused) = (0u64, 0u64);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let mut batch = tokio::task::JoinSet::new();
                for _ in 0..64 {
                    let conn = conn.clone();
                    batch.spawn(async move { try_ask(&conn, &Message::Ping).await });
                }
                if let Ok(mut uni) = conn.open_uni().await {
                    let _ = uni.write_all(&[0xff; 64]).await;
                    let _ = uni.finish();
                }
                while let Some(reply) = batch.join_next().await {
                    match reply.expect("ping task") {
                        Some(Message::Ok) => answered += 1,
                        Some(other) => {
                            assert_eq!(reason_of(&other), Reason::OverLimit, "{other:?}");
                            refused += 1;
                        }
                        None => {}
                    }
                }
                if conn.close_reason().is_some() {
                    break;
                }
            }
            (answered, refused, conn)
        })
    };

    let mut honest = tokio::task::JoinSet::new();
    for _ in 0..HONEST {
        let (route, model_id) = (route.clone(), model_id.clone());
        honest.spawn(async move { greedy_session(&route, &model_id, TOKENS).await });
    }
    while let Some(tokens) = honest.join_next().await {
        assert_eq!(tokens.expect("honest session"), expected[..TOKENS]);
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (answered, refused, conn) = flood.await.expect("flood task");
    eprintln!("flood beside {HONEST} sessions: {answered} pings answered, {refused} refused");
    assert!(
        refused > 0,
        "the flood was never limited ({answered} answered)"
    );
    // Sending on past its refusals got the flooder disconnected, and it stays banned.
    let reason = refusal_of(&conn).await;
    assert!(reason.contains("past its refusals"), "{reason}");
    // From the same socket the redial is refused before any handshake.
    let again = flooder.connect(node.addr(), INFER_ALPN).await;
    assert!(again.is_err(), "a banned flooder connected again");
    let stats = node.stats();
    assert!(stats.decode_batches > 0, "{stats:?}");
    assert_eq!(stats.sessions_open, 0, "{stats:?}");
    flooder.close().await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_sending_garbage_is_banned_within_a_few_messages() {
    let (node, route, model_id) = whole_model_node(|_| NodeOptions::default()).await;
    let flooder = attacker().await;
    let conn = flooder
        .connect(node.addr(), INFER_ALPN)
        .await
        .expect("connect");
    // A length prefix and 12 bytes that are no message, one request at a time, answered
    // `malformed` until the node has seen enough of them.
    let garbage = [12, 0, 0, 0, 0xff, 0xfe, 0xfd, 0xfc, 1, 2, 3, 4, 5, 6, 7, 8];
    let mut answered = 0;
    for _ in 0..200 {
        let Ok((mut send, mut recv)) = conn.open_bi().await else {
            break;
        };
        let _ = send.write_all(&garbage).await;
        let _ = send.finish();
        match neuroshard_core::internals::read_message(&mut recv).await {
            Ok(reply) => {
                assert_eq!(reason_of(&reply), Reason::Malformed, "{reply:?}");
                answered += 1;
            }
            Err(_) => break,
        }
    }
    let reason = refusal_of(&conn).await;
    assert!(reason.contains("past its refusals"), "{reason}");
    // The default burst (200) over 10 refusals per undecodable message: banned at the 21st.
    assert!(
        answered <= 21,
        "{answered} garbage requests answered before the ban"
    );
    assert!(answered >= 15, "banned after only {answered}");
    honest_first_token(&route, &model_id).await;
    flooder.close().await;
    node.shutdown().await;
}
