//! Runs a recipe: resolve the model and tokenizer, decide where to resume, run the stages in order (each
//! starting from the previous stage's result), and print a summary.

use anyhow::{bail, Context, Result};
use data::{ChatTemplate, Tokenizer};
use model::Model;
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

use crate::checkpoint::{self, Checkpoint};
use crate::metrics::Metrics;
use crate::recipe::{self, Recipe, Stage};

/// What every stage needs.
pub struct Ctx {
    pub recipe: Recipe,
    pub output: PathBuf,
    pub tok: Tokenizer,
    pub template: Option<ChatTemplate>,
    /// Directory holding the tokenizer files (copied into every saved model).
    pub tok_dir: PathBuf,
    pub metrics: Metrics,
    pub fingerprint: serde_json::Value,
    /// Data parallelism: this process's rank among the job's (a single process is rank 0 of 1).
    pub comm: Box<dyn dist::Communicator>,
    /// The world size whose global batch the running stage keeps (see data_parallel::local_accum).
    pub batch_world: std::cell::Cell<usize>,
}

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
}

fn tokenizer_dir(r: &Recipe, output: &Path) -> Result<PathBuf> {
    match r.model.tokenizer.as_deref() {
        Some("builtin:bytes") => {
            let d = output.join("tokenizer");
            crate::builtin_tokenizer::write(&d)?;
            Ok(d)
        }
        Some(dir) => Ok(PathBuf::from(dir)),
        None => match &r.model.path {
            Some(p) if p.is_dir() => Ok(p.clone()),
            Some(p) => Ok(gguf_dir(p, output)),
            None => bail!("[model] needs `tokenizer`"),
        },
    }
}

