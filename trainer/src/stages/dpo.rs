//! The DPO stage: preference pairs (prompt, chosen, rejected) trained with one of the pairwise losses of
//! `algo::preference` (sigmoid / cDPO, IPO, hinge), plus `rpo_alpha` × the token-mean NLL of the chosen
//! replies (RPO, Pang et al. 2024, arXiv 2404.19733) when asked.
//!
//! The reference log-probabilities come from the stage's starting model, computed once before the first
//! update and cached under `OUTPUT/cache/` (keyed by the tokenized pairs and the weights), so that no second
//! model is held in memory and a resumed or repeated run reuses them. The cache's key is the state this stage
//! adds to its checkpoints.
//!
//! The DPO loop here ([`train`]) also trains Rollout-DPO's pairs (`super::rollout_dpo`); both tables are
//! declared through [`dpo_stage!`].

use anyhow::{bail, Context, Result};
use data::{DataConfig, Record, Sampler, SamplerConfig, TokenizeConfig};
use model::Model;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

use crate::algo::logprobs::{self, MicroRows, PromptSharing, IGNORE};
use crate::algo::preference::{pair_losses, LossType, PairLoss};
use crate::observe::metrics::obj;
use crate::observe::progress::Bar;
use crate::settings::SyntheticSpec;
use crate::training::checkpoint::Checkpoint;
use crate::training::memory::StageShape;
use crate::training::{data_parallel, models, step, Ctx, Health, HeldOut, Progress, TrainingKeys};

