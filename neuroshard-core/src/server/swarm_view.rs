//! The live view of the swarm for the web page (`GET /v1/swarm`, and every second over SSE at
//! `GET /v1/swarm/events`): each node with its layers, load and health (probed directly, so a
//! dead node shows at once, before its announcement expires), the layers no node serves, the
//! route of the current or last generation with each hop's compute time per step, and the
//! last answer's tokens/s.

use super::State;
use crate::net::proto::RouteHop;
use std::collections::HashMap;
use std::time::Duration;

/// The route of the current or last generation.
#[derive(Debug, Clone, Default)]
pub(crate) struct RouteRecord {
    pub(crate) hops: Vec<RouteHop>,
    /// Still generating.
    pub(crate) active: bool,
    /// Decode speed of the finished generation.
    pub(crate) tokens_per_sec: f64,
    /// Replicated sessions: each range's replicas.
    pub(crate) replicas: Vec<Vec<RouteHop>>,
    /// Replicated sessions: what the votes found (empty when every vote agreed).
    pub(crate) votes: Vec<String>,
}

/// How long a node may take to answer a probe before it shows as down.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// One node's probe: its counters, or `None` when it did not answer.
async fn probe(state: &State, address: String) -> Option<crate::net::NodeStats> {
    let addrs = crate::swarm_session::resolve_peers(&[address]).await.ok()?;
    let addr = addrs.first()?;
    tokio::time::timeout(PROBE_TIMEOUT, state.swarm.client().fetch_stats(addr))
        .await
        .ok()?
        .ok()
}

/// The view as JSON (an `error` field when no entry node answers).
pub(crate) async fn snapshot(state: &State) -> serde_json::Value {
    let peers = match tokio::time::timeout(Duration::from_secs(3), state.swarm.peers()).await {
        Ok(Ok(peers)) => peers,
        Ok(Err(e)) => return serde_json::json!({ "error": e.to_string() }),
        Err(_) => return serde_json::json!({ "error": "no entry node answered within 3 s" }),
    };
    let probes = peers.iter().map(|p| probe(state, p.address.clone()));
    let stats: Vec<Option<crate::net::NodeStats>> = n0_future::join_all(probes).await;
    let layers = state.swarm.layers();
    // The server's own reputation table: what its replicated sessions' votes showed.
    let trust = state.swarm.client().trust_table();
    let mut covered = vec![0usize; layers];
    let mut per_step: HashMap<String, f64> = HashMap::new();
    let nodes: Vec<serde_json::Value> = peers
        .iter()
        .zip(&stats)
        .map(|(p, s)| {
            let up = s.is_some();
            if up {
                for l in p.layers.clone().filter(|&l| l < layers) {
                    covered[l] += 1;
                }
            }
            let ms = s.as_ref().and_then(|s| state.step_time(&p.id, s));
            if let Some(ms) = ms {
                per_step.insert(p.id.clone(), ms);
            }
            let standing = trust.iter().find(|r| r.node == p.id);
            serde_json::json!({
                "id": p.id,
                "layers": [p.layers.start, p.layers.end],
                "load": s.as_ref().map(|s| s.sessions_open).unwrap_or(p.load as u64),
                "capacity": p.capacity,
                "up": up,
                "ms_per_step": ms,
                "trust": {
                    "state": standing.map_or("probation".to_string(), |r| {
                        format!("{:?}", r.state).to_lowercase()
                    }),
                    "score": standing.map_or(0.0, |r| r.standing.score),
                    "reason": standing.map_or(String::new(), |r| r.standing.reason.clone()),
                },
            })
        })
        .collect();
    let gaps: Vec<usize> = (0..layers).filter(|&l| covered[l] == 0).collect();
    let route = crate::net::lock(&state.route).clone();
    let route = route.map(|r| {
        serde_json::json!({
            "active": r.active,
            "tokens_per_sec": r.tokens_per_sec,
            "hops": r.hops.iter().map(|h| {
                let id = h.node.to_string();
                serde_json::json!({
                    "ms_per_step": per_step.get(&id),
                    "node": id,
                    "layers": [h.layers.start, h.layers.end],
                })
            }).collect::<Vec<_>>(),
            "replicas": r.replicas.iter().map(|range| {
                range.iter().map(|h| h.node.to_string()).collect::<Vec<_>>()
            }).collect::<Vec<_>>(),
            "votes": r.votes,
        })
    });
    serde_json::json!({
        "model": state.swarm.model_id(),
        "model_name": state.served.get(1),
        "layers": layers,
        "nodes": nodes,
        "replicas": covered,
        "gaps": gaps,
        "route": route,
        "generations_active": state.metrics.generations_active.load(std::sync::atomic::Ordering::Relaxed),
    })
}
