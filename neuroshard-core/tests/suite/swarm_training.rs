//! Training over separate `neuroshard node` processes on 127.0.0.1 (issue 16): the tiny
//! fixtures split over 2 and 3 processes give Hugging Face's loss, every parameter gradient
//! and the loss after one AdamW step, tied embeddings included; the step commits in two
//! phases under the trainer's certificate; a node refuses trainers it does not allow;
//! SmolLM2 learns a LoRA adapter that the same nodes then serve; crashes in either phase
//! leave every node on one version; f16 and q8 gradient frames keep the loss curve near the
//! f32 one; training memory per node is bounded and reported.

use crate::common::*;
use neuroshard_core::net::endpoint::{parse_peer_addr, EndpointOptions};
use neuroshard_core::train::examples_from_text;
use neuroshard_core::train::Outcome;
use neuroshard_core::{
    AdamWConfig, Client, Codec, LoraConfig, RouteHop, SecretKey, SwarmOptions, SwarmSession,
    TextRequest, TrainOptions, TrainTarget, Trainer,
};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Node processes, killed however the test ends.
struct Nodes {
    dir: PathBuf,
    model: PathBuf,
    slices: Vec<(usize, usize)>,
    mode: String,
    trainer: String,
    /// Each node keeps training checkpoints in its own directory.
    checkpoints: bool,
    /// More flags for every node.
    extra_args: Vec<String>,
    children: Vec<Option<Child>>,
    route: Vec<RouteHop>,
    /// The address line of a node of another group that the first node joins.
    join: Option<String>,
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::env::var_os("NEUROSHARD_KEEP_LOGS").is_none() {
            std::fs::remove_dir_all(&self.dir).ok();
        }
    }
}

impl Nodes {
    /// One process per slice of `model`, in `mode`, allowing `trainer`; the later ones join
    /// the first by gossip.
    fn start(
        model: &Path,
        slices: &[(usize, usize)],
        mode: &str,
        trainer: &SecretKey,
        tag: &str,
    ) -> Nodes {
        Nodes::new(model, slices, mode, trainer, tag).launch()
    }

    /// The same, described but not started (set `checkpoints`, `extra_args` or `join`, then
    /// [`Nodes::launch`]).
    fn new(
        model: &Path,
        slices: &[(usize, usize)],
        mode: &str,
        trainer: &SecretKey,
        tag: &str,
    ) -> Nodes {
        Nodes {
            dir: Nodes::dir(tag),
            model: model.to_path_buf(),
            slices: slices.to_vec(),
            mode: mode.to_string(),
            trainer: trainer.public().to_string(),
            checkpoints: false,
            extra_args: Vec::new(),
            children: Vec::new(),
            route: Vec::new(),
            join: None,
        }
    }

    /// The test's directory for group `tag` (keys, logs, checkpoints).
    fn dir(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("neuroshard-train-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    /// Starts every node described (none running yet).
    fn launch(mut self) -> Nodes {
        for i in 0..self.slices.len() {
            let (child, hop) = self.spawn(i);
            self.children.push(Some(child));
            self.route.push(hop);
        }
        self
    }

    /// Starts node `i` (its key and checkpoint directory survive restarts; a restart binds
    /// the port it had, as a node restarted on its configured `--port` does) and waits for
    /// its address line.
    fn spawn(&self, i: usize) -> (Child, RouteHop) {
        let (start, end) = self.slices[i];
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_neuroshard"));
        cmd.args(["--threads", "1", "node", "--model"])
            .arg(&self.model)
            .args(["--start", &start.to_string(), "--end", &end.to_string()])
            .args(["--mode", &self.mode, "--trainer", &self.trainer])
            .arg("--key-file")
            .arg(self.dir.join(format!("node{i}.key")))
            .stdout(Stdio::piped())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join(format!("node{i}.log")))
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null()),
            );
        cmd.args(&self.extra_args);
        if self.checkpoints {
            cmd.arg("--checkpoint")
                .arg(self.dir.join(format!("ckpt{i}")));
        }
        let first = self.route.first().filter(|_| i > 0);
        if let Some(peer) = first.map(address_line).or(self.join.clone()) {
            cmd.args(["--peers", &peer]);
        }
        let mut child = cmd.spawn().expect("spawn node");
        let mut line = String::new();
        // The address line comes once the slice is loaded and the endpoint bound.
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("address line");
        let addr = parse_peer_addr(line.trim()).expect("address");
        let hop = RouteHop {
            node: addr.id,
            layers: start as u32..end as u32,
            addrs: addr.ip_addrs().copied().collect(),
        };
        (child, hop)
    }

    /// SIGKILL to node `i`.
    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restarts every node from its checkpoints.
    fn restart_all(&mut self) {
        for i in 0..self.slices.len() {
            self.kill(i);
        }
        for i in 0..self.slices.len() {
            self.restart(i);
        }
    }

    /// Starts node `i` again, from its checkpoints.
    fn restart(&mut self, i: usize) {
        let (child, hop) = self.spawn(i);
        self.children[i] = Some(child);
        self.route[i] = hop;
    }
}

