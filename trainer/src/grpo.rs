//! The GRPO-family RL stage with verifiable rewards (stage 4 of Phi-4-Mini-Reasoning).
//!
//! Each step: draw prompts; the rollout engine samples G completions per prompt from the very tensors being
//! trained; the rewards crate scores them; advantages per group; `num_iterations` (μ) optimizer updates over
//! the batch with the clipped surrogate against the log-probabilities of the policy that sampled. Around that
//! core: dynamic sampling, oversample-then-balance, overlong filtering, pilot-pass-rate prompt filtering,
//! temperature annealing, domain-aware sampling and a token budget per step. Everything that decides what
//! the next step samples is either a pure function of (seed, step) or checkpointed in `TrainState::extra`, so
//! a resumed run continues bit-identically.

use anyhow::{bail, Context, Result};
use data::{DataConfig, Record};
use model::Model;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;
use tch::{Kind, Tensor};

use crate::checkpoint::Checkpoint;
use crate::recipe::SyntheticSpec;
use crate::rl::{self, AdvEstimator, AggDenoms, ClipCfg, KlEstimator, LossAgg, RatioLevel, ScaleRewards};
use crate::run::Ctx;
use crate::sft::Row;
use crate::stage::{obj, HeldOut, Progress};

/// Dynamic sampling (DAPO, Yu et al. 2025, arXiv 2503.14476 §3.2): groups whose rewards are all equal carry
/// no gradient; they are dropped and more prompts are drawn until the batch is full.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DynamicSampling {
    /// At most this many generation rounds per step (verl's `max_num_gen_batches`).
    #[serde(default = "three", alias = "max_num_gen_batches")]
    pub max_gen_batches: usize,
    /// When the cap is hit with the batch not full: "train" on the groups kept so far (a step with none is
    /// skipped and counted), or "error" to stop the run with a message.
    #[serde(default)]
    pub on_cap: OnCap,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnCap {
    #[default]
    Train,
    Error,
}

/// Phi-4-mini's prompt filtering (arXiv 2504.21233 §RL): before training, sample `samples` completions per
/// prompt with the starting policy; keep prompts whose pass rate lies in [min_pass_rate, max_pass_rate] and
/// whose response lengths are uniform enough (coefficient of variation ≤ `max_length_cv`).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Prefilter {
    /// Pilot completions per prompt.
    #[serde(default = "eight")]
    pub samples: usize,
    /// Drop prompts solved less often than this.
    #[serde(default)]
    pub min_pass_rate: f64,
    /// Drop prompts solved more often than this (e.g. 0.9 drops the overly easy ones).
    #[serde(default = "one_f")]
    pub max_pass_rate: f64,
    /// Drop prompts whose response lengths have a larger coefficient of variation (std/mean).
    #[serde(default)]
    pub max_length_cv: Option<f64>,
}

crate::stage::training_stage! {
    /// `kind = "grpo"`.
    pub struct GrpoStage {
        /// Problems with gold answers (prompt + answer columns).
        #[serde(default)]
        pub data: Option<DataConfig>,
        /// Synthetic arithmetic problems instead of a dataset.
        #[serde(default)]
        pub synthetic: Option<SyntheticSpec>,
        /// Reward terms (`[[stage.reward]]`, see the rewards crate): default one `accuracy` term, +1 correct,
        /// −1 otherwise (Phi-4-mini's reward).
        #[serde(default = "default_rewards")]
        #[schemars(with = "Vec<serde_json::Value>")]
        pub reward: Vec<rewards::RewardConfig>,
        /// Prompts per step (verl's `train_batch_size`).
        #[serde(default = "eight", alias = "train_batch_size")]
        pub prompts_per_step: usize,
        /// Completions per prompt, G (TRL's `num_generations`, verl's `rollout.n`).
        #[serde(default = "eight", alias = "n")]
        pub num_generations: usize,
        /// Oversample-then-balance (Phi-4-mini): generate this many (> G) per prompt and keep G, as balanced
        /// between above-mean and below-mean rewards as the group allows.
        #[serde(default)]
        pub oversample_generations: Option<usize>,
        /// Prompts longer than this (tokens) are dropped when loading.
        #[serde(default = "default_prompt_len")]
        pub max_prompt_length: usize,
        /// Generation limit per completion.
        #[serde(default = "default_completion_len", alias = "max_response_length")]
        pub max_completion_length: usize,
        /// Sampling temperature (at the start of the stage).
        #[serde(default = "one_f")]
        pub temperature: f64,
        /// Temperature annealing (Phi-4-mini: 1.0 → 0.6): the temperature reached after
        /// `temperature_anneal_steps` steps, linearly, then kept.
        #[serde(default)]
        pub temperature_final: Option<f64>,
        /// Steps over which the temperature goes from `temperature` to `temperature_final`.
        #[serde(default)]
        pub temperature_anneal_steps: usize,
        /// Nucleus sampling.
        #[serde(default = "one_f")]
        pub top_p: f64,
        /// Ignore end-of-sequence tokens: every completion has exactly `max_completion_length` tokens
        /// (benchmarks; TRL's `min_new_tokens` = `max_completion_length`).
        #[serde(default)]
        pub ignore_eos: bool,
        /// Top-k sampling (0: off).
        #[serde(default)]
        pub top_k: i64,
        /// Min-p sampling (0: off).
        #[serde(default)]
        pub min_p: f64,
        /// Policy updates per batch, μ (TRL's `num_iterations`, verl's `ppo_epochs`).
        #[serde(default = "one", alias = "ppo_epochs")]
        pub num_iterations: usize,
        /// Rows per forward/backward pass (memory; does not change the result).
        #[serde(default = "sixteen")]
        pub micro_batch_size: usize,
        /// Advantage estimator: "grpo" (group mean baseline) or "rloo" (leave-one-out baseline).
        #[serde(default)]
        pub adv_estimator: AdvEstimator,
        /// Advantage scaling: "group" std (GRPO), "batch" std, or "none" (Dr.GRPO).
        #[serde(default)]
        pub scale_rewards: ScaleRewards,
        /// Importance ratio per "token" (GRPO) or per "sequence" (GSPO).
        #[serde(default)]
        pub importance_sampling_level: RatioLevel,
        /// Lower clip ε (TRL's `epsilon`).
        #[serde(default = "default_clip", alias = "epsilon")]
        pub clip_ratio_low: f64,
        /// Upper clip ε (DAPO's clip-higher uses 0.28; default: equal to `clip_ratio_low`; TRL's `epsilon_high`).
        #[serde(default, alias = "epsilon_high")]
        pub clip_ratio_high: Option<f64>,
        /// Dual clip constant c > 1 for negative advantages (off by default).
        #[serde(default)]
        pub clip_ratio_c: Option<f64>,
        /// "token-mean" (DAPO, default), "seq-mean-token-mean" (GRPO), "seq-mean-token-sum",
        /// "seq-mean-token-sum-norm" (Dr.GRPO, divides by `max_completion_length`).
        #[serde(default)]
        pub loss_agg_mode: LossAgg,
        /// KL coefficient against the stage's starting model (TRL's `beta`); 0 loads no reference model.
        #[serde(default, alias = "beta")]
        pub kl_coef: f64,
        /// KL estimator: "k1", "k2" or "k3".
        #[serde(default)]
        pub kl_estimator: KlEstimator,
        /// Put the KL penalty (k1 summed over the completion) into the reward instead of the loss.
        #[serde(default)]
        pub kl_in_reward: bool,
        /// Entropy bonus coefficient (the entropy is logged either way).
        #[serde(default, alias = "entropy_coef")]
        pub entropy_coeff: f64,
        /// Overlong filtering (DAPO): truncated completions carry no loss (they still count in their group).
        #[serde(default)]
        pub mask_truncated_completions: bool,
        /// Dynamic sampling (alias: verl's `filter_groups`).
        #[serde(default, alias = "filter_groups")]
        pub dynamic_sampling: Option<DynamicSampling>,
        /// Pilot-pass-rate and length-uniformity prompt filtering before training.
        #[serde(default)]
        pub prefilter: Option<Prefilter>,
        /// A fixed budget of completion tokens per step instead of a fixed number of prompts (Ring-lite's
        /// C3PO, arXiv 2506.14731): generation rounds of `prompts_per_step` prompts continue until the budget is
        /// reached (capped by `dynamic_sampling.max_gen_batches`, default 3); groups past the budget are dropped.
        #[serde(default)]
        pub tokens_per_step: Option<usize>,
        /// Encode each prompt once for its G completions in the policy update and log-probability passes
        /// ("auto": when that costs fewer FLOPs than G padded rows, i.e. short completions of long prompts;
        /// "always"; "never"). The result is the same up to float rounding.
        #[serde(default)]
        pub prompt_sharing: crate::loss::PromptSharing,
        /// Domain-aware dynamic sampling over the rows' `domain` column (see the data crate's DomainSampler).
        #[serde(default)]
        #[schemars(with = "Option<serde_json::Value>")]
        pub domain_sampling: Option<data::sampler::DomainSamplingConfig>,
        /// Peak learning rate.
        #[serde(default = "default_lr", alias = "learning_rate")]
        pub lr: f64,
    }
}

