//! The GRPO stage's loop. Each step reads as its phases: draw → generate → score (`sampling`), advantages →
//! update (`update`), log. Everything that decides what the next step samples is either a pure function of
//! (seed, step) or saved in [`GrpoState`], so a resumed run continues bit-identically.

use anyhow::{bail, Context, Result};
use model::Model;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::time::Instant;

use super::config::GrpoStage;
use super::sampling::{self, Draw, Rollouts, StepSamples};
use super::update::{self, Stepper, Update};
use crate::observe::metrics::obj;
use crate::observe::progress::Bar;
use crate::training::checkpoint::Checkpoint;
use crate::training::optim::AdamW;
use crate::training::{models, stage_keys, Ctx, Health, HeldOut, Progress, TrainingKeys};

/// What the stage adds to its checkpoints (`TrainState::extra`) besides the model and optimizer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct GrpoState {
    /// Problem indices kept by the prefilter (None: all).
    kept: Option<Vec<usize>>,
    sampler: Option<data::SamplerState>,
    domain: Option<data::sampler::DomainState>,
    /// Totals over the stage.
    groups_dropped_zero_variance: u64,
    groups_dropped_over_budget: u64,
    steps_skipped: u64,
}

pub fn run(ctx: &Ctx, index: usize, name: &str, s: &GrpoStage, model: &Model, resume: Option<&Checkpoint>) -> Result<f64> {
    let total = s.total_steps();
    let rewards = rewards::RewardSet::from_config(&s.reward)?;
    let (problems, too_long) = sampling::load_problems(ctx, s)?;
    let longest = problems.iter().map(|p| p.ids.len()).max().unwrap_or(0);
    stage_keys::check_positions(model, name, longest + s.max_completion_length, "the longest prompt + max_completion_length")?;
    if too_long > 0 {
        eprintln!("[{name}] dropped {too_long} prompts longer than max_prompt_length = {}", s.max_prompt_length);
    }
    let optim = s.optim();
    let mut opt = optim.optimizer(ctx, model)?;
    let mut st: GrpoState = match resume {
        Some(c) => {
            opt.load(&c.optimizer_path())?;
            serde_json::from_value(c.state.extra.clone()).context("checkpoint: GRPO state")?
        }
        None => GrpoState::default(),
    };
    let start = resume.map(|c| c.state.step).unwrap_or(0);
    let held = HeldOut::new(s.eval.as_ref())?;
    let mut before = f64::NAN;
    if let (Some(h), 0) = (&held, start) {
        before = h.at_start(ctx, model, index, name, Default::default())?;
    }
    let gen = Rollouts { ctx, index, name, s, model, rewards: &rewards, problems: &problems };
    // prompt filtering with the starting policy (once; its result is checkpointed)
    if let (Some(f), None) = (&s.prefilter, &st.kept) {
        st.kept = Some(gen.prefilter(f)?);
    }
    let pool: Vec<usize> = st.kept.clone().unwrap_or_else(|| (0..problems.len()).collect());
    let mut draw = Draw::new(&gen, &pool, st.sampler.clone(), st.domain.clone())?;
    let reference = reference_model(ctx, index, s, model, start)?;
    eprintln!("[{name}] {} problems; {total} steps: {}", pool.len(), s.plan());
    check_world(ctx, s, name)?;

    let progress = |st: &GrpoState| -> Result<Progress> { Ok(Progress { index, name: name.to_string(), total, sampler: None, tokens: 0, extra: serde_json::to_value(st)? }) };
    let bar = Bar::new(name, start, total);
    let mut health = Health::default();
    let t_stage = Instant::now();
    for step in start..total {
        let t0 = Instant::now();
        crate::training::step::key_dropout(ctx, model, step);
        let temperature = s.temperature_at(step);
        // draw → generate → score
        let samples = gen.step(&mut draw, &pool, step, temperature)?;
        st.groups_dropped_zero_variance += samples.dropped_zero;
        st.groups_dropped_over_budget += samples.dropped_budget;
        // advantages (KL in the reward first, when asked)
        let ts = Instant::now();
        let scored = update::score(ctx, s, model, reference.as_ref(), &problems, &samples.groups, temperature)?;
        let t_score = samples.t_score + ts.elapsed().as_secs_f64();
        // policy update: μ passes, one optimizer step each
        let tt = Instant::now();
        let lr = optim.lr_at(step, total);
        let u = update::update(ctx, s, model, &scored, samples.groups.len(), temperature, lr, step, Stepper { opt: &mut opt, optim: &optim, bar: &bar, name })?;
        if u.empty {
            st.steps_skipped += 1;
            bar.println(&format!("[{name}] step {}: no trainable completions (all groups dropped); step skipped", step + 1));
        }
        let t_train = tt.elapsed().as_secs_f64();
        health.observe(ctx, name, step + 1, u.grad_norm, None, &bar);
        if !u.loss.is_finite() && u.stepped {
            bail!("[{name}] loss became {} at step {}: lower the learning rate", u.loss, step + 1);
        }
        // log
        let done = step + 1;
        let times = [samples.t_gen, t_score, t_train, t0.elapsed().as_secs_f64()];
        let step_log = StepLog { index, name, done, total, lr, temperature, times, samples: &samples, update: &u, kl_reward: scored.kl_reward };
        step_log.write(ctx, &opt, &bar)?;
        if let Some(h) = &held {
            h.periodic(ctx, model, index, name, done, total, Default::default)?;
        }
        draw.save(&mut st.sampler, &mut st.domain);
        progress(&st)?.after_step(ctx, done, model, &opt)?;
    }
    bar.finish();
    let after = match &held {
        Some(h) => h.at_end(ctx, model, index, name, total, before, Default::default())?,
        None => f64::NAN,
    };
    draw.save(&mut st.sampler, &mut st.domain);
    let note = format!(
        " ({} groups dropped for equal rewards, {} over the token budget, {} steps skipped)",
        st.groups_dropped_zero_variance, st.groups_dropped_over_budget, st.steps_skipped
    );
    progress(&st)?.finish(ctx, model, t_stage, &note)?;
    Ok(after)
}

