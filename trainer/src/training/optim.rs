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

use super::precision::{dither_key, rounding_key, Slot};
use crate::settings::UpdatePrecision;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    /// The parameters (or, sharded, the pieces of them) this optimizer updates, with their state.
    params: Vec<Param>,
    /// Every trained parameter, in the model's order (clipping and zeroing see all gradients).
    all: Vec<(String, Tensor)>,
    /// Sharded data parallelism: which elements of each parameter this rank updates ([`crate::training::sharding`]).
    pub layout: Option<super::shard_layout::Layout>,
    /// Sharded gradients (ZeRO-2): this rank's block of each bucket's summed gradient.
    grad_shards: Option<Vec<Tensor>>,
    pub step: i64,
    precision: UpdatePrecision,
    /// Of the last step: elements whose update fp32 arithmetic keeps, and of those the ones the weights'
    /// storage lost (see precision::Slot::apply).
    lost: (i64, i64),
    /// The lost-update warning was printed (once per optimizer, i.e. per stage).
    warned: bool,
    /// Steps skipped for a non-finite gradient: in all, and in a row up to the last step.
    pub skipped: (usize, usize),
}

/// A parameter, or the piece of it this rank owns, with its optimizer state.
struct Param {
    name: String,
    /// The whole parameter.
    p: Tensor,
    /// Its place in the model's trained parameters (keys the dither and the stochastic rounding).
    index: usize,
    /// Its shape (the parameter itself is empty between uses under ZeRO-3).
    shape: Vec<i64>,
    /// Sharded: the elements `start..start + len` of the flattened parameter; `None`: all of it.
    piece: Option<(i64, i64)>,
    /// Sharded gradients: the piece's gradient, a view of its bucket's gradient shard.
    grad: Option<Tensor>,
    /// Sharded weights (ZeRO-3): the piece's weights, a view of its bucket's weight block (their home).
    weight: Option<Tensor>,
    /// Weight decay applies (see [`decays`]).
    decay: bool,
    m: Tensor,
    v: Tensor,
    /// What low-precision weights need to take updates (fp32 master, Kahan compensation).
    slot: Slot,
}

/// Norms and biases get no weight decay (as TRL / transformers' Trainer do).
pub fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.contains("norm"))
}

impl AdamW {
    pub fn new(params: Vec<(String, Tensor)>, cfg: AdamWConfig, precision: UpdatePrecision) -> AdamW {
        let whole = params.iter().map(|_| None).collect();
        AdamW::with_pieces(params, cfg, precision, whole, None, false, None)
    }

    /// AdamW over this rank's pieces of the parameters under sharded data parallelism: moments and update
    /// state exist for the elements `layout` gives this rank only.
    /// With `shard_grads` the gradients are sharded too: the step reads each piece's gradient from this
    /// rank's gradient shards ([`crate::training::sharding::GradReducer`]).
    /// With `weight_blocks` (ZeRO-3) the step updates the weights in those blocks (one per bucket), not in
    /// the parameters.
    pub fn sharded(params: Vec<(String, Tensor)>, cfg: AdamWConfig, precision: UpdatePrecision, layout: super::shard_layout::Layout, shard_grads: bool, weight_blocks: Option<Vec<Tensor>>) -> AdamW {
        let pieces = layout.owned().into_iter().map(|r| Some((r.start, r.end - r.start))).collect();
        AdamW::with_pieces(params, cfg, precision, pieces, Some(layout), shard_grads, weight_blocks)
    }

    fn with_pieces(params: Vec<(String, Tensor)>, cfg: AdamWConfig, precision: UpdatePrecision, pieces: Vec<Option<(i64, i64)>>, layout: Option<super::shard_layout::Layout>, shard_grads: bool, weight_blocks: Option<Vec<Tensor>>) -> AdamW {
        let state = precision.state.kind();
        let grad_shards = layout.as_ref().filter(|_| shard_grads).map(|l| l.zero_blocks());
        let places = layout.as_ref().map(|l| l.block_places()).unwrap_or_default();
        let mine = params
            .iter()
            .zip(pieces)
            .enumerate()
            .filter(|(_, (_, piece))| piece.is_none_or(|(_, len)| len > 0))
            .map(|(i, ((name, p), piece))| {
                let view = piece_of(p, piece);
                // the piece's run in its bucket's block of `blocks` (gradient shards or weight blocks)
                let in_block = |blocks: Option<&[Tensor]>| blocks.zip(places.get(i).copied().flatten()).map(|(bs, (b, at))| bs[b].narrow(0, at, view.numel() as i64));
                Param {
                    decay: decays(name),
                    m: Tensor::zeros(view.size(), (state, p.device())),
                    v: Tensor::zeros(view.size(), (state, p.device())),
                    slot: Slot::new_at(&view, precision.update, dither_key(precision.seed, i), piece.map_or(0, |(s, _)| s)),
                    name: name.clone(),
                    p: p.shallow_clone(),
                    index: i,
                    shape: p.size(),
                    piece,
                    grad: in_block(grad_shards.as_deref()),
                    weight: in_block(weight_blocks.as_deref()),
                }
            })
            .collect();
        AdamW { cfg, params: mine, all: params, layout, grad_shards, step: 0, precision, lost: (0, 0), warned: false, skipped: (0, 0) }
    }

