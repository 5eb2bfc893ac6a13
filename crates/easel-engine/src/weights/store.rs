//! Named weights that are either full-precision tensors or GGML-quantized blocks, and the
//! linear layer that runs on either. Every transformer easel builds reads its weights from a
//! [`Weights`], whichever file format they came from (safetensors or GGUF, see `gguf`), so
//! renaming (`keys`) and LoRA merging (`lora`) work the same on both.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::error::{EngineError, Result};
use crate::models::linear;

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
    pub(super) params: HashMap<String, Param>,
    origin: PathBuf,
    dtype: DType,
    pub(super) device: Device,
    pub(super) low_rank: HashMap<String, Vec<LowRank>>,
}

/// A LoRA update computed at run time: `y += scale * (x @ down^T) @ up^T`.
#[derive(Clone)]
pub(super) struct LowRank {
    pub(super) down: Tensor,
    /// `[out, r]`, zero outside the rows the update covers.
    pub(super) up: Tensor,
    pub(super) scale: f64,
}

impl Weights {
    /// Weights already in memory; `dtype` is the compute type of dense tensors.
    /// Dense linear weights are laid out for the CPU's GEMM here ([`linear::for_cpu_gemm`]; a
    /// no-op for ones read laid out), so that no layer holds a second copy.
    pub fn new(mut params: HashMap<String, Param>, origin: &Path, dtype: DType, device: &Device) -> Result<Self> {
        for (name, p) in params.iter_mut() {
            if let Param::Dense(t) = p {
                if linear::is_linear_weight(name, t.dims()) {
                    *t = linear::for_cpu_gemm(t.clone())?;
                }
            }
        }
        Ok(Self { params, origin: origin.to_path_buf(), dtype, device: device.clone(), low_rank: HashMap::new() })
    }

    /// Reads full-precision weights from safetensors files, converted to `dtype` on `device`
    /// (the layers built from them then share their memory).
    pub fn read_safetensors(files: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        let mut params = HashMap::new();
        for f in files {
            // Laid out for the CPU's GEMM as they are read; a GPU takes them as stored.
            let tensors = if device.is_cpu() && dtype == DType::F32 { super::read_tensors_laid_out(f)? } else { super::read_tensors(f)? };
            for (name, t) in tensors {
                let t = if t.dtype().is_float() { t.to_dtype(dtype)? } else { t };
                params.insert(name, Param::Dense(t.to_device(device)?));
            }
        }
        let origin = files.first().cloned().unwrap_or_default();
        Self::new(params, &origin, dtype, device)
    }

    /// Weight names and shapes.
    pub fn shapes(&self) -> HashMap<String, Vec<usize>> {
        self.params.iter().map(|(k, p)| (k.clone(), p.dims())).collect()
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
            // One 2-D product over every row, as candle_nn's `Linear` (no per-batch GEMMs).
            LinearWeight::Dense(w) if x.rank() > 2 && x.is_contiguous() => {
                let mut dims = x.dims().to_vec();
                let k = dims.pop().unwrap_or(1);
                dims.push(w.dim(0)?);
                x.reshape(((), k))?.matmul(&w.t()?)?.reshape(dims)?
            }
            LinearWeight::Dense(w) => {
                let w = match x.rank() {
                    4 => w.broadcast_left((x.dim(0)?, x.dim(1)?))?.t()?,
                    3 => w.broadcast_left(x.dim(0)?)?.t()?,
                    _ => w.t()?,
                };
                x.matmul(&w)?
            }
            LinearWeight::Quantized(q) => q.forward(&x.to_dtype(DType::F32)?.contiguous()?)?.to_dtype(x.dtype())?,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Fixed pseudo-random values with mean 0 and standard deviation `std` (uniform; a hash of
    /// the index), so the measured errors, and whether they pass, never change between runs.
    fn fixed_values(n: usize, std: f32, salt: f32) -> Vec<f32> {
        (0..n).map(|i| (((i as f32 * 12.9898 + salt).sin() * 43758.547).fract().abs() - 0.5) * std * 12f32.sqrt()).collect()
    }

    #[test]
    fn quantized_linear_tracks_the_dense_one() {
        let dev = Device::Cpu;
        // Not `Tensor::randn`: its unseeded draws made Q8_0's error straddle the bound now and
        // then (0.0103 against 0.01 once in CI).
        let w = Tensor::from_vec(fixed_values(64 * 256, 0.05, 0.0), (64, 256), &dev).unwrap();
        let x = Tensor::from_vec(fixed_values(2 * 5 * 256, 1.0, 0.5), (2, 5, 256), &dev).unwrap();
        let dense = Linear { weight: LinearWeight::Dense(w.clone()), bias: None, low_rank: vec![] }.forward(&x).unwrap();
        for (t, bound) in [(GgmlDType::Q8_0, 0.01), (GgmlDType::Q4_0, 0.15), (GgmlDType::Q4K, 0.15)] {
            let q = QMatMul::from_qtensor(QTensor::quantize(&w, t).unwrap()).unwrap();
            let y = Linear { weight: LinearWeight::Quantized(q), bias: None, low_rank: vec![] }.forward(&x).unwrap();
            let err = ((&y - &dense).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()
                / dense.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap())
            .sqrt();
            println!("{t:?}: relative error {err}");
            assert!(err < bound, "{t:?}: relative error {err}");
        }
    }
}
