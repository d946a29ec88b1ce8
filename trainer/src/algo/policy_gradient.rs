//! The GRPO family's algorithm switches as pure functions: advantages, importance ratios, clipping, KL
//! estimators and loss aggregation. Key names follow verl (`clip_ratio_low/high`, `clip_ratio_c`,
//! `loss_agg_mode`, `adv_estimator`) and TRL (`scale_rewards`, `importance_sampling_level`, `beta`).

use serde::{Deserialize, Serialize};
use tch::Tensor;

/// How a completion's advantage is computed from the rewards of its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AdvEstimator {
    /// r − mean(group), then scaled per `scale_rewards` (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300 §4.1.2).
    #[default]
    Grpo,
    /// r − mean of the other G−1 rewards of the group (Ahmadian et al. 2024, arXiv 2402.14740, eq. 6).
    Rloo,
}

/// Scaling of the centred rewards (TRL's `scale_rewards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// Divide by the group's standard deviation (GRPO).
    #[default]
    Group,
    /// Divide by the standard deviation of all rewards of the batch (Hu et al., REINFORCE++).
    Batch,
    /// No scaling (Dr.GRPO, Liu et al. 2025, arXiv 2503.20783 §3.1).
    None,
}

/// Unbiased (Bessel-corrected) standard deviation, as torch.std; 0 for fewer than 2 values.
fn std(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return 0.0;
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
}

/// Advantages of `rewards`, laid out as consecutive groups of `group` completions of the same prompt.
/// GRPO: Â = (r − mean_g) / (std + ε) with std the group's (`Group`), the batch's (`Batch`) or 1 (`None`).
/// RLOO: Â = r − (Σ_g r − r)/(G − 1), then scaled by the batch std with `Batch`.
pub fn advantages(rewards: &[f64], group: usize, est: AdvEstimator, scale: ScaleRewards, eps: f64) -> Vec<f64> {
    assert!(group > 0 && rewards.len() % group == 0, "rewards must come in whole groups");
    let batch_std = std(rewards);
    let mut out = Vec::with_capacity(rewards.len());
    for g in rewards.chunks(group) {
        let n = g.len() as f64;
        let sum: f64 = g.iter().sum();
        let mean = sum / n;
        let denom = match scale {
            ScaleRewards::Group if est == AdvEstimator::Grpo => std(g) + eps,
            ScaleRewards::Batch => batch_std + eps,
            _ => 1.0,
        };
        for &r in g {
            let centred = match est {
                AdvEstimator::Grpo => r - mean,
                AdvEstimator::Rloo if g.len() > 1 => r - (sum - r) / (n - 1.0),
                AdvEstimator::Rloo => 0.0,
            };
            out.push(centred / denom);
        }
    }
    out
}

/// Whether the importance ratio is per token (PPO/GRPO) or one per sequence (GSPO, Zheng et al. 2025,
/// arXiv 2507.18071: s = exp(mean_t log π/π_old)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RatioLevel {
    #[default]
    Token,
    Sequence,
}

/// How token losses become the batch loss (verl's `loss_agg_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema)]
pub enum LossAgg {
    /// Σ over all tokens / number of tokens in the whole batch (DAPO, Yu et al. 2025, arXiv 2503.14476 eq. 8;
    /// TRL's `loss_type = "dapo"`).
    #[default]
    #[serde(rename = "token-mean")]
    TokenMean,
    /// Mean over sequences of each sequence's token mean (the original GRPO objective).
    #[serde(rename = "seq-mean-token-mean")]
    SeqMeanTokenMean,
    /// Mean over sequences of each sequence's token sum.
    #[serde(rename = "seq-mean-token-sum")]
    SeqMeanTokenSum,
    /// Σ over all tokens / (sequences × a constant, the maximum completion length) (Dr.GRPO, arXiv 2503.20783).
    #[serde(rename = "seq-mean-token-sum-norm")]
    SeqMeanTokenSumNorm,
}

/// KL estimators of KL(π‖π_ref) from samples of π (Schulman 2020, "Approximating KL divergence"), with
/// x = log π_ref − log π: k1 = −x, k2 = x²/2, k3 = eˣ − 1 − x.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    K1,
    K2,
    #[default]
    K3,
}

