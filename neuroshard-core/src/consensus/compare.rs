//! How two replicas' outputs are compared: `exact` (the same bytes) or `tolerant` (the same
//! values up to float rounding, over every coordinate of every position).
//!
//! The tolerant metric is scale-free, so one threshold serves hidden states at any depth and
//! logits alike: per position (one row of `width` values),
//! - `rel_l2  = ||a - b|| / max(||a||, ||b||)`, and
//! - `max_abs = max |a_i - b_i| / max(rms(a), rms(b))`,
//!
//! and a pair's distance is the worst position's of each. Any non-finite value, or a length
//! that is not a whole number of rows, is an infinite distance: a NaN never agrees, not even
//! with itself. The thresholds come from measured honest variation (`docs/trust.md`).

use serde::{Deserialize, Serialize};

/// One replica's output as a vote sees it: its values (f32, decoded from an f16 or f32
/// frame), the row width and the blake3 of the frame's bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct VoteOutput {
    /// Row-major values, `positions * width` of them.
    pub values: Vec<f32>,
    /// Values per position (the hidden size, or the vocabulary for logits).
    pub width: usize,
    /// blake3 of the frame bytes the replica sent (what its receipt signs).
    pub hash: [u8; 32],
    /// What the replica declared it computes with (a hash of its build id and kernel path,
    /// see [`crate::consensus::InputContext::declaration`]), when known. Two outputs with
    /// the same declaration come from the same arithmetic on the same input, so a tolerant
    /// vote compares them exactly.
    pub declared: Option<[u8; 32]>,
}

/// The element type of a voted frame: votes run over f16 and f32 frames only (quantised
/// frames are not voted on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FrameDtype {
    /// IEEE half precision, little-endian.
    F16,
    /// IEEE single precision, little-endian.
    F32,
}

impl VoteOutput {
    /// An output from f32 values; its hash is over their little-endian bytes, as an f32
    /// frame's payload is.
    pub fn from_f32(values: Vec<f32>, width: usize) -> Self {
        let mut bytes = Vec::with_capacity(values.len() * 4);
        for v in &values {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        let hash = *blake3::hash(&bytes).as_bytes();
        VoteOutput {
            values,
            width,
            hash,
            declared: None,
        }
    }

    /// An output from a frame's payload bytes (little-endian), hashed as sent. None when the
    /// length is not a whole number of values.
    pub fn from_bytes(dtype: FrameDtype, width: usize, bytes: &[u8]) -> Option<Self> {
        let values: Vec<f32> = match dtype {
            FrameDtype::F32 => {
                if bytes.len() % 4 != 0 {
                    return None;
                }
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            }
            FrameDtype::F16 => {
                if bytes.len() % 2 != 0 {
                    return None;
                }
                bytes
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect()
            }
        };
        Some(VoteOutput {
            values,
            width,
            hash: *blake3::hash(bytes).as_bytes(),
            declared: None,
        })
    }

    /// The same output, declared as computed with `declaration`.
    pub fn declared(mut self, declaration: [u8; 32]) -> Self {
        self.declared = Some(declaration);
        self
    }

    /// Positions covered (0 when the width is 0).
    pub fn positions(&self) -> usize {
        self.values.len().checked_div(self.width).unwrap_or(0)
    }
}

/// The tolerant rule's thresholds (see the module doc for the metric).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Tolerance {
    /// Largest per-position relative L2 distance that still agrees.
    pub rel_l2: f32,
    /// Largest per-position max-abs difference, in units of the row's RMS, that still agrees.
    pub max_abs: f32,
}

impl Tolerance {
    /// The calibrated default (`docs/trust.md`: SmolLM2 hidden states and logits across
    /// thread counts, kernel paths, `exact` against `f32` mode and f16 against f32 frames).
    pub const DEFAULT: Tolerance = Tolerance {
        rel_l2: 2e-3,
        max_abs: 2e-2,
    };
}

impl Default for Tolerance {
    fn default() -> Self {
        Tolerance::DEFAULT
    }
}

/// How a vote decides that two outputs agree.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Comparison {
    /// The same frame bytes (blake3): for replicas that declare the same build and kernel
    /// path and run chunk-invariant products.
    Exact,
    /// The same values up to float rounding (the default).
    Tolerant(Tolerance),
}

impl Default for Comparison {
    fn default() -> Self {
        Comparison::Tolerant(Tolerance::DEFAULT)
    }
}

impl Comparison {
    /// Whether `a` and `b` agree under this rule.
    pub fn agrees(&self, a: &VoteOutput, b: &VoteOutput) -> bool {
        match self {
            Comparison::Exact => a.hash == b.hash,
            Comparison::Tolerant(t) => {
                // The same bytes are the same values: only finiteness is left to check (the
                // common case of replicas on one build, at a fraction of the distance's cost).
                let same_bytes =
                    a.hash == b.hash && a.width == b.width && a.values.len() == b.values.len();
                if same_bytes {
                    return a.width > 0
                        && a.values.len() % a.width == 0
                        && a.values.iter().all(|v| v.is_finite());
                }
                // Replicas that declare the same arithmetic must produce the same bytes:
                // rounding cannot explain a difference between them.
                if a.declared.is_some() && a.declared == b.declared {
                    return false;
                }
                let d = distance(a, b);
                d.rel_l2 <= t.rel_l2 && d.max_abs <= t.max_abs
            }
        }
    }
}

impl std::str::FromStr for Comparison {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "exact" => Ok(Comparison::Exact),
            "tolerant" => Ok(Comparison::default()),
            other => Err(format!(
                "unknown comparison `{other}` (expected exact or tolerant)"
            )),
        }
    }
}

