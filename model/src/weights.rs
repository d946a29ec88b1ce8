//! Safetensors in and out, in the Hugging Face layout.
//!
//! Loading memory-maps each file (sharded checkpoints through `model.safetensors.index.json`) and copies
//! one tensor at a time into the already-allocated parameters, so the weights are never held twice.
//! Saving writes `config.json`, shards plus index when needed, `generation_config.json` and the tokenizer
//! files into a temporary directory that is fsynced and renamed into place: a reader never sees a
//! half-written model.

use crate::error::{ModelError, Result};
use crate::params::ParamStore;
use safetensors::tensor::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

pub fn kind_of(d: Dtype) -> Option<Kind> {
    Some(match d {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

pub fn dtype_of(k: Kind) -> Option<Dtype> {
    Some(match k {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

/// The name HF uses for a dtype in config.json.
pub fn torch_dtype_name(k: Kind) -> &'static str {
    match k {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        Kind::Double => "float64",
        _ => "float32",
    }
}

/// Lists the safetensors files of a model directory, refusing pickle checkpoints.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::weights(&index, format!("not valid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::weights(&index, "missing object `weight_map`"))?;
        let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
        files.sort();
        files.dedup();
        let files: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
        for f in &files {
            if !f.exists() {
                return Err(ModelError::weights(&index, format!("names shard {} which does not exist", f.display())));
            }
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let mut found = vec![];
    let mut pickles = vec![];
    let rd = std::fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))?;
    for e in rd.flatten() {
        let p = e.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("").to_string();
        if name.ends_with(".safetensors") {
            found.push(p);
        } else if name.ends_with(".bin") || name.ends_with(".pt") || name.ends_with(".pth") || name.ends_with(".ckpt") {
            pickles.push(name);
        }
    }
    found.sort();
    if !found.is_empty() {
        return Ok(found);
    }
    if !pickles.is_empty() {
        return Err(ModelError::weights(
            dir,
            format!(
                "found only pickle checkpoint(s) ({}); whet refuses pickle files because loading them can run arbitrary code. \
                 Convert once with Python: `from transformers import AutoModelForCausalLM; \
                 AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)`",
                pickles.join(", ")
            ),
        ));
    }
    Err(ModelError::weights(dir, "no model.safetensors, model.safetensors.index.json or *.safetensors file"))
}

/// Names that checkpoints may carry but that are not parameters.
fn ignorable(name: &str, tied: bool) -> bool {
    name.ends_with("rotary_emb.inv_freq") || (tied && name == "lm_head.weight")
}

/// Copies every tensor of the model directory's safetensors into `params`; each parameter must be found
/// exactly once with the right shape.
pub fn load_into(params: &ParamStore, dir: &Path, tied: bool) -> Result<()> {
    let files = weight_files(dir)?;
    let mut seen: HashSet<String> = HashSet::new();
    let mut unexpected = vec![];
    for file in &files {
        let f = File::open(file).map_err(|e| ModelError::io(file, e))?;
        // SAFETY: the file is opened read-only; a concurrent writer could change the bytes under us, which
        // at worst yields wrong weights, not memory unsafety in our use (we only copy out of the slice).
        let mmap = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| ModelError::io(file, e))?;
        let st = SafeTensors::deserialize(&mmap)
            .map_err(|e| ModelError::weights(file, format!("not a valid safetensors file (truncated or corrupt?): {e}")))?;
        for (name, view) in st.tensors() {
            let Some(dst) = params.get(&name) else {
                if !ignorable(&name, tied) {
                    unexpected.push(name);
                }
                continue;
            };
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            if shape != dst.size() {
                return Err(ModelError::weights(
                    file,
                    format!("tensor `{name}` has shape {:?} but the config implies {:?}", shape, dst.size()),
                ));
            }
            let kind = kind_of(view.dtype())
                .ok_or_else(|| ModelError::weights(file, format!("tensor `{name}` has unsupported dtype {:?}", view.dtype())))?;
            let src = Tensor::from_data_size(view.data(), &shape, kind);
            let mut d = dst.shallow_clone();
            tch::no_grad(|| d.copy_(&src));
            seen.insert(name);
        }
    }
    if !unexpected.is_empty() {
        unexpected.sort();
        let n = unexpected.len();
        unexpected.truncate(5);
        return Err(ModelError::weights(
            dir,
            format!("{n} tensor(s) are not parameters of this architecture, e.g. {}: does config.json match the weights?", unexpected.join(", ")),
        ));
    }
    let missing: Vec<&str> = params.names().iter().filter(|n| !seen.contains(*n)).map(|s| s.as_str()).collect();
    if !missing.is_empty() {
        let shown: Vec<&str> = missing.iter().take(5).copied().collect();
        return Err(ModelError::weights(dir, format!("{} parameter(s) missing from the weights, e.g. {}", missing.len(), shown.join(", "))));
    }
    Ok(())
}

/// A tensor converted to bytes only when the writer asks for it.
struct LazyView {
    t: Tensor,
    dtype: Dtype,
    shape: Vec<usize>,
}

impl View for LazyView {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let c = self.t.to_device(Device::Cpu).contiguous();
        let n = self.data_len();
        let mut buf = vec![0u8; n];
        c.copy_data_u8(&mut buf, c.numel());
        Cow::Owned(buf)
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * (self.dtype.bitsize() / 8)
    }
}

/// Writes `tensors` as one safetensors file (atomically: temp file, fsync, rename).
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)], kind: Option<Kind>) -> Result<()> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = match kind {
            Some(k) if t.is_floating_point() => t.detach().to_kind(k),
            _ => t.detach(),
        };
        let dtype = dtype_of(t.kind()).ok_or_else(|| ModelError::weights(path, format!("cannot save dtype {:?}", t.kind())))?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        views.push((name.clone(), LazyView { t, dtype, shape }));
    }
    let tmp = tmp_sibling(path);
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize_to_file(views, Some(meta), &tmp)
        .map_err(|e| ModelError::weights(path, format!("writing safetensors: {e}")))?;
    fsync_file(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))?;
    Ok(())
}

