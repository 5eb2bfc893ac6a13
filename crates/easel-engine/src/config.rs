//! Plain serde mirrors of the diffusers / transformers `config.json` files easel reads.
//!
//! Each network is built from these, never from a hard-coded preset, so SD 1.5, 2.x, SDXL,
//! Turbo variants, community fine-tunes and tiny test models all load through one path.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::error::{EngineError, Result};

/// Reads and parses a JSON config, naming the file and the offending field on failure.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => EngineError::MissingFile {
            path: path.to_path_buf(),
            hint: "expected a diffusers-layout model directory".into(),
        },
        _ => EngineError::Io { path: path.to_path_buf(), source: e },
    })?;
    let de = &mut serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        let message = if field == "." || field.is_empty() {
            format!("malformed config: {inner}")
        } else {
            format!("malformed config, field `{field}`: {inner}")
        };
        EngineError::BadConfig { path: path.to_path_buf(), message }
    })
}

/// A value diffusers accepts either once for all blocks or per block.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// The value for each of `n` blocks.
    pub fn expand(&self, n: usize) -> Vec<T> {
        match self {
            PerBlock::One(v) => vec![v.clone(); n],
            PerBlock::Many(v) => v.clone(),
        }
    }
}

/// `model_index.json`: the pipeline class and its components.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelIndex {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    /// SDXL: use zero embeddings for an absent negative prompt.
    #[serde(default)]
    pub force_zeros_for_empty_prompt: Option<bool>,
    /// Every other key: component name to `[library, class]` (or null).
    #[serde(flatten)]
    pub components: std::collections::BTreeMap<String, serde_json::Value>,
}

impl ModelIndex {
    /// Whether the pipeline declares a component (a non-null `[library, class]` entry).
    pub fn has(&self, component: &str) -> bool {
        matches!(self.components.get(component), Some(serde_json::Value::Array(v)) if v.first().is_some_and(|x| !x.is_null()))
    }

    /// Fails naming the first of `components` the pipeline in `dir` does not declare.
    pub fn require(&self, dir: &Path, components: &[&str]) -> Result<()> {
        match components.iter().find(|c| !self.has(c)) {
            Some(missing) => Err(EngineError::BadConfig {
                path: dir.join("model_index.json"),
                message: format!("the {} pipeline has no `{missing}` component", self.class_name),
            }),
            None => Ok(()),
        }
    }
}

fn default_one() -> usize {
    1
}
fn default_true() -> bool {
    true
}
fn default_groups() -> usize {
    32
}
fn default_eps() -> f64 {
    1e-5
}

/// `unet/config.json` for `UNet2DConditionModel`.
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    pub in_channels: usize,
    #[serde(default = "default_four")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    /// Absent in a ControlNet's config (it has no up blocks); a UNet refuses an empty list.
    #[serde(default)]
    pub up_block_types: Vec<String>,
    #[serde(default = "default_mid_block")]
    pub mid_block_type: Option<String>,
    pub layers_per_block: PerBlock<usize>,
    pub cross_attention_dim: PerBlock<usize>,
    pub attention_head_dim: PerBlock<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default = "default_transformer_layers")]
    pub transformer_layers_per_block: PerBlock<usize>,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "default_one")]
    pub downsample_padding: usize,
    #[serde(default = "default_one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default)]
    pub only_cross_attention: Option<serde_json::Value>,
    #[serde(default)]
    pub resnet_time_scale_shift: Option<String>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
}

/// `config.json` of a `ControlNetModel` (SD 1.x/2.x and SDXL): the UNet's encoder-half fields,
/// and the conditioning image's embedding.
#[derive(Debug, Clone, Deserialize)]
pub struct ControlNetConfig {
    #[serde(default = "default_three")]
    pub conditioning_channels: usize,
    #[serde(default = "default_conditioning_embedding")]
    pub conditioning_embedding_out_channels: Vec<usize>,
    #[serde(default = "default_rgb")]
    pub controlnet_conditioning_channel_order: String,
    #[serde(default)]
    pub global_pool_conditions: bool,
    #[serde(flatten)]
    pub unet: UNetConfig,
}

fn default_conditioning_embedding() -> Vec<usize> {
    vec![16, 32, 96, 256]
}
fn default_rgb() -> String {
    "rgb".into()
}

fn default_mid_block() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn default_transformer_layers() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn default_one_f() -> f64 {
    1.0
}