/// Per-token KL estimate from policy and reference log-probabilities (same shape). k3's exponent is clamped
/// to ±20 and its value to ≤ 10, as verl's `low_var_kl`, so one outlier token cannot blow up the loss.
pub fn kl(logp: &Tensor, ref_logp: &Tensor, est: KlEstimator) -> Tensor {
    let x = ref_logp - logp;
    match est {
        KlEstimator::K1 => -x,
        KlEstimator::K2 => x.square() * 0.5,
        KlEstimator::K3 => {
            let x = x.clamp(-20.0, 20.0);
            (x.exp() - 1.0 - x).clamp(-10.0, 10.0)
        }
    }
}

/// The clipped surrogate's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipCfg {
    pub level: RatioLevel,
    /// Lower clip: ratio ≥ 1 − eps_low.
    pub eps_low: f64,
    /// Upper clip: ratio ≤ 1 + eps_high (DAPO's clip-higher when eps_high > eps_low).
    pub eps_high: f64,
    /// Dual clip (Ye et al. 2020, arXiv 1912.09729): for negative advantages the loss is at most −Â·c.
    pub dual_clip: Option<f64>,
}

/// Denominators of the loss aggregation over the whole optimizer step (all micro-batches), so that summing
/// the micro-batch losses gives the aggregate of the step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AggDenoms {
    pub tokens: f64,
    pub seqs: f64,
    /// Dr.GRPO's constant (the maximum completion length).
    pub norm: f64,
}

/// Aggregates per-token values `[B, T]` under `mask` (0/1, same shape) into this micro-batch's share of the
/// step's loss.
pub fn aggregate(values: &Tensor, mask: &Tensor, mode: LossAgg, d: AggDenoms) -> Tensor {
    let masked = values * mask;
    match mode {
        LossAgg::TokenMean => masked.sum(values.kind()) / d.tokens.max(1.0),
        LossAgg::SeqMeanTokenMean => {
            let per_seq = masked.sum_dim_intlist(1, false, values.kind()) / mask.sum_dim_intlist(1, false, values.kind()).clamp_min(1.0);
            per_seq.sum(values.kind()) / d.seqs.max(1.0)
        }
        LossAgg::SeqMeanTokenSum => masked.sum(values.kind()) / d.seqs.max(1.0),
        LossAgg::SeqMeanTokenSumNorm => masked.sum(values.kind()) / (d.seqs.max(1.0) * d.norm.max(1.0)),
    }
}

/// Importance ratios `[B, T]`: per token exp(log π − log π_old), or GSPO's per-sequence
/// exp(mean over the sequence's tokens of (log π − log π_old)) broadcast to its tokens.
pub fn ratios(logp: &Tensor, old_logp: &Tensor, mask: &Tensor, level: RatioLevel) -> Tensor {
    let log_ratio = (logp - old_logp) * mask;
    match level {
        RatioLevel::Token => log_ratio.exp(),
        RatioLevel::Sequence => {
            let n = mask.sum_dim_intlist(1, true, mask.kind()).clamp_min(1.0);
            (log_ratio.sum_dim_intlist(1, true, log_ratio.kind()) / n).exp().expand_as(logp)
        }
    }
}

/// Per-token clipped policy-gradient loss (to be minimised) and the per-token indicator of clipping:
/// L = max(−Â·r, −Â·clip(r, 1 − ε_low, 1 + ε_high)), and with dual clip, for Â < 0, min(L, −Â·c).
/// `adv` is `[B]` (one advantage per sequence) or `[B, T]`.
pub fn clipped_pg(ratio: &Tensor, adv: &Tensor, cfg: &ClipCfg) -> (Tensor, Tensor) {
    let adv = per_token(adv);
    let pg1 = -&adv * ratio;
    let pg2 = -&adv * ratio.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high);
    let clipped = pg2.gt_tensor(&pg1);
    let mut loss = pg1.maximum(&pg2);
    if let Some(c) = cfg.dual_clip {
        let pg3 = -&adv * c;
        let dual = loss.minimum(&pg3);
        loss = dual.where_self(&adv.lt(0.0), &loss);
    }
    (loss, clipped.to_kind(ratio.kind()))
}

