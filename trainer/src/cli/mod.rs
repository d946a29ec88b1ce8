//! The subcommands: running a recipe (`run`, with `--dry-run`'s `plan`), `eval`, `merge-lora`, `recipe-keys`, `smoke`, and
//! the `--nproc-per-node` launcher (`launch`). `convert` and `verify` call the model and rewards crates
//! directly from `main.rs`.

pub mod eval;
pub mod launch;
pub mod merge_lora;
pub mod plan;
pub mod recipe_keys;
pub mod run;
pub mod smoke;
