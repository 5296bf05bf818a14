//! The per-token inference path on plain f32 slices: RMSNorm, rotary embeddings, attention
//! over the KV cache and the gated MLP for a few positions at a time.
//!
//! Decoding one token through a 135M model is ~100 µs of arithmetic per layer outside the
//! matrix products; through candle the same work is ~20 tensor ops per layer, each allocating
//! and some dispatching to the thread pool, which cost more than the arithmetic itself. This
//! module computes the same formulas (same order of operations per value, f32 throughout)
//! directly on buffers. Training and long prompts keep the candle path ([`super::layers`]).

use crate::error::{Error, Result};
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
/// `q` is `[seq][heads][head_dim]`; `keys(h)` / `values(h)` give kv head `h`'s cached positions
/// `0..start+seq` (`head_dim` values each); query head `h` reads kv head `h / (heads /
/// kv_heads)`. Writes `[seq][heads][head_dim]` into `out`; `scores` is scratch.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention<'a>(
    q: &[f32],
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    start: usize,
    kv: impl Fn(usize) -> (&'a [f32], &'a [f32]),
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let groups = heads / kv_heads.max(1);
    let scale = (1.0 / (head_dim as f64).sqrt()) as f32;
    let width = heads * head_dim;
    for (i, (q_row, o_row)) in q
        .chunks_exact(width)
        .zip(out.chunks_exact_mut(width))
        .enumerate()
    {
        // Query i sees keys 0..=start+i.
        let n = start + i + 1;
        for h in 0..heads {
            let (keys, values) = kv(h / groups.max(1));
            let qh = &q_row[h * head_dim..(h + 1) * head_dim];
            scores.clear();
            scores.extend(
                keys.chunks_exact(head_dim)
                    .take(n)
                    .map(|k| dot(qh, k) * scale),
            );
            let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let oh = &mut o_row[h * head_dim..(h + 1) * head_dim];
            oh.fill(0.0);
            for (p, v) in scores.iter().zip(values.chunks_exact(head_dim)) {
                let p = p / sum;
                for (o, v) in oh.iter_mut().zip(v) {
                    *o += p * v;
                }
            }
        }
    }
}

/// `gate = silu(gate) · up`, element by element.
pub(crate) fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
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
        // 4 query heads over 2 kv heads, 3 new positions after 5 cached ones.
        let (heads, kv_heads, d, start, seq) = (4, 2, 8, 5, 3);
        let n = start + seq;
        let q = values(seq * heads * d, 6);
        let k: Vec<Vec<f32>> = (0..kv_heads).map(|h| values(n * d, 7 + h as u32)).collect();
        let v: Vec<Vec<f32>> = (0..kv_heads).map(|h| values(n * d, 9 + h as u32)).collect();
        let mut out = vec![0f32; q.len()];
        let mut scores = Vec::new();
        attention(
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
            }
        }
    }

    #[test]
    fn silu_mul_and_add() {
        let mut g = vec![-2.0f32, 0.0, 3.0];
        silu_mul(&mut g, &[1.0, 5.0, 2.0]);
        let silu = |x: f32| x / (1.0 + (-x).exp());
        close(&g, &[silu(-2.0), 0.0, silu(3.0) * 2.0], 1e-7);
        add_assign(&mut g, &[1.0, 1.0, 1.0]);
        close(&g, &[silu(-2.0) + 1.0, 1.0, silu(3.0) * 2.0 + 1.0], 1e-7);
    }
}
