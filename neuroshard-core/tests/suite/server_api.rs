//! The OpenAI-compatible server (`ApiServer`) against a 3-node SmolLM2 swarm on 127.0.0.1,
//! spoken to over raw HTTP/1.1: the reference text through `/v1/completions`, chat prompts
//! tokenised by the model's template, streaming equal to non-streaming, stop sequences,
//! usage counts, seeded sampling, every error shape, the bearer key, `/metrics`, prefix reuse
//! over a 3-turn chat (node counters show only the new tokens computed, texts equal fresh
//! sessions'), 8 concurrent streaming clients, and a mid-stream disconnect that frees the
//! session on every hop.

use crate::common::*;
use neuroshard_core::{
    resolve_peers, ApiServer, ChatMessage, EngineOptions, GenerationConfig, LocalSwarm,
    ServeOptions, SwarmSession,
};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "test-key";

/// A chunk-invariant swarm: every position's bits are the same however it is chunked, so a
/// conversation's later turns (earlier tokens computed one by one) equal fresh sessions' bit
/// for bit.
async fn swarm() -> LocalSwarm {
    let options = EngineOptions {
        chunk_invariant: true,
        ..EngineOptions::default()
    };
    LocalSwarm::start(&smollm2(), 3, 1, options, &mut |_| {})
        .await
        .expect("swarm")
}

async fn session(swarm: &LocalSwarm) -> SwarmSession {
    let entries = resolve_peers(&swarm.addresses()).await.expect("addresses");
    SwarmSession::connect(new_client().await, entries, Default::default())
        .await
        .expect("connect")
}

/// The API server on a free 127.0.0.1 port, and its address.
async fn serve(session: &SwarmSession, options: ServeOptions) -> (ApiServer, SocketAddr) {
    let server = ApiServer::bind(
        "127.0.0.1:0".parse().expect("addr"),
        session.clone(),
        options,
    )
    .await
    .expect("bind");
    let addr = server.local_addr();
    (server, addr)
}

/// An HTTP answer: status, raw header block, body (de-chunked).
struct Answer {
    status: u16,
    headers: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The `data:` payloads of an SSE body, in order.
    fn events(&self) -> Vec<String> {
        self.body
            .split("\n\n")
            .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
            .map(str::to_string)
            .collect()
    }
}

fn request_bytes(method: &str, path: &str, key: Option<&str>, body: Option<&str>) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    if let Some(k) = key {
        head.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    let body = body.unwrap_or("");
    if method == "POST" {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body.as_bytes());
    bytes
}

/// One request on a fresh connection, read to the end (bounded in time).
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&str>,
) -> Answer {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(&request_bytes(method, path, key, body))
        .await
        .expect("send");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(120), stream.read_to_end(&mut raw))
        .await
        .expect("answer within 120 s")
        .expect("read");
    parse_answer(&raw)
}

fn parse_answer(raw: &[u8]) -> Answer {
    let text = String::from_utf8_lossy(raw).to_string();
    let (headers, body) = text.split_once("\r\n\r\n").expect("header end");
    let status = headers
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let chunked = headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Answer {
        status,
        headers: headers.to_string(),
        body,
    }
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

async fn post(addr: SocketAddr, path: &str, body: &Value) -> Answer {
    http(addr, "POST", path, Some(KEY), Some(&body.to_string())).await
}

/// The error object of an OpenAI-shaped error answer, after checking its status.
fn error_of(answer: &Answer, status: u16) -> Value {
    assert_eq!(answer.status, status, "{}", answer.body);
    let e = answer.json()["error"].clone();
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    assert!(e["type"].is_string(), "{e}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{e}");
    e
}

/// Concatenated streamed text, the finish reason, and the usage chunk if any; checks that
/// `[DONE]` ends the stream.
fn streamed(answer: &Answer, chat: bool) -> (String, String, Option<Value>) {
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(
        answer.headers.contains("text/event-stream"),
        "{}",
        answer.headers
    );
    let events = answer.events();
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let (mut text, mut finish, mut usage) = (String::new(), String::new(), None);
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).expect("event JSON");
        if let Some(u) = v.get("usage") {
            usage = Some(u.clone());
            continue;
        }
        let choice = &v["choices"][0];
        let piece = if chat {
            choice["delta"]["content"].as_str()
        } else {
            choice["text"].as_str()
        };
        text.push_str(piece.unwrap_or(""));
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (text, finish, usage)
}

