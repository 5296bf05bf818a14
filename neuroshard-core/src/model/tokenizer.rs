//! Tokenizer, chat template and end-of-sequence ids, from GGUF metadata or `tokenizer.json`.
//!
//! For GGUF (`tokenizer.ggml.model = gpt2`) the byte-level BPE is rebuilt from the stored vocab
//! and merges. candle's own GGUF conversion adds a prefix space, which changes SmolLM2's ids; the
//! pre-tokenizer here is the one SmolLM2 ships in `tokenizer.json`: split digits individually,
//! then byte-level without a prefix space (see DESIGN.md, "Verified facts and traps").

use crate::error::{Error, Result};
use crate::model::weights::{ModelFormat, WeightFile};
use candle_core::quantized::gguf_file;
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper};

/// Token texts that end a turn or a document in common model families; generation stops on
/// them (as llama.cpp's end-of-generation set does) in addition to the configured EOS id.
const END_MARKERS: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "</s>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<end_of_turn>",
];

/// One chat message for [`Tokenizer::apply_chat_template`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A tokenizer in transferable form (served by entry nodes as part of the model info).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenizerInfo {
    /// The Hugging Face `tokenizer.json` text.
    pub json: String,
    /// The chat template (Jinja), if any.
    pub chat_template: Option<String>,
    /// Token ids that end generation.
    pub eos_ids: Vec<u32>,
    /// Beginning-of-sequence id and text.
    pub bos: Option<(u32, String)>,
    /// Whether encoding prepends BOS.
    pub add_bos: bool,
}

/// Text <-> token ids for one model, with its chat template and stop tokens.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    eos_ids: Vec<u32>,
    bos: Option<(u32, String)>,
    add_bos: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("eos_ids", &self.eos_ids)
            .finish_non_exhaustive()
    }
}

