//! GGUF import: read a llama.cpp GGUF file (v2/v3), dequantise its tensors (F32, F16, BF16, Q8_0, Q4_0,
//! Q4_1) and write a Hugging Face model directory (config.json, model.safetensors, tokenizer.json,
//! tokenizer_config.json, generation_config.json).
//!
//! Format facts (from the GGUF specification in ggml's docs): little-endian; header `GGUF`, version,
//! tensor count, metadata count; typed metadata values; tensor infos (name, dims with the fastest-varying
//! first, type, offset); data aligned to `general.alignment` (default 32). Block formats: Q8_0 = f16 scale +
//! 32 × i8; Q4_0 = f16 scale + 16 bytes of nibbles (low nibbles are elements 0..16, high 16..32), value
//! (q − 8)·d; Q4_1 = f16 scale + f16 min + nibbles, value q·d + m.
//!
//! llama.cpp's converter permutes the rows of Llama's q and k projections (to interleave rotary pairs);
//! we undo it: rows viewed as [heads, 2, rows/heads/2] are transposed back to [heads, rows/heads/2, 2].

use crate::error::{ModelError, Result};
use crate::weights::{partial_dir, write_atomic, write_dir_atomic, write_generation_config, write_safetensors};
use half::{bf16, f16};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Kind, Tensor};

#[derive(Debug, Clone)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    pub fn as_i64(&self) -> Option<i64> {
        Some(match *self {
            MetaValue::U8(x) => x as i64,
            MetaValue::I8(x) => x as i64,
            MetaValue::U16(x) => x as i64,
            MetaValue::I16(x) => x as i64,
            MetaValue::U32(x) => x as i64,
            MetaValue::I32(x) => x as i64,
            MetaValue::U64(x) => x as i64,
            MetaValue::I64(x) => x,
            _ => return None,
        })
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(x) => Some(x as f64),
            MetaValue::F64(x) => Some(x),
            _ => self.as_i64().map(|x| x as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            MetaValue::Bool(b) => Some(*b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// ggml tensor types we can dequantise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    BF16,
}

impl GgmlType {
    fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }
    /// (elements per block, bytes per block)
    fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q8_0 => (32, 34),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions as GGUF stores them: fastest-varying first (reverse of PyTorch's shape).
    pub dims: Vec<u64>,
    pub type_id: u32,
    pub offset: u64,
}

impl TensorInfo {
    /// PyTorch-order shape.
    pub fn shape(&self) -> Vec<i64> {
        self.dims.iter().rev().map(|&d| d as i64).collect()
    }
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }
}

pub struct GgufFile {
    pub path: String,
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    data_start: usize,
    map: memmap2::Mmap,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a str,
}

