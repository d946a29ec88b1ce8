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
    let params = r.model.config.as_ref().and_then(|c| model::ModelConfig::from_json(c.clone(), "").ok()).map(|c| c.num_parameters());
    let params = params.or_else(|| r.model.path.as_ref().filter(|p| p.is_dir()).and_then(|p| model::ModelConfig::from_path(p).ok()).map(|c| c.num_parameters()));
    if let Some(n) = params {
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
