//! The learning side of a GRPO step: the kept groups become training rows; the reference's and the sampling
//! policy's log-probabilities are computed (for KL, in the loss or in the reward, and as π_old when μ > 1);
//! advantages come from the whole step's rewards (every rank's); then μ passes of the clipped policy-gradient
//! loss of `algo::policy_gradient`, one optimizer step each.

use anyhow::Result;
use model::Model;
use tch::{Kind, Tensor};

use super::config::GrpoStage;
use super::sampling::{Group, Problem};
use crate::algo::logprobs::{self, MicroRows, Row, IGNORE};
use crate::algo::policy_gradient::{self as pg, AggDenoms, ClipCfg, KlEstimator, LossAgg, PolicyLoss};
use crate::algo::rollout_correction::{self as rc, Correction, CorrectionMode};
use crate::observe::progress::Bar;
use crate::training::optim::AdamW;
use crate::training::{data_parallel, step, Ctx, OptimArgs};

/// A step's training rows with what the loss compares them against.
pub struct Scored {
    pub rows: Vec<Row>,
    micro: Vec<MicroRows>,
    /// This rank's advantages, one per row.
    advs: Vec<f64>,
    /// The reference's log-probabilities per micro-batch (with a KL term).
    ref_lp: Option<Vec<Tensor>>,
    /// The sampling policy's (π_old, when μ > 1).
    old_lp: Option<Vec<Tensor>>,
    /// The sampler's log-probabilities of the sampled tokens, on the same grid.
    sampler_lp: Vec<Tensor>,
    /// Mean KL (k1, summed over the completion) put into the rewards, over the step's rows.
    pub kl_reward: f64,
}

/// Scores the step's groups: training rows, log-probabilities, KL in the reward when asked, and the
/// advantages over the whole step's rewards (every rank's, in rank order; this rank keeps its own).
pub fn score(ctx: &Ctx, s: &GrpoStage, model: &Model, reference: Option<&Model>, problems: &[Problem], groups: &[Group], temperature: f64) -> Result<Scored> {
    // ZeRO-3: log-probabilities without gradients on whole weights (every rank, even one without rows)
    crate::training::sharding::ensure_whole(ctx)?;
    let chunk = s.loss_chunk as i64;
    let mut rewards_flat: Vec<f64> = groups.iter().flat_map(|gr| gr.done.iter().map(|x| x.reward)).collect();
    let (rows, group_of) = rows_of(groups, problems, s.mask_truncated_completions);
    let micro = micro_batches(&model.net, &rows, &group_of, s, ctx.tok.pad_id as i64);
    let sampler_lp = sampler_grids(groups, problems, s.micro_batch_size, model.net.device());
    let ref_lp = match reference {
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
            let per_row = Vec::<f64>::try_from(pg::kl(c, r, KlEstimator::K1).sum_dim_intlist(1, false, Kind::Double)).unwrap();
            for v in per_row {
                rewards_flat[k] -= s.kl_coef * v;
                kl_reward += v;
                k += 1;
            }
        }
    }
    let mut kl_rows = [kl_reward, rows.len() as f64];
    data_parallel::sum(ctx, &mut kl_rows)?;
    kl_reward = kl_rows[0] / kl_rows[1].max(1.0);
    let (rewards_flat, mine) = data_parallel::gather_f64(ctx, &rewards_flat)?;
    // every group holds exactly G completions (balance() keeps G of an oversampled group)
    let advs = if rewards_flat.is_empty() { vec![] } else { pg::advantages(&rewards_flat, s.num_generations, s.adv_estimator, s.scale_rewards, 1e-4) };
    let advs = advs.get(mine).map(<[f64]>::to_vec).unwrap_or_default();
    let old_lp = cur_lp.filter(|_| s.num_iterations > 1);
    Ok(Scored { rows, micro, advs, ref_lp, old_lp, sampler_lp, kl_reward })
}

