//! Metrics: one JSON object per line in `OUTPUT/metrics.jsonl`, plus a short human line on stderr.

use anyhow::{Context, Result};
use serde_json::{Map, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::settings::RunSpec;

pub struct Metrics {
    /// None: this process does not log (a data-parallel rank other than 0).
    path: Option<PathBuf>,
    tensorboard: Option<std::sync::Mutex<super::tensorboard::EventWriter>>,
    wandb: Option<super::wandb::Wandb>,
}

impl Metrics {
    /// Opens `OUTPUT/metrics.jsonl`. When resuming at (`stage`, `step`), lines logged after that point by
    /// the interrupted run are dropped so the file reads as one uninterrupted run. TensorBoard and W&B
    /// follow `[run] report_to` (see `super::wandb`); `config` is the recipe, for the W&B run's config.
    pub fn open(output: &Path, resume_at: Option<(usize, usize)>, run: &RunSpec, config: Value) -> Result<Metrics> {
        let to = super::wandb::destinations(run, output, resume_at.is_some())?;
        std::fs::create_dir_all(output).with_context(|| format!("creating {}", output.display()))?;
        let path = output.join("metrics.jsonl");
        match resume_at {
            Some((stage, step)) if path.exists() => {
                let text = std::fs::read_to_string(&path)?;
                let kept: Vec<&str> = text
                    .lines()
                    .filter(|l| {
                        let v: Value = serde_json::from_str(l).unwrap_or(Value::Null);
                        let s = v["stage"].as_u64().unwrap_or(0) as usize;
                        let t = v["step"].as_u64().unwrap_or(0) as usize;
                        s < stage || (s == stage && t <= step)
                    })
                    .collect();
                let mut body = kept.join("\n");
                if !body.is_empty() {
                    body.push('\n');
                }
                model::weights::write_atomic(&path, body.as_bytes())?;
            }
            // a fresh start: the previous run's lines are kept, under the next free metrics.jsonl.N
            None if path.exists() => {
                let n = (1..).find(|n| !output.join(format!("metrics.jsonl.{n}")).exists()).unwrap_or(1);
                let kept = output.join(format!("metrics.jsonl.{n}"));
                std::fs::rename(&path, &kept).with_context(|| format!("moving {} to {}", path.display(), kept.display()))?;
                eprintln!("the previous run's metrics.jsonl is now {}", kept.display());
            }
            _ => {}
        }
        let tensorboard = match super::tensorboard::EventWriter::create(&output.join("tensorboard")) {
            _ if !to.tensorboard => None,
            Ok(w) => {
                eprintln!("TensorBoard events: {}", w.path.display());
                Some(std::sync::Mutex::new(w))
            }
            Err(e) => {
                eprintln!("warning: no TensorBoard events ({e})");
                None
            }
        };
        let wandb = match to.wandb {
            Some(s) => Some(super::wandb::Wandb::start(s, config, output)?),
            None => None,
        };
        Ok(Metrics { path: Some(path), tensorboard, wandb })
    }

    /// Metrics that go nowhere (data-parallel ranks other than 0: rank 0 logs the reduced values).
    pub fn disabled() -> Metrics {
        Metrics { path: None, tensorboard: None, wandb: None }
    }

    /// Marks the W&B run (if any) finished; without this call it is marked failed when dropped.
    pub fn finish(&self) {
        if let Some(w) = &self.wandb {
            w.finish(0);
        }
    }

    pub fn log(&self, record: Map<String, Value>) -> Result<()> {
        let Some(path) = &self.path else { return Ok(()) };
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        writeln!(f, "{}", Value::Object(record.clone()))?;
        if let Some(tb) = &self.tensorboard {
            // scalars as `<stage name>/<key>` at the stage's step
            let stage = record.get("stage_name").and_then(|v| v.as_str()).map(String::from).unwrap_or_else(|| format!("stage{}", record.get("stage").and_then(|v| v.as_u64()).unwrap_or(0)));
            let step = record.get("step").and_then(|v| v.as_i64()).unwrap_or(0);
            let values: Vec<(String, f64)> = record
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "stage" | "step" | "stage_name"))
                .filter_map(|(k, v)| v.as_f64().map(|x| (format!("{stage}/{k}"), x)))
                .collect();
            if let Ok(mut w) = tb.lock() {
                if let Err(e) = w.scalars(step, &values) {
                    eprintln!("warning: writing TensorBoard events: {e}");
                }
            }
        }
        if let Some(w) = &self.wandb {
            w.log(&record);
        }
        Ok(())
    }
}

/// A JSON object (for metrics records).
pub fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}
