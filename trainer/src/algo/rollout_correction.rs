//! The sampler/trainer mismatch: the rollout engine samples through its own decode path (fused weights, the
//! native CPU step, bf16 on a GPU) and the trainer scores the same tokens with the full forward, so the two
//! log-probabilities of one sampled token differ a little — the gap TRL and verl users hit between vLLM and the
//! trainer (trl#4493, verl PR #2953). Here: its metrics, and the two corrections, as functions of the trainer's
//! log-probabilities of the sampling policy (`old`, detached) and the sampler's (`sampler`), per token `[B, T]`
//! under `mask`.
//!
//! - TIS, truncated importance sampling (Yao, Liu et al. 2025, "Your efficient RL framework secretly brings you
//!   off-policy RL training"): each token's loss (or each sequence's) is weighted by min(π_train/π_sampler, C).
//! - MIS, masked importance sampling (IcePop, Ring-1T, arXiv 2510.18855; sequence level as in "When Speed Kills
//!   Stability" and TRL's default `sequence_mask`): a token (or sequence) whose ratio leaves [lo, hi] gets no
//!   gradient; the rest keep weight 1.
//!
//! At sequence level the ratio is the product of the token ratios, exp(Σ_t log π_train − log π_sampler).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// `rollout_correction.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CorrectionMode {
    /// No correction (the mismatch is still measured).
    None,
    /// Truncated importance sampling: weight min(ratio, cap).
    Tis,
    /// Masked importance sampling: no gradient where the ratio leaves the band.
    #[default]
    Mis,
}

/// `rollout_correction.level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CorrectionLevel {
    /// One ratio per token.
    Token,
    /// One ratio per sequence: the product of its token ratios.
    #[default]
    Sequence,
}

/// The correction's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Correction {
    pub mode: CorrectionMode,
    pub level: CorrectionLevel,
    /// TIS: the truncation C. MIS: the upper edge of the band when `band` is not given.
    pub cap: f64,
    /// MIS: the band [lo, hi] of ratios kept (default [0, cap]: only ratios above `cap` are masked, as TRL does).
    pub band: Option<[f64; 2]>,
}

/// Per-token weights `[B, T]` for the loss (detached; 1 where nothing is corrected) and the per-token indicator
/// of tokens whose weight the correction changed (truncated or masked).
pub fn weights(old: &Tensor, sampler: &Tensor, mask: &Tensor, c: &Correction) -> (Tensor, Tensor) {
    let log_ratio = ((old - sampler) * mask).detach();
    let log_ratio = match c.level {
        CorrectionLevel::Token => log_ratio,
        CorrectionLevel::Sequence => log_ratio.sum_dim_intlist(1, true, log_ratio.kind()).expand_as(old),
    };
    let ratio = log_ratio.clamp(-40.0, 40.0).exp();
    match c.mode {
        CorrectionMode::None => (ratio.ones_like(), ratio.zeros_like()),
        CorrectionMode::Tis => (ratio.clamp_max(c.cap), ratio.gt(c.cap).to_kind(old.kind()) * mask),
        CorrectionMode::Mis => {
            let [lo, hi] = c.band.unwrap_or([0.0, c.cap]);
            let keep = ratio.ge(lo).logical_and(&ratio.le(hi)).to_kind(old.kind());
            let changed = (keep.ones_like() - &keep) * mask;
            (keep, changed)
        }
    }
}

/// Sums of the mismatch over the masked tokens, for metrics (divide by the token count): Σ |log π_train −
/// log π_sampler|, Σ k3 estimate of KL(π_sampler ‖ π_train) (x = log π_train − log π_sampler, eˣ − 1 − x, from
/// tokens drawn by the sampler; Schulman 2020), and the largest token ratio π_train/π_sampler.
pub fn mismatch(old: &Tensor, sampler: &Tensor, mask: &Tensor) -> (f64, f64, f64) {
    let x = ((old - sampler) * mask).detach().to_kind(Kind::Double);
    let m = mask.to_kind(Kind::Double);
    let abs = x.abs().sum(Kind::Double).double_value(&[]);
    let k3 = ((x.exp() - 1.0 - &x) * &m).sum(Kind::Double).double_value(&[]);
    let max_log = x.masked_fill(&m.eq(0.0), f64::NEG_INFINITY).max().double_value(&[]);
    (abs, k3, if max_log.is_finite() { max_log.exp() } else { 0.0 })
}

