//! DPO and Rollout-DPO stages.
//!
//! **DPO** trains on (prompt, chosen, rejected) pairs with one of the published pairwise losses, all written in
//! terms of h = (log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r)):
//!
//! - `sigmoid` (DPO, Rafailov et al. 2023, arXiv 2305.18290): −log σ(βh); with label smoothing ε (cDPO,
//!   Mitchell 2023): −(1−ε) log σ(βh) − ε log σ(−βh).
//! - `ipo` (Azar et al. 2023, arXiv 2310.12036): (h − 1/(2β))², with h on per-token averaged log-probabilities
//!   (as TRL computes it).
//! - `hinge` (SLiC-HF, Zhao et al. 2023, arXiv 2305.10425): max(0, 1 − βh).
//! - `rpo_alpha` > 0 adds α × the token-mean NLL of the chosen replies (RPO, Pang et al. 2024, arXiv 2404.19733).
//!
//! The reference log-probabilities come from the stage's starting model, computed once before the first
//! update and cached under `OUTPUT/cache/` (keyed by the tokenized pairs and the weights), so that no second
//! model is held in memory and a resumed or repeated run reuses them.
//!
//! **Rollout-DPO** (stage 3 of Phi-4-Mini-Reasoning, arXiv 2504.21233) builds the pairs first: for each problem
//! it takes the given teacher rollouts or samples `num_samples` from the current policy, verifies each answer
//! with the rewards crate, and pairs verified-correct (chosen) with incorrect (rejected) rollouts of the same
//! problem. Problems without both kinds are dropped and counted. The pairs are written to a JSONL file, then
//! DPO trains on them.

use anyhow::{bail, Context, Result};
use data::{DataConfig, Message, Record, Sampler, SamplerConfig, TokenizeConfig};
use model::Model;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::Checkpoint;
use crate::recipe::SyntheticSpec;
use crate::run::Ctx;
use crate::stage::{obj, HeldOut, Progress};

/// The pairwise loss (TRL's `loss_type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// DPO: −log σ(βh) (with label smoothing: cDPO).
    #[default]
    Sigmoid,
    /// IPO: (h − 1/(2β))² on per-token averaged log-probabilities.
    Ipo,
    /// SLiC hinge: max(0, 1 − βh).
    Hinge,
}

/// How many pairs a problem gives: `"one"`, `"all"` (every correct × incorrect combination) or a number
/// (combinations up to that cap, spread evenly over the rollouts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum PairsPerProblem {
    Cap(usize),
    Named(String),
}

impl Default for PairsPerProblem {
    fn default() -> Self {
        PairsPerProblem::Named("one".into())
    }
}

impl PairsPerProblem {
    /// The cap, or an error message.
    pub fn cap(&self) -> std::result::Result<usize, String> {
        match self {
            PairsPerProblem::Cap(0) => Err("pairs_per_problem must be at least 1".into()),
            PairsPerProblem::Cap(n) => Ok(*n),
            PairsPerProblem::Named(s) if s == "one" => Ok(1),
            PairsPerProblem::Named(s) if s == "all" => Ok(usize::MAX),
            PairsPerProblem::Named(s) => Err(format!("pairs_per_problem must be \"one\", \"all\" or a number, got {s:?}")),
        }
    }
}

