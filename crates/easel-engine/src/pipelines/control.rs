//! ControlNets in the denoising loop, as diffusers' StableDiffusionControlNetPipeline,
//! StableDiffusionXLControlNetPipeline and FluxControlNetPipeline run them: each ControlNet sees
//! the denoiser's input, the timestep, the text states and its conditioning image, and its
//! residuals (times its conditioning scale, on the steps between its start and end) are summed
//! into the UNet's or the FLUX transformer's.
//!
//! A ControlNet is loaded once ([`ControlNet::load`], from a diffusers folder or a community
//! single file) and shared by every request that names it;
//! it never touches the base model's weights, so switching ControlNets reloads nothing else.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::common::{load_tensors, GenerateParams};
use crate::config::{read_json, ControlNetConfig, FluxControlNetConfig, FluxTransformerConfig, UNetConfig};
use crate::error::{EngineError, Result};
use crate::models::controlnet::ControlNetModel;
use crate::models::flux::FluxInputs;
use crate::models::flux_controlnet::{FluxControlNet, FluxControlResiduals};
use crate::models::unet::{AddedCond, ControlResiduals};
use crate::weights::keys::{flux as flux_keys, ldm};
use crate::weights::store::Weights;

/// A loaded ControlNet.
#[derive(Debug)]
pub struct ControlNet {
    net: Net,
    /// Where it was loaded from.
    pub path: PathBuf,
}

/// The two kinds of ControlNet: a UNet encoder copy, or a FLUX transformer front copy.
#[derive(Debug)]
enum Net {
    Unet(ControlNetModel),
    Flux(FluxControlNet),
}

/// The `_class_name` of a diffusers `config.json`, which tells the ControlNet kinds apart.
#[derive(serde::Deserialize)]
struct ClassName {
    #[serde(rename = "_class_name", default)]
    class_name: Option<String>,
}

/// Names only a FLUX ControlNet's weights have (InstantX's diffusers names, XLabs' BFL ones).
const FLUX_CONTROLNET_NAMES: [&str; 4] = ["controlnet_x_embedder.weight", "controlnet_single_blocks.0.weight", "pos_embed_input.weight", "double_blocks.0.img_attn.qkv.weight"];

