//! `Node` and `LocalSwarm`: serving slices, over `neuroshard_core::blocking`.

use crate::engine::parse_mode;
use crate::errors::to_py;
use neuroshard_core::{blocking, EngineOptions, Node as CoreNode};
use pyo3::prelude::*;
use std::sync::Mutex;

/// A node serving layers `[start, end)` of a model to the swarm.
#[pyclass(name = "Node", module = "neuroshard._native", subclass, frozen)]
pub(crate) struct NodeHandle {
    node: Mutex<blocking::Node>,
    address: String,
}

#[pymethods]
impl NodeHandle {
    #[new]
    #[pyo3(signature = (model, start, end, port=0, peers=Vec::new(), mode="exact", trainers=Vec::new(), checkpoint=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        model: std::path::PathBuf,
        start: usize,
        end: usize,
        port: u16,
        peers: Vec<String>,
        mode: &str,
        trainers: Vec<String>,
        checkpoint: Option<std::path::PathBuf>,
    ) -> PyResult<Self> {
        let mode = parse_mode(mode)?;
        let trainers = trainers
            .iter()
            .map(|s| {
                s.parse::<neuroshard_core::net::NodeId>().map_err(|e| {
                    pyo3::exceptions::PyValueError::new_err(format!("`{s}` is not a node id: {e}"))
                })
            })
            .collect::<PyResult<Vec<_>>>()?;
        let policy = neuroshard_core::train::TrainPolicy {
            trainers,
            checkpoint,
            memory_budget: None,
        };
        let node = py
            .detach(|| {
                let bootstrap = if peers.is_empty() {
                    Vec::new()
                } else {
                    blocking::resolve_peers(&peers)?
                };
                let builder = CoreNode::builder(model)
                    .layers(start..end)
                    .mode(mode)
                    .port(port)
                    .peers(bootstrap)
                    .train(policy);
                blocking::Node::start(builder)
            })
            .map_err(to_py)?;
        let address = node.address().map_err(to_py)?;
        Ok(NodeHandle {
            node: Mutex::new(node),
            address,
        })
    }

    /// The address line (`<id>@<ip:port>`) that clients and other nodes pass as a peer.
    #[getter]
    fn address(&self) -> String {
        self.address.clone()
    }

    /// The swarm as this node sees it.
    fn peers(&self) -> PyResult<Vec<crate::client::PeerInfoPy>> {
        let node = self.node.lock().map_err(|_| poisoned())?;
        Ok(node
            .peers()
            .map_err(to_py)?
            .into_iter()
            .map(crate::client::PeerInfoPy::from)
            .collect())
    }

    /// Stops the node. Closing twice is fine.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| {
            let mut node = self.node.lock().map_err(|_| poisoned())?;
            node.close().map_err(to_py)
        })
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!("Node({})", self.address)
    }
}

/// A whole swarm in this process: `nodes` slices x `replicas` nodes on 127.0.0.1.
#[pyclass(name = "LocalSwarm", module = "neuroshard._native", subclass, frozen)]
pub(crate) struct LocalSwarmHandle {
    swarm: Mutex<blocking::LocalSwarm>,
    address: String,
}

#[pymethods]
impl LocalSwarmHandle {
    #[new]
    #[pyo3(signature = (model, nodes=3, replicas=1, mode="exact"))]
    fn new(
        py: Python<'_>,
        model: std::path::PathBuf,
        nodes: usize,
        replicas: usize,
        mode: &str,
    ) -> PyResult<Self> {
        let options = EngineOptions {
            mode: parse_mode(mode)?,
            ..EngineOptions::default()
        };
        let swarm = py
            .detach(|| blocking::LocalSwarm::start(&model, nodes, replicas, options))
            .map_err(to_py)?;
        let address = swarm.address();
        Ok(LocalSwarmHandle {
            swarm: Mutex::new(swarm),
            address,
        })
    }

    /// The first node's address line: what a `Client` connects to.
    #[getter]
    fn address(&self) -> String {
        self.address.clone()
    }

    /// Every node's address line.
    fn addresses(&self) -> PyResult<Vec<String>> {
        let swarm = self.swarm.lock().map_err(|_| poisoned())?;
        swarm.addresses().map_err(to_py)
    }

    /// Stops every node. Closing twice is fine.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| {
            let mut swarm = self.swarm.lock().map_err(|_| poisoned())?;
            swarm.close().map_err(to_py)
        })
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!("LocalSwarm({})", self.address)
    }
}

/// A lock poisoned by a panic in another thread.
pub(crate) fn poisoned() -> PyErr {
    to_py(neuroshard_core::Error::Internal(
        "a lock was poisoned by an earlier panic".into(),
    ))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NodeHandle>()?;
    m.add_class::<LocalSwarmHandle>()
}
