//! Decoder-only transformers on libtorch (tch), loaded from and saved to the Hugging Face layout.
//!
//! Families: Llama (SmolLM2, Llama 3.x), Qwen2/2.5, Qwen3, Phi-3/Phi-4-mini. The crate knows nothing
//! about training: it gives forward passes (logits or hidden states), an incremental-decoding KV cache,
//! weight I/O (safetensors, GGUF import) and the tokenizer.

pub mod autocast;
pub mod config;
pub mod cuda_graph;
pub mod error;
pub mod gguf;
pub mod kv_cache;
pub mod lora;
pub mod mkl;
pub mod native;
pub mod params;
pub mod rope;
pub mod runtime;
pub mod transformer;
pub mod weights;

pub use config::{Family, ModelConfig, RopeScaling};
pub use error::{ModelError, Result};
pub use kv_cache::KvCache;
pub use params::{Fill, ParamStore};
pub use transformer::{AttnMask, Batch, Checkpoints, DecodeWeights, Transformer};

use std::path::{Path, PathBuf};
use tch::{Device, Kind};

/// Drops `t`'s gradient, freeing its memory (Python's `t.grad = None`); the next backward allocates a new one.
pub fn release_grad(t: &tch::Tensor) {
    extern "C" {
        fn whet_release_grad(t: *mut std::ffi::c_void) -> std::ffi::c_int;
    }
    // SAFETY: `t` is a live at::Tensor for the call; resetting its grad slot cannot fail in practice
    let rc = unsafe { whet_release_grad(t.as_ptr() as *mut std::ffi::c_void) };
    debug_assert_eq!(rc, 0);
}

/// A 64-bit mix for keys from counters: SplitMix64's step and finaliser (Steele, Lea & Flood 2014). Seeds adapter
/// dropout here and the trainer's rounding and dither keys.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A model and where it came from.
pub struct Model {
    pub net: Transformer,
    /// The directory it was loaded from (its tokenizer files are copied when saving).
    pub source_dir: Option<PathBuf>,
}

/// Parses a dtype name as used in recipes and config.json.
pub fn parse_kind(s: &str) -> std::result::Result<Kind, String> {
    match s {
        "float32" | "fp32" | "f32" | "float" => Ok(Kind::Float),
        "bfloat16" | "bf16" => Ok(Kind::BFloat16),
        "float16" | "fp16" | "f16" | "half" => Ok(Kind::Half),
        _ => Err(format!("unknown dtype \"{s}\" (expected float32, bfloat16 or float16)")),
    }
}

impl Model {
    /// Loads a Hugging Face model directory. `kind` defaults to float32.
    pub fn load(dir: &Path, kind: Option<Kind>, device: Device) -> Result<Model> {
        if !dir.is_dir() {
            return Err(ModelError::Other(format!("{}: model directory does not exist", dir.display())));
        }
        let cfg = ModelConfig::from_path(dir)?;
        let kind = kind.unwrap_or(Kind::Float);
        let net = Transformer::build(&cfg, kind, device, Fill::Empty);
        weights::load_into(&net.params, dir, cfg.tie_word_embeddings)?;
        Ok(Model { net, source_dir: Some(dir.to_path_buf()) })
    }

    /// A randomly initialised model (normal(0, 0.02) weights, unit norms, zero biases), seeded.
    pub fn random(cfg: &ModelConfig, kind: Kind, device: Device, seed: i64) -> Model {
        tch::manual_seed(seed);
        let net = Transformer::build(cfg, kind, device, Fill::Normal(0.02));
        Model { net, source_dir: None }
    }

    /// Puts the PEFT adapter saved in `dir` on the network ([`lora`]).
    pub fn load_adapter(&mut self, dir: &Path) -> Result<()> {
        let cfg = lora::read_config(dir)?;
        self.net.add_lora(&cfg).map_err(|e| ModelError::Other(format!("{}: {e}", dir.join(lora::CONFIG_FILE).display())))?;
        lora::load_tensors(self.net.adapters().expect("just added"), dir)
    }

    /// Saves the network's adapter in PEFT's layout (`adapter_config.json`, `adapter_model.safetensors`)
    /// into `dir`, naming `base` as the base model, with the tokenizer files of `tokenizer_dir`.
    pub fn save_adapter(&self, dir: &Path, base: Option<&str>, tokenizer_dir: Option<&Path>) -> Result<()> {
        let a = self.net.adapters().ok_or_else(|| ModelError::Other("the model has no adapter to save".into()))?;
        lora::save(a, dir, base, tokenizer_dir)
    }

    /// Saves in the Hugging Face layout (see [`weights::save_pretrained`]).
    pub fn save(&self, out: &Path, opts: &weights::SaveOptions) -> Result<()> {
        let o = weights::SaveOptions {
            source_dir: opts.source_dir.or(self.source_dir.as_deref()),
            model_dir: opts.model_dir.or(self.source_dir.as_deref()),
            token_ids: opts.token_ids.clone(),
            ..*opts
        };
        weights::save_pretrained(&self.net.params, &self.net.cfg.resolved_json(), self.net.cfg.tie_word_embeddings, out, &o)
    }
}