/// The model a single-file ControlNet runs with, whose architecture it mirrors.
#[derive(Debug, Clone, Copy)]
pub enum ControlNetHost<'a> {
    Unet(&'a UNetConfig),
    Flux(&'a FluxTransformerConfig),
}

impl ControlNet {
    /// Loads a ControlNet: a folder in the diffusers layout (`config.json` and
    /// `diffusion_pytorch_model.safetensors` or its `.fp16` variant, as the hub's ControlNet
    /// repositories hold them), or a single `.safetensors` file as the community publishes
    /// them (LDM names, lllyasviel's and ComfyUI's, or diffusers' names without a config). A
    /// single file has no config: its architecture is `host`'s (the UNet of the model it runs
    /// with; a ControlNet mirrors it), and its conditioning embedding is read off its weights.
    /// FLUX ControlNets (`FluxControlNetModel`) load from a diffusers folder, or from one file
    /// in diffusers' names (as ComfyUI repackages InstantX's), its depths and widths read off
    /// its weights and its rotary axes taken from the FLUX host.
    pub fn load(path: &Path, host: Option<ControlNetHost>, dtype: DType, device: &Device) -> Result<Self> {
        let (config, tensors) = if path.is_dir() {
            let class: ClassName = read_json(&path.join("config.json"))?;
            let (parent, name) = match (path.parent(), path.file_name().and_then(|n| n.to_str())) {
                (Some(parent), Some(name)) => (parent, name),
                _ => return Err(EngineError::MissingFile { path: path.to_path_buf(), hint: "not a ControlNet folder".into() }),
            };
            let files = crate::weights::source::component_weights(parent, name, dtype != DType::F32)?;
            match class.class_name.as_deref() {
                Some("FluxControlNetModel") => return Self::load_flux(path, &files, dtype, device),
                Some(other) if other.starts_with("Flux") => {
                    return Err(EngineError::Unsupported(format!("{}: `{other}` is not supported; a FLUX ControlNet folder holds one FluxControlNetModel", path.display())))
                }
                _ => {}
            }
            (read_json::<ControlNetConfig>(&path.join("config.json"))?, load_tensors(&files, dtype, device)?)
        } else if path.is_file() {
            let no_host = || EngineError::param("controlnets", format!("{}: a single-file ControlNet takes its architecture from the model it runs with", path.display()));
            // The header tells the kinds apart; only the one being loaded is read.
            let names = crate::weights::read_tensor_names(path)?;
            if names.iter().any(|n| FLUX_CONTROLNET_NAMES.contains(&n.as_str())) {
                if names.iter().any(|n| n.starts_with("input_hint_block.") || n == "pos_embed_input.weight") {
                    return Err(EngineError::Unsupported(format!(
                        "{}: XLabs-style FLUX ControlNets (a pixel hint block) are not supported yet; InstantX-style ones, which read VAE latents, are",
                        path.display()
                    )));
                }
                return match host {
                    Some(ControlNetHost::Flux(host)) => Self::load_flux_file(path, host, dtype, device),
                    Some(ControlNetHost::Unet(_)) => Err(EngineError::param("controlnets", format!("the ControlNet {} is for FLUX, and this model is not", path.display()))),
                    None => Err(no_host()),
                };
            }
            let host = match host {
                Some(ControlNetHost::Unet(unet)) => unet,
                Some(ControlNetHost::Flux(_)) => return Err(EngineError::param("controlnets", format!("the ControlNet {} is for a UNet (Stable Diffusion), and this model is FLUX", path.display()))),
                None => return Err(no_host()),
            };
            let tensors = ldm::controlnet(path, load_tensors(&[path.to_path_buf()], dtype, device)?)?;
            (single_file_config(path, host, &tensors)?, tensors)
        } else {
            return Err(EngineError::MissingFile {
                path: path.to_path_buf(),
                hint: "a ControlNet is a folder with config.json and diffusion_pytorch_model.safetensors, or one .safetensors file".into(),
            });
        };
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        let model = ControlNetModel::new(vb, &config).map_err(|e| crate::weights::bad_weights(path, &e))?;
        Ok(Self { net: Net::Unet(model), path: path.to_path_buf() })
    }

    /// A `FluxControlNetModel` folder: its weights renamed to BFL names, as the transformer's.
    fn load_flux(path: &Path, files: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        let config: FluxControlNetConfig = read_json(&path.join("config.json"))?;
        let mut weights = Weights::read_safetensors(files, dtype, device)?;
        flux_keys::to_bfl(&mut weights)?;
        Ok(Self { net: Net::Flux(FluxControlNet::new(&weights, &config, dtype, device)?), path: path.to_path_buf() })
    }

    /// A FLUX ControlNet in one file of diffusers' names: its config read off its weights.
    fn load_flux_file(path: &Path, host: &FluxTransformerConfig, dtype: DType, device: &Device) -> Result<Self> {
        let mut weights = Weights::read_safetensors(&[path.to_path_buf()], dtype, device)?;
        flux_keys::to_bfl(&mut weights)?;
        let config = flux_file_config(path, &weights, host)?;
        Ok(Self { net: Net::Flux(FluxControlNet::new(&weights, &config, dtype, device)?), path: path.to_path_buf() })
    }

    /// Whether it was trained for an SDXL UNet.
    pub fn is_sdxl(&self) -> bool {
        matches!(&self.net, Net::Unet(m) if m.needs_added_cond())
    }

    /// Whether it is a FLUX ControlNet.
    pub fn is_flux(&self) -> bool {
        matches!(self.net, Net::Flux(_))
    }

    /// The model family it was trained for, in words.
    pub fn family_name(&self) -> &'static str {
        match &self.net {
            Net::Flux(_) => "FLUX",
            Net::Unet(m) if m.needs_added_cond() => "SDXL",
            Net::Unet(_) => "Stable Diffusion 1.x/2.x",
        }
    }

    /// The FLUX ControlNet inside, if it is one.
    pub(crate) fn flux(&self) -> Option<&FluxControlNet> {
        match &self.net {
            Net::Flux(f) => Some(f),
            Net::Unet(_) => None,
        }
    }

    fn unet(&self) -> Result<&ControlNetModel> {
        match &self.net {
            Net::Unet(m) => Ok(m),
            Net::Flux(_) => Err(EngineError::param("controlnets", format!("the ControlNet {} is for FLUX, not a UNet", self.path.display()))),
        }
    }

    /// Why this ControlNet cannot drive `unet` with a VAE of `latent_channels` channels and
    /// `vae_factor` pixels per latent cell (`None`: it can): its residuals must have the UNet's
    /// skip widths and count, it reads the latents (alone: an inpainting UNet's extra mask and
    /// picture channels never reach it, as in diffusers' ControlNet inpainting pipelines) and the
    /// text states, and its image embedding lands on the latent grid. SD 2.x ControlNets on SD
    /// 1.x models fail here (1024-wide text states against 768).
    pub fn mismatch(&self, unet: &UNetConfig, latent_channels: usize, vae_factor: usize) -> Option<String> {
        let model = match self.unet() {
            Ok(m) => m,
            Err(_) => return Some("it is a FLUX ControlNet".into()),
        };
        let mine = &model.config.unet;
        let n = unet.block_out_channels.len();
        let differs = |what: &str, a: String, b: String| (a != b).then(|| format!("its {what} is {a}, the UNet's {b}"));
        differs("block_out_channels", format!("{:?}", mine.block_out_channels), format!("{:?}", unet.block_out_channels))
            .or_else(|| differs("layers_per_block", format!("{:?}", mine.layers_per_block.expand(n)), format!("{:?}", unet.layers_per_block.expand(n))))
            .or_else(|| differs("cross_attention_dim", format!("{:?}", mine.cross_attention_dim.expand(n)), format!("{:?}", unet.cross_attention_dim.expand(n))))
            .or_else(|| (mine.in_channels != latent_channels).then(|| format!("its in_channels is {}, the latents have {latent_channels}", mine.in_channels)))
            .or_else(|| {
                let channels = model.config.conditioning_channels;
                (channels != 3).then(|| format!("it takes {channels}-channel control images, and easel gives it RGB pictures"))
            })
            .or_else(|| differs("projection_class_embeddings_input_dim", format!("{:?}", mine.projection_class_embeddings_input_dim), format!("{:?}", unet.projection_class_embeddings_input_dim)))
            .or_else(|| differs("addition_time_embed_dim", format!("{:?}", mine.addition_time_embed_dim), format!("{:?}", unet.addition_time_embed_dim)))
            .or_else(|| {
                let downscale = model.image_downscale();
                (downscale != vae_factor).then(|| format!("its image embedding shrinks images {downscale}x, the VAE {vae_factor}x"))
            })
    }
}

