//! `UNet2DConditionModel` built from its diffusers `config.json`.
//!
//! The struct tree mirrors diffusers (`down_blocks.N.resnets.M`, `.attentions.M`,
//! `.downsamplers.0.conv`, `mid_block`, `up_blocks`, `add_embedding`), so checkpoint names map
//! one to one. Per-block heads, transformer depths and layer counts come from the config, and
//! SDXL's `text_time` additional embedding (pooled text embeddings and `add_time_ids`) is built in.
//! LCM-distilled UNets (`time_cond_proj_dim`) take the guidance scale as an embedding added to
//! the timestep's (`time_embedding.cond_proj`), instead of classifier-free guidance.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use candle_transformers::models::stable_diffusion::embeddings::{TimestepEmbedding, Timesteps};

use super::conv::{conv2d, Conv2d};
use super::group_norm::{group_norm, GroupNorm};
use super::resnet::{ResnetBlock2D, ResnetConfig};

use super::attention::{CrossContext, Transformer2DModel, TransformerConfig};
use crate::config::UNetConfig;

/// A down or up block: resnets, optional transformers after each resnet, optional resampler.
pub(crate) struct UNetBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    resampler: Option<Conv2d>,
}

fn resnet(vb: VarBuilder, in_ch: usize, out_ch: usize, temb: usize, c: &UNetConfig, scale: f64) -> Result<ResnetBlock2D> {
    let cfg = ResnetConfig {
        in_channels: in_ch,
        out_channels: out_ch,
        temb_channels: Some(temb),
        groups: c.norm_num_groups,
        eps: c.norm_eps,
        output_scale_factor: scale,
    };
    ResnetBlock2D::new(vb, cfg)
}

impl UNetBlock {
    /// `resample: false` stops before the downsampler (DeepCache's shallow pass needs only the
    /// skip connections of the outermost up block).
    pub(crate) fn down(&self, xs: &Tensor, temb: &Tensor, context: CrossContext, residuals: &mut Vec<Tensor>, resample: bool) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (i, r) in self.resnets.iter().enumerate() {
            xs = r.forward(&xs, Some(temb))?;
            if let Some(a) = self.attentions.get(i) {
                xs = a.forward(&xs, context)?;
            }
            residuals.push(xs.clone());
        }
        if let Some(down) = self.resampler.as_ref().filter(|_| resample) {
            xs = down.forward(&xs)?;
            residuals.push(xs.clone());
        }
        Ok(xs)
    }

    fn up(&self, xs: &Tensor, temb: &Tensor, context: CrossContext, residuals: &mut Vec<Tensor>, size: Option<(usize, usize)>) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (i, r) in self.resnets.iter().enumerate() {
            let skip = residuals.pop().ok_or_else(|| candle_core::Error::Msg("unet: residual stack underflow".into()))?;
            xs = r.forward(&Tensor::cat(&[&xs, &skip], 1)?, Some(temb))?;
            if let Some(a) = self.attentions.get(i) {
                xs = a.forward(&xs, context)?;
            }
        }
        if let Some(up) = &self.resampler {
            let (_, _, h, w) = xs.dims4()?;
            let (h, w) = size.unwrap_or((2 * h, 2 * w));
            xs = up.forward(&xs.upsample_nearest2d(h, w)?)?;
        }
        Ok(xs)
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) per layer.
pub(crate) struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    pub(crate) fn forward(&self, xs: &Tensor, temb: &Tensor, context: CrossContext) -> Result<Tensor> {
        let mut xs = self.resnets[0].forward(xs, Some(temb))?;
        for (a, r) in self.attentions.iter().zip(self.resnets.iter().skip(1)) {
            xs = r.forward(&a.forward(&xs, context)?, Some(temb))?;
        }
        Ok(xs)
    }
}

/// SDXL's `addition_embed_type="text_time"` conditioning.
struct TextTimeEmbedding {
    add_time_proj: Timesteps,
    add_embedding: TimestepEmbedding,
}

/// The conditioning vector every resnet takes: the timestep's sinusoids through
/// `time_embedding` (with LCM's guidance embedding added before it), plus SDXL's `text_time`
/// embedding. A UNet and its ControlNets build it alike, from the same config fields.
pub(crate) struct UNetEmbedding {
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    /// `time_embedding.cond_proj` of LCM-distilled UNets: the guidance embedding into the
    /// timestep embedding's input width.
    cond_proj: Option<candle_nn::Linear>,
    text_time: Option<TextTimeEmbedding>,
}

