//! LoRA adapters (Hu et al. 2021, arXiv 2106.09685) on the decoder's linear layers, in PEFT's file layout.
//!
//! A targeted projection `y = x Wᵀ + b` becomes `y = x Wᵀ + b + s · (x Aᵀ) Bᵀ` with `A` `[r, in]`, `B`
//! `[out, r]` and `s = lora_alpha / r` (rank-stabilised LoRA, Kalajdzievski 2023 arXiv 2312.03732:
//! `lora_alpha / √r`). `A` starts Kaiming-uniform (a = √5, i.e. U(±1/√in), nn.Linear's default) and `B` at
//! zero, so a new adapter leaves the model unchanged (PEFT's `init_lora_weights = true`). Adapters are held
//! in fp32 whatever the base's dtype; the delta is computed in fp32 and added to the base's output in fp32
//! before the cast back, as PEFT's `Linear.forward` does.
//!
//! Files: `adapter_config.json` with PEFT's keys and `adapter_model.safetensors` whose tensors are named
//! `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` — what `peft.PeftModel.from_pretrained`
//! reads and `save_pretrained` writes.

use crate::error::{ModelError, Result};
use crate::params::ParamStore;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use tch::{Kind, Tensor};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// PEFT's prefix of a causal LM's tensor names (`PeftModelForCausalLM.base_model` → `LoraModel.model`).
const PEFT_PREFIX: &str = "base_model.model.";

/// Which linear layers get an adapter (PEFT's `target_modules`).
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    /// Module names; a module matches when its full name equals one or ends with `.` + one.
    Names(Vec<String>),
    /// A regular expression the full module name must match entirely.
    Regex(String),
    /// Every linear layer of the decoder (PEFT's `"all-linear"`: all but the output head).
    AllLinear,
}

impl Targets {
    pub fn matches(&self, module: &str) -> bool {
        match self {
            Targets::Names(ns) => ns.iter().any(|n| module == n || module.ends_with(&format!(".{n}"))),
            Targets::Regex(r) => regex::Regex::new(&format!("^(?:{r})$")).is_ok_and(|re| re.is_match(module)),
            Targets::AllLinear => true,
        }
    }

    /// As adapter_config.json writes it.
    pub fn to_json(&self) -> Value {
        match self {
            Targets::Names(ns) => json!(ns),
            Targets::Regex(r) => json!(r),
            Targets::AllLinear => json!("all-linear"),
        }
    }

    /// From adapter_config.json's `target_modules` (a list or a string).
    pub fn from_json(v: &Value) -> Option<Targets> {
        match v {
            Value::String(s) if s == "all-linear" => Some(Targets::AllLinear),
            Value::String(s) => Some(Targets::Regex(s.clone())),
            Value::Array(a) => a.iter().map(|x| x.as_str().map(str::to_string)).collect::<Option<Vec<_>>>().map(Targets::Names),
            _ => None,
        }
    }

    /// PEFT's default targets for a model type when `target_modules` is not given
    /// (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`); Phi-3 has none there, so PEFT asks for them.
    pub fn peft_default(model_type: &str) -> Option<Targets> {
        match model_type {
            "llama" | "qwen2" | "qwen3" => Some(Targets::Names(vec!["q_proj".into(), "v_proj".into()])),
            _ => None,
        }
    }
}

/// An adapter's hyper-parameters, with PEFT's names and defaults (r 8, alpha 8, dropout 0).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: i64,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: Targets,
    pub use_rslora: bool,
    /// `true`: B starts at zero (the adapter is the identity); `false`: B is drawn like A (tests only).
    pub init_lora_weights: bool,
}

impl LoraConfig {
    /// The factor `s` of the delta.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// adapter_config.json as PEFT writes it (`base_model_name_or_path`: where the base came from).
    pub fn to_peft_json(&self, base_model_name_or_path: Option<&str>) -> Value {
        json!({
            "alpha_pattern": {},
            "base_model_name_or_path": base_model_name_or_path,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": self.init_lora_weights,
            "layers_pattern": null,
            "layers_to_transform": null,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": {},
            "revision": null,
            "target_modules": self.target_modules.to_json(),
            "task_type": "CAUSAL_LM",
            "use_dora": false,
            "use_rslora": self.use_rslora,
        })
    }

