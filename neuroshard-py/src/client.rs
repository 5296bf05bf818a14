//! `Client`, its text streams and logits sessions, and `PeerInfo`: over
//! `neuroshard_core::blocking`. Waits release the GIL and wake every 100 ms to let Ctrl-C in.

use crate::errors::to_py;
use crate::nodes::poisoned;
use neuroshard_core::blocking::{self, StreamEvent, TextStream};
use neuroshard_core::{PeerInfo, SamplingParams, SwarmOptions, TextRequest};
use numpy::{IntoPyArray, PyArray1};
use pyo3::prelude::*;
use std::sync::Mutex;
use std::time::Duration;

/// How long a wait runs without the GIL before Python's signal handlers get a turn.
const SIGNAL_CHECK: Duration = Duration::from_millis(100);

/// One node of the swarm.
#[pyclass(name = "PeerInfo", module = "neuroshard._native", frozen, get_all)]
#[derive(Clone)]
pub(crate) struct PeerInfoPy {
    /// Node id (hex).
    id: String,
    /// First layer served.
    start: usize,
    /// One past the last layer served.
    end: usize,
    /// Sessions open.
    load: u32,
    /// Sessions accepted.
    capacity: u32,
    /// Address line (`<id>@<ip:port>`).
    address: String,
    /// Milliseconds until its announcement expires.
    expires_in_ms: u64,
}

impl From<PeerInfo> for PeerInfoPy {
    fn from(p: PeerInfo) -> Self {
        PeerInfoPy {
            id: p.id,
            start: p.layers.start,
            end: p.layers.end,
            load: p.load,
            capacity: p.capacity,
            address: p.address,
            expires_in_ms: p.expires_in_ms,
        }
    }
}

#[pymethods]
impl PeerInfoPy {
    fn __repr__(&self) -> String {
        format!(
            "PeerInfo(id={}.., layers={}..{}, load={}/{})",
            &self.id[..self.id.len().min(10)],
            self.start,
            self.end,
            self.load,
            self.capacity
        )
    }
}

/// A client of one swarm, connected through any of its nodes.
#[pyclass(name = "Client", module = "neuroshard._native", subclass, frozen)]
pub(crate) struct ClientHandle {
    client: blocking::Client,
}

#[allow(clippy::too_many_arguments)]
fn text_request(
    max_tokens: usize,
    temperature: f32,
    top_p: f32,
    top_k: usize,
    seed: u64,
    stop: Option<Vec<String>>,
    chat: bool,
    ignore_eos: bool,
) -> TextRequest {
    TextRequest {
        max_tokens,
        sampling: SamplingParams {
            temperature,
            top_k,
            top_p,
            repetition_penalty: 1.0,
            seed,
        },
        stop: stop.unwrap_or_default(),
        chat,
        ignore_eos,
        ..TextRequest::default()
    }
}

#[pymethods]
impl ClientHandle {
    #[new]
    #[pyo3(signature = (peers, step_timeout_ms=30_000, redundancy=1, trust=None, adapter=None))]
    fn new(
        py: Python<'_>,
        peers: Vec<String>,
        step_timeout_ms: u64,
        redundancy: usize,
        trust: Option<Vec<String>>,
        adapter: Option<String>,
    ) -> PyResult<Self> {
        let trust = trust
            .unwrap_or_default()
            .iter()
            .map(|s| {
                s.parse::<neuroshard_core::net::NodeId>().map_err(|e| {
                    pyo3::exceptions::PyValueError::new_err(format!("`{s}` is not a node id: {e}"))
                })
            })
            .collect::<PyResult<Vec<_>>>()?;
        let options = SwarmOptions {
            step_timeout: Duration::from_millis(step_timeout_ms),
            redundancy: redundancy.max(1),
            trust,
            adapter,
            ..SwarmOptions::default()
        };
        let client = py
            .detach(|| blocking::Client::connect(&peers, options))
            .map_err(to_py)?;
        Ok(ClientHandle { client })
    }

