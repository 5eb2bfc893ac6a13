//! diffusers' `ResnetBlock2D`, shared by the UNets (with a time embedding) and the VAE (without):
//! GroupNorm-SiLU-conv twice, the time embedding added between, a 1x1 shortcut where the
//! channel count changes, and `output_scale_factor`. easel's own (rather than
//! candle-transformers') so its convolutions take [`super::conv`]'s CPU path.

use candle_core::{Module, Result, Tensor};
use candle_nn::{linear, Conv2dConfig, Linear, VarBuilder};

use super::conv::{conv2d, Conv2d};
use super::group_norm::{group_norm, GroupNorm};

/// One residual block (weights `norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`, `conv_shortcut`).
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

/// The shape of a [`ResnetBlock2D`].
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// The time embedding's width; `None` for the VAE's blocks.
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(vb: VarBuilder, c: ResnetConfig) -> Result<Self> {
        let same = Conv2dConfig { padding: 1, ..Default::default() };
        let conv_shortcut = if c.in_channels != c.out_channels {
            Some(conv2d(c.in_channels, c.out_channels, 1, Default::default(), vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(c.groups, c.in_channels, c.eps, vb.pp("norm1"))?,
            conv1: conv2d(c.in_channels, c.out_channels, 3, same, vb.pp("conv1"))?,
            time_emb_proj: c.temb_channels.map(|t| linear(t, c.out_channels, vb.pp("time_emb_proj"))).transpose()?,
            norm2: group_norm(c.groups, c.out_channels, c.eps, vb.pp("norm2"))?,
            conv2: conv2d(c.out_channels, c.out_channels, 3, same, vb.pp("conv2"))?,
            conv_shortcut,
            output_scale_factor: c.output_scale_factor,
        })
    }

    /// `xs` `[b, c, h, w]`; `temb` `[b, temb_channels]` for the UNets' blocks.
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
        let h = match (temb, &self.time_emb_proj) {
            (Some(temb), Some(proj)) => h.broadcast_add(&proj.forward(&candle_nn::ops::silu(temb)?)?.unsqueeze(2)?.unsqueeze(3)?)?,
            _ => h,
        };
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let skip = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        let out = (skip + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}
