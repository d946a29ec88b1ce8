//! The sampling side of a GRPO step: draw prompts (shuffled, or by domain with rewards fed back), generate G
//! completions each with the rollout engine on the weights being trained, score them with the reward set,
//! balance oversampled groups, and keep or drop groups (dynamic sampling, token budget) until the step's batch
//! is full; and the prefilter's pilot pass before the stage. Every decision is a pure function of (seed,
//! step, round) or of state the stage checkpoints, and is taken identically on every data-parallel rank.

use anyhow::{bail, Context, Result};
use data::Record;
use model::Model;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::time::Instant;

use super::config::{DynamicSampling, GrpoStage, OnCap, Prefilter};
use crate::training::{data_parallel, generate, Ctx};

/// A problem: prompt token ids, the prompt text, its gold answer, its domain, and its dataset row.
pub struct Problem {
    pub ids: Vec<i64>,
    pub text: String,
    pub answer: String,
    pub domain: Option<String>,
    pub row: serde_json::Map<String, serde_json::Value>,
}

/// One scored completion.
#[derive(Clone)]
pub struct Sampled {
    pub ids: Vec<i64>,
    pub reward: f64,
    pub correct: bool,
    pub truncated: bool,
    /// The sampler's log-probability of each token, under the distribution it was drawn from.
    pub logprobs: Vec<f32>,
}

/// The completions of one prompt.
pub struct Group {
    pub problem: usize,
    pub done: Vec<Sampled>,
}

/// What the sampling-side decisions need of a group (shared between data-parallel ranks).
#[derive(Serialize, Deserialize)]
struct GroupSummary {
    problem: usize,
    rewards: Vec<f64>,
    zero_var: bool,
    tokens: usize,
}

/// Draws problem indices: plainly shuffled, or by domain with rewards fed back.
pub enum Draw {
    Plain(data::Sampler),
    Domain { sampler: data::sampler::DomainSampler, members: Vec<Vec<usize>>, names: Vec<String> },
}

impl Draw {
    /// The draw over `pool` (problem indices): shuffled by the stage's seed, or by domain (the rows' `domain`
    /// column) when `domain_sampling` is set; continued from the checkpointed state when there is one.
    pub fn new(r: &Rollouts, pool: &[usize], plain: Option<data::SamplerState>, domain: Option<data::sampler::DomainState>) -> Result<Draw> {
        let scfg = data::SamplerConfig { seed: r.ctx.run.seed.wrapping_add(r.index as u64), shuffle: true, num_epochs: None, drop_last: false };
        let Some(dcfg) = &r.s.domain_sampling else {
            let mut smp = data::Sampler::single(pool.len(), scfg)?;
            if let Some(x) = plain {
                smp.restore(x)?;
            }
            return Ok(Draw::Plain(smp));
        };
        let problems = r.problems;
        let mut names: Vec<String> = pool.iter().map(|&i| problems[i].domain.clone().unwrap_or_default()).collect();
        names.sort();
        names.dedup();
        let members: Vec<Vec<usize>> = names.iter().map(|n| pool.iter().copied().filter(|&i| problems[i].domain.as_deref().unwrap_or("") == n).collect()).collect();
        let mut ds = data::sampler::DomainSampler::new(names.iter().cloned().zip(members.iter().map(|m| m.len())).collect(), dcfg.clone(), scfg, 0, 1)?;
        if let Some(x) = domain {
            ds.restore(x)?;
        }
        eprintln!("[{}] domain-aware sampling over {} domains: {}", r.name, names.len(), names.join(", "));
        Ok(Draw::Domain { sampler: ds, members, names })
    }

    /// Its state, for the stage's checkpoint state.
    pub fn save(&self, plain: &mut Option<data::SamplerState>, domain: &mut Option<data::sampler::DomainState>) {
        match self {
            Draw::Plain(s) => *plain = Some(s.state()),
            Draw::Domain { sampler, .. } => *domain = Some(sampler.state()),
        }
    }

