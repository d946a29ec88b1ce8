//! The GRPO stage's table (`kind = "grpo"`): sampling, rewards, advantages, the loss and its clipping, KL,
//! and the sampling-side filters (dynamic sampling, prefilter, token budget, domain-aware sampling).

use data::DataConfig;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::PathBuf;

use crate::algo::logprobs::PromptSharing;
use crate::algo::policy_gradient::{AdvEstimator, ClipCfg, KlEstimator, LossAgg, PolicyLoss, RatioLevel, ScaleRewards};
use crate::algo::rollout_correction::{Correction, CorrectionLevel, CorrectionMode};
use crate::settings::{is_default, SyntheticSpec};

/// Dynamic sampling (DAPO, Yu et al. 2025, arXiv 2503.14476 §3.2): groups whose rewards are all equal carry
/// no gradient; they are dropped and more prompts are drawn until the batch is full.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DynamicSampling {
    /// At most this many generation rounds per step (verl's `max_num_gen_batches`).
    #[serde(default = "three", alias = "max_num_gen_batches")]
    pub max_gen_batches: usize,
    /// When the cap is hit with the batch not full: "train" on the groups kept so far (a step with none is
    /// skipped and counted), or "error" to stop the run with a message.
    #[serde(default)]
    pub on_cap: OnCap,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnCap {
    #[default]
    Train,
    Error,
}

/// Phi-4-mini's prompt filtering (arXiv 2504.21233 §RL): before training, sample `samples` completions per
/// prompt with the starting policy; keep prompts whose pass rate lies in [min_pass_rate, max_pass_rate] and
/// whose response lengths are uniform enough (coefficient of variation ≤ `max_length_cv`).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Prefilter {
    /// Pilot completions per prompt.
    #[serde(default = "eight")]
    pub samples: usize,
    /// Drop prompts solved less often than this.
    #[serde(default)]
    pub min_pass_rate: f64,
    /// Drop prompts solved more often than this (e.g. 0.9 drops the overly easy ones).
    #[serde(default = "one_f")]
    pub max_pass_rate: f64,
    /// Drop prompts whose response lengths have a larger coefficient of variation (std/mean).
    #[serde(default)]
    pub max_length_cv: Option<f64>,
}

