//! Data parallelism inside the stages (the communicator is `ctx.comm`, see the dist crate):
//!
//! - every rank draws the *global* batch from the same seeded sampler (so the data cursor in a checkpoint
//!   does not depend on the world size) and trains on its contiguous share: SFT and DPO micro-batches
//!   (rank r takes micro-batches r·a … r·a + a − 1 of the step's world·a), GRPO prompts (a group stays
//!   on one rank);
//! - token-mean losses divide by the *global* count (the local counts all-reduced first), and gradients are
//!   summed over the ranks (flat buckets, fixed parameter order) before clipping and the optimizer step, so
//!   a step computes the one-process gradient: two ranks with one micro-batch each add the same two partial
//!   gradients a one-process run with two accumulated micro-batches adds (bitwise, since a + b = b + a);
//!   with three or more ranks the ring's summation order differs by a few ulp, identically on every rank;
//! - Rollout-DPO samples and DPO's reference pass are split the same way (each rank its share of problems /
//!   of reference batches) and gathered, so every rank holds the one-process result;
//! - rank 0 writes checkpoints and metrics; every rank waits at a barrier after a checkpoint.
//!
//! Nothing here knows a stage kind: stages call these helpers with their own types.

use anyhow::{bail, Result};
use model::Model;
use sha2::{Digest, Sha256};

use super::checkpoint::Checkpoint;
use super::optim::AdamW;
use super::Ctx;

/// This rank's contiguous share of `items` (whose length is a multiple of the world size).
pub fn shard<T>(ctx: &Ctx, items: Vec<T>) -> Vec<T> {
    let (r, w) = (ctx.comm.rank(), ctx.comm.world());
    let per = items.len() / w;
    items.into_iter().skip(r * per).take(per).collect()
}

/// Gradient accumulation over a step's micro-batches and their sum over the ranks, ready for the optimizer.
///
/// Unsharded gradients (`[run] sharding` "none" or "optimizer"): a sum of whole micro-batch gradients,
/// A_k = A_(k−1) + G_k, where G_k is the gradient micro-batch k's backward leaves in gradients set to zero
/// (letting several backward passes accumulate into one buffer adds each pass's pieces — loss chunks, trunk —
/// one by one, and float addition is not associative), then summed over the ranks in flat buckets. Two ranks
/// with one micro-batch each then sum exactly what one process with two accumulated micro-batches sums:
/// G_1 + G_2.
///
/// Sharded gradients ("gradients"): each micro-batch's gradients are reduce-scattered into this rank's
/// gradient shards and released, layer by layer during the backward under activation checkpointing
/// ([`super::sharding::GradReducer`]), so no rank holds the whole gradient. Every rank takes part in as many
/// rounds of reductions as the rank with the most micro-batches (contributing zeros when it has run out).
/// The sum is Σ_k (Σ_ranks G_k): the unsharded order for one micro-batch per rank, otherwise equal up to
/// rounding.
pub struct Accum<'a> {
    ctx: &'a Ctx,
    params: Vec<tch::Tensor>,
    saved: Vec<tch::Tensor>,
    started: usize,
    /// Sharded gradients: the reducer, and the most micro-batches any rank runs this step.
    sharded: Option<(std::rc::Rc<super::sharding::GradReducer>, usize)>,
}

