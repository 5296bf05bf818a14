//! Matrix products over raw GGUF blocks (Q4_0, Q4_1, Q8_0) with f32 activations.
//!
//! The weights stay in their quantised blocks (0.56–1.06 bytes per value instead of 2 for f16 or
//! 4 for f32), which is what bounds decode speed on a CPU, while the activations and the
//! accumulation stay in f32: for a block with scale `d` and offset `m`,
//! `y = Σ_b d_b · Σ_j q_j x_j + m_b · Σ_j x_j`, with the per-block sums of `x` computed once per
//! input row. Unlike candle's quantised matmul, the activations are never rounded to 8 bits.
//!
//! The SIMD path (AVX2 + FMA) is chosen at run time; a scalar path serves every other CPU and is
//! the reference the SIMD path is tested against. Output rows are split over rayon's pool.
// Items the `internals` feature re-exports for this crate's own tests and benches stay `pub`.
#![cfg_attr(not(feature = "internals"), allow(unreachable_pub, dead_code))]

use crate::error::{Error, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;
use rayon::prelude::*;

/// Values per block in every supported format.
pub const BLOCK: usize = 32;

/// A supported block format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    /// f16 scale, 32 × 4-bit values, value = (q - 8) · d.
    Q4_0,
    /// f16 scale and offset, 32 × 4-bit values, value = q · d + m.
    Q4_1,
    /// f16 scale, 32 × i8 values, value = q · d.
    Q8_0,
}

impl BlockFormat {
    /// Bytes per block of 32 values.
    pub const fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q4_0 => 18,
            BlockFormat::Q4_1 => 20,
            BlockFormat::Q8_0 => 34,
        }
    }

    fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_0 => Some(BlockFormat::Q4_0),
            GgmlDType::Q4_1 => Some(BlockFormat::Q4_1),
            GgmlDType::Q8_0 => Some(BlockFormat::Q8_0),
            _ => None,
        }
    }
}

/// Which implementation computes the dot products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelPath {
    /// Portable Rust.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
}

impl KernelPath {
    /// The path the engine uses: the fastest this CPU supports, unless the environment
    /// variable `NEUROSHARD_KERNEL_PATH` names another one it supports (`scalar` or `avx2`;
    /// the trust calibration runs replicas on each path). Read once per process.
    pub fn detect() -> Self {
        static CHOSEN: std::sync::OnceLock<KernelPath> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let best = Self::best();
            match std::env::var("NEUROSHARD_KERNEL_PATH").as_deref() {
                Ok("scalar") => KernelPath::Scalar,
                Ok("avx2") if best == KernelPath::Avx2 => KernelPath::Avx2,
                _ => best,
            }
        })
    }

    /// This path's name (receipts and the trust calibration record it).
    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Scalar => "scalar",
            KernelPath::Avx2 => "avx2",
        }
    }

    /// The fastest path this CPU supports.
    fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                return KernelPath::Avx2;
            }
        }
        KernelPath::Scalar
    }

    /// Whether this CPU can run the path.
    pub fn available(self) -> bool {
        match self {
            KernelPath::Scalar => true,
            KernelPath::Avx2 => KernelPath::best() == KernelPath::Avx2,
        }
    }
}

/// A `[rows, cols]` weight matrix stored as GGUF blocks, row by row.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    format: BlockFormat,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
    path: KernelPath,
}