crate::training::training_stage! {
    /// `kind = "grpo"`.
    pub struct GrpoStage {
        /// Problems with gold answers (prompt + answer columns).
        #[serde(default)]
        pub data: Option<DataConfig>,
        /// Synthetic arithmetic problems instead of a dataset.
        #[serde(default)]
        pub synthetic: Option<SyntheticSpec>,
        /// Reward terms (`[[stage.reward]]`, see the rewards crate): default one `accuracy` term, +1 correct,
        /// −1 otherwise (Phi-4-mini's reward).
        #[serde(default = "default_rewards")]
        #[schemars(with = "Vec<serde_json::Value>")]
        pub reward: Vec<rewards::RewardConfig>,
        /// Prompts per step (verl's `train_batch_size`).
        #[serde(default = "eight", alias = "train_batch_size")]
        pub prompts_per_step: usize,
        /// Completions per prompt, G (TRL's `num_generations`, verl's `rollout.n`).
        #[serde(default = "eight", alias = "n")]
        pub num_generations: usize,
        /// Oversample-then-balance (Phi-4-mini): generate this many (> G) per prompt and keep G, as balanced
        /// between above-mean and below-mean rewards as the group allows.
        #[serde(default)]
        pub oversample_generations: Option<usize>,
        /// Prompts longer than this (tokens) are dropped when loading.
        #[serde(default = "default_prompt_len")]
        pub max_prompt_length: usize,
        /// Generation limit per completion.
        #[serde(default = "default_completion_len", alias = "max_response_length")]
        pub max_completion_length: usize,
        /// Sampling temperature (at the start of the stage).
        #[serde(default = "one_f")]
        pub temperature: f64,
        /// Temperature annealing (Phi-4-mini: 1.0 → 0.6): the temperature reached after
        /// `temperature_anneal_steps` steps, linearly, then kept.
        #[serde(default)]
        pub temperature_final: Option<f64>,
        /// Steps over which the temperature goes from `temperature` to `temperature_final`.
        #[serde(default)]
        pub temperature_anneal_steps: usize,
        /// Nucleus sampling.
        #[serde(default = "one_f")]
        pub top_p: f64,
        /// Ignore end-of-sequence tokens: every completion has exactly `max_completion_length` tokens
        /// (benchmarks; TRL's `min_new_tokens` = `max_completion_length`).
        #[serde(default)]
        pub ignore_eos: bool,
        /// Top-k sampling (0: off).
        #[serde(default)]
        pub top_k: i64,
        /// Min-p sampling (0: off).
        #[serde(default)]
        pub min_p: f64,
        /// Policy updates per batch, μ (TRL's `num_iterations`, verl's `ppo_epochs`).
        #[serde(default = "one", alias = "ppo_epochs")]
        pub num_iterations: usize,
        /// Rows per forward/backward pass (memory; does not change the result).
        #[serde(default = "sixteen")]
        pub micro_batch_size: usize,
        /// Advantage estimator: "grpo" (group mean baseline) or "rloo" (leave-one-out baseline).
        #[serde(default)]
        pub adv_estimator: AdvEstimator,
        /// Advantage scaling: "group" std (GRPO), "batch" std, or "none" (Dr.GRPO).
        #[serde(default)]
        pub scale_rewards: ScaleRewards,
        /// Importance ratio per "token" (GRPO) or per "sequence" (GSPO).
        #[serde(default)]
        pub importance_sampling_level: RatioLevel,
        /// Lower clip ε (TRL's `epsilon`).
        #[serde(default = "default_clip", alias = "epsilon")]
        pub clip_ratio_low: f64,
        /// Upper clip ε (DAPO's clip-higher uses 0.28; default: equal to `clip_ratio_low`; TRL's `epsilon_high`).
        #[serde(default, alias = "epsilon_high")]
        pub clip_ratio_high: Option<f64>,
        /// Dual clip constant c > 1 for negative advantages (off by default).
        #[serde(default)]
        pub clip_ratio_c: Option<f64>,
        /// "token-mean" (DAPO, default), "seq-mean-token-mean" (GRPO), "seq-mean-token-sum",
        /// "seq-mean-token-sum-norm" (Dr.GRPO, divides by `max_completion_length`).
        #[serde(default)]
        pub loss_agg_mode: LossAgg,
        /// KL coefficient against the stage's starting model (TRL's `beta`); 0 loads no reference model.
        #[serde(default, alias = "beta")]
        pub kl_coef: f64,
        /// KL estimator: "k1", "k2" or "k3".
        #[serde(default)]
        pub kl_estimator: KlEstimator,
        /// Put the KL penalty (k1 summed over the completion) into the reward instead of the loss.
        #[serde(default)]
        pub kl_in_reward: bool,
        /// Entropy bonus coefficient (the entropy is logged either way).
        #[serde(default, alias = "entropy_coef")]
        pub entropy_coeff: f64,
        /// Overlong filtering (DAPO): truncated completions carry no loss (they still count in their group).
        #[serde(default)]
        pub mask_truncated_completions: bool,
        /// The policy loss: "vanilla" (PPO's clipped surrogate), "cispo" (MiniMax-M1: every token, the importance
        /// weight clipped above at 1 + `clip_ratio_high` and its gradient stopped), "sapo" (a soft sigmoid gate,
        /// `sapo_tau_pos` / `sapo_tau_neg`) or "gmpo" (geometric mean of token ratios per sequence, clipped in
        /// log space to [−`clip_ratio_low`, `clip_ratio_high`]); verl's `policy_loss.loss_mode`.
        #[serde(default, alias = "loss_mode", skip_serializing_if = "is_default")]
        #[schemars(extend("default" = "vanilla"))]
        pub policy_loss: PolicyLoss,
        /// SAPO's gate temperature for positive advantages (the paper's 1.0).
        #[serde(default = "one_f", skip_serializing_if = "is_one")]
        pub sapo_tau_pos: f64,
        /// SAPO's gate temperature for negative advantages (the paper's 1.05: faster decay).
        #[serde(default = "default_tau_neg", skip_serializing_if = "is_default_tau_neg")]
        pub sapo_tau_neg: f64,
        /// DeepSeek-V3.2's off-policy sequence masking (arXiv 2512.02556; TRL's `off_policy_mask_threshold`): a
        /// sequence with a negative advantage whose mean log(π_sampler/π_θ) exceeds this δ gets no gradient (the
        /// paper's δ is about 0.5; off when absent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub off_policy_mask_threshold: Option<f64>,
        /// DeepSeek-V3.2's unbiased KL estimate (TRL's `use_bias_correction_kl`): the k3 KL to the reference
        /// weighted by π_θ/π_old of each token (needs `kl_coef` > 0).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pub use_bias_correction_kl: bool,
        /// Correction of the sampler/trainer mismatch: `{ mode = "none" | "tis" | "mis", level = "token" |
        /// "sequence", cap = 3.0, band = [lo, hi] }` (see the README's GRPO section for the default's reasons).
        #[serde(default, skip_serializing_if = "is_default")]
        pub rollout_correction: RolloutCorrection,
        /// Dynamic sampling (alias: verl's `filter_groups`).
        #[serde(default, alias = "filter_groups")]
        pub dynamic_sampling: Option<DynamicSampling>,
        /// Pilot-pass-rate and length-uniformity prompt filtering before training.
        #[serde(default)]
        pub prefilter: Option<Prefilter>,
        /// A fixed budget of completion tokens per step instead of a fixed number of prompts (Ring-lite's
        /// C3PO, arXiv 2506.14731): generation rounds of `prompts_per_step` prompts continue until the budget is
        /// reached (capped by `dynamic_sampling.max_gen_batches`, default 3); groups past the budget are dropped.
        #[serde(default)]
        pub tokens_per_step: Option<usize>,
        /// Encode each prompt once for its G completions in the policy update and log-probability passes
        /// ("auto": when that costs fewer FLOPs than G padded rows, i.e. short completions of long prompts;
        /// "always"; "never"). The result is the same up to float rounding.
        #[serde(default)]
        pub prompt_sharing: PromptSharing,
        /// Domain-aware dynamic sampling over the rows' `domain` column (see the data crate's DomainSampler).
        #[serde(default)]
        #[schemars(with = "Option<serde_json::Value>")]
        pub domain_sampling: Option<data::sampler::DomainSamplingConfig>,
        /// Peak learning rate.
        #[serde(default = "default_lr", alias = "learning_rate")]
        pub lr: f64,
    }
}

