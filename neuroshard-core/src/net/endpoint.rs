//! The iroh endpoint of a node or client, and the node's persistent key.
//!
//! Offline by default, as local swarms and tests need (see DESIGN.md, "Verified facts and
//! traps"): relays, port mapping and the net-report probes are off and the endpoint binds one
//! explicit address. Real deployments turn relays (NAT traversal) and port mapping on.

use super::NetError;
use iroh::address_lookup::MemoryLookup;
use iroh::endpoint::{presets, PortmapperConfig};
use iroh::{Endpoint, EndpointAddr, NetReportConfig, RelayMode, SecretKey};
use std::net::SocketAddr;
use std::path::Path;

/// How to bind an endpoint.
#[derive(Debug, Clone)]
pub struct EndpointOptions {
    /// Address to bind (default `127.0.0.1:0`: loopback, any free port).
    pub bind: SocketAddr,
    /// Use n0's public relay servers (NAT traversal). Off by default.
    pub relays: bool,
    /// Ask the router for a port mapping (UPnP/NAT-PMP/PCP). Off by default.
    pub portmapper: bool,
    /// ALPN protocols this endpoint accepts.
    pub alpns: Vec<Vec<u8>>,
    /// In-memory address book (gossip dials peers by id through it).
    pub lookup: Option<MemoryLookup>,
    /// Find (and be found by) nodes on the local network with mDNS. Off by default.
    pub mdns: bool,
    /// QUIC limits on what a peer may open and buffer on one connection.
    pub transport: TransportLimits,
    /// Refuses incoming connections past per-peer and node-wide caps (nodes set it).
    pub gate: Option<super::limits::ConnectionGate>,
}

/// QUIC transport limits of an endpoint: what one peer may open and make this endpoint
/// buffer on one connection. QUIC's defaults let a peer's data sit unread up to an unbounded
/// connection window; these bound it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TransportLimits {
    /// Request (bidirectional) streams a peer may have open at once on one connection; more
    /// wait (QUIC flow control) without costing this endpoint anything.
    pub max_bidi_streams: u32,
    /// Data (unidirectional) streams a peer may have open at once on one connection.
    pub max_uni_streams: u32,
    /// Bytes a peer may send on one stream before this endpoint reads them.
    pub stream_receive_window: u32,
    /// Bytes a peer may send over all streams of one connection before this endpoint reads
    /// them: the most one connection buffers.
    pub receive_window: u32,
    /// A connection silent this long is closed.
    pub idle_timeout: std::time::Duration,
}

impl Default for TransportLimits {
    fn default() -> Self {
        TransportLimits {
            max_bidi_streams: 64,
            max_uni_streams: 128,
            // A 2,048-position f16 hidden-state frame of a 576-wide model is 2.4 MB.
            stream_receive_window: 4 << 20,
            receive_window: 8 << 20,
            idle_timeout: std::time::Duration::from_secs(30),
        }
    }
}

impl TransportLimits {
    /// The iroh transport config with these limits.
    fn quic_config(&self) -> Result<iroh::endpoint::QuicTransportConfig, NetError> {
        use iroh::endpoint::{QuicTransportConfig, VarInt};
        let idle = self
            .idle_timeout
            .try_into()
            .map_err(|e| NetError::Malformed(format!("idle timeout: {e}")))?;
        Ok(QuicTransportConfig::builder()
            .max_concurrent_bidi_streams(VarInt::from_u32(self.max_bidi_streams))
            .max_concurrent_uni_streams(VarInt::from_u32(self.max_uni_streams))
            .stream_receive_window(VarInt::from_u32(self.stream_receive_window))
            .receive_window(VarInt::from_u32(self.receive_window))
            .max_idle_timeout(Some(idle))
            .build())
    }
}

impl Default for EndpointOptions {
    fn default() -> Self {
        EndpointOptions {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            relays: false,
            portmapper: false,
            alpns: Vec::new(),
            lookup: None,
            mdns: false,
            transport: TransportLimits::default(),
            gate: None,
        }
    }
}

/// Binds an endpoint with `key` as its identity.
pub async fn bind(key: SecretKey, options: &EndpointOptions) -> Result<Endpoint, NetError> {
    let mut builder = Endpoint::builder(presets::Minimal)
        .secret_key(key)
        .alpns(options.alpns.clone())
        .transport_config(options.transport.quic_config()?);
    if let Some(gate) = &options.gate {
        builder = builder.hooks(gate.clone());
    }
    if options.relays {
        builder = builder.relay_mode(RelayMode::Default);
    } else {
        builder = builder
            .relay_mode(RelayMode::Disabled)
            .net_report_config(NetReportConfig::minimal());
    }
    if let Some(lookup) = &options.lookup {
        builder = builder.address_lookup(lookup.clone());
    }
    if !options.portmapper {
        builder = builder.portmapper_config(PortmapperConfig::Disabled);
    }
    let builder = builder
        .clear_ip_transports()
        .bind_addr(options.bind)
        .map_err(|e| NetError::Io(format!("bind address {}: {e}", options.bind)))?;
    builder
        .bind()
        .await
        .map_err(|e| NetError::Io(format!("binding endpoint on {}: {e}", options.bind)))
}

