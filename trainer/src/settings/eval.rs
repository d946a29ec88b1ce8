//! Problems a stage reads besides its dataset: the seeded synthetic arithmetic generator (`synthetic = {...}`)
//! and the held-out evaluation table (`[stage.eval]`).

use anyhow::{bail, Result};
use data::synth::ArithmeticConfig;
use data::{DataConfig, Record};
use serde::{Deserialize, Serialize};

/// Training data: a dataset, or the seeded synthetic arithmetic generator.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SyntheticSpec {
    /// Number of problems.
    pub count: usize,
    /// Index of the first problem (problem i depends only on the seed and i, so ranges don't overlap).
    #[serde(default)]
    pub start: u64,
    /// Generator settings.
    #[serde(default)]
    pub arithmetic: ArithmeticConfig,
}

/// Held-out evaluation during and after a stage.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    /// Evaluate every N optimizer steps (0: only before and after the stage).
    #[serde(default)]
    pub every: usize,
    /// Held-out problems (prompt with gold answer) for greedy accuracy.
    #[serde(default)]
    pub synthetic: Option<SyntheticSpec>,
    /// Held-out problems from a dataset (prompt with gold answer).
    #[serde(default)]
    pub data: Option<DataConfig>,
    /// Generation length for accuracy.
    #[serde(default = "default_eval_tokens")]
    pub max_new_tokens: usize,
    /// Sampling temperature (0: greedy decoding). With `samples` > 1 the accuracy is pass@1 averaged over the
    /// samples, as DeepSeek-R1 and Phi-4-mini-reasoning report it (temperature 0.6).
    #[serde(default)]
    pub temperature: f64,
    /// Samples per problem (at `temperature` > 0).
    #[serde(default = "one_usize")]
    pub samples: usize,
    /// Sampling seed: every evaluation of a run draws the same random numbers.
    #[serde(default)]
    pub seed: u64,
}

fn one_usize() -> usize {
    1
}

impl EvalSpec {
    /// What the accuracy means, for messages: "greedy" or "pass@1 of 4 samples at T 0.6".
    pub fn describe(&self) -> String {
        if self.temperature == 0.0 {
            "greedy".into()
        } else {
            format!("pass@1 of {} sample{} at T {}", self.samples, if self.samples == 1 { "" } else { "s" }, self.temperature)
        }
    }
}

fn default_eval_tokens() -> usize {
    16
}

impl SyntheticSpec {
    /// The generator these problems come from.
    pub fn generator(&self) -> Result<data::synth::Arithmetic> {
        Ok(data::synth::Arithmetic::new(self.arithmetic.clone())?)
    }
}

impl EvalSpec {
    /// Problems with the table, each prefixed by `at`.
    pub fn validate(&self, at: &str, p: &mut Vec<String>) {
        if self.synthetic.is_none() && self.data.is_none() {
            p.push(format!("{at}: [eval] needs `synthetic` or `data` held-out problems"));
        }
        if let Some(d) = &self.data {
            if !d.path.exists() {
                p.push(format!("{at}: eval data path {} does not exist", d.path.display()));
            }
        }
    }

    /// The held-out prompt-with-answer records.
    pub fn records(&self) -> Result<Vec<Record>> {
        match (&self.synthetic, &self.data) {
            (Some(s), _) => Ok(s.generator()?.prompt_answer(s.start, s.count)),
            (None, Some(d)) => Ok(data::load_records(d)?),
            _ => bail!("[eval] needs `synthetic` or `data`"),
        }
    }
}
