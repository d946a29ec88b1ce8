//! Math correctness: the accuracy reward and the shared judge.

use super::config::AccuracyConfig;
use super::{BatchContext, RewardError, RewardFn, RewardOutput, Sample};
use crate::math::{verify, VerifyConfig};
use rayon::prelude::*;
use serde_json::Value;

/// Decides correctness of samples against their gold answers.
#[derive(Debug, Clone, PartialEq)]
pub struct Judge {
    /// Row column with the gold answer when `Sample::gold` is `None`.
    pub gold_key: Option<String>,
    pub verify: VerifyConfig,
}

impl Judge {
    /// The gold answer of a sample, if it has one.
    pub fn gold<'a>(&self, s: &'a Sample) -> Option<std::borrow::Cow<'a, str>> {
        if let Some(g) = &s.gold {
            return Some(std::borrow::Cow::Borrowed(g.as_str()));
        }
        let key = self.gold_key.as_ref()?;
        match s.row.get(key)? {
            Value::String(t) => Some(std::borrow::Cow::Borrowed(t.as_str())),
            Value::Number(n) => Some(std::borrow::Cow::Owned(n.to_string())),
            _ => None,
        }
    }

    /// (answered, correct): `correct` is `None` when the sample has no gold answer.
    pub fn judge(&self, s: &Sample) -> (bool, Option<bool>) {
        let Some(g) = self.gold(s) else { return (false, None) };
        let v = verify(&g, &s.completion, &self.verify);
        (v.pred_extracted.is_some(), Some(v.equivalent))
    }

    /// Judge a batch in parallel.
    pub fn context(&self, samples: &[Sample]) -> BatchContext {
        let r: Vec<(bool, Option<bool>)> = samples.par_iter().map(|s| self.judge(s)).collect();
        BatchContext { answered: r.iter().map(|x| x.0).collect(), correct: r.iter().map(|x| if x.1.is_some() && !x.0 { Some(false) } else { x.1 }).collect() }
    }
}

/// The batch's correctness when this term's judge is the shared one, else computed afresh.
pub fn correctness<'a>(judge: &Judge, shared: Option<&Judge>, samples: &[Sample], ctx: &'a BatchContext) -> std::borrow::Cow<'a, BatchContext> {
    if shared == Some(judge) && ctx.correct.len() == samples.len() {
        std::borrow::Cow::Borrowed(ctx)
    } else {
        std::borrow::Cow::Owned(judge.context(samples))
    }
}

/// `kind = "accuracy"`.
pub struct Accuracy {
    pub cfg: AccuracyConfig,
    pub judge: Judge,
    pub shared: Option<Judge>,
}

impl RewardFn for Accuracy {
    fn name(&self) -> &str {
        "accuracy"
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
                if self.judge.gold(s).is_none() {
                    return RewardOutput::default();
                }
                let answered = c.answered[i];
                let correct = c.correct[i] == Some(true);
                let r = if correct {
                    self.cfg.correct
                } else if !answered {
                    self.cfg.no_answer
                } else {
                    self.cfg.incorrect
                };
                RewardOutput { reward: Some(r), metrics: vec![("correct".into(), correct as u8 as f64), ("answered".into(), answered as u8 as f64)] }
            })
            .collect())
    }
}
