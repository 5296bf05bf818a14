//! The README's Rust example: a local 3-node swarm and a client, with the blocking API.

use neuroshard_core::blocking::{Client, LocalSwarm};
use neuroshard_core::runtime::{init, RuntimeConfig};
use neuroshard_core::{EngineOptions, SwarmOptions, TextRequest};

fn main() -> neuroshard_core::Result<()> {
    init(&RuntimeConfig::default()); // once, before any other work: fixes the thread count
    let model = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let swarm = LocalSwarm::start(&model, 3, 1, EngineOptions::default())?;
    let client = Client::connect(&[swarm.address()], SwarmOptions::default())?;
    let request = TextRequest {
        max_tokens: 24,
        ..TextRequest::default()
    };
    for piece in client.stream("The future of AI is", &request)? {
        print!("{}", piece?);
    }
    println!();
    Ok(())
}
