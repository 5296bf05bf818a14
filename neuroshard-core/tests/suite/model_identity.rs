//! The model id commits to every weight byte: a file whose weights differ gets another id,
//! fails its manifest, and fails a pinned id, each with a typed error. A node that pinned an
//! id takes the manifest from a peer only when it hashes to that id.

use crate::common::{fixtures, new_client};
use neuroshard_core::net::endpoint::EndpointOptions;
use neuroshard_core::{
    adopt_peer_manifest, EngineOptions, ErrorKind, Node, ShardEngine, WeightFile,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A copy of tiny-llama in a fresh directory, with one byte of one layer-1 weight changed
/// when `tamper` (the header, and so the tensor table, stays the same).
fn copy_tiny_llama(name: &str, tamper: bool) -> PathBuf {
    let src = fixtures().join("tiny-llama");
    let dir = std::env::temp_dir().join(format!("ns-identity-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("identity test");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).expect("identity test");
    }
    if tamper {
        let file = WeightFile::open(&dir).expect("identity test");
        let manifest = file.compute_manifest().expect("identity test");
        drop(file);
        assert!(manifest
            .tensors
            .iter()
            .any(|t| t.name == "model.layers.1.mlp.down_proj.weight"));
        let path = dir.join("model.safetensors");
        let mut bytes = std::fs::read(&path).expect("identity test");
        // The last byte of the file belongs to the last tensor's data; the header is intact.
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&path, bytes).expect("identity test");
    }
    dir
}

fn id_of(dir: &Path) -> String {
    WeightFile::open(dir)
        .expect("identity test")
        .identity()
        .expect("identity test")
        .id
}

#[test]
fn tampered_weights_change_the_id_and_fail_the_manifest_and_the_pin() {
    let genuine = copy_tiny_llama("genuine", false);
    let tampered = copy_tiny_llama("tampered", true);
    let genuine_file = WeightFile::open(&genuine).expect("identity test");
    let genuine_id = genuine_file.identity().expect("identity test").id;
    assert_eq!(genuine_id.len(), 64);
    // Same bytes, another directory: the same id.
    assert_eq!(id_of(&fixtures().join("tiny-llama")), genuine_id);
    // Changed weights under the same header: another id.
    let tampered_id = id_of(&tampered);
    assert_ne!(tampered_id, genuine_id);

    // Given the genuine manifest, the tampered file loads only until the changed tensor.
    let manifest = genuine_file.manifest().expect("identity test");
    let manifest_path = genuine.join("manifest.json");
    manifest.write(&manifest_path).expect("identity test");
    let layers = genuine_file.config().num_layers;
    let err = ShardEngine::load(
        &tampered,
        0..layers,
        EngineOptions {
            manifest: Some(manifest_path.clone()),
            ..EngineOptions::default()
        },
    )
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WrongWeights, "{err}");
    // A slice that does not hold the changed tensor loads, every tensor checked.
    let engine = ShardEngine::load(
        &tampered,
        0..1,
        EngineOptions {
            manifest: Some(manifest_path),
            ..EngineOptions::default()
        },
    )
    .expect("identity test");
    assert_eq!(engine.model_id(), genuine_id);
    assert_eq!(
        engine.weight_file().tensors_verified(),
        engine.stats().tensors_loaded
    );
    assert!(engine.stats().tensors_loaded > 0);

    // Pinning the genuine id refuses the tampered file, and accepts the genuine one.
    let pinned = |dir: &Path| {
        ShardEngine::load(
            dir,
            0..layers,
            EngineOptions {
                expected_model_id: Some(genuine_id.clone()),
                ..EngineOptions::default()
            },
        )
    };
    assert_eq!(
        pinned(&tampered).unwrap_err().kind(),
        ErrorKind::WrongWeights
    );
    let engine = pinned(&genuine).expect("identity test");
    assert_eq!(engine.model_id(), genuine_id);
    assert_eq!(
        engine.weight_file().tensors_verified(),
        engine.stats().tensors_loaded
    );
    // A malformed pin is a config error, not a silent mismatch.
    let bad = ShardEngine::load(
        &genuine,
        0..layers,
        EngineOptions {
            expected_model_id: Some("not-an-id".into()),
            ..EngineOptions::default()
        },
    )
    .unwrap_err();
    assert_eq!(bad.kind(), ErrorKind::InvalidConfig);
    for dir in [genuine, tampered] {
        std::fs::remove_dir_all(dir).expect("identity test");
    }
}

