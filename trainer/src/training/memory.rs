//! The per-rank memory plan `--dry-run` prints (issue 20): the bytes of weights, update state (fp32 masters,
//! Kahan buffers), gradients, AdamW moments, the reference model, the rollout engine's decode-weight copy and
//! KV cache, and an activation estimate, per data-parallel rank, for each way of sharding the training state
//! over the ranks (ZeRO, Rajbhandari et al. 2020, arXiv 1910.02054: stage 1 shards the optimizer state, stage 2
//! the gradients too, stage 3 the parameters too).
//!
//! The modes are `[run] sharding` (see `training::sharding` for what each one does).

use tch::Kind;

pub use crate::settings::Sharding;
use crate::settings::UpdatePrecision;

/// What a stage's step holds besides the model (from its keys).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StageShape {
    /// Rows × tokens of one micro-batch's forward and backward.
    pub micro_tokens: i64,
    /// A frozen reference model is held (GRPO with a KL term).
    pub reference: bool,
    /// The stage samples with the rollout engine: (KV-cache token slots, fused decode weights).
    pub sampling: Option<(i64, bool)>,
    /// Activation checkpointing.
    pub checkpointing: bool,
    /// Rows of the chunked log-probability head (`loss_chunk`).
    pub logit_rows: i64,
    /// A step runs several micro-batches on a rank (their gradient sum is kept beside the running one).
    pub accumulates: bool,
}

/// The model's dimensions the plan needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelShape {
    pub params: i64,
    pub layers: i64,
    pub hidden: i64,
    pub intermediate: i64,
    pub vocab: i64,
    /// Key and value elements per token per layer (2 × KV heads × head dim).
    pub kv_per_token_layer: i64,
    /// Parameters of the embedding and the (untied) head: not in the decode copy.
    pub embed_params: i64,
}

impl ModelShape {
    pub fn of(c: &model::ModelConfig) -> ModelShape {
        let embed = c.vocab_size * c.hidden_size * if c.tie_word_embeddings { 1 } else { 2 };
        ModelShape {
            params: c.num_parameters(),
            layers: c.num_hidden_layers,
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            vocab: c.vocab_size,
            kv_per_token_layer: 2 * c.num_key_value_heads * c.head_dim,
            embed_params: embed,
        }
    }
}

/// One rank's bytes in one stage.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RankMemory {
    pub weights: f64,
    pub update_state: f64,
    pub gradients: f64,
    pub moments: f64,
    pub reference: f64,
    pub decode_weights: f64,
    pub kv_cache: f64,
    pub activations: f64,
    /// The optimizer step's fp32 temporaries (gradient, update, denominator of one parameter tensor at a
    /// time: three times the largest one's elements; under full sharding its shard).
    pub step_temporaries: f64,
}

impl RankMemory {
    /// The peak: the training state and reference model are held throughout; sampling (decode copy and KV
    /// cache), a micro-batch's activations and the optimizer step's temporaries come one after another (the
    /// engine frees its cache and copy when a generation round ends).
    pub fn total(&self) -> f64 {
        self.state() + self.reference + (self.decode_weights + self.kv_cache).max(self.activations).max(self.step_temporaries)
    }

    /// The training state alone (weights, update state, gradients, moments).
    pub fn state(&self) -> f64 {
        self.weights + self.update_state + self.gradients + self.moments
    }
}

/// The plan's inputs that do not change between stages.
pub struct Plan {
    pub model: ModelShape,
    /// The dtype weights are held in, and the one forwards compute in (autocast, or the weights').
    pub weights: Kind,
    pub compute: Kind,
    pub precision: UpdatePrecision,
    /// LoRA: the adapter's parameter count (the base is frozen: no gradients, no optimizer state).
    pub adapter: Option<i64>,
    pub world: i64,
}

