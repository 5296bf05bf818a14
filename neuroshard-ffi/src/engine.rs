//! `ns_engine_*`: one slice of layers, forward over flat float buffers.

use crate::status::{arg_str, fail, fail_with, guard, ns_status, out_ptr};
use neuroshard_core::{ComputeMode, EngineOptions, ForwardRequest, ShardEngine, ShardInput};

/// Compute mode of an engine or node.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ns_mode {
    /// Quantised blocks x f32 activations: reproduces the references (the default).
    Exact = 0,
    /// Everything dequantised to f32 (the reference path; trains).
    F32 = 1,
    /// Also re-quantises f16/f32 matrices to Q8_0 (approximate).
    Fast = 2,
}

impl From<ns_mode> for ComputeMode {
    fn from(m: ns_mode) -> Self {
        match m {
            ns_mode::Exact => ComputeMode::Exact,
            ns_mode::F32 => ComputeMode::F32,
            ns_mode::Fast => ComputeMode::Fast,
        }
    }
}

/// An engine: layers `[start, end)` of one model (opaque; free with `ns_engine_free`).
pub struct ns_engine {
    engine: ShardEngine,
}

/// What an engine holds, for sizing buffers.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ns_engine_info {
    /// Transformer layers in the model.
    pub layers: u32,
    /// First layer of the slice.
    pub start: u32,
    /// One past the last layer of the slice.
    pub end: u32,
    /// Width of a hidden state.
    pub hidden_size: u32,
    /// Vocabulary size (width of a logits row).
    pub vocab_size: u32,
    /// Longest session.
    pub max_positions: u32,
}

/// Loads layers `[start, end)` of the model at `path` (GGUF file or Hugging Face directory).
#[no_mangle]
pub unsafe extern "C" fn ns_engine_load(
    path: *const std::ffi::c_char,
    start: u32,
    end: u32,
    mode: ns_mode,
    out: *mut *mut ns_engine,
) -> ns_status {
    guard(|| {
        // SAFETY: arg_str checks for null; the caller passes a C string.
        let path = match unsafe { arg_str(path, "path") } {
            Ok(p) => p,
            Err(s) => return s,
        };
        if let Err(s) = out_ptr(out, "out") {
            return s;
        }
        let options = EngineOptions {
            mode: mode.into(),
            ..EngineOptions::default()
        };
        match ShardEngine::load(path, start as usize..end as usize, options) {
            Ok(engine) => {
                // SAFETY: out checked non-null above.
                unsafe { *out = Box::into_raw(Box::new(ns_engine { engine })) };
                ns_status::Ok
            }
            Err(e) => fail(e),
        }
    })
}

/// Fills `out` with the engine's sizes.
#[no_mangle]
pub unsafe extern "C" fn ns_engine_info_get(
    engine: *const ns_engine,
    out: *mut ns_engine_info,
) -> ns_status {
    guard(|| {
        if engine.is_null() {
            return fail_with(ns_status::NullArgument, "engine is null");
        }
        if let Err(s) = out_ptr(out, "out") {
            return s;
        }
        // SAFETY: checked non-null; a live handle from ns_engine_load.
        let e = unsafe { &(*engine).engine };
        let c = e.config();
        let l = e.layers();
        // SAFETY: checked non-null.
        unsafe {
            *out = ns_engine_info {
                layers: c.num_layers as u32,
                start: l.start as u32,
                end: l.end as u32,
                hidden_size: c.hidden_size as u32,
                vocab_size: c.vocab_size as u32,
                max_positions: e.max_session_len() as u32,
            }
        };
        ns_status::Ok
    })
}

/// Opens session `session` (an empty KV cache) on the engine.
#[no_mangle]
pub unsafe extern "C" fn ns_engine_open_session(
    engine: *const ns_engine,
    session: u64,
) -> ns_status {
    guard(|| match unsafe { engine_ref(engine) } {
        Ok(e) => e.open_session(session).map_or_else(fail, |_| ns_status::Ok),
        Err(s) => s,
    })
}

/// Closes session `session`, freeing its cache.
#[no_mangle]
pub unsafe extern "C" fn ns_engine_close_session(
    engine: *const ns_engine,
    session: u64,
) -> ns_status {
    guard(|| match unsafe { engine_ref(engine) } {
        Ok(e) => e
            .close_session(session)
            .map_or_else(fail, |_| ns_status::Ok),
        Err(s) => s,
    })
}

