//! Recipe configuration of rewards (`[[stage.reward]]` tables).

use crate::math::VerifyConfig;
use crate::plugin::PluginConfig;
use serde::{Deserialize, Serialize};

fn one() -> f64 {
    1.0
}
fn minus_one() -> f64 {
    -1.0
}
fn yes() -> bool {
    true
}
fn think_open() -> String {
    "<think>".into()
}
fn think_close() -> String {
    "</think>".into()
}

/// One reward term. The total reward of a sample is the weighted sum of the terms that apply.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RewardConfig {
    /// Math answer correctness against the gold answer.
    Accuracy(AccuracyConfig),
    /// Output structure: a boxed answer and/or `<think>...</think>`.
    Format(FormatConfig),
    /// DAPO's soft overlong punishment.
    Overlong(OverlongConfig),
    /// Cosine length scaling of the accuracy reward.
    CosineLength(CosineConfig),
    /// A reward computed by a plugin (native, exec or http).
    Plugin(PluginConfig),
}

/// `kind = "accuracy"`: +correct / incorrect / no_answer (Phi-4-mini-reasoning uses +1 / -1 / -1).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AccuracyConfig {
    /// Weight in the total reward.
    #[serde(default = "one")]
    pub weight: f64,
    /// Reward when the answer is equivalent to the gold answer.
    #[serde(default = "one")]
    pub correct: f64,
    /// Reward when an answer was found but it is wrong.
    #[serde(default = "minus_one")]
    pub incorrect: f64,
    /// Reward when no answer could be found in the completion.
    #[serde(default = "minus_one")]
    pub no_answer: f64,
    /// Row column holding the gold answer when `Sample::gold` is empty (e.g. "answer").
    #[serde(default)]
    pub gold_key: Option<String>,
    /// Answer verification settings (extraction, float rounding, budget).
    #[serde(default)]
    pub verify: VerifyConfig,
}

/// `kind = "format"`: `matched` when every enabled check passes, else `unmatched`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FormatConfig {
    /// Weight in the total reward.
    #[serde(default = "one")]
    pub weight: f64,
    /// Require a `\boxed{...}` answer after the reasoning.
    #[serde(default = "yes")]
    pub boxed: bool,
    /// Require exactly one `<think>...</think>` block at the start, followed by an answer.
    #[serde(default)]
    pub think: bool,
    /// Opening reasoning tag.
    #[serde(default = "think_open")]
    pub think_open: String,
    /// Closing reasoning tag.
    #[serde(default = "think_close")]
    pub think_close: String,
    /// Accept a completion that starts inside the think block (the chat template opened `<think>`).
    #[serde(default = "yes")]
    pub think_opened_by_prompt: bool,
    /// Reward when the format is right.
    #[serde(default = "one")]
    pub matched: f64,
    /// Reward when it is not.
    #[serde(default)]
    pub unmatched: f64,
}

/// `kind = "overlong"`: DAPO soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13).
/// With L = max length and C = `overlong_buffer_len`: 0 up to L - C tokens, then falling linearly
/// to -1 at L, -1 beyond; multiplied by `overlong_penalty_factor` (verl's keys).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OverlongConfig {
    /// Weight in the total reward.
    #[serde(default = "one")]
    pub weight: f64,
    /// Length of the soft-penalty zone before the limit, in tokens.
    pub overlong_buffer_len: usize,
    /// Penalty at (and beyond) the limit.
    #[serde(default = "one")]
    pub overlong_penalty_factor: f64,
    /// The limit L; default: each sample's `max_tokens` (alias: verl's `max_resp_len`).
    #[serde(default, alias = "max_resp_len")]
    pub max_response_length: Option<usize>,
}

/// `kind = "cosine_length"`: cosine length scaling (Yeo et al. 2025, "Demystifying Long
/// Chain-of-Thought Reasoning in LLMs", arXiv:2502.03373, eq. 1; key names from open-r1's
/// `get_cosine_scaled_reward`). r(t) = min + (max - min)(1 + cos(pi t / max_len)) / 2: short
/// correct answers get `max_value_correct`, long ones `min_value_correct`; short wrong answers get
/// `min_value_wrong`, long ones `max_value_wrong`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CosineConfig {
    /// Weight in the total reward.
    #[serde(default = "one")]
    pub weight: f64,
    /// Reward of a correct answer at `max_len` tokens.
    #[serde(default = "half")]
    pub min_value_correct: f64,
    /// Reward of a correct answer at 0 tokens.
    #[serde(default = "one")]
    pub max_value_correct: f64,
    /// Reward of a wrong answer at 0 tokens.
    #[serde(default = "minus_one")]
    pub min_value_wrong: f64,
    /// Reward of a wrong answer at `max_len` tokens.
    #[serde(default = "minus_half")]
    pub max_value_wrong: f64,
    /// Length scale; default: each sample's `max_tokens`.
    #[serde(default)]
    pub max_len: Option<usize>,
    /// Reward for truncated completions (Yeo et al.'s exceed-length penalty); None: treat as wrong.
    #[serde(default)]
    pub exceed_length: Option<f64>,
    /// Answer verification settings.
    #[serde(default)]
    pub verify: VerifyConfig,
    /// Row column holding the gold answer when `Sample::gold` is empty.
    #[serde(default)]
    pub gold_key: Option<String>,
}

fn half() -> f64 {
    0.5
}
fn minus_half() -> f64 {
    -0.5
}

impl RewardConfig {
    /// Weight of this term.
    pub fn weight(&self) -> f64 {
        match self {
            RewardConfig::Accuracy(c) => c.weight,
            RewardConfig::Format(c) => c.weight,
            RewardConfig::Overlong(c) => c.weight,
            RewardConfig::CosineLength(c) => c.weight,
            RewardConfig::Plugin(c) => c.weight,
        }
    }
}
