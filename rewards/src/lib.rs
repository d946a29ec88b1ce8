//! whet rewards: math answer verification, reward functions and reward plugins.
//!
//! This crate does not depend on libtorch.

pub mod cli;
pub mod math;

pub use cli::run_verify_cli;
