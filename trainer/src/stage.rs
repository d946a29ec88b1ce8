//! What every training stage shares: the optimizer keys (declared once by [`training_stage!`]), the
//! optimizer built from them, checkpoint writing with the fault points of the resume tests, held-out
//! accuracy, and metrics records.

use anyhow::{bail, Result};
use data::Record;
use model::Model;
use serde_json::{Map, Value};
use std::path::PathBuf;
use tch::Tensor;

use crate::checkpoint::{self, TrainState};
use crate::optim::{AdamW, AdamWConfig, Schedule};
use crate::precision::UpdatePrecision;
use crate::recipe::{EvalSpec, SyntheticSpec};
use crate::run::Ctx;

/// Declares a stage's recipe table: the given fields plus the keys every trained stage has (name, steps,
/// optimizer, schedule, clipping, loss chunking, held-out evaluation), with TRL's names as aliases.
/// The stage must declare `lr` itself (defaults differ by stage kind).
macro_rules! training_stage {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fm:meta])* pub $f:ident : $t:ty),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $($(#[$fm])* pub $f: $t,)*
            /// A name for logs and output directories.
            #[serde(default)]
            pub name: Option<String>,
            /// Optimizer steps (for SFT/DPO: overrides `epochs`).
            #[serde(default)]
            pub max_steps: Option<usize>,
            /// constant, linear or cosine (after linear warmup).
            #[serde(default, alias = "lr_scheduler_type")]
            pub schedule: crate::optim::Schedule,
            /// Warmup steps (overrides warmup_ratio).
            #[serde(default)]
            pub warmup_steps: Option<usize>,
            /// Warmup as a fraction of the steps.
            #[serde(default)]
            pub warmup_ratio: f64,
            /// Final learning rate as a fraction of the peak.
            #[serde(default)]
            pub min_lr_ratio: f64,
            /// Decoupled weight decay (not applied to norms and biases).
            #[serde(default)]
            pub weight_decay: f64,
            /// Adam β1.
            #[serde(default = "crate::stage::default_b1", alias = "adam_beta1")]
            pub beta1: f64,
            /// Adam β2.
            #[serde(default = "crate::stage::default_b2", alias = "adam_beta2")]
            pub beta2: f64,
            /// Adam ε.
            #[serde(default = "crate::stage::default_eps", alias = "adam_epsilon")]
            pub eps: f64,
            /// Clip the global gradient norm to this (0: no clipping; the norm is logged either way).
            #[serde(default = "crate::stage::one_f")]
            pub max_grad_norm: f64,
            /// Rows of hidden states projected to logits at once in the loss (bounds logits memory).
            #[serde(default = "crate::stage::default_chunk")]
            pub loss_chunk: usize,
            /// Activation checkpointing (TRL's name): keep only each decoder layer's input in the forward and
            /// recompute the layer in the backward; less memory for long sequences, about one more forward of time.
            // not serialized when off, so that checkpoints written before this key existed still resume
            #[serde(default, skip_serializing_if = "std::ops::Not::not")]
            #[schemars(extend("default" = false))]
            pub gradient_checkpointing: bool,
            /// Held-out evaluation.
            #[serde(default)]
            pub eval: Option<crate::recipe::EvalSpec>,
        }

        impl $name {
            pub fn optim(&self) -> crate::stage::OptimArgs {
                crate::stage::OptimArgs {
                    lr: self.lr,
                    schedule: self.schedule,
                    warmup_steps: self.warmup_steps,
                    warmup_ratio: self.warmup_ratio,
                    min_lr_ratio: self.min_lr_ratio,
                    adam: crate::optim::AdamWConfig { beta1: self.beta1, beta2: self.beta2, eps: self.eps, weight_decay: self.weight_decay },
                    max_grad_norm: self.max_grad_norm,
                }
            }
        }
    };
}
pub(crate) use training_stage;

pub fn default_b1() -> f64 {
    0.9
}
pub fn default_b2() -> f64 {
    0.999
}
pub fn default_eps() -> f64 {
    1e-8
}
pub fn one_f() -> f64 {
    1.0
}
pub fn default_chunk() -> usize {
    4096
}