/// Declares a DPO stage's table: the given fields, the DPO keys both kinds share (tokenize, beta, loss_type,
/// label_smoothing, rpo_alpha, length_normalize, batch_size, grad_accum, epochs), and through
/// [`crate::stage::training_stage!`] the keys of every trained stage; plus `args()`.
macro_rules! dpo_stage {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fm:meta])* pub $f:ident : $t:ty),* $(,)? }) => {
        crate::stage::training_stage! {
            $(#[$meta])*
            pub struct $name {
                $($(#[$fm])* pub $f: $t,)*
                /// Tokenization (max_length applies to prompt + reply).
                #[serde(default)]
                pub tokenize: TokenizeConfig,
                /// β: strength of the implicit KL regularisation (IPO's τ).
                #[serde(default = "default_beta")]
                pub beta: f64,
                /// sigmoid (DPO), ipo or hinge.
                #[serde(default)]
                pub loss_type: LossType,
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
                #[serde(default = "default_batch", alias = "per_device_train_batch_size")]
                pub batch_size: usize,
                /// Micro-batches per optimizer step.
                #[serde(default = "one", alias = "gradient_accumulation_steps")]
                pub grad_accum: usize,
                /// Passes over the pairs (used when `max_steps` is not set).
                #[serde(default = "default_epochs", alias = "num_train_epochs")]
                pub epochs: f64,
                /// Run a pair's shared prompt once for both answers ("auto": when that costs fewer FLOPs,
                /// "always", "never"); the result is the same up to float rounding.
                #[serde(default)]
                pub prompt_sharing: crate::loss::PromptSharing,
            }
        }

        impl $name {
            /// The DPO keys.
            pub fn args(&self) -> DpoArgs {
                DpoArgs {
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

dpo_stage! {
    /// `kind = "rollout_dpo"`.
    pub struct RolloutDpoStage {
        /// Peak learning rate (Phi-4-mini used 5e-7).
        #[serde(default = "default_lr", alias = "learning_rate")]
        pub lr: f64,
        /// Problems from a dataset (`prompt` and `answer` columns).
        #[serde(default)]
        pub data: Option<DataConfig>,
        /// Synthetic arithmetic problems.
        #[serde(default)]
        pub synthetic: Option<SyntheticSpec>,
        /// A JSONL file of teacher rollouts, one problem a line: `{"prompt": text or messages, "answer": gold,
        /// "rollouts": [text, ...]}`; used instead of sampling (and instead of `data`/`synthetic`).
        #[serde(default)]
        pub teacher_rollouts: Option<PathBuf>,
        /// Rollouts sampled per problem from the current policy.
        #[serde(default = "default_samples", alias = "num_generations")]
        pub num_samples: usize,
        /// Sampling temperature.
        #[serde(default = "one_f")]
        pub temperature: f64,
        /// Nucleus sampling threshold.
        #[serde(default = "one_f")]
        pub top_p: f64,
        /// Most tokens per rollout.
        #[serde(default = "default_new_tokens", alias = "max_completion_length")]
        pub max_new_tokens: usize,
        /// Pairs per problem: "one", "all", or a cap on the correct × incorrect combinations.
        #[serde(default)]
        pub pairs_per_problem: PairsPerProblem,
        /// Order problems by pass rate, hardest (lowest) first; with `max_pairs` the hardest are kept.
        #[serde(default = "yes")]
        pub hardest_first: bool,
        /// Keep at most this many pairs in all (after ordering).
        #[serde(default)]
        pub max_pairs: Option<usize>,
        /// Where the pairs are written (default OUTPUT/<stage name>/pairs.jsonl).
        #[serde(default)]
        pub pairs_path: Option<PathBuf>,
    }
}

fn default_lr() -> f64 {
    1e-6
}
fn default_beta() -> f64 {
    0.1
}
fn default_batch() -> usize {
    8
}
fn one() -> usize {
    1
}
fn one_f() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn default_epochs() -> f64 {
    1.0
}
fn default_samples() -> usize {
    8
}
fn default_new_tokens() -> usize {
    256
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
    pub prompt_sharing: crate::loss::PromptSharing,
}

impl DpoArgs {
    /// Whether sequence log-probabilities are per-token means (IPO always).
    pub fn averaged(&self) -> bool {
        self.length_normalize || self.loss_type == LossType::Ipo
    }

    fn validate(&self, at: &str, p: &mut Vec<String>) {
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

    fn plan(&self) -> String {
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

fn validate_data(d: &Option<DataConfig>, at: &str, p: &mut Vec<String>) {
    if let Some(d) = d {
        if !d.path.exists() {
            p.push(format!("{at}: data path {} does not exist", d.path.display()));
        }
    }
}

fn resolve_eval(eval: &mut Option<crate::recipe::EvalSpec>, f: &mut dyn FnMut(&mut PathBuf)) {
    if let Some(d) = eval.as_mut().and_then(|e| e.data.as_mut()) {
        f(&mut d.path);
    }
}

impl DpoStage {
    pub fn resolve_paths(&mut self, f: &mut dyn FnMut(&mut PathBuf)) {
        if let Some(d) = self.data.as_mut() {
            f(&mut d.path);
        }
        resolve_eval(&mut self.eval, f);
    }
    pub fn validate(&self, at: &str, p: &mut Vec<String>) {
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
        self.optim().validate(at, p);
        crate::stage::validate_eval(&self.eval, at, p);
    }
    pub fn plan(&self) -> String {
        let src = match (&self.data, &self.synthetic) {
            (Some(d), _) => d.path.display().to_string(),
            (None, Some(s)) => format!("{} synthetic pairs", s.count),
            _ => String::new(),
        };
        format!("{src}; {}; lr {:.1e} {:?}", self.args().plan(), self.lr, self.schedule)
    }
}

impl RolloutDpoStage {
    pub fn resolve_paths(&mut self, f: &mut dyn FnMut(&mut PathBuf)) {
        if let Some(d) = self.data.as_mut() {
            f(&mut d.path);
        }
        if let Some(p) = self.teacher_rollouts.as_mut() {
            f(p);
        }
        if let Some(p) = self.pairs_path.as_mut() {
            f(p);
        }
        resolve_eval(&mut self.eval, f);
    }
    pub fn validate(&self, at: &str, p: &mut Vec<String>) {
        let n = self.data.is_some() as usize + self.synthetic.is_some() as usize + self.teacher_rollouts.is_some() as usize;
        if n != 1 {
            p.push(format!("{at}: needs exactly one of `data` (problems), `synthetic` or `teacher_rollouts`"));
        }
        validate_data(&self.data, at, p);
        if let Some(t) = &self.teacher_rollouts {
            if !t.is_file() {
                p.push(format!("{at}: teacher_rollouts {} does not exist", t.display()));
            }
        }
        if self.teacher_rollouts.is_none() && self.num_samples < 2 {
            p.push(format!("{at}: num_samples must be at least 2 (a pair needs a correct and an incorrect rollout)"));
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            p.push(format!("{at}: temperature must be > 0 (greedy rollouts are all the same), got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            p.push(format!("{at}: top_p must be in (0, 1], got {}", self.top_p));
        }
        if self.max_new_tokens == 0 {
            p.push(format!("{at}: max_new_tokens must be at least 1"));
        }
        if let Err(e) = self.pairs_per_problem.cap() {
            p.push(format!("{at}: {e}"));
        }
        if self.max_pairs == Some(0) {
            p.push(format!("{at}: max_pairs must be at least 1"));
        }
        if self.tokenize.max_length < 2 {
            p.push(format!("{at}: tokenize.max_length must be at least 2"));
        }
        self.args().validate(at, p);
        self.optim().validate(at, p);
        crate::stage::validate_eval(&self.eval, at, p);
    }
    pub fn plan(&self) -> String {
        let src = match (&self.teacher_rollouts, &self.data, &self.synthetic) {
            (Some(t), _, _) => format!("teacher rollouts {}", t.display()),
            (None, Some(d), _) => format!("{} problems × {} samples", d.path.display(), self.num_samples),
            (None, None, Some(s)) => format!("{} synthetic problems × {} samples", s.count, self.num_samples),
            _ => String::new(),
        };
        format!("{src}, pairs per problem {:?}; then DPO: {}; lr {:.1e} {:?}", self.pairs_per_problem, self.args().plan(), self.lr, self.schedule)
    }
}

// ---------------------------------------------------------------------------------------------------------
// losses
// ---------------------------------------------------------------------------------------------------------

/// Per-pair losses and implicit rewards from policy (`pc`, `pr`) and reference (`rc`, `rr`) sequence
/// log-probabilities `[P]` (sums or per-token means, as the caller chose). Returns (loss `[P]`, chosen reward
/// β(pc − rc) `[P]`, rejected reward β(pr − rr) `[P]`).
pub fn pair_losses(pc: &Tensor, pr: &Tensor, rc: &Tensor, rr: &Tensor, a: &DpoArgs) -> (Tensor, Tensor, Tensor) {
    let chosen = pc - rc;
    let rejected = pr - rr;
    let h = &chosen - &rejected;
    let beta = a.beta;
    let loss = match a.loss_type {
        // Rafailov et al. 2023, eq. 7; cDPO label smoothing.
        LossType::Sigmoid => {
            let eps = a.label_smoothing;
            let pos = -(&h * beta).log_sigmoid() * (1.0 - eps);
            if eps > 0.0 {
                pos - (&h * -beta).log_sigmoid() * eps
            } else {
                pos
            }
        }
        // Azar et al. 2023, eq. 17: (h − 1/(2τ))².
        LossType::Ipo => (&h - 1.0 / (2.0 * beta)).square(),
        // SLiC-HF (Zhao et al. 2023): max(0, δ − βh) with δ = 1.
        LossType::Hinge => (-(&h * beta) + 1.0).relu(),
    };
    (loss, chosen.detach() * beta, rejected.detach() * beta)
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
        let n = e.labels.iter().skip(1).filter(|&&x| x != crate::loss::IGNORE).count() as i64;
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

/// Right-padded rows: (ids, labels, positions, mask).
/// The rows of some pairs for the network, interleaved (chosen₁, rejected₁, chosen₂, ...) so that each pair's
/// answers can share one encoding of their prompt (`sharing`).
fn pair_rows(net: &model::Transformer, pairs: &[&Pair], pad: i64, sharing: crate::loss::PromptSharing) -> crate::loss::MicroRows {
    let rows: Vec<(&[i64], &[i64])> = pairs.iter().flat_map(|p| [(&p.c.ids[..], &p.c.labels[..]), (&p.r.ids[..], &p.r.labels[..])]).collect();
    let group: Vec<usize> = (0..rows.len()).map(|i| i / 2).collect();
    crate::loss::MicroRows::new(net, &rows, &group, pad, sharing)
}

/// Reference log-probabilities of every pair with `model` (no gradients), in batches of `bs` pairs: per pair
/// (chosen sum, rejected sum, chosen tokens, rejected tokens).
fn compute_ref(ctx: &Ctx, model: &Model, pairs: &[Pair], bs: usize, chunk: i64, sharing: crate::loss::PromptSharing) -> Vec<(f64, f64, i64, i64)> {
    let mut r = Vec::with_capacity(pairs.len());
    for group in pairs.chunks(bs.max(1)) {
        let group: Vec<&Pair> = group.iter().collect();
        let mr = pair_rows(&model.net, &group, ctx.tok.pad_id as i64, sharing);
        let (lp, mask, _) = mr.with(|x| crate::loss::token_logprobs_of(&model.net, x, chunk, 1.0, false));
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
    let batches = crate::data_parallel::share_range(ctx, pairs.len().div_ceil(bs));
    let mine = &pairs[(batches.start * bs).min(pairs.len())..(batches.end * bs).min(pairs.len())];
    let all = crate::data_parallel::gather_concat(ctx, compute_ref(ctx, model, mine, bs, a.loss_chunk as i64, a.prompt_sharing))?;
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

/// Means over a step's pairs.
#[derive(Default)]
struct StepStats {
    loss: f64,
    nll: f64,
    chosen: f64,
    rejected: f64,
    acc: f64,
    pairs: usize,
}

/// DPO on preference records; returns held-out accuracy after the stage (NaN without `eval`).
#[allow(clippy::too_many_arguments)]
fn train(ctx: &Ctx, index: usize, name: &str, records: &[Record], tokenize: &TokenizeConfig, a: &DpoArgs, optim: crate::stage::OptimArgs, eval: &Option<crate::recipe::EvalSpec>, extra: serde_json::Value, model: &Model, resume: Option<&Checkpoint>) -> Result<f64> {
    let (pairs, dropped) = tokenize_pairs(ctx, records, tokenize)?;
    if pairs.is_empty() {
        bail!("[{name}] no preference pairs left after tokenization ({dropped} dropped: too long or no reply tokens; check tokenize.max_length)");
    }
    // data parallel: each step draws world × accum micro-batches; this rank trains on its `accum` of them
    let accum = crate::data_parallel::local_accum(ctx, name, a.grad_accum, resume)?;
    let world_micro = accum * ctx.comm.world();
    let per_step = a.batch_size * world_micro;
    let total = a.max_steps.unwrap_or_else(|| ((a.epochs * pairs.len() as f64) / per_step as f64).ceil().max(1.0) as usize);
    eprintln!("[{name}] {} pairs ({dropped} dropped); {total} optimizer steps of {} × {} pairs", pairs.len(), world_micro, a.batch_size);

    let reference = reference(ctx, name, model, &pairs, a, resume)?;
    let ref_key = reference.key.clone();
    let avg = a.averaged();
    let ref_value = |i: usize, chosen: bool| -> f64 {
        let (s, n) = if chosen { (reference.chosen[i], reference.chosen_tokens[i]) } else { (reference.rejected[i], reference.rejected_tokens[i]) };
        if avg {
            s / n.max(1) as f64
        } else {
            s
        }
    };

    let mut sampler = Sampler::single(pairs.len(), SamplerConfig { seed: ctx.recipe.run.seed.wrapping_add(index as u64), shuffle: true, num_epochs: None, drop_last: false })?;
    let mut opt = optim.optimizer(ctx, model);
    let (start, mut tokens) = crate::stage::restore(resume, &mut opt, &mut sampler, name, total)?;

    let held = HeldOut::new(eval)?;
    let mut before = f64::NAN;
    if let (Some(h), 0) = (&held, start) {
        before = h.at_start(ctx, model, index, name, Default::default())?;
    }

    let pad = ctx.tok.pad_id as i64;
    let chunk = a.loss_chunk as i64;
    let t_stage = Instant::now();
    let bar = crate::progress::Bar::new(name, start, total);
    let mut health = crate::stage::Health::default();
    let mut extra = extra;
    if let Some(o) = extra.as_object_mut() {
        o.insert("ref_key".into(), json!(ref_key));
    } else {
        extra = json!({ "ref_key": ref_key });
    }
    let progress = |sampler: &Sampler, tokens: u64| Progress { index, name: name.to_string(), total, sampler: Some(sampler.state()), tokens, extra: extra.clone() };
    for step in start..total {
        let t0 = Instant::now();
        let micro: Vec<Vec<usize>> = (0..world_micro).map(|_| sampler.next_batch(a.batch_size)).collect();
        let micro = crate::data_parallel::shard(ctx, micro);
        // the global denominators: this rank's counts summed over the ranks
        let mut counts = [micro.iter().map(|m| m.len()).sum::<usize>() as f64, micro.iter().flatten().map(|&i| pairs[i].c.n).sum::<i64>() as f64];
        crate::data_parallel::sum(ctx, &mut counts)?;
        let n_pairs = (counts[0] as usize).max(1);
        let n_chosen_tok = (counts[1] as i64).max(1);
        let mut st = StepStats::default();
        let mut step_tokens = 0usize;
        let mut acc = crate::data_parallel::Accum::new(model);
        for m in micro.iter().filter(|m| !m.is_empty()) {
            acc.next();
            let k = m.len() as i64;
            let group: Vec<&Pair> = m.iter().map(|&i| &pairs[i]).collect();
            step_tokens += group.iter().map(|p| p.c.ids.len() + p.r.ids.len()).sum::<usize>();
            let mr = pair_rows(&model.net, &group, pad, a.prompt_sharing);
            // rows are interleaved: chosen₁, rejected₁, chosen₂, ...
            let counts = Tensor::from_slice(&group.iter().flat_map(|p| [p.c.n.max(1) as f64, p.r.n.max(1) as f64]).collect::<Vec<_>>());
            let rc = Tensor::from_slice(&m.iter().map(|&i| ref_value(i, true)).collect::<Vec<_>>());
            let rr = Tensor::from_slice(&m.iter().map(|&i| ref_value(i, false)).collect::<Vec<_>>());
            let mut out: Option<(Tensor, Tensor, Tensor, f64)> = None;
            let loss_fn = |lp: &Tensor, _: Option<&Tensor>| {
                let kind = lp.kind();
                let seq = lp.sum_dim_intlist(1, false, kind);
                let seq = if avg { seq / counts.to_kind(kind).to_device(lp.device()) } else { seq };
                let seq = seq.view([k, 2]);
                let (pc, pr) = (seq.select(1, 0), seq.select(1, 1));
                let (rc, rr) = (rc.to_kind(kind).to_device(lp.device()), rr.to_kind(kind).to_device(lp.device()));
                let (l, cr, rj) = pair_losses(&pc, &pr, &rc, &rr, a);
                let mut loss = l.sum(kind) / n_pairs as f64;
                let mut nll = 0.0;
                if a.rpo_alpha > 0.0 {
                    // token-mean NLL of the step's chosen replies (RPO)
                    let chosen_nll = -lp.view([k, 2, -1]).select(1, 0).sum(kind) / n_chosen_tok as f64;
                    nll = chosen_nll.double_value(&[]);
                    loss = loss + chosen_nll * a.rpo_alpha;
                }
                out = Some((l.detach(), cr, rj, nll));
                loss
            };
            let (v, _, _) = mr.with(|x| crate::loss::logprob_backward(&model.net, x, chunk, 1.0, false, loss_fn));
            let (l, cr, rj, nll) = out.expect("loss computed");
            let f = |t: &Tensor| t.sum(Kind::Double).double_value(&[]);
            st.loss += v;
            st.nll += nll;
            st.chosen += f(&cr);
            st.rejected += f(&rj);
            st.acc += f(&cr.gt_tensor(&rj).to_kind(Kind::Double));
            st.pairs += m.len();
            let _ = l;
        }
        acc.finish();
        crate::data_parallel::sync_grads(ctx, model)?;
        let mut sums = [st.loss, st.nll, st.chosen, st.rejected, st.acc, st.pairs as f64, step_tokens as f64];
        crate::data_parallel::sum(ctx, &mut sums)?;
        let [loss, nll, chosen, rejected, accuracy, n, stepped] = sums;
        (st.loss, st.nll, st.chosen, st.rejected, st.acc, st.pairs, step_tokens) = (loss, nll, chosen, rejected, accuracy, n as usize, stepped as usize);
        tokens += step_tokens as u64;
        let lr = optim.lr_at(step, total);
        let (grad_norm, stepped) = crate::stage::optimizer_step(ctx, name, &mut opt, &optim, lr, step + 1, &bar)?;
        let loss = st.loss;
        health.observe(ctx, name, step + 1, grad_norm, None, &bar);
        if !loss.is_finite() && stepped {
            bail!("[{name}] loss became {loss} at step {}: lower the learning rate", step + 1);
        }
        let np = st.pairs.max(1) as f64;
        let (cr, rj) = (st.chosen / np, st.rejected / np);
        let dt = t0.elapsed().as_secs_f64();
        let done = step + 1;
        if done % ctx.recipe.run.log_every.max(1) == 0 || done == total || done == start + 1 {
            let mut rec = obj(json!({"stage": index, "stage_name": name, "step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "rewards_chosen": cr, "rewards_rejected": rj, "rewards_margin": cr - rj, "rewards_accuracy": st.acc / np,
                "pairs": st.pairs, "step_s": dt, "epoch": sampler.epoch(), "tokens_per_s": step_tokens as f64 / dt,
                "update_lost_frac": opt.lost_fraction()}));
            if a.rpo_alpha > 0.0 {
                rec.insert("nll".into(), json!(st.nll));
            }
            ctx.metrics.log(rec)?;
            bar.println(&format!("[{name}] step {done}/{total} loss {loss:.4} margin {:.4} accuracy {:.2} lr {lr:.2e} ({dt:.2} s/step)", cr - rj, st.acc / np));
        }
        bar.step(done, loss, step_tokens as f64 / dt);
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

pub fn run(ctx: &Ctx, index: usize, s: &DpoStage, model: &Model, resume: Option<&Checkpoint>) -> Result<f64> {
    let name = ctx.recipe.stage[index].name(index);
    let records = match (&s.data, &s.synthetic) {
        (Some(d), _) => {
            let recs = data::load_records(d).with_context(|| format!("[{name}] reading {}", d.path.display()))?;
            if let Some(i) = recs.iter().position(|r| !matches!(r, Record::Preference { .. })) {
                bail!("[{name}] {}: record {} is not a preference pair (name the `prompt`, `chosen` and `rejected` columns)", d.path.display(), i + 1);
            }
            recs
        }
        (None, Some(spec)) => crate::stage::synthetic(spec)?.preferences(spec.start, spec.count),
        (None, None) => bail!("[{name}] the stage has no data"),
    };
    train(ctx, index, &name, &records, &s.tokenize, &s.args(), s.optim(), &s.eval, json!({}), model, resume)
}

// ---------------------------------------------------------------------------------------------------------
// Rollout-DPO: pairs from verified rollouts
// ---------------------------------------------------------------------------------------------------------

/// One problem with its rollouts and their verdicts.
#[derive(Debug, Clone)]
pub struct Judged {
    pub prompt: Vec<Message>,
    pub answer: String,
    pub rollouts: Vec<String>,
    pub correct: Vec<bool>,
}

/// A selected pair, as written to the pairs file (readable by `data` with `prompt`/`chosen`/`rejected`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PairRecord {
    pub prompt: Vec<Message>,
    pub chosen: String,
    pub rejected: String,
    pub answer: String,
    pub problem: usize,
    pub pass_rate: f64,
}

/// What selection did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Selection {
    pub problems: usize,
    pub pairs: usize,
    /// Problems whose rollouts were all correct (too easy: nothing to prefer against).
    pub dropped_all_correct: usize,
    /// Problems without a correct rollout.
    pub dropped_none_correct: usize,
    /// Pairs cut by `max_pairs`.
    pub cut_by_max_pairs: usize,
    /// Mean pass rate over all problems.
    pub mean_pass_rate: f64,
}

/// Up to `cap` (correct, incorrect) index pairs out of `nc` × `nr`, spread evenly: each next pair is the unused
/// one whose two rollouts have been used least so far (ties: lowest indices), so that no rollout repeats while
/// another is unused.
pub fn balanced_pairs(nc: usize, nr: usize, cap: usize) -> Vec<(usize, usize)> {
    let want = cap.min(nc * nr);
    let (mut uc, mut ur) = (vec![0usize; nc], vec![0usize; nr]);
    let mut used = vec![false; nc * nr];
    let mut out = Vec::with_capacity(want);
    while out.len() < want {
        let mut best: Option<(usize, usize, usize)> = None;
        for c in 0..nc {
            for r in 0..nr {
                if used[c * nr + r] {
                    continue;
                }
                let score = uc[c].max(ur[r]) * 2 + uc[c].min(ur[r]);
                if best.is_none_or(|b| score < b.0) {
                    best = Some((score, c, r));
                }
            }
        }
        let (_, c, r) = best.unwrap();
        used[c * nr + r] = true;
        uc[c] += 1;
        ur[r] += 1;
        out.push((c, r));
    }
    out
}

/// Pairs verified-correct (chosen) with incorrect (rejected) rollouts of each problem. Identical rollout texts
/// count once. Problems without both kinds are dropped and counted; with `hardest_first` problems are ordered
/// by pass rate, lowest first (stable), before `max_pairs` cuts.
pub fn select_pairs(problems: &[Judged], cap: usize, hardest_first: bool, max_pairs: Option<usize>) -> (Vec<PairRecord>, Selection) {
    let mut sel = Selection { problems: problems.len(), ..Default::default() };
    let mut per: Vec<(f64, usize, Vec<PairRecord>)> = vec![];
    let mut rate_sum = 0.0;
    for (i, p) in problems.iter().enumerate() {
        let n = p.rollouts.len().max(1);
        let rate = p.correct.iter().filter(|&&c| c).count() as f64 / n as f64;
        rate_sum += rate;
        let mut good: Vec<&str> = vec![];
        let mut bad: Vec<&str> = vec![];
        for (t, &ok) in p.rollouts.iter().zip(&p.correct) {
            let v = if ok { &mut good } else { &mut bad };
            if !v.contains(&t.as_str()) {
                v.push(t);
            }
        }
        if good.is_empty() {
            sel.dropped_none_correct += 1;
            continue;
        }
        if bad.is_empty() {
            sel.dropped_all_correct += 1;
            continue;
        }
        let pairs = balanced_pairs(good.len(), bad.len(), cap)
            .into_iter()
            .map(|(c, r)| PairRecord { prompt: p.prompt.clone(), chosen: good[c].to_string(), rejected: bad[r].to_string(), answer: p.answer.clone(), problem: i, pass_rate: rate })
            .collect();
        per.push((rate, i, pairs));
    }
    if hardest_first {
        per.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    }
    let mut out: Vec<PairRecord> = per.into_iter().flat_map(|x| x.2).collect();
    if let Some(m) = max_pairs {
        if out.len() > m {
            sel.cut_by_max_pairs = out.len() - m;
            out.truncate(m);
        }
    }
    sel.pairs = out.len();
    sel.mean_pass_rate = if problems.is_empty() { 0.0 } else { rate_sum / problems.len() as f64 };
    (out, sel)
}

/// One line of a teacher-rollouts file.
#[derive(Deserialize)]
struct TeacherLine {
    prompt: serde_json::Value,
    answer: serde_json::Value,
    rollouts: Vec<String>,
}

fn prompt_messages(v: &serde_json::Value) -> Option<Vec<Message>> {
    match v {
        serde_json::Value::String(s) => Some(vec![Message::user(s.clone())]),
        other => serde_json::from_value(other.clone()).ok(),
    }
}

fn read_teacher(path: &Path) -> Result<Vec<(Vec<Message>, String, Vec<String>)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = vec![];
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let t: TeacherLine = serde_json::from_str(line).map_err(|e| anyhow::anyhow!("{}:{}: expected {{\"prompt\", \"answer\", \"rollouts\": [..]}}: {e}", path.display(), i + 1))?;
        let prompt = prompt_messages(&t.prompt).with_context(|| format!("{}:{}: `prompt` must be a string or a list of {{role, content}} messages", path.display(), i + 1))?;
        let answer = match t.answer {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        out.push((prompt, answer, t.rollouts));
    }
    Ok(out)
}

fn judge(problems: Vec<(Vec<Message>, String, Vec<String>)>) -> Vec<Judged> {
    let cfg = rewards::math::VerifyConfig::default();
    problems
        .into_iter()
        .map(|(prompt, answer, rollouts)| {
            let correct = rollouts.iter().map(|r| rewards::math::verify(&answer, r, &cfg).equivalent).collect();
            Judged { prompt, answer, rollouts, correct }
        })
        .collect()
}

/// `num_samples` rollouts per problem from the policy.
fn sample(ctx: &Ctx, index: usize, s: &RolloutDpoStage, model: &Model, problems: &[(Vec<Message>, String)]) -> Result<Vec<Vec<String>>> {
    let params = rollout::SamplingParams { temperature: s.temperature as f32, top_p: s.top_p as f32, max_new_tokens: s.max_new_tokens, ..Default::default() };
    let prompts = problems.iter().map(|(p, _)| crate::accuracy::prompt_ids(&ctx.tok, ctx.template.as_ref(), p)).collect::<Result<Vec<_>>>()?;
    // data parallel: each rank samples its share of the problems (seeded as in the whole call), all gather
    let share = crate::data_parallel::share_range(ctx, prompts.len());
    let seed = ctx.recipe.run.seed.wrapping_add(1000 + index as u64);
    let done = crate::accuracy::generate_at(ctx, &model.net, &prompts[share.clone()], s.num_samples, &params, seed, share.start)?;
    let stop = crate::accuracy::stop_ids(&ctx.tok);
    let mut out = vec![vec![]; share.len()];
    for c in done {
        out[c.request_index].push(crate::accuracy::completion_text(&ctx.tok, &c.token_ids, &stop)?);
    }
    crate::data_parallel::gather_concat(ctx, out)
}

fn pairs_path(ctx: &Ctx, s: &RolloutDpoStage, name: &str) -> PathBuf {
    s.pairs_path.clone().unwrap_or_else(|| ctx.output.join(name).join("pairs.jsonl"))
}

fn read_pairs(path: &Path) -> Result<Vec<PairRecord>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| anyhow::anyhow!("{}:{}: not a pair record: {e}", path.display(), i + 1)))
        .collect()
}

pub fn run_rollout(ctx: &Ctx, index: usize, s: &RolloutDpoStage, model: &Model, resume: Option<&Checkpoint>) -> Result<f64> {
    let name = ctx.recipe.stage[index].name(index);
    let path = pairs_path(ctx, s, &name);
    let pairs = if resume.is_some() {
        // The pairs came from the stage's starting model; reuse them as written.
        let p = read_pairs(&path).with_context(|| format!("[{name}] resuming needs the pairs written when the stage started"))?;
        eprintln!("[{name}] {} pairs from {}", p.len(), path.display());
        p
    } else {
        let t0 = Instant::now();
        let judged = match &s.teacher_rollouts {
            Some(t) => judge(read_teacher(t)?),
            None => {
                let records = match (&s.data, &s.synthetic) {
                    (Some(d), _) => data::load_records(d).with_context(|| format!("[{name}] reading {}", d.path.display()))?,
                    (None, Some(spec)) => crate::stage::synthetic(spec)?.prompt_answer(spec.start, spec.count),
                    _ => bail!("[{name}] the stage has no problems"),
                };
                let problems: Vec<(Vec<Message>, String)> = records
                    .into_iter()
                    .enumerate()
                    .map(|(i, r)| match r {
                        Record::PromptAnswer { prompt, answer, .. } => Ok((prompt, answer)),
                        _ => bail!("[{name}] problem {} is not a prompt with an answer (name the `prompt` and `answer` columns)", i + 1),
                    })
                    .collect::<Result<_>>()?;
                let rollouts = sample(ctx, index, s, model, &problems)?;
                judge(problems.into_iter().zip(rollouts).map(|((p, a), r)| (p, a, r)).collect())
            }
        };
        let cap = s.pairs_per_problem.cap().map_err(|e| anyhow::anyhow!("[{name}] {e}"))?;
        let (pairs, sel) = select_pairs(&judged, cap, s.hardest_first, s.max_pairs);
        let mut text = String::new();
        for p in &pairs {
            text.push_str(&serde_json::to_string(p)?);
            text.push('\n');
        }
        std::fs::create_dir_all(path.parent().unwrap_or(Path::new("."))).with_context(|| format!("creating the directory of {}", path.display()))?;
        model::weights::write_atomic(&path, text.as_bytes())?;
        eprintln!(
            "[{name}] {} problems (mean pass rate {:.1}%): {} pairs written to {}; dropped {} with every rollout correct and {} with none correct{} ({:.1} s)",
            sel.problems,
            100.0 * sel.mean_pass_rate,
            sel.pairs,
            path.display(),
            sel.dropped_all_correct,
            sel.dropped_none_correct,
            if sel.cut_by_max_pairs > 0 { format!(", {} pairs cut by max_pairs", sel.cut_by_max_pairs) } else { String::new() },
            t0.elapsed().as_secs_f64()
        );
        let mut rec = obj(json!({"stage": index, "stage_name": name, "step": 0, "pairs_file": path.display().to_string()}));
        if let serde_json::Value::Object(m) = serde_json::to_value(&sel)? {
            rec.extend(m);
        }
        ctx.metrics.log(rec)?;
        if pairs.is_empty() {
            bail!(
                "[{name}] no pairs: of {} problems, {} had every rollout correct and {} none correct; raise num_samples or temperature, or use other problems",
                sel.problems,
                sel.dropped_all_correct,
                sel.dropped_none_correct
            );
        }
        pairs
    };
    let records: Vec<Record> = pairs.into_iter().map(|p| Record::Preference { prompt: p.prompt, chosen: p.chosen, rejected: p.rejected }).collect();
    train(ctx, index, &name, &records, &s.tokenize, &s.args(), s.optim(), &s.eval, json!({"pairs": path.display().to_string()}), model, resume)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(loss_type: LossType, beta: f64, eps: f64) -> DpoArgs {
        DpoArgs { beta, loss_type, label_smoothing: eps, rpo_alpha: 0.0, length_normalize: false, batch_size: 1, grad_accum: 1, epochs: 1.0, max_steps: None, loss_chunk: 16, prompt_sharing: Default::default() }
    }

    // fixed log-probabilities: (policy chosen, policy rejected, ref chosen, ref rejected)
    const LP: [(f64, f64, f64, f64); 4] = [(-12.0, -15.0, -13.0, -14.0), (-3.5, -2.0, -3.0, -2.5), (-40.0, -41.0, -40.0, -41.0), (-7.25, -30.0, -9.0, -20.0)];

    fn t(v: &[f64]) -> Tensor {
        Tensor::from_slice(v)
    }

    fn losses(a: &DpoArgs) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let col = |f: fn(&(f64, f64, f64, f64)) -> f64| t(&LP.iter().map(f).collect::<Vec<_>>());
        let (l, c, r) = pair_losses(&col(|x| x.0), &col(|x| x.1), &col(|x| x.2), &col(|x| x.3), a);
        (Vec::try_from(l).unwrap(), Vec::try_from(c).unwrap(), Vec::try_from(r).unwrap())
    }

    fn log_sigmoid(x: f64) -> f64 {
        -(1.0 + (-x).exp()).ln()
    }

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12 * (1.0 + b.abs()), "{a} != {b}");
    }

    #[test]
    fn sigmoid_loss_is_rafailov_eq7() {
        for beta in [0.1, 0.5, 2.0] {
            let (l, c, r) = losses(&args(LossType::Sigmoid, beta, 0.0));
            for (i, &(pc, pr, rc, rr)) in LP.iter().enumerate() {
                let logits = beta * ((pc - rc) - (pr - rr));
                close(l[i], -log_sigmoid(logits));
                close(c[i], beta * (pc - rc));
                close(r[i], beta * (pr - rr));
            }
        }
    }

    #[test]
    fn label_smoothed_sigmoid_is_cdpo() {
        let (beta, eps) = (0.3, 0.2);
        let (l, _, _) = losses(&args(LossType::Sigmoid, beta, eps));
        for (i, &(pc, pr, rc, rr)) in LP.iter().enumerate() {
            let h = (pc - rc) - (pr - rr);
            close(l[i], -(1.0 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h));
        }
    }

    #[test]
    fn ipo_loss_is_azar_eq17() {
        let beta = 0.25;
        let (l, _, _) = losses(&args(LossType::Ipo, beta, 0.0));
        for (i, &(pc, pr, rc, rr)) in LP.iter().enumerate() {
            let h = (pc - rc) - (pr - rr);
            close(l[i], (h - 1.0 / (2.0 * beta)).powi(2));
        }
        // the minimum sits at h = 1/(2β)
        let a = args(LossType::Ipo, beta, 0.0);
        let (l, _, _) = pair_losses(&t(&[2.0]), &t(&[0.0]), &t(&[0.0]), &t(&[0.0]), &a);
        assert_eq!(l.double_value(&[0]), 0.0);
    }

    #[test]
    fn hinge_loss_is_slic() {
        let beta = 0.5;
        let (l, _, _) = losses(&args(LossType::Hinge, beta, 0.0));
        for (i, &(pc, pr, rc, rr)) in LP.iter().enumerate() {
            let h = (pc - rc) - (pr - rr);
            close(l[i], (1.0 - beta * h).max(0.0));
        }
        // pair 3 has βh = 0.5·12.95 > 1: no loss
        assert_eq!(l[3], 0.0);
    }

    #[test]
    fn ipo_averages_log_probs_per_token() {
        assert!(args(LossType::Ipo, 0.1, 0.0).averaged());
        assert!(!args(LossType::Sigmoid, 0.1, 0.0).averaged());
    }

    #[test]
    fn sigmoid_gradient_matches_the_closed_form() {
        // d/dpc of −log σ(β h) = −β σ(−β h)
        let beta = 0.4;
        let pc = t(&[-5.0]).set_requires_grad(true);
        let (l, _, _) = pair_losses(&pc, &t(&[-6.0]), &t(&[-5.5]), &t(&[-5.0]), &args(LossType::Sigmoid, beta, 0.0));
        l.sum(Kind::Double).backward();
        let h: f64 = (-5.0 + 5.5) - (-6.0 + 5.0);
        let want = -beta / (1.0 + (beta * h).exp());
        close(pc.grad().double_value(&[0]), want);
    }

    fn judged(rollouts: &[(&str, bool)]) -> Judged {
        Judged {
            prompt: vec![Message::user("q")],
            answer: "1".into(),
            rollouts: rollouts.iter().map(|r| r.0.to_string()).collect(),
            correct: rollouts.iter().map(|r| r.1).collect(),
        }
    }

    #[test]
    fn one_pair_per_problem_drops_and_counts_unpairable_problems() {
        let probs = vec![
            judged(&[("a", true), ("b", false), ("c", false)]),
            judged(&[("a", true), ("a2", true)]),
            judged(&[("x", false), ("y", false)]),
            judged(&[("a", true), ("a3", true), ("z", false), ("a4", true)]),
        ];
        let (pairs, sel) = select_pairs(&probs, 1, false, None);
        assert_eq!(sel.problems, 4);
        assert_eq!(sel.dropped_all_correct, 1);
        assert_eq!(sel.dropped_none_correct, 1);
        assert_eq!(pairs.len(), 2);
        assert_eq!((pairs[0].chosen.as_str(), pairs[0].rejected.as_str(), pairs[0].problem), ("a", "b", 0));
        assert_eq!((pairs[1].chosen.as_str(), pairs[1].rejected.as_str(), pairs[1].problem), ("a", "z", 3));
        assert!((sel.mean_pass_rate - (1.0 / 3.0 + 1.0 + 0.0 + 0.75) / 4.0).abs() < 1e-12);
    }

    #[test]
    fn all_combinations_are_capped_and_balanced() {
        let p = judged(&[("c0", true), ("r0", false), ("c1", true), ("r1", false), ("r2", false), ("r2", false)]);
        // 2 distinct correct × 3 distinct incorrect (the repeated "r2" counts once)
        let (all, _) = select_pairs(std::slice::from_ref(&p), usize::MAX, false, None);
        assert_eq!(all.len(), 6);
        let mut seen: Vec<(String, String)> = all.iter().map(|x| (x.chosen.clone(), x.rejected.clone())).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 6);
        let (three, _) = select_pairs(std::slice::from_ref(&p), 3, false, None);
        assert_eq!(three.len(), 3);
        // balanced: all three incorrect rollouts used once, the correct ones used 2 and 1 times
        let mut rej: Vec<&str> = three.iter().map(|x| x.rejected.as_str()).collect();
        rej.sort();
        assert_eq!(rej, vec!["r0", "r1", "r2"]);
        assert!(three.iter().any(|x| x.chosen == "c0") && three.iter().any(|x| x.chosen == "c1"));
        assert_eq!(balanced_pairs(2, 2, 2), vec![(0, 0), (1, 1)]);
    }

    #[test]
    fn harder_problems_come_first_and_max_pairs_keeps_them() {
        let probs = vec![
            judged(&[("a", true), ("a1", true), ("a2", true), ("b", false)]), // 75%
            judged(&[("a", true), ("b", false), ("c", false), ("d", false)]), // 25%
            judged(&[("a", true), ("b", false)]),                             // 50%
        ];
        let (pairs, sel) = select_pairs(&probs, 1, true, Some(2));
        assert_eq!(pairs.iter().map(|p| p.problem).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(sel.cut_by_max_pairs, 1);
        assert_eq!(sel.pairs, 2);
        let (pairs, _) = select_pairs(&probs, 1, false, None);
        assert_eq!(pairs.iter().map(|p| p.problem).collect::<Vec<_>>(), vec![0, 1, 2]);
    }

    #[test]
    fn pairs_per_problem_parses() {
        assert_eq!(PairsPerProblem::Named("one".into()).cap(), Ok(1));
        assert_eq!(PairsPerProblem::Named("all".into()).cap(), Ok(usize::MAX));
        assert_eq!(PairsPerProblem::Cap(4).cap(), Ok(4));
        assert!(PairsPerProblem::Cap(0).cap().is_err());
        assert!(PairsPerProblem::Named("two".into()).cap().is_err());
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

    #[test]
    fn teacher_lines_parse_and_bad_lines_name_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.jsonl");
        std::fs::write(&p, "{\"prompt\": \"What is 1+1?\", \"answer\": 2, \"rollouts\": [\"2\", \"3\"]}\n").unwrap();
        let v = read_teacher(&p).unwrap();
        assert_eq!(v[0].1, "2");
        let j = judge(v);
        assert_eq!(j[0].correct, vec![true, false]);
        std::fs::write(&p, "{\"prompt\": \"x\"}\n").unwrap();
        let e = read_teacher(&p).unwrap_err().to_string();
        assert!(e.contains("t.jsonl:1"), "{e}");
    }
}
