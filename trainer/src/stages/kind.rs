//! [`StageKind`]: the interface every stage kind implements.

use anyhow::Result;
use model::Model;
use std::path::PathBuf;

use crate::settings::GenerationSpec;
use crate::training::checkpoint::Checkpoint;
use crate::training::memory::StageShape;
use crate::training::{Ctx, TrainingKeys};

/// What every stage kind provides besides the keys every trained stage has ([`TrainingKeys`]).
pub trait StageKind: TrainingKeys {
    /// Points `f` at every file path of the table (resolved against the recipe's folder).
    fn resolve_paths(&mut self, f: &mut dyn FnMut(&mut PathBuf));
    /// Problems with the table's own keys, each prefixed by `at` (the common keys are checked by `Stage`).
    fn validate(&self, at: &str, p: &mut Vec<String>);
    /// The `--dry-run` plan line: data, steps, batch, learning rate.
    fn plan(&self) -> String;
    /// What a step holds besides the model, for the memory plan (`generation`: the run's `[generation]`).
    fn memory_shape(&self, generation: &GenerationSpec) -> StageShape;
    /// Trains `model` in place as stage `index` of the recipe, named `name`, continuing from `resume` (a
    /// mid-stage checkpoint of this stage, whose `TrainState::extra` holds what the kind saved there); writes the
    /// stage's checkpoints and final model; returns the held-out accuracy after the stage (NaN without `eval`).
    fn run(&self, ctx: &Ctx, index: usize, name: &str, model: &Model, resume: Option<&Checkpoint>) -> Result<f64>;
}

/// KV-cache token slots of the rollout engine sampling `rows` sequences of up to `len` tokens: a wave holds at
/// most `max_batch_seqs` rows and `cache_budget_tokens` slots.
pub fn kv_slots(g: &GenerationSpec, rows: usize, len: usize) -> i64 {
    ((rows.min(g.max_batch_seqs) * len) as i64).min(g.cache_budget_tokens)
}