/// A fresh session's greedy text for `prompt` (the reference for prefix reuse).
async fn fresh_text(session: &SwarmSession, prompt: Vec<u32>, max_tokens: usize) -> String {
    let config = GenerationConfig {
        max_tokens,
        ..GenerationConfig::default()
    };
    session
        .generate(prompt, config, Box::new(|_| ControlFlow::Continue(())))
        .await
        .expect("fresh generation")
        .output
        .text
}

fn chat_ids(session: &SwarmSession, messages: &[(&str, &str)]) -> Vec<u32> {
    let tokenizer = session.tokenizer();
    let messages: Vec<ChatMessage> = messages
        .iter()
        .map(|(r, c)| ChatMessage::new(*r, *c))
        .collect();
    let text = tokenizer
        .apply_chat_template(&messages, true)
        .expect("template");
    tokenizer.encode(&text).expect("encode")
}

fn messages_json(messages: &[(&str, &str)]) -> Value {
    Value::Array(
        messages
            .iter()
            .map(|(r, c)| json!({"role": r, "content": c}))
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_api_over_a_local_swarm() {
    let swarm = swarm().await;
    let session = session(&swarm).await;
    let options = ServeOptions {
        api_key: Some(KEY.into()),
        model_name: Some("smollm2".into()),
        max_request_bytes: 64 * 1024,
        ..ServeOptions::default()
    };
    let (server, addr) = serve(&session, options).await;

    // The bearer key: required everywhere but /health.
    let e = error_of(&http(addr, "GET", "/v1/models", None, None).await, 401);
    assert_eq!(e["code"], "invalid_api_key");
    error_of(
        &http(addr, "GET", "/v1/models", Some("wrong"), None).await,
        401,
    );
    error_of(&http(addr, "GET", "/metrics", None, None).await, 401);
    let health = http(addr, "GET", "/health", None, None).await;
    assert_eq!(health.status, 200, "{}", health.body);
    assert_eq!(health.json()["nodes"], 3);
    let models = http(addr, "GET", "/v1/models", Some(KEY), None)
        .await
        .json();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, [session.model_id(), "smollm2"]);

    // The reference: greedy /v1/completions equals Hugging Face's text; usage counts tokens.
    let reference = reference_json("smollm2");
    let (prompt_ids, greedy_ids) = smollm2_prompt_and_greedy();
    let prompt = reference["prompt"].as_str().expect("prompt");
    let want = reference["greedy_text"].as_str().expect("text");
    let body = json!({"model": "smollm2", "prompt": prompt, "temperature": 0,
                      "max_tokens": greedy_ids.len()});
    let answer = post(addr, "/v1/completions", &body).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let v = answer.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], want);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["prompt_tokens"], prompt_ids.len());
    assert_eq!(v["usage"]["completion_tokens"], greedy_ids.len());
    assert_eq!(
        v["usage"]["total_tokens"],
        prompt_ids.len() + greedy_ids.len()
    );
    // Streamed: the same text in pieces, then the finish, the usage chunk, [DONE].
    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    stream_body["stream_options"] = json!({"include_usage": true});
    let (text, finish, usage) = streamed(&post(addr, "/v1/completions", &stream_body).await, false);
    assert_eq!((text.as_str(), finish.as_str()), (want, "length"));
    let usage = usage.expect("usage chunk with include_usage");
    assert_eq!(usage["completion_tokens"], greedy_ids.len());
    stream_body["stream_options"] = json!({"include_usage": false});
    let (_, _, usage) = streamed(&post(addr, "/v1/completions", &stream_body).await, false);
    assert!(usage.is_none(), "usage chunk without include_usage");

    // Stop sequences, plain and streamed: the text ends before the first occurrence.
    let stop = " human";
    let cut = &want[..want.find(stop).expect("stop in text")];
    let mut stop_body = body.clone();
    stop_body["stop"] = json!([stop, "never-there"]);
    let v = post(addr, "/v1/completions", &stop_body).await.json();
    assert_eq!(v["choices"][0]["text"], cut);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    stop_body["stream"] = json!(true);
    let (text, finish, _) = streamed(&post(addr, "/v1/completions", &stop_body).await, false);
    assert_eq!((text.as_str(), finish.as_str()), (cut, "stop"));

    // Chat prompts are exactly the template's ids: the chat answer equals the completion
    // of those ids, and its usage counts them.
    let turn1 = [("system", "You are brief."), ("user", "Name a fruit.")];
    let ids1 = chat_ids(&session, &turn1);
    let chat = json!({"model": "smollm2", "messages": messages_json(&turn1),
                      "temperature": 0, "max_tokens": 16});
    let v = post(addr, "/v1/chat/completions", &chat).await.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let reply1 = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string();
    assert_eq!(v["usage"]["prompt_tokens"], ids1.len());
    let by_ids = post(
        addr,
        "/v1/completions",
        &json!({"prompt": ids1, "temperature": 0, "max_tokens": 16}),
    )
    .await
    .json();
    assert_eq!(by_ids["choices"][0]["text"], reply1.as_str());
    assert_eq!(reply1, fresh_text(&session, ids1.clone(), 16).await);
    let mut chat_stream = chat.clone();
    chat_stream["stream"] = json!(true);
    let (text, _, _) = streamed(
        &post(addr, "/v1/chat/completions", &chat_stream).await,
        true,
    );
    assert_eq!(text, reply1);

    // Prefix reuse over three turns: each later turn computes only its new tokens on the
    // first node, and its text equals a fresh session's for the same ids.
    let turn2 = [
        turn1[0],
        turn1[1],
        ("assistant", reply1.as_str()),
        ("user", "Name another one."),
    ];
    let reply2 = reuse_turn(addr, &swarm, &session, &turn2).await;
    let turn3 = [
        turn2[0],
        turn2[1],
        turn2[2],
        turn2[3],
        ("assistant", reply2.as_str()),
        ("user", "And a vegetable?"),
    ];
    reuse_turn(addr, &swarm, &session, &turn3).await;

    // Seeded sampling: the same seed gives the same text, request after request.
    let seeded = json!({"prompt": "Once upon a time", "temperature": 0.9, "top_p": 0.95,
                        "seed": 1234, "max_tokens": 12});
    let a = post(addr, "/v1/completions", &seeded).await.json();
    let b = post(addr, "/v1/completions", &seeded).await.json();
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);

    // Every error shape.
    let bad = http(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(KEY),
        Some("{not json"),
    )
    .await;
    assert_eq!(error_of(&bad, 400)["code"], "invalid_json");
    let wrong_model = json!({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]});
    let e = error_of(&post(addr, "/v1/chat/completions", &wrong_model).await, 404);
    assert_eq!(e["code"], "model_not_found");
    let long = json!({"prompt": "hello ".repeat(9000), "max_tokens": 1});
    let e = error_of(&post(addr, "/v1/completions", &long).await, 400);
    assert_eq!(e["code"], "context_length_exceeded");
    let huge = json!({"prompt": "x".repeat(70 * 1024)});
    error_of(&post(addr, "/v1/completions", &huge).await, 413);
    let two = json!({"prompt": "hi", "n": 2});
    assert_eq!(
        error_of(&post(addr, "/v1/completions", &two).await, 400)["param"],
        "n"
    );
    let hot = json!({"prompt": "hi", "temperature": 3.5});
    error_of(&post(addr, "/v1/completions", &hot).await, 400);
    let no_messages = json!({"messages": []});
    error_of(&post(addr, "/v1/chat/completions", &no_messages).await, 400);
    error_of(
        &http(addr, "GET", "/v1/nothing", Some(KEY), None).await,
        404,
    );

    // /metrics: Prometheus text whose counters rose with the requests above.
    let metrics = http(addr, "GET", "/metrics", Some(KEY), None).await;
    assert_eq!(metrics.status, 200);
    let values = parse_prometheus(&metrics.body);
    let completions_ok = values
        .get("neuroshard_requests_total{endpoint=\"completions\",code=\"200\"}")
        .copied()
        .unwrap_or(0.0);
    assert!(completions_ok >= 8.0, "{completions_ok}");
    assert!(values["neuroshard_completion_tokens_total"] > 100.0);
    assert!(values["neuroshard_cached_prompt_tokens_total"] > 0.0);
    assert!(values["neuroshard_conversations_reused_total"] >= 2.0);
    let before = values["neuroshard_completion_tokens_total"];
    post(addr, "/v1/completions", &body).await;
    let after = parse_prometheus(&http(addr, "GET", "/metrics", Some(KEY), None).await.body);
    assert_eq!(
        after["neuroshard_completion_tokens_total"],
        before + greedy_ids.len() as f64
    );

    // A swarm that is gone: health and generations answer 503 in OpenAI's shape.
    swarm.shutdown().await;
    let e = error_of(&http(addr, "GET", "/health", None, None).await, 503);
    assert_eq!(e["code"], "swarm_unavailable");
    let hi = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    let e = error_of(&post(addr, "/v1/chat/completions", &hi).await, 503);
    assert_eq!(e["code"], "swarm_unavailable");
    server.shutdown().await.expect("shutdown");
}