    /// Reads a PEFT adapter_config.json; refuses what whet does not implement (DoRA, trained biases, extra
    /// trained modules, per-layer ranks, ...) by name.
    pub fn from_peft_json(v: &Value, file: &Path) -> Result<LoraConfig> {
        let bad = |what: String| ModelError::weights(file, what);
        let peft_type = v.get("peft_type").and_then(Value::as_str).unwrap_or("LORA");
        if peft_type != "LORA" {
            return Err(bad(format!("peft_type is \"{peft_type}\"; only LORA adapters are supported")));
        }
        let unsupported = |key: &str, ok: &dyn Fn(&Value) -> bool| -> Result<()> {
            match v.get(key) {
                Some(x) if !ok(x) => Err(bad(format!("`{key}` = {x} is not supported (whet loads plain LoRA: no DoRA, no trained biases, no extra trained modules, one rank and alpha for all layers)"))),
                _ => Ok(()),
            }
        };
        let empty = |x: &Value| x.is_null() || x.as_object().is_some_and(|o| o.is_empty()) || x.as_array().is_some_and(|a| a.is_empty());
        unsupported("use_dora", &|x| x == &json!(false))?;
        unsupported("bias", &|x| x == &json!("none"))?;
        unsupported("fan_in_fan_out", &|x| x == &json!(false))?;
        unsupported("modules_to_save", &empty)?;
        unsupported("rank_pattern", &empty)?;
        unsupported("alpha_pattern", &empty)?;
        unsupported("layers_to_transform", &|x| x.is_null())?;
        unsupported("lora_bias", &|x| x == &json!(false))?;
        for key in ["exclude_modules", "target_parameters", "trainable_token_indices", "layer_replication", "alora_invocation_tokens"] {
            unsupported(key, &empty)?;
        }
        let r = v.get("r").and_then(Value::as_i64).unwrap_or(8);
        if r < 1 {
            return Err(bad(format!("`r` must be a positive integer, got {r}")));
        }
        let target_modules = match v.get("target_modules") {
            Some(t) => Targets::from_json(t).ok_or_else(|| bad(format!("`target_modules` must be a list of names or a string, got {t}")))?,
            None => return Err(bad("`target_modules` is missing".into())),
        };
        Ok(LoraConfig {
            r,
            lora_alpha: v.get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0),
            lora_dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
            target_modules,
            use_rslora: v.get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
            init_lora_weights: v.get("init_lora_weights").and_then(Value::as_bool).unwrap_or(true),
        })
    }
}

/// (projections adapted, adapter parameters) of `cfg` on a model `model` (no network is built).
pub fn adapter_size(cfg: &LoraConfig, model: &crate::ModelConfig) -> (usize, i64) {
    let hit: Vec<(String, i64, i64)> = crate::Transformer::projection_shapes(model).into_iter().filter(|(n, _, _)| cfg.target_modules.matches(n)).collect();
    (hit.len(), hit.iter().map(|(_, i, o)| cfg.r * (i + o)).sum())
}

/// One projection's adapter.
pub(crate) struct LoraLayer {
    pub a: Tensor,
    pub b: Tensor,
    pub scaling: f64,
    /// `lora_dropout`: applied to the adapter's input while the layer's dropout key is set (training forwards).
    pub dropout: f64,
    pub dropping: DropoutKey,
    /// This projection's place among the network's adapters: its masks differ from its neighbours'.
    pub salt: u64,
}

/// The running decoder layer's adapter-dropout key, shared by the network's adapters; 0 while no training
/// forward runs (no dropout).
pub(crate) type DropoutKey = std::sync::Arc<std::sync::atomic::AtomicU64>;

