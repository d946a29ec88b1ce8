//! Sharded data parallelism (`[run] sharding`), after ZeRO (Rajbhandari et al. 2020, arXiv 1910.02054).
//!
//! The trained parameters are laid out in flat buckets, one per decoder layer and one for the rest, in the
//! model's fixed order ([`Layout`]); each bucket is padded to a multiple of the world size and rank r owns its
//! r-th equal block. A rank's piece of a parameter is therefore one contiguous run of its flattened elements
//! (possibly empty).
//!
//! - `optimizer` (ZeRO-1): gradients are all-reduced as under `none`; each rank keeps AdamW's moments and the
//!   update state (fp32 master weights, Kahan buffers) of its pieces only, updates those elements, and the
//!   ranks all-gather the updated weights bucket by bucket. AdamW is elementwise and the dither and stochastic
//!   rounding bits are keyed by the element's place in its whole parameter, so the weights are bit-identical
//!   to `none`'s in every precision mode.
//! - `gradients` (ZeRO-2): each micro-batch's gradients are reduce-scattered into per-bucket gradient shards and
//!   released — under activation checkpointing layer by layer as the backward finishes each layer
//!   ([`GradReducer`], through the model's layer hook) — and AdamW reads its pieces from the shards.
//! - `full` (ZeRO-3): the weights live in per-bucket blocks ([`WeightShards`]); a layer is gathered around its
//!   forward and backward, the embedding group for a step's training passes, everything for the passes that
//!   read whole weights ([`ensure_whole`]). The arithmetic is ZeRO-2's, so the weights are too, bit for bit.
//! - Checkpoints hold the unsharded optimizer state: the ranks all-gather it bucket by bucket and rank 0
//!   writes the very file `none` writes; a resume takes each rank's pieces from it, so a stage resumes on any
//!   world size and in any sharding mode.

use anyhow::Result;
use std::collections::HashMap;
use std::ops::Range;
use tch::{Kind, Tensor};

use super::optim::AdamW;
use super::precision::Slot;
use super::shard_layout::{block_of, Layout};
use super::weight_shards::WeightShards;
use super::Ctx;
use crate::settings::Sharding;

/// The optimizer a stage trains with: over every trained parameter, or over this rank's pieces of them when
/// `[run] sharding` shards the optimizer state (and with gradient shards when it shards the gradients).
pub fn optimizer(ctx: &Ctx, params: Vec<(String, Tensor)>, cfg: super::optim::AdamWConfig, precision: crate::settings::UpdatePrecision) -> Result<AdamW> {
    // a previous stage's ZeRO-3 weights: whole again before this stage lays them out
    let previous = ctx.weight_shards.borrow_mut().take();
    if let Some(w) = previous {
        w.gather_all()?;
    }
    Ok(match ctx.run.sharding {
        Sharding::None => AdamW::new(params, cfg, precision),
        _ => {
            let layout = Layout::new(&params, ctx.comm.rank(), ctx.comm.world());
            if ctx.comm.is_main() {
                let total: i64 = layout.numels.iter().sum();
                eprintln!(
                    "sharding \"{}\" over {} rank(s): each rank keeps the optimizer state of at most {} of the {total} trained elements ({} bucket(s))",
                    ctx.run.sharding.name(),
                    layout.world,
                    layout.elements_per_rank(),
                    layout.buckets.len()
                );
            }
            if ctx.run.sharding < Sharding::Full {
                return Ok(AdamW::sharded(params, cfg, precision, layout, ctx.run.sharding >= Sharding::Gradients, None));
            }
            // ZeRO-3: the weights' home becomes this rank's blocks; the whole tensors are released
            let shards = std::rc::Rc::new(WeightShards::new(ctx.comm.clone(), layout.clone(), &params));
            let opt = AdamW::sharded(params, cfg, precision, layout, true, Some(shards.blocks.iter().map(|b| b.shallow_clone()).collect()));
            shards.release_all();
            *ctx.weight_shards.borrow_mut() = Some(shards);
            opt
        }
    })
}

/// Before a pass that reads whole weights (sampling, log-probabilities without gradients, evaluation,
/// checkpoints, the KL reference's copy): under ZeRO-3 every rank gathers them. Every rank must call it at
/// the same point (a no-op, and no collective, when the weights are whole already or not sharded).
pub fn ensure_whole(ctx: &Ctx) -> Result<()> {
    let shards = ctx.weight_shards.borrow().clone();
    match shards {
        Some(w) => w.gather_all(),
        None => Ok(()),
    }
}

