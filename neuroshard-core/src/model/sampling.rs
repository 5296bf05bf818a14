//! Token sampling: greedy, temperature, top-k, top-p and repetition penalty.
//!
//! The random draw for position `p` is a pure function of `(seed, p)`, so a step replayed after
//! a failover (or computed by a replica) picks the same token as the original run.

use crate::error::{Error, Result};

/// How to pick the next token from logits.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    /// 0 = greedy (argmax); otherwise logits are divided by it before sampling.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 = no limit).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = no limit).
    pub top_p: f32,
    /// Penalise tokens already in the context (1 = off; llama.cpp/HF semantics).
    pub repetition_penalty: f32,
    /// Seed of the per-position random draws.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams::greedy()
    }
}

impl SamplingParams {
    /// Always the most likely token.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }

    /// Checks the parameters are usable.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::Generation(format!(
                "temperature {} must be >= 0",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Generation(format!(
                "top_p {} must be in (0, 1]",
                self.top_p
            )));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return Err(Error::Generation(format!(
                "repetition penalty {} must be > 0",
                self.repetition_penalty
            )));
        }
        Ok(())
    }
}

/// splitmix64: a tiny, well-mixed hash used as a counter-based generator.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The uniform draw in `[0, 1)` for `position` under `seed`.
pub(crate) fn uniform(seed: u64, position: usize) -> f64 {
    let bits = splitmix64(seed ^ splitmix64(position as u64));
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// Picks the token at `position` from `logits`, given the tokens already in the context.
pub(crate) fn sample(
    logits: &[f32],
    params: &SamplingParams,
    position: usize,
    context: &[u32],
) -> Result<u32> {
    params.validate()?;
    if logits.is_empty() {
        return Err(Error::Generation("empty logits".into()));
    }
    let mut logits = logits.to_vec();
    if params.repetition_penalty != 1.0 {
        let mut seen = std::collections::HashSet::new();
        for &t in context {
            if let Some(l) = logits.get_mut(t as usize) {
                if seen.insert(t) {
                    *l = if *l > 0.0 {
                        *l / params.repetition_penalty
                    } else {
                        *l * params.repetition_penalty
                    };
                }
            }
        }
    }
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &x)| {
                if x > best.1 {
                    (i, x)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if params.temperature == 0.0 {
        return Ok(argmax(&logits));
    }
    let mut order: Vec<usize> = (0..logits.len())
        .filter(|&i| logits[i].is_finite())
        .collect();
    if order.is_empty() {
        return Err(Error::Generation("all logits are infinite or NaN".into()));
    }
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if params.top_k > 0 {
        order.truncate(params.top_k);
    }
    let max = logits[order[0]];
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| (((logits[i] - max) / params.temperature) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if params.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= params.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        order.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let u = uniform(params.seed, position);
    let mut acc = 0.0;
    for (p, &i) in probs.iter().zip(order.iter()) {
        acc += p;
        if u < acc {
            return Ok(i as u32);
        }
    }
    Ok(order[order.len() - 1] as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_argmax_and_penalty_demotes_repeats() {
        let logits = [1.0, 3.0, 2.9];
        assert_eq!(
            sample(&logits, &SamplingParams::greedy(), 0, &[]).expect("ok"),
            1
        );
        let p = SamplingParams {
            repetition_penalty: 1.5,
            ..SamplingParams::greedy()
        };
        assert_eq!(sample(&logits, &p, 0, &[1]).expect("ok"), 2);
    }

    #[test]
    fn draws_depend_only_on_seed_and_position() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let p = SamplingParams {
            temperature: 1.0,
            seed: 42,
            ..SamplingParams::greedy()
        };
        let a: Vec<u32> = (0..20)
            .map(|pos| sample(&logits, &p, pos, &[]).expect("ok"))
            .collect();
        let b: Vec<u32> = (0..20)
            .map(|pos| sample(&logits, &p, pos, &[]).expect("ok"))
            .collect();
        assert_eq!(a, b);
        assert!(
            a.iter().collect::<std::collections::HashSet<_>>().len() > 3,
            "draws vary with position"
        );
    }

    #[test]
    fn top_k_and_top_p_restrict_the_candidates() {
        let logits = [5.0, 4.0, 0.0, -1.0, -2.0];
        let k1 = SamplingParams {
            temperature: 1.0,
            top_k: 1,
            ..SamplingParams::greedy()
        };
        let p_small = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            ..SamplingParams::greedy()
        };
        for pos in 0..100 {
            assert_eq!(sample(&logits, &k1, pos, &[]).expect("ok"), 0);
            assert_eq!(sample(&logits, &p_small, pos, &[]).expect("ok"), 0);
        }
        let k2 = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            seed: 3,
            ..SamplingParams::greedy()
        };
        let picks: Vec<u32> = (0..200)
            .map(|pos| sample(&logits, &k2, pos, &[]).expect("ok"))
            .collect();
        assert!(picks.iter().all(|&t| t < 2) && picks.contains(&1));
    }

    #[test]
    fn invalid_parameters_are_typed_errors() {
        let bad = SamplingParams {
            top_p: 0.0,
            ..SamplingParams::greedy()
        };
        assert!(matches!(
            sample(&[1.0], &bad, 0, &[]),
            Err(Error::Generation(_))
        ));
    }
}
