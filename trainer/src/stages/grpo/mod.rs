//! The GRPO-family RL stage with verifiable rewards (stage 4 of Phi-4-Mini-Reasoning).
//!
//! Each step: draw prompts; the rollout engine samples G completions per prompt from the very tensors being
//! trained; the rewards crate scores them; advantages per group; `num_iterations` (μ) optimizer updates over
//! the batch with the clipped surrogate against the log-probabilities of the policy that sampled. Around that
//! core: dynamic sampling, oversample-then-balance, overlong filtering, pilot-pass-rate prompt filtering,
//! temperature annealing, domain-aware sampling and a token budget per step.
//!
//! - `config`: the table (`kind = "grpo"`) and its checks;
//! - `sampling`: draw → generate → score, the prefilter;
//! - `update`: rows, log-probabilities, advantages, the μ policy updates;
//! - `run`: the loop, its checkpointed state and its metrics.

use anyhow::Result;
use model::Model;
use std::path::PathBuf;

use crate::training::checkpoint::Checkpoint;
use crate::training::Ctx;

mod config;
mod run;
mod sampling;
mod update;

pub use config::GrpoStage;

impl crate::stages::kind::StageKind for GrpoStage {
    fn resolve_paths(&mut self, f: &mut dyn FnMut(&mut PathBuf)) {
        GrpoStage::resolve_paths(self, f)
    }

    fn validate(&self, at: &str, p: &mut Vec<String>) {
        GrpoStage::validate(self, at, p)
    }

    fn plan(&self) -> String {
        GrpoStage::plan(self)
    }

    fn memory_shape(&self, g: &crate::settings::GenerationSpec) -> crate::training::memory::StageShape {
        let len = self.max_prompt_length + self.max_completion_length;
        crate::training::memory::StageShape {
            micro_tokens: (self.micro_batch_size * len) as i64,
            reference: self.kl_coef > 0.0,
            sampling: Some((super::kind::kv_slots(g, self.prompts_per_step * self.num_generations, len), g.fuse_weights)),
            checkpointing: self.gradient_checkpointing,
            logit_rows: self.loss_chunk as i64,
            accumulates: self.micro_batch_size < self.prompts_per_step * self.num_generations,
        }
    }

    fn run(&self, ctx: &Ctx, index: usize, name: &str, model: &Model, resume: Option<&Checkpoint>) -> Result<f64> {
        run::run(ctx, index, name, self, model, resume)
    }
}
