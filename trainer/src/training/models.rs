//! Where a run's weights and tokenizer come from: a Hugging Face directory, a GGUF file (converted once into the
//! output directory), or an inline config (random init); the starting model of each stage; and the check
//! that the tokenizer fits the model's vocabulary.

use anyhow::{bail, Context, Result};
use model::Model;
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

use super::checkpoint;
use super::Ctx;
use crate::settings::ModelSpec;

pub fn tokenizer_dir(m: &ModelSpec, output: &Path) -> Result<PathBuf> {
    match m.tokenizer.as_deref() {
        Some("builtin:bytes") => {
            let d = output.join("tokenizer");
            super::builtin_tokenizer::write(&d)?;
            Ok(d)
        }
        Some(dir) => Ok(PathBuf::from(dir)),
        None => match &m.path {
            Some(p) if p.is_dir() => Ok(p.clone()),
            Some(p) => Ok(gguf_dir(p, output)),
            None => bail!("[model] needs `tokenizer`"),
        },
    }
}

/// The Hugging Face directory a `.gguf` `[model] path` converts to (once, on first use).
pub fn converted_gguf(gguf: &Path, output: &Path) -> Result<PathBuf> {
    let dir = gguf_dir(gguf, output);
    if !dir.join("config.json").exists() {
        eprintln!("converting {} to {}", gguf.display(), dir.display());
        model::gguf::convert_to_hf(gguf, &dir).with_context(|| format!("[model] path {}: converting the GGUF file", gguf.display()))?;
    }
    Ok(dir)
}

fn gguf_dir(gguf: &Path, output: &Path) -> PathBuf {
    output.join("base-model").join(gguf.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default())
}

/// The weights stage `index` started from (a fresh copy): the base model for the first stage, else the
/// previous stage's final checkpoint. Used for reference models on resume.
pub fn stage_start_model(ctx: &Ctx, index: usize, kind: Kind, device: Device) -> Result<Model> {
    if index == 0 {
        return base_model(&ctx.model_spec, &ctx.output, kind, device);
    }
    let prev = checkpoint::list(&ctx.output)?
        .into_iter()
        .filter(|c| c.state.stage == index - 1 && c.state.stage_complete)
        .last()
        .with_context(|| format!("no final checkpoint of stage {} in {}", index, ctx.output.display()))?;
    checkpoint_model(&ctx.model_spec, &ctx.output, &prev.model_dir(), kind, device)
}

/// The starting model of the first stage: the base, with the run's adapter when it trains one (`[model]
/// adapter`, or a new one from `[model] lora`).
pub fn base_model(m: &ModelSpec, output: &Path, kind: Kind, device: Device) -> Result<Model> {
    let mut model = frozen_base(m, output, kind, device)?;
    match (&m.adapter, &m.lora) {
        (Some(dir), _) => model.load_adapter(dir).with_context(|| format!("[model] adapter {}", dir.display()))?,
        (None, Some(lora)) => {
            // seeded: every rank draws the same adapter (from a stream of its own, not the random base's)
            tch::manual_seed((model::mix64(m.init_seed as u64 ^ 0x4c6f_5241) >> 1) as i64);
            model.net.add_lora(&lora.config(model.net.cfg.family.name())?).context("[model] lora")?;
        }
        (None, None) => {}
    }
    Ok(model)
}

/// The model a checkpoint's `model/` directory holds: a whole model, or an adapter on the run's base.
pub fn checkpoint_model(m: &ModelSpec, output: &Path, dir: &Path, kind: Kind, device: Device) -> Result<Model> {
    if !model::lora::is_adapter_dir(dir) {
        return Ok(Model::load(dir, Some(kind), device)?);
    }
    let mut model = frozen_base(m, output, kind, device)?;
    model.load_adapter(dir)?;
    Ok(model)
}

/// The base weights (`[model] path` or `config`), without an adapter.
fn frozen_base(m: &ModelSpec, output: &Path, kind: Kind, device: Device) -> Result<Model> {
    if let Some(cfg) = &m.config {
        let cfg = model::ModelConfig::from_json(cfg.clone(), "[model.config]")?;
        return Ok(Model::random(&cfg, kind, device, m.init_seed));
    }
    let path = m.path.as_ref().context("[model] path")?;
    if path.is_file() {
        return Ok(Model::load(&converted_gguf(path, output)?, Some(kind), device)?);
    }
    Ok(Model::load(path, Some(kind), device)?)
}

/// What a saved adapter names as its base (`base_model_name_or_path`): the model directory (a GGUF's
/// converted one); none for a random-initialised base.
pub fn base_name(m: &ModelSpec, output: &Path) -> Option<String> {
    let path = m.path.as_ref()?;
    let dir = if path.is_file() { gguf_dir(path, output) } else { path.clone() };
    Some(dir.to_string_lossy().into_owned())
}

/// With an adapter, the base with the adapter switched off: a view sharing the base's tensors (no second
/// model in memory), the reference model of KL and DPO under LoRA (as TRL's with a PEFT model).
pub fn adapter_off(model: &Model) -> Option<Model> {
    model.net.adapters().is_some().then(|| Model { net: model.net.base_view(), source_dir: model.source_dir.clone() })
}

/// The reference model of a stage that trains `model`: [`adapter_off`] with an adapter, else `full()` (a
/// frozen copy of the stage's starting weights).
pub fn reference_model(model: &Model, full: impl FnOnce() -> Result<Model>) -> Result<Model> {
    adapter_off(model).map_or_else(full, Ok)
}

/// Refuses a tokenizer with more ids than the model has embedding rows (an id past them would index out of
/// the embedding in the first forward), once for every stage kind.
pub fn check_vocabulary(ctx: &Ctx, model: &Model) -> Result<()> {
    let (ids, rows) = (ctx.tok.vocab_size() as i64, model.net.cfg.vocab_size);
    if ids > rows {
        let model_at = match (&ctx.model_spec.path, &ctx.model_spec.config) {
            (Some(p), _) => format!("{}/config.json", p.display()),
            _ => "[model] config".to_string(),
        };
        bail!(
            "the tokenizer in {} has {ids} token ids but the model's vocab_size is {rows} ({model_at}): ids from {rows} on have no embedding row; use the model's own tokenizer or set vocab_size to at least {ids}",
            ctx.tok_dir.display()
        );
    }
    Ok(())
}