/// The policy loss (verl's `policy_loss.loss_mode`; TRL's `loss_type` names CISPO and SAPO the same way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PolicyLoss {
    /// PPO's clipped surrogate (GRPO, DAPO's clip-higher, dual clip; GSPO with sequence-level ratios).
    #[default]
    #[serde(alias = "ppo", alias = "grpo")]
    Vanilla,
    /// CISPO (MiniMax-M1, arXiv 2506.13585): every token keeps its gradient; the importance weight is clipped
    /// above at 1 + `clip_ratio_high` and its gradient stopped.
    Cispo,
    /// SAPO (arXiv 2511.20347): a soft sigmoid gate with temperatures `sapo_tau_pos` / `sapo_tau_neg` instead of
    /// the hard clip.
    Sapo,
    /// GMPO (arXiv 2507.20673): the geometric mean of the token ratios per sequence, each clipped in log space to
    /// [−`clip_ratio_low`, `clip_ratio_high`] (the paper uses 0.4 both ways).
    #[serde(alias = "geo_mean")]
    Gmpo,
}

/// CISPO's per-token loss (MiniMax-M1, arXiv 2506.13585, eq. 4): −sg(r̂)·Â·log π with r̂ = min(r, 1 + ε_high) —
/// the paper sets no lower bound. Returns the loss and the indicator of tokens whose weight was truncated.
/// `logp` carries the gradient; `ratio` is detached here.
pub fn cispo(logp: &Tensor, ratio: &Tensor, adv: &Tensor, eps_high: f64) -> (Tensor, Tensor) {
    let adv = per_token(adv);
    let r = ratio.detach();
    let weight = r.clamp_max(1.0 + eps_high);
    let truncated = r.gt(1.0 + eps_high).to_kind(ratio.kind());
    (-(weight * &adv) * logp, truncated)
}

/// SAPO's per-token loss (Gao et al. 2025, arXiv 2511.20347): −(4/τ)·σ(τ(r − 1))·Â with τ = τ_pos where Â > 0,
/// else τ_neg. At r = 1 its gradient equals the unclipped surrogate's (d/dr = 4σ(1−σ) = 1); it fades smoothly as
/// r leaves 1, faster for negative advantages (τ_neg > τ_pos; the paper's 1.0 and 1.05).
pub fn sapo(ratio: &Tensor, adv: &Tensor, tau_pos: f64, tau_neg: f64) -> Tensor {
    let adv = per_token(adv);
    let tau = adv.gt(0.0).to_kind(ratio.kind()) * (tau_pos - tau_neg) + tau_neg;
    let gate = ((ratio - 1.0) * &tau).sigmoid() * 4.0 / &tau;
    -(gate * adv)
}

/// GMPO's loss per sequence (Zhao et al. 2025, arXiv 2507.20673): −Â·exp(mean_t ℓ_t) with the token log-ratios
/// ρ_t = log π − log π_old clipped pessimistically in log space, sgn(Â)·ℓ_t = min(sgn(Â)·ρ_t,
/// clip(sgn(Â)·ρ_t, −ε_low, ε_high)); returned on every token of the sequence (`[B, T]`), so that
/// `loss_agg_mode = "seq-mean-token-mean"` gives the paper's mean over sequences. Also returns the indicator of
/// clipped tokens.
pub fn gmpo(logp: &Tensor, old_logp: &Tensor, mask: &Tensor, adv: &Tensor, eps_low: f64, eps_high: f64) -> (Tensor, Tensor) {
    let adv = per_token(adv);
    let sign = adv.sign();
    let signed = (logp - old_logp) * &sign;
    let clipped = signed.clamp(-eps_low, eps_high);
    let kept = signed.minimum(&clipped) * &sign * mask;
    let n = mask.sum_dim_intlist(1, true, mask.kind()).clamp_min(1.0);
    let seq_ratio = (kept.sum_dim_intlist(1, true, kept.kind()) / n).exp();
    let loss = -(adv * seq_ratio).expand_as(logp);
    (loss, signed.gt_tensor(&clipped).to_kind(logp.kind()))
}