fn default_lr() -> f64 {
    1e-6
}
fn default_rewards() -> Vec<rewards::RewardConfig> {
    vec![serde_json::from_value(json!({"kind": "accuracy"})).expect("accuracy reward config")]
}
fn eight() -> usize {
    8
}
fn sixteen() -> usize {
    16
}
fn one() -> usize {
    1
}
fn three() -> usize {
    3
}
/// `rollout_correction`: truncated (TIS) or masked (MIS) importance sampling between the trainer's and the
/// sampler's log-probabilities of the sampled tokens (see `algo::rollout_correction`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutCorrection {
    /// "none" (measured only), "tis" (weight min(ratio, cap)) or "mis" (no gradient where the ratio leaves the
    /// band).
    pub mode: CorrectionMode,
    /// "token" (a ratio per token) or "sequence" (the product over the sequence's tokens).
    pub level: CorrectionLevel,
    /// TIS's truncation C; MIS's upper edge when `band` is absent (TRL's 3.0).
    pub cap: f64,
    /// MIS: the ratios kept, [lo, hi] (IcePop's [0.5, 5]); default [0, cap].
    pub band: Option<[f64; 2]>,
}

impl Default for RolloutCorrection {
    fn default() -> Self {
        RolloutCorrection { mode: CorrectionMode::Mis, level: CorrectionLevel::Sequence, cap: 3.0, band: None }
    }
}

impl RolloutCorrection {
    pub fn settings(&self) -> Correction {
        Correction { mode: self.mode, level: self.level, cap: self.cap, band: self.band }
    }
}

fn is_one(x: &f64) -> bool {
    *x == 1.0
}
fn default_tau_neg() -> f64 {
    1.05
}
fn is_default_tau_neg(x: &f64) -> bool {
    *x == default_tau_neg()
}
fn one_f() -> f64 {
    1.0
}
fn default_clip() -> f64 {
    0.2
}
fn default_prompt_len() -> usize {
    512
}
fn default_completion_len() -> usize {
    256
}

impl GrpoStage {
    pub fn resolve_paths(&mut self, f: &mut dyn FnMut(&mut PathBuf)) {
        if let Some(d) = self.data.as_mut() {
            f(&mut d.path);
        }
    }

