//! Metrics: one JSON object per line in `OUTPUT/metrics.jsonl`, plus a short human line on stderr.

use anyhow::{Context, Result};
use serde_json::{Map, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct Metrics {
    path: PathBuf,
}

impl Metrics {
    /// Opens `OUTPUT/metrics.jsonl`. When resuming at (`stage`, `step`), lines logged after that point by
    /// the interrupted run are dropped so the file reads as one uninterrupted run.
    pub fn open(output: &Path, resume_at: Option<(usize, usize)>) -> Result<Metrics> {
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
            None if path.exists() => std::fs::remove_file(&path)?,
            _ => {}
        }
        Ok(Metrics { path })
    }

    pub fn log(&self, record: Map<String, Value>) -> Result<()> {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?;
        writeln!(f, "{}", Value::Object(record))?;
        Ok(())
    }
}