/// Inverted dropout's multiplier for a tensor of `shape`: 0 where an element is dropped (probability `p`),
/// 1 / (1 − p) where it is kept, as nn.Dropout. The draws are a counter-based hash of (`key`, element index)
/// computed with tensor ops on the tensor's device, not libtorch's global generator: no other thread's draws
/// can shift them, the checkpointed recompute redraws them exactly, and the CPU and a GPU draw the same masks.
/// The hash is Wellons' "lowbias32" integer finalizer (github.com/skeeto/hash-prospector), applied twice with
/// the key's two halves.
pub(crate) fn dropout_multiplier(shape: &[i64], p: f64, key: u64, kind: Kind, device: tch::Device) -> Tensor {
    const M32: i64 = 0xFFFF_FFFF;
    let n: i64 = shape.iter().product();
    let finalize = |h: &mut Tensor| {
        for (shift, mul) in [(16, 0x7feb_352d_i64), (15, 0x846c_a68b_i64)] {
            let s = h.bitwise_right_shift_tensor_scalar(shift);
            let _ = h.bitwise_xor_tensor_(&s);
            let _ = h.g_mul_scalar_(mul);
            let _ = h.bitwise_and_(M32);
        }
        let s = h.bitwise_right_shift_tensor_scalar(16);
        let _ = h.bitwise_xor_tensor_(&s);
    };
    let mut h = Tensor::arange(n, (Kind::Int64, device));
    let _ = h.g_mul_scalar_(0x9e37_79b1_i64);
    let _ = h.g_add_scalar_((key & 0xFFFF_FFFF) as i64);
    let _ = h.bitwise_and_(M32);
    finalize(&mut h);
    let _ = h.bitwise_xor_(((key >> 32) & 0xFFFF_FFFF) as i64);
    finalize(&mut h);
    // the top 24 bits as a uniform draw in [0, 1)
    let u = h.bitwise_right_shift_tensor_scalar(8).to_kind(Kind::Float) * (1.0 / (1u64 << 24) as f64);
    (u.ge(p).to_kind(kind) * (1.0 / (1.0 - p))).view(shape)
}

impl LoraLayer {
    /// New adapter tensors for a projection `[out, inp]`, created in `ps` (fp32) as `<module>.lora_A.weight`
    /// and `<module>.lora_B.weight`.
    pub fn create(ps: &mut ParamStore, module: &str, inp: i64, out: i64, cfg: &LoraConfig, dropping: &DropoutKey, salt: u64) -> LoraLayer {
        let device = ps.device;
        // kaiming_uniform_(a = √5) of a [fan_out, fan_in] matrix: U(−1/√fan_in, 1/√fan_in)
        let uniform = |shape: &[i64], fan_in: i64| {
            let b = 1.0 / (fan_in as f64).sqrt();
            Tensor::empty(shape, (Kind::Float, device)).uniform_(-b, b)
        };
        let a = ps.get_or_create(&format!("{module}.lora_A.weight"), &[cfg.r, inp], crate::params::Fill::Zeros);
        let b = ps.get_or_create(&format!("{module}.lora_B.weight"), &[out, cfg.r], crate::params::Fill::Zeros);
        tch::no_grad(|| {
            a.shallow_clone().copy_(&uniform(&[cfg.r, inp], inp));
            if !cfg.init_lora_weights {
                b.shallow_clone().copy_(&uniform(&[out, cfg.r], cfg.r));
            }
        });
        LoraLayer { a, b, scaling: cfg.scaling(), dropout: cfg.lora_dropout, dropping: dropping.clone(), salt }
    }

    /// `y + s · (dropout(x) Aᵀ) Bᵀ`, computed in the adapter's dtype and cast back to `y`'s. Dropout (inverted,
    /// as nn.Dropout: kept inputs scaled by 1 / (1 − p)) draws its masks from the running layer's key and this
    /// projection's salt ([`dropout_multiplier`], [`crate::Transformer::set_dropout_seed`]).
    pub fn add_to(&self, y: Tensor, x: &Tensor) -> Tensor {
        let k = self.a.kind();
        let x = x.to_kind(k);
        let key = self.dropping.load(std::sync::atomic::Ordering::Relaxed);
        let x = if self.dropout > 0.0 && key != 0 {
            let m = dropout_multiplier(&x.size(), self.dropout, crate::mix64(key ^ crate::mix64(self.salt)), k, x.device());
            x * m
        } else {
            x
        };
        let delta = x.linear(&self.a, None::<Tensor>).linear(&self.b, None::<Tensor>) * self.scaling;
        if y.kind() == delta.kind() {
            y + delta
        } else {
            let out = y.kind();
            (y.to_kind(delta.kind()) + delta).to_kind(out)
        }
    }

