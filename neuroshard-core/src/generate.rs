//! Text generation over any backend that turns tokens at positions into next-token logits:
//! in-process shard chains today ([`LocalPipeline`]), swarm routes later.
//!
//! The loop prefills the prompt in one call, then feeds one token per step; only the newest
//! position is computed thanks to the KV caches. Text is streamed as it becomes printable.

use crate::engine::{EngineOptions, ForwardRequest, SessionId, ShardEngine};
use crate::error::{Error, Result};
use crate::model::sampling::{sample, SamplingParams};
use crate::model::shard::{ShardInput, ShardOutput};
use crate::model::tokenizer::{TextStream, Tokenizer};
use crate::model::weights::WeightFile;
use candle_core::{Device, Tensor};
use std::ops::{ControlFlow, Range};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Produces next-token logits for tokens written at positions `start_pos..`.
pub trait LogitsBackend {
    /// Runs `tokens` at positions `start_pos..start_pos + tokens.len()` (overwriting anything
    /// cached from `start_pos` on) and returns the logits of the last position.
    fn next_logits(&mut self, tokens: &[u32], start_pos: usize) -> Result<Vec<f32>>;
    /// Longest sequence (prompt + generated) the backend accepts.
    fn max_len(&self) -> usize;
}

/// Produces the next token for tokens written at positions `start_pos..`: sampling happens
/// inside the backend (locally for [`LogitsBackend`]s, on the route's last hop for a swarm
/// session), with the draw for position `p` depending only on `(seed, p)`.
pub trait TokenBackend {
    /// Runs `tokens` at `start_pos..` and returns the token at `start_pos + tokens.len()`.
    /// `context` holds every token at positions `0..start_pos + tokens.len()`.
    fn next_token(
        &mut self,
        tokens: &[u32],
        start_pos: usize,
        context: &[u32],
        sampling: &SamplingParams,
    ) -> Result<u32>;
    /// Longest sequence the backend accepts.
    fn context_len(&self) -> usize;
}

impl<T: LogitsBackend> TokenBackend for T {
    fn next_token(
        &mut self,
        tokens: &[u32],
        start_pos: usize,
        context: &[u32],
        sampling: &SamplingParams,
    ) -> Result<u32> {
        let logits = self.next_logits(tokens, start_pos)?;
        sample(&logits, sampling, start_pos + tokens.len(), context)
    }

    fn context_len(&self) -> usize {
        self.max_len()
    }
}

/// What to generate and when to stop.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Sampling parameters (greedy by default).
    pub sampling: SamplingParams,
    /// Extra token ids that end generation.
    pub stop_tokens: Vec<u32>,
    /// Keep going through end-of-sequence tokens (benchmarks generate a fixed count).
    pub ignore_eos: bool,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_tokens: 128,
            sampling: SamplingParams::greedy(),
            stop_tokens: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence or stop token was generated (not included in the output).
    Stop,
    /// `max_tokens` were generated.
    Length,
    /// The context is full.
    ContextFull,
    /// The caller stopped it (its text callback returned `ControlFlow::Break`, or a stop
    /// string appeared).
    Cancelled,
}

/// The result of [`generate`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerationOutput {
    /// Generated token ids (without the stop token).
    pub tokens: Vec<u32>,
    /// Their text.
    pub text: String,
    /// Why generation ended.
    pub finish: FinishReason,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Leading prompt tokens that were already in the caches (a kept conversation) and were
    /// not computed again.
    pub cached_prompt_tokens: usize,
    /// Time to process the prompt and pick the first token.
    pub prefill_time: Duration,
    /// Time spent on the remaining tokens.
    pub decode_time: Duration,
}

impl GenerationOutput {
    /// How many positions the backend's caches hold after this generation: the prompt and
    /// every generated token that was fed back (all of them when a stop token ended it; all
    /// but the last otherwise, since the last one was never run).
    pub fn positions_cached(&self) -> usize {
        let unfed = usize::from(self.finish != FinishReason::Stop && !self.tokens.is_empty());
        self.prompt_tokens + self.tokens.len() - unfed
    }

    /// Prompt tokens computed per second (cached ones not counted).
    pub fn prefill_tokens_per_sec(&self) -> f64 {
        (self.prompt_tokens - self.cached_prompt_tokens) as f64
            / self.prefill_time.as_secs_f64().max(1e-9)
    }

