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
    /// Train a LoRA adapter instead of the whole model (PEFT's keys and defaults): the base stays frozen in
    /// `dtype`, the adapter trains in fp32, checkpoints and the output are PEFT adapters, and the reference
    /// model of KL and DPO is the base with the adapter switched off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSpec>,
    /// Continue training an existing PEFT adapter directory (adapter_config.json, adapter_model.safetensors)
    /// on the base `path`: its rank, alpha and targets come from its adapter_config.json.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<PathBuf>,
}

/// `[model] lora`: PEFT's LoraConfig keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {
    /// Rank of the adapter matrices.
    #[serde(default = "default_r")]
    pub r: i64,
    /// Scale numerator: the delta is multiplied by lora_alpha / r (lora_alpha / √r with use_rslora).
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    /// Dropout on the adapter's input in training forwards (inverted, as PEFT's nn.Dropout); masks are keyed
    /// by the run seed, step and rank, so resume stays bit-identical.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Module names (a module matches when its name ends with `.` + one), a regular expression over full
    /// module names, or "all-linear". Default: PEFT's per-architecture default (q_proj and v_proj for Llama
    /// and Qwen; Phi-3 has none: name them, e.g. ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_modules: Option<TargetModules>,
    /// Rank-stabilised scaling lora_alpha / √r (Kalajdzievski 2023).
    #[serde(default)]
    pub use_rslora: bool,
}

/// `target_modules`: a list of names, or one string (a regular expression, or "all-linear").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum TargetModules {
    Names(Vec<String>),
    Pattern(String),
}

fn default_r() -> i64 {
    8
}
fn default_alpha() -> f64 {
    8.0
}

impl LoraSpec {
    /// The adapter config for a model of `model_type`.
    pub fn config(&self, model_type: &str) -> Result<model::lora::LoraConfig> {
        use model::lora::Targets;
        let target_modules = match &self.target_modules {
            Some(TargetModules::Names(n)) => Targets::Names(n.clone()),
            Some(TargetModules::Pattern(p)) if p == "all-linear" => Targets::AllLinear,
            Some(TargetModules::Pattern(p)) => Targets::Regex(p.clone()),
            None => Targets::peft_default(model_type).ok_or_else(|| {
                anyhow::anyhow!("[model] lora: PEFT has no default target_modules for model_type \"{model_type}\"; name them, e.g. target_modules = [\"qkv_proj\", \"o_proj\", \"gate_up_proj\", \"down_proj\"] or \"all-linear\"")
            })?,
        };
        Ok(model::lora::LoraConfig { r: self.r, lora_alpha: self.lora_alpha, lora_dropout: self.lora_dropout, target_modules, use_rslora: self.use_rslora, init_lora_weights: true })
    }

    /// Problems with the values.
    pub fn validate(&self, origin: &str, p: &mut Vec<String>) {
        if self.r < 1 {
            p.push(format!("{origin}: [model] lora.r must be a positive integer, got {}", self.r));
        }
        if !(self.lora_alpha > 0.0 && self.lora_alpha.is_finite()) {
            p.push(format!("{origin}: [model] lora.lora_alpha must be a positive number, got {}", self.lora_alpha));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            p.push(format!("{origin}: [model] lora.lora_dropout must be in [0, 1), got {}", self.lora_dropout));
        }
        if let Some(TargetModules::Pattern(r)) = &self.target_modules {
            if r != "all-linear" {
                if let Err(e) = model::lora::check_pattern(r) {
                    p.push(format!("{origin}: [model] lora.target_modules \"{r}\" is not a valid regular expression: {e}"));
                }
            }
        }
    }
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

    /// Problems with the adapter keys.
    pub fn validate_adapter(&self, origin: &str, p: &mut Vec<String>) {
        if let Some(l) = &self.lora {
            l.validate(origin, p);
        }
        match (&self.lora, &self.adapter) {
            (Some(_), Some(_)) => p.push(format!("{origin}: [model] has both `lora` and `adapter`; give one (an existing adapter brings its own lora settings)")),
            (_, Some(a)) if !model::lora::is_adapter_dir(a) => {
                p.push(format!("{origin}: [model] adapter {}: no {} there (expected a PEFT adapter directory)", a.display(), model::lora::CONFIG_FILE))
            }
            _ => {}
        }
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
