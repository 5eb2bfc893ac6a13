//! The `AutoencoderKL` decoder every pipeline family shares (4-channel SD, 16-channel FLUX),
//! with diffusers' latent scaling and shift.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};

use crate::config::{read_json, VaeConfig};
use crate::error::Result;
use crate::source::component_weights;
use crate::weights::{bad_weights, load_var_builder};

/// A loaded VAE and its config.
pub struct Vae {
    model: AutoEncoderKL,
    pub config: VaeConfig,
    dtype: DType,
}

impl Vae {
    /// Loads `dir/vae`.
    pub fn load(dir: &Path, half: bool, dtype: DType, device: &Device) -> Result<Self> {
        let config: VaeConfig = read_json(&dir.join("vae").join("config.json"))?;
        let vb = load_var_builder(&component_weights(dir, "vae", half)?, dtype, device)?;
        let model = AutoEncoderKL::new(
            vb,
            config.in_channels,
            config.out_channels,
            AutoEncoderKLConfig {
                block_out_channels: config.block_out_channels.clone(),
                layers_per_block: config.layers_per_block,
                latent_channels: config.latent_channels,
                norm_num_groups: config.norm_num_groups,
                use_quant_conv: config.use_quant_conv,
                use_post_quant_conv: config.use_post_quant_conv,
            },
        )
        .map_err(|e| bad_weights(&dir.join("vae"), &e))?;
        Ok(Self { model, config, dtype })
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
    /// pipelines do: `latents / scaling_factor + shift_factor`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let scaled = (latents / self.config.scaling_factor)?;
        let scaled = match self.config.shift_factor {
            Some(shift) => (scaled + shift)?,
            None => scaled,
        };
        let image = self.model.decode(&scaled.to_dtype(self.dtype)?)?;
        Ok(((image.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?.to_device(&Device::Cpu)?)
    }
}

/// How many prompts' embeddings a pipeline remembers.
const PROMPT_CACHE_SIZE: usize = 256;

/// Text embeddings of recently seen prompts (a prompt repeated across jobs is encoded once).
pub(crate) struct PromptCache<T: Clone> {
    entries: std::sync::Mutex<std::collections::HashMap<String, T>>,
}

impl<T: Clone> Default for PromptCache<T> {
    fn default() -> Self {
        Self { entries: Default::default() }
    }
}

impl<T: Clone> PromptCache<T> {
    /// The cached value for `prompt`, or `encode(prompt)` remembered.
    pub fn get_or_encode(&self, prompt: &str, encode: impl FnOnce(&str) -> Result<T>) -> Result<T> {
        if let Some(hit) = self.entries.lock().unwrap_or_else(|p| p.into_inner()).get(prompt) {
            return Ok(hit.clone());
        }
        let value = encode(prompt)?;
        let mut cache = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= PROMPT_CACHE_SIZE {
            cache.clear();
        }
        cache.insert(prompt.to_string(), value.clone());
        Ok(value)
    }
}
