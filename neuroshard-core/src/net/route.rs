//! Route planning: the chain of hops that covers layers `from..to` with the lowest expected
//! latency.
//!
//! A hop may run any sub-range of its slice, so overlapping slices combine (0-12, 8-20, 18-30
//! cover 0-30 as 0-12, 12-20, 20-30). The plan is a shortest path over layer boundaries
//! `0..=L`: an edge `p -> q` exists when a usable node holds `[p, q)`, and costs the node's
//! network latency plus its compute time for `q - p` layers scaled by its load. Banned,
//! expired, overloaded and excluded nodes are skipped; replicas are simply other edges, so
//! re-planning with the failed node excluded finds the replacement.

use super::peers::{PeerEntry, PeerSet};
use super::{NetError, NodeId};
use std::net::SocketAddr;
use std::ops::Range;

/// One hop of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    /// The node that runs this hop.
    pub node: NodeId,
    /// The layers it runs (a sub-range of its slice).
    pub layers: Range<usize>,
    /// Where to dial it.
    pub addrs: Vec<SocketAddr>,
}

/// A planned chain of hops.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Hops in order; their layer ranges are contiguous.
    pub hops: Vec<Hop>,
    /// Expected time for one decode step through the route (ms).
    pub expected_ms: f64,
}

impl Route {
    /// The hops as a session-open names them.
    pub fn to_hops(&self) -> Vec<super::proto::RouteHop> {
        self.hops
            .iter()
            .map(|h| super::proto::RouteHop {
                node: h.node,
                layers: h.layers.start as u32..h.layers.end as u32,
                addrs: h.addrs.clone(),
            })
            .collect()
    }
}

/// One range of a replicated plan ([`PeerSet::plan_replicated`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicatedRange {
    /// The layers of the range.
    pub layers: Range<usize>,
    /// Every usable node that holds them, cheapest first (at least the `k` asked for).
    pub hops: Vec<Hop>,
}

/// Knobs of the planner.
#[derive(Debug, Clone)]
pub struct RouteOptions {
    /// Nodes not to use (failed hops being replaced).
    pub exclude: Vec<NodeId>,
    /// Latency assumed for a node never measured (ms).
    pub default_latency_ms: f64,
    /// Compute time per layer of an idle node (ms).
    pub per_layer_ms: f64,
    /// The adapter sessions on this route run with: only nodes that announce it are used,
    /// and the replicas of a range that vote together announce the same version of it.
    /// `None`: the base weights (replicas then share the base weights' version).
    pub adapter: Option<String>,
}

impl Default for RouteOptions {
    fn default() -> Self {
        RouteOptions {
            exclude: Vec::new(),
            default_latency_ms: 2.0,
            per_layer_ms: 0.4,
            adapter: None,
        }
    }
}

fn hop_cost(e: &PeerEntry, layers: usize, opts: &RouteOptions) -> f64 {
    let a = &e.announcement;
    let load = a.load as f64 / a.capacity.max(1) as f64;
    // A new node must prove itself before a route prefers it over known-good ones (a
    // Sybil announcing every layer at zero load would otherwise win every route); a node
    // that fails gets dearer with its failure rate.
    let trust = if e.on_probation() {
        super::peers::PROBATION_PENALTY_MS
    } else {
        0.0
    } + super::peers::FAILURE_PENALTY_MS * e.failure_rate();
    e.latency_ms.unwrap_or(opts.default_latency_ms)
        + opts.per_layer_ms * layers as f64 * (1.0 + load)
        + trust
}

