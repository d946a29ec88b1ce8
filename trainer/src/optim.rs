//! AdamW written over owned tensors so that its state can be checkpointed (tch cannot save optimizer
//! state), learning-rate schedules, and gradient clipping that reports the norm.
//!
//! AdamW: Loshchilov & Hutter 2019 (arXiv 1711.05101), in PyTorch's formulation (torch.optim.AdamW):
//!   p ← p − lr·λ·p;  m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;
//!   p ← p − (lr / (1−β1ᵗ)) · m / (√v / √(1−β2ᵗ) + ε).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    /// Parameters in a fixed order, with their names and whether weight decay applies.
    params: Vec<(String, Tensor, bool)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    pub step: i64,
}

/// Norms and biases get no weight decay (as TRL / transformers' Trainer do).
pub fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.contains("norm"))
}

impl AdamW {
    pub fn new(params: Vec<(String, Tensor)>, cfg: AdamWConfig) -> AdamW {
        let m = params.iter().map(|(_, p)| Tensor::zeros_like(p).to_kind(Kind::Float)).collect();
        let v = params.iter().map(|(_, p)| Tensor::zeros_like(p).to_kind(Kind::Float)).collect();
        let params = params.into_iter().map(|(n, p)| (n.clone(), p, decays(&n))).collect();
        AdamW { cfg, params, m, v, step: 0 }
    }

    /// One update at learning rate `lr` from the gradients currently held by the parameters.
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let t = self.step as f64;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powf(t);
        let bc2_sqrt = (1.0 - b2.powf(t)).sqrt();
        tch::no_grad(|| {
            for (i, (_, p, decay)) in self.params.iter_mut().enumerate() {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let g = g.to_kind(Kind::Float);
                if *decay && self.cfg.weight_decay != 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * self.cfg.weight_decay);
                }
                let _ = self.m[i].g_mul_scalar_(b1).g_add_(&(&g * (1.0 - b1)));
                let _ = self.v[i].g_mul_scalar_(b2).g_add_(&(g.square() * (1.0 - b2)));
                let denom = (self.v[i].sqrt() / bc2_sqrt) + self.cfg.eps;
                let update = (&self.m[i] / denom) * (-lr / bc1);
                let _ = p.g_add_(&update.to_kind(p.kind()));
            }
        });
    }

    pub fn zero_grad(&mut self) {
        for (_, p, _) in &mut self.params {
            p.zero_grad();
        }
    }

    /// Global L2 norm of all gradients; when `max_norm > 0` scales them down to at most `max_norm`
    /// (coefficient min(1, max_norm / (norm + 1e-6)), as torch.nn.utils.clip_grad_norm_). Returns the norm
    /// before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let grads: Vec<Tensor> = self.params.iter().map(|(_, p, _)| p.grad()).filter(|g| g.defined()).collect();
        if grads.is_empty() {
            return 0.0;
        }
        let norms: Vec<Tensor> = grads.iter().map(|g| g.to_kind(Kind::Float).norm()).collect();
        let total = Tensor::stack(&norms, 0).norm();
        let total_f = total.double_value(&[]);
        if max_norm > 0.0 && total_f.is_finite() {
            let coef = (max_norm / (total_f + 1e-6)).min(1.0);
            if coef < 1.0 {
                tch::no_grad(|| {
                    for mut g in grads {
                        let _ = g.g_mul_scalar_(coef);
                    }
                });
            }
        }
        total_f
    }

    /// Saves moments and step (safetensors; names `m.<param>`, `v.<param>`, `step`).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut ts: Vec<(String, Tensor)> = vec![("step".into(), Tensor::from_slice(&[self.step]))];
        for (i, (n, _, _)) in self.params.iter().enumerate() {
            ts.push((format!("m.{n}"), self.m[i].shallow_clone()));
            ts.push((format!("v.{n}"), self.v[i].shallow_clone()));
        }
        model::weights::write_safetensors(path, &ts, None)?;
        Ok(())
    }

    pub fn load(&mut self, path: &Path) -> Result<()> {
        let map: HashMap<String, Tensor> = Tensor::read_safetensors(path)
            .with_context(|| format!("reading optimizer state {}", path.display()))?
            .into_iter()
            .collect();
        let step = map.get("step").with_context(|| format!("{}: no `step`", path.display()))?;
        self.step = step.int64_value(&[0]);
        for (i, (n, p, _)) in self.params.iter().enumerate() {
            for (key, dst) in [(format!("m.{n}"), &mut self.m[i]), (format!("v.{n}"), &mut self.v[i])] {
                let src = map.get(&key).with_context(|| format!("{}: missing `{key}`", path.display()))?;
                if src.size() != p.size() {
                    bail!("{}: `{key}` has shape {:?}, parameter has {:?}", path.display(), src.size(), p.size());
                }
                tch::no_grad(|| dst.copy_(src));
            }
        }
        Ok(())
    }
}

