//! Hugging Face `config.json` → one [`ModelConfig`] for every supported decoder family.
//!
//! Supported `model_type`s: `llama` (incl. SmolLM2 and Llama 3.x rope scaling), `qwen2` (q/k/v biases),
//! `qwen3` (q/k RMSNorm), `phi3` (fused qkv_proj / gate_up_proj, partial rotary factor, LongRoPE, used by
//! Phi-3 and Phi-4-mini). The original JSON is kept so that saving writes back every key we don't model.

use crate::error::{ModelError, Result};
use serde_json::{json, Value};
use std::path::Path;

/// The architecture family, from `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Qwen2,
    Qwen3,
    Phi3,
}

impl Family {
    pub fn from_model_type(s: &str) -> Option<Family> {
        match s {
            "llama" | "mistral" => Some(Family::Llama),
            "qwen2" => Some(Family::Qwen2),
            "qwen3" => Some(Family::Qwen3),
            "phi3" => Some(Family::Phi3),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Phi3 => "phi3",
        }
    }
}

/// transformers' defaults for the keys a config.json may leave out (transformers 5.24's `LlamaConfig`,
/// `MistralConfig`, `Qwen2Config`, `Qwen3Config`, `Phi3Config`), so that a short config means here what it means
/// there. Checked against transformers by model/tests/interop.rs on fixtures from
/// scripts/fixtures/make_config_fixtures.py.
#[derive(Debug, Clone, Copy)]
pub struct FamilyDefaults {
    /// The class transformers and vLLM build (`architectures`).
    pub architecture: &'static str,
    /// `None`: as many as the attention heads.
    pub num_key_value_heads: Option<i64>,
    /// `None`: hidden_size / num_attention_heads.
    pub head_dim: Option<i64>,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: i64,
    /// Phi-3's top-level `original_max_position_embeddings` (LongRoPE); `None`: max_position_embeddings.
    pub original_max_position_embeddings: Option<i64>,
    /// Sliding window when the key is absent (Mistral's 4096).
    pub sliding_window: Option<i64>,
    pub bos_token_id: Option<i64>,
    pub eos_token_id: Option<i64>,
    pub pad_token_id: Option<i64>,
}

impl FamilyDefaults {
    /// The defaults of a `model_type` (`None` for an unsupported one).
    pub fn of(model_type: &str) -> Option<FamilyDefaults> {
        let llama = FamilyDefaults {
            architecture: "LlamaForCausalLM",
            num_key_value_heads: None,
            head_dim: None,
            rms_norm_eps: 1e-6,
            max_position_embeddings: 2048,
            original_max_position_embeddings: None,
            sliding_window: None,
            bos_token_id: Some(1),
            eos_token_id: Some(2),
            pad_token_id: None,
        };
        let qwen2 = FamilyDefaults {
            architecture: "Qwen2ForCausalLM",
            num_key_value_heads: Some(32),
            max_position_embeddings: 32768,
            bos_token_id: None,
            eos_token_id: None,
            ..llama
        };
        Some(match model_type {
            "llama" => llama,
            "mistral" => FamilyDefaults {
                architecture: "MistralForCausalLM",
                num_key_value_heads: Some(8),
                max_position_embeddings: 4096 * 32,
                sliding_window: Some(4096),
                ..llama
            },
            "qwen2" => qwen2,
            "qwen3" => FamilyDefaults { architecture: "Qwen3ForCausalLM", head_dim: Some(128), ..qwen2 },
            "phi3" => FamilyDefaults {
                architecture: "Phi3ForCausalLM",
                rms_norm_eps: 1e-5,
                max_position_embeddings: 4096,
                original_max_position_embeddings: Some(4096),
                eos_token_id: Some(32000),
                pad_token_id: Some(32000),
                ..llama
            },
            _ => return None,
        })
    }
}

