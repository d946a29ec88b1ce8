//! Held-out accuracy during a stage: before the first step, every `eval.every` steps, and after the last,
//! logged as `eval_accuracy` (greedy decoding by default; see [`crate::settings::EvalSpec`]).

use anyhow::Result;
use data::Record;
use model::Model;
use serde_json::{Map, Value};

use super::Ctx;
use crate::observe::metrics::obj;
use crate::settings::EvalSpec;

/// Held-out greedy accuracy of a stage, logged as `eval_accuracy` at `step`.
pub struct HeldOut<'a> {
    pub spec: &'a EvalSpec,
    pub records: Vec<Record>,
}

impl<'a> HeldOut<'a> {
    pub fn new(spec: Option<&'a EvalSpec>) -> Result<Option<HeldOut<'a>>> {
        match spec {
            Some(e) => Ok(Some(HeldOut { spec: e, records: e.records()? })),
            None => Ok(None),
        }
    }

    /// Accuracy and a few (question, answer, correct) samples.
    pub fn accuracy(&self, ctx: &Ctx, model: &Model) -> Result<(f64, Vec<(String, String, bool)>)> {
        super::generate::accuracy(ctx, &model.net, &self.records, self.spec)
    }

    fn log(ctx: &Ctx, index: usize, name: &str, step: usize, acc: f64, extra: Map<String, Value>) -> Result<()> {
        let mut rec = obj(serde_json::json!({"stage": index, "stage_name": name, "step": step, "eval_accuracy": acc}));
        rec.extend(extra);
        ctx.metrics.log(rec)
    }

    /// The evaluation before the stage's first step (returns the accuracy); `extra` metrics go on the same line.
    pub fn at_start(&self, ctx: &Ctx, model: &Model, index: usize, name: &str, extra: Map<String, Value>) -> Result<f64> {
        // rank 0 evaluates; under ZeRO-3 every rank first gathers the weights
        super::sharding::ensure_whole(ctx)?;
        if !ctx.comm.is_main() {
            return Ok(f64::NAN);
        }
        let (acc, _) = self.accuracy(ctx, model)?;
        let more: Vec<String> = extra.iter().filter_map(|(k, v)| v.as_f64().map(|x| format!(", held-out {} {x:.4}", k.trim_start_matches("eval_")))).collect();
        eprintln!("[{name}] held-out accuracy before: {:.1}% ({} problems, {}){}", 100.0 * acc, self.records.len(), self.spec.describe(), more.join(""));
        Self::log(ctx, index, name, 0, acc, extra)?;
        Ok(acc)
    }

    /// The evaluation every `eval.every` steps (not at the last one): `extra` is computed only when due.
    pub fn periodic(&self, ctx: &Ctx, model: &Model, index: usize, name: &str, done: usize, total: usize, extra: impl FnOnce() -> Map<String, Value>) -> Result<()> {
        if !(self.spec.every > 0 && done % self.spec.every == 0 && done < total) {
            return Ok(());
        }
        super::sharding::ensure_whole(ctx)?;
        if !ctx.comm.is_main() {
            return Ok(());
        }
        let (acc, _) = self.accuracy(ctx, model)?;
        eprintln!("[{name}] step {done}: held-out accuracy {:.1}%", 100.0 * acc);
        Self::log(ctx, index, name, done, acc, extra())
    }

    /// The evaluation after the last step: prints a few samples and before → after; returns the accuracy.
    pub fn at_end(&self, ctx: &Ctx, model: &Model, index: usize, name: &str, total: usize, before: f64, extra: Map<String, Value>) -> Result<f64> {
        super::sharding::ensure_whole(ctx)?;
        if !ctx.comm.is_main() {
            return Ok(f64::NAN);
        }
        let (acc, samples) = self.accuracy(ctx, model)?;
        for (q, a, ok) in samples {
            eprintln!("[{name}]   {q:?} -> {a:?} {}", if ok { "✓" } else { "✗" });
        }
        if before.is_nan() {
            eprintln!("[{name}] held-out accuracy after: {:.1}%", 100.0 * acc);
        } else {
            eprintln!("[{name}] held-out accuracy: {:.1}% before, {:.1}% after", 100.0 * before, 100.0 * acc);
        }
        Self::log(ctx, index, name, total, acc, extra)?;
        Ok(acc)
    }
}
