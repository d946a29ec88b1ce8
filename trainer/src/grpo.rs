//! The GRPO stage (being built; see issue 8).

use anyhow::{bail, Result};
use model::Model;
use std::path::PathBuf;

use crate::checkpoint::Checkpoint;
use crate::run::Ctx;

crate::stage::training_stage! {
    /// `kind = "grpo"`.
    pub struct GrpoStage {
        /// Peak learning rate.
        #[serde(default = "default_lr", alias = "learning_rate")]
        pub lr: f64,
    }
}

fn default_lr() -> f64 {
    1e-6
}

impl GrpoStage {
    pub fn resolve_paths(&mut self, _f: &mut dyn FnMut(&mut PathBuf)) {}
    pub fn validate(&self, at: &str, p: &mut Vec<String>) {
        self.optim().validate(at, p);
        crate::stage::validate_eval(&self.eval, at, p);
    }
    pub fn plan(&self) -> String {
        String::new()
    }
}

pub fn run(_ctx: &Ctx, _index: usize, _s: &GrpoStage, _model: &Model, _resume: Option<&Checkpoint>) -> Result<f64> {
    bail!("kind = \"grpo\" is not built yet")
}
