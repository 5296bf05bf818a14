//! `Tokenizer`: encode, decode and chat templates.

use crate::errors::to_py;
use neuroshard_core::{ChatMessage, Tokenizer};
use pyo3::prelude::*;

/// A model's tokenizer with its chat template.
#[pyclass(name = "Tokenizer", module = "neuroshard._native", frozen)]
pub(crate) struct TokenizerHandle {
    tokenizer: Tokenizer,
}

impl TokenizerHandle {
    pub(crate) fn new(tokenizer: Tokenizer) -> Self {
        TokenizerHandle { tokenizer }
    }
}

#[pymethods]
impl TokenizerHandle {
    /// Opens a `tokenizer.json`, or the tokenizer inside a model (GGUF file or Hugging Face
    /// directory).
    #[staticmethod]
    fn from_file(py: Python<'_>, path: std::path::PathBuf) -> PyResult<Self> {
        let tokenizer = py.detach(|| Tokenizer::open(&path)).map_err(to_py)?;
        Ok(TokenizerHandle { tokenizer })
    }

    /// Token ids of `text`.
    fn encode(&self, text: &str) -> PyResult<Vec<u32>> {
        self.tokenizer.encode(text).map_err(to_py)
    }

    /// Text of `ids`.
    fn decode(&self, ids: Vec<u32>) -> PyResult<String> {
        self.tokenizer.decode(&ids).map_err(to_py)
    }

    /// Renders `messages` (dicts with `role` and `content`) with the chat template.
    #[pyo3(signature = (messages, add_generation_prompt=true))]
    fn apply_chat_template(
        &self,
        messages: Vec<std::collections::HashMap<String, String>>,
        add_generation_prompt: bool,
    ) -> PyResult<String> {
        let messages: Vec<ChatMessage> = messages
            .iter()
            .map(|m| {
                ChatMessage::new(
                    m.get("role").cloned().unwrap_or_default(),
                    m.get("content").cloned().unwrap_or_default(),
                )
            })
            .collect();
        self.tokenizer
            .apply_chat_template(&messages, add_generation_prompt)
            .map_err(to_py)
    }

    /// End-of-sequence token ids.
    #[getter]
    fn eos_token_ids(&self) -> Vec<u32> {
        self.tokenizer.eos_token_ids().to_vec()
    }

    /// Number of tokens in the vocabulary.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.tokenizer.vocab_size()
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<TokenizerHandle>()
}
