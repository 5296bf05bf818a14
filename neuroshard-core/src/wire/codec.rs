//! Payload encodings.
//!
//! Raw codecs (`F32`, `F16`, `Bf16`) are the little-endian element bytes. Quantised codecs cut
//! blocks of 32 values (the last one zero-padded), each with an f16 scale `d`:
//!
//! - `Q8`: 2-byte scale + 32 × i8, value = q · d, q ∈ [-127, 127] (34 bytes per block);
//! - `Q4`: 2-byte scale + 16 bytes of nibbles, value = (n - 8) · d, n - 8 ∈ [-7, 7]
//!   (18 bytes per block, 0.28× the f16 payload). Byte j holds value j in its low nibble and
//!   value j + 16 in its high nibble.
//!
//! The scale is rounded *up* to the next f16 if needed so that no value has to be clamped: the
//! error of every value is then at most half a quantisation step, `d / 2`, of its block.

use super::header::WireDtype;
use super::{WireError, WireResult};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// Values per quantisation block.
pub const BLOCK: usize = 32;

/// How a payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum Codec {
    /// Raw IEEE binary32.
    F32 = 0,
    /// Raw IEEE binary16.
    F16 = 1,
    /// Raw bfloat16.
    Bf16 = 2,
    /// Blockwise 8-bit, f16 scale per 32 values.
    Q8 = 3,
    /// Blockwise 4-bit, f16 scale per 32 values.
    Q4 = 4,
}

impl std::str::FromStr for Codec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Codec::F32),
            "f16" => Ok(Codec::F16),
            "bf16" => Ok(Codec::Bf16),
            "q8" => Ok(Codec::Q8),
            "q4" => Ok(Codec::Q4),
            other => Err(format!("unknown codec `{other}` (f32, f16, bf16, q8, q4)")),
        }
    }
}

impl Codec {
    /// Every codec.
    pub const ALL: [Codec; 5] = [Codec::F32, Codec::F16, Codec::Bf16, Codec::Q8, Codec::Q4];

    /// Parses the codec byte.
    pub fn from_u8(b: u8) -> WireResult<Self> {
        Codec::ALL
            .into_iter()
            .find(|c| *c as u8 == b)
            .ok_or(WireError::UnknownCodec(b))
    }

    /// The raw element type, for raw codecs.
    pub fn raw_dtype(self) -> Option<WireDtype> {
        match self {
            Codec::F32 => Some(WireDtype::F32),
            Codec::F16 => Some(WireDtype::F16),
            Codec::Bf16 => Some(WireDtype::Bf16),
            Codec::Q8 | Codec::Q4 => None,
        }
    }

    /// Bytes per block, for quantised codecs.
    pub fn block_bytes(self) -> Option<usize> {
        match self {
            Codec::Q8 => Some(2 + BLOCK),
            Codec::Q4 => Some(2 + BLOCK / 2),
            _ => None,
        }
    }

    /// Payload bytes for `elems` values (`None` on overflow). The decoded dtype does not
    /// change the payload size; it is part of the signature so callers state what they send.
    pub fn payload_len(self, elems: u64, _dtype: WireDtype) -> Option<u64> {
        match (self.raw_dtype(), self.block_bytes()) {
            (Some(d), _) => elems.checked_mul(d.size() as u64),
            (None, Some(bb)) => elems.div_ceil(BLOCK as u64).checked_mul(bb as u64),
            (None, None) => None,
        }
    }
}

/// The smallest f16 scale `d` with `d · qmax >= amax`.
fn block_scale(amax: f32, qmax: f32) -> WireResult<f16> {
    if !amax.is_finite() {
        return Err(WireError::Unquantisable(amax));
    }
    if amax == 0.0 {
        return Ok(f16::ZERO);
    }
    let mut d = f16::from_f32(amax / qmax);
    while d.to_f32() * qmax < amax {
        // Positive finite f16: the next representable value up is the next bit pattern.
        d = f16::from_bits(d.to_bits() + 1);
    }
    if !d.is_finite() {
        return Err(WireError::Unquantisable(amax));
    }
    Ok(d)
}

