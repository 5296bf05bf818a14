//! Wire format: versioned frames carrying one tensor each (hidden states, gradients) with
//! zero-copy f32/f16/bf16 payloads and blockwise q8/q4 activation compression.
//!
//! The byte layout is specified in `docs/wire.md`. Everything a peer sends is untrusted: every
//! malformed frame decodes to a typed [`WireError`], and no decode path allocates more than
//! the caller's maximum frame size.
//!
//! - [`header`]: the fixed header and its validation;
//! - [`codec`]: raw and quantised payload encodings;
//! - [`frame`]: encoding tensors into frames and decoding frames (borrowed, zero-copy);
//! - [`io`]: async framing over any tokio `AsyncRead` / `AsyncWrite` (iroh streams included).

// Raw payloads are viewed in place as little-endian elements.
#[cfg(target_endian = "big")]
compile_error!("the wire format's zero-copy views assume a little-endian host");

pub mod codec;
pub mod frame;
pub mod header;
pub mod io;

pub use codec::Codec;
pub use frame::{decode_frame, encode_frame, encode_slice, Frame, FrameMeta, OwnedFrame};
pub use header::{FrameHeader, WireDtype, FLAG_CHECKSUM, MAGIC, MAX_RANK, VERSION};
pub use io::{read_frame, read_frame_or_eof, write_frame, DEFAULT_MAX_FRAME};

/// Everything that can be wrong with a frame.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The frame does not start with [`MAGIC`].
    #[error("bad magic {0:02x?}: not a NeuroShard frame")]
    BadMagic([u8; 4]),
    /// The format version is not one this build reads.
    #[error("unsupported frame version {0} (this build reads version {VERSION})")]
    UnsupportedVersion(u8),
    /// Unknown codec byte.
    #[error("unknown codec {0}")]
    UnknownCodec(u8),
    /// Unknown dtype byte.
    #[error("unknown dtype {0}")]
    UnknownDtype(u8),
    /// Flags this version does not define are set.
    #[error("unknown flags {0:#04x}")]
    UnknownFlags(u8),
    /// More dimensions than [`MAX_RANK`].
    #[error("rank {0} exceeds the maximum of {MAX_RANK}")]
    RankTooLarge(u8),
    /// The payload length disagrees with what the dims and codec imply.
    #[error("payload of {actual} bytes, but dims {dims:?} with codec {codec:?} need {expected}")]
    ShapeMismatch {
        /// The dims in the header.
        dims: Vec<usize>,
        /// The codec in the header.
        codec: Codec,
        /// Bytes the dims imply.
        expected: u64,
        /// Bytes the header declares.
        actual: u64,
    },
    /// The element count or byte size overflows.
    #[error("length overflow: dims {0:?} are too large")]
    LengthOverflow(Vec<u64>),
    /// The frame is larger than the receiver accepts.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    Oversize {
        /// Declared frame size.
        len: u64,
        /// The receiver's limit.
        max: u64,
    },
    /// The payload's checksum does not match the header's.
    #[error("checksum mismatch: header {expected:#018x}, payload {actual:#018x}")]
    ChecksumMismatch {
        /// Checksum in the header.
        expected: u64,
        /// Checksum of the received payload.
        actual: u64,
    },
    /// The buffer or stream ended before the frame did.
    #[error("truncated frame: need {needed} bytes, have {available}")]
    Truncated {
        /// Bytes the frame needs.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// Quantised codecs carry only finite values whose block scale fits an f16.
    #[error("value {0} cannot be quantised (NaN, infinite, or beyond the f16 scale range)")]
    Unquantisable(f32),
    /// The tensor cannot be framed (only f32, f16 and bf16 CPU tensors can) or turned back
    /// into a tensor.
    #[error("tensor: {0}")]
    Tensor(String),
    /// The underlying stream failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Result alias for the wire module.
pub type WireResult<T> = std::result::Result<T, WireError>;

impl From<candle_core::Error> for WireError {
    fn from(e: candle_core::Error) -> Self {
        WireError::Tensor(e.to_string())
    }
}