impl QuantMatrix {
    /// Takes a 2-D quantised tensor's blocks as they are; `None` for unsupported formats.
    pub fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        let Some(format) = BlockFormat::from_ggml(q.dtype()) else {
            return Ok(None);
        };
        let dims = q.shape().dims();
        let (rows, cols) = match dims {
            [r, c] => (*r, *c),
            _ => return Ok(None),
        };
        Ok(Some(Self::from_bytes(
            format,
            rows,
            cols,
            q.data()?.into_owned(),
        )?))
    }

    /// Quantises a dense `[rows, cols]` tensor to Q8_0 (for weights that are not GGUF blocks).
    pub fn quantize_q8_0(t: &candle_core::Tensor) -> Result<Option<Self>> {
        let (_, cols) = t.dims2()?;
        if cols % BLOCK != 0 {
            return Ok(None);
        }
        let f32 = t.to_dtype(candle_core::DType::F32)?;
        Self::from_qtensor(&QTensor::quantize(&f32, GgmlDType::Q8_0)?)
    }

    /// Wraps raw block bytes (checked against the shape).
    pub fn from_bytes(
        format: BlockFormat,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    ) -> Result<Self> {
        if cols % BLOCK != 0 || data.len() != rows * cols / BLOCK * format.block_bytes() {
            return Err(Error::BadInput(format!(
                "{format:?} matrix [{rows}, {cols}] needs {} bytes, got {}",
                rows * cols / BLOCK * format.block_bytes(),
                data.len()
            )));
        }
        Ok(QuantMatrix {
            format,
            rows,
            cols,
            data,
            path: KernelPath::detect(),
        })
    }

    /// Forces a kernel path (tests compare every path against the scalar reference).
    pub fn with_path(mut self, path: KernelPath) -> Result<Self> {
        if !path.available() {
            return Err(Error::BadInput(format!(
                "kernel path {path:?} is not supported by this CPU"
            )));
        }
        self.path = path;
        Ok(self)
    }

    /// Output width.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input width.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The block format.
    pub fn format(&self) -> BlockFormat {
        self.format
    }

    /// Bytes of block data.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    fn row_bytes(&self) -> usize {
        self.cols / BLOCK * self.format.block_bytes()
    }

    /// Dequantises row `r` into `out` (`cols` values): embedding lookups in fast mode.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        let row = &self.data[r * rb..(r + 1) * rb];
        let bb = self.format.block_bytes();
        for (b, chunk) in out.chunks_exact_mut(BLOCK).enumerate() {
            dequantize_block(self.format, &row[b * bb..(b + 1) * bb], chunk);
        }
    }

    /// `dx = dy W` for `dy` holding `m` rows of `rows` values; returns `m × cols` values: the
    /// gradient of `y = x Wᵀ` with respect to `x`, which a frozen quantised layer still passes
    /// upstream in training (LoRA on a GGUF base). Read from the blocks as they are: each
    /// block is dequantised once and added, scaled by `dy`, into every row of `dx`.
    ///
    /// The columns are split over rayon's pool in groups of whole blocks; each group sums
    /// over the weight rows in order, so the result does not depend on the thread count.
    pub fn matmul_transposed(&self, dy: &[f32], m: usize) -> Result<Vec<f32>> {
        if dy.len() != m * self.rows {
            return Err(Error::BadInput(format!(
                "transposed product: {} values for {m} rows of {}",
                dy.len(),
                self.rows
            )));
        }
        /// Blocks of columns per task: 256 columns, so a task reads 8 consecutive blocks of
        /// each weight row.
        const GROUP: usize = 8;
        let (rows, cols) = (self.rows, self.cols);
        let blocks = cols / BLOCK;
        let bb = self.format.block_bytes();
        let rb = self.row_bytes();
        let groups: Vec<(usize, Vec<f32>)> = (0..blocks.div_ceil(GROUP))
            .into_par_iter()
            .map(|g| {
                let (b0, b1) = (g * GROUP, ((g + 1) * GROUP).min(blocks));
                let width = (b1 - b0) * BLOCK;
                // This group's columns of dx, row-major.
                let mut acc = vec![0f32; m * width];
                let mut values = [0f32; BLOCK];
                for o in 0..rows {
                    let row = &self.data[o * rb..(o + 1) * rb];
                    for b in b0..b1 {
                        dequantize_block(self.format, &row[b * bb..(b + 1) * bb], &mut values);
                        let at = (b - b0) * BLOCK;
                        for i in 0..m {
                            let s = dy[i * rows + o];
                            let out = &mut acc[i * width + at..i * width + at + BLOCK];
                            for (a, v) in out.iter_mut().zip(&values) {
                                *a += s * v;
                            }
                        }
                    }
                }
                (b0 * BLOCK, acc)
            })
            .collect();
        let mut dx = vec![0f32; m * cols];
        for (c0, acc) in groups {
            let width = acc.len() / m.max(1);
            for i in 0..m {
                dx[i * cols + c0..i * cols + c0 + width]
                    .copy_from_slice(&acc[i * width..(i + 1) * width]);
            }
        }
        Ok(dx)
    }

    /// The whole matrix as a dense f32 tensor.
    pub fn dequantize(&self) -> Result<candle_core::Tensor> {
        let mut out = vec![0f32; self.rows * self.cols];
        // Rows in parallel: prefill dequantises whole matrices per call.
        out.par_chunks_mut(self.cols)
            .enumerate()
            .for_each(|(r, row)| self.dequantize_row(r, row));
        Ok(candle_core::Tensor::from_vec(
            out,
            (self.rows, self.cols),
            &candle_core::Device::Cpu,
        )?)
    }

    /// `y = x Wᵀ` for `x` holding `m` rows of `cols` values; returns `m × rows` values.
    pub fn matmul(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let mut outs = Self::matmul_fused(&[self], x, m)?;
        Ok(outs.pop().unwrap_or_default())
    }

    /// Several matrices with the same input (Q/K/V, gate/up) as one: their rows are treated
    /// as one row-concatenated matrix, so the input is prepared once and the rows are split
    /// over the thread pool in one dispatch, without copying the blocks into a fused buffer.
    /// Returns one `m × rows_i` output per matrix.
    pub fn matmul_fused(parts: &[&QuantMatrix], x: &[f32], m: usize) -> Result<Vec<Vec<f32>>> {
        let Some(first) = parts.first() else {
            return Ok(Vec::new());
        };
        if let Some(odd) = parts
            .iter()
            .find(|p| p.format != first.format || p.cols != first.cols || p.path != first.path)
        {
            return Err(Error::BadInput(format!(
                "fused matmul over {:?} [_, {}] and {:?} [_, {}]",
                first.format, first.cols, odd.format, odd.cols
            )));
        }
        let cols = first.cols;
        if x.len() != m * cols {
            return Err(Error::BadInput(format!(
                "matmul input has {} values, expected {m} x {cols}",
                x.len()
            )));
        }
        // Once per input row: the per-block sums the kernel reads.
        let (xsum, _) = block_sums(first.format, first.path, x);
        let xsum = &xsum;
        let by_block = offsets_by_block(first.format, first.path, xsum, m);
        let by_block = &by_block;
        let total: usize = parts.iter().map(|p| p.rows).sum();
        let rb = first.row_bytes();
        let threads = rayon::current_num_threads().max(1);
        // Enough rows per task to amortise scheduling, enough tasks to balance the cores; even,
        // because the kernel takes rows in pairs.
        let chunk = (total / (threads * 4)).clamp(8, 256) & !1;
        // Each part's output, `[m, rows]`, is written in place by tasks over disjoint row
        // ranges: task c gets rows `c·chunk..` of every input's output row. With several
        // inputs the kernel's result is `[rows, m]`, turned around by the task itself (on its
        // core, not in a serial pass after the parallel one).
        let mut outs: Vec<Vec<f32>> = parts.iter().map(|p| vec![0f32; p.rows * m]).collect();
        let mut tasks: Vec<(usize, usize, Vec<&mut [f32]>)> = Vec::new();
        for (p, out) in outs.iter_mut().enumerate() {
            let rows = parts[p].rows;
            let mut per_input: Vec<_> = out
                .chunks_mut(rows.max(1))
                .map(|o| o.chunks_mut(chunk))
                .collect();
            for c in 0..rows.div_ceil(chunk) {
                let slices: Vec<&mut [f32]> =
                    per_input.iter_mut().filter_map(|o| o.next()).collect();
                tasks.push((p, c * chunk, slices));
            }
        }
        let task = |(p, first_row, mut outs): (usize, usize, Vec<&mut [f32]>)| {
            let n = outs.first().map_or(0, |o| o.len());
            let rows = &parts[p].data[first_row * rb..(first_row + n) * rb];
            if let [out] = outs.as_mut_slice() {
                dot_rows(first.format, first.path, rows, rb, x, xsum, out);
                return;
            }
            // Every weight row against all inputs, unpacked once per group of inputs; each
            // output gets the same arithmetic as with one input (batch invariance).
            let mut by_row = vec![0f32; n * m];
            dot_rows_inputs(
                first.format,
                first.path,
                rows,
                rb,
                x,
                xsum,
                by_block,
                m,
                &mut by_row,
            );
            for (r, ys) in by_row.chunks_exact(m).enumerate() {
                for (out, &y) in outs.iter_mut().zip(ys) {
                    out[r] = y;
                }
            }
        };
        // One thread while other programs hold a core (`runtime::spread_work`).
        if crate::runtime::spread_work() {
            tasks.into_par_iter().for_each(task);
        } else {
            tasks.into_iter().for_each(task);
        }
        Ok(outs)
    }
}

/// Per-block input sums in the layout one kernel path reads, computed once per matmul call
/// and reused for every weight row; returns the sums and how many values each block has.
///
/// The scalar path and Q8_0 read `Σ x` per block. The AVX2 4-bit path reads pairs per block,
/// `[0, Σx]` for Q4_1 (lane 1 meets the block minimum `m`) and `[-8·Σx, 0]` for Q4_0 (lane 0
/// meets the scale `d`), so one FMA of the block header `[d, m]` covers the offset term of
/// either format.
fn block_sums(format: BlockFormat, path: KernelPath, x: &[f32]) -> (Vec<f32>, usize) {
    let sums = x.chunks_exact(BLOCK).map(|c| c.iter().sum::<f32>());
    if path == KernelPath::Avx2 && format != BlockFormat::Q8_0 {
        let pairs = sums
            .flat_map(|sum| match format {
                BlockFormat::Q4_1 => [0.0, sum],
                _ => [-8.0 * sum, 0.0],
            })
            .collect();
        return (pairs, 2);
    }
    (sums.collect(), 1)
}

