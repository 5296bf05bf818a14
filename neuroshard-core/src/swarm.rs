//! A whole swarm in one process: nodes on loopback serving even slices (optionally replicated),
//! each announcing itself with a signed announcement, and a client that plans its route from
//! the announcements and generates through the chained relay. Used by `neuroshard swarm`, the
//! demo and tests.

use crate::client::{BlockingSession, Client};
use crate::engine::{EngineOptions, ShardEngine};
use crate::error::{Error, Result};
use crate::generate::{generate, GenerationConfig, GenerationOutput};
use crate::model::tokenizer::Tokenizer;
use crate::model::weights::WeightFile;
use crate::net::announce::{
    announced_versions, Announcement, SignedAnnouncement, PROTOCOL_VERSION,
};
use crate::net::endpoint::EndpointOptions;
use crate::net::now_ms;
use crate::net::peers::PeerSet;
use crate::net::proto::RouteHop;
use crate::net::route::RouteOptions;
use crate::node::{model_id, Node};
use crate::protocol::client_session::SessionStats;
use crate::wire::Codec;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

/// A running local swarm.
#[derive(Debug)]
pub struct LocalSwarm {
    /// The nodes, grouped by slice (replicas of a slice are adjacent).
    pub nodes: Vec<Node>,
    /// The model id.
    pub model_id: String,
    /// Layers in the model.
    pub layers: usize,
    tokenizer: Tokenizer,
}

/// `nodes` even slices of `layers`: `even_slices(30, 3)` = 0..10, 10..20, 20..30.
pub fn even_slices(layers: usize, nodes: usize) -> Vec<Range<usize>> {
    let n = nodes.clamp(1, layers.max(1));
    (0..n)
        .map(|i| (i * layers / n)..((i + 1) * layers / n))
        .collect()
}