/// Largest `tokenizer.json` accepted from a peer (Gemma's, among the largest, is 33 MB).
pub(crate) const MAX_TOKENIZER_JSON: usize = 48 << 20;
/// Largest chat template accepted from a peer (real ones are a few KB; tool-use ones ~40 KB).
pub(crate) const MAX_CHAT_TEMPLATE: usize = 256 << 10;
/// Most end-of-generation ids accepted from a peer.
pub(crate) const MAX_EOS_IDS: usize = 64;
/// Largest BOS text accepted from a peer.
pub(crate) const MAX_BOS_TEXT: usize = 1 << 10;
/// Template instructions one chat rendering may run: a template is code, from the model file
/// or from a peer, and a loop must not hang the caller. A 100-message conversation with
/// SmolLM2's template needs about 10,000.
pub(crate) const TEMPLATE_FUEL: u64 = 2_000_000;
/// Deepest template recursion (macros, includes, nested loops).
pub(crate) const TEMPLATE_RECURSION: usize = 64;
/// Longest rendered chat prompt (far beyond any context window's text).
pub(crate) const MAX_RENDERED_PROMPT: usize = 16 << 20;

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// The tokenizer of an opened model: GGUF metadata, or `tokenizer.json` (+
    /// `tokenizer_config.json` for the chat template) beside safetensors weights.
    pub fn for_model(file: &WeightFile) -> Result<Self> {
        let eos = file.config().eos_token_ids.clone();
        match file.format() {
            ModelFormat::Gguf => {
                let content = file
                    .gguf_metadata()
                    .ok_or_else(|| Error::Tokenizer("GGUF metadata missing".into()))?;
                Self::from_gguf(content)
            }
            ModelFormat::Safetensors => {
                let dir = file.path();
                let json = dir.join("tokenizer.json");
                if !json.exists() {
                    return Err(Error::Tokenizer(format!(
                        "{} has no tokenizer.json; pass token ids instead of text",
                        dir.display()
                    )));
                }
                let mut tok = Self::from_file(&json)?;
                tok.add_eos(&eos);
                Ok(tok)
            }
        }
    }

    /// Opens the tokenizer at `path`: a `tokenizer.json` ([`Tokenizer::from_file`]), or a
    /// model (GGUF file or Hugging Face directory) whose tokenizer is read from it.
    pub fn open(path: &Path) -> Result<Self> {
        if path.extension().is_some_and(|e| e == "json") {
            return Self::from_file(path);
        }
        Self::for_model(&WeightFile::open(path)?)
    }

    /// Loads a Hugging Face `tokenizer.json`, with the chat template and BOS settings of the
    /// `tokenizer_config.json` beside it when present.
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(tok_err)?;
        let mut tok = Tokenizer {
            inner,
            chat_template: None,
            eos_ids: Vec::new(),
            bos: None,
            add_bos: false,
        };
        if let Some(dir) = path.parent() {
            if let Ok(text) = std::fs::read_to_string(dir.join("tokenizer_config.json")) {
                let cfg: serde_json::Value = serde_json::from_str(&text).map_err(tok_err)?;
                tok.chat_template = cfg
                    .get("chat_template")
                    .and_then(|v| v.as_str())
                    .map(String::from);
                let token_text = |key: &str| {
                    cfg.get(key).and_then(|v| {
                        v.as_str()
                            .map(String::from)
                            .or_else(|| v.get("content").and_then(|c| c.as_str()).map(String::from))
                    })
                };
                if let Some(eos) = token_text("eos_token").and_then(|t| tok.inner.token_to_id(&t)) {
                    tok.add_eos(&[eos]);
                }
                if let Some(bos) = token_text("bos_token") {
                    if let Some(id) = tok.inner.token_to_id(&bos) {
                        tok.bos = Some((id, bos));
                    }
                }
            }
        }
        tok.add_end_markers();
        Ok(tok)
    }

    /// Rebuilds the tokenizer stored in GGUF metadata (`tokenizer.ggml.*`).
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let md = &content.metadata;
        let model = md
            .get("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if model != "gpt2" {
            return Err(Error::Tokenizer(format!(
                "GGUF tokenizer model `{model}` is not supported (byte-level BPE `gpt2` is)"
            )));
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            md.get(key)
                .and_then(|v| v.to_vec().ok())
                .ok_or_else(|| Error::Tokenizer(format!("GGUF metadata lacks `{key}`")))?
                .iter()
                .map(|v| v.to_string().cloned().map_err(tok_err))
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
            .into_iter()
            .filter_map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
            })
            .collect();
        let types: Vec<i32> = md
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.iter().map(|t| t.to_i32().unwrap_or(1)).collect())
            .unwrap_or_default();
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(tok_err)?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let pre = Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ]);
        inner.with_pre_tokenizer(Some(pre));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        // Control tokens (type 3) are matched whole, never split by BPE, and skipped when decoding.
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(types.iter())
            .filter(|(_, &t)| t == 3)
            .map(|(s, _)| AddedToken::from(s.clone(), true))
            .collect();
        inner.add_special_tokens(specials).map_err(tok_err)?;
        let id = |key: &str| md.get(key).and_then(|v| v.to_u32().ok());
        let mut tok = Tokenizer {
            chat_template: md
                .get("tokenizer.chat_template")
                .and_then(|v| v.to_string().ok())
                .cloned(),
            eos_ids: Vec::new(),
            bos: id("tokenizer.ggml.bos_token_id")
                .and_then(|b| tokens.get(b as usize).map(|t| (b, t.clone()))),
            add_bos: md
                .get("tokenizer.ggml.add_bos_token")
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(false),
            inner,
        };
        tok.add_eos(
            &id("tokenizer.ggml.eos_token_id")
                .into_iter()
                .collect::<Vec<_>>(),
        );
        tok.add_end_markers();
        Ok(tok)
    }

    fn add_eos(&mut self, ids: &[u32]) {
        for &id in ids {
            if !self.eos_ids.contains(&id) {
                self.eos_ids.push(id);
            }
        }
    }

    fn add_end_markers(&mut self) {
        let ids: Vec<u32> = END_MARKERS
            .iter()
            .filter_map(|m| self.inner.token_to_id(m))
            .collect();
        self.add_eos(&ids);
    }

    /// Encodes text. Special tokens written in the text (`<|im_start|>`) are recognised; a BOS
    /// token is prepended only if the model asks for one.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if let (true, Some((bos, _))) = (self.add_bos, &self.bos) {
            ids.push(*bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Decodes ids to text, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(tok_err)
    }

    /// Everything a client needs to rebuild this tokenizer without the model file.
    pub fn export(&self) -> Result<TokenizerInfo> {
        Ok(TokenizerInfo {
            json: self.inner.to_string(false).map_err(tok_err)?,
            chat_template: self.chat_template.clone(),
            eos_ids: self.eos_ids.clone(),
            bos: self.bos.clone(),
            add_bos: self.add_bos,
        })
    }

    /// Checks the sizes [`Tokenizer::import`] accepts, before anything is parsed or hashed.
    pub(crate) fn check_sizes(info: &TokenizerInfo) -> Result<()> {
        let too_big = |what: &str, len: usize, max: usize| {
            Err(Error::Tokenizer(format!(
                "{what} of {len} bytes from the entry node exceeds {max}"
            )))
        };
        if info.json.len() > MAX_TOKENIZER_JSON {
            return too_big("tokenizer.json", info.json.len(), MAX_TOKENIZER_JSON);
        }
        if let Some(t) = info
            .chat_template
            .as_ref()
            .filter(|t| t.len() > MAX_CHAT_TEMPLATE)
        {
            return too_big("chat template", t.len(), MAX_CHAT_TEMPLATE);
        }
        if let Some((_, b)) = info.bos.as_ref().filter(|(_, b)| b.len() > MAX_BOS_TEXT) {
            return too_big("BOS text", b.len(), MAX_BOS_TEXT);
        }
        if info.eos_ids.len() > MAX_EOS_IDS {
            return Err(Error::Tokenizer(format!(
                "{} end-of-generation ids from the entry node, at most {MAX_EOS_IDS} accepted",
                info.eos_ids.len()
            )));
        }
        Ok(())
    }

    /// Rebuilds a tokenizer exported by [`Tokenizer::export`]. The parts come from a peer,
    /// so their sizes are checked first: a `tokenizer.json` of at most 48 MiB, a chat
    /// template of at most 256 KiB, at most 64 EOS ids and a BOS text of at most 1 KiB.
    pub fn import(info: &TokenizerInfo) -> Result<Self> {
        Self::check_sizes(info)?;
        let inner: tokenizers::Tokenizer = info.json.parse().map_err(tok_err)?;
        Ok(Tokenizer {
            inner,
            chat_template: info.chat_template.clone(),
            eos_ids: info.eos_ids.clone(),
            bos: info.bos.clone(),
            add_bos: info.add_bos,
        })
    }

    /// Writes the tokenizer as a Hugging Face `tokenizer.json` (e.g. to serve it to clients
    /// that have no model file).
    pub fn save_json(&self, path: &Path) -> Result<()> {
        self.inner.save(path, false).map_err(tok_err)
    }

    /// The text of one token id, if it exists.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids that end generation.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The model's chat template (Jinja), if it has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Renders `messages` with the model's chat template; with `add_generation_prompt` the
    /// text ends where the assistant's answer begins.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| Error::Tokenizer("this model has no chat template".into()))?;
        let mut env = minijinja::Environment::new();
        // A template is code: bound its work, its depth and its output.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_recursion_limit(TEMPLATE_RECURSION);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", template).map_err(tok_err)?;
        let bos = self
            .bos
            .as_ref()
            .map(|(_, t)| t.clone())
            .unwrap_or_default();
        let eos = self
            .eos_ids
            .first()
            .and_then(|&id| self.inner.id_to_token(id))
            .unwrap_or_default();
        let mut out = BoundedText::default();
        env.get_template("chat")
            .and_then(|t| {
                t.render_captured_to(
                    minijinja::context! {
                        messages => messages,
                        add_generation_prompt => add_generation_prompt,
                        bos_token => bos,
                        eos_token => eos,
                    },
                    &mut out,
                )
                .map(|_| ())
            })
            .map_err(|e| match out.overflowed {
                true => Error::Tokenizer(format!(
                    "the chat template rendered more than {MAX_RENDERED_PROMPT} bytes"
                )),
                false => tok_err(e),
            })?;
        String::from_utf8(out.bytes).map_err(tok_err)
    }
}

/// A rendering sink that refuses to grow past [`MAX_RENDERED_PROMPT`].
#[derive(Default)]
struct BoundedText {
    bytes: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for BoundedText {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > MAX_RENDERED_PROMPT {
            self.overflowed = true;
            return Err(std::io::Error::other("rendered prompt too long"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Turns a growing list of token ids into text pieces as they become printable: a token that
/// ends inside a multi-byte character is held back until the character is complete.
#[derive(Debug, Default)]
pub(crate) struct TextStream {
    ids: Vec<u32>,
    emitted: usize,
}

impl TextStream {
    /// Adds a token; returns the newly printable text (possibly empty).
    pub(crate) fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = tokenizer.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}')
            || text.len() < self.emitted
            || !text.is_char_boundary(self.emitted)
        {
            return Ok(String::new());
        }
        let piece = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(piece)
    }
}
