//! Exceptions: `NeuroShardError` is the base; each `neuroshard_core::ErrorKind` has its own
//! subclass, mapped one to one (the polars pattern).

use neuroshard_core::{Error, ErrorKind};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(
    _native,
    NeuroShardError,
    PyException,
    "Base class of every error raised by neuroshard."
);
create_exception!(
    _native,
    ModelFileError,
    NeuroShardError,
    "neuroshard_core::Error::ModelFile."
);
create_exception!(
    _native,
    UnknownFormatError,
    NeuroShardError,
    "neuroshard_core::Error::UnknownFormat."
);
create_exception!(
    _native,
    CorruptModelError,
    NeuroShardError,
    "neuroshard_core::Error::CorruptModel."
);
create_exception!(
    _native,
    WrongWeightsError,
    NeuroShardError,
    "neuroshard_core::Error::WrongWeights."
);
create_exception!(
    _native,
    UnsupportedArchitectureError,
    NeuroShardError,
    "neuroshard_core::Error::UnsupportedArchitecture."
);
create_exception!(
    _native,
    UnsupportedDtypeError,
    NeuroShardError,
    "neuroshard_core::Error::UnsupportedDtype."
);
create_exception!(
    _native,
    InvalidConfigError,
    NeuroShardError,
    "neuroshard_core::Error::InvalidConfig."
);
create_exception!(
    _native,
    MissingTensorError,
    NeuroShardError,
    "neuroshard_core::Error::MissingTensor."
);
create_exception!(
    _native,
    TensorShapeError,
    NeuroShardError,
    "neuroshard_core::Error::TensorShape."
);
create_exception!(
    _native,
    SliceOutOfRangeError,
    NeuroShardError,
    "neuroshard_core::Error::SliceOutOfRange."
);
create_exception!(
    _native,
    BadInputError,
    NeuroShardError,
    "neuroshard_core::Error::BadInput."
);
create_exception!(
    _native,
    HiddenSizeError,
    NeuroShardError,
    "neuroshard_core::Error::HiddenSize."
);
create_exception!(
    _native,
    HiddenDtypeError,
    NeuroShardError,
    "neuroshard_core::Error::HiddenDtype."
);
create_exception!(
    _native,
    TokenOutOfRangeError,
    NeuroShardError,
    "neuroshard_core::Error::TokenOutOfRange."
);
create_exception!(
    _native,
    UnknownSessionError,
    NeuroShardError,
    "neuroshard_core::Error::UnknownSession."
);
create_exception!(
    _native,
    SessionsFullError,
    NeuroShardError,
    "neuroshard_core::Error::SessionsFull."
);
create_exception!(
    _native,
    SessionExistsError,
    NeuroShardError,
    "neuroshard_core::Error::SessionExists."
);
create_exception!(
    _native,
    SessionTooLongError,
    NeuroShardError,
    "neuroshard_core::Error::SessionTooLong."
);
create_exception!(
    _native,
    PositionGapError,
    NeuroShardError,
    "neuroshard_core::Error::PositionGap."
);
create_exception!(
    _native,
    TrainingError,
    NeuroShardError,
    "neuroshard_core::Error::Training."
);
create_exception!(
    _native,
    TokenizerError,
    NeuroShardError,
    "neuroshard_core::Error::Tokenizer."
);
create_exception!(
    _native,
    GenerationError,
    NeuroShardError,
    "neuroshard_core::Error::Generation."
);
create_exception!(
    _native,
    InternalError,
    NeuroShardError,
    "neuroshard_core::Error::Internal."
);
create_exception!(
    _native,
    TensorError,
    NeuroShardError,
    "neuroshard_core::Error::Candle."
);
create_exception!(
    _native,
    WireError,
    NeuroShardError,
    "neuroshard_core::Error::Wire."
);
create_exception!(
    _native,
    NetworkError,
    NeuroShardError,
    "neuroshard_core::Error::Net."
);
create_exception!(
    _native,
    IoError,
    NeuroShardError,
    "neuroshard_core::Error::Io."
);

/// Converts a core error into its exception (the message is the core error's text).
pub(crate) fn to_py(error: Error) -> PyErr {
    let message = error.to_string();
    match error.kind() {
        ErrorKind::ModelFile => ModelFileError::new_err(message),
        ErrorKind::UnknownFormat => UnknownFormatError::new_err(message),
        ErrorKind::CorruptModel => CorruptModelError::new_err(message),
        ErrorKind::WrongWeights => WrongWeightsError::new_err(message),
        ErrorKind::UnsupportedArchitecture => UnsupportedArchitectureError::new_err(message),
        ErrorKind::UnsupportedDtype => UnsupportedDtypeError::new_err(message),
        ErrorKind::InvalidConfig => InvalidConfigError::new_err(message),
        ErrorKind::MissingTensor => MissingTensorError::new_err(message),
        ErrorKind::TensorShape => TensorShapeError::new_err(message),
        ErrorKind::SliceOutOfRange => SliceOutOfRangeError::new_err(message),
        ErrorKind::BadInput => BadInputError::new_err(message),
        ErrorKind::HiddenSize => HiddenSizeError::new_err(message),
        ErrorKind::HiddenDtype => HiddenDtypeError::new_err(message),
        ErrorKind::TokenOutOfRange => TokenOutOfRangeError::new_err(message),
        ErrorKind::UnknownSession => UnknownSessionError::new_err(message),
        ErrorKind::SessionsFull => SessionsFullError::new_err(message),
        ErrorKind::SessionExists => SessionExistsError::new_err(message),
        ErrorKind::SessionTooLong => SessionTooLongError::new_err(message),
        ErrorKind::PositionGap => PositionGapError::new_err(message),
        ErrorKind::Training => TrainingError::new_err(message),
        ErrorKind::Tokenizer => TokenizerError::new_err(message),
        ErrorKind::Generation => GenerationError::new_err(message),
        ErrorKind::Internal => InternalError::new_err(message),
        ErrorKind::Candle => TensorError::new_err(message),
        ErrorKind::Wire => WireError::new_err(message),
        ErrorKind::Net => NetworkError::new_err(message),
        ErrorKind::Io => IoError::new_err(message),
        _ => NeuroShardError::new_err(message),
    }
}

