//! CLIP's vision tower with its projection, mirroring transformers'
//! `CLIPVisionModelWithProjection` (`vision_model.*`, `visual_projection`), so weight names map
//! one to one. IP-Adapters condition on it: plain adapters on the projected `image_embeds`,
//! Plus adapters on the states entering the last encoder layer (`hidden_states[-2]`).
//!
//! Written here rather than taken from candle-transformers, whose vision tower knows only
//! `quick_gelu` (IP-Adapter's ViT-H and ViT-bigG encoders use the exact GELU), reads no config
//! file, and has no projection without a text tower.

use candle_core::{Module, Result, Tensor};
use candle_nn::{layer_norm, linear_no_bias, Conv2d, Conv2dConfig, LayerNorm, Linear, VarBuilder};

use super::clip::{Activation, ClipEncoderLayer, LayerShape};
use crate::config::ClipVisionConfig;

/// What an image encoder pass yields.
#[derive(Debug)]
pub struct VisionOutput {
    /// `visual_projection(post_layernorm(class token))`: `[n, projection_dim]`.
    pub image_embeds: Tensor,
    /// The input of the last encoder layer, transformers' `hidden_states[-2]`: `[n, 1 + patches, hidden]`.
    pub penultimate: Tensor,
}

/// `CLIPVisionModelWithProjection`.
#[derive(Debug)]
pub struct ClipVisionModel {
    class_embedding: Tensor,
    patch_embedding: Conv2d,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<ClipEncoderLayer>,
    post_layernorm: LayerNorm,
    visual_projection: Linear,
    /// The side of the square pictures it takes.
    pub image_size: usize,
}

impl ClipVisionModel {
    /// Builds the model; `vb` is rooted at the checkpoint's top level.
    pub fn new(vb: VarBuilder, c: &ClipVisionConfig) -> Result<Self> {
        if c.patch_size == 0 || c.image_size % c.patch_size != 0 {
            candle_core::bail!("image_size {} is not a multiple of patch_size {}", c.image_size, c.patch_size);
        }
        let vm = vb.pp("vision_model");
        let emb = vm.pp("embeddings");
        let shape = LayerShape {
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_attention_heads: c.num_attention_heads,
            layer_norm_eps: c.layer_norm_eps,
            activation: Activation::from_name(&c.hidden_act)?,
        };
        let positions = (c.image_size / c.patch_size).pow(2) + 1;
        let conv = Conv2dConfig { stride: c.patch_size, ..Default::default() };
        let patch_weight = emb.pp("patch_embedding").get((c.hidden_size, c.num_channels, c.patch_size, c.patch_size), "weight")?;
        Ok(Self {
            class_embedding: emb.get(c.hidden_size, "class_embedding")?,
            patch_embedding: Conv2d::new(patch_weight, None, conv),
            position_embedding: emb.pp("position_embedding").get((positions, c.hidden_size), "weight")?,
            pre_layrnorm: layer_norm(c.hidden_size, c.layer_norm_eps, vm.pp("pre_layrnorm"))?,
            layers: (0..c.num_hidden_layers).map(|i| ClipEncoderLayer::new(vm.pp("encoder").pp("layers").pp(i), &shape)).collect::<Result<Vec<_>>>()?,
            post_layernorm: layer_norm(c.hidden_size, c.layer_norm_eps, vm.pp("post_layernorm"))?,
            visual_projection: linear_no_bias(c.hidden_size, c.projection_dim, vb.pp("visual_projection"))?,
            image_size: c.image_size,
        })
    }

    /// Encodes normalised pictures `[n, 3, image_size, image_size]`.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<VisionOutput> {
        let n = pixel_values.dim(0)?;
        let hidden = self.class_embedding.dim(0)?;
        let patches = self.patch_embedding.forward(pixel_values)?.flatten_from(2)?.transpose(1, 2)?;
        let class = self.class_embedding.reshape((1, 1, hidden))?.repeat((n, 1, 1))?;
        let xs = Tensor::cat(&[&class, &patches], 1)?.broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        let mut xs = self.pre_layrnorm.forward(&xs)?;
        let mut penultimate = xs.clone();
        for layer in &self.layers {
            penultimate = xs.clone();
            xs = layer.forward(&xs, None)?;
        }
        let pooled = self.post_layernorm.forward(&xs.narrow(1, 0, 1)?.squeeze(1)?)?;
        let image_embeds = self.visual_projection.forward(&pooled)?;
        Ok(VisionOutput { image_embeds, penultimate })
    }
}
