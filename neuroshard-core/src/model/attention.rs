//! Causal grouped-query attention over cached keys and values, tiled the way flash attention
//! is: keys are visited in blocks of [`KEY_BLOCK`] positions with an online softmax (a running
//! maximum, sum and weighted value sum per query row), so no `[heads, seq, keys]` score matrix
//! exists. The working set is one key block of scores per row plus the rows' accumulators.
//!
//! Every query row (position `p`, head `h`) sees the same key blocks, aligned to absolute
//! positions, in the same order, with the same arithmetic, whichever other rows share its task.
//! A row's bits therefore do not depend on how a prompt was chunked or how many rows ran
//! together: chunked prefill reproduces unchunked attention exactly, and a batched decode step
//! reproduces a solo one.

use crate::kernels::KernelPath;
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// Keys per block of the online softmax (and the f16 → f32 conversion unit).
pub(crate) const KEY_BLOCK: usize = 64;

/// Query positions per task once a step has more than one tile of them: the rows of one tile
/// (positions × the query heads of one kv head) reuse each key block while it is in cache.
const TILE_POSITIONS: usize = 16;

/// From this many key values read per step on, tasks run on the thread pool: below it
/// (contexts up to ~100 positions on SmolLM2) a pool dispatch costs more than it saves.
const PARALLEL_ATTENTION: usize = 1 << 16;

/// The cached keys or values of one kv head, position by position (`head_dim` values each).
#[derive(Debug, Clone, Copy)]
pub(crate) enum KvRows<'a> {
    /// Stored as f32.
    F32(&'a [f32]),
    /// Stored as f16 (converted to f32 one key block at a time).
    F16(&'a [f16]),
}

impl KvRows<'_> {
    fn len(&self) -> usize {
        match self {
            KvRows::F32(v) => v.len(),
            KvRows::F16(v) => v.len(),
        }
    }

    /// Values `range` as f32: borrowed when stored as f32, else converted into `buf`.
    fn block<'b>(&'b self, range: std::ops::Range<usize>, buf: &'b mut Vec<f32>) -> &'b [f32] {
        match self {
            KvRows::F32(v) => &v[range],
            KvRows::F16(v) => {
                // `half`'s slice conversion uses F16C when the CPU has it (per-value
                // conversion is ~10x slower).
                buf.resize(range.len(), 0.0);
                v[range].convert_to_f32_slice(buf);
                buf
            }
        }
    }
}

/// The geometry of one attention step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttentionShape {
    /// Query heads.
    pub(crate) heads: usize,
    /// Key/value heads; query head `h` reads kv head `h / (heads / kv_heads)`.
    pub(crate) kv_heads: usize,
    /// Width of one head.
    pub(crate) head_dim: usize,
    /// Absolute position of the first query row.
    pub(crate) start: usize,
}

/// One task: query positions `positions` (relative to `start`) of query heads `heads`, all
/// reading kv head `kv`.
#[derive(Debug, Clone)]
struct Task {
    kv: usize,
    positions: std::ops::Range<usize>,
    heads: std::ops::Range<usize>,
}

