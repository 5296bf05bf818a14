//! Position-indexed key/value cache for one layer of one session.
//!
//! Entries are addressed by absolute position: writing at position `p` first drops whatever was
//! cached from `p` on, so a retried or replayed step overwrites instead of duplicating (the swarm
//! relies on this for failover), and [`LayerKv::truncate`] rolls a session back.
//!
//! Storage is one f32 buffer per side laid out `[batch · kv_heads][capacity][head_dim]`, grown
//! by doubling: appending a decode step copies one position, not the whole prefix (a
//! `Tensor::cat` per step made decode quadratic in the context length), and each head's keys
//! are one contiguous run for the attention loop ([`crate::model::decode`]).

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};

/// Positions allocated by the first write when it is shorter.
const MIN_CAPACITY: usize = 64;

/// Cached keys and values of one layer, each logically `[batch, kv_heads, len, head_dim]`.
#[derive(Debug, Clone, Default)]
pub(crate) struct LayerKv {
    k: Vec<f32>,
    v: Vec<f32>,
    batch: usize,
    heads: usize,
    head_dim: usize,
    len: usize,
    capacity: usize,
}

impl LayerKv {
    /// Number of cached positions.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Bytes held by this layer's cache (allocated capacity, keys and values).
    pub(crate) fn bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * std::mem::size_of::<f32>()
    }

    /// The batch size of what is cached, if anything is.
    pub(crate) fn batch(&self) -> Option<usize> {
        (self.len > 0).then_some(self.batch)
    }

    /// Keeps positions `0..len`, dropping the rest (the memory stays for reuse).
    pub(crate) fn truncate(&mut self, len: usize) -> Result<()> {
        self.len = self.len.min(len);
        Ok(())
    }

    /// Makes room for `positions` positions of `[batch, heads, _, head_dim]`, keeping what is
    /// cached (the caller checked that the shape matches when anything is).
    fn reserve(&mut self, batch: usize, heads: usize, head_dim: usize, positions: usize) {
        let same_shape = (batch, heads, head_dim) == (self.batch, self.heads, self.head_dim);
        if same_shape && positions <= self.capacity {
            return;
        }
        let capacity = if same_shape {
            positions.max(2 * self.capacity)
        } else {
            positions.max(MIN_CAPACITY)
        };
        let keep = if same_shape { self.len } else { 0 };
        let (rows, old_capacity) = (batch * heads, self.capacity);
        let regrow = |old: &[f32]| {
            let mut new = vec![0f32; rows * capacity * head_dim];
            // Only a same-shape cache has anything to keep (`keep` is 0 otherwise, and the old
            // buffer's rows are laid out for another shape).
            if keep > 0 {
                for r in 0..rows {
                    let from = &old[r * old_capacity * head_dim..][..keep * head_dim];
                    new[r * capacity * head_dim..][..keep * head_dim].copy_from_slice(from);
                }
            }
            new
        };
        self.k = regrow(&self.k);
        self.v = regrow(&self.v);
        (self.batch, self.heads, self.head_dim) = (batch, heads, head_dim);
        self.capacity = capacity;
        self.len = keep;
    }

    /// Checks that a write of `[batch, heads, n, head_dim]` at `start` continues the cache.
    fn check_write(&self, start: usize, batch: usize, heads: usize, head_dim: usize) -> Result<()> {
        if start > self.len {
            // The engine checks every layer before running any; reaching this is a bug.
            return Err(Error::BadInput(format!(
                "KV write at position {start} leaves a gap after {} cached positions",
                self.len
            )));
        }
        if start > 0 && (batch, heads, head_dim) != (self.batch, self.heads, self.head_dim) {
            return Err(Error::BadInput(format!(
                "KV write of [{batch}, {heads}, _, {head_dim}] onto a cache of [{}, {}, _, {}]",
                self.batch, self.heads, self.head_dim
            )));
        }
        Ok(())
    }

    /// Writes `k`, `v` (`[b, kv_heads, n, d]`) at positions `start..start+n` and returns the
    /// keys and values of positions `0..start+n` as tensors (the candle attention path).
    pub(crate) fn write(
        &mut self,
        start: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (batch, heads, n, head_dim) = k.dims4()?;
        if v.dims() != k.dims() {
            return Err(Error::BadInput(format!(
                "KV write of keys {:?} and values {:?}",
                k.dims(),
                v.dims()
            )));
        }
        self.check_write(start, batch, heads, head_dim)?;
        let (kf, vf) = (flat_f32(k)?, flat_f32(v)?);
        self.len = start;
        self.reserve(batch, heads, head_dim, start + n);
        let (cap, d) = (self.capacity, head_dim);
        for r in 0..batch * heads {
            let at = (r * cap + start) * d;
            self.k[at..at + n * d].copy_from_slice(&kf[r * n * d..(r + 1) * n * d]);
            self.v[at..at + n * d].copy_from_slice(&vf[r * n * d..(r + 1) * n * d]);
        }
        self.len = start + n;
        self.to_tensors()?
            .ok_or_else(|| Error::BadInput("empty KV write".into()))
    }

    /// Writes `n` positions for batch 1 from projection outputs laid out `[n][heads][head_dim]`
    /// (one row per position, heads side by side) at positions `start..start+n`.
    pub(crate) fn write_rows(
        &mut self,
        start: usize,
        heads: usize,
        head_dim: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<()> {
        let width = heads * head_dim;
        let n = k.len() / width.max(1);
        if width == 0 || k.len() != n * width || v.len() != k.len() {
            return Err(Error::BadInput(format!(
                "KV rows of {} and {} values for {heads} heads of {head_dim}",
                k.len(),
                v.len()
            )));
        }
        self.check_write(start, 1, heads, head_dim)?;
        self.len = start;
        self.reserve(1, heads, head_dim, start + n);
        let cap = self.capacity;
        for p in 0..n {
            for h in 0..heads {
                let at = (h * cap + start + p) * head_dim;
                let from = p * width + h * head_dim;
                self.k[at..at + head_dim].copy_from_slice(&k[from..from + head_dim]);
                self.v[at..at + head_dim].copy_from_slice(&v[from..from + head_dim]);
            }
        }
        self.len = start + n;
        Ok(())
    }

    /// Keys and values of row `row` (`batch_index · kv_heads + head`): `len · head_dim`
    /// values each, position by position.
    pub(crate) fn head(&self, row: usize) -> (&[f32], &[f32]) {
        let at = row * self.capacity * self.head_dim;
        let n = self.len * self.head_dim;
        (&self.k[at..at + n], &self.v[at..at + n])
    }

    /// The cached keys and values as `[batch, kv_heads, len, head_dim]` tensors (copies), or
    /// `None` when nothing is cached: for hand-over to another node.
    pub(crate) fn to_tensors(&self) -> Result<Option<(Tensor, Tensor)>> {
        if self.len == 0 {
            return Ok(None);
        }
        let shape = (self.batch, self.heads, self.len, self.head_dim);
        let gather = |side: &[f32]| -> Result<Tensor> {
            let mut out = Vec::with_capacity(self.batch * self.heads * self.len * self.head_dim);
            for r in 0..self.batch * self.heads {
                out.extend_from_slice(
                    &side[r * self.capacity * self.head_dim..][..self.len * self.head_dim],
                );
            }
            Ok(Tensor::from_vec(out, shape, &Device::Cpu)?)
        };
        Ok(Some((gather(&self.k)?, gather(&self.v)?)))
    }

    /// Replaces the cache with `[batch, kv_heads, len, head_dim]` tensors received from another
    /// node.
    pub(crate) fn set(&mut self, k: Tensor, v: Tensor) -> Result<()> {
        *self = LayerKv::default();
        self.write(0, &k, &v)?;
        Ok(())
    }
}

