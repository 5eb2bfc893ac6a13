//! The FLUX.1 transformer (MMDiT: double-stream then single-stream blocks), with structs that
//! mirror Black Forest Labs' reference module tree (`double_blocks.N.img_attn.qkv`, ...), so
//! BFL checkpoints and the community's GGUF files map one to one. diffusers-layout weights are
//! renamed to these names by [`crate::weights::keys::flux`]. Weights may be full precision or quantized.

use candle_core::{DType, Device, Module, Tensor, D};

use super::dit::{layer_norm, modulate, rms_norm, timestep_embedding};
use super::flux_controlnet::FluxControlResiduals;
use crate::config::FluxTransformerConfig;
use crate::error::Result;
use crate::weights::store::{Linear, Weights};


/// Every tensor the transformer needs, with its shape, in BFL names.
pub fn expected_shapes(c: &FluxTransformerConfig) -> Vec<(String, Vec<usize>)> {
    let h = c.hidden_size();
    let mlp = h * 4;
    let head = c.attention_head_dim;
    let out_ch = c.out_channels.unwrap_or(c.in_channels) * c.patch_size * c.patch_size;
    let mut v: Vec<(String, Vec<usize>)> = vec![];
    let mut linear = |name: String, i: usize, o: usize| {
        v.push((format!("{name}.weight"), vec![o, i]));
        v.push((format!("{name}.bias"), vec![o]));
    };
    linear("img_in".into(), c.in_channels, h);
    linear("txt_in".into(), c.joint_attention_dim, h);
    linear("time_in.in_layer".into(), 256, h);
    linear("time_in.out_layer".into(), h, h);
    if c.guidance_embeds {
        linear("guidance_in.in_layer".into(), 256, h);
        linear("guidance_in.out_layer".into(), h, h);
    }
    linear("vector_in.in_layer".into(), c.pooled_projection_dim, h);
    linear("vector_in.out_layer".into(), h, h);
    for i in 0..c.num_layers {
        let b = format!("double_blocks.{i}");
        for s in ["img", "txt"] {
            linear(format!("{b}.{s}_mod.lin"), h, 6 * h);
            linear(format!("{b}.{s}_attn.qkv"), h, 3 * h);
            linear(format!("{b}.{s}_attn.proj"), h, h);
            linear(format!("{b}.{s}_mlp.0"), h, mlp);
            linear(format!("{b}.{s}_mlp.2"), mlp, h);
        }
    }
    for i in 0..c.num_single_layers {
        let b = format!("single_blocks.{i}");
        linear(format!("{b}.modulation.lin"), h, 3 * h);
        linear(format!("{b}.linear1"), h, 3 * h + mlp);
        linear(format!("{b}.linear2"), h + mlp, h);
    }
    linear("final_layer.adaLN_modulation.1".into(), h, 2 * h);
    linear("final_layer.linear".into(), h, out_ch);
    for i in 0..c.num_layers {
        for s in ["img", "txt"] {
            for n in ["query_norm", "key_norm"] {
                v.push((format!("double_blocks.{i}.{s}_attn.norm.{n}.scale"), vec![head]));
            }
        }
    }
    for i in 0..c.num_single_layers {
        for n in ["query_norm", "key_norm"] {
            v.push((format!("single_blocks.{i}.norm.{n}.scale"), vec![head]));
        }
    }
    v
}

/// Rotary tables for position ids `[L, n_axes]`: `(cos, sin)`, each `[L, head/2]`.
pub(super) fn rope(ids: &Tensor, axes_dim: &[usize], theta: f64) -> Result<(Tensor, Tensor)> {
    let mut freqs = vec![];
    for (axis, &dim) in axes_dim.iter().enumerate() {
        let pos = ids.narrow(1, axis, 1)?.to_dtype(DType::F64)?;
        let inv: Vec<f64> = (0..dim / 2).map(|i| 1.0 / theta.powf(2.0 * i as f64 / dim as f64)).collect();
        let inv = Tensor::from_vec(inv, (1, dim / 2), ids.device())?;
        freqs.push(pos.broadcast_mul(&inv)?);
    }
    let f = Tensor::cat(&freqs, 1)?;
    Ok((f.cos()?.to_dtype(DType::F32)?.contiguous()?, f.sin()?.to_dtype(DType::F32)?.contiguous()?))
}

/// Rotates interleaved pairs `(x0, x1)` of `x` `[B, H, L, D]` (in f32, as diffusers does).
fn apply_rope(x: &Tensor, (cos, sin): &(Tensor, Tensor)) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    Ok(candle_nn::rotary_emb::rope_i(&x, cos, sin)?.to_dtype(dtype)?)
}

