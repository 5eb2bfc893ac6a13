//! diffusers' `FluxControlNetModel` (the InstantX / Shakker-Labs layout, Union nets included),
//! in BFL names like [`super::flux`]'s transformer, whose blocks it reuses.
//!
//! A FLUX ControlNet is a shallow copy of the transformer's front: the same input embeddings and
//! its first few double- and single-stream blocks. It reads the packed VAE latents of the
//! control image through `controlnet_x_embedder` (zero-initialised in training), added to the
//! embedded noisy latents. After each of its blocks, the image tokens pass through one
//! `controlnet_blocks.N` (or `controlnet_single_blocks.N`) linear layer and, times the
//! conditioning scale, become a residual the transformer adds after its own blocks
//! ([`FluxControlResiduals`]). A Union net also prepends a learned token per control type
//! (`controlnet_mode_embedder`) to the text.

use candle_core::{DType, Device, Module, Tensor};

use super::flux::{self as flux_model, rope, DoubleStreamBlock, Embedders, FluxInputs, SingleStreamBlock};
use crate::config::FluxControlNetConfig;
use crate::error::{EngineError, Result};
use crate::weights::store::{Linear, Weights};

/// Every tensor a FLUX ControlNet holds, with its shape, in BFL names (strict: the loader
/// refuses anything missing or extra).
pub fn expected_shapes(c: &FluxControlNetConfig) -> Vec<(String, Vec<usize>)> {
    let h = c.base.hidden_size();
    let mut v: Vec<(String, Vec<usize>)> = flux_model::expected_shapes(&c.base).into_iter().filter(|(n, _)| !n.starts_with("final_layer.")).collect();
    let mut linear = |name: String, i: usize, o: usize| {
        v.push((format!("{name}.weight"), vec![o, i]));
        v.push((format!("{name}.bias"), vec![o]));
    };
    for i in 0..c.base.num_layers {
        linear(format!("controlnet_blocks.{i}"), h, h);
    }
    for i in 0..c.base.num_single_layers {
        linear(format!("controlnet_single_blocks.{i}"), h, h);
    }
    linear("controlnet_x_embedder".into(), c.base.in_channels, h);
    if let Some(modes) = c.num_mode {
        v.push(("controlnet_mode_embedder.weight".into(), vec![modes, h]));
    }
    v
}

/// What one ControlNet evaluation gives the transformer: one residual per ControlNet double
/// block and per single block, image tokens only, already times the conditioning scale.
#[derive(Debug, Clone)]
pub struct FluxControlResiduals {
    pub double: Vec<Tensor>,
    pub single: Vec<Tensor>,
}

impl FluxControlResiduals {
    /// The element-wise sum of two ControlNets' residuals (diffusers' FluxMultiControlNetModel).
    /// The stacks must be equally deep: diffusers' `zip` would silently drop the deeper one's
    /// extra residuals.
    pub fn add(&self, other: &Self) -> Result<Self> {
        if self.double.len() != other.double.len() || self.single.len() != other.single.len() {
            return Err(EngineError::param(
                "controlnets",
                format!(
                    "FLUX ControlNets used together must have as many blocks: {}+{} against {}+{} (double+single)",
                    self.double.len(),
                    self.single.len(),
                    other.double.len(),
                    other.single.len()
                ),
            ));
        }
        let sum = |a: &[Tensor], b: &[Tensor]| a.iter().zip(b).map(|(x, y)| Ok((x + y)?)).collect::<Result<Vec<_>>>();
        Ok(Self { double: sum(&self.double, &other.double)?, single: sum(&self.single, &other.single)? })
    }

    /// `img` after the transformer's double block `block` of `blocks`, plus its residual.
    pub(crate) fn add_double(&self, img: &Tensor, block: usize, blocks: usize) -> Result<Tensor> {
        add_sample(&self.double, img, block, blocks)
    }

