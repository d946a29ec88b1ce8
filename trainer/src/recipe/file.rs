//! [`Recipe`]: the whole file as the stages and the runner read it, and its fingerprint (what a resumed run is
//! compared against).

use serde::{Deserialize, Serialize};

use crate::settings::{GenerationSpec, ModelSpec, RunSpec};
use crate::stages::Stage;

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

/// Keys whose change does not affect results: allowed when resuming.
pub const HARMLESS_KEYS: &[&str] = &[
    "run.log_every",
    "run.threads",
    // the checkpoint holds the unsharded state whatever the mode (training::sharding)
    "run.sharding",
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
