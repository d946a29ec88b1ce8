//! In-process generation engine: batched, KV-cached sampling from the model being trained (same tensors, no
//! weight synchronisation), with group prefix sharing, per-request sampling parameters, log-probabilities
//! under both the sampled and the unmodified distribution, and counter-based seeding.
//!
//! ```ignore
//! let engine = Engine::new(&model.net, EngineConfig { eos_token_ids: vec![eos], ..Default::default() })?;
//! let out = engine.generate(&[Request { prompt_ids, n: 8, params: SamplingParams::default() }])?;
//! ```

pub mod engine;
pub mod error;
pub mod params;
pub mod rng;
pub mod sampler;
pub mod stop;

pub use engine::{Engine, EngineConfig, FnDecoder, GenerateStats};
pub use error::{Result, RolloutError};
pub use params::{Completion, FinishReason, Request, SamplingParams};
pub use stop::TokenDecoder;