/// How rotary frequencies are scaled (`rope_scaling` / `rope_parameters` in config.json).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Position interpolation: frequencies divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1/3.2 frequency-dependent scaling.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
    /// LongRoPE (Phi-3, Phi-4-mini): per-dimension rescale factors, "short" up to
    /// `original_max_position_embeddings`, "long" beyond, and a global attention factor.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: i64,
        attention_factor: f64,
    },
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub family: Family,
    /// transformers' defaults for this `model_type` (what a key left out of config.json means).
    pub defaults: FamilyDefaults,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Number of leading dimensions of each head that are rotated (`head_dim * partial_rotary_factor`).
    pub rotary_dim: i64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: i64,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama's `attention_bias`).
    pub o_bias: bool,
    /// Bias on MLP projections (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// Per-head RMSNorm on queries and keys (Qwen3).
    pub qk_norm: bool,
    /// Attention restricted to the last `sliding_window` keys, when set and enabled.
    pub sliding_window: Option<i64>,
    pub bos_token_id: Option<i64>,
    /// Every end-of-sequence id named by config.json (`eos_token_id` may be a list).
    pub eos_token_ids: Vec<i64>,
    /// `torch_dtype` / `dtype` as written in the file, if any.
    pub dtype: Option<String>,
    /// The parsed config.json, kept to write unknown keys back unchanged.
    pub raw: Value,
}

fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

struct Reader<'a> {
    v: &'a Value,
    path: String,
}

impl<'a> Reader<'a> {
    fn int(&self, key: &str) -> Result<i64> {
        match get(self.v, key) {
            Some(x) => x.as_i64().ok_or_else(|| self.bad(key, "an integer", x)),
            None => Err(ModelError::Config { path: self.path.clone(), msg: format!("missing key `{key}`") }),
        }
    }
    fn int_or(&self, key: &str, default: i64) -> Result<i64> {
        match get(self.v, key) {
            Some(x) => x.as_i64().ok_or_else(|| self.bad(key, "an integer", x)),
            None => Ok(default),
        }
    }
    fn float_or(&self, key: &str, default: f64) -> Result<f64> {
        match get(self.v, key) {
            Some(x) => x.as_f64().ok_or_else(|| self.bad(key, "a number", x)),
            None => Ok(default),
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match get(self.v, key) {
            Some(x) => x.as_bool().ok_or_else(|| self.bad(key, "true or false", x)),
            None => Ok(default),
        }
    }
    fn bad(&self, key: &str, want: &str, got: &Value) -> ModelError {
        ModelError::Config { path: self.path.clone(), msg: format!("`{key}` must be {want}, got {got}") }
    }
}

impl ModelConfig {
    /// Reads `config.json` from a file or from a model directory.
    pub fn from_path(path: &Path) -> Result<ModelConfig> {
        let file = if path.is_dir() { path.join("config.json") } else { path.to_path_buf() };
        let text = std::fs::read_to_string(&file).map_err(|e| ModelError::io(&file, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: file.display().to_string(),
            msg: format!("not valid JSON: {e}"),
        })?;
        Self::from_json(v, &file.display().to_string())
    }