/// A single file's config: the host UNet's architecture (with SDXL's `text_time` embedding
/// exactly when the file has one), and the conditioning embedding's channels read off its
/// convolutions (`conv_in`, then every second block, which halves the image).
fn single_file_config(path: &Path, host: &UNetConfig, tensors: &HashMap<String, Tensor>) -> Result<ControlNetConfig> {
    let dim = |name: &str, axis: usize| weight_dim(path, tensors.get(name).map(|t| t.dims()), name, axis);
    let mut widths = vec![dim("controlnet_cond_embedding.conv_in.weight", 0)?];
    let mut k = 1;
    while let Some(t) = tensors.get(&format!("controlnet_cond_embedding.blocks.{k}.weight")) {
        widths.push(t.dim(0)?);
        k += 2;
    }
    let mut unet = host.clone();
    unet.in_channels = dim("conv_in.weight", 1)?;
    if !tensors.contains_key("add_embedding.linear_1.weight") {
        unet.addition_embed_type = None;
    }
    Ok(ControlNetConfig {
        conditioning_channels: dim("controlnet_cond_embedding.conv_in.weight", 1)?,
        conditioning_embedding_out_channels: widths,
        controlnet_conditioning_channel_order: "rgb".into(),
        global_pool_conditions: false,
        unet,
    })
}