fn attention(q: &Tensor, k: &Tensor, v: &Tensor, pe: &(Tensor, Tensor)) -> Result<Tensor> {
    let q = apply_rope(q, pe)?.contiguous()?;
    let k = apply_rope(k, pe)?.contiguous()?;
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let x = super::sdpa::attention(&q, &k, v, scale)?;
    let (b, h, l, d) = x.dims4()?;
    Ok(x.transpose(1, 2)?.reshape((b, l, h * d))?)
}

/// `in_layer -> SiLU -> out_layer`.
pub struct MlpEmbedder {
    in_layer: Linear,
    out_layer: Linear,
}

impl MlpEmbedder {
    pub(super) fn new(w: &Weights, name: &str) -> Result<Self> {
        Ok(Self { in_layer: w.linear(&format!("{name}.in_layer"))?, out_layer: w.linear(&format!("{name}.out_layer"))? })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.out_layer.forward(&self.in_layer.forward(x)?.silu()?)?)
    }
}

/// RMS norms of queries and keys over the head dimension.
pub struct QkNorm {
    query_norm: Tensor,
    key_norm: Tensor,
}

impl QkNorm {
    fn new(w: &Weights, name: &str) -> Result<Self> {
        Ok(Self { query_norm: w.tensor(&format!("{name}.query_norm.scale"))?, key_norm: w.tensor(&format!("{name}.key_norm.scale"))? })
    }

    fn forward(&self, q: &Tensor, k: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((rms_norm(q, &self.query_norm)?, rms_norm(k, &self.key_norm)?))
    }
}

/// `SiLU -> lin`, split into `n` modulation vectors `[B, 1, H]`.
pub struct Modulation {
    lin: Linear,
    n: usize,
}

impl Modulation {
    fn new(w: &Weights, name: &str, n: usize) -> Result<Self> {
        Ok(Self { lin: w.linear(&format!("{name}.lin"))?, n })
    }

    fn forward(&self, vec: &Tensor) -> Result<Vec<Tensor>> {
        Ok(self.lin.forward(&vec.silu()?)?.unsqueeze(1)?.chunk(self.n, D::Minus1)?)
    }
}

/// One stream's attention in a double block: fused `qkv`, QK norm, output `proj`.
pub struct SelfAttention {
    qkv: Linear,
    norm: QkNorm,
    proj: Linear,
}

impl SelfAttention {
    fn new(w: &Weights, name: &str) -> Result<Self> {
        Ok(Self {
            qkv: w.linear(&format!("{name}.qkv"))?,
            norm: QkNorm::new(w, &format!("{name}.norm"))?,
            proj: w.linear(&format!("{name}.proj"))?,
        })
    }
}

/// `[B, L, 3*H*D]` to normed `q, k` and `v`, each `[B, heads, L, D]`.
fn split_qkv(qkv: &Tensor, heads: usize, norm: &QkNorm) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, l, _) = qkv.dims3()?;
    let qkv = qkv.reshape((b, l, 3, heads, ()))?.permute((2, 0, 3, 1, 4))?;
    let (q, k) = norm.forward(&qkv.get(0)?, &qkv.get(1)?)?;
    Ok((q, k, qkv.get(2)?))
}

/// `Linear -> GELU(tanh) -> Linear`, named `0` and `2` as in BFL's `nn.Sequential`.
pub struct Mlp {
    fc0: Linear,
    fc2: Linear,
}

impl Mlp {
    fn new(w: &Weights, name: &str) -> Result<Self> {
        Ok(Self { fc0: w.linear(&format!("{name}.0"))?, fc2: w.linear(&format!("{name}.2"))? })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.fc2.forward(&super::vector_math::gelu_tanh(&self.fc0.forward(x)?)?)?)
    }
}

/// A double-stream block: image and text tokens with their own weights, joint attention.
pub struct DoubleStreamBlock {
    img_mod: Modulation,
    img_attn: SelfAttention,
    img_mlp: Mlp,
    txt_mod: Modulation,
    txt_attn: SelfAttention,
    txt_mlp: Mlp,
    heads: usize,
}