    /// Builds the config from parsed JSON; `origin` names the file in error messages.
    pub fn from_json(v: Value, origin: &str) -> Result<ModelConfig> {
        let r = Reader { v: &v, path: origin.to_string() };
        let mt = get(&v, "model_type").and_then(|x| x.as_str()).ok_or_else(|| ModelError::Config {
            path: origin.into(),
            msg: "missing key `model_type` (expected one of llama, qwen2, qwen3, phi3)".into(),
        })?;
        let unsupported = || ModelError::Config {
            path: origin.into(),
            msg: format!("unsupported architecture model_type = \"{mt}\" (supported: llama, mistral, qwen2, qwen3, phi3)"),
        };
        let family = Family::from_model_type(mt).ok_or_else(unsupported)?;
        let defaults = FamilyDefaults::of(mt).ok_or_else(unsupported)?;
        let hidden_size = r.int("hidden_size")?;
        let num_attention_heads = r.int("num_attention_heads")?;
        let kv_given = get(&v, "num_key_value_heads").is_some();
        let num_key_value_heads = r.int_or("num_key_value_heads", defaults.num_key_value_heads.unwrap_or(num_attention_heads))?;
        let explicit_head_dim = get(&v, "head_dim").is_some_and(|x| !x.is_null());
        if !explicit_head_dim && defaults.head_dim.is_none() && num_attention_heads > 0 && hidden_size % num_attention_heads != 0 {
            return Err(ModelError::Config {
                path: origin.into(),
                msg: format!(
                    "hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({num_attention_heads}): give `head_dim` explicitly (transformers refuses this config)"
                ),
            });
        }
        let head_dim = r.int_or("head_dim", defaults.head_dim.unwrap_or(hidden_size / num_attention_heads.max(1)))?;
        if num_attention_heads <= 0 || num_key_value_heads <= 0 || num_attention_heads % num_key_value_heads != 0 {
            let defaulted = if kv_given { String::new() } else { format!(", {mt}'s default when the key is absent: give it explicitly") };
            return Err(ModelError::Config {
                path: origin.into(),
                msg: format!(
                    "num_attention_heads ({num_attention_heads}) must be a positive multiple of num_key_value_heads ({num_key_value_heads}{defaulted})"
                ),
            });
        }
        // transformers 5 moved rope settings into `rope_parameters`; 4.x used rope_theta + rope_scaling.
        let rope_params = get(&v, "rope_parameters").or_else(|| get(&v, "rope_scaling"));
        let rope_theta = match rope_params.and_then(|p| get(p, "rope_theta")).and_then(|x| x.as_f64()) {
            Some(t) => t,
            None => r.float_or("rope_theta", 10000.0)?,
        };
        let partial = match rope_params.and_then(|p| get(p, "partial_rotary_factor")).and_then(|x| x.as_f64()) {
            Some(p) => p,
            None => r.float_or("partial_rotary_factor", 1.0)?,
        };
        let rotary_dim = ((head_dim as f64) * partial) as i64;
        let max_position_embeddings = r.int_or("max_position_embeddings", defaults.max_position_embeddings)?;
        let original_max = get(&v, "original_max_position_embeddings")
            .and_then(|x| x.as_i64())
            .or(defaults.original_max_position_embeddings)
            .unwrap_or(max_position_embeddings);
        let rope_scaling = parse_rope_scaling(rope_params, origin, rotary_dim, max_position_embeddings, original_max)?;

        let attention_bias = r.bool_or("attention_bias", false)?;
        let (qkv_bias, o_bias) = match family {
            Family::Qwen2 => (true, false),
            Family::Llama => (attention_bias, attention_bias),
            Family::Qwen3 => (attention_bias, attention_bias),
            Family::Phi3 => (false, false),
        };
        let sliding_window = match family {
            Family::Qwen2 | Family::Qwen3 => {
                if r.bool_or("use_sliding_window", false)? {
                    get(&v, "sliding_window").and_then(|x| x.as_i64())
                } else {
                    None
                }
            }
            // transformers' Llama attention has no window, whatever the file says.
            Family::Llama if mt == "llama" => None,
            // An explicit `null` switches the window off; an absent key is the family's default (Mistral's 4096).
            Family::Phi3 | Family::Llama => match v.get("sliding_window") {
                None => defaults.sliding_window,
                Some(x) => x.as_i64(),
            },
        };
        let eos_token_ids = match get(&v, "eos_token_id") {
            Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_i64()).collect(),
            Some(x) => x.as_i64().into_iter().collect(),
            None => vec![],
        };
        let dtype = get(&v, "torch_dtype").or_else(|| get(&v, "dtype")).and_then(|x| x.as_str()).map(String::from);
        let cfg = ModelConfig {
            family,
            defaults,
            vocab_size: r.int("vocab_size")?,
            hidden_size,
            intermediate_size: r.int("intermediate_size")?,
            num_hidden_layers: r.int("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: r.float_or("rms_norm_eps", defaults.rms_norm_eps)?,
            rope_theta,
            rotary_dim,
            rope_scaling,
            max_position_embeddings,
            tie_word_embeddings: r.bool_or("tie_word_embeddings", false)?,
            qkv_bias,
            o_bias,
            mlp_bias: r.bool_or("mlp_bias", false)?,
            qk_norm: family == Family::Qwen3,
            sliding_window,
            bos_token_id: get(&v, "bos_token_id").and_then(|x| x.as_i64()),
            eos_token_ids,
            dtype,
            raw: v.clone(),
        };
        for (k, x) in [
            ("vocab_size", cfg.vocab_size),
            ("hidden_size", cfg.hidden_size),
            ("intermediate_size", cfg.intermediate_size),
            ("num_hidden_layers", cfg.num_hidden_layers),
            ("head_dim", cfg.head_dim),
        ] {
            if x <= 0 {
                return Err(ModelError::Config { path: origin.into(), msg: format!("`{k}` must be positive, got {x}") });
            }
        }
        if cfg.rotary_dim % 2 != 0 || cfg.rotary_dim > cfg.head_dim {
            return Err(ModelError::Config {
                path: origin.into(),
                msg: {
                    let head = if explicit_head_dim {
                        format!("head_dim {}", cfg.head_dim)
                    } else {
                        format!("head_dim {} = hidden_size {} / num_attention_heads {}", cfg.head_dim, cfg.hidden_size, cfg.num_attention_heads)
                    };
                    format!("rotary dimension {} ({head}, × partial_rotary_factor {partial}) must be even and ≤ head_dim", cfg.rotary_dim)
                },
            });
        }
        Ok(cfg)
    }