impl LocalSwarm {
    /// Loads the model once and starts `nodes x replicas` nodes on 127.0.0.1.
    /// `progress(message)` reports each node as it starts.
    pub async fn start(
        path: &Path,
        nodes: usize,
        replicas: usize,
        options: EngineOptions,
        progress: &mut (dyn FnMut(String) + Send),
    ) -> Result<LocalSwarm> {
        // Loading reads and unpacks every slice: a blocking thread's work, not a runtime
        // worker's.
        let path = path.to_path_buf();
        let (engines, layers, tokenizer) = tokio::task::spawn_blocking(move || {
            let file = Arc::new(WeightFile::open(&path)?);
            let layers = file.config().num_layers;
            let tokenizer = Tokenizer::for_model(&file)?;
            let mut engines = Vec::new();
            for slice in even_slices(layers, nodes) {
                for _ in 0..replicas.max(1) {
                    engines.push(Arc::new(ShardEngine::from_file(
                        file.clone(),
                        slice.clone(),
                        options.clone(),
                        &mut |_, _| {},
                    )?));
                }
            }
            Ok::<_, Error>((engines, layers, tokenizer))
        })
        .await
        .map_err(|e| Error::Internal(format!("engine load task failed: {e}")))??;
        let mut started = Vec::new();
        for engine in engines {
            let slice = engine.layers();
            let node = Node::spawn(
                engine,
                iroh::SecretKey::generate(),
                EndpointOptions::default(),
            )
            .await?;
            progress(format!(
                "node {} serving layers {}..{} at {}",
                node.id().fmt_short(),
                slice.start,
                slice.end,
                node.addr()
                    .ip_addrs()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ));
            started.push(node);
        }
        let model_id = started
            .first()
            .map(|n| model_id(n.engine()))
            .ok_or_else(|| Error::Generation("a swarm needs at least one node".into()))?;
        let swarm = LocalSwarm {
            nodes: started,
            model_id,
            layers,
            tokenizer,
        };
        // Every node knows every other (a leaving node finds its replicas this way).
        let announcements = swarm.announcements()?;
        for node in &swarm.nodes {
            for ann in &announcements {
                match node.learn(ann) {
                    // A node's own announcer may already have inserted a newer one.
                    Ok(_) | Err(crate::net::NetError::Replayed { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(swarm)
    }

    /// The address line of the swarm's first node: what a client passes as its peer.
    pub fn address(&self) -> String {
        self.nodes.first().map(Node::address).unwrap_or_default()
    }

    /// The address lines of every node (a client can fail over through any of them).
    pub fn addresses(&self) -> Vec<String> {
        self.nodes.iter().map(Node::address).collect()
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Every node's signed announcement, as gossip would deliver them.
    pub fn announcements(&self) -> Result<Vec<SignedAnnouncement>> {
        let now = now_ms();
        self.nodes
            .iter()
            .map(|n| {
                let layers = n.engine().layers();
                let stats = n.engine().stats();
                let ann = Announcement {
                    protocol_version: PROTOCOL_VERSION,
                    node: n.id(),
                    model_id: self.model_id.clone(),
                    versions: announced_versions(n.engine()),
                    layers: layers.start as u32..layers.end as u32,
                    capacity: 64,
                    load: stats.sessions_open as u32,
                    addrs: n.addr().ip_addrs().copied().collect(),
                    entry: layers.start == 0,
                    timestamp_ms: now,
                    expires_ms: now + 60_000,
                };
                Ok(SignedAnnouncement::sign(&ann, n.secret_key())?)
            })
            .collect()
    }

    /// Plans a route from the announcements, as a client would.
    pub fn plan(&self) -> Result<Vec<RouteHop>> {
        let mut peers = PeerSet::new(self.model_id.clone());
        let now = now_ms();
        for ann in self.announcements()? {
            peers.insert(&ann, now)?;
        }
        let route = peers.plan_route(self.layers, now, &RouteOptions::default())?;
        Ok(route.to_hops())
    }

    /// Generates from `prompt` through a planned route. Must be called from a tokio runtime;
    /// the generation loop runs on a blocking thread and streams pieces to `on_text`.
    pub async fn generate(
        &self,
        client: &Client,
        prompt: Vec<u32>,
        config: GenerationConfig,
        codec: Codec,
        on_text: Box<dyn FnMut(&str) + Send>,
    ) -> Result<GenerationOutput> {
        Ok(self
            .generate_with_stats(client, prompt, config, codec, on_text)
            .await?
            .0)
    }

    /// [`LocalSwarm::generate`], also returning how the session recovered from failures and
    /// moves (failovers, refills, hand-overs).
    pub async fn generate_with_stats(
        &self,
        client: &Client,
        prompt: Vec<u32>,
        config: GenerationConfig,
        codec: Codec,
        on_text: Box<dyn FnMut(&str) + Send>,
    ) -> Result<(GenerationOutput, SessionStats)> {
        let route = self.plan()?;
        let session = client
            .open_session(
                route,
                &self.model_id,
                codec,
                config.sampling,
                prompt.clone(),
            )
            .await?;
        let handle = tokio::runtime::Handle::current();
        let tokenizer = self.tokenizer.clone();
        let context_len = self
            .nodes
            .iter()
            .map(|n| n.engine().max_session_len())
            .min()
            .unwrap_or(0);
        let mut on_text = on_text;
        let announcements = self.announcements()?;
        let (model_id, layers) = (self.model_id.clone(), self.layers);
        // Failover re-plans from the same announcements with the failed nodes excluded.
        let replanner: crate::client::Replanner =
            Box::new(move |failed: &[crate::net::NodeId]| {
                let mut peers = PeerSet::new(model_id.clone());
                let now = now_ms();
                for ann in &announcements {
                    peers.insert(ann, now)?;
                }
                let opts = RouteOptions {
                    exclude: failed.to_vec(),
                    ..RouteOptions::default()
                };
                Ok(peers.plan_route(layers, now, &opts)?.to_hops())
            });
        let (out, mut session) = tokio::task::spawn_blocking(move || {
            let mut backend =
                BlockingSession::new(session, handle, context_len).with_failover(replanner);
            let out = generate(
                &mut backend,
                Some(&tokenizer),
                &prompt,
                &config,
                &mut *on_text,
            );
            (out, backend.session)
        })
        .await
        .map_err(|e| Error::Generation(format!("generation task failed: {e}")))?;
        session.close().await;
        Ok((out?, session.stats()))
    }

    /// Stops every node.
    pub async fn shutdown(&self) {
        for n in &self.nodes {
            n.shutdown().await;
        }
    }
}
