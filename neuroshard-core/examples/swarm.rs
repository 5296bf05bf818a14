//! Start a 3-node swarm in this process and stream text through it with the async API.
//!
//! `cargo run --release --example swarm -- MODEL.gguf "The future of AI is"`

use neuroshard_core::runtime::{init, RuntimeConfig};
use neuroshard_core::{resolve_peers, Client, LocalSwarm, SwarmOptions, SwarmSession, TextRequest};
use std::ops::ControlFlow;

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> neuroshard_core::Result<()> {
    init(&RuntimeConfig::default());
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let prompt = args.next().unwrap_or_else(|| "The future of AI is".into());
    let swarm = LocalSwarm::start(model.as_ref(), 3, 1, Default::default(), &mut |line| {
        eprintln!("{line}")
    })
    .await?;
    let client = Client::bind_default().await?;
    let entries = resolve_peers(&[swarm.address()]).await?;
    let session = SwarmSession::connect(client.clone(), entries, SwarmOptions::default()).await?;
    let request = TextRequest {
        max_tokens: 24,
        ..TextRequest::default()
    };
    let out = session
        .generate_text(
            &prompt,
            &request,
            Box::new(|piece| {
                print!("{piece}");
                ControlFlow::Continue(())
            }),
        )
        .await?;
    println!();
    let hops: Vec<String> = out
        .route
        .iter()
        .map(|h| format!("{}..{}", h.layers.start, h.layers.end))
        .collect();
    eprintln!(
        "{} tokens through {}",
        out.output.tokens.len(),
        hops.join(" -> ")
    );
    client.shutdown().await;
    swarm.shutdown().await;
    Ok(())
}