/// The AVX2 4-bit path's offset sums regrouped by block for its tiles of several inputs:
/// input `t`'s non-zero pair half of block `i` (`Σx` for Q4_1, `-8·Σx` for Q4_0) at
/// `i · m + t`, so one load feeds a whole tile's offset FMA. Built once per matmul call; empty
/// where no tile reads it (one input, Q8_0, the scalar path).
fn offsets_by_block(format: BlockFormat, path: KernelPath, pairs: &[f32], m: usize) -> Vec<f32> {
    if m < 2 || path != KernelPath::Avx2 || format == BlockFormat::Q8_0 {
        return Vec::new();
    }
    let lane = usize::from(format == BlockFormat::Q4_1);
    let nb = pairs.len() / (2 * m);
    let mut by_block = vec![0f32; nb * m];
    for (t, input) in pairs.chunks_exact(2 * nb).enumerate() {
        for (i, pair) in input.chunks_exact(2).enumerate() {
            by_block[i * m + t] = pair[lane];
        }
    }
    by_block
}

/// `out[i]` = row `i` of `rows` (each `rb` bytes) against one input row and its block sums:
/// one call per run of rows, so the per-call cost (dispatch, stack set-up, checks) is not paid
/// per row.
fn dot_rows(
    format: BlockFormat,
    path: KernelPath,
    rows: &[u8],
    rb: usize,
    x: &[f32],
    xsum: &[f32],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if path == KernelPath::Avx2 {
        // SAFETY: `Avx2` is only selected after run-time detection of avx2, fma and f16c
        // (`detect`, `with_path`); the kernel asserts the row, input and sum lengths.
        unsafe { avx2::dot_rows(format, rows, rb, x, xsum, out) };
        return;
    }
    for (row, y) in rows.chunks_exact(rb).zip(out.iter_mut()) {
        *y = scalar_dot(format, row, x, xsum);
    }
}

/// `out[r · m + t]` = row `r` of `rows` against input row `t` of `x` (`m` rows): the
/// several-input form of [`dot_rows`], bit-identical to it for every output. The vector path
/// unpacks each weight block once for up to eight inputs; the arithmetic of
/// each (row, input) pair is the same sequence of operations as with one input, so a row's
/// result never depends on how many rows share the call (decode batches, prefill chunks).
#[allow(clippy::too_many_arguments)]
fn dot_rows_inputs(
    format: BlockFormat,
    path: KernelPath,
    rows: &[u8],
    rb: usize,
    x: &[f32],
    xsum: &[f32],
    by_block: &[f32],
    m: usize,
    out: &mut [f32],
) {
    let cols = x.len() / m.max(1);
    let per_input = xsum.len() / m.max(1);
    #[cfg(target_arch = "x86_64")]
    if path == KernelPath::Avx2 {
        // SAFETY: as in `dot_rows`; the kernel asserts the lengths.
        unsafe { avx2::dot_rows_inputs(format, rows, rb, x, xsum, by_block, m, out) };
        return;
    }
    let _ = (path, by_block);
    for (row, ys) in rows.chunks_exact(rb).zip(out.chunks_exact_mut(m)) {
        for (t, y) in ys.iter_mut().enumerate() {
            let xr = &x[t * cols..(t + 1) * cols];
            *y = scalar_dot(format, row, xr, &xsum[t * per_input..(t + 1) * per_input]);
        }
    }
}

/// A 4-bit block's offset (Q4_1's stored minimum, or `-8 d` for Q4_0) and its 16 bytes of
/// packed values (low nibbles: values 0..16, high nibbles: 16..32); `d` is its scale.
fn four_bit_parts(format: BlockFormat, d: f32, blk: &[u8]) -> (f32, &[u8]) {
    if format == BlockFormat::Q4_1 {
        (f16::from_le_bytes([blk[2], blk[3]]).to_f32(), &blk[4..20])
    } else {
        (-8.0 * d, &blk[2..18])
    }
}

/// The 32 values of one block (`blk`: the block's bytes) into `out`.
fn dequantize_block(format: BlockFormat, blk: &[u8], out: &mut [f32]) {
    let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
    match format {
        BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
            let (m, qs) = four_bit_parts(format, d, blk);
            for j in 0..16 {
                out[j] = (qs[j] & 0x0F) as f32 * d + m;
                out[j + 16] = (qs[j] >> 4) as f32 * d + m;
            }
        }
        BlockFormat::Q8_0 => {
            for j in 0..BLOCK {
                out[j] = blk[2 + j] as i8 as f32 * d;
            }
        }
    }
}

