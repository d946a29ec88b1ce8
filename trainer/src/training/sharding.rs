//! Sharded data parallelism (`[run] sharding`), after ZeRO (Rajbhandari et al. 2020, arXiv 1910.02054).
//!
//! The trained parameters are laid out in flat buckets in the model's fixed order (the buckets gradient
//! all-reduce uses, [`dist::buckets`]); each bucket is padded to a multiple of the world size and rank r owns
//! its r-th equal block. A rank's piece of a parameter is therefore one contiguous run of its flattened
//! elements (possibly empty).
//!
//! - `optimizer` (ZeRO-1): gradients are all-reduced as under `none`; each rank keeps AdamW's moments and the
//!   update state (fp32 master weights, Kahan buffers) of its pieces only, updates those elements, and the
//!   ranks all-gather the updated weights bucket by bucket. AdamW is elementwise and the dither and stochastic
//!   rounding bits are keyed by the element's place in its whole parameter, so the weights are bit-identical
//!   to `none`'s in every precision mode.
//! - Checkpoints hold the unsharded optimizer state: the ranks all-gather it bucket by bucket and rank 0
//!   writes the very file `none` writes; a resume takes each rank's pieces from it, so a stage resumes on any
//!   world size and in any sharding mode.

use anyhow::Result;
use std::collections::HashMap;
use std::ops::Range;
use tch::{Kind, Tensor};

use super::optim::AdamW;
use super::precision::Slot;
use super::Ctx;
use crate::settings::Sharding;

/// One flat bucket: its parameters (index, first element in the bucket, elements) and the block each rank owns.
#[derive(Debug, Clone)]
struct Bucket {
    members: Vec<(usize, i64, i64)>,
    /// Elements per rank (the bucket padded to `block · world`).
    block: i64,
    kind: Kind,
    device: tch::Device,
}

/// Which elements of every trained parameter each rank owns.
#[derive(Debug, Clone)]
pub struct Layout {
    rank: usize,
    world: usize,
    buckets: Vec<Bucket>,
    /// Elements per parameter.
    numels: Vec<i64>,
}

impl Layout {
    pub fn new(params: &[Tensor], rank: usize, world: usize) -> Layout {
        let buckets = dist::buckets(params)
            .into_iter()
            .map(|r| {
                let mut at = 0i64;
                let members: Vec<(usize, i64, i64)> = r
                    .map(|i| {
                        let n = params[i].numel() as i64;
                        at += n;
                        (i, at - n, n)
                    })
                    .collect();
                let first: &Tensor = &params[members.first().map_or(0, |m| m.0)];
                Bucket { block: (at + world as i64 - 1) / world as i64, members, kind: first.kind(), device: first.device() }
            })
            .collect();
        Layout { rank, world, buckets, numels: params.iter().map(|p| p.numel() as i64).collect() }
    }

    /// This rank's elements of each parameter (ranges of its flattened elements; empty where it owns none).
    pub fn owned(&self) -> Vec<Range<i64>> {
        let mut out = vec![0..0; self.numels.len()];
        for b in &self.buckets {
            let mine = b.block * self.rank as i64..b.block * (self.rank as i64 + 1);
            for &(i, start, n) in &b.members {
                let lo = mine.start.max(start);
                let hi = mine.end.min(start + n);
                if lo < hi {
                    out[i] = lo - start..hi - start;
                }
            }
        }
        out
    }

    /// Where this rank's piece of each parameter sits in its bucket's block: (bucket, first element in the
    /// block); `None` where it owns none of the parameter.
    pub fn block_places(&self) -> Vec<Option<(usize, i64)>> {
        let owned = self.owned();
        let mut out = vec![None; self.numels.len()];
        for (bi, b) in self.buckets.iter().enumerate() {
            for &(i, start, _) in &b.members {
                if !owned[i].is_empty() {
                    out[i] = Some((bi, start + owned[i].start - b.block * self.rank as i64));
                }
            }
        }
        out
    }

    /// A zero tensor per bucket of one block's elements in the bucket's dtype (this rank's gradient shards).
    pub fn zero_blocks(&self) -> Vec<Tensor> {
        self.buckets.iter().map(|b| Tensor::zeros([b.block], (b.kind, b.device))).collect()
    }

    /// The largest number of elements any rank owns (the plan's per-rank share, padding included).
    pub fn elements_per_rank(&self) -> i64 {
        self.buckets.iter().map(|b| b.block).sum()
    }
}

/// The optimizer a stage trains with: over every trained parameter, or over this rank's pieces of them when
/// `[run] sharding` shards the optimizer state (and with gradient shards when it shards the gradients).
pub fn optimizer(ctx: &Ctx, params: Vec<(String, Tensor)>, cfg: super::optim::AdamWConfig, precision: crate::settings::UpdatePrecision) -> AdamW {
    match ctx.run.sharding {
        Sharding::None => AdamW::new(params, cfg, precision),
        _ => {
            let ts: Vec<Tensor> = params.iter().map(|(_, p)| p.shallow_clone()).collect();
            let layout = Layout::new(&ts, ctx.comm.rank(), ctx.comm.world());
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
            AdamW::sharded(params, cfg, precision, layout, ctx.run.sharding >= Sharding::Gradients)
        }
    }
}