/// What the policy update did (sums over the step's tokens, over the ranks, from its first pass).
#[derive(Default)]
pub struct Update {
    pub loss: f64,
    pub clipped: f64,
    pub kl: f64,
    pub entropy: f64,
    pub grad_norm: f64,
    /// Every optimizer step of the update was taken (none skipped for a non-finite gradient).
    pub stepped: bool,
    /// No row carried a loss token: no update at all.
    pub empty: bool,
    /// Loss tokens, trainable sequences and groups of the step (all ranks).
    pub tokens: f64,
    pub groups: f64,
    /// Tokens through the network per pass (prompt sharing lowers it).
    pub forward_tokens: usize,
    /// The sampler/trainer mismatch (sums over the loss tokens; the largest token ratio) and what the corrections
    /// changed: tokens truncated or masked by `rollout_correction`, sequences masked as off-policy.
    pub mismatch_abs: f64,
    pub mismatch_k3: f64,
    pub mismatch_max: f64,
    pub corrected: f64,
    pub off_policy_masked: f64,
    /// Sequences carrying a loss (all ranks).
    pub seqs: f64,
}

/// The optimizer and what one step of it needs.
pub struct Stepper<'a> {
    pub opt: &'a mut AdamW,
    pub optim: &'a OptimArgs,
    pub bar: &'a Bar,
    pub name: &'a str,
}

/// μ passes of the clipped policy-gradient loss over the scored rows, one optimizer step at `lr` each.
#[allow(clippy::too_many_arguments)]
pub fn update(ctx: &Ctx, s: &GrpoStage, model: &Model, sc: &Scored, groups: usize, temperature: f64, lr: f64, step: usize, o: Stepper) -> Result<Update> {
    let mut counts = [
        sc.rows.iter().map(|r| r.labels.iter().filter(|&&x| x != IGNORE).count() as f64).sum(),
        sc.rows.iter().filter(|r| r.labels.iter().any(|&x| x != IGNORE)).count() as f64,
        groups as f64,
    ];
    data_parallel::sum(ctx, &mut counts)?; // the global denominators of the loss aggregation
    let [n_tok, n_seq, n_groups] = counts;
    let mut u = Update { stepped: true, tokens: n_tok, groups: n_groups, seqs: n_seq, empty: n_tok == 0.0, ..Default::default() };
    let lcfg = LossCfg {
        clip: s.clip(),
        agg: s.loss_agg_mode,
        denoms: AggDenoms { tokens: n_tok, seqs: n_seq, norm: s.max_completion_length as f64 },
        kl: sc.ref_lp.as_ref().map(|_| (s.kl_coef, s.kl_estimator, s.kl_in_reward)),
        entropy_coeff: s.entropy_coeff,
        temperature,
        chunk: s.loss_chunk as i64,
        policy: s.policy_loss,
        sapo_tau: (s.sapo_tau_pos, s.sapo_tau_neg),
        correction: s.rollout_correction.settings(),
        off_policy_delta: s.off_policy_mask_threshold,
        unbiased_kl: s.use_bias_correction_kl,
    };
    if !u.empty {
        for it in 0..s.num_iterations {
            let mut acc = data_parallel::Accum::new(ctx, o.opt, sc.micro.len())?;
            for ((mi, mr), a) in sc.micro.iter().enumerate().zip(sc.advs.chunks(s.micro_batch_size)) {
                acc.next()?;
                let old = sc.old_lp.as_ref().map(|o| &o[mi]);
                let rf = sc.ref_lp.as_ref().map(|r| &r[mi]);
                let st = micro_step(&model.net, mr, a, LogProbs { old, reference: rf, sampler: &sc.sampler_lp[mi] }, &lcfg);
                if it == 0 {
                    u.forward_tokens += mr.tokens();
                    u.loss += st.loss;
                    u.clipped += st.clipped;
                    u.kl += st.kl;
                    u.entropy += st.entropy;
                    u.mismatch_abs += st.mismatch_abs;
                    u.mismatch_k3 += st.mismatch_k3;
                    u.mismatch_max = u.mismatch_max.max(st.mismatch_max);
                    u.corrected += st.corrected;
                    u.off_policy_masked += st.off_policy_masked;
                }
            }
            acc.finish()?;
            let (norm, took) = step::optimizer_step(ctx, o.name, o.opt, o.optim, lr, step + 1, o.bar)?;
            u.grad_norm = norm;
            u.stepped &= took;
        }
    }
    let mut sums = [u.loss, u.clipped, u.kl, u.entropy, u.mismatch_abs, u.mismatch_k3, u.corrected, u.off_policy_masked];
    data_parallel::sum(ctx, &mut sums)?;
    [u.loss, u.clipped, u.kl, u.entropy, u.mismatch_abs, u.mismatch_k3, u.corrected, u.off_policy_masked] = sums;
    u.mismatch_max = data_parallel::gather_f64(ctx, &[u.mismatch_max])?.0.into_iter().fold(0.0, f64::max);
    Ok(u)
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
            let mut labels = vec![IGNORE; p.len()];
            if mask_truncated && c.truncated {
                labels.extend(std::iter::repeat_n(IGNORE, c.ids.len()));
            } else {
                labels.extend(&c.ids);
            }
            rows.push(Row { ids, labels, pos: None });
            group_of.push(gi);
        }
    }
    (rows, group_of)
}

