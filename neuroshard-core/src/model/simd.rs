//! AVX2 helpers shared by the f32 kernels ([`super::decode`], [`super::attention`]).

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

/// `exp(x)` for eight lanes (Cephes' single-precision method: `2^n · e^r` with
/// `|r| ≤ ln2/2` and a degree-6 polynomial; within 2 ulp of `f32::exp` on the range
/// softmax uses, and 0 below -87).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn exp8(x: __m256) -> __m256 {
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

/// Lanes 0-3: the sums of `a`, `b`, `c`, `d`.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn hsum4(a: __m256, b: __m256, c: __m256, d: __m256) -> __m128 {
    let s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1))
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
