//! What every pipeline family shares: load options, request parameters and results, the
//! per-model defaults (`easel.json`), the CLIP text stack, the prompt cache, and splitting a
//! batch back into its requests.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::t5::{Config as T5Config, T5EncoderModel};

use crate::config::{read_json, ClipTextConfig};
use crate::error::{EngineError, Result};
use crate::models::clip::ClipTextModel;
use crate::scheduler::SchedulerKind;
pub use super::images_in::InitImage;
use crate::tokenizer::PromptTokenizer;
use crate::weights::lora::{self, Adapter};
use crate::weights::keys::Layout;
use crate::weights::store::Weights;
use crate::weights::{bad_weights, gguf, load_var_builder};
use crate::weights::source::component_weights;

/// Which conditioning scheme the pipeline uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x / 2.x: one CLIP encoder, last hidden state.
    StableDiffusion,
    /// SDXL: two CLIP encoders, penultimate states, pooled embeddings and size conditioning.
    StableDiffusionXl,
    /// FLUX.1-dev-like: CLIP pooled + T5, guidance embedding.
    FluxDev,
    /// FLUX.1-schnell-like: CLIP pooled + T5, no guidance.
    FluxSchnell,
    /// SD 3 / 3.5: CLIP-L, CLIP-G and T5 states, pooled CLIP embeddings, classifier-free guidance.
    Sd3,
}

/// Settings for loading a pipeline.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    pub dtype: DType,
    /// FLUX: transformer weights to use instead of `transformer/` (a BFL-named `.safetensors`
    /// file such as flux1-dev.safetensors, or a `.gguf`).
    pub transformer: Option<PathBuf>,
    /// FLUX: keep the text encoders (CLIP-L and T5-XXL, 9.8 GB in bf16) on the CPU and send only
    /// their outputs to the device, so a 16 GB card holds just the transformer, the VAE and
    /// the activations. Each new prompt then encodes on the CPU (in f32).
    pub offload_text_encoders: bool,
    /// Text-encoder weights from single files (ComfyUI's); `easel.json` may name them too.
    pub text_encoders: TextEncoderFiles,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { device: Device::Cpu, dtype: DType::F32, transformer: None, offload_text_encoders: false, text_encoders: TextEncoderFiles::default() }
    }
}

/// Text-encoder weights from single files instead of the folder's `text_encoder*/`, as ComfyUI
/// ships them (`clip_l.safetensors`, `clip_g.safetensors`, `t5xxl_fp16.safetensors`, in
/// transformers' names); each encoder's config and tokenizer still come from the folder. CLIP-L
/// is `text_encoder` (SD 1.x, SDXL, FLUX, SD 3.5), CLIP-G `text_encoder_2` (SDXL, SD 3.5), T5
/// FLUX's `text_encoder_2` and SD 3.5's `text_encoder_3`.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
pub struct TextEncoderFiles {
    #[serde(default)]
    pub clip_l: Option<PathBuf>,
    #[serde(default)]
    pub clip_g: Option<PathBuf>,
    #[serde(default)]
    pub t5: Option<PathBuf>,
}

impl TextEncoderFiles {
    /// Each file given here, else the one `easel.json` names (relative to the model folder).
    pub fn or_defaults(&self, dir: &Path, defaults: &ModelDefaults) -> Self {
        let pick = |given: &Option<PathBuf>, default: &Option<PathBuf>| given.clone().or_else(|| default.as_ref().map(|f| dir.join(f)));
        let d = &defaults.text_encoders;
        Self { clip_l: pick(&self.clip_l, &d.clip_l), clip_g: pick(&self.clip_g, &d.clip_g), t5: pick(&self.t5, &d.t5) }
    }
}

/// A component's weight files: `file` when given, else the folder's.
fn weight_files(dir: &Path, component: &str, file: Option<&Path>, half: bool) -> Result<Vec<PathBuf>> {
    match file {
        Some(f) if f.is_file() => Ok(vec![f.to_path_buf()]),
        Some(f) => Err(EngineError::MissingFile { path: f.to_path_buf(), hint: format!("the weights given for `{component}` are not there") }),
        None => component_weights(dir, component, half),
    }
}

