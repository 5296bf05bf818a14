//! IO-less protocol state machines: what a session does, decided without sockets.
//!
//! The network code (`client.rs`, `node/relay.rs`) only moves bytes and asks these machines
//! what to do with them, as iroh does with its `proto/` modules: every rule about who may send
//! what, which positions come next and how a failed step recovers lives here, where the
//! simulator (`protocol/sim.rs`, tests only) runs it against thousands of fault schedules and
//! the fuzzer (`protocol/fuzz.rs`) against random call sequences.
//!
//! - [`client_session`]: which reports a client believes (tokens from the last hop only,
//!   errors from route members only) and the failover machine of a failed step (probe, blame
//!   check, re-plan, refill or replay, retry budget).
//! - [`hop_session`]: one hop's view of a session: who may feed it, which positions it holds,
//!   how a step's chunks follow one another and what each chunk's output becomes (sent on,
//!   sampled, or only cached).
//!
//! Both are shaped to grow: the Trust issue adds vote states between "chunk computed" and
//! "sent on" (a hop's output goes to k replicas, a receiver waits for k outputs), the Training
//! issue adds backward steps that run the recorded positions in reverse.

pub(crate) mod client_session;
#[cfg(test)]
mod fuzz;
pub(crate) mod hop_session;
#[cfg(test)]
mod sim;