/// One chat turn that should reuse the kept conversation: checks the cached tokens, the
/// first node's computed positions and the text against a fresh session; returns the reply.
async fn reuse_turn(
    addr: SocketAddr,
    swarm: &LocalSwarm,
    session: &SwarmSession,
    messages: &[(&str, &str)],
) -> String {
    let ids = chat_ids(session, messages);
    let first_node = swarm.nodes[0].engine().clone();
    let before = first_node.stats().positions_processed;
    let body = json!({"messages": messages_json(messages), "temperature": 0, "max_tokens": 16});
    let v = post(addr, "/v1/chat/completions", &body).await.json();
    let computed = first_node.stats().positions_processed - before;
    let usage = &v["usage"];
    assert_eq!(usage["prompt_tokens"], ids.len(), "{v}");
    let cached = usage["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("cached tokens") as usize;
    assert!(
        cached > ids.len() / 2,
        "only {cached} of {} tokens reused",
        ids.len()
    );
    let generated = usage["completion_tokens"].as_u64().expect("completion") as usize;
    // The new prompt tokens, then one position per generated token fed back (all of them
    // when the answer ended with a stop token, all but the last at the length limit).
    let fed_back = if v["choices"][0]["finish_reason"] == "stop" {
        generated
    } else {
        generated - 1
    };
    assert_eq!(computed as usize, ids.len() - cached + fed_back, "{v}");
    let reply = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string();
    assert_eq!(
        reply,
        fresh_text(session, ids, 16).await,
        "turn text vs a fresh session"
    );
    reply
}

/// `name{labels}` -> value for every sample line; panics on a line that is not Prometheus
/// text.
fn parse_prometheus(text: &str) -> std::collections::HashMap<String, f64> {
    let mut out = std::collections::HashMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix('#') {
            let rest = rest.trim_start();
            assert!(
                rest.starts_with("HELP ") || rest.starts_with("TYPE "),
                "bad comment: {line}"
            );
            continue;
        }
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line: {line}"));
        let base = name.split('{').next().unwrap_or("");
        assert!(
            !base.is_empty()
                && base
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name: {line}"
        );
        if name.contains('{') {
            assert!(name.ends_with('}'), "bad labels: {line}");
        }
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        out.insert(name.to_string(), v);
    }
    out
}

