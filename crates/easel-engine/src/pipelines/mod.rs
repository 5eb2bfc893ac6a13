//! The pipelines, one module per model family (pictures in go through [`images_in`]), and
//! [`Pipeline`]: a loaded model of any family behind one interface, chosen by
//! `model_index.json`'s class.

use std::path::Path;

use crate::config::{read_json, ModelIndex};
use crate::error::{EngineError, Result};
pub mod clip_image;
pub mod common;
pub mod control;
pub mod flux;
pub mod image_prompt;
pub mod images_in;
pub mod sd;
pub mod sd3;
pub mod vae;

pub use common::{Family, GenerateParams, Generated, InitImage, LoadOptions, ModelDefaults, SkipLayerGuidance, StepCache, StepCallback, TextEncoderFiles};
pub use clip_image::RgbPicture;
pub use control::{ControlNet, ControlNetHost, ControlUnit};
pub use image_prompt::{IpAdapter, IpAdapterUnit};
pub use images_in::rgb_pixels;
pub use flux::FluxPipeline;
pub use sd::StableDiffusionPipeline;
pub use sd3::Sd3Pipeline;
use crate::scheduler::{NoiseSource, SchedulerKind};

/// Any pipeline easel runs.
pub enum Pipeline {
    StableDiffusion(StableDiffusionPipeline),
    Flux(FluxPipeline),
    Sd3(Sd3Pipeline),
}

