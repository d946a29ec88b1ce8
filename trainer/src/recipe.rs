//! TOML recipes: `[model]`, `[run]` and an ordered list of `[[stage]]` tables.
//!
//! Every key has a doc comment and a default; unknown keys are refused with a did-you-mean, and all the
//! problems of a recipe are reported together with file:line.

use anyhow::{bail, Result};
use data::synth::ArithmeticConfig;
use data::{DataConfig, TokenizeConfig};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::precision::{StateDtype, UpdatePrecision, WeightUpdate};


/// A whole recipe.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// The model to start from.
    pub model: ModelSpec,
    /// Run-wide settings.
    #[serde(default)]
    pub run: RunSpec,
    /// Stages, run in order; each starts from the previous stage's result.
    #[serde(default)]
    pub stage: Vec<Stage>,
    /// The rollout engine's batching for every sampling pass of the run (GRPO, Rollout-DPO, prefilter,
    /// held-out evaluation).
    #[serde(default)]
    pub generation: GenerationSpec,
}

/// `[generation]`: how the in-process rollout engine batches (vLLM's `max_num_seqs` and KV-cache size).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct GenerationSpec {
    /// Most sequences decoded together (vLLM's `max_num_seqs`).
    pub max_batch_seqs: usize,
    /// KV-cache budget of one batch in token slots (rows × (longest prompt + max new tokens)); memory is this
    /// times the model's KV bytes per token (2 × layers × KV heads × head dim × dtype bytes). Lower it for big
    /// models on small GPUs.
    pub cache_budget_tokens: i64,
    /// Queued sequences join a running batch when finished ones leave it.
    pub slot_refill: bool,
    /// Decode on a per-call fused copy of the projection weights (faster; costs the attention and MLP weights'
    /// bytes while sampling); on an AVX-512 CPU in fp32 the copy is packed for the native decode step
    /// (`WHET_NATIVE_DECODE=0` keeps libtorch's operators).
    pub fuse_weights: bool,
}

impl Default for GenerationSpec {
    fn default() -> Self {
        let e = rollout::EngineConfig::default();
        GenerationSpec { max_batch_seqs: e.max_batch_seqs, cache_budget_tokens: e.cache_budget_tokens, slot_refill: e.slot_refill, fuse_weights: e.fuse_weights }
    }
}

impl GenerationSpec {
    /// The engine settings (stop ids, padding and seed are the caller's).
    pub fn engine(&self) -> rollout::EngineConfig {
        rollout::EngineConfig {
            max_batch_seqs: self.max_batch_seqs,
            cache_budget_tokens: self.cache_budget_tokens,
            slot_refill: self.slot_refill,
            fuse_weights: self.fuse_weights,
            ..Default::default()
        }
    }
}

/// `[model]`: a Hugging Face directory, a GGUF file, or an inline config for a random-initialised model.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// A Hugging Face model directory or a `.gguf` file (converted on first use).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// An inline config.json (e.g. `{ model_type = "llama", hidden_size = 64, ... }`): random init, seeded.
    #[serde(default)]
    pub config: Option<serde_json::Value>,
    /// Seed of the random initialisation (with `config`).
    #[serde(default)]
    pub init_seed: i64,
    /// Tokenizer: a directory with tokenizer.json, or `"builtin:bytes"` (byte-level, ChatML specials) for
    /// random models. Default: the model directory.
    #[serde(default)]
    pub tokenizer: Option<String>,
    /// The dtype weights are held and computed in: float32, bfloat16 or float16. With bfloat16 or float16
    /// the optimizer still accumulates updates precisely (see `weight_update`).
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// Device: cpu, cuda, cuda:N or auto.
    #[serde(default = "default_device")]
    pub device: String,
    /// Mixed precision (accelerate's `mixed_precision`, TRL's `bf16 = true`): "bf16" keeps fp32 weights and
    /// AdamW state and runs forward passes (training, sampling, evaluation) under bfloat16 autocast; "no"
    /// (default) computes in `dtype`.
    #[serde(default)]
    pub mixed_precision: Option<String>,
    /// How optimizer updates reach bfloat16 / float16 weights (`dtype`): "master_fp32" (default: fp32 master
    /// weights accumulate every update and the low-precision weights used by forward, backward and sampling
    /// are refreshed from them after each step; Megatron's and verl's scheme), "kahan" (Kahan-compensated
    /// updates with a compensation buffer in the weights' dtype: 2 bytes a parameter instead of 4),
    /// "stochastic_rounding" (bfloat16 only: unbiased random rounding, seeded by the run seed and step, no
    /// extra memory) or "direct" (round to nearest, as plain bf16 training: an update below half a bf16 ulp,
    /// 0.2–0.4% of the weight, is lost, and at RL learning rates almost all are). Not used with fp32 weights.
    #[serde(default, skip_serializing_if = "is_default")]
    #[schemars(extend("default" = "master_fp32"))]
    pub weight_update: WeightUpdate,
    /// dtype of AdamW's two moments: "float32" (default) or "bfloat16" (half the optimizer memory; the
    /// update itself is still computed in fp32).
    #[serde(default, skip_serializing_if = "is_default")]
    #[schemars(extend("default" = "float32"))]
    pub optimizer_dtype: StateDtype,
}

