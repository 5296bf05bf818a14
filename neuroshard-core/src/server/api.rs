//! The request bodies of the OpenAI endpoints and their checks: what a request asks for,
//! turned into one [`Job`] (prompt token ids, sampling, limits) or a typed [`ApiError`].

use super::errors::ApiError;
use crate::model::tokenizer::{ChatMessage, Tokenizer};
use serde::Deserialize;

/// Which endpoint a job came from (the response shapes differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/completions`.
    Completions,
}

impl Endpoint {
    /// The label in metrics.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat_completions",
            Endpoint::Completions => "completions",
        }
    }
}

/// Fields both generation endpoints take. Unknown fields are ignored, as OpenAI-compatible
/// servers do, so clients that send more (`user`, `logit_bias`...) still work.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct CommonParams {
    model: Option<String>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    stop: Option<StopField>,
    seed: Option<u64>,
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StopField {
    One(String),
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub(crate) struct ChatRequest {
    messages: Vec<ApiMessage>,
    #[serde(flatten)]
    common: CommonParams,
}

/// One message: `content` is a string or a list of parts, of which the text parts count.
#[derive(Debug, Deserialize)]
struct ApiMessage {
    role: String,
    #[serde(default)]
    content: Option<MessageContent>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub(crate) struct CompletionRequest {
    prompt: PromptField,
    #[serde(flatten)]
    common: CommonParams,
}

/// `prompt`: a string, a list of one string, or token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

/// Most stop strings per request.
const MAX_STOPS: usize = 16;

/// A checked generation request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Job {
    pub(crate) endpoint: Endpoint,
    /// The model name to echo in responses.
    pub(crate) model: String,
    /// Prompt token ids (the chat template applied for chat requests).
    pub(crate) prompt: Vec<u32>,
    pub(crate) temperature: f32,
    pub(crate) top_p: f32,
    /// `None`: any seed will do (a kept conversation's, or a fresh random one).
    pub(crate) seed: Option<u64>,
    pub(crate) max_tokens: usize,
    pub(crate) stop: Vec<String>,
    pub(crate) stream: bool,
    pub(crate) include_usage: bool,
}

/// What the checks need to know about the server.
pub(crate) struct Limits<'a> {
    pub(crate) served: &'a [String],
    pub(crate) context_len: usize,
    pub(crate) default_max_tokens: usize,
}

/// The chat messages of `request` in the chat template's form.
pub(crate) fn chat_messages(request: &ChatRequest) -> Result<Vec<ChatMessage>, ApiError> {
    if request.messages.is_empty() {
        return Err(ApiError::invalid(
            "`messages` must hold at least one message",
            Some("messages"),
        ));
    }
    request
        .messages
        .iter()
        .map(|m| {
            if !matches!(
                m.role.as_str(),
                "system" | "developer" | "user" | "assistant"
            ) {
                return Err(ApiError::invalid(
                    format!(
                        "unsupported role `{}` (system, developer, user, assistant)",
                        m.role
                    ),
                    Some("messages"),
                ));
            }
            let content = match &m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.kind.as_str(), &part.text) {
                            ("text", Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(ApiError::invalid(
                                    format!(
                                    "content parts of type `{kind}` are not supported (text only)"
                                ),
                                    Some("messages"),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            // The template knows system, user and assistant; OpenAI's newer `developer` role
            // is the system message.
            let role = if m.role == "developer" {
                "system"
            } else {
                &m.role
            };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

/// The prompt ids of a chat request: its messages through the model's chat template, ending
/// where the assistant's answer begins.
pub(crate) fn chat_prompt(
    tokenizer: &Tokenizer,
    request: &ChatRequest,
) -> Result<Vec<u32>, ApiError> {
    let messages = chat_messages(request)?;
    let text = tokenizer
        .apply_chat_template(&messages, true)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
    tokenizer
        .encode(&text)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))
}

/// The prompt ids of a completion request.
pub(crate) fn completion_prompt(
    tokenizer: &Tokenizer,
    request: &CompletionRequest,
) -> Result<Vec<u32>, ApiError> {
    let text = match &request.prompt {
        PromptField::Text(t) => t.clone(),
        PromptField::Texts(ts) if ts.len() == 1 => ts[0].clone(),
        PromptField::Texts(_) => {
            return Err(ApiError::invalid(
                "`prompt` must be one string (batches of prompts are not supported)",
                Some("prompt"),
            ))
        }
        PromptField::Tokens(ids) => {
            let vocab = tokenizer.vocab_size();
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                return Err(ApiError::invalid(
                    format!("token id {bad} is outside the vocabulary of {vocab}"),
                    Some("prompt"),
                ));
            }
            return Ok(ids.clone());
        }
    };
    tokenizer
        .encode(&text)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("prompt")))
}

impl ChatRequest {
    /// The shared fields.
    pub(crate) fn common(&self) -> &CommonParams {
        &self.common
    }
}

impl CompletionRequest {
    /// The shared fields.
    pub(crate) fn common(&self) -> &CommonParams {
        &self.common
    }
}

/// Checks the shared fields and builds the job for `prompt`.
pub(crate) fn job(
    endpoint: Endpoint,
    common: &CommonParams,
    prompt: Vec<u32>,
    limits: &Limits<'_>,
) -> Result<Job, ApiError> {
    let model = match &common.model {
        Some(m) if !limits.served.contains(m) => {
            return Err(ApiError::unknown_model(m, limits.served))
        }
        Some(m) => m.clone(),
        None => limits.served.first().cloned().unwrap_or_default(),
    };
    if let Some(n) = common.n.filter(|&n| n != 1) {
        return Err(ApiError::invalid(
            format!("n = {n}: only one choice per request is supported"),
            Some("n"),
        ));
    }
    // OpenAI's defaults: temperature 1, top_p 1.
    let temperature = common.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            format!("temperature {temperature} is outside 0..2"),
            Some("temperature"),
        ));
    }
    let top_p = common.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            format!("top_p {top_p} is outside (0, 1]"),
            Some("top_p"),
        ));
    }
    let max_tokens = common
        .max_completion_tokens
        .or(common.max_tokens)
        .unwrap_or(limits.default_max_tokens);
    if max_tokens == 0 {
        return Err(ApiError::invalid(
            "max_tokens must be at least 1",
            Some("max_tokens"),
        ));
    }
    let stop = match &common.stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s.clone()],
        Some(StopField::Many(v)) => v.clone(),
    };
    if stop.len() > MAX_STOPS {
        return Err(ApiError::invalid(
            format!("at most {MAX_STOPS} stop sequences"),
            Some("stop"),
        ));
    }
    let stop: Vec<String> = stop.into_iter().filter(|s| !s.is_empty()).collect();
    if prompt.is_empty() {
        return Err(ApiError::invalid("the prompt is empty", Some("prompt")));
    }
    if prompt.len() >= limits.context_len {
        return Err(ApiError::prompt_too_long(prompt.len(), limits.context_len));
    }
    Ok(Job {
        endpoint,
        model,
        prompt,
        temperature,
        top_p,
        seed: common.seed,
        max_tokens,
        stop,
        stream: common.stream,
        include_usage: common
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage),
    })
}
