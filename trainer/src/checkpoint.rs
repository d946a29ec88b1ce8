//! Checkpoints: everything a stage needs to continue after a crash, written atomically.
//!
//! `OUTPUT/checkpoints/sNN-stepNNNNNNN/` (mid-stage) and `OUTPUT/checkpoints/sNN-final/` (stage done) hold
//! `model/` (Hugging Face layout), `optimizer.safetensors` (AdamW moments and step; mid-stage only) and
//! `state.json` (stage, step, data cursor, recipe fingerprint). A checkpoint is written into a `.tmp-*`
//! directory, fsynced, and renamed: a directory without the `.tmp-` prefix is complete by construction.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    /// Stage index (0-based) and name.
    pub stage: usize,
    pub stage_name: String,
    /// Optimizer steps done in this stage.
    pub step: usize,
    pub total_steps: usize,
    /// True for the checkpoint written when the stage ended.
    pub stage_complete: bool,
    /// Data cursor.
    pub sampler: Option<data::SamplerState>,
    /// Tokens trained on in this stage so far.
    pub tokens: u64,
    /// The recipe without harmless keys (see recipe::fingerprint), to refuse resuming a changed recipe.
    pub recipe: serde_json::Value,
    /// Stage-specific state to resume exactly (e.g. GRPO's sampling cursor and filters).
    #[serde(default)]
    pub extra: serde_json::Value,
    /// The number of data-parallel ranks whose global batch the stage trains with (1: one process).
    #[serde(default = "one_rank")]
    pub world_size: usize,
}

fn one_rank() -> usize {
    1
}

pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: TrainState,
}

impl Checkpoint {
    pub fn model_dir(&self) -> PathBuf {
        self.dir.join("model")
    }
    pub fn optimizer_path(&self) -> PathBuf {
        self.dir.join("optimizer.safetensors")
    }
}

pub fn root(output: &Path) -> PathBuf {
    output.join("checkpoints")
}

pub fn name(stage: usize, step: Option<usize>) -> String {
    match step {
        Some(s) => format!("s{stage:02}-step{s:07}"),
        None => format!("s{stage:02}-final"),
    }
}

/// Writes a checkpoint: `fill` writes the payload into the temporary directory, then state.json is added
/// and the directory renamed into place.
pub fn write(output: &Path, state: &TrainState, fill: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    let root = root(output);
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let final_name = name(state.stage, if state.stage_complete { None } else { Some(state.step) });
    let tmp = root.join(format!(".tmp-{final_name}-{}", std::process::id()));
    let dst = root.join(&final_name);
    model::weights::write_dir_atomic(&dst, &tmp, |d| {
        fill(d)?;
        model::weights::write_atomic(&d.join("state.json"), serde_json::to_string_pretty(state)?.as_bytes())?;
        Ok::<(), anyhow::Error>(())
    })
    .with_context(|| format!("writing checkpoint {}", dst.display()))?;
    Ok(dst)
}

fn read(dir: &Path) -> Result<Checkpoint> {
    let p = dir.join("state.json");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    let state: TrainState = serde_json::from_str(&text).with_context(|| format!("{}: not a valid checkpoint state", p.display()))?;
    Ok(Checkpoint { dir: dir.to_path_buf(), state })
}

/// Complete checkpoints, oldest first (by stage, then step, the stage-final one last). Leftover temporary
/// directories from an interrupted write are removed.
pub fn list(output: &Path) -> Result<Vec<Checkpoint>> {
    let root = root(output);
    let mut out = vec![];
    let Ok(rd) = std::fs::read_dir(&root) else { return Ok(out) };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(".tmp-") {
            let _ = std::fs::remove_dir_all(e.path());
            continue;
        }
        if e.path().join("state.json").is_file() {
            out.push(read(&e.path())?);
        }
    }
    out.sort_by_key(|c| (c.state.stage, c.state.stage_complete, c.state.step));
    Ok(out)
}

/// Loads the checkpoint at `path` (a checkpoint directory).
pub fn open(path: &Path) -> Result<Checkpoint> {
    read(path)
}

/// Deletes mid-stage checkpoints of `stage` beyond the newest `keep` (stage-final ones stay).
pub fn prune(output: &Path, stage: usize, keep: usize) -> Result<()> {
    let mut mids: Vec<Checkpoint> = list(output)?.into_iter().filter(|c| c.state.stage == stage && !c.state.stage_complete).collect();
    while mids.len() > keep {
        let c = mids.remove(0);
        std::fs::remove_dir_all(&c.dir).with_context(|| format!("removing {}", c.dir.display()))?;
    }
    Ok(())
}