    /// Generates a continuation of `prompt` and returns its text.
    #[pyo3(signature = (prompt, max_tokens=128, temperature=0.0, top_p=1.0, top_k=0, seed=0, stop=None, chat=false, ignore_eos=false))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        prompt: &str,
        max_tokens: usize,
        temperature: f32,
        top_p: f32,
        top_k: usize,
        seed: u64,
        stop: Option<Vec<String>>,
        chat: bool,
        ignore_eos: bool,
    ) -> PyResult<String> {
        let request = text_request(
            max_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            stop,
            chat,
            ignore_eos,
        );
        Ok(self.run(py, prompt, &request)?.output.text)
    }

    /// Like `generate`, returning a dict: `text`, `tokens`, `finish_reason`, `prompt_tokens`,
    /// `prefill_tokens_per_sec`, `decode_tokens_per_sec`, `failovers`.
    #[pyo3(signature = (prompt, max_tokens=128, temperature=0.0, top_p=1.0, top_k=0, seed=0, stop=None, chat=false, ignore_eos=false))]
    #[allow(clippy::too_many_arguments)]
    fn generate_details<'py>(
        &self,
        py: Python<'py>,
        prompt: &str,
        max_tokens: usize,
        temperature: f32,
        top_p: f32,
        top_k: usize,
        seed: u64,
        stop: Option<Vec<String>>,
        chat: bool,
        ignore_eos: bool,
    ) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
        let request = text_request(
            max_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            stop,
            chat,
            ignore_eos,
        );
        let out = self.run(py, prompt, &request)?;
        let d = pyo3::types::PyDict::new(py);
        let o = &out.output;
        d.set_item("text", &o.text)?;
        d.set_item("tokens", o.tokens.clone())?;
        d.set_item("finish_reason", format!("{:?}", o.finish).to_lowercase())?;
        d.set_item("prompt_tokens", o.prompt_tokens)?;
        d.set_item("prefill_tokens_per_sec", o.prefill_tokens_per_sec())?;
        d.set_item("decode_tokens_per_sec", o.decode_tokens_per_sec())?;
        d.set_item("failovers", out.recovery.failovers)?;
        d.set_item("votes", out.votes.clone())?;
        let replicas: Vec<Vec<String>> = out
            .replicas
            .iter()
            .map(|r| r.iter().map(|h| h.node.to_string()).collect())
            .collect();
        d.set_item("replicas", replicas)?;
        Ok(d)
    }

    /// This client's reputation table: a dict per node it has seen in votes (`node`,
    /// `state`, `score`, `reason`, ...), by node id.
    fn trust_table<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, pyo3::types::PyDict>>> {
        let rows = self.client.swarm_session().client().trust_table();
        rows.iter()
            .map(|r| crate::trust::standing_dict(py, r))
            .collect()
    }

    /// Replaces this client's reputation table with the one saved at `path`.
    fn load_reputation(&self, path: std::path::PathBuf) -> PyResult<()> {
        self.client
            .swarm_session()
            .client()
            .load_reputation(&path)
            .map_err(|e| to_py(e.into()))
    }

    /// Saves this client's reputation table to `path` (JSON).
    fn save_reputation(&self, path: std::path::PathBuf) -> PyResult<()> {
        self.client
            .swarm_session()
            .client()
            .save_reputation(&path)
            .map_err(|e| to_py(e.into()))
    }

    /// Starts a generation and returns an iterator over its text pieces.
    #[pyo3(signature = (prompt, max_tokens=128, temperature=0.0, top_p=1.0, top_k=0, seed=0, stop=None, chat=false, ignore_eos=false))]
    #[allow(clippy::too_many_arguments)]
    fn stream(
        &self,
        prompt: &str,
        max_tokens: usize,
        temperature: f32,
        top_p: f32,
        top_k: usize,
        seed: u64,
        stop: Option<Vec<String>>,
        chat: bool,
        ignore_eos: bool,
    ) -> PyResult<TextStreamHandle> {
        let request = text_request(
            max_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            stop,
            chat,
            ignore_eos,
        );
        let stream = self.client.stream(prompt, &request).map_err(to_py)?;
        Ok(TextStreamHandle {
            stream: Mutex::new(stream),
        })
    }

    /// Opens an inference session whose `step(token_ids)` returns the next-token logits.
    #[pyo3(signature = (max_length=None))]
    fn session(&self, py: Python<'_>, max_length: Option<usize>) -> PyResult<LogitsSessionHandle> {
        let session = py
            .detach(|| self.client.session(max_length))
            .map_err(to_py)?;
        Ok(LogitsSessionHandle {
            session: Mutex::new(session),
        })
    }

    /// The nodes of the swarm and what they serve.
    fn peers(&self, py: Python<'_>) -> PyResult<Vec<PeerInfoPy>> {
        let peers = py.detach(|| self.client.peers()).map_err(to_py)?;
        Ok(peers.into_iter().map(PeerInfoPy::from).collect())
    }

    /// The model's tokenizer.
    #[getter]
    fn tokenizer(&self) -> crate::tokenizer::TokenizerHandle {
        crate::tokenizer::TokenizerHandle::new(self.client.tokenizer().clone())
    }

    /// Closes the client's endpoint.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.client.close()).map_err(to_py)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }
}