impl DoubleStreamBlock {
    pub(super) fn new(w: &Weights, name: &str, heads: usize) -> Result<Self> {
        Ok(Self {
            img_mod: Modulation::new(w, &format!("{name}.img_mod"), 6)?,
            img_attn: SelfAttention::new(w, &format!("{name}.img_attn"))?,
            img_mlp: Mlp::new(w, &format!("{name}.img_mlp"))?,
            txt_mod: Modulation::new(w, &format!("{name}.txt_mod"), 6)?,
            txt_attn: SelfAttention::new(w, &format!("{name}.txt_attn"))?,
            txt_mlp: Mlp::new(w, &format!("{name}.txt_mlp"))?,
            heads,
        })
    }

    pub(super) fn forward(&self, img: &Tensor, txt: &Tensor, vec: &Tensor, pe: &(Tensor, Tensor)) -> Result<(Tensor, Tensor)> {
        let im = self.img_mod.forward(vec)?;
        let tm = self.txt_mod.forward(vec)?;
        let img_in = modulate(&layer_norm(img)?, &im[0], &im[1])?;
        let (iq, ik, iv) = split_qkv(&self.img_attn.qkv.forward(&img_in)?, self.heads, &self.img_attn.norm)?;
        let txt_in = modulate(&layer_norm(txt)?, &tm[0], &tm[1])?;
        let (tq, tk, tv) = split_qkv(&self.txt_attn.qkv.forward(&txt_in)?, self.heads, &self.txt_attn.norm)?;
        let q = Tensor::cat(&[tq, iq], 2)?;
        let k = Tensor::cat(&[tk, ik], 2)?;
        let v = Tensor::cat(&[tv, iv], 2)?;
        let attn = attention(&q, &k, &v, pe)?;
        let txt_len = txt.dim(1)?;
        let txt_attn = attn.narrow(1, 0, txt_len)?;
        let img_attn = attn.narrow(1, txt_len, attn.dim(1)? - txt_len)?;

        let img = (img + self.img_attn.proj.forward(&img_attn)?.broadcast_mul(&im[2])?)?;
        let img_mlp = self.img_mlp.forward(&modulate(&layer_norm(&img)?, &im[3], &im[4])?)?;
        let img = (&img + img_mlp.broadcast_mul(&im[5])?)?;
        let txt = (txt + self.txt_attn.proj.forward(&txt_attn)?.broadcast_mul(&tm[2])?)?;
        let txt_mlp = self.txt_mlp.forward(&modulate(&layer_norm(&txt)?, &tm[3], &tm[4])?)?;
        let txt = (&txt + txt_mlp.broadcast_mul(&tm[5])?)?;
        Ok((img, txt))
    }
}

/// A single-stream block: one fused projection to `qkv` and the MLP, one back.
pub struct SingleStreamBlock {
    linear1: Linear,
    linear2: Linear,
    norm: QkNorm,
    modulation: Modulation,
    heads: usize,
    hidden: usize,
}

impl SingleStreamBlock {
    pub(super) fn new(w: &Weights, name: &str, heads: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            linear1: w.linear(&format!("{name}.linear1"))?,
            linear2: w.linear(&format!("{name}.linear2"))?,
            norm: QkNorm::new(w, &format!("{name}.norm"))?,
            modulation: Modulation::new(w, &format!("{name}.modulation"), 3)?,
            heads,
            hidden,
        })
    }

    pub(super) fn forward(&self, x: &Tensor, vec: &Tensor, pe: &(Tensor, Tensor)) -> Result<Tensor> {
        let m = self.modulation.forward(vec)?;
        let x_mod = modulate(&layer_norm(x)?, &m[0], &m[1])?;
        let fused = self.linear1.forward(&x_mod)?;
        let qkv = fused.narrow(D::Minus1, 0, 3 * self.hidden)?;
        let mlp = fused.narrow(D::Minus1, 3 * self.hidden, fused.dim(D::Minus1)? - 3 * self.hidden)?;
        let (q, k, v) = split_qkv(&qkv, self.heads, &self.norm)?;
        let attn = attention(&q, &k, &v, pe)?;
        let out = self.linear2.forward(&Tensor::cat(&[attn, super::vector_math::gelu_tanh(&mlp)?], D::Minus1)?)?;
        Ok((x + out.broadcast_mul(&m[2])?)?)
    }
}

/// Final adaptive norm (`adaLN_modulation.1`, shift then scale) and projection.
pub struct LastLayer {
    ada: Linear,
    linear: Linear,
}

impl LastLayer {
    fn forward(&self, x: &Tensor, vec: &Tensor) -> Result<Tensor> {
        let m = self.ada.forward(&vec.silu()?)?.unsqueeze(1)?.chunk(2, D::Minus1)?;
        Ok(self.linear.forward(&modulate(&layer_norm(x)?, &m[0], &m[1])?)?)
    }
}

