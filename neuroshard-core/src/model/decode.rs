//! The per-token inference path on plain f32 slices: RMSNorm, rotary embeddings, attention
//! over the KV cache and the gated MLP for a few positions at a time.
//!
//! Decoding one token through a 135M model is ~100 µs of arithmetic per layer outside the
//! matrix products; through candle the same work is ~20 tensor ops per layer, each allocating
//! and some dispatching to the thread pool, which cost more than the arithmetic itself. This
//! module computes the same formulas (same order of operations per value, f32 throughout)
//! directly on buffers. Training and long prompts keep the candle path ([`super::layers`]).

use crate::error::{Error, Result};
use crate::kernels::KernelPath;
use candle_core::{CpuStorage, Storage, Tensor};
use rayon::prelude::*;

/// Calls `f` with a tensor's values as a contiguous f32 slice, borrowed from candle's storage
/// when possible (so a trained parameter is read as it is now, without a copy).
pub(crate) fn with_f32<T>(t: &Tensor, f: impl FnOnce(&[f32]) -> T) -> Result<T> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(f(&v[start..end]));
        }
    }
    let copy: Vec<f32> = t
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    Ok(f(&copy))
}

/// `out[r] = x[r] / sqrt(mean(x[r]²) + eps) · w` for each row `r` of `x` (rows of `w.len()`),
/// as candle's `rms_norm` computes it.
pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) -> Result<()> {
    let width = w.len();
    if width == 0 || x.len() % width != 0 || out.len() != x.len() {
        return Err(Error::BadInput(format!(
            "rms_norm of {} values with a weight of {width} into {}",
            x.len(),
            out.len()
        )));
    }
    for (row, o) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        let sum2: f32 = row.iter().map(|v| v * v).sum();
        let m = (sum2 / width as f32 + eps).sqrt();
        for ((o, v), w) in o.iter_mut().zip(row).zip(w) {
            *o = v / m * w;
        }
    }
    Ok(())
}

/// Rotates `x`, laid out `[seq][heads][head_dim]`, for positions `start..start+seq` with
/// per-position tables `cos`/`sin` of `head_dim / 2` values. `interleaved` pairs neighbours
/// (`x[2i]`, `x[2i+1]`) as GPT-J does; otherwise halves (`x[i]`, `x[i + d/2]`) as Llama does.
pub(crate) fn rope(
    x: &mut [f32],
    heads: usize,
    head_dim: usize,
    cos: &[f32],
    sin: &[f32],
    interleaved: bool,
) {
    let half = head_dim / 2;
    for (pos, row) in x.chunks_exact_mut(heads * head_dim).enumerate() {
        let (c, s) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
        for v in row.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let (a, b) = if interleaved {
                    (2 * i, 2 * i + 1)
                } else {
                    (i, i + half)
                };
                let (x1, x2) = (v[a], v[b]);
                v[a] = x1 * c[i] - x2 * s[i];
                v[b] = x2 * c[i] + x1 * s[i];
            }
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

/// Causal grouped-query attention for `seq` queries at positions `start..start+seq`.
///
/// `q` is `[seq][heads][head_dim]`; `kv(h)` gives kv head `h`'s cached keys and values for
/// positions `0..start+seq` (`head_dim` values each); query head `h` reads kv head
/// `h / (heads / kv_heads)`. Writes `[seq][heads][head_dim]` into `out`; `scores` is scratch.
/// `path` picks the instruction set (callers pass [`KernelPath::detect`]; tests run each).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention<'a>(
    path: KernelPath,
    q: &[f32],
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    start: usize,
    kv: impl Fn(usize) -> (&'a [f32], &'a [f32]) + Sync,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let groups = (heads / kv_heads.max(1)).max(1);
    let scale = (1.0 / (head_dim as f64).sqrt()) as f32;
    let width = heads * head_dim;
    // Output head `index` (query row i = index / heads, head h = index % heads).
    let one = |index: usize, oh: &mut [f32], scores: &mut Vec<f32>| {
        let (i, h) = (index / heads, index % heads);
        // Query i sees keys 0..=start+i.
        let n = start + i + 1;
        let (keys, values) = kv(h / groups);
        let qh = &q[i * width + h * head_dim..][..head_dim];
        let (keys, values) = (&keys[..n * head_dim], &values[..n * head_dim]);
        #[cfg(target_arch = "x86_64")]
        if path == KernelPath::Avx2 && head_dim % 8 == 0 && KernelPath::Avx2.available() {
            // SAFETY: avx2 and fma are available (checked); lengths are n · head_dim.
            unsafe { avx2::attend(qh, keys, values, scale, scores, oh) };
            return;
        }
        attend_scalar(qh, keys, values, scale, scores, oh);
    };
    let rows = out.len() / width.max(1);
    let work = (start + rows) * rows * width;
    if work >= PARALLEL_ATTENTION
        && rayon::current_num_threads() > 1
        && crate::runtime::spread_work()
    {
        // Long contexts: heads over the pool (each streams its keys and values).
        out.par_chunks_mut(head_dim)
            .enumerate()
            .for_each_init(Vec::new, |scores, (index, oh)| one(index, oh, scores));
    } else {
        for (index, oh) in out.chunks_exact_mut(head_dim).enumerate() {
            one(index, oh, scores);
        }
    }
}