    /// Generated tokens per second after the first.
    pub fn decode_tokens_per_sec(&self) -> f64 {
        // The first token comes out of the prefill call.
        let steps =
            self.tokens.len().saturating_sub(1) + usize::from(self.finish == FinishReason::Stop);
        steps as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

/// Generates from `prompt` (token ids), calling `on_text` with each printable piece.
pub fn generate(
    backend: &mut dyn TokenBackend,
    tokenizer: Option<&Tokenizer>,
    prompt: &[u32],
    config: &GenerationConfig,
    on_text: &mut dyn FnMut(&str),
) -> Result<GenerationOutput> {
    generate_until(backend, tokenizer, prompt, config, &mut |piece| {
        on_text(piece);
        ControlFlow::Continue(())
    })
}

/// [`generate`] whose callback may stop the generation: `ControlFlow::Break` ends it after
/// the current token with [`FinishReason::Cancelled`] (a closed stream, a C callback's
/// non-zero return, Ctrl-C in Python).
pub fn generate_until(
    backend: &mut dyn TokenBackend,
    tokenizer: Option<&Tokenizer>,
    prompt: &[u32],
    config: &GenerationConfig,
    on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
) -> Result<GenerationOutput> {
    generate_from(backend, tokenizer, prompt, 0, config, on_text)
}

/// [`generate_until`] on a backend whose caches already hold `prompt[..cached]` at positions
/// `0..cached` (a kept conversation): only `prompt[cached..]` is fed, from position `cached`
/// on, so earlier turns are not computed again. `cached` must be below `prompt.len()`.
pub fn generate_from(
    backend: &mut dyn TokenBackend,
    tokenizer: Option<&Tokenizer>,
    prompt: &[u32],
    cached: usize,
    config: &GenerationConfig,
    on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
) -> Result<GenerationOutput> {
    if cached >= prompt.len().max(1) {
        return Err(Error::Generation(format!(
            "{cached} cached positions leave nothing of a {}-token prompt to feed",
            prompt.len()
        )));
    }
    config.sampling.validate()?;
    if prompt.is_empty() {
        return Err(Error::Generation("the prompt is empty".into()));
    }
    let max_len = backend.context_len();
    if prompt.len() >= max_len {
        return Err(Error::Generation(format!(
            "prompt of {} tokens leaves no room in a context of {max_len}",
            prompt.len()
        )));
    }
    let mut stops = config.stop_tokens.clone();
    if !config.ignore_eos {
        stops.extend(
            tokenizer
                .map(|t| t.eos_token_ids().to_vec())
                .unwrap_or_default(),
        );
    }
    let mut context = prompt.to_vec();
    let mut generated = Vec::new();
    let mut stream = TextStream::default();
    let start = Instant::now();
    let mut prefill_time = None;
    let mut feed: Vec<u32> = prompt[cached..].to_vec();
    let mut pos = cached;
    let finish = loop {
        if generated.len() >= config.max_tokens {
            break FinishReason::Length;
        }
        if pos + feed.len() > max_len {
            break FinishReason::ContextFull;
        }
        let next = backend.next_token(&feed, pos, &context, &config.sampling)?;
        pos += feed.len();
        if prefill_time.is_none() {
            prefill_time = Some(start.elapsed());
        }
        if stops.contains(&next) {
            break FinishReason::Stop;
        }
        generated.push(next);
        context.push(next);
        if let Some(tok) = tokenizer {
            let piece = stream.push(tok, next)?;
            if !piece.is_empty() && on_text(&piece).is_break() {
                break FinishReason::Cancelled;
            }
        }
        feed = vec![next];
    };
    let prefill_time = prefill_time.unwrap_or_else(|| start.elapsed());
    let text = match tokenizer {
        Some(t) => t.decode(&generated)?,
        None => String::new(),
    };
    Ok(GenerationOutput {
        tokens: generated,
        text,
        finish,
        prompt_tokens: prompt.len(),
        cached_prompt_tokens: cached,
        prefill_time,
        decode_time: start.elapsed().saturating_sub(prefill_time),
    })
}

/// A model run as consecutive in-process shards, passing hidden states from one to the next.
#[derive(Debug)]
pub struct LocalPipeline {
    shards: Vec<ShardEngine>,
    session: SessionId,
    open: bool,
}

/// Turns cut points into consecutive ranges: `cuts = [10, 20]` over 30 layers gives
/// `0..10, 10..20, 20..30`.
pub fn split_ranges(layers: usize, cuts: &[usize]) -> Result<Vec<Range<usize>>> {
    let mut bounds = vec![0];
    for &c in cuts {
        let prev = bounds[bounds.len() - 1];
        if c <= prev || c >= layers {
            return Err(Error::SliceOutOfRange {
                start: prev,
                end: c,
                layers,
            });
        }
        bounds.push(c);
    }
    bounds.push(layers);
    Ok(bounds.windows(2).map(|w| w[0]..w[1]).collect())
}

impl LocalPipeline {
    /// Loads the model at `path` as shards cut at `cuts` (empty: one shard).
    pub fn load(path: impl AsRef<Path>, cuts: &[usize], options: EngineOptions) -> Result<Self> {
        Self::load_with_progress(path, cuts, options, &mut |_, _, _| {})
    }

    /// Like [`LocalPipeline::load`]; `progress(shard, blocks_done, blocks_total)`.
    pub fn load_with_progress(
        path: impl AsRef<Path>,
        cuts: &[usize],
        options: EngineOptions,
        progress: &mut dyn FnMut(usize, usize, usize),
    ) -> Result<Self> {
        let file = Arc::new(WeightFile::open(path)?);
        let ranges = split_ranges(file.config().num_layers, cuts)?;
        let mut shards = Vec::with_capacity(ranges.len());
        for (i, range) in ranges.into_iter().enumerate() {
            shards.push(ShardEngine::from_file(
                file.clone(),
                range,
                options.clone(),
                &mut |done, total| progress(i, done, total),
            )?);
        }
        Ok(LocalPipeline {
            shards,
            session: 1,
            open: false,
        })
    }

    /// The shards, first to last.
    pub fn shards(&self) -> &[ShardEngine] {
        &self.shards
    }

    /// The tokenizer stored with the model.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let first = self
            .shards
            .first()
            .ok_or_else(|| Error::Generation("pipeline has no shards".into()))?;
        Tokenizer::for_model(first.weight_file())
    }

    /// Starts a fresh session (drops the previous one's caches).
    pub fn reset(&mut self) -> Result<()> {
        if self.open {
            for s in &self.shards {
                s.close_session(self.session)?;
            }
            self.open = false;
        }
        self.session += 1;
        Ok(())
    }
}

impl LogitsBackend for LocalPipeline {
    fn next_logits(&mut self, tokens: &[u32], start_pos: usize) -> Result<Vec<f32>> {
        if !self.open {
            for s in &self.shards {
                s.open_session(self.session)?;
            }
            self.open = true;
        }
        let ids = Tensor::from_slice(tokens, (1, tokens.len()), &Device::Cpu)?;
        let mut input = ShardInput::Tokens(ids);
        for shard in &self.shards {
            let req = ForwardRequest::new(input)
                .session(self.session, start_pos)
                .last_logits_only();
            match shard.forward(req)? {
                ShardOutput::Hidden(h) => input = ShardInput::Hidden(h),
                ShardOutput::Logits(l) => return Ok(l.flatten_all()?.to_vec1()?),
            }
        }
        Err(Error::Generation(
            "the last shard did not return logits".into(),
        ))
    }

