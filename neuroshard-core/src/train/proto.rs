//! Messages of the training protocol (`neuroshard/train/1`), postcard-encoded with the same
//! length prefix as the inference protocol's.
//!
//! Control requests (begin, sync, prepare, commit, abort, outcome, end) go from the trainer to
//! each hop, and `GetOutcome` and `GetAdapter` from node to node, on a bi-directional stream:
//! one request, one reply. The data plane is one uni-directional stream per message, followed
//! by a wire frame where it carries a tensor:
//! `Tokens` (trainer to the first hop), `Hidden` (hop to the next hop, forward), `Grad` (hop to
//! the previous hop, backward), `TiedGrad` (between the first and the last hop: the halves of
//! a tied embedding's gradient).

use crate::engine::{AdamWConfig, TrainedVersion};
use crate::model::lora::LoraConfig;
use crate::net::{NodeId, RouteHop};
use crate::wire::Codec;
use serde::{Deserialize, Serialize};

/// ALPN of the training protocol.
pub const TRAIN_ALPN: &[u8] = b"neuroshard/train/1";
/// Most micro-batches one step may have.
pub const MAX_MICRO_BATCHES: u32 = 1024;
/// Most token positions one micro-batch may carry (`batch × seq`).
pub const MAX_MICRO_POSITIONS: usize = 1 << 16;
/// Largest tied-gradient frame accepted (a vocabulary × hidden f32 matrix: 113 MB for SmolLM2,
/// 1.2 GB for an 8B model's).
pub(crate) const MAX_TIED_FRAME: usize = 2 << 30;

/// What trains: the slices' own f32 weights, or a LoRA adapter over them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TrainTarget {
    /// Full training of the slices' weights (nodes loaded with `--mode f32`).
    Full,
    /// The adapter of this name, created with `config` on hops that lack it.
    Adapter {
        /// Its name.
        name: String,
        /// Its shape, when hops create it.
        config: LoraConfig,
    },
}

impl TrainTarget {
    /// The adapter's name (`None`: full training).
    pub fn adapter(&self) -> Option<&str> {
        match self {
            TrainTarget::Full => None,
            TrainTarget::Adapter { name, .. } => Some(name),
        }
    }
}

/// A training job as the trainer describes it to every hop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Chosen by the trainer; names the job in every message.
    pub job: u64,
    /// The base model id every hop must serve.
    pub model_id: String,
    /// The hops, first to last; their layers cover the model.
    pub route: Vec<RouteHop>,
    /// What trains.
    pub target: TrainTarget,
    /// Codec of the hidden-state and gradient frames.
    pub codec: Codec,
    /// The optimizer every hop steps with.
    pub adamw: AdamWConfig,
}

/// A commit decision: the version every hop of a step switches to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitCertificate {
    /// The job.
    pub job: u64,
    /// The step being committed (the hops' step count after it).
    pub step: u64,
    /// Every hop with the version its prepare reported.
    pub versions: Vec<(NodeId, TrainedVersion)>,
}

/// A [`CommitCertificate`] signed by the trainer: any hop can show it to another, and only
/// the trainer's key can make one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCommit {
    /// The trainer.
    pub trainer: NodeId,
    /// postcard-encoded certificate.
    pub body: Vec<u8>,
    /// ed25519 signature of `body` by `trainer`.
    pub signature: Vec<u8>,
}

/// How a hop knows a step ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Committed by this certificate.
    Committed(SignedCommit),
    /// Aborted by the trainer.
    Aborted,
    /// Prepared here, no decision known yet.
    InDoubt,
    /// This hop knows nothing of the step.
    Unknown,
}

