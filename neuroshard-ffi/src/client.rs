//! `ns_client_*`: generation over a swarm with a streaming callback.

use crate::status::{arg_str, arg_strs, fail, fail_with, guard, ns_status, out_ptr, owned_string};
use neuroshard_core::blocking::{self, StreamEvent};
use neuroshard_core::{FinishReason, SamplingParams, SwarmOptions, TextRequest};
use std::ffi::{c_char, c_void, CString};
use std::time::Duration;

/// A client of one swarm (opaque; free with `ns_client_free`).
pub struct ns_client {
    client: blocking::Client,
}

/// Sampling and stopping for `ns_client_generate`. Zero-initialised fields mean: greedy,
/// no top-k/top-p, seed 0, no chat template. `max_tokens` 0 means 128.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ns_generate_params {
    /// Most tokens to generate (0: 128).
    pub max_tokens: u32,
    /// Sampling temperature (0: greedy).
    pub temperature: f32,
    /// Nucleus threshold (0 or 1: off).
    pub top_p: f32,
    /// Keep only the K most likely tokens (0: off).
    pub top_k: u32,
    /// Seed of the sampler.
    pub seed: u64,
    /// Non-zero: wrap the prompt in the model's chat template.
    pub chat: u32,
    /// Non-zero: keep going through end-of-sequence tokens.
    pub ignore_eos: u32,
}

/// Called with each printable piece (NUL-terminated UTF-8, valid during the call) and the
/// caller's `user_data`; a non-zero return stops the generation (`NS_STATUS_CANCELLED`).
pub type ns_token_callback =
    Option<unsafe extern "C" fn(piece: *const c_char, user_data: *mut c_void) -> i32>;

/// Connects to a swarm through the first of `peers` (`n_peers` address lines,
/// `<id>@<ip:port>` or plain `host:port`) that serves the model info.
#[no_mangle]
pub unsafe extern "C" fn ns_client_connect(
    peers: *const *const c_char,
    n_peers: usize,
    out: *mut *mut ns_client,
) -> ns_status {
    guard(|| {
        // SAFETY: arg_strs checks for null.
        let peers = match unsafe { arg_strs(peers, n_peers, "peers") } {
            Ok(p) => p,
            Err(s) => return s,
        };
        if peers.is_empty() {
            return fail_with(ns_status::InvalidArgument, "pass at least one peer address");
        }
        if let Err(s) = out_ptr(out, "out") {
            return s;
        }
        match blocking::Client::connect(&peers, SwarmOptions::default()) {
            Ok(client) => {
                // SAFETY: checked non-null.
                unsafe { *out = Box::into_raw(Box::new(ns_client { client })) };
                ns_status::Ok
            }
            Err(e) => fail(e),
        }
    })
}

/// Generates a continuation of `prompt`. Each printable piece goes to `callback` (may be
/// null) on the calling thread as it arrives; the whole text goes to `out_text` (may be null;
/// free it with `ns_string_free`). `params` may be null (defaults).
#[no_mangle]
pub unsafe extern "C" fn ns_client_generate(
    client: *const ns_client,
    prompt: *const c_char,
    params: *const ns_generate_params,
    callback: ns_token_callback,
    user_data: *mut c_void,
    out_text: *mut *mut c_char,
) -> ns_status {
    guard(|| {
        if client.is_null() {
            return fail_with(ns_status::NullArgument, "client is null");
        }
        // SAFETY: arg_str checks for null.
        let prompt = match unsafe { arg_str(prompt, "prompt") } {
            Ok(p) => p,
            Err(s) => return s,
        };
        let p = if params.is_null() {
            ns_generate_params::default()
        } else {
            // SAFETY: checked non-null; points to an ns_generate_params.
            unsafe { *params }
        };
        let request = TextRequest {
            max_tokens: if p.max_tokens == 0 {
                128
            } else {
                p.max_tokens as usize
            },
            sampling: SamplingParams {
                temperature: p.temperature,
                top_k: p.top_k as usize,
                top_p: if p.top_p <= 0.0 { 1.0 } else { p.top_p },
                repetition_penalty: 1.0,
                seed: p.seed,
            },
            chat: p.chat != 0,
            ignore_eos: p.ignore_eos != 0,
            ..TextRequest::default()
        };
        // SAFETY: checked non-null; a live handle.
        let client = unsafe { &(*client).client };
        let mut stream = match client.stream(prompt, &request) {
            Ok(s) => s,
            Err(e) => return fail(e),
        };
        let mut stopped = false;
        loop {
            match stream.next_timeout(Duration::from_secs(3600)) {
                None if stream.ended() => break,
                None => continue,
                Some(StreamEvent::Piece(piece)) => {
                    if let Some(cb) = callback {
                        let c = CString::new(piece.replace('\0', " ")).unwrap_or_default();
                        // SAFETY: the caller's callback, with a valid C string and its data.
                        if !stopped && unsafe { cb(c.as_ptr(), user_data) } != 0 {
                            stopped = true;
                            stream.cancel();
                        }
                    }
                }
                Some(StreamEvent::Done(result)) => {
                    return match *result {
                        Ok(out) => {
                            if !out_text.is_null() {
                                // SAFETY: checked non-null.
                                unsafe { *out_text = owned_string(&out.output.text) };
                            }
                            if stopped || out.output.finish == FinishReason::Cancelled {
                                fail_with(
                                    ns_status::Cancelled,
                                    "the token callback stopped the generation",
                                )
                            } else {
                                ns_status::Ok
                            }
                        }
                        Err(e) => fail(e),
                    };
                }
            }
        }
        fail_with(ns_status::Internal, "the generation ended without a result")
    })
}

/// Closes and frees a client (null is ignored).
#[no_mangle]
pub unsafe extern "C" fn ns_client_free(client: *mut ns_client) {
    if !client.is_null() {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // SAFETY: from Box::into_raw in ns_client_connect, freed once.
            let client = unsafe { Box::from_raw(client) };
            let _ = client.client.close();
        }));
    }
}
