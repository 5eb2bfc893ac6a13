//! easel-engine: local text-to-image inference on candle.
//!
//! Loads diffusers-layout pipelines from a folder (easel-hub fetches hub models into one), builds every
//! network from its `config.json`, and runs the denoising loop with schedulers that follow
//! diffusers step for step, so outputs match the reference implementation on the same weights
//! and the same init latents. This crate is the only one in the workspace that depends on
//! candle: a gateway-only build never compiles it.
//!
//! Families: Stable Diffusion 1.x/2.x/XL ([`StableDiffusionPipeline`]) and FLUX.1 dev/schnell
//! ([`FluxPipeline`], with BFL single-file and GGUF-quantized transformers); [`Pipeline`]
//! picks one from `model_index.json`.

pub mod config;
pub mod error;
pub mod models;
pub mod output;
pub mod parity;
pub mod pipelines;
pub mod preview;
pub mod scheduler;
pub mod tokenizer;
pub mod weights;

pub use candle_core::{DType, Device, Tensor};
pub use error::{EngineError, Result};
pub use pipelines::{rgb_pixels, ControlNet, ControlNetHost, ControlUnit, Family, IpAdapter, IpAdapterUnit, RgbPicture, FluxPipeline, GenerateParams, Generated, InitImage, LoadOptions, ModelDefaults, Pipeline, Sd3Pipeline, SkipLayerGuidance, StableDiffusionPipeline, StepCache, TextEncoderFiles};
pub use weights::{read_latents, read_tensor_names, read_tensors, write_latents};
pub use scheduler::SchedulerKind;

/// Parses a `--device` value: `cpu`, `cuda`, `cuda:N`, `metal` or `metal:N`, and opens it, so a
/// missing GPU is one clear line before any model loads.
pub fn parse_device(name: &str) -> Result<Device> {
    let (kind, ordinal) = match name.split_once(':') {
        Some((kind, n)) => {
            let n = n.parse::<usize>().map_err(|_| EngineError::param("device", format!("`{name}`: the GPU index after `:` must be a number, as in cuda:0")))?;
            (kind, n)
        }
        None => (name, 0),
    };
    match kind {
        "cpu" if ordinal == 0 => Ok(Device::Cpu),
        "cuda" if cfg!(feature = "cuda") => Device::new_cuda(ordinal).map_err(|e| {
            EngineError::Unsupported(format!("no CUDA device {ordinal} ({}); check nvidia-smi, or use --device cpu", one_line(&e)))
        }),
        "metal" if cfg!(feature = "metal") => Device::new_metal(ordinal).map_err(|e| {
            EngineError::Unsupported(format!("no Metal device {ordinal} ({}); use --device cpu", one_line(&e)))
        }),
        "cuda" | "metal" => Err(EngineError::Unsupported(format!(
            "device `{name}` is not available: this easel was built without {kind} support (build with --features {kind}, e.g. tools/gpu/build.sh), or use --device cpu"
        ))),
        _ => Err(EngineError::param("device", format!("unknown device `{name}`; expected cpu, cuda, cuda:N, metal or metal:N"))),
    }
}

/// A device error's text on one line: without the backtrace candle attaches when
/// RUST_BACKTRACE is set, and with driver messages' line breaks folded.
fn one_line(e: &candle_core::Error) -> String {
    let inner = match e {
        candle_core::Error::WithBacktrace { inner, .. } => inner.as_ref(),
        other => other,
    };
    inner.to_string().split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Parses a `--dtype` value.
pub fn parse_dtype(name: &str) -> Result<DType> {
    match name {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => Err(EngineError::param("dtype", format!("unknown dtype `{other}`; expected f32, f16 or bf16"))),
    }
}
