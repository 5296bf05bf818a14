//! `ShardEngine`: one slice of layers, forward over numpy arrays.

use crate::errors::to_py;
use neuroshard_core::{
    AdamWConfig, ComputeMode, EngineOptions, ForwardRequest, LoraConfig, ShardEngine, ShardInput,
};
use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{IntoPyArray, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::Arc;

/// Parses a compute mode name (`exact`, `f32`, `fast`).
pub(crate) fn parse_mode(mode: &str) -> PyResult<ComputeMode> {
    mode.parse::<ComputeMode>()
        .map_err(|e| PyValueError::new_err(format!("mode {mode:?}: {e}")))
}

/// Token ids (integers `[batch, seq]`, any integer dtype or nested lists) as an input.
fn tokens_input(np: &Bound<'_, PyModule>, t: Bound<'_, PyAny>) -> PyResult<ShardInput> {
    let arr = np.call_method1("ascontiguousarray", (t, "int64"))?;
    let arr = arr.cast_into::<PyArrayDyn<i64>>()?;
    let ro = arr.readonly();
    let shape = ro.shape().to_vec();
    let [batch, seq] = shape[..] else {
        return Err(to_py(neuroshard_core::Error::BadInput(format!(
            "tokens must be [batch, seq], got shape {shape:?}"
        ))));
    };
    let ids = ro
        .as_slice()?
        .iter()
        .map(|&v| {
            u32::try_from(v).map_err(|_| {
                to_py(neuroshard_core::Error::BadInput(format!(
                    "token id {v} is not a valid id"
                )))
            })
        })
        .collect::<PyResult<Vec<u32>>>()?;
    ShardInput::tokens_from_slice(&ids, batch, seq).map_err(to_py)
}

/// One contiguous slice `[start, end)` of a model.
#[pyclass(name = "ShardEngine", module = "neuroshard._native", subclass, frozen)]
pub(crate) struct ShardEngineHandle {
    engine: Arc<ShardEngine>,
}

#[pymethods]
impl ShardEngineHandle {
    #[new]
    #[pyo3(signature = (path, start, end, mode="exact"))]
    fn new(
        py: Python<'_>,
        path: std::path::PathBuf,
        start: usize,
        end: usize,
        mode: &str,
    ) -> PyResult<Self> {
        let options = EngineOptions {
            mode: parse_mode(mode)?,
            ..EngineOptions::default()
        };
        let engine = py
            .detach(|| ShardEngine::load(&path, start..end, options))
            .map_err(to_py)?;
        Ok(ShardEngineHandle {
            engine: Arc::new(engine),
        })
    }

    /// The model's hyper-parameters and this slice, as a dict.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = self.engine.config();
        let d = PyDict::new(py);
        d.set_item(
            "architecture",
            format!("{:?}", c.architecture).to_lowercase(),
        )?;
        d.set_item("layers", c.num_layers)?;
        d.set_item("hidden_size", c.hidden_size)?;
        d.set_item("intermediate_size", c.intermediate_size)?;
        d.set_item("heads", c.num_heads)?;
        d.set_item("kv_heads", c.num_kv_heads)?;
        d.set_item("head_dim", c.head_dim)?;
        d.set_item("vocab_size", c.vocab_size)?;
        d.set_item("max_positions", c.max_positions)?;
        let layers = self.engine.layers();
        d.set_item("start", layers.start)?;
        d.set_item("end", layers.end)?;
        d.set_item("mode", format!("{:?}", self.engine.mode()).to_lowercase())?;
        Ok(d)
    }

    /// Opens session `id` (an empty KV cache).
    fn open_session(&self, id: u64) -> PyResult<()> {
        self.engine.open_session(id).map_err(to_py)
    }

    /// Closes session `id`, freeing its cache.
    fn close_session(&self, id: u64) -> PyResult<()> {
        self.engine.close_session(id).map_err(to_py)
    }

    /// Runs the slice: `tokens` (integers `[batch, seq]`, first slice) or `hidden` (floats
    /// `[batch, seq, hidden]`); returns hidden states or, on the last slice, logits for every
    /// position, as a float32 array.
    /// With `adapter`, runs with that LoRA adapter ([`ShardEngine::create_adapter`]).
    #[pyo3(signature = (tokens=None, hidden=None, session=None, position=0, adapter=None))]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        tokens: Option<Bound<'py, PyAny>>,
        hidden: Option<Bound<'py, PyAny>>,
        session: Option<u64>,
        position: usize,
        adapter: Option<String>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let np = py.import("numpy")?;
        let input = match (tokens, hidden) {
            (Some(t), None) => tokens_input(&np, t)?,
            (None, Some(h)) => {
                let arr = np.call_method1("ascontiguousarray", (h, "float32"))?;
                let arr = arr.cast_into::<PyArrayDyn<f32>>()?;
                let ro = arr.readonly();
                let shape = ro.shape().to_vec();
                let [batch, seq, width] = shape[..] else {
                    return Err(to_py(neuroshard_core::Error::BadInput(format!(
                        "hidden must be [batch, seq, hidden], got shape {shape:?}"
                    ))));
                };
                ShardInput::hidden_from_slice(ro.as_slice()?, batch, seq, width).map_err(to_py)?
            }
            _ => {
                return Err(to_py(neuroshard_core::Error::BadInput(
                    "pass exactly one of tokens= or hidden=".into(),
                )))
            }
        };
        let mut req = ForwardRequest::new(input);
        if let Some(name) = adapter {
            req = req.adapter(name);
        }
        if let Some(id) = session {
            req = req.session(id, position);
        } else {
            req.start_pos = position;
        }
        let engine = self.engine.clone();
        let (values, dims) = py
            .detach(move || engine.forward(req).and_then(|out| out.to_f32_vec()))
            .map_err(to_py)?;
        let array = ArrayD::from_shape_vec(IxDyn(&dims), values)
            .map_err(|e| to_py(neuroshard_core::Error::Internal(e.to_string())))?;
        Ok(array.into_pyarray(py))
    }

    /// Counters: tensors and bytes loaded, forward calls, positions, sessions, KV bytes.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.engine.stats();
        let d = PyDict::new(py);
        d.set_item("tensors_loaded", s.tensors_loaded)?;
        d.set_item("bytes_loaded", s.bytes_loaded)?;
        d.set_item("parameter_bytes", s.parameter_bytes)?;
        d.set_item("forward_calls", s.forward_calls)?;
        d.set_item("positions_processed", s.positions_processed)?;
        d.set_item("layer_positions", s.layer_positions)?;
        d.set_item("sessions_open", s.sessions_open)?;
        d.set_item("kv_cache_bytes", s.kv_cache_bytes)?;
        Ok(d)
    }

    /// Creates the LoRA adapter `name` on the matrices whose module name ends with one of
    /// `targets` (`A` seeded by `seed`, `B` zero: outputs are unchanged until it trains).
    #[pyo3(signature = (name, rank=8, alpha=16.0, targets=vec!["q_proj".to_string(), "v_proj".to_string()], seed=0))]
    fn create_adapter(
        &self,
        name: &str,
        rank: usize,
        alpha: f32,
        targets: Vec<String>,
        seed: u64,
    ) -> PyResult<()> {
        let config = LoraConfig {
            rank,
            alpha,
            targets,
            seed,
        };
        self.engine
            .create_adapter(name, config)
            .map(|_| ())
            .map_err(to_py)
    }

    /// The names of this engine's adapters, sorted.
    fn adapters(&self) -> Vec<String> {
        self.engine.adapter_names()
    }

    /// One training step of adapter `name` on `tokens` (integers `[batch, seq]`), for an
    /// engine holding the whole model: next-token loss, gradients, one AdamW step. Returns
    /// the loss before the step.
    #[pyo3(signature = (name, tokens, lr=1e-3, weight_decay=0.01))]
    fn train_adapter<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        tokens: Bound<'py, PyAny>,
        lr: f64,
        weight_decay: f64,
    ) -> PyResult<f32> {
        let np = py.import("numpy")?;
        let ShardInput::Tokens(ids) = tokens_input(&np, tokens)? else {
            return Err(to_py(neuroshard_core::Error::Internal(
                "token input expected".into(),
            )));
        };
        let cfg = AdamWConfig {
            lr,
            weight_decay,
            ..AdamWConfig::default()
        };
        let engine = self.engine.clone();
        let name = name.to_string();
        py.detach(move || engine.train_adapter_step(&name, &ids, &cfg))
            .map_err(to_py)
    }

    /// Adapter `name`'s version: `adapter`, `steps`, `state` (hex blake3 of its factors),
    /// `start`, `end`.
    fn adapter_version<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyDict>> {
        let v = self.engine.adapter_version(name).map_err(to_py)?;
        version_dict(py, &v)
    }

    /// Saves adapter `name` and its optimizer state into directory `dir`.
    fn save_adapter(&self, py: Python<'_>, name: &str, dir: std::path::PathBuf) -> PyResult<()> {
        let engine = self.engine.clone();
        let name = name.to_string();
        py.detach(move || engine.save_adapter(&name, &dir))
            .map(|_| ())
            .map_err(to_py)
    }

    /// Loads adapter `name` from a checkpoint in `dir` (made for this model and slice).
    fn load_adapter(&self, py: Python<'_>, name: &str, dir: std::path::PathBuf) -> PyResult<()> {
        let engine = self.engine.clone();
        let name = name.to_string();
        py.detach(move || engine.load_adapter(&name, &dir))
            .map(|_| ())
            .map_err(to_py)
    }

    fn __repr__(&self) -> String {
        let l = self.engine.layers();
        format!(
            "ShardEngine(layers={}..{}, mode={:?})",
            l.start,
            l.end,
            self.engine.mode()
        )
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ShardEngineHandle>()
}

/// A trained version as a dict: `adapter` (None: the slice's own weights), `steps`, `state`
/// (hex blake3 of the trainable tensors), `start`, `end`.
pub(crate) fn version_dict<'py>(
    py: Python<'py>,
    v: &neuroshard_core::TrainedVersion,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("adapter", &v.adapter)?;
    d.set_item("steps", v.steps)?;
    let state: String = v.state.iter().map(|b| format!("{b:02x}")).collect();
    d.set_item("state", state)?;
    d.set_item("start", v.layers.start)?;
    d.set_item("end", v.layers.end)?;
    Ok(d)
}