fn default_lr() -> f64 {
    1e-6
}
fn default_rewards() -> Vec<rewards::RewardConfig> {
    vec![serde_json::from_value(json!({"kind": "accuracy"})).expect("accuracy reward config")]
}
fn eight() -> usize {
    8
}
fn sixteen() -> usize {
    16
}
fn one() -> usize {
    1
}
fn three() -> usize {
    3
}
fn one_f() -> f64 {
    1.0
}
fn default_clip() -> f64 {
    0.2
}
fn default_prompt_len() -> usize {
    512
}
fn default_completion_len() -> usize {
    256
}

impl GrpoStage {
    pub fn resolve_paths(&mut self, f: &mut dyn FnMut(&mut PathBuf)) {
        if let Some(d) = self.data.as_mut() {
            f(&mut d.path);
        }
        if let Some(d) = self.eval.as_mut().and_then(|e| e.data.as_mut()) {
            f(&mut d.path);
        }
    }

    pub fn validate(&self, at: &str, p: &mut Vec<String>) {
        self.optim().validate(at, p);
        crate::stage::validate_eval(&self.eval, at, p);
        match (&self.data, &self.synthetic) {
            (None, None) => p.push(format!("{at}: needs `data` (prompts with answers) or `synthetic`")),
            (Some(_), Some(_)) => p.push(format!("{at}: has both `data` and `synthetic`; give one")),
            (Some(d), None) if !d.path.exists() => p.push(format!("{at}: data path {} does not exist", d.path.display())),
            _ => {}
        }
        if self.max_steps.unwrap_or(1) == 0 {
            p.push(format!("{at}: max_steps must be at least 1"));
        }
        if self.prompts_per_step == 0 || self.micro_batch_size == 0 || self.num_iterations == 0 {
            p.push(format!("{at}: prompts_per_step, micro_batch_size and num_iterations must be at least 1"));
        }
        if self.num_generations < 2 {
            p.push(format!("{at}: num_generations must be at least 2 (advantages compare completions of a prompt)"));
        }
        if let Some(o) = self.oversample_generations {
            if o <= self.num_generations {
                p.push(format!("{at}: oversample_generations ({o}) must exceed num_generations ({})", self.num_generations));
            }
        }
        if !(self.temperature > 0.0) || self.temperature_final.is_some_and(|t| !(t > 0.0)) {
            p.push(format!("{at}: temperature and temperature_final must be positive"));
        }
        if !(0.0..1.0).contains(&self.clip_ratio_low) || self.clip_ratio_high.is_some_and(|h| !(h >= 0.0)) {
            p.push(format!("{at}: clip_ratio_low must be in [0, 1) and clip_ratio_high ≥ 0"));
        }
        if self.clip_ratio_c.is_some_and(|c| !(c > 1.0)) {
            p.push(format!("{at}: clip_ratio_c (dual clip) must be greater than 1"));
        }
        if self.kl_coef < 0.0 {
            p.push(format!("{at}: kl_coef must not be negative"));
        }
        if self.max_completion_length == 0 {
            p.push(format!("{at}: max_completion_length must be at least 1"));
        }
        if let Some(f) = &self.prefilter {
            if f.samples == 0 || !(f.min_pass_rate <= f.max_pass_rate) {
                p.push(format!("{at}: prefilter needs samples ≥ 1 and min_pass_rate ≤ max_pass_rate"));
            }
        }
        if let Err(e) = rewards::RewardSet::from_config(&self.reward) {
            p.push(format!("{at}: reward: {e}"));
        }
        if self.domain_sampling.is_some() && self.data.is_none() {
            p.push(format!("{at}: domain_sampling needs `data` with a `domain` column"));
        }
    }

