//! A TOML recipe: `[model]`, `[run]`, `[generation]` and an ordered list of `[[stage]]` tables.
//!
//! Every key has a doc comment and a default (the run-wide tables in `settings/`, each stage kind's in its
//! module under `stages/`); unknown keys are refused with a did-you-mean, and all the problems of a recipe are
//! reported together with file:line (`parse`, `validate`).

mod file;
mod parse;
mod validate;

pub use file::{differences, fingerprint, Recipe};
pub use parse::load_with;

