//! Scripted lies for the hostile-peer tests (feature `internals` only, never in a release
//! build): a node told to misbehave still runs the real protocol, and lies at one point.

/// How a test node lies (see [`super::Node::misbehave`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Misbehaviour {
    /// Honest.
    #[default]
    Honest,
    /// A hop that is not the last sends the client this token for every step it relays,
    /// before passing the step on: an attempt to steer the text.
    ForgeToken(u32),
    /// A hop that is not the last drops every step and reports its (healthy) successor as
    /// unreachable: an attempt to get an honest node excluded.
    BlameSuccessor,
}