/// From this many key values read per step on, attention heads run in parallel: below it
/// (contexts up to ~100 positions on SmolLM2) a pool dispatch costs more than it saves.
const PARALLEL_ATTENTION: usize = 1 << 16;

/// One query head over `n` keys and values (`keys.len() / q.len()`): the reference loops.
fn attend_scalar(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let d = q.len();
    scores.clear();
    scores.extend(keys.chunks_exact(d).map(|k| dot(q, k) * scale));
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    out.fill(0.0);
    for (p, v) in scores.iter().zip(values.chunks_exact(d)) {
        let p = p / sum;
        for (o, v) in out.iter_mut().zip(v) {
            *o += p * v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! AVX2 + FMA attention for head widths that are multiples of 8: scores four keys at a
    //! time, a vectorised `exp`, and the weighted sum of values accumulated in registers.

    use std::arch::x86_64::*;

    /// `exp(x)` for eight lanes (Cephes' single-precision method: `2^n · e^r` with
    /// `|r| ≤ ln2/2` and a degree-6 polynomial; within 2 ulp of `f32::exp` on the range
    /// softmax uses, and 0 below -87).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp8(x: __m256) -> __m256 {
        let underflow = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(-87.0));
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.0)),
            _mm256_set1_ps(88.0),
        );
        let n = _mm256_floor_ps(_mm256_fmadd_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
            _mm256_set1_ps(0.5),
        ));
        // r = x - n·ln2, with ln2 split in two for precision.
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let r2 = _mm256_mul_ps(r, r);
        let e = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
        let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        let y = _mm256_mul_ps(e, _mm256_castsi256_ps(pow2));
        _mm256_andnot_ps(underflow, y)
    }

    /// `gate = silu(gate) · up` over whole vectors of eight; returns how many were done.
    ///
    /// # Safety
    /// The CPU must support avx2 and fma; `up` is at least as long as `gate`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) -> usize {
        let n = gate.len() / 8 * 8;
        assert!(up.len() >= n, "silu_mul lengths");
        let one = _mm256_set1_ps(1.0);
        for i in (0..n).step_by(8) {
            // SAFETY: i + 8 <= n, within both slices.
            unsafe {
                let g = _mm256_loadu_ps(gate.as_ptr().add(i));
                let u = _mm256_loadu_ps(up.as_ptr().add(i));
                let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
                let y = _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), u);
                _mm256_storeu_ps(gate.as_mut_ptr().add(i), y);
            }
        }
        n
    }

    /// Lanes 0-3: the sums of `a`, `b`, `c`, `d`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum4(a: __m256, b: __m256, c: __m256, d: __m256) -> __m128 {
        let s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
        _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1))
    }

    /// One query head: `out = softmax(scale · K q) V` over `keys.len() / q.len()` positions.
    ///
    /// # Safety
    /// The CPU must support avx2 and fma; `q.len()` is a multiple of 8 and `keys`, `values`
    /// hold the same whole number of rows of it; `out.len() == q.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn attend(
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        scale: f32,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let d = q.len();
        let n = keys.len() / d;
        assert!(
            d % 8 == 0 && keys.len() == n * d && values.len() == n * d && out.len() == d,
            "attention shapes"
        );
        // Padded to whole vectors with -inf, whose exp is 0.
        scores.clear();
        scores.resize(n.div_ceil(8) * 8, f32::NEG_INFINITY);
        let (qp, kp, vp) = (q.as_ptr(), keys.as_ptr(), values.as_ptr());
        let vscale = _mm_set1_ps(scale);
        // SAFETY: every read is below n·d (keys, values) or d (q); writes below the padded
        // length of `scores` and d of `out`.
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
            let max = scores[..n].iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            let (vmax, mut vsum) = (_mm256_set1_ps(max), _mm256_setzero_ps());
            for chunk in scores.chunks_exact_mut(8) {
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(chunk.as_ptr()), vmax));
                vsum = _mm256_add_ps(vsum, e);
                _mm256_storeu_ps(chunk.as_mut_ptr(), e);
            }
            let z = _mm256_setzero_ps();
            let sum = _mm256_set1_ps(_mm_cvtss_f32(hsum4(vsum, z, z, z)));
            for chunk in scores.chunks_exact_mut(8) {
                let p = _mm256_div_ps(_mm256_loadu_ps(chunk.as_ptr()), sum);
                _mm256_storeu_ps(chunk.as_mut_ptr(), p);
            }
            // Σ p_j v_j, 64 output values (eight registers) per pass over the positions.
            for c0 in (0..d).step_by(64) {
                let width = (d - c0).min(64) / 8;
                let mut acc = [_mm256_setzero_ps(); 8];
                for (j, &p) in scores[..n].iter().enumerate() {
                    let pv = _mm256_set1_ps(p);
                    let row = vp.add(j * d + c0);
                    for (k, a) in acc.iter_mut().enumerate().take(width) {
                        *a = _mm256_fmadd_ps(pv, _mm256_loadu_ps(row.add(8 * k)), *a);
                    }
                }
                for (k, a) in acc.iter().enumerate().take(width) {
                    _mm256_storeu_ps(out.as_mut_ptr().add(c0 + 8 * k), *a);
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn exp8_is_within_a_few_ulp_of_exp() {
            if !crate::kernels::KernelPath::Avx2.available() {
                return;
            }
            let mut worst = 0f32;
            for i in 0..20_000 {
                let x = -90.0 + i as f32 * 0.0046; // -90 .. 2
                let mut out = [0f32; 8];
                // SAFETY: avx2 and fma are available (checked above).
                unsafe { _mm256_storeu_ps(out.as_mut_ptr(), exp8(_mm256_set1_ps(x))) };
                let want = x.exp();
                if x < -87.0 {
                    assert!(out[0] <= want.max(1e-37), "exp({x}) = {}", out[0]);
                    continue;
                }
                worst = worst.max((out[0] - want).abs() / want);
            }
            assert!(worst < 5e-7, "relative error {worst}");
        }
    }
}