/// ZeRO-2's gradient reduction: each micro-batch's gradients are reduce-scattered into this rank's gradient
/// shards bucket by bucket and released. Under activation checkpointing a decoder layer's bucket goes as soon
/// as its backward is done (a hook the model calls), so a rank holds one layer's whole gradient besides the
/// embedding's and head's; otherwise all buckets go after the micro-batch's backward. Either way every rank
/// reduces the buckets of a micro-batch in the same order (layers last first, then the rest), and a rank with
/// no micro-batch left reduces zeros.
pub struct GradReducer {
    comm: std::rc::Rc<dyn dist::Communicator>,
    /// ZeRO-3: the weights, gathered a layer at a time around its forward and backward.
    weights: Option<std::rc::Rc<WeightShards>>,
    layout: Layout,
    params: Vec<Tensor>,
    shards: Vec<Tensor>,
    /// Buckets reduced in the running micro-batch.
    done: std::cell::RefCell<Vec<bool>>,
    /// Reduce-scatters started and not yet added to the shards: (bucket, input, output, handle).
    inflight: std::cell::RefCell<Vec<(usize, Tensor, Tensor, dist::Pending)>>,
    /// The decoder layers with buckets, in order.
    layers: Vec<usize>,
    /// A collective that failed inside the backward (reported by [`GradReducer::finish_micro`]).
    error: std::cell::RefCell<Option<String>>,
}

impl GradReducer {
    /// The reducer of `opt`'s gradient shards, when it has them; it is the model's layer hook until dropped.
    pub fn new(ctx: &Ctx, opt: &AdamW) -> Option<std::rc::Rc<GradReducer>> {
        let (layout, shards) = (opt.layout.clone()?, opt.grad_shards()?);
        let weights = ctx.weight_shards.borrow().clone();
        let r = std::rc::Rc::new(GradReducer {
            comm: ctx.comm.clone(),
            weights,
            done: std::cell::RefCell::new(vec![false; layout.buckets.len()]),
            inflight: Default::default(),
            layers: layout.layers(),
            layout,
            params: opt.parameters().iter().map(|(_, p)| p.shallow_clone()).collect(),
            shards: shards.iter().map(|t| t.shallow_clone()).collect(),
            error: Default::default(),
        });
        let hook = std::rc::Rc::downgrade(&r);
        model::transformer::set_layer_hook(Some(std::rc::Rc::new(move |e| {
            if let Some(r) = hook.upgrade() {
                r.event(e);
            }
        })));
        Some(r)
    }

    /// The model's layer hook (and the replay of a missing pass, with `zeros`). ZeRO-3 gathers a layer on
    /// entering it and starts the next one's all-gather (the next in the forward, the one below in the
    /// backward), so it travels while this layer computes; a finished layer's reduce-scatter runs while the
    /// layer below computes its backward.
    fn event(&self, e: model::transformer::LayerEvent) {
        let r = self.handle(e, false);
        self.note(r);
    }

    fn handle(&self, e: model::transformer::LayerEvent, zeros: bool) -> Result<()> {
        use model::transformer::LayerEvent;
        if self.error.borrow().is_some() {
            return Ok(());
        }
        let next = |l: usize, up: bool| if up { self.layers.iter().find(|&&x| x > l).copied() } else { self.layers.iter().rev().find(|&&x| x < l).copied() };
        match (e, &self.weights) {
            (LayerEvent::Enter(l) | LayerEvent::Reenter(l), Some(w)) => {
                w.gather_layer(Some(l))?;
                match next(l, matches!(e, LayerEvent::Enter(_))) {
                    Some(n) => w.prefetch_layer(n),
                    None => Ok(()),
                }
            }
            (LayerEvent::Leave(l), Some(w)) => {
                w.release_layer(Some(l));
                Ok(())
            }
            (LayerEvent::BackwardDone(l), _) => self.layer_done(l, zeros),
            _ => Ok(()),
        }
    }

    /// Keeps the first error of a collective inside the backward for [`GradReducer::finish_micro`].
    fn note(&self, r: Result<()>) {
        if let Err(e) = r {
            self.error.borrow_mut().get_or_insert(e.to_string());
        }
    }

    /// ZeRO-3, at the start of a step's training passes: the whole weights (from sampling or evaluation)
    /// released, the embedding, final norm and head gathered for the step.
    pub fn start_step(&self) -> Result<()> {
        match &self.weights {
            Some(w) => {
                w.release_all();
                w.gather_layer(None)
            }
            None => Ok(()),
        }
    }