/// Declares a DPO stage's table: the given fields, the DPO keys both kinds share (tokenize, beta, loss_type,
/// label_smoothing, rpo_alpha, length_normalize, batch_size, grad_accum, epochs), and through
/// [`crate::training::training_stage!`] the keys of every trained stage; plus `args()`.
macro_rules! dpo_stage {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fm:meta])* pub $f:ident : $t:ty),* $(,)? }) => {
        crate::training::training_stage! {
            $(#[$meta])*
            pub struct $name {
                $($(#[$fm])* pub $f: $t,)*
                /// Tokenization (max_length applies to prompt + reply).
                #[serde(default)]
                pub tokenize: data::TokenizeConfig,
                /// β: strength of the implicit KL regularisation (IPO's τ).
                #[serde(default = "crate::stages::dpo::default_beta")]
                pub beta: f64,
                /// sigmoid (DPO), ipo or hinge.
                #[serde(default)]
                pub loss_type: crate::algo::preference::LossType,
                /// cDPO label smoothing ε in [0, 0.5) (sigmoid only).
                #[serde(default)]
                pub label_smoothing: f64,
                /// Weight α of the chosen replies' token-mean NLL added to the loss (RPO; 0: off).
                #[serde(default)]
                pub rpo_alpha: f64,
                /// Average log-probabilities per token instead of summing them (always on for IPO).
                #[serde(default)]
                pub length_normalize: bool,
                /// Pairs per micro-batch.
                #[serde(default = "crate::stages::dpo::default_batch", alias = "per_device_train_batch_size")]
                pub batch_size: usize,
                /// Micro-batches per optimizer step.
                #[serde(default = "crate::stages::dpo::one", alias = "gradient_accumulation_steps")]
                pub grad_accum: usize,
                /// Passes over the pairs (used when `max_steps` is not set).
                #[serde(default = "crate::stages::dpo::default_epochs", alias = "num_train_epochs")]
                pub epochs: f64,
                /// Run a pair's shared prompt once for both answers ("auto": when that costs fewer FLOPs,
                /// "always", "never"); the result is the same up to float rounding.
                #[serde(default)]
                pub prompt_sharing: crate::algo::logprobs::PromptSharing,
            }
        }

        impl crate::stages::dpo::DpoTable for $name {
            fn tokenize(&self) -> &data::TokenizeConfig {
                &self.tokenize
            }
            fn args(&self) -> crate::stages::dpo::DpoArgs {
                crate::stages::dpo::DpoArgs {
                    beta: self.beta,
                    loss_type: self.loss_type,
                    label_smoothing: self.label_smoothing,
                    rpo_alpha: self.rpo_alpha,
                    length_normalize: self.length_normalize,
                    batch_size: self.batch_size,
                    grad_accum: self.grad_accum,
                    epochs: self.epochs,
                    max_steps: self.max_steps,
                    loss_chunk: self.loss_chunk,
                    prompt_sharing: self.prompt_sharing,
                }
            }
        }
    };
}
pub(crate) use dpo_stage;

dpo_stage! {
    /// `kind = "dpo"`.
    pub struct DpoStage {
        /// Peak learning rate (TRL's default 1e-6; Phi-4-mini used 5e-7).
        #[serde(default = "default_lr", alias = "learning_rate")]
        pub lr: f64,
        /// Preference pairs from a dataset (`prompt`, `chosen`, `rejected` columns; strings or messages).
        #[serde(default)]
        pub data: Option<DataConfig>,
        /// Synthetic arithmetic preference pairs (correct answer chosen, a near miss rejected).
        #[serde(default)]
        pub synthetic: Option<SyntheticSpec>,
    }
}

pub(crate) fn default_beta() -> f64 {
    0.1
}
pub(crate) fn default_batch() -> usize {
    8
}
pub(crate) fn one() -> usize {
    1
}
pub(crate) fn default_epochs() -> f64 {
    1.0
}
fn default_lr() -> f64 {
    1e-6
}

/// What the DPO loop reads of a stage's table (both kinds' tables, through [`dpo_stage!`]).
pub trait DpoTable: TrainingKeys {
    /// `tokenize`.
    fn tokenize(&self) -> &TokenizeConfig;
    /// The DPO keys.
    fn args(&self) -> DpoArgs;
}

/// The DPO keys both stage kinds share.
#[derive(Debug, Clone)]
pub struct DpoArgs {
    pub beta: f64,
    pub loss_type: LossType,
    pub label_smoothing: f64,
    pub rpo_alpha: f64,
    pub length_normalize: bool,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub epochs: f64,
    pub max_steps: Option<usize>,
    pub loss_chunk: usize,
    pub prompt_sharing: PromptSharing,
}

impl DpoArgs {
    /// Whether sequence log-probabilities are per-token means (IPO always).
    pub fn averaged(&self) -> bool {
        self.length_normalize || self.loss_type == LossType::Ipo
    }

    /// The pairwise loss.
    pub fn pair_loss(&self) -> PairLoss {
        PairLoss { kind: self.loss_type, beta: self.beta, label_smoothing: self.label_smoothing }
    }

    pub fn validate(&self, at: &str, p: &mut Vec<String>) {
        if !(self.beta > 0.0 && self.beta.is_finite()) {
            p.push(format!("{at}: beta must be a positive number, got {}", self.beta));
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            p.push(format!("{at}: label_smoothing must be in [0, 0.5), got {}", self.label_smoothing));
        }
        if self.label_smoothing > 0.0 && self.loss_type != LossType::Sigmoid {
            p.push(format!("{at}: label_smoothing applies to loss_type = \"sigmoid\" only"));
        }
        if !(self.rpo_alpha >= 0.0 && self.rpo_alpha.is_finite()) {
            p.push(format!("{at}: rpo_alpha must be ≥ 0, got {}", self.rpo_alpha));
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            p.push(format!("{at}: batch_size and grad_accum must be at least 1"));
        }
        if self.max_steps == Some(0) || (self.max_steps.is_none() && !(self.epochs > 0.0)) {
            p.push(format!("{at}: needs max_steps ≥ 1 or epochs > 0"));
        }
        if self.loss_chunk == 0 {
            p.push(format!("{at}: loss_chunk must be at least 1"));
        }
    }

    /// A step's memory shape: chosen and rejected rows of `max_length` tokens (the reference log-probs are
    /// cached: no reference model).
    pub fn memory_shape(&self, max_length: usize, checkpointing: bool) -> StageShape {
        StageShape { micro_tokens: (2 * self.batch_size * max_length) as i64, checkpointing, logit_rows: self.loss_chunk as i64, accumulates: self.grad_accum > 1, ..Default::default() }
    }

    pub fn plan(&self) -> String {
        let steps = match self.max_steps {
            Some(n) => format!("{n} steps"),
            None => format!("{} epoch(s)", self.epochs),
        };
        format!(
            "{steps}; {} pairs × {} micro-batches per step; loss {:?} β {}{}{}{}",
            self.batch_size,
            self.grad_accum,
            self.loss_type,
            self.beta,
            if self.label_smoothing > 0.0 { format!(" ε {}", self.label_smoothing) } else { String::new() },
            if self.rpo_alpha > 0.0 { format!(" + {} NLL (RPO)", self.rpo_alpha) } else { String::new() },
            if self.averaged() { ", per-token mean log-probs" } else { "" }
        )
    }
}

pub(super) fn validate_data(d: &Option<DataConfig>, at: &str, p: &mut Vec<String>) {
    if let Some(d) = d {
        if !d.path.exists() {
            p.push(format!("{at}: data path {} does not exist", d.path.display()));
        }
    }
}

impl crate::stages::kind::StageKind for DpoStage {
    fn resolve_paths(&mut self, f: &mut dyn FnMut(&mut PathBuf)) {
        if let Some(d) = self.data.as_mut() {
            f(&mut d.path);
        }
    }

    fn validate(&self, at: &str, p: &mut Vec<String>) {
        match (&self.data, &self.synthetic) {
            (None, None) => p.push(format!("{at}: needs `data` (preference pairs) or `synthetic`")),
            (Some(_), Some(_)) => p.push(format!("{at}: has both `data` and `synthetic`; give one")),
            _ => {}
        }
        validate_data(&self.data, at, p);
        if self.tokenize.max_length < 2 {
            p.push(format!("{at}: tokenize.max_length must be at least 2"));
        }
        self.args().validate(at, p);
    }

    fn memory_shape(&self, _: &crate::settings::GenerationSpec) -> StageShape {
        self.args().memory_shape(self.tokenize.max_length, self.gradient_checkpointing)
    }

    fn plan(&self) -> String {
        let src = match (&self.data, &self.synthetic) {
            (Some(d), _) => d.path.display().to_string(),
            (None, Some(s)) => format!("{} synthetic pairs", s.count),
            _ => String::new(),
        };
        format!("{src}; {}; lr {:.1e} {:?}", self.args().plan(), self.lr, self.schedule)
    }

    fn run(&self, ctx: &Ctx, index: usize, name: &str, model: &Model, resume: Option<&Checkpoint>) -> Result<f64> {
        let records = match (&self.data, &self.synthetic) {
            (Some(d), _) => {
                let recs = data::load_records(d).with_context(|| format!("[{name}] reading {}", d.path.display()))?;
                if let Some(i) = recs.iter().position(|r| !matches!(r, Record::Preference { .. })) {
                    bail!("[{name}] {}: record {} is not a preference pair (name the `prompt`, `chosen` and `rejected` columns)", d.path.display(), i + 1);
                }
                recs
            }
            (None, Some(spec)) => spec.generator()?.preferences(spec.start, spec.count),
            (None, None) => bail!("[{name}] the stage has no data"),
        };
        train(ctx, index, name, &records, self, json!({}), model, resume)
    }
}

// ---------------------------------------------------------------------------------------------------------
// tokenized pairs and the reference cache
// ---------------------------------------------------------------------------------------------------------

/// One tokenized side of a pair.
#[derive(Clone)]
struct Seq {
    ids: Vec<i64>,
    labels: Vec<i64>,
    /// Labelled next-token positions.
    n: i64,
}

impl Seq {
    fn new(e: data::TokenizedExample) -> Seq {
        let n = e.labels.iter().skip(1).filter(|&&x| x != IGNORE).count() as i64;
        Seq { ids: e.input_ids.iter().map(|&x| x as i64).collect(), labels: e.labels, n }
    }
}

struct Pair {
    c: Seq,
    r: Seq,
}

fn tokenize_pairs(ctx: &Ctx, records: &[Record], cfg: &TokenizeConfig) -> Result<(Vec<Pair>, usize)> {
    let (pairs, dropped) = data::tokenize::tokenize_preferences(&ctx.tok, ctx.template.as_ref(), records, cfg)?;
    let mut out = vec![];
    let mut no_loss = 0;
    for p in pairs {
        let (c, r) = (Seq::new(p.chosen), Seq::new(p.rejected));
        if c.n == 0 || r.n == 0 {
            no_loss += 1;
            continue;
        }
        out.push(Pair { c, r });
    }
    Ok((out, dropped + no_loss))
}

/// Reference sequence log-probabilities (sums) and labelled-token counts per pair.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RefLogps {
    pub key: String,
    pub chosen: Vec<f64>,
    pub rejected: Vec<f64>,
    pub chosen_tokens: Vec<i64>,
    pub rejected_tokens: Vec<i64>,
}

/// Identity of a model's weights: SHA-256 over every parameter's name, shape, dtype and a strided sample of
/// at most 4096 of its values (every parameter moves in a training step, so a sample suffices).
pub fn weights_fingerprint(model: &model::Transformer) -> String {
    let mut h = Sha256::new();
    tch::no_grad(|| {
        for (name, t) in model.params.iter() {
            h.update(name.as_bytes());
            h.update(format!("{:?}{:?}", t.size(), t.kind()).as_bytes());
            let flat = t.detach().reshape([-1]).to_device(Device::Cpu).to_kind(Kind::Double);
            let n = flat.size()[0];
            let stride = (n / 4096).max(1);
            let sample = flat.slice(0, 0, n, stride);
            let v: Vec<f64> = Vec::try_from(&sample).unwrap_or_default();
            for x in v {
                h.update(x.to_le_bytes());
            }
        }
    });
    hex(&h.finalize())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The cache key of reference log-probabilities: the tokenized pairs and the weights' identity.
pub fn ref_cache_key(pairs_ids: &[(&[i64], &[i64], &[i64], &[i64])], weights: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"whet-dpo-ref-v1");
    h.update(weights.as_bytes());
    for (ci, cl, ri, rl) in pairs_ids {
        for v in [ci, cl, ri, rl] {
            h.update((v.len() as u64).to_le_bytes());
            for x in v.iter() {
                h.update(x.to_le_bytes());
            }
        }
    }
    hex(&h.finalize())
}

fn pairs_key(pairs: &[Pair], weights: &str) -> String {
    let v: Vec<(&[i64], &[i64], &[i64], &[i64])> = pairs.iter().map(|p| (&p.c.ids[..], &p.c.labels[..], &p.r.ids[..], &p.r.labels[..])).collect();
    ref_cache_key(&v, weights)
}

fn ref_cache_path(ctx: &Ctx, key: &str) -> PathBuf {
    ctx.output.join("cache").join(format!("dpo-ref-{}.json", &key[..32]))
}

fn read_ref(path: &Path, key: &str, n: usize) -> Result<Option<RefLogps>> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(None) };
    let r: RefLogps = serde_json::from_str(&text).with_context(|| format!("{}: not a valid reference log-prob cache", path.display()))?;
    Ok((r.key == key && r.chosen.len() == n).then_some(r))
}

