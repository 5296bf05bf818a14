//! `ns_client_*`: generation over a swarm with a streaming callback.

use crate::status::{arg_str, arg_strs, fail, fail_with, guard, ns_status, out_ptr, owned_string};
use neuroshard_core::blocking::{self, StreamEvent};
use neuroshard_core::consensus::TrustState;
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

/// How `ns_client_connect_with` connects. Zero-initialised fields mean the defaults.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ns_client_options {
    /// Replicas per range (0 or 1: one node per range). With 2 or more, every range runs on
    /// that many nodes, each receiver votes on their outputs, and the client votes on the
    /// last range's logits (docs/trust.md).
    pub redundancy: u32,
    /// How long one step may take, in milliseconds (0: 30,000).
    pub step_timeout_ms: u32,
}

/// Connects to a swarm through the first of `peers` (`n_peers` address lines,
/// `<id>@<ip:port>` or plain `host:port`) that serves the model info.
#[no_mangle]
pub unsafe extern "C" fn ns_client_connect(
    peers: *const *const c_char,
    n_peers: usize,
    out: *mut *mut ns_client,
) -> ns_status {
    // SAFETY: the caller's arguments, passed on unchanged.
    unsafe { ns_client_connect_with(peers, n_peers, std::ptr::null(), out) }
}

/// `ns_client_connect` with `options` (may be null: the defaults).
#[no_mangle]
pub unsafe extern "C" fn ns_client_connect_with(
    peers: *const *const c_char,
    n_peers: usize,
    options: *const ns_client_options,
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
        let o = if options.is_null() {
            ns_client_options::default()
        } else {
            // SAFETY: checked non-null; points to an ns_client_options.
            unsafe { *options }
        };
        let defaults = SwarmOptions::default();
        let swarm_options = SwarmOptions {
            redundancy: o.redundancy.max(1) as usize,
            step_timeout: match o.step_timeout_ms {
                0 => defaults.step_timeout,
                ms => Duration::from_millis(ms as u64),
            },
            ..defaults
        };
        match blocking::Client::connect(&peers, swarm_options) {
            Ok(client) => {
                // SAFETY: checked non-null.
                unsafe { *out = Box::into_raw(Box::new(ns_client { client })) };
                ns_status::Ok
            }
            Err(e) => fail(e),
        }
    })
}

/// A node's place in a client's trust order.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ns_trust_state {
    /// New or back from a ban: always replicated, at most one per vote once trust exists.
    Probation = 0,
    /// Earned (20 agreed votes) or pinned.
    Trusted = 1,
    /// Left out of routes (evidence, a proof, or timeouts).
    Banned = 2,
}

/// One row of a client's reputation table (`ns_client_trust_table`).
#[repr(C)]
#[derive(Debug)]
pub struct ns_trust_row {
    /// The node id (hex, NUL-terminated).
    pub node: *mut c_char,
    /// Its state now.
    pub state: ns_trust_state,
    /// Its score (routes need at least 0).
    pub score: f64,
    /// Votes it agreed with.
    pub agreed: u64,
    /// Deviations shown by evidence.
    pub deviations: u32,
    /// Consecutive timeouts.
    pub timeouts: u32,
    /// Non-zero: trusted by the operator.
    pub pinned: u32,
    /// Banned until this time (Unix ms; `UINT64_MAX` for good, 0 for not banned).
    pub banned_until_ms: u64,
    /// Why the state last changed (NUL-terminated).
    pub reason: *mut c_char,
}

/// This client's reputation table (what its replicated sessions' votes and the evidence it
/// checked showed): `*out_len` rows at `*out_rows`, by node id. Free them with
/// `ns_trust_table_free`.
#[no_mangle]
pub unsafe extern "C" fn ns_client_trust_table(
    client: *const ns_client,
    out_rows: *mut *mut ns_trust_row,
    out_len: *mut usize,
) -> ns_status {
    guard(|| {
        if client.is_null() {
            return fail_with(ns_status::NullArgument, "client is null");
        }
        if let Err(s) = out_ptr(out_rows, "out_rows").and_then(|_| out_ptr(out_len, "out_len")) {
            return s;
        }
        // SAFETY: checked non-null; a live handle.
        let client = unsafe { &(*client).client };
        let rows: Vec<ns_trust_row> = client
            .swarm_session()
            .client()
            .trust_table()
            .iter()
            .map(|r| ns_trust_row {
                node: owned_string(&r.node),
                state: match r.state {
                    TrustState::Probation => ns_trust_state::Probation,
                    TrustState::Trusted => ns_trust_state::Trusted,
                    TrustState::Banned => ns_trust_state::Banned,
                },
                score: r.standing.score,
                agreed: r.standing.agreed,
                deviations: r.standing.deviations,
                timeouts: r.standing.timeouts,
                pinned: r.standing.pinned as u32,
                banned_until_ms: r.standing.banned_until_ms,
                reason: owned_string(&r.standing.reason),
            })
            .collect();
        let rows = rows.into_boxed_slice();
        // SAFETY: both checked non-null.
        unsafe {
            *out_len = rows.len();
            *out_rows = Box::into_raw(rows) as *mut ns_trust_row;
        }
        ns_status::Ok
    })
}

/// Frees the rows `ns_client_trust_table` returned (`rows` null is ignored).
#[no_mangle]
pub unsafe extern "C" fn ns_trust_table_free(rows: *mut ns_trust_row, len: usize) {
    if rows.is_null() {
        return;
    }
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: from Box::into_raw of a boxed slice of `len` rows, freed once.
        let rows = unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(rows, len)) };
        for row in rows.iter() {
            // SAFETY: both strings came from owned_string.
            unsafe {
                crate::status::ns_string_free(row.node);
                crate::status::ns_string_free(row.reason);
            }
        }
    }));
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
