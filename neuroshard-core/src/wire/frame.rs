//! Frames in memory: encode a tensor (or f32 slice) into header + payload, decode a buffer into a
//! borrowed [`Frame`] whose raw payload is viewed in place.

use super::codec::{decode_raw_to_f32, dequantize, encode_raw_f32, quantize, Codec};
use super::header::{parse_prefix, parse_rest, FrameHeader, WireDtype, FIXED_LEN};
use super::{WireError, WireResult};
use candle_core::{CpuStorage, Device, Storage, Tensor};
use half::{bf16, f16};
use std::borrow::Cow;

/// Per-frame addressing carried in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FrameMeta {
    /// Session the frame belongs to.
    pub session: u64,
    /// Position (inference) or step (training).
    pub position: u32,
}

/// xxh3-64 of a payload (the optional frame checksum).
pub fn checksum(payload: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(payload)
}

/// Calls `f` with the tensor's dtype and its contiguous element bytes, borrowed from candle's
/// storage (no copy) when the tensor is contiguous.
pub(crate) fn with_tensor_bytes<T>(
    t: &Tensor,
    f: impl FnOnce(WireDtype, &[u8]) -> T,
) -> WireResult<T> {
    let dtype = WireDtype::from_candle(t.dtype())?;
    let t = if t.is_contiguous() {
        Cow::Borrowed(t)
    } else {
        Cow::Owned(t.contiguous()?)
    };
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| WireError::Tensor("non-contiguous layout".into()))?;
    let bytes: &[u8] = match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => bytemuck::cast_slice(&v[start..end]),
        Storage::Cpu(CpuStorage::F16(v)) => bytemuck::cast_slice(&v[start..end]),
        Storage::Cpu(CpuStorage::BF16(v)) => bytemuck::cast_slice(&v[start..end]),
        _ => return Err(WireError::Tensor("non-CPU or non-float storage".into())),
    };
    Ok(f(dtype, bytes))
}

/// The header a tensor of `dims` gets with `codec`.
fn header_for(
    dims: &[usize],
    dtype: WireDtype,
    codec: Codec,
    meta: FrameMeta,
    payload_len: u64,
) -> WireResult<FrameHeader> {
    if dims.len() > super::MAX_RANK {
        return Err(WireError::RankTooLarge(dims.len().min(255) as u8));
    }
    if dims.iter().any(|&d| d > u32::MAX as usize) {
        return Err(WireError::LengthOverflow(
            dims.iter().map(|&d| d as u64).collect(),
        ));
    }
    Ok(FrameHeader {
        codec,
        dtype,
        dims: dims.to_vec(),
        session: meta.session,
        position: meta.position,
        payload_len,
        checksum: None,
    })
}

/// Encodes the payload of `bytes` (elements of `from`) with `codec`, appending to `out`.
/// Raw codecs of the same dtype copy the bytes once; everything else converts.
pub(crate) fn encode_payload(
    bytes: &[u8],
    from: WireDtype,
    codec: Codec,
    out: &mut Vec<u8>,
) -> WireResult<()> {
    if codec.raw_dtype() == Some(from) {
        out.extend_from_slice(bytes);
        return Ok(());
    }
    // f32 sources are read in place when aligned; other dtypes are widened first.
    let values: Cow<'_, [f32]> = match (from, bytemuck::try_cast_slice::<u8, f32>(bytes)) {
        (WireDtype::F32, Ok(v)) => Cow::Borrowed(v),
        _ => Cow::Owned(decode_raw_to_f32(bytes, from)),
    };
    match codec.raw_dtype() {
        Some(to) => encode_raw_f32(&values, to, out),
        None => quantize(codec, &values, out)?,
    }
    Ok(())
}