impl PeerSet {
    /// Nodes usable for a new session now, minus `exclude`.
    fn candidates<'a>(
        &'a self,
        now_ms: u64,
        opts: &'a RouteOptions,
    ) -> Vec<(&'a NodeId, &'a PeerEntry)> {
        let mut v: Vec<_> = self
            .iter()
            .filter(|(id, e)| {
                e.usable(now_ms)
                    && !opts.exclude.contains(id)
                    && e.announcement.vote_key(opts.adapter.as_deref()).is_some()
            })
            .collect();
        if let Some(adapter) = opts.adapter.as_deref() {
            // Against every live announcement: a replica behind a busy, excluded or banned
            // node is still behind it.
            let live: Vec<&PeerEntry> = self
                .iter()
                .map(|(_, e)| e)
                .filter(|e| e.announcement.expires_ms > now_ms)
                .collect();
            v.retain(|(_, e)| !is_behind(e, &live, adapter));
        }
        // Deterministic order: equal-cost plans always pick the same nodes.
        v.sort_by_key(|(id, _)| *id.as_bytes());
        v
    }

    /// Plans the cheapest chain covering layers `from..to`.
    pub fn plan_range(
        &self,
        from: usize,
        to: usize,
        now_ms: u64,
        opts: &RouteOptions,
    ) -> Result<Route, NetError> {
        if from >= to {
            return Err(NetError::NoRoute {
                from,
                to,
                reason: "empty layer range".into(),
            });
        }
        let nodes = self.candidates(now_ms, opts);
        // best[p - from] = (cost, previous boundary, node index) of the cheapest way to reach p.
        let n = to - from;
        let mut best: Vec<Option<(f64, usize, usize)>> = vec![None; n + 1];
        best[0] = Some((0.0, from, usize::MAX));
        for p in from..to {
            let Some((base, _, _)) = best[p - from] else {
                continue;
            };
            for (i, (_, e)) in nodes.iter().enumerate() {
                let r = &e.announcement.layers;
                let (s, end) = (r.start as usize, (r.end as usize).min(to));
                if s > p || end <= p {
                    continue;
                }
                for q in p + 1..=end {
                    let cost = base + hop_cost(e, q - p, opts);
                    let slot = &mut best[q - from];
                    if slot.is_none_or(|(c, _, _)| cost < c) {
                        *slot = Some((cost, p, i));
                    }
                }
            }
        }
        let Some((total, _, _)) = best[n] else {
            let reached = (0..=n).rev().find(|&k| best[k].is_some()).unwrap_or(0) + from;
            return Err(NetError::NoRoute {
                from: reached,
                to,
                reason: format!(
                    "no usable node holds layer {reached} ({} usable nodes)",
                    nodes.len()
                ),
            });
        };
        let mut hops = Vec::new();
        let mut q = to;
        while q > from {
            let Some((_, p, i)) = best[q - from] else {
                break;
            };
            let (id, e) = nodes[i];
            hops.push(Hop {
                node: *id,
                layers: p..q,
                addrs: e.announcement.addrs.clone(),
            });
            q = p;
        }
        hops.reverse();
        Ok(Route {
            hops,
            expected_ms: total,
        })
    }

    /// Plans the cheapest chain covering every layer of a `layers`-layer model.
    pub fn plan_route(
        &self,
        layers: usize,
        now_ms: u64,
        opts: &RouteOptions,
    ) -> Result<Route, NetError> {
        self.plan_range(0, layers, now_ms, opts)
    }

    /// Plans a chain for a replicated session: ranges covering layers `0..layers` that at
    /// least `k` usable nodes each hold, the chain of the lowest cost (each range costs the
    /// mean of its `k` cheapest replicas). Each range comes with every usable node that
    /// holds it, cheapest first; the caller picks the voters among them.
    ///
    /// Ranges end only where some candidate's slice ends (or at the model's end), so the plan
    /// is a shortest path over at most `layers + 1` boundaries.
    pub fn plan_replicated(
        &self,
        layers: usize,
        k: usize,
        now_ms: u64,
        opts: &RouteOptions,
    ) -> Result<Vec<ReplicatedRange>, NetError> {
        let k = k.max(1);
        let nodes = self.candidates(now_ms, opts);
        let adapter = opts.adapter.as_deref();
        let mut bounds: Vec<usize> = vec![0, layers];
        for (_, e) in &nodes {
            let r = &e.announcement.layers;
            bounds.extend(
                [r.start as usize, r.end as usize]
                    .into_iter()
                    .filter(|&b| b < layers),
            );
        }
        bounds.sort_unstable();
        bounds.dedup();
        // The usable nodes holding [a, b), cheapest first.
        let holders = |a: usize, b: usize| -> Vec<(f64, usize)> {
            let mut v: Vec<(f64, usize)> = nodes
                .iter()
                .enumerate()
                .filter(|(_, (_, e))| {
                    let r = &e.announcement.layers;
                    r.start as usize <= a && b <= r.end as usize
                })
                .map(|(i, (_, e))| (hop_cost(e, b - a, opts), i))
                .collect();
            v.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
            same_version(v, |i| nodes[i].1.announcement.vote_key(adapter))
        };
        // best[j] = (cost, previous boundary index) of the cheapest way to reach bounds[j].
        let mut best: Vec<Option<(f64, usize)>> = vec![None; bounds.len()];
        best[0] = Some((0.0, 0));
        for a in 0..bounds.len() {
            let Some((base, _)) = best[a] else { continue };
            for b in a + 1..bounds.len() {
                let held = holders(bounds[a], bounds[b]);
                if held.len() < k {
                    // Fewer nodes hold a longer range: none further from `a` will do.
                    break;
                }
                let cost = base + held[..k].iter().map(|(c, _)| c).sum::<f64>() / k as f64;
                if best[b].is_none_or(|(c, _)| cost < c) {
                    best[b] = Some((cost, a));
                }
            }
        }
        let last = bounds.len() - 1;
        if best[last].is_none() {
            let reached = (0..bounds.len())
                .rev()
                .find(|&j| best[j].is_some())
                .unwrap_or(0);
            return Err(NetError::NoRoute {
                from: bounds[reached],
                to: layers,
                reason: format!(
                    "no range from layer {} is held by {k} usable nodes ({} usable nodes)",
                    bounds[reached],
                    nodes.len()
                ),
            });
        }
        let mut ranges = Vec::new();
        let mut b = last;
        while b > 0 {
            let Some((_, a)) = best[b] else { break };
            let hops = holders(bounds[a], bounds[b])
                .into_iter()
                .map(|(_, i)| Hop {
                    node: *nodes[i].0,
                    layers: bounds[a]..bounds[b],
                    addrs: nodes[i].1.announcement.addrs.clone(),
                })
                .collect();
            ranges.push(ReplicatedRange {
                layers: bounds[a]..bounds[b],
                hops,
            });
            b = a;
        }
        ranges.reverse();
        Ok(ranges)
    }

    /// Usable nodes that can run all of `layers` (replicas of that hop).
    pub fn replicas(&self, layers: &Range<usize>, now_ms: u64) -> Vec<NodeId> {
        self.iter()
            .filter(|(_, e)| {
                let r = &e.announcement.layers;
                e.usable(now_ms) && r.start as usize <= layers.start && layers.end <= r.end as usize
            })
            .map(|(id, _)| *id)
            .collect()
    }
}