/// One CLIP text encoder with its tokenizer, and the encoder's weights before any LoRA.
pub(crate) struct TextStack {
    pub tokenizer: Arc<PromptTokenizer>,
    pub encoder: ClipTextModel,
    config: ClipTextConfig,
    base: Arc<HashMap<String, Tensor>>,
}

impl TextStack {
    /// Loads the CLIP encoder `dir/te` (its weights from `file` when given) and the tokenizer
    /// `dir/tok`.
    pub fn load(dir: &Path, te: &str, tok: &str, file: Option<&Path>, half: bool, dtype: DType, device: &Device) -> Result<Self> {
        let base = load_tensors(&weight_files(dir, te, file, half)?, dtype, device)?;
        Self::from_tensors(dir, te, tok, base, dtype, device)
    }

    /// The CLIP encoder with `dir/te`'s config and the given weights (from an SD single file),
    /// and the tokenizer `dir/tok`.
    pub fn from_tensors(dir: &Path, te: &str, tok: &str, base: HashMap<String, Tensor>, dtype: DType, device: &Device) -> Result<Self> {
        let config: ClipTextConfig = component_config(dir, te, "config.json")?;
        let tokenizer = Arc::new(PromptTokenizer::from_dir(&dir.join(tok), config.max_position_embeddings)?);
        let base = Arc::new(base);
        let vb = VarBuilder::from_tensors((*base).clone(), dtype, device);
        let encoder = build(dir, te, ClipTextModel::new(vb, &config))?;
        Ok(Self { tokenizer, encoder, config, base })
    }

    /// The same encoder with `adapters` merged into a copy of the affected weights.
    pub fn with_adapters(&self, adapters: &[&Adapter], dtype: DType, device: &Device) -> Result<Self> {
        let vb = VarBuilder::from_tensors(lora::merge(&self.base, adapters)?, dtype, device);
        let encoder = ClipTextModel::new(vb, &self.config)?;
        Ok(Self { tokenizer: self.tokenizer.clone(), encoder, config: self.config.clone(), base: self.base.clone() })
    }

    /// Weight names and shapes, for mapping LoRAs.
    pub fn shapes(&self) -> HashMap<String, Vec<usize>> {
        shapes(&self.base)
    }

    /// Tokenizes and encodes one prompt: (encoder output, whether the prompt was cut).
    pub fn run(&self, prompt: &str, device: &Device) -> Result<(crate::models::clip::ClipOutput, bool)> {
        let tokens = self.tokenizer.encode(prompt)?;
        let ids = Tensor::new(tokens.ids.as_slice(), device)?.unsqueeze(0)?;
        Ok((self.encoder.forward(&ids)?, tokens.truncated))
    }
}

/// A T5 encoder with its tokenizer (FLUX's `text_encoder_2`, SD 3.5's `text_encoder_3`); shared,
/// never changed by LoRAs.
#[derive(Clone)]
pub(crate) struct T5Stack {
    tokenizer: Arc<PromptTokenizer>,
    model: Arc<Mutex<T5EncoderModel>>,
    dtype: DType,
    device: Device,
}

impl T5Stack {
    /// Loads the T5 encoder `dir/te` (its weights from `file` when given) and the tokenizer
    /// `dir/tok` (prompts padded or cut to `max_len` tokens), for text encoders computing in
    /// `text_dtype` on `device`.
    pub fn load(dir: &Path, te: &str, tok: &str, file: Option<&Path>, max_len: usize, text_dtype: DType, device: &Device) -> Result<Self> {
        let config: T5Config = component_config(dir, te, "config.json")?;
        let tokenizer = Arc::new(PromptTokenizer::from_dir(&dir.join(tok), max_len)?);
        // T5 overflows in f16; bf16 and f32 are safe. On a GPU f16 runs T5 in bf16 (half the
        // memory of f32, and fast there); on a CPU in f32, where bf16 is slow.
        let dtype = match (text_dtype, device.is_cuda()) {
            (DType::F16, true) => DType::BF16,
            (DType::F16, false) => DType::F32,
            (other, _) => other,
        };
        let vb = load_var_builder(&weight_files(dir, te, file, dtype != DType::F32)?, dtype, device)?;
        let model = build(dir, te, T5EncoderModel::load(vb, &config))?;
        Ok(Self { tokenizer, model: Arc::new(Mutex::new(model)), dtype, device: device.clone() })
    }

