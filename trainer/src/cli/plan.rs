//! `--dry-run`: the plan of a recipe — each stage's line, and the model's training-state memory per precision.

use tch::{Device, Kind};

use crate::recipe::Recipe;
use crate::training::precision;

/// The dry-run plan: stages, steps, tokens and a memory estimate.
pub fn plan(r: &Recipe) -> String {
    let mut s = String::new();
    // the dtype weights are held in (fp32 under bf16 mixed precision)
    let device = model::runtime::parse_device(&r.model.device).unwrap_or(Device::Cpu);
    let kind = r.model.precision(device).map(|(k, _)| k).unwrap_or(Kind::Float);
    let update = r.model.update_precision(r.run.seed);
    let cfg = r.model.config.as_ref().and_then(|c| model::ModelConfig::from_json(c.clone(), "").ok());
    let cfg = cfg.or_else(|| r.model.path.as_ref().filter(|p| p.is_dir()).and_then(|p| model::ModelConfig::from_path(p).ok()));
    let lora = cfg.as_ref().and_then(|c| r.model.lora.as_ref().and_then(|l| l.config(c.family.name()).ok()).map(|l| (model::lora::adapter_size(&l, c), l.r)));
    if let (Some(c), Some(((projections, n), rank))) = (&cfg, lora) {
        let base = c.num_parameters() as f64 * kind.elt_size_in_bytes() as f64 / 1e9;
        s.push_str(&format!(
            "model: {:.1} M parameters, frozen: {base:.2} GB in {}; LoRA r {rank} on {projections} projections: {:.2} M adapter parameters, training state ≈ {:.1} MB (4 B weights + 4 B gradients + 8 B AdamW moments per adapter parameter)\n",
            c.num_parameters() as f64 / 1e6,
            model::weights::torch_dtype_name(kind),
            n as f64 / 1e6,
            n as f64 * 16.0 / 1e6
        ));
    } else if let Some(n) = cfg.map(|c| c.num_parameters()) {
        let [w, extra, g, m] = precision::bytes_per_parameter(kind, &update);
        let gb = |b: usize| n as f64 * b as f64 / 1e9;
        s.push_str(&format!(
            "model: {:.1} M parameters; weights {:.2} GB, training state ≈ {:.2} GB before activations ({w} B weights + {extra} B {} + {g} B gradients + {m} B AdamW moments per parameter)\n",
            n as f64 / 1e6,
            gb(w),
            gb(w + extra + g + m),
            match precision::Slot::kind_for(kind, update.update) {
                Some(Kind::Float) => "fp32 master",
                Some(_) => "Kahan compensation",
                None => "update state",
            }
        ));
    }
    for (i, st) in r.stage.iter().enumerate() {
        s.push_str(&format!("stage {} {:?} ({}): {}\n", i + 1, st.name(i), st.kind(), st.plan()));
        s.push_str(&format!("  precision: {}\n", precision::describe_resolution(kind, &update, st.optim().lr)));
    }
    s
}