/// The distance between two outputs: the worst position's of each metric.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Distance {
    /// Largest per-position relative L2 distance.
    pub rel_l2: f32,
    /// Largest per-position max-abs difference over the row RMS.
    pub max_abs: f32,
}

impl Distance {
    /// Two outputs that cannot agree (non-finite values or different shapes).
    pub const INFINITE: Distance = Distance {
        rel_l2: f32::INFINITY,
        max_abs: f32::INFINITY,
    };
}

/// The distance between `a` and `b` (see the module doc).
pub fn distance(a: &VoteOutput, b: &VoteOutput) -> Distance {
    if a.width == 0
        || a.width != b.width
        || a.values.len() != b.values.len()
        || a.values.len() % a.width != 0
    {
        return Distance::INFINITE;
    }
    let mut worst = Distance {
        rel_l2: 0.0,
        max_abs: 0.0,
    };
    for (ra, rb) in a
        .values
        .chunks_exact(a.width)
        .zip(b.values.chunks_exact(b.width))
    {
        let row = row_distance(ra, rb);
        worst.rel_l2 = worst.rel_l2.max(row.rel_l2);
        worst.max_abs = worst.max_abs.max(row.max_abs);
        if !worst.rel_l2.is_finite() {
            return Distance::INFINITE;
        }
    }
    worst
}

/// One position's distance; sums in f64 so that the metric's own rounding is far below the
/// thresholds.
fn row_distance(a: &[f32], b: &[f32]) -> Distance {
    let (mut aa, mut bb, mut dd, mut dmax) = (0f64, 0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        if !x.is_finite() || !y.is_finite() {
            return Distance::INFINITE;
        }
        let (x, y) = (x as f64, y as f64);
        let d = x - y;
        aa += x * x;
        bb += y * y;
        dd += d * d;
        dmax = dmax.max(d.abs());
    }
    let norm = aa.max(bb).sqrt();
    if norm == 0.0 {
        // Two all-zero rows agree; a zero row against a non-zero one cannot reach here
        // (its norm would be the other's).
        return Distance {
            rel_l2: 0.0,
            max_abs: 0.0,
        };
    }
    let rms = norm / (a.len() as f64).sqrt();
    Distance {
        rel_l2: (dd.sqrt() / norm) as f32,
        max_abs: (dmax / rms) as f32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(values: &[f32], width: usize) -> VoteOutput {
        VoteOutput::from_f32(values.to_vec(), width)
    }

    #[test]
    fn identical_outputs_are_at_distance_zero_and_agree_exactly() {
        let a = out(&[1.0, -2.0, 3.0, 0.5], 2);
        assert_eq!(distance(&a, &a).rel_l2, 0.0);
        assert!(Comparison::Exact.agrees(&a, &a.clone()));
    }

    #[test]
    fn one_ulp_differs_exactly_but_agrees_tolerantly() {
        let a = out(&[1.0, -2.0, 3.0, 0.5], 2);
        let b = out(&[1.0, -2.0, f32::from_bits(3.0f32.to_bits() + 1), 0.5], 2);
        assert!(!Comparison::Exact.agrees(&a, &b));
        assert!(Comparison::default().agrees(&a, &b));
    }

    #[test]
    fn the_worst_position_decides() {
        // Row 0 identical, row 1 scaled by 1.02: rel_l2 = 0.02/1.02 on that row.
        let a = out(&[1.0, 1.0, 1.0, 1.0], 2);
        let b = out(&[1.0, 1.0, 1.02, 1.02], 2);
        let d = distance(&a, &b);
        assert!((d.rel_l2 - 0.02 / 1.02).abs() < 1e-6, "{d:?}");
        assert!(!Comparison::default().agrees(&a, &b));
    }

    #[test]
    fn a_single_coordinate_is_caught_by_max_abs() {
        // 1,000 coordinates, one off by 10% of the RMS: rel_l2 is only ~3e-3 of the norm.
        let a: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 13) as f32 - 6.0).collect();
        let mut b = a.clone();
        let rms = (a.iter().map(|x| x * x).sum::<f32>() / 1000.0).sqrt();
        b[500] += 0.1 * rms;
        let d = distance(&out(&a, 1000), &out(&b, 1000));
        assert!(d.max_abs > 0.09 && d.max_abs < 0.11, "{d:?}");
        assert!(!Comparison::default().agrees(&out(&a, 1000), &out(&b, 1000)));
    }

    #[test]
    fn non_finite_values_and_shape_mismatches_never_agree() {
        let a = out(&[1.0, 2.0], 2);
        let nan = out(&[f32::NAN, 2.0], 2);
        // Identical bytes take the shortcut, which still refuses NaN and infinity.
        assert!(!Comparison::default().agrees(&nan, &nan.clone()));
        let inf = out(&[f32::INFINITY, 2.0], 2);
        assert!(!Comparison::default().agrees(&inf, &inf.clone()));
        assert!(Comparison::default().agrees(&a, &a.clone()));
        assert_eq!(distance(&nan, &nan), Distance::INFINITE);
        assert_eq!(distance(&a, &nan), Distance::INFINITE);
        assert_eq!(distance(&a, &out(&[1.0, 2.0], 1)), Distance::INFINITE);
        assert_eq!(
            distance(&a, &out(&[1.0, 2.0, 3.0, 4.0], 2)),
            Distance::INFINITE
        );
        assert_eq!(distance(&out(&[], 0), &out(&[], 0)), Distance::INFINITE);
    }

    #[test]
    fn comparison_parses_from_its_cli_names() {
        assert_eq!("exact".parse::<Comparison>(), Ok(Comparison::Exact));
        assert_eq!("tolerant".parse::<Comparison>(), Ok(Comparison::default()));
        assert!("fuzzy".parse::<Comparison>().is_err());
    }
}