    pub fn plan(&self) -> String {
        let src = self.synthetic.as_ref().map(|s| format!("{} synthetic problems", s.count)).unwrap_or_else(|| self.data.as_ref().map(|d| d.path.display().to_string()).unwrap_or_default());
        format!(
            "{src}; {} steps of {} prompts × {} completions (≤ {} tokens), μ = {}, lr {:.1e}, kl_coef {}{}",
            self.max_steps.unwrap_or(100),
            self.prompts_per_step,
            self.num_generations,
            self.max_completion_length,
            self.num_iterations,
            self.lr,
            self.kl_coef,
            if self.kl_coef > 0.0 { " (a reference model is kept in memory)" } else { "" }
        )
    }

    fn total_steps(&self) -> usize {
        self.max_steps.unwrap_or(100)
    }

    /// The sampling temperature at (0-based) step `step`.
    pub fn temperature_at(&self, step: usize) -> f64 {
        match self.temperature_final {
            Some(end) if self.temperature_anneal_steps > 0 => {
                let f = (step as f64 / self.temperature_anneal_steps as f64).min(1.0);
                self.temperature + (end - self.temperature) * f
            }
            Some(end) => end,
            None => self.temperature,
        }
    }

    fn clip(&self) -> ClipCfg {
        ClipCfg {
            level: self.importance_sampling_level,
            eps_low: self.clip_ratio_low,
            eps_high: self.clip_ratio_high.unwrap_or(self.clip_ratio_low),
            dual_clip: self.clip_ratio_c,
        }
    }
}

/// A problem: prompt token ids, the prompt text, its gold answer, its domain, and its dataset row.
struct Problem {
    ids: Vec<i64>,
    text: String,
    answer: String,
    domain: Option<String>,
    row: serde_json::Map<String, serde_json::Value>,
}

/// One scored completion.
#[derive(Clone)]
struct Sampled {
    ids: Vec<i64>,
    reward: f64,
    correct: bool,
    truncated: bool,
}

/// The completions of one prompt.
struct Group {
    problem: usize,
    done: Vec<Sampled>,
}

/// What the sampling-side decisions need of a group (shared between data-parallel ranks).
#[derive(Serialize, Deserialize)]
pub(crate) struct GroupSummary {
    problem: usize,
    rewards: Vec<f64>,
    zero_var: bool,
    tokens: usize,
}

/// What is checkpointed besides the model and optimizer.
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

/// Draws problem indices: plainly shuffled, or by domain with rewards fed back.
enum Draw {
    Plain(data::Sampler),
    Domain { sampler: data::sampler::DomainSampler, members: Vec<Vec<usize>>, names: Vec<String> },
}

impl Draw {
    fn next(&mut self, n: usize, pool: &[usize]) -> Vec<usize> {
        match self {
            Draw::Plain(s) => s.next_batch(n).into_iter().map(|i| pool[i]).collect(),
            Draw::Domain { sampler, members, .. } => (0..n).filter_map(|_| sampler.next_item()).map(|(d, i)| members[d][i]).collect(),
        }
    }
}

fn load_problems(ctx: &Ctx, s: &GrpoStage) -> Result<(Vec<Problem>, usize)> {
    let records = match (&s.data, &s.synthetic) {
        (Some(d), _) => data::load_records(d).with_context(|| format!("loading {}", d.path.display()))?,
        (None, Some(spec)) => crate::stage::synthetic(spec)?.prompt_answer(spec.start, spec.count),
        (None, None) => bail!("the stage has no data"),
    };
    let (mut out, mut too_long) = (vec![], 0);
    for (i, r) in records.iter().enumerate() {
        let Record::PromptAnswer { prompt, answer, id, domain, .. } = r else {
            bail!("row {}: a GRPO stage needs prompts with gold answers (prompt + answer columns)", i + 1);
        };
        let ids = crate::accuracy::prompt_ids(&ctx.tok, ctx.template.as_ref(), prompt)?;
        if ids.len() > s.max_prompt_length {
            too_long += 1;
            continue;
        }
        let text = prompt.last().map(|m| m.content.clone()).unwrap_or_default();
        let mut row = serde_json::Map::new();
        row.insert("id".into(), json!(id));
        if let Some(d) = domain {
            row.insert("domain".into(), json!(d));
        }
        out.push(Problem { ids, text, answer: answer.clone(), domain: domain.clone(), row });
    }
    if out.is_empty() {
        bail!("no problems left: all {} prompts are longer than max_prompt_length = {}", records.len(), s.max_prompt_length);
    }
    Ok((out, too_long))
}

/// Generates `n` completions for each of `problems` at `temperature` and scores them.
#[allow(clippy::too_many_arguments)]
fn rollout(
    ctx: &Ctx,
    s: &GrpoStage,
    model: &Model,
    rewards: &rewards::RewardSet,
    problems: &[Problem],
    which: &[usize],
    n: usize,
    temperature: f64,
    seed: u64,
    first: usize,
) -> Result<(Vec<Group>, f64)> {
    let params = rollout::SamplingParams {
        temperature: temperature as f32,
        top_p: s.top_p as f32,
        top_k: s.top_k,
        min_p: s.min_p as f32,
        max_new_tokens: s.max_completion_length,
        ignore_eos: s.ignore_eos,
        ..Default::default()
    };
    let prompts: Vec<Vec<i64>> = which.iter().map(|&i| problems[i].ids.clone()).collect();
    let done = crate::accuracy::generate_at(ctx, &model.net, &prompts, n, &params, seed, first)?;
    let stop = crate::accuracy::stop_ids(&ctx.tok);
    let mut samples = Vec::with_capacity(done.len());
    for c in &done {
        let p = &problems[which[c.request_index]];
        samples.push(rewards::Sample {
            prompt: p.text.clone(),
            completion: crate::accuracy::completion_text(&ctx.tok, &c.token_ids, &stop)?,
            gold: Some(p.answer.clone()),
            completion_tokens: c.token_ids.len(),
            max_tokens: s.max_completion_length,
            truncated: c.finish_reason == rollout::FinishReason::Length,
            row: p.row.clone(),
        });
    }
    let t_score = Instant::now();
    let scores = rewards.score_batch(&samples)?;
    let t_score = t_score.elapsed().as_secs_f64();
    let mut groups: Vec<Group> = which.iter().map(|&i| Group { problem: i, done: vec![] }).collect();
    for (k, c) in done.into_iter().enumerate() {
        groups[c.request_index].done.push(Sampled {
            ids: c.token_ids,
            reward: scores.total[k].unwrap_or(0.0),
            correct: scores.correct[k].unwrap_or(false),
            truncated: samples[k].truncated,
        });
    }
    Ok((groups, t_score))
}

