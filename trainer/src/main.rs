//! `train`: the whet command line.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

// Top to bottom, each part uses only those below it (the layout test in `layout_check` keeps it so):
mod cli; // the subcommands
mod recipe; // the recipe file: parsing, validation, fingerprint
mod stages; // the stage kinds: sft, dpo, rollout_dpo, grpo
mod training; // the machinery every stage uses: context, optimizer, steps, checkpoints, data parallelism
mod observe; // metrics, TensorBoard, W&B, plots, progress
mod algo; // pure algorithms: log-prob passes, policy-gradient pieces, preference losses
mod settings; // the run-wide recipe tables

#[derive(Parser)]
#[command(name = "train", version, about = "whet: RL post-training for small language models")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// The recipe to run (TOML).
    #[arg(long)]
    recipe: Option<PathBuf>,
    /// Override a recipe key, e.g. `--set stage.0.lr=1e-4` or `--set run.seed=3` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Where to continue from: auto (the latest complete checkpoint in the output directory), never, or a
    /// checkpoint directory.
    #[arg(long, default_value = "auto")]
    resume: cli::run::Resume,
    /// Resume even when the recipe changed since the checkpoint.
    #[arg(long)]
    force: bool,
    /// Print the resolved recipe and the plan (with the per-rank memory plan for the world size that
    /// `--nproc-per-node` × `--nnodes` give), then exit.
    #[arg(long)]
    dry_run: bool,
    /// With --dry-run: each rank's accelerator memory (e.g. 80GB); the memory plan says whether each stage fits.
    #[arg(long, value_name = "SIZE")]
    gpu_memory: Option<String>,
    /// With --dry-run: read the model's shape from this config.json (when the model directory is not there
    /// yet), e.g. recipes/configs/phi4-mini-instruct-shape.json.
    #[arg(long, value_name = "FILE")]
    model_config: Option<PathBuf>,
    /// Output directory (overrides run.output_dir).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Device for subcommands: cpu, cuda, cuda:N or auto (recipes set [model] device).
    #[arg(long, global = true, default_value = "auto")]
    device: String,
    /// Intra-op CPU threads for libtorch (default: libtorch's choice).
    #[arg(long, global = true)]
    threads: Option<i32>,
    #[command(flatten)]
    launch: cli::launch::LaunchArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Build a tiny random model and generate from it: checks that libtorch works on this machine.
    Smoke {
        /// Tokens to generate.
        #[arg(long, default_value_t = 32)]
        tokens: i64,
        #[arg(long, default_value_t = 0)]
        seed: i64,
    },
    /// Evaluate a model on math problems: pass@1, pass@k and maj@k over seeds, per-problem JSONL.
    Eval(Box<cli::eval::EvalArgs>),
    /// Judge answers with the math verifier: JSON lines with `gold` and `pred` in, one verdict per line out
    /// (`train verify --input FILE.jsonl`; `train verify --help` for options).
    #[command(disable_help_flag = true)]
    Verify {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Print every recipe key with its type, default and meaning (a Markdown table).
    RecipeKeys,
    /// Merge a PEFT LoRA adapter into its base model and write a whole Hugging Face model.
    MergeLora {
        /// The base model directory the adapter was trained on.
        #[arg(long)]
        base: PathBuf,
        /// The adapter directory (adapter_config.json, adapter_model.safetensors): a whet checkpoint's model/
        /// under `[model] lora`, or one saved by peft.
        #[arg(long)]
        adapter: PathBuf,
        /// Where to write the merged model.
        #[arg(long)]
        out: PathBuf,
        /// dtype of the saved weights (default: the base's torch_dtype).
        #[arg(long)]
        dtype: Option<String>,
    },
    /// Convert a model from another format.
    Convert {
        #[command(subcommand)]
        what: Convert,
    },
}

#[derive(Subcommand)]
enum Convert {
    /// A llama.cpp GGUF file (F32, F16, BF16, Q8_0, Q4_0, Q4_1) to a Hugging Face directory (float32).
    Gguf { file: PathBuf, out_dir: PathBuf },
}

fn main() {
    // Before any other torch call: CUDA hooks register only if libtorch_cuda.so is loaded first.
    model::runtime::preload_cuda();
    if let Err(e) = run() {
        eprintln!("error: {}", format_chain(&e));
        std::process::exit(1);
    }
}

fn format_chain(e: &anyhow::Error) -> String {
    e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ")
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    if let Some(t) = cli.threads {
        if t < 1 {
            bail!("--threads must be at least 1, got {t}");
        }
        tch::set_num_threads(t);
    }
    if let Some(n) = cli.launch.nproc_per_node.filter(|_| !cli.dry_run) {
        if dist::WorkerEnv::read()?.is_none() {
            return cli::launch::agent(&cli.launch, n);
        }
        // RANK / WORLD_SIZE are set: torchrun or a cluster wrapper started us; we are one of its workers
    }
    if matches!(cli.command, Some(Command::RecipeKeys)) {
        print!("{}", cli::recipe_keys::table());
        return Ok(());
    }
    if let Some(recipe) = &cli.recipe {
        if cli.command.is_some() {
            bail!("--recipe runs a recipe; it cannot be combined with a subcommand");
        }
        return cli::run::run(recipe, &cli.overrides, cli.output.clone(), cli::run::Options {
            resume: cli.resume.clone(),
            force: cli.force,
            dry_run: cli.dry_run,
            world: cli.launch.nproc_per_node.unwrap_or(1) * cli.launch.nnodes,
            gpu_memory: cli.gpu_memory.as_deref().map(cli::plan::parse_gpu_memory).transpose()?,
            model_config: cli.model_config.clone(),
        });
    }
    let device = model::runtime::parse_device(&cli.device).map_err(anyhow::Error::msg)?;
    model::runtime::check_device(device).map_err(anyhow::Error::msg)?;
    eprintln!("whet {}: {}", env!("CARGO_PKG_VERSION"), model::runtime::describe(device));
    match cli.command {
        Some(Command::Smoke { tokens, seed }) => cli::smoke::run(device, tokens, seed),
        Some(Command::RecipeKeys) => unreachable!("handled above"),
        Some(Command::Verify { args }) => rewards::run_verify_cli(args),
        Some(Command::Convert { what: Convert::Gguf { file, out_dir } }) => {
            let t = std::time::Instant::now();
            model::gguf::convert_to_hf(&file, &out_dir)
                .with_context(|| format!("converting {}", file.display()))?;
            eprintln!("wrote {} in {:.1} s", out_dir.display(), t.elapsed().as_secs_f64());
            Ok(())
        }
        Some(Command::Eval(args)) => cli::eval::run(*args, device),
        Some(Command::MergeLora { base, adapter, out, dtype }) => cli::merge_lora::run(&base, &adapter, &out, dtype.as_deref(), device),
        None => bail!("nothing to do: give --recipe FILE.toml, or try `train smoke` or `train --help`"),
    }
}
