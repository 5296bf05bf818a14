//! The frame header: a compact little-endian prefix describing the payload.
//!
//! ```text
//! offset  size     field
//!  0      4        magic "NSWF"
//!  4      1        version (1)
//!  5      1        codec   (0 f32, 1 f16, 2 bf16, 3 q8, 4 q4)
//!  6      1        dtype   (0 f32, 1 f16, 2 bf16): what the payload decodes to
//!  7      1        flags   (bit 0: payload checksum present)
//!  8      1        rank    (0..=8)
//!  9      3        reserved, zero
//! 12      8        session id (u64)
//! 20      4        position / step (u32)
//! 24      8        payload length in bytes (u64)
//! 32      4*rank   dims (u32 each)
//!  ..     8        xxh3-64 of the payload, if flag bit 0
//! ```
//!
//! The header length is always a multiple of 4, so an f32 payload in a buffer aligned to 4
//! can be viewed in place.

use super::codec::Codec;
use super::{WireError, WireResult};

/// First four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"NSWF";
/// The format version this build writes and reads.
pub const VERSION: u8 = 1;
/// Most dimensions a frame can describe.
pub const MAX_RANK: usize = 8;
/// Flag bit: an xxh3-64 checksum of the payload follows the dims.
pub const FLAG_CHECKSUM: u8 = 1;
/// Bytes before the dims.
pub const FIXED_LEN: usize = 32;

/// The logical element type of a frame's tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum WireDtype {
    /// IEEE binary32.
    F32 = 0,
    /// IEEE binary16.
    F16 = 1,
    /// bfloat16.
    Bf16 = 2,
}

impl WireDtype {
    /// Parses the dtype byte.
    pub fn from_u8(b: u8) -> WireResult<Self> {
        match b {
            0 => Ok(WireDtype::F32),
            1 => Ok(WireDtype::F16),
            2 => Ok(WireDtype::Bf16),
            other => Err(WireError::UnknownDtype(other)),
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            WireDtype::F32 => 4,
            WireDtype::F16 | WireDtype::Bf16 => 2,
        }
    }

    /// The matching candle dtype.
    pub fn to_candle(self) -> candle_core::DType {
        match self {
            WireDtype::F32 => candle_core::DType::F32,
            WireDtype::F16 => candle_core::DType::F16,
            WireDtype::Bf16 => candle_core::DType::BF16,
        }
    }

    /// The wire dtype of a candle dtype, if it can be sent.
    pub fn from_candle(d: candle_core::DType) -> WireResult<Self> {
        match d {
            candle_core::DType::F32 => Ok(WireDtype::F32),
            candle_core::DType::F16 => Ok(WireDtype::F16),
            candle_core::DType::BF16 => Ok(WireDtype::Bf16),
            other => Err(WireError::Tensor(format!(
                "cannot send a tensor of dtype {other:?}"
            ))),
        }
    }
}

/// A parsed and validated frame header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameHeader {
    /// How the payload is encoded.
    pub codec: Codec,
    /// What the payload decodes to.
    pub dtype: WireDtype,
    /// Tensor shape (empty for a scalar).
    pub dims: Vec<usize>,
    /// Session the frame belongs to.
    pub session: u64,
    /// Position (inference) or step (training) the frame carries.
    pub position: u32,
    /// Payload bytes following the header.
    pub payload_len: u64,
    /// xxh3-64 of the payload, when present.
    pub checksum: Option<u64>,
}

impl FrameHeader {
    /// Bytes the header occupies on the wire.
    pub fn encoded_len(&self) -> usize {
        header_len(self.dims.len(), self.checksum.is_some())
    }

    /// Elements in the tensor.
    pub fn elem_count(&self) -> usize {
        self.dims.iter().product()
    }

