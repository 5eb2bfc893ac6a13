//! The Stable Diffusion 3 / 3.5 transformer (MMDiT, and 3.5 medium's MMDiT-X), with structs that
//! mirror Stability's reference module tree (`joint_blocks.N.x_block.attn.qkv`, ...), so
//! Stability's single files and the community's GGUF files map one to one. diffusers-layout
//! weights are renamed to these names by [`crate::weights::keys::sd3`]. Weights may be full
//! precision or quantized.
//!
//! What 3.5 adds over 3: RMS norms of queries and keys (`ln_q`, `ln_k`), and in medium a second
//! self-attention over the image tokens only (`attn2`, the "dual attention" layers) whose
//! modulation makes the image stream's adaLN produce nine vectors instead of six.

use candle_core::{DType, Device, Module, Tensor, D};

use super::dit::{layer_norm, modulate, rms_norm, timestep_embedding};
use crate::config::Sd3TransformerConfig;
use crate::error::{EngineError, Result};
use crate::weights::store::{Linear, Weights};

/// Every tensor the transformer needs, with its shape, in Stability's names.
pub fn expected_shapes(c: &Sd3TransformerConfig) -> Vec<(String, Vec<usize>)> {
    let h = c.hidden_size();
    let head = c.attention_head_dim;
    let p = c.patch_size;
    let mut v: Vec<(String, Vec<usize>)> = vec![];
    let linear = |v: &mut Vec<(String, Vec<usize>)>, name: String, i: usize, o: usize| {
        v.push((format!("{name}.weight"), vec![o, i]));
        v.push((format!("{name}.bias"), vec![o]));
    };
    v.push(("x_embedder.proj.weight".into(), vec![h, c.in_channels, p, p]));
    v.push(("x_embedder.proj.bias".into(), vec![h]));
    let max = c.pos_embed_max_size;
    v.push(("pos_embed".into(), vec![1, max * max, h]));
    linear(&mut v, "t_embedder.mlp.0".into(), 256, h);
    linear(&mut v, "t_embedder.mlp.2".into(), h, h);
    linear(&mut v, "y_embedder.mlp.0".into(), c.pooled_projection_dim, h);
    linear(&mut v, "y_embedder.mlp.2".into(), h, h);
    linear(&mut v, "context_embedder".into(), c.joint_attention_dim, c.caption_projection_dim);
    for i in 0..c.num_layers {
        let last = i + 1 == c.num_layers;
        let dual = c.dual_attention_layers.contains(&i);
        for (stream, pre_only) in [("x_block", false), ("context_block", last)] {
            let b = format!("joint_blocks.{i}.{stream}");
            let mods = match (pre_only, stream == "x_block" && dual) {
                (true, _) => 2,
                (false, true) => 9,
                (false, false) => 6,
            };
            linear(&mut v, format!("{b}.adaLN_modulation.1"), h, mods * h);
            let mut attns = vec!["attn"];
            if stream == "x_block" && dual {
                attns.push("attn2");
            }
            for attn in attns {
                linear(&mut v, format!("{b}.{attn}.qkv"), h, 3 * h);
                if !pre_only {
                    linear(&mut v, format!("{b}.{attn}.proj"), h, h);
                }
                if c.qk_norm.is_some() {
                    v.push((format!("{b}.{attn}.ln_q.weight"), vec![head]));
                    v.push((format!("{b}.{attn}.ln_k.weight"), vec![head]));
                }
            }
            if !pre_only {
                linear(&mut v, format!("{b}.mlp.fc1"), h, 4 * h);
                linear(&mut v, format!("{b}.mlp.fc2"), 4 * h, h);
            }
        }
    }
    linear(&mut v, "final_layer.adaLN_modulation.1".into(), h, 2 * h);
    linear(&mut v, "final_layer.linear".into(), h, p * p * c.out_channels);
    v
}

/// `mlp.0 -> SiLU -> mlp.2` (the timestep and pooled-text embedders).
struct Embedder {
    fc0: Linear,
    fc2: Linear,
}

impl Embedder {
    fn new(w: &Weights, name: &str) -> Result<Self> {
        Ok(Self { fc0: w.linear(&format!("{name}.mlp.0"))?, fc2: w.linear(&format!("{name}.mlp.2"))? })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.fc2.forward(&self.fc0.forward(x)?.silu()?)?)
    }
}