/// `vae/config.json` for `AutoencoderKL`.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "default_three")]
    pub in_channels: usize,
    #[serde(default = "default_three")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_one")]
    pub layers_per_block: usize,
    #[serde(default = "default_four")]
    pub latent_channels: usize,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default)]
    pub force_upcast: bool,
    /// Whether the decoder's mid-block has its self-attention (diffusers' default; some
    /// distilled VAEs drop it).
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
}

fn default_three() -> usize {
    3
}
fn default_four() -> usize {
    4
}
fn default_scaling() -> f64 {
    0.18215
}

/// `text_encoder*/config.json` for `CLIPTextModel` / `CLIPTextModelWithProjection`.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub projection_dim: Option<usize>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
}

fn default_act() -> String {
    "quick_gelu".into()
}

/// An image encoder's `config.json` (transformers' `CLIPVisionConfig`, as IP-Adapters'
/// `image_encoder/` folders hold it). Absent keys take transformers' defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    /// The width of `image_embeds` (`visual_projection`).
    pub projection_dim: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_image_channels")]
    pub num_channels: usize,
}

fn default_image_channels() -> usize {
    3
}

/// `scheduler/scheduler_config.json`: the union of the keys easel's schedulers read.
/// Absent keys take each scheduler class's own diffusers default.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    #[serde(default)]
    pub num_train_timesteps: Option<usize>,
    #[serde(default)]
    pub beta_start: Option<f64>,
    #[serde(default)]
    pub beta_end: Option<f64>,
    #[serde(default)]
    pub beta_schedule: Option<String>,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default)]
    pub prediction_type: Option<String>,
    #[serde(default)]
    pub timestep_spacing: Option<String>,
    #[serde(default)]
    pub steps_offset: Option<usize>,
    #[serde(default)]
    pub set_alpha_to_one: Option<bool>,
    #[serde(default)]
    pub clip_sample: Option<bool>,
    #[serde(default)]
    pub clip_sample_range: Option<f64>,
    #[serde(default)]
    pub use_karras_sigmas: Option<bool>,
    #[serde(default)]
    pub rescale_betas_zero_snr: Option<bool>,
    #[serde(default)]
    pub final_sigmas_type: Option<String>,
    #[serde(default)]
    pub algorithm_type: Option<String>,
    #[serde(default)]
    pub solver_order: Option<usize>,
    #[serde(default)]
    pub lower_order_final: Option<bool>,
    #[serde(default)]
    pub euler_at_final: Option<bool>,
    /// LCM: the distillation's step count, whose timesteps the schedule picks from (default 50).
    #[serde(default)]
    pub original_inference_steps: Option<usize>,
    /// LCM: the timestep scale in the consistency boundary condition (default 10).
    #[serde(default)]
    pub timestep_scaling: Option<f64>,
    /// Flow matching (FLUX): the static sigma shift.
    #[serde(default)]
    pub shift: Option<f64>,
    /// Flow matching: shift by image size (`mu` from the sequence length) instead.
    #[serde(default)]
    pub use_dynamic_shifting: Option<bool>,
    #[serde(default)]
    pub base_image_seq_len: Option<usize>,
    #[serde(default)]
    pub max_image_seq_len: Option<usize>,
    #[serde(default)]
    pub base_shift: Option<f64>,
    #[serde(default)]
    pub max_shift: Option<f64>,
}

/// `transformer/config.json` for diffusers' `SD3Transformer2DModel` (SD 3 and 3.5).
#[derive(Debug, Clone, Deserialize)]
pub struct Sd3TransformerConfig {
    /// The latent side of the default image (128 latent cells: 1024 pixels).
    #[serde(default = "default_sd3_sample_size")]
    pub sample_size: usize,
    #[serde(default = "default_sd3_patch")]
    pub patch_size: usize,
    #[serde(default = "default_sd3_channels")]
    pub in_channels: usize,
    #[serde(default = "default_sd3_channels")]
    pub out_channels: usize,
    pub num_layers: usize,
    #[serde(default = "default_sd3_head_dim")]
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_flux_joint_dim")]
    pub joint_attention_dim: usize,
    pub caption_projection_dim: usize,
    #[serde(default = "default_sd3_pooled_dim")]
    pub pooled_projection_dim: usize,
    /// The side of the learned position table, in patches (diffusers' default 96).
    #[serde(default = "default_sd3_pos_max")]
    pub pos_embed_max_size: usize,
    /// MMDiT-X layers with a second, image-only attention (3.5 medium).
    #[serde(default)]
    pub dual_attention_layers: Vec<usize>,
    /// `rms_norm` in 3.5: queries and keys are RMS-normed.
    #[serde(default)]
    pub qk_norm: Option<String>,
}