    /// Appends the header bytes to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(self.codec as u8);
        out.push(self.dtype as u8);
        out.push(if self.checksum.is_some() {
            FLAG_CHECKSUM
        } else {
            0
        });
        out.push(self.dims.len() as u8);
        out.extend_from_slice(&[0, 0, 0]);
        out.extend_from_slice(&self.session.to_le_bytes());
        out.extend_from_slice(&self.position.to_le_bytes());
        out.extend_from_slice(&self.payload_len.to_le_bytes());
        for &d in &self.dims {
            out.extend_from_slice(&(d as u32).to_le_bytes());
        }
        if let Some(c) = self.checksum {
            out.extend_from_slice(&c.to_le_bytes());
        }
    }

    /// The header as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.write_to(&mut out);
        out
    }
}

/// Header length for a rank and checksum flag.
pub fn header_len(rank: usize, checksum: bool) -> usize {
    FIXED_LEN + 4 * rank + if checksum { 8 } else { 0 }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// What the fixed part of a header says about the rest of it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Prefix {
    pub(crate) codec: Codec,
    pub(crate) dtype: WireDtype,
    pub(crate) rank: usize,
    pub(crate) checksum: bool,
    pub(crate) session: u64,
    pub(crate) position: u32,
    pub(crate) payload_len: u64,
}

impl Prefix {
    /// Total header length (fixed part + dims + checksum).
    pub(crate) fn header_len(&self) -> usize {
        header_len(self.rank, self.checksum)
    }
}

/// Parses and validates the fixed 32-byte part of a header.
pub(crate) fn parse_prefix(b: &[u8]) -> WireResult<Prefix> {
    if b.len() < FIXED_LEN {
        return Err(WireError::Truncated {
            needed: FIXED_LEN as u64,
            available: b.len() as u64,
        });
    }
    let magic = [b[0], b[1], b[2], b[3]];
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    if b[4] != VERSION {
        return Err(WireError::UnsupportedVersion(b[4]));
    }
    let codec = Codec::from_u8(b[5])?;
    let dtype = WireDtype::from_u8(b[6])?;
    if b[7] & !FLAG_CHECKSUM != 0 {
        return Err(WireError::UnknownFlags(b[7]));
    }
    if b[8] as usize > MAX_RANK {
        return Err(WireError::RankTooLarge(b[8]));
    }
    Ok(Prefix {
        codec,
        dtype,
        rank: b[8] as usize,
        checksum: b[7] & FLAG_CHECKSUM != 0,
        session: u64_at(b, 12),
        position: u32_at(b, 20),
        payload_len: u64_at(b, 24),
    })
}

/// Parses the full header from `b` (which holds at least `prefix.header_len()` bytes) and
/// checks the payload length against the dims.
pub(crate) fn parse_rest(prefix: Prefix, b: &[u8]) -> WireResult<FrameHeader> {
    let need = prefix.header_len();
    if b.len() < need {
        return Err(WireError::Truncated {
            needed: need as u64,
            available: b.len() as u64,
        });
    }
    // One pass, one allocation: dims as usize with the element count checked for overflow.
    let mut dims = Vec::with_capacity(prefix.rank);
    let mut elems = 1u64;
    let mut overflow = false;
    for i in 0..prefix.rank {
        let d = u32_at(b, FIXED_LEN + 4 * i);
        dims.push(d as usize);
        match elems.checked_mul(u64::from(d)) {
            Some(e) => elems = e,
            None => overflow = true,
        }
    }
    let overflowed =
        |dims: &[usize]| WireError::LengthOverflow(dims.iter().map(|&d| d as u64).collect());
    if overflow || usize::try_from(elems).is_err() {
        return Err(overflowed(&dims));
    }
    let expected = prefix
        .codec
        .payload_len(elems, prefix.dtype)
        .ok_or_else(|| overflowed(&dims))?;
    if expected != prefix.payload_len {
        return Err(WireError::ShapeMismatch {
            dims,
            codec: prefix.codec,
            expected,
            actual: prefix.payload_len,
        });
    }
    let checksum = prefix
        .checksum
        .then(|| u64_at(b, FIXED_LEN + 4 * prefix.rank));
    Ok(FrameHeader {
        codec: prefix.codec,
        dtype: prefix.dtype,
        dims,
        session: prefix.session,
        position: prefix.position,
        payload_len: prefix.payload_len,
        checksum,
    })
}
