//! A JSON file holding one array of objects (read whole). Rows are numbered from 1 by array index.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;
use std::sync::Arc;

use super::{RowIter, SourceRow};
use crate::config::Format;
use crate::error::{DataError, Result};

/// Rows of a JSON-array file.
pub fn rows(path: &Path) -> Result<RowIter> {
    let f = File::open(path).map_err(|e| DataError::io(path, e))?;
    let file: Arc<str> = Arc::from(path.display().to_string());
    let v: serde_json::Value = serde_json::from_reader(BufReader::new(f))
        .map_err(|e| DataError::JsonFile { file: file.to_string(), msg: e.to_string() })?;
    let items = match v {
        serde_json::Value::Array(a) => a,
        _ => {
            return Err(DataError::JsonFile {
                file: file.to_string(),
                msg: "expected a top-level array of objects (use format = \"jsonl\" for JSON Lines)".into(),
            })
        }
    };
    Ok(Box::new(items.into_iter().enumerate().map(move |(i, v)| match v {
        serde_json::Value::Object(fields) => Ok(SourceRow { file: file.clone(), row: i + 1, fields }),
        _ => Err(DataError::Json { file: file.to_string(), row: i + 1, msg: "expected a JSON object".into() }),
    })))
}

/// A `.json` file is an array when its first non-blank byte is `[`, otherwise JSON Lines.
pub fn sniff(path: &Path) -> Result<Format> {
    let mut f = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut buf = [0u8; 512];
    let n = f.read(&mut buf).map_err(|e| DataError::io(path, e))?;
    let first = buf[..n].iter().find(|b| !b.is_ascii_whitespace() && **b != 0xEF && **b != 0xBB && **b != 0xBF);
    Ok(if first == Some(&b'[') { Format::Json } else { Format::Jsonl })
}
