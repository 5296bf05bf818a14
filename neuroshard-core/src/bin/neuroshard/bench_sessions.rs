//! `neuroshard bench-sessions`: aggregate decode tokens/s of many concurrent sessions on an
//! in-process swarm of 1 or more nodes, each session's text checked against its solo run.
//!
//! The shape follows `llama-batched-bench -npp 16 -ntg 64 -npl 1,4,8,16`: every session has a
//! short prompt and decodes a fixed number of tokens (greedy, end-of-sequence ignored), all
//! sessions at once. The nodes batch the decode steps that reach them together
//! (`node/batcher.rs`), so the aggregate rate grows with the session count while each
//! session's tokens stay those of its solo run (batch invariance).

use crate::common::{machine_name, tokio_runtime, write_json, EngineArgs};
use neuroshard_core::{
    Client, Codec, ComputeMode, Error, ForwardRequest, GenerationConfig, GenerationOutput,
    LocalSwarm, LogitsSelection, ShardEngine, ShardInput, Tokenizer, WeightFile,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// Flags of `neuroshard bench-sessions`.
#[derive(clap::Args, Debug)]
pub(crate) struct BenchSessionsArgs {
    /// Model path.
    #[arg(long)]
    model: PathBuf,
    /// Swarm sizes to measure (nodes, one slice each).
    #[arg(long, value_delimiter = ',', default_value = "1,3")]
    nodes: Vec<usize>,
    /// Concurrent session counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
    sessions: Vec<usize>,
    /// Prompt tokens per session.
    #[arg(long, default_value_t = 16)]
    prompt_tokens: usize,
    /// Tokens each session decodes.
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Compute mode of every node.
    #[arg(long, default_value = "exact")]
    mode: ComputeMode,
    /// Codec of hidden states between nodes.
    #[arg(long, default_value = "f16")]
    codec: Codec,
    /// Repetitions per (nodes, sessions) point; the best aggregate is reported.
    #[arg(long, default_value_t = 1)]
    reps: usize,
    /// Also measure the engine alone (batched `ShardEngine::forward_batch` steps, no network).
    #[arg(long)]
    engine_too: bool,
    /// Also run every point while one hostile client floods every node with requests
    /// (garbage, 64 at a time, plus garbage data streams), and report decode latency p95
    /// with and without it.
    #[arg(long)]
    flood: bool,
    /// Write results here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    engine: EngineArgs,
}

/// The text the prompts are cut from.
const BENCH_TEXT: &str = "The history of computing is a story of machines that learned to share \
    work. Early computers filled rooms; later, networks of small machines cooperated. ";

/// `n` prompts of `len` tokens: the bench text, rotated by 3 tokens per session so that
/// sessions differ.
fn bench_prompts(tokenizer: &Tokenizer, n: usize, len: usize) -> Result<Vec<Vec<u32>>, Error> {
    let base = tokenizer.encode(BENCH_TEXT)?;
    Ok((0..n)
        .map(|s| base.iter().cycle().skip(s * 3).take(len).copied().collect())
        .collect())
}

/// `x` rounded to `1 / scale` for the JSON (`scale` 10: one decimal).
fn rounded(x: f64, scale: f64) -> f64 {
    (x * scale).round() / scale
}

/// The fields of every rate record: what was measured, its ratio to one session, and where.
fn rate_record(
    name: String,
    rate: f64,
    base_rate: f64,
    sessions: usize,
    machine: &str,
    threads: usize,
) -> serde_json::Map<String, serde_json::Value> {
    let mut record = serde_json::Map::new();
    for (key, value) in [
        ("name", serde_json::json!(name)),
        ("unit", serde_json::json!("tokens/s")),
        ("value", serde_json::json!(rounded(rate, 10.0))),
        (
            "over_one_session",
            serde_json::json!(rounded(rate / base_rate, 1000.0)),
        ),
        ("sessions", serde_json::json!(sessions)),
        ("machine", serde_json::json!(machine)),
        ("threads", serde_json::json!(threads)),
    ] {
        record.insert(key.to_string(), value);
    }
    record
}

/// A hostile client flooding nodes until stopped: batches of 64 garbage requests on fresh
/// streams of one connection per node, each batch with a garbage data stream, dialing again
/// whenever a node disconnects or refuses it. Counts the requests answered (each with a
/// refusal).
struct Flood {
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<u64>>,
    endpoint: iroh::Endpoint,
}

impl Flood {
    /// Starts flooding `nodes` from a fresh identity.
    async fn start(nodes: &[neuroshard_core::Node]) -> Result<Self, Error> {
        let endpoint = neuroshard_core::net::endpoint::bind(
            iroh::SecretKey::generate(),
            &neuroshard_core::net::endpoint::EndpointOptions::default(),
        )
        .await?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for node in nodes {
            let (endpoint, addr, stop) = (endpoint.clone(), node.addr(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut sent = 0u64;
                // A length prefix and 12 bytes that are no message.
                let garbage = [12, 0, 0, 0, 0xff, 0xfe, 0xfd, 0xfc, 1, 2, 3, 4, 5, 6, 7, 8];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Disconnected (or refused while banned): dial again, as a real
                    // flooder would; every attempt costs the node a handshake.
                    let Ok(conn) = endpoint
                        .connect(addr.clone(), neuroshard_core::net::INFER_ALPN)
                        .await
                    else {
                        // The node is unreachable: do not spin.
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    };
                    while !stop.load(std::sync::atomic::Ordering::Relaxed)
                        && conn.close_reason().is_none()
                    {
                        let mut batch = tokio::task::JoinSet::new();
                        for _ in 0..64 {
                            let conn = conn.clone();
                            batch.spawn(async move {
                                let (mut send, mut recv) = conn.open_bi().await.ok()?;
                                send.write_all(&garbage).await.ok()?;
                                send.finish().ok()?;
                                recv.read_to_end(1 << 16).await.ok()
                            });
                        }
                        if let Ok(mut uni) = conn.open_uni().await {
                            let _ = uni.write_all(&[0xff; 64]).await;
                            let _ = uni.finish();
                        }
                        while let Some(done) = batch.join_next().await {
                            if matches!(done, Ok(Some(_))) {
                                sent += 1;
                            }
                        }
                    }
                    // A refused connection closes right after its handshake.
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), conn.closed())
                        .await;
                }
                sent
            }));
        }
        Ok(Self {
            stop,
            tasks,
            endpoint,
        })
    }

    /// Stops the flood; returns the requests that were answered (each with a refusal).
    async fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut answered = 0;
        for task in self.tasks {
            answered += task.await.unwrap_or(0);
        }
        self.endpoint.close().await;
        answered
    }
}

