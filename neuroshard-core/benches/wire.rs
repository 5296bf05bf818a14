//! Wire encode/decode speed per codec for a prefill-sized [1, 128, 576] and a decode-step
//! [1, 1, 576] hidden state, with and without checksum, next to a plain memcpy of the payload.
//! `benches/wire_bench.sh` runs this and collects the numbers into JSON.
#![allow(missing_docs)] // criterion_group! generates undocumented items

use candle_core::{DType, Device, Tensor};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use neuroshard_core::wire::{decode_frame, encode_frame, Codec, FrameMeta};

fn hidden(dims: &[usize]) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.013).sin() * 3.0).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).expect("tensor")
}

fn bench(c: &mut Criterion) {
    let meta = FrameMeta {
        session: 1,
        position: 5,
    };
    for dims in [[1usize, 128, 576], [1, 1, 576]] {
        let name = format!("{}x{}x{}", dims[0], dims[1], dims[2]);
        let f32_t = hidden(&dims);
        let f16_t = f32_t.to_dtype(DType::F16).expect("f16");
        let mut group = c.benchmark_group(format!("wire/{name}"));
        for codec in Codec::ALL {
            // Raw codecs of the tensor's own dtype are the zero-copy path; f16 frames are
            // measured from f16 tensors (a node holding f16 activations) and from f32 ones.
            let sources: Vec<(&str, &Tensor)> = match codec {
                Codec::F16 => vec![("f16", &f16_t), ("f32", &f32_t)],
                _ => vec![("f32", &f32_t)],
            };
            for (src, t) in sources {
                let frame = encode_frame(t, codec, meta, false).expect("encode");
                group.throughput(Throughput::Bytes(frame.len() as u64));
                let codec_name = format!("{codec:?}").to_lowercase();
                group.bench_function(format!("encode/{codec_name}/from_{src}"), |b| {
                    b.iter(|| encode_frame(black_box(t), codec, meta, false).expect("encode"))
                });
                for checksum in [false, true] {
                    let frame = encode_frame(t, codec, meta, checksum).expect("encode");
                    // Decode from an 8-aligned buffer, as read_frame provides.
                    let mut words = vec![0u64; frame.len().div_ceil(8)];
                    bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..frame.len()]
                        .copy_from_slice(&frame);
                    let buf: &[u8] = &bytemuck::cast_slice(&words)[..frame.len()];
                    let tag = if checksum { "checksum" } else { "plain" };
                    group.bench_function(
                        format!("decode_tensor/{codec_name}/from_{src}/{tag}"),
                        |b| {
                            b.iter(|| {
                                let (f, _) = decode_frame(black_box(buf), 1 << 26).expect("decode");
                                f.to_tensor().expect("tensor")
                            })
                        },
                    );
                }
            }
        }
        // The floor: copying the f16 payload's bytes once, into a ready buffer and into a
        // freshly allocated one (decoding into a tensor must allocate its storage).
        let payload = vec![7u8; dims.iter().product::<usize>() * 2];
        let mut dst = vec![0u8; payload.len()];
        group.bench_function("memcpy/f16_payload", |b| {
            b.iter(|| dst.copy_from_slice(black_box(&payload)))
        });
        group.bench_function("memcpy_alloc/f16_payload", |b| {
            b.iter(|| black_box(&payload).to_vec())
        });
        // The floor for "into a candle Tensor": candle building a tensor from the same f16
        // elements already in memory (allocation, copy, shape and layout bookkeeping).
        let elems: Vec<half::f16> = bytemuck::pod_collect_to_vec(&payload);
        group.bench_function("candle_from_slice/f16", |b| {
            b.iter(|| {
                Tensor::from_slice(black_box(&elems), &dims[..], &Device::Cpu).expect("tensor")
            })
        });
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(2)).warm_up_time(std::time::Duration::from_millis(500));
    targets = bench
}
criterion_main!(benches);
