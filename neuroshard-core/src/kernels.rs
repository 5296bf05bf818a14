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
    pub fn block_bytes(self) -> usize {
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
    /// The fastest path this CPU supports.
    pub fn detect() -> Self {
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
            KernelPath::Avx2 => KernelPath::detect() == KernelPath::Avx2,
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
            let blk = &row[b * bb..(b + 1) * bb];
            let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
            match self.format {
                BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
                    let (m, qs) = if self.format == BlockFormat::Q4_1 {
                        (f16::from_le_bytes([blk[2], blk[3]]).to_f32(), &blk[4..20])
                    } else {
                        (-8.0 * d, &blk[2..18])
                    };
                    for j in 0..16 {
                        chunk[j] = (qs[j] & 0x0F) as f32 * d + m;
                        chunk[j + 16] = (qs[j] >> 4) as f32 * d + m;
                    }
                }
                BlockFormat::Q8_0 => {
                    for j in 0..BLOCK {
                        chunk[j] = blk[2 + j] as i8 as f32 * d;
                    }
                }
            }
        }
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
        let nb = cols / BLOCK;
        // Once per input row: the layout the kernel reads (see `Prepared`).
        let prepared = Prepared::new(first.format, first.path, x);
        let (x, xsum, per) = (&prepared.x, &prepared.xsum, prepared.xsum_per_block);
        // First virtual row of each part, and one past the last.
        let mut starts = Vec::with_capacity(parts.len() + 1);
        starts.push(0usize);
        for p in parts {
            starts.push(starts[starts.len() - 1] + p.rows);
        }
        let total = starts[parts.len()];
        let rb = first.row_bytes();
        let threads = rayon::current_num_threads().max(1);
        // Enough rows per task to amortise scheduling, enough tasks to balance two cores.
        let chunk = (total / (threads * 4)).clamp(8, 256);
        // Computed transposed ([rows, m]) so each task owns a contiguous output range.
        let mut out_t = vec![0f32; total * m];
        out_t
            .par_chunks_mut(chunk * m)
            .enumerate()
            .for_each(|(c, out)| {
                // Runs of rows within one part: one kernel call per run when decoding.
                let (mut part, mut r, mut out) = (0, c * chunk, out);
                while !out.is_empty() {
                    while r >= starts[part + 1] {
                        part += 1;
                    }
                    let n = (out.len() / m).min(starts[part + 1] - r);
                    let local = r - starts[part];
                    let rows = &parts[part].data[local * rb..(local + n) * rb];
                    let (head, tail) = out.split_at_mut(n * m);
                    if m == 1 {
                        dot_rows(first.format, first.path, rows, rb, x, xsum, head);
                    } else {
                        for (row, o) in rows.chunks_exact(rb).zip(head.chunks_exact_mut(m)) {
                            for (t, y) in o.iter_mut().enumerate() {
                                let xr = &x[t * cols..(t + 1) * cols];
                                let xs = &xsum[t * nb * per..(t + 1) * nb * per];
                                *y = dot(first.format, first.path, row, xr, xs);
                            }
                        }
                    }
                    out = tail;
                    r += n;
                }
            });
        Ok(parts
            .iter()
            .enumerate()
            .map(|(p, part)| {
                let rows = &out_t[starts[p] * m..starts[p + 1] * m];
                if m == 1 {
                    return rows.to_vec();
                }
                let mut out = vec![0f32; m * part.rows];
                for r in 0..part.rows {
                    for t in 0..m {
                        out[t * part.rows + r] = rows[r * m + t];
                    }
                }
                out
            })
            .collect())
    }
}

/// An input row in the layout one kernel path reads, prepared once per matmul call and reused
/// for every weight row.
///
/// The scalar path and Q8_0 read `x` as it is, with `Σ x` per block. The AVX2 4-bit path
/// unpacks nibbles with per-lane shifts of a broadcast block instead of byte shuffles, which
/// yields the values in a fixed interleaved order: `x` is permuted to that order here, once,
/// instead of the weights being reordered per block. Its offset term reads pairs per block,
/// `[0, Σx]` for Q4_1 (lane 1 meets the block minimum `m`) and `[-8·Σx, 0]` for Q4_0 (lane 0
/// meets the scale `d`).
struct Prepared<'a> {
    x: std::borrow::Cow<'a, [f32]>,
    xsum: Vec<f32>,
    xsum_per_block: usize,
}