/// The inputs of one transformer evaluation.
pub struct FluxInputs<'a> {
    /// Packed latents `[B, L, in_channels]`.
    pub img: &'a Tensor,
    /// Latent position ids `[L, 3]`.
    pub img_ids: &'a Tensor,
    /// T5 states `[B, T, joint_attention_dim]`.
    pub txt: &'a Tensor,
    /// Text position ids `[T, 3]` (zeros).
    pub txt_ids: &'a Tensor,
    /// Timesteps in `[0, 1]` (sigmas), `[B]`.
    pub timesteps: &'a Tensor,
    /// CLIP pooled states `[B, pooled_projection_dim]`.
    pub pooled: &'a Tensor,
    /// Guidance scales `[B]` for guidance-distilled models.
    pub guidance: Option<&'a Tensor>,
}

/// The input embeddings shared by the transformer and its ControlNets: the latent and text
/// projections (`img_in`, `txt_in`) and the conditioning vector's MLPs (timestep, guidance for
/// guidance-distilled models, CLIP pooled).
pub(super) struct Embedders {
    pub(super) img_in: Linear,
    pub(super) txt_in: Linear,
    time_in: MlpEmbedder,
    vector_in: MlpEmbedder,
    guidance_in: Option<MlpEmbedder>,
}

impl Embedders {
    pub(super) fn new(w: &Weights, config: &FluxTransformerConfig) -> Result<Self> {
        Ok(Self {
            img_in: w.linear("img_in")?,
            txt_in: w.linear("txt_in")?,
            time_in: MlpEmbedder::new(w, "time_in")?,
            vector_in: MlpEmbedder::new(w, "vector_in")?,
            guidance_in: if config.guidance_embeds { Some(MlpEmbedder::new(w, "guidance_in")?) } else { None },
        })
    }

    /// The conditioning vector `[B, H]`: timestep, then guidance (when the model embeds it and
    /// the caller gives it), then the pooled text, summed.
    pub(super) fn vec(&self, x: &FluxInputs, dtype: DType) -> Result<Tensor> {
        let mut vec = self.time_in.forward(&timestep_embedding(x.timesteps, 256, 1000.0, dtype)?)?;
        if let (Some(g_in), Some(g)) = (&self.guidance_in, x.guidance) {
            vec = (vec + g_in.forward(&timestep_embedding(g, 256, 1000.0, dtype)?)?)?;
        }
        Ok((vec + self.vector_in.forward(&x.pooled.to_dtype(dtype)?)?)?)
    }
}

/// `FluxTransformer2DModel` / BFL's `Flux`.
pub struct FluxTransformer {
    embed: Embedders,
    double_blocks: Vec<DoubleStreamBlock>,
    single_blocks: Vec<SingleStreamBlock>,
    final_layer: LastLayer,
    pub config: FluxTransformerConfig,
    dtype: DType,
    device: Device,
}