/// The 95th percentile of the gaps between consecutive tokens of each session, in ms.
fn decode_latency_p95_ms(runs: &[Timed]) -> f64 {
    let mut gaps: Vec<f64> = runs
        .iter()
        .flat_map(|r| r.arrivals.windows(2))
        .map(|w| (w[1] - w[0]).as_secs_f64() * 1e3)
        .collect();
    if gaps.is_empty() {
        return 0.0;
    }
    gaps.sort_by(f64::total_cmp);
    gaps[((gaps.len() - 1) as f64 * 0.95).round() as usize]
}

/// One session's run: its output and when each of its tokens arrived at the client.
struct Timed {
    out: GenerationOutput,
    arrivals: Vec<Instant>,
}

/// Runs `prompts` at once through `swarm`; returns each run and the wall time of all.
async fn run_all(
    swarm: &Arc<LocalSwarm>,
    client: &Client,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
    codec: Codec,
) -> Result<(Vec<Timed>, f64), Error> {
    let t0 = Instant::now();
    let tasks: Vec<_> = prompts
        .iter()
        .map(|prompt| {
            let (swarm, client, prompt, config) = (
                swarm.clone(),
                client.clone(),
                prompt.clone(),
                config.clone(),
            );
            tokio::spawn(async move {
                // The text callback runs once per token that completes printable text: for the
                // bench's plain English that is every token, and a token that does not print
                // alone is counted with the next one (never an extra count).
                let arrivals = Arc::new(std::sync::Mutex::new(Vec::new()));
                let record = arrivals.clone();
                let out = swarm
                    .generate(
                        &client,
                        prompt,
                        config,
                        codec,
                        Box::new(move |_| {
                            if let Ok(mut a) = record.lock() {
                                a.push(Instant::now());
                            }
                        }),
                    )
                    .await?;
                let arrivals = std::mem::take(
                    &mut *arrivals
                        .lock()
                        .map_err(|_| Error::Internal("arrival log poisoned".into()))?,
                );
                Ok::<_, Error>(Timed { out, arrivals })
            })
        })
        .collect();
    let mut runs = Vec::with_capacity(tasks.len());
    for task in tasks {
        let run = task
            .await
            .map_err(|e| Error::Generation(format!("session task failed: {e}")))??;
        runs.push(run);
    }
    Ok((runs, t0.elapsed().as_secs_f64()))
}

