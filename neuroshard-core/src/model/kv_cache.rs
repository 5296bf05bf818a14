//! Position-indexed key/value cache for one layer of one session.
//!
//! Entries are addressed by absolute position: writing at position `p` first drops whatever was
//! cached from `p` on, so a retried or replayed step overwrites instead of duplicating (the swarm
//! relies on this for failover), and [`LayerKv::truncate`] rolls a session back.

use crate::error::Result;
use candle_core::Tensor;

/// Cached keys and values of one layer: `[batch, kv_heads, len, head_dim]` each.
#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    k: Option<Tensor>,
    v: Option<Tensor>,
}

impl LayerKv {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.dim(2).unwrap_or(0))
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held by this layer's cache.
    pub fn bytes(&self) -> usize {
        [&self.k, &self.v]
            .iter()
            .filter_map(|t| t.as_ref())
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// Keeps positions `0..len`, dropping the rest.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.len() {
            return Ok(());
        }
        if len == 0 {
            self.k = None;
            self.v = None;
            return Ok(());
        }
        if let (Some(k), Some(v)) = (&self.k, &self.v) {
            let (k, v) = (k.narrow(2, 0, len)?, v.narrow(2, 0, len)?);
            self.k = Some(k);
            self.v = Some(v);
        }
        Ok(())
    }

    /// Writes `k`, `v` (`[b, kv_heads, n, d]`) at positions `start..start+n` and returns the
    /// keys and values of positions `0..start+n`.
    pub(crate) fn write(
        &mut self,
        start: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let cached = self.len();
        if start > cached {
            // The engine checks every layer before running any; reaching this is a bug.
            return Err(crate::error::Error::BadInput(format!(
                "KV write at position {start} leaves a gap after {cached} cached positions"
            )));
        }
        self.truncate(start)?;
        let (k_all, v_all) = match (&self.k, &self.v) {
            (Some(pk), Some(pv)) => (Tensor::cat(&[pk, k], 2)?, Tensor::cat(&[pv, v], 2)?),
            _ => (k.clone(), v.clone()),
        };
        self.k = Some(k_all.clone());
        self.v = Some(v_all.clone());
        Ok((k_all, v_all))
    }

    /// The cached tensors, for hand-over to another node.
    pub fn tensors(&self) -> Option<(&Tensor, &Tensor)> {
        self.k.as_ref().zip(self.v.as_ref())
    }

    /// Replaces the cache with tensors received from another node.
    pub fn set(&mut self, k: Tensor, v: Tensor) {
        self.k = Some(k);
        self.v = Some(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(vals: &[f32]) -> Tensor {
        Tensor::from_slice(vals, (1, 1, vals.len(), 1), &Device::Cpu).expect("tensor")
    }

    fn values(kv: &LayerKv) -> Vec<f32> {
        kv.tensors()
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
}
