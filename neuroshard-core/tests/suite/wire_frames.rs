//! Wire frames: round trips for every codec and dtype (odd sizes, empty, rank 0..4), the q8/q4
//! error bound, zero-copy views, async framing, and one test per error variant.

use candle_core::{DType, Device, Tensor};
use neuroshard_core::wire::{
    decode_frame, encode_frame, encode_slice, read_frame, read_frame_or_eof, write_frame, Codec,
    FrameMeta, WireError,
};
use std::borrow::Cow;

const META: FrameMeta = FrameMeta {
    session: 0xDEAD_BEEF_0102,
    position: 77,
};

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 + seed as f32) * 0.731).sin() * (1.0 + (i % 7) as f32))
        .collect()
}

fn shapes() -> Vec<Vec<usize>> {
    vec![
        vec![],
        vec![0],
        vec![1],
        vec![31],
        vec![33],
        vec![3, 0, 5],
        vec![2, 17],
        vec![1, 3, 65],
        vec![2, 1, 3, 37],
        vec![1, 1, 576],
    ]
}

/// Largest error allowed for `codec` on one block with absolute maximum `amax`.
fn block_bound(codec: Codec, amax: f32) -> f32 {
    let step = match codec {
        Codec::Q8 => amax / 127.0,
        Codec::Q4 => amax / 7.0,
        _ => 0.0,
    };
    // The f16 scale can be one f16 ulp above amax / qmax: allow that, plus f32 rounding.
    step * (0.5 + 1e-3) + 1e-7
}