/// A message of the training protocol.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TrainMessage {
    /// Trainer to every hop: claim the lease of this node's range and target for the job
    /// (creating the adapter where missing). Reply: `Begun`.
    Begin(JobSpec),
    /// The hop's current version of the target, and a step it prepared without a decision.
    Begun {
        /// Current version.
        version: TrainedVersion,
        /// A prepared step left in doubt by an earlier job (restart or crash).
        in_doubt: Option<TrainedVersion>,
    },
    /// Trainer to the first hop: micro-batch `micro` of `micros` in step `step`.
    Tokens {
        /// The job.
        job: u64,
        /// The step.
        step: u64,
        /// This micro-batch.
        micro: u32,
        /// Micro-batches in the step.
        micros: u32,
        /// Sequences in the micro-batch.
        batch: u32,
        /// Row-major token ids, `batch × seq`.
        ids: Vec<u32>,
    },
    /// Hop to the next hop: the micro-batch's hidden states follow as a frame; `ids` travel
    /// along because the last hop's loss needs them.
    Hidden {
        /// The job.
        job: u64,
        /// The step.
        step: u64,
        /// The micro-batch.
        micro: u32,
        /// Micro-batches in the step.
        micros: u32,
        /// Sequences in the micro-batch.
        batch: u32,
        /// Token ids (labels for the last hop).
        ids: Vec<u32>,
    },
    /// Hop to the previous hop: the gradient of the loss with respect to its output follows.
    Grad {
        /// The job.
        job: u64,
        /// The step.
        step: u64,
        /// The micro-batch.
        micro: u32,
    },
    /// First hop to last hop and back: this hop's half of the tied matrix's gradient follows.
    TiedGrad {
        /// The job.
        job: u64,
        /// The step.
        step: u64,
        /// The parameter's name.
        name: String,
    },
    /// Trainer to a hop: reply once the step's gradients are complete here.
    Sync {
        /// The job.
        job: u64,
        /// The step.
        step: u64,
    },
    /// The step's gradients are complete; the last hop adds the losses.
    Accumulated {
        /// Sum of the micro-batches' mean losses (last hop only; 0 elsewhere).
        loss_sum: f64,
        /// Micro-batches whose loss is in `loss_sum`.
        losses: u32,
    },
    /// Trainer to a hop: the accumulated gradients, for checks; reply `Gradients`, with one
    /// f32 frame per name after it.
    GetGradients {
        /// The job.
        job: u64,
    },
    /// Names of the gradient frames that follow.
    Gradients(Vec<String>),
    /// Phase one: compute the step's update and keep it, without using it.
    Prepare {
        /// The job.
        job: u64,
        /// The step.
        step: u64,
    },
    /// The version the prepared update makes.
    Prepared(TrainedVersion),
    /// Phase two: switch to the version the certificate names for this node.
    Commit(SignedCommit),
    /// The version now served.
    Committed(TrainedVersion),
    /// Drop the step: its gradients and any prepared update.
    Abort {
        /// The job.
        job: u64,
        /// The step.
        step: u64,
    },
    /// Any node to a hop: what became of this job's step?
    GetOutcome {
        /// The job.
        job: u64,
        /// The step (the step count its commit makes).
        step: u64,
    },
    /// The answer.
    Outcome(Outcome),
    /// Trainer to a hop: the job is over; release the lease.
    End {
        /// The job.
        job: u64,
    },
    /// Done.
    Ok,
    /// Refused or failed, at `hop`.
    Error {
        /// The node that reports it.
        hop: NodeId,
        /// Why.
        message: String,
    },
    /// Any node to a hop: the current state of adapter `name`, to sync a replica of the same
    /// layers. Reply: `AdapterState`, with one f32 frame per name after it.
    GetAdapter {
        /// The adapter.
        name: String,
    },
    /// An adapter's state: the certificate of the commit that made it, its shape, and the
    /// names of the tensor frames that follow (hash order).
    AdapterState {
        /// A certificate naming this state for some hop of the same layers.
        certificate: SignedCommit,
        /// The adapter's shape.
        config: LoraConfig,
        /// The frames' names.
        names: Vec<String>,
    },
}

impl TrainMessage {
    /// A short name, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            TrainMessage::Begin(_) => "begin",
            TrainMessage::Begun { .. } => "begun",
            TrainMessage::Tokens { .. } => "tokens",
            TrainMessage::Hidden { .. } => "hidden",
            TrainMessage::Grad { .. } => "grad",
            TrainMessage::TiedGrad { .. } => "tied-grad",
            TrainMessage::Sync { .. } => "sync",
            TrainMessage::Accumulated { .. } => "accumulated",
            TrainMessage::GetGradients { .. } => "get-gradients",
            TrainMessage::Gradients(_) => "gradients",
            TrainMessage::Prepare { .. } => "prepare",
            TrainMessage::Prepared(_) => "prepared",
            TrainMessage::Commit(_) => "commit",
            TrainMessage::Committed(_) => "committed",
            TrainMessage::Abort { .. } => "abort",
            TrainMessage::GetOutcome { .. } => "get-outcome",
            TrainMessage::Outcome(_) => "outcome",
            TrainMessage::End { .. } => "end",
            TrainMessage::Ok => "ok",
            TrainMessage::Error { .. } => "error",
            TrainMessage::GetAdapter { .. } => "get-adapter",
            TrainMessage::AdapterState { .. } => "adapter-state",
        }
    }
}
