//! Protocol internals for this crate's own integration tests and benches (feature
//! `internals`): forged messages, raw kernels, the step adapter. Not API: no stability promise.

pub use crate::client::{BlockingSession, Replanner};
pub use crate::kernels::{BlockFormat, KernelPath, QuantMatrix, BLOCK};
pub use crate::net::proto::{
    read_message, write_message, Message, SessionOpen, SignedOpen, INFER_ALPN,
};
pub use crate::node::misbehaviour::Misbehaviour;
pub use crate::train::sync::{adapters_to_sync, SyncPlan};