/// Appends the quantised encoding of `values` to `out`.
pub fn quantize(codec: Codec, values: &[f32], out: &mut Vec<u8>) -> WireResult<()> {
    let qmax = match codec {
        Codec::Q8 => 127.0,
        Codec::Q4 => 7.0,
        _ => return Err(WireError::UnknownCodec(codec as u8)),
    };
    let mut block = [0f32; BLOCK];
    for chunk in values.chunks(BLOCK) {
        block[..chunk.len()].copy_from_slice(chunk);
        block[chunk.len()..].fill(0.0);
        // max |v| as an integer max over the sign-cleared bit patterns: for non-negative floats
        // the bit order is the value order, and the integer reduction vectorises (a float max
        // does not without reassociation). Patterns >= 0x7f80_0000 are infinities and NaNs.
        let amax_bits = block
            .iter()
            .fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff));
        if amax_bits >= 0x7f80_0000 {
            let bad = block
                .iter()
                .copied()
                .find(|v| !v.is_finite())
                .unwrap_or(f32::NAN);
            return Err(WireError::Unquantisable(bad));
        }
        let amax = f32::from_bits(amax_bits);
        let d = block_scale(amax, qmax)?;
        let inv = if amax == 0.0 { 0.0 } else { 1.0 / d.to_f32() };
        out.extend_from_slice(&d.to_le_bytes());
        // Round half away from zero without a libm call (`f32::round` is not inlined on
        // baseline x86-64): add ±0.5 and truncate. |v · inv| <= qmax by construction of d; the
        // clamp only guards float rounding (and keeps the float-to-int conversion in range).
        let q = |v: f32| {
            let r = (v * inv).clamp(-qmax, qmax);
            (r + 0.5f32.copysign(r)) as i32 as i8
        };
        // Fill a fixed block first: one bounds-free loop, then one append.
        match codec {
            Codec::Q8 => {
                let mut qs = [0u8; BLOCK];
                for (dst, &v) in qs.iter_mut().zip(&block) {
                    *dst = q(v) as u8;
                }
                out.extend_from_slice(&qs);
            }
            _ => {
                let mut qs = [0u8; BLOCK / 2];
                for (j, dst) in qs.iter_mut().enumerate() {
                    let lo = (q(block[j]) + 8) as u8;
                    let hi = (q(block[j + BLOCK / 2]) + 8) as u8;
                    *dst = lo | (hi << 4);
                }
                out.extend_from_slice(&qs);
            }
        }
    }
    Ok(())
}

/// Decodes `elems` values of a quantised payload (length already validated) into f32.
pub fn dequantize(codec: Codec, payload: &[u8], elems: usize) -> WireResult<Vec<f32>> {
    let bb = codec
        .block_bytes()
        .ok_or(WireError::UnknownCodec(codec as u8))?;
    let mut out = Vec::with_capacity(elems.div_ceil(BLOCK) * BLOCK);
    for blk in payload.chunks_exact(bb) {
        let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        match codec {
            Codec::Q8 => out.extend(blk[2..].iter().map(|&q| q as i8 as f32 * d)),
            _ => {
                let qs = &blk[2..];
                let start = out.len();
                out.resize(start + BLOCK, 0.0);
                for (j, &b) in qs.iter().enumerate() {
                    out[start + j] = ((b & 0x0F) as i32 - 8) as f32 * d;
                    out[start + j + BLOCK / 2] = ((b >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
    }
    out.truncate(elems);
    Ok(out)
}

/// Converts f32 values to the raw bytes of `dtype`, appended to `out`.
///
/// Uses `half`'s slice conversions, which pick F16C instructions at run time where available.
pub fn encode_raw_f32(values: &[f32], dtype: WireDtype, out: &mut Vec<u8>) {
    let start = out.len();
    match dtype {
        WireDtype::F32 => out.extend_from_slice(bytemuck::cast_slice(values)),
        WireDtype::F16 => {
            let mut tmp = vec![f16::ZERO; values.len()];
            tmp.convert_from_f32_slice(values);
            out.extend_from_slice(bytemuck::cast_slice(&tmp));
        }
        WireDtype::Bf16 => {
            let mut tmp = vec![bf16::ZERO; values.len()];
            tmp.convert_from_f32_slice(values);
            out.extend_from_slice(bytemuck::cast_slice(&tmp));
        }
    }
    debug_assert_eq!(out.len() - start, values.len() * dtype.size());
}

/// Decodes a raw payload of `from` elements into f32 values (borrowing the payload in place
/// when it is aligned, copying it otherwise).
pub fn decode_raw_to_f32(payload: &[u8], from: WireDtype) -> Vec<f32> {
    fn view<T: bytemuck::Pod>(payload: &[u8]) -> std::borrow::Cow<'_, [T]> {
        match bytemuck::try_cast_slice(payload) {
            Ok(v) => std::borrow::Cow::Borrowed(v),
            Err(_) => std::borrow::Cow::Owned(bytemuck::pod_collect_to_vec(payload)),
        }
    }
    match from {
        WireDtype::F32 => bytemuck::pod_collect_to_vec(payload),
        WireDtype::F16 => {
            let src = view::<f16>(payload);
            let mut out = vec![0f32; src.len()];
            src.convert_to_f32_slice(&mut out);
            out
        }
        WireDtype::Bf16 => {
            let src = view::<bf16>(payload);
            let mut out = vec![0f32; src.len()];
            src.convert_to_f32_slice(&mut out);
            out
        }
    }
}