/// Keeps `g` of a group's completions, balanced between rewards above and at-or-below the group mean
/// (Phi-4-mini's oversample-then-balance): alternately one from each side, in generation order.
fn balance(group: &mut Group, g: usize) {
    if group.done.len() <= g {
        return;
    }
    let mean = group.done.iter().map(|x| x.reward).sum::<f64>() / group.done.len() as f64;
    let (hi, lo): (Vec<Sampled>, Vec<Sampled>) = group.done.drain(..).partition(|x| x.reward > mean);
    let (mut hi, mut lo) = (hi.into_iter(), lo.into_iter());
    let mut out = Vec::with_capacity(g);
    while out.len() < g {
        match (out.len() % 2 == 0).then(|| hi.next()).flatten().or_else(|| lo.next()).or_else(|| hi.next()) {
            Some(x) => out.push(x),
            None => break,
        }
    }
    group.done = out;
}

fn zero_variance(g: &Group) -> bool {
    g.done.windows(2).all(|w| w[0].reward == w[1].reward)
}

/// Seed of a generation round: a pure function of the run seed, stage, step and round.
fn round_seed(run_seed: u64, stage: usize, step: usize, round: usize) -> u64 {
    let mut x = run_seed ^ 0x9E37_79B9_7F4A_7C15;
    for v in [stage as u64, step as u64, round as u64] {
        x = (x ^ v).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 31;
    }
    x
}

/// Pilot pass: which problems the prefilter keeps, with counts for the log.
/// A prefilter verdict on one prompt.
#[derive(Serialize, Deserialize)]
enum Pilot {
    Kept,
    Hard,
    Easy,
    Uneven,
}

fn prefilter(ctx: &Ctx, s: &GrpoStage, f: &Prefilter, model: &Model, rewards: &rewards::RewardSet, problems: &[Problem], index: usize) -> Result<Vec<usize>> {
    let all: Vec<usize> = (0..problems.len()).collect();
    let mut kept = vec![];
    let (mut easy, mut hard, mut uneven) = (0, 0, 0);
    for (round, chunk) in all.chunks(64).enumerate() {
        // data parallel: each rank pilots its share of the chunk (seeded as in the whole chunk); all gather
        let share = crate::data_parallel::share_range(ctx, chunk.len());
        let seed = round_seed(ctx.recipe.run.seed, index, usize::MAX, round);
        let (groups, _) = rollout(ctx, s, model, rewards, problems, &chunk[share.clone()], f.samples, s.temperature, seed, share.start)?;
        let verdicts: Vec<(usize, Pilot)> = groups
            .iter()
            .map(|g| {
                let rate = g.done.iter().filter(|x| x.correct).count() as f64 / g.done.len() as f64;
                let lens: Vec<f64> = g.done.iter().map(|x| x.ids.len() as f64).collect();
                let mean = lens.iter().sum::<f64>() / lens.len() as f64;
                let cv = (lens.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / lens.len() as f64).sqrt() / mean.max(1.0);
                let v = if rate < f.min_pass_rate {
                    Pilot::Hard
                } else if rate > f.max_pass_rate {
                    Pilot::Easy
                } else if f.max_length_cv.is_some_and(|m| cv > m) {
                    Pilot::Uneven
                } else {
                    Pilot::Kept
                };
                (g.problem, v)
            })
            .collect();
        for (problem, v) in crate::data_parallel::gather_concat(ctx, verdicts)? {
            match v {
                Pilot::Hard => hard += 1,
                Pilot::Easy => easy += 1,
                Pilot::Uneven => uneven += 1,
                Pilot::Kept => kept.push(problem),
            }
        }
    }
    if ctx.comm.is_main() {
        eprintln!(
            "[{}] prefilter ({} pilot samples each): kept {} of {} prompts; dropped {easy} too easy, {hard} too hard, {uneven} with uneven lengths",
            ctx.recipe.stage[index].name(index),
            f.samples,
            kept.len(),
            problems.len()
        );
    }
    if kept.is_empty() {
        bail!("the prefilter kept no prompts; widen [min_pass_rate, max_pass_rate] or max_length_cv");
    }
    Ok(kept)
}

/// Training rows of the groups, in the order of their rewards: prompt + completion, labels on the completion
/// only (none for masked truncated completions).
fn rows_of(groups: &[Group], problems: &[Problem], mask_truncated: bool) -> (Vec<Row>, Vec<usize>) {
    let (mut rows, mut group_of) = (vec![], vec![]);
    for (gi, g) in groups.iter().enumerate() {
        let p = &problems[g.problem].ids;
        for c in &g.done {
            let mut ids = p.clone();
            ids.extend(&c.ids);
            let mut labels = vec![crate::loss::IGNORE; p.len()];
            if mask_truncated && c.truncated {
                labels.extend(std::iter::repeat_n(crate::loss::IGNORE, c.ids.len()));
            } else {
                labels.extend(&c.ids);
            }
            rows.push(Row { ids, labels, pos: None });
            group_of.push(gi);
        }
    }
    (rows, group_of)
}

/// The step's rows as micro-batches of `s.micro_batch_size`, each in the layout `s.prompt_sharing` picks
/// (`group`: each row's group), built once for every pass over them (reference, old policy, μ updates).
fn micro_batches(net: &model::Transformer, rows: &[Row], group: &[usize], s: &GrpoStage, pad: i64) -> Vec<crate::loss::MicroRows> {
    rows.chunks(s.micro_batch_size)
        .zip(group.chunks(s.micro_batch_size))
        .map(|(m, gr)| {
            let refs: Vec<(&[i64], &[i64])> = m.iter().map(|r| (r.ids.as_slice(), r.labels.as_slice())).collect();
            crate::loss::MicroRows::new(net, &refs, gr, pad, s.prompt_sharing)
        })
        .collect()
}

/// Per-token log-probabilities of micro-batches under `model` (no gradients).
fn logprobs_of(model: &Model, micro: &[crate::loss::MicroRows], chunk: i64, temperature: f64) -> Vec<Tensor> {
    micro.iter().map(|mr| mr.with(|x| crate::loss::token_logprobs_of(&model.net, x, chunk, temperature, false).0)).collect()
}