    /// One update at learning rate `lr` from the gradients currently held by the parameters. The moments and
    /// the update are computed in fp32 whatever the dtypes of the weights and the state.
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        self.skipped.1 = 0;
        let t = self.step as f64;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powf(t);
        let bc2_sqrt = (1.0 - b2.powf(t)).sqrt();
        let (seed, step) = (self.precision.seed, self.step);
        let mut lost = vec![];
        tch::no_grad(|| {
            for q in self.params.iter_mut() {
                // the piece's gradient: a view of the gradient shard, or of the parameter's gradient
                let g = match &q.grad {
                    Some(shard) => shard.shallow_clone(),
                    None => match q.p.grad() {
                        g if g.defined() => piece_of(&g, q.piece),
                        _ => continue,
                    },
                };
                let g = g.to_kind(Kind::Float);
                let m = moment(&mut q.m, |m| m.g_mul_scalar_(b1).g_add_(&(&g * (1.0 - b1))));
                let v = moment(&mut q.v, |v| v.g_mul_scalar_(b2).g_add_(&(g.square() * (1.0 - b2))));
                let denom = (v.sqrt() / bc2_sqrt) + self.cfg.eps;
                let update = (m / denom) * (-lr / bc1);
                let decay = if q.decay && self.cfg.weight_decay != 0.0 { 1.0 - lr * self.cfg.weight_decay } else { 1.0 };
                let mut p = match &q.weight {
                    Some(w) => w.shallow_clone(),
                    None => piece_of(&q.p, q.piece),
                };
                let (lost_n, kept_n) = q.slot.apply_at(&mut p, &update, decay, rounding_key(seed, step, q.index), q.piece.map_or(0, |(s, _)| s));
                lost.push(Tensor::stack(&[lost_n, kept_n], 0));
            }
        });
        self.lost = if lost.is_empty() {
            (0, 0)
        } else {
            let c: Vec<i64> = Vec::try_from(Tensor::stack(&lost, 0).sum_dim_intlist(0, false, Kind::Int64)).unwrap_or_default();
            (c[0], c[1])
        };
    }

    /// Drops the gradients of a step that is not taken (a non-finite gradient norm): weights, moments and the
    /// step count stay as they were. Returns the steps skipped in a row.
    pub fn skip(&mut self) -> usize {
        self.zero_grad();
        self.skipped = (self.skipped.0 + 1, self.skipped.1 + 1);
        self.skipped.1
    }

    /// The fraction of the last step's updates (those fp32 arithmetic keeps) that the weights' precision lost
    /// (0 before any step).
    pub fn lost_fraction(&self) -> f64 {
        self.lost.0 as f64 / self.lost.1.max(1) as f64
    }

    /// The lost-update guard: a warning, the first time a step lost more than 1% of its updates to the
    /// weights' precision.
    pub fn lost_update_warning(&mut self, lr: f64) -> Option<String> {
        let frac = self.lost_fraction();
        if self.warned || frac <= 0.01 {
            return None;
        }
        self.warned = true;
        let kind = self.all.first().map(|(_, p)| p.kind()).unwrap_or(Kind::Float);
        // only low-precision weights under "direct" or "kahan" can lose updates (see precision::Slot::apply)
        let how = format!(
            "{kind:?} weights, [model] weight_update = \"{}\", lr {lr:.1e}; \"master_fp32\" (the default) or \"stochastic_rounding\" keep them",
            self.precision.update.name()
        );
        Some(format!("warning: step {} lost {:.1}% of its weight updates to rounding ({how})", self.step, 100.0 * frac))
    }

    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.all {
            p.zero_grad();
        }
        for s in self.grad_shards.iter_mut().flatten() {
            let _ = s.zero_();
        }
    }

    /// This rank's gradient shards (one block per bucket) when the gradients are sharded.
    pub fn grad_shards(&self) -> Option<&[Tensor]> {
        self.grad_shards.as_deref()
    }

    /// Every trained parameter, in the model's order.
    pub fn parameters(&self) -> &[(String, Tensor)] {
        &self.all
    }

    /// The update precision (its rule decides which state a parameter has).
    pub fn precision(&self) -> &UpdatePrecision {
        &self.precision
    }

    /// This rank's state of parameter `index` (by prefix: `m`, `v`, and `master` or `kahan`), flat pieces
    /// when sharded; empty when it owns none of it.
    pub fn state_of(&self, index: usize) -> Vec<(&'static str, &Tensor)> {
        // the pieces are in parameter order
        let Ok(at) = self.params.binary_search_by_key(&index, |q| q.index) else { return vec![] };
        let q = &self.params[at];
        let mut out = vec![("m", &q.m), ("v", &q.v)];
        out.extend(q.slot.state());
        out
    }

    /// The counts behind [`AdamW::lost_fraction`] (summed over the ranks when sharded).
    pub fn lost_counts_mut(&mut self) -> &mut (i64, i64) {
        &mut self.lost
    }

    /// Global L2 norm of all gradients; when `max_norm > 0` scales them down to at most `max_norm`
    /// (coefficient min(1, max_norm / (norm + 1e-6)), as torch.nn.utils.clip_grad_norm_). Returns the norm
    /// before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let grads: Vec<Tensor> = self.all.iter().map(|(_, p)| p.grad()).filter(|g| g.defined()).collect();
        if grads.is_empty() {
            return 0.0;
        }
        let norms: Vec<Tensor> = grads.iter().map(|g| g.to_kind(Kind::Float).norm()).collect();
        let total = Tensor::stack(&norms, 0).norm().double_value(&[]);
        clip_to(&grads, total, max_norm);
        total
    }

    /// The state a checkpoint holds, unsharded: moments, step and the precision state (names `m.<param>`,
    /// `v.<param>`, `step`, and `master.<param>` for fp32 master weights or `kahan.<param>` for Kahan
    /// compensation). Sharded optimizers gather theirs into the same tensors ([`crate::training::sharding`]).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut ts: Vec<(String, Tensor)> = vec![("step".into(), Tensor::from_slice(&[self.step]))];
        for q in &self.params {
            for (prefix, t) in self.state_of(q.index) {
                ts.push((format!("{prefix}.{}", q.name), t.shallow_clone()));
            }
        }
        ts
    }

    /// Writes the state (safetensors) [`AdamW::state_tensors`] or the sharded gather gives.
    pub fn save(path: &Path, state: &[(String, Tensor)]) -> Result<()> {
        model::weights::write_safetensors(path, state, None)?;
        Ok(())
    }

    pub fn load(&mut self, path: &Path) -> Result<()> {
        let map: HashMap<String, Tensor> = Tensor::read_safetensors(path)
            .with_context(|| format!("reading optimizer state {}", path.display()))?
            .into_iter()
            .collect();
        let step = map.get("step").with_context(|| format!("{}: no `step`", path.display()))?;
        self.step = step.int64_value(&[0]);
        let mut rebuilt = 0;
        for q in self.params.iter_mut() {
            let size = q.shape.clone();
            let piece = q.piece;
            let mut dsts = vec![(format!("m.{}", q.name), &mut q.m), (format!("v.{}", q.name), &mut q.v)];
            if let Some((k, t)) = q.slot.state_mut().map(|(prefix, t)| (format!("{prefix}.{}", q.name), t)) {
                if map.contains_key(&k) {
                    dsts.push((k, t));
                } else {
                    // written before master weights existed (or with another weight_update): start from the weights
                    rebuilt += 1;
                }
            }
            for (key, dst) in dsts {
                let src = map.get(&key).with_context(|| format!("{}: missing `{key}`", path.display()))?;
                if src.size() != size {
                    bail!("{}: `{key}` has shape {:?}, parameter has {:?}", path.display(), src.size(), size);
                }
                tch::no_grad(|| dst.copy_(&piece_of(src, piece)));
            }
        }
        if rebuilt > 0 {
            eprintln!(
                "warning: {} has no {} state for {rebuilt} parameter(s) (written with another weight_update); starting it from the weights",
                path.display(),
                self.precision.update.name()
            );
        }
        Ok(())
    }
}

