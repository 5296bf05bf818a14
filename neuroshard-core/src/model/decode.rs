//! The inference path on plain f32 slices: RMSNorm, rotary embeddings and the gated MLP
//! (attention over the KV cache is [`super::attention`]).
//!
//! Decoding one token through a 135M model is ~100 µs of arithmetic per layer outside the
//! matrix products; through candle the same work is ~20 tensor ops per layer, each allocating
//! and some dispatching to the thread pool, which cost more than the arithmetic itself. This
//! module computes the same formulas (same order of operations per value, f32 throughout)
//! directly on buffers. Training keeps the candle path ([`super::layers`]).

use crate::error::{Error, Result};
use crate::kernels::KernelPath;
use candle_core::{CpuStorage, Storage, Tensor};

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

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! AVX2 + FMA SiLU gate.

    use crate::model::simd::exp8;
    use std::arch::x86_64::*;

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
    use candle_core::Device;

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
