//! `neuroshard peers`: the swarm as a node sees it.

use crate::common::tokio_runtime;
use neuroshard_core::{resolve_peers, Client, Error, SwarmOptions, SwarmSession};

/// Flags of `neuroshard peers`.
#[derive(clap::Args, Debug)]
pub(crate) struct PeersArgs {
    /// Address of any node (`<id>@<ip:port>` or plain `host:port`).
    #[arg(long, num_args = 1.., required = true)]
    peers: Vec<String>,
}

pub(crate) fn run(args: PeersArgs) -> Result<(), Error> {
    tokio_runtime()?.block_on(async move {
        let entries = resolve_peers(&args.peers).await?;
        let client = Client::bind_default().await?;
        let swarm = SwarmSession::connect(client.clone(), entries, SwarmOptions::default()).await?;
        let rows = swarm.peers().await?;
        println!(
            "model {} ({} layers), {} nodes",
            swarm.model_id(),
            swarm.layers(),
            rows.len()
        );
        println!(
            "{:<12} {:>9} {:>9} {:>10} ADDRESSES",
            "NODE", "LAYERS", "LOAD", "EXPIRES"
        );
        for p in rows {
            let addrs = p.address.split_once('@').map_or("", |(_, a)| a).to_string();
            println!(
                "{:<12} {:>9} {:>9} {:>9.1}s {}",
                &p.id[..p.id.len().min(10)],
                format!("{}..{}", p.layers.start, p.layers.end),
                format!("{}/{}", p.load, p.capacity),
                p.expires_in_ms as f64 / 1000.0,
                addrs
            );
        }
        client.shutdown().await;
        Ok(())
    })
}
