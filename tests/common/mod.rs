//! Helpers shared by the end-to-end tests that drive the `train` binary.
#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `train --recipe DIR/recipe.toml --output DIR/out`, optionally with a `WHET_TEST_KILL` fault point.
pub fn train(dir: &Path, kill: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_train"));
    c.args(["--recipe"]).arg(dir.join("recipe.toml")).args(["--output"]).arg(dir.join("out"));
    if let Some(k) = kill {
        c.env("WHET_TEST_KILL", k);
    }
    c.output().unwrap()
}

/// A directory `root/name` holding `recipe.toml` with `recipe`.
pub fn setup(root: &Path, name: &str, recipe: &str) -> PathBuf {
    let d = root.join(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("recipe.toml"), recipe).unwrap();
    d
}

/// The lines of `DIR/out/metrics.jsonl`.
pub fn metrics(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("out/metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The `[model]` table of the tiny random Qwen2 (byte tokenizer, CPU) that end-to-end recipes train.
pub const TINY_MODEL: &str = r#"
[model]
config = { model_type = "qwen2", vocab_size = 260, hidden_size = 32, intermediate_size = 64, num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2, max_position_embeddings = 256, tie_word_embeddings = true }
init_seed = 7
tokenizer = "builtin:bytes"
device = "cpu"
"#;

/// A recipe: [`TINY_MODEL`] followed by `rest` (`[run]` and `[[stage]]` tables).
pub fn tiny_recipe(rest: &str) -> String {
    format!("{TINY_MODEL}{rest}")
}

/// SFT on one-digit additions, then Rollout-DPO on 24 problems the SFT model gets partly right (`[run]` and
/// `[[stage]]` tables for [`tiny_recipe`]).
pub const ROLLOUT_DPO: &str = r#"
[run]
seed = 1
threads = 1
log_every = 5

[[stage]]
kind = "sft"
name = "sft"
synthetic = { count = 2000, arithmetic = { seed = 2, max_digits = 1, ops = ["add"] } }
tokenize = { max_length = 64 }
max_steps = 120
batch_size = 16
lr = 5e-3
warmup_steps = 10

[[stage]]
kind = "rollout_dpo"
name = "rdpo"
synthetic = { count = 24, start = 5000, arithmetic = { seed = 2, max_digits = 1, ops = ["add"] } }
num_samples = 6
temperature = 1.0
max_new_tokens = 6
pairs_per_problem = 2
max_steps = 3
batch_size = 4
lr = 1e-3
"#;