fn tmp_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

pub fn fsync_file(path: &Path) -> Result<()> {
    File::open(path).and_then(|f| f.sync_all()).map_err(|e| ModelError::io(path, e))
}

/// Writes `bytes` to `path` atomically (temp file, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_sibling(path);
    let mut f = File::create(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| ModelError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))
}

/// Files copied verbatim from the source model directory when saving.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
];

/// Options for [`save_pretrained`].
pub struct SaveOptions<'a> {
    /// Dtype of the saved floating-point weights (`None`: as in memory).
    pub kind: Option<Kind>,
    /// Largest shard in bytes; bigger models are split into `model-0000i-of-0000n.safetensors` + index.
    pub max_shard_bytes: u64,
    /// Directory whose tokenizer files are copied (the run's tokenizer).
    pub source_dir: Option<&'a Path>,
    /// Directory the weights came from: its `generation_config.json` (extra EOS ids, sampling defaults) is kept.
    pub model_dir: Option<&'a Path>,
    /// The tokenizer's ids, for the `generation_config.json` keys no file states.
    pub token_ids: TokenIds,
}

/// Special-token ids of a tokenizer (`eos` may hold several stop ids: eos and end-of-turn tokens).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenIds {
    pub bos: Option<i64>,
    pub eos: Vec<i64>,
    pub pad: Option<i64>,
}

impl Default for SaveOptions<'_> {
    fn default() -> Self {
        SaveOptions { kind: None, max_shard_bytes: 5_000_000_000, source_dir: None, model_dir: None, token_ids: TokenIds::default() }
    }
}

/// Saves weights and configs in the Hugging Face layout into `out` (replaced atomically if it exists).
pub fn save_pretrained(
    params: &ParamStore,
    config_json: &serde_json::Value,
    tied: bool,
    out: &Path,
    opts: &SaveOptions,
) -> Result<()> {
    write_dir_atomic(out, &partial_dir(out), |tmp| write_pretrained(params, config_json, tied, tmp, opts))
}

fn write_pretrained(params: &ParamStore, config_json: &serde_json::Value, tied: bool, tmp: &Path, opts: &SaveOptions) -> Result<()> {
    // Shards in parameter order.
    let tensors: Vec<(String, Tensor)> = params
        .iter()
        .filter(|(n, _)| !(tied && *n == "lm_head.weight"))
        .map(|(n, t)| (n.to_string(), t.shallow_clone()))
        .collect();
    let saved_kind = opts.kind.unwrap_or(params.kind);
    let elt = saved_kind.elt_size_in_bytes() as u64;
    let mut shards: Vec<Vec<(String, Tensor)>> = vec![vec![]];
    let mut cur = 0u64;
    let mut total = 0u64;
    for (n, t) in tensors {
        let bytes = t.numel() as u64 * elt;
        if cur > 0 && cur + bytes > opts.max_shard_bytes {
            shards.push(vec![]);
            cur = 0;
        }
        cur += bytes;
        total += bytes;
        shards.last_mut().unwrap().push((n, t));
    }
    if shards.len() == 1 {
        write_safetensors(&tmp.join("model.safetensors"), &shards[0], opts.kind)?;
    } else {
        let n = shards.len();
        let mut map = BTreeMap::new();
        for (i, shard) in shards.iter().enumerate() {
            let fname = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
            write_safetensors(&tmp.join(&fname), shard, opts.kind)?;
            for (name, _) in shard {
                map.insert(name.clone(), serde_json::Value::String(fname.clone()));
            }
        }
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": map});
        write_atomic(&tmp.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index).unwrap().as_bytes())?;
    }

    let mut cfg = config_json.clone();
    if let Some(obj) = cfg.as_object_mut() {
        let key = if obj.contains_key("dtype") { "dtype" } else { "torch_dtype" };
        obj.insert(key.to_string(), serde_json::Value::String(torch_dtype_name(saved_kind).into()));
    }
    write_atomic(&tmp.join("config.json"), serde_json::to_string_pretty(&cfg).unwrap().as_bytes())?;

    if let Some(src) = opts.source_dir {
        copy_tokenizer_files(src, tmp)?;
    }
    let mut dirs: Vec<&Path> = opts.model_dir.into_iter().collect();
    // The tokenizer folder's file too, unless it is the model's own (read once).
    dirs.extend(opts.source_dir.filter(|s| opts.model_dir != Some(*s)));
    write_generation_config(tmp, &cfg, &dirs, &opts.token_ids)
}