/// Encodes `bytes` (elements of `dtype`, shape `dims`) into one buffer: header, then payload
/// written in place after it (one allocation), then the header patched with the checksum.
fn encode_bytes(
    bytes: &[u8],
    dtype: WireDtype,
    dims: &[usize],
    codec: Codec,
    meta: FrameMeta,
    with_checksum: bool,
) -> WireResult<Vec<u8>> {
    let elems = (bytes.len() / dtype.size()) as u64;
    let payload_len = codec
        .payload_len(elems, dtype)
        .ok_or_else(|| WireError::LengthOverflow(dims.iter().map(|&d| d as u64).collect()))?;
    let mut header = header_for(dims, dtype, codec, meta, payload_len)?;
    header.checksum = with_checksum.then_some(0);
    let hlen = header.encoded_len();
    let mut out = Vec::with_capacity(hlen + payload_len as usize);
    out.resize(hlen, 0);
    encode_payload(bytes, dtype, codec, &mut out)?;
    if with_checksum {
        header.checksum = Some(checksum(&out[hlen..]));
    }
    out[..hlen].copy_from_slice(&header.to_bytes());
    Ok(out)
}

/// Encodes `t` as one frame (header + payload) in a new buffer.
pub fn encode_frame(
    t: &Tensor,
    codec: Codec,
    meta: FrameMeta,
    with_checksum: bool,
) -> WireResult<Vec<u8>> {
    with_tensor_bytes(t, |dtype, bytes| {
        encode_bytes(bytes, dtype, t.dims(), codec, meta, with_checksum)
    })?
}

/// Encodes f32 `values` of shape `dims` as one frame (decoding back to f32).
pub fn encode_slice(
    values: &[f32],
    dims: &[usize],
    codec: Codec,
    meta: FrameMeta,
    with_checksum: bool,
) -> WireResult<Vec<u8>> {
    let elems: usize = dims.iter().product();
    if elems != values.len() {
        return Err(WireError::ShapeMismatch {
            dims: dims.to_vec(),
            codec,
            expected: elems as u64,
            actual: values.len() as u64,
        });
    }
    encode_bytes(
        bytemuck::cast_slice(values),
        WireDtype::F32,
        dims,
        codec,
        meta,
        with_checksum,
    )
}

/// A decoded frame borrowing its payload from the input buffer.
#[derive(Debug, Clone)]
pub struct Frame<'a> {
    /// The validated header.
    pub header: FrameHeader,
    /// The payload bytes (exactly `header.payload_len`).
    pub payload: &'a [u8],
}

/// Decodes one frame from the start of `buf`, returning it and the bytes it used. Frames larger
/// than `max_frame` are refused before anything is allocated; the checksum is verified when
/// present.
pub fn decode_frame(buf: &[u8], max_frame: usize) -> WireResult<(Frame<'_>, usize)> {
    let prefix = parse_prefix(buf)?;
    let header = parse_rest(prefix, buf)?;
    let hlen = prefix.header_len();
    let total = (hlen as u64).saturating_add(header.payload_len);
    if total > max_frame as u64 {
        return Err(WireError::Oversize {
            len: total,
            max: max_frame as u64,
        });
    }
    if (buf.len() as u64) < total {
        return Err(WireError::Truncated {
            needed: total,
            available: buf.len() as u64,
        });
    }
    let payload = &buf[hlen..total as usize];
    verify(&header, payload)?;
    debug_assert!(hlen >= FIXED_LEN);
    Ok((Frame { header, payload }, total as usize))
}

/// Checks the payload against the header's checksum, if any.
pub(crate) fn verify(header: &FrameHeader, payload: &[u8]) -> WireResult<()> {
    if let Some(expected) = header.checksum {
        let actual = checksum(payload);
        if actual != expected {
            return Err(WireError::ChecksumMismatch { expected, actual });
        }
    }
    Ok(())
}