    /// The image tokens after the transformer's single block `block` of `blocks`, plus theirs.
    pub(crate) fn add_single(&self, img: &Tensor, block: usize, blocks: usize) -> Result<Tensor> {
        add_sample(&self.single, img, block, blocks)
    }
}

fn add_sample(samples: &[Tensor], img: &Tensor, block: usize, blocks: usize) -> Result<Tensor> {
    if samples.is_empty() {
        return Ok(img.clone());
    }
    let sample = &samples[sample_index(block, blocks, samples.len())];
    Ok((img + sample.to_dtype(img.dtype())?)?)
}

/// Which of `samples` residuals goes after the transformer's block `block` of `blocks`:
/// diffusers spreads them evenly, `ceil(blocks / samples)` blocks per residual.
pub(crate) fn sample_index(block: usize, blocks: usize, samples: usize) -> usize {
    block / blocks.div_ceil(samples)
}

/// A loaded FLUX ControlNet.
pub struct FluxControlNet {
    embed: Embedders,
    double_blocks: Vec<DoubleStreamBlock>,
    single_blocks: Vec<SingleStreamBlock>,
    controlnet_blocks: Vec<Linear>,
    controlnet_single_blocks: Vec<Linear>,
    controlnet_x_embedder: Linear,
    mode_embedder: Option<Tensor>,
    /// The config it was built from.
    pub config: FluxControlNetConfig,
    dtype: DType,
    device: Device,
}

impl std::fmt::Debug for FluxControlNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FluxControlNet").field("num_layers", &self.config.base.num_layers).field("num_single_layers", &self.config.base.num_single_layers).finish_non_exhaustive()
    }
}

impl FluxControlNet {
    /// Builds the ControlNet from BFL-named weights, checking every shape first.
    pub fn new(w: &Weights, config: &FluxControlNetConfig, dtype: DType, device: &Device) -> Result<Self> {
        if config.conditioning_embedding_channels.is_some() {
            return Err(EngineError::Unsupported(
                "FLUX ControlNets that read pixels through their own convolutions (conditioning_embedding_channels, XLabs style) are not supported yet; InstantX-style nets that read VAE latents are".into(),
            ));
        }
        if config.num_mode == Some(0) {
            return Err(EngineError::Unsupported("a Union FLUX ControlNet with num_mode 0 has no control modes".into()));
        }
        // Every block has many tensors: more blocks than tensors is a bad config or file, and
        // checked before the expected list (a line per tensor) is built.
        let tensors = w.names().count();
        if config.base.num_layers.saturating_add(config.base.num_single_layers) > tensors {
            return Err(EngineError::Unsupported(format!(
                "the FLUX ControlNet config asks for {} double and {} single blocks, more than its {tensors} tensors could hold",
                config.base.num_layers, config.base.num_single_layers
            )));
        }
        w.check(&expected_shapes(config), "the FLUX ControlNet config")?;
        let c = &config.base;
        let (heads, hidden) = (c.num_attention_heads, c.hidden_size());
        Ok(Self {
            embed: Embedders::new(w, c)?,
            double_blocks: (0..c.num_layers).map(|i| DoubleStreamBlock::new(w, &format!("double_blocks.{i}"), heads)).collect::<Result<_>>()?,
            single_blocks: (0..c.num_single_layers).map(|i| SingleStreamBlock::new(w, &format!("single_blocks.{i}"), heads, hidden)).collect::<Result<_>>()?,
            controlnet_blocks: (0..c.num_layers).map(|i| w.linear(&format!("controlnet_blocks.{i}"))).collect::<Result<_>>()?,
            controlnet_single_blocks: (0..c.num_single_layers).map(|i| w.linear(&format!("controlnet_single_blocks.{i}"))).collect::<Result<_>>()?,
            controlnet_x_embedder: w.linear("controlnet_x_embedder")?,
            mode_embedder: if config.num_mode.is_some() { Some(w.tensor("controlnet_mode_embedder.weight")?) } else { None },
            config: config.clone(),
            dtype,
            device: device.clone(),
        })
    }