/// Where the AVX2 4-bit kernel's lane `i` of vector `v` (0..4) finds its input within a block:
/// lanes 0-3 take bytes 4i, lanes 4-7 bytes 4i+1 (vectors 0, 2) or 4i+2 / 4i+3 (vectors 1, 3);
/// vectors 0-1 are low nibbles (inputs 0..16), vectors 2-3 high nibbles (inputs 16..32).
const NIBBLE_ORDER: [usize; BLOCK] = {
    let mut order = [0usize; BLOCK];
    let mut v = 0;
    while v < 4 {
        let mut lane = 0;
        while lane < 8 {
            let byte = 4 * (lane % 4) + 2 * (v % 2) + lane / 4;
            order[v * 8 + lane] = byte + 16 * (v / 2);
            lane += 1;
        }
        v += 1;
    }
    order
};

impl<'a> Prepared<'a> {
    fn new(format: BlockFormat, path: KernelPath, x: &'a [f32]) -> Prepared<'a> {
        let sums = x.chunks_exact(BLOCK).map(|c| c.iter().sum::<f32>());
        let nibbles = format != BlockFormat::Q8_0;
        if path == KernelPath::Avx2 && nibbles {
            let permuted: Vec<f32> = x
                .chunks_exact(BLOCK)
                .flat_map(|c| NIBBLE_ORDER.iter().map(move |&i| c[i]))
                .collect();
            let pairs = sums
                .flat_map(|sum| match format {
                    BlockFormat::Q4_1 => [0.0, sum],
                    _ => [-8.0 * sum, 0.0],
                })
                .collect();
            return Prepared {
                x: permuted.into(),
                xsum: pairs,
                xsum_per_block: 2,
            };
        }
        Prepared {
            // Read as it is: no copy.
            x: x.into(),
            xsum: sums.collect(),
            xsum_per_block: 1,
        }
    }
}

/// One row of blocks against one prepared input row (lengths checked by the caller's
/// construction).
fn dot(format: BlockFormat, path: KernelPath, row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if path == KernelPath::Avx2 {
        // SAFETY: `Avx2` is only selected after run-time detection of avx2, fma and f16c
        // (`detect`, `with_path`); slice lengths match the block count (checked in `from_bytes`
        // and `matmul`) and the kernels assert it again.
        return unsafe { avx2::dot(format, row, x, xsum) };
    }
    let _ = path;
    scalar_dot(format, row, x, xsum)
}

/// `out[i]` = row `i` of `rows` (each `rb` bytes) against one prepared input row: one call per
/// run of rows, so the per-call cost (dispatch, stack set-up, checks) is not paid per row.
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
        // SAFETY: as in `dot`.
        unsafe { avx2::dot_rows(format, rows, rb, x, xsum, out) };
        return;
    }
    for (row, y) in rows.chunks_exact(rb).zip(out.iter_mut()) {
        *y = scalar_dot(format, row, x, xsum);
    }
}

