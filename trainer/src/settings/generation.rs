//! `[generation]`: how the in-process rollout engine batches every sampling pass of the run.

use serde::{Deserialize, Serialize};

/// `[generation]`: how the in-process rollout engine batches (vLLM's `max_num_seqs` and KV-cache size).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct GenerationSpec {
    /// Most sequences decoded together (vLLM's `max_num_seqs`).
    pub max_batch_seqs: usize,
    /// KV-cache budget of one batch in token slots (rows × (longest prompt + max new tokens)); memory is this
    /// times the model's KV bytes per token (2 × layers × KV heads × head dim × dtype bytes). Lower it for big
    /// models on small GPUs.
    pub cache_budget_tokens: i64,
    /// Queued sequences join a running batch when finished ones leave it.
    pub slot_refill: bool,
    /// Decode on a per-call fused copy of the projection weights (faster; costs the attention and MLP weights'
    /// bytes while sampling); on an AVX-512 CPU in fp32 the copy is packed for the native decode step
    /// (`WHET_NATIVE_DECODE=0` keeps libtorch's operators).
    pub fuse_weights: bool,
}

impl Default for GenerationSpec {
    fn default() -> Self {
        let e = rollout::EngineConfig::default();
        GenerationSpec { max_batch_seqs: e.max_batch_seqs, cache_budget_tokens: e.cache_budget_tokens, slot_refill: e.slot_refill, fuse_weights: e.fuse_weights }
    }
}

impl GenerationSpec {
    /// The engine settings (stop ids, padding and seed are the caller's).
    pub fn engine(&self) -> rollout::EngineConfig {
        rollout::EngineConfig {
            max_batch_seqs: self.max_batch_seqs,
            cache_budget_tokens: self.cache_budget_tokens,
            slot_refill: self.slot_refill,
            fuse_weights: self.fuse_weights,
            ..Default::default()
        }
    }
}