impl Plan {
    /// One rank's bytes in a stage shaped `s` under `sharding`.
    pub fn rank(&self, s: &StageShape, sharding: Sharding) -> RankMemory {
        let m = &self.model;
        let n = m.params as f64;
        let w = self.world.max(1) as f64;
        let [wb, extra, gb, mb] = super::precision::bytes_per_parameter(self.weights, &self.precision);
        let layer = (m.params - m.embed_params) as f64 / m.layers.max(1) as f64;
        // what one rank keeps of a state sharded from `from` on
        let part = |from: Sharding| if sharding as u8 >= from as u8 { 1.0 / w } else { 1.0 };
        let mut r = RankMemory::default();
        match self.adapter {
            Some(a) => {
                // a frozen base, whole on every rank (sharding spreads the trained parameters: the adapter)
                let a = a as f64;
                r.weights = n * wb as f64 + a * 4.0 * part(Sharding::Full);
                r.gradients = a * 4.0 * part(Sharding::Gradients);
                r.moments = a * 8.0 * part(Sharding::Optimizer);
            }
            None => {
                // full sharding: this rank's blocks, the gathered layer and the next one (prefetched), and the
                // embedding, norm and head gathered for the step's training passes
                let embed = m.embed_params as f64;
                r.weights = n * wb as f64 * part(Sharding::Full) + if sharding == Sharding::Full { (2.0 * layer + embed) * wb as f64 } else { 0.0 };
                r.update_state = n * extra as f64 * part(Sharding::Optimizer);
                let full = n * gb as f64;
                r.gradients = match sharding {
                    // the running micro-batch's gradient, and the sum of the earlier ones (data_parallel::Accum)
                    Sharding::None | Sharding::Optimizer => full * if s.accumulates { 2.0 } else { 1.0 },
                    // this rank's shard of the sum, what the running micro-batch's backward holds before it is
                    // reduced (with checkpointing one layer's gradient and the embedding's and head's, reduced
                    // layer by layer with two layers' reduce-scatter buffers in flight; else the whole
                    // gradient), and the reduce-scatter's flat buffer of the largest bucket (the embedding's)
                    // (full sharding runs under activation checkpointing)
                    Sharding::Gradients | Sharding::Full if s.checkpointing || sharding == Sharding::Full => full / w + (3.0 * layer + 2.0 * embed) * gb as f64,
                    Sharding::Gradients | Sharding::Full => full / w + full + embed * gb as f64,
                };
                r.moments = n * mb as f64 * part(Sharding::Optimizer);
            }
        }
        // GRPO's KL reference: a second, whole copy of the weights (under LoRA the base with the adapter off: free)
        if s.reference && self.adapter.is_none() {
            r.reference = n * wb as f64;
        }
        let cb = self.compute.elt_size_in_bytes() as f64;
        if let Some((slots, fused)) = s.sampling {
            r.kv_cache = (slots * m.layers * m.kv_per_token_layer) as f64 * cb;
            // the engine decodes on a fused copy of the layers in the compute dtype
            let layers = (m.params - m.embed_params) as f64;
            r.decode_weights = if fused { layers * cb } else { 0.0 };
        }
        // full sharding: sampling, log-probabilities without gradients, evaluation and checkpoints run on the
        // whole weights, gathered for the pass
        if sharding == Sharding::Full && self.adapter.is_none() {
            r.decode_weights += n * wb as f64;
        }
        r.activations = activations(m, s, cb);
        // the largest tensor: the embedding (vocab × hidden), or an adapter's
        let largest = match self.adapter {
            Some(_) => 0.0,
            None => (m.vocab * m.hidden) as f64 * part(Sharding::Optimizer),
        };
        r.step_temporaries = 3.0 * 4.0 * largest;
        r
    }
}

/// Activation bytes of one micro-batch's forward and backward in the compute dtype. Without checkpointing each
/// layer keeps about `t · (16 h + 4 i)` values for its backward (norms, q/k/v, attention output, the MLP's
/// gate, up and their product; fused attention keeps no `t²` scores — after Korthikanti et al. 2022, arXiv
/// 2205.05198, whose 34·s·b·h counts the unfused scores too); with checkpointing one `t · h` input per layer
/// plus one layer's worth. The chunked head adds `logit_rows × vocab` fp32 logits and their gradient.
fn activations(m: &ModelShape, s: &StageShape, bytes: f64) -> f64 {
    let t = s.micro_tokens as f64;
    let per_layer = t * (16 * m.hidden + 4 * m.intermediate) as f64 * bytes;
    let trunk = if s.checkpointing { t * m.hidden as f64 * bytes * m.layers as f64 + per_layer } else { per_layer * m.layers as f64 };
    trunk + 2.0 * (s.logit_rows.min(s.micro_tokens) * m.vocab) as f64 * 4.0
}

