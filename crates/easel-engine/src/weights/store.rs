//! Named weights that are either full-precision tensors or GGML-quantized blocks, and the
//! linear layer that runs on either. Every transformer easel builds reads its weights from a
//! [`Weights`], whichever file format they came from (safetensors or GGUF, see `gguf`), so
//! renaming (`keys`) and LoRA merging (`lora`) work the same on both.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::error::{EngineError, Result};
use crate::models::linear;
use crate::models::vector_math::contiguous_f32;
use crate::models::quant_tiles::{self, QuantKind, QuantTiles};

/// One weight: a plain tensor, or GGML blocks, or q8_0/q4_0 linear blocks regrouped for
/// easel's CPU kernel ([`quant_tiles`]; the same bytes in another order).
#[derive(Clone)]
pub enum Param {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
    Tiled(Arc<QuantTiles>),
}

impl Param {
    /// The logical shape.
    pub fn dims(&self) -> Vec<usize> {
        match self {
            Param::Dense(t) => t.dims().to_vec(),
            Param::Quantized(q) => q.shape().dims().to_vec(),
            Param::Tiled(t) => t.dims().to_vec(),
        }
    }

    /// The values as a full-precision tensor on `device` (dense ones as they are).
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        Ok(match self {
            Param::Dense(t) => t.to_device(device)?,
            Param::Quantized(q) => q.dequantize(device)?,
            Param::Tiled(t) => {
                let dtype = match t.kind() {
                    QuantKind::Q8_0 => GgmlDType::Q8_0,
                    QuantKind::Q4_0 => GgmlDType::Q4_0,
                };
                let [n, k] = t.dims();
                qtensor_from_ggml(dtype, &t.blocks(), vec![n, k], &Device::Cpu)?.dequantize(device)?
            }
        })
    }

    /// q8_0/q4_0 linear weights regrouped for [`quant_tiles`] when this CPU runs it and
    /// candle has no faster kernel of its own (q8_0 with VNNI); otherwise unchanged.
    fn tiled_for_cpu(self, name: &str, device: &Device) -> Result<Self> {
        let Param::Quantized(q) = &self else { return Ok(self) };
        let kind = match q.dtype() {
            GgmlDType::Q8_0 if !candle_tiles_q8_0() => QuantKind::Q8_0,
            GgmlDType::Q4_0 => QuantKind::Q4_0,
            _ => return Ok(self),
        };
        if !device.is_cpu() || !quant_tiles::cpu_supported() || !linear::is_linear_weight(name, q.shape().dims()) {
            return Ok(self);
        }
        let (n, k) = q.shape().dims2()?;
        Ok(match QuantTiles::from_blocks(kind, n, k, &q.data()?) {
            Some(tiles) => Param::Tiled(Arc::new(tiles)),
            None => self,
        })
    }

    /// Bytes held in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Param::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Param::Quantized(q) => q.storage_size_in_bytes(),
            Param::Tiled(t) => t.bytes(),
        }
    }

    /// The storage type's name (`f32`, `bf16`, `q4_0`, ...).
    pub fn type_name(&self) -> String {
        match self {
            Param::Dense(t) => format!("{:?}", t.dtype()).to_lowercase(),
            Param::Quantized(q) => format!("{:?}", q.dtype()).to_lowercase(),
            Param::Tiled(t) => format!("{:?}", t.kind()).to_lowercase(),
        }
    }
}

