//! `Trainer`, `StepReport` and `key_id`: training a swarm from Python, over
//! `neuroshard_core::blocking::Trainer`. Every call releases the GIL; `on_step` callbacks take
//! it back for their call only.

use crate::engine::version_dict;
use crate::errors::to_py;
use crate::nodes::poisoned;
use neuroshard_core::net::endpoint::load_or_create_key;
use neuroshard_core::{
    blocking, AdamWConfig, ChatMessage, Codec, LearnOptions, LoraConfig, StepReport, TrainOptions,
    TrainTarget,
};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

/// What one optimizer step did.
#[pyclass(name = "StepReport", module = "neuroshard._native", frozen, get_all)]
#[derive(Clone)]
pub(crate) struct StepReportPy {
    /// Mean loss of the step's micro-batches, before the update.
    loss: f32,
    /// Token positions trained on.
    tokens: usize,
    /// Optimizer steps every hop has applied after this one.
    steps: u64,
}

impl From<&StepReport> for StepReportPy {
    fn from(r: &StepReport) -> Self {
        StepReportPy {
            loss: r.loss,
            tokens: r.tokens,
            steps: r.versions.first().map_or(0, |v| v.steps),
        }
    }
}

#[pymethods]
impl StepReportPy {
    fn __repr__(&self) -> String {
        format!(
            "StepReport(loss={:.4}, tokens={}, steps={})",
            self.loss, self.tokens, self.steps
        )
    }
}

/// The node id of the key in `key_file` (created if missing): what nodes allow with
/// `Node(..., trainers=[id])` or `neuroshard node --trainer ID`.
#[pyfunction]
fn key_id(key_file: PathBuf) -> PyResult<String> {
    let key = load_or_create_key(&key_file).map_err(|e| to_py(e.into()))?;
    Ok(key.public().to_string())
}

/// A training job over a swarm: LoRA adapter `adapter` by default, or the slices' own weights
/// with `full=True` (nodes in `mode="f32"`).
#[pyclass(name = "Trainer", module = "neuroshard._native", subclass, frozen)]
pub(crate) struct TrainerHandle {
    trainer: Mutex<blocking::Trainer>,
}

fn learn_options(steps: usize, micro_batches: usize, seq_len: usize, lines: bool) -> LearnOptions {
    LearnOptions {
        steps,
        micro_batches,
        seq_len,
        lines,
    }
}

/// What a learning call runs on the trainer, given the per-step callback.
type LearnCall<'a> = dyn FnOnce(
        &mut blocking::Trainer,
        &mut dyn FnMut(usize, &StepReport) -> ControlFlow<()>,
    ) -> neuroshard_core::Result<Vec<StepReport>>
    + Send
    + 'a;