impl<'a> Accum<'a> {
    /// Starts a step of `micro` micro-batches on this rank (after `zero_grad`).
    pub fn new(ctx: &'a Ctx, opt: &'a AdamW, micro: usize) -> Result<Accum<'a>> {
        let params: Vec<tch::Tensor> = opt.parameters().iter().map(|(_, p)| p.shallow_clone()).collect();
        let sharded = match super::sharding::GradReducer::new(ctx, opt) {
            Some(r) => {
                r.start_step()?;
                Some((r, gather_f64(ctx, &[micro as f64])?.0.into_iter().fold(0.0, f64::max) as usize))
            }
            None => {
                // every gradient defined and zero
                for p in &params {
                    if p.requires_grad() && !p.grad().defined() {
                        (p * 0.0).sum(p.kind()).backward();
                    }
                }
                None
            }
        };
        Ok(Accum { ctx, params, saved: vec![], started: 0, sharded })
    }

    /// Before each micro-batch's backward: sets the previous micro-batches' sum aside (or reduces it into the
    /// gradient shards).
    pub fn next(&mut self) -> Result<()> {
        if self.started > 0 {
            if let Some((r, _)) = &self.sharded {
                r.finish_micro(false)?;
            } else {
                self.set_aside();
            }
        }
        self.started += 1;
        Ok(())
    }

    fn set_aside(&mut self) {
        tch::no_grad(|| {
            for (i, p) in self.params.iter().enumerate() {
                let mut g = p.grad();
                if !g.defined() {
                    continue;
                }
                if self.started == 1 {
                    self.saved.push(g.copy());
                } else {
                    let _ = self.saved[i].g_add_(&g);
                }
                let _ = g.zero_();
            }
        });
    }

    /// After the last micro-batch: the gradients (or the shards) hold the sum over the micro-batches and the
    /// ranks.
    pub fn finish(self) -> Result<()> {
        if let Some((r, rounds)) = &self.sharded {
            if self.started > 0 {
                r.finish_micro(false)?;
            }
            for _ in self.started..*rounds {
                r.finish_micro(true)?;
            }
            r.end_step();
            return Ok(());
        }
        tch::no_grad(|| {
            for (p, s) in self.params.iter().zip(&self.saved) {
                let _ = p.grad().g_add_(s);
            }
        });
        // summed over the ranks (no-op on one process)
        Ok(self.ctx.comm.all_reduce_grads(&self.params)?)
    }
}

/// Sums `xs` over the ranks (counts and logged metrics).
pub fn sum(ctx: &Ctx, xs: &mut [f64]) -> Result<()> {
    Ok(ctx.comm.all_reduce_f64(xs)?)
}

/// Micro-batches of `batch_size` rows this rank runs per optimizer step. The recipe's `grad_accum` is per
/// rank (TRL's `gradient_accumulation_steps`), so the global batch is `batch_size · grad_accum · world`
/// for the world size the stage started with; a stage resumed on another world size keeps that global
/// batch (each rank then accumulates `grad_accum · old_world / world` micro-batches) and says so.
pub fn local_accum(ctx: &Ctx, name: &str, grad_accum: usize, resume: Option<&Checkpoint>) -> Result<usize> {
    let world = ctx.comm.world();
    let started = resume.map(|c| c.state.world_size).unwrap_or(world);
    ctx.batch_world.set(started);
    if started == world {
        return Ok(grad_accum);
    }
    let global = grad_accum * started;
    if global % world != 0 {
        bail!(
            "[{name}] the checkpoint's global batch is {global} micro-batches (grad_accum {grad_accum} × {started} ranks), which {world} ranks cannot share evenly; resume on a world size dividing {global}"
        );
    }
    if ctx.comm.is_main() {
        eprintln!(
            "[{name}] warning: resuming on {world} rank(s) a stage started on {started}: keeping its global batch of {global} micro-batches ({} per rank); the run continues correctly but not bit-identically to an uninterrupted one",
            global / world
        );
    }
    Ok(global / world)
}