/// Parses a memory size: `80GB`, `80G`, `80GiB`, `141 GB`, or bytes.
pub fn parse_bytes(s: &str) -> Result<f64, String> {
    let t = s.trim().to_ascii_lowercase().replace(' ', "");
    let (num, unit) = t.split_at(t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len()));
    let n: f64 = num.parse().map_err(|_| format!("--gpu-memory {s}: expected a size such as 80GB"))?;
    let k = match unit {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "tb" | "t" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0f64.powi(3),
        _ => return Err(format!("--gpu-memory {s}: unknown unit \"{unit}\" (GB, GiB, MB, ...)")),
    };
    Ok(n * k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::{StateDtype, WeightUpdate};

    /// Phi-4-mini's 3.84 B parameters in bf16 with fp32 master weights on 8 ranks: 16 B a parameter unsharded,
    /// 2 + 2 + 12/8 with the optimizer sharded, 2 + 14/8 with gradients too, 16/8 with everything (the figures
    /// of issue 20: about 61, 21, 14 and 8 GB), plus what whet holds on top: one gathered layer under full
    /// sharding (and the embedding's), one micro-batch's whole gradient under gradient sharding (with activation
    /// checkpointing one layer's and the embedding's, and the reduction's buffer), a second gradient when
    /// unsharded gradients accumulate.
    #[test]
    fn training_state_per_rank_follows_the_zero_stages() {
        let model = ModelShape { params: 3_840_000_000, layers: 32, hidden: 3072, intermediate: 8192, vocab: 200_064, kv_per_token_layer: 2 * 8 * 128, embed_params: 200_064 * 3072 };
        let plan = Plan { model, weights: Kind::BFloat16, compute: Kind::BFloat16, precision: UpdatePrecision { update: WeightUpdate::MasterFp32, state: StateDtype::Float32, seed: 0 }, adapter: None, world: 8 };
        let s = StageShape::default();
        let gb = |x: f64| x / 1e9;
        let layer = (model.params - model.embed_params) as f64 / 32.0;
        let state = |sh| plan.rank(&s, sh).state();
        assert!((gb(state(Sharding::None)) - 61.44).abs() < 0.01);
        assert!((gb(state(Sharding::Optimizer)) - 3.84 * 5.5).abs() < 0.01);
        let bucket = 2.0 * model.embed_params as f64;
        assert!((gb(state(Sharding::Gradients) - 2.0 * 3.84e9 - bucket) - 3.84 * 3.75).abs() < 0.01);
        let accumulating = StageShape { accumulates: true, ..s };
        assert!((gb(plan.rank(&accumulating, Sharding::Optimizer).state()) - 3.84 * 7.5).abs() < 0.01);
        assert_eq!(plan.rank(&accumulating, Sharding::Gradients).state(), state(Sharding::Gradients));
        // with activation checkpointing ZeRO-2 reduces layer by layer: one layer's gradient and the embedding's
        let ck = StageShape { checkpointing: true, ..s };
        let held = 2.0 * (3.0 * layer + model.embed_params as f64) + bucket;
        assert!((gb(plan.rank(&ck, Sharding::Gradients).state() - held) - 3.84 * 3.75).abs() < 0.01);
        let embed = model.embed_params as f64;
        assert!((gb(state(Sharding::Full) - 2.0 * (5.0 * layer + 3.0 * embed)) - 3.84 * 2.0).abs() < 0.01);
        // LoRA: the frozen base and 16 B per adapter parameter
        let lora = Plan { adapter: Some(10_000_000), ..plan };
        assert!((lora.rank(&s, Sharding::None).state() - (3.84e9 * 2.0 + 16.0 * 1e7)).abs() < 1.0);
    }

    #[test]
    fn sampling_holds_the_kv_cache_and_a_decode_copy() {
        let model = ModelShape { params: 1000, layers: 2, hidden: 8, intermediate: 16, vocab: 10, kv_per_token_layer: 4, embed_params: 200 };
        let plan = Plan { model, weights: Kind::Float, compute: Kind::BFloat16, precision: UpdatePrecision::default(), adapter: None, world: 2 };
        let s = StageShape { sampling: Some((100, true)), ..Default::default() };
        let r = plan.rank(&s, Sharding::None);
        assert_eq!(r.kv_cache, 100.0 * 2.0 * 4.0 * 2.0);
        assert_eq!(r.decode_weights, 800.0 * 2.0);
        assert_eq!(plan.rank(&s, Sharding::Full).decode_weights, 800.0 * 2.0 + 1000.0 * 4.0);
        // the peak holds sampling or a micro-batch's activations, not both
        let r = plan.rank(&StageShape { micro_tokens: 1, ..s }, Sharding::None);
        assert_eq!(r.total(), r.state() + r.decode_weights + r.kv_cache);
        assert_eq!(parse_bytes("80GB").unwrap(), 80e9);
        assert_eq!(parse_bytes("1 GiB").unwrap(), 1024f64.powi(3));
        assert!(parse_bytes("80 parsecs").is_err());
    }
}