    /// `W + s · B A` in `w`'s dtype (computed in fp32).
    pub fn merged(&self, w: &Tensor) -> Tensor {
        tch::no_grad(|| (w.to_kind(Kind::Float) + self.b.to_kind(Kind::Float).mm(&self.a.to_kind(Kind::Float)) * self.scaling).to_kind(w.kind()))
    }
}

/// The adapters of a network: their config and their parameters (in the network's fixed order, A then B of
/// each targeted projection).
pub struct Adapters {
    pub cfg: LoraConfig,
    pub params: ParamStore,
    /// The running layer's dropout key while a training forward (or its checkpointed recompute) runs with
    /// dropout, else 0.
    pub(crate) dropping: DropoutKey,
}

/// PEFT's name of an adapter tensor.
pub fn peft_name(name: &str) -> String {
    format!("{PEFT_PREFIX}{name}")
}

/// Writes an adapter directory's two files (adapter_config.json, adapter_model.safetensors in fp32), and the
/// tokenizer files of `tokenizer_dir` when given (PEFT ignores them; `train eval` and vLLM's LoRA requests
/// find the tokenizer beside the adapter).
pub fn save(adapters: &Adapters, dir: &Path, base_model_name_or_path: Option<&str>, tokenizer_dir: Option<&Path>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    if let Some(t) = tokenizer_dir {
        crate::weights::copy_tokenizer_files(t, dir)?;
    }
    let tensors: Vec<(String, Tensor)> = adapters.params.iter().map(|(n, t)| (peft_name(n), t.shallow_clone())).collect();
    crate::weights::write_safetensors(&dir.join(WEIGHTS_FILE), &tensors, Some(Kind::Float))?;
    let cfg = serde_json::to_string_pretty(&adapters.cfg.to_peft_json(base_model_name_or_path)).expect("json");
    crate::weights::write_atomic(&dir.join(CONFIG_FILE), cfg.as_bytes())
}

/// Whether `pattern` is a valid `target_modules` regular expression (the error says why not).
pub fn check_pattern(pattern: &str) -> std::result::Result<(), String> {
    regex::Regex::new(pattern).map(|_| ()).map_err(|e| e.to_string())
}

/// Whether `dir` holds a PEFT adapter.
pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).is_file()
}

/// Reads an adapter directory's config.
pub fn read_config(dir: &Path) -> Result<LoraConfig> {
    let file = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&file).map_err(|e| ModelError::io(&file, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| ModelError::weights(&file, format!("not valid JSON: {e}")))?;
    LoraConfig::from_peft_json(&v, &file)
}

/// The base model a saved adapter names (`base_model_name_or_path`), if any.
pub fn base_model_name(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(CONFIG_FILE)).ok()?;
    serde_json::from_str::<Value>(&text).ok()?.get("base_model_name_or_path")?.as_str().map(str::to_string)
}

