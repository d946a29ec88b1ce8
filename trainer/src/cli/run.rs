//! `train --recipe`: resolve the model and tokenizer, decide where to resume, run the stages in order (each
//! starting from the previous stage's result), and print a summary.

use anyhow::{bail, Context, Result};
use data::Tokenizer;
use model::Model;
use std::path::{Path, PathBuf};
use tch::Kind;

use crate::observe::metrics::Metrics;
use crate::recipe;
use crate::training::checkpoint::{self, Checkpoint};
use crate::training::{models, Ctx};

/// `--resume`.
#[derive(Debug, Clone)]
pub enum Resume {
    Auto,
    Never,
    Path(PathBuf),
}

impl std::str::FromStr for Resume {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => Resume::Auto,
            "never" => Resume::Never,
            p => Resume::Path(PathBuf::from(p)),
        })
    }
}

pub struct Options {
    pub resume: Resume,
    pub force: bool,
    pub dry_run: bool,
    /// The world size the dry run plans memory for.
    pub world: usize,
    /// Each rank's accelerator memory in bytes, for the dry run's fit check.
    pub gpu_memory: Option<f64>,
    /// A config.json the dry run reads the model's shape from.
    pub model_config: Option<PathBuf>,
}

/// Runs a recipe: its stages in order, from where `opts.resume` says.
pub fn run(recipe_path: &Path, overrides: &[String], output: Option<PathBuf>, opts: Options) -> Result<()> {
    let (mut r, missing) = recipe::load_with(recipe_path, overrides, opts.dry_run)?;
    if let Some(o) = output {
        r.run.output_dir = o;
    }
    if opts.dry_run {
        return print_dry_run(&r, &missing, &opts);
    }
    let (comm, device, kind) = start_runtime(&r)?;
    // data parallel: rank 0 prepares the shared files (tokenizer, converted GGUF, metrics) first
    if !comm.is_main() {
        comm.barrier()?;
    }
    let output = r.run.output_dir.clone();
    std::fs::create_dir_all(&output).with_context(|| format!("creating {}", output.display()))?;
    let fingerprint = recipe::fingerprint(&r);
    let ckpt = resume_point(&opts, &output, &fingerprint, comm.is_main())?;
    let ctx = context(&r, output, fingerprint, comm, ckpt.as_ref())?;
    let (first, model, mid) = match &ckpt {
        None => (0, models::base_model(&r.model, &ctx.output, kind, device)?, None),
        Some(c) if c.state.stage_complete => (c.state.stage + 1, models::checkpoint_model(&r.model, &ctx.output, &c.model_dir(), kind, device)?, None),
        Some(c) => (c.state.stage, models::checkpoint_model(&r.model, &ctx.output, &c.model_dir(), kind, device)?, Some(c)),
    };
    if ctx.comm.is_main() {
        ctx.comm.barrier()?;
    }
    models::check_vocabulary(&ctx, &model)?;
    let summary = run_stages(&ctx, &r, first, model, mid, kind, device)?;
    ctx.metrics.finish();
    if let Some(gb) = peak_resident_gb() {
        eprintln!("peak resident memory of this process: {gb:.2} GB");
    }
    if !summary.is_empty() && ctx.comm.is_main() {
        print_summary(&ctx, &summary)?;
    }
    Ok(())
}

fn print_dry_run(r: &recipe::Recipe, missing: &[String], opts: &Options) -> Result<()> {
    println!("# resolved recipe\n{}", toml::to_string_pretty(r).unwrap_or_default());
    for m in missing {
        println!("# needed before a real run: {m}");
    }
    println!("# plan\n{}", super::plan::plan(r));
    let cfg = match &opts.model_config {
        Some(f) => Some(model::ModelConfig::from_path(f).with_context(|| format!("--model-config {}", f.display()))?),
        None => super::plan::model_config(r),
    };
    match cfg {
        Some(cfg) => println!("# memory per rank\n{}", super::plan::memory_plan(r, &cfg, opts.world, opts.gpu_memory)),
        None => println!("# memory per rank: the model's config.json is not there yet; give --model-config FILE"),
    }
    Ok(())
}

/// Threads, the device (joining the data-parallel job when launched as one of its workers) and the precision:
/// the communicator, the device and the dtype weights are held in.
fn start_runtime(r: &recipe::Recipe) -> Result<(Box<dyn dist::Communicator>, tch::Device, Kind)> {
    if let Some(t) = r.run.threads {
        tch::set_num_threads(t);
    }
    let device = model::runtime::parse_device(&r.model.device).map_err(anyhow::Error::msg)?;
    let (comm, device) = super::launch::join(device)?;
    model::runtime::check_device(device).map_err(anyhow::Error::msg)?;
    let (kind, autocast) = r.model.precision(device)?;
    model::autocast::set_default(autocast);
    eprintln!("whet {}: {}", env!("CARGO_PKG_VERSION"), model::runtime::describe(device));
    if let Some(a) = autocast {
        eprintln!("mixed precision: fp32 weights and optimizer state, {a:?} autocast in forward passes");
    } else if kind != Kind::Float {
        let p = r.model.update_precision(r.run.seed);
        let [w, extra, g, m] = crate::training::precision::bytes_per_parameter(kind, &p);
        eprintln!(
            "precision: {kind:?} weights, weight_update = \"{}\", AdamW moments in {:?} ({} bytes of training state per parameter)",
            p.update.name(),
            p.state.kind(),
            w + extra + g + m
        );
    }
    Ok((comm, device, kind))
}

