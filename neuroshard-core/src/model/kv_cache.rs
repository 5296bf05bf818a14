//! Position-indexed key/value cache for one layer of one session.
//!
//! Entries are addressed by absolute position: writing at position `p` first drops whatever was
//! cached from `p` on, so a retried or replayed step overwrites instead of duplicating (the swarm
//! relies on this for failover), and [`LayerKv::truncate`] rolls a session back.
//!
//! Storage is one buffer per side laid out `[batch · kv_heads][capacity][head_dim]`, in f32 or
//! f16 ([`KvDtype`]), grown by doubling up to the session's length limit: appending a decode
//! step copies one position, not the whole prefix (a `Tensor::cat` per step made decode
//! quadratic in the context length), and each head's keys are one contiguous run for the
//! attention kernel ([`crate::model::attention`]).

use crate::error::{Error, Result};
use crate::model::attention::KvRows;
use candle_core::{DType, Device, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;

/// Positions allocated by the first write when it is shorter.
const MIN_CAPACITY: usize = 64;

/// The element type of cached keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// 4 bytes per value: attention reads exactly what the projections computed.
    #[default]
    F32,
    /// 2 bytes per value (half the memory); keys and values are rounded to f16 when written.
    F16,
}

impl std::str::FromStr for KvDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(KvDtype::F32),
            "f16" => Ok(KvDtype::F16),
            other => Err(format!("unknown KV cache type {other:?} (f32 or f16)")),
        }
    }
}

/// One stored value type of the cache; conversions work on whole slices (F16C when the CPU
/// has it: converting value by value is ~10x slower).
trait KvElem: Copy + Default + std::fmt::Debug {
    fn store(dst: &mut [Self], src: &[f32]);
    fn append_f32(src: &[Self], out: &mut Vec<f32>);
    fn rows(v: &[Self]) -> KvRows<'_>;
}

impl KvElem for f32 {
    fn store(dst: &mut [f32], src: &[f32]) {
        dst.copy_from_slice(src);
    }
    fn append_f32(src: &[f32], out: &mut Vec<f32>) {
        out.extend_from_slice(src);
    }
    fn rows(v: &[f32]) -> KvRows<'_> {
        KvRows::F32(v)
    }
}

impl KvElem for f16 {
    fn store(dst: &mut [f16], src: &[f32]) {
        dst.convert_from_f32_slice(src);
    }
    fn append_f32(src: &[f16], out: &mut Vec<f32>) {
        let at = out.len();
        out.resize(at + src.len(), 0.0);
        src.convert_to_f32_slice(&mut out[at..]);
    }
    fn rows(v: &[f16]) -> KvRows<'_> {
        KvRows::F16(v)
    }
}

/// Keys and values in one element type.
#[derive(Debug, Clone, Default)]
struct Sides<T> {
    k: Vec<T>,
    v: Vec<T>,
}

impl<T: KvElem> Sides<T> {
    /// Reallocates for `rows` rows of `capacity · d` values, keeping each row's first `keep`
    /// positions (of rows laid out with `old_capacity`).
    fn regrow(&mut self, rows: usize, old_capacity: usize, capacity: usize, keep: usize, d: usize) {
        let regrow = |old: &[T]| {
            let mut new = vec![T::default(); rows * capacity * d];
            if keep > 0 {
                for r in 0..rows {
                    let from = &old[r * old_capacity * d..][..keep * d];
                    new[r * capacity * d..][..keep * d].copy_from_slice(from);
                }
            }
            new
        };
        self.k = regrow(&self.k);
        self.v = regrow(&self.v);
    }

    /// Writes `k`, `v` (f32) at value offset `at`.
    fn put(&mut self, at: usize, k: &[f32], v: &[f32]) {
        T::store(&mut self.k[at..at + k.len()], k);
        T::store(&mut self.v[at..at + v.len()], v);
    }

    fn rows(&self, at: usize, n: usize) -> (KvRows<'_>, KvRows<'_>) {
        (T::rows(&self.k[at..at + n]), T::rows(&self.v[at..at + n]))
    }