/// A FLUX ControlNet file's config, from its (BFL-renamed) weights: widths from the input
/// projections, depths from the block indices, the head size from the QK norms, guidance and
/// Union modes from whether their embeddings exist. The rotary axes are not in the weights:
/// they are the host transformer's (the fit check compares the rest).
fn flux_file_config(path: &Path, w: &Weights, host: &FluxTransformerConfig) -> Result<FluxControlNetConfig> {
    let shapes = w.shapes();
    let dim = |name: &str, axis: usize| weight_dim(path, shapes.get(name).map(Vec::as_slice), name, axis);
    let count = |prefix: &str| shapes.keys().filter_map(|n| n.strip_prefix(prefix)?.split('.').next()?.parse::<usize>().ok()).map(|i| i.saturating_add(1)).max().unwrap_or(0);
    let (hidden, in_channels) = (dim("img_in.weight", 0)?, dim("img_in.weight", 1)?);
    let head = dim("double_blocks.0.img_attn.norm.query_norm.scale", 0).or_else(|_| dim("single_blocks.0.norm.query_norm.scale", 0))?;
    if head == 0 || hidden % head != 0 {
        return Err(EngineError::BadWeights { path: path.to_path_buf(), message: format!("a width of {hidden} is not a whole number of {head}-wide heads") });
    }
    let base = FluxTransformerConfig {
        patch_size: 1,
        in_channels,
        out_channels: None,
        num_layers: count("double_blocks."),
        num_single_layers: count("single_blocks."),
        attention_head_dim: head,
        num_attention_heads: hidden / head,
        joint_attention_dim: dim("txt_in.weight", 1)?,
        pooled_projection_dim: dim("vector_in.in_layer.weight", 1)?,
        guidance_embeds: shapes.contains_key("guidance_in.in_layer.weight"),
        axes_dims_rope: host.axes_dims_rope.clone(),
    };
    let num_mode = if shapes.contains_key("controlnet_mode_embedder.weight") { Some(dim("controlnet_mode_embedder.weight", 0)?) } else { None };
    Ok(FluxControlNetConfig { base, num_mode, conditioning_embedding_channels: None })
}

/// Axis `axis` of the weight `name`'s `shape`, or why the file cannot say (no such weight, or
/// too few axes): what a config read off a single file's weights is made of.
fn weight_dim(path: &Path, shape: Option<&[usize]>, name: &str, axis: usize) -> Result<usize> {
    let bad = |message: String| EngineError::BadWeights { path: path.to_path_buf(), message };
    let shape = shape.ok_or_else(|| bad(format!("the ControlNet lacks `{name}`")))?;
    shape.get(axis).copied().ok_or_else(|| bad(format!("`{name}` has shape {shape:?}, with no axis {axis}")))
}

/// One ControlNet applied to a request: diffusers' `controlnet_conditioning_scale` and
/// `control_guidance_start` / `control_guidance_end` for it.
#[derive(Debug, Clone)]
pub struct ControlUnit {
    pub net: Arc<ControlNet>,
    /// `[1, 3, height, width]` in `[0, 1]`, RGB, at the request's size (the CLI and the server
    /// resize, as diffusers' control image processor does).
    pub image: Tensor,
    pub scale: f64,
    /// The fractions of the schedule between which it runs.
    pub start: f64,
    pub end: f64,
    /// The control type of a Union FLUX ControlNet (diffusers' `control_mode`: its own list,
    /// e.g. InstantX's 0 canny, 1 tile, 2 depth, 3 blur, 4 pose, 5 gray, 6 low quality).
    pub mode: Option<usize>,
}

impl ControlUnit {
    /// Checks the unit against the request's size.
    pub(crate) fn check(&self, width: usize, height: usize) -> Result<()> {
        let dims = self.image.dims();
        if dims.len() != 4 || dims[0] != 1 || dims[1] != 3 || dims[2] != height || dims[3] != width {
            return Err(EngineError::param("controlnets", format!("the control image is {dims:?}, expected [1, 3, {height}, {width}] (RGB at the request's size)")));
        }
        if !self.scale.is_finite() {
            return Err(EngineError::param("controlnets", format!("scale {} must be a finite number", self.scale)));
        }
        if !(0.0..=1.0).contains(&self.start) || !(0.0..=1.0).contains(&self.end) || self.start >= self.end {
            return Err(EngineError::param("controlnets", format!("start {} and end {} must be fractions of the schedule with start < end", self.start, self.end)));
        }
        Ok(())
    }

    /// diffusers' `controlnet_keep` for step `i` of `steps`: 1 inside the unit's window, else 0.
    fn keep(&self, i: usize, steps: usize) -> bool {
        let (i, n) = (i as f64, steps as f64);
        !(i / n < self.start || (i + 1.0) / n > self.end)
    }

    /// Whether two requests' units can share a batch: the same ControlNet (loaded from the same
    /// place), scale and window.
    fn batches_with(&self, other: &ControlUnit) -> bool {
        self.net.path == other.net.path && self.scale == other.scale && self.start == other.start && self.end == other.end && self.mode == other.mode
    }
}

/// A batch's ControlNets, with each one's conditioning images laid out as the UNet's rows.
pub(crate) struct ControlStack {
    units: Vec<(ControlUnit, Tensor)>,
}

