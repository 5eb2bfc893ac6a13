//! diffusers' `AutoencoderKL`, its two halves built apart (`post_quant_conv` + `decoder.*`, and
//! `encoder.*` + `quant_conv` for image-to-image), mirroring diffusers' module tree so weight
//! names map one to one.
//!
//! Why easel has its own rather than candle-transformers': the mid-block's single-head attention
//! over every latent pixel is the largest tensor of a high-resolution decode (a 2048x2048 SD
//! image has 65,536 latent pixels, a 16 GiB score matrix), and here it goes through
//! [`super::sdpa::attention`], tiled beyond its budget. The halves are separate types so that a
//! text-to-image run neither reads nor holds the encoder's weights.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, Linear, VarBuilder};

use super::conv::{conv2d, Conv2d};
use super::group_norm::{group_norm, GroupNorm};
use super::resnet::{ResnetBlock2D, ResnetConfig};

use crate::config::VaeConfig;

const EPS: f64 = 1e-6;

fn conv3x3(vb: VarBuilder, cin: usize, cout: usize) -> Result<Conv2d> {
    conv2d(cin, cout, 3, Conv2dConfig { padding: 1, ..Default::default() }, vb)
}

/// A projection stored as a linear `[c, c]` (diffusers) or as a 1x1 convolution `[c, c, 1, 1]`
/// (original LDM checkpoints).
fn projection(vb: VarBuilder, channels: usize) -> Result<Linear> {
    let weight = match vb.get((channels, channels), "weight") {
        Ok(w) => w,
        Err(_) => vb.get((channels, channels, 1, 1), "weight")?.reshape((channels, channels))?,
    };
    Ok(Linear::new(weight, Some(vb.get(channels, "bias")?)))
}

/// The mid-block's single-head self-attention over all latent pixels (`Attention` with
/// `group_norm`, `to_q`/`to_k`/`to_v`/`to_out.0`, or the older `query`/`key`/`value`/`proj_attn`).
#[derive(Debug)]
struct AttentionBlock {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl AttentionBlock {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        let names = if vb.contains_tensor("to_q.weight") {
            ["to_q", "to_k", "to_v", "to_out.0"]
        } else {
            ["query", "key", "value", "proj_attn"]
        };
        Ok(Self {
            group_norm: group_norm(groups, channels, EPS, vb.pp("group_norm"))?,
            to_q: projection(vb.pp(names[0]), channels)?,
            to_k: projection(vb.pp(names[1]), channels)?,
            to_v: projection(vb.pp(names[2]), channels)?,
            to_out: projection(vb.pp(names[3]), channels)?,
        })
    }
}

impl Module for AttentionBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let tokens = self.group_norm.forward(xs)?.reshape((b, c, h * w))?.transpose(1, 2)?;
        let heads = |t: Tensor| t.unsqueeze(1)?.contiguous();
        let q = heads(self.to_q.forward(&tokens)?)?;
        let k = heads(self.to_k.forward(&tokens)?)?;
        let v = heads(self.to_v.forward(&tokens)?)?;
        let out = super::sdpa::attention(&q, &k, &v, (c as f64).powf(-0.5))?.squeeze(1)?;
        let out = self.to_out.forward(&out)?.transpose(1, 2)?.reshape((b, c, h, w))?;
        out + xs
    }
}

/// `UNetMidBlock2D` as the VAE has it: a resnet, the optional attention, a resnet.
#[derive(Debug)]
struct MidBlock {
    resnets: [ResnetBlock2D; 2],
    attention: Option<AttentionBlock>,
}

impl MidBlock {
    fn new(vb: VarBuilder, channels: usize, config: &VaeConfig) -> Result<Self> {
        let groups = config.norm_num_groups;
        Ok(Self {
            resnets: [vae_resnet(vb.pp("resnets.0"), channels, channels, groups)?, vae_resnet(vb.pp("resnets.1"), channels, channels, groups)?],
            attention: if config.mid_block_add_attention { Some(AttentionBlock::new(vb.pp("attentions.0"), channels, groups)?) } else { None },
        })
    }
}

impl Module for MidBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.resnets[0].forward(xs, None)?;
        if let Some(attention) = &self.attention {
            xs = attention.forward(&xs)?;
        }
        self.resnets[1].forward(&xs, None)
    }
}

fn vae_resnet(vb: VarBuilder, in_channels: usize, out_channels: usize, groups: usize) -> Result<ResnetBlock2D> {
    ResnetBlock2D::new(vb, ResnetConfig { in_channels, out_channels, temb_channels: None, groups, eps: EPS, output_scale_factor: 1.0 })
}

/// `UpDecoderBlock2D`: `layers + 1` resnets, then (except the last block) nearest 2x upsampling
/// and a 3x3 convolution.
#[derive(Debug)]
struct UpDecoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Conv2d>,
}

impl Module for UpDecoderBlock2D {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = xs.clone();
        for resnet in &self.resnets {
            xs = resnet.forward(&xs, None)?;
        }
        match &self.upsampler {
            Some(conv) => {
                let (_, _, h, w) = xs.dims4()?;
                conv.forward(&xs.upsample_nearest2d(h * 2, w * 2)?)
            }
            None => Ok(xs),
        }
    }
}