    /// The last hidden state `[1, max_len, d]` of one prompt, and whether it was cut.
    pub fn run(&self, prompt: &str) -> Result<(Tensor, bool)> {
        let tokens = self.tokenizer.encode(prompt)?;
        let ids = Tensor::new(tokens.ids.as_slice(), &self.device)?.unsqueeze(0)?;
        let states = self.model.lock().unwrap_or_else(|e| e.into_inner()).forward_dt(&ids, Some(self.dtype))?;
        Ok((states, tokens.truncated))
    }
}

/// Where a transformer's weights come from (FLUX, SD 3.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransformerSource {
    /// `transformer/*.safetensors` in the diffusers layout.
    Diffusers,
    /// A single safetensors file with the family's reference names (Black Forest Labs' for
    /// FLUX, Stability's for SD 3.5), as those checkpoints are published.
    ReferenceFile,
    /// A GGUF file (reference names), quantized or not.
    Gguf,
}

/// Reads a transformer's weights, renamed to its family's reference names by `rename`: from
/// `file` (a `.gguf`, or a reference- or diffusers-named `.safetensors`) when given, else from
/// `dir/transformer/`.
pub(crate) fn read_transformer_weights(
    dir: &Path,
    file: Option<&Path>,
    dtype: DType,
    device: &Device,
    rename: fn(&mut Weights) -> Result<Layout>,
) -> Result<(Weights, TransformerSource)> {
    let is_gguf = file.is_some_and(|f| f.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")));
    let mut w = match file {
        Some(f) if is_gguf => gguf::read(f, device)?,
        Some(f) => Weights::read_safetensors(&[f.to_path_buf()], dtype, device)?,
        None => Weights::read_safetensors(&component_weights(dir, "transformer", dtype != DType::F32)?, dtype, device)?,
    };
    let layout = rename(&mut w)?;
    let source = match (is_gguf, layout) {
        (true, _) => TransformerSource::Gguf,
        (false, Layout::Reference) => TransformerSource::ReferenceFile,
        (false, Layout::Diffusers) => TransformerSource::Diffusers,
    };
    Ok((w, source))
}

/// A transformer's weights as loaded (FLUX, SD 3.5): the store before any LoRA, the type it
/// computes in, its memory and where it came from. LoRA stacks build from `base`.
#[derive(Clone)]
pub(crate) struct TransformerWeights {
    pub base: Arc<Weights>,
    pub compute: DType,
    pub bytes: usize,
    pub summary: String,
    pub source: TransformerSource,
}

impl TransformerWeights {
    /// Reads `opts.transformer`, else `easel.json`'s `transformer`, else `dir/transformer/`
    /// with `read` (the family's reader).
    pub fn load(dir: &Path, opts: &LoadOptions, defaults: &ModelDefaults, read: fn(&Path, Option<&Path>, DType, &Device) -> Result<(Weights, TransformerSource)>) -> Result<Self> {
        let from_defaults = defaults.transformer.as_ref().map(|f| dir.join(f));
        let file = opts.transformer.as_ref().or(from_defaults.as_ref());
        let (mut weights, source) = read(dir, file.map(PathBuf::as_path), opts.dtype, &opts.device)?;
        // Quantized weights compute in f32 (candle's quantized matmul takes f32 activations).
        let compute = if source == TransformerSource::Gguf { DType::F32 } else { opts.dtype };
        weights.set_dtype(compute);
        let (bytes, summary) = weights.memory();
        tracing::info!(dir = %dir.display(), bytes, %summary, ?source, "transformer weights loaded");
        Ok(Self { base: Arc::new(weights), compute, bytes, summary, source })
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    /// Classifier-free guidance scale; 1 or less turns guidance off.
    pub guidance: f64,
    pub seed: u64,
    /// Images per prompt.
    pub batch: usize,
    /// `None` uses the model's own scheduler (or Euler where easel lacks it).
    pub scheduler: Option<SchedulerKind>,
    /// Latents with the meaning of diffusers' `latents` argument: `[batch, C, H/f, W/f]`.
    pub init_latents: Option<Tensor>,
    /// SD 3.5's skip-layer guidance; other families refuse it.
    pub skip_layer_guidance: Option<SkipLayerGuidance>,
    /// An image to start from (image-to-image); `init_latents` is then the noise added to it.
    pub init_image: Option<InitImage>,
    /// Step caching (opt-in): reuse work of earlier steps instead of evaluating the whole
    /// denoiser every step.
    pub step_cache: Option<StepCache>,
    /// ControlNets (Stable Diffusion 1.x/2.x and SDXL), their residuals summed.
    pub controlnets: Vec<super::control::ControlUnit>,
    /// An IP-Adapter with its reference picture (Stable Diffusion 1.x/2.x and SDXL).
    pub ip_adapter: Option<super::image_prompt::IpAdapterUnit>,
}

/// Step caching: denoising steps close together in the schedule compute nearly the same deep
/// features, so some steps can reuse them instead of running the whole denoiser. Opt-in, as in
/// the diffusers ecosystem: the output differs from the uncached one (by how much is in
/// docs/step-cache.md).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StepCache {
    /// DeepCache (Ma et al., 2023), for UNets: the whole UNet runs every `interval` steps (and
    /// on the first); in between only its outermost down and up blocks run, on the features
    /// the last full step fed into the outermost up block.
    DeepCache { interval: usize },
    /// First-Block Cache (ParaAttention's FBCache), for FLUX: the first double-stream block
    /// always runs; when its output residual changed by less than `threshold` (mean absolute
    /// difference relative to the last fully evaluated step's), the other blocks' residual from
    /// that step is added instead of running them.
    FirstBlock { threshold: f64 },
}

/// Skip-layer guidance (diffusers' `skip_guidance_layers` for SD 3.5): on steps `i` with
/// `steps * start < i < steps * stop` (counting from 0), the conditional batch is evaluated once
/// more without `layers`, and `scale * (conditional - skipped)` is added to the guided
/// prediction. Runs only with classifier-free guidance, as in diffusers.
#[derive(Debug, Clone, PartialEq)]
pub struct SkipLayerGuidance {
    pub layers: Vec<usize>,
    pub scale: f64,
    pub start: f64,
    pub stop: f64,
}

impl SkipLayerGuidance {
    /// Whether step `i` of `steps` runs the extra evaluation.
    pub fn applies(&self, i: usize, steps: usize) -> bool {
        let i = i as f64;
        i > steps as f64 * self.start && i < steps as f64 * self.stop
    }
}

impl GenerateParams {
    /// The checks every family shares: sizes (multiples of `multiple`), steps, guidance, batch.
    pub(crate) fn check_ranges(&self, multiple: usize, family: &str) -> Result<()> {
        for (name, v) in [("width", self.width), ("height", self.height)] {
            if v == 0 || v % multiple != 0 {
                return Err(EngineError::param(name, format!("{v} must be a positive multiple of {multiple}{family}")));
            }
            if v > 4096 {
                return Err(EngineError::param(name, format!("{v} is larger than 4096")));
            }
        }
        if self.steps == 0 || self.steps > 1000 {
            return Err(EngineError::param("steps", format!("{} must be between 1 and 1000", self.steps)));
        }
        if !self.guidance.is_finite() || self.guidance < 0.0 {
            return Err(EngineError::param("guidance", format!("{} must be a finite number >= 0", self.guidance)));
        }
        if let Some(image) = &self.init_image {
            image.check(self.width, self.height)?;
        }
        if let Some(slg) = &self.skip_layer_guidance {
            if !(slg.scale.is_finite() && slg.start.is_finite() && slg.stop.is_finite()) || !(0.0..=1.0).contains(&slg.start) || !(0.0..=1.0).contains(&slg.stop) {
                return Err(EngineError::param("skip_layer_guidance", "scale must be a finite number, and start and stop fractions between 0 and 1"));
            }
        }
        if self.batch == 0 || self.batch > 64 {
            return Err(EngineError::param("batch", format!("{} must be between 1 and 64", self.batch)));
        }
        Ok(())
    }
}

/// Wall-clock time spent in each stage, and how the denoising steps ran.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub text_encode: Duration,
    pub denoise: Duration,
    pub decode: Duration,
    /// Denoising steps that ran the whole denoiser, and steps that reused cached work instead
    /// ([`StepCache`]).
    pub full_steps: usize,
    pub cached_steps: usize,
}

