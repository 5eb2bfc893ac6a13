//! GGUF files: reading them into [`Weights`] (quantized tensors stay quantized) and writing
//! them (`easel models quantize`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use super::store::{Param, Weights};
use crate::error::{EngineError, Result};

/// The quantization types `easel models quantize` writes, by CLI name.
pub const QUANTIZE_TYPES: [(&str, GgmlDType); 6] = [
    ("q8_0", GgmlDType::Q8_0),
    ("q5_0", GgmlDType::Q5_0),
    ("q5_1", GgmlDType::Q5_1),
    ("q4_0", GgmlDType::Q4_0),
    ("q4_1", GgmlDType::Q4_1),
    ("q4_k", GgmlDType::Q4K),
];

/// GGML tensor types easel reads from GGUF files.
const READABLE: &str = "F32, F16, BF16, Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";

/// Parses a `--type` value.
pub fn parse_quant_type(name: &str) -> Result<GgmlDType> {
    let lower = name.to_ascii_lowercase();
    QUANTIZE_TYPES.iter().find(|(n, _)| *n == lower).map(|(_, t)| *t).ok_or_else(|| {
        let names: Vec<_> = QUANTIZE_TYPES.iter().map(|(n, _)| *n).collect();
        EngineError::param("type", format!("unsupported quantization type `{name}`; supported: {}", names.join(", ")))
    })
}

/// Reads a GGUF file's tensors (quantized ones stay quantized, on `device`).
pub fn read(path: &Path, device: &Device) -> Result<Weights> {
    let io = |e: std::io::Error| EngineError::Io { path: path.to_path_buf(), source: e };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| gguf_error(path, &e))?;
    let mut params = HashMap::new();
    for name in content.tensor_infos.keys() {
        let q = content.tensor(&mut file, name, device).map_err(|e| gguf_error(path, &format!("tensor `{name}`: {e}")))?;
        params.insert(name.clone(), Param::Quantized(Arc::new(q)));
    }
    Weights::new(params, path, DType::F32, device)
}

fn gguf_error(path: &Path, e: &dyn std::fmt::Display) -> EngineError {
    let message = e.to_string();
    let message = match message.split("unknown dtype for tensor ").nth(1) {
        Some(id) => format!(
            "uses GGML tensor type {} which easel cannot read; supported: {READABLE}",
            ggml_type_name(id.chars().take_while(char::is_ascii_digit).collect::<String>().parse().unwrap_or(u32::MAX))
        ),
        None => format!("not a readable GGUF file ({})", message.lines().next().unwrap_or_default()),
    };
    EngineError::BadWeights { path: path.to_path_buf(), message }
}

/// The GGML name of a tensor type id.
fn ggml_type_name(id: u32) -> String {
    const NAMES: [&str; 36] = [
        "F32", "F16", "Q4_0", "Q4_1", "4", "5", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K",
        "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M",
        "BF16", "31", "32", "33", "TQ1_0", "TQ2_0",
    ];
    NAMES.get(id as usize).map(|s| s.to_string()).unwrap_or_else(|| format!("#{id}"))
}

/// Whether `quantize_weights` quantizes a tensor of this shape (the others stay F32, as in the
/// community's FLUX GGUF files): 2-D weights whose rows are whole blocks.
pub fn is_quantizable(shape: &[usize], t: GgmlDType) -> bool {
    shape.len() == 2 && shape[1] % t.block_size() == 0
}

/// Bytes a tensor of `shape` takes when quantized to `t` by `quantize_weights`.
pub fn quantized_bytes(shape: &[usize], t: GgmlDType) -> usize {
    let n: usize = shape.iter().product();
    if is_quantizable(shape, t) {
        n / t.block_size() * t.type_size()
    } else {
        n * 4
    }
}

/// Quantizes tensors to `t` (where `is_quantizable`, else F32) and writes them as a GGUF file
/// with `architecture` in its metadata. Returns the bytes of tensor data written.
pub fn quantize_weights(tensors: &[(String, Tensor)], t: GgmlDType, architecture: &str, out: &Path) -> Result<usize> {
    let mut q = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let f32 = tensor.to_dtype(DType::F32)?;
        let target = if is_quantizable(tensor.dims(), t) { t } else { GgmlDType::F32 };
        q.push((name.as_str(), QTensor::quantize(&f32, target)?));
    }
    let bytes = q.iter().map(|(_, t)| t.storage_size_in_bytes()).sum();
    let arch = gguf_file::Value::String(architecture.to_string());
    let version = gguf_file::Value::U32(2);
    let metadata = [("general.architecture", &arch), ("general.quantization_version", &version)];
    let refs: Vec<(&str, &QTensor)> = q.iter().map(|(n, t)| (*n, t)).collect();
    let io = |e: std::io::Error| EngineError::Io { path: out.to_path_buf(), source: e };
    let mut file = std::io::BufWriter::new(std::fs::File::create(out).map_err(io)?);
    gguf_file::write(&mut file, &metadata, &refs).map_err(|e| EngineError::Io { path: out.to_path_buf(), source: std::io::Error::other(e.to_string()) })?;
    std::io::Write::flush(&mut file).map_err(io)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_types_are_named_with_the_supported_ones() {
        let e = parse_quant_type("q3_k").unwrap_err().to_string();
        assert!(e.contains("`q3_k`") && e.contains("q8_0, q5_0, q5_1, q4_0, q4_1, q4_k"), "{e}");
        assert_eq!(parse_quant_type("Q4_K").unwrap(), GgmlDType::Q4K);
    }

    #[test]
    fn quantized_sizes_follow_the_block_layout() {
        // q8_0: 32 values in 34 bytes; q4_K: 256 values in 144 bytes; odd rows stay f32.
        assert_eq!(quantized_bytes(&[64, 64], GgmlDType::Q8_0), 64 * 2 * 34);
        assert_eq!(quantized_bytes(&[3, 256], GgmlDType::Q4K), 3 * 144);
        assert_eq!(quantized_bytes(&[64, 48], GgmlDType::Q4K), 64 * 48 * 4);
        assert_eq!(quantized_bytes(&[64], GgmlDType::Q4_0), 256);
    }

}
