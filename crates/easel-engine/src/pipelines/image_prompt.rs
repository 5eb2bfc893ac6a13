//! IP-Adapter in the Stable Diffusion pipelines, as diffusers' `load_ip_adapter` and
//! `ip_adapter_image` run it: a reference picture goes through CLIP's image processor and
//! vision encoder, the adapter projects the encoding into image prompt tokens, and every
//! cross-attention layer of the UNet attends to them beside the text, adding that attention
//! times the adapter's scale.
//!
//! An adapter is loaded once ([`IpAdapter::load`], with its image encoder) and shared by every
//! request that names it. It keeps its own weights apart from the UNet's, so it stacks with
//! LoRAs (merged into the UNet) and ControlNets (which see only the text), and switching it
//! reloads nothing else. The picture is encoded once per request, never per step.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::clip_image::{pixel_values, RgbPicture};
use super::common::{load_tensors, GenerateParams};
use crate::config::{read_json, ClipVisionConfig};
use crate::error::{EngineError, Result};
use crate::models::clip_vision::ClipVisionModel;
use crate::models::ip_adapter::{unsupported_kind, ImagePromptKv, IpAdapterModel};

/// A loaded IP-Adapter with its image encoder.
#[derive(Debug)]
pub struct IpAdapter {
    model: IpAdapterModel,
    encoder: ClipVisionModel,
    /// The adapter file.
    pub path: PathBuf,
    /// The image encoder's folder.
    pub encoder_path: PathBuf,
}

impl RgbPicture {
    /// RGB8 pixels, row-major (`width * height * 3` bytes).
    pub fn new(width: usize, height: usize, pixels: Vec<u8>) -> Result<Self> {
        if width == 0 || height == 0 || pixels.len() != width * height * 3 {
            return Err(EngineError::param("ip_adapter", format!("{} bytes are not a {width}x{height} RGB image", pixels.len())));
        }
        Ok(Self { width, height, pixels })
    }
}

/// The image encoder an adapter file pairs with when none is given: an `image_encoder` folder
/// beside it, else `../models/image_encoder` (h94/IP-Adapter's layout, where the SDXL
/// `..._vit-h` adapters use the SD 1.5 folder's ViT-H encoder). The first whose output width
/// fits the adapter is taken.
fn encoder_candidates(file: &Path) -> Vec<PathBuf> {
    let dir = file.parent().unwrap_or(Path::new("."));
    let mut out = vec![dir.join("image_encoder")];
    if let Some(up) = dir.parent() {
        out.push(up.join("models").join("image_encoder"));
    }
    out
}

impl IpAdapter {
    /// Loads an adapter file (`.safetensors`, the original `image_proj` / `ip_adapter` names,
    /// plain or Plus) and its image encoder (a transformers `CLIPVisionModelWithProjection`
    /// folder: `config.json` and `model.safetensors`); `encoder: None` looks beside the file.
    pub fn load(file: &Path, encoder: Option<&Path>, dtype: DType, device: &Device) -> Result<Self> {
        if !file.is_file() {
            return Err(EngineError::MissingFile { path: file.to_path_buf(), hint: "an IP-Adapter is one .safetensors file (image_proj.* and ip_adapter.* tensors)".into() });
        }
        if file.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            return Err(EngineError::param("ip_adapter", format!("{}: easel reads IP-Adapters as .safetensors files (the hub publishes both; take the .safetensors one)", file.display())));
        }
        let tensors = load_tensors(&[file.to_path_buf()], dtype, device)?;
        if let Some(why) = unsupported_kind(&tensors) {
            return Err(EngineError::param("ip_adapter", format!("{}: {why}", file.display())));
        }
        let model = IpAdapterModel::new(VarBuilder::from_tensors(tensors, dtype, device)).map_err(|e| crate::weights::bad_weights(file, &e))?;
        let (encoder_path, config) = match encoder {
            Some(dir) => (dir.to_path_buf(), read_json::<ClipVisionConfig>(&dir.join("config.json"))?),
            None => Self::find_encoder(file, &model)?,
        };
        let wants = if model.projection.reads_hidden_states() { config.hidden_size } else { config.projection_dim };
        if wants != model.encoding_dim {
            return Err(EngineError::param(
                "ip_adapter",
                format!("{} reads {}-wide image encodings, and the encoder {} gives {wants}", file.display(), model.encoding_dim, encoder_path.display()),
            ));
        }
        let weights = crate::weights::source::component_weights(encoder_path.parent().unwrap_or(Path::new(".")), &component_name(&encoder_path)?, dtype != DType::F32)?;
        let vb = VarBuilder::from_tensors(load_tensors(&weights, dtype, device)?, dtype, device);
        let encoder = ClipVisionModel::new(vb, &config).map_err(|e| crate::weights::bad_weights(&encoder_path, &e))?;
        Ok(Self { model, encoder, path: file.to_path_buf(), encoder_path })
    }

    fn find_encoder(file: &Path, model: &IpAdapterModel) -> Result<(PathBuf, ClipVisionConfig)> {
        let candidates = encoder_candidates(file);
        for dir in &candidates {
            let Ok(config) = read_json::<ClipVisionConfig>(&dir.join("config.json")) else { continue };
            let gives = if model.projection.reads_hidden_states() { config.hidden_size } else { config.projection_dim };
            if gives == model.encoding_dim {
                return Ok((dir.clone(), config));
            }
        }
        let tried: Vec<String> = candidates.iter().map(|c| c.display().to_string()).collect();
        Err(EngineError::param(
            "ip_adapter",
            format!("{}: no image encoder giving {}-wide encodings in {} (give its folder explicitly)", file.display(), model.encoding_dim, tried.join(" or ")),
        ))
    }

    /// Why this adapter cannot run on a UNet with these cross-attention widths (in adapter
    /// order) and text width (`None`: it can). An SDXL adapter on an SD 1.5 model fails on the
    /// text width (2048 against 768).
    pub fn mismatch(&self, widths: &[usize], cross_attention_dim: usize) -> Option<String> {
        if self.model.cross_attention_dim != cross_attention_dim {
            return Some(format!("its image tokens are {} wide, the UNet's text states {cross_attention_dim}", self.model.cross_attention_dim));
        }
        if self.model.layers.len() != widths.len() {
            return Some(format!("it has {} cross-attention layers (ip_adapter.1 to ip_adapter.{}), the UNet {}", self.model.layers.len(), 2 * self.model.layers.len().max(1) - 1, widths.len()));
        }
        self.model.layers.iter().zip(widths).enumerate().find_map(|(k, (layer, &width))| {
            let rows = layer.to_k_ip.weight().dim(0).unwrap_or(0);
            (rows != width).then(|| format!("its layer ip_adapter.{} is {rows} wide, the UNet's cross-attention there {width}", 2 * k + 1))
        })
    }

    /// The image prompt tokens `[1, T, C]` for a picture, and for "no picture" (the negative
    /// branch of classifier-free guidance): the projection of a zero encoding for a plain
    /// adapter, of a zero picture's encoding for Plus, as diffusers' pipelines make them.
    pub fn tokens(&self, picture: &RgbPicture, dtype: DType, device: &Device) -> Result<ImagePromptTokens> {
        let pixels = self.pixel_values(picture, device)?.to_dtype(dtype)?;
        let positive = self.encode(&pixels)?;
        let negative = if self.model.projection.reads_hidden_states() { self.encode(&pixels.zeros_like()?)? } else { positive.zeros_like()? };
        Ok(ImagePromptTokens { negative: self.model.projection.forward(&negative)?, positive: self.model.projection.forward(&positive)? })
    }

    /// The picture as the encoder takes it (CLIP's image processor at the encoder's size).
    pub fn pixel_values(&self, picture: &RgbPicture, device: &Device) -> Result<Tensor> {
        pixel_values(picture, self.encoder.image_size, device)
    }

    /// The image encoder's raw output for a picture: `image_embeds` (plain) or the
    /// penultimate states (Plus).
    pub fn encode(&self, pixels: &Tensor) -> Result<Tensor> {
        let out = self.encoder.forward(pixels)?;
        Ok(if self.model.projection.reads_hidden_states() { out.penultimate } else { out.image_embeds })
    }
}