/// # Safety
/// `engine` is null or a live handle.
unsafe fn engine_ref<'a>(engine: *const ns_engine) -> Result<&'a ShardEngine, ns_status> {
    if engine.is_null() {
        return Err(fail_with(ns_status::NullArgument, "engine is null"));
    }
    // SAFETY: checked non-null; live per the contract.
    Ok(unsafe { &(*engine).engine })
}

/// Runs `input` and writes the output (hidden states `[batch, seq, hidden]`, or logits
/// `[batch, seq, vocab]` on the last slice) into `out` (`out_len` floats).
unsafe fn forward_into(
    engine: *const ns_engine,
    input: Result<ShardInput, neuroshard_core::Error>,
    session: u64,
    position: u32,
    out: *mut f32,
    out_len: usize,
    out_written: *mut usize,
) -> ns_status {
    // SAFETY: forwarded contract.
    let e = match unsafe { engine_ref(engine) } {
        Ok(e) => e,
        Err(s) => return s,
    };
    if let Err(s) = out_ptr(out, "out") {
        return s;
    }
    let input = match input {
        Ok(i) => i,
        Err(err) => return fail(err),
    };
    let mut req = ForwardRequest::new(input);
    if session != 0 {
        req = req.session(session, position as usize);
    } else {
        req.start_pos = position as usize;
    }
    let values = match e.forward(req).and_then(|o| o.to_f32_vec()) {
        Ok((values, _)) => values,
        Err(err) => return fail(err),
    };
    if values.len() > out_len {
        return fail_with(
            ns_status::InvalidArgument,
            format!(
                "output buffer holds {out_len} floats, the output has {}",
                values.len()
            ),
        );
    }
    // SAFETY: `out` holds `out_len` floats (contract) and values.len() <= out_len.
    unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), out, values.len()) };
    if !out_written.is_null() {
        // SAFETY: checked non-null.
        unsafe { *out_written = values.len() };
    }
    ns_status::Ok
}

/// Runs token ids `tokens` (`batch * seq`, row-major; first slice only). `session` 0 runs
/// without a cache; otherwise the session's cache is written at `position..`. The output goes
/// to `out` (`out_len` floats); `out_written` (may be null) receives the count written.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn ns_engine_forward_tokens(
    engine: *const ns_engine,
    tokens: *const u32,
    batch: usize,
    seq: usize,
    session: u64,
    position: u32,
    out: *mut f32,
    out_len: usize,
    out_written: *mut usize,
) -> ns_status {
    guard(|| {
        if tokens.is_null() {
            return fail_with(ns_status::NullArgument, "tokens is null");
        }
        let Some(n) = batch.checked_mul(seq) else {
            return fail_with(ns_status::InvalidArgument, "batch * seq overflows");
        };
        // SAFETY: checked non-null; the caller passes batch * seq ids.
        let ids = unsafe { std::slice::from_raw_parts(tokens, n) };
        let input = ShardInput::tokens_from_slice(ids, batch, seq);
        // SAFETY: forwarded contract.
        unsafe { forward_into(engine, input, session, position, out, out_len, out_written) }
    })
}

/// Runs hidden states `hidden` (`batch * seq * width` floats, row-major; not the first
/// slice). Otherwise as `ns_engine_forward_tokens`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn ns_engine_forward_hidden(
    engine: *const ns_engine,
    hidden: *const f32,
    batch: usize,
    seq: usize,
    width: usize,
    session: u64,
    position: u32,
    out: *mut f32,
    out_len: usize,
    out_written: *mut usize,
) -> ns_status {
    guard(|| {
        if hidden.is_null() {
            return fail_with(ns_status::NullArgument, "hidden is null");
        }
        let Some(n) = batch.checked_mul(seq).and_then(|n| n.checked_mul(width)) else {
            return fail_with(ns_status::InvalidArgument, "batch * seq * width overflows");
        };
        // SAFETY: checked non-null; the caller passes batch * seq * width floats.
        let values = unsafe { std::slice::from_raw_parts(hidden, n) };
        let input = ShardInput::hidden_from_slice(values, batch, seq, width);
        // SAFETY: forwarded contract.
        unsafe { forward_into(engine, input, session, position, out, out_len, out_written) }
    })
}

/// Frees an engine (null is ignored).
#[no_mangle]
pub unsafe extern "C" fn ns_engine_free(engine: *mut ns_engine) {
    if !engine.is_null() {
        // SAFETY: from Box::into_raw in ns_engine_load, freed once.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            drop(unsafe { Box::from_raw(engine) })
        }));
    }
}