/// The sampler's log-probabilities of the completion tokens, per micro-batch on the grid the trainer's come back
/// on (`[rows, longest row − 1]`: column j holds the token at position j + 1), in the order of [`rows_of`].
fn sampler_grids(groups: &[Group], problems: &[Problem], micro: usize, device: tch::Device) -> Vec<Tensor> {
    // (prompt length, the sampler's log-probs of the completion's tokens) per row
    let rows: Vec<(usize, &[f32])> = groups.iter().flat_map(|g| g.done.iter().map(move |c| (problems[g.problem].ids.len(), c.logprobs.as_slice()))).collect();
    rows.chunks(micro)
        .map(|chunk| {
            let t1 = chunk.iter().map(|(prompt, lps)| prompt + lps.len()).max().unwrap_or(1).max(1) - 1;
            let mut grid = vec![0f32; chunk.len() * t1];
            for (i, (prompt, lps)) in chunk.iter().enumerate() {
                for (j, &v) in lps.iter().enumerate() {
                    grid[i * t1 + prompt + j - 1] = v;
                }
            }
            Tensor::from_slice(&grid).view([chunk.len() as i64, t1 as i64]).to_device(device)
        })
        .collect()
}

/// The step's rows as micro-batches of `s.micro_batch_size`, each in the layout `s.prompt_sharing` picks
/// (`group`: each row's group), built once for every pass over them (reference, old policy, μ updates).
fn micro_batches(net: &model::Transformer, rows: &[Row], group: &[usize], s: &GrpoStage, pad: i64) -> Vec<MicroRows> {
    rows.chunks(s.micro_batch_size)
        .zip(group.chunks(s.micro_batch_size))
        .map(|(m, gr)| {
            let refs: Vec<(&[i64], &[i64])> = m.iter().map(|r| (r.ids.as_slice(), r.labels.as_slice())).collect();
            MicroRows::new(net, &refs, gr, pad, s.prompt_sharing)
        })
        .collect()
}

/// Per-token log-probabilities of micro-batches under `model` (no gradients).
fn logprobs_of(model: &Model, micro: &[MicroRows], chunk: i64, temperature: f64) -> Vec<Tensor> {
    micro.iter().map(|mr| mr.with(|x| logprobs::token_logprobs_of(&model.net, x, chunk, temperature, false).0)).collect()
}

