//! diffusers' `Transformer2DModel` with `BasicTransformerBlock`s, as the SD UNets use it:
//! self-attention, cross-attention to the text states, and a GEGLU feed-forward with the
//! exact (erf) GELU that diffusers uses. Cross-attention layers may also attend to an
//! IP-Adapter's image prompt ([`CrossContext::image`]): each is numbered in the adapter's
//! order when the UNet is built, and adds its scaled image attention to the text's.

use candle_core::{Module, Result, Tensor};
use candle_nn::{layer_norm, linear, linear_no_bias, LayerNorm, Linear, VarBuilder};

use super::conv::{conv2d, Conv2d};
use super::group_norm::{group_norm, GroupNorm};
use super::ip_adapter::{ImageKv, ImagePromptKv};

/// What cross-attention attends to: the text states, and an IP-Adapter's image prompt.
#[derive(Debug, Clone, Copy)]
pub struct CrossContext<'a> {
    pub text: &'a Tensor,
    pub image: Option<&'a ImagePromptKv>,
}

impl<'a> From<&'a Tensor> for CrossContext<'a> {
    fn from(text: &'a Tensor) -> Self {
        Self { text, image: None }
    }
}

/// Multi-head attention with diffusers' `to_q`, `to_k`, `to_v`, `to_out.0` weights.
#[derive(Debug)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
}

impl Attention {
    pub fn new(vb: VarBuilder, query_dim: usize, context_dim: usize, heads: usize, head_dim: usize) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: linear_no_bias(query_dim, inner, vb.pp("to_q"))?,
            to_k: linear_no_bias(context_dim, inner, vb.pp("to_k"))?,
            to_v: linear_no_bias(context_dim, inner, vb.pp("to_v"))?,
            to_out: linear(inner, query_dim, vb.pp("to_out").pp("0"))?,
            heads,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    /// Attends from `xs` `[b, n, d]` to `context` (or to itself).
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        self.forward_with_image(xs, context, None)
    }

    /// [`Self::forward`], plus IP-Adapter's decoupled cross-attention: the same queries attend
    /// to the image prompt's keys and values, and that output times `scale` is added before
    /// `to_out` (diffusers' `IPAdapterAttnProcessor2_0`).
    fn forward_with_image(&self, xs: &Tensor, context: Option<&Tensor>, image: Option<(&ImageKv, f64)>) -> Result<Tensor> {
        let context = context.unwrap_or(xs);
        let (b, n, _) = xs.dims3()?;
        let split = |t: Tensor| -> Result<Tensor> {
            let (b, m, inner) = t.dims3()?;
            t.reshape((b, m, self.heads, inner / self.heads))?.transpose(1, 2)
        };
        let q = split(self.to_q.forward(xs)?)?;
        let k = split(self.to_k.forward(context)?)?;
        let v = split(self.to_v.forward(context)?)?;
        let mut out = super::sdpa::attention(&q, &k, &v, self.scale)?;
        if let Some((kv, scale)) = image {
            let attended = super::sdpa::attention(&q, &split(kv.k.clone())?, &split(kv.v.clone())?, self.scale)?;
            out = (out + (attended * scale)?)?;
        }
        self.to_out.forward(&out.transpose(1, 2)?.reshape((b, n, ()))?)
    }

    /// The width of its queries (what an IP-Adapter layer's keys must have).
    pub fn inner_dim(&self) -> usize {
        self.to_q.weight().dim(0).unwrap_or(0)
    }
}

/// `FeedForward` with a GEGLU input projection (`net.0.proj`) and output (`net.2`).
#[derive(Debug)]
struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj_in: linear(dim, inner * 2, vb.pp("net").pp("0").pp("proj"))?,
            proj_out: linear(inner, dim, vb.pp("net").pp("2"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.proj_out.forward(&super::vector_math::geglu(&self.proj_in.forward(xs)?)?)
    }
}