/// The rows of some pairs for the network, interleaved (chosen₁, rejected₁, chosen₂, ...) so that each pair's
/// answers can share one encoding of their prompt (`sharing`).
fn pair_rows(net: &model::Transformer, pairs: &[&Pair], pad: i64, sharing: PromptSharing) -> MicroRows {
    let rows: Vec<(&[i64], &[i64])> = pairs.iter().flat_map(|p| [(&p.c.ids[..], &p.c.labels[..]), (&p.r.ids[..], &p.r.labels[..])]).collect();
    let group: Vec<usize> = (0..rows.len()).map(|i| i / 2).collect();
    MicroRows::new(net, &rows, &group, pad, sharing)
}

/// Reference log-probabilities of every pair with `model` (no gradients), in batches of `bs` pairs: per pair
/// (chosen sum, rejected sum, chosen tokens, rejected tokens).
fn compute_ref(ctx: &Ctx, model: &Model, pairs: &[Pair], bs: usize, chunk: i64, sharing: PromptSharing) -> Vec<(f64, f64, i64, i64)> {
    let mut r = Vec::with_capacity(pairs.len());
    for group in pairs.chunks(bs.max(1)) {
        let group: Vec<&Pair> = group.iter().collect();
        let mr = pair_rows(&model.net, &group, ctx.tok.pad_id as i64, sharing);
        let (lp, mask, _) = mr.with(|x| logprobs::token_logprobs_of(&model.net, x, chunk, 1.0, false));
        let lp: Vec<f64> = Vec::try_from(lp.sum_dim_intlist(1, false, lp.kind()).to_kind(Kind::Double).to_device(Device::Cpu)).unwrap();
        let cnt: Vec<i64> = Vec::try_from(mask.sum_dim_intlist(1, false, Kind::Int64).to_device(Device::Cpu)).unwrap();
        r.extend((0..group.len()).map(|i| (lp[2 * i], lp[2 * i + 1], cnt[2 * i], cnt[2 * i + 1])));
    }
    r
}

