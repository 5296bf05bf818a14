//! What a trainer learns from: plain text or a conversation, cut into token sequences, and how
//! many steps of how many micro-batches it runs over them.

use crate::error::{Error, Result};
use crate::{ChatMessage, Tokenizer};

/// How a text becomes steps: [`crate::Trainer::learn_text`] and
/// [`crate::Trainer::learn_conversation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LearnOptions {
    /// Optimizer steps.
    pub steps: usize,
    /// Micro-batches per step (one example each); the hops pipeline them.
    pub micro_batches: usize,
    /// Tokens per example.
    pub seq_len: usize,
    /// Every non-empty line is one example (plain text only).
    pub lines: bool,
}

impl Default for LearnOptions {
    /// 20 steps of 4 micro-batches of 128 tokens: `neuroshard train`'s defaults.
    fn default() -> Self {
        LearnOptions {
            steps: 20,
            micro_batches: 4,
            seq_len: 128,
            lines: false,
        }
    }
}

/// Training examples from plain text: with `lines`, every non-empty line is one example
/// (cut to `seq_len` tokens); otherwise the whole text's tokens in windows of `seq_len`
/// (the last, shorter one kept when it has 2 tokens or more).
pub fn examples_from_text(
    tokenizer: &Tokenizer,
    text: &str,
    seq_len: usize,
    lines: bool,
) -> Result<Vec<Vec<u32>>> {
    check_seq_len(seq_len)?;
    if !lines {
        return Ok(windows(&tokenizer.encode(text)?, seq_len));
    }
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let mut ids = tokenizer.encode(line)?;
        ids.truncate(seq_len);
        if ids.len() >= 2 {
            out.push(ids);
        }
    }
    Ok(out)
}

/// Training examples from a conversation: the messages rendered with the model's chat
/// template (what the model sees when it chats, so it learns the answers in the form it will
/// give them), in windows of `seq_len` tokens. A model without a template gets one
/// `role: content` line per message.
pub fn examples_from_conversation(
    tokenizer: &Tokenizer,
    messages: &[ChatMessage],
    seq_len: usize,
) -> Result<Vec<Vec<u32>>> {
    check_seq_len(seq_len)?;
    if messages.is_empty() {
        return Err(Error::Training(
            "an empty conversation teaches nothing".into(),
        ));
    }
    let text = match tokenizer.chat_template() {
        Some(_) => tokenizer.apply_chat_template(messages, false)?,
        None => messages
            .iter()
            .map(|m| format!("{}: {}\n", m.role, m.content))
            .collect(),
    };
    let examples = windows(&tokenizer.encode(&text)?, seq_len);
    if examples.is_empty() {
        return Err(Error::Training(
            "the conversation is shorter than 2 tokens".into(),
        ));
    }
    Ok(examples)
}

fn check_seq_len(seq_len: usize) -> Result<()> {
    if seq_len < 2 {
        return Err(Error::Training(format!(
            "sequences of {seq_len} tokens cannot train"
        )));
    }
    Ok(())
}

/// `ids` in windows of `seq_len`, the last shorter one kept when it has 2 tokens or more.
fn windows(ids: &[u32], seq_len: usize) -> Vec<Vec<u32>> {
    ids.chunks(seq_len)
        .filter(|c| c.len() >= 2)
        .map(<[u32]>::to_vec)
        .collect()
}