impl<'a> Cursor<'a> {
    fn err(&self, msg: impl Into<String>) -> ModelError {
        ModelError::Gguf { path: self.path.to_string(), msg: format!("at byte {}: {}", self.pos, msg.into()) }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.pos.checked_add(n).is_none_or(|end| end > self.buf.len()) {
            return Err(self.err(format!("file truncated (needed {n} more bytes)")));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()? as usize;
        if n > self.buf.len() {
            return Err(self.err(format!("string length {n} exceeds the file size")));
        }
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err("string is not UTF-8"))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.u8()?),
            1 => MetaValue::I8(self.u8()? as i8),
            2 => MetaValue::U16(self.u16()?),
            3 => MetaValue::I16(self.u16()? as i16),
            4 => MetaValue::U32(self.u32()?),
            5 => MetaValue::I32(self.u32()? as i32),
            6 => MetaValue::F32(f32::from_bits(self.u32()?)),
            7 => MetaValue::Bool(self.u8()? != 0),
            8 => MetaValue::Str(self.string()?),
            9 => {
                if depth > 4 {
                    return Err(self.err("arrays nested too deeply"));
                }
                let et = self.u32()?;
                let n = self.u64()? as usize;
                if n > self.buf.len() {
                    return Err(self.err(format!("array length {n} exceeds the file size")));
                }
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(et, depth + 1)?);
                }
                MetaValue::Array(v)
            }
            10 => MetaValue::U64(self.u64()?),
            11 => MetaValue::I64(self.u64()? as i64),
            12 => MetaValue::F64(f64::from_bits(self.u64()?)),
            t => return Err(self.err(format!("unknown metadata value type {t}"))),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: read-only mapping; we only read bytes out of it.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| ModelError::io(path, e))?;
        let p = path.display().to_string();
        let mut c = Cursor { buf: &map, pos: 0, path: &p };
        if c.take(4)? != b"GGUF" {
            return Err(ModelError::Gguf { path: p.clone(), msg: "not a GGUF file (missing GGUF magic)".into() });
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(ModelError::Gguf { path: p.clone(), msg: format!("unsupported GGUF version {version} (expected 2 or 3)") });
        }
        let n_tensors = c.u64()? as usize;
        let n_kv = c.u64()? as usize;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let k = c.string()?;
            let ty = c.u32()?;
            let v = c.value(ty, 0)?;
            metadata.insert(k, v);
        }
        if n_tensors > map.len() {
            return Err(c.err(format!("tensor count {n_tensors} exceeds the file size")));
        }
        let mut tensors = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string()?;
            let nd = c.u32()? as usize;
            if nd > 8 {
                return Err(c.err(format!("tensor {name} has {nd} dimensions")));
            }
            let dims = (0..nd).map(|_| c.u64()).collect::<Result<Vec<_>>>()?;
            let type_id = c.u32()?;
            let offset = c.u64()?;
            tensors.push(TensorInfo { name, dims, type_id, offset });
        }
        let align = metadata.get("general.alignment").and_then(|v| v.as_i64()).unwrap_or(32).max(1) as usize;
        let data_start = c.pos.div_ceil(align) * align;
        let file = GgufFile { path: p, version, metadata, tensors, data_start, map };
        for t in &file.tensors {
            file.tensor_bytes(t)?; // validates type and bounds up front
        }
        Ok(file)
    }

    fn err(&self, msg: impl Into<String>) -> ModelError {
        ModelError::Gguf { path: self.path.clone(), msg: msg.into() }
    }

    pub fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    fn tensor_bytes(&self, t: &TensorInfo) -> Result<(GgmlType, &[u8])> {
        let ty = GgmlType::from_id(t.type_id).ok_or_else(|| {
            self.err(format!("tensor {} has ggml type {} (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)", t.name, t.type_id))
        })?;
        let (be, bb) = ty.block();
        let n = t.numel() as usize;
        if n % be != 0 {
            return Err(self.err(format!("tensor {} has {n} elements, not a multiple of the block size {be}", t.name)));
        }
        let len = n / be * bb;
        let start = self.data_start + t.offset as usize;
        if start.checked_add(len).is_none_or(|e| e > self.map.len()) {
            return Err(self.err(format!("tensor {} lies past the end of the file (truncated?)", t.name)));
        }
        Ok((ty, &self.map[start..start + len]))
    }

    /// Dequantises a tensor to f32 in PyTorch order.
    pub fn dequantize(&self, t: &TensorInfo) -> Result<Tensor> {
        let (ty, bytes) = self.tensor_bytes(t)?;
        let v = dequantize_bytes(ty, bytes);
        Ok(Tensor::from_slice(&v).view(t.shape().as_slice()))
    }
}

