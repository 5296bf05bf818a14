//! The Trust machinery in Python: output comparison and the vote rule, the reputation table,
//! and signed receipts (`neuroshard_core::consensus`). Thin glue: every rule lives in the core.

use crate::errors::NeuroShardError;
use neuroshard_core::consensus::{
    self, Ballot, Comparison, FraudProof, Receipt, ReceiptChain, ReputationPolicy, SignedReceipt,
    VoteOutcome, VoteOutput, Work,
};
use neuroshard_core::net::{now_ms, NodeId};
use numpy::PyReadonlyArray1;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::collections::BTreeMap;
use std::sync::Mutex;

fn bad(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string())
}

fn node_id(s: &str) -> PyResult<NodeId> {
    s.parse::<NodeId>()
        .map_err(|e| bad(format!("`{s}` is not a node id: {e}")))
}

fn comparison(name: &str) -> PyResult<Comparison> {
    name.parse::<Comparison>().map_err(bad)
}

fn hash32(b: &[u8], what: &str) -> PyResult<[u8; 32]> {
    b.try_into()
        .map_err(|_| bad(format!("{what} must be 32 bytes, got {}", b.len())))
}

fn output(values: PyReadonlyArray1<'_, f32>, width: usize) -> PyResult<VoteOutput> {
    let values = values.as_slice().map_err(bad)?.to_vec();
    Ok(VoteOutput::from_f32(values, width))
}

/// The distance between two outputs of `width` values per position: `(rel_l2, max_abs)`,
/// the worst position's of each (infinite for non-finite values or different shapes).
#[pyfunction]
fn distance(
    a: PyReadonlyArray1<'_, f32>,
    b: PyReadonlyArray1<'_, f32>,
    width: usize,
) -> PyResult<(f32, f32)> {
    let d = consensus::distance(&output(a, width)?, &output(b, width)?);
    Ok((d.rel_l2, d.max_abs))
}

/// Whether two outputs agree under `comparison` (`"tolerant"`, the calibrated default, or
/// `"exact"`: the same bytes).
#[pyfunction]
#[pyo3(signature = (a, b, width, comparison="tolerant"))]
fn agree(
    a: PyReadonlyArray1<'_, f32>,
    b: PyReadonlyArray1<'_, f32>,
    width: usize,
    comparison: &str,
) -> PyResult<bool> {
    let rule = self::comparison(comparison)?;
    Ok(rule.agrees(&output(a, width)?, &output(b, width)?))
}

/// The vote rule over the outputs of the `expected` replicas (`{node id: values}`): a dict
/// with `winner`, `agreeing`, `deviating` and `missing` when a strict majority of `expected`
/// agrees, `None` otherwise. With `referee` (`(node id, values)`: a trusted node outside the
/// vote that replayed the same input), its output is the reference and there is always an
/// outcome: the replicas that agree with it agree, every other answer deviates.
#[pyfunction]
#[pyo3(signature = (expected, outputs, width, comparison="tolerant", referee=None))]
fn tally<'py>(
    py: Python<'py>,
    expected: Vec<String>,
    outputs: BTreeMap<String, PyReadonlyArray1<'py, f32>>,
    width: usize,
    comparison: &str,
    referee: Option<(String, PyReadonlyArray1<'py, f32>)>,
) -> PyResult<Option<Bound<'py, PyDict>>> {
    let rule = self::comparison(comparison)?;
    let expected: Vec<NodeId> = expected
        .iter()
        .map(|s| node_id(s))
        .collect::<PyResult<_>>()?;
    let mut ballots = Vec::with_capacity(outputs.len());
    for (node, values) in outputs {
        ballots.push(Ballot {
            node: node_id(&node)?,
            output: output(values, width)?,
        });
    }
    let referee = match referee {
        Some((node, values)) => Some(Ballot {
            node: node_id(&node)?,
            output: output(values, width)?,
        }),
        None => None,
    };
    let outcome = match &referee {
        Some(r) => consensus::refereed_tally(&expected, &ballots, r, &rule),
        None => consensus::tally(&expected, &ballots, &rule),
    };
    match outcome {
        VoteOutcome::Accepted(a) => {
            let d = PyDict::new(py);
            let ids = |v: &[NodeId]| v.iter().map(|n| n.to_string()).collect::<Vec<_>>();
            d.set_item("winner", a.winner.to_string())?;
            d.set_item("agreeing", ids(&a.agreeing))?;
            d.set_item("deviating", ids(&a.deviating))?;
            d.set_item("missing", ids(&a.missing))?;
            Ok(Some(d))
        }
        VoteOutcome::NoMajority { .. } => Ok(None),
    }
}

