//! What a run reports: `metrics.jsonl` and its sinks (TensorBoard event files, Weights & Biases), each stage's
//! SVG curves, and the progress bar. Nothing here knows a stage kind; stages hand it JSON records.

pub mod metrics;
pub mod plot;
pub mod progress;
pub mod tensorboard;
pub mod wandb;
