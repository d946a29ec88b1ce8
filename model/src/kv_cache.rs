//! A preallocated key/value cache for incremental decoding: per layer, keys and values
//! `[batch, kv_heads, capacity, head_dim]`, filled left to right. Rows can be dropped (finished sequences)
//! or repeated (n samples sharing one prompt's prefill) without recomputing anything.

use crate::config::ModelConfig;
use tch::{Device, Kind, Tensor};

pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    len: i64,
    capacity: i64,
    rope_long: Option<bool>,
    /// Per row: rows with the same group hold identical keys and values in slots `0..end` (copies of one
    /// prefilled prompt, see [`KvCache::shared_prefix`]).
    shared: Vec<Option<(u32, i64)>>,
    next_group: u32,
}

impl KvCache {
    pub fn new(cfg: &ModelConfig, batch: i64, capacity: i64, kind: Kind, device: Device) -> KvCache {
        let shape = [batch, cfg.num_key_value_heads, capacity, cfg.head_dim];
        let n = cfg.num_hidden_layers as usize;
        let k = (0..n).map(|_| Tensor::zeros(shape, (kind, device))).collect();
        let v = (0..n).map(|_| Tensor::zeros(shape, (kind, device))).collect();
        KvCache { k, v, len: 0, capacity, rope_long: None, shared: vec![None; batch.max(0) as usize], next_group: 0 }
    }

    /// `Some((group, end))` when this row's slots `0..end` hold the same keys and values as those of every
    /// other row of `group`: rows repeated from one row ([`KvCache::select_rows`], [`KvCache::repeat_rows`]),
    /// as the n samples of one prompt are, share what was cached when they were copied. Readers may then read
    /// those slots from any row of the group (the native decode step reads them from the group's first row,
    /// so that n samples read their prompt's keys from memory once).
    pub fn shared_prefix(&self, row: usize) -> Option<(u32, i64)> {
        self.shared.get(row).copied().flatten()
    }

    /// Bytes one cached token takes over all layers (keys and values), for cache budgets.
    pub fn bytes_per_token(cfg: &ModelConfig, kind: Kind) -> i64 {
        2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * kind.elt_size_in_bytes() as i64
    }

    /// Number of cached positions (shared by all rows; shorter rows are left-padded).
    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> i64 {
        self.capacity
    }

    pub fn batch(&self) -> i64 {
        self.k.first().map(|t| t.size()[0]).unwrap_or(0)
    }

    pub(crate) fn layer_mut(&mut self, i: usize) -> (&mut Tensor, &mut Tensor) {
        (&mut self.k[i], &mut self.v[i])
    }

    /// Counts `t` more cached positions: what a forward through the cache does, and what the caller of a
    /// static step ([`crate::Transformer::decode_static`], which leaves the host side alone) does for it.
    pub fn advance(&mut self, t: i64) {
        self.len += t;
    }

    /// Keeps the rows `index` (int64 `[B']`, any order, repeats allowed): drops finished sequences or
    /// expands a prompt's prefill into its group of samples.
    pub fn select_rows(&mut self, index: &Tensor) {
        let host: Vec<i64> = Vec::try_from(index.to_device(Device::Cpu).to_kind(Kind::Int64).view([-1])).expect("row indices");
        let mut copies = vec![0usize; self.shared.len()];
        for &i in &host {
            copies[i as usize] += 1;
        }
        // a row taken more than once: its copies share everything cached so far
        let mut fresh = std::collections::HashMap::new();
        let shared = host
            .iter()
            .map(|&i| {
                let i = i as usize;
                self.shared[i].or_else(|| {
                    (copies[i] > 1).then(|| {
                        let len = self.len;
                        let next = &mut self.next_group;
                        *fresh.entry(i).or_insert_with(|| {
                            *next += 1;
                            (*next - 1, len)
                        })
                    })
                })
            })
            .collect();
        self.shared = shared;
        let index = index.to_device(self.k[0].device());
        for t in self.k.iter_mut().chain(self.v.iter_mut()) {
            *t = t.index_select(0, &index);
        }
    }