/// The exception class of a kind, by name.
fn class_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::ModelFile => "ModelFileError",
        ErrorKind::UnknownFormat => "UnknownFormatError",
        ErrorKind::CorruptModel => "CorruptModelError",
        ErrorKind::WrongWeights => "WrongWeightsError",
        ErrorKind::UnsupportedArchitecture => "UnsupportedArchitectureError",
        ErrorKind::UnsupportedDtype => "UnsupportedDtypeError",
        ErrorKind::InvalidConfig => "InvalidConfigError",
        ErrorKind::MissingTensor => "MissingTensorError",
        ErrorKind::TensorShape => "TensorShapeError",
        ErrorKind::SliceOutOfRange => "SliceOutOfRangeError",
        ErrorKind::BadInput => "BadInputError",
        ErrorKind::HiddenSize => "HiddenSizeError",
        ErrorKind::HiddenDtype => "HiddenDtypeError",
        ErrorKind::TokenOutOfRange => "TokenOutOfRangeError",
        ErrorKind::UnknownSession => "UnknownSessionError",
        ErrorKind::SessionsFull => "SessionsFullError",
        ErrorKind::SessionExists => "SessionExistsError",
        ErrorKind::SessionTooLong => "SessionTooLongError",
        ErrorKind::PositionGap => "PositionGapError",
        ErrorKind::Training => "TrainingError",
        ErrorKind::Tokenizer => "TokenizerError",
        ErrorKind::Generation => "GenerationError",
        ErrorKind::Internal => "InternalError",
        ErrorKind::Candle => "TensorError",
        ErrorKind::Wire => "WireError",
        ErrorKind::Net => "NetworkError",
        ErrorKind::Io => "IoError",
        _ => "NeuroShardError",
    }
}

/// `{kind name: exception class name}` for every core error kind.
#[pyfunction]
fn _error_classes() -> Vec<(&'static str, &'static str)> {
    ErrorKind::ALL
        .iter()
        .map(|k| (k.name(), class_name(*k)))
        .collect()
}

/// Raises the exception that a core error of kind `kind` maps to (tests of the mapping).
#[pyfunction]
fn _raise_error(kind: &str) -> PyResult<()> {
    match ErrorKind::ALL.iter().find(|k| k.name() == kind) {
        Some(k) => Err(to_py(k.example())),
        None => Err(pyo3::exceptions::PyValueError::new_err(format!(
            "unknown error kind {kind}"
        ))),
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("NeuroShardError", py.get_type::<NeuroShardError>())?;
    m.add("ModelFileError", py.get_type::<ModelFileError>())?;
    m.add("UnknownFormatError", py.get_type::<UnknownFormatError>())?;
    m.add("CorruptModelError", py.get_type::<CorruptModelError>())?;
    m.add("WrongWeightsError", py.get_type::<WrongWeightsError>())?;
    m.add(
        "UnsupportedArchitectureError",
        py.get_type::<UnsupportedArchitectureError>(),
    )?;
    m.add(
        "UnsupportedDtypeError",
        py.get_type::<UnsupportedDtypeError>(),
    )?;
    m.add("InvalidConfigError", py.get_type::<InvalidConfigError>())?;
    m.add("MissingTensorError", py.get_type::<MissingTensorError>())?;
    m.add("TensorShapeError", py.get_type::<TensorShapeError>())?;
    m.add(
        "SliceOutOfRangeError",
        py.get_type::<SliceOutOfRangeError>(),
    )?;
    m.add("BadInputError", py.get_type::<BadInputError>())?;
    m.add("HiddenSizeError", py.get_type::<HiddenSizeError>())?;
    m.add("HiddenDtypeError", py.get_type::<HiddenDtypeError>())?;
    m.add(
        "TokenOutOfRangeError",
        py.get_type::<TokenOutOfRangeError>(),
    )?;
    m.add("UnknownSessionError", py.get_type::<UnknownSessionError>())?;
    m.add("SessionsFullError", py.get_type::<SessionsFullError>())?;
    m.add("SessionExistsError", py.get_type::<SessionExistsError>())?;
    m.add("SessionTooLongError", py.get_type::<SessionTooLongError>())?;
    m.add("PositionGapError", py.get_type::<PositionGapError>())?;
    m.add("TrainingError", py.get_type::<TrainingError>())?;
    m.add("TokenizerError", py.get_type::<TokenizerError>())?;
    m.add("GenerationError", py.get_type::<GenerationError>())?;
    m.add("InternalError", py.get_type::<InternalError>())?;
    m.add("TensorError", py.get_type::<TensorError>())?;
    m.add("WireError", py.get_type::<WireError>())?;
    m.add("NetworkError", py.get_type::<NetworkError>())?;
    m.add("IoError", py.get_type::<IoError>())?;
    m.add_function(wrap_pyfunction!(_error_classes, m)?)?;
    m.add_function(wrap_pyfunction!(_raise_error, m)?)?;
    Ok(())
}
