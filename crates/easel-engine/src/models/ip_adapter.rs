//! IP-Adapter's networks, as in the original `ip_adapter.bin` / `.safetensors` files (h94's):
//! `image_proj.*`, which turns an image encoding into a few "image prompt" tokens, and
//! `ip_adapter.N.to_{k,v}_ip`, the extra key and value projections of each cross-attention
//! layer (decoupled cross-attention: the UNet attends to the text and, separately, to the image
//! tokens, and adds the second result times the adapter's scale).
//!
//! Two projections exist: the plain one (`ImageProjection` in diffusers: a linear layer into
//! four tokens and a layer norm) and Plus's resampler (`IPAdapterPlusImageProjection`: learned
//! queries that cross-attend to the encoder's patch states over four perceiver blocks).
//!
//! File key `N` belongs to the `k`-th cross-attention layer with `N = 2k + 1`, counting the
//! UNet's down blocks, then its up blocks, then its mid block (diffusers' `attn_processors`
//! order, which lists `mid_block` last though it runs between the others).

use std::collections::HashMap;

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{layer_norm, linear, linear_no_bias, LayerNorm, Linear, VarBuilder};

/// Plus's perceiver attention heads are this wide (fixed by the original implementation).
const PLUS_HEAD_DIM: usize = 64;
/// Plus's resampler depth (diffusers' default, which its loader does not read from the file).
const PLUS_DEPTH: usize = 4;

/// One perceiver block of Plus's resampler: the latent queries attend to the image features
/// and to themselves, then a feed-forward.
#[derive(Debug)]
pub struct PerceiverBlock {
    norm_features: LayerNorm,
    norm_latents: LayerNorm,
    to_q: Linear,
    to_kv: Linear,
    to_out: Linear,
    heads: usize,
    ff_norm: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
}

impl PerceiverBlock {
    fn new(vb: VarBuilder, width: usize, heads: usize) -> Result<Self> {
        let attn = vb.pp("0");
        let ff = vb.pp("1");
        let inner = heads * PLUS_HEAD_DIM;
        Ok(Self {
            norm_features: layer_norm(width, 1e-5, attn.pp("norm1"))?,
            norm_latents: layer_norm(width, 1e-5, attn.pp("norm2"))?,
            to_q: linear_no_bias(width, inner, attn.pp("to_q"))?,
            to_kv: linear_no_bias(width, 2 * inner, attn.pp("to_kv"))?,
            to_out: linear_no_bias(inner, width, attn.pp("to_out"))?,
            heads,
            ff_norm: layer_norm(width, 1e-5, ff.pp("0"))?,
            ff_in: linear_no_bias(width, 4 * width, ff.pp("1"))?,
            ff_out: linear_no_bias(4 * width, width, ff.pp("3"))?,
        })
    }

    fn forward(&self, features: &Tensor, latents: &Tensor) -> Result<Tensor> {
        let (b, q_len, _) = latents.dims3()?;
        let normed = self.norm_latents.forward(latents)?;
        let kv_in = Tensor::cat(&[&self.norm_features.forward(features)?, &normed], 1)?;
        let split = |t: Tensor| -> Result<Tensor> {
            let (b, n, _) = t.dims3()?;
            t.reshape((b, n, self.heads, PLUS_HEAD_DIM))?.transpose(1, 2)?.contiguous()
        };
        let q = split(self.to_q.forward(&normed)?)?;
        let kv = self.to_kv.forward(&kv_in)?.chunk(2, D::Minus1)?;
        let (k, v) = (split(kv[0].clone())?, split(kv[1].clone())?);
        let attended = super::sdpa::attention(&q, &k, &v, (PLUS_HEAD_DIM as f64).powf(-0.5))?.transpose(1, 2)?.reshape((b, q_len, ()))?;
        let latents = (self.to_out.forward(&attended)? + latents)?;
        let h = self.ff_in.forward(&self.ff_norm.forward(&latents)?)?.gelu_erf()?;
        self.ff_out.forward(&h)? + latents
    }
}

/// How an adapter turns the image encoding into image prompt tokens.
#[derive(Debug)]
pub enum ImageProjection {
    /// `image_embeds [n, E]` → `Linear` → `[n, tokens, C]` → `LayerNorm`.
    Plain { proj: Linear, norm: LayerNorm, tokens: usize, width: usize },
    /// The encoder's penultimate states `[n, 1 + patches, Ev]` → learned queries `[n, Q, C]`.
    Plus { latents: Tensor, proj_in: Linear, blocks: Vec<PerceiverBlock>, proj_out: Linear, norm_out: LayerNorm },
}

impl ImageProjection {
    /// The image prompt tokens `[n, T, C]` for an encoding (plain: `image_embeds`; Plus: the
    /// penultimate states).
    pub fn forward(&self, encoding: &Tensor) -> Result<Tensor> {
        match self {
            Self::Plain { proj, norm, tokens, width } => {
                let n = encoding.dim(0)?;
                norm.forward(&proj.forward(encoding)?.reshape((n, *tokens, *width))?)
            }
            Self::Plus { latents, proj_in, blocks, proj_out, norm_out } => {
                let n = encoding.dim(0)?;
                let features = proj_in.forward(encoding)?;
                let mut lat = latents.repeat((n, 1, 1))?;
                for block in blocks {
                    lat = block.forward(&features, &lat)?;
                }
                norm_out.forward(&proj_out.forward(&lat)?)
            }
        }
    }