/// The optimizer keys of a stage.
#[derive(Debug, Clone)]
pub struct OptimArgs {
    pub lr: f64,
    pub schedule: Schedule,
    pub warmup_steps: Option<usize>,
    pub warmup_ratio: f64,
    pub min_lr_ratio: f64,
    pub adam: AdamWConfig,
    pub max_grad_norm: f64,
}

impl OptimArgs {
    /// Problems with the values, each prefixed by `at`.
    pub fn validate(&self, at: &str, p: &mut Vec<String>) {
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            p.push(format!("{at}: lr must be a positive number, got {}", self.lr));
        }
        if !(0.0..1.0).contains(&self.adam.beta1) || !(0.0..1.0).contains(&self.adam.beta2) {
            p.push(format!("{at}: beta1 and beta2 must be in [0, 1)"));
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) || !(0.0..=1.0).contains(&self.min_lr_ratio) {
            p.push(format!("{at}: warmup_ratio and min_lr_ratio must be in [0, 1]"));
        }
    }

    pub fn warmup(&self, total: usize) -> usize {
        self.warmup_steps.unwrap_or((self.warmup_ratio * total as f64).round() as usize)
    }

    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        crate::optim::lr_at(self.schedule, self.lr, step, total, self.warmup(total), self.min_lr_ratio)
    }

    /// AdamW over all the model's parameters (gradients switched on), with the run's update precision.
    pub fn optimizer(&self, ctx: &Ctx, model: &Model) -> AdamW {
        self.optimizer_with(model, ctx.recipe.model.update_precision(ctx.recipe.run.seed))
    }

    pub fn optimizer_with(&self, model: &Model, precision: UpdatePrecision) -> AdamW {
        let params: Vec<(String, Tensor)> = model.net.params.iter().map(|(n, t)| (n.to_string(), t.shallow_clone())).collect();
        for (_, p) in &params {
            let _ = p.shallow_clone().requires_grad_(true);
        }
        AdamW::new(params, self.adam, precision)
    }
}

/// Refuses rows longer than the model's positions (rotary positions past `max_position_embeddings` are
/// untrained): `what` says where the length `longest` comes from.
pub fn check_positions(model: &Model, name: &str, longest: usize, what: &str) -> Result<()> {
    let max = model.net.cfg.max_position_embeddings;
    if longest as i64 > max {
        bail!("[{name}] {what} is {longest} tokens, more than the model's max_position_embeddings ({max}); shorten the rows or use a model with more positions");
    }
    Ok(())
}

/// Problems with an `[eval]` table.
pub fn validate_eval(e: &Option<EvalSpec>, at: &str, p: &mut Vec<String>) {
    if let Some(e) = e {
        if e.synthetic.is_none() && e.data.is_none() {
            p.push(format!("{at}: [eval] needs `synthetic` or `data` held-out problems"));
        }
        if let Some(d) = &e.data {
            if !d.path.exists() {
                p.push(format!("{at}: eval data path {} does not exist", d.path.display()));
            }
        }
    }
}

pub fn synthetic(spec: &SyntheticSpec) -> Result<data::synth::Arithmetic> {
    Ok(data::synth::Arithmetic::new(spec.arithmetic.clone())?)
}

/// Held-out prompt-with-answer records of an eval spec.
fn eval_records(e: &EvalSpec) -> Result<Vec<Record>> {
    match (&e.synthetic, &e.data) {
        (Some(s), _) => Ok(synthetic(s)?.prompt_answer(s.start, s.count)),
        (None, Some(d)) => Ok(data::load_records(d)?),
        _ => bail!("[eval] needs `synthetic` or `data`"),
    }
}

/// Held-out greedy accuracy of a stage, logged as `eval_accuracy` at `step`.
pub struct HeldOut<'a> {
    pub spec: &'a EvalSpec,
    pub records: Vec<Record>,
}