/// The KL reference (with `kl_coef` > 0): a frozen copy of the stage's starting model — on resume, reloaded
/// from where the stage started.
fn reference_model(ctx: &Ctx, index: usize, s: &GrpoStage, model: &Model, start: usize) -> Result<Option<Model>> {
    if s.kl_coef <= 0.0 {
        return Ok(None);
    }
    // ZeRO-3: the copy is of whole weights (and stays whole)
    crate::training::sharding::ensure_whole(ctx)?;
    let full = || if start == 0 { Ok(update::frozen_copy(model)) } else { models::stage_start_model(ctx, index, model.net.kind(), model.net.device()) };
    Ok(Some(models::reference_model(model, full)?))
}

/// What a data-parallel GRPO stage needs: prompts shared evenly (a group stays on one rank).
fn check_world(ctx: &Ctx, s: &GrpoStage, name: &str) -> Result<()> {
    let w = ctx.comm.world();
    if w > 1 && s.prompts_per_step % w != 0 {
        bail!("[{name}] prompts_per_step = {} cannot be shared evenly by {w} ranks (a group stays on one rank); use a multiple of {w}", s.prompts_per_step);
    }
    Ok(())
}

/// One step's metrics line (and its human line every `log_every` steps).
struct StepLog<'a> {
    index: usize,
    name: &'a str,
    done: usize,
    total: usize,
    lr: f64,
    temperature: f64,
    /// Seconds generating, scoring, training, and the whole step.
    times: [f64; 4],
    samples: &'a StepSamples,
    update: &'a Update,
    kl_reward: f64,
}

impl StepLog<'_> {
    fn write(&self, ctx: &Ctx, opt: &AdamW, bar: &Bar) -> Result<()> {
        let (name, done, total, temperature) = (self.name, self.done, self.total, self.temperature);
        let (u, stats) = (self.update, &self.samples.stats);
        let [t_gen, t_score, t_train, dt] = self.times;
        let ns = stats.len().max(1) as f64;
        let rmean = stats.iter().map(|x| x.0).sum::<f64>() / ns;
        let rstd = (stats.iter().map(|x| (x.0 - rmean).powi(2)).sum::<f64>() / ns).sqrt();
        let acc = stats.iter().filter(|x| x.1).count() as f64 / ns;
        let len_mean = stats.iter().map(|x| x.2 as f64).sum::<f64>() / ns;
        let len_max = stats.iter().map(|x| x.2).max().unwrap_or(0);
        let trunc = stats.iter().filter(|x| x.3).count() as f64 / ns;
        let total_tokens: usize = stats.iter().map(|x| x.2).sum();
        let per_tok = |x: f64| x / u.tokens.max(1.0);
        let sm = self.samples;
        let record = json!({"stage": self.index, "stage_name": name, "step": done,
            "loss": u.loss, "reward_mean": rmean, "reward_std": rstd, "accuracy": acc,
            "frac_zero_std_groups": sm.zero_var_groups as f64 / sm.generated_groups.max(1) as f64,
            "kl": per_tok(u.kl), "kl_in_reward": self.kl_reward, "clip_frac": per_tok(u.clipped), "entropy": per_tok(u.entropy),
            "response_length_mean": len_mean, "response_length_max": len_max, "truncated_frac": trunc,
            "grad_norm": u.grad_norm, "lr": self.lr, "temperature": temperature, "groups": u.groups as usize, "gen_rounds": sm.rounds,
            "groups_dropped_zero_std": sm.dropped_zero, "groups_dropped_over_budget": sm.dropped_budget, "train_tokens": u.tokens, "forward_tokens": u.forward_tokens,
            "time_generate_s": t_gen, "time_score_s": t_score, "time_train_s": t_train, "step_s": dt,
            "tokens_per_s": total_tokens as f64 / t_gen.max(1e-9), "update_lost_frac": opt.lost_fraction(),
            "mismatch_logp_abs": per_tok(u.mismatch_abs), "mismatch_kl_k3": per_tok(u.mismatch_k3), "mismatch_ratio_max": u.mismatch_max,
            "rollout_corrected_frac": per_tok(u.corrected), "off_policy_masked_frac": u.off_policy_masked / u.seqs.max(1.0)});
        if done % ctx.run.log_every.max(1) == 0 || done == total || done == 1 {
            bar.println(&format!(
                "[{name}] step {done}/{total} reward {rmean:.3} acc {:.1}% len {len_mean:.1} clip {:.3} kl {:.4} T {temperature:.2} ({t_gen:.1}s gen, {t_train:.1}s train)",
                100.0 * acc,
                per_tok(u.clipped),
                per_tok(u.kl)
            ));
        }
        ctx.metrics.log(obj(record))?;
        bar.step(done, u.loss, total_tokens as f64 / dt);
        Ok(())
    }
}
