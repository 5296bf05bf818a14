//! Error types: one `thiserror` enum for everything the engine can report.
//!
//! Every failure a caller can cause (bad file, bad slice, bad input, unknown session) has its own
//! variant with a message that names the offending value, so a node can send it back to a peer
//! and a user can act on it without reading the source.

use std::path::PathBuf;

/// Result alias used across `neuroshard-core`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the engine, the tokenizer and generation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The model file or directory does not exist or cannot be read.
    #[error("cannot read model file {path}: {source}")]
    ModelFile {
        /// The path that was opened.
        path: PathBuf,
        /// The underlying IO error.
        #[source]
        source: std::io::Error,
    },

    /// The path exists but is neither a GGUF file nor a Hugging Face safetensors model.
    #[error("unknown model format at {path}: {reason}")]
    UnknownFormat {
        /// The path that was inspected.
        path: PathBuf,
        /// What was found instead.
        reason: String,
    },

    /// The file claims a known format but its contents are inconsistent (truncated, bad header).
    #[error("corrupt model file {path}: {reason}")]
    CorruptModel {
        /// The path that was read.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// The file's weights are not the ones its manifest or a pinned model id names (a
    /// changed or tampered file, or a manifest of another model).
    #[error("wrong weights in {path}: {reason}")]
    WrongWeights {
        /// The model file.
        path: PathBuf,
        /// Which tensor or id differs, and how.
        reason: String,
    },

    /// The model's architecture is not one the engine implements.
    #[error("unsupported architecture `{0}` (supported: llama, gpt2)")]
    UnsupportedArchitecture(String),

    /// A tensor is stored in a data type the engine cannot dequantise.
    #[error("tensor `{tensor}` uses unsupported data type {dtype}")]
    UnsupportedDtype {
        /// The tensor's name in the file.
        tensor: String,
        /// The data type as the file names it.
        dtype: String,
    },

    /// A configuration value is missing or out of range.
    #[error("invalid model config: {0}")]
    InvalidConfig(String),

    /// A tensor the slice needs is not in the file.
    #[error("tensor `{0}` not found in the model file")]
    MissingTensor(String),

    /// A tensor in the file has a shape other than the config implies.
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        /// The tensor's canonical name.
        name: String,
        /// Shape implied by the config.
        expected: Vec<usize>,
        /// Shape found in the file.
        actual: Vec<usize>,
    },

    /// The requested layer range is empty or exceeds the model.
    #[error("layer slice {start}..{end} is invalid for a model with {layers} layers")]
    SliceOutOfRange {
        /// First layer requested.
        start: usize,
        /// One past the last layer requested.
        end: usize,
        /// Number of layers in the model.
        layers: usize,
    },

    /// The input given to a shard does not match what that shard consumes.
    #[error("bad shard input: {0}")]
    BadInput(String),

    /// Hidden states of the wrong width were fed to a shard.
    #[error("hidden state has width {actual}, this model's hidden size is {expected}")]
    HiddenSize {
        /// The model's hidden size.
        expected: usize,
        /// The width received.
        actual: usize,
    },

    /// Hidden states of the wrong dtype were fed to a shard.
    #[error("hidden state has dtype {actual}, expected {expected}")]
    HiddenDtype {
        /// The dtype the shard computes in.
        expected: String,
        /// The dtype received.
        actual: String,
    },

    /// A token id is outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange {
        /// The offending token id.
        id: u32,
        /// The vocabulary size.
        vocab: usize,
    },

    /// The session id is not open on this shard (never opened, closed or expired).
    #[error("unknown session {0}")]
    UnknownSession(u64),

    /// The shard already holds its maximum number of sessions.
    #[error("session table full: {max} sessions open")]
    SessionsFull {
        /// The configured maximum.
        max: usize,
    },

    /// A session with this id is already open.
    #[error("session {0} already exists")]
    SessionExists(u64),

    /// Writing these positions would exceed the session's maximum length.
    #[error("session {session}: positions up to {requested} exceed the maximum length {max}")]
    SessionTooLong {
        /// The session id.
        session: u64,
        /// One past the last position requested.
        requested: usize,
        /// The maximum length.
        max: usize,
    },

    /// A forward pass started beyond the cached prefix, leaving a gap.
    #[error("session {session}: input starts at position {start} but only {cached} positions are cached")]
    PositionGap {
        /// The session id.
        session: u64,
        /// First position of the input.
        start: usize,
        /// Number of positions in the cache.
        cached: usize,
    },

    /// Training was asked for something the current state does not allow.
    #[error("training: {0}")]
    Training(String),

    /// Tokenizer construction, encoding, decoding or chat templating failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// Sampling or generation parameters are invalid.
    #[error("generation: {0}")]
    Generation(String),

    /// Internal state is unusable (a lock poisoned by an earlier panic): a bug, not bad input.
    #[error("internal error: {0}")]
    Internal(String),

    /// A tensor operation failed (a bug or an exhausted resource, not bad input).
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),

    /// A malformed or unacceptable wire frame.
    #[error("wire: {0}")]
    Wire(#[from] crate::wire::WireError),

    /// A network or protocol failure.
    #[error("network: {0}")]
    Net(#[from] crate::net::NetError),

    /// An IO error outside model loading.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// Maps a poisoned-lock error on `what` to [`Error::Internal`].
    pub(crate) fn poisoned<T>(what: &'static str) -> impl FnOnce(T) -> Error {
        move |_| Error::Internal(format!("{what} poisoned by an earlier panic"))
    }
}

/// Which [`Error`] variant an error is, without its data: what the bindings map to an exception
/// class (Python) or a status code (C), one to one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// [`Error::ModelFile`].
    ModelFile,
    /// [`Error::UnknownFormat`].
    UnknownFormat,
    /// [`Error::CorruptModel`].
    CorruptModel,
    /// [`Error::WrongWeights`].
    WrongWeights,
    /// [`Error::UnsupportedArchitecture`].
    UnsupportedArchitecture,
    /// [`Error::UnsupportedDtype`].
    UnsupportedDtype,
    /// [`Error::InvalidConfig`].
    InvalidConfig,
    /// [`Error::MissingTensor`].
    MissingTensor,
    /// [`Error::TensorShape`].
    TensorShape,
    /// [`Error::SliceOutOfRange`].
    SliceOutOfRange,
    /// [`Error::BadInput`].
    BadInput,
    /// [`Error::HiddenSize`].
    HiddenSize,
    /// [`Error::HiddenDtype`].
    HiddenDtype,
    /// [`Error::TokenOutOfRange`].
    TokenOutOfRange,
    /// [`Error::UnknownSession`].
    UnknownSession,
    /// [`Error::SessionsFull`].
    SessionsFull,
    /// [`Error::SessionExists`].
    SessionExists,
    /// [`Error::SessionTooLong`].
    SessionTooLong,
    /// [`Error::PositionGap`].
    PositionGap,
    /// [`Error::Training`].
    Training,
    /// [`Error::Tokenizer`].
    Tokenizer,
    /// [`Error::Generation`].
    Generation,
    /// [`Error::Internal`].
    Internal,
    /// [`Error::Candle`].
    Candle,
    /// [`Error::Wire`].
    Wire,
    /// [`Error::Net`].
    Net,
    /// [`Error::Io`].
    Io,
}

