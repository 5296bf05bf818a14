//! [`Connections`]: the live QUIC connection to each peer, shared by the node and the client.
//!
//! A peer is dialed once at a time. Concurrent callers that all found no connection would
//! otherwise each dial, and a connection dropped from the table closes as soon as its last
//! stream is dropped, taking data still in flight with it (a lost token under concurrent first
//! steps). For the same reason a live connection in the table is never replaced.

use super::proto::{dial_alpn, INFER_ALPN};
use super::{lock, NetError, NodeId};
use iroh::endpoint::Connection;
use iroh::Endpoint;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Live connections by peer, dialed at most once at a time per peer.
#[derive(Debug)]
pub(crate) struct Connections {
    live: Mutex<HashMap<NodeId, Connection>>,
    dialing: Mutex<HashMap<NodeId, Arc<tokio::sync::Mutex<()>>>>,
    /// The protocol its connections speak.
    alpn: &'static [u8],
}

impl Default for Connections {
    /// Connections of the inference protocol.
    fn default() -> Self {
        Connections::for_alpn(INFER_ALPN)
    }
}

impl Connections {
    /// An empty table of connections speaking `alpn`.
    pub(crate) fn for_alpn(alpn: &'static [u8]) -> Self {
        Connections {
            live: Mutex::default(),
            dialing: Mutex::default(),
            alpn,
        }
    }

    /// The live connection to `node`, if any.
    pub(crate) fn get(&self, node: &NodeId) -> Option<Connection> {
        lock(&self.live)
            .get(node)
            .filter(|c| c.close_reason().is_none())
            .cloned()
    }

    /// The live connection to `node`, or a new one dialed at `addrs`; `true` when it was
    /// dialed by this call (the caller may start serving it).
    pub(crate) async fn get_or_dial(
        &self,
        endpoint: &Endpoint,
        node: NodeId,
        addrs: &[std::net::SocketAddr],
    ) -> Result<(Connection, bool), NetError> {
        if let Some(c) = self.get(&node) {
            return Ok((c, false));
        }
        let gate = lock(&self.dialing).entry(node).or_default().clone();
        let _dialing = gate.lock().await;
        if let Some(c) = self.get(&node) {
            return Ok((c, false));
        }
        let conn = dial_alpn(endpoint, node, addrs, self.alpn).await?;
        lock(&self.live).insert(node, conn.clone());
        Ok((conn, true))
    }

    /// [`Connections::get_or_dial`], trying up to three times: iroh keeps sending to a peer's
    /// last good path for about 6.5 s after it restarts under the same identity (iroh issue
    /// 3602), longer than one dial waits.
    pub(crate) async fn get_or_dial_patiently(
        &self,
        endpoint: &Endpoint,
        node: NodeId,
        addrs: &[std::net::SocketAddr],
    ) -> Result<(Connection, bool), NetError> {
        let mut last = None;
        for _ in 0..3 {
            match self.get_or_dial(endpoint, node, addrs).await {
                Ok(c) => return Ok(c),
                Err(e @ NetError::Timeout { .. }) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| NetError::Io("dialing failed".into())))
    }

    /// Records a connection `node` dialed to us, unless a live one is already kept (the table
    /// may be that one's only holder; this one is held by its serving loop either way).
    pub(crate) fn adopt(&self, node: NodeId, conn: &Connection) {
        let mut live = lock(&self.live);
        if live.get(&node).is_none_or(|c| c.close_reason().is_some()) {
            live.insert(node, conn.clone());
        }
    }

    /// Forgets `conn` (it closed), if it is the one kept for `node`.
    pub(crate) fn forget(&self, node: NodeId, conn: &Connection) {
        let mut live = lock(&self.live);
        if live
            .get(&node)
            .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            live.remove(&node);
        }
    }
}