    pub fn validate(&self, at: &str, p: &mut Vec<String>) {
        match (&self.data, &self.synthetic) {
            (None, None) => p.push(format!("{at}: needs `data` (prompts with answers) or `synthetic`")),
            (Some(_), Some(_)) => p.push(format!("{at}: has both `data` and `synthetic`; give one")),
            (Some(d), None) if !d.path.exists() => p.push(format!("{at}: data path {} does not exist", d.path.display())),
            _ => {}
        }
        if self.max_steps.unwrap_or(1) == 0 {
            p.push(format!("{at}: max_steps must be at least 1"));
        }
        if self.prompts_per_step == 0 || self.micro_batch_size == 0 || self.num_iterations == 0 {
            p.push(format!("{at}: prompts_per_step, micro_batch_size and num_iterations must be at least 1"));
        }
        if self.num_generations < 2 {
            p.push(format!("{at}: num_generations must be at least 2 (advantages compare completions of a prompt)"));
        }
        if let Some(o) = self.oversample_generations {
            if o <= self.num_generations {
                p.push(format!("{at}: oversample_generations ({o}) must exceed num_generations ({})", self.num_generations));
            }
        }
        if !(self.temperature > 0.0) || self.temperature_final.is_some_and(|t| !(t > 0.0)) {
            p.push(format!("{at}: temperature and temperature_final must be positive"));
        }
        if !(0.0..1.0).contains(&self.clip_ratio_low) || self.clip_ratio_high.is_some_and(|h| !(h >= 0.0)) {
            p.push(format!("{at}: clip_ratio_low must be in [0, 1) and clip_ratio_high ≥ 0"));
        }
        if !(self.sapo_tau_pos > 0.0 && self.sapo_tau_neg > 0.0) {
            p.push(format!("{at}: sapo_tau_pos and sapo_tau_neg must be positive"));
        }
        if self.off_policy_mask_threshold.is_some_and(|d| !(d >= 0.0)) {
            p.push(format!("{at}: off_policy_mask_threshold must be ≥ 0"));
        }
        if self.use_bias_correction_kl && self.kl_coef == 0.0 {
            p.push(format!("{at}: use_bias_correction_kl needs a KL term (kl_coef > 0)"));
        }
        let rc = &self.rollout_correction;
        if !(rc.cap > 0.0) || rc.band.is_some_and(|[lo, hi]| !(lo >= 0.0 && lo < hi)) {
            p.push(format!("{at}: rollout_correction needs cap > 0 and a band [lo, hi] with 0 ≤ lo < hi"));
        }
        if self.clip_ratio_c.is_some_and(|c| !(c > 1.0)) {
            p.push(format!("{at}: clip_ratio_c (dual clip) must be greater than 1"));
        }
        if self.kl_coef < 0.0 {
            p.push(format!("{at}: kl_coef must not be negative"));
        }
        if self.max_completion_length == 0 {
            p.push(format!("{at}: max_completion_length must be at least 1"));
        }
        if let Some(f) = &self.prefilter {
            if f.samples == 0 || !(f.min_pass_rate <= f.max_pass_rate) {
                p.push(format!("{at}: prefilter needs samples ≥ 1 and min_pass_rate ≤ max_pass_rate"));
            }
        }
        if let Err(e) = rewards::RewardSet::from_config(&self.reward) {
            p.push(format!("{at}: reward: {e}"));
        }
        if self.domain_sampling.is_some() && self.data.is_none() {
            p.push(format!("{at}: domain_sampling needs `data` with a `domain` column"));
        }
    }

    pub fn plan(&self) -> String {
        let src = self.synthetic.as_ref().map(|s| format!("{} synthetic problems", s.count)).unwrap_or_else(|| self.data.as_ref().map(|d| d.path.display().to_string()).unwrap_or_default());
        format!(
            "{src}; {} steps of {} prompts × {} completions (≤ {} tokens), μ = {}, lr {:.1e}, kl_coef {}{}",
            self.max_steps.unwrap_or(100),
            self.prompts_per_step,
            self.num_generations,
            self.max_completion_length,
            self.num_iterations,
            self.lr,
            self.kl_coef,
            if self.kl_coef > 0.0 { " (a reference model is kept in memory)" } else { "" }
        )
    }

    pub fn total_steps(&self) -> usize {
        self.max_steps.unwrap_or(100)
    }

    /// The sampling temperature at (0-based) step `step`.
    pub fn temperature_at(&self, step: usize) -> f64 {
        match self.temperature_final {
            Some(end) if self.temperature_anneal_steps > 0 => {
                let f = (step as f64 / self.temperature_anneal_steps as f64).min(1.0);
                self.temperature + (end - self.temperature) * f
            }
            Some(end) => end,
            None => self.temperature,
        }
    }

    pub fn clip(&self) -> ClipCfg {
        ClipCfg {
            level: self.importance_sampling_level,
            eps_low: self.clip_ratio_low,
            eps_high: self.clip_ratio_high.unwrap_or(self.clip_ratio_low),
            dual_clip: self.clip_ratio_c,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temperature_anneals_linearly_then_holds() {
        let mut s: GrpoStage = toml::from_str("synthetic = { count = 1 }\ntemperature = 1.0\ntemperature_final = 0.6\ntemperature_anneal_steps = 4").unwrap();
        assert_eq!(s.temperature_at(0), 1.0);
        assert!((s.temperature_at(2) - 0.8).abs() < 1e-12);
        assert!((s.temperature_at(4) - 0.6).abs() < 1e-12);
        assert!((s.temperature_at(100) - 0.6).abs() < 1e-12);
        s.temperature_final = None;
        assert_eq!(s.temperature_at(50), 1.0);
    }
}