/// A frozen copy of the model (the KL reference).
fn frozen_copy(model: &Model) -> Model {
    let kind = model.net.params.tensors()[0].kind();
    let net = model::Transformer::build(&model.net.cfg, kind, model.net.device(), model::Fill::Empty);
    tch::no_grad(|| {
        for ((_, dst), (_, src)) in net.params.iter().zip(model.net.params.iter()) {
            dst.shallow_clone().copy_(src);
        }
    });
    Model { net, source_dir: model.source_dir.clone() }
}

pub fn run(ctx: &Ctx, index: usize, s: &GrpoStage, model: &Model, resume: Option<&Checkpoint>) -> Result<f64> {
    let name = ctx.recipe.stage[index].name(index);
    let total = s.total_steps();
    let rewards = rewards::RewardSet::from_config(&s.reward)?;
    let (problems, too_long) = load_problems(ctx, s)?;
    let longest = problems.iter().map(|p| p.ids.len()).max().unwrap_or(0);
    crate::stage::check_positions(model, &name, longest + s.max_completion_length, "the longest prompt + max_completion_length")?;
    if too_long > 0 {
        eprintln!("[{name}] dropped {too_long} prompts longer than max_prompt_length = {}", s.max_prompt_length);
    }
    let optim = s.optim();
    let mut opt = optim.optimizer(ctx, model);
    let mut st: GrpoState = match resume {
        Some(c) => {
            opt.load(&c.optimizer_path())?;
            serde_json::from_value(c.state.extra.clone()).context("checkpoint: GRPO state")?
        }
        None => GrpoState::default(),
    };
    let start = resume.map(|c| c.state.step).unwrap_or(0);
    let held = HeldOut::new(&s.eval)?;
    let mut before = f64::NAN;
    if let (Some(h), 0) = (&held, start) {
        before = h.at_start(ctx, model, index, &name, Default::default())?;
    }
    // prompt filtering with the starting policy (once; its result is checkpointed)
    if let (Some(f), None) = (&s.prefilter, &st.kept) {
        st.kept = Some(prefilter(ctx, s, f, model, &rewards, &problems, index)?);
    }
    let pool: Vec<usize> = st.kept.clone().unwrap_or_else(|| (0..problems.len()).collect());
    let scfg = data::SamplerConfig { seed: ctx.recipe.run.seed.wrapping_add(index as u64), shuffle: true, num_epochs: None, drop_last: false };
    let mut draw = match &s.domain_sampling {
        None => {
            let mut smp = data::Sampler::single(pool.len(), scfg)?;
            if let Some(x) = st.sampler.clone() {
                smp.restore(x)?;
            }
            Draw::Plain(smp)
        }
        Some(dcfg) => {
            let mut names: Vec<String> = pool.iter().map(|&i| problems[i].domain.clone().unwrap_or_default()).collect();
            names.sort();
            names.dedup();
            let members: Vec<Vec<usize>> = names.iter().map(|n| pool.iter().copied().filter(|&i| problems[i].domain.as_deref().unwrap_or("") == n).collect()).collect();
            let mut ds = data::sampler::DomainSampler::new(names.iter().cloned().zip(members.iter().map(|m| m.len())).collect(), dcfg.clone(), scfg, 0, 1)?;
            if let Some(x) = st.domain.clone() {
                ds.restore(x)?;
            }
            eprintln!("[{name}] domain-aware sampling over {} domains: {}", names.len(), names.join(", "));
            Draw::Domain { sampler: ds, members, names }
        }
    };
    let reference = if s.kl_coef > 0.0 {
        Some(if start == 0 { frozen_copy(model) } else { crate::run::stage_start_model(ctx, index, model.net.params.tensors()[0].kind(), model.net.device())? })
    } else {
        None
    };
    eprintln!("[{name}] {} problems; {total} steps: {}", pool.len(), s.plan());
    crate::data_parallel::grpo_supported(ctx, s, &name)?;

    let progress = |st: &GrpoState| -> Result<Progress> {
        Ok(Progress { index, name: name.clone(), total, sampler: None, tokens: 0, extra: serde_json::to_value(st)? })
    };
    let pad = ctx.tok.pad_id as i64;
    let chunk = s.loss_chunk as i64;
    let g = s.num_generations;
    let clip = s.clip();
    let bar = crate::progress::Bar::new(&name, start, total);
    let mut health = crate::stage::Health::default();
    let t_stage = Instant::now();
    for step in start..total {
        let t0 = Instant::now();
        let temperature = s.temperature_at(step);
        // ---- generate and score
        let (mut t_gen, mut t_score) = (0.0, 0.0);
        let mut groups: Vec<Group> = vec![];
        let mut gen_tokens = 0usize;
        let (mut dropped_zero, mut dropped_budget, mut rounds) = (0u64, 0u64, 0usize);
        let cap = s.dynamic_sampling.as_ref().map(|d| d.max_gen_batches).unwrap_or(if s.tokens_per_step.is_some() { 3 } else { 1 }).max(1);
        let mut all_groups_stats: Vec<(f64, bool, usize, bool)> = vec![]; // (reward, correct, len, truncated) of every sample generated
        let mut zero_var_groups = 0usize;
        let mut generated_groups = 0usize;
        let mut kept_mine: Vec<bool> = vec![]; // every kept group of the step (all ranks), in order: is it this rank's?
        loop {
            let which = draw.next(s.prompts_per_step, &pool);
            if which.is_empty() {
                break;
            }
            // data parallel: this rank's prompts (whole groups), at their index in the step's draw
            let (which, first) = crate::data_parallel::shard_at(ctx, which);
            let tg = Instant::now();
            let n = s.oversample_generations.unwrap_or(g);
            let (mut got, ts) = rollout(ctx, s, model, &rewards, &problems, &which, n, temperature, round_seed(ctx.recipe.run.seed, index, step, rounds), first)?;
            t_gen += tg.elapsed().as_secs_f64() - ts;
            t_score += ts;
            rounds += 1;
            // each group's summary: its problem, rewards before balancing (domain sampling learns from every
            // sample), and after balancing whether its rewards are all equal and how many tokens it holds
            let mut summaries = Vec::with_capacity(got.len());
            for gr in &mut got {
                for x in &gr.done {
                    all_groups_stats.push((x.reward, x.correct, x.ids.len(), x.truncated));
                }
                let rewards: Vec<f64> = gr.done.iter().map(|x| x.reward).collect();
                balance(gr, g);
                let tokens = gr.done.iter().map(|x| x.ids.len()).sum::<usize>();
                summaries.push(GroupSummary { problem: gr.problem, rewards, zero_var: zero_variance(gr), tokens });
            }
            // data parallel: every rank's groups of the round in draw order, so that every rank takes the same
            // decisions (domain weights, which groups to keep, whether to draw again); each keeps its own
            let (all, mine) = crate::data_parallel::gather_round(ctx, summaries)?;
            generated_groups += all.len();
            let mut own = got.into_iter();
            for (k, sm) in all.iter().enumerate() {
                let gr = if mine.contains(&k) { own.next() } else { None };
                if let (Draw::Domain { sampler, names, .. }, Some(d)) = (&mut draw, &problems[sm.problem].domain) {
                    if let Some(di) = names.iter().position(|n| n == d) {
                        sampler.update(di, &sm.rewards)?;
                    }
                }
                zero_var_groups += sm.zero_var as usize;
                if sm.zero_var && s.dynamic_sampling.is_some() {
                    dropped_zero += 1;
                    continue;
                }
                if let Some(budget) = s.tokens_per_step {
                    if gen_tokens >= budget {
                        dropped_budget += 1;
                        continue;
                    }
                }
                gen_tokens += sm.tokens;
                kept_mine.push(gr.is_some());
                groups.extend(gr);
            }
            let full = match (s.tokens_per_step, &s.dynamic_sampling) {
                (Some(b), _) => gen_tokens >= b,
                (None, Some(_)) => kept_mine.len() >= s.prompts_per_step,
                (None, None) => true,
            };
            if full {
                break;
            }
            if rounds >= cap {
                if let Some(DynamicSampling { on_cap: OnCap::Error, max_gen_batches }) = &s.dynamic_sampling {
                    bail!(
                        "[{name}] step {}: dynamic sampling kept {} of {} groups after max_gen_batches = {max_gen_batches} rounds \
                         (all others had equal rewards); raise max_gen_batches, use a harder/easier dataset, or on_cap = \"train\"",
                        step + 1,
                        kept_mine.len(),
                        s.prompts_per_step
                    );
                }
                break;
            }
        }
        if s.dynamic_sampling.is_some() && s.tokens_per_step.is_none() {
            // the first prompts_per_step kept groups of the whole step; this rank's among them
            groups.truncate(kept_mine.iter().take(s.prompts_per_step).filter(|&&m| m).count());
        }
        // data parallel: every rank's samples for the metrics
        let all_groups_stats = crate::data_parallel::gather_concat(ctx, all_groups_stats)?;
        st.groups_dropped_zero_variance += dropped_zero;
        st.groups_dropped_over_budget += dropped_budget;
        let ts = Instant::now();

        // ---- advantages (KL in the reward first, when asked)
        let mut rewards_flat: Vec<f64> = groups.iter().flat_map(|gr| gr.done.iter().map(|x| x.reward)).collect();
        let (rows, group_of) = rows_of(&groups, &problems, s.mask_truncated_completions);
        let micro = micro_batches(&model.net, &rows, &group_of, s, pad);
        let ref_lp = match &reference {
            Some(r) if !rows.is_empty() => Some(logprobs_of(r, &micro, chunk, temperature)),
            _ => None,
        };
        // the sampling policy's log-probabilities: for KL in the reward and as π_old when μ > 1
        let cur_lp = if !rows.is_empty() && ((s.kl_in_reward && ref_lp.is_some()) || s.num_iterations > 1) {
            Some(logprobs_of(model, &micro, chunk, temperature))
        } else {
            None
        };
        let mut kl_reward = 0.0;
        if let (true, Some(refs), Some(cur)) = (s.kl_in_reward, &ref_lp, &cur_lp) {
            let mut k = 0;
            for (c, r) in cur.iter().zip(refs) {
                let per_row = Vec::<f64>::try_from(rl::kl(c, r, KlEstimator::K1).sum_dim_intlist(1, false, Kind::Double)).unwrap();
                for v in per_row {
                    rewards_flat[k] -= s.kl_coef * v;
                    kl_reward += v;
                    k += 1;
                }
            }
        }
        let mut kl_rows = [kl_reward, rows.len() as f64];
        crate::data_parallel::sum(ctx, &mut kl_rows)?;
        kl_reward = kl_rows[0] / kl_rows[1].max(1.0);
        // advantages over the whole step's rewards (every rank's, in rank order); this rank keeps its own
        let (rewards_flat, mine) = crate::data_parallel::gather_f64(ctx, &rewards_flat)?;
        // every group holds exactly G completions (balance() keeps G of an oversampled group)
        let advs = if rewards_flat.is_empty() { vec![] } else { rl::advantages(&rewards_flat, g, s.adv_estimator, s.scale_rewards, 1e-4) };
        let advs = advs.get(mine).map(<[f64]>::to_vec).unwrap_or_default();
        t_score += ts.elapsed().as_secs_f64();

        // ---- policy update: μ passes, one optimizer step each
        let tt = Instant::now();
        let mut counts = [
            rows.iter().map(|r| r.labels.iter().filter(|&&x| x != crate::loss::IGNORE).count() as f64).sum(),
            rows.iter().filter(|r| r.labels.iter().any(|&x| x != crate::loss::IGNORE)).count() as f64,
            groups.len() as f64,
        ];
        crate::data_parallel::sum(ctx, &mut counts)?; // the global denominators of the loss aggregation
        let [n_tok, n_seq, n_groups] = counts;
        let denoms = AggDenoms { tokens: n_tok, seqs: n_seq, norm: s.max_completion_length as f64 };
        let old_lp = cur_lp.filter(|_| s.num_iterations > 1);
        let (mut loss_sum, mut clip_sum, mut kl_sum, mut ent_sum, mut grad_norm) = (0.0, 0.0, 0.0, 0.0, 0.0);
        let mut forward_tokens = 0usize; // tokens through the network per update (prompt sharing lowers it)
        let mut stepped = true; // every optimizer step of the update was taken (none skipped for a non-finite gradient)
        let lr = optim.lr_at(step, total);
        let lcfg = LossCfg {
            clip,
            agg: s.loss_agg_mode,
            denoms,
            kl: reference.as_ref().map(|_| (s.kl_coef, s.kl_estimator, s.kl_in_reward)),
            entropy_coeff: s.entropy_coeff,
            temperature,
            chunk,
        };
        if n_tok > 0.0 {
            for it in 0..s.num_iterations {
                let mut acc = crate::data_parallel::Accum::new(model);
                for ((mi, mr), a) in micro.iter().enumerate().zip(advs.chunks(s.micro_batch_size)) {
                    acc.next();
                    let old = old_lp.as_ref().map(|o| &o[mi]);
                    let rf = ref_lp.as_ref().map(|r| &r[mi]);
                    let st = micro_step(&model.net, mr, a, old, rf, &lcfg);
                    if it == 0 {
                        forward_tokens += mr.tokens();
                        loss_sum += st.loss;
                        clip_sum += st.clipped;
                        kl_sum += st.kl;
                        ent_sum += st.entropy;
                    }
                }
                acc.finish();
                crate::data_parallel::sync_grads(ctx, model)?;
                let (norm, took) = crate::stage::optimizer_step(ctx, &name, &mut opt, &optim, lr, step + 1, &bar)?;
                grad_norm = norm;
                stepped &= took;
            }
        } else {
            st.steps_skipped += 1;
            bar.println(&format!("[{name}] step {}: no trainable completions (all groups dropped); step skipped", step + 1));
        }
        let t_train = tt.elapsed().as_secs_f64();
        let mut sums = [loss_sum, clip_sum, kl_sum, ent_sum];
        crate::data_parallel::sum(ctx, &mut sums)?;
        let [loss_sum, clip_sum, kl_sum, ent_sum] = sums;
        health.observe(ctx, &name, step + 1, grad_norm, None, &bar);
        if !loss_sum.is_finite() && stepped {
            bail!("[{name}] loss became {loss_sum} at step {}: lower the learning rate", step + 1);
        }

        // ---- metrics
        let dt = t0.elapsed().as_secs_f64();
        let done = step + 1;
        let ns = all_groups_stats.len().max(1) as f64;
        let rmean = all_groups_stats.iter().map(|x| x.0).sum::<f64>() / ns;
        let rstd = (all_groups_stats.iter().map(|x| (x.0 - rmean).powi(2)).sum::<f64>() / ns).sqrt();
        let acc = all_groups_stats.iter().filter(|x| x.1).count() as f64 / ns;
        let len_mean = all_groups_stats.iter().map(|x| x.2 as f64).sum::<f64>() / ns;
        let len_max = all_groups_stats.iter().map(|x| x.2).max().unwrap_or(0);
        let trunc = all_groups_stats.iter().filter(|x| x.3).count() as f64 / ns;
        let total_tokens: usize = all_groups_stats.iter().map(|x| x.2).sum();
        let record = json!({"stage": index, "stage_name": name, "step": done,
            "loss": loss_sum, "reward_mean": rmean, "reward_std": rstd, "accuracy": acc,
            "frac_zero_std_groups": zero_var_groups as f64 / generated_groups.max(1) as f64,
            "kl": kl_sum / n_tok.max(1.0), "kl_in_reward": kl_reward, "clip_frac": clip_sum / n_tok.max(1.0), "entropy": ent_sum / n_tok.max(1.0),
            "response_length_mean": len_mean, "response_length_max": len_max, "truncated_frac": trunc,
            "grad_norm": grad_norm, "lr": lr, "temperature": temperature, "groups": n_groups as usize, "gen_rounds": rounds,
            "groups_dropped_zero_std": dropped_zero, "groups_dropped_over_budget": dropped_budget, "train_tokens": n_tok, "forward_tokens": forward_tokens,
            "time_generate_s": t_gen, "time_score_s": t_score, "time_train_s": t_train, "step_s": dt,
            "tokens_per_s": total_tokens as f64 / t_gen.max(1e-9), "update_lost_frac": opt.lost_fraction()});
        if done % ctx.recipe.run.log_every.max(1) == 0 || done == total || done == 1 {
            bar.println(&format!(
                "[{name}] step {done}/{total} reward {rmean:.3} acc {:.1}% len {len_mean:.1} clip {:.3} kl {:.4} T {temperature:.2} ({t_gen:.1}s gen, {t_train:.1}s train)",
                100.0 * acc,
                clip_sum / n_tok.max(1.0),
                kl_sum / n_tok.max(1.0)
            ));
        }
        ctx.metrics.log(obj(record))?;
        bar.step(done, loss_sum, total_tokens as f64 / dt);
        if let Some(h) = &held {
            h.periodic(ctx, model, index, &name, done, total, Default::default)?;
        }
        sync_state(&mut st, &draw);
        progress(&st)?.after_step(ctx, done, model, &opt)?;
    }
    bar.finish();
    let after = match &held {
        Some(h) => h.at_end(ctx, model, index, &name, total, before, Default::default())?,
        None => f64::NAN,
    };
    sync_state(&mut st, &draw);
    let note = format!(
        " ({} groups dropped for equal rewards, {} over the token budget, {} steps skipped)",
        st.groups_dropped_zero_variance, st.groups_dropped_over_budget, st.steps_skipped
    );
    progress(&st)?.finish(ctx, model, t_stage, &note)?;
    Ok(after)
}