/// Reference log-probabilities: read from the cache when the key matches, else computed with `model` (the
/// stage's starting model) and written. On resume the model has moved, so the key saved in the checkpoint is
/// used and the cache must exist.
fn reference(ctx: &Ctx, name: &str, model: &Model, pairs: &[Pair], a: &DpoArgs, resume: Option<&Checkpoint>) -> Result<RefLogps> {
    // under LoRA the reference is the base with the adapter off; else the stage's starting model
    let off = models::adapter_off(model);
    let model = off.as_ref().unwrap_or(model);
    let key = match resume.and_then(|c| c.state.extra.get("ref_key")).and_then(|v| v.as_str()) {
        Some(k) => k.to_string(),
        None if resume.is_some() => bail!("[{name}] the checkpoint does not name its reference log-prob cache; restart the stage with --resume never"),
        None => pairs_key(pairs, &weights_fingerprint(&model.net)),
    };
    let path = ref_cache_path(ctx, &key);
    if let Some(r) = read_ref(&path, &key, pairs.len())? {
        eprintln!("[{name}] reference log-probs from {}", path.display());
        return Ok(r);
    }
    if resume.is_some() {
        bail!("[{name}] reference log-prob cache {} is missing; the stage's starting model is gone, restart the stage with --resume never", path.display());
    }
    let t0 = Instant::now();
    // data parallel: each rank its share of whole batches (the one-process batches, so the same padding and
    // the same numbers), then every rank gathers all
    let bs = a.batch_size.max(1);
    let batches = data_parallel::share_range(ctx, pairs.len().div_ceil(bs));
    let mine = &pairs[(batches.start * bs).min(pairs.len())..(batches.end * bs).min(pairs.len())];
    crate::training::sharding::ensure_whole(ctx)?;
    let all = data_parallel::gather_concat(ctx, compute_ref(ctx, model, mine, bs, a.loss_chunk as i64, a.prompt_sharing))?;
    let r = RefLogps {
        key,
        chosen: all.iter().map(|x| x.0).collect(),
        rejected: all.iter().map(|x| x.1).collect(),
        chosen_tokens: all.iter().map(|x| x.2).collect(),
        rejected_tokens: all.iter().map(|x| x.3).collect(),
    };
    // every rank writes the same bytes (each through its own temporary file), so each finds it on resume
    std::fs::create_dir_all(path.parent().unwrap()).with_context(|| format!("creating {}", path.parent().unwrap().display()))?;
    model::weights::write_atomic(&path, serde_json::to_string(&r)?.as_bytes())?;
    eprintln!("[{name}] reference log-probs of {} pairs computed in {:.1} s, cached in {}", pairs.len(), t0.elapsed().as_secs_f64(), path.display());
    Ok(r)
}
// ---------------------------------------------------------------------------------------------------------
// the DPO loop
// ---------------------------------------------------------------------------------------------------------