fn is_default<T: Default + PartialEq>(x: &T) -> bool {
    *x == T::default()
}

impl ModelSpec {
    /// The dtype weights are held in and the autocast dtype of forward passes on `device`.
    pub fn precision(&self, _device: tch::Device) -> Result<(tch::Kind, Option<tch::Kind>)> {
        let kind = model::parse_kind(&self.dtype).map_err(anyhow::Error::msg)?;
        match self.mixed_precision.as_deref() {
            Some("bf16") => Ok((tch::Kind::Float, Some(tch::Kind::BFloat16))),
            _ => Ok((kind, None)),
        }
    }

    /// How the optimizer updates the weights (the run seed seeds stochastic rounding).
    pub fn update_precision(&self, seed: u64) -> UpdatePrecision {
        UpdatePrecision { update: self.weight_update, state: self.optimizer_dtype, seed }
    }

    /// Problems with the precision keys.
    fn validate_precision(&self, origin: &str, p: &mut Vec<String>) {
        let Ok((kind, _)) = self.precision(tch::Device::Cpu) else { return };
        let update = self.weight_update;
        if kind == tch::Kind::Float && update != WeightUpdate::default() {
            let why = if self.mixed_precision.as_deref() == Some("bf16") { "mixed_precision = \"bf16\" keeps fp32 weights" } else { "the weights are float32" };
            p.push(format!(
                "{origin}: [model] weight_update = \"{}\" applies to bfloat16 or float16 weights, but {why}: leave weight_update out, or set dtype = \"bfloat16\"",
                update.name()
            ));
        }
        if kind == tch::Kind::Half && update == WeightUpdate::StochasticRounding {
            p.push(format!("{origin}: [model] weight_update = \"stochastic_rounding\" needs dtype = \"bfloat16\" (float16 weights: use \"master_fp32\" or \"kahan\")"));
        }
    }
}

/// `[run] nonfinite`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum NonFinite {
    #[default]
    Skip,
    Stop,
}

fn default_dtype() -> String {
    "float32".into()
}
fn default_device() -> String {
    "auto".into()
}

/// `[run]`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// Where checkpoints, metrics and final models go.
    #[serde(default = "default_output")]
    pub output_dir: PathBuf,
    /// Seed for data order and sampling.
    #[serde(default)]
    pub seed: u64,
    /// libtorch intra-op threads (default: libtorch's choice).
    #[serde(default)]
    pub threads: Option<i32>,
    /// Log a metrics line every N optimizer steps.
    #[serde(default = "default_log_every")]
    pub log_every: usize,
    /// Save a checkpoint every N optimizer steps (0: only at the end of each stage).
    #[serde(default)]
    pub save_every: usize,
    /// Keep the newest K mid-stage checkpoints (stage-final models are always kept).
    #[serde(default = "default_keep")]
    pub keep_last: usize,
    /// When a step's gradient norm is NaN or infinite: "skip" (default) leaves the weights and optimizer state
    /// as they were and prints a counted warning (the run stops after 10 such steps in a row); "stop" ends the
    /// run at once. Either way a non-finite gradient never reaches the weights.
    #[serde(default, skip_serializing_if = "is_default")]
    #[schemars(extend("default" = "skip"))]
    pub nonfinite: NonFinite,
    /// Where metrics go besides `metrics.jsonl` (TRL's `report_to`): "tensorboard", "wandb", "all" or "none",
    /// a string or a list. Default: TensorBoard, plus Weights & Biases when `WANDB_API_KEY` is set.
    #[serde(default, deserialize_with = "crate::wandb::string_or_list")]
    #[schemars(with = "Option<Vec<String>>")]
    pub report_to: Option<Vec<String>>,
    /// W&B project (default: `WANDB_PROJECT`, else "uncategorized").
    #[serde(default)]
    pub wandb_project: Option<String>,
    /// W&B entity, a user or team (default: `WANDB_ENTITY`, else the API key's default entity).
    #[serde(default)]
    pub wandb_entity: Option<String>,
    /// W&B display name of the run (TRL's `run_name`; default: `WANDB_NAME`, else the output directory's name).
    #[serde(default, alias = "run_name")]
    pub wandb_name: Option<String>,
    /// W&B run id (default: `WANDB_RUN_ID`, else a new random id; a resumed run keeps its id).
    #[serde(default)]
    pub wandb_run_id: Option<String>,
    /// W&B run group (default: `WANDB_RUN_GROUP`).
    #[serde(default)]
    pub wandb_group: Option<String>,
    /// W&B tags (default: `WANDB_TAGS`, comma-separated).
    #[serde(default)]
    pub wandb_tags: Option<Vec<String>>,
}