impl ClientHandle {
    /// Runs a generation to the end, waking for signals.
    fn run(
        &self,
        py: Python<'_>,
        prompt: &str,
        request: &TextRequest,
    ) -> PyResult<neuroshard_core::SwarmGeneration> {
        let mut stream = self.client.stream(prompt, request).map_err(to_py)?;
        loop {
            if let Some(StreamEvent::Done(result)) = wait(py, &mut stream)? {
                return result.map_err(to_py);
            }
        }
    }
}

/// Waits up to [`SIGNAL_CHECK`] for the stream's next event without the GIL, then runs
/// Python's signal handlers: Ctrl-C raises `KeyboardInterrupt` and stops the generation.
fn wait(py: Python<'_>, stream: &mut TextStream) -> PyResult<Option<StreamEvent>> {
    let event = py.detach(|| stream.next_timeout(SIGNAL_CHECK));
    if let Err(e) = py.check_signals() {
        stream.cancel();
        return Err(e);
    }
    Ok(event)
}

/// The pieces of a generation in flight; iterate over it. Dropping it stops the generation.
#[pyclass(name = "TextStream", module = "neuroshard._native", frozen)]
pub(crate) struct TextStreamHandle {
    stream: Mutex<TextStream>,
}

#[pymethods]
impl TextStreamHandle {
    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<String>> {
        let mut stream = self.stream.lock().map_err(|_| poisoned())?;
        loop {
            if stream.ended() {
                return Ok(None);
            }
            match wait(py, &mut stream)? {
                Some(StreamEvent::Piece(piece)) => return Ok(Some(piece)),
                Some(StreamEvent::Done(result)) => {
                    return match *result {
                        Ok(_) => Ok(None),
                        Err(e) => Err(to_py(e)),
                    }
                }
                None => continue,
            }
        }
    }

    /// Stops the generation after the current token.
    fn close(&self) -> PyResult<()> {
        self.stream.lock().map_err(|_| poisoned())?.cancel();
        Ok(())
    }
}

/// An inference session over the swarm that returns logits (write your own decoding).
#[pyclass(name = "InferenceSession", module = "neuroshard._native", frozen)]
pub(crate) struct LogitsSessionHandle {
    session: Mutex<blocking::BlockingLogitsSession>,
}

#[pymethods]
impl LogitsSessionHandle {
    /// Feeds `token_ids` at the current position; returns the float32 logits predicting the
    /// next position.
    fn step<'py>(
        &self,
        py: Python<'py>,
        token_ids: Vec<u32>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let logits = py
            .detach(|| {
                let mut session = self
                    .session
                    .lock()
                    .map_err(|_| neuroshard_core::Error::Internal("poisoned lock".into()))?;
                session.step(&token_ids)
            })
            .map_err(to_py)?;
        Ok(logits.into_pyarray(py))
    }

    /// Positions fed so far.
    #[getter]
    fn position(&self) -> PyResult<usize> {
        Ok(self.session.lock().map_err(|_| poisoned())?.position())
    }

    /// Most positions the session may use.
    #[getter]
    fn max_length(&self) -> PyResult<usize> {
        Ok(self.session.lock().map_err(|_| poisoned())?.max_length())
    }

    /// Goes back to `position` (the next step overwrites from there).
    fn rewind(&self, position: usize) -> PyResult<()> {
        self.session
            .lock()
            .map_err(|_| poisoned())?
            .rewind(position)
            .map_err(to_py)
    }

    /// Closes the session on every hop.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| {
            if let Ok(mut s) = self.session.lock() {
                s.close();
            }
        });
        Ok(())
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PeerInfoPy>()?;
    m.add_class::<ClientHandle>()?;
    m.add_class::<TextStreamHandle>()?;
    m.add_class::<LogitsSessionHandle>()
}