impl ErrorKind {
    /// Every kind, in declaration order.
    pub const ALL: &'static [ErrorKind] = &[
        ErrorKind::ModelFile,
        ErrorKind::UnknownFormat,
        ErrorKind::CorruptModel,
        ErrorKind::WrongWeights,
        ErrorKind::UnsupportedArchitecture,
        ErrorKind::UnsupportedDtype,
        ErrorKind::InvalidConfig,
        ErrorKind::MissingTensor,
        ErrorKind::TensorShape,
        ErrorKind::SliceOutOfRange,
        ErrorKind::BadInput,
        ErrorKind::HiddenSize,
        ErrorKind::HiddenDtype,
        ErrorKind::TokenOutOfRange,
        ErrorKind::UnknownSession,
        ErrorKind::SessionsFull,
        ErrorKind::SessionExists,
        ErrorKind::SessionTooLong,
        ErrorKind::PositionGap,
        ErrorKind::Training,
        ErrorKind::Tokenizer,
        ErrorKind::Generation,
        ErrorKind::Internal,
        ErrorKind::Candle,
        ErrorKind::Wire,
        ErrorKind::Net,
        ErrorKind::Io,
    ];

    /// The variant's name (`"SliceOutOfRange"`).
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::ModelFile => "ModelFile",
            ErrorKind::UnknownFormat => "UnknownFormat",
            ErrorKind::CorruptModel => "CorruptModel",
            ErrorKind::WrongWeights => "WrongWeights",
            ErrorKind::UnsupportedArchitecture => "UnsupportedArchitecture",
            ErrorKind::UnsupportedDtype => "UnsupportedDtype",
            ErrorKind::InvalidConfig => "InvalidConfig",
            ErrorKind::MissingTensor => "MissingTensor",
            ErrorKind::TensorShape => "TensorShape",
            ErrorKind::SliceOutOfRange => "SliceOutOfRange",
            ErrorKind::BadInput => "BadInput",
            ErrorKind::HiddenSize => "HiddenSize",
            ErrorKind::HiddenDtype => "HiddenDtype",
            ErrorKind::TokenOutOfRange => "TokenOutOfRange",
            ErrorKind::UnknownSession => "UnknownSession",
            ErrorKind::SessionsFull => "SessionsFull",
            ErrorKind::SessionExists => "SessionExists",
            ErrorKind::SessionTooLong => "SessionTooLong",
            ErrorKind::PositionGap => "PositionGap",
            ErrorKind::Training => "Training",
            ErrorKind::Tokenizer => "Tokenizer",
            ErrorKind::Generation => "Generation",
            ErrorKind::Internal => "Internal",
            ErrorKind::Candle => "Candle",
            ErrorKind::Wire => "Wire",
            ErrorKind::Net => "Net",
            ErrorKind::Io => "Io",
        }
    }

    /// An error of this kind with placeholder data, so bindings can test their mapping of
    /// every kind (most kinds are also reached for real by the tests).
    #[doc(hidden)]
    pub fn example(self) -> Error {
        match self {
            ErrorKind::ModelFile => Error::ModelFile {
                path: "missing.gguf".into(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            },
            ErrorKind::UnknownFormat => Error::UnknownFormat {
                path: "x.bin".into(),
                reason: "example".into(),
            },
            ErrorKind::CorruptModel => Error::CorruptModel {
                path: "x.gguf".into(),
                reason: "example".into(),
            },
            ErrorKind::WrongWeights => Error::WrongWeights {
                path: "x.gguf".into(),
                reason: "example".into(),
            },
            ErrorKind::UnsupportedArchitecture => Error::UnsupportedArchitecture("example".into()),
            ErrorKind::UnsupportedDtype => Error::UnsupportedDtype {
                tensor: "t".into(),
                dtype: "example".into(),
            },
            ErrorKind::InvalidConfig => Error::InvalidConfig("example".into()),
            ErrorKind::MissingTensor => Error::MissingTensor("example".into()),
            ErrorKind::TensorShape => Error::TensorShape {
                name: "t".into(),
                expected: vec![1],
                actual: vec![2],
            },
            ErrorKind::SliceOutOfRange => Error::SliceOutOfRange {
                start: 5,
                end: 1,
                layers: 4,
            },
            ErrorKind::BadInput => Error::BadInput("example".into()),
            ErrorKind::HiddenSize => Error::HiddenSize {
                expected: 64,
                actual: 65,
            },
            ErrorKind::HiddenDtype => Error::HiddenDtype {
                expected: "f32".into(),
                actual: "f16".into(),
            },
            ErrorKind::TokenOutOfRange => Error::TokenOutOfRange { id: 9, vocab: 8 },
            ErrorKind::UnknownSession => Error::UnknownSession(7),
            ErrorKind::SessionsFull => Error::SessionsFull { max: 1 },
            ErrorKind::SessionExists => Error::SessionExists(7),
            ErrorKind::SessionTooLong => Error::SessionTooLong {
                session: 7,
                requested: 9,
                max: 8,
            },
            ErrorKind::PositionGap => Error::PositionGap {
                session: 7,
                start: 3,
                cached: 1,
            },
            ErrorKind::Training => Error::Training("example".into()),
            ErrorKind::Tokenizer => Error::Tokenizer("example".into()),
            ErrorKind::Generation => Error::Generation("example".into()),
            ErrorKind::Internal => Error::Internal("example".into()),
            ErrorKind::Candle => Error::Candle(candle_core::Error::Msg("example".into())),
            ErrorKind::Wire => Error::Wire(crate::wire::WireError::UnknownCodec(255)),
            ErrorKind::Net => Error::Net(crate::net::NetError::Io("example".into())),
            ErrorKind::Io => Error::Io(std::io::Error::other("example")),
        }
    }
}