/// The reference implementation: dequantise a block, multiply, accumulate in f32.
pub fn scalar_dot(format: BlockFormat, row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    let bb = format.block_bytes();
    let mut acc = 0f32;
    for (b, blk) in row.chunks_exact(bb).enumerate() {
        let xb = &x[b * BLOCK..(b + 1) * BLOCK];
        let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        match format {
            BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
                let (m, qs) = if format == BlockFormat::Q4_1 {
                    (f16::from_le_bytes([blk[2], blk[3]]).to_f32(), &blk[4..20])
                } else {
                    (-8.0 * d, &blk[2..18])
                };
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
    use super::{BlockFormat, BLOCK};
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn half(p: *const u8) -> f32 {
        // SAFETY: the caller passes a pointer to two readable bytes.
        let bits = unsafe { std::ptr::read_unaligned(p as *const u16) };
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// [`dot`] for consecutive rows of `rb` bytes.
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
        for (row, y) in rows.chunks_exact(rb).zip(out.iter_mut()) {
            // SAFETY: same target features; `dot` checks the lengths.
            *y = unsafe { dot(format, row, x, xsum) };
        }
    }

    /// Σ over blocks of `d · Σ q·x (+ m · Σ x)`.
    ///
    /// # Safety
    /// The CPU must support avx2, fma and f16c.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot(format: BlockFormat, row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
        if format != BlockFormat::Q8_0 {
            // SAFETY: same target features; the prepared layout is the nibble one.
            return unsafe { dot_q4(format, row, x, xsum) };
        }
        let bb = format.block_bytes();
        let nb = x.len() / BLOCK;
        assert!(
            row.len() >= nb * bb && xsum.len() >= nb,
            "block/input length mismatch"
        );
        // Q8_0 from here on. Blocks go in pairs with one accumulator each, to hide the FMA
        // latency of the accumulation chain.
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut b = 0;
        // SAFETY: every block index used is < nb, so the block (bb bytes at b * bb) and the
        // 32 inputs at b * 32 are in bounds (asserted above).
        unsafe {
            while b + 1 < nb {
                acc0 = q8_block(row.as_ptr().add(b * bb), x.as_ptr().add(b * BLOCK), acc0);
                let next = b + 1;
                acc1 = q8_block(
                    row.as_ptr().add(next * bb),
                    x.as_ptr().add(next * BLOCK),
                    acc1,
                );
                b += 2;
            }
            if b < nb {
                acc0 = q8_block(row.as_ptr().add(b * bb), x.as_ptr().add(b * BLOCK), acc0);
            }
            hsum(_mm256_add_ps(acc0, acc1))
        }
    }

    /// One Q8_0 block: `acc += d · Σ q·x`.
    ///
    /// # Safety
    /// `blk` must point to 34 readable bytes and `xp` to 32 floats; the CPU must support
    /// avx2, fma and f16c.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_block(blk: *const u8, xp: *const f32, acc: __m256) -> __m256 {
        // SAFETY: the caller guarantees the block and the inputs are readable.
        unsafe {
            let d = half(blk);
            let lo = _mm_loadu_si128(blk.add(2) as *const __m128i);
            let hi = _mm_loadu_si128(blk.add(18) as *const __m128i);
            let q0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
            let q1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
            let q2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
            let q3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
            let mut s = _mm256_mul_ps(q0, _mm256_loadu_ps(xp));
            s = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xp.add(8)), s);
            s = _mm256_fmadd_ps(q2, _mm256_loadu_ps(xp.add(16)), s);
            s = _mm256_fmadd_ps(q3, _mm256_loadu_ps(xp.add(24)), s);
            _mm256_fmadd_ps(_mm256_set1_ps(d), s, acc)
        }
    }

    /// Eight 4-bit values as f32: each lane of `w` shifted by its count, masked, converted.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn nibbles(w: __m256i, shift: __m256i, mask: __m256i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(w, shift), mask))
    }

    /// Q4_0 / Q4_1 against an input prepared in `NIBBLE_ORDER` with offset pairs.
    ///
    /// Each block's 16 bytes are broadcast to both halves of a register and shifted per lane
    /// (0/8, 16/24, 4/12, 20/28 bits) and masked: four vectors of eight 4-bit values with no
    /// byte shuffle, so the loop runs on shift, convert and FMA units only. Blocks go in pairs
    /// with one accumulator each (kept in registers) to hide the FMA latency.
    ///
    /// # Safety
    /// The CPU must support avx2, fma and f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q4(format: BlockFormat, row: &[u8], x: &[f32], pairs: &[f32]) -> f32 {
        // SAFETY (both calls): same target features; the caller's contract is forwarded.
        match format {
            BlockFormat::Q4_1 => unsafe { dot_q4_blocks::<true>(row, x, pairs) },
            _ => unsafe { dot_q4_blocks::<false>(row, x, pairs) },
        }
    }

    /// One block: `acc += d · Σ q·x` and `offset += [d, m] · pair`.
    ///
    /// # Safety
    /// `blk` must point to one block (20 bytes for `MIN`, else 18), `xp` to 32 readable
    /// floats and `pair` to 2; the CPU must support avx2, fma and f16c.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_block<const MIN: bool>(
        blk: *const u8,
        xp: *const f32,
        pair: *const f32,
        shifts: &[__m256i; 4],
        mask: __m256i,
        acc: __m256,
        offset: __m128,
    ) -> (__m256, __m128) {
        // SAFETY: the caller guarantees the pointers cover one block, 32 inputs and a pair.
        unsafe {
            // [d, m] (Q4_1) or [d, 0] (Q4_0) from the block's f16 header.
            let bits = if MIN {
                std::ptr::read_unaligned(blk as *const u32) as i32
            } else {
                std::ptr::read_unaligned(blk as *const u16) as i32
            };
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
            let pair = _mm_castsi128_ps(_mm_loadl_epi64(pair as *const __m128i));
            let offset = _mm_fmadd_ps(dm, pair, offset);
            let qs_at = if MIN { 4 } else { 2 };
            let w = _mm256_broadcastsi128_si256(_mm_loadu_si128(blk.add(qs_at) as *const __m128i));
            let mut s = _mm256_mul_ps(nibbles(w, shifts[0], mask), _mm256_loadu_ps(xp));
            s = _mm256_fmadd_ps(nibbles(w, shifts[1], mask), _mm256_loadu_ps(xp.add(8)), s);
            s = _mm256_fmadd_ps(nibbles(w, shifts[2], mask), _mm256_loadu_ps(xp.add(16)), s);
            s = _mm256_fmadd_ps(nibbles(w, shifts[3], mask), _mm256_loadu_ps(xp.add(24)), s);
            (_mm256_fmadd_ps(_mm256_broadcastss_ps(dm), s, acc), offset)
        }
    }

    /// # Safety
    /// The CPU must support avx2, fma and f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q4_blocks<const MIN: bool>(row: &[u8], x: &[f32], pairs: &[f32]) -> f32 {
        let bb = if MIN { 20 } else { 18 };
        let nb = x.len() / BLOCK;
        assert!(
            row.len() >= nb * bb && pairs.len() >= 2 * nb,
            "block/input length mismatch"
        );
        let mask = _mm256_set1_epi32(0x0F);
        let shifts = [
            _mm256_setr_epi32(0, 0, 0, 0, 8, 8, 8, 8),
            _mm256_setr_epi32(16, 16, 16, 16, 24, 24, 24, 24),
            _mm256_setr_epi32(4, 4, 4, 4, 12, 12, 12, 12),
            _mm256_setr_epi32(20, 20, 20, 20, 28, 28, 28, 28),
        ];
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let (mut off0, mut off1) = (_mm_setzero_ps(), _mm_setzero_ps());
        let (r, xs, ps) = (row.as_ptr(), x.as_ptr(), pairs.as_ptr());
        let mut b = 0;
        // SAFETY: every block index used is < nb, so blocks, inputs and pairs are in bounds
        // (asserted above).
        unsafe {
            while b + 1 < nb {
                (acc0, off0) = q4_block::<MIN>(
                    r.add(b * bb),
                    xs.add(b * BLOCK),
                    ps.add(2 * b),
                    &shifts,
                    mask,
                    acc0,
                    off0,
                );
                (acc1, off1) = q4_block::<MIN>(
                    r.add((b + 1) * bb),
                    xs.add((b + 1) * BLOCK),
                    ps.add(2 * (b + 1)),
                    &shifts,
                    mask,
                    acc1,
                    off1,
                );
                b += 2;
            }
            if b < nb {
                (acc0, off0) = q4_block::<MIN>(
                    r.add(b * bb),
                    xs.add(b * BLOCK),
                    ps.add(2 * b),
                    &shifts,
                    mask,
                    acc0,
                    off0,
                );
            }
            let off = _mm_add_ps(off0, off1);
            let off = _mm_add_ss(off, _mm_shuffle_ps(off, off, 1));
            hsum(_mm256_add_ps(acc0, acc1)) + _mm_cvtss_f32(off)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Deterministic pseudo-random values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
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

    #[test]
    fn every_path_matches_dequantise_then_dot() {
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            for (rows, cols, m) in [(1, 32, 1), (37, 96, 1), (130, 576, 3), (19, 1536, 2)] {
                let w =
                    Tensor::from_vec(values(rows * cols, rows as u64), (rows, cols), &Device::Cpu)
                        .expect("w");
                let q = QTensor::quantize(&w, dtype).expect("quantize");
                let dense = q.dequantize(&Device::Cpu).expect("dequantize");
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
            // Odd row counts so task chunks straddle the part boundaries.
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
    fn rejects_inconsistent_shapes() {
        assert!(QuantMatrix::from_bytes(BlockFormat::Q8_0, 2, 32, vec![0; 10]).is_err());
        let q = QuantMatrix::from_bytes(BlockFormat::Q8_0, 1, 32, vec![0; 34]).expect("ok");
        assert!(q.matmul(&[0.0; 31], 1).is_err());
    }
}
