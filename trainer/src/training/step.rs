//! One optimizer step and what watches it: clipping, the step itself or its skip on a non-finite gradient
//! (`[run] nonfinite`), the lost-update guard, dead or diverging training, and resuming the optimizer.

use anyhow::{bail, Result};

use super::optim::AdamW;
use super::stage_keys::OptimArgs;
use super::Ctx;
use crate::observe::progress::Bar;
use crate::settings::NonFinite;

/// Steps skipped in a row for non-finite gradients before the run stops.
const MAX_SKIPPED_IN_A_ROW: usize = 10;

/// Keys the adapter dropout of optimizer step `step`'s training forwards (a no-op without `lora_dropout`):
/// from the run seed, the step and the rank, so that a resumed run draws the masks an uninterrupted one drew
/// and ranks draw different ones.
pub fn key_dropout(ctx: &Ctx, model: &model::Model, step: usize) {
    let seed = super::precision::mix64(ctx.run.seed ^ super::precision::mix64(step as u64 ^ ((ctx.comm.rank() as u64) << 40)));
    model.net.set_dropout_seed(Some(seed));
}

/// Clips the gradients (all-reduced already) and takes an optimizer step at `lr` — unless their norm is NaN or
/// infinite: then the step is skipped, leaving weights and optimizer state as they were, with a counted
/// warning, or the run stops, as `[run] nonfinite` says (the decision is the same on every rank: the norm is
/// of the summed gradients). Returns the norm before clipping and whether the step was taken.
pub fn optimizer_step(ctx: &Ctx, name: &str, opt: &mut AdamW, optim: &OptimArgs, lr: f64, step: usize, bar: &Bar) -> Result<(f64, bool)> {
    let norm = super::sharding::clip_grad_norm(ctx, opt, optim.max_grad_norm)?;
    if norm.is_finite() {
        opt.step(lr);
        super::sharding::after_step(ctx, opt)?;
        opt.zero_grad();
        guard_updates(ctx, name, opt, lr, bar);
        return Ok((norm, true));
    }
    let in_a_row = opt.skip();
    let hint = "lower the learning rate or check the data; no checkpoint holds a non-finite weight";
    match ctx.run.nonfinite {
        NonFinite::Stop => bail!("[{name}] the gradient norm is {norm} at step {step}: stopped ([run] nonfinite = \"stop\"); {hint}"),
        NonFinite::Skip if in_a_row >= MAX_SKIPPED_IN_A_ROW => {
            bail!("[{name}] the gradient norm was non-finite in {in_a_row} steps in a row (up to step {step}): stopped; {hint}")
        }
        NonFinite::Skip => {
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
    pub fn observe(&mut self, ctx: &Ctx, name: &str, step: usize, grad_norm: f64, loss_per_token: Option<(f64, i64)>, bar: &Bar) {
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
pub fn guard_updates(ctx: &Ctx, name: &str, opt: &mut AdamW, lr: f64, bar: &Bar) {
    if let Some(w) = opt.lost_update_warning(lr) {
        if ctx.comm.is_main() {
            bar.println(&format!("[{name}] {w}"));
        }
    }
}

/// Continues a stage from a mid-stage checkpoint: restores the optimizer and the data sampler; returns the step
/// to start at and the tokens trained on so far ((0, 0) without a checkpoint).
pub fn restore(c: Option<&super::checkpoint::Checkpoint>, opt: &mut AdamW, sampler: &mut data::Sampler, name: &str, total: usize) -> Result<(usize, u64)> {
    let Some(c) = c else { return Ok((0, 0)) };
    opt.load(&c.optimizer_path())?;
    if let Some(st) = &c.state.sampler {
        sampler.restore(st.clone())?;
    }
    eprintln!("[{name}] resumed at step {}/{total} from {}", c.state.step, c.dir.display());
    Ok((c.state.step, c.state.tokens))
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
