//! DPO and Rollout-DPO stages (being built; see issue 7).

use anyhow::{bail, Result};
use model::Model;
use std::path::PathBuf;

use crate::checkpoint::Checkpoint;
use crate::run::Ctx;

crate::stage::training_stage! {
    /// `kind = "dpo"`.
    pub struct DpoStage {
        /// Peak learning rate.
        #[serde(default = "default_lr", alias = "learning_rate")]
        pub lr: f64,
    }
}

crate::stage::training_stage! {
    /// `kind = "rollout_dpo"`.
    pub struct RolloutDpoStage {
        /// Peak learning rate.
        #[serde(default = "default_lr", alias = "learning_rate")]
        pub lr: f64,
    }
}

fn default_lr() -> f64 {
    1e-6
}

impl DpoStage {
    pub fn resolve_paths(&mut self, _f: &mut dyn FnMut(&mut PathBuf)) {}
    pub fn validate(&self, at: &str, p: &mut Vec<String>) {
        self.optim().validate(at, p);
        crate::stage::validate_eval(&self.eval, at, p);
    }
    pub fn plan(&self) -> String {
        String::new()
    }
}

impl RolloutDpoStage {
    pub fn resolve_paths(&mut self, _f: &mut dyn FnMut(&mut PathBuf)) {}
    pub fn validate(&self, at: &str, p: &mut Vec<String>) {
        self.optim().validate(at, p);
        crate::stage::validate_eval(&self.eval, at, p);
    }
    pub fn plan(&self) -> String {
        String::new()
    }
}

pub fn run(_ctx: &Ctx, _index: usize, _s: &DpoStage, _model: &Model, _resume: Option<&Checkpoint>) -> Result<f64> {
    bail!("kind = \"dpo\" is not built yet")
}

pub fn run_rollout(_ctx: &Ctx, _index: usize, _s: &RolloutDpoStage, _model: &Model, _resume: Option<&Checkpoint>) -> Result<f64> {
    bail!("kind = \"rollout_dpo\" is not built yet")
}
