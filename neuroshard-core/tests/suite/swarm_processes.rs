//! Separate `neuroshard node` processes on 127.0.0.1 (exact mode): layers 0-10, 10-20 and
//! 20-30, two replicas each, joined by gossip. `neuroshard generate --peers` (no model file,
//! f16 frames) reproduces the reference; then, mid-generation, the first, a middle and the last
//! hop are killed with SIGKILL, a middle hop is stalled with SIGSTOP and one leaves with
//! SIGTERM. Each time the text (64 tokens, starting with the reference's 24) must equal the
//! undisturbed run's; node counters (read over the
//! protocol) show the victim served steps before the fault and its replica after it; the
//! client's recovery summary shows a refill from the predecessor (no full replay), or for
//! SIGTERM a KV hand-over and nothing refilled at all. Every process is killed when the test
//! ends, stalled ones included.

use crate::common::*;
use neuroshard_core::net::endpoint::{parse_peer_addr, EndpointOptions};
use neuroshard_core::net::now_ms;
use neuroshard_core::Client;
use neuroshard_core::NodeStats;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_neuroshard")
}

/// One node process.
struct Proc {
    child: Child,
    addr: String,
    layers: (usize, usize),
    log: std::path::PathBuf,
}

/// The node processes; all are killed (stalled ones resumed first) however the test ends.
struct Swarm {
    dir: std::path::PathBuf,
    procs: Vec<Proc>,
    started: usize,
    runtime: tokio::runtime::Runtime,
    client: Client,
    /// Nodes started from now on pin this model id and have an empty manifest cache, so
    /// each must fetch the manifest from the node it joins through.
    pin: Option<String>,
}