fn default_output() -> PathBuf {
    PathBuf::from("runs/default")
}
fn default_log_every() -> usize {
    10
}
fn default_keep() -> usize {
    2
}

impl Default for RunSpec {
    fn default() -> Self {
        RunSpec {
            output_dir: default_output(),
            seed: 0,
            threads: None,
            log_every: 10,
            save_every: 0,
            keep_last: 2,
            nonfinite: NonFinite::Skip,
            report_to: None,
            wandb_project: None,
            wandb_entity: None,
            wandb_name: None,
            wandb_run_id: None,
            wandb_group: None,
            wandb_tags: None,
        }
    }
}

/// One `[[stage]]`, by `kind`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Stage {
    /// Supervised fine-tuning / long-CoT mid-training (next-token loss on assistant tokens).
    Sft(SftStage),
    /// Direct preference optimisation over (prompt, chosen, rejected) pairs.
    Dpo(crate::dpo::DpoStage),
    /// Rollout-DPO: pairs of verified-correct and incorrect rollouts per problem, then DPO on them.
    RolloutDpo(crate::dpo::RolloutDpoStage),
    /// GRPO-family RL with verifiable rewards.
    Grpo(crate::grpo::GrpoStage),
}

impl Stage {
    pub fn name(&self, index: usize) -> String {
        match self {
            Stage::Sft(s) => s.name.clone(),
            Stage::Dpo(s) => s.name.clone(),
            Stage::RolloutDpo(s) => s.name.clone(),
            Stage::Grpo(s) => s.name.clone(),
        }
        .unwrap_or_else(|| format!("{}{index}", self.kind()))
    }
    /// The stage's `gradient_checkpointing` key.
    pub fn gradient_checkpointing(&self) -> bool {
        match self {
            Stage::Sft(s) => s.gradient_checkpointing,
            Stage::Dpo(s) => s.gradient_checkpointing,
            Stage::RolloutDpo(s) => s.gradient_checkpointing,
            Stage::Grpo(s) => s.gradient_checkpointing,
        }
    }
    /// The stage's optimizer keys.
    pub fn optim(&self) -> crate::stage::OptimArgs {
        match self {
            Stage::Sft(s) => s.optim(),
            Stage::Dpo(s) => s.optim(),
            Stage::RolloutDpo(s) => s.optim(),
            Stage::Grpo(s) => s.optim(),
        }
    }
    pub fn kind(&self) -> &'static str {
        match self {
            Stage::Sft(_) => "sft",
            Stage::Dpo(_) => "dpo",
            Stage::RolloutDpo(_) => "rollout_dpo",
            Stage::Grpo(_) => "grpo",
        }
    }
}

/// Training data: a dataset, or the seeded synthetic arithmetic generator.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SyntheticSpec {
    /// Number of problems.
    pub count: usize,
    /// Index of the first problem (problem i depends only on the seed and i, so ranges don't overlap).
    #[serde(default)]
    pub start: u64,
    /// Generator settings.
    #[serde(default)]
    pub arithmetic: ArithmeticConfig,
}