/// Whether `node` is behind on `adapter`: some live node whose layers overlap its own
/// announces more steps of it. Such a replica leaves the adapter's routes until it has synced
/// the newer state (`train/sync.rs`), so a route's hops come from the newest training of
/// their layers.
fn is_behind(node: &PeerEntry, live: &[&PeerEntry], adapter: &str) -> bool {
    let steps = |e: &PeerEntry| {
        e.announcement
            .version_of(Some(adapter))
            .map_or(0, |v| v.steps)
    };
    let layers = &node.announcement.layers;
    live.iter().any(|o| {
        let other = &o.announcement.layers;
        layers.start < other.end && other.start < layers.end && steps(o) > steps(node)
    })
}

/// The holders (cost, index; cheapest first) that announce the version most of them share;
/// between versions held by equally many, the one of the cheapest holder. Replicas vote only
/// with replicas on their own version: others compute another function, honestly.
fn same_version<K: PartialEq>(
    holders: Vec<(f64, usize)>,
    key: impl Fn(usize) -> Option<K>,
) -> Vec<(f64, usize)> {
    let keys: Vec<Option<K>> = holders.iter().map(|(_, i)| key(*i)).collect();
    let mut best: Option<(usize, usize)> = None; // (count, index of its first holder)
    for (j, k) in keys.iter().enumerate() {
        if keys[..j].contains(k) {
            continue;
        }
        let count = keys.iter().filter(|other| *other == k).count();
        if best.is_none_or(|(c, _)| count > c) {
            best = Some((count, j));
        }
    }
    let Some((_, first)) = best else {
        return holders;
    };
    holders
        .into_iter()
        .zip(&keys)
        .filter(|(_, k)| **k == keys[first])
        .map(|(h, _)| h)
        .collect()
}
