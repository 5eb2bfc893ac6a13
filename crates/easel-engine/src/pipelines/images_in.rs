//! Pictures in: image-to-image and inpainting, as diffusers' Img2Img and Inpaint pipelines
//! prepare them. A request's [`InitImage`] (the picture, `strength`, and a mask for
//! inpainting) decides the first step and the first latents; inpainting also changes what the
//! denoising loop does ([`Inpainting`]): extra UNet input channels, or a blend with the picture
//! after each step. Every family's pipeline calls in here, so the rules live in one place.

use candle_core::{Device, Tensor};

use super::vae::Vae;
use crate::error::{EngineError, Result};
use crate::scheduler::{NoiseSource, Scheduler};

/// An image to start from, as diffusers' image-to-image pipelines take it.
#[derive(Debug, Clone)]
pub struct InitImage {
    /// `[1, 3, height, width]` pixels in `[0, 1]`, already at the request's size (the CLI and the
    /// server resize).
    pub pixels: Tensor,
    /// diffusers' `strength`: the fraction of the schedule that runs, from noise at that level.
    /// 1 repaints everything (the image only sets the first latents' mean); 0.3 keeps most of it.
    pub strength: f64,
    /// Inpainting: `[1, 1, height, width]`, 1 where the picture is repainted and 0 where it is
    /// kept (binarised, as diffusers' mask processor leaves it).
    pub mask: Option<Tensor>,
}

/// Where an inpainting request starts, and what its denoising loop needs besides the latents.
pub(crate) struct InpaintStart {
    pub latents: Tensor,
    /// The mask at latent size, a row per image.
    pub mask: Tensor,
    /// What a 9-channel inpainting UNet sees beside the latents and the mask: the latents of
    /// the picture with its repainted region grey.
    pub masked_image_latents: Option<Tensor>,
    /// What a 4-channel UNet's latents are blended with after each step outside the mask:
    /// the picture's clean latents, re-noised with `noise` to the next step's level.
    pub image_latents: Option<Tensor>,
    pub noise: Tensor,
}

/// `torch.nn.functional.interpolate(x, size=(h, w))` (mode "nearest") of `[b, c, H, W]`:
/// output pixel `i` takes input pixel `floor(i * H / h)`.
pub(crate) fn nearest_resize(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (_, _, in_h, in_w) = x.dims4()?;
    let pick = |out: usize, input: usize| -> Result<Tensor> {
        let scale = input as f64 / out as f64;
        let idx: Vec<u32> = (0..out).map(|i| ((i as f64 * scale).floor() as usize).min(input - 1) as u32).collect();
        Ok(Tensor::from_vec(idx, out, x.device())?)
    };
    Ok(x.index_select(&pick(h, in_h)?, 2)?.index_select(&pick(w, in_w)?, 3)?)
}

/// RGB8 pixels, row-major (`width * height * 3` bytes), as `[1, 3, height, width]` values in
/// `[0, 1]` (what diffusers' image processors make of a picture before normalising); `param`
/// names the request field on error.
pub fn rgb_pixels(param: &'static str, width: usize, height: usize, rgb: &[u8]) -> Result<Tensor> {
    if rgb.len() != width * height * 3 {
        return Err(EngineError::param(param, format!("{} bytes are not a {width}x{height} RGB image", rgb.len())));
    }
    let values: Vec<f32> = rgb.iter().map(|&v| v as f32 / 255.0).collect();
    Ok(Tensor::from_vec(values, (1, height, width, 3), &Device::Cpu)?.permute((0, 3, 1, 2))?.contiguous()?)
}

/// How a pipeline family turns `strength` into the step it starts from; diffusers rounds
/// differently per pipeline, and the first step decides which noise level the image gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrengthRounding {
    /// The SD img2img pipelines: `int(steps * strength)` steps run.
    WholeSteps,
    /// FluxImg2ImgPipeline: starts at `int(steps - steps * strength)`.
    FlowMatch,
}

impl InitImage {
    /// From RGB8 pixels, row-major (`width * height * 3` bytes), as `[0, 1]` values.
    pub fn from_rgb(width: usize, height: usize, rgb: &[u8], strength: f64) -> Result<Self> {
        Ok(Self { pixels: rgb_pixels("image", width, height, rgb)?, strength, mask: None })
    }