/// Sums this micro-batch's gradients over the ranks into each rank's gradient shards (ZeRO-2: one
/// reduce-scatter per bucket) and releases the full gradients; `zeros` contributes nothing (a rank that ran out
/// of micro-batches still takes part in the collective).
pub fn reduce_into_shards(ctx: &Ctx, opt: &AdamW, zeros: bool) -> Result<()> {
    let (Some(layout), Some(shards)) = (&opt.layout, opt.grad_shards()) else { return Ok(()) };
    let params = opt.parameters();
    for (b, shard) in layout.buckets.iter().zip(shards) {
        let flat = Tensor::zeros([b.block * layout.world as i64], (b.kind, b.device));
        let block = Tensor::zeros([b.block], (b.kind, b.device));
        tch::no_grad(|| {
            for &(i, start, n) in &b.members {
                let g = params[i].1.grad();
                if !zeros && g.defined() {
                    flat.narrow(0, start, n).copy_(&g.reshape([-1]));
                }
            }
        });
        ctx.comm.reduce_scatter_flat_sum(&block, &flat)?;
        let _ = tch::no_grad(|| shard.shallow_clone().g_add_(&block));
    }
    for (_, p) in params {
        model::release_grad(p);
    }
    Ok(())
}

/// The gradients' global L2 norm, clipping them to `max_norm` as [`AdamW::clip_grad_norm`] does; with
/// gradient shards, from the shards' sums of squares summed over the ranks (the same norm up to rounding).
pub fn clip_grad_norm(ctx: &Ctx, opt: &mut AdamW, max_norm: f64) -> Result<f64> {
    let Some(shards) = opt.grad_shards() else { return Ok(opt.clip_grad_norm(max_norm)) };
    let mut sq = [shards.iter().map(|s| s.to_kind(Kind::Double).square().sum(Kind::Double).double_value(&[])).sum::<f64>()];
    ctx.comm.all_reduce_f64(&mut sq)?;
    let total = sq[0].sqrt();
    if max_norm > 0.0 && total.is_finite() {
        let coef = (max_norm / (total + 1e-6)).min(1.0);
        if coef < 1.0 {
            tch::no_grad(|| {
                for s in shards {
                    let _ = s.shallow_clone().g_mul_scalar_(coef);
                }
            });
        }
    }
    Ok(total)
}

/// After a sharded optimizer step: every rank gets the weights the others updated (one all-gather per
/// bucket), and the lost-update counts are summed over the ranks. A no-op unsharded.
pub fn after_step(ctx: &Ctx, opt: &mut AdamW) -> Result<()> {
    let Some(layout) = opt.layout.clone() else { return Ok(()) };
    let params: Vec<Tensor> = opt.parameters().iter().map(|(_, p)| p.shallow_clone()).collect();
    let owned = layout.owned();
    for b in &layout.buckets {
        let full = all_gather(ctx, &layout, b, &owned, |i| Some(params[i].shallow_clone()), b.kind)?;
        tch::no_grad(|| {
            for &(i, start, n) in &b.members {
                params[i].view([-1]).copy_(&full.narrow(0, start, n));
            }
        });
    }
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
    for b in &layout.buckets {
        let mut prefixes = vec![("m", p.state.kind()), ("v", p.state.kind())];
        if let Some(k) = Slot::kind_for(b.kind, p.update) {
            prefixes.push((if k == Kind::Float { "master" } else { "kahan" }, k));
        }
        for (prefix, kind) in prefixes {
            let piece = |i: usize| opt.state_of(i).into_iter().find(|(n, _)| *n == prefix).map(|(_, t)| t.shallow_clone());
            let full = all_gather(ctx, layout, b, &owned, piece, kind)?;
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
fn all_gather(ctx: &Ctx, layout: &Layout, b: &Bucket, owned: &[Range<i64>], piece: impl Fn(usize) -> Option<Tensor>, kind: Kind) -> Result<Tensor> {
    let block = Tensor::zeros([b.block], (kind, b.device));
    tch::no_grad(|| {
        let mut at = 0;
        for &(i, _, _) in &b.members {
            let r = &owned[i];
            if r.is_empty() {
                continue;
            }
            let len = r.end - r.start;
            if let Some(t) = piece(i) {
                // a whole parameter gives its owned run; a state piece is that run already
                let t = if t.numel() as i64 == len { t.view([-1]) } else { t.view([-1]).narrow(0, r.start, len) };
                block.narrow(0, at, len).copy_(&t);
            }
            at += len;
        }
    });
    let full = Tensor::zeros([b.block * layout.world as i64], (kind, b.device));
    ctx.comm.all_gather_flat(&full, &block)?;
    Ok(full)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ranks_own_every_element_once_in_equal_blocks() {
        let ts: Vec<Tensor> = [[7i64, 3], [5, 1], [1, 1], [4, 4]].iter().map(|s| Tensor::zeros(s.as_slice(), (Kind::Float, tch::Device::Cpu))).collect();
        for world in [1usize, 2, 3, 4, 8] {
            let mut count = vec![0i64; ts.len()];
            for rank in 0..world {
                let l = Layout::new(&ts, rank, world);
                let owned = l.owned();
                // 43 elements in one bucket: ⌈43 / world⌉ each
                assert_eq!(l.elements_per_rank(), (43 + world as i64 - 1) / world as i64);
                let mine: i64 = owned.iter().map(|r| r.end - r.start).sum();
                assert!(mine <= l.elements_per_rank());
                for (i, r) in owned.iter().enumerate() {
                    count[i] += r.end - r.start;
                }
            }
            assert_eq!(count, vec![21, 5, 1, 16], "world {world}");
        }
        // rank 1 of 2 owns elements 22..44 of the bucket: none of the first tensor (0..21), the rest from 1 of the second
        let l = Layout::new(&ts, 1, 2).owned();
        assert_eq!(l, vec![0..0, 1..5, 0..1, 0..16]);
    }
}