/// `gate = silu(gate) · up`, element by element.
pub(crate) fn silu_mul(gate: &mut [f32], up: &[f32]) {
    silu_mul_on(KernelPath::detect(), gate, up)
}

/// [`silu_mul`] on a chosen instruction set.
pub(crate) fn silu_mul_on(path: KernelPath, gate: &mut [f32], up: &[f32]) {
    let n = gate.len().min(up.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if path == KernelPath::Avx2 && KernelPath::Avx2.available() {
        // SAFETY: avx2 and fma are available (checked); it stops at n.
        done = unsafe { avx2::silu_mul(&mut gate[..n], &up[..n]) };
    }
    let _ = path;
    for (g, u) in gate[done..n].iter_mut().zip(&up[done..n]) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// `x += y`, element by element.
pub(crate) fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 + 1.0) * 0.37 + seed as f32).sin())
            .collect()
    }

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "[{i}] {x} vs {y}");
        }
    }

    fn to_vec(t: &Tensor) -> Vec<f32> {
        t.flatten_all().and_then(|t| t.to_vec1()).expect("vec")
    }

    #[test]
    fn rms_norm_matches_candle() {
        let (x, w) = (values(3 * 40, 1), values(40, 2));
        let mut out = vec![0f32; x.len()];
        rms_norm(&x, &w, 1e-5, &mut out).expect("norm");
        let xt = Tensor::from_slice(&x, (3, 40), &Device::Cpu).expect("x");
        let wt = Tensor::from_slice(&w, 40, &Device::Cpu).expect("w");
        let want = candle_nn::ops::rms_norm(&xt, &wt, 1e-5).expect("candle");
        close(&out, &to_vec(&want), 1e-6);
        assert!(rms_norm(&x, &w[..7], 1e-5, &mut out).is_err());
    }

    #[test]
    fn rope_matches_candle_both_layouts() {
        let (seq, heads, d) = (3, 2, 8);
        let x = values(seq * heads * d, 3);
        let (cos, sin) = (values(seq * d / 2, 4), values(seq * d / 2, 5));
        // candle wants [b, heads, seq, d].
        let xt = Tensor::from_slice(&x, (1, seq, heads, d), &Device::Cpu)
            .and_then(|t| t.transpose(1, 2)?.contiguous())
            .expect("x");
        let ct = Tensor::from_slice(&cos, (seq, d / 2), &Device::Cpu).expect("cos");
        let st = Tensor::from_slice(&sin, (seq, d / 2), &Device::Cpu).expect("sin");
        for interleaved in [false, true] {
            let mut got = x.clone();
            rope(&mut got, heads, d, &cos, &sin, interleaved);
            let want = if interleaved {
                candle_nn::rotary_emb::rope_i(&xt, &ct, &st)
            } else {
                candle_nn::rotary_emb::rope(&xt, &ct, &st)
            }
            .and_then(|t| t.transpose(1, 2))
            .expect("candle");
            close(&got, &to_vec(&want), 1e-6);
        }
    }

    #[test]
    fn attention_matches_masked_softmax() {
        // 4 query heads over 2 kv heads, 3 new positions after cached ones; head widths that
        // take the vector path (8, 64, 72: two passes over the values) and one that does not;
        // a long context whose heads run in parallel.
        for (d, start) in [(8, 5), (64, 6), (72, 13), (6, 2), (64, 400)] {
            for path in [KernelPath::Scalar, KernelPath::Avx2] {
                if path.available() {
                    check_attention(path, d, start);
                }
            }
        }
    }

    fn check_attention(path: KernelPath, d: usize, start: usize) {
        let (heads, kv_heads, seq) = (4, 2, 3);
        let n = start + seq;
        let q = values(seq * heads * d, 6);
        let k: Vec<Vec<f32>> = (0..kv_heads).map(|h| values(n * d, 7 + h as u32)).collect();
        let v: Vec<Vec<f32>> = (0..kv_heads).map(|h| values(n * d, 9 + h as u32)).collect();
        let mut out = vec![0f32; q.len()];
        let mut scores = Vec::new();
        attention(
            path,
            &q,
            heads,
            kv_heads,
            d,
            start,
            |h| (&k[h][..], &v[h][..]),
            &mut scores,
            &mut out,
        );
        for i in 0..seq {
            for h in 0..heads {
                let g = h / (heads / kv_heads);
                let qh = Tensor::from_slice(&q[(i * heads + h) * d..][..d], (1, d), &Device::Cpu)
                    .expect("q");
                let visible = start + i + 1;
                let kt = Tensor::from_slice(&k[g][..visible * d], (visible, d), &Device::Cpu)
                    .expect("k");
                let vt = Tensor::from_slice(&v[g][..visible * d], (visible, d), &Device::Cpu)
                    .expect("v");
                let s = (qh.matmul(&kt.t().expect("t")).expect("s") / (d as f64).sqrt())
                    .expect("scale");
                let p = candle_nn::ops::softmax(&s, D::Minus1).expect("softmax");
                let want = to_vec(&p.matmul(&vt).expect("pv"));
                close(&out[(i * heads + h) * d..][..d], &want, 1e-5);
                let _ = path;
            }
        }
    }

    #[test]
    fn silu_mul_and_add() {
        let silu = |x: f32| x / (1.0 + (-x).exp());
        // 19 values: two vectors of eight and a scalar tail; large |x| too (exp underflow).
        let g0: Vec<f32> = (0..19).map(|i| (i as f32 - 9.0) * 11.3).collect();
        let up = values(19, 4);
        let want: Vec<f32> = g0.iter().zip(&up).map(|(g, u)| silu(*g) * u).collect();
        for path in [KernelPath::Scalar, KernelPath::Avx2] {
            if path.available() {
                let mut g = g0.clone();
                silu_mul_on(path, &mut g, &up);
                close(&g, &want, 1e-6);
            }
        }
        let mut g = vec![-2.0f32, 0.0, 3.0];
        silu_mul(&mut g, &[1.0, 5.0, 2.0]);
        close(&g, &[silu(-2.0), 0.0, silu(3.0) * 2.0], 1e-7);
        add_assign(&mut g, &[1.0, 1.0, 1.0]);
        close(&g, &[silu(-2.0) + 1.0, 1.0, silu(3.0) * 2.0 + 1.0], 1e-7);
    }
}
