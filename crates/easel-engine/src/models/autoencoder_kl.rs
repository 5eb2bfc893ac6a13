//! The decoder half of diffusers' `AutoencoderKL` (`post_quant_conv` + `decoder.*`), mirroring
//! diffusers' module tree so weight names map one to one.
//!
//! Why easel has its own rather than candle-transformers': the mid-block's single-head attention
//! over every latent pixel is the largest tensor of a high-resolution decode (a 2048x2048 SD
//! image has 65,536 latent pixels, a 16 GiB score matrix), and here it goes through
//! [`super::sdpa::attention`], tiled beyond its budget. Only the decoder is built, so a
//! text-to-image run neither reads nor holds the encoder's weights.

use candle_core::{Module, Result, Tensor};
use candle_nn::{group_norm, Conv2dConfig, GroupNorm, Linear, VarBuilder};

use super::conv::{conv2d, Conv2d};
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
    mid_resnets: [ResnetBlock2D; 2],
    mid_attention: Option<AttentionBlock>,
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
        let mid = vb.pp("mid_block");
        let resnet = |vb: VarBuilder, in_channels: usize, out_channels: usize| {
            ResnetBlock2D::new(vb, ResnetConfig { in_channels, out_channels, temb_channels: None, groups, eps: EPS, output_scale_factor: 1.0 })
        };
        let mid_resnets = [resnet(mid.pp("resnets.0"), top, top)?, resnet(mid.pp("resnets.1"), top, top)?];
        let mid_attention =
            if config.mid_block_add_attention { Some(AttentionBlock::new(mid.pp("attentions.0"), top, groups)?) } else { None };
        let mut up_blocks = Vec::with_capacity(reversed.len());
        let mut cin = top;
        for (i, &cout) in reversed.iter().enumerate() {
            let block = vb.pp("up_blocks").pp(i);
            let resnets = (0..=config.layers_per_block)
                .map(|j| resnet(block.pp("resnets").pp(j), if j == 0 { cin } else { cout }, cout))
                .collect::<Result<Vec<_>>>()?;
            let upsampler =
                if i + 1 < reversed.len() { Some(conv3x3(block.pp("upsamplers.0.conv"), cout, cout)?) } else { None };
            up_blocks.push(UpDecoderBlock2D { resnets, upsampler });
            cin = cout;
        }
        Ok(Self {
            post_quant_conv,
            conv_in: conv3x3(vb.pp("conv_in"), latent, top)?,
            mid_resnets,
            mid_attention,
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
        xs = self.mid_resnets[0].forward(&xs, None)?;
        if let Some(attention) = &self.mid_attention {
            xs = attention.forward(&xs)?;
        }
        xs = self.mid_resnets[1].forward(&xs, None)?;
        for block in &self.up_blocks {
            xs = block.forward(&xs)?;
        }
        let xs = candle_nn::ops::silu(&self.conv_norm_out.forward(&xs)?)?;
        self.conv_out.forward(&xs)
    }
}
