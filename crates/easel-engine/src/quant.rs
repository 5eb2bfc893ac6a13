//! Named weights that are either full-precision tensors or GGML-quantized blocks (GGUF), the
//! linear layer that runs on either, shape checks against what a config expects, weight memory
//! accounting, and `easel models quantize`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

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

/// One weight: a plain tensor, or GGML blocks.
#[derive(Clone)]
pub enum Param {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
}

impl Param {
    /// The logical shape.
    pub fn dims(&self) -> Vec<usize> {
        match self {
            Param::Dense(t) => t.dims().to_vec(),
            Param::Quantized(q) => q.shape().dims().to_vec(),
        }
    }

    /// Bytes held in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Param::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Param::Quantized(q) => q.storage_size_in_bytes(),
        }
    }

    /// The storage type's name (`f32`, `bf16`, `q4_0`, ...).
    pub fn type_name(&self) -> String {
        match self {
            Param::Dense(t) => format!("{:?}", t.dtype()).to_lowercase(),
            Param::Quantized(q) => format!("{:?}", q.dtype()).to_lowercase(),
        }
    }
}

/// Every weight of one network, by name, with the file it came from, and the LoRA updates
/// that run beside quantized weights.
#[derive(Clone)]
pub struct Weights {
    params: HashMap<String, Param>,
    origin: PathBuf,
    dtype: DType,
    device: Device,
    low_rank: HashMap<String, Vec<LowRank>>,
}

/// A LoRA update computed at run time: `y += scale * (x @ down^T) @ up^T`.
#[derive(Clone)]
struct LowRank {
    down: Tensor,
    /// `[out, r]`, zero outside the rows the update covers.
    up: Tensor,
    scale: f64,
}

impl Weights {
    /// Weights already in memory; `dtype` is the compute type of dense tensors.
    pub fn new(params: HashMap<String, Param>, origin: &Path, dtype: DType, device: &Device) -> Self {
        Self { params, origin: origin.to_path_buf(), dtype, device: device.clone(), low_rank: HashMap::new() }
    }

    /// Reads full-precision weights from safetensors files, converted to `dtype` on `device`
    /// (the layers built from them then share their memory).
    pub fn read_safetensors(files: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        let mut params = HashMap::new();
        for f in files {
            for (name, t) in crate::read_tensors(f)? {
                let t = if t.dtype().is_float() { t.to_dtype(dtype)? } else { t };
                params.insert(name, Param::Dense(t.to_device(device)?));
            }
        }
        let origin = files.first().cloned().unwrap_or_default();
        Ok(Self::new(params, &origin, dtype, device))
    }

