//! The keys every trained stage has — name, steps, AdamW and its schedule, clipping, loss chunking, gradient
//! checkpointing, held-out evaluation — declared once by [`training_stage!`], and the optimizer built from them.

use anyhow::{bail, Result};
use model::Model;
use tch::Tensor;

use super::optim::{AdamW, AdamWConfig, Schedule};
use super::Ctx;

/// Declares a stage's recipe table: the given fields plus the keys every trained stage has (name, steps,
/// optimizer, schedule, clipping, loss chunking, held-out evaluation), with TRL's names as aliases.
/// The stage must declare `lr` itself (defaults differ by stage kind).
macro_rules! training_stage {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fm:meta])* pub $f:ident : $t:ty),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $($(#[$fm])* pub $f: $t,)*
            /// A name for logs and output directories.
            #[serde(default)]
            pub name: Option<String>,
            /// Optimizer steps (for SFT/DPO: overrides `epochs`).
            #[serde(default)]
            pub max_steps: Option<usize>,
            /// constant, linear or cosine (after linear warmup).
            #[serde(default, alias = "lr_scheduler_type")]
            pub schedule: crate::training::optim::Schedule,
            /// Warmup steps (overrides warmup_ratio).
            #[serde(default)]
            pub warmup_steps: Option<usize>,
            /// Warmup as a fraction of the steps.
            #[serde(default)]
            pub warmup_ratio: f64,
            /// Final learning rate as a fraction of the peak.
            #[serde(default)]
            pub min_lr_ratio: f64,
            /// Decoupled weight decay (not applied to norms and biases).
            #[serde(default)]
            pub weight_decay: f64,
            /// Adam β1.
            #[serde(default = "crate::training::stage_keys::default_b1", alias = "adam_beta1")]
            pub beta1: f64,
            /// Adam β2.
            #[serde(default = "crate::training::stage_keys::default_b2", alias = "adam_beta2")]
            pub beta2: f64,
            /// Adam ε.
            #[serde(default = "crate::training::stage_keys::default_eps", alias = "adam_epsilon")]
            pub eps: f64,
            /// Clip the global gradient norm to this (0: no clipping; the norm is logged either way).
            #[serde(default = "crate::training::stage_keys::one_f")]
            pub max_grad_norm: f64,
            /// Rows of hidden states projected to logits at once in the loss (bounds logits memory).
            #[serde(default = "crate::training::stage_keys::default_chunk")]
            pub loss_chunk: usize,
            /// Activation checkpointing (TRL's name): keep only each decoder layer's input in the forward and
            /// recompute the layer in the backward; less memory for long sequences, about one more forward of time.
            // not serialized when off, so that checkpoints written before this key existed still resume
            #[serde(default, skip_serializing_if = "std::ops::Not::not")]
            #[schemars(extend("default" = false))]
            pub gradient_checkpointing: bool,
            /// Held-out evaluation.
            #[serde(default)]
            pub eval: Option<crate::settings::EvalSpec>,
        }

        impl crate::training::TrainingKeys for $name {
            fn name_key(&self) -> Option<&str> {
                self.name.as_deref()
            }
            fn gradient_checkpointing(&self) -> bool {
                self.gradient_checkpointing
            }
            fn eval_spec(&self) -> Option<&crate::settings::EvalSpec> {
                self.eval.as_ref()
            }
            fn eval_data_path(&mut self) -> Option<&mut std::path::PathBuf> {
                self.eval.as_mut().and_then(|e| e.data.as_mut()).map(|d| &mut d.path)
            }
            fn optim(&self) -> crate::training::OptimArgs {
                crate::training::OptimArgs {
                    lr: self.lr,
                    schedule: self.schedule,
                    warmup_steps: self.warmup_steps,
                    warmup_ratio: self.warmup_ratio,
                    min_lr_ratio: self.min_lr_ratio,
                    adam: crate::training::optim::AdamWConfig { beta1: self.beta1, beta2: self.beta2, eps: self.eps, weight_decay: self.weight_decay },
                    max_grad_norm: self.max_grad_norm,
                }
            }
        }
    };
}
pub(crate) use training_stage;