/// Causal attention for `seq` query positions `start..start+seq`.
///
/// `q` and `out` are `[seq][heads][head_dim]`; `kv(g)` gives kv head `g`'s keys and values for
/// at least positions `0..start+seq`. Query position `i` attends to keys `0..=start+i`.
/// `path` picks the instruction set (callers pass [`KernelPath::detect`]; tests force each).
pub(crate) fn attention<'a>(
    path: KernelPath,
    q: &[f32],
    shape: AttentionShape,
    kv: impl Fn(usize) -> (KvRows<'a>, KvRows<'a>) + Sync,
    out: &mut [f32],
) {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim: d,
        start,
    } = shape;
    let width = heads * d;
    if width == 0 || kv_heads == 0 {
        return;
    }
    let groups = (heads / kv_heads).max(1);
    let seq = out.len() / width;
    // A step of a few positions (decode) splits by query head, so every core has work; a
    // longer one by tiles of positions over all heads of a kv group (key blocks reused).
    let mut tasks = Vec::new();
    // An f16 cache is converted one key block at a time per task: tasks by query head would
    // convert each block once per head of the group, so those take a whole group (measured
    // at 6,000 positions on SmolLM2, 3 query heads per kv head: 15 -> 23 tokens/s decode).
    let f16_cache = matches!(kv(0).0, KvRows::F16(_));
    if seq <= TILE_POSITIONS && !(f16_cache && groups > 1) {
        for h in 0..heads {
            tasks.push(Task {
                kv: h / groups,
                positions: 0..seq,
                heads: h..h + 1,
            });
        }
    } else {
        for i0 in (0..seq).step_by(TILE_POSITIONS) {
            for g in 0..kv_heads {
                tasks.push(Task {
                    kv: g,
                    positions: i0..(i0 + TILE_POSITIONS).min(seq),
                    heads: g * groups..(g + 1) * groups,
                });
            }
        }
    }
    let work = (start + seq) * seq * width;
    let parallel = work >= PARALLEL_ATTENTION
        && rayon::current_num_threads() > 1
        && crate::runtime::spread_work();
    let run = |task: &Task| -> Vec<f32> {
        let (keys, values) = kv(task.kv);
        tile(path, q, shape, task, keys, values)
    };
    let results: Vec<Vec<f32>> = if parallel {
        tasks.par_iter().map(run).collect()
    } else {
        tasks.iter().map(run).collect()
    };
    for (task, rows) in tasks.iter().zip(results) {
        let nh = task.heads.len();
        for (r, row) in rows.chunks_exact(d).enumerate() {
            let (i, h) = (task.positions.start + r / nh, task.heads.start + r % nh);
            out[i * width + h * d..][..d].copy_from_slice(row);
        }
    }
}

/// One task's rows, `[positions][heads][head_dim]` (rows ordered position-major).
fn tile(
    path: KernelPath,
    q: &[f32],
    shape: AttentionShape,
    task: &Task,
    keys: KvRows<'_>,
    values: KvRows<'_>,
) -> Vec<f32> {
    let d = shape.head_dim;
    let width = shape.heads * d;
    let nh = task.heads.len();
    let rows = task.positions.len() * nh;
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    let mut out = vec![0f32; rows * d];
    let mut state = vec![RowState::default(); rows];
    let (mut kbuf, mut vbuf) = (Vec::new(), Vec::new());
    let mut scores = [0f32; KEY_BLOCK];
    let key_end = shape.start + task.positions.end;
    let avx2 = path == KernelPath::Avx2 && d % 8 == 0 && KernelPath::Avx2.available();
    debug_assert!(keys.len() >= key_end * d && values.len() >= key_end * d);
    for kb in (0..key_end).step_by(KEY_BLOCK) {
        let block = kb..(kb + KEY_BLOCK).min(key_end);
        let kblock = keys.block(block.start * d..block.end * d, &mut kbuf);
        let vblock = values.block(block.start * d..block.end * d, &mut vbuf);
        for r in 0..rows {
            let (i, h) = (task.positions.start + r / nh, task.heads.start + r % nh);
            let p = shape.start + i;
            if p < kb {
                continue;
            }
            // Keys kb..=p of this block are visible to position p.
            let n = (p + 1 - kb).min(block.len());
            let qh = &q[i * width + h * d..][..d];
            let o = &mut out[r * d..][..d];
            let (k, v) = (&kblock[..n * d], &vblock[..n * d]);
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: avx2 and fma are available (checked); d is a multiple of 8 and
                // k, v hold n rows of d, o holds d, n <= KEY_BLOCK.
                unsafe { avx2::update(qh, k, v, scale, &mut scores, &mut state[r], o) };
                continue;
            }
            update_scalar(qh, k, v, scale, &mut scores, &mut state[r], o);
        }
    }
    for (o, s) in out.chunks_exact_mut(d).zip(&state) {
        for x in o.iter_mut() {
            *x /= s.sum;
        }
    }
    out
}

/// The online-softmax state of one query row: the largest score so far and the sum of
/// `exp(score - max)` (the row's accumulator holds `Σ exp(score - max) · value`).
#[derive(Debug, Clone, Copy)]
struct RowState {
    max: f32,
    sum: f32,
}

