//! Block-kernel matrix-vector speed on SmolLM2-135M's projection shapes (Q4_1 and Q8_0), per
//! kernel path, as GB/s of weight bytes streamed: decode is bounded by this number. The
//! `kernels_stream` groups cycle through ~66-112 MB of matrices, so the weights come from
//! memory as they do in decode, not from cache.
//! Thread count comes from `RAYON_NUM_THREADS` (set it to 1 or 2 to compare).
#![allow(missing_docs)] // criterion_group! generates undocumented items

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use neuroshard_core::internals::{BlockFormat, KernelPath, QuantMatrix, BLOCK};

/// Deterministic block bytes with small f16 scales (so results stay finite).
fn matrix(format: BlockFormat, rows: usize, cols: usize, seed: u64) -> QuantMatrix {
    let bb = format.block_bytes();
    let blocks = rows * cols / BLOCK;
    let mut data = vec![0u8; blocks * bb];
    let mut s = 0x9E37_79B9_7F4A_7C15u64 ^ seed;
    for blk in data.chunks_exact_mut(bb) {
        for b in blk.iter_mut() {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            *b = s as u8;
        }
        let scale = half::f16::from_f32(0.01).to_le_bytes();
        blk[..2].copy_from_slice(&scale);
        if format == BlockFormat::Q4_1 {
            blk[2..4].copy_from_slice(&half::f16::from_f32(-0.05).to_le_bytes());
        }
    }
    QuantMatrix::from_bytes(format, rows, cols, data).expect("matrix")
}

fn bench(c: &mut Criterion) {
    // (rows, cols): q/o, k/v, gate/up, down, all of one SmolLM2 layer.
    let shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536)];
    for format in [BlockFormat::Q4_1, BlockFormat::Q8_0] {
        let mut group = c.benchmark_group(format!("kernels/{format:?}"));
        for &(rows, cols) in &shapes {
            let base = matrix(format, rows, cols, 0);
            let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
            group.throughput(Throughput::Bytes(base.bytes() as u64));
            for path in [KernelPath::Scalar, KernelPath::Avx2] {
                let Ok(m) = base.clone().with_path(path) else {
                    continue;
                };
                group.bench_function(format!("{rows}x{cols}/{path:?}"), |b| {
                    b.iter(|| m.matmul(black_box(&x), 1).expect("matmul"))
                });
            }
        }
        group.finish();
        // Working set far beyond the caches: 120 gate-sized matrices, one matmul each.
        let many: Vec<QuantMatrix> = (0..120).map(|i| matrix(format, 1536, 576, i)).collect();
        let x: Vec<f32> = (0..576).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut group = c.benchmark_group(format!("kernels_stream/{format:?}"));
        group.sample_size(10);
        group.throughput(Throughput::Bytes(
            many.iter().map(|m| m.bytes() as u64).sum(),
        ));
        group.bench_function("120x1536x576/detected", |b| {
            b.iter(|| {
                for m in &many {
                    black_box(m.matmul(black_box(&x), 1).expect("matmul"));
                }
            })
        });
        group.finish();
    }
}

/// Prefill-sized products (a chunk of 512 inputs): the block kernels, which unpack each block
/// once per four inputs and give every input the bits it has alone, against dequantising the
/// matrix and running candle's dense gemm. Throughput in multiply-adds.
fn prefill(c: &mut Criterion) {
    let m = 512;
    let shapes = [(576, 576), (1536, 576), (576, 1536)];
    let mut group = c.benchmark_group("prefill/Q4_1");
    group.sample_size(10);
    for &(rows, cols) in &shapes {
        let w = matrix(BlockFormat::Q4_1, rows, cols, 1);
        let x: Vec<f32> = (0..m * cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let xt =
            candle_core::Tensor::from_slice(&x, (m, cols), &candle_core::Device::Cpu).expect("x");
        group.throughput(Throughput::Elements((rows * cols * m) as u64));
        group.bench_function(format!("{rows}x{cols}x{m}/blocks"), |b| {
            b.iter(|| w.matmul(black_box(&x), m).expect("matmul"))
        });
        group.bench_function(format!("{rows}x{cols}x{m}/dequantise+gemm"), |b| {
            b.iter(|| {
                let dense = w.dequantize().expect("dequantize");
                xt.matmul(&dense.t().expect("t")).expect("gemm")
            })
        });
    }
    group.finish();
}

/// Decode batches: `m` sessions' one-position steps through a layer's gate matrix (Q4_1) and
/// the LM head (Q8_0, 49152 x 576), against `m` one-input products: how much a batch gains by
/// reading and unpacking each block once. Throughput in multiply-adds.
fn batch(c: &mut Criterion) {
    for (format, rows, cols) in [
        (BlockFormat::Q4_1, 1536, 576),
        (BlockFormat::Q8_0, 49152, 576),
    ] {
        let w = matrix(format, rows, cols, 3);
        let mut group = c.benchmark_group(format!("batch/{format:?}/{rows}x{cols}"));
        group.sample_size(10);
        for m in [1usize, 8] {
            let x: Vec<f32> = (0..m * cols).map(|i| (i as f32 * 0.37).sin()).collect();
            group.throughput(Throughput::Elements((rows * cols * m) as u64));
            group.bench_function(format!("{m}/batched"), |b| {
                b.iter(|| w.matmul(black_box(&x), m).expect("matmul"))
            });
            if m > 1 {
                group.bench_function(format!("{m}/one_by_one"), |b| {
                    b.iter(|| {
                        for row in x.chunks_exact(cols) {
                            black_box(w.matmul(black_box(row), 1).expect("matmul"));
                        }
                    })
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, bench, prefill, batch);
criterion_main!(benches);