/// Scales `grads` (whose global norm is `total`) down to norm `max_norm` when it is positive and exceeded:
/// coefficient min(1, max_norm / (total + 1e-6)), as torch.nn.utils.clip_grad_norm_.
pub fn clip_to(grads: &[Tensor], total: f64, max_norm: f64) {
    if !(max_norm > 0.0 && total.is_finite()) {
        return;
    }
    let coef = (max_norm / (total + 1e-6)).min(1.0);
    if coef < 1.0 {
        tch::no_grad(|| {
            for g in grads {
                let _ = g.shallow_clone().g_mul_scalar_(coef);
            }
        });
    }
}

/// The elements `piece` names of `t` flattened (a view), or `t` itself.
fn piece_of(t: &Tensor, piece: Option<(i64, i64)>) -> Tensor {
    match piece {
        None => t.shallow_clone(),
        Some((start, len)) => t.view([-1]).narrow(0, start, len),
    }
}

/// Updates a moment in fp32 and returns its fp32 value: in place when the state is fp32, else through an fp32
/// copy that is rounded back into the stored state.
fn moment(state: &mut Tensor, update: impl FnOnce(&mut Tensor) -> Tensor) -> Tensor {
    if state.kind() == Kind::Float {
        let _ = update(state);
        state.shallow_clone()
    } else {
        let mut m = state.to_kind(Kind::Float);
        let _ = update(&mut m);
        state.copy_(&m);
        m
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
        let mut ours = AdamW::new(vec![("w".into(), w2.shallow_clone()), ("b_weight".into(), b2.shallow_clone())], cfg, Default::default());
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
        let mut opt = AdamW::new(vec![("p".into(), p.shallow_clone())], AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }, Default::default());
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
