//! JSON Lines: one object per line, read lazily line by line. Blank lines are skipped (but counted, so row
//! numbers are line numbers).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::Arc;

use super::{RowIter, SourceRow};
use crate::error::{DataError, Result};

/// Rows of a JSONL file.
pub fn rows(path: &Path) -> Result<RowIter> {
    let f = File::open(path).map_err(|e| DataError::io(path, e))?;
    let file: Arc<str> = Arc::from(path.display().to_string());
    let path = path.to_path_buf();
    let mut reader = BufReader::with_capacity(1 << 20, f);
    let mut row = 0usize;
    let mut buf: Vec<u8> = Vec::new();
    let mut done = false;
    Ok(Box::new(std::iter::from_fn(move || loop {
        if done {
            return None;
        }
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) => {
                done = true;
                return None;
            }
            Ok(_) => {}
            Err(e) => {
                done = true;
                return Some(Err(DataError::io(&path, e)));
            }
        }
        row += 1;
        let line = match std::str::from_utf8(&buf) {
            Ok(l) => l,
            Err(e) => return Some(Err(DataError::Json { file: file.to_string(), row, msg: format!("not UTF-8: {e}") })),
        };
        let t = line.trim();
        if t.is_empty() {
            continue;
        }
        return Some(match serde_json::from_str::<serde_json::Value>(t) {
            Ok(serde_json::Value::Object(fields)) => Ok(SourceRow { file: file.clone(), row, fields }),
            Ok(_) => Err(DataError::Json { file: file.to_string(), row, msg: "expected a JSON object".into() }),
            Err(e) => Err(DataError::Json { file: file.to_string(), row, msg: e.to_string() }),
        });
    })))
}