    /// Whether it reads the encoder's penultimate states (Plus) rather than `image_embeds`.
    pub fn reads_hidden_states(&self) -> bool {
        matches!(self, Self::Plus { .. })
    }
}

/// One cross-attention layer's image key and value projections (`[hidden, C]`, no bias).
#[derive(Debug)]
pub struct IpLayer {
    pub to_k_ip: Linear,
    pub to_v_ip: Linear,
}

/// An IP-Adapter's weights.
#[derive(Debug)]
pub struct IpAdapterModel {
    pub projection: ImageProjection,
    /// In the UNet's cross-attention order ([`module docs`](self)).
    pub layers: Vec<IpLayer>,
    /// The width of the tokens (the UNet's `cross_attention_dim` it was trained for).
    pub cross_attention_dim: usize,
    /// The encoder width it reads: `projection_dim` (plain) or `hidden_size` (Plus).
    pub encoding_dim: usize,
}

/// Why a tensor map is not an IP-Adapter this code can run.
pub fn unsupported_kind(names: &HashMap<String, Tensor>) -> Option<&'static str> {
    let has = |part: &str| names.keys().any(|k| k.contains(part));
    if has("perceiver_resampler") || has("to_k_lora") || has("proj_model") {
        Some("FaceID adapters are not supported (plain and Plus IP-Adapters are)")
    } else if has("image_proj.proj.0.") || has("image_proj.proj.3.") {
        Some("full-face adapters (an MLP projection) are not supported (plain and Plus IP-Adapters are)")
    } else {
        None
    }
}

impl IpAdapterModel {
    /// Builds the adapter from its file's tensors (`image_proj.*`, `ip_adapter.N.*`).
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let proj = vb.pp("image_proj");
        let (projection, cross_attention_dim, encoding_dim) = if proj.contains_tensor("proj.weight") {
            let w = proj.get_unchecked("proj.weight")?;
            let width = proj.get_unchecked("norm.weight")?.dim(0)?;
            let (rows, encoding_dim) = w.dims2()?;
            if width == 0 || rows % width != 0 {
                candle_core::bail!("image_proj.proj.weight is {:?}, not a multiple of image_proj.norm's width {width}", w.dims());
            }
            let p = ImageProjection::Plain {
                proj: linear(encoding_dim, rows, proj.pp("proj"))?,
                norm: layer_norm(width, 1e-5, proj.pp("norm"))?,
                tokens: rows / width,
                width,
            };
            (p, width, encoding_dim)
        } else if proj.contains_tensor("latents") {
            let (width, encoding_dim) = proj.get_unchecked("proj_in.weight")?.dims2()?;
            let cross_attention_dim = proj.get_unchecked("proj_out.weight")?.dim(0)?;
            let heads = proj.get_unchecked("layers.0.0.to_q.weight")?.dim(0)? / PLUS_HEAD_DIM;
            let queries = proj.get_unchecked("latents")?.dim(1)?;
            let p = ImageProjection::Plus {
                latents: proj.get((1, queries, width), "latents")?,
                proj_in: linear(encoding_dim, width, proj.pp("proj_in"))?,
                blocks: (0..PLUS_DEPTH).map(|i| PerceiverBlock::new(proj.pp("layers").pp(i), width, heads)).collect::<Result<Vec<_>>>()?,
                proj_out: linear(width, cross_attention_dim, proj.pp("proj_out"))?,
                norm_out: layer_norm(cross_attention_dim, 1e-5, proj.pp("norm_out"))?,
            };
            (p, cross_attention_dim, encoding_dim)
        } else {
            candle_core::bail!("no image_proj.proj.weight (plain IP-Adapter) or image_proj.latents (Plus)");
        };
        let ip = vb.pp("ip_adapter");
        let mut layers = vec![];
        while ip.contains_tensor(&format!("{}.to_k_ip.weight", 2 * layers.len() + 1)) {
            let layer = ip.pp(2 * layers.len() + 1);
            let hidden = layer.get_unchecked("to_k_ip.weight")?.dim(0)?;
            layers.push(IpLayer {
                to_k_ip: linear_no_bias(cross_attention_dim, hidden, layer.pp("to_k_ip"))?,
                to_v_ip: linear_no_bias(cross_attention_dim, hidden, layer.pp("to_v_ip"))?,
            });
        }
        Ok(Self { projection, layers, cross_attention_dim, encoding_dim })
    }

    /// Each layer's key and value for image prompt tokens `[rows, T, C]` (one row per UNet
    /// row), with the adapter's scale: computed once per request, as the tokens never change
    /// over the steps.
    pub fn keys_and_values(&self, tokens: &Tensor, scale: f64) -> Result<ImagePromptKv> {
        let per_layer = self
            .layers
            .iter()
            .map(|l| Ok(ImageKv { k: l.to_k_ip.forward(tokens)?, v: l.to_v_ip.forward(tokens)? }))
            .collect::<Result<Vec<_>>>()?;
        Ok(ImagePromptKv { per_layer, scale })
    }
}

/// One cross-attention layer's image keys and values, `[rows, T, inner]`.
#[derive(Debug, Clone)]
pub struct ImageKv {
    pub k: Tensor,
    pub v: Tensor,
}

/// What the UNet's cross-attention layers add for an image prompt: layer `k`'s keys and values
/// and the scale its attention output is added with.
#[derive(Debug, Clone)]
pub struct ImagePromptKv {
    pub per_layer: Vec<ImageKv>,
    pub scale: f64,
}