/// A picture's image prompt tokens `[1, T, C]`, and those of "no picture" for the negative
/// branch of classifier-free guidance.
#[derive(Debug, Clone)]
pub struct ImagePromptTokens {
    pub negative: Tensor,
    pub positive: Tensor,
}

fn component_name(dir: &Path) -> Result<String> {
    dir.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| EngineError::MissingFile { path: dir.to_path_buf(), hint: "not an image encoder folder".into() })
}

/// An IP-Adapter applied to a request: diffusers' `ip_adapter_image` and
/// `set_ip_adapter_scale` (one scale for every layer).
#[derive(Debug, Clone)]
pub struct IpAdapterUnit {
    pub adapter: Arc<IpAdapter>,
    pub picture: RgbPicture,
    pub scale: f64,
}

impl IpAdapterUnit {
    fn check(&self) -> Result<()> {
        if !self.scale.is_finite() {
            return Err(EngineError::param("ip_adapter", format!("scale {} must be a finite number", self.scale)));
        }
        Ok(())
    }
}

/// The image prompt of a batch for the UNet's rows: each request's tokens repeated per image,
/// negatives first under classifier-free guidance (as the text states are laid out), through
/// each layer's key and value projections. `None` without an adapter or at scale 0 (diffusers
/// then skips the image attention altogether).
pub(crate) fn batch_image_prompt(items: &[GenerateParams], guided: bool, dtype: DType, device: &Device) -> Result<Option<ImagePromptKv>> {
    let Some(unit) = items.first().and_then(|p| p.ip_adapter.as_ref()) else { return Ok(None) };
    if unit.scale == 0.0 {
        return Ok(None);
    }
    let (mut negatives, mut positives) = (vec![], vec![]);
    for p in items {
        let Some(u) = &p.ip_adapter else { return Err(EngineError::param("batch", "batched requests must all use the same IP-Adapter")) };
        let tokens = u.adapter.tokens(&u.picture, dtype, device)?;
        negatives.extend(std::iter::repeat_n(tokens.negative, p.batch));
        positives.extend(std::iter::repeat_n(tokens.positive, p.batch));
    }
    let rows = if guided { [negatives, positives].concat() } else { positives };
    let tokens = Tensor::cat(&rows, 0)?;
    Ok(Some(unit.adapter.model.keys_and_values(&tokens, unit.scale)?))
}

/// Checks a batch's IP-Adapters: valid settings, and every request names the same adapter
/// with the same scale (their pictures may differ).
pub(crate) fn check_batch(items: &[GenerateParams]) -> Result<()> {
    let Some(first) = items.first() else { return Ok(()) };
    for p in items {
        if let Some(u) = &p.ip_adapter {
            u.check()?;
        }
        let same = match (&p.ip_adapter, &first.ip_adapter) {
            (None, None) => true,
            (Some(a), Some(b)) => a.adapter.path == b.adapter.path && a.adapter.encoder_path == b.adapter.encoder_path && a.scale == b.scale,
            _ => false,
        };
        if !same {
            return Err(EngineError::param("batch", "batched requests must use the same IP-Adapter with the same scale"));
        }
    }
    Ok(())
}