    /// Repeats every row `n` times in place (row r becomes rows r*n .. r*n+n-1).
    pub fn repeat_rows(&mut self, n: i64) {
        let rows = self.shared.len() as i64;
        self.select_rows(&Tensor::arange(rows, (Kind::Int64, Device::Cpu)).repeat_interleave_self_int(n, 0, None));
    }

    /// A new cache holding the rows of `self` followed by the rows of `other` (slot refill: sequences that
    /// join a running batch). Of each cache only its last `keep_self` / `keep_other` positions are kept (what
    /// its rows still attend to: left-padded rows hold their content at the end), right-aligned at the
    /// common length `max(keep_self, keep_other)` in `capacity` positions; the positions before a row's
    /// content are zero and must be masked out as padding by the caller. Keys carry their rotation already,
    /// so moving them to other slots changes nothing: a token's position is its position id, not its slot.
    /// Both caches must use the same LongRoPE choice.
    pub fn concat_right_aligned(&self, keep_self: i64, other: &KvCache, keep_other: i64, capacity: i64) -> KvCache {
        assert_eq!(self.k.len(), other.k.len(), "caches of different models");
        assert!(
            self.rope_long.is_none() || other.rope_long.is_none() || self.rope_long == other.rope_long,
            "caches with different LongRoPE factors"
        );
        assert!(keep_self <= self.len && keep_other <= other.len, "keeping more positions than cached");
        let len = keep_self.max(keep_other);
        assert!(capacity >= len, "capacity {capacity} below the merged length {len}");
        let merge = |a: &[Tensor], b: &[Tensor]| -> Vec<Tensor> {
            a.iter()
                .zip(b)
                .map(|(x, y)| {
                    let s = x.size();
                    let (ba, bb) = (s[0], y.size()[0]);
                    let out = Tensor::empty([ba + bb, s[1], capacity, s[3]], (x.kind(), x.device()));
                    // the slots before each row's content are masked, but must hold finite numbers
                    let _ = out.narrow(2, 0, len).zero_();
                    out.narrow(0, 0, ba).narrow(2, len - keep_self, keep_self).copy_(&x.narrow(2, self.len - keep_self, keep_self));
                    out.narrow(0, ba, bb).narrow(2, len - keep_other, keep_other).copy_(&y.narrow(2, other.len - keep_other, keep_other));
                    out
                })
                .collect()
        };
        // slot j of a cache of length l moves to j + len − l; what falls before 0 was zeroed in every row, so
        // the shared part stays shared (groups of `other` renumbered after those of `self`)
        let shift = |s: &Option<(u32, i64)>, from: i64, offset: u32| s.and_then(|(g, end)| (end + len - from > 0).then_some((g + offset, end + len - from)));
        let shared = self.shared.iter().map(|s| shift(s, self.len, 0)).chain(other.shared.iter().map(|s| shift(s, other.len, self.next_group))).collect();
        KvCache {
            k: merge(&self.k, &other.k),
            v: merge(&self.v, &other.v),
            len,
            capacity,
            rope_long: self.rope_long.or(other.rope_long),
            shared,
            next_group: self.next_group + other.next_group,
        }
    }

    /// LongRoPE factor choice of this cache (`None` until the first forward, which picks it from the
    /// capacity). Pass it as [`crate::Batch::rope_long`] when recomputing log-probabilities in training.
    pub fn rope_long(&self) -> Option<bool> {
        self.rope_long
    }

    /// Fixes the LongRoPE factor choice (before the first forward).
    pub fn set_rope_long(&mut self, long: bool) {
        self.rope_long = Some(long);
    }

    /// Forgets every cached position (the buffers are kept).
    pub fn clear(&mut self) {
        self.len = 0;
        self.shared.iter_mut().for_each(|s| *s = None);
    }
}