impl UNetEmbedding {
    pub(crate) fn new(vb: &VarBuilder, c: &UNetConfig) -> Result<Self> {
        let ch0 = c.block_out_channels[0];
        let time_embed_dim = ch0 * 4;
        let cond_proj = match c.time_cond_proj_dim {
            Some(dim) => Some(candle_nn::linear_no_bias(dim, ch0, vb.pp("time_embedding").pp("cond_proj"))?),
            None => None,
        };
        let text_time = match c.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => {
                let dim = c.addition_time_embed_dim.ok_or_else(|| unsupported("text_time without addition_time_embed_dim".into()))?;
                let input = c
                    .projection_class_embeddings_input_dim
                    .ok_or_else(|| unsupported("text_time without projection_class_embeddings_input_dim".into()))?;
                Some(TextTimeEmbedding {
                    add_time_proj: Timesteps::new(dim, c.flip_sin_to_cos, c.freq_shift),
                    add_embedding: TimestepEmbedding::new(vb.pp("add_embedding"), input, time_embed_dim)?,
                })
            }
            Some(other) => return Err(unsupported(format!("addition_embed_type `{other}`"))),
        };
        Ok(Self {
            time_proj: Timesteps::new(ch0, c.flip_sin_to_cos, c.freq_shift),
            time_embedding: TimestepEmbedding::new(vb.pp("time_embedding"), ch0, time_embed_dim)?,
            cond_proj,
            text_time,
        })
    }

    /// The embedding for `batch` rows at `timestep`, in `dtype`; `guidance` goes through
    /// `cond_proj` when both are there.
    pub(crate) fn forward(&self, timestep: f64, batch: usize, dtype: DType, device: &candle_core::Device, added: Option<&AddedCond>, guidance: Option<&Tensor>) -> Result<Tensor> {
        let t = Tensor::full(timestep as f32, batch, device)?;
        let emb = self.time_proj.forward(&t)?.to_dtype(dtype)?;
        // diffusers' TimestepEmbedding: `sample + cond_proj(condition)` before linear_1, when a
        // condition is given.
        let emb = match (&self.cond_proj, guidance) {
            (Some(proj), Some(g)) => (emb + proj.forward(&g.to_dtype(dtype)?)?)?,
            _ => emb,
        };
        let mut emb = self.time_embedding.forward(&emb)?;
        if let Some(tt) = &self.text_time {
            let added = added.ok_or_else(|| candle_core::Error::Msg("SDXL UNet needs text_embeds and time_ids".into()))?;
            let time_ids = added.time_ids.to_dtype(DType::F32)?.flatten_all()?;
            let time_embeds = tt.add_time_proj.forward(&time_ids)?.reshape((batch, ()))?;
            let add = Tensor::cat(&[&added.text_embeds, &time_embeds.to_dtype(added.text_embeds.dtype())?], 1)?;
            emb = (emb + tt.add_embedding.forward(&add.to_dtype(dtype)?)?)?;
        }
        Ok(emb)
    }
}

/// Per-down-block settings read from the config (each given once or per block), checked to be
/// as many as `block_out_channels`.
pub(crate) struct BlockLayout {
    pub heads: Vec<usize>,
    pub layers: Vec<usize>,
    pub depths: Vec<usize>,
    pub cross_dims: Vec<usize>,
    pub time_embed_dim: usize,
}

