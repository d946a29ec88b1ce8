//! The recipe's run-wide tables, which every part of the trainer reads: `[model]`, `[run]`, `[generation]`, and
//! the problem sources and held-out evaluation that stages share. (The stage tables live with their stages,
//! in `stages/`; the file as a whole, its parsing and validation, in `recipe/`.)

mod eval;
mod generation;
mod model;
mod run;

pub use eval::{EvalSpec, SyntheticSpec};
pub use generation::{DecodeMode, GenerationSpec};
pub use model::{is_default, ModelSpec, UpdatePrecision, WeightUpdate};
#[cfg(test)]
pub use model::StateDtype;
pub use run::{check_run_id, NonFinite, RunSpec, Sharding};