impl Sd3TransformerConfig {
    /// SD 3.5 large as Stability publishes it.
    pub fn sd35_large() -> Self {
        Self {
            sample_size: 128,
            patch_size: 2,
            in_channels: 16,
            out_channels: 16,
            num_layers: 38,
            attention_head_dim: 64,
            num_attention_heads: 38,
            joint_attention_dim: 4096,
            caption_projection_dim: 2432,
            pooled_projection_dim: 2048,
            pos_embed_max_size: 192,
            dual_attention_layers: vec![],
            qk_norm: Some("rms_norm".into()),
        }
    }

    /// SD 3.5 medium (MMDiT-X: dual attention in its first 13 layers).
    pub fn sd35_medium() -> Self {
        Self {
            num_layers: 24,
            num_attention_heads: 24,
            caption_projection_dim: 1536,
            pos_embed_max_size: 384,
            dual_attention_layers: (0..13).collect(),
            ..Self::sd35_large()
        }
    }

    /// The model width: heads times head size.
    pub fn hidden_size(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }
}

fn default_sd3_sample_size() -> usize {
    128
}
fn default_sd3_patch() -> usize {
    2
}
fn default_sd3_channels() -> usize {
    16
}
fn default_sd3_head_dim() -> usize {
    64
}
fn default_sd3_pooled_dim() -> usize {
    2048
}
fn default_sd3_pos_max() -> usize {
    96
}

/// `transformer/config.json` for diffusers' `FluxTransformer2DModel`.
#[derive(Debug, Clone, Deserialize)]
pub struct FluxTransformerConfig {
    #[serde(default = "default_one")]
    pub patch_size: usize,
    #[serde(default = "default_flux_in")]
    pub in_channels: usize,
    #[serde(default)]
    pub out_channels: Option<usize>,
    #[serde(default = "default_flux_layers")]
    pub num_layers: usize,
    #[serde(default = "default_flux_single_layers")]
    pub num_single_layers: usize,
    #[serde(default = "default_flux_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "default_flux_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_flux_joint_dim")]
    pub joint_attention_dim: usize,
    #[serde(default = "default_flux_pooled_dim")]
    pub pooled_projection_dim: usize,
    #[serde(default)]
    pub guidance_embeds: bool,
    #[serde(default = "default_flux_axes")]
    pub axes_dims_rope: Vec<usize>,
}

/// `config.json` of diffusers' `FluxControlNetModel` (InstantX / Shakker-Labs style): the
/// transformer's fields (its first `num_layers` double and `num_single_layers` single blocks),
/// plus `num_mode` for Union ControlNets (a learned embedding per control type) and
/// `conditioning_embedding_channels` for XLabs-style nets that read pixels through a small
/// convolution stack instead of VAE latents.
#[derive(Debug, Clone, Deserialize)]
pub struct FluxControlNetConfig {
    #[serde(flatten)]
    pub base: FluxTransformerConfig,
    #[serde(default)]
    pub num_mode: Option<usize>,
    #[serde(default)]
    pub conditioning_embedding_channels: Option<usize>,
}

impl FluxTransformerConfig {
    /// FLUX.1-dev as Black Forest Labs publishes it (12B parameters).
    pub fn flux1_dev() -> Self {
        Self {
            patch_size: 1,
            in_channels: 64,
            out_channels: None,
            num_layers: 19,
            num_single_layers: 38,
            attention_head_dim: 128,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            pooled_projection_dim: 768,
            guidance_embeds: true,
            axes_dims_rope: vec![16, 56, 56],
        }
    }

    /// The model width: heads times head size.
    pub fn hidden_size(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }
}

fn default_flux_in() -> usize {
    64
}
fn default_flux_layers() -> usize {
    19
}
fn default_flux_single_layers() -> usize {
    38
}
fn default_flux_head_dim() -> usize {
    128
}
fn default_flux_heads() -> usize {
    24
}
fn default_flux_joint_dim() -> usize {
    4096
}
fn default_flux_pooled_dim() -> usize {
    768
}
fn default_flux_axes() -> Vec<usize> {
    vec![16, 56, 56]
}
