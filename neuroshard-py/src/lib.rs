//! `neuroshard._native`: the pyo3 glue over `neuroshard-core`. No logic lives here: every
//! class is a thin newtype over a core handle (`neuroshard_core::blocking` for anything that
//! does IO), blocking calls release the GIL, and each core error kind maps to its own
//! exception class (`errors.rs`). One file per part of the Python API.

mod client;
mod engine;
mod errors;
mod nodes;
mod tokenizer;
mod train;
mod trust;

use pyo3::prelude::*;

/// Applies the process's compute thread setting once (`neuroshard/__init__.py` calls it right
/// after it has set the thread environment, before anything else runs). Returns the count.
#[pyfunction]
#[pyo3(signature = (threads=None))]
fn _init_runtime(threads: Option<usize>) -> usize {
    neuroshard_core::runtime::init(&neuroshard_core::runtime::RuntimeConfig {
        threads,
        watch_busy_cores: false,
    })
    .threads
}

/// The native library's version.
#[pyfunction]
fn version() -> &'static str {
    neuroshard_core::VERSION
}

/// The native extension module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(_init_runtime, m)?)?;
    m.add_function(wrap_pyfunction!(version, m)?)?;
    errors::register(m)?;
    engine::register(m)?;
    nodes::register(m)?;
    client::register(m)?;
    tokenizer::register(m)?;
    trust::register(m)?;
    train::register(m)?;
    Ok(())
}