    fn next(&mut self, n: usize, pool: &[usize]) -> Vec<usize> {
        match self {
            Draw::Plain(s) => s.next_batch(n).into_iter().map(|i| pool[i]).collect(),
            Draw::Domain { sampler, members, .. } => (0..n).filter_map(|_| sampler.next_item()).map(|(d, i)| members[d][i]).collect(),
        }
    }
}

/// The stage's problems, prompts rendered and tokenized; and how many were dropped as longer than
/// `max_prompt_length`.
pub fn load_problems(ctx: &Ctx, s: &GrpoStage) -> Result<(Vec<Problem>, usize)> {
    let records = match (&s.data, &s.synthetic) {
        (Some(d), _) => data::load_records(d).with_context(|| format!("loading {}", d.path.display()))?,
        (None, Some(spec)) => spec.generator()?.prompt_answer(spec.start, spec.count),
        (None, None) => bail!("the stage has no data"),
    };
    let (mut out, mut too_long) = (vec![], 0);
    for (i, r) in records.iter().enumerate() {
        let Record::PromptAnswer { prompt, answer, id, domain, .. } = r else {
            bail!("row {}: a GRPO stage needs prompts with gold answers (prompt + answer columns)", i + 1);
        };
        let ids = generate::prompt_ids(&ctx.tok, ctx.template.as_ref(), prompt)?;
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


/// What generating for the stage needs: its table, the model being trained, the reward set and the problems.
pub struct Rollouts<'a> {
    pub ctx: &'a Ctx,
    pub index: usize,
    pub name: &'a str,
    pub s: &'a GrpoStage,
    pub model: &'a Model,
    pub rewards: &'a rewards::RewardSet,
    pub problems: &'a [Problem],
}

/// What a step's generation rounds produced.
#[derive(Default)]
pub struct StepSamples {
    /// This rank's kept groups, in draw order.
    pub groups: Vec<Group>,
    /// (reward, correct, length, truncated) of every completion generated in the step, on every rank.
    pub stats: Vec<(f64, bool, usize, bool)>,
    /// Groups generated, and those of them whose rewards were all equal.
    pub generated_groups: usize,
    pub zero_var_groups: usize,
    /// Groups dropped for equal rewards (dynamic sampling) and over the token budget.
    pub dropped_zero: u64,
    pub dropped_budget: u64,
    pub rounds: usize,
    /// Seconds generating and scoring.
    pub t_gen: f64,
    pub t_score: f64,
}

impl Rollouts<'_> {
    /// `n` completions for each problem of `which` (at index `first` of the round's draw) at `temperature`,
    /// scored; and the seconds spent scoring.
    fn rollout(&self, which: &[usize], n: usize, temperature: f64, seed: u64, first: usize) -> Result<(Vec<Group>, f64)> {
        let (ctx, s, problems) = (self.ctx, self.s, self.problems);
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
        let done = generate::generate_at(ctx, &self.model.net, &prompts, n, &params, seed, first)?;
        let stop = generate::stop_ids(&ctx.tok);
        let mut samples = Vec::with_capacity(done.len());
        for c in &done {
            let p = &problems[which[c.request_index]];
            samples.push(rewards::Sample {
                prompt: p.text.clone(),
                completion: generate::completion_text(&ctx.tok, &c.token_ids, &stop)?,
                gold: Some(p.answer.clone()),
                completion_tokens: c.token_ids.len(),
                max_tokens: s.max_completion_length,
                truncated: c.finish_reason == rollout::FinishReason::Length,
                row: p.row.clone(),
            });
        }
        let t_score = Instant::now();
        let scores = self.rewards.score_batch(&samples)?;
        let t_score = t_score.elapsed().as_secs_f64();
        let mut groups: Vec<Group> = which.iter().map(|&i| Group { problem: i, done: vec![] }).collect();
        for (k, c) in done.into_iter().enumerate() {
            groups[c.request_index].done.push(Sampled {
                ids: c.token_ids,
                reward: scores.total[k].unwrap_or(0.0),
                correct: scores.correct[k].unwrap_or(false),
                truncated: samples[k].truncated,
                logprobs: c.logprobs_sampled,
            });
        }
        Ok((groups, t_score))
    }

    /// The step's batch: generation rounds of `prompts_per_step` prompts drawn from `pool` until dynamic
    /// sampling or the token budget is satisfied (or the round cap is hit).
    pub fn step(&self, draw: &mut Draw, pool: &[usize], step: usize, temperature: f64) -> Result<StepSamples> {
        let s = self.s;
        let cap = s.dynamic_sampling.as_ref().map(|d| d.max_gen_batches).unwrap_or(if s.tokens_per_step.is_some() { 3 } else { 1 }).max(1);
        let mut out = StepSamples::default();
        let mut gen_tokens = 0usize;
        let mut kept_mine: Vec<bool> = vec![]; // every kept group of the step (all ranks), in order: is it this rank's?
        loop {
            let which = draw.next(s.prompts_per_step, pool);
            if which.is_empty() {
                break;
            }
            let (all, mine, got) = self.round(&which, step, temperature, &mut out)?;
            let mut own = got.into_iter();
            for (k, sm) in all.iter().enumerate() {
                let gr = if mine.contains(&k) { own.next() } else { None };
                if let (Draw::Domain { sampler, names, .. }, Some(d)) = (&mut *draw, &self.problems[sm.problem].domain) {
                    if let Some(di) = names.iter().position(|n| n == d) {
                        sampler.update(di, &sm.rewards)?;
                    }
                }
                out.zero_var_groups += sm.zero_var as usize;
                if sm.zero_var && s.dynamic_sampling.is_some() {
                    out.dropped_zero += 1;
                    continue;
                }
                if let Some(budget) = s.tokens_per_step {
                    if gen_tokens >= budget {
                        out.dropped_budget += 1;
                        continue;
                    }
                }
                gen_tokens += sm.tokens;
                kept_mine.push(gr.is_some());
                out.groups.extend(gr);
            }
            let full = match (s.tokens_per_step, &s.dynamic_sampling) {
                (Some(b), _) => gen_tokens >= b,
                (None, Some(_)) => kept_mine.len() >= s.prompts_per_step,
                (None, None) => true,
            };
            if full {
                break;
            }
            if out.rounds >= cap {
                if let Some(DynamicSampling { on_cap: OnCap::Error, max_gen_batches }) = &s.dynamic_sampling {
                    bail!(
                        "[{}] step {}: dynamic sampling kept {} of {} groups after max_gen_batches = {max_gen_batches} rounds \
                         (all others had equal rewards); raise max_gen_batches, use a harder/easier dataset, or on_cap = \"train\"",
                        self.name,
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
            out.groups.truncate(kept_mine.iter().take(s.prompts_per_step).filter(|&&m| m).count());
        }
        // data parallel: every rank's samples for the metrics
        out.stats = data_parallel::gather_concat(self.ctx, std::mem::take(&mut out.stats))?;
        Ok(out)
    }

    /// One generation round over the drawn problems `which`: this rank's share generated, scored and balanced;
    /// returns every rank's group summaries (draw order), the indices of this rank's, and this rank's groups.
    fn round(&self, which: &[usize], step: usize, temperature: f64, out: &mut StepSamples) -> Result<(Vec<GroupSummary>, std::ops::Range<usize>, Vec<Group>)> {
        let (ctx, s) = (self.ctx, self.s);
        let g = s.num_generations;
        // data parallel: this rank's prompts (whole groups), at their index in the step's draw
        let (which, first) = data_parallel::shard_at(ctx, which.to_vec());
        let tg = Instant::now();
        let n = s.oversample_generations.unwrap_or(g);
        let (mut got, ts) = self.rollout(&which, n, temperature, round_seed(ctx.run.seed, self.index, step, out.rounds), first)?;
        out.t_gen += tg.elapsed().as_secs_f64() - ts;
        out.t_score += ts;
        out.rounds += 1;
        // each group's summary: its problem, rewards before balancing (domain sampling learns from every
        // sample), and after balancing whether its rewards are all equal and how many tokens it holds
        let mut summaries = Vec::with_capacity(got.len());
        for gr in &mut got {
            for x in &gr.done {
                out.stats.push((x.reward, x.correct, x.ids.len(), x.truncated));
            }
            let rewards: Vec<f64> = gr.done.iter().map(|x| x.reward).collect();
            balance(gr, g);
            let tokens = gr.done.iter().map(|x| x.ids.len()).sum::<usize>();
            summaries.push(GroupSummary { problem: gr.problem, rewards, zero_var: zero_variance(gr), tokens });
        }
        // data parallel: every rank's groups of the round in draw order, so that every rank takes the same
        // decisions (domain weights, which groups to keep, whether to draw again); each keeps its own
        let (all, mine) = data_parallel::gather_indexed(ctx, summaries)?;
        out.generated_groups += all.len();
        Ok((all, mine, got))
    }

    /// The prefilter's pilot pass with the starting policy: the problems it keeps (see [`Prefilter`]).
    pub fn prefilter(&self, f: &Prefilter) -> Result<Vec<usize>> {
        let (ctx, s, problems) = (self.ctx, self.s, self.problems);
        let all: Vec<usize> = (0..problems.len()).collect();
        let mut kept = vec![];
        let (mut easy, mut hard, mut uneven) = (0, 0, 0);
        for (round, chunk) in all.chunks(64).enumerate() {
            // data parallel: each rank pilots its share of the chunk (seeded as in the whole chunk); all gather
            let share = data_parallel::share_range(ctx, chunk.len());
            let seed = round_seed(ctx.run.seed, self.index, usize::MAX, round);
            let (groups, _) = self.rollout(&chunk[share.clone()], f.samples, s.temperature, seed, share.start)?;
            let verdicts: Vec<(usize, Pilot)> = groups.iter().map(|g| (g.problem, Pilot::of(g, f))).collect();
            for (problem, v) in data_parallel::gather_concat(ctx, verdicts)? {
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
                self.name,
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
}

/// A prefilter verdict on one prompt.
#[derive(Serialize, Deserialize)]
enum Pilot {
    Kept,
    Hard,
    Easy,
    Uneven,
}

impl Pilot {
    /// The verdict on a group of pilot completions: its pass rate against the band, then its lengths' spread.
    fn of(g: &Group, f: &Prefilter) -> Pilot {
        let rate = g.done.iter().filter(|x| x.correct).count() as f64 / g.done.len() as f64;
        let lens: Vec<f64> = g.done.iter().map(|x| x.ids.len() as f64).collect();
        let mean = lens.iter().sum::<f64>() / lens.len() as f64;
        let cv = (lens.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / lens.len() as f64).sqrt() / mean.max(1.0);
        if rate < f.min_pass_rate {
            Pilot::Hard
        } else if rate > f.max_pass_rate {
            Pilot::Easy
        } else if f.max_length_cv.is_some_and(|m| cv > m) {
            Pilot::Uneven
        } else {
            Pilot::Kept
        }
    }
}

/// Keeps `g` of a group's completions, balanced between rewards above and at-or-below the group mean
/// (Phi-4-mini's oversample-then-balance): alternately one from each side, in generation order.
pub fn balance(group: &mut Group, g: usize) {
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

/// Whether every completion of the group has the same reward (no gradient: every advantage is 0).
fn zero_variance(g: &Group) -> bool {
    g.done.windows(2).all(|w| w[0].reward == w[1].reward)
}

/// Seed of a generation round: a pure function of the run seed, stage, step and round.
pub fn round_seed(run_seed: u64, stage: usize, step: usize, round: usize) -> u64 {
    let mut x = run_seed ^ 0x9E37_79B9_7F4A_7C15;
    for v in [stage as u64, step as u64, round as u64] {
        x = (x ^ v).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 31;
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampled(r: f64) -> Sampled {
        Sampled { ids: vec![1], reward: r, correct: r > 0.0, truncated: false, logprobs: vec![0.0] }
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
    fn round_seeds_differ_by_step_and_round() {
        let a = round_seed(0, 1, 2, 0);
        assert_ne!(a, round_seed(0, 1, 3, 0));
        assert_ne!(a, round_seed(0, 1, 2, 1));
        assert_eq!(a, round_seed(0, 1, 2, 0));
    }
}