/// The reference implementation: dequantise a block, multiply, accumulate in f32.
pub(crate) fn scalar_dot(format: BlockFormat, row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    let bb = format.block_bytes();
    let mut acc = 0f32;
    for (b, blk) in row.chunks_exact(bb).enumerate() {
        let xb = &x[b * BLOCK..(b + 1) * BLOCK];
        let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        match format {
            BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
                let (m, qs) = four_bit_parts(format, d, blk);
                let mut s = 0f32;
                for j in 0..16 {
                    s += (qs[j] & 0x0F) as f32 * xb[j] + (qs[j] >> 4) as f32 * xb[j + 16];
                }
                acc += d * s + m * xsum[b];
            }
            BlockFormat::Q8_0 => {
                let mut s = 0f32;
                for j in 0..BLOCK {
                    s += blk[2 + j] as i8 as f32 * xb[j];
                }
                acc += d * s;
            }
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The AVX2 + FMA + F16C kernels.
    //!
    //! 4-bit weight rows go in pairs: the block loop loads each block's 32 inputs into
    //! registers once and multiplies both rows' blocks by them, with two independent
    //! accumulation chains, and prefetches the rows two pairs ahead. 8-bit values (Q8_0) and
    //! nibbles (Q4_x) are widened to 32-bit lanes by zero/sign-extending loads: eight bytes of
    //! a Q4 block hold inputs 0-7 (low nibbles) and 16-23 (high nibbles), so the input stays in
    //! its natural order. Measured on the 2-core AMD EPYC, single thread, streaming 66 MB of
    //! Q4_1: 6.6-6.8 GB/s against 5.6 for one row at a time with per-lane nibble shifts.

    use super::{BlockFormat, BLOCK};
    use std::arch::x86_64::*;

    /// `(Σ lanes of a, Σ lanes of b)`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum2(a: __m256, b: __m256) -> __m128 {
        // [a01 a23 b01 b23 | a45 a67 b45 b67] -> [a0145 a2367 b0145 b2367] -> [A B A B]
        let s = _mm256_hadd_ps(a, b);
        let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        _mm_hadd_ps(s, s)
    }

    /// `(Σ lanes 0-1 of a, Σ lanes 0-1 of b)` in lanes 0 and 1 (the offset terms; lanes 2-3
    /// of both are zero).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum2_offsets(a: __m128, b: __m128) -> __m128 {
        let s = _mm_hadd_ps(a, b); // [a0+a1, 0, b0+b1, 0]
        _mm_shuffle_ps(s, s, 0b00_00_10_00)
    }

    /// The block's 32 inputs.
    ///
    /// # Safety
    /// `xp` must point to 32 readable floats.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn inputs(xp: *const f32) -> [__m256; 4] {
        // SAFETY: the caller guarantees 32 readable floats.
        unsafe {
            [
                _mm256_loadu_ps(xp),
                _mm256_loadu_ps(xp.add(8)),
                _mm256_loadu_ps(xp.add(16)),
                _mm256_loadu_ps(xp.add(24)),
            ]
        }
    }

    /// Eight bytes at `p` widened to eight i32 lanes, zero- or sign-extended.
    ///
    /// # Safety
    /// `p` must point to 8 readable bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn widen<const SIGNED: bool>(p: *const u8) -> __m256i {
        // SAFETY: the caller guarantees 8 readable bytes.
        let bytes = unsafe { _mm_loadl_epi64(p as *const __m128i) };
        if SIGNED {
            _mm256_cvtepi8_epi32(bytes)
        } else {
            _mm256_cvtepu8_epi32(bytes)
        }
    }

    /// A Q4_0/Q4_1 block's f16 header as `[d, m, 0, 0]` (Q4_1) or `[d, 0, 0, 0]` (Q4_0).
    ///
    /// # Safety
    /// `blk` must point to one block of `FORMAT` (`Q40` or `Q41`).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_header<const FORMAT: u8>(blk: *const u8) -> __m128 {
        // SAFETY: the header (2 or 4 bytes) is inside the block.
        let bits = unsafe {
            if FORMAT == Q41 {
                std::ptr::read_unaligned(blk as *const u32) as i32
            } else {
                std::ptr::read_unaligned(blk as *const u16) as i32
            }
        };
        _mm_cvtph_ps(_mm_cvtsi32_si128(bits))
    }

    /// One Q4_0/Q4_1 block of one row: `acc += d · Σ q·x` and `offset += [d, m] · pair`.
    ///
    /// # Safety
    /// `blk` must point to one block of `FORMAT` (`Q40` or `Q41`).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_block<const FORMAT: u8>(
        blk: *const u8,
        x: &[__m256; 4],
        pair: __m128,
        acc: __m256,
        offset: __m128,
    ) -> (__m256, __m128) {
        let min = FORMAT == Q41;
        // SAFETY: the caller guarantees the block is readable; every read stays inside it.
        unsafe {
            let dm = q4_header::<FORMAT>(blk);
            let offset = _mm_fmadd_ps(dm, pair, offset);
            let qs = blk.add(if min { 4 } else { 2 });
            // Bytes 0-7: inputs 0-7 (low nibbles) and 16-23 (high); bytes 8-15: 8-15 and 24-31.
            let (lo, hi) = (widen::<false>(qs), widen::<false>(qs.add(8)));
            let mask = _mm256_set1_epi32(0x0F);
            let q = |v: __m256i| _mm256_cvtepi32_ps(v);
            let mut s = _mm256_mul_ps(q(_mm256_and_si256(lo, mask)), x[0]);
            s = _mm256_fmadd_ps(q(_mm256_and_si256(hi, mask)), x[1], s);
            s = _mm256_fmadd_ps(q(_mm256_srli_epi32::<4>(lo)), x[2], s);
            s = _mm256_fmadd_ps(q(_mm256_srli_epi32::<4>(hi)), x[3], s);
            (_mm256_fmadd_ps(_mm256_broadcastss_ps(dm), s, acc), offset)
        }
    }

    /// One Q8_0 block of one row: `acc += d · Σ q·x`.
    ///
    /// # Safety
    /// `blk` must point to one 34-byte block.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_block(blk: *const u8, x: &[__m256; 4], acc: __m256) -> __m256 {
        // SAFETY: the caller guarantees the block is readable; every read stays inside it.
        unsafe {
            let bits = std::ptr::read_unaligned(blk as *const u16) as i32;
            let d = _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)));
            let q = |at: usize| _mm256_cvtepi32_ps(widen::<true>(blk.add(2 + at)));
            let mut s = _mm256_mul_ps(q(0), x[0]);
            s = _mm256_fmadd_ps(q(8), x[1], s);
            s = _mm256_fmadd_ps(q(16), x[2], s);
            s = _mm256_fmadd_ps(q(24), x[3], s);
            _mm256_fmadd_ps(d, s, acc)
        }
    }

    /// Two rows of `nb` 4-bit blocks against one input row: `(row a, row b)`.
    ///
    /// # Safety
    /// `a` and `b` must point to `nb` blocks of `FORMAT` (`Q40` or `Q41`) each, `x` to `32·nb`
    /// floats, `pairs` to `2·nb` floats; the CPU must support avx2, fma and f16c.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot2<const FORMAT: u8>(
        a: *const u8,
        b: *const u8,
        nb: usize,
        x: *const f32,
        pairs: *const f32,
    ) -> (f32, f32) {
        let bb = format_of(FORMAT).block_bytes();
        let ahead = 4 * nb * bb;
        let (mut acc_a, mut acc_b) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let (mut off_a, mut off_b) = (_mm_setzero_ps(), _mm_setzero_ps());
        // SAFETY: every block index is < nb, so all reads are inside the caller's ranges.
        unsafe {
            for i in 0..nb {
                let xs = inputs(x.add(i * BLOCK));
                let (ba, bb_) = (a.add(i * bb), b.add(i * bb));
                // The same block four rows on (two pairs ahead): the hardware prefetcher
                // keeps up with one sequential stream, less well with two interleaved ones.
                _mm_prefetch::<_MM_HINT_T0>(ba.wrapping_add(ahead) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(bb_.wrapping_add(ahead) as *const i8);
                let pair = _mm_castsi128_ps(_mm_loadl_epi64(pairs.add(2 * i) as *const __m128i));
                (acc_a, off_a) = q4_block::<FORMAT>(ba, &xs, pair, acc_a, off_a);
                (acc_b, off_b) = q4_block::<FORMAT>(bb_, &xs, pair, acc_b, off_b);
            }
        }
        let mut out = [0f32; 4];
        // SAFETY: `out` holds 4 floats.
        unsafe {
            _mm_storeu_ps(
                out.as_mut_ptr(),
                _mm_add_ps(hsum2(acc_a, acc_b), hsum2_offsets(off_a, off_b)),
            )
        };
        (out[0], out[1])
    }

    /// One Q8_0 row, blocks in pairs with an accumulator each.
    ///
    /// Q8_0 rows go one at a time: paired rows stream at ~4 GB/s against ~8 for one row
    /// (single thread, 112 MB working set; with prefetching ~7), while the in-cache gain of
    /// sharing the input registers is small next to the 34-byte blocks' memory traffic.
    ///
    /// # Safety
    /// `a` must point to `nb` blocks, `x` to `32·nb` floats; avx2, fma and f16c.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot1_q8(a: *const u8, nb: usize, x: *const f32) -> f32 {
        const BB: usize = BlockFormat::Q8_0.block_bytes();
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        // SAFETY: every block index is < nb.
        unsafe {
            while i + 1 < nb {
                acc0 = q8_block(a.add(i * BB), &inputs(x.add(i * BLOCK)), acc0);
                acc1 = q8_block(a.add((i + 1) * BB), &inputs(x.add((i + 1) * BLOCK)), acc1);
                i += 2;
            }
            if i < nb {
                acc0 = q8_block(a.add(i * BB), &inputs(x.add(i * BLOCK)), acc0);
            }
        }
        let s = hsum2(_mm256_add_ps(acc0, acc1), _mm256_setzero_ps());
        _mm_cvtss_f32(s)
    }

    /// One 4-bit weight row against `R` inputs: `R` accumulation chains that each run
    /// exactly the operations [`dot2`] runs for its row (so every result has its bits).
    ///
    /// # Safety
    /// `a` must point to `nb` blocks of `FORMAT` (`Q40` or `Q41`), each `x[r]` to `32·nb`
    /// floats and each `pairs[r]` to `2·nb`; the CPU must support avx2, fma and f16c.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn row_inputs<const FORMAT: u8, const R: usize>(
        a: *const u8,
        nb: usize,
        x: [*const f32; R],
        pairs: [*const f32; R],
    ) -> [f32; R] {
        let bb = format_of(FORMAT).block_bytes();
        let min = FORMAT == Q41;
        let mut acc = [_mm256_setzero_ps(); R];
        let mut off = [_mm_setzero_ps(); R];
        // SAFETY: every block index is < nb, so all reads are inside the caller's ranges.
        unsafe {
            for i in 0..nb {
                let blk = a.add(i * bb);
                // The block unpacked once: [d, m] (or [d, 0]) and its 32 values as floats,
                // in the order `q4_block` multiplies them.
                let dm = q4_header::<FORMAT>(blk);
                let d = _mm256_broadcastss_ps(dm);
                let qs = blk.add(if min { 4 } else { 2 });
                let (lo, hi) = (widen::<false>(qs), widen::<false>(qs.add(8)));
                let mask = _mm256_set1_epi32(0x0F);
                let q = [
                    _mm256_cvtepi32_ps(_mm256_and_si256(lo, mask)),
                    _mm256_cvtepi32_ps(_mm256_and_si256(hi, mask)),
                    _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(lo)),
                    _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(hi)),
                ];
                for r in 0..R {
                    let xp = x[r].add(i * BLOCK);
                    let pair =
                        _mm_castsi128_ps(_mm_loadl_epi64(pairs[r].add(2 * i) as *const __m128i));
                    off[r] = _mm_fmadd_ps(dm, pair, off[r]);
                    let mut s = _mm256_mul_ps(q[0], _mm256_loadu_ps(xp));
                    s = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(xp.add(8)), s);
                    s = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(xp.add(16)), s);
                    s = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xp.add(24)), s);
                    acc[r] = _mm256_fmadd_ps(d, s, acc[r]);
                }
            }
        }
        let mut out = [0f32; R];
        for r in 0..R {
            let mut lanes = [0f32; 4];
            // SAFETY: `lanes` holds 4 floats.
            unsafe {
                _mm_storeu_ps(
                    lanes.as_mut_ptr(),
                    _mm_add_ps(
                        hsum2(acc[r], _mm256_setzero_ps()),
                        hsum2_offsets(off[r], _mm_setzero_ps()),
                    ),
                )
            };
            out[r] = lanes[0];
        }
        out
    }

    /// One 4-bit weight row against a tile of `R` inputs (4 or 8): the same per-(row, input)
    /// operations as [`dot2`] (so every result has its bits), with the tile's offset terms
    /// in one FMA whose lanes are the inputs: lane `t` runs exactly the chain that the offset
    /// lane of input `t` runs in [`q4_block`] (the other lane of [`dot2`]'s pair stays +0).
    /// `offsets` holds block `i`'s offset sums of the tile's inputs at `offsets + i·stride`
    /// (`Σx` for Q4_1, `-8·Σx` for Q4_0: the non-zero half of each input's pair).
    ///
    /// Four inputs advance their `q·x` chains step by step together (12-13% faster than one
    /// input after the other on the prefill shapes); eight go one input after the other, which
    /// keeps the eight accumulators, the block's four unpacked vectors and the chain in the
    /// 16 registers. A tile of eight unpacks each block once for eight inputs: 8 decode
    /// sessions on SmolLM2 Q4_1, engine alone, 2 threads, +14% against two tiles of four
    /// (4 alternating pairs of `bench-sessions --engine-too`). The one-thread criterion group
    /// `batch/Q4_1` does not show it: pool dispatch and the output transposition take about a
    /// third of that bench's time.
    ///
    /// # Safety
    /// `a` must point to `nb` blocks of `FORMAT` (`Q40` or `Q41`), each `x[r]` to `32·nb`
    /// floats and `offsets + i·stride` to `R` floats for every block `i`; the CPU must support
    /// avx2, fma and f16c.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn row_inputs_tile<const FORMAT: u8, const R: usize>(
        a: *const u8,
        nb: usize,
        x: [*const f32; R],
        offsets: *const f32,
        stride: usize,
    ) -> [f32; R] {
        debug_assert!(R == 4 || R == 8);
        let bb = format_of(FORMAT).block_bytes();
        let min = FORMAT == Q41;
        let mut acc = [_mm256_setzero_ps(); R];
        let mut off = _mm256_setzero_ps();
        let mask = _mm256_set1_epi32(0x0F);
        // SAFETY: every block index is < nb, so all reads are inside the caller's ranges.
        unsafe {
            for i in 0..nb {
                let blk = a.add(i * bb);
                // [d, m] (Q4_1) or [d, 0] (Q4_0): the offset sums meet m (Q4_1) or d (Q4_0).
                let dm = q4_header::<FORMAT>(blk);
                let d = _mm256_broadcastss_ps(dm);
                let o = if min {
                    _mm256_broadcastss_ps(_mm_movehdup_ps(dm))
                } else {
                    d
                };
                let sums = offsets.add(i * stride);
                let sums = if R == 8 {
                    _mm256_loadu_ps(sums)
                } else {
                    _mm256_zextps128_ps256(_mm_loadu_ps(sums))
                };
                off = _mm256_fmadd_ps(o, sums, off);
                let qs = blk.add(if min { 4 } else { 2 });
                let (lo, hi) = (widen::<false>(qs), widen::<false>(qs.add(8)));
                let q = [
                    _mm256_cvtepi32_ps(_mm256_and_si256(lo, mask)),
                    _mm256_cvtepi32_ps(_mm256_and_si256(hi, mask)),
                    _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(lo)),
                    _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(hi)),
                ];
                let xv = |r: usize, j: usize| _mm256_loadu_ps(x[r].add(i * BLOCK + 8 * j));
                if R > 4 {
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let mut s = _mm256_mul_ps(q[0], xv(r, 0));
                        s = _mm256_fmadd_ps(q[1], xv(r, 1), s);
                        s = _mm256_fmadd_ps(q[2], xv(r, 2), s);
                        s = _mm256_fmadd_ps(q[3], xv(r, 3), s);
                        *acc = _mm256_fmadd_ps(d, s, *acc);
                    }
                } else {
                    let mut s = [_mm256_setzero_ps(); R];
                    for (j, qj) in q.iter().enumerate() {
                        for (r, s) in s.iter_mut().enumerate() {
                            *s = if j == 0 {
                                _mm256_mul_ps(*qj, xv(r, j))
                            } else {
                                _mm256_fmadd_ps(*qj, xv(r, j), *s)
                            };
                        }
                    }
                    for r in 0..R {
                        acc[r] = _mm256_fmadd_ps(d, s[r], acc[r]);
                    }
                }
            }
        }
        let mut offs = [0f32; 8];
        // SAFETY: `offs` holds 8 floats.
        unsafe { _mm256_storeu_ps(offs.as_mut_ptr(), off) };
        let mut out = [0f32; R];
        for r in 0..R {
            // As in `dot2`: the lane sum of acc, plus the offset pair's two lanes (+0 and the
            // chain) added first.
            let a = _mm_cvtss_f32(hsum2(acc[r], _mm256_setzero_ps()));
            out[r] = a + (0.0 + offs[r]);
        }
        out
    }

    /// Block `i` of one Q8_0 row (at `blk`) against `R` inputs: `acc[r] += d · Σ q·x[r]`, the
    /// inputs' `q·x` chains advancing step by step together (as in `row_inputs_tile`), each in
    /// the order [`q8_block`] runs it.
    ///
    /// # Safety
    /// `blk` must point to one 34-byte block and each `x[r]` to at least `32·(i+1)` floats.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_block_inputs<const R: usize>(
        blk: *const u8,
        x: &[*const f32; R],
        i: usize,
        acc: &mut [__m256; R],
    ) {
        // SAFETY: the caller guarantees the block and the inputs' block `i` are readable.
        unsafe {
            let bits = std::ptr::read_unaligned(blk as *const u16) as i32;
            let d = _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)));
            let mut s = [_mm256_setzero_ps(); R];
            for j in 0..4 {
                let q = _mm256_cvtepi32_ps(widen::<true>(blk.add(2 + 8 * j)));
                for r in 0..R {
                    let xv = _mm256_loadu_ps(x[r].add(i * BLOCK + 8 * j));
                    s[r] = if j == 0 {
                        _mm256_mul_ps(q, xv)
                    } else {
                        _mm256_fmadd_ps(q, xv, s[r])
                    };
                }
            }
            for r in 0..R {
                acc[r] = _mm256_fmadd_ps(d, s[r], acc[r]);
            }
        }
    }

    /// One Q8_0 weight row against `R` inputs, each chain as [`dot1_q8`] runs it (even and odd
    /// blocks in two accumulators).
    ///
    /// # Safety
    /// `a` must point to `nb` blocks, each `x[r]` to `32·nb` floats; avx2, fma and f16c.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn row_inputs_q8<const R: usize>(
        a: *const u8,
        nb: usize,
        x: [*const f32; R],
    ) -> [f32; R] {
        const BB: usize = BlockFormat::Q8_0.block_bytes();
        // Even blocks into `even`, odd ones into `odd`, as `dot1_q8` does; two blocks per
        // step so that both accumulators stay in registers (indexing by `i % 2` kept them in
        // memory: a store and a reload per block and input).
        let mut even = [_mm256_setzero_ps(); R];
        let mut odd = [_mm256_setzero_ps(); R];
        // SAFETY: every block index is < nb.
        unsafe {
            let mut i = 0;
            while i + 1 < nb {
                q8_block_inputs(a.add(i * BB), &x, i, &mut even);
                q8_block_inputs(a.add((i + 1) * BB), &x, i + 1, &mut odd);
                i += 2;
            }
            if i < nb {
                q8_block_inputs(a.add(i * BB), &x, i, &mut even);
            }
        }
        q8_results(&even, &odd)
    }

    /// Each input's Q8_0 result from its even-block and odd-block accumulators, formed as
    /// [`dot1_q8`] forms it.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn q8_results<const R: usize>(even: &[__m256; R], odd: &[__m256; R]) -> [f32; R] {
        let mut out = [0f32; R];
        for r in 0..R {
            let s = hsum2(_mm256_add_ps(even[r], odd[r]), _mm256_setzero_ps());
            out[r] = _mm_cvtss_f32(s);
        }
        out
    }

    /// One Q8_0 weight row against a tile of `R` inputs, each chain as [`dot1_q8`] runs it,
    /// every block unpacked once for the whole tile: the even blocks first (the chains
    /// `dot1_q8` keeps in its first accumulator), then the odd ones, so that only one set of
    /// `R` accumulators is live at a time. With both sets live, as in [`row_inputs_q8`],
    /// eight inputs would need more than the 16 vector registers.
    ///
    /// # Safety
    /// `a` must point to `nb` blocks, each `x[r]` to `32·nb` floats; avx2, fma and f16c.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn row_inputs_q8_tile<const R: usize>(
        a: *const u8,
        nb: usize,
        x: [*const f32; R],
    ) -> [f32; R] {
        // SAFETY: the caller's guarantees cover both passes.
        let (even, odd) = unsafe { (q8_pass(a, nb, &x, 0), q8_pass(a, nb, &x, 1)) };
        q8_results(&even, &odd)
    }

    /// Blocks `first, first + 2, ...` of one Q8_0 row against `R` inputs: per block, the four
    /// unpacked weight vectors and the scale stay in registers while each input's `q·x` chain
    /// runs in [`q8_block`]'s order, then `acc[r] += d · s`.
    ///
    /// # Safety
    /// As [`row_inputs_q8_tile`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_pass<const R: usize>(
        a: *const u8,
        nb: usize,
        x: &[*const f32; R],
        first: usize,
    ) -> [__m256; R] {
        const BB: usize = BlockFormat::Q8_0.block_bytes();
        let mut acc = [_mm256_setzero_ps(); R];
        // SAFETY: every block index is < nb.
        unsafe {
            let mut i = first;
            while i < nb {
                let blk = a.add(i * BB);
                let bits = std::ptr::read_unaligned(blk as *const u16) as i32;
                let d = _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)));
                let q: [__m256; 4] =
                    std::array::from_fn(|j| _mm256_cvtepi32_ps(widen::<true>(blk.add(2 + 8 * j))));
                for r in 0..R {
                    let xr = x[r].add(i * BLOCK);
                    let mut s = _mm256_mul_ps(q[0], _mm256_loadu_ps(xr));
                    s = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(xr.add(8)), s);
                    s = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(xr.add(16)), s);
                    s = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xr.add(24)), s);
                    acc[r] = _mm256_fmadd_ps(d, s, acc[r]);
                }
                i += 2;
            }
        }
        acc
    }

    /// `out[r · m + t]` = weight row `r` against input `t`: inputs in tiles of eight and four,
    /// then one by one (see [`super::dot_rows_inputs`] and [`row_tile`]).
    ///
    /// # Safety
    /// The CPU must support avx2, fma and f16c.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_rows_inputs(
        format: BlockFormat,
        rows: &[u8],
        rb: usize,
        x: &[f32],
        xsum: &[f32],
        by_block: &[f32],
        m: usize,
        out: &mut [f32],
    ) {
        let cols = x.len() / m.max(1);
        let nb = cols / BLOCK;
        let per_input = if format == BlockFormat::Q8_0 {
            0
        } else {
            2 * nb
        };
        assert!(
            m > 0
                && x.len() == m * cols
                && cols == nb * BLOCK
                && rb == nb * format.block_bytes()
                && rows.len() >= (out.len() / m) * rb
                && xsum.len() >= m * per_input
                && by_block.len() >= (per_input / 2) * m,
            "block/input length mismatch"
        );
        let (base, xp) = (rows.as_ptr(), x.as_ptr());
        // Input t's pair sums (Q4 formats; Q8_0 reads none).
        let pp = |t: usize| xsum.as_ptr().wrapping_add(t * per_input);
        // Inputs in tiles that stay in cache while every weight row passes over them (the
        // rows of one task stay in cache too): without tiling, each row would stream all
        // inputs from memory again.
        for t0 in (0..m).step_by(INPUT_TILE) {
            let t1 = (t0 + INPUT_TILE).min(m);
            for (i, ys) in out.chunks_exact_mut(m).enumerate() {
                // SAFETY: row i < out.len() / m is inside `rows`, inputs t < m inside `x` and
                // `xsum` (asserted).
                unsafe {
                    row_tile(
                        format,
                        base.add(i * rb),
                        nb,
                        xp,
                        cols,
                        &pp,
                        by_block,
                        m,
                        t0,
                        t1,
                        ys,
                    )
                };
            }
        }
    }

    /// Inputs per cache tile of [`dot_rows_inputs`] (16 rows of 576-1536 floats: 37-98 KB).
    const INPUT_TILE: usize = 16;

    /// One weight row against inputs `t0..t1`: 4-bit rows in tiles of eight, then of four,
    /// then one by one; Q8_0 rows in tiles of eight (even blocks, then odd), groups of
    /// four, then one by one.
    ///
    /// # Safety
    /// `a` points to one row of `nb` blocks; inputs `t0..t1` (`cols` floats each from `xp`,
    /// pair sums from `pp(t)`, offset sums of block `i` at `by_block[i·m + t]`) are readable;
    /// `ys.len() >= t1`; avx2, fma and f16c.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn row_tile(
        format: BlockFormat,
        a: *const u8,
        nb: usize,
        xp: *const f32,
        cols: usize,
        pp: &impl Fn(usize) -> *const f32,
        by_block: &[f32],
        m: usize,
        t0: usize,
        t1: usize,
        ys: &mut [f32],
    ) {
        let inputs = |t: usize| xp.wrapping_add(t * cols);
        let offsets = |t: usize| by_block.as_ptr().wrapping_add(t);
        // SAFETY: the caller's guarantees cover every row, input and output index used.
        unsafe {
            let mut t = t0;
            if format == BlockFormat::Q8_0 {
                while t + 8 <= t1 {
                    let xs = std::array::from_fn(|k| inputs(t + k));
                    ys[t..t + 8].copy_from_slice(&row_inputs_q8_tile::<8>(a, nb, xs));
                    t += 8;
                }
            } else {
                while t + 8 <= t1 {
                    let xs = std::array::from_fn(|k| inputs(t + k));
                    let got = match format {
                        BlockFormat::Q4_0 => row_inputs_tile::<Q40, 8>(a, nb, xs, offsets(t), m),
                        _ => row_inputs_tile::<Q41, 8>(a, nb, xs, offsets(t), m),
                    };
                    ys[t..t + 8].copy_from_slice(&got);
                    t += 8;
                }
            }
            while t + 4 <= t1 {
                let xs = std::array::from_fn(|k| inputs(t + k));
                let got = match format {
                    BlockFormat::Q4_0 => row_inputs_tile::<Q40, 4>(a, nb, xs, offsets(t), m),
                    BlockFormat::Q4_1 => row_inputs_tile::<Q41, 4>(a, nb, xs, offsets(t), m),
                    BlockFormat::Q8_0 => row_inputs_q8::<4>(a, nb, xs),
                };
                ys[t..t + 4].copy_from_slice(&got);
                t += 4;
            }
            while t < t1 {
                let xs = [inputs(t)];
                let [y] = match format {
                    BlockFormat::Q4_0 => row_inputs::<Q40, 1>(a, nb, xs, [pp(t)]),
                    BlockFormat::Q4_1 => row_inputs::<Q41, 1>(a, nb, xs, [pp(t)]),
                    BlockFormat::Q8_0 => row_inputs_q8::<1>(a, nb, xs),
                };
                ys[t] = y;
                t += 1;
            }
        }
    }

    /// Format tags for the const-generic kernels.
    const Q40: u8 = 0;
    const Q41: u8 = 1;
    const Q8: u8 = 2;

    /// The block format a tag stands for.
    const fn format_of(tag: u8) -> BlockFormat {
        match tag {
            Q40 => BlockFormat::Q4_0,
            Q41 => BlockFormat::Q4_1,
            _ => BlockFormat::Q8_0,
        }
    }

    /// `out[i]` = row `i` of `rows` (`rb` bytes each) against one input row and its block
    /// sums, rows in pairs; an odd last row is paired with itself.
    ///
    /// # Safety
    /// The CPU must support avx2, fma and f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_rows(
        format: BlockFormat,
        rows: &[u8],
        rb: usize,
        x: &[f32],
        xsum: &[f32],
        out: &mut [f32],
    ) {
        // SAFETY: same target features; lengths are checked in `rows_with`.
        unsafe {
            match format {
                BlockFormat::Q4_0 => rows_with::<Q40>(rows, rb, x, xsum, out),
                BlockFormat::Q4_1 => rows_with::<Q41>(rows, rb, x, xsum, out),
                BlockFormat::Q8_0 => rows_with::<Q8>(rows, rb, x, xsum, out),
            }
        }
    }

    /// # Safety
    /// The CPU must support avx2, fma and f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows_with<const FORMAT: u8>(
        rows: &[u8],
        rb: usize,
        x: &[f32],
        xsum: &[f32],
        out: &mut [f32],
    ) {
        let nb = x.len() / BLOCK;
        let pairs_needed = if FORMAT == Q8 { 0 } else { 2 * nb };
        assert!(
            rb == nb * format_of(FORMAT).block_bytes()
                && rows.len() >= out.len() * rb
                && xsum.len() >= pairs_needed,
            "block/input length mismatch"
        );
        let (base, xp, pp) = (rows.as_ptr(), x.as_ptr(), xsum.as_ptr());
        if FORMAT == Q8 {
            for (i, y) in out.iter_mut().enumerate() {
                // SAFETY: row i < out.len() is inside `rows` (asserted).
                *y = unsafe { dot1_q8(base.add(i * rb), nb, xp) };
            }
            return;
        }
        for (pair, ys) in out.chunks_mut(2).enumerate() {
            let i = 2 * pair;
            // SAFETY: rows i and i+1 (or i twice) are < out.len(), inside `rows` (asserted).
            unsafe {
                let a = base.add(i * rb);
                let b = if ys.len() == 2 { a.add(rb) } else { a };
                let (ya, yb) = dot2::<FORMAT>(a, b, nb, xp, pp);
                ys[0] = ya;
                if let Some(y) = ys.get_mut(1) {
                    *y = yb;
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Deterministic pseudo-random values in [-1, 1).
    pub(crate) fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// A `[rows, cols]` matrix of [`values`] quantised to `dtype`, and its dequantised copy.
    fn quantised(dtype: GgmlDType, rows: usize, cols: usize) -> (QTensor, Tensor) {
        let w = Tensor::from_vec(values(rows * cols, rows as u64), (rows, cols), &Device::Cpu)
            .expect("w");
        let q = QTensor::quantize(&w, dtype).expect("quantize");
        let dense = q.dequantize(&Device::Cpu).expect("dequantize");
        (q, dense)
    }

    #[test]
    fn every_path_matches_dequantise_then_dot() {
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            for (rows, cols, m) in [(1, 32, 1), (37, 96, 1), (130, 576, 3), (19, 1536, 2)] {
                let (q, dense) = quantised(dtype, rows, cols);
                let x = values(m * cols, 99);
                let xt = Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).expect("x");
                let want: Vec<f32> = xt
                    .matmul(&dense.t().expect("t"))
                    .expect("mm")
                    .flatten_all()
                    .expect("f")
                    .to_vec1()
                    .expect("v");
                for path in [KernelPath::Scalar, KernelPath::Avx2] {
                    if !path.available() {
                        continue;
                    }
                    let qm = QuantMatrix::from_qtensor(&q)
                        .expect("ok")
                        .expect("supported")
                        .with_path(path)
                        .expect("path");
                    assert_eq!(
                        qm.dequantize()
                            .expect("deq")
                            .flatten_all()
                            .expect("f")
                            .to_vec1::<f32>()
                            .expect("v"),
                        dense.flatten_all().expect("f").to_vec1::<f32>().expect("v"),
                        "{dtype:?} dequantize"
                    );
                    let got = qm.matmul(&x, m).expect("matmul");
                    let num: f32 = got.iter().zip(&want).map(|(a, b)| (a - b) * (a - b)).sum();
                    let den: f32 = want.iter().map(|b| b * b).sum();
                    let rel = (num / den).sqrt();
                    assert!(
                        rel <= 1e-5,
                        "{dtype:?} {path:?} [{rows},{cols}] x {m}: relative error {rel}"
                    );
                }
            }
        }
    }

    /// The input gradient of a frozen quantised layer (`dx = dy W`, over the blocks) equals
    /// the same product on the dequantised f32 matrix, for every format and odd shapes.
    #[test]
    fn transposed_product_over_blocks_matches_the_dequantised_matrix() {
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            for (rows, cols, m) in [(1, 32, 1), (37, 96, 1), (130, 576, 3), (19, 1536, 5)] {
                let (q, dense) = quantised(dtype, rows, cols);
                let dy = values(m * rows, 7 + m as u64);
                let dyt = Tensor::from_vec(dy.clone(), (m, rows), &Device::Cpu).expect("dy");
                let want: Vec<f32> = dyt
                    .matmul(&dense)
                    .expect("mm")
                    .flatten_all()
                    .expect("f")
                    .to_vec1()
                    .expect("v");
                let qm = QuantMatrix::from_qtensor(&q)
                    .expect("ok")
                    .expect("supported");
                let got = qm.matmul_transposed(&dy, m).expect("transposed");
                assert_eq!(got.len(), m * cols);
                let num: f32 = got.iter().zip(&want).map(|(a, b)| (a - b) * (a - b)).sum();
                let den: f32 = want.iter().map(|b| b * b).sum();
                let rel = (num / den).sqrt();
                assert!(
                    rel <= 1e-5,
                    "{dtype:?} [{rows},{cols}] dy x {m}: relative error {rel}"
                );
                let max_rel = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs() / want.iter().fold(0f32, |x, y| x.max(y.abs())))
                    .fold(0f32, f32::max);
                assert!(max_rel <= 1e-5, "{dtype:?} [{rows},{cols}]: max {max_rel}");
            }
        }
        let qm = QuantMatrix::from_qtensor(
            &QTensor::quantize(
                &Tensor::from_vec(values(64, 1), (2, 32), &Device::Cpu).expect("w"),
                GgmlDType::Q8_0,
            )
            .expect("q"),
        )
        .expect("ok")
        .expect("supported");
        assert!(qm.matmul_transposed(&[1.0; 3], 1).is_err(), "wrong length");
    }

    #[test]
    fn fused_matmul_equals_separate_matmuls() {
        for path in [KernelPath::Scalar, KernelPath::Avx2] {
            if !path.available() {
                continue;
            }
            let make = |rows: usize, seed: u64| {
                let w =
                    Tensor::from_vec(values(rows * 96, seed), (rows, 96), &Device::Cpu).expect("w");
                let q = QTensor::quantize(&w, GgmlDType::Q4_1).expect("quantize");
                QuantMatrix::from_qtensor(&q)
                    .expect("ok")
                    .expect("supported")
                    .with_path(path)
                    .expect("path")
            };
            // Odd row counts: each part ends on a row the kernel pairs with itself.
            let (a, b, c) = (make(37, 1), make(11, 2), make(53, 3));
            for m in [1, 3] {
                let x = values(m * 96, 7);
                let fused = QuantMatrix::matmul_fused(&[&a, &b, &c], &x, m).expect("fused");
                for (got, single) in fused.iter().zip([&a, &b, &c]) {
                    assert_eq!(
                        got,
                        &single.matmul(&x, m).expect("single"),
                        "{path:?} m={m}"
                    );
                }
            }
            let other =
                QuantMatrix::from_bytes(BlockFormat::Q8_0, 1, 96, vec![0; 3 * 34]).expect("q8");
            assert!(QuantMatrix::matmul_fused(&[&a, &other], &values(96, 1), 1).is_err());
        }
    }

    #[test]
    fn every_input_row_has_the_bits_it_has_alone() {
        // Batch invariance: a matmul over m inputs gives each input exactly the bits of a
        // one-input matmul, for m around the tiles of eight and four inputs (and their
        // remainders of one to three) and the dense threshold of prefill. Rows split into
        // several tasks with a short last one; an odd and an even block count per row (Q8_0's
        // tiles take the even blocks, then the odd ones).
        for ((rows, cols), dtype) in [(37, 96), (20, 128)].into_iter().flat_map(|shape| {
            [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0].map(|d| (shape, d))
        }) {
            let w =
                Tensor::from_vec(values(rows * cols, 5), (rows, cols), &Device::Cpu).expect("w");
            let q = QTensor::quantize(&w, dtype).expect("quantize");
            for path in [KernelPath::Scalar, KernelPath::Avx2] {
                if !path.available() {
                    eprintln!("{path:?} is not available on this CPU, skipped");
                    continue;
                }
                let qm = QuantMatrix::from_qtensor(&q)
                    .expect("ok")
                    .expect("supported")
                    .with_path(path)
                    .expect("path");
                for m in [2, 3, 4, 5, 7, 8, 9, 11, 12, 13, 15, 16, 17, 20, 31] {
                    let x = values(m * cols, 40 + m as u64);
                    let together = qm.matmul(&x, m).expect("matmul");
                    for t in 0..m {
                        let alone = qm.matmul(&x[t * cols..(t + 1) * cols], 1).expect("one");
                        let row = &together[t * rows..(t + 1) * rows];
                        assert!(
                            row.iter()
                                .zip(&alone)
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{dtype:?} {path:?}: input {t} of {m} changed bits"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rejects_inconsistent_shapes() {
        assert!(QuantMatrix::from_bytes(BlockFormat::Q8_0, 2, 32, vec![0; 10]).is_err());
        let q = QuantMatrix::from_bytes(BlockFormat::Q8_0, 1, 32, vec![0; 34]).expect("ok");
        assert!(q.matmul(&[0.0; 31], 1).is_err());
    }
}
