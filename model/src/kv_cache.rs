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
}

impl KvCache {
    pub fn new(cfg: &ModelConfig, batch: i64, capacity: i64, kind: Kind, device: Device) -> KvCache {
        let shape = [batch, cfg.num_key_value_heads, capacity, cfg.head_dim];
        let n = cfg.num_hidden_layers as usize;
        let k = (0..n).map(|_| Tensor::zeros(shape, (kind, device))).collect();
        let v = (0..n).map(|_| Tensor::zeros(shape, (kind, device))).collect();
        KvCache { k, v, len: 0, capacity, rope_long: None }
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

    pub(crate) fn advance(&mut self, t: i64) {
        self.len += t;
    }

    /// Keeps the rows `index` (int64 `[B']`, any order, repeats allowed): drops finished sequences or
    /// expands a prompt's prefill into its group of samples.
    pub fn select_rows(&mut self, index: &Tensor) {
        let index = index.to_device(self.k[0].device());
        for t in self.k.iter_mut().chain(self.v.iter_mut()) {
            *t = t.index_select(0, &index);
        }
    }

    /// Repeats every row `n` times in place (row r becomes rows r*n .. r*n+n-1).
    pub fn repeat_rows(&mut self, n: i64) {
        for t in self.k.iter_mut().chain(self.v.iter_mut()) {
            *t = t.repeat_interleave_self_int(n, 0, None);
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
    }
}
