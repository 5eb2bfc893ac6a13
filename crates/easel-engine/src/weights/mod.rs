//! Weights on disk and in memory, one module per concern, none depending on a pipeline:
//!
//! - [`source`]: which files of a diffusers folder hold a component;
//! - this module: safetensors files (read into memory once on the CPU, memory-mapped on a GPU;
//!   into a `VarBuilder`, or as tensors), with errors that name the file;
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

/// Reads and validates a component's weight files: on the CPU into memory once (see
/// [`read_tensors`]), on a GPU memory-mapped; the builder converts each tensor to `dtype` and
/// moves it to `device` as a layer takes it.
pub fn load_var_builder(files: &[PathBuf], dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    if !device.is_cpu() {
        // On a GPU the tensors live in device memory: memory-mapping streams each one there
        // without holding a whole component in host memory first.
        for f in files {
            // Parses the header and checks the data length, so a corrupt file is named here.
            // SAFETY: the mapping is read-only; a file changed underneath us is a user error candle also accepts.
            unsafe { candle_core::safetensors::MmapedSafetensors::new(f) }.map_err(|e| bad_weights(f, &e))?;
        }
        // SAFETY: as above.
        return unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }
            .map_err(|e| bad_weights(files.first().map(PathBuf::as_path).unwrap_or(Path::new("?")), &e));
    }
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
    read(path, false)
}

/// [`read_tensors`], with linear layers' f32 weights read straight into
/// [`crate::models::linear::for_cpu_gemm`]'s layout (through one reused buffer per thread, so
/// that loading touches no more fresh memory than the weights: in a VM, fresh pages cost more
/// than the transposition).
pub fn read_tensors_laid_out(path: &std::path::Path) -> Result<std::collections::HashMap<String, Tensor>> {
    let tensors = read(path, true);
    rayon::broadcast(|_| SCRATCH.with_borrow_mut(std::mem::take));
    tensors
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn read(path: &std::path::Path, lay_out: bool) -> Result<std::collections::HashMap<String, Tensor>> {
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

    // Every tensor's bytes, checked without overflow, and laid end to end over the whole data
    // section with no gap or overlap, as the safetensors format requires.
    let data_len = file_len - data_start;
    let mut entries = Vec::with_capacity(header.len());
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let info: SafetensorsEntry = serde_json::from_value(info).map_err(|e| corrupt(format!("tensor `{name}`: {e}")))?;
        let dtype = DType::try_from(info.dtype).map_err(|_| corrupt(format!("tensor `{name}` has dtype {:?}, which candle does not read", info.dtype)))?;
        let (start, end) = info.data_offsets;
        let bytes = info.shape.iter().try_fold(dtype.size_in_bytes(), |n, &d| n.checked_mul(d)).filter(|_| dtype.size_in_bytes() > 0);
        if bytes.is_none() || end < start || Some(end - start) != bytes || end > data_len {
            return Err(corrupt(format!("tensor `{name}`: data offsets {start}..{end} do not fit its shape {:?} or the file", info.shape)));
        }
        entries.push((name, dtype, info.shape, start, end));
    }
    entries.sort_by_key(|e| e.3);
    let mut next = 0;
    for (name, _, _, start, end) in &entries {
        if *start != next {
            return Err(corrupt(format!("tensor `{name}` starts at {start}, not where the one before it ends ({next})")));
        }
        next = *end;
    }
    if next != data_len {
        return Err(corrupt(format!("the tensors cover {next} of the {data_len} data bytes")));
    }
    // The element count fits: its byte count (at least one byte each) was checked above.
    let entries: Vec<_> = entries.into_iter().map(|(name, dtype, shape, start, _)| { let elems = shape.iter().product(); (name, dtype, shape, data_start + start, elems) }).collect();
    entries
        .into_par_iter()
        .map(|(name, dtype, shape, offset, elems)| {
            let t = match shape[..] {
                [n, k] if lay_out && dtype == DType::F32 && crate::models::linear::is_linear_weight(&name, &shape) => SCRATCH.with_borrow_mut(|scratch| {
                    scratch.clear();
                    scratch.resize(elems, 0f32);
                    read_f32_at(&file, offset, scratch)?;
                    // Not in parallel: a stolen read on this thread would borrow `SCRATCH` again.
                    let laid_out = crate::models::linear::transpose(scratch, n, k, false);
                    Tensor::from_vec(laid_out, (k, n), &Device::Cpu).and_then(|t| t.t()).map_err(std::io::Error::other)
                }),
                _ => read_tensor_at(&file, offset, elems, dtype, &shape),
            }
            .map_err(io)?;
            Ok((name, t))
        })
        .collect()
}