#[cfg(test)]
mod tests {
    use crate::algo::testing::{close, t2, vals};
    use super::*;

    // trainer's and sampler's log-probs of two sequences of two tokens (the last one a pad in row 1)
    fn fixture() -> (Tensor, Tensor, Tensor) {
        let old = t2(&[-1.0, -2.0, -0.5, -3.0], 2);
        let samp = t2(&[-1.5, -1.2, -0.5, -9.0], 2);
        let mask = t2(&[1.0, 1.0, 1.0, 0.0], 2);
        (old, samp, mask)
    }

    #[test]
    fn tis_truncates_token_and_sequence_ratios_at_the_cap() {
        let (old, samp, mask) = fixture();
        // token ratios: e^0.5, e^-0.8, e^0 (the pad counts as 1)
        let c = Correction { mode: CorrectionMode::Tis, level: CorrectionLevel::Token, cap: 1.5, band: None };
        let (w, changed) = weights(&old, &samp, &mask, &c);
        close(&vals(&w), &[1.5, (-0.8f64).exp(), 1.0, 1.0]);
        assert_eq!(vals(&changed), vec![1.0, 0.0, 0.0, 0.0]);
        // sequence ratios: e^(0.5 − 0.8) and e^0
        let c = Correction { level: CorrectionLevel::Sequence, ..c };
        let (w, changed) = weights(&old, &samp, &mask, &c);
        let s0 = (-0.3f64).exp();
        close(&vals(&w), &[s0, s0, 1.0, 1.0]);
        assert_eq!(vals(&changed), vec![0.0; 4]);
    }

    #[test]
    fn mis_masks_ratios_outside_the_band() {
        let (old, samp, mask) = fixture();
        let c = Correction { mode: CorrectionMode::Mis, level: CorrectionLevel::Token, cap: 1.5, band: None };
        let (w, changed) = weights(&old, &samp, &mask, &c);
        assert_eq!(vals(&w), vec![0.0, 1.0, 1.0, 1.0]);
        assert_eq!(vals(&changed), vec![1.0, 0.0, 0.0, 0.0]);
        // IcePop's band [0.5, 5]: e^-0.8 = 0.449 is out, e^0.5 in
        let c = Correction { band: Some([0.5, 5.0]), ..c };
        assert_eq!(vals(&weights(&old, &samp, &mask, &c).0), vec![1.0, 0.0, 1.0, 1.0]);
        // sequence level: sequence 0's ratio e^-0.3 = 0.74 is in [0.8, 5]? no: the whole sequence goes
        let c = Correction { level: CorrectionLevel::Sequence, band: Some([0.8, 5.0]), ..c };
        let (w, changed) = weights(&old, &samp, &mask, &c);
        assert_eq!(vals(&w), vec![0.0, 0.0, 1.0, 1.0]);
        assert_eq!(vals(&changed), vec![1.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn mismatch_metrics_match_their_formulas() {
        let (old, samp, mask) = fixture();
        let (abs, k3, max) = mismatch(&old, &samp, &mask);
        let xs = [0.5f64, -0.8, 0.0];
        assert!((abs - 1.3).abs() < 1e-12);
        assert!((k3 - xs.iter().map(|x| x.exp() - 1.0 - x).sum::<f64>()).abs() < 1e-12);
        assert!((max - 0.5f64.exp()).abs() < 1e-12);
        // no correction leaves every weight at 1
        let c = Correction { mode: CorrectionMode::None, level: CorrectionLevel::Token, cap: 3.0, band: None };
        assert_eq!(vals(&weights(&old, &samp, &mask, &c).0), vec![1.0; 4]);
    }
}