/// A node serving the whole model in `dir` on 127.0.0.1.
async fn serve(dir: &Path) -> Node {
    let layers = WeightFile::open(dir)
        .expect("identity test")
        .config()
        .num_layers;
    let engine =
        ShardEngine::load(dir, 0..layers, EngineOptions::default()).expect("identity test");
    Node::spawn(
        Arc::new(engine),
        iroh::SecretKey::generate(),
        EndpointOptions::default(),
    )
    .await
    .expect("identity test")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_node_takes_the_manifest_from_a_peer_and_a_lying_peer_is_skipped() {
    let genuine = copy_tiny_llama("peer-genuine", false);
    let tampered = copy_tiny_llama("peer-tampered", true);
    let genuine_id = id_of(&genuine);
    let layers = WeightFile::open(&genuine)
        .expect("identity test")
        .config()
        .num_layers;
    let honest = serve(&genuine).await;
    // Serves its own manifest, which is another model's: it must never be adopted.
    let liar = serve(&tampered).await;
    let client = new_client().await;

    // A fresh open of the genuine file asks the liar first, skips it, and takes the honest
    // node's manifest; the slice then loads with every tensor checked against it.
    let file = Arc::new(WeightFile::open(&genuine).expect("identity test"));
    let from = adopt_peer_manifest(&client, &[liar.addr(), honest.addr()], &file, &genuine_id)
        .await
        .expect("the honest peer's manifest");
    assert_eq!(from, honest.id());
    assert_eq!(
        *file.manifest().expect("identity test"),
        *honest
            .engine()
            .weight_file()
            .manifest()
            .expect("identity test")
    );
    let engine = ShardEngine::from_file(
        file,
        0..1,
        EngineOptions {
            expected_model_id: Some(genuine_id.clone()),
            ..EngineOptions::default()
        },
        &mut |_, _| {},
    )
    .expect("identity test");
    assert_eq!(engine.model_id(), genuine_id);
    assert!(engine.stats().tensors_loaded > 0);
    assert_eq!(
        engine.weight_file().tensors_verified(),
        engine.stats().tensors_loaded
    );

    // The liar alone: nothing adopted, a config error that says what it sent.
    let file = WeightFile::open(&genuine).expect("identity test");
    let err = adopt_peer_manifest(&client, &[liar.addr()], &file, &genuine_id)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(err.to_string().contains("not to the pinned"), "{err}");
    // A malformed pin is refused before anyone is asked.
    let err = adopt_peer_manifest(&client, &[honest.addr()], &file, "not-an-id")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");

    // The tampered file (same header) adopts the genuine manifest, and its changed tensor
    // then fails the load; a slice without that tensor loads, every tensor checked.
    for (slice, ok) in [(0..layers, false), (0..1, true)] {
        let file = Arc::new(WeightFile::open(&tampered).expect("identity test"));
        adopt_peer_manifest(&client, &[honest.addr()], &file, &genuine_id)
            .await
            .expect("the genuine manifest fits the tampered file's header");
        let loaded = ShardEngine::from_file(file, slice, EngineOptions::default(), &mut |_, _| {});
        match loaded {
            Ok(engine) => {
                assert!(ok);
                assert_eq!(engine.model_id(), genuine_id);
            }
            Err(e) => {
                assert!(!ok, "{e}");
                assert_eq!(e.kind(), ErrorKind::WrongWeights, "{e}");
            }
        }
    }

    client.shutdown().await;
    honest.shutdown().await;
    liar.shutdown().await;
    for dir in [genuine, tampered] {
        std::fs::remove_dir_all(dir).expect("identity test");
    }
}
