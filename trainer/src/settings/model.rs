//! `[model]`: where the starting weights and tokenizer come from, the dtype they are held and computed in, and
//! how optimizer updates reach low-precision weights (the keys; the numerics are in `training::precision`).

use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use tch::Kind;

/// `[model]`: a Hugging Face directory, a GGUF file, or an inline config for a random-initialised model.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// A Hugging Face model directory or a `.gguf` file (converted on first use).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// An inline config.json (e.g. `{ model_type = "llama", hidden_size = 64, ... }`): random init, seeded.
    #[serde(default)]
    pub config: Option<serde_json::Value>,
    /// Seed of the random initialisation (with `config`).
    #[serde(default)]
    pub init_seed: i64,
    /// Tokenizer: a directory with tokenizer.json, or `"builtin:bytes"` (byte-level, ChatML specials) for
    /// random models. Default: the model directory.
    #[serde(default)]
    pub tokenizer: Option<String>,
    /// The dtype weights are held and computed in: float32, bfloat16 or float16. With bfloat16 or float16
    /// the optimizer still accumulates updates precisely (see `weight_update`).
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// Device: cpu, cuda, cuda:N or auto.
    #[serde(default = "default_device")]
    pub device: String,
    /// Mixed precision (accelerate's `mixed_precision`, TRL's `bf16 = true`): "bf16" keeps fp32 weights and
    /// AdamW state and runs forward passes (training, sampling, evaluation) under bfloat16 autocast; "no"
    /// (default) computes in `dtype`.
    #[serde(default)]
    pub mixed_precision: Option<String>,
    /// How optimizer updates reach bfloat16 / float16 weights (`dtype`): "master_fp32" (default: fp32 master
    /// weights accumulate every update and the low-precision weights used by forward, backward and sampling
    /// are refreshed from them after each step; Megatron's and verl's scheme), "kahan" (Kahan-compensated
    /// updates with a compensation buffer in the weights' dtype: 2 bytes a parameter instead of 4),
    /// "stochastic_rounding" (bfloat16 only: unbiased random rounding, seeded by the run seed and step, no
    /// extra memory) or "direct" (round to nearest, as plain bf16 training: an update below half a bf16 ulp,
    /// 0.2–0.4% of the weight, is lost, and at RL learning rates almost all are). Not used with fp32 weights.
    #[serde(default, skip_serializing_if = "is_default")]
    #[schemars(extend("default" = "master_fp32"))]
    pub weight_update: WeightUpdate,
    /// dtype of AdamW's two moments: "float32" (default) or "bfloat16" (half the optimizer memory; the
    /// update itself is still computed in fp32).
    #[serde(default, skip_serializing_if = "is_default")]
    #[schemars(extend("default" = "float32"))]
    pub optimizer_dtype: StateDtype,
}


impl ModelSpec {
    /// The dtype weights are held in and the autocast dtype of forward passes on `device`.
    pub fn precision(&self, _device: tch::Device) -> Result<(tch::Kind, Option<tch::Kind>)> {
        let kind = model::parse_kind(&self.dtype).map_err(anyhow::Error::msg)?;
        match self.mixed_precision.as_deref() {
            Some("bf16") => Ok((tch::Kind::Float, Some(tch::Kind::BFloat16))),
            _ => Ok((kind, None)),
        }
    }

    /// How the optimizer updates the weights (the run seed seeds stochastic rounding).
    pub fn update_precision(&self, seed: u64) -> UpdatePrecision {
        UpdatePrecision { update: self.weight_update, state: self.optimizer_dtype, seed }
    }

    /// Problems with the precision keys.
    pub fn validate_precision(&self, origin: &str, p: &mut Vec<String>) {
        let Ok((kind, _)) = self.precision(tch::Device::Cpu) else { return };
        let update = self.weight_update;
        if kind == tch::Kind::Float && update != WeightUpdate::default() {
            let why = if self.mixed_precision.as_deref() == Some("bf16") { "mixed_precision = \"bf16\" keeps fp32 weights" } else { "the weights are float32" };
            p.push(format!(
                "{origin}: [model] weight_update = \"{}\" applies to bfloat16 or float16 weights, but {why}: leave weight_update out, or set dtype = \"bfloat16\"",
                update.name()
            ));
        }
        if kind == tch::Kind::Half && update == WeightUpdate::StochasticRounding {
            p.push(format!("{origin}: [model] weight_update = \"stochastic_rounding\" needs dtype = \"bfloat16\" (float16 weights: use \"master_fp32\" or \"kahan\")"));
        }
    }
}

/// Keys at their default are left out of the serialized recipe, so that checkpoints written before the key
/// existed still resume (their fingerprint lacks it).
pub fn is_default<T: Default + PartialEq>(x: &T) -> bool {
    *x == T::default()
}

fn default_dtype() -> String {
    "float32".into()
}
fn default_device() -> String {
    "auto".into()
}

/// How updates reach low-precision weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WeightUpdate {
    /// fp32 master weights accumulate the updates; the low-precision weights are refreshed from them.
    #[default]
    MasterFp32,
    /// Kahan-compensated updates with a compensation buffer in the weights' dtype.
    Kahan,
    /// Stochastic rounding of the updated value (bfloat16 weights only).
    StochasticRounding,
    /// Round to nearest, as plain low-precision training does: updates below half an ulp are lost.
    Direct,
}

impl WeightUpdate {
    pub fn name(self) -> &'static str {
        match self {
            WeightUpdate::MasterFp32 => "master_fp32",
            WeightUpdate::Kahan => "kahan",
            WeightUpdate::StochasticRounding => "stochastic_rounding",
            WeightUpdate::Direct => "direct",
        }
    }
}

/// The dtype AdamW keeps its moments in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StateDtype {
    #[default]
    Float32,
    Bfloat16,
}

impl StateDtype {
    pub fn kind(self) -> Kind {
        match self {
            StateDtype::Float32 => Kind::Float,
            StateDtype::Bfloat16 => Kind::BFloat16,
        }
    }
}

/// The precision settings of one optimizer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdatePrecision {
    pub update: WeightUpdate,
    pub state: StateDtype,
    /// Seeds stochastic rounding (the run seed).
    pub seed: u64,
}

impl Default for UpdatePrecision {
    fn default() -> Self {
        UpdatePrecision { update: WeightUpdate::MasterFp32, state: StateDtype::Float32, seed: 0 }
    }
}
