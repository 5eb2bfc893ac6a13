//! Loading one component's safetensors into a `VarBuilder`, with errors that name the file.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::error::{EngineError, Result};

/// Memory-maps and validates a component's weight files.
pub fn load_var_builder(files: &[PathBuf], dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    for f in files {
        // Parses the header and checks the data length, so a truncated or corrupt file is named here.
        // SAFETY: the mapping is read-only; a file changed underneath us is a user error candle also accepts.
        unsafe { candle_core::safetensors::MmapedSafetensors::new(f) }.map_err(|e| bad_weights(f, &e))?;
    }
    // SAFETY: as above.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }
        .map_err(|e| bad_weights(files.first().map(PathBuf::as_path).unwrap_or(Path::new("?")), &e))?;
    Ok(vb)
}

/// A weights error for `path`, with candle's message trimmed to its first line.
pub fn bad_weights(path: &Path, e: &dyn std::fmt::Display) -> EngineError {
    let message = e.to_string();
    let first = message.lines().next().unwrap_or_default().to_string();
    let lower = first.to_lowercase();
    let message = if lower.contains("incomplete") {
        "truncated or corrupt safetensors file (data shorter than its header says)".to_string()
    } else if lower.contains("header") || lower.contains("deserializ") || lower.contains("safetensor") {
        // candle repeats the path in its message; the path is already in front of ours.
        let detail = first.rsplit(": ").next().unwrap_or(&first);
        format!("truncated or corrupt safetensors file ({detail})")
    } else {
        first
    };
    EngineError::BadWeights { path: path.to_path_buf(), message }
}