/// A reputation table (the seed's `local_trust_scores`): probation, trust after agreed
/// votes, bans on evidence and timeouts, pinned trust; saved and loaded as JSON.
#[pyclass(name = "Reputation", module = "neuroshard._native", frozen)]
pub(crate) struct ReputationPy {
    table: Mutex<consensus::Reputation>,
}

impl ReputationPy {
    fn with<T>(&self, f: impl FnOnce(&mut consensus::Reputation) -> T) -> PyResult<T> {
        let mut t = self
            .table
            .lock()
            .map_err(|_| NeuroShardError::new_err("reputation table poisoned"))?;
        Ok(f(&mut t))
    }
}

#[pymethods]
impl ReputationPy {
    /// An empty table under the default policy.
    #[new]
    fn new() -> Self {
        ReputationPy {
            table: Mutex::new(consensus::Reputation::new(ReputationPolicy::default())),
        }
    }

    /// The table saved at `path` (a missing file is an empty table; a corrupt one raises).
    #[staticmethod]
    fn load(path: std::path::PathBuf) -> PyResult<Self> {
        let table = consensus::Reputation::load(&path, ReputationPolicy::default())
            .map_err(|e| bad(format!("{}: {e}", path.display())))?;
        Ok(ReputationPy {
            table: Mutex::new(table),
        })
    }

    /// Writes the table to `path` (JSON, replaced atomically).
    fn save(&self, path: std::path::PathBuf) -> PyResult<()> {
        self.with(|t| t.save(&path, now_ms()))?
            .map_err(|e| bad(format!("{}: {e}", path.display())))
    }

    /// Trusts `node` from now on (`--trust ID`).
    fn pin(&self, node: &str) -> PyResult<()> {
        let n = node_id(node)?;
        self.with(|t| t.pin(n, now_ms()))
    }

    /// `node` agreed with an accepted vote.
    fn agreed(&self, node: &str) -> PyResult<()> {
        let n = node_id(node)?;
        self.with(|t| t.agreed(n, now_ms()))
    }

    /// Checked evidence shows that `node` deviated; `reason` says how.
    fn deviated(&self, node: &str, reason: &str) -> PyResult<()> {
        let n = node_id(node)?;
        self.with(|t| t.deviated(n, reason, now_ms()))
    }

    /// `node` did not answer in time (a temporary ban with backoff).
    fn timed_out(&self, node: &str) -> PyResult<()> {
        let n = node_id(node)?;
        self.with(|t| t.timed_out(n, now_ms()))
    }

    /// `"probation"`, `"trusted"` or `"banned"`.
    fn state(&self, node: &str) -> PyResult<String> {
        let n = node_id(node)?;
        self.with(|t| format!("{:?}", t.state(&n, now_ms())).to_lowercase())
    }

    /// Whether routes may use `node` now.
    fn may_route(&self, node: &str) -> PyResult<bool> {
        let n = node_id(node)?;
        self.with(|t| t.may_route(&n, now_ms()))
    }

    /// Every known node: dicts with `node`, `state`, `score`, `agreed`, `deviations`,
    /// `timeouts`, `pinned`, `banned_until_ms`, `reason`, `changed_ms`.
    fn table<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let rows = self.with(|t| t.table(now_ms()))?;
        rows.into_iter().map(|r| standing_dict(py, &r)).collect()
    }
}

/// One row of a reputation table as a dict.
pub(crate) fn standing_dict<'py>(
    py: Python<'py>,
    r: &consensus::reputation::StandingRow,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("node", &r.node)?;
    d.set_item("state", format!("{:?}", r.state).to_lowercase())?;
    d.set_item("score", r.standing.score)?;
    d.set_item("agreed", r.standing.agreed)?;
    d.set_item("deviations", r.standing.deviations)?;
    d.set_item("timeouts", r.standing.timeouts)?;
    d.set_item("pinned", r.standing.pinned)?;
    d.set_item("banned_until_ms", r.standing.banned_until_ms)?;
    d.set_item("reason", &r.standing.reason)?;
    d.set_item("changed_ms", r.standing.changed_ms)?;
    Ok(d)
}

