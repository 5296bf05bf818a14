//! Separate `neuroshard node` processes on 127.0.0.1 (layers 0-10, 10-20 twice, 20-30) joined
//! by gossip through the first; `neuroshard generate --peers` (no model file) reproduces the
//! reference. Then the middle hop of that route is killed with SIGKILL and a new generation
//! fails over to its replica with the same text. Every process is killed when the test ends.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the node processes however the test ends.
struct Nodes(Vec<(Child, String)>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for (child, _) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_neuroshard")
}

/// Starts a node and returns it with the address line it prints first.
fn start_node(
    dir: &std::path::Path,
    start: usize,
    end: usize,
    tag: &str,
    peers: Option<&str>,
) -> (Child, String) {
    let mut cmd = Command::new(bin());
    cmd.args(["--threads", "1", "node", "--model"])
        .arg(smollm2())
        .args([
            "--start",
            &start.to_string(),
            "--end",
            &end.to_string(),
            "--mode",
            "fast",
        ])
        .arg("--key-file")
        .arg(dir.join(format!("{tag}.key")))
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(p) = peers {
        cmd.args(["--peers", p]);
    }
    let mut child = cmd.spawn().expect("spawn node");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    // The address line comes once the slice is loaded and the endpoint bound (bounded by the
    // test's overall timeout: a node that dies closes stdout and read_line returns 0).
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("address line");
    assert!(line.contains('@'), "node {tag} printed {line:?}");
    (child, line.trim().to_string())
}

fn run(args: &[&str]) -> (String, String, bool) {
    let out = Command::new(bin()).args(args).output().expect("run");
    (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
        out.status.success(),
    )
}

#[test]
fn separate_node_processes_generate_and_fail_over() {
    let dir = std::env::temp_dir().join(format!("neuroshard-procs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let mut nodes = Nodes(Vec::new());
    let a = start_node(&dir, 0, 10, "a", None);
    let entry = a.1.clone();
    nodes.0.push(a);
    for (start, end, tag) in [(10, 20, "b1"), (10, 20, "b2"), (20, 30, "c")] {
        nodes
            .0
            .push(start_node(&dir, start, end, tag, Some(&entry)));
    }
    // Wait (bounded) until the entry's PeerSet lists all four nodes.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (out, _, ok) = run(&["peers", "--peers", &entry]);
        if ok && out.contains(", 4 nodes") {
            break;
        }
        assert!(Instant::now() < deadline, "swarm did not converge: {out}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let reference = reference_json("smollm2");
    let prompt = reference["prompt"].as_str().expect("prompt");
    let text = reference["greedy_text"].as_str().expect("text");
    let (out, err, ok) = run(&[
        "generate",
        "--peers",
        &entry,
        "--prompt",
        prompt,
        "--max-tokens",
        "24",
    ]);
    assert!(ok, "{err}");
    assert_eq!(out.trim_end_matches('\n'), text);

    // SIGKILL the middle hop of the route just used; its announcement is still live, so the next
    // session is planned through it, fails, and moves to the replica.
    let route_line = err
        .lines()
        .find(|l| l.contains("route:"))
        .expect("route line");
    let middle = route_line.split(" -> ").nth(1).expect("middle hop");
    let short = &middle[..middle.find('[').expect("layers")];
    let victim = nodes
        .0
        .iter_mut()
        .find(|(_, addr)| addr.starts_with(short))
        .expect("victim process");
    victim.0.kill().expect("kill -9");
    victim.0.wait().expect("reap");
    let (out, err, ok) = run(&[
        "generate",
        "--peers",
        &entry,
        "--prompt",
        prompt,
        "--max-tokens",
        "24",
    ]);
    assert!(ok, "{err}");
    assert_eq!(out.trim_end_matches('\n'), text, "after failover");
    drop(nodes);
    std::fs::remove_dir_all(&dir).ok();
}