/// Held-out evaluation during and after a stage.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    /// Evaluate every N optimizer steps (0: only before and after the stage).
    #[serde(default)]
    pub every: usize,
    /// Held-out problems (prompt with gold answer) for greedy accuracy.
    #[serde(default)]
    pub synthetic: Option<SyntheticSpec>,
    /// Held-out problems from a dataset (prompt with gold answer).
    #[serde(default)]
    pub data: Option<DataConfig>,
    /// Generation length for accuracy.
    #[serde(default = "default_eval_tokens")]
    pub max_new_tokens: usize,
    /// Sampling temperature (0: greedy decoding). With `samples` > 1 the accuracy is pass@1 averaged over the
    /// samples, as DeepSeek-R1 and Phi-4-mini-reasoning report it (temperature 0.6).
    #[serde(default)]
    pub temperature: f64,
    /// Samples per problem (at `temperature` > 0).
    #[serde(default = "one_usize")]
    pub samples: usize,
    /// Sampling seed: every evaluation of a run draws the same random numbers.
    #[serde(default)]
    pub seed: u64,
}

fn one_usize() -> usize {
    1
}

impl EvalSpec {
    /// What the accuracy means, for messages: "greedy" or "pass@1 of 4 samples at T 0.6".
    pub fn describe(&self) -> String {
        if self.temperature == 0.0 {
            "greedy".into()
        } else {
            format!("pass@1 of {} sample{} at T {}", self.samples, if self.samples == 1 { "" } else { "s" }, self.temperature)
        }
    }
}

fn default_eval_tokens() -> usize {
    16
}

crate::stage::training_stage! {
    /// `kind = "sft"`.
    pub struct SftStage {
        /// Dataset (conversations, or prompt with completion / answer).
        #[serde(default)]
        pub data: Option<DataConfig>,
        /// Synthetic arithmetic conversations instead of a dataset.
        #[serde(default)]
        pub synthetic: Option<SyntheticSpec>,
        /// Tokenization: `max_length`, `loss_on`, `truncation`, `add_eos`, `template_kwargs` (the keys below).
        #[serde(default)]
        pub tokenize: TokenizeConfig,
        /// Pack examples into rows of `max_length` tokens (best-fit decreasing, no cross-document attention).
        #[serde(default)]
        pub packing: bool,
        /// Passes over the data (used when `max_steps` is not set).
        #[serde(default = "default_epochs", alias = "num_train_epochs")]
        pub epochs: f64,
        /// Rows per micro-batch.
        #[serde(default = "default_batch", alias = "per_device_train_batch_size")]
        pub batch_size: usize,
        /// Micro-batches per optimizer step.
        #[serde(default = "one", alias = "gradient_accumulation_steps")]
        pub grad_accum: usize,
        /// Peak learning rate.
        #[serde(default = "default_lr", alias = "learning_rate")]
        pub lr: f64,
    }
}

fn default_epochs() -> f64 {
    1.0
}
fn default_batch() -> usize {
    8
}
fn one() -> usize {
    1
}
fn default_lr() -> f64 {
    1e-5
}

/// Keys whose change does not affect results: allowed when resuming.
pub const HARMLESS_KEYS: &[&str] = &[
    "run.log_every",
    "run.threads",
    "run.save_every",
    "run.keep_last",
    "run.output_dir",
    "run.report_to",
    "run.wandb_project",
    "run.wandb_entity",
    "run.wandb_name",
    "run.wandb_run_id",
    "run.wandb_group",
    "run.wandb_tags",
    "model.device",
];

/// Line (1-based) of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The first line at or after `from` (1-based) that assigns `key`.
fn key_line(text: &str, from: usize, key: &str) -> Option<usize> {
    text.lines().enumerate().skip(from.saturating_sub(1)).find_map(|(i, l)| {
        let rest = l.trim_start().strip_prefix(key)?;
        rest.trim_start().starts_with('=').then_some(i + 1)
    })
}

/// The line (1-based) of the key, in the table whose header is on line `header`, holding the value that a
/// serde "invalid type: string \"x\"" / "invalid value: integer `-1`" message names.
fn value_line(text: &str, header: usize, msg: &str) -> Option<usize> {
    let rest = msg.strip_prefix("invalid type: ").or_else(|| msg.strip_prefix("invalid value: "))?;
    let literal = if let Some(r) = rest.strip_prefix("string \"") {
        format!("\"{}\"", r.split('"').next()?)
    } else {
        let r = rest.split_once(' ')?.1;
        let r = r.strip_prefix('`')?;
        r.split('`').next()?.to_string()
    };
    let lines: Vec<&str> = text.lines().collect();
    let in_table = lines.get(header.checked_sub(1)?)?.trim_start().starts_with('[');
    if !in_table {
        return None;
    }
    (header..lines.len()).take_while(|&i| !lines[i].trim_start().starts_with('[')).find_map(|i| {
        let value = lines[i].split_once('=')?.1;
        let value = value.split(" #").next()?.trim();
        (value == literal).then_some(i + 1)
    })
}

