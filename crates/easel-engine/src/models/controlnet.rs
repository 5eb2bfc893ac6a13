//! `ControlNetModel` for the UNet families (SD 1.x/2.x and SDXL), built from its diffusers
//! `config.json`.
//!
//! A ControlNet is a trainable copy of a UNet's encoder half (`conv_in`, the time and SDXL
//! `text_time` embeddings, `down_blocks`, `mid_block`: built here by the UNet's own code, so the
//! names map one to one) that also sees a conditioning image (edges, depth, pose) through
//! `controlnet_cond_embedding`. Each skip connection and the mid block's output pass through a
//! 1x1 convolution (`controlnet_down_blocks.N`, `controlnet_mid_block`, zero-initialised in
//! training) and are added to the UNet's ([`ControlResiduals`]).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use super::conv::{conv2d, Conv2d};
use super::unet::{down_blocks, mid_block, AddedCond, BlockLayout, ControlResiduals, MidBlock, UNetBlock, UNetEmbedding};
use crate::config::ControlNetConfig;

/// `ControlNetConditioningEmbedding`: the conditioning image down to the latent grid, a 3x3
/// convolution and SiLU per stage, every other one with stride 2.
struct ConditioningEmbedding {
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
}

impl ConditioningEmbedding {
    fn new(vb: VarBuilder, cond_channels: usize, widths: &[usize], out_channels: usize) -> Result<Self> {
        let same = Conv2dConfig { padding: 1, ..Default::default() };
        let halve = Conv2dConfig { padding: 1, stride: 2, ..Default::default() };
        let first = *widths.first().ok_or_else(|| candle_core::Error::Msg("controlnet: empty conditioning_embedding_out_channels".into()))?;
        let mut blocks = vec![];
        for (i, pair) in widths.windows(2).enumerate() {
            blocks.push(conv2d(pair[0], pair[0], 3, same, vb.pp("blocks").pp(2 * i))?);
            blocks.push(conv2d(pair[0], pair[1], 3, halve, vb.pp("blocks").pp(2 * i + 1))?);
        }
        let last = widths[widths.len() - 1];
        Ok(Self {
            conv_in: conv2d(cond_channels, first, 3, same, vb.pp("conv_in"))?,
            blocks,
            conv_out: conv2d(last, out_channels, 3, same, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, image: &Tensor) -> Result<Tensor> {
        let mut xs = candle_nn::ops::silu(&self.conv_in.forward(image)?)?;
        for block in &self.blocks {
            xs = candle_nn::ops::silu(&block.forward(&xs)?)?;
        }
        self.conv_out.forward(&xs)
    }

    /// How many times the image is halved on the way to the latent grid.
    fn downscale(&self) -> usize {
        1 << (self.blocks.len() / 2)
    }
}

/// A ControlNet for a UNet of the same shape.
pub struct ControlNetModel {
    conv_in: Conv2d,
    embedding: UNetEmbedding,
    cond_embedding: ConditioningEmbedding,
    down_blocks: Vec<UNetBlock>,
    mid_block: MidBlock,
    controlnet_down_blocks: Vec<Conv2d>,
    controlnet_mid_block: Conv2d,
    /// The config this ControlNet was built from.
    pub config: ControlNetConfig,
}

impl std::fmt::Debug for ControlNetModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlNetModel").field("block_out_channels", &self.config.unet.block_out_channels).finish_non_exhaustive()
    }
}

fn unsupported(what: String) -> candle_core::Error {
    candle_core::Error::Msg(format!("controlnet config.json: {what} is not supported"))
}

impl ControlNetModel {
    /// Builds the ControlNet from its config; `vb` is rooted at the checkpoint's top level.
    pub fn new(vb: VarBuilder, config: &ControlNetConfig) -> Result<Self> {
        let c = &config.unet;
        if config.global_pool_conditions {
            return Err(unsupported("global_pool_conditions (shuffle-style ControlNets)".into()));
        }
        if !matches!(config.controlnet_conditioning_channel_order.as_str(), "rgb" | "bgr") {
            return Err(unsupported(format!("controlnet_conditioning_channel_order `{}`", config.controlnet_conditioning_channel_order)));
        }
        let layout = BlockLayout::new(c)?;
        let ch0 = c.block_out_channels[0];
        let same = Conv2dConfig { padding: 1, ..Default::default() };
        let one = Conv2dConfig::default();
        // One 1x1 convolution per skip connection: conv_in's output, each resnet's, each downsampler's.
        let mut widths = vec![ch0];
        for (i, &w) in c.block_out_channels.iter().enumerate() {
            widths.extend(std::iter::repeat_n(w, layout.layers[i]));
            if i + 1 < layout.blocks() {
                widths.push(w);
            }
        }
        let controlnet_down_blocks = widths
            .iter()
            .enumerate()
            .map(|(k, &w)| conv2d(w, w, 1, one, vb.pp("controlnet_down_blocks").pp(k)))
            .collect::<Result<Vec<_>>>()?;
        let mid_ch = c.block_out_channels[layout.blocks() - 1];
        Ok(Self {
            conv_in: conv2d(c.in_channels, ch0, 3, same, vb.pp("conv_in"))?,
            embedding: UNetEmbedding::new(&vb, c)?,
            cond_embedding: ConditioningEmbedding::new(
                vb.pp("controlnet_cond_embedding"),
                config.conditioning_channels,
                &config.conditioning_embedding_out_channels,
                ch0,
            )?,
            down_blocks: down_blocks(&vb, c, &layout)?,
            mid_block: mid_block(&vb, c, &layout)?,
            controlnet_down_blocks,
            controlnet_mid_block: conv2d(mid_ch, mid_ch, 1, one, vb.pp("controlnet_mid_block"))?,
            config: config.clone(),
        })
    }