/// Copies the [`TOKENIZER_FILES`] `src` has into `dst`.
pub fn copy_tokenizer_files(src: &Path, dst: &Path) -> Result<()> {
    for f in TOKENIZER_FILES {
        let p = src.join(f);
        if p.exists() {
            let bytes = std::fs::read(&p).map_err(|e| ModelError::io(&p, e))?;
            write_atomic(&dst.join(f), &bytes)?;
        }
    }
    Ok(())
}

/// A directory's `generation_config.json` as a JSON object (`None` when there is none).
pub fn read_generation_config(dir: &Path) -> Result<Option<serde_json::Map<String, serde_json::Value>>> {
    let p = dir.join("generation_config.json");
    let Ok(text) = std::fs::read_to_string(&p) else { return Ok(None) };
    match serde_json::from_str(&text) {
        Ok(serde_json::Value::Object(o)) => Ok(Some(o)),
        Ok(_) => Err(ModelError::Other(format!("{}: expected a JSON object", p.display()))),
        Err(e) => Err(ModelError::Other(format!("{}: not valid JSON: {e}", p.display()))),
    }
}

/// `generation_config.json`: the merge of the files in `dirs` (earlier directories win key by key; the model's
/// own file first, so its extra EOS ids and sampling defaults survive a tokenizer taken from elsewhere), then
/// the bos / eos / pad ids config.json states, then the tokenizer's, for keys still missing. transformers'
/// generate() never stops without an `eos_token_id`, so the tokenizer's stop ids fill it.
pub fn write_generation_config(dir: &Path, config_json: &serde_json::Value, dirs: &[&Path], ids: &TokenIds) -> Result<()> {
    let mut g = serde_json::Map::new();
    for d in dirs {
        for (k, v) in read_generation_config(d)?.unwrap_or_default() {
            g.entry(k).or_insert(v);
        }
    }
    let from_tokenizer = [
        ("bos_token_id", ids.bos.map(serde_json::Value::from)),
        ("eos_token_id", match ids.eos.as_slice() {
            [] => None,
            [one] => Some(serde_json::Value::from(*one)),
            many => Some(serde_json::Value::from(many.to_vec())),
        }),
        ("pad_token_id", ids.pad.map(serde_json::Value::from)),
    ];
    for (k, tok) in from_tokenizer {
        if g.get(k).is_none_or(|v| v.is_null()) {
            if let Some(v) = config_json.get(k).filter(|v| !v.is_null()).cloned().or(tok) {
                g.insert(k.into(), v);
            }
        }
    }
    write_atomic(&dir.join("generation_config.json"), serde_json::to_string_pretty(&g).unwrap().as_bytes())
}

/// The default temporary sibling of `out` for [`write_dir_atomic`]: `.NAME.partial-PID`.
pub fn partial_dir(out: &Path) -> PathBuf {
    let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("model");
    out.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

/// Writes a directory atomically: `fill` writes into `tmp` (a sibling of `out`, emptied first), which is
/// fsynced and renamed to `out` (an existing `out` is replaced); then the parent directory is fsynced. A reader
/// sees the old directory or the complete new one, never a half-written one.
pub fn write_dir_atomic<E: From<ModelError>>(
    out: &Path,
    tmp: &Path,
    fill: impl FnOnce(&Path) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| ModelError::io(parent, e))?;
    if tmp.exists() {
        std::fs::remove_dir_all(tmp).map_err(|e| ModelError::io(tmp, e))?;
    }
    std::fs::create_dir_all(tmp).map_err(|e| ModelError::io(tmp, e))?;
    fill(tmp)?;
    File::open(tmp).and_then(|d| d.sync_all()).map_err(|e| ModelError::io(tmp, e))?;
    // Swap into place: old → trash, tmp → out, remove trash.
    if out.exists() {
        let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("dir");
        let trash = parent.join(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(out, &trash).map_err(|e| ModelError::io(out, e))?;
        std::fs::rename(tmp, out).map_err(|e| ModelError::io(out, e))?;
        let _ = std::fs::remove_dir_all(&trash);
    } else {
        std::fs::rename(tmp, out).map_err(|e| ModelError::io(out, e))?;
    }
    File::open(parent).and_then(|d| d.sync_all()).map_err(|e| ModelError::io(parent, e))?;
    Ok(())
}