/// Levenshtein distance (for did-you-mean).
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push((prev[j] + (ca != *cb) as usize).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Adds a did-you-mean to serde's "unknown field `x`, expected one of `a`, `b`" messages.
fn did_you_mean(msg: &str) -> String {
    let Some(rest) = msg.strip_prefix("unknown field `") else { return msg.to_string() };
    let Some((field, expected)) = rest.split_once('`') else { return msg.to_string() };
    let options: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    let best = options.iter().map(|o| (distance(field, o), *o)).min();
    match best {
        Some((d, o)) if d <= 3.max(field.len() / 3) => format!("unknown key `{field}` (did you mean `{o}`?)"),
        _ => format!("unknown key `{field}`; expected one of {}", options.iter().map(|o| format!("`{o}`")).collect::<Vec<_>>().join(", ")),
    }
}

/// Applies one `--set key.path=value` override (value parsed as TOML, else taken as a string);
/// `stage.1.lr` addresses the second `[[stage]]`.
fn apply_override(doc: &mut toml::Table, spec: &str) -> Result<()> {
    let Some((path, raw)) = spec.split_once('=') else { bail!("--set {spec}: expected key.path=value") };
    let value: toml::Value = match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap(),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = path.trim().split('.').collect();
    let mut root = toml::Value::Table(std::mem::take(doc));
    let mut cur = &mut root;
    let mut result = Ok(());
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let next = match cur {
            toml::Value::Table(t) if last => {
                t.insert(part.to_string(), value.clone());
                break;
            }
            toml::Value::Table(t) => t.entry(part.to_string()).or_insert_with(|| toml::Value::Table(Default::default())),
            toml::Value::Array(a) => match part.parse::<usize>().ok().filter(|&k| k < a.len()) {
                Some(k) if last => {
                    a[k] = value.clone();
                    break;
                }
                Some(k) => &mut a[k],
                None => {
                    result = Err(anyhow::anyhow!("--set {spec}: `{part}` is not an index of a list of {} entries", a.len()));
                    break;
                }
            },
            _ => {
                result = Err(anyhow::anyhow!("--set {spec}: `{}` is not a table", parts[..i].join(".")));
                break;
            }
        };
        cur = next;
    }
    if let toml::Value::Table(t) = root {
        *doc = t;
    }
    result
}

/// Reads, overrides and validates a recipe (all problems are collected and reported together); with `missing_ok`, files and directories that do not exist yet (a model or dataset the user
/// will provide) are returned as warnings instead of errors (for `--dry-run`).
pub fn load_with(path: &Path, overrides: &[String], missing_ok: bool) -> Result<(Recipe, Vec<String>)> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    parse_with(&text, &path.display().to_string(), overrides, path.parent().unwrap_or(Path::new(".")), missing_ok)
}