impl FluxTransformer {
    /// Builds the transformer from BFL-named weights, checking every shape first.
    pub fn new(w: &Weights, config: &FluxTransformerConfig, dtype: DType, device: &Device) -> Result<Self> {
        w.check(&expected_shapes(config), "the transformer config")?;
        let (heads, hidden) = (config.num_attention_heads, config.hidden_size());
        Ok(Self {
            embed: Embedders::new(w, config)?,
            double_blocks: (0..config.num_layers).map(|i| DoubleStreamBlock::new(w, &format!("double_blocks.{i}"), heads)).collect::<Result<_>>()?,
            single_blocks: (0..config.num_single_layers)
                .map(|i| SingleStreamBlock::new(w, &format!("single_blocks.{i}"), heads, hidden))
                .collect::<Result<_>>()?,
            final_layer: LastLayer { ada: w.linear("final_layer.adaLN_modulation.1")?, linear: w.linear("final_layer.linear")? },
            config: config.clone(),
            dtype,
            device: device.clone(),
        })
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The velocity prediction `[B, L, out_channels]`.
    pub fn forward(&self, x: &FluxInputs) -> Result<Tensor> {
        self.forward_inner(x, None, None)
    }

    /// One step under the First-Block Cache ([`FirstBlockCache`] decides whether the blocks
    /// after the first run).
    pub fn forward_cached(&self, x: &FluxInputs, cache: &mut FirstBlockCache) -> Result<Tensor> {
        self.forward_inner(x, Some(cache), None)
    }

    /// One step with ControlNet residuals added after the blocks, as diffusers'
    /// `FluxTransformer2DModel` takes `controlnet_block_samples` and
    /// `controlnet_single_block_samples`.
    pub fn forward_with_control(&self, x: &FluxInputs, control: &FluxControlResiduals) -> Result<Tensor> {
        self.forward_inner(x, None, Some(control))
    }

    fn forward_inner(&self, x: &FluxInputs, cache: Option<&mut FirstBlockCache>, control: Option<&FluxControlResiduals>) -> Result<Tensor> {
        let dtype = self.dtype;
        let img = self.embed.img_in.forward(&x.img.to_dtype(dtype)?)?;
        let txt = self.embed.txt_in.forward(&x.txt.to_dtype(dtype)?)?;
        let vec = self.embed.vec(x, dtype)?;
        let ids = Tensor::cat(&[x.txt_ids, x.img_ids], 0)?.to_device(&self.device)?;
        let pe = rope(&ids, &self.config.axes_dims_rope, 10000.0)?;
        let (first, rest) = self.double_blocks.split_first().ok_or_else(|| candle_core::Error::Msg("flux: no double-stream blocks".into()))?;
        let doubles = self.double_blocks.len();
        let before_first = img;
        let (mut img, mut txt) = first.forward(&before_first, &txt, &vec, &pe)?;
        if let Some(c) = control {
            img = c.add_double(&img, 0, doubles)?;
        }
        let after_first = img.clone();
        let mut cache = cache;
        if let Some(cache) = cache.as_mut() {
            if let Some(rest_residual) = cache.decide(&(&after_first - &before_first)?)? {
                return self.final_layer.forward(&(&after_first + rest_residual)?, &vec);
            }
        }
        for (i, block) in rest.iter().enumerate() {
            (img, txt) = block.forward(&img, &txt, &vec, &pe)?;
            if let Some(c) = control {
                img = c.add_double(&img, i + 1, doubles)?;
            }
        }
        let txt_len = txt.dim(1)?;
        let mut joint = Tensor::cat(&[txt, img], 1)?;
        let singles = self.single_blocks.len();
        for (i, block) in self.single_blocks.iter().enumerate() {
            joint = block.forward(&joint, &vec, &pe)?;
            if let Some(c) = control.filter(|c| !c.single.is_empty()) {
                let img = c.add_single(&joint.narrow(1, txt_len, joint.dim(1)? - txt_len)?, i, singles)?;
                joint = Tensor::cat(&[joint.narrow(1, 0, txt_len)?, img], 1)?;
            }
        }
        let img = joint.narrow(1, txt_len, joint.dim(1)? - txt_len)?;
        let img = match cache {
            Some(cache) => cache.keep(&after_first, &img)?,
            None => img,
        };
        self.final_layer.forward(&img, &vec)
    }
}
/// The First-Block Cache's state over one generation (ParaAttention's FBCache): per batch row,
/// the first double-stream block's image residual and the rest of the network's image residual,
/// both from the last step that ran every block for that row. A row whose first-block residual
/// differs from its kept one by less than `threshold` (mean absolute difference over mean
/// absolute value) takes the kept rest residual instead of the other blocks' output. Comparing
/// with the last full step, not the previous step, keeps small changes from adding up
/// unchecked. Each row decides alone, so an image is the same whatever it was batched with.
#[derive(Debug)]
pub struct FirstBlockCache {
    threshold: f64,
    first_residual: Option<Tensor>,
    rest_residual: Option<Tensor>,
    /// This step's first-block residual and which rows reuse, until [`Self::keep`].
    pending: Option<(Tensor, Vec<bool>)>,
    /// Steps on which at least one row ran every block, and steps on which none did.
    pub full_steps: usize,
    pub cached_steps: usize,
}

impl FirstBlockCache {
    /// `threshold` 0 runs every step in full.
    pub fn new(threshold: f64) -> Self {
        Self { threshold, first_residual: None, rest_residual: None, pending: None, full_steps: 0, cached_steps: 0 }
    }