impl Pipeline {
    /// Loads the pipeline `dir/model_index.json` names.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let index: ModelIndex = read_json(&dir.join("model_index.json"))?;
        match index.class_name.as_str() {
            // FLUX Fill names the same components; its transformer is wider in.
            "FluxPipeline" | "FluxImg2ImgPipeline" | "FluxFillPipeline" => return Ok(Self::Flux(FluxPipeline::load(dir, opts)?)),
            "StableDiffusion3Pipeline" => return Ok(Self::Sd3(Sd3Pipeline::load(dir, opts)?)),
            _ => {}
        }
        if opts.transformer.is_some() {
            return Err(EngineError::param("transformer", format!("a transformer file is for FLUX and SD 3.5 models; {} is a {}", dir.display(), index.class_name)));
        }
        Ok(Self::StableDiffusion(StableDiffusionPipeline::load(dir, opts)?))
    }

    /// This pipeline with a LoRA stack applied (an empty stack gives an unchanged copy); the
    /// base model is shared, not read again.
    pub fn with_loras(&self, stack: &[crate::weights::lora::LoraSpec]) -> Result<Self> {
        Ok(match self {
            Self::StableDiffusion(p) => Self::StableDiffusion(p.with_loras(stack)?),
            Self::Flux(p) => Self::Flux(p.with_loras(stack)?),
            Self::Sd3(p) => Self::Sd3(p.with_loras(stack)?),
        })
    }

    /// The conditioning scheme.
    pub fn family(&self) -> Family {
        match self {
            Self::StableDiffusion(p) => p.family(),
            Self::Flux(p) if p.uses_guidance() => Family::FluxDev,
            Self::Flux(_) => Family::FluxSchnell,
            Self::Sd3(_) => Family::Sd3,
        }
    }

    /// What a single-file ControlNet, which has no config, takes its architecture from: the
    /// UNet's config or the FLUX transformer's (`None` for SD 3.5, which takes no ControlNets).
    pub fn controlnet_host(&self) -> Option<ControlNetHost<'_>> {
        match self {
            Self::StableDiffusion(p) => Some(ControlNetHost::Unet(p.unet_config())),
            Self::Flux(p) => Some(ControlNetHost::Flux(&p.transformer().config)),
            Self::Sd3(_) => None,
        }
    }

    /// The UNet's config, for the Stable Diffusion family.
    pub fn unet_config(&self) -> Option<&crate::config::UNetConfig> {
        match self {
            Self::StableDiffusion(p) => Some(p.unet_config()),
            Self::Flux(_) | Self::Sd3(_) => None,
        }
    }

    /// The directory the pipeline was loaded from.
    pub fn dir(&self) -> &Path {
        match self {
            Self::StableDiffusion(p) => p.dir(),
            Self::Flux(p) => p.dir(),
            Self::Sd3(p) => p.dir(),
        }
    }

    /// The image side a request without a size gets.
    pub fn default_size(&self) -> usize {
        match self {
            Self::StableDiffusion(p) => p.default_size(),
            Self::Flux(p) => p.default_size(),
            Self::Sd3(p) => p.default_size(),
        }
    }

    /// Width and height must be multiples of this.
    pub fn size_multiple(&self) -> usize {
        match self {
            Self::StableDiffusion(_) => 8,
            Self::Flux(p) => p.size_multiple(),
            Self::Sd3(p) => p.size_multiple(),
        }
    }

    /// How this family's diffusers image-to-image pipeline turns `strength` into a first step.
    pub fn strength_rounding(&self) -> images_in::StrengthRounding {
        match self {
            Self::StableDiffusion(_) => images_in::StrengthRounding::WholeSteps,
            Self::Flux(_) | Self::Sd3(_) => images_in::StrengthRounding::FlowMatch,
        }
    }

    /// The scheduler a request without one gets.
    pub fn default_scheduler(&self) -> SchedulerKind {
        match self {
            Self::StableDiffusion(p) => p.default_scheduler(),
            Self::Flux(_) | Self::Sd3(_) => SchedulerKind::FlowMatchEuler,
        }
    }

    /// The schedulers requests may ask for.
    pub fn schedulers(&self) -> Vec<SchedulerKind> {
        let flow = matches!(self, Self::Flux(_) | Self::Sd3(_));
        SchedulerKind::ALL.iter().map(|(_, k)| *k).filter(|k| k.is_flow_matching() == flow).collect()
    }

    /// The model's own scheduler class when easel lacks it and runs Euler instead.
    pub fn substituted_scheduler(&self) -> Option<&str> {
        match self {
            Self::StableDiffusion(p) => p.substituted_scheduler(),
            Self::Flux(_) | Self::Sd3(_) => None,
        }
    }

    /// Whether the guidance scale means anything to this model (not to FLUX.1-schnell).
    pub fn uses_guidance(&self) -> bool {
        match self {
            Self::StableDiffusion(_) | Self::Sd3(_) => true,
            Self::Flux(p) => p.uses_guidance(),
        }
    }

    /// The denoiser's weight memory in bytes with a summary of the tensor types, where known.
    pub fn weights_memory(&self) -> Option<(usize, String)> {
        match self {
            Self::StableDiffusion(_) => None,
            Self::Flux(p) => Some((p.weights_memory().0, p.weights_memory().1.to_string())),
            Self::Sd3(p) => Some((p.weights_memory().0, p.weights_memory().1.to_string())),
        }
    }

    /// What a request's activations need beyond the weights, for refusing a request that
    /// cannot fit before it is queued. An estimate from the configs: guidance is assumed, the
    /// SD term is calibrated on one measurement (see the SD pipeline's), FLUX's is not yet.
    pub fn activation_memory(&self) -> ActivationMemory {
        match self {
            Self::StableDiffusion(p) => p.activation_memory(),
            Self::Flux(p) => p.activation_memory(),
            Self::Sd3(p) => p.activation_memory(),
        }
    }

    /// Checks request parameters before any work is done.
    pub fn validate(&self, p: &GenerateParams) -> Result<()> {
        match self {
            Self::StableDiffusion(s) => s.validate(p),
            Self::Flux(f) => f.validate(p),
            Self::Sd3(f) => f.validate(p),
        }
    }

    /// Generates images for one request (`noise`, when given, feeds ancestral SD schedulers and
    /// image-to-image's latent sample, in diffusers' order).
    pub fn generate(&self, p: &GenerateParams, noise: Option<&mut dyn NoiseSource>, on_step: StepCallback) -> Result<Generated> {
        match self {
            Self::StableDiffusion(s) => s.generate(p, noise, on_step),
            Self::Flux(f) => f.generate_batch_with_noise(std::slice::from_ref(p), noise, on_step)?.pop().ok_or_else(|| EngineError::Unsupported("empty batch".into())),
            Self::Sd3(f) => f.generate_batch_with_noise(std::slice::from_ref(p), noise, on_step)?.pop().ok_or_else(|| EngineError::Unsupported("empty batch".into())),
        }
    }

    /// Runs compatible requests as one batch; each gets exactly what it would get alone.
    pub fn generate_batch(&self, items: &[GenerateParams], noise: Option<&mut dyn NoiseSource>, on_step: StepCallback) -> Result<Vec<Generated>> {
        match self {
            Self::StableDiffusion(s) => s.generate_batch(items, noise, on_step),
            Self::Flux(f) => f.generate_batch_with_noise(items, noise, on_step),
            Self::Sd3(f) => f.generate_batch_with_noise(items, noise, on_step),
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
