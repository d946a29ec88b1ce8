//! [`StageKind`]: the interface every stage kind implements.

use anyhow::Result;
use model::Model;
use std::path::PathBuf;

use crate::training::checkpoint::Checkpoint;
use crate::training::{Ctx, TrainingKeys};

/// What every stage kind provides besides the keys every trained stage has ([`TrainingKeys`]).
pub trait StageKind: TrainingKeys {
    /// Points `f` at every file path of the table (resolved against the recipe's folder).
    fn resolve_paths(&mut self, f: &mut dyn FnMut(&mut PathBuf));
    /// Problems with the table's own keys, each prefixed by `at` (the common keys are checked by `Stage`).
    fn validate(&self, at: &str, p: &mut Vec<String>);
    /// The `--dry-run` plan line: data, steps, batch, learning rate.
    fn plan(&self) -> String;
    /// Trains `model` in place as stage `index` of the recipe, named `name`, continuing from `resume` (a
    /// mid-stage checkpoint of this stage, whose `TrainState::extra` holds what the kind saved there); writes the
    /// stage's checkpoints and final model; returns the held-out accuracy after the stage (NaN without `eval`).
    fn run(&self, ctx: &Ctx, index: usize, name: &str, model: &Model, resume: Option<&Checkpoint>) -> Result<f64>;
}
