//! Checks across a recipe's tables (each stage checks its own keys, see `stages::StageKind::validate`).

use super::file::Recipe;

/// Checks combinations and files; returns every problem found.
pub fn validate(r: &Recipe, origin: &str) -> Vec<String> {
    let mut p = vec![];
    match (&r.model.path, &r.model.config) {
        (Some(_), Some(_)) => p.push(format!("{origin}: [model] has both `path` and `config`; give one")),
        (None, None) => p.push(format!("{origin}: [model] needs `path` (a model directory or .gguf) or `config` (random init)")),
        (Some(path), None) if !path.exists() => p.push(format!("{origin}: [model] path {} does not exist", path.display())),
        _ => {}
    }
    if r.model.config.is_some() && r.model.tokenizer.is_none() {
        p.push(format!("{origin}: [model] with an inline `config` needs `tokenizer` (a directory, or \"builtin:bytes\")"));
    }
    if let Err(e) = model::parse_kind(&r.model.dtype) {
        p.push(format!("{origin}: [model] dtype: {e}"));
    }
    if let Err(e) = model::runtime::parse_device(&r.model.device) {
        p.push(format!("{origin}: [model] device: {e}"));
    }
    match (r.model.mixed_precision.as_deref(), r.model.dtype.as_str()) {
        (None | Some("no"), _) => {}
        (Some("bf16"), "float16" | "fp16" | "f16" | "half") => {
            p.push(format!("{origin}: [model] mixed_precision = \"bf16\" keeps fp32 weights; dtype = \"{}\" contradicts it (leave dtype out)", r.model.dtype))
        }
        (Some("bf16"), _) => {}
        (Some(m), _) => p.push(format!("{origin}: [model] mixed_precision: unknown value \"{m}\" (expected \"bf16\" or \"no\")")),
    }
    r.model.validate_precision(origin, &mut p);
    r.model.validate_adapter(origin, &mut p);
    if let Some(cfg) = &r.model.config {
        if let Err(e) = model::ModelConfig::from_json(cfg.clone(), &format!("{origin} [model.config]")) {
            p.push(e.to_string());
        }
    }
    r.run.validate(origin, &mut p);
    if r.generation.max_batch_seqs == 0 {
        p.push(format!("{origin}: [generation] max_batch_seqs must be at least 1"));
    }
    if r.generation.sync_every == 0 {
        p.push(format!("{origin}: [generation] sync_every must be at least 1"));
    }
    if r.generation.cache_budget_tokens < 2 {
        p.push(format!("{origin}: [generation] cache_budget_tokens must be at least 2, got {}", r.generation.cache_budget_tokens));
    }
    if r.stage.is_empty() {
        p.push(format!("{origin}: no [[stage]]: nothing to train"));
    }
    for (i, s) in r.stage.iter().enumerate() {
        s.validate(&format!("{origin}: stage {} ({})", i + 1, s.name(i)), &mut p);
        if r.run.sharding == crate::settings::Sharding::Full && !s.gradient_checkpointing() {
            p.push(format!(
                "{origin}: stage {} ({}): [run] sharding = \"full\" gathers one decoder layer at a time around its forward and its backward, which needs gradient_checkpointing = true in every stage",
                i + 1,
                s.name(i)
            ));
        }
    }
    p
}