/// DeepSeek-V3.2's off-policy sequence masking (arXiv 2512.02556, §3.1): a sequence with a negative advantage
/// whose mean log(π_sampler/π_θ) over its tokens exceeds δ gets no gradient. Returns `[B, 1]`: 1 kept, 0 masked.
pub fn off_policy_sequence_mask(logp: &Tensor, sampler_logp: &Tensor, mask: &Tensor, adv: &Tensor, delta: f64) -> Tensor {
    let adv = per_token(adv);
    let n = mask.sum_dim_intlist(1, true, mask.kind()).clamp_min(1.0);
    let drift = ((sampler_logp - logp.detach()) * mask).sum_dim_intlist(1, true, mask.kind()) / n;
    let negative = adv.narrow(1, 0, 1).lt(0.0);
    negative.logical_and(&drift.gt(delta)).logical_not().to_kind(mask.kind())
}

/// DeepSeek-V3.2's unbiased KL estimate (arXiv 2512.02556, eq. 7): k3 of π_ref against π_θ, reweighted by the
/// importance ratio π_θ/π_old of the sampled token: (π_θ/π_old)·(π_ref/π_θ − log(π_ref/π_θ) − 1).
pub fn kl_unbiased(logp: &Tensor, old_logp: &Tensor, ref_logp: &Tensor) -> Tensor {
    (logp - old_logp).exp() * kl(logp, ref_logp, KlEstimator::K3)
}

/// An advantage per sequence `[B]` as `[B, 1]` (broadcasts over tokens); `[B, T]` as it is.
fn per_token(adv: &Tensor) -> Tensor {
    if adv.dim() == 1 {
        adv.unsqueeze(1)
    } else {
        adv.shallow_clone()
    }
}

#[cfg(test)]
mod tests {
    use crate::algo::testing::{close, t2, vals};
    use super::*;
    use tch::Kind;


