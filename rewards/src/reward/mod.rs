//! Reward functions configured from recipes, and [`RewardSet`], which scores batches.

pub mod accuracy;
pub mod config;
pub mod format;
pub mod length;
pub mod set;

pub use config::RewardConfig;
pub use set::{BatchScores, RewardSet};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One completion to score, with its dataset row.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Sample {
    /// The prompt as given to the policy.
    pub prompt: String,
    /// The generated completion.
    pub completion: String,
    /// The gold answer, when the dataset has one.
    pub gold: Option<String>,
    /// Tokens in the completion.
    pub completion_tokens: usize,
    /// The generation limit for this completion.
    pub max_tokens: usize,
    /// Generation stopped at `max_tokens` without an end-of-sequence token.
    pub truncated: bool,
    /// The dataset row's other columns.
    pub row: Map<String, Value>,
}

/// What one reward function says about one sample.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RewardOutput {
    /// The reward; `None` when the function does not apply to this sample.
    pub reward: Option<f64>,
    /// Extra named values for logging (averaged over the batch).
    pub metrics: Vec<(String, f64)>,
}

impl RewardOutput {
    pub fn value(r: f64) -> Self {
        RewardOutput { reward: Some(r), metrics: Vec::new() }
    }
}

/// Per-batch facts shared by reward functions (computed once).
#[derive(Debug, Clone, Default)]
pub struct BatchContext {
    /// Math correctness per sample: `Some(true/false)` when the sample has a gold answer and the
    /// completion has an answer; `None` when there is no gold answer or no answer was found.
    pub correct: Vec<Option<bool>>,
    /// Whether an answer was found in each completion.
    pub answered: Vec<bool>,
}

/// Errors from reward configuration and scoring.
#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    #[error("reward config: {0}")]
    Config(String),
    #[error("reward plugin {name:?}: {message}")]
    Plugin { name: String, message: String },
}

/// A reward function. Built-in rewards implement it, and so can user code (see
/// [`crate::plugin::PluginRegistry`] to register one by name).
pub trait RewardFn: Send + Sync {
    /// Name used for metrics.
    fn name(&self) -> &str;
    /// Whether this reward needs math correctness in the [`BatchContext`].
    fn needs_correctness(&self) -> bool {
        false
    }
    /// Score a batch; must return one output per sample.
    fn score(&self, samples: &[Sample], ctx: &BatchContext) -> Result<Vec<RewardOutput>, RewardError>;
}
