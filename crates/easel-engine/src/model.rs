//! A loaded model of any family behind one interface, chosen by `model_index.json`'s class.

use std::path::Path;

use crate::config::{read_json, ModelIndex};
use crate::error::{EngineError, Result};
use crate::flux_pipeline::FluxPipeline;
use crate::pipeline::{Family, GenerateParams, Generated, LoadOptions, StableDiffusionPipeline, StepCallback};
use crate::scheduler::{NoiseSource, SchedulerKind};

/// Any pipeline easel runs.
pub enum Pipeline {
    StableDiffusion(StableDiffusionPipeline),
    Flux(FluxPipeline),
}

impl Pipeline {
    /// Loads the pipeline `dir/model_index.json` names.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let index: ModelIndex = read_json(&dir.join("model_index.json"))?;
        if index.class_name == "FluxPipeline" {
            return Ok(Self::Flux(FluxPipeline::load(dir, opts)?));
        }
        if opts.transformer.is_some() {
            return Err(EngineError::param("transformer", format!("a transformer file is for FLUX models; {} is a {}", dir.display(), index.class_name)));
        }
        Ok(Self::StableDiffusion(StableDiffusionPipeline::load(dir, opts)?))
    }

    /// This pipeline with a LoRA stack applied (an empty stack gives an unchanged copy); the
    /// base model is shared, not read again.
    pub fn with_loras(&self, stack: &[crate::lora::LoraSpec]) -> Result<Self> {
        Ok(match self {
            Self::StableDiffusion(p) => Self::StableDiffusion(p.with_loras(stack)?),
            Self::Flux(p) => Self::Flux(p.with_loras(stack)?),
        })
    }

    /// The conditioning scheme.
    pub fn family(&self) -> Family {
        match self {
            Self::StableDiffusion(p) => p.family(),
            Self::Flux(p) if p.uses_guidance() => Family::FluxDev,
            Self::Flux(_) => Family::FluxSchnell,
        }
    }

    /// The directory the pipeline was loaded from.
    pub fn dir(&self) -> &Path {
        match self {
            Self::StableDiffusion(p) => p.dir(),
            Self::Flux(p) => p.dir(),
        }
    }

    /// The image side a request without a size gets.
    pub fn default_size(&self) -> usize {
        match self {
            Self::StableDiffusion(p) => p.default_size(),
            Self::Flux(p) => p.default_size(),
        }
    }

    /// Width and height must be multiples of this.
    pub fn size_multiple(&self) -> usize {
        match self {
            Self::StableDiffusion(_) => 8,
            Self::Flux(p) => p.size_multiple(),
        }
    }

    /// The scheduler a request without one gets.
    pub fn default_scheduler(&self) -> SchedulerKind {
        match self {
            Self::StableDiffusion(p) => p.default_scheduler(),
            Self::Flux(_) => SchedulerKind::FlowMatchEuler,
        }
    }

    /// The schedulers requests may ask for.
    pub fn schedulers(&self) -> Vec<SchedulerKind> {
        let flow = matches!(self, Self::Flux(_));
        SchedulerKind::ALL.iter().map(|(_, k)| *k).filter(|k| k.is_flow_matching() == flow).collect()
    }

    /// The model's own scheduler class when easel lacks it and runs Euler instead.
    pub fn substituted_scheduler(&self) -> Option<&str> {
        match self {
            Self::StableDiffusion(p) => p.substituted_scheduler(),
            Self::Flux(_) => None,
        }
    }

    /// Whether the guidance scale means anything to this model (not to FLUX.1-schnell).
    pub fn uses_guidance(&self) -> bool {
        match self {
            Self::StableDiffusion(_) => true,
            Self::Flux(p) => p.uses_guidance(),
        }
    }

    /// The denoiser's weight memory in bytes with a summary of the tensor types, where known.
    pub fn weights_memory(&self) -> Option<(usize, String)> {
        match self {
            Self::StableDiffusion(_) => None,
            Self::Flux(p) => Some((p.weights_memory().0, p.weights_memory().1.to_string())),
        }
    }

    /// What a request's activations need beyond the weights, for refusing a request that
    /// cannot fit before it is queued. An estimate from the configs: guidance is assumed, the
    /// SD term is calibrated on one measurement (see the SD pipeline's), FLUX's is not yet.
    pub fn activation_memory(&self) -> ActivationMemory {
        match self {
            Self::StableDiffusion(p) => p.activation_memory(),
            Self::Flux(p) => p.activation_memory(),
        }
    }

    /// Checks request parameters before any work is done.
    pub fn validate(&self, p: &GenerateParams) -> Result<()> {
        match self {
            Self::StableDiffusion(s) => s.validate(p),
            Self::Flux(f) => f.validate(p),
        }
    }

    /// Generates images for one request (`noise` feeds ancestral SD schedulers).
    pub fn generate(&self, p: &GenerateParams, noise: Option<&mut dyn NoiseSource>, on_step: StepCallback) -> Result<Generated> {
        match self {
            Self::StableDiffusion(s) => s.generate(p, noise, on_step),
            Self::Flux(f) => f.generate(p, on_step),
        }
    }

    /// Runs compatible requests as one batch; each gets exactly what it would get alone.
    pub fn generate_batch(&self, items: &[GenerateParams], noise: Option<&mut dyn NoiseSource>, on_step: StepCallback) -> Result<Vec<Generated>> {
        match self {
            Self::StableDiffusion(s) => s.generate_batch(items, noise, on_step),
            Self::Flux(f) => f.generate_batch(items, on_step),
        }
    }
}

/// Activation memory of one request, in bytes: `fixed + n x pixels x denoise_per_pixel +
/// pixels x decode_per_pixel` (n images denoise as one batch; the VAE decodes one at a time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActivationMemory {
    /// Per output pixel of each image in the denoising batch.
    pub denoise_bytes_per_pixel: u64,
    /// Per output pixel of the one image being decoded.
    pub decode_bytes_per_pixel: u64,
    /// Independent of size: the attention score blocks.
    pub fixed_bytes: u64,
}
