//! `train merge-lora --base DIR --adapter DIR --out DIR`: a PEFT adapter merged into its base, written as a
//! whole Hugging Face model (what `peft`'s `merge_and_unload()` + `save_pretrained` give), so that
//! transformers and vLLM load it with no adapter support.

use anyhow::{Context, Result};
use model::Model;
use std::path::Path;
use tch::{Device, Kind};

/// Merges in fp32 and saves in `dtype` (default: the base's `torch_dtype`, else float32). The tokenizer files
/// come from the adapter directory when it has them (a whet checkpoint does), else from the base.
pub fn run(base: &Path, adapter: &Path, out: &Path, dtype: Option<&str>, device: Device) -> Result<()> {
    let t0 = std::time::Instant::now();
    let saved = match dtype {
        Some(d) => model::parse_kind(d).map_err(anyhow::Error::msg).context("--dtype")?,
        None => base_dtype(base).unwrap_or(Kind::Float),
    };
    let mut m = Model::load(base, Some(Kind::Float), device).with_context(|| format!("loading the base {}", base.display()))?;
    let cfg = model::lora::read_config(adapter)?;
    m.load_adapter(adapter).with_context(|| format!("putting the adapter {} on {}", adapter.display(), base.display()))?;
    m.net.merge_adapters();
    let tokenizer = if adapter.join("tokenizer.json").exists() { adapter } else { base };
    m.save(out, &model::weights::SaveOptions { kind: Some(saved), source_dir: Some(tokenizer), model_dir: Some(base), ..Default::default() })
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!(
        "merged {} (r {}, alpha {}) into {}: wrote {} ({}) in {:.1} s",
        adapter.display(),
        cfg.r,
        cfg.lora_alpha,
        base.display(),
        out.display(),
        model::weights::torch_dtype_name(saved),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The dtype the base's config.json names (`torch_dtype`, or transformers 5's `dtype`).
fn base_dtype(base: &Path) -> Option<Kind> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(base.join("config.json")).ok()?).ok()?;
    let name = v.get("torch_dtype").or_else(|| v.get("dtype"))?.as_str()?;
    model::parse_kind(name).ok()
}