/// As [`load_with`], from text; `origin` names the file in messages, relative paths resolve against `base`.
fn parse_with(text: &str, origin: &str, overrides: &[String], base: &Path, missing_ok: bool) -> Result<(Recipe, Vec<String>)> {
    let mut errors: Vec<String> = vec![];
    // Collect unknown-key and type errors one by one: blank out the offending line and parse again.
    let mut work = text.to_string();
    let mut recipe: Option<Recipe> = None;
    for _ in 0..64 {
        let mut doc: toml::Table = match work.parse() {
            Ok(d) => d,
            Err(e) => {
                let line = e.span().map(|s| line_of(&work, s.start)).unwrap_or(0);
                errors.push(format!("{origin}:{line}: {}", e.message().trim()));
                break;
            }
        };
        for o in overrides {
            if let Err(e) = apply_override(&mut doc, o) {
                errors.push(e.to_string());
            }
        }
        if !errors.is_empty() && errors.iter().any(|e| e.starts_with("--set")) {
            break;
        }
        let as_text = if overrides.is_empty() { work.clone() } else { toml::to_string(&doc).unwrap_or_default() };
        match toml::from_str::<Recipe>(&as_text) {
            Ok(r) => {
                recipe = Some(r);
                break;
            }
            Err(e) => {
                let msg = did_you_mean(e.message().trim());
                match e.span() {
                    Some(s) if overrides.is_empty() => {
                        let mut line = line_of(&work, s.start);
                        // Inside [[stage]] tables serde reports the table's header; find the key's own line.
                        if let Some(key) = msg.strip_prefix("unknown key `").and_then(|r| r.split('`').next()) {
                            if let Some(l) = key_line(&work, line, key) {
                                line = l;
                            }
                        } else if let Some(l) = value_line(&work, line, &msg) {
                            // a wrong type or value: the line in that table holding the value serde names
                            line = l;
                        }
                        let fatal = msg.starts_with("unknown variant") || msg.starts_with("missing field");
                        errors.push(format!("{origin}:{line}: {msg}"));
                        // blank the line and look for more problems
                        let mut lines: Vec<&str> = work.lines().collect();
                        if fatal || line == 0 || line > lines.len() || lines[line - 1].trim().is_empty() || lines[line - 1].trim_start().starts_with('[') {
                            break;
                        }
                        lines[line - 1] = "";
                        work = lines.join("\n");
                    }
                    _ => {
                        errors.push(format!("{origin}: {msg}"));
                        break;
                    }
                }
            }
        }
    }
    let Some(mut recipe) = recipe.filter(|_| errors.is_empty()) else {
        bail!("{} problem(s) in the recipe:\n  {}", errors.len().max(1), if errors.is_empty() { "invalid recipe".into() } else { errors.join("\n  ") });
    };
    // `--set model.path=""` removes the path (e.g. to swap in an inline `config`)
    if recipe.model.path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
        recipe.model.path = None;
    }
    resolve_paths(&mut recipe, base);
    let (warnings, problems): (Vec<String>, Vec<String>) = validate(&recipe, origin).into_iter().partition(|p| missing_ok && p.contains(" does not exist"));
    if !problems.is_empty() {
        bail!("{} problem(s) in the recipe:\n  {}", problems.len(), problems.join("\n  "));
    }
    Ok((recipe, warnings))
}

fn resolve(base: &Path, p: &mut PathBuf) {
    // `~/` is the home directory (e.g. the caches scripts/ fill: ~/.cache/whet/...)
    if let (Ok(rest), Some(home)) = (p.strip_prefix("~"), std::env::var_os("HOME")) {
        *p = PathBuf::from(home).join(rest);
    }
    if p.is_relative() && !p.as_os_str().is_empty() {
        let joined = base.join(&*p);
        // Prefer the recipe-relative path; keep the given one if only it exists (run from the repo root).
        if joined.exists() || !p.exists() {
            *p = joined;
        }
    }
}

fn resolve_paths(r: &mut Recipe, base: &Path) {
    if let Some(p) = r.model.path.as_mut() {
        resolve(base, p);
    }
    for s in &mut r.stage {
        match s {
            Stage::Sft(s) => {
                if let Some(d) = s.data.as_mut() {
                    resolve(base, &mut d.path);
                }
                if let Some(d) = s.eval.as_mut().and_then(|e| e.data.as_mut()) {
                    resolve(base, &mut d.path);
                }
            }
            Stage::Dpo(s) => s.resolve_paths(&mut |p| resolve(base, p)),
            Stage::RolloutDpo(s) => s.resolve_paths(&mut |p| resolve(base, p)),
            Stage::Grpo(s) => s.resolve_paths(&mut |p| resolve(base, p)),
        }
    }
}