impl<'a> HeldOut<'a> {
    pub fn new(spec: &'a Option<EvalSpec>) -> Result<Option<HeldOut<'a>>> {
        match spec {
            Some(e) => Ok(Some(HeldOut { spec: e, records: eval_records(e)? })),
            None => Ok(None),
        }
    }

    /// Accuracy and a few (question, answer, correct) samples.
    pub fn accuracy(&self, ctx: &Ctx, model: &Model) -> Result<(f64, Vec<(String, String, bool)>)> {
        crate::accuracy::evaluate(ctx, &model.net, &self.records, self.spec)
    }

    fn log(ctx: &Ctx, index: usize, name: &str, step: usize, acc: f64, extra: Map<String, Value>) -> Result<()> {
        let mut rec = obj(serde_json::json!({"stage": index, "stage_name": name, "step": step, "eval_accuracy": acc}));
        rec.extend(extra);
        ctx.metrics.log(rec)
    }

    /// The evaluation before the stage's first step (returns the accuracy); `extra` metrics go on the same line.
    pub fn at_start(&self, ctx: &Ctx, model: &Model, index: usize, name: &str, extra: Map<String, Value>) -> Result<f64> {
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
        if !(self.spec.every > 0 && done % self.spec.every == 0 && done < total) || !ctx.comm.is_main() {
            return Ok(());
        }
        let (acc, _) = self.accuracy(ctx, model)?;
        eprintln!("[{name}] step {done}: held-out accuracy {:.1}%", 100.0 * acc);
        Self::log(ctx, index, name, done, acc, extra())
    }

    /// The evaluation after the last step: prints a few samples and before → after; returns the accuracy.
    pub fn at_end(&self, ctx: &Ctx, model: &Model, index: usize, name: &str, total: usize, before: f64, extra: Map<String, Value>) -> Result<f64> {
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

/// Where a stage stands, for its checkpoints.
pub struct Progress {
    pub index: usize,
    pub name: String,
    pub total: usize,
    pub sampler: Option<data::SamplerState>,
    pub tokens: u64,
    /// Stage-specific state (`TrainState::extra`).
    pub extra: Value,
}

impl Progress {
    fn state(&self, ctx: &Ctx, step: usize, complete: bool) -> TrainState {
        TrainState {
            stage: self.index,
            stage_name: self.name.clone(),
            step,
            total_steps: self.total,
            stage_complete: complete,
            sampler: self.sampler.clone(),
            tokens: self.tokens,
            recipe: ctx.fingerprint.clone(),
            extra: self.extra.clone(),
            world_size: ctx.batch_world.get(),
        }
    }

    /// After optimizer step `done`: the step's fault point, then a mid-stage checkpoint when `run.save_every`
    /// says so.
    pub fn after_step(&self, ctx: &Ctx, done: usize, model: &Model, opt: &AdamW) -> Result<()> {
        crate::faults::point(&format!("step:{}:{done}", self.index));
        let every = ctx.recipe.run.save_every;
        if every > 0 && done % every == 0 && done < self.total {
            save_checkpoint(ctx, &self.state(ctx, done, false), model, Some(opt))?;
        }
        Ok(())
    }

    /// The end of the stage: its curves and the stage-final checkpoint.
    pub fn finish(&self, ctx: &Ctx, model: &Model, started: std::time::Instant, note: &str) -> Result<()> {
        if ctx.comm.is_main() {
            let plot = crate::plot::stage_plot(&ctx.output, self.index, &self.name)?;
            eprintln!("[{}] done in {:.1} s{note}; curves in {}", self.name, started.elapsed().as_secs_f64(), plot.display());
        }
        save_checkpoint(ctx, &self.state(ctx, self.total, true), model, None)?;
        Ok(())
    }
}

/// Steps skipped in a row for non-finite gradients before the run stops.
const MAX_SKIPPED_IN_A_ROW: usize = 10;

/// Clips the gradients (all-reduced already) and takes an optimizer step at `lr` — unless their norm is NaN or
/// infinite: then the step is skipped, leaving weights and optimizer state as they were, with a counted
/// warning, or the run stops, as `[run] nonfinite` says (the decision is the same on every rank: the norm is
/// of the summed gradients). Returns the norm before clipping and whether the step was taken.
pub fn optimizer_step(ctx: &Ctx, name: &str, opt: &mut AdamW, optim: &OptimArgs, lr: f64, step: usize, bar: &crate::progress::Bar) -> Result<(f64, bool)> {
    let norm = opt.clip_grad_norm(optim.max_grad_norm);
    if norm.is_finite() {
        opt.step(lr);
        opt.zero_grad();
        guard_updates(ctx, name, opt, lr, bar);
        return Ok((norm, true));
    }
    let in_a_row = opt.skip();
    let hint = "lower the learning rate or check the data; no checkpoint holds a non-finite weight";
    match ctx.recipe.run.nonfinite {
        crate::recipe::NonFinite::Stop => bail!("[{name}] the gradient norm is {norm} at step {step}: stopped ([run] nonfinite = \"stop\"); {hint}"),
        crate::recipe::NonFinite::Skip if in_a_row >= MAX_SKIPPED_IN_A_ROW => {
            bail!("[{name}] the gradient norm was non-finite in {in_a_row} steps in a row (up to step {step}): stopped; {hint}")
        }
        crate::recipe::NonFinite::Skip => {
            if ctx.comm.is_main() {
                bar.println(&format!("[{name}] warning: the gradient norm is {norm} at step {step}: step skipped, weights unchanged ({} skipped so far)", opt.skipped.0));
            }
        }
    }
    Ok((norm, false))
}

/// Watches a stage's steps for training that is dead or diverging and says so once each: a gradient norm of
/// exactly 0 for 3 steps in a row (nothing will change), a next-token loss sitting at ln(vocab) — the loss of a
/// uniform prediction, where a destroyed model ends up — for 5 steps, a gradient norm 1000 times the stage's
/// first.
#[derive(Default)]
pub struct Health {
    zero: usize,
    uniform: usize,
    first_norm: Option<f64>,
    warned: [bool; 3],
}

impl Health {
    /// After optimizer step `step`: prints what [`Health::check`] finds (rank 0).
    pub fn observe(&mut self, ctx: &Ctx, name: &str, step: usize, grad_norm: f64, loss_per_token: Option<(f64, i64)>, bar: &crate::progress::Bar) {
        for msg in self.check(step, grad_norm, loss_per_token) {
            if ctx.comm.is_main() {
                bar.println(&format!("[{name}] warning: {msg}"));
            }
        }
    }

    /// The warnings due after step `step` (each at most once a stage): `loss_per_token` is the mean
    /// next-token loss and the model's vocabulary size (SFT).
    pub fn check(&mut self, step: usize, grad_norm: f64, loss_per_token: Option<(f64, i64)>) -> Vec<String> {
        let mut out = vec![];
        let mut say = |i: usize, msg: String| {
            if !self.warned[i] {
                out.push(msg);
            }
            self.warned[i] = true;
        };
        self.zero = if grad_norm == 0.0 { self.zero + 1 } else { 0 };
        if self.zero >= 3 {
            say(0, format!("the gradient norm has been exactly 0 for {} steps (up to step {step}): training is dead, nothing will change (a destroyed model, or no token carries the loss)", self.zero));
        }
        if let Some((loss, vocab)) = loss_per_token {
            let uniform = (vocab as f64).ln();
            self.uniform = if (loss - uniform).abs() < 1e-3 * uniform { self.uniform + 1 } else { 0 };
            if self.uniform >= 5 {
                say(1, format!("the loss has stayed at ln(vocab) = {uniform:.4}, a uniform prediction, for {} steps (up to step {step}): the model has stopped predicting; lower the learning rate", self.uniform));
            }
        }
        if grad_norm.is_finite() && grad_norm > 0.0 {
            let first = *self.first_norm.get_or_insert(grad_norm);
            if grad_norm > 1000.0 * first {
                say(2, format!("the gradient norm {grad_norm:.3e} at step {step} is over 1000 times the stage's first ({first:.3e}): training is diverging; lower the learning rate"));
            }
        }
        out
    }
}

/// The lost-update guard after an optimizer step: prints its warning once per stage (rank 0).
pub fn guard_updates(ctx: &Ctx, name: &str, opt: &mut AdamW, lr: f64, bar: &crate::progress::Bar) {
    if let Some(w) = opt.lost_update_warning(lr) {
        if ctx.comm.is_main() {
            bar.println(&format!("[{name}] {w}"));
        }
    }
}

/// Continues a stage from a mid-stage checkpoint: restores the optimizer and the data sampler; returns the step
/// to start at and the tokens trained on so far ((0, 0) without a checkpoint).
pub fn restore(c: Option<&crate::checkpoint::Checkpoint>, opt: &mut AdamW, sampler: &mut data::Sampler, name: &str, total: usize) -> Result<(usize, u64)> {
    let Some(c) = c else { return Ok((0, 0)) };
    opt.load(&c.optimizer_path())?;
    if let Some(st) = &c.state.sampler {
        sampler.restore(st.clone())?;
    }
    eprintln!("[{name}] resumed at step {}/{total} from {}", c.state.step, c.dir.display());
    Ok((c.state.step, c.state.tokens))
}

/// A JSON object (for metrics records).
pub fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Refuses to checkpoint weights holding NaN or infinity (a resume would start from them).
fn check_finite(model: &Model, name: &str, step: usize) -> Result<()> {
    for (n, t) in model.net.params.iter() {
        let bad = tch::no_grad(|| t.isfinite().logical_not().sum(tch::Kind::Int64).int64_value(&[]));
        if bad > 0 {
            bail!("[{name}] step {step}: {bad} non-finite value(s) in {n}; no checkpoint written (the previous one is intact)");
        }
    }
    Ok(())
}

/// Writes a checkpoint of the stage (model, optimizer when mid-stage, state), prunes old ones and passes the
/// fault-injection points the resume tests use.
/// Data parallel: rank 0 writes (the replicas are identical) and every rank waits at a barrier after.
fn save_checkpoint(ctx: &Ctx, state: &TrainState, model: &Model, opt: Option<&AdamW>) -> Result<()> {
    if ctx.comm.is_main() {
        write_checkpoint(ctx, state, model, opt)?;
    }
    ctx.comm.barrier()?;
    Ok(())
}

fn write_checkpoint(ctx: &Ctx, state: &TrainState, model: &Model, opt: Option<&AdamW>) -> Result<PathBuf> {
    let (index, done) = (state.stage, state.step);
    check_finite(model, &state.stage_name, done)?;
    let dir = checkpoint::write(&ctx.output, state, |d| {
        let token_ids = model::weights::TokenIds {
            bos: ctx.tok.bos_id.map(i64::from),
            eos: ctx.tok.stop_token_ids().into_iter().map(i64::from).collect(),
            pad: Some(ctx.tok.pad_id.into()),
        };
        model.save(&d.join("model"), &model::weights::SaveOptions { source_dir: Some(&ctx.tok_dir), token_ids, ..Default::default() })?;
        if let Some(opt) = opt.filter(|_| !state.stage_complete) {
            crate::faults::point(&format!("ckpt-write:{index}:{done}"));
            opt.save(&d.join("optimizer.safetensors"))?;
        }
        Ok(())
    })?;
    if state.stage_complete {
        checkpoint::prune(&ctx.output, index, 0)?;
        eprintln!("[{}] model saved to {}", state.stage_name, dir.join("model").display());
        crate::faults::point(&format!("after-final:{index}"));
    } else {
        checkpoint::prune(&ctx.output, index, ctx.recipe.run.keep_last)?;
        eprintln!("[{}] checkpoint {}", state.stage_name, dir.display());
        crate::faults::point(&format!("after-ckpt:{index}:{done}"));
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::Health;

    #[test]
    fn dead_and_diverging_training_is_reported_once() {
        let mut h = Health::default();
        let lnv = (260f64).ln();
        // healthy: a random model's loss near ln(vocab) but not at it, norms of one size
        for step in 1..=10 {
            assert!(h.check(step, 2.0, Some((lnv * 0.99, 260))).is_empty());
        }
        assert!(h.check(11, 0.0, Some((lnv, 260))).is_empty());
        assert!(h.check(12, 0.0, Some((lnv, 260))).is_empty());
        let w = h.check(13, 0.0, Some((lnv, 260)));
        assert!(w.len() == 1 && w[0].contains("exactly 0 for 3 steps"), "{w:?}");
        assert!(h.check(14, 0.0, Some((lnv, 260))).is_empty());
        let w = h.check(15, 0.0, Some((lnv, 260)));
        assert!(w.len() == 1 && w[0].contains("ln(vocab) = 5.5607") && w[0].contains("for 5 steps"), "{w:?}");
        let w = h.check(16, 2500.0, None);
        assert!(w.len() == 1 && w[0].contains("diverging"), "{w:?}");
        assert!(h.check(17, 1e9, Some((lnv, 260))).is_empty());
    }
}