/// Sums over a step's pairs (over the ranks once [`forward_backward`] returns them).
#[derive(Default)]
struct StepStats {
    loss: f64,
    nll: f64,
    chosen: f64,
    rejected: f64,
    acc: f64,
    pairs: usize,
    /// Tokens of the step's chosen and rejected rows.
    tokens: usize,
}

/// The reference log-probabilities as the loss reads them: sums, or per-token means when `averaged`.
struct RefTargets {
    logps: RefLogps,
    averaged: bool,
}

impl RefTargets {
    fn value(&self, i: usize, chosen: bool) -> f64 {
        let r = &self.logps;
        let (s, n) = if chosen { (r.chosen[i], r.chosen_tokens[i]) } else { (r.rejected[i], r.rejected_tokens[i]) };
        if self.averaged {
            s / n.max(1) as f64
        } else {
            s
        }
    }
}

/// DPO on preference records with `table`'s keys; returns held-out accuracy after the stage (NaN without
/// `eval`). `extra` goes into the checkpoints' stage state, with the reference cache's key.
#[allow(clippy::too_many_arguments)]
pub(super) fn train(ctx: &Ctx, index: usize, name: &str, records: &[Record], table: &dyn DpoTable, extra: serde_json::Value, model: &Model, resume: Option<&Checkpoint>) -> Result<f64> {
    let a = table.args();
    let (pairs, dropped) = tokenize_pairs(ctx, records, table.tokenize())?;
    if pairs.is_empty() {
        bail!("[{name}] no preference pairs left after tokenization ({dropped} dropped: too long or no reply tokens; check tokenize.max_length)");
    }
    // data parallel: each step draws world × accum micro-batches; this rank trains on its `accum` of them
    let accum = data_parallel::local_accum(ctx, name, a.grad_accum, resume)?;
    let world_micro = accum * ctx.comm.world();
    let per_step = a.batch_size * world_micro;
    let total = a.max_steps.unwrap_or_else(|| ((a.epochs * pairs.len() as f64) / per_step as f64).ceil().max(1.0) as usize);
    eprintln!("[{name}] {} pairs ({dropped} dropped); {total} optimizer steps of {} × {} pairs", pairs.len(), world_micro, a.batch_size);

    let reference = RefTargets { logps: reference(ctx, name, model, &pairs, &a, resume)?, averaged: a.averaged() };
    let mut sampler = Sampler::single(pairs.len(), SamplerConfig { seed: ctx.run.seed.wrapping_add(index as u64), shuffle: true, num_epochs: None, drop_last: false })?;
    let optim = table.optim();
    let mut opt = optim.optimizer(ctx, model)?;
    let (start, mut tokens) = step::restore(resume, &mut opt, &mut sampler, name, total)?;

    let held = HeldOut::new(table.eval_spec())?;
    let mut before = f64::NAN;
    if let (Some(h), 0) = (&held, start) {
        before = h.at_start(ctx, model, index, name, Default::default())?;
    }
    let extra = with_ref_key(extra, &reference.logps.key);
    let progress = |sampler: &Sampler, tokens: u64| Progress { index, name: name.to_string(), total, sampler: Some(sampler.state()), tokens, extra: extra.clone() };
    let t_stage = Instant::now();
    let bar = Bar::new(name, start, total);
    let mut health = Health::default();
    for step in start..total {
        let t0 = Instant::now();
        step::key_dropout(ctx, model, step);
        let micro: Vec<Vec<usize>> = (0..world_micro).map(|_| sampler.next_batch(a.batch_size)).collect();
        let st = forward_backward(ctx, model, &opt, &pairs, &reference, &a, data_parallel::shard(ctx, micro))?;
        tokens += st.tokens as u64;
        let lr = optim.lr_at(step, total);
        let (grad_norm, stepped) = step::optimizer_step(ctx, name, &mut opt, &optim, lr, step + 1, &bar)?;
        let loss = st.loss;
        health.observe(ctx, name, step + 1, grad_norm, None, &bar);
        if !loss.is_finite() && stepped {
            bail!("[{name}] loss became {loss} at step {}: lower the learning rate", step + 1);
        }
        let np = st.pairs.max(1) as f64;
        let (cr, rj) = (st.chosen / np, st.rejected / np);
        let dt = t0.elapsed().as_secs_f64();
        let done = step + 1;
        if done % ctx.run.log_every.max(1) == 0 || done == total || done == start + 1 {
            let mut rec = obj(json!({"stage": index, "stage_name": name, "step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "rewards_chosen": cr, "rewards_rejected": rj, "rewards_margin": cr - rj, "rewards_accuracy": st.acc / np,
                "pairs": st.pairs, "step_s": dt, "epoch": sampler.epoch(), "tokens_per_s": st.tokens as f64 / dt,
                "update_lost_frac": opt.lost_fraction()}));
            if a.rpo_alpha > 0.0 {
                rec.insert("nll".into(), json!(st.nll));
            }
            ctx.metrics.log(rec)?;
            bar.println(&format!("[{name}] step {done}/{total} loss {loss:.4} margin {:.4} accuracy {:.2} lr {lr:.2e} ({dt:.2} s/step)", cr - rj, st.acc / np));
        }
        bar.step(done, loss, st.tokens as f64 / dt);
        if let Some(h) = &held {
            h.periodic(ctx, model, index, name, done, total, Default::default)?;
        }
        progress(&sampler, tokens).after_step(ctx, done, model, &opt)?;
    }
    bar.finish();
    let after = match &held {
        Some(h) => h.at_end(ctx, model, index, name, total, before, Default::default())?,
        None => f64::NAN,
    };
    progress(&sampler, tokens).finish(ctx, model, t_stage, "")?;
    Ok(after)
}

