//! whet rewards: math answer verification, reward functions and reward plugins.
//!
//! This crate does not depend on libtorch.

pub mod math;