/// Dequantises raw ggml blocks to f32.
pub fn dequantize_bytes(ty: GgmlType, b: &[u8]) -> Vec<f32> {
    let h = |i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    match ty {
        GgmlType::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
        GgmlType::F16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        GgmlType::BF16 => b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        GgmlType::Q8_0 => {
            let mut out = Vec::with_capacity(b.len() / 34 * 32);
            for (bi, blk) in b.chunks_exact(34).enumerate() {
                let d = h(bi * 34);
                out.extend(blk[2..].iter().map(|&q| (q as i8) as f32 * d));
            }
            out
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let (bb, q_at) = if ty == GgmlType::Q4_0 { (18, 2) } else { (20, 4) };
            let mut out = vec![0f32; b.len() / bb * 32];
            for (bi, blk) in b.chunks_exact(bb).enumerate() {
                let d = h(bi * bb);
                let o = &mut out[bi * 32..bi * 32 + 32];
                let qs = &blk[q_at..];
                if ty == GgmlType::Q4_0 {
                    for j in 0..16 {
                        o[j] = ((qs[j] & 0x0f) as i32 - 8) as f32 * d;
                        o[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
                    }
                } else {
                    let m = h(bi * bb + 2);
                    for j in 0..16 {
                        o[j] = (qs[j] & 0x0f) as f32 * d + m;
                        o[j + 16] = (qs[j] >> 4) as f32 * d + m;
                    }
                }
            }
            out
        }
    }
}

/// Undoes llama.cpp's row permutation of Llama q/k projections (see module docs).
pub fn unpermute_rows(w: &Tensor, n_head: i64) -> Tensor {
    let s = w.size();
    let (rows, rest) = (s[0], &s[1..]);
    let mut shape = vec![n_head, rows / n_head / 2, 2];
    shape.extend_from_slice(rest);
    let mut out = vec![rows];
    out.extend_from_slice(rest);
    w.reshape(shape.as_slice()).transpose(1, 2).contiguous().reshape(out.as_slice())
}

fn hf_name(gguf: &str, arch: &str) -> Option<String> {
    if let Some(rest) = gguf.strip_prefix("blk.") {
        let (i, tail) = rest.split_once('.')?;
        let (part, kind) = tail.rsplit_once('.')?; // kind = weight | bias
        let mapped = match part {
            "attn_q" => "self_attn.q_proj",
            "attn_k" => "self_attn.k_proj",
            "attn_v" => "self_attn.v_proj",
            "attn_qkv" => "self_attn.qkv_proj",
            "attn_output" => "self_attn.o_proj",
            "attn_q_norm" => "self_attn.q_norm",
            "attn_k_norm" => "self_attn.k_norm",
            "ffn_gate" => "mlp.gate_proj",
            "ffn_up" if arch == "phi3" => "mlp.gate_up_proj",
            "ffn_up" => "mlp.up_proj",
            "ffn_down" => "mlp.down_proj",
            "attn_norm" => "input_layernorm",
            "ffn_norm" => "post_attention_layernorm",
            _ => return None,
        };
        return Some(format!("model.layers.{i}.{mapped}.{kind}"));
    }
    Some(
        match gguf {
            "token_embd.weight" => "model.embed_tokens.weight",
            "output_norm.weight" => "model.norm.weight",
            "output.weight" => "lm_head.weight",
            _ => return None,
        }
        .to_string(),
    )
}

fn meta_i(g: &GgufFile, key: &str) -> Result<i64> {
    g.meta(key).and_then(|v| v.as_i64()).ok_or_else(|| g.err(format!("missing metadata `{key}`")))
}

fn meta_f(g: &GgufFile, key: &str, default: f64) -> f64 {
    g.meta(key).and_then(|v| v.as_f64()).unwrap_or(default)
}

/// Builds the Hugging Face config.json for the GGUF's architecture.
fn hf_config(g: &GgufFile, arch: &str, tied: bool, vocab: i64) -> Result<Value> {
    let p = |k: &str| format!("{arch}.{k}");
    let heads = meta_i(g, &p("attention.head_count"))?;
    let hidden = meta_i(g, &p("embedding_length"))?;
    let kv = g.meta(&p("attention.head_count_kv")).and_then(|v| v.as_i64()).unwrap_or(heads);
    // llama.cpp's architecture names are the model_types; `architectures` and the other defaults are filled in by
    // `ModelConfig::resolved_json` when the converted config is written.
    let model_type = match arch {
        "llama" | "qwen2" | "qwen3" | "phi3" => arch,
        other => return Err(g.err(format!("unsupported GGUF architecture \"{other}\" (supported: llama, qwen2, qwen3, phi3)"))),
    };
    let head_dim = g.meta(&p("attention.key_length")).and_then(|v| v.as_i64()).unwrap_or(hidden / heads);
    let mut c = json!({
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": meta_i(g, &p("feed_forward_length"))?,
        "num_hidden_layers": meta_i(g, &p("block_count"))?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "max_position_embeddings": meta_i(g, &p("context_length"))?,
        "rms_norm_eps": meta_f(g, &p("attention.layer_norm_rms_epsilon"), 1e-6),
        "rope_theta": meta_f(g, &p("rope.freq_base"), 10000.0),
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    });
    let o = c.as_object_mut().unwrap();
    if let Some(b) = g.meta("tokenizer.ggml.bos_token_id").and_then(|v| v.as_i64()) {
        o.insert("bos_token_id".into(), json!(b));
    }
    if let Some(e) = g.meta("tokenizer.ggml.eos_token_id").and_then(|v| v.as_i64()) {
        o.insert("eos_token_id".into(), json!(e));
    }
    if let Some(pd) = g.meta("tokenizer.ggml.padding_token_id").and_then(|v| v.as_i64()) {
        o.insert("pad_token_id".into(), json!(pd));
    }
    if arch == "phi3" {
        let rot = g.meta(&p("rope.dimension_count")).and_then(|v| v.as_i64()).unwrap_or(head_dim);
        o.insert("partial_rotary_factor".into(), json!(rot as f64 / head_dim as f64));
    }
    Ok(c)
}

/// How text is split before BPE, by the `tokenizer.ggml.pre` name llama.cpp's converter writes: the normalizer,
/// pre-tokenizer and `ignore_merges` of the model's own tokenizer.json. The split patterns are those of the
/// published tokenizer.json files (Llama 3, Qwen2/3) and of llama.cpp's llama-vocab.cpp (the other types).
struct PreTokenizer {
    normalizer: Value,
    pre_tokenizer: Value,
    ignore_merges: bool,
}

/// Llama 3's split: numbers in groups of up to three digits.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2 / Qwen3's split: one digit per piece.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// DeepSeek LLM's splits, applied in turn.
const DEEPSEEK_LLM_SPLITS: &[&str] = &[
    "[\r\n]",
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    "\\s?[!-/:-~！-／：-～‘-‟　-。]+",
    "\\s+$",
    "[一-龥ࠀ-一가-퟿]+",
    "\\p{N}+",
];

impl PreTokenizer {
    const NAMES: &'static [&'static str] = &["default", "gpt2", "llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "qwen2", "deepseek-r1-qwen", "smollm", "deepseek-llm"];

    fn of(name: &str) -> Option<PreTokenizer> {
        let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
        let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        let seq = |v: Vec<Value>| json!({"type": "Sequence", "pretokenizers": v});
        let plain = |pre_tokenizer: Value| PreTokenizer { normalizer: Value::Null, pre_tokenizer, ignore_merges: false };
        Some(match name {
            // GPT-2's own pattern, inside ByteLevel.
            "default" | "gpt2" => plain(byte_level(true)),
            "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" | "dbrx" => PreTokenizer {
                ignore_merges: true,
                ..plain(seq(vec![split(LLAMA3_SPLIT), byte_level(false)]))
            },
            "qwen2" | "deepseek-r1-qwen" => PreTokenizer {
                normalizer: json!({"type": "NFC"}),
                ..plain(seq(vec![split(QWEN2_SPLIT), byte_level(false)]))
            },
            // SmolLM: every digit apart, then GPT-2's pattern.
            "smollm" => plain(seq(vec![json!({"type": "Digits", "individual_digits": true}), byte_level(true)])),
            "deepseek-llm" => plain(seq(DEEPSEEK_LLM_SPLITS.iter().map(|r| split(r)).chain([byte_level(false)]).collect())),
            _ => return None,
        })
    }
}

/// tokenizer.json + tokenizer_config.json from GGUF metadata (`tokenizer.ggml.model = gpt2`: byte-level BPE).
pub fn hf_tokenizer(g: &GgufFile) -> Result<Option<(Value, Value)>> {
    let Some(model) = g.meta("tokenizer.ggml.model").and_then(|v| v.as_str()) else { return Ok(None) };
    if model != "gpt2" {
        eprintln!("whet: GGUF tokenizer model \"{model}\" is not byte-level BPE; tokenizer files not written");
        return Ok(None);
    }
    let tokens: Vec<&str> = g
        .meta("tokenizer.ggml.tokens")
        .and_then(|v| v.as_array())
        .ok_or_else(|| g.err("missing tokenizer.ggml.tokens"))?
        .iter()
        .map(|t| t.as_str().unwrap_or(""))
        .collect();
    let types: Vec<i64> = g
        .meta("tokenizer.ggml.token_type")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().map(|t| t.as_i64().unwrap_or(1)).collect())
        .unwrap_or_else(|| vec![1; tokens.len()]);
    let merges: Vec<Value> = g
        .meta("tokenizer.ggml.merges")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|m| m.as_str())
                .filter_map(|m| m.split_once(' ').map(|(x, y)| json!([x, y])))
                .collect()
        })
        .unwrap_or_default();
    let mut vocab = Map::new();
    let mut added = vec![];
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.to_string(), json!(i));
        // token type 3 = control (special), 4 = user-defined
        if matches!(types.get(i), Some(3) | Some(4)) {
            added.push(json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                              "normalized": false, "special": types.get(i) == Some(&3)}));
        }
    }
    let pre_type = g.meta("tokenizer.ggml.pre").and_then(|v| v.as_str()).unwrap_or("default");
    let pre = PreTokenizer::of(pre_type).ok_or_else(|| {
        g.err(format!(
            "tokenizer.ggml.pre = \"{pre_type}\" is not a pre-tokenizer whet knows (supported: {}); convert the model's own tokenizer.json instead",
            PreTokenizer::NAMES.join(", ")
        ))
    })?;
    let bos = g.meta("tokenizer.ggml.bos_token_id").and_then(|v| v.as_i64()).and_then(|i| tokens.get(i as usize).map(|t| (i, *t)));
    let add_bos = g.meta("tokenizer.ggml.add_bos_token").and_then(|v| v.as_bool()).unwrap_or(false);
    let post_processor = match bos.filter(|_| add_bos) {
        // The tokenizer adds BOS to every encoding (Llama 3): TemplateProcessing, as in the model's tokenizer.json.
        Some((id, t)) => json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": t, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {t: {"id": t, "ids": [id], "tokens": [t]}}}),
        None => json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}),
    };
    let tok = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": pre.normalizer,
        "pre_tokenizer": pre.pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": pre.ignore_merges,
                  "vocab": vocab, "merges": merges}
    });
    let name = |key: &str| {
        g.meta(key).and_then(|v| v.as_i64()).and_then(|i| tokens.get(i as usize)).map(|s| json!(s)).unwrap_or(Value::Null)
    };
    let mut cfg = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "clean_up_tokenization_spaces": false,
    });
    if let Some(t) = g.meta("tokenizer.chat_template").and_then(|v| v.as_str()) {
        cfg.as_object_mut().unwrap().insert("chat_template".into(), json!(t));
    }
    Ok(Some((tok, cfg)))
}