/// What a generation produced.
#[derive(Debug)]
pub struct Generated {
    /// RGB images, `width x height`.
    pub images: Vec<image::RgbImage>,
    /// The final latents (diffusers' `output_type="latent"`), on the CPU in f32.
    pub latents: Tensor,
    /// The decoded images in `[0, 1]`, `[batch, 3, H, W]`, f32 on the CPU.
    pub decoded: Tensor,
    /// The scheduler that actually ran.
    pub scheduler: SchedulerKind,
    pub timings: Timings,
    /// Whether a prompt was longer than the tokenizer's limit and was cut.
    pub truncated: bool,
}

/// Called after each denoising step with where it stands (and the latents, for previews);
/// return `false` to cancel.
pub type StepCallback<'a> = &'a mut dyn FnMut(&crate::preview::Step<'_>) -> bool;

/// Weight names and shapes of a tensor map.
pub(crate) fn shapes(map: &HashMap<String, Tensor>) -> HashMap<String, Vec<usize>> {
    map.iter().map(|(k, t)| (k.clone(), t.dims().to_vec())).collect()
}

/// Reads a component's safetensors files into memory, converted to `dtype` on `device`.
pub(crate) fn load_tensors(files: &[PathBuf], dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for f in files {
        for (name, t) in crate::read_tensors(f)? {
            let t = if t.dtype().is_float() { t.to_dtype(dtype)? } else { t };
            out.insert(name, t.to_device(device)?);
        }
    }
    Ok(out)
}

pub(crate) fn component_config<T: serde::de::DeserializeOwned>(dir: &Path, component: &str, file: &str) -> Result<T> {
    read_json(&dir.join(component).join(file))
}

pub(crate) fn build<T>(dir: &Path, component: &str, r: candle_core::Result<T>) -> Result<T> {
    r.map_err(|e| bad_weights(&dir.join(component), &e))
}

/// Splits a batch's final latents and decoded images back into each request's output.
pub(crate) fn split_batch(items: &[GenerateParams], truncated: &[bool], latents: &Tensor, decoded: &Tensor, scheduler: SchedulerKind, timings: &Timings) -> Result<Vec<Generated>> {
    let latents = latents.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let mut out = vec![];
    let mut offset = 0;
    for (p, &cut) in items.iter().zip(truncated) {
        let decoded_i = decoded.narrow(0, offset, p.batch)?;
        out.push(Generated {
            images: to_images(&decoded_i)?,
            latents: latents.narrow(0, offset, p.batch)?,
            decoded: decoded_i,
            scheduler,
            timings: timings.clone(),
            truncated: cut,
        });
        offset += p.batch;
    }
    Ok(out)
}

/// `[batch, 3, H, W]` in `[0, 1]` to RGB images, rounding as diffusers' `numpy_to_pil` does.
pub fn to_images(decoded: &Tensor) -> Result<Vec<image::RgbImage>> {
    let (b, c, h, w) = decoded.dims4()?;
    if c != 3 {
        return Err(EngineError::Unsupported(format!("VAE produced {c} channels, expected 3")));
    }
    let pixels = (decoded * 255.0)?.round()?.clamp(0f32, 255f32)?.to_dtype(DType::U8)?.permute((0, 2, 3, 1))?.contiguous()?;
    (0..b)
        .map(|i| {
            let data = pixels.get(i)?.flatten_all()?.to_vec1::<u8>()?;
            image::RgbImage::from_raw(w as u32, h as u32, data).ok_or_else(|| EngineError::Image("bad image buffer".into()))
        })
        .collect()
}

/// Per-model generation defaults: an optional `easel.json` beside `model_index.json` first,
/// then the catalogue's entry when the folder is a known model's hub snapshot (however the
/// cache was filled), then the family's diffusers defaults. Distilled models want few steps and
/// no guidance; the bundled model ships its own `easel.json`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ModelDefaults {
    #[serde(default)]
    pub steps: Option<usize>,
    #[serde(default)]
    pub guidance: Option<f64>,
    #[serde(default)]
    pub scheduler: Option<String>,
    #[serde(default)]
    pub negative_prompt: Option<String>,
    /// FLUX and SD 3.5: transformer weights (relative to the model directory) to load instead
    /// of `transformer/`, e.g. a GGUF file; `--transformer` overrides it.
    #[serde(default)]
    pub transformer: Option<PathBuf>,
    /// T5's prompt length in tokens (diffusers' `max_sequence_length`; defaults: FLUX.1-dev 512,
    /// schnell and SD 3.5 256).
    #[serde(default)]
    pub max_sequence_length: Option<usize>,
    /// Text-encoder single files (`clip_l`, `clip_g`, `t5`, relative to the model directory).
    #[serde(default, flatten)]
    pub text_encoders: TextEncoderFiles,
    /// SD 1.x/2.x/XL: a single-file checkpoint in LDM names holding the UNet, VAE and text
    /// encoders; the folder then holds only configs and tokenizers (see
    /// [`crate::weights::single_file`], which writes such folders).
    #[serde(default)]
    pub checkpoint: Option<PathBuf>,
    /// The step cache requests without `cache` run (`deepcache:3`, `fbcache:0.08`; see
    /// [`StepCache`]); absent: none.
    #[serde(default)]
    pub cache: Option<String>,
}

