//! Serve a slice of layers to a swarm, as `neuroshard node` does.
//!
//! `cargo run --release --example node -- MODEL.gguf START END [PEER...]`: prints the node's
//! address line, then serves until Ctrl-C (or for `NEUROSHARD_EXAMPLE_SECS` seconds).

use neuroshard_core::runtime::{init, RuntimeConfig};
use neuroshard_core::{resolve_peers, Node};
use std::time::Duration;

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> neuroshard_core::Result<()> {
    init(&RuntimeConfig::default());
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = args
        .first()
        .cloned()
        .unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let start: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let end: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(30);
    let peers = if args.len() > 3 {
        resolve_peers(&args[3..]).await?
    } else {
        Vec::new()
    };
    let node = Node::builder(&model)
        .layers(start..end)
        .peers(peers)
        .spawn()
        .await?;
    println!("{}", node.address());
    match std::env::var("NEUROSHARD_EXAMPLE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(secs) => tokio::time::sleep(Duration::from_secs(secs)).await,
        None => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    for peer in node.peer_infos() {
        eprintln!(
            "peer {} layers {}..{}",
            &peer.id[..10],
            peer.layers.start,
            peer.layers.end
        );
    }
    node.shutdown().await;
    Ok(())
}