impl BlockLayout {
    /// Checks what the encoder half (embeddings, down blocks, mid block) of a UNet or ControlNet
    /// needs from its config.
    pub(crate) fn new(c: &UNetConfig) -> Result<Self> {
        let n = c.block_out_channels.len();
        if n == 0 || c.down_block_types.len() != n {
            return Err(unsupported("block_out_channels and down_block_types of different lengths".into()));
        }
        if let Some(t) = &c.class_embed_type {
            return Err(unsupported(format!("class_embed_type `{t}`")));
        }
        if c.encoder_hid_dim.is_some() {
            return Err(unsupported("encoder_hid_dim".into()));
        }
        if !matches!(c.mid_block_type.as_deref(), Some("UNetMidBlock2DCrossAttn") | None) {
            return Err(unsupported(format!("mid_block_type {:?}", c.mid_block_type)));
        }
        if c.reverse_transformer_layers_per_block.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(unsupported("reverse_transformer_layers_per_block".into()));
        }
        let layout = Self {
            heads: c.num_attention_heads.as_ref().unwrap_or(&c.attention_head_dim).expand(n),
            layers: c.layers_per_block.expand(n),
            depths: c.transformer_layers_per_block.expand(n),
            cross_dims: c.cross_attention_dim.expand(n),
            time_embed_dim: c.block_out_channels[0] * 4,
        };
        if [&layout.heads, &layout.layers, &layout.depths, &layout.cross_dims].iter().any(|v| v.len() != n) {
            return Err(unsupported("per-block lists whose length differs from block_out_channels".into()));
        }
        Ok(layout)
    }

    pub(crate) fn blocks(&self) -> usize {
        self.layers.len()
    }
}

fn transformer_config(c: &UNetConfig, channels: usize, heads: usize, depth: usize, context_dim: usize) -> TransformerConfig {
    TransformerConfig { channels, heads, depth, context_dim, groups: c.norm_num_groups, use_linear_projection: c.use_linear_projection }
}

/// Whether a block type is the cross-attention one of its pair (`plain` or `attn`).
fn has_cross_attention(kind: &str, plain: &str, attn: &str) -> Result<bool> {
    match kind {
        k if k == plain => Ok(false),
        k if k == attn => Ok(true),
        other => Err(unsupported(format!("block type `{other}`"))),
    }
}

/// `down_blocks.N`: a UNet's and a ControlNet's alike.
pub(crate) fn down_blocks(vb: &VarBuilder, c: &UNetConfig, layout: &BlockLayout) -> Result<Vec<UNetBlock>> {
    let n = layout.blocks();
    let ch0 = c.block_out_channels[0];
    let mut blocks = Vec::with_capacity(n);
    for i in 0..n {
        let vb_i = vb.pp("down_blocks").pp(i);
        let out_ch = c.block_out_channels[i];
        let with_attn = has_cross_attention(&c.down_block_types[i], "DownBlock2D", "CrossAttnDownBlock2D")?;
        let mut resnets = vec![];
        let mut attentions = vec![];
        for j in 0..layout.layers[i] {
            let in_ch = if j > 0 { out_ch } else if i == 0 { ch0 } else { c.block_out_channels[i - 1] };
            resnets.push(resnet(vb_i.pp("resnets").pp(j), in_ch, out_ch, layout.time_embed_dim, c, 1.0)?);
            if with_attn {
                let tc = transformer_config(c, out_ch, layout.heads[i], layout.depths[i], layout.cross_dims[i]);
                attentions.push(Transformer2DModel::new(vb_i.pp("attentions").pp(j), tc)?);
            }
        }
        let resampler = if i + 1 < n {
            let cfg = Conv2dConfig { padding: c.downsample_padding, stride: 2, ..Default::default() };
            Some(conv2d(out_ch, out_ch, 3, cfg, vb_i.pp("downsamplers").pp(0).pp("conv"))?)
        } else {
            None
        };
        blocks.push(UNetBlock { resnets, attentions, resampler });
    }
    Ok(blocks)
}

/// `mid_block`: a UNet's and a ControlNet's alike.
pub(crate) fn mid_block(vb: &VarBuilder, c: &UNetConfig, layout: &BlockLayout) -> Result<MidBlock> {
    let last = layout.blocks() - 1;
    let mid_ch = c.block_out_channels[last];
    let vb_mid = vb.pp("mid_block");
    Ok(MidBlock {
        resnets: (0..2)
            .map(|j| resnet(vb_mid.pp("resnets").pp(j), mid_ch, mid_ch, layout.time_embed_dim, c, c.mid_block_scale_factor))
            .collect::<Result<Vec<_>>>()?,
        attentions: vec![Transformer2DModel::new(
            vb_mid.pp("attentions").pp(0),
            transformer_config(c, mid_ch, layout.heads[last], layout.depths[last], layout.cross_dims[last]),
        )?],
    })
}