/// A frozen copy of the model (the KL reference).
pub fn frozen_copy(model: &Model) -> Model {
    let kind = model.net.params.tensors()[0].kind();
    let net = model::Transformer::build(&model.net.cfg, kind, model.net.device(), model::Fill::Empty);
    tch::no_grad(|| {
        for ((_, dst), (_, src)) in net.params.iter().zip(model.net.params.iter()) {
            dst.shallow_clone().copy_(src);
        }
    });
    Model { net, source_dir: model.source_dir.clone() }
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
    policy: PolicyLoss,
    /// SAPO's (τ_pos, τ_neg).
    sapo_tau: (f64, f64),
    correction: Correction,
    /// DeepSeek-V3.2's off-policy masking δ.
    off_policy_delta: Option<f64>,
    /// DeepSeek-V3.2's unbiased KL estimate.
    unbiased_kl: bool,
}

/// The log-probabilities a micro-batch's loss compares against: the sampling policy's as the trainer computes
/// them (None: the current ones, detached, i.e. μ = 1), the reference's (with a KL term), the sampler's.
struct LogProbs<'a> {
    old: Option<&'a Tensor>,
    reference: Option<&'a Tensor>,
    sampler: &'a Tensor,
}

/// Sums over a micro-batch's tokens, for metrics.
#[derive(Default)]
struct MicroStats {
    loss: f64,
    clipped: f64,
    kl: f64,
    entropy: f64,
    mismatch_abs: f64,
    mismatch_k3: f64,
    mismatch_max: f64,
    corrected: f64,
    off_policy_masked: f64,
}