    /// Appends `n` values from offset `at` of each side, as f32.
    fn gather(&self, at: usize, n: usize, k: &mut Vec<f32>, v: &mut Vec<f32>) {
        T::append_f32(&self.k[at..at + n], k);
        T::append_f32(&self.v[at..at + n], v);
    }

    fn bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * std::mem::size_of::<T>()
    }
}

#[derive(Debug, Clone)]
enum Store {
    F32(Sides<f32>),
    F16(Sides<f16>),
}

impl Default for Store {
    fn default() -> Self {
        Store::F32(Sides::default())
    }
}

/// Runs the same generic code on either storage type.
macro_rules! on_store {
    ($store:expr, $sides:ident => $body:expr) => {
        match $store {
            Store::F32($sides) => $body,
            Store::F16($sides) => $body,
        }
    };
}

/// Cached keys and values of one layer, each logically `[batch, kv_heads, len, head_dim]`.
#[derive(Debug, Clone)]
pub(crate) struct LayerKv {
    store: Store,
    batch: usize,
    heads: usize,
    head_dim: usize,
    len: usize,
    capacity: usize,
    /// The most positions this cache will ever hold (the session's length limit): growth
    /// stops there instead of doubling past it.
    limit: usize,
}

impl Default for LayerKv {
    fn default() -> Self {
        LayerKv::new(KvDtype::F32, usize::MAX)
    }
}

impl LayerKv {
    /// An empty cache storing `dtype` for at most `limit` positions.
    pub(crate) fn new(dtype: KvDtype, limit: usize) -> Self {
        LayerKv {
            store: match dtype {
                KvDtype::F32 => Store::F32(Sides::default()),
                KvDtype::F16 => Store::F16(Sides::default()),
            },
            batch: 0,
            heads: 0,
            head_dim: 0,
            len: 0,
            capacity: 0,
            limit: limit.max(1),
        }
    }

    /// Number of cached positions.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Key/value heads per batch row of what is cached.
    pub(crate) fn kv_heads(&self) -> usize {
        self.heads
    }

