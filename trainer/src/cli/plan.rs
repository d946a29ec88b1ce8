//! `--dry-run`: the plan of a recipe — each stage's line, and the model's training-state memory per precision.

use tch::{Device, Kind};

use crate::recipe::Recipe;
use crate::training::memory::{self, Plan, Sharding};
use crate::training::precision;

/// The model's config: the inline one, or the model directory's config.json (a .gguf is not read).
pub fn model_config(r: &Recipe) -> Option<model::ModelConfig> {
    let cfg = r.model.config.as_ref().and_then(|c| model::ModelConfig::from_json(c.clone(), "").ok());
    cfg.or_else(|| r.model.path.as_ref().filter(|p| p.is_dir()).and_then(|p| model::ModelConfig::from_path(p).ok()))
}

/// `--gpu-memory`'s value in bytes.
pub fn parse_gpu_memory(s: &str) -> anyhow::Result<f64> {
    memory::parse_bytes(s).map_err(anyhow::Error::msg)
}

/// The per-rank memory plan on `world` ranks: one table per stage, a row per sharding mode, and whether it fits
/// `gpu_memory` bytes, for a model of config `cfg`.
pub fn memory_plan(r: &Recipe, cfg: &model::ModelConfig, world: usize, gpu_memory: Option<f64>) -> String {
    let device = model::runtime::parse_device(&r.model.device).unwrap_or(Device::Cpu);
    let (weights, autocast) = r.model.precision(device).unwrap_or((Kind::Float, None));
    let adapter = r.model.lora.as_ref().and_then(|l| l.config(cfg.family.name()).ok()).map(|l| model::lora::adapter_size(&l, cfg).1);
    let plan = Plan { model: memory::ModelShape::of(cfg), weights, compute: autocast.unwrap_or(weights), precision: r.model.update_precision(r.run.seed), adapter, world: world as i64 };
    let gb = |x: f64| format!("{:.1}", x / 1e9);
    let mut s = format!(
        "{world} rank(s), GB per rank, for each [run] sharding (\"none\", \"optimizer\" = ZeRO-1, \"gradients\" = ZeRO-2, \"full\" = ZeRO-3, whose decode copy column includes the whole weights it gathers for sampling, evaluation and checkpoints); the recipe's is marked ←; activations are an estimate for one micro-batch; total = the state and reference + the largest of sampling (decode copy + KV cache), activations and step temporaries, which come one after another\n"
    );
    for (i, st) in r.stage.iter().enumerate() {
        let shape = st.memory_shape(&r.generation);
        s.push_str(&format!("\nstage {} {:?} ({}): micro-batch {} tokens{}\n", i + 1, st.name(i), st.kind(), shape.micro_tokens, if shape.checkpointing { ", activation checkpointing" } else { "" }));
        s.push_str("| sharding | weights | update state | gradients | AdamW moments | step temporaries | reference | decode copy | KV cache | activations | total |");
        s.push_str(if gpu_memory.is_some() { " fits |\n" } else { "\n" });
        s.push_str(&format!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|{}\n", if gpu_memory.is_some() { "---|" } else { "" }));
        for sh in Sharding::ALL {
            let m = plan.rank(&shape, sh);
            let fits = gpu_memory.map(|g| if m.total() <= g { format!(" yes ({} free) |", gb(g - m.total())) } else { format!(" no ({} over) |", gb(m.total() - g)) });
            s.push_str(&format!(
                "| {}{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |{}\n",
                sh.name(),
                if sh == r.run.sharding { " ←" } else { "" },
                gb(m.weights),
                gb(m.update_state),
                gb(m.gradients),
                gb(m.moments),
                gb(m.step_temporaries),
                gb(m.reference),
                gb(m.decode_weights),
                gb(m.kv_cache),
                gb(m.activations),
                gb(m.total()),
                fits.unwrap_or_default()
            ));
        }
    }
    s
}

/// The dry-run plan: stages, steps, tokens and a memory estimate.
pub fn plan(r: &Recipe) -> String {
    let mut s = String::new();
    // the dtype weights are held in (fp32 under bf16 mixed precision)
    let device = model::runtime::parse_device(&r.model.device).unwrap_or(Device::Cpu);
    let kind = r.model.precision(device).map(|(k, _)| k).unwrap_or(Kind::Float);
    let update = r.model.update_precision(r.run.seed);
    let cfg = model_config(r);
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
