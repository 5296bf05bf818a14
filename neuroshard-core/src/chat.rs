//! [`ChatSession`]: a multi-turn chat over a swarm with the model's chat template. It keeps
//! the history and one [`Conversation`], so each turn only sends its new tokens through the
//! swarm (the template re-renders the whole history; the common prefix is reused). This is
//! what `neuroshard chat` runs.

use crate::error::{Error, Result};
use crate::generate::{FinishReason, GenerationConfig, GenerationOutput};
use crate::model::sampling::SamplingParams;
use crate::model::tokenizer::ChatMessage;
use crate::swarm_session::{Conversation, SwarmSession};
use std::ops::ControlFlow;

/// A chat's history and its swarm session. Blocking methods: call them from a thread that has
/// entered a tokio runtime (`Runtime::enter`) but is not one of its workers.
#[derive(Debug)]
pub struct ChatSession {
    swarm: SwarmSession,
    sampling: SamplingParams,
    max_tokens: usize,
    system: Option<String>,
    history: Vec<ChatMessage>,
    conversation: Option<Conversation>,
}

/// One answered turn.
#[derive(Debug, Clone)]
pub struct ChatReply {
    /// The assistant's text (kept in the history).
    pub text: String,
    /// Why the answer ended ([`FinishReason::Cancelled`] when the caller stopped it).
    pub finish: FinishReason,
    /// The whole generation's numbers.
    pub output: GenerationOutput,
}

impl ChatSession {
    /// A new chat over `swarm`; answers are at most `max_tokens` long.
    pub fn new(swarm: SwarmSession, sampling: SamplingParams, max_tokens: usize) -> Self {
        ChatSession {
            swarm,
            sampling,
            max_tokens,
            system: None,
            history: Vec::new(),
            conversation: None,
        }
    }

    /// Sets (or clears) the system message; the history stays.
    pub fn set_system(&mut self, system: Option<String>) {
        self.system = system.filter(|s| !s.is_empty());
    }

    /// The system message.
    pub fn system(&self) -> Option<&str> {
        self.system.as_deref()
    }

    /// The turns so far (user and assistant messages, in order).
    pub fn history(&self) -> &[ChatMessage] {
        &self.history
    }

    /// Forgets the history and closes the swarm session (the system message stays).
    pub fn reset(&mut self) {
        self.history.clear();
        if let Some(mut c) = self.conversation.take() {
            c.close();
        }
    }

    /// The prompt ids of the history plus `user`, ready for the assistant's answer.
    fn prompt(&self, user: &str) -> Result<Vec<u32>> {
        let mut messages = Vec::with_capacity(self.history.len() + 2);
        if let Some(s) = &self.system {
            messages.push(ChatMessage::new("system", s.clone()));
        }
        messages.extend(self.history.iter().cloned());
        messages.push(ChatMessage::new("user", user));
        let tokenizer = self.swarm.tokenizer();
        tokenizer.encode(&tokenizer.apply_chat_template(&messages, true)?)
    }

    /// Sends `user` and streams the answer to `on_text` (return `ControlFlow::Break` to stop
    /// it: the partial answer is kept, as in other chat front-ends). The turn and the answer
    /// join the history.
    pub fn send(
        &mut self,
        user: &str,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<ChatReply> {
        let prompt = self.prompt(user)?;
        if prompt.len() >= self.swarm.context_len() {
            return Err(Error::Generation(format!(
                "the conversation ({} tokens) fills the model's context of {}: /reset",
                prompt.len(),
                self.swarm.context_len()
            )));
        }
        if self.conversation.is_none() {
            let handle = tokio::runtime::Handle::try_current().map_err(|_| {
                Error::Internal("ChatSession::send needs a tokio runtime entered".into())
            })?;
            let swarm = self.swarm.clone();
            let sampling = self.sampling;
            self.conversation =
                Some(handle.block_on(async move { swarm.open_conversation(sampling).await })?);
        }
        let config = GenerationConfig {
            max_tokens: self.max_tokens,
            sampling: self.sampling,
            ..GenerationConfig::default()
        };
        let conversation = self
            .conversation
            .as_mut()
            .ok_or_else(|| Error::Internal("no conversation".into()))?;
        let result = conversation.generate(&prompt, &config, on_text);
        let output = match result {
            Ok(output) => output,
            Err(e) => {
                // The session is closed; the next turn opens a new one.
                self.conversation = None;
                return Err(e);
            }
        };
        self.history.push(ChatMessage::new("user", user));
        self.history
            .push(ChatMessage::new("assistant", output.text.clone()));
        Ok(ChatReply {
            text: output.text.clone(),
            finish: output.finish,
            output,
        })
    }
}

impl Drop for ChatSession {
    fn drop(&mut self) {
        // Conversation's own drop closes its session in the background.
        self.conversation.take();
    }
}