/// The stage state of the checkpoints: `extra` with the reference cache's key (`ref_key`).
fn with_ref_key(mut extra: serde_json::Value, key: &str) -> serde_json::Value {
    match extra.as_object_mut() {
        Some(o) => {
            o.insert("ref_key".into(), json!(key));
            extra
        }
        None => json!({ "ref_key": key }),
    }
}

/// Forward and backward of this rank's micro-batches of pair indices (gradients summed over them and over the
/// ranks, ready for the optimizer step); returns the step's sums over the ranks. The loss is a mean over the
/// whole step's pairs (RPO's NLL a mean over its chosen tokens).
fn forward_backward(ctx: &Ctx, model: &Model, opt: &crate::training::optim::AdamW, pairs: &[Pair], reference: &RefTargets, a: &DpoArgs, micro: Vec<Vec<usize>>) -> Result<StepStats> {
    // the global denominators: this rank's counts summed over the ranks
    let mut counts = [micro.iter().map(|m| m.len()).sum::<usize>() as f64, micro.iter().flatten().map(|&i| pairs[i].c.n).sum::<i64>() as f64];
    data_parallel::sum(ctx, &mut counts)?;
    let denoms = ((counts[0] as usize).max(1), (counts[1] as i64).max(1));
    let mut st = StepStats::default();
    let mut acc = data_parallel::Accum::new(ctx, opt, micro.iter().filter(|m| !m.is_empty()).count())?;
    for m in micro.iter().filter(|m| !m.is_empty()) {
        acc.next()?;
        micro_step(model, pairs, m, reference, a, denoms, ctx.tok.pad_id as i64, &mut st);
    }
    acc.finish()?;
    let mut sums = [st.loss, st.nll, st.chosen, st.rejected, st.acc, st.pairs as f64, st.tokens as f64];
    data_parallel::sum(ctx, &mut sums)?;
    let [loss, nll, chosen, rejected, acc, n, tokens] = sums;
    Ok(StepStats { loss, nll, chosen, rejected, acc, pairs: n as usize, tokens: tokens as usize })
}

