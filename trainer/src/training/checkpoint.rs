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

    /// What is wrong with the checkpoint's files, if anything: the model's config.json and weight files
    /// (every safetensors file's size against its header), and a mid-stage checkpoint's optimizer state.
    pub fn damage(&self) -> Option<String> {
        let model = self.model_dir();
        // a whole model's config.json, or (LoRA) the adapter's adapter_config.json
        let config = if model::lora::is_adapter_dir(&model) { model::lora::CONFIG_FILE } else { "config.json" };
        if let Err(e) = std::fs::read_to_string(model.join(config)).map_err(|e| e.to_string()).and_then(|t| serde_json::from_str::<serde_json::Value>(&t).map_err(|e| e.to_string())) {
            return Some(format!("model/{config}: {e}"));
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(&model)
            .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "safetensors")).collect())
            .unwrap_or_default();
        if files.is_empty() {
            return Some("model/ has no .safetensors file".into());
        }
        if !self.state.stage_complete {
            files.push(self.optimizer_path());
        }
        files.iter().find_map(|f| check_safetensors(f).err().map(|e| format!("{}: {e}", f.strip_prefix(&self.dir).unwrap_or(f).display())))
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
/// directories from an interrupted write are removed; a directory whose state.json does not parse is left
/// out (see [`scan`]).
pub fn list(output: &Path) -> Result<Vec<Checkpoint>> {
    Ok(scan(output).0)
}

/// Like [`list`], and the directories left out with what is wrong with their state.json.
pub fn scan(output: &Path) -> (Vec<Checkpoint>, Vec<(PathBuf, String)>) {
    let root = root(output);
    let (mut out, mut bad) = (vec![], vec![]);
    let Ok(rd) = std::fs::read_dir(&root) else { return (out, bad) };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(".tmp-") {
            let _ = std::fs::remove_dir_all(e.path());
            continue;
        }
        if name.starts_with('.') || !e.path().is_dir() {
            continue;
        }
        match read(&e.path()) {
            Ok(c) => out.push(c),
            Err(err) => bad.push((e.path(), format!("{err:#}"))),
        }
    }
    out.sort_by_key(|c| (c.state.stage, c.state.stage_complete, c.state.step));
    (out, bad)
}

/// The newest checkpoint whose files are intact, and a warning line for each damaged one passed over (or
/// seen: a state.json that does not parse cannot be placed in order).
pub fn latest_intact(output: &Path) -> (Option<Checkpoint>, Vec<String>) {
    let (mut all, bad) = scan(output);
    let mut warnings: Vec<String> = bad.iter().map(|(d, why)| format!("checkpoint {} is damaged ({why}); not resuming from it", d.display())).collect();
    while let Some(c) = all.pop() {
        match c.damage() {
            None => return (Some(c), warnings),
            Some(why) => warnings.push(format!("checkpoint {} is damaged ({why}); resuming from an older one", c.dir.display())),
        }
    }
    (None, warnings)
}


/// Checks a safetensors file's framing: an 8-byte header length, a JSON header, and exactly as many data
/// bytes as the header's largest offset (a truncated or padded file fails).
fn check_safetensors(path: &Path) -> std::result::Result<(), String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| format!("{len} bytes: too short for a header"))?;
    let n = u64::from_le_bytes(n);
    if n > len.saturating_sub(8) {
        return Err(format!("header of {n} bytes in a {len}-byte file"));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| e.to_string())?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header).map_err(|e| format!("header is not JSON: {e}"))?;
    let end = header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .filter_map(|(_, v)| v.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    if 8 + n + end != len {
        return Err(format!("{len} bytes where the header describes {}", 8 + n + end));
    }
    Ok(())
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