impl Error {
    /// Which variant this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::ModelFile { .. } => ErrorKind::ModelFile,
            Error::UnknownFormat { .. } => ErrorKind::UnknownFormat,
            Error::CorruptModel { .. } => ErrorKind::CorruptModel,
            Error::WrongWeights { .. } => ErrorKind::WrongWeights,
            Error::UnsupportedArchitecture(_) => ErrorKind::UnsupportedArchitecture,
            Error::UnsupportedDtype { .. } => ErrorKind::UnsupportedDtype,
            Error::InvalidConfig(_) => ErrorKind::InvalidConfig,
            Error::MissingTensor(_) => ErrorKind::MissingTensor,
            Error::TensorShape { .. } => ErrorKind::TensorShape,
            Error::SliceOutOfRange { .. } => ErrorKind::SliceOutOfRange,
            Error::BadInput(_) => ErrorKind::BadInput,
            Error::HiddenSize { .. } => ErrorKind::HiddenSize,
            Error::HiddenDtype { .. } => ErrorKind::HiddenDtype,
            Error::TokenOutOfRange { .. } => ErrorKind::TokenOutOfRange,
            Error::UnknownSession(_) => ErrorKind::UnknownSession,
            Error::SessionsFull { .. } => ErrorKind::SessionsFull,
            Error::SessionExists(_) => ErrorKind::SessionExists,
            Error::SessionTooLong { .. } => ErrorKind::SessionTooLong,
            Error::PositionGap { .. } => ErrorKind::PositionGap,
            Error::Training(_) => ErrorKind::Training,
            Error::Tokenizer(_) => ErrorKind::Tokenizer,
            Error::Generation(_) => ErrorKind::Generation,
            Error::Internal(_) => ErrorKind::Internal,
            Error::Candle(_) => ErrorKind::Candle,
            Error::Wire(_) => ErrorKind::Wire,
            Error::Net(_) => ErrorKind::Net,
            Error::Io(_) => ErrorKind::Io,
        }
    }
}
