//! Weights on disk and in memory, one module per concern, none depending on a pipeline:
//!
//! - [`source`]: which files of a diffusers folder hold a component;
//! - this module: safetensors files read into memory once (into a `VarBuilder`, or as tensors),
//!   with errors that name the file;
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

/// Reads and validates a component's weight files (see [`read_tensors`]: in memory once, not
/// mapped and copied); the builder converts each tensor to `dtype` as a layer takes it.
pub fn load_var_builder(files: &[PathBuf], dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    let mut tensors = std::collections::HashMap::new();
    for f in files {
        tensors.extend(read_tensors(f)?);
    }
    Ok(VarBuilder::from_tensors(tensors, dtype, device))
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
///
/// Each tensor is read (`pread`, several at once) straight into the buffer the tensor then
/// owns, so the weights are in memory once. Memory-mapping and copying, as candle's `load`
/// does, keeps the mapped pages resident beside the copy until the map is dropped, doubling
/// the peak resident memory of a load; reading from the page cache is as fast.
pub fn read_tensors(path: &std::path::Path) -> Result<std::collections::HashMap<String, Tensor>> {
    use rayon::prelude::*;
    use std::os::unix::fs::FileExt;

    let file = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => EngineError::MissingFile { path: path.to_path_buf(), hint: "no such file".into() },
        _ => EngineError::Io { path: path.to_path_buf(), source: e },
    })?;
    let io = |source: std::io::Error| EngineError::Io { path: path.to_path_buf(), source };
    let file_len = file.metadata().map_err(io)?.len() as usize;
    let corrupt = |detail: String| EngineError::BadWeights { path: path.to_path_buf(), message: format!("truncated or corrupt safetensors file ({detail})") };

    let mut len_bytes = [0u8; 8];
    file.read_exact_at(&mut len_bytes, 0).map_err(|_| corrupt("shorter than its 8-byte header length".into()))?;
    let header_len = usize::try_from(u64::from_le_bytes(len_bytes)).unwrap_or(usize::MAX);
    if header_len > 100_000_000 || 8 + header_len > file_len {
        return Err(corrupt(format!("header length {header_len} does not fit a {file_len}-byte file")));
    }
    let mut header = vec![0u8; header_len];
    file.read_exact_at(&mut header, 8).map_err(io)?;
    let header: std::collections::HashMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| corrupt(format!("header is not JSON: {e}")))?;
    let data_start = 8 + header_len;

    let mut entries = Vec::with_capacity(header.len());
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let info: SafetensorsEntry = serde_json::from_value(info).map_err(|e| corrupt(format!("tensor `{name}`: {e}")))?;
        let dtype = safetensors_dtype(&info.dtype).ok_or_else(|| corrupt(format!("tensor `{name}` has dtype {} which easel does not read", info.dtype)))?;
        let elems = info.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).ok_or_else(|| corrupt(format!("tensor `{name}`: shape overflows")))?;
        let (start, end) = info.data_offsets;
        if end < start || end - start != elems * dtype.size_in_bytes() || data_start + end > file_len {
            return Err(corrupt(format!("tensor `{name}`: data offsets {start}..{end} do not fit its shape {:?} or the file", info.shape)));
        }
        entries.push((name, dtype, info.shape, data_start + start, elems));
    }
    entries
        .into_par_iter()
        .map(|(name, dtype, shape, offset, elems)| {
            let t = read_tensor_at(&file, offset, elems, dtype, &shape).map_err(io)?;
            Ok((name, t))
        })
        .collect()
}

#[derive(serde::Deserialize)]
struct SafetensorsEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

fn safetensors_dtype(name: &str) -> Option<DType> {
    Some(match name {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "I64" => DType::I64,
        "U32" => DType::U32,
        "U8" => DType::U8,
        _ => return None,
    })
}

/// One tensor's little-endian data at `offset`: f32 (the CPU's compute type) straight into the
/// tensor's buffer, other types through one transient byte buffer per tensor.
fn read_tensor_at(file: &std::fs::File, offset: usize, elems: usize, dtype: DType, shape: &[usize]) -> std::io::Result<Tensor> {
    use std::os::unix::fs::FileExt;
    if dtype == DType::F32 {
        let mut data = vec![0f32; elems];
        // SAFETY: f32 has no invalid bit patterns or padding; the byte view covers exactly
        // `data`'s initialized elements. safetensors data is little-endian, as are the CPUs
        // easel builds for (x86-64, aarch64).
        let bytes = unsafe { std::slice::from_raw_parts_mut(data.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(data.as_slice())) };
        file.read_exact_at(bytes, offset as u64)?;
        return Tensor::from_vec(data, shape, &Device::Cpu).map_err(std::io::Error::other);
    }
    let mut bytes = vec![0u8; elems * dtype.size_in_bytes()];
    file.read_exact_at(&mut bytes, offset as u64)?;
    Tensor::from_raw_buffer(&bytes, dtype, shape, &Device::Cpu).map_err(std::io::Error::other)
}

#[cfg(not(target_endian = "little"))]
compile_error!("easel reads safetensors data in place, which assumes a little-endian CPU");

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