    /// Reads a GGUF file's tensors (quantized ones stay quantized, on `device`).
    pub fn read_gguf(path: &Path, device: &Device) -> Result<Self> {
        let io = |e: std::io::Error| EngineError::Io { path: path.to_path_buf(), source: e };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| gguf_error(path, &e))?;
        let mut params = HashMap::new();
        for name in content.tensor_infos.keys() {
            let q = content.tensor(&mut file, name, device).map_err(|e| gguf_error(path, &format!("tensor `{name}`: {e}")))?;
            params.insert(name.clone(), Param::Quantized(Arc::new(q)));
        }
        Ok(Self::new(params, path, DType::F32, device))
    }

    /// Weight names and shapes.
    pub fn shapes(&self) -> HashMap<String, Vec<usize>> {
        self.params.iter().map(|(k, p)| (k.clone(), p.dims())).collect()
    }

    /// These weights with LoRA `adapters`: merged into copies of the affected full-precision
    /// weights; kept beside quantized ones and applied at run time (low-rank, no dequantizing).
    pub fn with_adapters(&self, adapters: &[&crate::lora::Adapter]) -> Result<Self> {
        let mut out = self.clone();
        let mut dense: HashMap<String, Tensor> = HashMap::new();
        let mut dense_adapters = vec![];
        for a in adapters {
            match self.params.get(&a.target) {
                Some(Param::Dense(t)) => {
                    dense.insert(a.target.clone(), t.clone());
                    dense_adapters.push(*a);
                }
                Some(Param::Quantized(q)) => {
                    let up = a.full_up(q.shape().dims()[0], &self.device)?;
                    let down = a.down.flatten_from(1)?.to_device(&self.device)?;
                    out.low_rank.entry(a.target.clone()).or_default().push(LowRank { down, up, scale: a.scale });
                }
                None => {}
            }
        }
        for (k, t) in crate::lora::merge(&dense, &dense_adapters)? {
            out.params.insert(k, Param::Dense(t));
        }
        Ok(out)
    }

    /// Sets the compute type that dense tensors are converted to.
    pub fn set_dtype(&mut self, dtype: DType) {
        self.dtype = dtype;
    }

    /// The file the weights came from.
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// Tensor names.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.params.keys()
    }

    /// Removes and returns a weight.
    pub fn take(&mut self, name: &str) -> Option<Param> {
        self.params.remove(name)
    }

    /// Adds (or replaces) a weight.
    pub fn insert(&mut self, name: String, p: Param) {
        self.params.insert(name, p);
    }

    /// Keeps only the tensors under `prefix` (`model.diffusion_model.` in ComfyUI checkpoints,
    /// which also hold the VAE and text encoders), without it; does nothing if none has it.
    pub fn strip_prefix(&mut self, prefix: &str) {
        if self.params.keys().any(|k| k.starts_with(prefix)) {
            self.params = std::mem::take(&mut self.params)
                .into_iter()
                .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v)))
                .collect();
        }
    }

    /// Checks that exactly the expected tensors are present, with the expected shapes.
    pub fn check(&self, expected: &[(String, Vec<usize>)], what: &str) -> Result<()> {
        let known: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        let mut extra: Vec<&String> = self.params.keys().filter(|k| !known.contains(k.as_str())).collect();
        extra.sort();
        if let Some(first) = extra.first() {
            return Err(self.bad(format!("tensor `{first}` (and {} more) is not part of {what}; is the file for another model or variant?", extra.len() - 1)));
        }
        for (name, shape) in expected {
            let Some(p) = self.params.get(name) else {
                return Err(self.bad(format!("tensor `{name}` is missing; {what} needs it with shape {shape:?}")));
            };
            if &p.dims() != shape {
                return Err(self.bad(format!("tensor `{name}` has shape {:?} but {what} needs {shape:?}", p.dims())));
            }
        }
        Ok(())
    }

    fn bad(&self, message: String) -> EngineError {
        EngineError::BadWeights { path: self.origin.clone(), message }
    }

    fn get(&self, name: &str) -> Result<&Param> {
        self.params.get(name).ok_or_else(|| self.bad(format!("tensor `{name}` is missing")))
    }

    /// A tensor in the compute type (quantized ones dequantized).
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let t = match self.get(name)? {
            Param::Dense(t) => t.to_device(&self.device)?,
            Param::Quantized(q) => q.dequantize(&self.device)?,
        };
        Ok(t.to_dtype(self.dtype)?)
    }

    /// The linear layer `name` (`name.weight`, and `name.bias` when present).
    pub fn linear(&self, name: &str) -> Result<Linear> {
        let weight = match self.get(&format!("{name}.weight"))? {
            Param::Dense(t) => LinearWeight::Dense(t.to_device(&self.device)?.to_dtype(self.dtype)?),
            // candle's q4_1/q5_0/q5_1 kernels take rows of an even number of blocks (always so
            // in real models); narrower rows (tiny test models) run dequantized.
            Param::Quantized(q) if needs_block_pairs(q.dtype()) && (q.shape().dims().last().copied().unwrap_or(0) / q.dtype().block_size()) % 2 == 1 => {
                LinearWeight::Dense(q.dequantize(&self.device)?)
            }
            Param::Quantized(q) => LinearWeight::Quantized(QMatMul::from_arc(q.clone())?),
        };
        let bias_name = format!("{name}.bias");
        let bias = if self.params.contains_key(&bias_name) { Some(self.tensor(&bias_name)?) } else { None };
        let low_rank = self.low_rank.get(&format!("{name}.weight")).cloned().unwrap_or_default();
        Ok(Linear { weight, bias, low_rank })
    }

    /// Bytes the weights take once loaded (dense ones in the compute type), and a summary of
    /// how many tensors have each type.
    pub fn memory(&self) -> (usize, String) {
        let mut by_type: std::collections::BTreeMap<String, usize> = Default::default();
        let mut total = 0;
        for p in self.params.values() {
            let (bytes, name) = match p {
                Param::Dense(t) => (t.elem_count() * self.dtype.size_in_bytes(), format!("{:?}", self.dtype).to_lowercase()),
                Param::Quantized(_) => (p.bytes(), p.type_name()),
            };
            total += bytes;
            *by_type.entry(name).or_default() += 1;
        }
        let summary = by_type.iter().map(|(t, n)| format!("{n} {t}")).collect::<Vec<_>>().join(", ");
        (total, summary)
    }

    /// All weights as full-precision tensors on the CPU (for quantizing).
    pub fn into_dense(self) -> Result<Vec<(String, Tensor)>> {
        let mut out: Vec<(String, Tensor)> = self
            .params
            .into_iter()
            .map(|(k, p)| {
                let t = match p {
                    Param::Dense(t) => t,
                    Param::Quantized(q) => q.dequantize(&Device::Cpu)?,
                };
                Ok((k, t))
            })
            .collect::<Result<_>>()?;
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
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

fn needs_block_pairs(t: GgmlDType) -> bool {
    matches!(t, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1)
}

enum LinearWeight {
    Dense(Tensor),
    Quantized(QMatMul),
}

/// `y = x W^T + b` over full-precision or quantized `W`, plus any run-time LoRA updates.
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    low_rank: Vec<LowRank>,
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::Dense(w) => {
                let w = match x.rank() {
                    4 => w.broadcast_left((x.dim(0)?, x.dim(1)?))?.t()?,
                    3 => w.broadcast_left(x.dim(0)?)?.t()?,
                    _ => w.t()?,
                };
                x.matmul(&w)?
            }
            LinearWeight::Quantized(q) => q.forward(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?,
        };
        let mut y = match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        };
        for lr in &self.low_rank {
            let x32 = x.to_dtype(DType::F32)?;
            let h = x32.broadcast_matmul(&lr.down.t()?)?;
            let update = (h.broadcast_matmul(&lr.up.t()?)? * lr.scale)?;
            let update = update.to_dtype(y.dtype())?;
            y = (y + update)?;
        }
        Ok(y)
    }
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

    #[test]
    fn quantized_linear_tracks_the_dense_one() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.05, (64, 256), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 5, 256), &dev).unwrap();
        let dense = Linear { weight: LinearWeight::Dense(w.clone()), bias: None, low_rank: vec![] }.forward(&x).unwrap();
        for (t, bound) in [(GgmlDType::Q8_0, 0.01), (GgmlDType::Q4_0, 0.15), (GgmlDType::Q4K, 0.15)] {
            let q = QMatMul::from_qtensor(QTensor::quantize(&w, t).unwrap()).unwrap();
            let y = Linear { weight: LinearWeight::Quantized(q), bias: None, low_rank: vec![] }.forward(&x).unwrap();
            let err = ((&y - &dense).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()
                / dense.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap())
            .sqrt();
            assert!(err < bound, "{t:?}: relative error {err}");
        }
    }
}