/// Checks combinations and files; returns every problem found.
pub fn validate(r: &Recipe, origin: &str) -> Vec<String> {
    let mut p = vec![];
    match (&r.model.path, &r.model.config) {
        (Some(_), Some(_)) => p.push(format!("{origin}: [model] has both `path` and `config`; give one")),
        (None, None) => p.push(format!("{origin}: [model] needs `path` (a model directory or .gguf) or `config` (random init)")),
        (Some(path), None) if !path.exists() => p.push(format!("{origin}: [model] path {} does not exist", path.display())),
        _ => {}
    }
    if r.model.config.is_some() && r.model.tokenizer.is_none() {
        p.push(format!("{origin}: [model] with an inline `config` needs `tokenizer` (a directory, or \"builtin:bytes\")"));
    }
    if let Err(e) = model::parse_kind(&r.model.dtype) {
        p.push(format!("{origin}: [model] dtype: {e}"));
    }
    if let Err(e) = model::runtime::parse_device(&r.model.device) {
        p.push(format!("{origin}: [model] device: {e}"));
    }
    match (r.model.mixed_precision.as_deref(), r.model.dtype.as_str()) {
        (None | Some("no"), _) => {}
        (Some("bf16"), "float16" | "fp16" | "f16" | "half") => {
            p.push(format!("{origin}: [model] mixed_precision = \"bf16\" keeps fp32 weights; dtype = \"{}\" contradicts it (leave dtype out)", r.model.dtype))
        }
        (Some("bf16"), _) => {}
        (Some(m), _) => p.push(format!("{origin}: [model] mixed_precision: unknown value \"{m}\" (expected \"bf16\" or \"no\")")),
    }
    r.model.validate_precision(origin, &mut p);
    if let Some(cfg) = &r.model.config {
        if let Err(e) = model::ModelConfig::from_json(cfg.clone(), &format!("{origin} [model.config]")) {
            p.push(e.to_string());
        }
    }
    crate::wandb::validate(&r.run, origin, &mut p);
    if r.generation.max_batch_seqs == 0 {
        p.push(format!("{origin}: [generation] max_batch_seqs must be at least 1"));
    }
    if r.generation.cache_budget_tokens < 2 {
        p.push(format!("{origin}: [generation] cache_budget_tokens must be at least 2, got {}", r.generation.cache_budget_tokens));
    }
    if r.stage.is_empty() {
        p.push(format!("{origin}: no [[stage]]: nothing to train"));
    }
    for (i, s) in r.stage.iter().enumerate() {
        let at = format!("{origin}: stage {} ({})", i + 1, s.name(i));
        match s {
            Stage::Sft(s) => {
                match (&s.data, &s.synthetic) {
                    (None, None) => p.push(format!("{at}: needs `data` or `synthetic`")),
                    (Some(_), Some(_)) => p.push(format!("{at}: has both `data` and `synthetic`; give one")),
                    (Some(d), None) if !d.path.exists() => p.push(format!("{at}: data path {} does not exist", d.path.display())),
                    _ => {}
                }
                if s.batch_size == 0 || s.grad_accum == 0 {
                    p.push(format!("{at}: batch_size and grad_accum must be at least 1"));
                }
                s.optim().validate(&at, &mut p);
                if s.max_steps == Some(0) || (s.max_steps.is_none() && s.epochs <= 0.0) {
                    p.push(format!("{at}: needs max_steps ≥ 1 or epochs > 0"));
                }
                if s.tokenize.max_length < 2 {
                    p.push(format!("{at}: tokenize.max_length must be at least 2"));
                }
                crate::stage::validate_eval(&s.eval, &at, &mut p);
            }
            Stage::Dpo(s) => s.validate(&at, &mut p),
            Stage::RolloutDpo(s) => s.validate(&at, &mut p),
            Stage::Grpo(s) => s.validate(&at, &mut p),
        }
    }
    p
}

/// The recipe as JSON with harmless keys removed, to compare a resumed run with its checkpoint.
pub fn fingerprint(r: &Recipe) -> serde_json::Value {
    let mut v = serde_json::to_value(r).unwrap();
    for k in HARMLESS_KEYS {
        let (a, b) = k.split_once('.').unwrap();
        if let Some(o) = v.get_mut(a).and_then(|x| x.as_object_mut()) {
            o.remove(b);
        }
    }
    v
}

/// Dotted paths where two fingerprints differ.
pub fn differences(a: &serde_json::Value, b: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
    use serde_json::Value::*;
    match (a, b) {
        (Object(x), Object(y)) => {
            let mut keys: Vec<&std::string::String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                // a key absent on one side equals null (a checkpoint written before an optional key existed)
                let null = Null;
                differences(x.get(k).unwrap_or(&null), y.get(k).unwrap_or(&null), &p, out);
            }
        }
        (Array(x), Array(y)) if x.len() == y.len() => {
            for (i, (u, w)) in x.iter().zip(y).enumerate() {
                differences(u, w, &format!("{prefix}.{i}"), out);
            }
        }
        _ if a != b => out.push(prefix.to_string()),
        _ => {}
    }
}
