//! Prefix reuse: recent conversations' swarm sessions, kept open with the tokens their caches
//! hold. OpenAI clients resend the whole conversation every turn; a request whose prompt
//! extends a kept session's tokens takes that session, so only its new tokens go through the
//! swarm. Bounded, least recently used first out (an evicted session is closed on every hop).

use crate::model::sampling::SamplingParams;
use crate::swarm_session::Conversation;
use std::collections::VecDeque;
use std::sync::Mutex;

/// The sampling a job asks for; `seed: None` accepts any seed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SamplingWish {
    pub(crate) temperature: f32,
    pub(crate) top_p: f32,
    pub(crate) seed: Option<u64>,
}

impl SamplingWish {
    /// Whether a session opened with `params` samples as wished. Greedy ignores top-p and
    /// the seed.
    pub(crate) fn accepts(&self, params: &SamplingParams) -> bool {
        if self.temperature == 0.0 {
            return params.temperature == 0.0;
        }
        params.temperature == self.temperature
            && params.top_p == self.top_p
            && self.seed.is_none_or(|s| s == params.seed)
    }

    /// Parameters for a new session (`random` when no seed was asked for).
    pub(crate) fn params(&self, random: u64) -> SamplingParams {
        if self.temperature == 0.0 {
            return SamplingParams::greedy();
        }
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed.unwrap_or(random),
            ..SamplingParams::greedy()
        }
    }
}

/// The kept conversations, most recently used first.
#[derive(Debug)]
pub(crate) struct Conversations {
    capacity: usize,
    kept: Mutex<VecDeque<Conversation>>,
}

impl Conversations {
    /// Keeps at most `capacity` sessions (0 turns reuse off).
    pub(crate) fn new(capacity: usize) -> Self {
        Conversations {
            capacity,
            kept: Mutex::new(VecDeque::new()),
        }
    }

    /// Sessions kept now.
    pub(crate) fn len(&self) -> usize {
        crate::net::lock(&self.kept).len()
    }

    /// Takes the kept session that can reuse the most of `prompt` (at least one token) and
    /// samples as `wish` says, if any.
    pub(crate) fn take(&self, prompt: &[u32], wish: &SamplingWish) -> Option<Conversation> {
        let mut kept = crate::net::lock(&self.kept);
        let (best, reuse) = kept
            .iter()
            .enumerate()
            .filter(|(_, c)| wish.accepts(c.sampling()))
            .map(|(i, c)| (i, c.reusable(prompt)))
            .max_by_key(|&(i, reuse)| (reuse, std::cmp::Reverse(i)))?;
        if reuse == 0 {
            return None;
        }
        kept.remove(best)
    }

    /// Keeps `conversation` as the most recent; returns the evicted ones (the caller closes
    /// them where blocking is allowed).
    pub(crate) fn put(&self, conversation: Conversation) -> Vec<Conversation> {
        if self.capacity == 0 {
            return vec![conversation];
        }
        let mut kept = crate::net::lock(&self.kept);
        kept.push_front(conversation);
        let mut evicted = Vec::new();
        while kept.len() > self.capacity {
            evicted.extend(kept.pop_back());
        }
        evicted
    }

    /// Removes every kept session (shutdown).
    pub(crate) fn drain(&self) -> Vec<Conversation> {
        crate::net::lock(&self.kept).drain(..).collect()
    }
}