/// Fused `qkv`, optional RMS norms of queries and keys, and (except in the last context block)
/// the output `proj`.
struct Attention {
    qkv: Linear,
    norms: Option<(Tensor, Tensor)>,
    proj: Option<Linear>,
    heads: usize,
}

impl Attention {
    fn new(w: &Weights, name: &str, heads: usize, qk_norm: bool, pre_only: bool) -> Result<Self> {
        let norms = if qk_norm { Some((w.tensor(&format!("{name}.ln_q.weight"))?, w.tensor(&format!("{name}.ln_k.weight"))?)) } else { None };
        let proj = if pre_only { None } else { Some(w.linear(&format!("{name}.proj"))?) };
        Ok(Self { qkv: w.linear(&format!("{name}.qkv"))?, norms, proj, heads })
    }

    /// `[B, L, H]` to `q, k, v`, each `[B, heads, L, head_dim]`, queries and keys normed.
    fn qkv(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, l, _) = x.dims3()?;
        let qkv = self.qkv.forward(x)?.reshape((b, l, 3, self.heads, ()))?.permute((2, 0, 3, 1, 4))?;
        let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
        match &self.norms {
            Some((nq, nk)) => Ok((rms_norm(&q, nq)?, rms_norm(&k, nk)?, v)),
            None => Ok((q, k, v)),
        }
    }

    fn proj(&self, x: &Tensor) -> Result<Tensor> {
        match &self.proj {
            Some(p) => Ok(p.forward(x)?),
            None => Err(EngineError::Unsupported("the last context block has no output projection".into())),
        }
    }
}

/// Attention over `q, k, v` `[B, heads, L, D]`, back to `[B, L, heads * D]`.
fn attend(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let x = super::sdpa::attention(&q.contiguous()?, &k.contiguous()?, &v.contiguous()?, scale)?;
    let (b, h, l, d) = x.dims4()?;
    Ok(x.transpose(1, 2)?.reshape((b, l, h * d))?)
}

/// `fc1 -> GELU(tanh) -> fc2`.
struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn new(w: &Weights, name: &str) -> Result<Self> {
        Ok(Self { fc1: w.linear(&format!("{name}.fc1"))?, fc2: w.linear(&format!("{name}.fc2"))? })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.fc2.forward(&super::vector_math::gelu_tanh(&self.fc1.forward(x)?)?)?)
    }
}

/// One stream of a joint block (Stability's `DismantledBlock`): adaptive norm, attention (a
/// second one in MMDiT-X layers), MLP; a pre-only block (the last context block) only feeds the
/// joint attention.
struct DismantledBlock {
    ada: Linear,
    attn: Attention,
    attn2: Option<Attention>,
    mlp: Option<Mlp>,
}

impl DismantledBlock {
    fn new(w: &Weights, name: &str, heads: usize, qk_norm: bool, pre_only: bool, dual: bool) -> Result<Self> {
        Ok(Self {
            ada: w.linear(&format!("{name}.adaLN_modulation.1"))?,
            attn: Attention::new(w, &format!("{name}.attn"), heads, qk_norm, pre_only)?,
            attn2: if dual { Some(Attention::new(w, &format!("{name}.attn2"), heads, qk_norm, false)?) } else { None },
            mlp: if pre_only { None } else { Some(Mlp::new(w, &format!("{name}.mlp"))?) },
        })
    }

    /// The modulation vectors, each `[B, 1, H]`: shift, scale, gate for attention then MLP
    /// (then the second attention in MMDiT-X layers), or shift, scale alone when pre-only.
    fn modulation(&self, c: &Tensor) -> Result<Vec<Tensor>> {
        let n = match (&self.mlp, &self.attn2) {
            (None, _) => 2,
            (Some(_), Some(_)) => 9,
            (Some(_), None) => 6,
        };
        Ok(self.ada.forward(&c.silu()?)?.unsqueeze(1)?.chunk(n, D::Minus1)?)
    }

