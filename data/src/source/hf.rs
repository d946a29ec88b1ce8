//! The Hugging Face datasets layout: a directory whose split files are found, in this order of preference, at
//! `data/<split>-*.{parquet,jsonl,json}`, `<split>-*.{…}`, `<split>/*.{…}`, `data/<split>.{…}` or `<split>.{…}`
//! (the last matches `gsm8k/train.jsonl`). Shards are read in name order.

use std::path::{Path, PathBuf};

use crate::config::Format;
use crate::error::{DataError, Result};

fn format_of(p: &Path) -> Option<Format> {
    let n = p.file_name()?.to_str()?.to_ascii_lowercase();
    if n.ends_with(".parquet") {
        Some(Format::Parquet)
    } else if n.ends_with(".jsonl") || n.ends_with(".ndjson") {
        Some(Format::Jsonl)
    } else if n.ends_with(".json") {
        Some(Format::Auto)
    } else {
        None
    }
}

fn list(dir: &Path, pred: impl Fn(&str) -> bool) -> Vec<(PathBuf, Format)> {
    let Ok(rd) = std::fs::read_dir(dir) else { return vec![] };
    let mut out: Vec<(PathBuf, Format)> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).map(&pred).unwrap_or(false))
        .filter_map(|p| format_of(&p).map(|f| (p, f)))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn stem(n: &str) -> &str {
    n.split('.').next().unwrap_or(n)
}

/// The files of `split` under `dir`.
pub fn split_files(dir: &Path, split: &str) -> Result<Vec<(PathBuf, Format)>> {
    if !dir.is_dir() {
        return Err(DataError::io(dir, std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory")));
    }
    let shard = |n: &str| n.starts_with(&format!("{split}-"));
    let exact = |n: &str| stem(n) == split;
    let candidates = [
        list(&dir.join("data"), shard),
        list(dir, shard),
        list(&dir.join(split), |_| true),
        list(&dir.join("data"), exact),
        list(dir, exact),
    ];
    for c in candidates {
        if !c.is_empty() {
            return Ok(c);
        }
    }
    Err(DataError::Config(format!(
        "{}: no files for split `{split}` (looked for data/{split}-*.parquet, {split}-*.*, {split}/*, {split}.jsonl)",
        dir.display()
    )))
}
