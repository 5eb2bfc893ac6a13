//! Weights on disk and in memory, one module per concern, none depending on a pipeline:
//!
//! - [`source`]: which files of a diffusers folder hold a component;
//! - this module: safetensors files (memory-mapped into a `VarBuilder`, or read whole), with
//!   errors that name the file;
//! - [`store`]: named dense-or-quantized weights and the linear layer over them;
//! - [`gguf`]: GGUF files into a store, and `easel models quantize`;
//! - [`keys`]: renaming between checkpoint layouts (diffusers, BFL, Stability's single files);
//! - [`lora`]: LoRA files mapped onto a model's weights and merged;
//! - [`single_file`]: SD fine-tunes published as one file, run through a config folder.
//!
//! Dependencies run one way: `lora` -> `keys` -> `store` <- `gguf`.

pub mod gguf;
pub mod keys;
pub mod lora;
pub mod single_file;
pub mod source;
pub mod store;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
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

/// Reads every tensor of a safetensors file onto the CPU.
pub fn read_tensors(path: &std::path::Path) -> Result<std::collections::HashMap<String, Tensor>> {
    if !path.exists() {
        return Err(EngineError::MissingFile { path: path.to_path_buf(), hint: "no such file".into() });
    }
    candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| bad_weights(path, &e))
}

/// The tensor names in a safetensors file's header (nothing else is read).
pub fn read_tensor_names(path: &std::path::Path) -> Result<Vec<String>> {
    // SAFETY: read-only mapping, as in `load_var_builder`.
    let file = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }.map_err(|e| bad_weights(path, &e))?;
    Ok(file.tensors().into_iter().map(|(name, _)| name).collect())
}

/// Reads `--init-latents`: the tensor named `latents` in a safetensors file.
pub fn read_latents(path: &std::path::Path) -> Result<Tensor> {
    let tensors = read_tensors(path)?;
    tensors.get("latents").cloned().ok_or_else(|| EngineError::BadWeights {
        path: path.to_path_buf(),
        message: "no tensor named `latents`".into(),
    })
}

/// Writes `--save-latents`: `latents` as the tensor named `latents`.
pub fn write_latents(path: &std::path::Path, latents: &Tensor) -> Result<()> {
    let map = std::collections::HashMap::from([("latents".to_string(), latents.clone())]);
    candle_core::safetensors::save(&map, path).map_err(|e| EngineError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })
}
