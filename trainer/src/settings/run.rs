//! `[run]`: output, seeds, checkpoint cadence, what to do with a non-finite gradient, and where metrics go.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// `[run] nonfinite`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum NonFinite {
    #[default]
    Skip,
    Stop,
}

/// `[run] sharding`: how the training state is spread over the data-parallel ranks (ZeRO, Rajbhandari et al.
/// 2020, arXiv 1910.02054).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Sharding {
    /// Every rank holds everything.
    #[default]
    None,
    /// ZeRO-1: AdamW moments and fp32 master weights sharded.
    Optimizer,
    /// ZeRO-2: gradients sharded too.
    Gradients,
    /// ZeRO-3 / FSDP: parameters sharded too, gathered one decoder layer at a time.
    Full,
}

impl Sharding {
    pub const ALL: [Sharding; 4] = [Sharding::None, Sharding::Optimizer, Sharding::Gradients, Sharding::Full];

    pub fn name(self) -> &'static str {
        match self {
            Sharding::None => "none",
            Sharding::Optimizer => "optimizer",
            Sharding::Gradients => "gradients",
            Sharding::Full => "full",
        }
    }
}

impl PartialOrd for Sharding {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        (*self as u8).partial_cmp(&(*other as u8))
    }
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
    #[serde(default, skip_serializing_if = "super::is_default")]
    #[schemars(extend("default" = "skip"))]
    pub nonfinite: NonFinite,
    /// How data parallelism spreads the training state over the ranks: "none" (every rank holds all of it),
    /// "optimizer" (ZeRO-1: each rank keeps AdamW's moments and the fp32 master weights of its 1/N of every
    /// flat parameter bucket, updates that part and all-gathers the weights), "gradients" (ZeRO-2: the summed
    /// gradients sharded too, reduced layer by layer under activation checkpointing), "full" (ZeRO-3: the
    /// weights sharded too, a decoder layer gathered around its forward and backward; needs
    /// gradient_checkpointing). The final weights equal "none"'s (ZeRO-1 bit for bit, ZeRO-2/3 within float
    /// rounding); checkpoints are the same files whatever the mode and world size.
    #[serde(default, skip_serializing_if = "super::is_default")]
    #[schemars(extend("default" = "none"))]
    pub sharding: Sharding,
    /// Where metrics go besides `metrics.jsonl` (TRL's `report_to`): "tensorboard", "wandb", "all" or "none",
    /// a string or a list. Default: TensorBoard, plus Weights & Biases when `WANDB_API_KEY` is set.
    #[serde(default, deserialize_with = "string_or_list")]
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
            sharding: Sharding::None,
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

/// The destinations `report_to` accepts.
pub const REPORTERS: &[&str] = &["tensorboard", "wandb", "all", "none"];

/// The `report_to` key accepts one name or a list (as TRL does).
fn string_or_list<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(Option::<OneOrMany>::deserialize(d)
        .map_err(|_| serde::de::Error::custom("report_to: expected a string or a list of strings"))?
        .map(|x| match x {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }))
}

impl RunSpec {
    /// Problems with the reporting keys.
    pub fn validate(&self, origin: &str, p: &mut Vec<String>) {
        for r in self.report_to.iter().flatten() {
            if !REPORTERS.contains(&r.as_str()) {
                p.push(format!("{origin}: [run] report_to: unknown destination \"{r}\" (expected tensorboard, wandb, all or none)"));
            }
        }
        if let Some(id) = &self.wandb_run_id {
            if let Err(e) = check_run_id(id) {
                p.push(format!("{origin}: [run] wandb_run_id: {e}"));
            }
        }
    }
}

/// A W&B run id is a URL path segment (the official client refuses "/" in ids).
pub fn check_run_id(id: &str) -> std::result::Result<(), String> {
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(format!("\"{id}\" must be 1-64 letters, digits, '-' or '_'"));
    }
    Ok(())
}
