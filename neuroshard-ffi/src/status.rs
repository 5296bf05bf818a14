//! Status codes, the thread-local last error, the panic boundary, strings and `ns_init`.

use neuroshard_core::{Error, ErrorKind};
use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Result of every call. `NS_STATUS_OK` is 0; the others are grouped in ranges: 1-99 bad
/// arguments, 100-199 model files, 200-299 inputs, 300-399 sessions, 400-499 network,
/// 500-599 generation and tokenizer, 900-999 internal failures.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ns_status {
    /// Success.
    Ok = 0,
    /// A required pointer argument was null.
    NullArgument = 1,
    /// An argument is not valid (not UTF-8, out of range, output buffer too small).
    InvalidArgument = 2,
    /// The model file cannot be read.
    ModelFile = 100,
    /// The file is not a model this library reads (unknown format, architecture, dtype).
    UnsupportedModel = 101,
    /// The model file is inconsistent (truncated, missing tensors, wrong shapes, bad config).
    CorruptModel = 102,
    /// The layer slice does not fit the model.
    SliceOutOfRange = 103,
    /// The input does not fit the engine (kind, shape, width, dtype, token ids).
    BadInput = 200,
    /// Unknown, full, duplicate or overlong session, or a gap in its positions.
    Session = 300,
    /// A network or protocol failure (unreachable node, timeout, no route, bad frame).
    Network = 400,
    /// Generation or tokenizer failure (bad sampling parameters, empty prompt, template).
    Generation = 500,
    /// The caller's token callback stopped the generation (not a failure of the library).
    Cancelled = 501,
    /// Training refused.
    Training = 502,
    /// An internal failure (a bug, an exhausted resource, an IO error).
    Internal = 900,
    /// A panic was caught at the API boundary (a bug; the handle may be unusable).
    Panic = 901,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Records `message` as this thread's last error.
pub(crate) fn set_error(message: impl Into<String>) {
    let text = message.into().replace('\0', " ");
    let c = CString::new(text).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// The status of a core error kind.
pub(crate) fn status_of(kind: ErrorKind) -> ns_status {
    use ErrorKind as K;
    match kind {
        K::ModelFile => ns_status::ModelFile,
        K::UnknownFormat | K::UnsupportedArchitecture | K::UnsupportedDtype => {
            ns_status::UnsupportedModel
        }
        K::CorruptModel
        | K::WrongWeights
        | K::InvalidConfig
        | K::MissingTensor
        | K::TensorShape => ns_status::CorruptModel,
        K::SliceOutOfRange => ns_status::SliceOutOfRange,
        K::BadInput | K::HiddenSize | K::HiddenDtype | K::TokenOutOfRange => ns_status::BadInput,
        K::UnknownSession
        | K::SessionsFull
        | K::SessionExists
        | K::SessionTooLong
        | K::PositionGap => ns_status::Session,
        K::Wire | K::Net => ns_status::Network,
        K::Tokenizer | K::Generation => ns_status::Generation,
        K::Training => ns_status::Training,
        _ => ns_status::Internal,
    }
}

/// Records `error` and returns its status.
pub(crate) fn fail(error: Error) -> ns_status {
    set_error(error.to_string());
    status_of(error.kind())
}

/// Records `message` and returns `status`.
pub(crate) fn fail_with(status: ns_status, message: impl Into<String>) -> ns_status {
    set_error(message);
    status
}

/// Runs `body` inside the panic boundary: a panic becomes [`ns_status::Panic`], never an
/// unwind into C.
pub(crate) fn guard(body: impl FnOnce() -> ns_status) -> ns_status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(status) => {
            if status == ns_status::Ok {
                set_error("");
            }
            status
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            fail_with(ns_status::Panic, format!("panic inside neuroshard: {what}"))
        }
    }
}

/// Reads a required C string argument.
pub(crate) unsafe fn arg_str<'a>(ptr: *const c_char, name: &str) -> Result<&'a str, ns_status> {
    if ptr.is_null() {
        return Err(fail_with(
            ns_status::NullArgument,
            format!("{name} is null"),
        ));
    }
    // SAFETY: checked non-null; the caller passes a NUL-terminated string (header contract).
    unsafe { CStr::from_ptr(ptr) }
        .to_str()
        .map_err(|_| fail_with(ns_status::InvalidArgument, format!("{name} is not UTF-8")))
}

/// Reads an array of `n` C strings.
pub(crate) unsafe fn arg_strs(
    ptr: *const *const c_char,
    n: usize,
    name: &str,
) -> Result<Vec<String>, ns_status> {
    if n == 0 {
        return Ok(Vec::new());
    }
    if ptr.is_null() {
        return Err(fail_with(
            ns_status::NullArgument,
            format!("{name} is null"),
        ));
    }
    // SAFETY: checked non-null; the caller passes `n` pointers (header contract).
    let items = unsafe { std::slice::from_raw_parts(ptr, n) };
    items
        .iter()
        .enumerate()
        // SAFETY: each element is a NUL-terminated string or null (checked by arg_str).
        .map(|(i, p)| unsafe { arg_str(*p, &format!("{name}[{i}]")) }.map(String::from))
        .collect()
}

/// Checks that an out-parameter is not null.
pub(crate) fn out_ptr<T>(ptr: *mut T, name: &str) -> Result<(), ns_status> {
    if ptr.is_null() {
        Err(fail_with(
            ns_status::NullArgument,
            format!("{name} is null"),
        ))
    } else {
        Ok(())
    }
}

/// A library-owned copy of `s` for the caller (free with [`ns_string_free`]).
pub(crate) fn owned_string(s: &str) -> *mut c_char {
    CString::new(s.replace('\0', " "))
        .unwrap_or_default()
        .into_raw()
}

/// The message of the last failed call on this thread ("" after a success). The pointer stays
/// valid until the next call on this thread; do not free it.
#[no_mangle]
pub extern "C" fn ns_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The library version, a static string (do not free it).
#[no_mangle]
pub extern "C" fn ns_version() -> *const c_char {
    static VERSION: &CStr =
        match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(v) => v,
            Err(_) => c"unknown",
        };
    VERSION.as_ptr()
}

/// Frees a string returned by the library (null is ignored).
#[no_mangle]
pub unsafe extern "C" fn ns_string_free(s: *mut c_char) {
    if !s.is_null() {
        // SAFETY: `s` came from `owned_string` (CString::into_raw) and is freed once.
        drop(unsafe { CString::from_raw(s) });
    }
}

/// Fixes the process's compute thread count (0: `RAYON_NUM_THREADS`, else the idle cores).
/// Call it once at start-up, before starting threads: it may set `RAYON_NUM_THREADS` and
/// `CANDLE_NUM_THREADS`. Later calls return the first call's count in `out_threads`
/// (which may be null).
#[no_mangle]
pub unsafe extern "C" fn ns_init(threads: u32, out_threads: *mut u32) -> ns_status {
    guard(|| {
        let info = neuroshard_core::runtime::init(&neuroshard_core::runtime::RuntimeConfig {
            threads: (threads > 0).then_some(threads as usize),
            watch_busy_cores: false,
        });
        if !out_threads.is_null() {
            // SAFETY: checked non-null; points to a u32 (header contract).
            unsafe { *out_threads = info.threads as u32 };
        }
        ns_status::Ok
    })
}
