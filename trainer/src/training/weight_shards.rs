//! ZeRO-3's sharded weights (`[run] sharding = "full"`, driven by `training::sharding`): each rank's blocks of
//! the trained parameters, and gathering and releasing their whole tensors.

use anyhow::Result;
use tch::Tensor;

use super::shard_layout::{block_of, Layout};

/// ZeRO-3: the trained weights live in this rank's blocks (one per bucket); a bucket's parameters are whole
/// only while gathered — a decoder layer's around its forward and its backward (the model's layer hook), the
/// embedding, final norm and head for a step's training passes, and everything for the passes that read whole
/// weights (sampling, log-probabilities without gradients, evaluation, checkpoints:
/// [`crate::training::sharding::ensure_whole`]).
/// Released parameters are empty tensors (`set_data`), so the model's modules keep pointing at them.
pub struct WeightShards {
    comm: std::rc::Rc<dyn dist::Communicator>,
    layout: Layout,
    params: Vec<Tensor>,
    shapes: Vec<Vec<i64>>,
    pub(super) blocks: Vec<Tensor>,
    /// Per bucket: its parameters are whole now.
    gathered: std::cell::RefCell<Vec<bool>>,
    /// Per bucket: an all-gather started ahead of its use (prefetch), with its output buffer.
    prefetched: std::cell::RefCell<Vec<Option<(Tensor, dist::Pending)>>>,
}

impl WeightShards {
    /// From whole parameters: copies this rank's elements into its blocks (the parameters stay whole).
    pub(super) fn new(comm: std::rc::Rc<dyn dist::Communicator>, layout: Layout, params: &[(String, Tensor)]) -> WeightShards {
        let owned = layout.owned();
        let blocks = layout.buckets.iter().map(|b| block_of(b, &owned, |i| Some(params[i].1.shallow_clone()), b.kind)).collect();
        WeightShards {
            comm,
            gathered: std::cell::RefCell::new(vec![true; layout.buckets.len()]),
            prefetched: std::cell::RefCell::new((0..layout.buckets.len()).map(|_| None).collect()),
            layout,
            shapes: params.iter().map(|(_, p)| p.size()).collect(),
            params: params.iter().map(|(_, p)| p.shallow_clone()).collect(),
            blocks,
        }
    }

    /// Makes bucket `b`'s parameters whole (an all-gather), unless they are.
    fn gather(&self, b: usize) -> Result<()> {
        if self.gathered.borrow()[b] {
            return Ok(());
        }
        // the all-gather started ahead (prefetched), or now
        self.prefetch(b)?;
        let (full, pending) = self.prefetched.borrow_mut()[b].take().expect("started just above");
        pending.wait()?;
        let bucket = &self.layout.buckets[b];
        tch::no_grad(|| {
            for &(i, start, n) in &bucket.members {
                self.params[i].shallow_clone().set_data(&full.narrow(0, start, n).view(self.shapes[i].as_slice()));
            }
        });
        self.gathered.borrow_mut()[b] = true;
        Ok(())
    }

    /// Starts bucket `b`'s all-gather, to be finished by [`WeightShards::gather`] (the next layer's weights
    /// travel while this one computes).
    fn prefetch(&self, b: usize) -> Result<()> {
        if self.gathered.borrow()[b] || self.prefetched.borrow()[b].is_some() {
            return Ok(());
        }
        let full = self.layout.flat_buffer(b, self.layout.buckets[b].kind);
        let pending = self.comm.all_gather_flat_start(&full, &self.blocks[b])?;
        self.prefetched.borrow_mut()[b] = Some((full, pending));
        Ok(())
    }

    pub(super) fn prefetch_layer(&self, layer: usize) -> Result<()> {
        self.layout.buckets_of(Some(layer)).into_iter().try_for_each(|b| self.prefetch(b))
    }

    /// Frees bucket `b`'s whole parameters (its block stays).
    fn release(&self, b: usize) {
        if !self.gathered.borrow()[b] {
            return;
        }
        let bucket = &self.layout.buckets[b];
        tch::no_grad(|| {
            for &(i, _, _) in &bucket.members {
                self.params[i].shallow_clone().set_data(&Tensor::empty([0], (bucket.kind, bucket.device)));
            }
        });
        self.gathered.borrow_mut()[b] = false;
    }

    pub(super) fn gather_layer(&self, layer: Option<usize>) -> Result<()> {
        self.layout.buckets_of(layer).into_iter().try_for_each(|b| self.gather(b))
    }

    pub(super) fn release_layer(&self, layer: Option<usize>) {
        self.layout.buckets_of(layer).into_iter().for_each(|b| self.release(b))
    }

    /// Every parameter whole (all-gathers the buckets that are not).
    pub fn gather_all(&self) -> Result<()> {
        (0..self.layout.buckets.len()).try_for_each(|b| self.gather(b))
    }

    /// Every whole parameter released.
    pub fn release_all(&self) {
        (0..self.layout.buckets.len()).for_each(|b| self.release(b))
    }
}

