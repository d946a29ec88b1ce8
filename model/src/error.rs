//! Typed errors of the model crate. Every message names the file (or key) and what was expected.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {msg}")]
    Config { path: String, msg: String },
    #[error("{path}: {msg}")]
    Weights { path: String, msg: String },
    #[error("{path}: {msg}")]
    Gguf { path: String, msg: String },
    #[error("{path}: {msg}")]
    Tokenizer { path: String, msg: String },
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("{0}")]
    Other(String),
}

impl ModelError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io { path: path.display().to_string(), source }
    }
    pub fn weights(path: &Path, msg: impl Into<String>) -> Self {
        ModelError::Weights { path: path.display().to_string(), msg: msg.into() }
    }
}

pub type Result<T> = std::result::Result<T, ModelError>;
