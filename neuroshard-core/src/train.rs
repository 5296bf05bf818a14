//! Training over the swarm: the model that keeps learning.
//!
//! A [`Trainer`] sends micro-batches of token sequences through a route of nodes. Every hop
//! runs a tracked forward and relays its hidden states; the last hop computes the next-token
//! loss and starts backward; the gradient of each hop's input travels back hop by hop, in wire
//! frames of a selectable codec, and every hop accumulates its own slice's gradients (or its
//! LoRA adapter's). Steps commit in two phases under a certificate the trainer signs, so the
//! hops never end half-stepped. See `docs/training.md`.
//!
//! - `proto.rs`: the messages of `neuroshard/train/1`;
//! - `certificate.rs`: signing and checking commit certificates;
//! - `hop.rs`: the node's side (leases, the relay, the two phases, checkpoints);
//! - `trainer.rs`: the trainer's side;
//! - `sync.rs`: replicas fetching an adapter's newer certified state from a peer;
//! - `examples.rs`: text and conversations cut into training sequences.

mod certificate;
mod durable;
mod examples;
pub(crate) mod hop;
mod proto;
pub(crate) mod sync;
mod trainer;

pub use examples::{examples_from_conversation, examples_from_text, LearnOptions};
pub use hop::{TrainPolicy, DEFAULT_TRAIN_MEMORY};
pub use proto::{
    CommitCertificate, JobSpec, Outcome, SignedCommit, TrainMessage, TrainTarget,
    MAX_MICRO_BATCHES, MAX_MICRO_POSITIONS, TRAIN_ALPN,
};
pub use trainer::{StepReport, TrainOptions, Trainer};