    /// Whether this ControlNet needs SDXL's [`AddedCond`] (it was trained for an SDXL UNet).
    pub fn needs_added_cond(&self) -> bool {
        self.config.unet.addition_embed_type.is_some()
    }

    /// How many image pixels make one latent cell along each side: the conditioning image must be
    /// the latents' size times this.
    pub fn image_downscale(&self) -> usize {
        self.cond_embedding.downscale()
    }

    /// The residuals for one UNet evaluation of `sample` (the UNet's input, after the
    /// scheduler's scaling) at `timestep`: `image` is the conditioning image, `[batch, C, H, W]`
    /// in `[0, 1]` (RGB), and `scale` multiplies every residual.
    pub fn forward(&self, sample: &Tensor, timestep: f64, context: &Tensor, added: Option<&AddedCond>, image: &Tensor, scale: f64) -> Result<ControlResiduals> {
        let batch = sample.dim(0)?;
        let image = if self.config.controlnet_conditioning_channel_order == "bgr" { flip_channels(image)? } else { image.clone() };
        // diffusers' ControlNet pipelines give the ControlNet no guidance embedding.
        let emb = self.embedding.forward(timestep, batch, sample.dtype(), sample.device(), added, None)?;
        let xs = (self.conv_in.forward(sample)? + self.cond_embedding.forward(&image.to_dtype(sample.dtype())?)?)?;
        let mut residuals = vec![xs.clone()];
        let mut xs = xs;
        for block in &self.down_blocks {
            xs = block.down(&xs, &emb, context.into(), &mut residuals, true)?;
        }
        let xs = self.mid_block.forward(&xs, &emb, context.into())?;
        let down = residuals
            .iter()
            .zip(&self.controlnet_down_blocks)
            .map(|(r, conv)| conv.forward(r)? * scale)
            .collect::<Result<Vec<_>>>()?;
        Ok(ControlResiduals { down, mid: (self.controlnet_mid_block.forward(&xs)? * scale)? })
    }
}

/// RGB to BGR (or back) along the channel axis.
fn flip_channels(image: &Tensor) -> Result<Tensor> {
    let c = image.dim(1)?;
    let order: Vec<u32> = (0..c as u32).rev().collect();
    image.index_select(&Tensor::new(order.as_slice(), image.device())?, 1)
}
