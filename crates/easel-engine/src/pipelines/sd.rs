//! The Stable Diffusion family (SD 1.x, 2.x, SDXL, Turbo variants, inpainting UNets): text-to-image,
//! image-to-image and inpainting, assembled from a diffusers-layout directory and run as
//! diffusers runs them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;

use crate::config::{read_json, ModelIndex, SchedulerConfig, UNetConfig};
use crate::error::{EngineError, Result};
use super::common::*;
use super::control::ControlStack;
use super::images_in::{Inpainting, StrengthRounding};
use super::vae::Vae;
use crate::models::attention::CrossContext;
use crate::models::unet::{AddedCond, DeepCache, UNet2DConditionModel};
use crate::scheduler::{NoiseSource, SchedulerKind, SeededNoise};
use crate::weights::lora::{self, Component, LoraSpec, LoraTargets, TargetFamily};
use crate::weights::single_file;
use crate::weights::source::component_weights;

/// Text conditioning of one prompt: (states, pooled states for SDXL, whether it was truncated).
type Encoded = (Tensor, Option<Tensor>, bool);

/// A loaded, ready-to-run Stable Diffusion family pipeline.
pub struct StableDiffusionPipeline {
    family: Family,
    text: Option<TextStack>,
    text_2: Option<TextStack>,
    unet: UNet2DConditionModel,
    unet_base: Arc<HashMap<String, Tensor>>,
    vae: Arc<Vae>,
    scheduler_config: SchedulerConfig,
    force_zeros_for_empty_prompt: bool,
    dtype: DType,
    device: Device,
    dir: PathBuf,
    embeddings: PromptCache<Encoded>,
}

/// Ancestral noise for a batch: each request's rows come from its own seed stream, so a
/// request gets the same image in a batch as alone.
struct BatchNoise {
    sources: Vec<SeededNoise>,
    counts: Vec<usize>,
}

impl NoiseSource for BatchNoise {
    fn randn(&mut self, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let per_row: usize = shape[1..].iter().product();
        let mut data = Vec::with_capacity(shape.iter().product());
        for (src, &n) in self.sources.iter_mut().zip(&self.counts) {
            data.extend(src.normal_vec(n * per_row));
        }
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(dtype)?.to_device(device)?)
    }
}

impl StableDiffusionPipeline {
    /// Loads every component named in `dir/model_index.json`.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let index: ModelIndex = read_json(&dir.join("model_index.json"))?;
        let family = match index.class_name.as_str() {
            // The image-to-image, inpainting and LCM classes name the same components.
            "StableDiffusionPipeline" | "StableDiffusionImg2ImgPipeline" | "StableDiffusionInpaintPipeline" | "LatentConsistencyModelPipeline" => Family::StableDiffusion,
            "StableDiffusionXLPipeline" | "StableDiffusionXLInpaintPipeline" => Family::StableDiffusionXl,
            other => {
                return Err(EngineError::Unsupported(format!(
                    "pipeline class `{other}` in {} (easel loads StableDiffusionPipeline, StableDiffusionXLPipeline, FluxPipeline and StableDiffusion3Pipeline)",
                    dir.join("model_index.json").display()
                )))
            }
        };
        index.require(dir, &["unet", "vae", "scheduler"])?;
        let half = opts.dtype != DType::F32;
        let (dtype, device) = (opts.dtype, &opts.device);