/// Runs `learn` on `trainer` without the GIL. After every step it takes the GIL to call
/// `on_step(index, report)` and to let Ctrl-C in: the first exception (a KeyboardInterrupt
/// included) stops training at the next step boundary and is raised.
fn learn_with_callback(
    py: Python<'_>,
    trainer: &Mutex<blocking::Trainer>,
    on_step: Option<Py<PyAny>>,
    learn: Box<LearnCall<'_>>,
) -> PyResult<Vec<StepReportPy>> {
    let mut raised: Option<PyErr> = None;
    let result = py.detach(|| {
        let mut t = trainer.lock().map_err(|_| internal_poisoned())?;
        let mut callback = |i: usize, report: &StepReport| {
            Python::attach(|py| {
                let called = match &on_step {
                    Some(f) => f.call1(py, (i, StepReportPy::from(report))).map(drop),
                    None => Ok(()),
                };
                if let Err(e) = called.and_then(|()| py.check_signals()) {
                    raised = Some(e);
                }
            });
            if raised.is_some() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        learn(&mut t, &mut callback)
    });
    if let Some(e) = raised {
        return Err(e);
    }
    Ok(result
        .map_err(to_py)?
        .iter()
        .map(StepReportPy::from)
        .collect())
}

#[pymethods]
impl TrainerHandle {
    #[new]
    #[pyo3(signature = (peers, key_file, adapter="notes", lora_rank=8, lora_targets=None, full=false, lr=1e-3, codec="f32", step_timeout_ms=120_000))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        peers: Vec<String>,
        key_file: PathBuf,
        adapter: &str,
        lora_rank: usize,
        lora_targets: Option<Vec<String>>,
        full: bool,
        lr: f64,
        codec: &str,
        step_timeout_ms: u64,
    ) -> PyResult<Self> {
        let codec: Codec = codec
            .parse()
            .map_err(|e| pyo3::exceptions::PyValueError::new_err(format!("codec: {e}")))?;
        let target = if full {
            TrainTarget::Full
        } else {
            let mut config = LoraConfig {
                rank: lora_rank,
                ..LoraConfig::default()
            };
            if let Some(targets) = lora_targets {
                config.targets = targets;
            }
            TrainTarget::Adapter {
                name: adapter.to_string(),
                config,
            }
        };
        let options = TrainOptions {
            target,
            codec,
            adamw: AdamWConfig {
                lr,
                ..AdamWConfig::default()
            },
            step_timeout: Duration::from_millis(step_timeout_ms),
        };
        let trainer = py
            .detach(|| {
                let key = load_or_create_key(&key_file)?;
                blocking::Trainer::connect(&peers, key, options)
            })
            .map_err(to_py)?;
        Ok(TrainerHandle {
            trainer: Mutex::new(trainer),
        })
    }

    /// The trainer's node id.
    #[getter]
    fn id(&self) -> PyResult<String> {
        let t = self.trainer.lock().map_err(|_| poisoned())?;
        Ok(t.id().to_string())
    }

    /// Every hop's current version (a dict each), first hop first.
    #[getter]
    fn versions<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let t = self.trainer.lock().map_err(|_| poisoned())?;
        t.versions().iter().map(|v| version_dict(py, v)).collect()
    }

    /// Learns `text` for `steps` steps of `micro_batches` examples of `seq_len` tokens (with
    /// `lines`, one example per line); `on_step(index, report)` sees every step.
    #[pyo3(signature = (text, steps=20, micro_batches=4, seq_len=128, lines=false, on_step=None))]
    #[allow(clippy::too_many_arguments)]
    fn learn(
        &self,
        py: Python<'_>,
        text: &str,
        steps: usize,
        micro_batches: usize,
        seq_len: usize,
        lines: bool,
        on_step: Option<Py<PyAny>>,
    ) -> PyResult<Vec<StepReportPy>> {
        let how = learn_options(steps, micro_batches, seq_len, lines);
        learn_with_callback(
            py,
            &self.trainer,
            on_step,
            Box::new(move |t, cb| t.learn_text(text, &how, cb)),
        )
    }

    /// Learns a conversation in one call: `messages` is a list of `{"role", "content"}`
    /// dicts (or `(role, content)` pairs), rendered with the model's chat template.
    #[pyo3(signature = (messages, steps=20, micro_batches=4, seq_len=128, on_step=None))]
    fn learn_conversation(
        &self,
        py: Python<'_>,
        messages: Vec<Bound<'_, PyAny>>,
        steps: usize,
        micro_batches: usize,
        seq_len: usize,
        on_step: Option<Py<PyAny>>,
    ) -> PyResult<Vec<StepReportPy>> {
        let messages = messages
            .iter()
            .map(chat_message)
            .collect::<PyResult<Vec<_>>>()?;
        let how = learn_options(steps, micro_batches, seq_len, false);
        learn_with_callback(
            py,
            &self.trainer,
            on_step,
            Box::new(move |t, cb| t.learn_conversation(&messages, &how, cb)),
        )
    }

    /// The mean next-token loss of `text` (cut like :meth:`learn`), with no update; a
    /// held-back perplexity is ``math.exp`` of it.
    #[pyo3(signature = (text, seq_len=128, lines=false, micro_batches=4))]
    fn evaluate(
        &self,
        py: Python<'_>,
        text: &str,
        seq_len: usize,
        lines: bool,
        micro_batches: usize,
    ) -> PyResult<f32> {
        let how = learn_options(0, micro_batches, seq_len, lines);
        py.detach(|| {
            let mut t = self.trainer.lock().map_err(|_| internal_poisoned())?;
            t.evaluate_text(text, &how)
        })
        .map_err(to_py)
    }

    /// Ends the job (the nodes release its lease). Closing twice is fine.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| {
            let mut t = self.trainer.lock().map_err(|_| internal_poisoned())?;
            t.close()
        })
        .map_err(to_py)
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

fn internal_poisoned() -> neuroshard_core::Error {
    neuroshard_core::Error::Internal("a lock was poisoned by an earlier panic".into())
}

/// A `{"role", "content"}` dict or a `(role, content)` pair.
fn chat_message(item: &Bound<'_, PyAny>) -> PyResult<ChatMessage> {
    if let Ok(d) = item.cast::<PyDict>() {
        let get = |key: &str| -> PyResult<String> {
            d.get_item(key)?
                .ok_or_else(|| {
                    pyo3::exceptions::PyValueError::new_err(format!("a message lacks `{key}`"))
                })?
                .extract()
        };
        return Ok(ChatMessage::new(get("role")?, get("content")?));
    }
    let (role, content): (String, String) = item.extract().map_err(|_| {
        pyo3::exceptions::PyTypeError::new_err(
            "a message is a {\"role\", \"content\"} dict or a (role, content) pair",
        )
    })?;
    Ok(ChatMessage::new(role, content))
}

/// Registers the training classes.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<TrainerHandle>()?;
    m.add_class::<StepReportPy>()?;
    m.add_function(wrap_pyfunction!(key_id, m)?)?;
    Ok(())
}
