//! Length shaping: DAPO's soft overlong punishment and cosine length scaling.

use super::accuracy::{correctness, Judge};
use super::config::{CosineConfig, OverlongConfig};
use super::{BatchContext, RewardError, RewardFn, RewardOutput, Sample};

/// DAPO soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13), scaled by `factor`:
/// 0 for `len <= max - buffer`, `(max - buffer - len) / buffer * factor` up to `max`, `-factor` beyond.
pub fn overlong_penalty(len: usize, max: usize, buffer: usize, factor: f64) -> f64 {
    let expected = max.saturating_sub(buffer);
    if len <= expected {
        0.0
    } else if len <= max && buffer > 0 {
        -((len - expected) as f64) / buffer as f64 * factor
    } else {
        -factor
    }
}

/// Cosine schedule (Yeo et al. 2025, arXiv:2502.03373, eq. 1): `at_zero` at t = 0, `at_max` at
/// t >= t_max, following half a cosine period in between.
pub fn cosine_schedule(t: usize, t_max: usize, at_zero: f64, at_max: f64) -> f64 {
    let progress = if t_max == 0 { 1.0 } else { (t as f64 / t_max as f64).min(1.0) };
    at_max + 0.5 * (at_zero - at_max) * (1.0 + (progress * std::f64::consts::PI).cos())
}

/// `kind = "overlong"`.
pub struct Overlong {
    pub cfg: OverlongConfig,
}

impl RewardFn for Overlong {
    fn name(&self) -> &str {
        "overlong"
    }
    fn score(&self, samples: &[Sample], _ctx: &BatchContext) -> Result<Vec<RewardOutput>, RewardError> {
        Ok(samples
            .iter()
            .map(|s| {
                let max = self.cfg.max_response_length.unwrap_or(s.max_tokens);
                if max == 0 {
                    return RewardOutput::default();
                }
                let p = overlong_penalty(s.completion_tokens, max, self.cfg.overlong_buffer_len, self.cfg.overlong_penalty_factor);
                RewardOutput { reward: Some(p), metrics: vec![("penalized".into(), (p < 0.0) as u8 as f64)] }
            })
            .collect())
    }
}

/// `kind = "cosine_length"`.
pub struct CosineLength {
    pub cfg: CosineConfig,
    pub judge: Judge,
    pub shared: Option<Judge>,
}

impl RewardFn for CosineLength {
    fn name(&self) -> &str {
        "cosine_length"
    }
    fn needs_correctness(&self) -> bool {
        true
    }
    fn score(&self, samples: &[Sample], ctx: &BatchContext) -> Result<Vec<RewardOutput>, RewardError> {
        let c = correctness(&self.judge, self.shared.as_ref(), samples, ctx);
        Ok(samples
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let Some(correct) = c.correct[i] else { return RewardOutput::default() };
                if s.truncated {
                    if let Some(r) = self.cfg.exceed_length {
                        return RewardOutput::value(r);
                    }
                }
                let t_max = self.cfg.max_len.unwrap_or(s.max_tokens);
                let r = if correct {
                    cosine_schedule(s.completion_tokens, t_max, self.cfg.max_value_correct, self.cfg.min_value_correct)
                } else {
                    cosine_schedule(s.completion_tokens, t_max, self.cfg.min_value_wrong, self.cfg.max_value_wrong)
                };
                RewardOutput::value(r)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dapo_overlong_matches_the_formula() {
        // L = 100, buffer 20: no penalty to 80 tokens, linear to -1 at 100, -1 beyond.
        assert_eq!(overlong_penalty(50, 100, 20, 1.0), 0.0);
        assert_eq!(overlong_penalty(80, 100, 20, 1.0), 0.0);
        assert!((overlong_penalty(90, 100, 20, 1.0) + 0.5).abs() < 1e-12);
        assert!((overlong_penalty(100, 100, 20, 1.0) + 1.0).abs() < 1e-12);
        assert_eq!(overlong_penalty(150, 100, 20, 2.0), -2.0);
        assert!((overlong_penalty(85, 100, 20, 0.5) + 0.125).abs() < 1e-12);
    }

    #[test]
    fn cosine_endpoints_and_midpoint() {
        assert!((cosine_schedule(0, 1000, 1.0, 0.5) - 1.0).abs() < 1e-12);
        assert!((cosine_schedule(1000, 1000, 1.0, 0.5) - 0.5).abs() < 1e-12);
        assert!((cosine_schedule(500, 1000, 1.0, 0.5) - 0.75).abs() < 1e-12);
        assert!((cosine_schedule(5000, 1000, -1.0, -0.5) + 0.5).abs() < 1e-12);
        // Monotone: longer correct answers get less.
        assert!(cosine_schedule(200, 1000, 1.0, 0.5) > cosine_schedule(400, 1000, 1.0, 0.5));
    }
}