/// Whether `dir`'s UNet is LCM-distilled (`time_cond_proj_dim`: guidance as an embedding).
fn is_lcm_distilled(dir: &Path) -> bool {
    read_json::<crate::config::UNetConfig>(&dir.join("unet").join("config.json")).is_ok_and(|c| c.time_cond_proj_dim.is_some())
}

impl ModelDefaults {
    /// Reads `dir/easel.json`, filling what it leaves out from the catalogue, then the family.
    pub fn load(dir: &Path, family: Family) -> Result<Self> {
        let path = dir.join("easel.json");
        let mut d: ModelDefaults = if path.exists() {
            read_json(&path)?
        } else {
            ModelDefaults { steps: None, guidance: None, scheduler: None, negative_prompt: None, transformer: None, max_sequence_length: None, text_encoders: TextEncoderFiles::default(), checkpoint: None, cache: None }
        };
        let (steps, guidance) = match (easel_hub::catalogue::for_model_dir(dir), family) {
            (Some(known), _) => (known.steps, known.guidance),
            // LCM-distilled UNets: LatentConsistencyModelPipeline's defaults (lcm-sdxl's card
            // runs 4 steps at 8 too).
            (None, Family::StableDiffusion | Family::StableDiffusionXl) if is_lcm_distilled(dir) => (4, 8.5),
            (None, Family::StableDiffusion) => (30, 7.5),
            (None, Family::StableDiffusionXl) => (30, 5.0),
            (None, Family::FluxDev) => (28, 3.5),
            (None, Family::FluxSchnell) => (4, 0.0),
            (None, Family::Sd3) => (28, 7.0),
        };
        d.steps.get_or_insert(steps);
        d.guidance.get_or_insert(guidance);
        Ok(d)
    }
}

/// How many prompts' embeddings a pipeline remembers.
const PROMPT_CACHE_SIZE: usize = 256;

/// Text embeddings of recently seen prompts (a prompt repeated across jobs is encoded once).
pub(crate) struct PromptCache<T: Clone> {
    entries: std::sync::Mutex<std::collections::HashMap<String, T>>,
}

impl<T: Clone> Default for PromptCache<T> {
    fn default() -> Self {
        Self { entries: Default::default() }
    }
}

impl<T: Clone> PromptCache<T> {
    /// The cached value for `prompt`, or `encode(prompt)` remembered.
    pub fn get_or_encode(&self, prompt: &str, encode: impl FnOnce(&str) -> Result<T>) -> Result<T> {
        if let Some(hit) = self.entries.lock().unwrap_or_else(|p| p.into_inner()).get(prompt) {
            return Ok(hit.clone());
        }
        let value = encode(prompt)?;
        let mut cache = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= PROMPT_CACHE_SIZE {
            cache.clear();
        }
        cache.insert(prompt.to_string(), value.clone());
        Ok(value)
    }
}