/// The loss settings of one step.
struct LossCfg {
    clip: ClipCfg,
    agg: LossAgg,
    denoms: AggDenoms,
    /// (coefficient, estimator, in the reward instead of the loss) when there is a reference model.
    kl: Option<(f64, KlEstimator, bool)>,
    entropy_coeff: f64,
    temperature: f64,
    chunk: i64,
}

/// Sums over a micro-batch's tokens, for metrics.
#[derive(Default)]
struct MicroStats {
    loss: f64,
    clipped: f64,
    kl: f64,
    entropy: f64,
}

/// Forward and backward of one micro-batch of the clipped policy-gradient loss (gradients accumulate in the
/// parameters). `old`: log-probabilities of the sampling policy (None: the current ones, detached, i.e. μ = 1);
/// `rf`: the reference's, when there is a KL term.
fn micro_step(net: &model::Transformer, m: &crate::loss::MicroRows, advs: &[f64], old: Option<&Tensor>, rf: Option<&Tensor>, c: &LossCfg) -> MicroStats {
    let dev = net.device();
    let labels = &m.labels;
    let adv_t = Tensor::from_slice(advs).to_device(dev);
    let mut st = MicroStats::default();
    let sum = |t: &Tensor| f64::try_from(t.sum(Kind::Double)).unwrap_or(0.0);
    let (l, _, _) = m.with(|rows| crate::loss::logprob_backward(net, rows, c.chunk, c.temperature, true, |lp, ent| {
        let mask = labels.narrow(1, 1, labels.size()[1] - 1).ne(crate::loss::IGNORE).to_device(dev).to_kind(lp.kind());
        let old = old.map(|o| o.shallow_clone()).unwrap_or_else(|| lp.detach());
        let ratio = rl::ratios(lp, &old, &mask, c.clip.level);
        let (pg, clipped) = rl::clipped_pg(&ratio, &adv_t.to_kind(lp.kind()), &c.clip);
        st.clipped = sum(&(&clipped * &mask));
        let mut per_tok = pg;
        if let (Some(r), Some((coef, est, in_reward))) = (rf, c.kl) {
            let k = rl::kl(lp, r, est);
            st.kl = sum(&(&k * &mask));
            if !in_reward {
                per_tok = per_tok + k * coef;
            }
        }
        if let Some(e) = ent {
            st.entropy = sum(&(e * &mask));
            if c.entropy_coeff != 0.0 {
                per_tok = per_tok - e * c.entropy_coeff;
            }
        }
        rl::aggregate(&per_tok, &mask, c.agg, c.denoms)
    }));
    st.loss = l;
    st
}