/// `post_quant_conv` and diffusers' `Decoder`.
#[derive(Debug)]
pub struct AutoencoderKLDecoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl AutoencoderKLDecoder {
    /// Builds from the VAE's root `vb` (keys `post_quant_conv.*`, `decoder.*`).
    pub fn new(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        let groups = config.norm_num_groups;
        let latent = config.latent_channels;
        let post_quant_conv = if config.use_post_quant_conv {
            Some(conv2d(latent, latent, 1, Default::default(), vb.pp("post_quant_conv"))?)
        } else {
            None
        };
        let vb = vb.pp("decoder");
        let reversed: Vec<usize> = config.block_out_channels.iter().rev().copied().collect();
        let Some(&top) = reversed.first() else { candle_core::bail!("vae config: block_out_channels is empty") };
        let mut up_blocks = Vec::with_capacity(reversed.len());
        let mut cin = top;
        for (i, &cout) in reversed.iter().enumerate() {
            let block = vb.pp("up_blocks").pp(i);
            let resnets = (0..=config.layers_per_block)
                .map(|j| vae_resnet(block.pp("resnets").pp(j), if j == 0 { cin } else { cout }, cout, groups))
                .collect::<Result<Vec<_>>>()?;
            let upsampler =
                if i + 1 < reversed.len() { Some(conv3x3(block.pp("upsamplers.0.conv"), cout, cout)?) } else { None };
            up_blocks.push(UpDecoderBlock2D { resnets, upsampler });
            cin = cout;
        }
        Ok(Self {
            post_quant_conv,
            conv_in: conv3x3(vb.pp("conv_in"), latent, top)?,
            mid_block: MidBlock::new(vb.pp("mid_block"), top, config)?,
            up_blocks,
            conv_norm_out: group_norm(groups, cin, EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv3x3(vb.pp("conv_out"), cin, config.out_channels)?,
        })
    }

    /// Latents `[b, latent_channels, h, w]` (already unscaled) to images in `[-1, 1]`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let mut xs = match &self.post_quant_conv {
            Some(conv) => conv.forward(latents)?,
            None => latents.clone(),
        };
        xs = self.conv_in.forward(&xs)?;
        xs = self.mid_block.forward(&xs)?;
        for block in &self.up_blocks {
            xs = block.forward(&xs)?;
        }
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }
}

/// `DownEncoderBlock2D`: `layers` resnets, then (except the last block) diffusers' `Downsample2D`
/// with `padding=0`: one zero row and column added at the bottom and right, and a 3x3
/// convolution of stride 2.
#[derive(Debug)]
struct DownEncoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Conv2d>,
}

impl Module for DownEncoderBlock2D {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = xs.clone();
        for resnet in &self.resnets {
            xs = resnet.forward(&xs, None)?;
        }
        match &self.downsampler {
            Some(conv) => conv.forward(&xs.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?),
            None => Ok(xs),
        }
    }
}

/// diffusers' `Encoder` and `quant_conv`: images to the moments (mean and log-variance, stacked
/// along channels) of the latent distribution.
#[derive(Debug)]
pub struct AutoencoderKLEncoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
}

impl AutoencoderKLEncoder {
    /// Builds from the VAE's root `vb` (keys `encoder.*`, `quant_conv.*`).
    pub fn new(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        let groups = config.norm_num_groups;
        let moments = 2 * config.latent_channels;
        let quant_conv =
            if config.use_quant_conv { Some(conv2d(moments, moments, 1, Default::default(), vb.pp("quant_conv"))?) } else { None };
        let vb = vb.pp("encoder");
        let channels = &config.block_out_channels;
        let Some(&first) = channels.first() else { candle_core::bail!("vae config: block_out_channels is empty") };
        let stride2 = Conv2dConfig { stride: 2, ..Default::default() };
        let mut down_blocks = Vec::with_capacity(channels.len());
        let mut cin = first;
        for (i, &cout) in channels.iter().enumerate() {
            let block = vb.pp("down_blocks").pp(i);
            let resnets = (0..config.layers_per_block)
                .map(|j| vae_resnet(block.pp("resnets").pp(j), if j == 0 { cin } else { cout }, cout, groups))
                .collect::<Result<Vec<_>>>()?;
            let downsampler =
                if i + 1 < channels.len() { Some(conv2d(cout, cout, 3, stride2, block.pp("downsamplers.0.conv"))?) } else { None };
            down_blocks.push(DownEncoderBlock2D { resnets, downsampler });
            cin = cout;
        }
        Ok(Self {
            conv_in: conv3x3(vb.pp("conv_in"), config.in_channels, first)?,
            down_blocks,
            mid_block: MidBlock::new(vb.pp("mid_block"), cin, config)?,
            conv_norm_out: group_norm(groups, cin, EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv3x3(vb.pp("conv_out"), cin, moments)?,
            quant_conv,
        })
    }

    /// Images `[b, in_channels, H, W]` in `[-1, 1]` to moments `[b, 2 * latent_channels, h, w]`.
    pub fn encode(&self, images: &Tensor) -> Result<Tensor> {
        let mut xs = self.conv_in.forward(images)?;
        for block in &self.down_blocks {
            xs = block.forward(&xs)?;
        }
        xs = self.mid_block.forward(&xs)?;
        let xs = self.conv_out.forward(&self.conv_norm_out.forward_silu(&xs)?)?;
        match &self.quant_conv {
            Some(conv) => conv.forward(&xs),
            None => Ok(xs),
        }
    }
}