    /// With an inpainting mask from 8-bit grey levels, row-major (`width * height` bytes):
    /// white (128 and up, as diffusers binarises at 0.5) is repainted, black is kept.
    pub fn with_mask(self, width: usize, height: usize, grey: &[u8]) -> Result<Self> {
        if grey.len() != width * height {
            return Err(EngineError::param("mask", format!("{} bytes are not a {width}x{height} grey mask", grey.len())));
        }
        let values: Vec<f32> = grey.iter().map(|&v| if v >= 128 { 1.0 } else { 0.0 }).collect();
        Ok(Self { mask: Some(Tensor::from_vec(values, (1, 1, height, width), &Device::Cpu)?), ..self })
    }

    /// Where an inpainting request starts, as StableDiffusionInpaintPipeline prepares it, with
    /// diffusers' draws in diffusers' order from `source`: the picture's latent sample (unless a
    /// 9-channel UNet starts from pure noise), then the masked picture's. `init` is the added
    /// noise; at strength 1 the latents are that noise alone, scaled as for text-to-image.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn inpaint_start(
        &self,
        vae: &Vae,
        source: &mut dyn NoiseSource,
        images: usize,
        init: &Tensor,
        scheduler: &dyn Scheduler,
        start: usize,
        unet_sees_mask: bool,
    ) -> Result<InpaintStart> {
        let mask = self.mask.as_ref().ok_or_else(|| EngineError::param("mask", "inpainting needs a mask"))?;
        let repeat = |t: Tensor| -> Result<Tensor> { Ok(Tensor::cat(&vec![t; images], 0)?) };
        let dtype = init.dtype();
        let from_noise = self.strength == 1.0;
        let image_latents = if !unet_sees_mask || !from_noise { Some(repeat(vae.encode(&self.pixels, source)?.to_dtype(dtype)?)?) } else { None };
        let latents = match (&image_latents, from_noise) {
            (Some(clean), false) => scheduler.add_noise(clean, init, start)?,
            _ => (init * scheduler.init_noise_sigma())?,
        };
        let masked = self.masked_pixels(mask)?;
        let (_, _, h, w) = init.dims4()?;
        let masked_image_latents = if unet_sees_mask {
            Some(repeat(vae.encode(&masked, source)?.to_dtype(dtype)?)?)
        } else {
            // A 4-channel UNet never sees them, but diffusers draws their sample all the same.
            source.randn(&[1, init.dim(1)?, h, w], dtype, init.device())?;
            None
        };
        let small = nearest_resize(mask, h, w)?.to_device(init.device())?.to_dtype(dtype)?;
        Ok(InpaintStart { latents, mask: repeat(small)?, masked_image_latents, image_latents, noise: init.clone() })
    }

    /// The picture with its repainted region grey: diffusers zeroes it in [-1, 1], which is 0.5
    /// in [0, 1].
    fn masked_pixels(&self, mask: &Tensor) -> Result<Tensor> {
        let mask = mask.to_device(self.pixels.device())?.to_dtype(self.pixels.dtype())?;
        let keep = (1.0 - &mask)?;
        Ok((self.pixels.broadcast_mul(&keep)? + (mask * 0.5)?.broadcast_as(self.pixels.shape())?)?)
    }

    /// What FluxFillPipeline puts beside the latents at every step, for `images` rows: the
    /// masked picture's latents (its latent sample's noise from `source`), and the mask with
    /// each latent cell's `factor x factor` pixels folded into channels, both packed as FLUX
    /// packs latents (`pack`), joined along channels: `[images, tokens, 4C + 4 factor²]`.
    pub(crate) fn fill_condition(&self, vae: &Vae, source: &mut dyn NoiseSource, pack: fn(&Tensor) -> Result<Tensor>, images: usize, factor: usize, dtype: candle_core::DType) -> Result<Tensor> {
        let mask = self.mask.as_ref().ok_or_else(|| EngineError::param("mask", "FLUX Fill models repaint where a mask says; send one"))?;
        let masked = pack(&vae.encode(&self.masked_pixels(mask)?, source)?.to_dtype(dtype)?)?;
        let (_, _, height, width) = mask.dims4()?;
        let (h, w) = (height / factor, width / factor);
        let folded = mask.reshape((1, h, factor, w, factor))?.permute((0, 2, 4, 1, 3))?.reshape((1, factor * factor, h, w))?;
        let folded = pack(&folded.to_device(masked.device())?.to_dtype(dtype)?)?;
        let condition = Tensor::cat(&[&masked, &folded], 2)?;
        Ok(Tensor::cat(&vec![condition; images], 0)?)
    }

    /// The index of the first step that runs out of `steps`, as the family's diffusers pipeline
    /// computes it; an error naming `strength` when no step would run.
    pub fn first_step(&self, steps: usize, rounding: StrengthRounding) -> Result<usize> {
        let n = steps as f64;
        let start = match rounding {
            StrengthRounding::WholeSteps => steps - ((n * self.strength) as usize).min(steps),
            StrengthRounding::FlowMatch => (n - (n * self.strength).min(n)).max(0.0) as usize,
        };
        if start >= steps {
            return Err(EngineError::param(
                "strength",
                format!("{} with {steps} steps leaves no step to run; raise strength or steps", self.strength),
            ));
        }
        Ok(start)
    }

    /// The first latents of an image-to-image request: the image encoded by `vae` (its latent
    /// sample's noise from `source`), arranged as the denoiser takes latents (`arrange`: FLUX
    /// packs them), repeated for each of the request's `images`, and noised with `init` to the
    /// level of step `start` of `scheduler`.
    pub(crate) fn start_latents(
        &self,
        vae: &Vae,
        source: &mut dyn NoiseSource,
        arrange: fn(&Tensor) -> Result<Tensor>,
        images: usize,
        init: &Tensor,
        scheduler: &dyn Scheduler,
        start: usize,
    ) -> Result<Tensor> {
        let clean = arrange(&vae.encode(&self.pixels, source)?.to_dtype(init.dtype())?)?;
        let clean = Tensor::cat(&vec![clean; images], 0)?;
        scheduler.add_noise(&clean, init, start)
    }

    /// Checks the image (and mask) against the request's size.
    pub(crate) fn check(&self, width: usize, height: usize) -> Result<()> {
        if let Some(mask) = &self.mask {
            if mask.dims() != [1, 1, height, width] {
                return Err(EngineError::param("mask", format!("mask {:?} does not match the request's {width}x{height}", mask.dims())));
            }
        }
        if !self.strength.is_finite() || !(0.0..=1.0).contains(&self.strength) {
            return Err(EngineError::param("strength", format!("{} must be between 0 and 1", self.strength)));
        }
        if self.pixels.dims() != [1, 3, height, width] {
            return Err(EngineError::param("image", format!("pixels {:?} do not match the request's {width}x{height}", self.pixels.dims())));
        }
        Ok(())
    }
}

