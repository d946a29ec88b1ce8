//! The stage kinds a recipe's `[[stage]]` tables name, each a module implementing [`StageKind`]: its table
//! (keys, defaults and their checks), its plan line, and its run — the loop of steps, with the state it adds to
//! checkpoints (the interface is in `kind`). The runner (`cli::run`) sees only [`Stage`].
//!
//! - `sft`: supervised fine-tuning and long-CoT mid-training (next-token loss on assistant tokens);
//! - `dpo`: DPO and its variants on preference pairs, with cached reference log-probabilities;
//! - `rollout_dpo`: pairs of verified-correct and incorrect rollouts per problem, then `dpo`'s loop on them;
//! - `grpo`: GRPO-family RL with verifiable rewards.
//!
//! A new kind: a module here with its table (declared through `training::training_stage!`, which adds the keys
//! every trained stage has) and a `StageKind` impl, and one variant in [`Stage`].

use anyhow::Result;
use model::Model;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use crate::training::checkpoint::Checkpoint;
use crate::training::{Ctx, OptimArgs};

pub mod dpo;
pub mod grpo;
mod kind;
pub mod rollout_dpo;
pub mod sft;

pub use kind::StageKind;

/// One `[[stage]]`, by `kind`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Stage {
    /// Supervised fine-tuning / long-CoT mid-training (next-token loss on assistant tokens).
    Sft(sft::SftStage),
    /// Direct preference optimisation over (prompt, chosen, rejected) pairs.
    Dpo(dpo::DpoStage),
    /// Rollout-DPO: pairs of verified-correct and incorrect rollouts per problem, then DPO on them.
    RolloutDpo(rollout_dpo::RolloutDpoStage),
    /// GRPO-family RL with verifiable rewards.
    Grpo(grpo::GrpoStage),
}

impl Stage {
    fn table(&self) -> &dyn StageKind {
        match self {
            Stage::Sft(s) => s,
            Stage::Dpo(s) => s,
            Stage::RolloutDpo(s) => s,
            Stage::Grpo(s) => s,
        }
    }

    fn table_mut(&mut self) -> &mut dyn StageKind {
        match self {
            Stage::Sft(s) => s,
            Stage::Dpo(s) => s,
            Stage::RolloutDpo(s) => s,
            Stage::Grpo(s) => s,
        }
    }

    /// The `kind` key.
    pub fn kind(&self) -> &'static str {
        match self {
            Stage::Sft(_) => "sft",
            Stage::Dpo(_) => "dpo",
            Stage::RolloutDpo(_) => "rollout_dpo",
            Stage::Grpo(_) => "grpo",
        }
    }

    /// The stage's name in logs and output directories: its `name` key, else kind and index (`grpo3`).
    pub fn name(&self, index: usize) -> String {
        self.table().name_key().map(String::from).unwrap_or_else(|| format!("{}{index}", self.kind()))
    }

    /// The stage's `gradient_checkpointing` key.
    pub fn gradient_checkpointing(&self) -> bool {
        self.table().gradient_checkpointing()
    }

    /// The stage's optimizer keys.
    pub fn optim(&self) -> OptimArgs {
        self.table().optim()
    }

    /// Resolves the table's file paths (its own and its `[stage.eval]` data) with `f`.
    pub fn resolve_paths(&mut self, f: &mut dyn FnMut(&mut PathBuf)) {
        let table = self.table_mut();
        table.resolve_paths(f);
        if let Some(d) = table.eval_data_path() {
            f(d);
        }
    }

    /// Problems with the table: the kind's own keys, then the optimizer keys and the `[stage.eval]` table.
    pub fn validate(&self, at: &str, p: &mut Vec<String>) {
        let table = self.table();
        table.validate(at, p);
        table.optim().validate(at, p);
        if let Some(e) = table.eval_spec() {
            e.validate(at, p);
        }
    }

    /// The `--dry-run` plan line.
    pub fn plan(&self) -> String {
        self.table().plan()
    }

    /// What a step holds besides the model (see [`StageKind::memory_shape`]).
    pub fn memory_shape(&self, generation: &crate::settings::GenerationSpec) -> crate::training::memory::StageShape {
        self.table().memory_shape(generation)
    }

    /// Runs the stage (see [`StageKind::run`]).
    pub fn run(&self, ctx: &Ctx, index: usize, model: &Model, resume: Option<&Checkpoint>) -> Result<f64> {
        self.table().run(ctx, index, &self.name(index), model, resume)
    }
}
