//! Async framing over any tokio `AsyncRead` / `AsyncWrite` (iroh's QUIC streams implement both).
//!
//! Writing sends the header, then the tensor's bytes straight from candle's storage for raw
//! codecs of the tensor's own dtype. Reading reads the fixed header, validates it, checks the
//! declared size against the caller's maximum, and only then allocates exactly the payload.

use super::codec::Codec;
use super::frame::{checksum, encode_payload, verify, with_tensor_bytes, FrameMeta, OwnedFrame};
use super::header::{parse_prefix, parse_rest, FrameHeader, WireDtype, FIXED_LEN, MAX_RANK};
use super::{WireError, WireResult};
use candle_core::Tensor;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Default maximum frame size: 64 MiB (a 128 × 4096-token f32 hidden state is 2 MiB per row).
pub const DEFAULT_MAX_FRAME: usize = 64 << 20;

/// Writes `t` as one frame. With `with_checksum` the payload's xxh3-64 goes in the header
/// (leave it off on QUIC streams, which already authenticate every byte).
///
/// A raw codec of the tensor's own dtype (e.g. f32 frames of f32 hidden states) is written
/// straight from candle's storage: header, then the borrowed bytes, no intermediate buffer.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    t: &Tensor,
    codec: Codec,
    meta: FrameMeta,
    with_checksum: bool,
) -> WireResult<()> {
    let t = t.contiguous()?;
    let dtype = WireDtype::from_candle(t.dtype())?;
    if t.rank() > MAX_RANK {
        return Err(WireError::RankTooLarge(t.rank().min(255) as u8));
    }
    let payload_len = codec
        .payload_len(t.elem_count() as u64, dtype)
        .ok_or_else(|| WireError::LengthOverflow(t.dims().iter().map(|&d| d as u64).collect()))?;
    let mut header = FrameHeader {
        codec,
        dtype,
        dims: t.dims().to_vec(),
        session: meta.session,
        position: meta.position,
        payload_len,
        checksum: None,
    };
    if codec.raw_dtype() == Some(dtype) {
        if with_checksum {
            header.checksum = Some(with_tensor_bytes(&t, |_, bytes| checksum(bytes))?);
        }
        w.write_all(&header.to_bytes()).await?;
        WriteTensorBytes { w, t, offset: 0 }.await?;
        return Ok(());
    }
    // Reserve the checksum's 8 bytes before sizing the header; the value is filled in below.
    header.checksum = with_checksum.then_some(0);
    let hlen = header.encoded_len();
    let mut buf = Vec::with_capacity(hlen + payload_len as usize);
    buf.resize(hlen, 0);
    with_tensor_bytes(&t, |dtype, bytes| {
        encode_payload(bytes, dtype, codec, &mut buf)
    })??;
    if with_checksum {
        header.checksum = Some(checksum(&buf[hlen..]));
    }
    buf[..hlen].copy_from_slice(&header.to_bytes());
    w.write_all(&buf).await?;
    Ok(())
}

/// Writes a contiguous tensor's element bytes, borrowing candle's storage inside each
/// `poll_write` (the storage guard never lives across a suspension, so the future stays `Send`).
struct WriteTensorBytes<'a, W> {
    w: &'a mut W,
    t: Tensor,
    offset: usize,
}

impl<W: AsyncWrite + Unpin> Future for WriteTensorBytes<'_, W> {
    type Output = WireResult<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            let offset = this.offset;
            let w = &mut *this.w;
            let step = with_tensor_bytes(&this.t, |_, bytes| {
                if offset >= bytes.len() {
                    return Poll::Ready(Ok(None));
                }
                match Pin::new(w).poll_write(cx, &bytes[offset..]) {
                    Poll::Ready(Ok(0)) => {
                        Poll::Ready(Err(std::io::Error::from(std::io::ErrorKind::WriteZero)))
                    }
                    Poll::Ready(Ok(n)) => Poll::Ready(Ok(Some(n))),
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Pending => Poll::Pending,
                }
            })?;
            match step {
                Poll::Ready(Ok(Some(n))) => this.offset += n,
                Poll::Ready(Ok(None)) => return Poll::Ready(Ok(())),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Reads into `buf` until full; on EOF reports how many bytes the frame needed and had.
async fn read_full<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    needed_total: u64,
    before: u64,
) -> WireResult<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = r.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Err(WireError::Truncated {
                needed: needed_total,
                available: before + filled as u64,
            });
        }
        filled += n;
    }
    Ok(())
}

/// Reads one frame, refusing frames larger than `max_frame` bytes before allocating them.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max_frame: usize,
) -> WireResult<OwnedFrame> {
    let mut head = [0u8; FIXED_LEN + 4 * MAX_RANK + 8];
    read_full(r, &mut head[..FIXED_LEN], FIXED_LEN as u64, 0).await?;
    let prefix = parse_prefix(&head)?;
    let hlen = prefix.header_len();
    read_full(r, &mut head[FIXED_LEN..hlen], hlen as u64, FIXED_LEN as u64).await?;
    let header = parse_rest(prefix, &head[..hlen])?;
    let total = (hlen as u64).saturating_add(header.payload_len);
    if total > max_frame as u64 {
        return Err(WireError::Oversize {
            len: total,
            max: max_frame as u64,
        });
    }
    let mut frame = OwnedFrame::zeroed(header);
    read_full(r, frame.payload_mut(), total, hlen as u64).await?;
    verify(frame.header(), frame.payload())?;
    Ok(frame)
}

/// Reads frames until the stream ends cleanly at a frame boundary (`Ok(None)`).
pub async fn read_frame_or_eof<R: AsyncRead + Unpin>(
    r: &mut R,
    max_frame: usize,
) -> WireResult<Option<OwnedFrame>> {
    match read_frame(r, max_frame).await {
        Ok(f) => Ok(Some(f)),
        Err(WireError::Truncated { available: 0, .. }) => Ok(None),
        Err(e) => Err(e),
    }
}