impl Default for RowState {
    fn default() -> Self {
        RowState {
            max: f32::NEG_INFINITY,
            sum: 0.0,
        }
    }
}

/// Dot product with eight independent partial sums (vectorisable without reassociation).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// One query row over one block of `n = k.len() / q.len()` keys: the reference loops.
fn update_scalar(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scale: f32,
    scores: &mut [f32; KEY_BLOCK],
    state: &mut RowState,
    o: &mut [f32],
) {
    let d = q.len();
    let n = k.len() / d;
    for (s, kj) in scores.iter_mut().zip(k.chunks_exact(d)) {
        *s = dot(q, kj) * scale;
    }
    let block_max = scores[..n].iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let max = state.max.max(block_max);
    // exp(-inf) = 0 on the first block: the accumulator is still zero.
    let carry = (state.max - max).exp();
    let mut sum = 0f32;
    for s in &mut scores[..n] {
        *s = (*s - max).exp();
        sum += *s;
    }
    state.sum = state.sum * carry + sum;
    state.max = max;
    for x in o.iter_mut() {
        *x *= carry;
    }
    for (p, vj) in scores[..n].iter().zip(v.chunks_exact(d)) {
        for (x, v) in o.iter_mut().zip(vj) {
            *x += p * v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! AVX2 + FMA block update for head widths that are multiples of 8: scores four keys at a
    //! time, a vectorised `exp`, and the weighted value sum accumulated in registers.

    use super::{RowState, KEY_BLOCK};
    use crate::model::simd::{exp8, hsum4};
    use std::arch::x86_64::*;

    /// [`super::update_scalar`] with vector instructions.
    ///
    /// # Safety
    /// The CPU must support avx2 and fma; `q.len()` is a multiple of 8, `k` and `v` hold the
    /// same whole number `n <= KEY_BLOCK` of rows of it, `o.len() == q.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn update(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        scale: f32,
        scores: &mut [f32; KEY_BLOCK],
        state: &mut RowState,
        o: &mut [f32],
    ) {
        let d = q.len();
        let n = k.len() / d;
        assert!(
            d % 8 == 0 && k.len() == n * d && v.len() == n * d && o.len() == d && n <= KEY_BLOCK,
            "attention block shapes"
        );
        let (qp, kp, vp) = (q.as_ptr(), k.as_ptr(), v.as_ptr());
        let vscale = _mm_set1_ps(scale);
        let padded = n.div_ceil(8) * 8;
        // SAFETY: reads stay below n·d (k, v) and d (q, o); writes below `padded` <= KEY_BLOCK
        // in `scores` and d in `o`.
        unsafe {
            let mut j = 0;
            while j + 4 <= n {
                let mut acc = [_mm256_setzero_ps(); 4];
                for c in (0..d).step_by(8) {
                    let qv = _mm256_loadu_ps(qp.add(c));
                    for (r, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kp.add((j + r) * d + c)), *a);
                    }
                }
                let s = _mm_mul_ps(hsum4(acc[0], acc[1], acc[2], acc[3]), vscale);
                _mm_storeu_ps(scores.as_mut_ptr().add(j), s);
                j += 4;
            }
            while j < n {
                let mut acc = _mm256_setzero_ps();
                for c in (0..d).step_by(8) {
                    acc = _mm256_fmadd_ps(
                        _mm256_loadu_ps(qp.add(c)),
                        _mm256_loadu_ps(kp.add(j * d + c)),
                        acc,
                    );
                }
                let z = _mm256_setzero_ps();
                scores[j] = _mm_cvtss_f32(_mm_mul_ps(hsum4(acc, z, z, z), vscale));
                j += 1;
            }
            // Padding lanes: exp(-inf) = 0 adds nothing to the sum.
            scores[n..padded].fill(f32::NEG_INFINITY);
            let block_max = scores[..n].iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            let max = state.max.max(block_max);
            let carry = (state.max - max).exp();
            let (vmax, mut vsum) = (_mm256_set1_ps(max), _mm256_setzero_ps());
            for chunk in scores[..padded].chunks_exact_mut(8) {
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(chunk.as_ptr()), vmax));
                vsum = _mm256_add_ps(vsum, e);
                _mm256_storeu_ps(chunk.as_mut_ptr(), e);
            }
            let z = _mm256_setzero_ps();
            state.sum = state.sum * carry + _mm_cvtss_f32(hsum4(vsum, z, z, z));
            state.max = max;
            // o = carry · o + Σ p_j v_j, 64 output values (eight registers) per pass.
            let vcarry = _mm256_set1_ps(carry);
            for c0 in (0..d).step_by(64) {
                let width = (d - c0).min(64) / 8;
                let mut acc = [_mm256_setzero_ps(); 8];
                for (w, a) in acc.iter_mut().enumerate().take(width) {
                    *a = _mm256_mul_ps(_mm256_loadu_ps(o.as_ptr().add(c0 + 8 * w)), vcarry);
                }
                for (j, &p) in scores[..n].iter().enumerate() {
                    let pv = _mm256_set1_ps(p);
                    let row = vp.add(j * d + c0);
                    for (w, a) in acc.iter_mut().enumerate().take(width) {
                        *a = _mm256_fmadd_ps(pv, _mm256_loadu_ps(row.add(8 * w)), *a);
                    }
                }
                for (w, a) in acc.iter().enumerate().take(width) {
                    _mm256_storeu_ps(o.as_mut_ptr().add(c0 + 8 * w), *a);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random values in [-scale, scale).
    fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// The plain formula in f64: softmax over the visible keys' scores, then the weighted sum.
    fn reference(
        q: &[f32],
        shape: AttentionShape,
        keys: &[Vec<f32>],
        values: &[Vec<f32>],
    ) -> Vec<f64> {
        let d = shape.head_dim;
        let groups = shape.heads / shape.kv_heads;
        let seq = q.len() / (shape.heads * d);
        let mut out = vec![0f64; q.len()];
        for i in 0..seq {
            for h in 0..shape.heads {
                let (k, v) = (&keys[h / groups], &values[h / groups]);
                let qh = &q[(i * shape.heads + h) * d..][..d];
                let n = shape.start + i + 1;
                let s: Vec<f64> = (0..n)
                    .map(|j| {
                        let dot: f64 = (0..d).map(|c| qh[c] as f64 * k[j * d + c] as f64).sum();
                        dot / (d as f64).sqrt()
                    })
                    .collect();
                let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                let total: f64 = e.iter().sum();
                for c in 0..d {
                    out[(i * shape.heads + h) * d + c] =
                        (0..n).map(|j| e[j] * v[j * d + c] as f64).sum::<f64>() / total;
                }
            }
        }
        out
    }

    fn run(
        path: KernelPath,
        q: &[f32],
        shape: AttentionShape,
        keys: &[KvRows<'_>],
        values: &[KvRows<'_>],
    ) -> Vec<f32> {
        let mut out = vec![0f32; q.len()];
        attention(path, q, shape, |g| (keys[g], values[g]), &mut out);
        out
    }

    fn paths() -> Vec<KernelPath> {
        let all = [KernelPath::Scalar, KernelPath::Avx2];
        for p in all {
            if !p.available() {
                eprintln!("attention: {p:?} is not available on this CPU, skipped");
            }
        }
        all.into_iter().filter(|p| p.available()).collect()
    }

    #[test]
    fn tiled_attention_matches_the_plain_formula() {
        // (heads, kv_heads, head_dim, start, seq): GQA and MHA, head widths on and off the
        // vector path (8, 64, 72 = two value passes, 6 = scalar), a decode step after a long
        // context, a long prefill crossing many key blocks, positions not block-aligned.
        let cases = [
            (4, 2, 8, 5, 3),
            (9, 3, 64, 0, 1),
            (9, 3, 64, 700, 1),
            (4, 4, 72, 13, 40),
            (6, 2, 6, 2, 17),
            (9, 3, 64, 63, 130),
            (2, 1, 16, 1000, 33),
        ];
        for (case, &(heads, kv_heads, d, start, seq)) in cases.iter().enumerate() {
            let shape = AttentionShape {
                heads,
                kv_heads,
                head_dim: d,
                start,
            };
            let n = start + seq;
            let seed = case as u64 * 10;
            let q = random(seq * heads * d, seed, 2.0);
            let keys: Vec<Vec<f32>> = (0..kv_heads)
                .map(|g| random(n * d, seed + 1 + g as u64, 2.0))
                .collect();
            let values: Vec<Vec<f32>> = (0..kv_heads)
                .map(|g| random(n * d, seed + 5 + g as u64, 1.0))
                .collect();
            let want = reference(&q, shape, &keys, &values);
            let k32: Vec<KvRows<'_>> = keys.iter().map(|k| KvRows::F32(k)).collect();
            let v32: Vec<KvRows<'_>> = values.iter().map(|v| KvRows::F32(v)).collect();
            for path in paths() {
                let got = run(path, &q, shape, &k32, &v32);
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(g, w)| (*g as f64 - w).abs())
                    .fold(0f64, f64::max);
                assert!(worst < 2e-5, "case {case} {path:?}: max error {worst}");
            }
        }
    }

    #[test]
    fn f16_cache_matches_f32_on_rounded_values() {
        let shape = AttentionShape {
            heads: 4,
            kv_heads: 2,
            head_dim: 64,
            start: 90,
        };
        let n = 110;
        let half: Vec<Vec<f16>> = (0..2)
            .map(|g| {
                random(2 * n * 64, 40 + g, 1.0)
                    .into_iter()
                    .map(f16::from_f32)
                    .collect()
            })
            .collect();
        let widened: Vec<Vec<f32>> = half
            .iter()
            .map(|h| h.iter().map(|x| x.to_f32()).collect())
            .collect();
        // One position and a 20-position step (both as tasks by kv group for an f16 cache,
        // against tasks by query head and by tiles for f32).
        for (seq, path) in [1, 20]
            .into_iter()
            .flat_map(|s| paths().into_iter().map(move |p| (s, p)))
        {
            let q = random(seq * 4 * 64, 3, 1.0);
            let k16: Vec<KvRows<'_>> = half.iter().map(|h| KvRows::F16(&h[..n * 64])).collect();
            let v16: Vec<KvRows<'_>> = half.iter().map(|h| KvRows::F16(&h[n * 64..])).collect();
            let k32: Vec<KvRows<'_>> = widened.iter().map(|h| KvRows::F32(&h[..n * 64])).collect();
            let v32: Vec<KvRows<'_>> = widened.iter().map(|h| KvRows::F32(&h[n * 64..])).collect();
            assert_eq!(
                run(path, &q, shape, &k16, &v16),
                run(path, &q, shape, &k32, &v32),
                "{path:?}, {seq} positions: f16 storage is read exactly"
            );
        }
    }

    #[test]
    fn rows_do_not_depend_on_chunking() {
        // A 70-position prompt in one step, and in chunks of 1, 15, 16 and 17 positions: every
        // output row has the same bits (the key blocks are aligned to absolute positions).
        let (heads, kv_heads, d, total) = (6, 2, 64, 70);
        let q = random(total * heads * d, 7, 2.0);
        let keys: Vec<Vec<f32>> = (0..kv_heads)
            .map(|g| random(total * d, 8 + g as u64, 2.0))
            .collect();
        let values: Vec<Vec<f32>> = (0..kv_heads)
            .map(|g| random(total * d, 9 + g as u64, 1.0))
            .collect();
        let k: Vec<KvRows<'_>> = keys.iter().map(|k| KvRows::F32(k)).collect();
        let v: Vec<KvRows<'_>> = values.iter().map(|v| KvRows::F32(v)).collect();
        let width = heads * d;
        for path in paths() {
            let shape = |start| AttentionShape {
                heads,
                kv_heads,
                head_dim: d,
                start,
            };
            let whole = run(path, &q, shape(0), &k, &v);
            for chunk in [1, 15, 16, 17] {
                let mut pieces = Vec::new();
                for s in (0..total).step_by(chunk) {
                    let e = (s + chunk).min(total);
                    pieces.extend(run(path, &q[s * width..e * width], shape(s), &k, &v));
                }
                assert!(
                    pieces
                        .iter()
                        .zip(&whole)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{path:?}: chunks of {chunk} changed bits"
                );
            }
        }
    }
}
