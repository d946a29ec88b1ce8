//! [`Ctx`]: what every stage is given — the run-wide settings, the output directory, the tokenizer and chat
//! template, the metrics sink, the recipe's fingerprint for checkpoints, and the data-parallel communicator.

use data::{ChatTemplate, Tokenizer};
use std::path::PathBuf;

use crate::observe::metrics::Metrics;
use crate::settings::{GenerationSpec, ModelSpec, RunSpec};

/// What every stage needs.
pub struct Ctx {
    /// `[model]`.
    pub model_spec: ModelSpec,
    /// `[run]`.
    pub run: RunSpec,
    /// `[generation]`.
    pub generation: GenerationSpec,
    pub output: PathBuf,
    pub tok: Tokenizer,
    pub template: Option<ChatTemplate>,
    /// Directory holding the tokenizer files (copied into every saved model).
    pub tok_dir: PathBuf,
    pub metrics: Metrics,
    /// The recipe as checkpoints record it (`recipe::fingerprint`): a resumed run is compared against it.
    pub fingerprint: serde_json::Value,
    /// Data parallelism: this process's rank among the job's (a single process is rank 0 of 1).
    /// (Shared: sharded data parallelism's per-layer gradient hook holds it too.)
    pub comm: std::rc::Rc<dyn dist::Communicator>,
    /// ZeRO-3 (`[run] sharding = "full"`): the running stage's sharded weights (see training::sharding).
    pub weight_shards: std::cell::RefCell<Option<std::rc::Rc<crate::training::weight_shards::WeightShards>>>,
    /// The world size whose global batch the running stage keeps (see data_parallel::local_accum).
    pub batch_world: std::cell::Cell<usize>,
}