#[test]
fn every_codec_and_dtype_round_trips() {
    for dims in shapes() {
        let n: usize = dims.iter().product();
        let v = values(n, dims.len() as u32);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let t = Tensor::from_slice(&v, dims.clone(), &Device::Cpu)
                .expect("t")
                .to_dtype(dtype)
                .expect("dtype");
            let src: Vec<f32> = t
                .to_dtype(DType::F32)
                .expect("f32")
                .flatten_all()
                .expect("f")
                .to_vec1()
                .expect("v");
            for codec in Codec::ALL {
                for checksum in [false, true] {
                    let buf = encode_frame(&t, codec, META, checksum).expect("encode");
                    let (frame, used) = decode_frame(&buf, 1 << 20).expect("decode");
                    assert_eq!(used, buf.len());
                    assert_eq!(frame.header.dims, dims);
                    assert_eq!(
                        (frame.header.session, frame.header.position),
                        (META.session, META.position)
                    );
                    assert_eq!(frame.header.checksum.is_some(), checksum);
                    let back = frame.to_tensor().expect("tensor");
                    assert_eq!(back.dims(), &dims[..]);
                    assert_eq!(back.dtype(), dtype, "decodes to the sender's dtype");
                    let got: Vec<f32> = back
                        .to_dtype(DType::F32)
                        .expect("f32")
                        .flatten_all()
                        .expect("f")
                        .to_vec1()
                        .expect("v");
                    match codec {
                        Codec::Q8 | Codec::Q4 => {
                            for (b, (gs, ss)) in got.chunks(32).zip(src.chunks(32)).enumerate() {
                                let amax = ss.iter().fold(0f32, |m, x| m.max(x.abs()));
                                let bound = block_bound(codec, amax);
                                // Decoding to f16/bf16 adds that dtype's rounding on top.
                                let extra = if dtype == DType::F32 {
                                    0.0
                                } else {
                                    amax * 8e-3
                                };
                                for (g, s) in gs.iter().zip(ss) {
                                    assert!((g - s).abs() <= bound + extra, "{codec:?} {dtype:?} {dims:?} block {b}: {g} vs {s} (bound {bound})");
                                }
                            }
                        }
                        _ => {
                            let exact = codec.raw_dtype().map(|d| d.to_candle()) == Some(dtype)
                                || codec == Codec::F32;
                            for (g, s) in got.iter().zip(&src) {
                                let tol = if exact { 0.0 } else { s.abs() * 8e-3 };
                                assert!(
                                    (g - s).abs() <= tol,
                                    "{codec:?} {dtype:?} {dims:?}: {g} vs {s}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn q4_payload_is_under_029_of_f16_and_header_is_small() {
    let v = values(576, 1);
    let f16 = encode_slice(&v, &[1, 1, 576], Codec::F16, META, false).expect("f16");
    let q4 = encode_slice(&v, &[1, 1, 576], Codec::Q4, META, false).expect("q4");
    let q8 = encode_slice(&v, &[1, 1, 576], Codec::Q8, META, false).expect("q8");
    let header = 32 + 3 * 4;
    let ratio = (q4.len() - header) as f64 / (f16.len() - header) as f64;
    assert!(ratio <= 0.29, "q4/f16 payload ratio {ratio}");
    assert_eq!(f16.len(), header + 1152);
    assert_eq!(q8.len(), header + 18 * 34);
    assert!(
        (header as f64) / (f16.len() as f64) < 0.04,
        "header share of a decode-step frame"
    );
}

#[test]
fn raw_payloads_are_viewed_in_place_when_aligned() {
    let v = values(100, 3);
    let buf = encode_slice(&v, &[100], Codec::F32, META, false).expect("enc");
    // Copy into an 8-aligned buffer, then into one shifted by a byte.
    let mut words = vec![0u64; buf.len().div_ceil(8) + 1];
    let aligned: &mut [u8] = bytemuck::cast_slice_mut(&mut words);
    aligned[..buf.len()].copy_from_slice(&buf);
    let (frame, _) = decode_frame(&aligned[..buf.len()], 1 << 20).expect("decode");
    let view = frame.to_f32().expect("view");
    assert!(
        matches!(view, Cow::Borrowed(_)),
        "aligned f32 payload must be borrowed"
    );
    assert_eq!(view.as_ptr() as usize, frame.payload.as_ptr() as usize);
    assert_eq!(&view[..], &v[..]);
    let mut shifted = vec![0u8; buf.len() + 1];
    shifted[1..].copy_from_slice(&buf);
    let (frame, _) = decode_frame(&shifted[1..], 1 << 20).expect("decode");
    let view = frame.to_f32().expect("view");
    assert!(
        matches!(view, Cow::Owned(_)),
        "misaligned payload is copied"
    );
    assert_eq!(&view[..], &v[..]);
    // f16 frames: the f16 view borrows too.
    let t = Tensor::from_slice(&v, 100, &Device::Cpu)
        .expect("t")
        .to_dtype(DType::F16)
        .expect("f16");
    let buf = encode_frame(&t, Codec::F16, META, false).expect("enc");
    let mut words = vec![0u64; buf.len().div_ceil(8)];
    bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..buf.len()].copy_from_slice(&buf);
    let bytes: &[u8] = &bytemuck::cast_slice(&words)[..buf.len()];
    let (frame, _) = decode_frame(bytes, 1 << 20).expect("decode");
    assert!(matches!(frame.f16_view(), Some(Cow::Borrowed(_))));
}

#[tokio::test]
async fn async_framing_round_trips_a_stream_of_frames() {
    let (mut a, mut b) = tokio::io::duplex(4096);
    let tensors: Vec<Tensor> = (0..6)
        .map(|i| {
            Tensor::from_slice(
                &values(576 * (i + 1), i as u32),
                (1, i + 1, 576),
                &Device::Cpu,
            )
            .expect("t")
        })
        .collect();
    let sent = tensors.clone();
    let writer = tokio::spawn(async move {
        for (i, t) in sent.iter().enumerate() {
            let codec = Codec::ALL[i % Codec::ALL.len()];
            write_frame(
                &mut a,
                t,
                codec,
                FrameMeta {
                    session: 9,
                    position: i as u32,
                },
                i % 2 == 0,
            )
            .await
            .expect("write");
        }
    });
    for (i, t) in tensors.iter().enumerate() {
        let frame = read_frame(&mut b, 1 << 20).await.expect("read");
        assert_eq!(frame.header().position, i as u32);
        let got = frame.as_frame().to_tensor().expect("tensor");
        assert_eq!(got.dims(), t.dims());
        if Codec::ALL[i % 5] == Codec::F32 {
            let diff = (got - t)
                .expect("sub")
                .abs()
                .expect("abs")
                .max_all()
                .expect("max")
                .to_scalar::<f32>()
                .expect("s");
            assert_eq!(diff, 0.0);
        }
    }
    writer.await.expect("writer");
    assert!(read_frame_or_eof(&mut b, 1 << 20)
        .await
        .expect("clean eof")
        .is_none());
}

fn frame() -> Vec<u8> {
    encode_slice(&values(64, 5), &[2, 32], Codec::F32, META, true).expect("enc")
}

#[test]
fn every_error_variant_is_reachable() {
    let max = 1 << 20;
    let mut b = frame();
    b[0] = b'X';
    assert!(matches!(decode_frame(&b, max), Err(WireError::BadMagic(_))));
    let mut b = frame();
    b[4] = 9;
    assert!(matches!(
        decode_frame(&b, max),
        Err(WireError::UnsupportedVersion(9))
    ));
    let mut b = frame();
    b[5] = 42;
    assert!(matches!(
        decode_frame(&b, max),
        Err(WireError::UnknownCodec(42))
    ));
    let mut b = frame();
    b[6] = 7;
    assert!(matches!(
        decode_frame(&b, max),
        Err(WireError::UnknownDtype(7))
    ));
    let mut b = frame();
    b[7] |= 0x80;
    assert!(matches!(
        decode_frame(&b, max),
        Err(WireError::UnknownFlags(_))
    ));
    let mut b = frame();
    b[8] = 9;
    assert!(matches!(
        decode_frame(&b, max),
        Err(WireError::RankTooLarge(9))
    ));
    let mut b = frame();
    b[32] = 3; // first dim 2 -> 3: 96 values do not fit 256 bytes
    assert!(matches!(
        decode_frame(&b, max),
        Err(WireError::ShapeMismatch {
            expected: 384,
            actual: 256,
            ..
        })
    ));
    let mut b = frame();
    b[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
    b[36..40].copy_from_slice(&u32::MAX.to_le_bytes());
    b[8] = 4;
    b.splice(
        40..40,
        u32::MAX
            .to_le_bytes()
            .iter()
            .chain(u32::MAX.to_le_bytes().iter())
            .copied(),
    );
    assert!(matches!(
        decode_frame(&b, max),
        Err(WireError::LengthOverflow(_))
    ));
    let b = frame();
    assert!(matches!(
        decode_frame(&b, 100),
        Err(WireError::Oversize { len: 304, max: 100 })
    ));
    let mut b = frame();
    let last = b.len() - 1;
    b[last] ^= 1;
    assert!(matches!(
        decode_frame(&b, max),
        Err(WireError::ChecksumMismatch { .. })
    ));
    let b = frame();
    assert!(matches!(
        decode_frame(&b[..b.len() - 1], max),
        Err(WireError::Truncated { .. })
    ));
    assert!(matches!(
        decode_frame(&b[..10], max),
        Err(WireError::Truncated {
            needed: 32,
            available: 10
        })
    ));
    assert!(matches!(
        encode_slice(&[f32::NAN; 4], &[4], Codec::Q8, META, false),
        Err(WireError::Unquantisable(_))
    ));
    assert!(matches!(
        encode_slice(&[1e38; 4], &[4], Codec::Q4, META, false),
        Err(WireError::Unquantisable(_))
    ));
    let ints = Tensor::from_slice(&[1u32, 2], 2, &Device::Cpu).expect("t");
    assert!(matches!(
        encode_frame(&ints, Codec::F32, META, false),
        Err(WireError::Tensor(_))
    ));
    // Io: a failing writer.
    struct Broken;
    impl tokio::io::AsyncWrite for Broken {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::task::Poll::Ready(Err(std::io::Error::other("broken pipe")))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("rt");
    let t = Tensor::ones(4, DType::F32, &Device::Cpu).expect("t");
    let err = rt
        .block_on(write_frame(&mut Broken, &t, Codec::F32, META, false))
        .unwrap_err();
    assert!(matches!(err, WireError::Io(_)), "{err}");
    // A stream that ends mid-payload.
    let b = frame();
    let mut short = &b[..b.len() - 5];
    let err = rt.block_on(read_frame(&mut short, max)).unwrap_err();
    assert!(
        matches!(
            err,
            WireError::Truncated {
                needed: 304,
                available: 299
            }
        ),
        "{err}"
    );
    // An oversize declaration is refused before the payload is read.
    let mut whole = &b[..];
    assert!(matches!(
        rt.block_on(read_frame(&mut whole, 64)),
        Err(WireError::Oversize { .. })
    ));
    // A tensor of too high rank.
    let deep = Tensor::ones(vec![1usize; 9], DType::F32, &Device::Cpu).expect("t");
    assert!(matches!(
        encode_frame(&deep, Codec::F32, META, false),
        Err(WireError::RankTooLarge(9))
    ));
}