/// The checkpoint to continue from (none: start over), refused when another recipe wrote it (unless --force).
fn resume_point(opts: &Options, output: &Path, fingerprint: &serde_json::Value, main: bool) -> Result<Option<Checkpoint>> {
    let ckpt = match &opts.resume {
        Resume::Never => None,
        Resume::Auto => {
            let (c, warnings) = checkpoint::latest_intact(output);
            if main {
                for w in warnings {
                    eprintln!("warning: {w}");
                }
            }
            c
        }
        Resume::Path(p) => Some(checkpoint::open(p)?),
    };
    if let Some(c) = &ckpt {
        let mut diffs = vec![];
        recipe::differences(&c.state.recipe, fingerprint, "", &mut diffs);
        if !diffs.is_empty() && !opts.force {
            bail!(
                "{} was written by a different recipe (changed: {}); resuming would not reproduce the run. \
                 Use another --output, --resume never to start over, or --force to resume anyway",
                c.dir.display(),
                diffs.join(", ")
            );
        }
    }
    Ok(ckpt)
}

/// The stages' context: the tokenizer (a GGUF model's converted first), the metrics sink and the settings.
fn context(r: &recipe::Recipe, output: PathBuf, fingerprint: serde_json::Value, comm: Box<dyn dist::Communicator>, ckpt: Option<&Checkpoint>) -> Result<Ctx> {
    // a GGUF model brings its tokenizer: convert it before the tokenizer is read
    if let Some(p) = r.model.path.as_ref().filter(|p| p.is_file()) {
        models::converted_gguf(p, &output)?;
    }
    let tok_dir = models::tokenizer_dir(&r.model, &output)?;
    let (tok, template) = Tokenizer::from_dir(&tok_dir).with_context(|| format!("loading the tokenizer from {}", tok_dir.display()))?;
    let resume_at = ckpt.map(|c| (c.state.stage, c.state.step));
    let metrics = if comm.is_main() { Metrics::open(&output, resume_at, &r.run, serde_json::to_value(r)?)? } else { Metrics::disabled() };
    let batch_world = std::cell::Cell::new(comm.world());
    Ok(Ctx {
        model_spec: r.model.clone(),
        run: r.run.clone(),
        generation: r.generation.clone(),
        output,
        tok,
        template,
        tok_dir,
        metrics,
        fingerprint,
        comm: comm.into(),
        weight_shards: Default::default(),
        batch_world,
    })
}

/// Runs stages `first..` (the first of them from `mid`, a mid-stage checkpoint, when there is one); returns
/// each stage's (name, kind, held-out accuracy after).
fn run_stages(ctx: &Ctx, r: &recipe::Recipe, first: usize, mut model: Model, mid: Option<&Checkpoint>, kind: Kind, device: tch::Device) -> Result<Vec<(String, &'static str, f64)>> {
    if first >= r.stage.len() {
        eprintln!("all {} stage(s) already done in {}", r.stage.len(), ctx.output.display());
    }
    let mut summary = vec![];
    for i in first..r.stage.len() {
        let stage = &r.stage[i];
        let resume = if i == first { mid } else { None };
        model.net.set_gradient_checkpointing(stage.gradient_checkpointing());
        ctx.batch_world.set(ctx.comm.world());
        ctx.comm.broadcast_params(model.net.trainable().tensors())?;
        let acc = stage.run(ctx, i, &model, resume)?;
        crate::training::data_parallel::check_replicas(ctx, &model, &stage.name(i))?;
        summary.push((stage.name(i), stage.kind(), acc));
        // the next stage starts from this stage's saved result (identical bits; fresh autograd state)
        model = models::stage_start_model(ctx, i + 1, kind, device)?;
    }
    Ok(summary)
}

/// The table of held-out accuracy after each stage, and where the final model is.
fn print_summary(ctx: &Ctx, summary: &[(String, &'static str, f64)]) -> Result<()> {
    println!("\n| stage | kind | held-out accuracy after |\n|---|---|---:|");
    for (n, k, a) in summary {
        let a = if a.is_nan() { "–".to_string() } else { format!("{:.1}%", 100.0 * a) };
        println!("| {n} | {k} | {a} |");
    }
    let last = checkpoint::list(&ctx.output)?.into_iter().filter(|c| c.state.stage_complete).last();
    if let Some(c) = last {
        println!("\nfinal model: {}", c.model_dir().display());
    }
    Ok(())
}

/// The process's peak resident set (VmHWM in /proc/self/status), in GB; `None` off Linux.
fn peak_resident_gb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024.0 / 1e9)
}