/// One node's chain of signed receipts.
#[pyclass(name = "ReceiptChain", module = "neuroshard._native", frozen)]
pub(crate) struct ReceiptChainPy {
    chain: Mutex<ReceiptChain>,
    node: String,
}

#[pymethods]
impl ReceiptChainPy {
    /// A chain signed with the 32-byte secret `key` (a node's key file holds one).
    #[new]
    fn new(key: &[u8]) -> PyResult<Self> {
        let chain = ReceiptChain::from_secret(&hash32(key, "a secret key")?);
        let node = chain.node().to_string();
        Ok(ReceiptChainPy {
            chain: Mutex::new(chain),
            node,
        })
    }

    /// The signer's node id.
    #[getter]
    fn node(&self) -> String {
        self.node.clone()
    }

    /// Signs a receipt for one step (hashes are 32 bytes) and returns its encoding.
    fn issue(
        &self,
        session: u64,
        position: u64,
        count: u32,
        input: &[u8],
        output: &[u8],
        weight: &[u8],
    ) -> PyResult<Vec<u8>> {
        let work = Work {
            session,
            position,
            count,
            input: hash32(input, "the input hash")?,
            output: hash32(output, "the output hash")?,
            weight: hash32(weight, "the weight hash")?,
        };
        let signed = self
            .chain
            .lock()
            .map_err(|_| NeuroShardError::new_err("receipt chain poisoned"))?
            .issue(&work, now_ms());
        Ok(signed.to_bytes())
    }
}

fn decode(receipt: &[u8]) -> PyResult<SignedReceipt> {
    SignedReceipt::from_bytes(receipt).map_err(bad)
}

fn receipt_dict<'py>(py: Python<'py>, r: &Receipt) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("node", r.node.to_string())?;
    d.set_item("session", r.work.session)?;
    d.set_item("position", r.work.position)?;
    d.set_item("count", r.work.count)?;
    d.set_item("input", r.work.input.to_vec())?;
    d.set_item("output", r.work.output.to_vec())?;
    d.set_item("weight", r.work.weight.to_vec())?;
    d.set_item("time_ms", r.time_ms)?;
    d.set_item("prev", r.prev.to_vec())?;
    Ok(d)
}

/// Verifies a signed receipt and returns its fields (raises `ValueError` on a bad one).
#[pyfunction]
fn verify_receipt<'py>(py: Python<'py>, receipt: &[u8]) -> PyResult<Bound<'py, PyDict>> {
    let r = decode(receipt)?.verify().map_err(bad)?;
    receipt_dict(py, &r)
}

/// Verifies one node's receipts as a chain (each names the previous one's hash).
#[pyfunction]
fn verify_chain<'py>(py: Python<'py>, receipts: Vec<Vec<u8>>) -> PyResult<Vec<Bound<'py, PyDict>>> {
    let signed: Vec<SignedReceipt> = receipts
        .iter()
        .map(|r| decode(r))
        .collect::<PyResult<_>>()?;
    consensus::receipt::verify_chain(&signed)
        .map_err(bad)?
        .iter()
        .map(|r| receipt_dict(py, r))
        .collect()
}

/// The node two receipts prove fraudulent (one signer, one input, two outputs), or `None`
/// when they prove nothing.
#[pyfunction]
fn fraud_proof(a: &[u8], b: &[u8]) -> PyResult<Option<String>> {
    let Ok(proof) = FraudProof::new(decode(a)?, decode(b)?) else {
        return Ok(None);
    };
    Ok(proof.verify().ok().map(|n| n.to_string()))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(distance, m)?)?;
    m.add_function(wrap_pyfunction!(agree, m)?)?;
    m.add_function(wrap_pyfunction!(tally, m)?)?;
    m.add_function(wrap_pyfunction!(verify_receipt, m)?)?;
    m.add_function(wrap_pyfunction!(verify_chain, m)?)?;
    m.add_function(wrap_pyfunction!(fraud_proof, m)?)?;
    m.add_class::<ReputationPy>()?;
    m.add_class::<ReceiptChainPy>()
}