/// The address others dial this endpoint at: its id plus its bound sockets.
pub fn dial_addr(endpoint: &Endpoint) -> EndpointAddr {
    endpoint
        .bound_sockets()
        .into_iter()
        .fold(EndpointAddr::new(endpoint.id()), |addr, s| {
            addr.with_ip_addr(s)
        })
}

/// Parses a peer address: `<node id>@<ip:port>[,<ip:port>...]` (the line a node prints).
pub fn parse_peer_addr(s: &str) -> Result<EndpointAddr, NetError> {
    let (id, addrs) = s.trim().split_once('@').ok_or_else(|| {
        NetError::Malformed(format!(
            "peer address `{s}`: expected <node id>@<ip:port> as printed by `neuroshard node`"
        ))
    })?;
    let id: iroh::PublicKey = id
        .parse()
        .map_err(|e| NetError::Malformed(format!("peer id `{id}`: {e}")))?;
    addrs.split(',').try_fold(EndpointAddr::new(id), |addr, a| {
        let sock: SocketAddr = a
            .parse()
            .map_err(|e| NetError::Malformed(format!("peer socket address `{a}`: {e}")))?;
        Ok(addr.with_ip_addr(sock))
    })
}

/// How long resolving a plain `host:port` may take.
pub const RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Resolves a peer given either as its address line (`<id>@<ip:port>`, see
/// [`parse_peer_addr`]) or as a plain `host:port`: then the node's address line is fetched
/// from the TCP port with the same number as its QUIC (UDP) port, where every node answers
/// with it. That answer is not authenticated (trust on first use); everything after it is,
/// by the node id it names. Blocking, bounded by [`RESOLVE_TIMEOUT`] per address.
pub fn resolve_peer_addr(s: &str) -> Result<EndpointAddr, NetError> {
    let s = s.trim();
    if s.contains('@') {
        return parse_peer_addr(s);
    }
    use std::io::Read;
    use std::net::ToSocketAddrs;
    let socks = s
        .to_socket_addrs()
        .map_err(|e| NetError::Malformed(format!("peer `{s}`: {e}")))?;
    let mut last = NetError::Malformed(format!("peer `{s}` resolves to no address"));
    for sock in socks {
        let attempt = std::net::TcpStream::connect_timeout(&sock, RESOLVE_TIMEOUT).and_then(|c| {
            c.set_read_timeout(Some(RESOLVE_TIMEOUT))?;
            let mut line = Vec::new();
            // An address line is short: read at most 4 KiB.
            c.take(4096).read_to_end(&mut line)?;
            Ok(line)
        });
        match attempt {
            Ok(line) => {
                let line = String::from_utf8_lossy(&line);
                return parse_peer_addr(line.lines().next().unwrap_or(""));
            }
            Err(e) => {
                last = NetError::Io(format!(
                    "asking {sock} for its node address (is a node listening there?): {e}"
                ))
            }
        }
    }
    Err(last)
}

/// Answers every TCP connection on the endpoint's bound socket addresses (same port numbers,
/// TCP instead of UDP) with the endpoint's address line, so peers can be given as plain
/// `host:port`. Ports that cannot be bound are skipped (the address line still works).
/// Returns the listening tasks (abort them to stop answering).
pub async fn serve_address_line(endpoint: &Endpoint) -> Vec<tokio::task::JoinHandle<()>> {
    let line = format!("{}\n", format_peer_addr(&dial_addr(endpoint)));
    let mut served = Vec::new();
    for sock in endpoint.bound_sockets() {
        let Ok(listener) = tokio::net::TcpListener::bind(sock).await else {
            continue;
        };
        let line = line.clone();
        served.push(tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let line = line.clone();
                tokio::spawn(async move {
                    use tokio::io::AsyncWriteExt;
                    let _ = conn.write_all(line.as_bytes()).await;
                    let _ = conn.shutdown().await;
                });
            }
        }));
    }
    served
}

/// Formats an endpoint's address as `<node id>@<ip:port>,...` (what [`parse_peer_addr`] reads).
pub fn format_peer_addr(addr: &EndpointAddr) -> String {
    let socks: Vec<String> = addr.ip_addrs().map(|a| a.to_string()).collect();
    format!("{}@{}", addr.id, socks.join(","))
}

/// Loads the node key from `path`, or creates one there (mode 0600) if the file is missing,
/// so a node keeps its identity across restarts.
pub fn load_or_create_key(path: &Path) -> Result<SecretKey, NetError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let bytes = crate::model::identity::parse_hex(text.trim()).ok_or_else(|| {
                NetError::Malformed(format!("{} is not a 64-hex-digit node key", path.display()))
            })?;
            Ok(SecretKey::from_bytes(&bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SecretKey::generate();
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| NetError::Io(format!("{}: {e}", dir.display())))?;
            }
            let hex: String = key.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
            write_private(path, &hex)
                .map_err(|e| NetError::Io(format!("{}: {e}", path.display())))?;
            Ok(key)
        }
        Err(e) => Err(NetError::Io(format!("{}: {e}", path.display()))),
    }
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options.open(path)?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")
}
