//! The `AutoencoderKL` every pipeline family shares (4-channel SD, 16-channel FLUX and SD 3.5),
//! with diffusers' latent scaling and shift. The decoder is loaded with the pipeline; the encoder
//! only when the first image-to-image request needs it, so text-to-image never holds it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::config::{read_json, VaeConfig};
use crate::error::Result;
use crate::models::autoencoder_kl::{AutoencoderKLDecoder, AutoencoderKLEncoder};
use crate::scheduler::NoiseSource;
use crate::weights::source::component_weights;
use crate::weights::{bad_weights, load_var_builder};

/// Where the VAE's weights are, for building the encoder on first use.
enum VaeWeights {
    /// Safetensors files, memory-mapped.
    Files(Vec<PathBuf>),
    /// Tensors already in memory (an SD single file's `first_stage_model`).
    Tensors(Arc<HashMap<String, Tensor>>),
}

impl VaeWeights {
    fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        match self {
            Self::Files(files) => load_var_builder(files, dtype, device),
            Self::Tensors(tensors) => Ok(VarBuilder::from_tensors((**tensors).clone(), dtype, device)),
        }
    }
}

/// A loaded VAE and its config.
pub struct Vae {
    model: AutoencoderKLDecoder,
    encoder: OnceLock<AutoencoderKLEncoder>,
    pub config: VaeConfig,
    dir: PathBuf,
    weights: VaeWeights,
    dtype: DType,
    device: Device,
}

impl Vae {
    /// Loads `dir/vae`.
    pub fn load(dir: &Path, half: bool, dtype: DType, device: &Device) -> Result<Self> {
        Self::with_weights(dir, VaeWeights::Files(component_weights(dir, "vae", half)?), dtype, device)
    }

    /// The VAE with `dir/vae`'s config and the given weights (from an SD single file).
    pub fn from_tensors(dir: &Path, tensors: HashMap<String, Tensor>, dtype: DType, device: &Device) -> Result<Self> {
        Self::with_weights(dir, VaeWeights::Tensors(Arc::new(tensors)), dtype, device)
    }

    fn with_weights(dir: &Path, weights: VaeWeights, dtype: DType, device: &Device) -> Result<Self> {
        let config: VaeConfig = read_json(&dir.join("vae").join("config.json"))?;
        let vb = weights.var_builder(dtype, device)?;
        let model = AutoencoderKLDecoder::new(vb, &config).map_err(|e| bad_weights(&dir.join("vae"), &e))?;
        Ok(Self { model, encoder: OnceLock::new(), config, dir: dir.join("vae"), weights, dtype, device: device.clone() })
    }

    fn encoder(&self) -> Result<&AutoencoderKLEncoder> {
        if let Some(encoder) = self.encoder.get() {
            return Ok(encoder);
        }
        let vb = self.weights.var_builder(self.dtype, &self.device)?;
        let encoder = AutoencoderKLEncoder::new(vb, &self.config).map_err(|e| bad_weights(&self.dir, &e))?;
        // A concurrent first use may have set it meanwhile; either encoder is the same.
        Ok(self.encoder.get_or_init(|| encoder))
    }

    /// Encodes images `[B, 3, H, W]` in `[0, 1]` to scaled latents as diffusers' image-to-image
    /// pipelines do: a sample of the latent distribution (`mean + std * eps`, `eps` drawn from
    /// `noise` with shape `[B, C, h, w]`), then `(z - shift_factor) * scaling_factor`.
    pub fn encode(&self, images: &Tensor, noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let encoder = self.encoder()?;
        let pixels = ((images.to_device(&self.device)?.to_dtype(self.dtype)? * 2.0)? - 1.0)?;
        let mut moments = Vec::with_capacity(pixels.dim(0)?);
        for i in 0..pixels.dim(0)? {
            moments.push(encoder.encode(&pixels.narrow(0, i, 1)?)?);
        }
        let moments = Tensor::cat(&moments, 0)?;
        let channels = self.config.latent_channels;
        let mean = moments.narrow(1, 0, channels)?;
        let log_var = moments.narrow(1, channels, channels)?.clamp(-30f32, 20f32)?;
        let std = (log_var * 0.5)?.exp()?;
        let eps = noise.randn(mean.dims(), mean.dtype(), mean.device())?;
        let z = (mean + (std * eps)?)?;
        let z = match self.config.shift_factor {
            Some(shift) => (z - shift)?,
            None => z,
        };
        Ok((z * self.config.scaling_factor)?)
    }

    /// The compute type (the pipeline's, for full-precision components).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Pixels per latent cell along each side.
    pub fn scale_factor(&self) -> usize {
        1 << self.config.block_out_channels.len().saturating_sub(1)
    }

    /// Decodes `[B, C, h, w]` latents to images in `[0, 1]` (f32, CPU), as the diffusers
    /// pipelines do: `latents / scaling_factor + shift_factor`. Images are decoded one at a time
    /// (diffusers' VAE slicing), so a batch's decode needs one image's activations, not n.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let scaled = (latents / self.config.scaling_factor)?;
        let scaled = match self.config.shift_factor {
            Some(shift) => (scaled + shift)?,
            None => scaled,
        };
        let scaled = scaled.to_dtype(self.dtype)?;
        let mut images = Vec::with_capacity(scaled.dim(0)?);
        for i in 0..scaled.dim(0)? {
            let image = self.model.decode(&scaled.narrow(0, i, 1)?)?;
            images.push(((image.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?.to_device(&Device::Cpu)?);
        }
        Ok(Tensor::cat(&images, 0)?)
    }

    /// Peak bytes per output pixel of decoding one image: the largest convolution's buffers
    /// ([`crate::models::conv::conv_bytes_per_pixel`]) at that convolution's resolution.
    pub fn decode_bytes_per_pixel(&self) -> u64 {
        let c = &self.config;
        let reversed: Vec<u64> = c.block_out_channels.iter().rev().map(|&x| x as u64).collect();
        let levels = reversed.len() as u32;
        // (input channels, output channels, pixels per output pixel as a power of 1/4)
        let mut convs = vec![(c.latent_channels as u64, reversed.first().copied().unwrap_or(0), levels.saturating_sub(1))];
        for (i, &cout) in reversed.iter().enumerate() {
            let shrink = levels.saturating_sub(1 + i as u32);
            let cin = if i == 0 { cout } else { reversed[i - 1] };
            convs.push((cin.max(cout), cout, shrink));
            if shrink > 0 {
                convs.push((cout, cout, shrink - 1));
            }
        }
        convs.push((reversed.last().copied().unwrap_or(0), c.out_channels as u64, 0));
        let bytes = |cin, cout| crate::models::conv::conv_bytes_per_pixel(cin, cout, self.dtype, &self.device);
        convs.iter().map(|&(cin, cout, shrink)| bytes(cin, cout) / 4u64.pow(shrink)).max().unwrap_or(0)
    }
}