    #[test]
    fn grpo_advantages_use_the_group_mean_and_unbiased_std() {
        // group 1: rewards 1, 0, 0, 1 -> mean 0.5, std sqrt(1/3)
        let r = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0];
        let a = advantages(&r, 4, AdvEstimator::Grpo, ScaleRewards::Group, 1e-4);
        let s = (1.0f64 / 3.0).sqrt() + 1e-4;
        close(&a, &[0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0.0, 0.0, 0.0, 0.0]);
        // Dr.GRPO: no std
        let a = advantages(&r, 4, AdvEstimator::Grpo, ScaleRewards::None, 1e-4);
        close(&a, &[0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]);
        // batch std: std of all 8 rewards
        let m = r.iter().sum::<f64>() / 8.0;
        let bs = (r.iter().map(|x: &f64| (x - m).powi(2)).sum::<f64>() / 7.0).sqrt() + 1e-4;
        let a = advantages(&r, 4, AdvEstimator::Grpo, ScaleRewards::Batch, 1e-4);
        close(&a, &[0.5 / bs, -0.5 / bs, -0.5 / bs, 0.5 / bs, 0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn rloo_baseline_leaves_the_sample_out() {
        let r = [1.0, 0.0, 0.0];
        let a = advantages(&r, 3, AdvEstimator::Rloo, ScaleRewards::Group, 1e-4);
        // 1 - (0+0)/2 = 1; 0 - (1+0)/2 = -0.5
        close(&a, &[1.0, -0.5, -0.5]);
        // RLOO equals G/(G-1) times the mean-centred reward
        let r = [0.3, 1.7, -0.4, 2.2];
        let a = advantages(&r, 4, AdvEstimator::Rloo, ScaleRewards::None, 0.0);
        let mean = r.iter().sum::<f64>() / 4.0;
        close(&a, &r.iter().map(|x| (x - mean) * 4.0 / 3.0).collect::<Vec<_>>());
    }

    #[test]
    fn kl_estimators_match_their_formulas() {
        let lp = t2(&[-1.0, -2.0, -0.5], 1);
        let rf = t2(&[-1.5, -1.0, -0.5], 1);
        let x: Vec<f64> = vec![-0.5, 1.0, 0.0];
        close(&vals(&kl(&lp, &rf, KlEstimator::K1)), &x.iter().map(|x| -x).collect::<Vec<_>>());
        close(&vals(&kl(&lp, &rf, KlEstimator::K2)), &x.iter().map(|x| x * x / 2.0).collect::<Vec<_>>());
        close(&vals(&kl(&lp, &rf, KlEstimator::K3)), &x.iter().map(|x| x.exp() - 1.0 - x).collect::<Vec<_>>());
        // k3 is clamped
        let big = kl(&t2(&[-40.0], 1), &t2(&[0.0], 1), KlEstimator::K3);
        assert_eq!(vals(&big), vec![10.0]);
    }

    #[test]
    fn clipping_low_high_and_dual() {
        let ratio = t2(&[0.5, 0.9, 1.1, 1.5, 0.5, 1.5, 5.0], 1);
        let cfg = ClipCfg { level: RatioLevel::Token, eps_low: 0.2, eps_high: 0.28, dual_clip: None };
        // positive advantage: min(r·A, clip(r)·A) -> loss = -min(...)
        let (l, c) = clipped_pg(&ratio, &Tensor::from_slice(&[2.0f64]), &cfg);
        let expect: Vec<f64> = [0.5f64, 0.9, 1.1, 1.5, 0.5, 1.5, 5.0].iter().map(|&r| -(r * 2.0).min(r.clamp(0.8, 1.28) * 2.0)).collect();
        close(&vals(&l), &expect);
        assert_eq!(vals(&c), vec![0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0]);
        // negative advantage with dual clip c = 3: loss = min(max(-A r, -A clip(r)), -A c)
        let cfg = ClipCfg { dual_clip: Some(3.0), ..cfg };
        let (l, _) = clipped_pg(&ratio, &Tensor::from_slice(&[-1.0f64]), &cfg);
        let expect: Vec<f64> = [0.5f64, 0.9, 1.1, 1.5, 0.5, 1.5, 5.0].iter().map(|&r| (r.max(r.clamp(0.8, 1.28))).min(3.0)).collect();
        close(&vals(&l), &expect);
    }

    #[test]
    fn sequence_ratios_are_the_geometric_mean_of_token_ratios() {
        let lp = t2(&[-1.0, -2.0, -3.0, -1.0, -1.0, -1.0], 2);
        let old = t2(&[-1.2, -1.8, 0.0, -1.5, -0.5, -1.0], 2);
        let mask = t2(&[1.0, 1.0, 0.0, 1.0, 1.0, 1.0], 2);
        let r = ratios(&lp, &old, &mask, RatioLevel::Sequence);
        let s0 = ((0.2f64 + -0.2) / 2.0).exp();
        let s1 = ((0.5f64 - 0.5 + 0.0) / 3.0).exp();
        close(&vals(&r), &[s0, s0, s0, s1, s1, s1]);
        let r = ratios(&lp, &old, &mask, RatioLevel::Token);
        close(&vals(&r), &[0.2f64.exp(), (-0.2f64).exp(), 1.0, 0.5f64.exp(), (-0.5f64).exp(), 1.0]);
    }

    #[test]
    fn aggregation_modes() {
        let v = t2(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2);
        let m = t2(&[1.0, 1.0, 0.0, 1.0, 1.0, 1.0], 2);
        let d = AggDenoms { tokens: 5.0, seqs: 2.0, norm: 10.0 };
        let f = |mode| aggregate(&v, &m, mode, d).double_value(&[]);
        assert!((f(LossAgg::TokenMean) - 18.0 / 5.0).abs() < 1e-12);
        assert!((f(LossAgg::SeqMeanTokenMean) - (1.5 + 5.0) / 2.0).abs() < 1e-12);
        assert!((f(LossAgg::SeqMeanTokenSum) - (3.0 + 15.0) / 2.0).abs() < 1e-12);
        assert!((f(LossAgg::SeqMeanTokenSumNorm) - 18.0 / 20.0).abs() < 1e-12);
        // micro-batches sum to the whole (global denominators)
        let a = aggregate(&v.narrow(0, 0, 1), &m.narrow(0, 0, 1), LossAgg::TokenMean, d).double_value(&[]);
        let b = aggregate(&v.narrow(0, 1, 1), &m.narrow(0, 1, 1), LossAgg::TokenMean, d).double_value(&[]);
        assert!((a + b - f(LossAgg::TokenMean)).abs() < 1e-12);
    }

    #[test]
    fn cispo_keeps_every_token_and_stops_the_weights_gradient() {
        // loss −min(r, 1 + ε)·Â·log π; its gradient w.r.t. log π is −min(r, 1 + ε)·Â, even where PPO would clip
        let lp = t2(&[-1.0, -2.0, -0.5], 1).set_requires_grad(true);
        let old = t2(&[-1.0, -2.5, -2.0], 1);
        let r = (&lp - &old).exp();
        let (loss, truncated) = cispo(&lp, &r, &Tensor::from_slice(&[2.0f64]), 0.28);
        let rv = [1.0f64, 0.5f64.exp(), 1.5f64.exp()];
        let w: Vec<f64> = rv.iter().map(|x| x.min(1.28)).collect();
        close(&vals(&loss), &[-w[0] * 2.0 * -1.0, -w[1] * 2.0 * -2.0, -w[2] * 2.0 * -0.5]);
        assert_eq!(vals(&truncated), vec![0.0, 1.0, 1.0]);
        loss.sum(Kind::Double).backward();
        close(&vals(&lp.grad()), &w.iter().map(|w| -w * 2.0).collect::<Vec<_>>());
    }

    #[test]
    fn sapo_gate_is_the_papers_sigmoid_with_unit_slope_at_one() {
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let r = t2(&[0.5, 1.0, 1.7], 1);
        for (a, tau) in [(1.5f64, 1.0f64), (-0.7, 1.05)] {
            let l = sapo(&r, &Tensor::from_slice(&[a]), 1.0, 1.05);
            let want: Vec<f64> = [0.5f64, 1.0, 1.7].iter().map(|&x| -(4.0 / tau) * sig(tau * (x - 1.0)) * a).collect();
            close(&vals(&l), &want);
        }
        // at r = 1 the gradient is the plain surrogate's −Â
        let r = t2(&[1.0], 1).set_requires_grad(true);
        sapo(&r, &Tensor::from_slice(&[0.8f64]), 1.0, 1.05).sum(Kind::Double).backward();
        close(&vals(&r.grad()), &[-0.8]);
    }

    #[test]
    fn gmpo_is_the_clipped_geometric_mean_per_sequence() {
        let lp = t2(&[-1.0, -2.0, -3.0, -1.0, -1.0, -1.0], 2);
        let old = t2(&[-1.2, -1.3, 0.0, -1.5, -0.2, -1.0], 2);
        let mask = t2(&[1.0, 1.0, 0.0, 1.0, 1.0, 1.0], 2);
        let adv = Tensor::from_slice(&[1.0f64, -2.0]);
        let (loss, clipped) = gmpo(&lp, &old, &mask, &adv, 0.4, 0.4);
        // sequence 0, Â > 0: ρ = (0.2, −0.7) → min(ρ, clip(ρ)) = (0.2, −0.7); mean −0.25
        let s0 = -1.0 * (-0.25f64).exp();
        // sequence 1, Â < 0: −ρ = (−0.5, 0.8, 0) → min(−ρ, clip(−ρ)) = (−0.5, 0.4, 0) → ℓ = (0.5, −0.4, 0); mean 0.1/3
        let s1 = 2.0 * (0.1f64 / 3.0).exp();
        close(&vals(&loss), &[s0, s0, s0, s1, s1, s1]);
        assert_eq!(vals(&clipped), vec![0.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
    }

    #[test]
    fn off_policy_masking_drops_only_negative_drifted_sequences() {
        let lp = t2(&[-1.0, -1.0, -1.0, -1.0, -1.0, -1.0], 3);
        // mean log(π_sampler/π_θ): 0.75, 0.75, 0.1
        let samp = t2(&[-0.5, 0.0, -0.5, 0.0, -0.9, -0.9], 3);
        let mask = t2(&[1.0; 6], 3);
        let m = off_policy_sequence_mask(&lp, &samp, &mask, &Tensor::from_slice(&[-1.0f64, 1.0, -1.0]), 0.5);
        assert_eq!(vals(&m), vec![0.0, 1.0, 1.0]);
    }

    #[test]
    fn unbiased_kl_reweights_k3_by_the_current_to_old_ratio() {
        let lp = t2(&[-1.0, -2.0], 1);
        let old = t2(&[-1.3, -1.5], 1);
        let rf = t2(&[-1.5, -1.0], 1);
        let want: Vec<f64> = [(-1.0f64, -1.3f64, -1.5f64), (-2.0, -1.5, -1.0)].iter().map(|&(p, o, r)| (p - o).exp() * ((r - p).exp() - (r - p) - 1.0)).collect();
        close(&vals(&kl_unbiased(&lp, &old, &rf)), &want);
    }
}