/// Forward and backward of one micro-batch of the policy-gradient loss (gradients accumulate in the parameters):
/// the policy loss `c.policy` on the importance ratios against the sampling policy, weighted by the rollout
/// correction and the off-policy mask, plus the KL and entropy terms, aggregated as `c.agg` says.
fn micro_step(net: &model::Transformer, m: &MicroRows, advs: &[f64], lps: LogProbs, c: &LossCfg) -> MicroStats {
    let dev = net.device();
    let labels = &m.labels;
    let adv_t = Tensor::from_slice(advs).to_device(dev);
    let mut st = MicroStats::default();
    let sum = |t: &Tensor| f64::try_from(t.sum(Kind::Double)).unwrap_or(0.0);
    let (l, _, _) = m.with(|rows| logprobs::logprob_backward(net, rows, c.chunk, c.temperature, true, |lp, ent| {
        let mask = labels.narrow(1, 1, labels.size()[1] - 1).ne(IGNORE).to_device(dev).to_kind(lp.kind());
        let old = lps.old.map(|o| o.shallow_clone()).unwrap_or_else(|| lp.detach());
        let sampler = lps.sampler.to_kind(lp.kind());
        let adv = adv_t.to_kind(lp.kind());
        (st.mismatch_abs, st.mismatch_k3, st.mismatch_max) = rc::mismatch(&old, &sampler, &mask);
        let (mut per_tok, clipped) = policy_loss(lp, &old, &mask, &adv, c);
        st.clipped = sum(&(&clipped * &mask));
        if c.correction.mode != CorrectionMode::None {
            let (w, changed) = rc::weights(&old, &sampler, &mask, &c.correction);
            st.corrected = sum(&changed);
            per_tok = per_tok * w;
        }
        if let Some(delta) = c.off_policy_delta {
            let keep = pg::off_policy_sequence_mask(lp, &sampler, &mask, &adv, delta);
            st.off_policy_masked = sum(&(keep.ones_like() - &keep));
            per_tok = per_tok * keep;
        }
        if let (Some(r), Some((coef, est, in_reward))) = (lps.reference, c.kl) {
            let k = if c.unbiased_kl { pg::kl_unbiased(lp, &old, r) } else { pg::kl(lp, r, est) };
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
        pg::aggregate(&per_tok, &mask, c.agg, c.denoms)
    }));
    st.loss = l;
    st
}

/// The per-token policy loss of `c.policy` and the indicator of tokens its clipping touched.
fn policy_loss(lp: &Tensor, old: &Tensor, mask: &Tensor, adv: &Tensor, c: &LossCfg) -> (Tensor, Tensor) {
    let ratio = pg::ratios(lp, old, mask, c.clip.level);
    match c.policy {
        PolicyLoss::Vanilla => pg::clipped_pg(&ratio, adv, &c.clip),
        PolicyLoss::Cispo => pg::cispo(lp, &ratio, adv, c.clip.eps_high),
        PolicyLoss::Sapo => (pg::sapo(&ratio, adv, c.sapo_tau.0, c.sapo_tau.1), ratio.zeros_like()),
        PolicyLoss::Gmpo => pg::gmpo(lp, old, mask, adv, c.clip.eps_low, c.clip.eps_high),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algo::policy_gradient::RatioLevel;
    use serde_json::json;

    /// Updates with each policy loss (the clipped surrogate, CISPO, SAPO, GMPO) raise the log-probability of a
    /// completion with a positive advantage and lower that of one with a negative advantage; the sampler's
    /// log-probabilities (here the model's own, so no mismatch) leave the loss as it is under every correction.
    #[test]
    fn an_update_moves_log_probs_in_the_direction_of_the_advantage() {
        model::runtime::preload_cuda();
        let cfg = model::ModelConfig::from_json(
            json!({"model_type": "llama", "vocab_size": 40, "hidden_size": 32, "intermediate_size": 64,
                "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": true}),
            "test",
        )
        .unwrap();
        let args = crate::training::OptimArgs {
            lr: 1e-2,
            schedule: crate::training::optim::Schedule::Constant,
            warmup_steps: Some(0),
            warmup_ratio: 0.0,
            min_lr_ratio: 0.0,
            adam: crate::training::optim::AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 },
            max_grad_norm: 0.0,
        };
        let prompt = vec![3i64, 4, 5];
        let mk = |c: &[i64]| {
            let mut ids = prompt.clone();
            ids.extend(c);
            let mut labels = vec![IGNORE; 3];
            labels.extend(c);
            Row { ids, labels, pos: None }
        };
        let rows = vec![mk(&[7, 8, 9]), mk(&[10, 11])];
        let advs = [1.0, -1.0];
        let st: GrpoStage = toml::from_str("synthetic = { count = 1 }\nprompt_sharing = \"always\"").unwrap();
        let lps_of = |m: &Model| logprobs_of(m, &micro_batches(&m.net, &rows, &[0, 0], &st, 0), 64, 1.0).remove(0);
        let seq_lp = |m: &Model| -> Vec<f64> { Vec::<f64>::try_from(lps_of(m).sum_dim_intlist(1, false, Kind::Double)).unwrap() };
        for (policy, mode) in [(PolicyLoss::Vanilla, CorrectionMode::None), (PolicyLoss::Cispo, CorrectionMode::Tis), (PolicyLoss::Sapo, CorrectionMode::Mis), (PolicyLoss::Gmpo, CorrectionMode::Mis)] {
            let model = Model::random(&cfg, Kind::Float, tch::Device::Cpu, 1);
            let mut opt = args.optimizer_with(&model, Default::default());
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
                    policy,
                    sapo_tau: (1.0, 1.05),
                    correction: Correction { mode, level: rc::CorrectionLevel::Sequence, cap: 3.0, band: None },
                    off_policy_delta: Some(0.5),
                    unbiased_kl: false,
                };
                let sampler = lps_of(&model).detach();
                let mr = &micro_batches(&model.net, &rows, &[0, 0], &st, 0)[0];
                let st = micro_step(&model.net, mr, &advs, LogProbs { old: None, reference: None, sampler: &sampler }, &c);
                assert!(st.loss.is_finite() && st.entropy > 0.0);
                assert!(st.mismatch_abs < 1e-4 && st.corrected == 0.0 && st.off_policy_masked == 0.0, "{policy:?}: {} {}", st.mismatch_abs, st.corrected);
                opt.step(args.lr);
                opt.zero_grad();
            }
            let after = seq_lp(&model);
            assert!(after[0] > before[0] + 0.1, "{policy:?}, positive advantage: {} -> {}", before[0], after[0]);
            assert!(after[1] < before[1] - 0.1, "{policy:?}, negative advantage: {} -> {}", before[1], after[1]);
        }
    }
}