impl ControlStack {
    /// The batch's units (every request names the same ones; see [`ControlUnit::batches_with`])
    /// with their images repeated per image of each request, then twice under classifier-free
    /// guidance (negatives first), as diffusers' `prepare_image` lays them out.
    pub fn new(items: &[GenerateParams], guided: bool, dtype: DType, device: &Device) -> Result<Option<Self>> {
        let Some(first) = items.first() else { return Ok(None) };
        if first.controlnets.is_empty() {
            return Ok(None);
        }
        let mut units = vec![];
        for (k, unit) in first.controlnets.iter().enumerate() {
            let mut rows = vec![];
            for p in items {
                let image = &p.controlnets[k].image;
                rows.extend(std::iter::repeat_n(image.clone(), p.batch));
            }
            let rows = Tensor::cat(&rows, 0)?;
            let rows = if guided { Tensor::cat(&[&rows, &rows], 0)? } else { rows };
            units.push((unit.clone(), rows.to_device(device)?.to_dtype(dtype)?));
        }
        Ok(Some(Self { units }))
    }

    /// The summed residuals for step `i` of `steps`, or `None` when no unit runs at this step.
    pub fn residuals(&self, i: usize, steps: usize, input: &Tensor, timestep: f64, context: &Tensor, added: Option<&AddedCond>) -> Result<Option<ControlResiduals>> {
        let mut sum: Option<ControlResiduals> = None;
        for (unit, image) in &self.units {
            if !unit.keep(i, steps) {
                continue;
            }
            let r = unit.net.unet()?.forward(input, timestep, context, added, image, unit.scale)?;
            sum = Some(match sum {
                Some(s) => s.add(&r)?,
                None => r,
            });
        }
        Ok(sum)
    }
}

/// Checks a batch's ControlNets: each request's units are valid for its size, and every
/// request names the same ControlNets with the same settings (their images may differ).
pub(crate) fn check_batch(items: &[GenerateParams]) -> Result<()> {
    let Some(first) = items.first() else { return Ok(()) };
    for p in items {
        for unit in &p.controlnets {
            unit.check(p.width, p.height)?;
        }
        let same = p.controlnets.len() == first.controlnets.len() && p.controlnets.iter().zip(&first.controlnets).all(|(a, b)| a.batches_with(b));
        if !same {
            return Err(EngineError::param("batch", "batched requests must use the same ControlNets with the same scales, starts and ends"));
        }
    }
    Ok(())
}

/// A batch's FLUX ControlNets, each with its control images' packed latents laid out as the
/// transformer's rows (FLUX runs no classifier-free guidance, so one row per image).
pub(crate) struct FluxControlStack {
    units: Vec<FluxControlRows>,
}

struct FluxControlRows {
    unit: ControlUnit,
    /// Packed control latents `[rows, L, C]`.
    cond: Tensor,
    /// The Union control type per row, `[rows]` u32.
    modes: Option<Tensor>,
}

impl FluxControlStack {
    /// `units` are the batch's (every request names the same ones; see
    /// [`ControlUnit::batches_with`]) and `conds[k]` unit `k`'s packed latents for every row.
    pub fn new(units: &[ControlUnit], conds: Vec<Tensor>) -> Result<Self> {
        let mut rows = vec![];
        for (unit, cond) in units.iter().zip(conds) {
            let modes = match unit.mode {
                Some(m) => {
                    let m = u32::try_from(m).map_err(|_| EngineError::param("controlnets", format!("control mode {m} is out of range")))?;
                    Some(Tensor::full(m, cond.dim(0)?, cond.device())?)
                }
                None => None,
            };
            rows.push(FluxControlRows { unit: unit.clone(), cond, modes });
        }
        Ok(Self { units: rows })
    }

    /// The summed residuals for step `i` of `steps`, or `None` when no unit runs at this step
    /// (a unit outside its window would give zeros: skipping it is exact). `x.guidance` goes to
    /// the nets that embed guidance, whether or not the transformer does.
    pub fn residuals(&self, i: usize, steps: usize, x: &FluxInputs) -> Result<Option<FluxControlResiduals>> {
        let mut sum: Option<FluxControlResiduals> = None;
        for rows in &self.units {
            if !rows.unit.keep(i, steps) {
                continue;
            }
            let net = rows.unit.net.flux().ok_or_else(|| EngineError::param("controlnets", format!("the ControlNet {} is for a UNet, not FLUX", rows.unit.net.path.display())))?;
            let r = net.forward(x, &rows.cond, rows.modes.as_ref(), rows.unit.scale)?;
            sum = Some(match sum {
                Some(s) => s.add(&r)?,
                None => r,
            });
        }
        Ok(sum)
    }
}