    /// config.json as whet saves it: the file as given plus every key the forward reads, resolved (the value
    /// used here, which is transformers' default where the file left the key out), and `architectures`, which
    /// vLLM and llama.cpp's converter need. A checkpoint then means the same in transformers, vLLM and whet
    /// whatever the defaults of the version that reads it. Keys already present are kept as written.
    pub fn resolved_json(&self) -> Value {
        let mut v = self.raw.clone();
        let Some(o) = v.as_object_mut() else { return v };
        let absent = |o: &serde_json::Map<String, Value>, k: &str| o.get(k).is_none_or(Value::is_null);
        let fill = |o: &mut serde_json::Map<String, Value>, k: &str, x: Value| {
            if absent(o, k) {
                o.insert(k.to_string(), x);
            }
        };
        fill(o, "architectures", json!([self.defaults.architecture]));
        fill(o, "hidden_act", json!("silu"));
        fill(o, "num_key_value_heads", json!(self.num_key_value_heads));
        fill(o, "head_dim", json!(self.head_dim));
        fill(o, "rms_norm_eps", json!(self.rms_norm_eps));
        fill(o, "max_position_embeddings", json!(self.max_position_embeddings));
        fill(o, "tie_word_embeddings", json!(self.tie_word_embeddings));
        // A key given inside the rope dictionary (rope_parameters, or 4.x's rope_scaling).
        let in_rope_dict = |o: &serde_json::Map<String, Value>, k: &str| ["rope_parameters", "rope_scaling"].iter().any(|d| o.get(*d).and_then(|p| get(p, k)).is_some());
        // rope_theta: inside rope_parameters (transformers 5) or at the top level (4.x); written at the top level
        // when neither place has it, which both versions read.
        if !in_rope_dict(o, "rope_theta") {
            fill(o, "rope_theta", json!(self.rope_theta));
        }
        match self.family {
            Family::Llama => {
                fill(o, "attention_bias", json!(self.o_bias));
                fill(o, "mlp_bias", json!(self.mlp_bias));
                if self.defaults.sliding_window.is_some() && !o.contains_key("sliding_window") {
                    o.insert("sliding_window".into(), json!(self.sliding_window));
                }
            }
            Family::Qwen2 | Family::Qwen3 => {
                if self.family == Family::Qwen3 {
                    fill(o, "attention_bias", json!(self.o_bias));
                }
                fill(o, "use_sliding_window", json!(self.sliding_window.is_some()));
            }
            Family::Phi3 => {
                if !in_rope_dict(o, "partial_rotary_factor") {
                    fill(o, "partial_rotary_factor", json!(self.rotary_dim as f64 / self.head_dim as f64));
                }
                let orig = match &self.rope_scaling {
                    RopeScaling::LongRope { original_max_position_embeddings, .. } => *original_max_position_embeddings,
                    _ => self.defaults.original_max_position_embeddings.unwrap_or(self.max_position_embeddings),
                };
                fill(o, "original_max_position_embeddings", json!(orig));
            }
        }
        // Token ids: the family default where it names a token of this vocabulary, else null (transformers
        // refuses a padding id past the vocabulary, and a short inline config would otherwise not load there).
        for (k, d) in [
            ("bos_token_id", self.defaults.bos_token_id),
            ("eos_token_id", self.defaults.eos_token_id),
            ("pad_token_id", self.defaults.pad_token_id),
        ] {
            if !o.contains_key(k) {
                o.insert(k.into(), json!(d.filter(|&id| id < self.vocab_size)));
            }
        }
        v
    }

