//! Lying behaviours for tests and demos (`neuroshard node --behaviour NAME`, cargo feature
//! `adversary`; default builds leave them out). Each has a stated magnitude, the mildest
//! attack of its kind that the detection matrix in `docs/trust.md` must catch.

/// How a dishonest node lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Gaussian noise at 1% of the hidden state's RMS, per position.
    Noise,
    /// The output multiplied by 1.02.
    Scale,
    /// One layer of its slice skipped (the middle one).
    SkipLayer,
    /// 1%-RMS Gaussian noise on one weight tensor, fixed at load.
    WrongWeights,
    /// The previous position's output instead of this one's.
    Stale,
    /// Half the values zeroed, the smallest by magnitude.
    Zeros,
    /// Answers only after the deadline.
    Slow,
    /// Different outputs to different receivers, each with its own signed receipt.
    Equivocate,
    /// Different input frames to the replicas of the next range, each frame signed, with
    /// one receipt (so most receivers hold bytes its receipt does not name).
    BadUpstream,
}

impl Behaviour {
    /// Every behaviour, in the matrix's order.
    pub const ALL: [Behaviour; 9] = [
        Behaviour::Noise,
        Behaviour::Scale,
        Behaviour::SkipLayer,
        Behaviour::WrongWeights,
        Behaviour::Stale,
        Behaviour::Zeros,
        Behaviour::Slow,
        Behaviour::Equivocate,
        Behaviour::BadUpstream,
    ];

    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Behaviour::Noise => "noise",
            Behaviour::Scale => "scale",
            Behaviour::SkipLayer => "skip-layer",
            Behaviour::WrongWeights => "wrong-weights",
            Behaviour::Stale => "stale",
            Behaviour::Zeros => "zeros",
            Behaviour::Slow => "slow",
            Behaviour::Equivocate => "equivocate",
            Behaviour::BadUpstream => "bad-upstream",
        }
    }
}

impl std::str::FromStr for Behaviour {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Behaviour::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Behaviour::ALL.iter().map(|b| b.name()).collect();
                format!(
                    "unknown behaviour `{s}` (expected one of {})",
                    names.join(", ")
                )
            })
    }
}

/// A seeded Gaussian source (splitmix64 + Box-Muller): no dependency, reproducible.
pub struct Gaussian(crate::splitmix::SplitMix64);

impl Gaussian {
    /// A source seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Gaussian(crate::splitmix::SplitMix64::new(seed))
    }

    /// Uniform in (0, 1): never 0, so its logarithm is finite.
    fn uniform(&mut self) -> f64 {
        ((self.0.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// One standard normal value.
    pub fn sample(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
}

fn rms(row: &[f32]) -> f32 {
    (row.iter().map(|x| x * x).sum::<f32>() / row.len().max(1) as f32).sqrt()
}

/// Adds Gaussian noise of `fraction` times each row's RMS (`noise`: 0.01).
pub fn add_noise(values: &mut [f32], width: usize, fraction: f32, noise: &mut Gaussian) {
    for row in values.chunks_mut(width.max(1)) {
        let sigma = fraction * rms(row);
        for v in row.iter_mut() {
            *v += sigma * noise.sample();
        }
    }
}

/// Multiplies every value by `factor` (`scale`: 1.02).
pub fn scale(values: &mut [f32], factor: f32) {
    values.iter_mut().for_each(|v| *v *= factor);
}

/// Zeroes the smallest half of each row by magnitude (`zeros`).
pub fn zero_smallest_half(values: &mut [f32], width: usize) {
    for row in values.chunks_mut(width.max(1)) {
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[a].abs().total_cmp(&row[b].abs()));
        for &i in &order[..row.len() / 2] {
            row[i] = 0.0;
        }
    }
}

/// Shifts each row to the next position: position p gets p-1's output, position 0 gets
/// `previous` (the last output it sent before), or its own when there was none (`stale`).
pub fn stale(values: &mut [f32], width: usize, previous: Option<&[f32]>) {
    let width = width.max(1);
    let rows = values.len() / width;
    for p in (1..rows).rev() {
        let (before, after) = values.split_at_mut(p * width);
        after[..width].copy_from_slice(&before[(p - 1) * width..]);
    }
    if let Some(prev) = previous.filter(|p| p.len() == width) {
        values[..width].copy_from_slice(prev);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaviours_parse_by_name_and_unknown_names_list_them() {
        for b in Behaviour::ALL {
            assert_eq!(b.name().parse::<Behaviour>(), Ok(b));
        }
        let err = "lie".parse::<Behaviour>().unwrap_err();
        assert!(err.contains("skip-layer"), "{err}");
    }

    #[test]
    fn value_behaviours_have_their_stated_magnitude() {
        let mut g = Gaussian::new(1);
        let base: Vec<f32> = (0..4096).map(|_| g.sample()).collect();
        let mut noisy = base.clone();
        add_noise(&mut noisy, 4096, 0.01, &mut Gaussian::new(2));
        let diff: Vec<f32> = noisy.iter().zip(&base).map(|(a, b)| a - b).collect();
        let ratio = rms(&diff) / rms(&base);
        assert!((0.009..0.011).contains(&ratio), "{ratio}");
        let mut zeroed = base.clone();
        zero_smallest_half(&mut zeroed, 64);
        assert_eq!(zeroed.iter().filter(|v| **v == 0.0).count(), 2048);
        let mut shifted = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        stale(&mut shifted, 2, Some(&[9.0, 9.0]));
        assert_eq!(shifted, vec![9.0, 9.0, 1.0, 2.0, 3.0, 4.0]);
        let mut scaled = vec![1.0, -2.0];
        scale(&mut scaled, 1.02);
        assert_eq!(scaled, vec![1.02, -2.04]);
    }
}