/// Extra conditioning SDXL-style UNets take besides the text states.
#[derive(Debug, Clone)]
pub struct AddedCond {
    /// Pooled, projected embeddings from the second text encoder: `[batch, proj_dim]`.
    pub text_embeds: Tensor,
    /// `original_size + crops_coords_top_left + target_size`: `[batch, 6]`.
    pub time_ids: Tensor,
}

/// The denoising UNet of the Stable Diffusion family.
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    embedding: UNetEmbedding,
    down_blocks: Vec<UNetBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UNetBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    center_input_sample: bool,
    /// The config this UNet was built from.
    pub config: UNetConfig,
}

/// diffusers' `get_guidance_scale_embedding`: `w * 1000` in sinusoids, `[sin | cos]` over
/// `dim / 2` frequencies `10000^(-k / (dim/2 - 1))`, zero-padded to an odd `dim`; a row per
/// sample. LCM pipelines pass `w = guidance_scale - 1`. Computed in f32, step for step as
/// diffusers does: the arguments reach thousands of radians, where f64 would differ.
pub fn guidance_embedding(w: f64, dim: usize, rows: usize, device: &candle_core::Device) -> Result<Tensor> {
    let half = dim / 2;
    let step = 10000f32.ln() / (half as f32 - 1.0);
    let w = w as f32 * 1000.0;
    let args: Vec<f32> = (0..half).map(|k| w * (k as f32 * -step).exp()).collect();
    let mut row: Vec<f32> = args.iter().map(|a| a.sin()).chain(args.iter().map(|a| a.cos())).collect();
    row.resize(dim, 0.0);
    Tensor::from_vec(row, (1, dim), device)?.repeat((rows, 1))
}

fn unsupported(what: String) -> candle_core::Error {
    candle_core::Error::Msg(format!("unet/config.json: {what} is not supported"))
}

impl UNet2DConditionModel {
    /// Builds the UNet from its config; `vb` is rooted at the checkpoint's top level.
    pub fn new(vb: VarBuilder, config: &UNetConfig) -> Result<Self> {
        let c = config;
        let layout = BlockLayout::new(c)?;
        let n = layout.blocks();
        if c.up_block_types.len() != n {
            return Err(unsupported("block_out_channels and up_block_types of different lengths".into()));
        }
        let ch0 = c.block_out_channels[0];
        let time_embed_dim = layout.time_embed_dim;
        let conv_cfg = Conv2dConfig { padding: 1, ..Default::default() };
        let conv_in = conv2d(c.in_channels, ch0, 3, conv_cfg, vb.pp("conv_in"))?;
        let embedding = UNetEmbedding::new(&vb, c)?;
        let mut down_blocks = down_blocks(&vb, c, &layout)?;
        let mut mid_block = mid_block(&vb, c, &layout)?;

        let last = n - 1;
        let mid_ch = c.block_out_channels[last];
        let rev = |v: &[usize], i: usize| v[n - 1 - i];
        let mut up_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let vb_i = vb.pp("up_blocks").pp(i);
            let prev_out = if i == 0 { mid_ch } else { rev(&c.block_out_channels, i - 1) };
            let out_ch = rev(&c.block_out_channels, i);
            let in_ch = rev(&c.block_out_channels, (i + 1).min(last));
            let with_attn = has_cross_attention(&c.up_block_types[i], "UpBlock2D", "CrossAttnUpBlock2D")?;
            let num_layers = rev(&layout.layers, i) + 1;
            let mut resnets = vec![];
            let mut attentions = vec![];
            for j in 0..num_layers {
                let skip = if j == num_layers - 1 { in_ch } else { out_ch };
                let res_in = if j == 0 { prev_out } else { out_ch };
                resnets.push(resnet(vb_i.pp("resnets").pp(j), res_in + skip, out_ch, time_embed_dim, c, 1.0)?);
                if with_attn {
                    let tc = transformer_config(c, out_ch, rev(&layout.heads, i), rev(&layout.depths, i), rev(&layout.cross_dims, i));
                    attentions.push(Transformer2DModel::new(vb_i.pp("attentions").pp(j), tc)?);
                }
            }
            let resampler = if i < last {
                Some(conv2d(out_ch, out_ch, 3, conv_cfg, vb_i.pp("upsamplers").pp(0).pp("conv"))?)
            } else {
                None
            };
            up_blocks.push(UNetBlock { resnets, attentions, resampler });
        }

