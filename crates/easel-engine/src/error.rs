//! The engine's error type: every failure a user or a file can cause, as a one-line message.

use std::path::PathBuf;

/// Everything that can go wrong loading a model or generating an image.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A request parameter is out of range or inconsistent.
    #[error("invalid {param}: {message}")]
    InvalidParam { param: &'static str, message: String },
    /// A model directory lacks a file it needs.
    #[error("model is missing {path}: {hint}")]
    MissingFile { path: PathBuf, hint: String },
    /// A JSON config could not be read or does not describe what easel expects.
    #[error("{path}: {message}")]
    BadConfig { path: PathBuf, message: String },
    /// A weights file is truncated, corrupt, or does not fit the config.
    #[error("{path}: {message}")]
    BadWeights { path: PathBuf, message: String },
    /// The tokenizer could not be loaded or failed on the prompt.
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    /// A hub download failed, or the hub cannot be reached.
    #[error(transparent)]
    Hub(#[from] easel_hub::HubError),
    /// Something is not supported by this build or this model.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Writing or reading a user-named file failed.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// Encoding the output image failed.
    #[error("image encoding: {0}")]
    Image(String),
    /// The job was cancelled between denoising steps.
    #[error("canceled")]
    Canceled,
    /// A tensor operation failed (a bug or an out-of-memory condition, not bad input).
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
}

impl EngineError {
    pub(crate) fn param(param: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidParam { param, message: message.into() }
    }
}

/// Shorthand for engine results.
pub type Result<T> = std::result::Result<T, EngineError>;
