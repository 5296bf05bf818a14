//! `neuroshard peers`: the swarm as a node sees it.

use crate::common::tokio_runtime;
use neuroshard_core::{resolve_peers, Client, Error, SwarmOptions, SwarmSession};

/// Flags of `neuroshard peers`.
#[derive(clap::Args, Debug)]
pub(crate) struct PeersArgs {
    /// Address of any node (`<id>@<ip:port>` or plain `host:port`).
    #[arg(long, num_args = 1.., required = true)]
    peers: Vec<String>,
    /// Print JSON: every node with its layers, load and address, and its score, trust state
    /// (probation, trusted or banned) and the reason of the last change in this client's
    /// reputation table.
    #[arg(long)]
    json: bool,
    /// The client's reputation table (default: client-reputation.json in the data
    /// directory, the one `generate --peers` keeps).
    #[arg(long)]
    reputation: Option<std::path::PathBuf>,
}

pub(crate) fn run(args: PeersArgs) -> Result<(), Error> {
    tokio_runtime()?.block_on(async move {
        let entries = resolve_peers(&args.peers).await?;
        let client = Client::bind_default().await?;
        let swarm = SwarmSession::connect(client.clone(), entries, SwarmOptions::default()).await?;
        let rows = swarm.peers().await?;
        let reputation = args
            .reputation
            .clone()
            .unwrap_or_else(|| crate::common::data_dir().join("client-reputation.json"));
        client.load_reputation(&reputation)?;
        let table = client.trust_table();
        let standing = |id: &str| table.iter().find(|r| r.node == id);
        if args.json {
            let nodes: Vec<serde_json::Value> = rows
                .iter()
                .map(|p| {
                    let s = standing(&p.id);
                    serde_json::json!({
                        "id": p.id,
                        "layers": [p.layers.start, p.layers.end],
                        "load": p.load,
                        "capacity": p.capacity,
                        "address": p.address,
                        "expires_in_ms": p.expires_in_ms,
                        "score": s.map_or(0.0, |s| s.standing.score),
                        "state": s.map_or("probation".to_string(), |s| {
                            format!("{:?}", s.state).to_lowercase()
                        }),
                        "reason": s.map_or(String::new(), |s| s.standing.reason.clone()),
                    })
                })
                .collect();
            let out = serde_json::json!({
                "model_id": swarm.model_id(),
                "layers": swarm.layers(),
                "nodes": nodes,
            });
            println!(
                "{}",
                serde_json::to_string_pretty(&out).map_err(|e| Error::Internal(e.to_string()))?
            );
            client.shutdown().await;
            return Ok(());
        }
        println!(
            "model {} ({} layers), {} nodes",
            swarm.model_id(),
            swarm.layers(),
            rows.len()
        );
        println!(
            "{:<12} {:>9} {:>9} {:>10} {:>9} {:>7} ADDRESSES",
            "NODE", "LAYERS", "LOAD", "EXPIRES", "STATE", "SCORE"
        );
        for p in rows {
            let addrs = p.address.split_once('@').map_or("", |(_, a)| a).to_string();
            let s = standing(&p.id);
            println!(
                "{:<12} {:>9} {:>9} {:>9.1}s {:>9} {:>7.0} {}",
                &p.id[..p.id.len().min(10)],
                format!("{}..{}", p.layers.start, p.layers.end),
                format!("{}/{}", p.load, p.capacity),
                p.expires_in_ms as f64 / 1000.0,
                s.map_or("probation".to_string(), |s| format!("{:?}", s.state)
                    .to_lowercase()),
                s.map_or(0.0, |s| s.standing.score),
                addrs
            );
        }
        client.shutdown().await;
        Ok(())
    })
}