        // IP-Adapter numbers cross-attention down, up, then mid (diffusers' `attn_processors`).
        let mut next_slot = 0;
        for t in down_blocks.iter_mut().chain(up_blocks.iter_mut()).flat_map(|b| b.attentions.iter_mut()).chain(mid_block.attentions.iter_mut()) {
            t.number_image_slots(&mut next_slot);
        }
        Ok(Self {
            conv_in,
            embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(c.norm_num_groups, ch0, c.norm_eps, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(ch0, c.out_channels, 3, conv_cfg, vb.pp("conv_out"))?,
            center_input_sample: c.center_input_sample,
            config: config.clone(),
        })
    }

    /// The query widths of its cross-attention layers in IP-Adapter's order (down blocks, up
    /// blocks, then the mid block): an adapter needs one key/value pair of each width.
    pub fn cross_attention_widths(&self) -> Vec<usize> {
        self.down_blocks
            .iter()
            .chain(&self.up_blocks)
            .flat_map(|b| &b.attentions)
            .chain(&self.mid_block.attentions)
            .flat_map(|t| t.cross_attention_widths())
            .collect()
    }

    /// Whether this UNet needs [`AddedCond`] (SDXL).
    pub fn needs_added_cond(&self) -> bool {
        self.embedding.text_time.is_some()
    }

    /// The width of the guidance embedding an LCM-distilled UNet takes, `None` for others.
    pub fn guidance_embedding_dim(&self) -> Option<usize> {
        self.config.time_cond_proj_dim
    }

