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
    /// How decode steps run: "dynamic" (default: shapes follow the batch; on an AVX-512 CPU the native step),
    /// "static" (fixed-shape steps, sampling on the device, a host read every `sync_every` steps; on a CUDA
    /// device replayed as CUDA graphs), or "auto" (static on a CUDA device whose CUDA graphs work, else dynamic).
    pub decode: DecodeMode,
    /// Static decoding: decode steps between host reads (where stops are noticed).
    pub sync_every: usize,
}

/// `[generation] decode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DecodeMode {
    Auto,
    Dynamic,
    Static,
}

impl DecodeMode {
    /// Whether a model on `device` decodes with static steps.
    pub fn is_static(self, device: tch::Device) -> bool {
        match self {
            DecodeMode::Dynamic => false,
            DecodeMode::Static => true,
            DecodeMode::Auto => model::cuda_graph::available(device).is_ok(),
        }
    }
}

impl Default for GenerationSpec {
    fn default() -> Self {
        let e = rollout::EngineConfig::default();
        GenerationSpec {
            max_batch_seqs: e.max_batch_seqs,
            cache_budget_tokens: e.cache_budget_tokens,
            slot_refill: e.slot_refill,
            fuse_weights: e.fuse_weights,
            decode: DecodeMode::Dynamic,
            sync_every: e.sync_every,
        }
    }
}

impl GenerationSpec {
    /// The engine settings for a model on `device` (stop ids, padding and seed are the caller's).
    pub fn engine(&self, device: tch::Device) -> rollout::EngineConfig {
        let static_decode = self.decode.is_static(device);
        rollout::EngineConfig {
            max_batch_seqs: self.max_batch_seqs,
            cache_budget_tokens: self.cache_budget_tokens,
            slot_refill: self.slot_refill,
            fuse_weights: self.fuse_weights,
            static_decode,
            sync_every: self.sync_every,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_mode_picks_the_engine_path() {
        let spec = |decode| GenerationSpec { decode, sync_every: 5, ..Default::default() };
        let cpu = tch::Device::Cpu;
        assert!(!spec(DecodeMode::Dynamic).engine(cpu).static_decode);
        assert!(spec(DecodeMode::Static).engine(cpu).static_decode);
        // auto: static only where CUDA graphs work, so dynamic (the native step) on a CPU
        assert!(!spec(DecodeMode::Auto).engine(cpu).static_decode);
        assert_eq!(spec(DecodeMode::Static).engine(cpu).sync_every, 5);
        let parsed: GenerationSpec = toml::from_str("decode = \"auto\"\nsync_every = 8").unwrap();
        assert_eq!((parsed.decode, parsed.sync_every), (DecodeMode::Auto, 8));
        assert!(toml::from_str::<GenerationSpec>("decode = \"graphs\"").is_err());
    }
}