    /// The rest residual when every row reuses it this step; `None` when the blocks run (for
    /// the rows that need them: [`Self::keep`] blends in the kept residual for the others).
    fn decide(&mut self, first: &Tensor) -> Result<Option<Tensor>> {
        let rows = first.dim(0)?;
        let reuse = match (&self.first_residual, &self.rest_residual) {
            (Some(prev), Some(_)) => {
                let per_row_mean_abs = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.abs()?.flatten_from(1)?.mean(1)?.to_vec1::<f32>()?) };
                let change = per_row_mean_abs(&(first - prev)?)?;
                let size = per_row_mean_abs(prev)?;
                change.iter().zip(&size).map(|(&c, &s)| (c as f64) < self.threshold * s as f64).collect()
            }
            _ => vec![false; rows],
        };
        if reuse.iter().all(|&r| r) {
            self.cached_steps += 1;
            return Ok(self.rest_residual.clone());
        }
        self.full_steps += 1;
        self.pending = Some((first.clone(), reuse));
        Ok(None)
    }

    /// After the blocks ran: keeps the residuals of the rows that ran them, and returns the
    /// image states to use (the blocks' output, or for rows that reuse, their kept residual
    /// added to this step's first-block output, as [`Self::decide`]'s all-reuse case).
    fn keep(&mut self, after_first: &Tensor, out: &Tensor) -> Result<Tensor> {
        let Some((first, reuse)) = self.pending.take() else { return Ok(out.clone()) };
        let rest = (out - after_first)?;
        let (Some(prev_first), Some(prev_rest)) = (&self.first_residual, &self.rest_residual) else {
            (self.first_residual, self.rest_residual) = (Some(first), Some(rest));
            return Ok(out.clone());
        };
        if !reuse.iter().any(|&r| r) {
            (self.first_residual, self.rest_residual) = (Some(first), Some(rest));
            return Ok(out.clone());
        }
        // Some rows reuse: 1 for rows that ran, 0 for rows that reuse (x * 1 + y * 0 is
        // exactly x, so every row gets what it would get alone).
        let ran: Vec<f32> = reuse.iter().map(|&r| if r { 0.0 } else { 1.0 }).collect();
        let ran = Tensor::from_vec(ran, (reuse.len(), 1, 1), out.device())?.to_dtype(out.dtype())?;
        let kept = (1.0 - &ran)?;
        let pick = |now: &Tensor, before: &Tensor| -> Result<Tensor> { Ok((ran.broadcast_mul(now)? + kept.broadcast_mul(before)?)?) };
        let img = pick(out, &(after_first + prev_rest)?)?;
        let (new_first, new_rest) = (pick(&first, prev_first)?, pick(&rest, prev_rest)?);
        (self.first_residual, self.rest_residual) = (Some(new_first), Some(new_rest));
        Ok(img)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_block_cache_decides_per_row_and_each_row_gets_what_it_would_alone() {
        let dev = Device::Cpu;
        let t = |v: Vec<f32>| Tensor::from_vec(v, (2, 1, 2), &dev).unwrap();
        let mut cache = FirstBlockCache::new(0.1);
        // Step 1: nothing kept, both rows run; the output is the blocks' own.
        let (after_first, out) = (t(vec![1.0, 1.0, 2.0, 2.0]), t(vec![3.0, 3.0, 5.0, 5.0]));
        assert!(cache.decide(&t(vec![1.0, 1.0, 1.0, 1.0])).unwrap().is_none());
        assert_eq!(cache.keep(&after_first, &out).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![3.0, 3.0, 5.0, 5.0]);
        // Step 2: row 0's first residual barely moved, row 1's doubled: row 1 runs, row 0 reuses
        // its kept rest residual (2.0) on this step's first-block output.
        let (after_first, out) = (t(vec![10.0, 10.0, 20.0, 20.0]), t(vec![0.0, 0.0, 7.0, 7.0]));
        assert!(cache.decide(&t(vec![1.01, 1.01, 2.0, 2.0])).unwrap().is_none());
        assert_eq!(cache.keep(&after_first, &out).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![12.0, 12.0, 7.0, 7.0]);
        assert_eq!((cache.full_steps, cache.cached_steps), (2, 0));
        // Step 3: both rows barely moved from their kept residuals (row 0's from step 1, row
        // 1's from step 2): every row reuses, and the blocks are skipped.
        let rest = cache.decide(&t(vec![1.0, 1.0, 2.01, 2.01])).unwrap().expect("all rows reuse");
        assert_eq!(rest.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![2.0, 2.0, -13.0, -13.0]);
        assert_eq!((cache.full_steps, cache.cached_steps), (2, 1));
    }

    #[test]
    fn flux1_dev_has_about_12b_parameters() {
        let n: usize = expected_shapes(&FluxTransformerConfig::flux1_dev()).iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        // Black Forest Labs: "a 12 billion parameter rectified flow transformer".
        assert_eq!(n, 11_901_408_320);
    }
}