/// Converts a GGUF file into a Hugging Face directory with float32 weights (`train convert gguf`).
pub fn convert_to_hf(gguf_path: &Path, out: &Path) -> Result<()> {
    let g = GgufFile::open(gguf_path)?;
    let arch = g.meta("general.architecture").and_then(|v| v.as_str()).ok_or_else(|| g.err("missing general.architecture"))?.to_string();
    let heads = meta_i(&g, &format!("{arch}.attention.head_count"))?;
    let kv = g.meta(&format!("{arch}.attention.head_count_kv")).and_then(|v| v.as_i64()).unwrap_or(heads);
    let mut tensors = vec![];
    let mut vocab = None;
    for t in &g.tensors {
        let name = hf_name(&t.name, &arch).ok_or_else(|| g.err(format!("tensor {} has no Hugging Face equivalent", t.name)))?;
        let mut w = g.dequantize(t)?;
        if arch == "llama" && name.ends_with("q_proj.weight") {
            w = unpermute_rows(&w, heads);
        } else if arch == "llama" && name.ends_with("k_proj.weight") {
            w = unpermute_rows(&w, kv);
        }
        if name == "model.embed_tokens.weight" {
            vocab = Some(w.size()[0]);
        }
        tensors.push((name, w));
    }
    let tied = !tensors.iter().any(|(n, _)| n == "lm_head.weight");
    let vocab = vocab.ok_or_else(|| g.err("no token_embd.weight tensor"))?;
    let cfg = hf_config(&g, &arch, tied, vocab)?;
    // Validate against our own architecture before writing anything; written resolved, like every checkpoint.
    let cfg = crate::config::ModelConfig::from_json(cfg, &g.path)?.resolved_json();

    let tokenizer = hf_tokenizer(&g)?;
    write_dir_atomic(out, &partial_dir(out), |tmp| {
        write_safetensors(&tmp.join("model.safetensors"), &tensors, Some(Kind::Float))?;
        write_atomic(&tmp.join("config.json"), serde_json::to_string_pretty(&cfg).unwrap().as_bytes())?;
        write_generation_config(tmp, &cfg, &[], &Default::default())?;
        if let Some((tok, tcfg)) = &tokenizer {
            write_atomic(&tmp.join("tokenizer.json"), serde_json::to_string(tok).unwrap().as_bytes())?;
            write_atomic(&tmp.join("tokenizer_config.json"), serde_json::to_string_pretty(tcfg).unwrap().as_bytes())?;
            if let Some(t) = tcfg.get("chat_template").and_then(|t| t.as_str()) {
                write_atomic(&tmp.join("chat_template.jinja"), t.as_bytes())?;
            }
        }
        Ok::<(), ModelError>(())
    })
}