/// Whether candle runs q8_0 through its own tiled VNNI kernels on this CPU (it does with
/// AVX-512 VNNI or AVX-VNNI, and was faster than f32 there: 0.84 on a FLUX-shaped model).
fn candle_tiles_q8_0() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512vnni") || std::arch::is_x86_feature_detected!("avxvnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
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
    /// no-op for ones read laid out), so that no layer holds a second copy; so are q8_0 and
    /// q4_0 linear weights, for [`quant_tiles`].
    pub fn new(params: HashMap<String, Param>, origin: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let params = params
            .into_iter()
            .map(|(name, p)| {
                let p = match p {
                    Param::Dense(t) if linear::is_linear_weight(&name, t.dims()) => Param::Dense(linear::for_cpu_gemm(t)?),
                    p => p.tiled_for_cpu(&name, device)?,
                };
                Ok((name, p))
            })
            .collect::<Result<_>>()?;
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
        Ok(self.get(name)?.dequantize(&self.device)?.to_dtype(self.dtype)?)
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
            Param::Tiled(t) => LinearWeight::Tiled(t.clone()),
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
                Param::Quantized(_) | Param::Tiled(_) => (p.bytes(), p.type_name()),
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
            .map(|(k, p)| Ok((k, p.dequantize(&Device::Cpu)?)))
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
    Tiled(Arc<QuantTiles>),
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
            LinearWeight::Tiled(t) => tiled_forward(t, x)?,
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

/// `x W^T` through [`QuantTiles`] (f32 on the CPU, as candle's quantized matmul).
fn tiled_forward(w: &QuantTiles, x: &Tensor) -> candle_core::Result<Tensor> {
    let x32 = x.to_dtype(DType::F32)?.contiguous()?;
    let mut dims = x32.dims().to_vec();
    let k = dims.pop().unwrap_or(1);
    let [n, k_w] = w.dims();
    if k != k_w {
        candle_core::bail!("quantized linear: input width {k}, weight width {k_w}");
    }
    let rows = dims.iter().product::<usize>();
    let y = {
        let (storage, layout) = x32.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else { candle_core::bail!("quantized linear: tiled weights run on the CPU") };
        w.matmul(contiguous_f32(cpu, layout, "quantized linear", "input")?, rows)
    };
    dims.push(n);
    Tensor::from_vec(y, dims, x.device())?.to_dtype(x.dtype())
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

    /// The same weights through easel's tiled CPU kernel: within the same bounds of the dense
    /// layer, and close to candle's own quantized product (which rounds the activations'
    /// block scales to f16 where easel keeps f32).
    #[test]
    fn tiled_linear_tracks_the_dense_one_and_candles_quantized_one() {
        if !quant_tiles::cpu_supported() {
            println!("skipped: this CPU lacks AVX2, FMA or F16C");
            return;
        }
        let dev = Device::Cpu;
        let w = Tensor::from_vec(fixed_values(64 * 256, 0.05, 0.0), (64, 256), &dev).unwrap();
        let x = Tensor::from_vec(fixed_values(2 * 5 * 256, 1.0, 0.5), (2, 5, 256), &dev).unwrap();
        let dense = Linear { weight: LinearWeight::Dense(w.clone()), bias: None, low_rank: vec![] }.forward(&x).unwrap();
        let relative = |a: &Tensor, b: &Tensor| {
            ((a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() / b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()).sqrt()
        };
        for (kind, t, bound, bound_vs_candle) in [(QuantKind::Q8_0, GgmlDType::Q8_0, 0.01, 2e-3), (QuantKind::Q4_0, GgmlDType::Q4_0, 0.15, 2e-3)] {
            let q = QTensor::quantize(&w, t).unwrap();
            let tiles = QuantTiles::from_blocks(kind, 64, 256, &q.data().unwrap()).unwrap();
            let tiled = Linear { weight: LinearWeight::Tiled(Arc::new(tiles)), bias: None, low_rank: vec![] }.forward(&x).unwrap();
            let candle = Linear { weight: LinearWeight::Quantized(QMatMul::from_qtensor(q).unwrap()), bias: None, low_rank: vec![] }.forward(&x).unwrap();
            assert_eq!(tiled.dims(), &[2, 5, 64]);
            let (err, vs_candle) = (relative(&tiled, &dense), relative(&tiled, &candle));
            println!("{t:?}: relative error {err}, {vs_candle} from candle's");
            assert!(err < bound, "{t:?}: relative error {err}");
            assert!(vs_candle < bound_vs_candle, "{t:?}: {vs_candle} from candle's");
        }
    }

    /// Loading tiles q8_0/q4_0 linear weights (q8_0 only where candle has no VNNI kernel) and
    /// leaves embeddings, other types and untileable shapes as GGML blocks; dequantizing gives
    /// the same values either way.
    #[test]
    fn loading_tiles_only_tileable_linear_weights_and_keeps_their_values() {
        let dev = Device::Cpu;
        let w = Tensor::from_vec(fixed_values(16 * 64, 0.05, 0.0), (16, 64), &dev).unwrap();
        let mut params = HashMap::new();
        for (name, t) in [("a.weight", GgmlDType::Q4_0), ("b.weight", GgmlDType::Q8_0), ("c.weight", GgmlDType::Q4K), ("time_embed.weight", GgmlDType::Q4_0)] {
            let w = if t == GgmlDType::Q4K { w.repeat((1, 4)).unwrap() } else { w.clone() };
            params.insert(name.to_string(), Param::Quantized(Arc::new(QTensor::quantize(&w, t).unwrap())));
        }
        let narrow = Tensor::from_vec(fixed_values(12 * 64, 0.05, 0.0), (12, 64), &dev).unwrap();
        params.insert("d.weight".into(), Param::Quantized(Arc::new(QTensor::quantize(&narrow, GgmlDType::Q4_0).unwrap())));
        let before: HashMap<String, Vec<f32>> = params.iter().map(|(k, p)| (k.clone(), p.dequantize(&dev).unwrap().flatten_all().unwrap().to_vec1().unwrap())).collect();
        let weights = Weights::new(params, Path::new("test"), DType::F32, &dev).unwrap();
        let tiled = |name: &str| matches!(weights.params[name], Param::Tiled(_));
        let supported = quant_tiles::cpu_supported();
        assert_eq!(tiled("a.weight"), supported);
        assert_eq!(tiled("b.weight"), supported && !candle_tiles_q8_0());
        assert!(!tiled("c.weight") && !tiled("time_embed.weight") && !tiled("d.weight"));
        for (name, values) in before {
            let p = &weights.params[&name];
            assert_eq!(p.dequantize(&dev).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), values, "{name}");
            assert!(!matches!(p, Param::Dense(_)), "{name}");
        }
        assert_eq!(weights.params["a.weight"].type_name(), "q4_0");
        assert_eq!(weights.params["a.weight"].bytes(), 16 * 2 * 18);
    }
}