#[derive(serde::Deserialize)]
struct SafetensorsEntry {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

/// One tensor's little-endian data at `offset`: f32 (the CPU's compute type) straight into the
/// tensor's buffer, other types through one transient byte buffer per tensor.
fn read_tensor_at(file: &std::fs::File, offset: usize, elems: usize, dtype: DType, shape: &[usize]) -> std::io::Result<Tensor> {
    use std::os::unix::fs::FileExt;
    if dtype == DType::F32 {
        let mut data = vec![0f32; elems];
        read_f32_at(file, offset, &mut data)?;
        return Tensor::from_vec(data, shape, &Device::Cpu).map_err(std::io::Error::other);
    }
    let mut bytes = vec![0u8; elems * dtype.size_in_bytes()];
    file.read_exact_at(&mut bytes, offset as u64)?;
    Tensor::from_raw_buffer(&bytes, dtype, shape, &Device::Cpu).map_err(std::io::Error::other)
}

/// Fills `data` with the f32 values at `offset`.
fn read_f32_at(file: &std::fs::File, offset: usize, data: &mut [f32]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    // SAFETY: f32 has no invalid bit patterns or padding; the byte view covers exactly `data`'s
    // initialized elements. safetensors data is little-endian, as are the CPUs easel builds for
    // (x86-64, aarch64).
    let bytes = unsafe { std::slice::from_raw_parts_mut(data.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(data)) };
    file.read_exact_at(bytes, offset as u64)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(header: &str, data: &[u8]) -> tempfile::NamedTempFile {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), bytes).unwrap();
        f
    }

    /// Linear weights come back as transposed views of `[in, out]` copies, other tensors (an
    /// embedding table, a bias, a bf16 matrix) as stored; all hold the stored values.
    #[test]
    fn tensors_read_laid_out_equal_the_stored_values_and_only_linear_f32_weights_are_laid_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let dev = Device::Cpu;
        let named = |name: &str, t: Tensor| (name.to_string(), t);
        let stored = std::collections::HashMap::from([
            named("blk.qkv.weight", Tensor::randn(0f32, 1.0, (300, 17), &dev).unwrap()),
            named("blk.proj.weight", Tensor::randn(0f32, 1.0, (5, 513), &dev).unwrap()),
            named("te.token_embedding.weight", Tensor::randn(0f32, 1.0, (9, 4), &dev).unwrap()),
            named("blk.proj.bias", Tensor::randn(0f32, 1.0, 5, &dev).unwrap()),
            named("half.weight", Tensor::randn(0f32, 1.0, (3, 4), &dev).unwrap().to_dtype(DType::BF16).unwrap()),
        ]);
        candle_core::safetensors::save(&stored, &path).unwrap();
        let read = read_tensors_laid_out(&path).unwrap();
        for (name, want) in &stored {
            let got = &read[name];
            assert_eq!(got.dims(), want.dims(), "{name}");
            assert_eq!(got.is_contiguous(), !name.ends_with("qkv.weight") && !name.ends_with("proj.weight"), "{name}");
            let diff = (got.to_dtype(DType::F32).unwrap() - want.to_dtype(DType::F32).unwrap()).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}");
        }
    }

    #[test]
    fn tensors_read_in_place_equal_candles_loader_and_corrupt_headers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let a = Tensor::arange(0f32, 6.0, &Device::Cpu).unwrap().reshape((2, 3)).unwrap();
        let b = Tensor::arange(0f32, 4.0, &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap();
        candle_core::safetensors::save(&std::collections::HashMap::from([("a".to_string(), a.clone()), ("b".to_string(), b.clone())]), &path).unwrap();
        let read = read_tensors(&path).unwrap();
        let want = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        for name in ["a", "b"] {
            assert_eq!(read[name].dtype(), want[name].dtype());
            assert_eq!(read[name].to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), want[name].to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        for (header, data, words) in [
            // A shape whose byte count overflows must not wrap to a small size.
            (r#"{"x":{"dtype":"F32","shape":[4611686018427387905],"data_offsets":[0,4]}}"#, &[0u8; 4][..], "shape"),
            // Offsets that would wrap past the end of the file.
            (r#"{"x":{"dtype":"F32","shape":[1],"data_offsets":[18446744073709551000,18446744073709551004]}}"#, &[0u8; 4][..], "offsets"),
            // Two tensors with a gap between them, and trailing bytes.
            (r#"{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"y":{"dtype":"U8","shape":[1],"data_offsets":[2,3]}}"#, &[0u8; 3][..], "starts at 2"),
            (r#"{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#, &[0u8; 5][..], "cover 1 of the 5"),
            (r#"{"x":{"dtype":"Q9","shape":[1],"data_offsets":[0,1]}}"#, &[0u8; 1][..], "tensor `x`"),
        ] {
            let f = file_with(header, data);
            let e = read_tensors(f.path()).unwrap_err().to_string();
            assert!(e.contains("truncated or corrupt") && e.contains(words), "{header}: {e}");
        }
    }
}