fn sync_state(st: &mut GrpoState, draw: &Draw) {
    match draw {
        Draw::Plain(s) => st.sampler = Some(s.state()),
        Draw::Domain { sampler, .. } => st.domain = Some(sampler.state()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampled(r: f64) -> Sampled {
        Sampled { ids: vec![1], reward: r, correct: r > 0.0, truncated: false }
    }

    #[test]
    fn balance_keeps_g_alternating_above_and_below_the_mean() {
        let mut g = Group { problem: 0, done: [1.0, 1.0, 1.0, 1.0, 1.0, -1.0, 1.0, -1.0].iter().map(|&r| sampled(r)).collect() };
        balance(&mut g, 4);
        let r: Vec<f64> = g.done.iter().map(|x| x.reward).collect();
        assert_eq!(r, vec![1.0, -1.0, 1.0, -1.0]);
        // only one negative: the rest are filled from the other side
        let mut g = Group { problem: 0, done: [1.0, 1.0, 1.0, -1.0, 1.0, 1.0].iter().map(|&r| sampled(r)).collect() };
        balance(&mut g, 4);
        let r: Vec<f64> = g.done.iter().map(|x| x.reward).collect();
        assert_eq!(r.iter().filter(|&&x| x < 0.0).count(), 1);
        assert_eq!(r.len(), 4);
    }

    #[test]
    fn temperature_anneals_linearly_then_holds() {
        let mut s: GrpoStage = toml::from_str("synthetic = { count = 1 }\ntemperature = 1.0\ntemperature_final = 0.6\ntemperature_anneal_steps = 4").unwrap();
        assert_eq!(s.temperature_at(0), 1.0);
        assert!((s.temperature_at(2) - 0.8).abs() < 1e-12);
        assert!((s.temperature_at(4) - 0.6).abs() < 1e-12);
        assert!((s.temperature_at(100) - 0.6).abs() < 1e-12);
        s.temperature_final = None;
        assert_eq!(s.temperature_at(50), 1.0);
    }

    /// One update with the clipped surrogate raises the log-probability of a completion with a positive
    /// advantage and lowers that of one with a negative advantage.
    #[test]
    fn an_update_moves_log_probs_in_the_direction_of_the_advantage() {
        model::runtime::preload_cuda();
        let cfg = model::ModelConfig::from_json(
            json!({"model_type": "llama", "vocab_size": 40, "hidden_size": 32, "intermediate_size": 64,
                "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": true}),
            "test",
        )
        .unwrap();
        let model = Model::random(&cfg, Kind::Float, tch::Device::Cpu, 1);
        let args = crate::stage::OptimArgs {
            lr: 1e-2,
            schedule: crate::optim::Schedule::Constant,
            warmup_steps: Some(0),
            warmup_ratio: 0.0,
            min_lr_ratio: 0.0,
            adam: crate::optim::AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 },
            max_grad_norm: 0.0,
        };
        let mut opt = args.optimizer_with(&model, Default::default());
        let prompt = vec![3i64, 4, 5];
        let mk = |c: &[i64]| {
            let mut ids = prompt.clone();
            ids.extend(c);
            let mut labels = vec![crate::loss::IGNORE; 3];
            labels.extend(c);
            Row { ids, labels, pos: None }
        };
        let rows = vec![mk(&[7, 8, 9]), mk(&[10, 11])];
        let advs = [1.0, -1.0];
        let st: GrpoStage = toml::from_str("synthetic = { count = 1 }\nprompt_sharing = \"always\"").unwrap();
        let seq_lp = |m: &Model| -> Vec<f64> {
            let lp = logprobs_of(m, &micro_batches(&m.net, &rows, &[0, 0], &st, 0), 64, 1.0);
            Vec::<f64>::try_from(lp[0].sum_dim_intlist(1, false, Kind::Double)).unwrap()
        };
        let before = seq_lp(&model);
        for agg in [LossAgg::TokenMean, LossAgg::SeqMeanTokenMean, LossAgg::SeqMeanTokenSumNorm] {
            let c = LossCfg {
                clip: ClipCfg { level: RatioLevel::Token, eps_low: 0.2, eps_high: 0.2, dual_clip: None },
                agg,
                denoms: AggDenoms { tokens: 5.0, seqs: 2.0, norm: 4.0 },
                kl: None,
                entropy_coeff: 0.0,
                temperature: 1.0,
                chunk: 64,
            };
            let mr = &micro_batches(&model.net, &rows, &[0, 0], &st, 0)[0];
            let st = micro_step(&model.net, mr, &advs, None, None, &c);
            assert!(st.loss.is_finite() && st.entropy > 0.0);
            opt.step(args.lr);
            opt.zero_grad();
        }
        let after = seq_lp(&model);
        assert!(after[0] > before[0] + 0.1, "positive advantage: {} -> {}", before[0], after[0]);
        assert!(after[1] < before[1] - 0.1, "negative advantage: {} -> {}", before[1], after[1]);
    }

    #[test]
    fn round_seeds_differ_by_step_and_round() {
        let a = round_seed(0, 1, 2, 0);
        assert_ne!(a, round_seed(0, 1, 3, 0));
        assert_ne!(a, round_seed(0, 1, 2, 1));
        assert_eq!(a, round_seed(0, 1, 2, 0));
    }
}
