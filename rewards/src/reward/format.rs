//! Format reward: a boxed answer and/or a `<think>...</think>` structure.

use super::config::FormatConfig;
use super::{BatchContext, RewardError, RewardFn, RewardOutput, Sample};
use crate::math::extract::last_boxed_group;
use rayon::prelude::*;

/// `kind = "format"`.
pub struct Format {
    pub cfg: FormatConfig,
}

impl Format {
    /// Does the completion have one well-formed think block followed by an answer?
    pub fn think_ok(&self, completion: &str) -> bool {
        let (open, close) = (self.cfg.think_open.as_str(), self.cfg.think_close.as_str());
        let t = completion.trim_start();
        let body = match t.strip_prefix(open) {
            Some(rest) => rest,
            None if self.cfg.think_opened_by_prompt => t,
            None => return false,
        };
        if body.contains(open) || body.matches(close).count() != 1 {
            return false;
        }
        let (reasoning, answer) = body.split_once(close).unwrap_or(("", ""));
        !reasoning.trim().is_empty() && !answer.trim().is_empty()
    }

    /// Is there a boxed answer (after the think block when one is required)?
    pub fn boxed_ok(&self, completion: &str) -> bool {
        let tail = if self.cfg.think { completion.rsplit_once(self.cfg.think_close.as_str()).map(|x| x.1).unwrap_or(completion) } else { completion };
        last_boxed_group(tail).is_some_and(|b| !b.trim().is_empty())
    }
}

impl RewardFn for Format {
    fn name(&self) -> &str {
        "format"
    }
    fn score(&self, samples: &[Sample], _ctx: &BatchContext) -> Result<Vec<RewardOutput>, RewardError> {
        Ok(samples
            .par_iter()
            .map(|s| {
                let mut ok = true;
                let mut metrics = Vec::new();
                if self.cfg.think {
                    let t = self.think_ok(&s.completion);
                    metrics.push(("think".to_string(), t as u8 as f64));
                    ok &= t;
                }
                if self.cfg.boxed {
                    let b = self.boxed_ok(&s.completion);
                    metrics.push(("boxed".to_string(), b as u8 as f64));
                    ok &= b;
                }
                RewardOutput { reward: Some(if ok { self.cfg.matched } else { self.cfg.unmatched }), metrics }
            })
            .collect())
    }
}