    fn max_len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.max_session_len())
            .min()
            .unwrap_or(0)
    }
}

impl Drop for LocalPipeline {
    fn drop(&mut self) {
        // Nothing to report from a destructor; the engines are dropped right after anyway.
        let _ = self.reset();
    }
}

/// Stops a text stream at the first of several stop strings (OpenAI's `stop`): pieces are
/// passed on as they come, except a tail that could still become a stop string, which is held
/// back until it is decided. The stop string itself is never passed on.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopStrings {
    /// Watches for `stops` (empty strings are ignored).
    pub fn new(stops: impl IntoIterator<Item = String>) -> Self {
        StopStrings {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
            stopped: false,
        }
    }

    /// Takes the next piece; returns the text that is safe to emit and whether a stop string
    /// was reached (then nothing more is emitted).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        if self.stops.is_empty() {
            return (piece.to_string(), false);
        }
        self.held.push_str(piece);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.stopped = true;
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        // Hold back the longest tail that is a proper prefix of a stop string.
        let keep = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.held, s))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }

    /// The text still held back when the generation ends without a stop string.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop` (on char bounds).
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = stop.len().saturating_sub(1).min(text.len());
    (1..=max)
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n)
                && stop.is_char_boundary(n)
                && stop.as_bytes()[..n] == text.as_bytes()[text.len() - n..]
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::StopStrings;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut s = StopStrings::new(stops.iter().map(|s| s.to_string()));
        let mut out = String::new();
        for p in pieces {
            let (text, stop) = s.push(p);
            out.push_str(&text);
            if stop {
                return (out, true);
            }
        }
        out.push_str(&s.finish());
        (out, false)
    }

    #[test]
    fn stop_strings_cut_the_text_before_the_stop() {
        assert_eq!(run(&["\n\n"], &["a", "b\n", "\nc"]), ("ab".into(), true));
        assert_eq!(run(&["END"], &["xE", "N", "D!"]), ("x".into(), true));
        assert_eq!(run(&["END"], &["xE", "N", "o"]), ("xENo".into(), false));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(
            run(&["b", "a"], &["xyab"]),
            ("xy".into(), true),
            "earliest stop wins"
        );
        assert_eq!(run(&["é!"], &["caf", "é", "?"]), ("café?".into(), false));
    }
}