/// Forward and backward of the pairs `m` (gradients accumulate in the parameters), adding to `st`.
/// `denoms`: the step's pairs and chosen-reply tokens over all ranks.
#[allow(clippy::too_many_arguments)]
fn micro_step(model: &Model, pairs: &[Pair], m: &[usize], reference: &RefTargets, a: &DpoArgs, denoms: (usize, i64), pad: i64, st: &mut StepStats) {
    let (n_pairs, n_chosen_tok) = denoms;
    let k = m.len() as i64;
    let group: Vec<&Pair> = m.iter().map(|&i| &pairs[i]).collect();
    st.tokens += group.iter().map(|p| p.c.ids.len() + p.r.ids.len()).sum::<usize>();
    let mr = pair_rows(&model.net, &group, pad, a.prompt_sharing);
    // rows are interleaved: chosen₁, rejected₁, chosen₂, ...
    let counts = Tensor::from_slice(&group.iter().flat_map(|p| [p.c.n.max(1) as f64, p.r.n.max(1) as f64]).collect::<Vec<_>>());
    let rc = Tensor::from_slice(&m.iter().map(|&i| reference.value(i, true)).collect::<Vec<_>>());
    let rr = Tensor::from_slice(&m.iter().map(|&i| reference.value(i, false)).collect::<Vec<_>>());
    let loss_kind = a.pair_loss();
    let mut out: Option<(Tensor, Tensor, f64)> = None;
    let loss_fn = |lp: &Tensor, _: Option<&Tensor>| {
        let kind = lp.kind();
        let seq = lp.sum_dim_intlist(1, false, kind);
        let seq = if reference.averaged { seq / counts.to_kind(kind).to_device(lp.device()) } else { seq };
        let seq = seq.view([k, 2]);
        let (pc, pr) = (seq.select(1, 0), seq.select(1, 1));
        let (rc, rr) = (rc.to_kind(kind).to_device(lp.device()), rr.to_kind(kind).to_device(lp.device()));
        let (l, cr, rj) = pair_losses(&pc, &pr, &rc, &rr, &loss_kind);
        let mut loss = l.sum(kind) / n_pairs as f64;
        let mut nll = 0.0;
        if a.rpo_alpha > 0.0 {
            // token-mean NLL of the step's chosen replies (RPO)
            let chosen_nll = -lp.view([k, 2, -1]).select(1, 0).sum(kind) / n_chosen_tok as f64;
            nll = chosen_nll.double_value(&[]);
            loss = loss + chosen_nll * a.rpo_alpha;
        }
        out = Some((cr, rj, nll));
        loss
    };
    let (v, _, _) = mr.with(|x| logprobs::logprob_backward(&model.net, x, a.loss_chunk as i64, 1.0, false, loss_fn));
    let (cr, rj, nll) = out.expect("loss computed");
    let f = |t: &Tensor| t.sum(Kind::Double).double_value(&[]);
    st.loss += v;
    st.nll += nll;
    st.chosen += f(&cr);
    st.rejected += f(&rj);
    st.acc += f(&cr.gt_tensor(&rj).to_kind(Kind::Double));
    st.pairs += m.len();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(loss_type: LossType) -> DpoArgs {
        DpoArgs { beta: 0.1, loss_type, label_smoothing: 0.0, rpo_alpha: 0.0, length_normalize: false, batch_size: 1, grad_accum: 1, epochs: 1.0, max_steps: None, loss_chunk: 16, prompt_sharing: Default::default() }
    }

    #[test]
    fn ipo_averages_log_probs_per_token() {
        assert!(args(LossType::Ipo).averaged());
        assert!(!args(LossType::Sigmoid).averaged());
    }

    #[test]
    fn ref_cache_key_changes_with_data_and_weights() {
        let (a, b): (Vec<i64>, Vec<i64>) = (vec![1, 2, 3], vec![-100, 2, 3]);
        let (c, d): (Vec<i64>, Vec<i64>) = (vec![1, 2, 4], vec![-100, 2, 4]);
        let k = ref_cache_key(&[(&a, &b, &c, &d)], "w");
        assert_eq!(k, ref_cache_key(&[(&a, &b, &c, &d)], "w"));
        assert_ne!(k, ref_cache_key(&[(&c, &d, &a, &b)], "w"), "swapping chosen and rejected");
        let d2: Vec<i64> = vec![-100, -100, 4];
        assert_ne!(k, ref_cache_key(&[(&a, &b, &c, &d2)], "w"), "labels");
        assert_ne!(k, ref_cache_key(&[(&a, &b, &c, &d), (&a, &b, &c, &d)], "w"), "more pairs");
        assert_ne!(k, ref_cache_key(&[(&a, &b, &c, &d)], "w2"), "weights");
    }

    #[test]
    fn weights_fingerprint_sees_a_small_update() {
        let cfg = model::ModelConfig::from_json(
            serde_json::json!({"model_type": "qwen2", "vocab_size": 50, "hidden_size": 16, "intermediate_size": 32,
                "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": true}),
            "test",
        )
        .unwrap();
        let m = Model::random(&cfg, Kind::Float, Device::Cpu, 1);
        let f0 = weights_fingerprint(&m.net);
        assert_eq!(f0, weights_fingerprint(&m.net));
        tch::no_grad(|| {
            let _ = m.net.params.tensors()[0].get(0).get(0).fill_(0.123);
        });
        assert_ne!(f0, weights_fingerprint(&m.net));
    }

}
