//! The machinery every stage uses and no stage owns: the context a stage runs in, the keys every trained stage
//! has and the optimizer they build (AdamW with its schedules, and how updates reach low-precision weights),
//! one optimizer step with its guards, checkpoints (format and writing), held-out accuracy, sampling through
//! the rollout engine, where the model and tokenizer come from, and data-parallel plumbing.

pub mod builtin_tokenizer;
pub mod checkpoint;
pub mod ctx;
pub mod data_parallel;
pub mod faults;
pub mod generate;
pub mod held_out;
pub mod memory;
pub mod models;
pub mod optim;
pub mod precision;
pub mod save;
pub mod shard_layout;
pub mod sharding;
pub mod stage_keys;
pub mod step;
pub mod weight_shards;

pub use ctx::Ctx;
pub use held_out::HeldOut;
pub use save::Progress;
pub(crate) use stage_keys::training_stage;
pub use stage_keys::{OptimArgs, TrainingKeys};
pub use step::Health;