/// The keys every trained stage has, as [`training_stage!`] declares them.
pub trait TrainingKeys {
    /// `name`, when the recipe gives one.
    fn name_key(&self) -> Option<&str>;
    /// `gradient_checkpointing`.
    fn gradient_checkpointing(&self) -> bool;
    /// The `[stage.eval]` table.
    fn eval_spec(&self) -> Option<&crate::settings::EvalSpec>;
    /// The `[stage.eval]` dataset's path, for resolving.
    fn eval_data_path(&mut self) -> Option<&mut std::path::PathBuf>;
    /// The optimizer and schedule keys.
    fn optim(&self) -> OptimArgs;
}

pub fn default_b1() -> f64 {
    0.9
}
pub fn default_b2() -> f64 {
    0.999
}
pub fn default_eps() -> f64 {
    1e-8
}
pub fn one_f() -> f64 {
    1.0
}
pub fn default_chunk() -> usize {
    4096
}

/// The optimizer keys of a stage.
#[derive(Debug, Clone)]
pub struct OptimArgs {
    pub lr: f64,
    pub schedule: Schedule,
    pub warmup_steps: Option<usize>,
    pub warmup_ratio: f64,
    pub min_lr_ratio: f64,
    pub adam: AdamWConfig,
    pub max_grad_norm: f64,
}

impl OptimArgs {
    /// Problems with the values, each prefixed by `at`.
    pub fn validate(&self, at: &str, p: &mut Vec<String>) {
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            p.push(format!("{at}: lr must be a positive number, got {}", self.lr));
        }
        if !(0.0..1.0).contains(&self.adam.beta1) || !(0.0..1.0).contains(&self.adam.beta2) {
            p.push(format!("{at}: beta1 and beta2 must be in [0, 1)"));
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) || !(0.0..=1.0).contains(&self.min_lr_ratio) {
            p.push(format!("{at}: warmup_ratio and min_lr_ratio must be in [0, 1]"));
        }
    }

    pub fn warmup(&self, total: usize) -> usize {
        self.warmup_steps.unwrap_or((self.warmup_ratio * total as f64).round() as usize)
    }

    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        crate::training::optim::lr_at(self.schedule, self.lr, step, total, self.warmup(total), self.min_lr_ratio)
    }

    /// AdamW over the model's trainable parameters (all of them, or its adapter's; gradients switched on),
    /// with the run's update precision, sharded over the ranks as `[run] sharding` says.
    pub fn optimizer(&self, ctx: &Ctx, model: &Model) -> Result<AdamW> {
        super::sharding::optimizer(ctx, trained(model), self.adam, ctx.model_spec.update_precision(ctx.run.seed))
    }

    #[cfg(test)]
    pub fn optimizer_with(&self, model: &Model, precision: crate::settings::UpdatePrecision) -> AdamW {
        AdamW::new(trained(model), self.adam, precision)
    }
}

/// The model's trainable parameters, gradients switched on.
fn trained(model: &Model) -> Vec<(String, Tensor)> {
    let params: Vec<(String, Tensor)> = model.net.trainable().iter().map(|(n, t)| (n.to_string(), t.shallow_clone())).collect();
    for (_, p) in &params {
        let _ = p.shallow_clone().requires_grad_(true);
    }
    params
}

/// Refuses rows longer than the model's positions (rotary positions past `max_position_embeddings` are
/// untrained): `what` says where the length `longest` comes from.
pub fn check_positions(model: &Model, name: &str, longest: usize, what: &str) -> Result<()> {
    let max = model.net.cfg.max_position_embeddings;
    if longest as i64 > max {
        bail!("[{name}] {what} is {longest} tokens, more than the model's max_position_embeddings ({max}); shorten the rows or use a model with more positions");
    }
    Ok(())
}
