//! How sharded data parallelism (`training::sharding`) lays the trained parameters out over the ranks: flat
//! buckets, one per decoder layer and one for the rest (embedding, final norm, head), each padded to a multiple
//! of the world size; rank r owns the r-th equal block of every bucket, so its piece of a parameter is one
//! contiguous run of the parameter's flattened elements (possibly empty).

use std::ops::Range;
use tch::{Kind, Tensor};

/// One flat bucket: its parameters (index, first element in the bucket, elements) and the block each rank owns.
#[derive(Debug, Clone)]
pub(super) struct Bucket {
    pub(super) members: Vec<(usize, i64, i64)>,
    /// The decoder layer its parameters belong to (`None`: embedding, final norm, head).
    pub(super) layer: Option<usize>,
    /// Elements per rank (the bucket padded to `block · world`).
    pub(super) block: i64,
    pub(super) kind: Kind,
    pub(super) device: tch::Device,
}

/// Which elements of every trained parameter each rank owns.
#[derive(Debug, Clone)]
pub struct Layout {
    pub(super) rank: usize,
    pub(super) world: usize,
    pub(super) buckets: Vec<Bucket>,
    /// Elements per parameter.
    pub(super) numels: Vec<i64>,
}

impl Layout {
    /// The layout of `params` (named as the model names them) on `world` ranks: a bucket per decoder layer
    /// (`model.layers.N.…`, in layer order) and one for the rest (embedding, final norm, head), each split
    /// by dtype and device where they mix.
    pub fn new(params: &[(String, Tensor)], rank: usize, world: usize) -> Layout {
        let mut groups: Vec<(Option<usize>, Kind, tch::Device, Vec<usize>)> = vec![];
        for (i, (name, t)) in params.iter().enumerate() {
            let key = (layer_of(name), t.kind(), t.device());
            match groups.iter_mut().find(|g| (g.0, g.1, g.2) == key) {
                Some(g) => g.3.push(i),
                None => groups.push((key.0, key.1, key.2, vec![i])),
            }
        }
        // the rest first, then the layers in order
        groups.sort_by_key(|g| g.0.map_or(0, |l| l + 1));
        let buckets = groups
            .into_iter()
            .map(|(layer, kind, device, idx)| {
                let mut at = 0i64;
                let members: Vec<(usize, i64, i64)> = idx
                    .into_iter()
                    .map(|i| {
                        let n = params[i].1.numel() as i64;
                        at += n;
                        (i, at - n, n)
                    })
                    .collect();
                Bucket { block: (at + world as i64 - 1) / world as i64, members, kind, device, layer }
            })
            .collect();
        Layout { rank, world, buckets, numels: params.iter().map(|(_, p)| p.numel() as i64).collect() }
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

    /// The buckets of decoder layer `layer` (`None`: the embedding, final norm and head).
    pub(super) fn buckets_of(&self, layer: Option<usize>) -> Vec<usize> {
        (0..self.buckets.len()).filter(|&b| self.buckets[b].layer == layer).collect()
    }

    /// The decoder layers that have buckets, in order.
    pub(super) fn layers(&self) -> Vec<usize> {
        let mut l: Vec<usize> = self.buckets.iter().filter_map(|b| b.layer).collect();
        l.dedup();
        l
    }

    /// A zero buffer for bucket `b` whole (every rank's block), in dtype `kind`: a collective's flat side.
    pub(super) fn flat_buffer(&self, b: usize, kind: Kind) -> Tensor {
        let bucket = &self.buckets[b];
        Tensor::zeros([bucket.block * self.world as i64], (kind, bucket.device))
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

/// This rank's block of bucket `b`: the owned pieces of `piece(i)` (the whole parameter, or a flat state
/// piece) in bucket order, zero-padded.
pub(super) fn block_of(b: &Bucket, owned: &[Range<i64>], piece: impl Fn(usize) -> Option<Tensor>, kind: Kind) -> Tensor {
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
    block
}

/// The decoder layer a parameter name belongs to (`model.layers.N.…`).
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ranks_own_every_element_once_in_equal_blocks() {
        let ts: Vec<(String, Tensor)> = [[7i64, 3], [5, 1], [1, 1], [4, 4]].iter().map(|s| ("model.norm.weight".to_string(), Tensor::zeros(s.as_slice(), (Kind::Float, tch::Device::Cpu)))).collect();
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

#[cfg(test)]
mod layer_tests {
    use super::*;

    #[test]
    fn buckets_follow_the_decoder_layers() {
        let t = |n: i64| Tensor::zeros([n], (Kind::Float, tch::Device::Cpu));
        let names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.0.input_layernorm.weight", "model.layers.1.mlp.up_proj.weight", "model.norm.weight"];
        let params: Vec<(String, Tensor)> = names.iter().zip([10, 6, 2, 6, 2]).map(|(n, k)| (n.to_string(), t(k))).collect();
        let l = Layout::new(&params, 0, 2);
        let members: Vec<Vec<usize>> = l.buckets.iter().map(|b| b.members.iter().map(|m| m.0).collect()).collect();
        assert_eq!(members, vec![vec![0, 4], vec![1, 2], vec![3]]);
        assert_eq!(l.buckets.iter().map(|b| b.layer).collect::<Vec<_>>(), vec![None, Some(0), Some(1)]);
        assert_eq!(layer_of("model.layers.12.self_attn.q_proj.lora_A.weight"), Some(12));
        assert_eq!(layer_of("lm_head.weight"), None);
    }
}
