//! The decoder of diffusers' `AutoencoderTiny` (TAESD, TAESDXL, TAEF1: Ollin Boer Bohan's tiny
//! autoencoders), for step previews: a plain stack of 3x3 convolutions, ReLUs, residual blocks
//! and nearest-neighbour upsampling that turns latents into a full-size picture in a fraction
//! of the real VAE's time. Module names mirror diffusers' `DecoderTiny` (`decoder.layers.N`,
//! an `nn.Sequential` whose indices count the activations and upsamplers too), so a
//! `diffusion_pytorch_model.safetensors` loads as is.

use std::path::Path;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};
use serde::Deserialize;

/// `config.json` of an `AutoencoderTiny` (the decoder's part).
#[derive(Debug, Clone, Deserialize)]
pub struct TinyConfig {
    #[serde(default = "default_four")]
    pub latent_channels: usize,
    #[serde(default = "default_three")]
    pub out_channels: usize,
    #[serde(default = "default_blocks_out")]
    pub decoder_block_out_channels: Vec<usize>,
    #[serde(default = "default_blocks")]
    pub num_decoder_blocks: Vec<usize>,
    #[serde(default = "default_two")]
    pub upsampling_scaling_factor: usize,
    /// Latents are divided by this, then `shift_factor` is added, before decoding (as the
    /// pipelines do with the VAE they are given).
    #[serde(default = "default_one")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: f64,
}

fn default_four() -> usize {
    4
}
fn default_three() -> usize {
    3
}
fn default_two() -> usize {
    2
}
fn default_one() -> f64 {
    1.0
}
fn default_blocks_out() -> Vec<usize> {
    vec![64, 64, 64, 64]
}
fn default_blocks() -> Vec<usize> {
    vec![3, 3, 3, 1]
}

/// `AutoencoderTinyBlock`: three 3x3 convolutions with ReLUs between, a skip, a final ReLU.
struct Block {
    convs: [Conv2d; 3],
    skip: Option<Conv2d>,
}

impl Block {
    fn new(vb: VarBuilder, cin: usize, cout: usize) -> Result<Self> {
        let same = Conv2dConfig { padding: 1, ..Default::default() };
        let c = vb.pp("conv");
        let convs = [candle_nn::conv2d(cin, cout, 3, same, c.pp("0"))?, candle_nn::conv2d(cout, cout, 3, same, c.pp("2"))?, candle_nn::conv2d(cout, cout, 3, same, c.pp("4"))?];
        let skip = if cin != cout { Some(candle_nn::conv2d_no_bias(cin, cout, 1, Default::default(), vb.pp("skip"))?) } else { None };
        Ok(Self { convs, skip })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.convs[0].forward(x)?.relu()?;
        let h = self.convs[1].forward(&h)?.relu()?;
        let h = self.convs[2].forward(&h)?;
        let skip = match &self.skip {
            Some(s) => s.forward(x)?,
            None => x.clone(),
        };
        (h + skip)?.relu()
    }
}

enum Layer {
    Conv(Conv2d),
    Relu,
    Block(Block),
    Upsample(usize),
}

/// `DecoderTiny` with its latent scaling: latents in, images in `[0, 1]` out.
pub struct TinyDecoder {
    layers: Vec<Layer>,
    config: TinyConfig,
    device: Device,
}

impl TinyDecoder {
    /// Loads `config.json` and `diffusion_pytorch_model.safetensors` from an `AutoencoderTiny` folder.
    pub fn load(dir: &Path, device: &Device) -> crate::Result<Self> {
        let config: TinyConfig = crate::config::read_json(&dir.join("config.json"))?;
        let weights = dir.join("diffusion_pytorch_model.safetensors");
        // SAFETY: the file is mapped read-only and not modified while the decoder lives.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, device)? };
        Ok(Self::new(vb.pp("decoder"), config, device)?)
    }

    pub fn new(vb: VarBuilder, config: TinyConfig, device: &Device) -> Result<Self> {
        let same = Conv2dConfig { padding: 1, ..Default::default() };
        let vb = vb.pp("layers");
        let first = *config.decoder_block_out_channels.first().ok_or_else(|| candle_core::Error::Msg("decoder_block_out_channels is empty".into()))?;
        // Sequential indices, as diffusers numbers them.
        let mut layers = vec![Layer::Conv(candle_nn::conv2d(config.latent_channels, first, 3, same, vb.pp("0"))?), Layer::Relu];
        let mut index = 2;
        let last = config.num_decoder_blocks.len().saturating_sub(1);
        for (i, (&blocks, &channels)) in config.num_decoder_blocks.iter().zip(&config.decoder_block_out_channels).enumerate() {
            for _ in 0..blocks {
                layers.push(Layer::Block(Block::new(vb.pp(index.to_string()), channels, channels)?));
                index += 1;
            }
            if i != last {
                layers.push(Layer::Upsample(config.upsampling_scaling_factor));
                index += 1;
            }
            let out = if i == last { config.out_channels } else { channels };
            let conv = if i == last { candle_nn::conv2d(channels, out, 3, same, vb.pp(index.to_string()))? } else { candle_nn::conv2d_no_bias(channels, out, 3, same, vb.pp(index.to_string()))? };
            layers.push(Layer::Conv(conv));
            index += 1;
        }
        Ok(Self { layers, config, device: device.clone() })
    }

    pub fn config(&self) -> &TinyConfig {
        &self.config
    }

    /// Decodes latents `[b, c, h, w]` (as the denoiser sees them) to images in `[0, 1]`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let x = latents.to_device(&self.device)?.to_dtype(DType::F32)?;
        let x = ((x / self.config.scaling_factor)? + self.config.shift_factor)?;
        // diffusers' clamp: tanh(x / 3) * 3.
        let mut x = ((x / 3.0)?.tanh()? * 3.0)?;
        for layer in &self.layers {
            x = match layer {
                Layer::Conv(c) => c.forward(&x)?,
                Layer::Relu => x.relu()?,
                Layer::Block(b) => b.forward(&x)?,
                Layer::Upsample(f) => {
                    let (_, _, h, w) = x.dims4()?;
                    x.upsample_nearest2d(h * f, w * f)?
                }
            };
        }
        // The decoder's [0, 1] (diffusers returns it mapped to [-1, 1], then pipelines map back).
        x.clamp(0.0, 1.0)
    }
}
