//! [`RewardSet`]: the configured reward terms, scoring a batch into totals, correctness and metrics.

use super::accuracy::{Accuracy, Judge};
use super::config::RewardConfig;
use super::format::Format;
use super::length::{CosineLength, Overlong};
use super::{BatchContext, RewardError, RewardFn, RewardOutput, Sample};
use crate::plugin::{build_plugin, PluginRegistry};
use std::collections::BTreeMap;

/// One configured term.
pub struct Term {
    /// Unique name used in metrics (`accuracy`, `format`, plugin names; `_2`... for repeats).
    pub name: String,
    /// Weight in the total.
    pub weight: f64,
    pub func: Box<dyn RewardFn>,
}

/// Scores of one term on a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct TermScores {
    pub name: String,
    pub weight: f64,
    pub rewards: Vec<Option<f64>>,
}

/// Scores of a batch.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BatchScores {
    /// Weighted sum of the terms that apply; `None` when none applies.
    pub total: Vec<Option<f64>>,
    /// Math correctness per sample (for accuracy and pass@k), when a gold answer exists.
    pub correct: Vec<Option<bool>>,
    /// Each term's unweighted rewards.
    pub terms: Vec<TermScores>,
    /// Batch metrics: `reward/<term>/mean`, `reward/<term>/<metric>` (means over samples where
    /// the term applies), `reward/total/mean`, `accuracy`.
    pub metrics: BTreeMap<String, f64>,
}

/// The reward terms of a recipe stage.
pub struct RewardSet {
    pub terms: Vec<Term>,
    judge: Option<Judge>,
}

fn mean(v: impl Iterator<Item = f64>) -> Option<f64> {
    let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| s / n as f64)
}

impl RewardSet {
    /// Build from recipe entries; plugins with `transport = "native"` are looked up in an empty registry.
    pub fn from_config(configs: &[RewardConfig]) -> Result<RewardSet, RewardError> {
        Self::from_config_with(configs, &PluginRegistry::default())
    }

    /// Build from recipe entries, resolving native plugins in `registry`.
    pub fn from_config_with(configs: &[RewardConfig], registry: &PluginRegistry) -> Result<RewardSet, RewardError> {
        if configs.is_empty() {
            return Err(RewardError::Config("no reward terms configured".into()));
        }
        // The first term that needs correctness defines the shared judge.
        let judge = configs.iter().find_map(|c| match c {
            RewardConfig::Accuracy(a) => Some(Judge { gold_key: a.gold_key.clone(), verify: a.verify.clone() }),
            RewardConfig::CosineLength(a) => Some(Judge { gold_key: a.gold_key.clone(), verify: a.verify.clone() }),
            _ => None,
        });
        let mut terms: Vec<Term> = Vec::new();
        for (i, c) in configs.iter().enumerate() {
            let w = c.weight();
            if !w.is_finite() {
                return Err(RewardError::Config(format!("reward {} ({:?}): weight must be finite", i + 1, kind_name(c))));
            }
            let func: Box<dyn RewardFn> = match c {
                RewardConfig::Accuracy(a) => Box::new(Accuracy { cfg: a.clone(), judge: Judge { gold_key: a.gold_key.clone(), verify: a.verify.clone() }, shared: judge.clone() }),
                RewardConfig::Format(f) => {
                    if !f.boxed && !f.think {
                        return Err(RewardError::Config(format!("reward {} (format): enable `boxed` or `think`", i + 1)));
                    }
                    Box::new(Format { cfg: f.clone() })
                }
                RewardConfig::Overlong(o) => {
                    if o.overlong_buffer_len == 0 {
                        return Err(RewardError::Config(format!("reward {} (overlong): overlong_buffer_len must be > 0", i + 1)));
                    }
                    Box::new(Overlong { cfg: o.clone() })
                }
                RewardConfig::CosineLength(cl) => Box::new(CosineLength { cfg: cl.clone(), judge: Judge { gold_key: cl.gold_key.clone(), verify: cl.verify.clone() }, shared: judge.clone() }),
                RewardConfig::Plugin(p) => build_plugin(p, registry)?,
            };
            let base = func.name().to_string();
            let mut name = base.clone();
            let mut k = 2;
            while terms.iter().any(|t| t.name == name) {
                name = format!("{base}_{k}");
                k += 1;
            }
            terms.push(Term { name, weight: w, func });
        }
        Ok(RewardSet { terms, judge })
    }

    /// Score a batch. Fails only when a plugin fails and its recipe says `on_failure = "fail"`.
    pub fn score_batch(&self, samples: &[Sample]) -> Result<BatchScores, RewardError> {
        let n = samples.len();
        let ctx = match &self.judge {
            Some(j) if self.terms.iter().any(|t| t.func.needs_correctness()) => j.context(samples),
            _ => BatchContext { correct: vec![None; n], answered: vec![false; n] },
        };
        let mut out = BatchScores { total: vec![None; n], correct: ctx.correct.clone(), terms: Vec::new(), metrics: BTreeMap::new() };
        for term in &self.terms {
            let res: Vec<RewardOutput> = term.func.score(samples, &ctx)?;
            if res.len() != n {
                return Err(RewardError::Plugin { name: term.name.clone(), message: format!("returned {} rewards for {} samples", res.len(), n) });
            }
            let mut metric_sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
            for (i, r) in res.iter().enumerate() {
                if let Some(x) = r.reward {
                    let x = if x.is_finite() { x } else { 0.0 };
                    *out.total[i].get_or_insert(0.0) += term.weight * x;
                }
                for (k, v) in &r.metrics {
                    let e = metric_sums.entry(k.clone()).or_insert((0.0, 0));
                    e.0 += v;
                    e.1 += 1;
                }
            }
            if let Some(m) = mean(res.iter().filter_map(|r| r.reward)) {
                out.metrics.insert(format!("reward/{}/mean", term.name), m);
            }
            out.metrics.insert(format!("reward/{}/applicable", term.name), res.iter().filter(|r| r.reward.is_some()).count() as f64 / n.max(1) as f64);
            for (k, (s, c)) in metric_sums {
                out.metrics.insert(format!("reward/{}/{}", term.name, k), s / c as f64);
            }
            out.terms.push(TermScores { name: term.name.clone(), weight: term.weight, rewards: res.iter().map(|r| r.reward).collect() });
        }
        if let Some(m) = mean(out.total.iter().flatten().copied()) {
            out.metrics.insert("reward/total/mean".into(), m);
        }
        if let Some(a) = mean(out.correct.iter().flatten().map(|c| *c as u8 as f64)) {
            out.metrics.insert("accuracy".into(), a);
        }
        Ok(out)
    }
}

fn kind_name(c: &RewardConfig) -> &'static str {
    match c {
        RewardConfig::Accuracy(_) => "accuracy",
        RewardConfig::Format(_) => "format",
        RewardConfig::Overlong(_) => "overlong",
        RewardConfig::CosineLength(_) => "cosine_length",
        RewardConfig::Plugin(_) => "plugin",
    }
}