    /// The residual updates after the joint attention: `x + gate * proj(attn)`, the second
    /// attention's, and the MLP's.
    fn post_attention(&self, x: &Tensor, attn: &Tensor, m: &[Tensor], normed: &Tensor) -> Result<Tensor> {
        let mut x = (x + self.attn.proj(attn)?.broadcast_mul(&m[2])?)?;
        if let Some(attn2) = &self.attn2 {
            let (q, k, v) = attn2.qkv(&modulate(normed, &m[6], &m[7])?)?;
            x = (&x + attn2.proj(&attend(&q, &k, &v)?)?.broadcast_mul(&m[8])?)?;
        }
        if let Some(mlp) = &self.mlp {
            let h = mlp.forward(&modulate(&layer_norm(&x)?, &m[3], &m[4])?)?;
            x = (&x + h.broadcast_mul(&m[5])?)?;
        }
        Ok(x)
    }
}

/// A joint block: the context and image streams attend together.
struct JointBlock {
    context_block: DismantledBlock,
    x_block: DismantledBlock,
}

impl JointBlock {
    /// The updated context (none after the last block) and image tokens.
    fn forward(&self, context: &Tensor, x: &Tensor, c: &Tensor) -> Result<(Option<Tensor>, Tensor)> {
        let cm = self.context_block.modulation(c)?;
        let xm = self.x_block.modulation(c)?;
        let c_normed = layer_norm(context)?;
        let x_normed = layer_norm(x)?;
        let (cq, ck, cv) = self.context_block.attn.qkv(&modulate(&c_normed, &cm[0], &cm[1])?)?;
        let (xq, xk, xv) = self.x_block.attn.qkv(&modulate(&x_normed, &xm[0], &xm[1])?)?;
        let attn = attend(&Tensor::cat(&[&cq, &xq], 2)?, &Tensor::cat(&[&ck, &xk], 2)?, &Tensor::cat(&[&cv, &xv], 2)?)?;
        let context_len = context.dim(1)?;
        let x_attn = attn.narrow(1, context_len, attn.dim(1)? - context_len)?;
        let x = self.x_block.post_attention(x, &x_attn, &xm, &x_normed)?;
        let context = match self.context_block.mlp {
            None => None,
            Some(_) => Some(self.context_block.post_attention(context, &attn.narrow(1, 0, context_len)?, &cm, &c_normed)?),
        };
        Ok((context, x))
    }
}

/// The inputs of one transformer evaluation.
pub struct MmditInputs<'a> {
    /// Latents `[B, C, H, W]`.
    pub x: &'a Tensor,
    /// Timesteps in `[0, 1000]` (sigma x 1000), `[B]`.
    pub timesteps: &'a Tensor,
    /// Pooled CLIP-L and CLIP-G embeddings `[B, pooled_projection_dim]`.
    pub pooled: &'a Tensor,
    /// Text states `[B, T, joint_attention_dim]` (CLIP then T5 tokens).
    pub context: &'a Tensor,
    /// Joint blocks to skip (skip-layer guidance); empty for a normal evaluation.
    pub skip_layers: &'a [usize],
}

/// `SD3Transformer2DModel` / Stability's `MMDiT` and `MMDiTX`.
pub struct Mmdit {
    x_embedder: Tensor,
    x_embedder_bias: Tensor,
    pos_embed: Tensor,
    t_embedder: Embedder,
    y_embedder: Embedder,
    context_embedder: Linear,
    joint_blocks: Vec<JointBlock>,
    final_ada: Linear,
    final_linear: Linear,
    pub config: Sd3TransformerConfig,
    dtype: DType,
}