/// SHA-256 of the model's parameters and its adapter's (names and bytes, in order).
pub fn fingerprint(model: &Model) -> String {
    let mut h = Sha256::new();
    let adapter = model.net.adapters().map(|a| &a.params);
    for (n, t) in model.net.params.iter().chain(adapter.into_iter().flat_map(|a| a.iter())) {
        let t = t.detach().to_device(tch::Device::Cpu).contiguous();
        let mut bytes = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
        t.copy_data_u8(&mut bytes, t.numel());
        h.update(n.as_bytes());
        h.update(&bytes);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// After a stage: the replicas must be identical on every rank (they are when the all-reduces did their
/// job); an error names the ranks that differ.
pub fn check_replicas(ctx: &Ctx, model: &Model, name: &str) -> Result<()> {
    if ctx.comm.world() == 1 {
        return Ok(());
    }
    super::sharding::ensure_whole(ctx)?;
    let mine = fingerprint(model);
    let all = ctx.comm.all_gather_bytes(mine.as_bytes())?;
    let differ: Vec<usize> = all.iter().enumerate().filter(|(_, h)| h.as_slice() != mine.as_bytes()).map(|(r, _)| r).collect();
    if !differ.is_empty() {
        bail!("[{name}] the model replicas diverged: rank {} holds different weights from rank(s) {differ:?}", ctx.comm.rank());
    }
    if ctx.comm.is_main() {
        eprintln!("[{name}] replicas identical on {} ranks (weights sha256 {})", ctx.comm.world(), &mine[..16]);
    }
    Ok(())
}

/// This rank's contiguous share of `n` items that need not split evenly (the first ranks take one more).
pub fn share_range(ctx: &Ctx, n: usize) -> std::ops::Range<usize> {
    let (r, w) = (ctx.comm.rank(), ctx.comm.world());
    let (base, extra) = (n / w, n % w);
    let start = r * base + r.min(extra);
    start..start + base + usize::from(r < extra)
}

/// Every rank's share, concatenated in rank order (the whole list when each rank computed its
/// [`share_range`]).
pub fn gather_concat<T: serde::Serialize + serde::de::DeserializeOwned>(ctx: &Ctx, mine: Vec<T>) -> Result<Vec<T>> {
    if ctx.comm.world() == 1 {
        return Ok(mine);
    }
    Ok(gather(ctx, &mine)?.into_iter().flatten().collect())
}

/// This rank's contiguous share of a step's prompts and the index of its first one in the step's draw.
pub fn shard_at<T>(ctx: &Ctx, items: Vec<T>) -> (Vec<T>, usize) {
    let first = ctx.comm.rank() * (items.len() / ctx.comm.world());
    (shard(ctx, items), first)
}

/// Every rank's values, in rank order, and the range holding this rank's (exact: their bytes travel).
pub fn gather_f64(ctx: &Ctx, mine: &[f64]) -> Result<(Vec<f64>, std::ops::Range<usize>)> {
    let bytes: Vec<u8> = mine.iter().flat_map(|x| x.to_le_bytes()).collect();
    let all = ctx.comm.all_gather_bytes(&bytes)?;
    let start: usize = all[..ctx.comm.rank()].iter().map(|b| b.len() / 8).sum();
    let values = all.concat().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
    Ok((values, start..start + mine.len()))
}

/// Every rank's `mine`, in rank order.
pub fn gather<T: serde::Serialize + serde::de::DeserializeOwned>(ctx: &Ctx, mine: &T) -> Result<Vec<T>> {
    if ctx.comm.world() == 1 {
        return Ok(vec![serde_json::from_value(serde_json::to_value(mine)?)?]);
    }
    let bytes = serde_json::to_vec(mine)?;
    ctx.comm.all_gather_bytes(&bytes)?.iter().map(|b| Ok(serde_json::from_slice(b)?)).collect()
}

/// Every rank's items, in rank order, and the indices of this rank's among them (exact: they cross as JSON,
/// whose numbers round-trip f64, so every rank takes the same decisions from the same values).
pub fn gather_indexed<T: serde::Serialize + serde::de::DeserializeOwned>(ctx: &Ctx, mine: Vec<T>) -> Result<(Vec<T>, std::ops::Range<usize>)> {
    if ctx.comm.world() == 1 {
        let n = mine.len();
        return Ok((mine, 0..n));
    }
    let all = gather(ctx, &mine)?;
    let start: usize = all[..ctx.comm.rank()].iter().map(Vec::len).sum();
    Ok((all.into_iter().flatten().collect(), start..start + mine.len()))
}

#[cfg(test)]
mod tests {
    /// Gathered rewards and reference log-probs cross ranks (and reference caches cross restarts) as JSON:
    /// parsing must give back the exact f64 (serde_json's `float_roundtrip`; its default parser can be 1 ulp
    /// off, as it was for this value from a 2-rank DPO reference pass).
    #[test]
    fn f64_values_survive_json_exactly() {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut values = vec![-3.9842071533203125f64, -2.3500428199768066, 1e-300, f64::MAX, f64::MIN_POSITIVE];
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = f64::from_bits(x);
            if v.is_finite() {
                values.push(v);
            }
        }
        let text = serde_json::to_string(&values).unwrap();
        let back: Vec<f64> = serde_json::from_str(&text).unwrap();
        for (a, b) in values.iter().zip(&back) {
            assert_eq!(a.to_bits(), b.to_bits(), "{a:e} came back as {b:e}");
        }
    }
}
