//! The integration tests as one binary: one link and one copy of the monomorphised
//! dependency code instead of one per file (the cold CI build was dominated by them). Each
//! module is one former test file; `common` holds the shared fixtures and helpers.

mod common;

mod batched_decode;
mod errors_and_sessions;
#[cfg(feature = "internals")]
mod floods;
#[cfg(feature = "internals")]
mod hostile_peers;
mod long_context;
mod lora;
mod model_identity;
mod net_iroh;
mod net_peers;
#[cfg(feature = "server")]
mod server_api;
mod smollm2_reference;
mod swarm_failover;
#[cfg(feature = "internals")]
mod swarm_gossip;
mod swarm_handover;
#[cfg(feature = "internals")]
mod swarm_inprocess;
mod swarm_processes;
#[cfg(feature = "internals")]
mod swarm_robustness;
mod swarm_training;
mod tiny_fixtures;
mod tokenizer_and_memory;
#[cfg(feature = "internals")]
mod trust_votes;
mod wire_frames;
mod wire_smollm2;