/// Open sessions on every node of `swarm`.
fn sessions_open(swarm: &LocalSwarm) -> Vec<u64> {
    swarm
        .nodes
        .iter()
        .map(|n| n.stats().sessions_open)
        .collect()
}

/// Polls until every node has `want` sessions open (bounded: 20 s).
async fn wait_sessions(swarm: &LocalSwarm, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let open = sessions_open(swarm);
        if open.iter().all(|&n| n == want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "sessions open per node: {open:?}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_and_a_disconnect_leave_no_session() {
    let swarm = swarm().await;
    let session = session(&swarm).await;
    // No kept conversations: every session must be closed once its request ends.
    let options = ServeOptions {
        api_key: Some(KEY.into()),
        kept_conversations: 0,
        ..ServeOptions::default()
    };
    let (server, addr) = serve(&session, options).await;
    let prompts = EIGHT_PROMPTS;
    let body = |p: &str, stream: bool| json!({"prompt": p, "temperature": 0, "max_tokens": 16, "stream": stream});
    let mut solo = Vec::new();
    for p in prompts {
        let v = post(addr, "/v1/completions", &body(p, false)).await.json();
        solo.push(v["choices"][0]["text"].as_str().expect("text").to_string());
    }
    let streams = prompts.map(|p| {
        let request = body(p, true);
        tokio::spawn(async move { post(addr, "/v1/completions", &request).await })
    });
    for (i, task) in streams.into_iter().enumerate() {
        let answer = task.await.expect("client task");
        let (text, _, _) = streamed(&answer, false);
        assert_eq!(text, solo[i], "prompt {i}: concurrent stream vs solo");
    }
    wait_sessions(&swarm, 0).await;

    // A client that goes away mid-stream: its generation stops and its session closes on
    // every hop.
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let long = json!({"prompt": "Once upon a time", "temperature": 0, "max_tokens": 400,
                      "stream": true});
    stream
        .write_all(&request_bytes(
            "POST",
            "/v1/completions",
            Some(KEY),
            Some(&long.to_string()),
        ))
        .await
        .expect("send");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    // Read until the first text chunk (after the headers): the session is open on the route.
    while !String::from_utf8_lossy(&seen).contains("\"text\"") {
        let n = tokio::time::timeout(Duration::from_secs(60), stream.read(&mut buf))
            .await
            .expect("first chunk within 60 s")
            .expect("read");
        assert!(n > 0, "stream ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(sessions_open(&swarm).iter().all(|&n| n == 1));
    drop(stream);
    wait_sessions(&swarm, 0).await;
    let metrics = parse_prometheus(&http(addr, "GET", "/metrics", Some(KEY), None).await.body);
    assert_eq!(metrics["neuroshard_disconnects_total"], 1.0);
    assert!(metrics["neuroshard_completion_tokens_total"] < 16.0 * 16.0 + 400.0);
    server.shutdown().await.expect("shutdown");
    swarm.shutdown().await;
}

/// `/v1/swarm` over a replicated session: each node shows its trust state and score in the
/// server's table, and the route shows each range's replicas and what the votes found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_swarm_view_shows_trust_and_votes_of_a_replicated_session() {
    let swarm = LocalSwarm::start(&smollm2(), 2, 3, EngineOptions::default(), &mut |_| {})
        .await
        .expect("swarm");
    let entries = resolve_peers(&swarm.addresses()).await.expect("addresses");
    let options = neuroshard_core::SwarmOptions {
        redundancy: 3,
        ..Default::default()
    };
    let session = SwarmSession::connect(new_client().await, entries, options)
        .await
        .expect("connect");
    let (server, addr) = serve(&session, ServeOptions::default()).await;
    let body = json!({
        "model": session.model_id(),
        "prompt": "The capital of France is",
        "max_tokens": 6,
    });
    let answer = post(addr, "/v1/completions", &body).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let view = http(addr, "GET", "/v1/swarm", None, None).await.json();
    let nodes = view["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 6, "{view}");
    for n in nodes {
        let state = n["trust"]["state"].as_str().expect("a trust state");
        assert!(state == "probation" || state == "trusted", "{n}");
    }
    // The client voted on the last range: those three replicas earned score.
    let scored = nodes
        .iter()
        .filter(|n| n["trust"]["score"].as_f64().unwrap_or(0.0) > 0.0)
        .count();
    assert_eq!(scored, 3, "{view}");
    let route = &view["route"];
    let replicas = route["replicas"].as_array().expect("replicas");
    assert_eq!(replicas.len(), 2, "{route}");
    assert!(replicas
        .iter()
        .all(|r| r.as_array().map(Vec::len) == Some(3)));
    assert_eq!(route["votes"], json!([]), "{route}");
    server.shutdown().await.expect("shutdown");
    swarm.shutdown().await;
}