    /// Positions allocated (at most the limit, unless one write was longer).
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes held by this layer's cache (allocated capacity, keys and values).
    pub(crate) fn bytes(&self) -> usize {
        on_store!(&self.store, s => s.bytes())
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
        let grown = if same_shape {
            positions.max(2 * self.capacity)
        } else {
            positions.max(MIN_CAPACITY)
        };
        // Never past the limit, and never short of this write.
        let capacity = grown.min(self.limit).max(positions);
        // Only a same-shape cache has anything to keep (the old rows are laid out for another
        // shape otherwise).
        let keep = if same_shape { self.len } else { 0 };
        let (rows, old_capacity) = (batch * heads, self.capacity);
        on_store!(&mut self.store, s => s.regrow(rows, old_capacity, capacity, keep, head_dim));
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

    /// Writes `k`, `v` (`[b, kv_heads, n, d]` tensors) at positions `start..start+n`.
    pub(crate) fn write(&mut self, start: usize, k: &Tensor, v: &Tensor) -> Result<()> {
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
            let from = r * n * d..(r + 1) * n * d;
            on_store!(&mut self.store, s => s.put((r * cap + start) * d, &kf[from.clone()], &vf[from]));
        }
        self.len = start + n;
        Ok(())
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
                let from = p * width + h * head_dim..p * width + (h + 1) * head_dim;
                on_store!(&mut self.store, s => s.put(at, &k[from.clone()], &v[from]));
            }
        }
        self.len = start + n;
        Ok(())
    }

    /// Keys and values of row `row` (`batch_index · kv_heads + head`): `len · head_dim`
    /// values each, position by position.
    pub(crate) fn head(&self, row: usize) -> (KvRows<'_>, KvRows<'_>) {
        let at = row * self.capacity * self.head_dim;
        on_store!(&self.store, s => s.rows(at, self.len * self.head_dim))
    }

    /// The cached keys and values as f32 `[batch, kv_heads, len, head_dim]` tensors (copies),
    /// or `None` when nothing is cached: for hand-over to another node and the training path.
    pub(crate) fn to_tensors(&self) -> Result<Option<(Tensor, Tensor)>> {
        if self.len == 0 {
            return Ok(None);
        }
        let shape = (self.batch, self.heads, self.len, self.head_dim);
        let n = self.len * self.head_dim;
        let (mut k, mut v) = (Vec::with_capacity(self.batch * self.heads * n), Vec::new());
        v.reserve(k.capacity());
        for r in 0..self.batch * self.heads {
            let at = r * self.capacity * self.head_dim;
            on_store!(&self.store, s => s.gather(at, n, &mut k, &mut v));
        }
        Ok(Some((
            Tensor::from_vec(k, shape, &Device::Cpu)?,
            Tensor::from_vec(v, shape, &Device::Cpu)?,
        )))
    }

    /// Replaces the cache with `[batch, kv_heads, len, head_dim]` tensors received from another
    /// node (keeping this cache's element type and limit).
    pub(crate) fn set(&mut self, k: Tensor, v: Tensor) -> Result<()> {
        let dtype = match self.store {
            Store::F32(_) => KvDtype::F32,
            Store::F16(_) => KvDtype::F16,
        };
        *self = LayerKv::new(dtype, self.limit);
        self.write(0, &k, &v)
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
        let KvRows::F32(k1) = by_rows.head(1).0 else {
            panic!("an f32 cache")
        };
        assert_eq!(&k1[..4], &[2., 3., 12., 13.]);
        assert_eq!(k1.len(), steps * d);
        assert!(by_rows.write(0, &t(&[1.]), &t(&[1.])).is_ok(), "restart");
        assert!(
            by_rows.write_rows(1, 3, 2, &[0.; 6], &[0.; 6]).is_err(),
            "shape change mid-sequence"
        );
    }

    #[test]
    fn capacity_stops_at_the_limit() {
        // Doubling from 64 would reach 128 and then 256; a 100-position limit caps it.
        let mut kv = LayerKv::new(KvDtype::F32, 100);
        for p in 0..100 {
            kv.write_rows(p, 1, 2, &[p as f32; 2], &[0.0; 2])
                .expect("write");
            assert!(kv.capacity() <= 100, "capacity {} at {p}", kv.capacity());
        }
        assert_eq!(kv.capacity(), 100);
        assert_eq!(kv.bytes(), 100 * 2 * 2 * 4);
        // A single write longer than the limit still fits (the engine rejects it earlier).
        let mut long = LayerKv::new(KvDtype::F32, 10);
        long.write_rows(0, 1, 1, &[1.0; 30], &[1.0; 30])
            .expect("write");
        assert_eq!(long.capacity(), 30);
    }

    #[test]
    fn f16_cache_rounds_and_halves_memory() {
        let mut half = LayerKv::new(KvDtype::F16, 64);
        let mut full = LayerKv::new(KvDtype::F32, 64);
        let row = [1.0f32 / 3.0, 1000.25, -2.5, 7.0];
        for kv in [&mut half, &mut full] {
            kv.write_rows(0, 2, 2, &row, &row).expect("write");
        }
        assert_eq!(half.bytes() * 2, full.bytes());
        let KvRows::F16(k) = half.head(0).0 else {
            panic!("an f16 cache")
        };
        assert_eq!(k, &[f16::from_f32(row[0]), f16::from_f32(row[1])]);
        let rounded: Vec<f32> = [row[0], row[1], row[2], row[3]]
            .iter()
            .map(|x| f16::from_f32(*x).to_f32())
            .collect();
        // to_tensors is [batch, heads, len, d]: head 0 then head 1.
        assert_eq!(values(&half), rounded);
        // Hand-over keeps the element type.
        let (k, v) = full.to_tensors().expect("tensors").expect("cached");
        half.set(k, v).expect("set");
        assert!(matches!(half.head(1).0, KvRows::F16(_)));
        assert_eq!(values(&half), rounded);
    }
}