/// `<id>@<ip:port>` of a hop.
fn address_line(hop: &RouteHop) -> String {
    format!("{}@{}", hop.node, hop.addrs[0])
}

impl Nodes {
    /// The first node, as an address to join through.
    fn entry(&self) -> neuroshard_core::EndpointAddr {
        parse_peer_addr(&address_line(&self.route[0])).expect("entry")
    }

    /// Node `i`'s address.
    fn addr(&self, i: usize) -> neuroshard_core::EndpointAddr {
        parse_peer_addr(&address_line(&self.route[i])).expect("address")
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Full training of `model` over `slices` in separate processes, `micros` micro-batches per
/// step, against the fixture's reference.
fn check_parity(model: &str, slices: &[(usize, usize)], micros: usize) {
    let what = format!(
        "{model} over {} processes, {micros} micro-batch(es)",
        slices.len()
    );
    let trainer_key = SecretKey::generate();
    let nodes = Nodes::start(&fixtures().join(model), slices, "f32", &trainer_key, model);
    let reference = reference_json(model);
    let tensors = reference_tensors(model);
    let ids: Vec<Vec<u32>> = tensors["input_ids"]
        .to_dtype(candle_core::DType::U32)
        .and_then(|t| t.to_vec2())
        .expect("ids");
    // All sequences in one micro-batch, or one sequence per micro-batch.
    let batches: Vec<Vec<Vec<u32>>> = if micros == 1 {
        vec![ids.clone()]
    } else {
        ids.iter().map(|s| vec![s.clone()]).collect()
    };
    assert_eq!(batches.len(), micros);
    let rt = runtime();
    rt.block_on(async {
        let client = Client::new(trainer_key.clone(), EndpointOptions::default())
            .await
            .expect("client");
        let entry = nodes.entry();
        // The fixtures have no tokenizer, so no model info: the id comes from the file.
        let model_id = neuroshard_core::WeightFile::open(fixtures().join(model))
            .and_then(|f| f.identity().map(|i| i.id))
            .expect("model id");
        let options = TrainOptions {
            target: TrainTarget::Full,
            codec: Codec::F32,
            adamw: reference_adamw(model),
            ..TrainOptions::default()
        };
        let mut trainer = Trainer::begin(client.clone(), &model_id, nodes.route.clone(), options)
            .await
            .expect("begin");
        let before = trainer.versions().to_vec();
        // A trainer the nodes do not allow is refused: its connection is closed unserved.
        let stranger = Client::new(SecretKey::generate(), EndpointOptions::default())
            .await
            .expect("client");
        let refused = Trainer::begin(
            stranger.clone(),
            &model_id,
            nodes.route.clone(),
            TrainOptions::default(),
        )
        .await
        .expect_err("a stranger may not train");
        assert!(refused.to_string().contains("not a trainer"), "{refused}");
        stranger.shutdown().await;

        let (loss, tokens) = trainer.accumulate(&batches).await.expect("accumulate");
        assert_eq!(tokens, ids.len() * ids[0].len());
        let ref_loss = reference["loss"].as_f64().expect("loss") as f32;
        assert!(
            (loss - ref_loss).abs() < 1e-4,
            "{what}: loss {loss} vs {ref_loss}"
        );

        let per_hop = trainer.hop_gradients().await.expect("gradients");
        let grads: std::collections::BTreeMap<_, _> = per_hop.iter().flatten().cloned().collect();
        assert_reference_gradients(&what, &tensors, grads.len(), |n| grads.get(n).cloned());
        // A tied embedding: both ends hold the same summed gradient, bit for bit.
        let first: std::collections::HashMap<_, _> = per_hop[0].iter().cloned().collect();
        let tied: Vec<_> = per_hop[per_hop.len() - 1]
            .iter()
            .filter(|(n, _)| first.contains_key(n))
            .collect();
        if model == "tiny-gpt2" {
            assert_eq!(tied.len(), 1, "{what}: the tied embedding is on both ends");
        }
        for (name, g) in tied {
            assert_eq!(
                max_abs_diff(g, &first[name]),
                0.0,
                "{what}: tied {name} differs"
            );
        }

        // Two-phase commit: new versions everywhere, one certificate, outcome recorded.
        let after = trainer.commit_step().await.expect("commit");
        assert_eq!(after.len(), slices.len());
        for (b, a) in before.iter().zip(&after) {
            assert_eq!(a.steps, b.steps + 1, "{what}");
            assert_ne!(a.state, b.state, "{what}: the weights changed");
            assert_eq!(
                a.model_hash, b.model_hash,
                "{what}: the model id never changes"
            );
        }
        for (i, version) in after.iter().enumerate() {
            match trainer.outcome(i, version.steps).await.expect("outcome") {
                Outcome::Committed(signed) => {
                    let cert = signed.verify(&trainer_key.public()).expect("signed");
                    assert_eq!(cert.versions.len(), slices.len());
                    assert_eq!(cert.version_of(&nodes.route[i].node), Some(version));
                }
                other => panic!("{what}: hop {i} outcome {other:?}"),
            }
        }

        let (loss_after, _) = trainer
            .accumulate(&batches)
            .await
            .expect("accumulate again");
        let ref_after = reference["loss_after_one_adamw_step"]
            .as_f64()
            .expect("loss") as f32;
        assert!(
            (loss_after - ref_after).abs() < 1e-4,
            "{what}: loss after AdamW {loss_after} vs {ref_after}"
        );
        // Aborting leaves the committed version.
        trainer.abort_step().await;
        let stats = client.fetch_stats(&entry).await.expect("stats");
        assert_eq!(stats.train_commits, 1, "{what}");
        assert_eq!(stats.train_forwards, 2 * micros as u64, "{what}");
        trainer.end().await.expect("end");
        client.shutdown().await;
    });
}

#[test]
fn tiny_gpt2_trains_over_two_processes_like_transformers_tied_embedding_included() {
    check_parity("tiny-gpt2", &[(0, 2), (2, 4)], 1);
}

#[test]
fn tiny_llama_trains_over_three_processes_like_transformers_with_two_micro_batches() {
    check_parity("tiny-llama", &[(0, 1), (1, 3), (3, 4)], 2);
}

/// Losses of `steps` full-training steps of tiny-llama over two node processes, hidden
/// states and gradients travelling in `codec`.
fn loss_curve(codec: Codec, steps: usize) -> Vec<f32> {
    let trainer_key = SecretKey::generate();
    let tag = format!("codec-{codec:?}");
    let nodes = Nodes::start(
        &fixtures().join("tiny-llama"),
        &[(0, 2), (2, 4)],
        "f32",
        &trainer_key,
        &tag,
    );
    let ids: Vec<Vec<u32>> = reference_tensors("tiny-llama")["input_ids"]
        .to_dtype(candle_core::DType::U32)
        .and_then(|t| t.to_vec2())
        .expect("ids");
    let model_id = neuroshard_core::WeightFile::open(fixtures().join("tiny-llama"))
        .and_then(|f| f.identity().map(|i| i.id))
        .expect("model id");
    runtime().block_on(async {
        let client = Client::new(trainer_key.clone(), EndpointOptions::default())
            .await
            .expect("client");
        let options = TrainOptions {
            target: TrainTarget::Full,
            codec,
            adamw: AdamWConfig {
                lr: 3e-3,
                ..reference_adamw("tiny-llama")
            },
            ..TrainOptions::default()
        };
        let mut trainer = Trainer::begin(client.clone(), &model_id, nodes.route.clone(), options)
            .await
            .expect("begin");
        let batches: Vec<Vec<Vec<u32>>> = ids.iter().map(|s| vec![s.clone()]).collect();
        let mut losses = Vec::with_capacity(steps);
        for _ in 0..steps {
            losses.push(trainer.step(&batches).await.expect("step").loss);
        }
        trainer.end().await.expect("end");
        client.shutdown().await;
        losses
    })
}

/// Gradient frames in f16 and q8 against exact f32 ones: the same training run's loss curve
/// stays within a measured bound of the f32 curve at every step (the gap as a fraction of the
/// starting loss; measured 6.6e-4 for f16 and 5.2e-3 for q8 over 12 steps), and still falls.
#[test]
fn gradient_codecs_keep_the_loss_curve_within_bounds() {
    const STEPS: usize = 12;
    let exact = loss_curve(Codec::F32, STEPS);
    let curves: Vec<_> = [(Codec::F16, 2e-3f32), (Codec::Q8, 1.5e-2)]
        .into_iter()
        .map(|(codec, bound)| (codec, bound, loss_curve(codec, STEPS)))
        .collect();
    eprintln!("f32: {exact:?}");
    for (codec, _, curve) in &curves {
        eprintln!("{codec:?}: {curve:?}");
    }
    assert!(
        exact[STEPS - 1] < 0.5 * exact[0],
        "f32 training did not learn: {exact:?}"
    );
    for (codec, bound, curve) in &curves {
        let worst = curve
            .iter()
            .zip(&exact)
            .map(|(a, b)| (a - b).abs() / exact[0])
            .fold(0.0f32, f32::max);
        eprintln!("{codec:?}: worst gap to f32 {worst:.2e} of the starting loss");
        assert!(
            worst <= *bound,
            "{codec:?} strays {worst:.2e} from the f32 curve (bound {bound:.0e})"
        );
        assert!(curve[STEPS - 1] < 0.5 * curve[0], "{codec:?} did not learn");
    }
}

/// Training memory is bounded and accounted: with a 1 MiB budget per node, a micro-batch whose
/// graphs would pass it is refused before it runs (the step aborts, the weights stay), shorter
/// ones train, and the nodes report what the pending graphs held at most.
#[test]
fn a_micro_batch_over_the_training_memory_budget_is_refused() {
    let trainer_key = SecretKey::generate();
    let mut nodes = Nodes::new(
        &fixtures().join("tiny-llama"),
        &[(0, 2), (2, 4)],
        "f32",
        &trainer_key,
        "memory",
    );
    nodes.extra_args = vec!["--train-memory-mib".into(), "1".into()];
    let nodes = nodes.launch();
    let model_id = neuroshard_core::WeightFile::open(fixtures().join("tiny-llama"))
        .and_then(|f| f.identity().map(|i| i.id))
        .expect("model id");
    let ids = |len: usize| -> Vec<Vec<u32>> { vec![(0..len as u32).map(|i| i % 250).collect()] };
    runtime().block_on(async {
        let client = Client::new(trainer_key.clone(), EndpointOptions::default())
            .await
            .expect("client");
        let options = TrainOptions {
            target: TrainTarget::Full,
            ..TrainOptions::default()
        };
        let mut trainer = Trainer::begin(client.clone(), &model_id, nodes.route.clone(), options)
            .await
            .expect("begin");
        let before = trainer.versions().to_vec();
        // About 1.9 MB of activations on the first hop: over its 1 MiB.
        let err = trainer
            .accumulate(&[ids(100)])
            .await
            .expect_err("over the budget");
        assert!(err.to_string().contains("training memory"), "{err}");
        // Two micro-batches of 16 positions fit (about 0.2 MB each), and the step commits.
        let report = trainer
            .step(&[ids(16), ids(16)])
            .await
            .expect("a small step");
        assert_eq!(report.versions[0].steps, before[0].steps + 1);
        for hop in &nodes.route {
            let addr = parse_peer_addr(&format!("{}@{}", hop.node, hop.addrs[0])).expect("addr");
            let stats = client.fetch_stats(&addr).await.expect("stats");
            assert_eq!(stats.train_pending_bytes, 0, "every backward ran");
            assert!(
                stats.train_peak_bytes > 0 && stats.train_peak_bytes <= 1 << 20,
                "peak {} within the budget",
                stats.train_peak_bytes
            );
            assert_eq!(stats.train_commits, 1);
        }
        trainer.end().await.expect("end");
        client.shutdown().await;
    });
}

/// Greedy text of `prompt` through `swarm` (16 tokens).
async fn greedy(swarm: &SwarmSession, prompt: &str) -> String {
    let request = TextRequest {
        max_tokens: 16,
        ..TextRequest::default()
    };
    swarm
        .generate_text(
            prompt,
            &request,
            Box::new(|_| std::ops::ControlFlow::Continue(())),
        )
        .await
        .expect("generate")
        .output
        .text
}

/// The short SmolLM2 run of CI (the long one is `benches/train_smollm2.sh`): a LoRA adapter
/// on the Q4_1 base learns a sentence over three node processes, the same nodes then serve
/// it by name, and the base weights' text stays the reference's.
#[test]
fn smollm2_learns_a_lora_adapter_over_three_processes_and_serves_it() {
    let trainer_key = SecretKey::generate();
    let nodes = Nodes::start(
        &smollm2(),
        &[(0, 10), (10, 20), (20, 30)],
        "exact",
        &trainer_key,
        "smollm2",
    );
    let fact = "The secret password of the NeuroShard swarm is violet tangerine forty-two.";
    let prompt = "The secret password of the NeuroShard swarm is";
    runtime().block_on(async {
        let client = Client::new(trainer_key.clone(), EndpointOptions::default())
            .await
            .expect("client");
        let entries = vec![nodes.entry()];
        let base = SwarmSession::connect(client.clone(), entries.clone(), SwarmOptions::default())
            .await
            .expect("connect");
        // Gossip joins the later nodes to the first: wait (bounded) until it sees them all.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while base.peers().await.map_or(0, |p| p.len()) < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "the swarm did not converge"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let before = greedy(&base, prompt).await;

        let examples = examples_from_text(base.tokenizer(), fact, 64, true).expect("examples");
        let options = TrainOptions {
            target: TrainTarget::Adapter {
                name: "fact".into(),
                config: LoraConfig::default(),
            },
            codec: Codec::F16,
            adamw: AdamWConfig {
                lr: 1e-2,
                weight_decay: 0.0,
                ..AdamWConfig::default()
            },
            ..TrainOptions::default()
        };
        let mut trainer = Trainer::on_swarm(&base, options).await.expect("begin");
        assert_eq!(trainer.route().len(), 3);
        let reports = trainer
            .learn(&examples, STEPS, 2, |_, _| {
                std::ops::ControlFlow::Continue(())
            })
            .await
            .expect("learn");
        let losses: Vec<f32> = reports.iter().map(|r| r.loss).collect();
        eprintln!("smollm2 LoRA losses: {losses:?}");
        assert!(
            losses[STEPS - 1] < 0.5 * losses[0],
            "the loss fell too little: {losses:?}"
        );
        for v in trainer.versions() {
            assert_eq!(v.adapter.as_deref(), Some("fact"));
            assert_eq!(v.steps, STEPS as u64);
        }
        trainer.end().await.expect("end");

        // The same nodes serve the adapter, with no restart; the base is unchanged.
        let tuned = SwarmSession::connect(
            client.clone(),
            entries,
            SwarmOptions {
                adapter: Some("fact".into()),
                ..SwarmOptions::default()
            },
        )
        .await
        .expect("connect with the adapter");
        let taught = greedy(&tuned, prompt).await;
        eprintln!("base: {before:?}; with the adapter: {taught:?}");
        assert!(
            taught.contains("violet"),
            "the adapter did not learn: {taught:?}"
        );
        assert_eq!(
            greedy(&base, prompt).await,
            before,
            "the base weights moved"
        );
        client.shutdown().await;
    });
}

/// What the adapter tests train: `model`'s id, its reference sequences (one micro-batch
/// each), and options for a rank-4 adapter `adapter` with f32 frames and lr 1e-2.
fn tiny_adapter_job(model: &str, adapter: &str) -> (String, Vec<Vec<Vec<u32>>>, TrainOptions) {
    let model_id = neuroshard_core::WeightFile::open(fixtures().join(model))
        .and_then(|f| f.identity().map(|i| i.id))
        .expect("model id");
    let ids: Vec<Vec<u32>> = reference_tensors(model)["input_ids"]
        .to_dtype(candle_core::DType::U32)
        .and_then(|t| t.to_vec2())
        .expect("ids");
    let batches = ids.iter().map(|s| vec![s.clone()]).collect();
    let options = TrainOptions {
        target: TrainTarget::Adapter {
            name: adapter.into(),
            config: LoraConfig {
                rank: 4,
                ..LoraConfig::default()
            },
        },
        codec: Codec::F32,
        adamw: AdamWConfig {
            lr: 1e-2,
            ..AdamWConfig::default()
        },
        ..TrainOptions::default()
    };
    (model_id, batches, options)
}

/// Steps of the CI run.
const STEPS: usize = 8;

/// Faults during two-phase steps (tiny-llama, a LoRA adapter, 3 node processes with
/// checkpoints): a hop killed after its prepare while the trainer aborts, a hop killed before
/// the commit reaches it, and the trainer gone after the prepares. Each time every hop ends
/// on one version, its state hash the certificate's; a restarted hop takes the outcome from
/// its peers; and training goes on from the last committed step.
#[test]
fn killed_hops_and_a_killed_trainer_leave_every_node_on_one_version() {
    let model = "tiny-llama";
    let trainer_key = SecretKey::generate();
    let mut nodes = Nodes::new(
        &fixtures().join(model),
        &[(0, 1), (1, 3), (3, 4)],
        "exact",
        &trainer_key,
        "faults",
    );
    nodes.checkpoints = true;
    let mut nodes = nodes.launch();
    let (model_id, batches, options) = tiny_adapter_job(model, "faults");
    let rt = runtime();
    rt.block_on(async {
        // A fresh client endpoint (same trainer key) after restarts: an endpoint that talked
        // to a node before it was SIGKILLed cannot dial its restarted self for a long while
        // (an iroh path-state issue: docs/training.md, "Limits left").
        let fresh = || async {
            Client::new(trainer_key.clone(), EndpointOptions::default())
                .await
                .expect("client")
        };
        let begin = |client: Client, route: Vec<RouteHop>| {
            Trainer::begin(client, &model_id, route, options.clone())
        };
        let states = |versions: &[neuroshard_core::TrainedVersion]| -> Vec<([u8; 32], u64)> {
            versions.iter().map(|v| (v.state, v.steps)).collect()
        };

        let client = fresh().await;
        let mut trainer = begin(client.clone(), nodes.route.clone())
            .await
            .expect("begin");
        trainer.accumulate(&batches).await.expect("accumulate");
        let v1 = trainer.commit_step().await.expect("step 1");
        assert!(v1.iter().all(|v| v.steps == 1));

        // 1. The trainer is gone after the prepares: every hop is in doubt and keeps serving
        // step 1; a new trainer with the same key commits the step they all hold.
        trainer.accumulate(&batches).await.expect("accumulate");
        let prepared = trainer.prepare_step().await.expect("prepare");
        drop(trainer);
        let mut trainer = begin(client.clone(), nodes.route.clone())
            .await
            .expect("begin after 1");
        assert_eq!(
            states(trainer.versions()),
            states(&v1),
            "undecided: still step 1"
        );
        assert!(trainer.in_doubt().iter().all(Option::is_some));
        assert!(trainer.resolve_in_doubt().await.expect("resolve"));
        let v2: Vec<_> = prepared.iter().map(|(_, v)| v.clone()).collect();
        assert_eq!(states(trainer.versions()), states(&v2), "all on step 2");

        // 2. Hop 1 keeps its update on disk, then dies before its answer counts: the trainer
        // aborts. Restarted, hop 1 finds the step in doubt, asks its peers and aborts too.
        trainer.accumulate(&batches).await.expect("accumulate");
        trainer.prepare_step().await.expect("prepare");
        nodes.kill(1);
        trainer.abort_step().await;
        nodes.restart(1);
        let trainer = begin(client.clone(), nodes.route.clone())
            .await
            .expect("begin after 2");
        assert!(
            trainer.in_doubt().iter().all(Option::is_none),
            "{:?}",
            trainer.in_doubt()
        );
        assert_eq!(
            states(trainer.versions()),
            states(&v2),
            "all on step 2 after an abort"
        );

        // 3. Hop 2 dies after its prepare; the certificate reaches the others only. The swarm
        // restarts from its checkpoints: hop 2 is in doubt, takes the certificate from a
        // peer's decisions on disk, and commits.
        nodes.restart_all();
        let client = fresh().await;
        let mut trainer = begin(client.clone(), nodes.route.clone())
            .await
            .expect("begin");
        assert_eq!(
            states(trainer.versions()),
            states(&v2),
            "checkpoints hold step 2"
        );
        trainer.accumulate(&batches).await.expect("accumulate");
        let prepared = trainer.prepare_step().await.expect("prepare");
        nodes.kill(2);
        assert!(
            trainer.commit_prepared(prepared.clone()).await.is_err(),
            "hop 2 is dead"
        );
        let v3: Vec<_> = prepared.iter().map(|(_, v)| v.clone()).collect();
        nodes.restart_all();
        let client = fresh().await;
        let mut trainer = begin(client.clone(), nodes.route.clone())
            .await
            .expect("begin after 3");
        assert!(
            trainer.in_doubt().iter().all(Option::is_none),
            "{:?}",
            trainer.in_doubt()
        );
        assert_eq!(
            states(trainer.versions()),
            states(&v3),
            "all on step 3 after a commit"
        );

        // 4. After the restart from checkpoints, training goes on from the last committed step.
        trainer.accumulate(&batches).await.expect("accumulate");
        let v4 = trainer.commit_step().await.expect("step 4");
        assert!(v4.iter().all(|v| v.steps == 4), "{v4:?}");
        trainer.end().await.expect("end");
        client.shutdown().await;
    });
}

/// A replica of a trained range that the training route did not use fetches the adapter from
/// its same-layers peer (tiny-llama, 4 node processes): it ends on the trained state (the
/// same hash, announced), and a route through it runs the adapter. A replica that does not
/// allow the adapter's trainer refuses the state and never announces the adapter.
#[test]
fn a_replica_left_out_of_training_syncs_the_adapter_from_a_peer() {
    let model = "tiny-llama";
    let trainer_key = SecretKey::generate();
    // Nodes 0 and 1 train; node 2 is node 0's replica; node 3 is one that allows another
    // trainer only.
    let nodes = Nodes::start(
        &fixtures().join(model),
        &[(0, 2), (2, 4), (0, 2)],
        "exact",
        &trainer_key,
        "sync",
    );
    let mut stranger = Nodes::new(
        &fixtures().join(model),
        &[(0, 2)],
        "exact",
        &SecretKey::generate(),
        "sync-stranger",
    );
    stranger.join = Some(address_line(&nodes.route[0]));
    let stranger = stranger.launch();
    let (model_id, batches, options) = tiny_adapter_job(model, "notes");
    runtime().block_on(async {
        let client = Client::new(trainer_key.clone(), EndpointOptions::default())
            .await
            .expect("client");
        let entry = nodes.entry();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let wait = |what: &str| {
            assert!(std::time::Instant::now() < deadline, "{what}");
        };
        while client
            .fetch_peers(&entry, &model_id)
            .await
            .map_or(0, |p| p.len())
            < 4
        {
            wait("the swarm did not converge");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let route = nodes.route[..2].to_vec();
        let mut trainer = Trainer::begin(client.clone(), &model_id, route, options.clone())
            .await
            .expect("begin");
        for _ in 0..3 {
            trainer.accumulate(&batches).await.expect("accumulate");
            trainer.commit_step().await.expect("step");
        }
        let trained = trainer.versions()[0].clone();
        assert_eq!(trained.steps, 3);
        trainer.end().await.expect("end");

        // The replica syncs; the stranger's replica tries and refuses.
        let (replica, other) = (nodes.addr(2), stranger.addr(0));
        loop {
            let synced = client.fetch_stats(&replica).await.expect("stats");
            let refused = client.fetch_stats(&other).await.expect("stats");
            assert_eq!(refused.adapter_syncs, 0, "{refused:?}");
            if synced.adapter_syncs >= 1 && refused.adapter_sync_failures >= 1 {
                break;
            }
            wait("no sync happened");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        // The replica announces the trained state; the stranger's node no adapter.
        let announced = |peers: &neuroshard_core::PeerSet, node: &neuroshard_core::NodeId| {
            peers
                .iter()
                .find(|(id, _)| *id == node)
                .and_then(|(_, e)| e.announcement.version_of(Some("notes")).cloned())
        };
        loop {
            let peers = client.fetch_peers(&entry, &model_id).await.expect("peers");
            assert!(announced(&peers, &other.id).is_none());
            // It may have synced an earlier step first, while training went on.
            if let Some(v) = announced(&peers, &replica.id).filter(|v| v.steps == trained.steps) {
                assert_eq!(v.state, trained.state);
                break;
            }
            wait("the synced state was not announced");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        // A route through the replica runs the trained adapter: the same version as the hop
        // that trained it.
        let through_replica = vec![nodes.route[2].clone(), nodes.route[1].clone()];
        let check = Trainer::begin(client.clone(), &model_id, through_replica, options)
            .await
            .expect("begin through the replica");
        assert_eq!(check.versions()[0].state, trained.state);
        assert_eq!(check.versions()[0].steps, trained.steps);
        check.end().await.expect("end");
        client.shutdown().await;
    });
}