impl Drop for Swarm {
    fn drop(&mut self) {
        for p in &mut self.procs {
            signal(&p.child, "CONT");
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

fn signal(child: &Child, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .stderr(Stdio::null())
        .status();
}

impl Swarm {
    fn new() -> Swarm {
        let dir = std::env::temp_dir().join(format!("neuroshard-procs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let client = runtime
            .block_on(Client::new(
                iroh::SecretKey::generate(),
                EndpointOptions::default(),
            ))
            .expect("client");
        Swarm {
            dir,
            procs: Vec::new(),
            started: 0,
            runtime,
            client,
            pin: None,
        }
    }

    /// Spawns nodes for `slices` (joining through the first live node, if any) and waits for
    /// their address lines.
    fn start(&mut self, slices: &[(usize, usize)]) {
        // Joining through a plain host:port (the node answers with its address line on TCP).
        let entry = self
            .procs
            .first()
            .and_then(|p| p.addr.split_once('@'))
            .map(|(_, sock)| sock.to_string());
        let mut children = Vec::new();
        for &(start, end) in slices {
            self.started += 1;
            let mut cmd = Command::new(bin());
            cmd.args(["--threads", "1", "node", "--model"])
                .arg(smollm2())
                .args(["--start", &start.to_string(), "--end", &end.to_string()])
                .arg("--key-file")
                .arg(self.dir.join(format!("node{}.key", self.started)))
                .stdout(Stdio::piped())
                .stderr(
                    std::fs::File::create(self.dir.join(format!("node{}.log", self.started)))
                        .map(Stdio::from)
                        .unwrap_or_else(|_| Stdio::null()),
                );
            if let Some(e) = &entry {
                cmd.args(["--peers", e]);
            }
            if let Some(id) = &self.pin {
                cmd.args(["--model-id", id]).env(
                    "NEUROSHARD_CACHE_DIR",
                    self.dir.join(format!("cache{}", self.started)),
                );
            }
            let log = self.dir.join(format!("node{}.log", self.started));
            children.push((cmd.spawn().expect("spawn node"), (start, end), log));
        }
        for (mut child, layers, log) in children {
            let stdout = child.stdout.take().expect("stdout");
            let mut line = String::new();
            // The address line comes once the slice is loaded and the endpoint bound; a node
            // that dies closes stdout and read_line returns 0.
            BufReader::new(stdout)
                .read_line(&mut line)
                .expect("address line");
            assert!(line.contains('@'), "node {layers:?} printed {line:?}");
            self.procs.push(Proc {
                child,
                addr: line.trim().to_string(),
                layers,
                log,
            });
        }
    }

    fn stats(&self, addr: &str) -> Option<NodeStats> {
        let addr = parse_peer_addr(addr).ok()?;
        self.runtime
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(2), self.client.fetch_stats(&addr)).await
            })
            .ok()?
            .ok()
    }

    /// Waits (bounded) until every node's PeerSet holds exactly the live processes: the new
    /// ones, and no killed one (whose announcement lives until its TTL runs out).
    fn wait_converged(&self) {
        let mut want: Vec<String> = self
            .procs
            .iter()
            .filter_map(|p| parse_peer_addr(&p.addr).ok())
            .map(|a| a.id.to_string())
            .collect();
        want.sort();
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let seen: Vec<Option<Vec<String>>> = self
                .procs
                .iter()
                .map(|p| {
                    let entry = parse_peer_addr(&p.addr).ok()?;
                    self.runtime.block_on(async {
                        let info = self.client.fetch_model_info(&entry).await.ok()?;
                        let peers = self.client.fetch_peers(&entry, &info.model_id).await.ok()?;
                        let mut ids: Vec<String> = peers
                            .iter()
                            .filter(|(_, e)| e.usable(now_ms()))
                            .map(|(id, _)| id.to_string())
                            .collect();
                        ids.sort();
                        Some(ids)
                    })
                })
                .collect();
            if seen.iter().all(|s| s.as_ref() == Some(&want)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "swarm did not converge to {want:?}: {seen:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Every node's stderr so far, for failure messages.
    fn logs(&self) -> String {
        self.procs
            .iter()
            .map(|p| {
                format!(
                    "--- {} [{:?}]\n{}",
                    &p.addr[..10],
                    p.layers,
                    std::fs::read_to_string(&p.log).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn index_of(&self, short: &str) -> usize {
        self.procs
            .iter()
            .position(|p| p.addr.starts_with(short))
            .expect("route hop is one of our processes")
    }
}

/// What `generate` printed.
struct Generated {
    text: String,
    stderr: String,
    ok: bool,
}

/// Runs `generate --peers <all nodes>`; once the route is printed, `during(route)` runs (it
/// may disturb a hop) while tokens stream.
fn generate(peers: &[String], extra: &[&str], during: impl FnOnce(&[String])) -> Generated {
    let reference = reference_json("smollm2");
    let prompt = reference["prompt"].as_str().expect("prompt");
    let mut cmd = Command::new(bin());
    cmd.args(["--threads", "1", "generate", "--peers"]);
    cmd.args(peers);
    // 64 tokens: long enough that a fault injected after a few steps is recovered from well
    // before the end (decode runs at ~80 tokens/s); the first 24 are the reference's.
    cmd.args(["--prompt", prompt, "--max-tokens", "64", "--ignore-eos"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn generate");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("route:") {
                let _ = tx.send(line.clone());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let mut stdout = child.stdout.take().expect("stdout");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    if let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) {
        let route: Vec<String> = line
            .split("route: ")
            .nth(1)
            .expect("route")
            .split(" -> ")
            .map(|h| h[..h.find('[').expect("layers")].to_string())
            .collect();
        during(&route);
    }
    let status = child.wait().expect("wait generate");
    Generated {
        text: out_reader.join().expect("stdout"),
        stderr: reader.join().expect("stderr"),
        ok: status.success(),
    }
}

/// Waits (bounded) until `addr` has computed more than `steps` steps.
fn wait_steps(swarm: &Swarm, addr: &str, steps: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = swarm.stats(addr) {
            if s.steps > steps {
                return s.steps;
            }
        }
        assert!(Instant::now() < deadline, "{addr} never served a step");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn expected_text() -> String {
    reference_json("smollm2")["greedy_text"]
        .as_str()
        .expect("text")
        .to_string()
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    Kill,
    Stop,
    Term,
}

/// Disturbs hop `hop` of the route mid-generation and checks text, counters and recovery.
fn disturb(swarm: &mut Swarm, hop: usize, fault: Fault, undisturbed: &str) {
    let before: Vec<Option<NodeStats>> = swarm.procs.iter().map(|p| swarm.stats(&p.addr)).collect();
    let mut victim = None;
    let mut victim_steps = 0;
    // A killed or stalled hop is noticed by the step deadline at the latest.
    let extra: &[&str] = &["--step-timeout-ms", "2000"];
    let peers: Vec<String> = swarm.procs.iter().map(|p| p.addr.clone()).collect();
    let g = generate(&peers, extra, |route| {
        let i = swarm.index_of(&route[hop]);
        let addr = swarm.procs[i].addr.clone();
        let base = before[i].as_ref().map_or(0, |s| s.steps);
        // The prefill and a few decode steps went through it.
        victim_steps = wait_steps(swarm, &addr, base + 4) - base;
        match fault {
            Fault::Kill => swarm.procs[i].child.kill().expect("kill -9"),
            Fault::Stop => signal(&swarm.procs[i].child, "STOP"),
            Fault::Term => signal(&swarm.procs[i].child, "TERM"),
        }
        victim = Some(i);
    });
    let v = victim.expect("route printed");
    assert!(g.ok, "{fault:?} hop {hop}: {}", g.stderr);
    assert_eq!(g.text, undisturbed, "{fault:?} hop {hop}: text changed");
    assert!(
        victim_steps >= 5,
        "victim served {victim_steps} steps before"
    );
    let recovery = g
        .stderr
        .lines()
        .find(|l| l.starts_with("recovery:"))
        .expect("recovery line")
        .to_string();
    let layers = swarm.procs[v].layers;
    let replica = (0..swarm.procs.len())
        .find(|&i| i != v && swarm.procs[i].layers == layers)
        .expect("replica");
    let replica_after = swarm
        .stats(&swarm.procs[replica].addr)
        .expect("replica stats");
    let replica_before = before[replica].clone().expect("replica stats before");
    assert!(
        replica_after.steps > replica_before.steps,
        "{fault:?} hop {hop}: replica never served ({replica_before:?} -> {replica_after:?}); \
         client: {}; nodes: {}",
        g.stderr,
        swarm.logs()
    );
    match fault {
        Fault::Kill | Fault::Stop => {
            assert_eq!(
                recovery, "recovery: 1 failovers, 1 refills, 0 full replays, 0 hand-overs",
                "{fault:?} hop {hop}"
            );
            assert_eq!(replica_after.fills, replica_before.fills + 1);
        }
        Fault::Term => {
            assert_eq!(
                recovery,
                "recovery: 0 failovers, 0 refills, 0 full replays, 1 hand-overs",
                "hop {hop}; client: {}; nodes: {}",
                g.stderr,
                swarm.logs()
            );
            assert_eq!(replica_after.handovers_in, replica_before.handovers_in + 1);
            for (i, p) in swarm.procs.iter().enumerate() {
                if let (Some(b), Some(a)) = (&before[i], swarm.stats(&p.addr)) {
                    assert_eq!((a.fills, a.replays), (b.fills, b.replays), "no replay");
                }
            }
            // The leaving node exits by itself once the session moved.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(status) = swarm.procs[v].child.try_wait().expect("wait") {
                    assert!(status.success(), "graceful exit: {status}");
                    break;
                }
                assert!(Instant::now() < deadline, "leaving node did not exit");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    // Replace the victim so the next scenario has replicas everywhere again.
    let mut gone = swarm.procs.remove(v);
    signal(&gone.child, "CONT");
    let _ = gone.child.kill();
    let _ = gone.child.wait();
    swarm.start(&[layers]);
    swarm.wait_converged();
}

#[test]
fn separate_node_processes_generate_and_survive_every_fault() {
    let mut swarm = Swarm::new();
    swarm.start(&[(0, 10)]);
    swarm.start(&[(0, 10), (10, 20), (10, 20), (20, 30), (20, 30)]);
    swarm.wait_converged();

    let peers: Vec<String> = swarm.procs.iter().map(|p| p.addr.clone()).collect();
    let g = generate(&peers, &[], |_| {});
    assert!(g.ok, "{}", g.stderr);
    assert!(
        g.text.starts_with(&expected_text()),
        "{:?} does not start with the reference",
        g.text
    );
    assert!(
        g.stderr
            .contains("recovery: 0 failovers, 0 refills, 0 full replays, 0 hand-overs"),
        "{}",
        g.stderr
    );

    // `peers --json`: every node with its layers and its standing in this client's (empty)
    // reputation table: probation, score 0.
    let table = swarm.dir.join("client-reputation.json");
    let out = Command::new(bin())
        .args(["peers", "--json", "--peers", &peers[0], "--reputation"])
        .arg(&table)
        .output()
        .expect("peers --json");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let view: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let nodes = view["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 6, "{view}");
    for n in nodes {
        assert_eq!(n["state"], "probation", "{n}");
        assert_eq!(n["score"], 0.0, "{n}");
        assert!(n["reason"].is_string() && n["layers"].is_array(), "{n}");
    }

    let undisturbed = g.text;
    disturb(&mut swarm, 1, Fault::Kill, &undisturbed);
    disturb(&mut swarm, 0, Fault::Kill, &undisturbed);
    disturb(&mut swarm, 2, Fault::Kill, &undisturbed);
    disturb(&mut swarm, 1, Fault::Stop, &undisturbed);
    disturb(&mut swarm, 1, Fault::Term, &undisturbed);
}

/// `neuroshard generate` with `args`, 8 greedy tokens; its stdout (the generated text).
fn generate_text(args: &[&str], prompt: &str) -> String {
    finish_generate(spawn_generate(args, prompt, 8), args)
}

/// Starts `neuroshard generate` with `args` for `tokens` greedy tokens.
fn spawn_generate(args: &[&str], prompt: &str, tokens: usize) -> Child {
    Command::new(bin())
        .args(["--threads", "1", "generate"])
        .args(args)
        .args([
            "--prompt",
            prompt,
            "--max-tokens",
            &tokens.to_string(),
            "--ignore-eos",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run generate")
}

/// Waits for a `generate` process; its stdout (the generated text).
fn finish_generate(child: Child, args: &[&str]) -> String {
    let out = child.wait_with_output().expect("wait generate");
    assert!(
        out.status.success(),
        "generate {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 text")
}

/// Every node's stats once it holds no session any more (closing is asynchronous to the
/// client's exit), bounded in time.
fn stats_when_idle(swarm: &Swarm) -> Vec<NodeStats> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stats: Vec<NodeStats> = swarm
            .procs
            .iter()
            .map(|p| swarm.stats(&p.addr).expect("stats"))
            .collect();
        if stats.iter().all(|s| s.sessions_open == 0) {
            return stats;
        }
        assert!(Instant::now() < deadline, "sessions stayed open: {stats:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_long_prompt_through_three_node_processes_equals_one_process() {
    // ~2,000 tokens of prose: four chunks of 512 that pipeline hop to hop (the client's step
    // deadline grows with the prompt instead of a fixed 30 s).
    let text = std::fs::read_to_string("/usr/share/common-licenses/GPL-3").expect("GPL-3");
    let tokenizer = neuroshard_core::Tokenizer::open(&smollm2()).expect("tokenizer");
    let ids = tokenizer.encode(&text).expect("encode");
    let prompt = tokenizer.decode(&ids[..2000]).expect("decode");
    let mut swarm = Swarm::new();
    // The first node, then two that join through it.
    swarm.start(&[(0, 10)]);
    // The joiners pin the model id and have no manifest at hand: each takes the manifest
    // from the first node, checks it against the id, and hashes only its own slice.
    let model_id = neuroshard_core::WeightFile::open(smollm2())
        .and_then(|f| f.identity())
        .expect("model id")
        .id;
    swarm.pin = Some(model_id.clone());
    swarm.start(&[(10, 20), (20, 30)]);
    swarm.wait_converged();
    for p in &swarm.procs[1..] {
        let log = std::fs::read_to_string(&p.log).unwrap_or_default();
        assert!(
            log.contains(&format!("manifest of model {model_id} from peer")),
            "{log}"
        );
    }
    let peers: Vec<String> = swarm.procs.iter().map(|p| p.addr.clone()).collect();
    // Lossless frames between hops, so the text must equal the single process's exactly.
    let mut args = vec!["--codec", "f32", "--peers"];
    args.extend(peers.iter().map(String::as_str));
    let over_swarm = generate_text(&args, &prompt);
    let model = smollm2();
    let alone = generate_text(&["--model", model.to_str().expect("utf-8 path")], &prompt);
    assert!(!alone.trim().is_empty(), "no text generated");
    assert_eq!(over_swarm, alone, "{}", swarm.logs());

    // Accounting: each hop sent its successor the prompt's hidden states (f32 frames, 576
    // values a position) and the successor counted the same bytes in; the last hop sends
    // tokens only. With the session closed, no KV cache or replay record is left.
    let stats = stats_when_idle(&swarm);
    let prompt_bytes = 2000 * 576 * 4;
    for hop in 0..2 {
        assert!(
            stats[hop].hidden_bytes_sent >= prompt_bytes,
            "hop {hop}: {stats:?}"
        );
        assert_eq!(
            stats[hop + 1].hidden_bytes_received,
            stats[hop].hidden_bytes_sent,
            "hop {hop}: {stats:?}"
        );
    }
    assert_eq!(stats[2].hidden_bytes_sent, 0, "{stats:?}");
    for s in &stats {
        assert_eq!((s.kv_cache_bytes, s.sent_state_bytes), (0, 0), "{stats:?}");
    }

    // Separate node processes batch the decode steps of concurrent sessions, and every
    // session's text equals its solo run's.
    let prompts = [
        "The capital of France is",
        "Gravity is a force that",
        "A good breakfast includes",
        "The ocean is home to",
    ];
    let mut args = vec!["--peers"];
    args.extend(peers.iter().map(String::as_str));
    let solo: Vec<String> = prompts
        .iter()
        .map(|p| finish_generate(spawn_generate(&args, p, 24), &args))
        .collect();
    let before = stats_when_idle(&swarm);
    let children: Vec<Child> = prompts
        .iter()
        .map(|p| spawn_generate(&args, p, 24))
        .collect();
    let together: Vec<String> = children
        .into_iter()
        .map(|c| finish_generate(c, &args))
        .collect();
    assert_eq!(together, solo, "concurrent sessions changed a text");
    let after = stats_when_idle(&swarm);
    let batched: u64 = after
        .iter()
        .zip(&before)
        .map(|(a, b)| a.batched_steps - b.batched_steps)
        .sum();
    assert!(batched > 0, "no decode batch formed: {after:?}");
}