/// Learning-rate schedule with linear warmup (as transformers' get_*_schedule_with_warmup).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    Linear,
    #[default]
    Cosine,
}

/// lr at optimizer step `step` (0-based) of `total`: warmup from 0 over `warmup` steps, then constant,
/// linear decay or half-cosine decay to `min_ratio · peak`.
pub fn lr_at(schedule: Schedule, peak: f64, step: usize, total: usize, warmup: usize, min_ratio: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).clamp(0.0, 1.0);
    let floor = peak * min_ratio;
    match schedule {
        Schedule::Constant => peak,
        Schedule::Linear => floor + (peak - floor) * (1.0 - progress),
        Schedule::Cosine => floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{self, OptimizerConfig};
    use tch::Device;

    #[test]
    fn adamw_matches_libtorch_adamw() {
        model::runtime::preload_cuda();
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let w = vs.root().randn("w", &[5, 3], 0.0, 1.0);
        let b = vs.root().randn("b", &[3], 0.0, 1.0);
        let mut reference = nn::AdamW { beta1: 0.9, beta2: 0.95, wd: 0.1, eps: 1e-8, amsgrad: false }.build(&vs, 1e-2).unwrap();
        // ours on copies (all with decay, as libtorch applies wd to every parameter)
        let w2 = w.detach().copy().set_requires_grad(true);
        let b2 = b.detach().copy().set_requires_grad(true);
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
        let mut ours = AdamW::new(vec![("w".into(), w2.shallow_clone()), ("b_weight".into(), b2.shallow_clone())], cfg);
        let x = Tensor::randn([4, 5], (Kind::Float, Device::Cpu));
        for _ in 0..5 {
            reference.zero_grad();
            (x.matmul(&w) + &b).square().sum(Kind::Float).backward();
            reference.step();
            ours.zero_grad();
            (x.matmul(&w2) + &b2).square().sum(Kind::Float).backward();
            ours.step(1e-2);
        }
        let d = (&w - &w2).abs().max().double_value(&[]).max((&b - &b2).abs().max().double_value(&[]));
        assert!(d < 1e-6, "AdamW differs from libtorch's by {d}");
    }

    #[test]
    fn clipping_scales_to_max_norm_and_reports_the_norm() {
        let p = Tensor::from_slice(&[3.0f32, 4.0]).set_requires_grad(true);
        (&p * &p).sum(Kind::Float).backward(); // grad = 2p = (6, 8), norm 10
        let mut opt = AdamW::new(vec![("p".into(), p.shallow_clone())], AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 });
        let n = opt.clip_grad_norm(5.0);
        assert!((n - 10.0).abs() < 1e-5);
        let g: Vec<f32> = Vec::try_from(p.grad()).unwrap();
        assert!((g[0] - 3.0).abs() < 1e-4 && (g[1] - 4.0).abs() < 1e-4, "{g:?}");
    }

    #[test]
    fn schedules_follow_their_formulas() {
        assert_eq!(lr_at(Schedule::Cosine, 1.0, 0, 100, 10, 0.0), 0.1);
        assert!((lr_at(Schedule::Cosine, 1.0, 9, 100, 10, 0.0) - 1.0).abs() < 1e-12);
        assert!((lr_at(Schedule::Cosine, 1.0, 10, 100, 10, 0.0) - 1.0).abs() < 1e-12);
        assert!((lr_at(Schedule::Cosine, 1.0, 55, 100, 10, 0.0) - 0.5).abs() < 1e-12);
        assert!((lr_at(Schedule::Cosine, 1.0, 100, 100, 10, 0.1) - 0.1).abs() < 1e-12);
        assert!((lr_at(Schedule::Linear, 2.0, 55, 100, 10, 0.0) - 1.0).abs() < 1e-12);
        assert_eq!(lr_at(Schedule::Constant, 3.0, 70, 100, 10, 0.0), 3.0);
    }

    #[test]
    fn norms_and_biases_get_no_weight_decay() {
        assert!(decays("model.layers.0.mlp.up_proj.weight"));
        assert!(!decays("model.layers.0.self_attn.q_proj.bias"));
        assert!(!decays("model.layers.0.input_layernorm.weight"));
        assert!(!decays("model.norm.weight"));
        assert!(!decays("model.layers.1.self_attn.q_norm.weight"));
    }
}