    /// ZeRO-3, after the step's training passes: the embedding, final norm and head released.
    pub fn end_step(&self) {
        if let Some(w) = &self.weights {
            w.release_layer(None);
        }
    }

    /// Layer `layer`'s gradients are final for this micro-batch: its buckets' reduce-scatters start (the one
    /// before them is finished first, so at most two are in flight).
    fn layer_done(&self, layer: usize, zeros: bool) -> Result<()> {
        for b in self.layout.buckets_of(Some(layer)) {
            // every rank reduces a bucket once per micro-batch (so a rank out of micro-batches can match it
            // with zeros): a second backward pass through the layers would need a second round
            if self.done.borrow()[b] {
                anyhow::bail!("layer {layer}'s gradients were reduced twice in one micro-batch: sharded gradients take one backward pass per micro-batch");
            }
            self.finish_inflight(1)?;
            self.reduce_start(b, zeros)?;
        }
        Ok(())
    }

    /// After a micro-batch's backward (or, `zeros`, in place of one): reduces the buckets not reduced yet.
    pub fn finish_micro(&self, zeros: bool) -> Result<()> {
        if let Some(e) = self.error.borrow_mut().take() {
            anyhow::bail!("{e}");
        }
        use model::transformer::LayerEvent;
        // a rank without a micro-batch this round replays the forward's events (ZeRO-3's gathers)
        if zeros && self.weights.is_some() {
            for &l in &self.layers {
                self.handle(LayerEvent::Enter(l), true)?;
                self.handle(LayerEvent::Leave(l), true)?;
            }
        }
        // and, as does a rank whose backward did not reach the layers, the backward's, last layer first:
        // the same collectives in the same order as the ranks that ran it
        for &l in self.layers.iter().rev() {
            let missing = self.layout.buckets_of(Some(l)).into_iter().any(|b| !self.done.borrow()[b]);
            if missing {
                for e in [LayerEvent::Reenter(l), LayerEvent::BackwardDone(l), LayerEvent::Leave(l)] {
                    self.handle(e, zeros)?;
                }
            }
        }
        // then the rest (embedding, final norm, head), whose gradients are final only now
        for b in self.layout.buckets_of(None) {
            if !self.done.borrow()[b] {
                self.reduce_start(b, zeros)?;
            }
        }
        self.finish_inflight(0)?;
        self.done.borrow_mut().iter_mut().for_each(|d| *d = false);
        Ok(())
    }

    /// Finishes started reduce-scatters, oldest first, until at most `keep` are in flight: each adds its
    /// block of the sum to this rank's shard.
    fn finish_inflight(&self, keep: usize) -> Result<()> {
        loop {
            let next = {
                let mut q = self.inflight.borrow_mut();
                if q.len() <= keep {
                    return Ok(());
                }
                q.remove(0)
            };
            let (b, _input, block, pending) = next;
            pending.wait()?;
            let _ = tch::no_grad(|| self.shards[b].shallow_clone().g_add_(&block));
        }
    }

    /// Starts bucket `b`'s reduce-scatter (this rank's block of the sum over the ranks, added to its shard when
    /// finished) and releases the gradients (their values are in its input buffer).
    fn reduce_start(&self, bi: usize, zeros: bool) -> Result<()> {
        let b = &self.layout.buckets[bi];
        let flat = self.layout.flat_buffer(bi, b.kind);
        let block = Tensor::zeros([b.block], (b.kind, b.device));
        tch::no_grad(|| {
            for &(i, start, n) in &b.members {
                let g = self.params[i].grad();
                if !zeros && g.defined() {
                    flat.narrow(0, start, n).copy_(&g.reshape([-1]));
                }
            }
        });
        let pending = self.comm.reduce_scatter_flat_sum_start(&block, &flat)?;
        for &(i, _, _) in &b.members {
            model::release_grad(&self.params[i]);
        }
        self.done.borrow_mut()[bi] = true;
        self.inflight.borrow_mut().push((bi, flat, block, pending));
        Ok(())
    }
}

impl Drop for GradReducer {
    fn drop(&mut self) {
        model::transformer::set_layer_hook(None);
    }
}


