//! whet rewards: math answer verification, reward functions and reward plugins.
//!
//! This crate does not depend on libtorch.
//!
//! * [`math::verify`] / [`math::extract_answer`]: answer extraction and equivalence.
//! * [`reward::RewardSet`]: recipe-configured reward terms scoring batches of [`reward::Sample`]s.
//! * [`plugin`]: native, exec (JSON lines) and http reward plugins.
//! * [`run_verify_cli`]: the `verify` command line (also behind `train verify`).

pub mod cli;
pub mod math;
pub mod plugin;
pub mod reward;

pub use cli::run_verify_cli;
pub use reward::{BatchScores, RewardConfig, RewardSet, Sample};
