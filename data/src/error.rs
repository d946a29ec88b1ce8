//! Typed errors. Every error about user data names the file, the row (1-based: the line of a JSONL file, the
//! row of a Parquet file across row groups) and the column.

use std::path::PathBuf;

/// Result with [`DataError`].
pub type Result<T, E = DataError> = std::result::Result<T, E>;

/// Everything that can go wrong in the data crate.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A row does not fit the expected shape.
    #[error("{file}: row {row}: column `{column}`: {msg}")]
    Row { file: String, row: usize, column: String, msg: String },
    /// A line or file is not valid JSON.
    #[error("{file}: row {row}: invalid JSON: {msg}")]
    Json { file: String, row: usize, msg: String },
    /// A whole JSON file is not valid (or not an array of objects).
    #[error("{file}: invalid JSON: {msg}")]
    JsonFile { file: String, msg: String },
    /// The Parquet reader failed (bad file, unsupported column type).
    #[error("{file}: parquet: {msg}")]
    Parquet { file: String, msg: String },
    /// The configuration is inconsistent.
    #[error("data config: {0}")]
    Config(String),
    /// A chat template failed to compile or render.
    #[error("chat template: {0}")]
    Template(String),
    /// A tokenizer failed to load or encode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A sampler was misused or its state does not match the data.
    #[error("sampler: {0}")]
    Sampler(String),
    /// Processing one record failed (1-based index in the record list).
    #[error("record {index}: {source}")]
    Record { index: usize, source: Box<DataError> },
    /// Packing failed (e.g. an example longer than the row).
    #[error("pack: {0}")]
    Pack(String),
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io { path: path.into(), source }
    }
    pub(crate) fn row(file: &str, row: usize, column: &str, msg: impl Into<String>) -> Self {
        DataError::Row { file: file.to_string(), row, column: column.to_string(), msg: msg.into() }
    }
}