/// The gradients' global L2 norm, clipping them to `max_norm` as [`AdamW::clip_grad_norm`] does; with
/// gradient shards, from the shards' sums of squares summed over the ranks (the same norm up to rounding).
pub fn clip_grad_norm(ctx: &Ctx, opt: &mut AdamW, max_norm: f64) -> Result<f64> {
    let Some(shards) = opt.grad_shards() else { return Ok(opt.clip_grad_norm(max_norm)) };
    let mut sq = [shards.iter().map(|s| s.to_kind(Kind::Double).square().sum(Kind::Double).double_value(&[])).sum::<f64>()];
    ctx.comm.all_reduce_f64(&mut sq)?;
    let total = sq[0].sqrt();
    super::optim::clip_to(shards, total, max_norm);
    Ok(total)
}

/// After a sharded optimizer step: every rank gets the weights the others updated (one all-gather per
/// bucket), and the lost-update counts are summed over the ranks. A no-op unsharded.
pub fn after_step(ctx: &Ctx, opt: &mut AdamW) -> Result<()> {
    let Some(layout) = opt.layout.clone() else { return Ok(()) };
    if let Some(w) = ctx.weight_shards.borrow().as_ref() {
        // ZeRO-3: the blocks were updated; whole copies (none should be left) would be stale
        w.release_all();
        return sum_lost(ctx, opt);
    }
    let params: Vec<Tensor> = opt.parameters().iter().map(|(_, p)| p.shallow_clone()).collect();
    let owned = layout.owned();
    for (bi, b) in layout.buckets.iter().enumerate() {
        let full = all_gather(ctx, &layout, bi, &owned, |i| Some(params[i].shallow_clone()), b.kind)?;
        tch::no_grad(|| {
            for &(i, start, n) in &b.members {
                params[i].view([-1]).copy_(&full.narrow(0, start, n));
            }
        });
    }
    sum_lost(ctx, opt)
}

/// The lost-update counts summed over the ranks (each counted its own elements).
fn sum_lost(ctx: &Ctx, opt: &mut AdamW) -> Result<()> {
    let lost = opt.lost_counts_mut();
    let mut c = [lost.0, lost.1];
    ctx.comm.all_reduce_i64(&mut c)?;
    *lost = (c[0], c[1]);
    Ok(())
}

/// The optimizer state a checkpoint holds, unsharded ([`AdamW::state_tensors`]'s names and shapes): gathered
/// bucket by bucket when sharded. Every rank must call it (collectives).
pub fn full_state(ctx: &Ctx, opt: &AdamW) -> Result<Vec<(String, Tensor)>> {
    let Some(layout) = &opt.layout else { return Ok(opt.state_tensors()) };
    let owned = layout.owned();
    let params = opt.parameters();
    let p = opt.precision();
    let mut out: Vec<(String, Tensor)> = vec![("step".into(), Tensor::from_slice(&[opt.step]))];
    let mut gathered: HashMap<(usize, &'static str), Tensor> = HashMap::new();
    for (bi, b) in layout.buckets.iter().enumerate() {
        let mut prefixes = vec![("m", p.state.kind()), ("v", p.state.kind())];
        if let Some(k) = Slot::kind_for(b.kind, p.update) {
            prefixes.push((if k == Kind::Float { "master" } else { "kahan" }, k));
        }
        for (prefix, kind) in prefixes {
            let piece = |i: usize| opt.state_of(i).into_iter().find(|(n, _)| *n == prefix).map(|(_, t)| t.shallow_clone());
            let full = all_gather(ctx, layout, bi, &owned, piece, kind)?;
            for &(i, start, n) in &b.members {
                gathered.insert((i, prefix), full.narrow(0, start, n).view(params[i].1.size().as_slice()));
            }
        }
    }
    for (i, (name, _)) in params.iter().enumerate() {
        for prefix in ["m", "v", "master", "kahan"] {
            if let Some(t) = gathered.remove(&(i, prefix)) {
                out.push((format!("{prefix}.{name}"), t));
            }
        }
    }
    Ok(out)
}

/// One bucket, gathered: each rank contributes its block — the owned pieces of `piece(i)` (the whole
/// parameter, or a flat state piece) in bucket order, zero-padded — and gets the whole flat bucket.
fn all_gather(ctx: &Ctx, layout: &Layout, b: usize, owned: &[Range<i64>], piece: impl Fn(usize) -> Option<Tensor>, kind: Kind) -> Result<Tensor> {
    let block = block_of(&layout.buckets[b], owned, piece, kind);
    let full = layout.flat_buffer(b, kind);
    ctx.comm.all_gather_flat(&full, &block)?;
    Ok(full)
}