impl Mmdit {
    /// Builds the transformer from Stability-named weights, checking every shape first.
    pub fn new(w: &Weights, config: &Sd3TransformerConfig, dtype: DType, _device: &Device) -> Result<Self> {
        w.check(&expected_shapes(config), "the transformer config")?;
        let heads = config.num_attention_heads;
        let qk_norm = config.qk_norm.is_some();
        let h = config.hidden_size();
        let mut joint_blocks = vec![];
        for i in 0..config.num_layers {
            let b = format!("joint_blocks.{i}");
            let last = i + 1 == config.num_layers;
            joint_blocks.push(JointBlock {
                context_block: DismantledBlock::new(w, &format!("{b}.context_block"), heads, qk_norm, last, false)?,
                x_block: DismantledBlock::new(w, &format!("{b}.x_block"), heads, qk_norm, false, config.dual_attention_layers.contains(&i))?,
            });
        }
        Ok(Self {
            x_embedder: w.tensor("x_embedder.proj.weight")?.reshape((h, ()))?,
            x_embedder_bias: w.tensor("x_embedder.proj.bias")?,
            pos_embed: w.tensor("pos_embed")?,
            t_embedder: Embedder::new(w, "t_embedder")?,
            y_embedder: Embedder::new(w, "y_embedder")?,
            context_embedder: w.linear("context_embedder")?,
            joint_blocks,
            final_ada: w.linear("final_layer.adaLN_modulation.1")?,
            final_linear: w.linear("final_layer.linear")?,
            config: config.clone(),
            dtype,
        })
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The largest latent side the position table covers (diffusers refuses larger ones too).
    pub fn max_latent_side(&self) -> usize {
        self.config.pos_embed_max_size * self.config.patch_size
    }

    /// Patches `[B, C, H, W]` to tokens `[B, H/p * W/p, hidden]`: the strided convolution as
    /// one matrix product over `(C, p, p)` patches.
    fn patch_embed(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, height, width) = x.dims4()?;
        let p = self.config.patch_size;
        let (hp, wp) = (height / p, width / p);
        let patches = x.reshape((b, c, hp, p, wp, p))?.permute((0, 2, 4, 1, 3, 5))?.reshape((b, hp * wp, c * p * p))?;
        let tokens = patches.broadcast_matmul(&self.x_embedder.t()?)?.broadcast_add(&self.x_embedder_bias)?;
        Ok(tokens.broadcast_add(&self.cropped_pos_embed(hp, wp)?)?)
    }

    /// The centre `hp x wp` window of the `max x max` position table, as diffusers crops it.
    fn cropped_pos_embed(&self, hp: usize, wp: usize) -> Result<Tensor> {
        let max = self.config.pos_embed_max_size;
        if hp > max || wp > max {
            let side = max * self.config.patch_size * 8;
            return Err(EngineError::param("size", format!("this model's position table covers at most {side}x{side} pixels; ask for a smaller size")));
        }
        let (top, left) = ((max - hp) / 2, (max - wp) / 2);
        let table = self.pos_embed.reshape((max, max, ()))?;
        Ok(table.narrow(0, top, hp)?.narrow(1, left, wp)?.reshape((1, hp * wp, ()))?)
    }

    /// The velocity prediction, shaped like the latents.
    pub fn forward(&self, inputs: &MmditInputs) -> Result<Tensor> {
        let dtype = self.dtype;
        let (b, _, height, width) = inputs.x.dims4()?;
        let p = self.config.patch_size;
        let mut x = self.patch_embed(&inputs.x.to_dtype(dtype)?)?;
        let c = (self.t_embedder.forward(&timestep_embedding(inputs.timesteps, 256, 1.0, dtype)?)? + self.y_embedder.forward(&inputs.pooled.to_dtype(dtype)?)?)?;
        let mut context = Some(self.context_embedder.forward(&inputs.context.to_dtype(dtype)?)?);
        for (i, block) in self.joint_blocks.iter().enumerate() {
            if inputs.skip_layers.contains(&i) {
                continue;
            }
            let Some(ctx) = context.take() else { break };
            let (next, out) = block.forward(&ctx, &x, &c)?;
            context = next;
            x = out;
        }
        let m = self.final_ada.forward(&c.silu()?)?.unsqueeze(1)?.chunk(2, D::Minus1)?;
        let x = self.final_linear.forward(&modulate(&layer_norm(&x)?, &m[0], &m[1])?)?;
        let (hp, wp, out) = (height / p, width / p, self.config.out_channels);
        Ok(x.reshape((b, hp, wp, p, p, out))?.permute((0, 5, 1, 3, 2, 4))?.reshape((b, out, height, width))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd35_large_has_about_8b_parameters() {
        let n: usize = expected_shapes(&Sd3TransformerConfig::sd35_large()).iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        // Stability AI: "Stable Diffusion 3.5 Large: at 8.1 billion parameters".
        assert!((8_000_000_000..8_300_000_000).contains(&n), "{n}");
    }

    #[test]
    fn sd35_medium_has_about_2_5b_parameters() {
        let n: usize = expected_shapes(&Sd3TransformerConfig::sd35_medium()).iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        // Stability AI: "Stable Diffusion 3.5 Medium: 2.5 billion parameters".
        assert!((2_300_000_000..2_600_000_000).contains(&n), "{n}");
    }
}