    /// The residuals for one transformer evaluation of `x` (`x.guidance` reaches the net only
    /// when it embeds guidance itself, as diffusers' pipeline decides from the ControlNet's own
    /// config): `cond` is the control image's packed latents `[B, L, in_channels]`, `mode` the
    /// Union control type per row (`[B]`, u32), and `scale` multiplies every residual.
    pub fn forward(&self, x: &FluxInputs, cond: &Tensor, mode: Option<&Tensor>, scale: f64) -> Result<FluxControlResiduals> {
        let dtype = self.dtype;
        let img = self.embed.img_in.forward(&x.img.to_dtype(dtype)?)?;
        let img = (img + self.controlnet_x_embedder.forward(&cond.to_dtype(dtype)?)?)?;
        let vec = self.embed.vec(x, dtype)?;
        let txt = self.embed.txt_in.forward(&x.txt.to_dtype(dtype)?)?;
        let (txt, txt_ids) = match (&self.mode_embedder, mode) {
            (Some(table), Some(mode)) => {
                let token = table.index_select(&mode.to_device(&self.device)?, 0)?.unsqueeze(1)?;
                let ids = Tensor::cat(&[&x.txt_ids.narrow(0, 0, 1)?, x.txt_ids], 0)?;
                (Tensor::cat(&[&token, &txt], 1)?, ids)
            }
            (Some(_), None) => return Err(EngineError::param("controlnets", "a Union FLUX ControlNet needs a control mode")),
            (None, Some(_)) => return Err(EngineError::param("controlnets", "a control mode is for Union FLUX ControlNets, and this one has none")),
            (None, None) => (txt, x.txt_ids.clone()),
        };
        let ids = Tensor::cat(&[&txt_ids, x.img_ids], 0)?.to_device(&self.device)?;
        let pe = rope(&ids, &self.config.base.axes_dims_rope, 10000.0)?;
        let project = |linear: &Linear, sample: &Tensor| -> Result<Tensor> { Ok((linear.forward(sample)? * scale)?) };

        let (mut img, mut txt) = (img, txt);
        let mut double = vec![];
        for (block, linear) in self.double_blocks.iter().zip(&self.controlnet_blocks) {
            (img, txt) = block.forward(&img, &txt, &vec, &pe)?;
            double.push(project(linear, &img)?);
        }
        let txt_len = txt.dim(1)?;
        let tokens = img.dim(1)?;
        let mut joint = Tensor::cat(&[txt, img], 1)?;
        let mut single = vec![];
        for (block, linear) in self.single_blocks.iter().zip(&self.controlnet_single_blocks) {
            joint = block.forward(&joint, &vec, &pe)?;
            single.push(project(linear, &joint.narrow(1, txt_len, tokens)?)?);
        }
        Ok(FluxControlResiduals { double, single })
    }

    /// The net's width; it must equal the transformer's.
    pub fn hidden_size(&self) -> usize {
        self.config.base.hidden_size()
    }
}

#[cfg(test)]
mod tests {
    use super::sample_index;

    #[test]
    fn residuals_spread_over_the_transformers_blocks_as_diffusers_spreads_them() {
        let map = |blocks: usize, samples: usize| (0..blocks).map(|b| sample_index(b, blocks, samples)).collect::<Vec<_>>();
        // FLUX.1's 19 double blocks with an InstantX Union net's 5: four blocks per residual,
        // the last three on residual 4.
        assert_eq!(map(19, 5), [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4]);
        // 38 single blocks, 10 residuals: four each, the last two on residual 9.
        assert_eq!(map(38, 10).iter().filter(|&&s| s == 9).count(), 2);
        assert_eq!(map(3, 2), [0, 0, 1]);
        assert_eq!(map(2, 1), [0, 0]);
        assert_eq!(map(2, 2), [0, 1]);
    }
}