    /// Number of parameters the model has (tied embeddings counted once).
    pub fn num_parameters(&self) -> i64 {
        let h = self.hidden_size;
        let (q, kv) = (self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim);
        let mut attn = h * (q + 2 * kv) + q * h;
        if self.qkv_bias {
            attn += q + 2 * kv;
        }
        if self.o_bias {
            attn += h;
        }
        if self.qk_norm {
            attn += 2 * self.head_dim;
        }
        let mut mlp = 3 * h * self.intermediate_size;
        if self.mlp_bias {
            mlp += 2 * self.intermediate_size + h;
        }
        let layer = attn + mlp + 2 * h;
        let emb = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { emb };
        emb + head + self.num_hidden_layers * layer + h
    }
}

fn f64_list(v: &Value, key: &str, origin: &str) -> Result<Vec<f64>> {
    let arr = get(v, key).and_then(|x| x.as_array()).ok_or_else(|| ModelError::Config {
        path: origin.into(),
        msg: format!("rope scaling `longrope` needs a list `{key}`"),
    })?;
    arr.iter()
        .map(|x| {
            x.as_f64().ok_or_else(|| ModelError::Config {
                path: origin.into(),
                msg: format!("`{key}` must hold numbers, found {x}"),
            })
        })
        .collect()
}

/// `original_max` is the top-level `original_max_position_embeddings` or its default, used when the rope
/// parameters don't carry their own.
fn parse_rope_scaling(params: Option<&Value>, origin: &str, rotary_dim: i64, max_pos: i64, original_max: i64) -> Result<RopeScaling> {
    let Some(p) = params else { return Ok(RopeScaling::Default) };
    let kind = get(p, "rope_type").or_else(|| get(p, "type")).and_then(|x| x.as_str()).unwrap_or("default");
    let num = |key: &str| -> Result<f64> {
        get(p, key).and_then(|x| x.as_f64()).ok_or_else(|| ModelError::Config {
            path: origin.into(),
            msg: format!("rope scaling `{kind}` needs a number `{key}`"),
        })
    };
    match kind {
        "default" => Ok(RopeScaling::Default),
        "linear" => Ok(RopeScaling::Linear { factor: num("factor")? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        "longrope" | "su" => {
            let short_factor = f64_list(p, "short_factor", origin)?;
            let long_factor = f64_list(p, "long_factor", origin)?;
            let half = (rotary_dim / 2) as usize;
            if short_factor.len() != half || long_factor.len() != half {
                return Err(ModelError::Config {
                    path: origin.into(),
                    msg: format!(
                        "longrope factors must have rotary_dim/2 = {half} entries (short {}, long {})",
                        short_factor.len(),
                        long_factor.len()
                    ),
                });
            }
            // original_max_position_embeddings lives inside the dict or at the top level (Phi-3).
            let orig = get(p, "original_max_position_embeddings").and_then(|x| x.as_i64()).unwrap_or(original_max);
            // Attention factor (LongRoPE, arXiv 2402.13753; as in transformers' _compute_longrope_parameters):
            // explicit `attention_factor`, else sqrt(1 + ln(s) / ln(original)) with s = max / original (1 if s ≤ 1).
            let attention_factor = match get(p, "attention_factor").and_then(|x| x.as_f64()) {
                Some(a) => a,
                None => {
                    let factor = get(p, "factor").and_then(|x| x.as_f64()).unwrap_or(max_pos as f64 / orig as f64);
                    if factor <= 1.0 {
                        1.0
                    } else {
                        (1.0 + factor.ln() / (orig as f64).ln()).sqrt()
                    }
                }
            };
            Ok(RopeScaling::LongRope { short_factor, long_factor, original_max_position_embeddings: orig, attention_factor })
        }
        other => Err(ModelError::Config {
            path: origin.into(),
            msg: format!("unsupported rope scaling type \"{other}\" (supported: default, linear, llama3, longrope)"),
        }),
    }
}