impl<'a> Frame<'a> {
    /// The values as f32: borrowed in place for an aligned f32 payload, decoded otherwise.
    pub fn to_f32(&self) -> WireResult<Cow<'a, [f32]>> {
        let elems = self.header.elem_count();
        Ok(match self.header.codec {
            Codec::F32 => match bytemuck::try_cast_slice::<u8, f32>(self.payload) {
                Ok(v) => Cow::Borrowed(v),
                Err(_) => Cow::Owned(bytemuck::pod_collect_to_vec(self.payload)),
            },
            Codec::F16 => Cow::Owned(decode_raw_to_f32(self.payload, WireDtype::F16)),
            Codec::Bf16 => Cow::Owned(decode_raw_to_f32(self.payload, WireDtype::Bf16)),
            q => Cow::Owned(dequantize(q, self.payload, elems)?),
        })
    }

    /// The f16 elements of an f16 payload, borrowed in place when aligned.
    pub fn f16_view(&self) -> Option<Cow<'a, [f16]>> {
        (self.header.codec == Codec::F16).then(|| match bytemuck::try_cast_slice(self.payload) {
            Ok(v) => Cow::Borrowed(v),
            Err(_) => Cow::Owned(bytemuck::pod_collect_to_vec(self.payload)),
        })
    }

    /// The frame as a candle tensor of the header's dtype and dims (one copy into candle's
    /// storage; raw payloads of the same dtype are copied straight from the buffer).
    pub fn to_tensor(&self) -> WireResult<Tensor> {
        let dims = self.header.dims.as_slice();
        let dev = &Device::Cpu;
        let same = self.header.codec.raw_dtype() == Some(self.header.dtype);
        let t = match (self.header.dtype, same) {
            (WireDtype::F16, true) => match self.f16_view() {
                Some(v) => Tensor::from_slice(&v, dims, dev)?,
                None => unreachable_codec()?,
            },
            (WireDtype::Bf16, true) => {
                let v: Cow<'_, [bf16]> = match bytemuck::try_cast_slice(self.payload) {
                    Ok(v) => Cow::Borrowed(v),
                    Err(_) => Cow::Owned(bytemuck::pod_collect_to_vec(self.payload)),
                };
                Tensor::from_slice(&v, dims, dev)?
            }
            (dtype, _) => {
                let t = match self.to_f32()? {
                    Cow::Borrowed(v) => Tensor::from_slice(v, dims, dev)?,
                    // Decoded values are moved into the tensor, not copied again.
                    Cow::Owned(v) => Tensor::from_vec(v, dims, dev)?,
                };
                if dtype == WireDtype::F32 {
                    t
                } else {
                    t.to_dtype(dtype.to_candle())?
                }
            }
        };
        Ok(t)
    }

    /// Copies the frame into an owned one.
    pub fn to_owned(&self) -> OwnedFrame {
        OwnedFrame::from_parts(self.header.clone(), self.payload)
    }
}

fn unreachable_codec<T>() -> WireResult<T> {
    Err(WireError::Tensor("codec/dtype combination".into()))
}

/// A frame that owns its payload, stored 8-byte aligned so raw payloads can always be viewed
/// in place.
#[derive(Debug, Clone)]
pub struct OwnedFrame {
    header: FrameHeader,
    words: Vec<u64>,
}

impl OwnedFrame {
    /// Allocates a zeroed, aligned payload buffer for `header` (the caller bounds its size).
    pub(crate) fn zeroed(header: FrameHeader) -> Self {
        let words = vec![0u64; (header.payload_len as usize).div_ceil(8)];
        OwnedFrame { header, words }
    }

    fn from_parts(header: FrameHeader, payload: &[u8]) -> Self {
        let mut f = Self::zeroed(header);
        f.payload_mut().copy_from_slice(payload);
        f
    }

    /// The header.
    pub fn header(&self) -> &FrameHeader {
        &self.header
    }

    /// The payload bytes.
    pub fn payload(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.header.payload_len as usize]
    }

    pub(crate) fn payload_mut(&mut self) -> &mut [u8] {
        let len = self.header.payload_len as usize;
        &mut bytemuck::cast_slice_mut(&mut self.words)[..len]
    }

    /// A borrowed view (for [`Frame::to_f32`], [`Frame::to_tensor`]).
    pub fn as_frame(&self) -> Frame<'_> {
        Frame {
            header: self.header.clone(),
            payload: self.payload(),
        }
    }
}