    /// One evaluation: predicts noise (or v) for `sample` at `timestep` given the text states,
    /// and for LCM-distilled UNets the guidance embedding ([`guidance_embedding`], a row per
    /// sample).
    pub fn forward<'c>(&self, sample: &Tensor, timestep: f64, context: impl Into<CrossContext<'c>>, added: Option<&AddedCond>, guidance: Option<&Tensor>) -> Result<Tensor> {
        self.forward_inner(sample, timestep, context.into(), added, guidance, DeepStep::Full(None), None)
    }

    /// One evaluation with ControlNets' residuals added to the skip connections and the mid
    /// block's output, as diffusers' `down_block_additional_residuals` and
    /// `mid_block_additional_residual`.
    pub fn forward_with_control<'c>(&self, sample: &Tensor, timestep: f64, context: impl Into<CrossContext<'c>>, added: Option<&AddedCond>, guidance: Option<&Tensor>, control: &ControlResiduals) -> Result<Tensor> {
        self.forward_inner(sample, timestep, context.into(), added, guidance, DeepStep::Full(None), Some(control))
    }

    /// One step under DeepCache ([`DeepCache`] decides whether the whole UNet runs).
    pub fn forward_cached<'c>(&self, sample: &Tensor, timestep: f64, context: impl Into<CrossContext<'c>>, added: Option<&AddedCond>, guidance: Option<&Tensor>, cache: &mut DeepCache) -> Result<Tensor> {
        let context = context.into();
        let step = cache.step;
        cache.step += 1;
        match cache.deep.take() {
            Some(deep) if step % cache.interval != 0 => {
                let out = self.forward_inner(sample, timestep, context, added, guidance, DeepStep::Shallow(&deep), None);
                cache.deep = Some(deep);
                cache.shallow_steps += 1;
                out
            }
            _ => {
                cache.full_steps += 1;
                self.forward_inner(sample, timestep, context, added, guidance, DeepStep::Full(Some(&mut cache.deep)), None)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_inner(&self, sample: &Tensor, timestep: f64, context: CrossContext, added: Option<&AddedCond>, guidance: Option<&Tensor>, step: DeepStep, control: Option<&ControlResiduals>) -> Result<Tensor> {
        let batch = sample.dim(0)?;
        let device = sample.device();
        let xs = if self.center_input_sample { ((sample * 2.0)? - 1.0)? } else { sample.clone() };

        if self.embedding.cond_proj.is_some() && guidance.is_none() {
            return Err(candle_core::Error::Msg("an LCM-distilled UNet needs the guidance embedding".into()));
        }
        let emb = self.embedding.forward(timestep, batch, sample.dtype(), device, added, guidance)?;

        let xs = self.conv_in.forward(&xs)?;
        let mut residuals = vec![xs.clone()];
        let (first_down, last_up) = match (self.down_blocks.first(), self.up_blocks.last()) {
            (Some(d), Some(u)) => (d, u),
            _ => return Err(candle_core::Error::Msg("unet: no down or up blocks".into())),
        };
        let mut xs = match step {
            // DeepCache's shallow pass: the outermost down block's skip connections, and the
            // deep features the last full step fed the outermost up block.
            DeepStep::Shallow(_) if control.is_some() => {
                return Err(candle_core::Error::Msg("unet: DeepCache's shallow steps take no ControlNet residuals".into()));
            }
            DeepStep::Shallow(deep) => {
                first_down.down(&xs, &emb, context, &mut residuals, false)?;
                deep.clone()
            }
            DeepStep::Full(keep) => {
                let mut xs = xs;
                for block in &self.down_blocks {
                    xs = block.down(&xs, &emb, context, &mut residuals, true)?;
                }
                if let Some(control) = control {
                    if control.down.len() != residuals.len() {
                        return Err(candle_core::Error::Msg(format!(
                            "unet: the ControlNet gives {} skip residuals where the UNet has {}",
                            control.down.len(),
                            residuals.len()
                        )));
                    }
                    for (r, add) in residuals.iter_mut().zip(&control.down) {
                        *r = (&*r + add)?;
                    }
                }
                let mut xs = self.mid_block.forward(&xs, &emb, context)?;
                if let Some(control) = control {
                    xs = (xs + &control.mid)?;
                }
                for block in &self.up_blocks[..self.up_blocks.len() - 1] {
                    // With odd latent sizes, upsample to the size of the skip connection that comes next.
                    let after = residuals.len().saturating_sub(block.resnets.len());
                    let size = match after.checked_sub(1).and_then(|k| residuals.get(k)) {
                        Some(r) if block.resampler.is_some() => {
                            let (_, _, h, w) = r.dims4()?;
                            Some((h, w))
                        }
                        _ => None,
                    };
                    xs = block.up(&xs, &emb, context, &mut residuals, size)?;
                }
                if let Some(keep) = keep {
                    *keep = Some(xs.clone());
                }
                xs
            }
        };
        xs = last_up.up(&xs, &emb, context, &mut residuals, None)?;
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }
}

/// What ControlNets add to a UNet evaluation: one residual per skip connection (the
/// `conv_in` output, then each down block's resnets and downsampler, in order) and one for the
/// mid block's output, already scaled.
#[derive(Debug, Clone)]
pub struct ControlResiduals {
    pub down: Vec<Tensor>,
    pub mid: Tensor,
}

impl ControlResiduals {
    /// The sum of two ControlNets' residuals (diffusers' MultiControlNetModel).
    pub fn add(&self, other: &ControlResiduals) -> Result<ControlResiduals> {
        if self.down.len() != other.down.len() {
            return Err(candle_core::Error::Msg("ControlNets with different numbers of residuals".into()));
        }
        let down = self.down.iter().zip(&other.down).map(|(a, b)| a + b).collect::<Result<Vec<_>>>()?;
        Ok(ControlResiduals { down, mid: (&self.mid + &other.mid)? })
    }
}

/// Whether one evaluation runs the whole UNet (keeping the deep features when asked) or only
/// DeepCache's shallow pass over kept ones.
enum DeepStep<'a> {
    Full(Option<&'a mut Option<Tensor>>),
    Shallow(&'a Tensor),
}

/// DeepCache's state over one generation: the features the outermost up block got on the last
/// full evaluation, and which step comes next. The whole UNet runs on the first step and every
/// `interval` steps after it; the steps between run only the outermost down block (without its
/// downsampler) and the outermost up block. Those are the high-resolution blocks, so a shallow
/// step saves most of the deep blocks' cost but not all of a step's.
#[derive(Debug)]
pub struct DeepCache {
    interval: usize,
    step: usize,
    deep: Option<Tensor>,
    pub full_steps: usize,
    pub shallow_steps: usize,
}

impl DeepCache {
    /// `interval` 1 (or 0) runs every step in full.
    pub fn new(interval: usize) -> Self {
        Self { interval: interval.max(1), step: 0, deep: None, full_steps: 0, shallow_steps: 0 }
    }
}