/// `BasicTransformerBlock`: pre-norm self-attention, cross-attention, feed-forward.
#[derive(Debug)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
    /// The cross-attention's place in IP-Adapter's numbering (`None` in a ControlNet).
    image_slot: Option<usize>,
}

impl BasicTransformerBlock {
    fn new(vb: VarBuilder, dim: usize, context_dim: usize, heads: usize, head_dim: usize) -> Result<Self> {
        Ok(Self {
            norm1: layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), dim, dim, heads, head_dim)?,
            norm2: layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(vb.pp("attn2"), dim, context_dim, heads, head_dim)?,
            norm3: layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
            image_slot: None,
        })
    }

    fn forward(&self, xs: &Tensor, context: CrossContext) -> Result<Tensor> {
        let xs = (self.attn1.forward(&self.norm1.forward(xs)?, None)? + xs)?;
        let image = match (context.image, self.image_slot) {
            (Some(prompt), Some(slot)) => {
                let kv = prompt.per_layer.get(slot).ok_or_else(|| candle_core::Error::Msg(format!("the IP-Adapter has no layer {slot}")))?;
                Some((kv, prompt.scale))
            }
            _ => None,
        };
        let xs = (self.attn2.forward_with_image(&self.norm2.forward(&xs)?, Some(context.text), image)? + &xs)?;
        self.ff.forward(&self.norm3.forward(&xs)?)? + xs
    }
}

#[derive(Debug)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// `Transformer2DModel`: group norm, projection in, transformer blocks, projection out, residual.
#[derive(Debug)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

/// Shape of one `Transformer2DModel`.
#[derive(Debug, Clone, Copy)]
pub struct TransformerConfig {
    pub channels: usize,
    pub heads: usize,
    pub depth: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub use_linear_projection: bool,
}

impl Transformer2DModel {
    pub fn new(vb: VarBuilder, c: TransformerConfig) -> Result<Self> {
        let head_dim = c.channels / c.heads;
        let proj = |name: &str| -> Result<Projection> {
            Ok(if c.use_linear_projection {
                Projection::Linear(linear(c.channels, c.channels, vb.pp(name))?)
            } else {
                Projection::Conv(conv2d(c.channels, c.channels, 1, Default::default(), vb.pp(name))?)
            })
        };
        let blocks = (0..c.depth)
            .map(|i| BasicTransformerBlock::new(vb.pp("transformer_blocks").pp(i), c.channels, c.context_dim, c.heads, head_dim))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { norm: group_norm(c.groups, c.channels, 1e-6, vb.pp("norm"))?, proj_in: proj("proj_in")?, blocks, proj_out: proj("proj_out")? })
    }

    /// Numbers its cross-attention layers for IP-Adapter, from `next` on.
    pub fn number_image_slots(&mut self, next: &mut usize) {
        for block in &mut self.blocks {
            block.image_slot = Some(*next);
            *next += 1;
        }
    }

    /// Its cross-attention layers' query widths, in IP-Adapter order.
    pub fn cross_attention_widths(&self) -> impl Iterator<Item = usize> + '_ {
        self.blocks.iter().map(|b| b.attn2.inner_dim())
    }

    pub fn forward(&self, xs: &Tensor, context: CrossContext) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let residual = xs;
        let xs = self.norm.forward(xs)?;
        let to_tokens = |t: Tensor| t.permute((0, 2, 3, 1))?.reshape((b, h * w, c));
        let mut xs = match &self.proj_in {
            Projection::Conv(p) => to_tokens(p.forward(&xs)?)?,
            Projection::Linear(p) => p.forward(&to_tokens(xs)?)?,
        };
        for block in &self.blocks {
            xs = block.forward(&xs, context)?;
        }
        let to_map = |t: Tensor| t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous();
        let xs = match &self.proj_out {
            Projection::Conv(p) => p.forward(&to_map(xs)?)?,
            Projection::Linear(p) => to_map(p.forward(&xs)?)?,
        };
        xs + residual
    }
}