/// The Hugging Face directory a `.gguf` `[model] path` converts to (once, on first use).
fn converted_gguf(gguf: &Path, output: &Path) -> Result<PathBuf> {
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
pub(crate) fn stage_start_model(ctx: &Ctx, index: usize, kind: Kind, device: Device) -> Result<Model> {
    if index == 0 {
        return base_model(&ctx.recipe, &ctx.output, kind, device);
    }
    let prev = checkpoint::list(&ctx.output)?
        .into_iter()
        .filter(|c| c.state.stage == index - 1 && c.state.stage_complete)
        .last()
        .with_context(|| format!("no final checkpoint of stage {} in {}", index, ctx.output.display()))?;
    Ok(Model::load(&prev.model_dir(), Some(kind), device)?)
}

/// The starting model of the first stage.
fn base_model(r: &Recipe, output: &Path, kind: Kind, device: Device) -> Result<Model> {
    if let Some(cfg) = &r.model.config {
        let cfg = model::ModelConfig::from_json(cfg.clone(), "[model.config]")?;
        return Ok(Model::random(&cfg, kind, device, r.model.init_seed));
    }
    let path = r.model.path.as_ref().context("[model] path")?;
    if path.is_file() {
        return Ok(Model::load(&converted_gguf(path, output)?, Some(kind), device)?);
    }
    Ok(Model::load(path, Some(kind), device)?)
}

/// Refuses a tokenizer with more ids than the model has embedding rows (an id past them would index out of
/// the embedding in the first forward), once for every stage kind.
fn check_vocabulary(ctx: &Ctx, model: &Model) -> Result<()> {
    let (ids, rows) = (ctx.tok.vocab_size() as i64, model.net.cfg.vocab_size);
    if ids > rows {
        let model_at = match (&ctx.recipe.model.path, &ctx.recipe.model.config) {
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

/// The dry-run plan: stages, steps, tokens and a memory estimate.
fn plan(r: &Recipe) -> String {
    let mut s = String::new();
    // the dtype weights are held in (fp32 under bf16 mixed precision)
    let device = model::runtime::parse_device(&r.model.device).unwrap_or(Device::Cpu);
    let kind = r.model.precision(device).map(|(k, _)| k).unwrap_or(Kind::Float);
    let precision = r.model.update_precision(r.run.seed);
    let params = r.model.config.as_ref().and_then(|c| model::ModelConfig::from_json(c.clone(), "").ok()).map(|c| c.num_parameters());
    let params = params.or_else(|| r.model.path.as_ref().filter(|p| p.is_dir()).and_then(|p| model::ModelConfig::from_path(p).ok()).map(|c| c.num_parameters()));
    if let Some(n) = params {
        let [w, extra, g, m] = crate::precision::bytes_per_parameter(kind, &precision);
        let gb = |b: usize| n as f64 * b as f64 / 1e9;
        s.push_str(&format!(
            "model: {:.1} M parameters; weights {:.2} GB, training state ≈ {:.2} GB before activations ({w} B weights + {extra} B {} + {g} B gradients + {m} B AdamW moments per parameter)\n",
            n as f64 / 1e6,
            gb(w),
            gb(w + extra + g + m),
            match crate::precision::Slot::kind_for(kind, precision.update) {
                Some(Kind::Float) => "fp32 master",
                Some(_) => "Kahan compensation",
                None => "update state",
            }
        ));
    }
    for (i, st) in r.stage.iter().enumerate() {
        match st {
            Stage::Sft(x) => {
                let steps = match x.max_steps {
                    Some(n) => format!("{n} steps"),
                    None => format!("{} epoch(s)", x.epochs),
                };
                let rows = x.synthetic.as_ref().map(|s| format!("{} synthetic conversations", s.count)).unwrap_or_else(|| {
                    x.data.as_ref().map(|d| d.path.display().to_string()).unwrap_or_default()
                });
                s.push_str(&format!(
                    "stage {} {:?} (sft): {rows}; {steps}; {} rows × {} micro-batches per step, ≤ {} tokens per row{}; lr {:.1e} {:?}\n",
                    i + 1,
                    st.name(i),
                    x.batch_size,
                    x.grad_accum,
                    x.tokenize.max_length,
                    if x.packing { " (packed)" } else { "" },
                    x.lr,
                    x.schedule
                ));
            }
            Stage::Dpo(x) => s.push_str(&format!("stage {} {:?} (dpo): {}\n", i + 1, st.name(i), x.plan())),
            Stage::RolloutDpo(x) => s.push_str(&format!("stage {} {:?} (rollout_dpo): {}\n", i + 1, st.name(i), x.plan())),
            Stage::Grpo(x) => s.push_str(&format!("stage {} {:?} (grpo): {}\n", i + 1, st.name(i), x.plan())),
        }
        s.push_str(&format!("  precision: {}\n", crate::precision::describe_resolution(kind, &precision, st.optim().lr)));
    }
    s
}

pub fn run(recipe_path: &Path, overrides: &[String], output: Option<PathBuf>, opts: Options) -> Result<()> {
    let (mut r, missing) = recipe::load_with(recipe_path, overrides, opts.dry_run)?;
    if let Some(o) = output {
        r.run.output_dir = o;
    }
    if opts.dry_run {
        println!("# resolved recipe\n{}", toml::to_string_pretty(&r).unwrap_or_default());
        for m in &missing {
            println!("# needed before a real run: {m}");
        }
        println!("# plan\n{}", plan(&r));
        return Ok(());
    }
    if let Some(t) = r.run.threads {
        tch::set_num_threads(t);
    }
    let device = model::runtime::parse_device(&r.model.device).map_err(anyhow::Error::msg)?;
    let (comm, device) = crate::launch::join(device)?;
    model::runtime::check_device(device).map_err(anyhow::Error::msg)?;
    let (kind, autocast) = r.model.precision(device)?;
    model::autocast::set_default(autocast);
    eprintln!("whet {}: {}", env!("CARGO_PKG_VERSION"), model::runtime::describe(device));
    if let Some(a) = autocast {
        eprintln!("mixed precision: fp32 weights and optimizer state, {a:?} autocast in forward passes");
    } else if kind != Kind::Float {
        let p = r.model.update_precision(r.run.seed);
        let [w, extra, g, m] = crate::precision::bytes_per_parameter(kind, &p);
        eprintln!(
            "precision: {kind:?} weights, weight_update = \"{}\", AdamW moments in {:?} ({} bytes of training state per parameter)",
            p.update.name(),
            p.state.kind(),
            w + extra + g + m
        );
    }
    // data parallel: rank 0 prepares the shared files (tokenizer, converted GGUF, metrics) first
    if !comm.is_main() {
        comm.barrier()?;
    }
    let output = r.run.output_dir.clone();
    std::fs::create_dir_all(&output).with_context(|| format!("creating {}", output.display()))?;
    let fingerprint = recipe::fingerprint(&r);

    // Where to start.
    let ckpt: Option<Checkpoint> = match &opts.resume {
        Resume::Never => None,
        Resume::Auto => {
            let (c, warnings) = checkpoint::latest_intact(&output);
            if comm.is_main() {
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
        recipe::differences(&c.state.recipe, &fingerprint, "", &mut diffs);
        if !diffs.is_empty() && !opts.force {
            bail!(
                "{} was written by a different recipe (changed: {}); resuming would not reproduce the run. \
                 Use another --output, --resume never to start over, or --force to resume anyway",
                c.dir.display(),
                diffs.join(", ")
            );
        }
    }
    let resume_at = ckpt.as_ref().map(|c| (c.state.stage, c.state.step));
    // a GGUF model brings its tokenizer: convert it before the tokenizer is read
    if let Some(p) = r.model.path.as_ref().filter(|p| p.is_file()) {
        converted_gguf(p, &output)?;
    }
    let tok_dir = tokenizer_dir(&r, &output)?;
    let (tok, template) = Tokenizer::from_dir(&tok_dir).with_context(|| format!("loading the tokenizer from {}", tok_dir.display()))?;
    let metrics = if comm.is_main() { Metrics::open(&output, resume_at, &r)? } else { Metrics::disabled() };
    let batch_world = std::cell::Cell::new(comm.world());
    let ctx = Ctx { recipe: r.clone(), output: output.clone(), tok, template, tok_dir, metrics, fingerprint, comm, batch_world };

    let (first, mut model, mid) = match &ckpt {
        None => (0, base_model(&r, &output, kind, device)?, None),
        Some(c) if c.state.stage_complete => (c.state.stage + 1, Model::load(&c.model_dir(), Some(kind), device)?, None),
        Some(c) => (c.state.stage, Model::load(&c.model_dir(), Some(kind), device)?, Some(c)),
    };
    if ctx.comm.is_main() {
        ctx.comm.barrier()?;
    }
    check_vocabulary(&ctx, &model)?;
    if first >= r.stage.len() {
        eprintln!("all {} stage(s) already done in {}", r.stage.len(), output.display());
    }
    let mut summary = vec![];
    for i in first..r.stage.len() {
        let resume = if i == first { mid } else { None };
        model.net.set_gradient_checkpointing(r.stage[i].gradient_checkpointing());
        ctx.batch_world.set(ctx.comm.world());
        ctx.comm.broadcast_params(model.net.params.tensors())?;
        let acc = match &r.stage[i] {
            Stage::Sft(s) => crate::sft::run(&ctx, i, s, &model, resume)?,
            Stage::Dpo(s) => crate::dpo::run(&ctx, i, s, &model, resume)?,
            Stage::RolloutDpo(s) => crate::dpo::run_rollout(&ctx, i, s, &model, resume)?,
            Stage::Grpo(s) => crate::grpo::run(&ctx, i, s, &model, resume)?,
        };
        crate::data_parallel::check_replicas(&ctx, &model, &r.stage[i].name(i))?;
        summary.push((r.stage[i].name(i), r.stage[i].kind(), acc));
        // the next stage starts from this stage's saved result (identical bits; fresh autograd state)
        model = stage_start_model(&ctx, i + 1, kind, device)?;
    }
    ctx.metrics.finish();
    if !summary.is_empty() && ctx.comm.is_main() {
        println!("\n| stage | kind | held-out accuracy after |\n|---|---|---:|");
        for (n, k, a) in &summary {
            let a = if a.is_nan() { "–".to_string() } else { format!("{:.1}%", 100.0 * a) };
            println!("| {n} | {k} | {a} |");
        }
        let last = checkpoint::list(&output)?.into_iter().filter(|c| c.state.stage_complete).last();
        if let Some(c) = last {
            println!("\nfinal model: {}", c.model_dir().display());
        }
    }
    Ok(())
}