/// The engine alone, no network: `n` sessions prefilled one by one, then `decode` greedy
/// steps of all of them per [`ShardEngine::forward_batch`] call. Returns each session's tokens
/// and the aggregate decode tokens/s (the node-independent ceiling of batching).
fn engine_decode(
    engine: &ShardEngine,
    prompts: &[Vec<u32>],
    decode: usize,
) -> Result<(Vec<Vec<u32>>, f64), Error> {
    let argmax = |out: &neuroshard_core::ShardOutput| -> Result<u32, Error> {
        let (values, _) = out.to_f32_vec()?;
        let (best, _) = values
            .iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |b, (i, &v)| if v > b.1 { (i, v) } else { b },
            );
        Ok(best as u32)
    };
    let base = 1_000_000u64;
    let mut tokens = Vec::with_capacity(prompts.len());
    for (s, prompt) in prompts.iter().enumerate() {
        let id = base + s as u64;
        engine.open_session(id)?;
        let out = engine.forward(ForwardRequest {
            session: Some(id),
            logits: LogitsSelection::Last,
            adapter: None,
            ..ForwardRequest::new(ShardInput::tokens_from_slice(prompt, 1, prompt.len())?)
        })?;
        tokens.push(vec![argmax(&out)?]);
    }
    let t0 = Instant::now();
    for step in 0..decode.saturating_sub(1) {
        let reqs = tokens
            .iter()
            .enumerate()
            .map(|(s, t)| {
                Ok(ForwardRequest {
                    session: Some(base + s as u64),
                    start_pos: prompts[s].len() + step,
                    logits: LogitsSelection::Last,
                    adapter: None,
                    ..ForwardRequest::new(ShardInput::tokens_from_slice(&t[step..], 1, 1)?)
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        for (t, out) in tokens.iter_mut().zip(engine.forward_batch(reqs)) {
            t.push(argmax(&out?)?);
        }
    }
    let rate = (prompts.len() * decode.saturating_sub(1)) as f64 / t0.elapsed().as_secs_f64();
    for s in 0..prompts.len() {
        engine.close_session(base + s as u64)?;
    }
    Ok((tokens, rate))
}

/// Decode tokens/s of sessions that ran at once: all decode steps over the longest decode
/// window (the sessions decode side by side, so that window covers every one of them). This
/// also counts the stretch where the first sessions decode while later ones still prefill.
fn aggregate_decode(runs: &[Timed]) -> f64 {
    let steps: usize = runs
        .iter()
        .map(|r| r.out.tokens.len().saturating_sub(1))
        .sum();
    let window = runs
        .iter()
        .map(|r| r.out.decode_time.as_secs_f64())
        .fold(0f64, f64::max);
    steps as f64 / window.max(1e-9)
}

/// Decode tokens/s while every session decodes: tokens that arrived between the moment the
/// last session got its first token and the moment the first session got its last one, over
/// that time. This is what `llama-batched-bench` reports as S_TG (all sequences prefilled,
/// then decoded together); `None` when the sessions never all decoded at once.
fn all_decoding_rate(runs: &[Timed]) -> Option<f64> {
    let firsts = runs.iter().map(|r| r.arrivals.first().copied());
    let start = firsts.collect::<Option<Vec<_>>>()?.into_iter().max()?;
    let lasts = runs.iter().map(|r| r.arrivals.last().copied());
    let end = lasts.collect::<Option<Vec<_>>>()?.into_iter().min()?;
    let window = end.checked_duration_since(start)?.as_secs_f64();
    let tokens = runs
        .iter()
        .flat_map(|r| &r.arrivals)
        .filter(|&&t| t > start && t <= end)
        .count();
    (window > 0.0 && tokens > 0).then(|| tokens as f64 / window)
}

pub(crate) fn run(args: BenchSessionsArgs, threads: usize) -> Result<(), Error> {
    let max_sessions = args.sessions.iter().copied().max().unwrap_or(1);
    let config = GenerationConfig {
        max_tokens: args.decode_tokens,
        ignore_eos: true,
        ..GenerationConfig::default()
    };
    let machine = machine_name();
    let mut records = Vec::new();
    if args.engine_too {
        // One open of the file for the config, the whole model and the tokenizer.
        let file = Arc::new(WeightFile::open(&args.model)?);
        let layers = file.config().num_layers;
        let tokenizer = Tokenizer::for_model(&file)?;
        let engine = ShardEngine::from_file(
            file,
            0..layers,
            args.engine.options(args.mode),
            &mut |_, _| {},
        )?;
        let prompts = bench_prompts(&tokenizer, max_sessions, args.prompt_tokens)?;
        let mut one = None;
        for &n in &args.sessions {
            let (_, rate) = engine_decode(&engine, &prompts[..n], args.decode_tokens)?;
            let base_rate = *one.get_or_insert(rate);
            eprintln!(
                "engine only, {n:>2} sessions: {rate:7.1} tok/s aggregate decode ({:.2}x one session)",
                rate / base_rate
            );
            records.push(serde_json::Value::Object(rate_record(
                format!("sessions_decode_engine_sessions{n}"),
                rate,
                base_rate,
                n,
                &machine,
                threads,
            )));
        }
    }
    tokio_runtime()?.block_on(async {
        for &nodes in &args.nodes {
            let options = args.engine.options(args.mode);
            let swarm = Arc::new(
                LocalSwarm::start(&args.model, nodes, 1, options, &mut |line| {
                    eprintln!("{line}")
                })
                .await?,
            );
            let client = Client::bind_default().await?;
            let prompts = bench_prompts(swarm.tokenizer(), max_sessions, args.prompt_tokens)?;
            // Every session's solo text, the reference its batched run must reproduce.
            let mut solo = Vec::with_capacity(max_sessions);
            for prompt in &prompts {
                let (mut outs, _) = run_all(
                    &swarm,
                    &client,
                    std::slice::from_ref(prompt),
                    &config,
                    args.codec,
                )
                .await?;
                solo.push(outs.remove(0).out.tokens);
            }
            let mut one_session = None;
            for &n in &args.sessions {
                let (mut best, mut best_window, mut best_wall) = (0f64, 0f64, 0f64);
                let mut p95 = f64::INFINITY;
                let before = swarm
                    .nodes
                    .iter()
                    .map(|n| n.engine().stats())
                    .collect::<Vec<_>>();
                for _ in 0..args.reps.max(1) {
                    let (runs, wall) =
                        run_all(&swarm, &client, &prompts[..n], &config, args.codec).await?;
                    for (s, run) in runs.iter().enumerate() {
                        if run.out.tokens != solo[s] {
                            return Err(Error::Generation(format!(
                                "{nodes} node(s), {n} sessions: session {s}'s tokens differ \
                                 from its solo run"
                            )));
                        }
                    }
                    let tokens: usize = runs.iter().map(|r| r.out.tokens.len()).sum();
                    p95 = p95.min(decode_latency_p95_ms(&runs));
                    let window = aggregate_decode(&runs);
                    best = best.max(all_decoding_rate(&runs).unwrap_or(window));
                    best_window = best_window.max(window);
                    best_wall = best_wall.max(tokens as f64 / wall);
                }
                // The same point beside a flooding client: texts and latency.
                // Best of `reps` as for the point alone, each rep with a fresh flooder.
                let flooded = if args.flood {
                    let (mut rate, mut flood_p95, mut answered) = (0f64, f64::INFINITY, 0);
                    for _ in 0..args.reps.max(1) {
                        let flood = Flood::start(&swarm.nodes).await?;
                        let (runs, _) =
                            run_all(&swarm, &client, &prompts[..n], &config, args.codec).await?;
                        answered += flood.stop().await;
                        if runs
                            .iter()
                            .zip(&solo)
                            .any(|(run, solo)| &run.out.tokens != solo)
                        {
                            return Err(Error::Generation(format!(
                                "{nodes} node(s), {n} sessions: a text changed under the flood"
                            )));
                        }
                        let this = all_decoding_rate(&runs).unwrap_or(aggregate_decode(&runs));
                        rate = rate.max(this);
                        flood_p95 = flood_p95.min(decode_latency_p95_ms(&runs));
                    }
                    eprintln!(
                        "{nodes} node(s), {n:>2} sessions under a flood: {rate:7.1} tok/s, \
                         decode p95 {flood_p95:.1} ms (alone {p95:.1} ms), {answered} flood \
                         requests answered with refusals; texts equal their solo runs"
                    );
                    Some((rate, flood_p95, answered))
                } else {
                    None
                };
                // How the nodes batched: decode steps per batch, over all nodes.
                let (mut batches, mut batched) = (0u64, 0u64);
                for (node, was) in swarm.nodes.iter().zip(&before) {
                    let now = node.engine().stats();
                    batches += now.decode_batches - was.decode_batches;
                    batched += now.batched_steps - was.batched_steps;
                }
                let per_batch = batched as f64 / batches.max(1) as f64;
                let base_rate = *one_session.get_or_insert(best);
                eprintln!(
                    "{nodes} node(s), {n:>2} sessions: {best:7.1} tok/s aggregate decode \
                     ({:.2}x one session; {best_window:.1} tok/s over the longest decode, \
                     {best_wall:.1} over the whole run), {per_batch:.1} steps per node batch; \
                     texts equal their solo runs",
                    best / base_rate
                );
                let mut record = rate_record(
                    format!("sessions_decode_nodes{nodes}_sessions{n}"),
                    best,
                    base_rate,
                    n,
                    &machine,
                    threads,
                );
                if let serde_json::Value::Object(more) = serde_json::json!({
                    "measured_while": "every session decodes (as llama-batched-bench's S_TG)",
                    "longest_decode_tokens_per_sec": rounded(best_window, 10.0),
                    "whole_run_tokens_per_sec": rounded(best_wall, 10.0),
                    "steps_per_node_batch": rounded(per_batch, 100.0),
                    "nodes": nodes,
                    "prompt_tokens": args.prompt_tokens,
                    "decode_tokens": args.decode_tokens,
                    "mode": args.mode,
                    "texts_equal_solo": true,
                }) {
                    record.extend(more);
                }
                record.insert(
                    "decode_p95_ms".into(),
                    serde_json::json!(rounded(p95, 10.0)),
                );
                if let Some((rate, flood_p95, answered)) = flooded {
                    if let serde_json::Value::Object(more) = serde_json::json!({
                        "flood_tokens_per_sec": rounded(rate, 10.0),
                        "flood_decode_p95_ms": rounded(flood_p95, 10.0),
                        "flood_p95_over_alone": rounded(flood_p95 / p95.max(1e-9), 1000.0),
                        "flood_requests_answered": answered,
                        "flood_texts_equal_solo": true,
                    }) {
                        record.extend(more);
                    }
                }
                records.push(serde_json::Value::Object(record));
            }
            client.shutdown().await;
            swarm.shutdown().await;
        }
        Ok::<(), Error>(())
    })?;
    if let Some(path) = &args.json {
        write_json(path, &serde_json::Value::Array(records))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