/// A tensor's values as contiguous f32, in row-major order.
fn flat_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(vals: &[f32]) -> Tensor {
        Tensor::from_slice(vals, (1, 1, vals.len(), 1), &Device::Cpu).expect("tensor")
    }

    fn values(kv: &LayerKv) -> Vec<f32> {
        kv.to_tensors()
            .expect("tensors")
            .map(|(k, _)| k.flatten_all().and_then(|k| k.to_vec1()).expect("vec"))
            .unwrap_or_default()
    }

    #[test]
    fn rewriting_a_position_overwrites() {
        let mut kv = LayerKv::default();
        kv.write(0, &t(&[1., 2., 3.]), &t(&[1., 2., 3.]))
            .expect("write");
        kv.write(3, &t(&[4.]), &t(&[4.])).expect("write");
        kv.write(2, &t(&[9., 10.]), &t(&[9., 10.])).expect("write");
        assert_eq!(values(&kv), vec![1., 2., 9., 10.]);
        kv.truncate(1).expect("truncate");
        assert_eq!(values(&kv), vec![1.]);
        assert!(kv.write(5, &t(&[1.]), &t(&[1.])).is_err());
    }

    #[test]
    fn growth_keeps_every_head_and_rows_match_tensors() {
        // Two heads of width 2, written one position at a time well past the first capacity.
        let (heads, d, steps) = (2, 2, MIN_CAPACITY * 2 + 3);
        let mut by_rows = LayerKv::default();
        let mut by_tensors = LayerKv::default();
        for p in 0..steps {
            let row: Vec<f32> = (0..heads * d).map(|i| (p * 10 + i) as f32).collect();
            by_rows.write_rows(p, heads, d, &row, &row).expect("rows");
            // The same position as a [1, heads, 1, d] tensor.
            let t = Tensor::from_slice(&row, (1, heads, 1, d), &Device::Cpu).expect("t");
            by_tensors.write(p, &t, &t).expect("write");
        }
        assert_eq!(by_rows.len(), steps);
        assert_eq!(values(&by_rows), values(&by_tensors));
        let (k1, _) = by_rows.head(1);
        assert_eq!(&k1[..4], &[2., 3., 12., 13.]);
        assert_eq!(k1.len(), steps * d);
        assert!(by_rows.write(0, &t(&[1.]), &t(&[1.])).is_ok(), "restart");
        assert!(
            by_rows.write_rows(1, 3, 2, &[0.; 6], &[0.; 6]).is_err(),
            "shape change mid-sequence"
        );
    }
}