/// What the denoising loop of an inpainting batch adds, joined over its requests: the extra
/// UNet input channels (9-channel UNets), or the blend with the picture (4-channel UNets).
pub(crate) struct Inpainting {
    /// `[mask, masked picture latents]` along channels, doubled for classifier-free guidance.
    pub unet_extra: Option<Tensor>,
    pub blend: Option<Blend>,
}

/// StableDiffusionInpaintPipeline's latent blending for 4-channel UNets: after step `i`, the
/// region outside the mask is replaced by the picture's latents noised to step `i + 1`'s level
/// (clean after the last step).
pub(crate) struct Blend {
    mask: Tensor,
    image_latents: Tensor,
    noise: Tensor,
}

impl Blend {
    pub fn apply(&self, latents: &Tensor, scheduler: &dyn Scheduler, next: usize, steps: usize) -> Result<Tensor> {
        let proper = if next < steps { scheduler.add_noise(&self.image_latents, &self.noise, next)? } else { self.image_latents.clone() };
        let keep = (1.0 - &self.mask)?;
        Ok((proper.broadcast_mul(&keep)? + latents.broadcast_mul(&self.mask)?)?)
    }
}

impl Inpainting {
    pub fn join(parts: &[InpaintStart], guided: bool) -> Result<Option<Self>> {
        if parts.is_empty() {
            return Ok(None);
        }
        let cat = |f: &dyn Fn(&InpaintStart) -> Option<&Tensor>| -> Result<Option<Tensor>> {
            let all: Option<Vec<&Tensor>> = parts.iter().map(f).collect();
            Ok(match all {
                Some(all) => Some(Tensor::cat(&all, 0)?),
                None => None,
            })
        };
        let mask = cat(&|x| Some(&x.mask))?.ok_or_else(|| EngineError::param("mask", "no mask"))?;
        let unet_extra = match cat(&|x| x.masked_image_latents.as_ref())? {
            Some(masked) => {
                let extra = Tensor::cat(&[&mask, &masked], 1)?;
                Some(if guided { Tensor::cat(&[&extra, &extra], 0)? } else { extra })
            }
            None => None,
        };
        let blend = match (cat(&|x| x.image_latents.as_ref())?, unet_extra.is_none()) {
            (Some(image_latents), true) => Some(Blend { mask, image_latents, noise: cat(&|x| Some(&x.noise))?.ok_or_else(|| EngineError::param("mask", "no noise"))? }),
            _ => None,
        };
        Ok(Some(Self { unet_extra, blend }))
    }
}