        let defaults = ModelDefaults::load(dir, family)?;
        let files = opts.text_encoders.or_defaults(dir, &defaults);
        // A single-file checkpoint supplies every component's weights; the folder its configs.
        let mut checkpoint = defaults.checkpoint.as_ref().map(|f| single_file::read_components(&dir.join(f), dtype, device)).transpose()?;
        let load_text = |te: &str, tok: &str, file: Option<&Path>, from_checkpoint: Option<HashMap<String, Tensor>>| -> Result<Option<TextStack>> {
            if !index.has(te) {
                return Ok(None);
            }
            match (file, from_checkpoint) {
                (None, Some(tensors)) => TextStack::from_tensors(dir, te, tok, tensors, dtype, device).map(Some),
                _ => TextStack::load(dir, te, tok, file, half, dtype, device).map(Some),
            }
        };
        let text = load_text("text_encoder", "tokenizer", files.clip_l.as_deref(), checkpoint.as_mut().map(|c| std::mem::take(&mut c.text_encoder)))?;
        let text_2 = load_text("text_encoder_2", "tokenizer_2", files.clip_g.as_deref(), checkpoint.as_mut().and_then(|c| c.text_encoder_2.take()))?;
        if text.is_none() && text_2.is_none() {
            return Err(EngineError::BadConfig {
                path: dir.join("model_index.json"),
                message: "the pipeline has no text encoder".into(),
            });
        }

        let unet_cfg: UNetConfig = component_config(dir, "unet", "config.json")?;
        let unet_base = Arc::new(match checkpoint.as_mut() {
            Some(c) => std::mem::take(&mut c.unet),
            None => load_tensors(&component_weights(dir, "unet", half)?, dtype, device)?,
        });
        let vb = VarBuilder::from_tensors((*unet_base).clone(), dtype, device);
        let unet = build(dir, "unet", UNet2DConditionModel::new(vb, &unet_cfg))?;
        if family == Family::StableDiffusionXl && !unet.needs_added_cond() {
            return Err(EngineError::BadConfig {
                path: dir.join("unet/config.json"),
                message: "field `addition_embed_type`: an SDXL UNet needs \"text_time\"".into(),
            });
        }