/// Copies an adapter directory's tensors into `adapters` (created from its config): each of ours must be
/// there once with its shape, and the file may hold nothing else.
pub fn load_tensors(adapters: &Adapters, dir: &Path) -> Result<()> {
    let file = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&file).map_err(|e| ModelError::io(&file, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| ModelError::weights(&file, format!("not a valid safetensors file: {e}")))?;
    let mut seen = HashSet::new();
    let mut unexpected = BTreeMap::new();
    for (name, view) in st.tensors() {
        // PEFT strips the adapter name when saving; a file saved with it (".default.") is read the same
        let ours = name.strip_prefix(PEFT_PREFIX).unwrap_or(&name).replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.");
        let Some(dst) = adapters.params.get(&ours) else {
            unexpected.insert(name.clone(), ());
            continue;
        };
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        if shape != dst.size() {
            return Err(ModelError::weights(&file, format!("tensor `{name}` has shape {shape:?} but r = {} on this model implies {:?}", adapters.cfg.r, dst.size())));
        }
        let kind = crate::weights::kind_of(view.dtype()).ok_or_else(|| ModelError::weights(&file, format!("tensor `{name}` has unsupported dtype {:?}", view.dtype())))?;
        let src = Tensor::from_data_size(view.data(), &shape, kind);
        tch::no_grad(|| dst.shallow_clone().copy_(&src));
        seen.insert(ours);
    }
    if let Some(name) = unexpected.keys().next() {
        return Err(ModelError::weights(&file, format!("{} tensor(s) match no adapted module of this model, e.g. `{name}`: was the adapter trained on another architecture or with other target_modules?", unexpected.len())));
    }
    if let Some(missing) = adapters.params.names().iter().find(|n| !seen.contains(*n)) {
        return Err(ModelError::weights(&file, format!("adapter tensor `{}` is missing", peft_name(missing))));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_masks_keep_one_minus_p_and_depend_only_on_the_key() {
        let d = tch::Device::Cpu;
        let m = dropout_multiplier(&[256, 1024], 0.3, 42, Kind::Float, d);
        let kept = m.ne(0.0).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
        assert!((kept - 0.7).abs() < 0.005, "kept {kept}");
        assert!((m.mean(Kind::Float).double_value(&[]) - 1.0).abs() < 0.01, "inverted dropout keeps the mean");
        assert!(m.ne(0.0).sum(Kind::Int64).int64_value(&[]) > 0);
        tch::manual_seed(5); // the global generator plays no part
        assert!(m.equal(&dropout_multiplier(&[256, 1024], 0.3, 42, Kind::Float, d)));
        let other = dropout_multiplier(&[256, 1024], 0.3, 43, Kind::Float, d);
        let agree = m.eq_tensor(&other).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
        // independent masks agree on 0.7² + 0.3² = 58% of elements
        assert!((agree - 0.58).abs() < 0.01, "masks of two keys agree on {agree}");
        // neighbouring elements are independent: P(both kept) = 0.49
        let k = m.ne(0.0).to_kind(Kind::Float).view([-1]);
        let both = (k.narrow(0, 0, k.size()[0] - 1) * k.narrow(0, 1, k.size()[0] - 1)).mean(Kind::Float).double_value(&[]);
        assert!((both - 0.49).abs() < 0.01, "neighbours kept together {both}");
    }

    #[test]
    fn targets_match_as_peft_does() {
        let names = Targets::Names(vec!["q_proj".into(), "v_proj".into()]);
        assert!(names.matches("model.layers.0.self_attn.q_proj"));
        assert!(!names.matches("model.layers.0.self_attn.qq_proj"));
        assert!(!names.matches("model.layers.0.self_attn.k_proj"));
        let re = Targets::Regex(r".*\.(q|v)_proj".into());
        assert!(re.matches("model.layers.3.self_attn.v_proj"));
        assert!(!re.matches("model.layers.3.self_attn.o_proj"));
        assert!(Targets::from_json(&json!("all-linear")) == Some(Targets::AllLinear));
    }

    #[test]
    fn scaling_is_alpha_over_r_or_over_sqrt_r() {
        let mut c = LoraConfig { r: 16, lora_alpha: 32.0, lora_dropout: 0.0, target_modules: Targets::AllLinear, use_rslora: false, init_lora_weights: true };
        assert_eq!(c.scaling(), 2.0);
        c.use_rslora = true;
        assert_eq!(c.scaling(), 8.0);
    }

    #[test]
    fn peft_config_round_trips_and_refuses_what_is_not_implemented() {
        let c = LoraConfig { r: 4, lora_alpha: 8.0, lora_dropout: 0.0, target_modules: Targets::Names(vec!["qkv_proj".into()]), use_rslora: false, init_lora_weights: true };
        let f = Path::new("adapter_config.json");
        assert_eq!(LoraConfig::from_peft_json(&c.to_peft_json(None), f).unwrap(), c);
        let mut v = c.to_peft_json(None);
        v["use_dora"] = json!(true);
        let e = LoraConfig::from_peft_json(&v, f).unwrap_err().to_string();
        assert!(e.contains("use_dora") && e.contains("adapter_config.json"), "{e}");
    }
}
