//! Writing a stage's checkpoints: where the stage stands ([`Progress`]), the fault points the resume tests
//! kill at, mid-stage checkpoints every `run.save_every` steps and the stage-final model.

use anyhow::{bail, Result};
use model::Model;
use serde_json::Value;
use std::path::PathBuf;

use super::checkpoint::{self, TrainState};
use super::optim::AdamW;
use super::{faults, Ctx};

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
        faults::point(&format!("step:{}:{done}", self.index));
        let every = ctx.run.save_every;
        if every > 0 && done % every == 0 && done < self.total {
            save_checkpoint(ctx, &self.state(ctx, done, false), model, Some(opt))?;
        }
        Ok(())
    }

    /// The end of the stage: its curves and the stage-final checkpoint.
    pub fn finish(&self, ctx: &Ctx, model: &Model, started: std::time::Instant, note: &str) -> Result<()> {
        if ctx.comm.is_main() {
            let plot = crate::observe::plot::stage_plot(&ctx.output, self.index, &self.name)?;
            eprintln!("[{}] done in {:.1} s{note}; curves in {}", self.name, started.elapsed().as_secs_f64(), plot.display());
        }
        save_checkpoint(ctx, &self.state(ctx, self.total, true), model, None)?;
        Ok(())
    }
}

/// Refuses to checkpoint weights holding NaN or infinity (a resume would start from them); only trained ones
/// can have become so.
fn check_finite(model: &Model, name: &str, step: usize) -> Result<()> {
    for (n, t) in model.net.trainable().iter() {
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
    // a sharded optimizer's state and ZeRO-3's weights are gathered by every rank (collectives), written by rank 0
    super::sharding::ensure_whole(ctx)?;
    let opt = opt.filter(|_| !state.stage_complete).map(|o| super::sharding::full_state(ctx, o)).transpose()?;
    if ctx.comm.is_main() {
        write_checkpoint(ctx, state, model, opt.as_deref())?;
    }
    ctx.comm.barrier()?;
    Ok(())
}

fn write_checkpoint(ctx: &Ctx, state: &TrainState, model: &Model, opt: Option<&[(String, tch::Tensor)]>) -> Result<PathBuf> {
    let (index, done) = (state.stage, state.step);
    check_finite(model, &state.stage_name, done)?;
    let dir = checkpoint::write(&ctx.output, state, |d| {
        let token_ids = model::weights::TokenIds {
            bos: ctx.tok.bos_id.map(i64::from),
            eos: ctx.tok.stop_token_ids().into_iter().map(i64::from).collect(),
            pad: Some(ctx.tok.pad_id.into()),
        };
        if model.net.adapters().is_some() {
            let base = super::models::base_name(&ctx.model_spec, &ctx.output);
            model.save_adapter(&d.join("model"), base.as_deref(), Some(&ctx.tok_dir))?;
        } else {
            model.save(&d.join("model"), &model::weights::SaveOptions { source_dir: Some(&ctx.tok_dir), token_ids, ..Default::default() })?;
        }
        if let Some(opt) = opt.filter(|_| !state.stage_complete) {
            faults::point(&format!("ckpt-write:{index}:{done}"));
            AdamW::save(&d.join("optimizer.safetensors"), opt)?;
        }
        Ok(())
    })?;
    if state.stage_complete {
        checkpoint::prune(&ctx.output, index, 0)?;
        eprintln!("[{}] model saved to {}", state.stage_name, dir.join("model").display());
        faults::point(&format!("after-final:{index}"));
    } else {
        checkpoint::prune(&ctx.output, index, ctx.run.keep_last)?;
        eprintln!("[{}] checkpoint {}", state.stage_name, dir.display());
        faults::point(&format!("after-ckpt:{index}:{done}"));
    }
    Ok(dir)
}