        let vae = Arc::new(match checkpoint {
            Some(c) => Vae::from_tensors(dir, c.vae, dtype, device)?,
            None => Vae::load(dir, half, dtype, device)?,
        });
        let scheduler_config: SchedulerConfig = component_config(dir, "scheduler", "scheduler_config.json")?;
        // Validate the scheduler config once at load time, not at the first request.
        SchedulerKind::from_config(&scheduler_config).unwrap_or(SchedulerKind::Euler).build(&scheduler_config, 1, 0)?;
        Ok(Self {
            family,
            text,
            text_2,
            unet,
            unet_base,
            vae,
            scheduler_config,
            force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt.unwrap_or(family == Family::StableDiffusionXl),
            dtype,
            device: opts.device.clone(),
            dir: dir.to_path_buf(),
            embeddings: Default::default(),
        })
    }

    /// The conditioning scheme.
    pub fn family(&self) -> Family {
        self.family
    }

    /// What LoRAs may target: the UNet's and text encoders' weights.
    pub fn lora_targets(&self) -> LoraTargets {
        let mut weights = HashMap::from([(Component::Unet, shapes(&self.unet_base))]);
        for (c, t) in [(Component::TextEncoder, &self.text), (Component::TextEncoder2, &self.text_2)] {
            if let Some(t) = t {
                weights.insert(c, t.shapes());
            }
        }
        let family = if self.family == Family::StableDiffusionXl { TargetFamily::StableDiffusionXl } else { TargetFamily::StableDiffusion };
        LoraTargets { family, weights }
    }

    /// This pipeline with a LoRA stack merged in: only the weights the LoRAs touch are copied
    /// (from the unmerged base, so changing stacks never accumulates), nothing is read again
    /// from disk but the LoRA files, and the VAE and tokenizers are shared.
    pub fn with_loras(&self, stack: &[LoraSpec]) -> Result<Self> {
        let loaded = lora::LoadedStack::load(stack, &self.lora_targets())?;
        let pick = |c: Component| loaded.for_component(c);
        let (dtype, device) = (self.dtype, &self.device);
        let vb = VarBuilder::from_tensors(lora::merge(&self.unet_base, &pick(Component::Unet))?, dtype, device);
        Ok(Self {
            family: self.family,
            text: self.text.as_ref().map(|t| t.with_adapters(&pick(Component::TextEncoder), dtype, device)).transpose()?,
            text_2: self.text_2.as_ref().map(|t| t.with_adapters(&pick(Component::TextEncoder2), dtype, device)).transpose()?,
            unet: UNet2DConditionModel::new(vb, &self.unet.config)?,
            unet_base: self.unet_base.clone(),
            vae: self.vae.clone(),
            scheduler_config: self.scheduler_config.clone(),
            force_zeros_for_empty_prompt: self.force_zeros_for_empty_prompt,
            dtype,
            device: device.clone(),
            dir: self.dir.clone(),
            embeddings: Default::default(),
        })
    }

    /// The width of the text states the UNet attends to (an IP-Adapter's image tokens match it).
    pub fn text_width(&self) -> usize {
        self.unet.config.cross_attention_dim.expand(1).first().copied().unwrap_or(0)
    }

    /// The UNet's cross-attention layers' widths, in IP-Adapter's order (an adapter has a key
    /// and value projection for each).
    pub fn cross_attention_widths(&self) -> Vec<usize> {
        self.unet.cross_attention_widths()
    }

    /// The UNet's config (a single-file ControlNet takes its architecture from it).
    pub fn unet_config(&self) -> &UNetConfig {
        &self.unet.config
    }

    /// The directory the pipeline was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Pixels per latent cell along each side.
    /// See [`super::Pipeline::activation_memory`]: per latent pixel of each of the two
    /// guidance rows, the widest convolution (the last up block's skip concatenation) plus what
    /// lives beside it at the top level, about 18 widths `c0`: the GEGLU feed-forward's 8x-wide
    /// projection and its 4x-wide half, and the skip residuals kept for the up blocks.
    /// Calibrated on an SD-1.5-size UNet at 1024x1024 (batch 2): about 1.0-1.5 GB of RSS beside
    /// the weights measured, 1.36 GB estimated (with the attention tiles).
    pub fn activation_memory(&self) -> super::ActivationMemory {
        let channels = &self.unet.config.block_out_channels;
        let c0 = channels.first().copied().unwrap_or(0) as u64;
        let c1 = channels.get(1).copied().unwrap_or(c0 as usize) as u64;
        let latent_pixels_per_pixel = (self.vae_scale_factor() * self.vae_scale_factor()) as u64;
        let conv = crate::models::conv::conv_bytes_per_pixel(c0 + c1, c0, self.dtype, &self.device);
        let beside = 18 * c0 * self.dtype.size_in_bytes() as u64;
        super::ActivationMemory {
            // Two UNet rows per image under classifier-free guidance; one for LCM-distilled UNets.
            denoise_bytes_per_pixel: (self.unet_rows_per_image() * (conv + beside)).div_ceil(latent_pixels_per_pixel),
            decode_bytes_per_pixel: self.vae.decode_bytes_per_pixel(),
            fixed_bytes: crate::models::sdpa::SCORE_BLOCK_BYTES,
        }
    }

    /// UNet rows per image at most: two under classifier-free guidance, one for an LCM-distilled
    /// UNet (guidance as an embedding).
    fn unet_rows_per_image(&self) -> u64 {
        if self.unet.guidance_embedding_dim().is_some() {
            1
        } else {
            2
        }
    }

    pub fn vae_scale_factor(&self) -> usize {
        self.vae.scale_factor()
    }

    /// diffusers' default image side: the UNet's sample size times the VAE factor.
    pub fn default_size(&self) -> usize {
        self.unet.config.sample_size.unwrap_or(64) * self.vae_scale_factor()
    }

    /// The scheduler a request without `--scheduler` gets.
    pub fn default_scheduler(&self) -> SchedulerKind {
        SchedulerKind::from_config(&self.scheduler_config).unwrap_or(SchedulerKind::Euler)
    }

    /// The model's own scheduler class when easel lacks it and runs Euler instead.
    pub fn substituted_scheduler(&self) -> Option<&str> {
        match SchedulerKind::from_config(&self.scheduler_config) {
            Some(_) => None,
            None => self.scheduler_config.class_name.as_deref(),
        }
    }

    /// Checks request parameters before any work is done.
    pub fn validate(&self, p: &GenerateParams) -> Result<()> {
        p.check_ranges(8, "")?;
        if p.skip_layer_guidance.is_some() {
            return Err(EngineError::param("skip_layer_guidance", "skip-layer guidance is for SD 3.5 models, not Stable Diffusion"));
        }
        if let Some(StepCache::FirstBlock { .. }) = p.step_cache {
            return Err(EngineError::param("cache", "the first-block cache (fbcache) is for FLUX; Stable Diffusion's UNets take deepcache"));
        }
        self.validate_controlnets(p)?;
        self.validate_ip_adapter(p)?;
        if let Some(kind) = p.scheduler.filter(|k| k.is_flow_matching()) {
            return Err(EngineError::param("scheduler", format!("`{}` is for flow-matching models (FLUX), not Stable Diffusion", kind.name())));
        }
        let inpainting = p.init_image.as_ref().is_some_and(|i| i.mask.is_some());
        if self.is_inpainting_unet() && !inpainting {
            return Err(EngineError::param("mask", "this is an inpainting model: give it a picture and a mask"));
        }
        if let Some(l) = &p.init_latents {
            let want = self.latent_shape(p);
            if l.dims() != want {
                return Err(EngineError::param(
                    "init_latents",
                    format!("shape {:?} does not match {:?} (batch, channels, height/{f}, width/{f})", l.dims(), want, f = self.vae_scale_factor()),
                ));
            }
        }
        Ok(())
    }

    /// ControlNets must be made for this UNet: its family, its skip widths, and an image
    /// embedding that lands on the latent grid.
    fn validate_controlnets(&self, p: &GenerateParams) -> Result<()> {
        if p.controlnets.is_empty() {
            return Ok(());
        }
        if p.step_cache.is_some() {
            return Err(EngineError::param("cache", "step caching does not run with ControlNets (their residuals change every step)"));
        }
        let xl = self.family == Family::StableDiffusionXl;
        let family_name = |sdxl: bool| if sdxl { "SDXL" } else { "Stable Diffusion 1.x/2.x" };
        for unit in &p.controlnets {
            let net = &unit.net;
            if net.is_flux() || net.is_sdxl() != xl {
                return Err(EngineError::param("controlnets", format!("the ControlNet {} is for {}, and this model is {}", net.path.display(), net.family_name(), family_name(xl))));
            }
            if let Some(mode) = unit.mode {
                return Err(EngineError::param("controlnets", format!("control mode {mode} is for Union FLUX ControlNets, and {} is not one", net.path.display())));
            }
            if let Some(why) = net.mismatch(&self.unet.config, self.vae.config.latent_channels, self.vae_scale_factor()) {
                return Err(EngineError::param("controlnets", format!("the ControlNet {} does not fit this model: {why}", net.path.display())));
            }
        }
        Ok(())
    }

    /// An IP-Adapter must have a key and value projection for each of this UNet's
    /// cross-attention layers, at its widths, and tokens as wide as the text states.
    fn validate_ip_adapter(&self, p: &GenerateParams) -> Result<()> {
        let Some(unit) = &p.ip_adapter else { return Ok(()) };
        match unit.adapter.mismatch(&self.unet.cross_attention_widths(), self.text_width()) {
            Some(why) => Err(EngineError::param("ip_adapter", format!("the IP-Adapter {} does not fit this model: {why}", unit.adapter.path.display()))),
            None => Ok(()),
        }
    }

    fn latent_shape(&self, p: &GenerateParams) -> [usize; 4] {
        let f = self.vae_scale_factor();
        [p.batch, self.vae.config.latent_channels, p.height / f, p.width / f]
    }

    /// Whether the UNet is an inpainting one (SD 1.5/2 and SDXL inpainting: 9 input channels,
    /// the latents, the mask and the masked picture's latents).
    pub fn is_inpainting_unet(&self) -> bool {
        self.unet.config.in_channels == 2 * self.vae.config.latent_channels + 1
    }

    /// Encodes one prompt, reusing the embeddings of recently seen prompts.
    fn encode(&self, prompt: &str) -> Result<Encoded> {
        self.embeddings.get_or_encode(prompt, |p| self.encode_uncached(p))
    }

    /// Encodes one prompt: (context `[1, 77, D]`, pooled `[1, P]` for SDXL, truncated?).
    fn encode_uncached(&self, prompt: &str) -> Result<Encoded> {
        let run = |stack: &TextStack| stack.run(prompt, &self.device);
        match self.family {
            Family::StableDiffusion => {
                let stack = self.text.as_ref().or(self.text_2.as_ref()).ok_or_else(|| EngineError::Unsupported("no text encoder".into()))?;
                let (out, truncated) = run(stack)?;
                Ok((out.last_hidden_state, None, truncated))
            }
            _ => {
                let mut states = vec![];
                let mut pooled = None;
                let mut truncated = false;
                for stack in [&self.text, &self.text_2].into_iter().flatten() {
                    let (out, t) = run(stack)?;
                    truncated |= t;
                    states.push(out.penultimate);
                    pooled = Some(out.pooled);
                }
                Ok((Tensor::cat(&states, D::Minus1)?, pooled, truncated))
            }
        }
    }

    /// Encodes an absent negative prompt as SDXL does: zeros when `force_zeros_for_empty_prompt`.
    fn encode_negative(&self, negative: Option<&str>, like: &Encoded) -> Result<Encoded> {
        if negative.is_none() && self.family == Family::StableDiffusionXl && self.force_zeros_for_empty_prompt {
            let pooled = like.1.as_ref().map(Tensor::zeros_like).transpose()?;
            return Ok((like.0.zeros_like()?, pooled, false));
        }
        self.encode(negative.unwrap_or(""))
    }

    /// Draws the initial latents from `noise` (before scaling by the scheduler's init sigma).
    pub fn random_latents(&self, p: &GenerateParams, noise: &mut dyn NoiseSource) -> Result<Tensor> {
        noise.randn(&self.latent_shape(p), self.dtype, &self.device)
    }

    /// Generates images; `noise` feeds the ancestral schedulers (defaults to the seed's stream).
    pub fn generate(&self, p: &GenerateParams, noise: Option<&mut dyn NoiseSource>, on_step: StepCallback) -> Result<Generated> {
        let mut out = self.generate_batch(std::slice::from_ref(p), noise, on_step)?;
        out.pop().ok_or_else(|| EngineError::Unsupported("empty batch".into()))
    }

    /// Runs several requests as one batch through the UNet. They must share size, steps,
    /// scheduler and guidance; each keeps its own prompt, seed and image count, and gets
    /// exactly the images it would get alone.
    pub fn generate_batch(&self, items: &[GenerateParams], noise: Option<&mut dyn NoiseSource>, on_step: StepCallback) -> Result<Vec<Generated>> {
        let first = items.first().ok_or_else(|| EngineError::param("batch", "no requests"))?;
        for p in items {
            self.validate(p)?;
            if (p.width, p.height, p.steps, p.scheduler) != (first.width, first.height, first.steps, first.scheduler)
                || p.guidance != first.guidance
                || p.step_cache != first.step_cache
                || p.init_image.as_ref().map(|i| (i.strength, i.mask.is_some())) != first.init_image.as_ref().map(|i| (i.strength, i.mask.is_some()))
            {
                return Err(EngineError::param("batch", "batched requests must share size, steps, scheduler, guidance, step cache, strength and whether they inpaint"));
            }
        }
        super::control::check_batch(items)?;
        super::image_prompt::check_batch(items)?;
        let kind = first.scheduler.unwrap_or_else(|| self.default_scheduler());
        let mut scheduler = kind.build(&self.scheduler_config, first.steps, 0)?;
        // An LCM-distilled UNet takes the guidance scale as an embedding (`w = guidance - 1`, as
        // diffusers' pipelines pass it) and never runs classifier-free guidance.
        let guided = first.guidance > 1.0 && self.unet.guidance_embedding_dim().is_none();
        let mut timings = Timings::default();

        // Image-to-image starts part-way down the schedule.
        let start = match &first.init_image {
            Some(image) => image.first_step(first.steps, StrengthRounding::WholeSteps)?,
            None => 0,
        };
        // Per-request latents from each request's own seed stream (or its init latents): the
        // init noise, or for image-to-image the encoded image noised to the first step's level
        // (the latent sample's noise drawn after the init noise, or from `noise` when given).
        let mut noise = noise;
        let mut seeded: Vec<SeededNoise> = items.iter().map(|p| SeededNoise::new(p.seed)).collect();
        let unet_sees_mask = self.is_inpainting_unet();
        let mut latents = vec![];
        let mut inpaints = vec![];
        for (p, rng) in items.iter().zip(seeded.iter_mut()) {
            let init = match &p.init_latents {
                Some(l) => l.to_device(&self.device)?.to_dtype(self.dtype)?,
                None => self.random_latents(p, rng)?,
            };
            let source: &mut dyn NoiseSource = match noise.as_mut() {
                Some(n) => &mut **n,
                None => rng,
            };
            latents.push(match &p.init_image {
                Some(image) if image.mask.is_some() => {
                    let inpaint = image.inpaint_start(&self.vae, source, p.batch, &init, scheduler.as_ref(), start, unet_sees_mask)?;
                    let start_latents = inpaint.latents.clone();
                    inpaints.push(inpaint);
                    start_latents
                }
                Some(image) => image.start_latents(&self.vae, source, |t| Ok(t.clone()), p.batch, &init, scheduler.as_ref(), start)?,
                None => (init * scheduler.init_noise_sigma())?,
            });
        }
        let latents = Tensor::cat(&latents, 0)?;
        let inpaint = Inpainting::join(&inpaints, guided)?;
        let mut batch_noise = BatchNoise { sources: seeded, counts: items.iter().map(|p| p.batch).collect() };
        let noise: &mut dyn NoiseSource = match noise {
            Some(n) => n,
            None => &mut batch_noise,
        };

        let t0 = Instant::now();
        let (mut negs, mut poss, mut neg_pooled, mut pos_pooled) = (vec![], vec![], vec![], vec![]);
        let mut truncated = vec![];
        for p in items {
            let positive = self.encode(&p.prompt)?;
            let repeat = |t: &Tensor| -> Result<Tensor> { Ok(t.repeat(&[p.batch, 1, 1][..t.rank()])?) };
            let mut cut = positive.2;
            poss.push(repeat(&positive.0)?);
            if let Some(pp) = &positive.1 {
                pos_pooled.push(repeat(pp)?);
            }
            if guided {
                let negative = self.encode_negative(p.negative_prompt.as_deref(), &positive)?;
                cut |= negative.2;
                negs.push(repeat(&negative.0)?);
                if let Some(np) = &negative.1 {
                    neg_pooled.push(repeat(np)?);
                }
            }
            truncated.push(cut);
        }
        // Classifier-free guidance layout, as diffusers: all negatives first, then all positives.
        let context = Tensor::cat(&[negs, poss].concat(), 0)?.to_dtype(self.dtype)?;
        let pooled = [neg_pooled, pos_pooled].concat();
        let added = if pooled.is_empty() {
            None
        } else {
            let text_embeds = Tensor::cat(&pooled, 0)?.to_dtype(self.dtype)?;
            let (h, w) = (first.height as f32, first.width as f32);
            let rows = context.dim(0)?;
            let ids: Vec<f32> = (0..rows).flat_map(|_| [h, w, 0.0, 0.0, h, w]).collect();
            Some(AddedCond { text_embeds, time_ids: Tensor::from_vec(ids, (rows, 6), &self.device)? })
        };
        timings.text_encode = t0.elapsed();
        let guidance_embedding = match self.unet.guidance_embedding_dim() {
            Some(dim) => Some(crate::models::unet::guidance_embedding(first.guidance - 1.0, dim, latents.dim(0)?, &self.device)?),
            None => None,
        };

        let control = ControlStack::new(items, guided, self.dtype, &self.device)?;
        let image_prompt = super::image_prompt::batch_image_prompt(items, guided, self.dtype, &self.device)?;
        let cross = CrossContext { text: &context, image: image_prompt.as_ref() };

        let t1 = Instant::now();
        let mut latents = latents;
        let timesteps = scheduler.timesteps().to_vec();
        let mut deep_cache = match first.step_cache {
            Some(StepCache::DeepCache { interval }) => Some(DeepCache::new(interval)),
            _ => None,
        };
        for (i, &t) in timesteps.iter().enumerate().skip(start) {
            let input = if guided { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
            let input = scheduler.scale_model_input(&input, i)?;
            let residuals = match &control {
                // Windows count the steps that run (image-to-image skips the first `start`), as
                // diffusers' `controlnet_keep` does. ControlNets see the latents alone, never an
                // inpainting UNet's extra channels (appended below, for the UNet only).
                Some(control) => control.residuals(i - start, timesteps.len() - start, &input, t, &context, added.as_ref())?,
                None => None,
            };
            let input = match inpaint.as_ref().and_then(|x| x.unet_extra.as_ref()) {
                Some(extra) => Tensor::cat(&[&input, extra], 1)?,
                None => input,
            };
            let pred = match (deep_cache.as_mut(), residuals) {
                (Some(_), Some(_)) => return Err(EngineError::param("cache", "step caching does not run with ControlNets")),
                (Some(cache), None) => self.unet.forward_cached(&input, t, cross, added.as_ref(), guidance_embedding.as_ref(), cache)?,
                (None, Some(residuals)) => self.unet.forward_with_control(&input, t, cross, added.as_ref(), guidance_embedding.as_ref(), &residuals)?,
                (None, None) => self.unet.forward(&input, t, cross, added.as_ref(), guidance_embedding.as_ref())?,
            };
            let pred = if guided {
                let chunks = pred.chunk(2, 0)?;
                let (uncond, text) = (&chunks[0], &chunks[1]);
                (uncond + ((text - uncond)? * first.guidance)?)?
            } else {
                pred
            };
            latents = scheduler.step(&pred, i, &latents, noise)?;
            if let Some(blend) = inpaint.as_ref().and_then(|x| x.blend.as_ref()) {
                latents = blend.apply(&latents, scheduler.as_ref(), i + 1, timesteps.len())?;
            }
            let format = if self.family == Family::StableDiffusionXl { &crate::preview::SDXL } else { &crate::preview::SD15 };
            if !on_step(&crate::preview::Step::new(i + 1 - start, timesteps.len() - start, &latents, format)) {
                return Err(EngineError::Canceled);
            }
        }
        timings.denoise = t1.elapsed();
        (timings.full_steps, timings.cached_steps) = match &deep_cache {
            Some(cache) => (cache.full_steps, cache.shallow_steps),
            None => (timesteps.len() - start, 0),
        };

        let t2 = Instant::now();
        let decoded = self.decode(&latents)?;
        timings.decode = t2.elapsed();
        split_batch(items, &truncated, &latents, &decoded, kind, &timings)
    }

    /// Decodes final latents to images in `[0, 1]` (f32, CPU), as the diffusers pipelines do.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.vae.decode(latents)
    }
}
