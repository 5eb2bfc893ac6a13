//! FLUX.1 text-to-image (dev: guidance-distilled; schnell: timestep-distilled), run as
//! diffusers' `FluxPipeline` runs it: CLIP pooled + T5 states, packed 2x2 latent patches,
//! flow-matching Euler, no classifier-free guidance.
//!
//! The transformer's weights come from the diffusers layout (`transformer/`), from a single
//! BFL-named safetensors file (`flux1-dev.safetensors`) or from a GGUF file; the other
//! components always come from the diffusers layout.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::config::{read_json, FluxTransformerConfig, ModelIndex, SchedulerConfig};
use crate::error::{EngineError, Result};
use crate::weights::keys::flux as flux_keys;
use crate::weights::lora::{self, Component, LoraSpec, LoraTargets, TargetFamily};
use crate::models::flux::{FirstBlockCache, FluxInputs, FluxTransformer};
use super::common::{read_transformer_weights, TransformerSource, TransformerWeights, component_config, split_batch, Family, GenerateParams, Generated, LoadOptions, ModelDefaults, StepCache, StepCallback, T5Stack, TextStack, Timings, PromptCache};
use crate::weights::store::Weights;
use crate::scheduler::{FlowMatchEuler, NoiseSource, Scheduler, SchedulerKind, SeededNoise};
use super::control::FluxControlStack;
use super::images_in::StrengthRounding;
use super::vae::Vae;

/// Text conditioning of one prompt: (T5 states `[1, T, D]`, CLIP pooled `[1, P]`, truncated?).
type Encoded = (Tensor, Tensor, bool);

/// A loaded, ready-to-run FLUX pipeline.
pub struct FluxPipeline {
    clip: TextStack,
    t5: T5Stack,
    clip_dtype: DType,
    /// Where the text encoders run: the pipeline's device, or the CPU when offloaded.
    text_device: Device,
    transformer: FluxTransformer,
    /// The transformer's weights before any LoRA.
    weights: TransformerWeights,
    vae: Arc<Vae>,
    scheduler_config: SchedulerConfig,
    dtype: DType,
    device: Device,
    dir: PathBuf,
    embeddings: PromptCache<Encoded>,
}

/// diffusers' T5 prompt length: 512 for dev, 256 for schnell.
fn max_sequence_length(guidance_embeds: bool) -> usize {
    if guidance_embeds {
        512
    } else {
        256
    }
}

/// Reads FLUX transformer weights, renamed to BFL names: from `file` (a `.gguf`, or a BFL- or
/// diffusers-named `.safetensors`) when given, else from `dir/transformer/`.
pub fn read_transformer(dir: &Path, file: Option<&Path>, dtype: DType, device: &Device) -> Result<(Weights, TransformerSource)> {
    read_transformer_weights(dir, file, dtype, device, flux_keys::to_bfl)
}

impl FluxPipeline {
    /// Loads a diffusers-layout FLUX pipeline, with the transformer weights from
    /// `opts.transformer` when given.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let index: ModelIndex = read_json(&dir.join("model_index.json"))?;
        index.require(dir, &["text_encoder", "text_encoder_2", "vae", "scheduler"])?;
        let half = opts.dtype != DType::F32;
        let (dtype, device) = (opts.dtype, &opts.device);
        let config: FluxTransformerConfig = component_config(dir, "transformer", "config.json")?;
        if config.patch_size != 1 {
            return Err(EngineError::BadConfig { path: dir.join("transformer/config.json"), message: "field `patch_size`: easel runs FLUX with patch_size 1".into() });
        }
        let defaults = ModelDefaults::load(dir, Family::FluxDev)?;
        let weights = TransformerWeights::load(dir, opts, &defaults, read_transformer)?;
        let files = opts.text_encoders.or_defaults(dir, &defaults);
        let weights_compute = weights.compute;
        let transformer = FluxTransformer::new(&weights.base, &config, weights_compute, device)?;

        let text_device = if opts.offload_text_encoders { Device::Cpu } else { device.clone() };
        let clip_dtype = if opts.offload_text_encoders { DType::F32 } else { dtype };
        let clip = TextStack::load(dir, "text_encoder", "tokenizer", files.clip_l.as_deref(), clip_dtype != DType::F32, clip_dtype, &text_device)?;
        let t5 = T5Stack::load(dir, "text_encoder_2", "tokenizer_2", files.t5.as_deref(), defaults.max_sequence_length.unwrap_or(max_sequence_length(config.guidance_embeds)), clip_dtype, &text_device)?;
        let vae = Arc::new(Vae::load(dir, half, dtype, device)?);
        let scheduler_config: SchedulerConfig = component_config(dir, "scheduler", "scheduler_config.json")?;
        if SchedulerKind::from_config(&scheduler_config) != Some(SchedulerKind::FlowMatchEuler) {
            return Err(EngineError::BadConfig {
                path: dir.join("scheduler/scheduler_config.json"),
                message: format!("FLUX needs FlowMatchEulerDiscreteScheduler, not {:?}", scheduler_config.class_name.as_deref().unwrap_or("none")),
            });
        }
        FlowMatchEuler::new(&scheduler_config, 1, 256)?;
        Ok(Self {
            clip,
            t5,
            clip_dtype,
            text_device,
            transformer,
            weights,
            vae,
            scheduler_config,
            dtype: weights_compute,
            device: device.clone(),
            dir: dir.to_path_buf(),
            embeddings: Default::default(),
        })
    }

    /// What LoRAs may target: the transformer (BFL names) and the CLIP text encoder.
    pub fn lora_targets(&self) -> LoraTargets {
        let c = &self.transformer.config;
        LoraTargets {
            family: TargetFamily::flux(c),
            weights: HashMap::from([(Component::Transformer, self.weights.base.shapes()), (Component::TextEncoder, self.clip.shapes())]),
        }
    }

    /// This pipeline with a LoRA stack: merged into copies of the affected full-precision
    /// weights, or run beside quantized (GGUF) ones as low-rank updates; the base weights, T5,
    /// VAE and tokenizers are shared, and nothing but the LoRA files is read from disk.
    pub fn with_loras(&self, stack: &[LoraSpec]) -> Result<Self> {
        let loaded = lora::LoadedStack::load(stack, &self.lora_targets())?;
        let pick = |c: Component| loaded.for_component(c);
        let merged = self.weights.base.with_adapters(&pick(Component::Transformer))?;
        let transformer = FluxTransformer::new(&merged, &self.transformer.config, self.dtype, &self.device)?;
        Ok(Self {
            clip: self.clip.with_adapters(&pick(Component::TextEncoder), self.clip_dtype, &self.text_device)?,
            t5: self.t5.clone(),
            clip_dtype: self.clip_dtype,
            text_device: self.text_device.clone(),
            transformer,
            weights: self.weights.clone(),
            vae: self.vae.clone(),
            scheduler_config: self.scheduler_config.clone(),
            dtype: self.dtype,
            device: self.device.clone(),
            dir: self.dir.clone(),
            embeddings: Default::default(),
        })
    }

    /// Whether the model takes a guidance scale (FLUX.1-dev) or ignores it (schnell).
    pub fn uses_guidance(&self) -> bool {
        self.transformer.config.guidance_embeds
    }

    /// The directory the pipeline was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the transformer weights came from.
    pub fn transformer_source(&self) -> TransformerSource {
        self.weights.source
    }

    /// The transformer weights' memory in bytes, and a summary of their types.
    pub fn weights_memory(&self) -> (usize, &str) {
        (self.weights.bytes, &self.weights.summary)
    }

    /// Width and height must be multiples of this (VAE factor times the 2x2 packing).
    pub fn size_multiple(&self) -> usize {
        self.vae.scale_factor() * 2
    }

    /// See [`super::Pipeline::activation_memory`]: per image token (a 2x2 patch of latent
    /// cells), the attention inputs and outputs and the 4x-wide MLP, about 13 hidden widths.
    pub fn activation_memory(&self) -> super::ActivationMemory {
        let c = &self.transformer.config;
        let hidden = (c.num_attention_heads * c.attention_head_dim) as u64;
        let pixels_per_token = (self.size_multiple() * self.size_multiple()) as u64;
        super::ActivationMemory {
            denoise_bytes_per_pixel: (13 * hidden * self.dtype.size_in_bytes() as u64).div_ceil(pixels_per_token),
            decode_bytes_per_pixel: self.vae.decode_bytes_per_pixel(),
            fixed_bytes: crate::models::sdpa::SCORE_BLOCK_BYTES,
        }
    }

    /// diffusers' default image side for FLUX: 1024 (128 latent cells of 8 pixels).
    pub fn default_size(&self) -> usize {
        128 * self.vae.scale_factor()
    }

    fn latent_channels(&self) -> usize {
        self.packed_channels() / 4
    }

    /// The width of a packed latent token: what the transformer predicts.
    fn packed_channels(&self) -> usize {
        let c = &self.transformer.config;
        c.out_channels.unwrap_or(c.in_channels)
    }

    /// Whether this is a FLUX Fill model (FLUX.1-Fill-dev): its transformer takes, beside the
    /// latents, the masked picture's latents and the folded mask ([`InitImage::fill_condition`]),
    /// so it is wider in than out, and every request needs a picture and a mask.
    pub fn is_fill(&self) -> bool {
        self.transformer.config.in_channels > self.packed_channels()
    }

    /// Packed latent shape `[batch, (H/2f)(W/2f), 4C]`, the layout FluxPipeline's `latents` takes.
    pub fn latent_shape(&self, p: &GenerateParams) -> [usize; 3] {
        let m = self.size_multiple();
        [p.batch, (p.height / m) * (p.width / m), self.packed_channels()]
    }

    /// Checks request parameters before any work is done.
    pub fn validate(&self, p: &GenerateParams) -> Result<()> {
        if let Some(unit) = &p.ip_adapter {
            return Err(EngineError::param("ip_adapter", format!("the IP-Adapter {} is for a UNet (Stable Diffusion); FLUX IP-Adapters are not supported yet", unit.adapter.path.display())));
        }
        self.validate_controlnets(p)?;
        let masked = p.init_image.as_ref().is_some_and(|i| i.mask.is_some());
        if self.is_fill() && !masked {
            return Err(EngineError::param("mask", "a FLUX Fill model repaints where a mask says: send an image and a mask"));
        }
        if masked && !self.is_fill() {
            return Err(EngineError::param("mask", "FLUX inpaints with a FLUX Fill model (FLUX.1-Fill-dev); this one takes an image without a mask (image-to-image)"));
        }
        let fill_width = self.packed_channels() + 4 * self.vae.scale_factor() * self.vae.scale_factor() + self.packed_channels();
        if self.is_fill() && self.transformer.config.in_channels != fill_width {
            return Err(EngineError::Unsupported(format!(
                "a FLUX transformer {} wide in and {} out is neither FLUX nor FLUX Fill ({fill_width} in)",
                self.transformer.config.in_channels,
                self.packed_channels()
            )));
        }
        let m = self.size_multiple();
        p.check_ranges(m, " for FLUX")?;
        if p.skip_layer_guidance.is_some() {
            return Err(EngineError::param("skip_layer_guidance", "skip-layer guidance is for SD 3.5 models, not FLUX"));
        }
        if let Some(StepCache::DeepCache { .. }) = p.step_cache {
            return Err(EngineError::param("cache", "deepcache is for Stable Diffusion's UNets; FLUX takes the first-block cache (fbcache)"));
        }
        if let Some(kind) = p.scheduler.filter(|k| !k.is_flow_matching()) {
            return Err(EngineError::param("scheduler", format!("`{}` is not for FLUX models; they use flow-match-euler", kind.name())));
        }
        if let Some(l) = &p.init_latents {
            let want = self.latent_shape(p);
            if l.dims() != want {
                return Err(EngineError::param(
                    "init_latents",
                    format!("shape {:?} does not match the packed FLUX latents {:?} (batch, (height/{m})*(width/{m}), {})", l.dims(), want, want[2]),
                ));
            }
        }
        Ok(())
    }

    /// ControlNets must be FLUX ControlNets made for this transformer's widths, with a control
    /// mode exactly when they are Union nets, and equally deep when several are stacked (their
    /// residuals are summed block by block).
    fn validate_controlnets(&self, p: &GenerateParams) -> Result<()> {
        let Some(first) = p.controlnets.first() else { return Ok(()) };
        if p.step_cache.is_some() {
            return Err(EngineError::param("cache", "step caching does not run with ControlNets (their residuals change every step)"));
        }
        if self.is_fill() {
            return Err(EngineError::param("controlnets", "FLUX Fill with a ControlNet is not supported"));
        }
        let depth = |net: &crate::models::flux_controlnet::FluxControlNet| (net.config.base.num_layers, net.config.base.num_single_layers);
        let first_depth = first.net.flux().map(depth);
        let mine = &self.transformer.config;
        for unit in &p.controlnets {
            let name = unit.net.path.display();
            let Some(net) = unit.net.flux() else {
                return Err(EngineError::param("controlnets", format!("the ControlNet {name} is for {}, and this model is FLUX", unit.net.family_name())));
            };
            let theirs = &net.config.base;
            let differs = |what: &str, a: String, b: String| (a != b).then(|| format!("its {what} is {a}, the transformer's {b}"));
            let why = differs("width (heads x head size)", net.hidden_size().to_string(), mine.hidden_size().to_string())
                .or_else(|| differs("joint_attention_dim", theirs.joint_attention_dim.to_string(), mine.joint_attention_dim.to_string()))
                .or_else(|| differs("pooled_projection_dim", theirs.pooled_projection_dim.to_string(), mine.pooled_projection_dim.to_string()))
                .or_else(|| differs("axes_dims_rope", format!("{:?}", theirs.axes_dims_rope), format!("{:?}", mine.axes_dims_rope)))
                .or_else(|| differs("in_channels", theirs.in_channels.to_string(), self.packed_channels().to_string()));
            if let Some(why) = why {
                return Err(EngineError::param("controlnets", format!("the ControlNet {name} does not fit this model: {why}")));
            }
            match (net.config.num_mode, unit.mode) {
                (Some(n), Some(m)) if m >= n => {
                    return Err(EngineError::param("controlnets", format!("control mode {m} is out of range: the Union ControlNet {name} has modes 0 to {}", n.saturating_sub(1))))
                }
                (Some(n), None) => return Err(EngineError::param("controlnets", format!("the ControlNet {name} is a Union ControlNet: give a control mode (0 to {})", n.saturating_sub(1)))),
                (None, Some(m)) => return Err(EngineError::param("controlnets", format!("control mode {m} is for Union ControlNets, and {name} is not one"))),
                _ => {}
            }
            if Some(depth(net)) != first_depth {
                return Err(EngineError::param("controlnets", "FLUX ControlNets used together must have as many double and single blocks (their residuals are summed block by block)"));
            }
        }
        Ok(())
    }

    fn encode(&self, prompt: &str) -> Result<Encoded> {
        self.embeddings.get_or_encode(prompt, |p| {
            let (clip, clip_cut) = self.clip.run(p, &self.text_device)?;
            let (states, t5_cut) = self.t5.run(p)?;
            // Offloaded encoders ran on the CPU: only their outputs go to the device.
            Ok((states.to_device(&self.device)?, clip.pooled.to_device(&self.device)?, clip_cut || t5_cut))
        })
    }

    /// A prompt's text conditioning as the transformer gets it: T5's hidden states
    /// `[1, max_len, d]` and CLIP's pooled output `[1, d]` (for component tests and tools).
    pub fn encode_prompt(&self, prompt: &str) -> Result<(Tensor, Tensor)> {
        let e = self.encode(prompt)?;
        Ok((e.0.clone(), e.1.clone()))
    }

    /// Generates images for one request.
    pub fn generate(&self, p: &GenerateParams, on_step: StepCallback) -> Result<Generated> {
        let mut out = self.generate_batch(std::slice::from_ref(p), on_step)?;
        out.pop().ok_or_else(|| EngineError::Unsupported("empty batch".into()))
    }

    /// Runs several requests as one batch; they must share size, steps and guidance.
    pub fn generate_batch(&self, items: &[GenerateParams], on_step: StepCallback) -> Result<Vec<Generated>> {
        self.generate_batch_with_noise(items, None, on_step)
    }

    /// [`Self::generate_batch`], with image-to-image's latent sample noise drawn from `noise`
    /// when given (parity tests replay diffusers' draws) rather than each request's seed.
    pub fn generate_batch_with_noise(&self, items: &[GenerateParams], mut noise: Option<&mut dyn NoiseSource>, on_step: StepCallback) -> Result<Vec<Generated>> {
        let first = items.first().ok_or_else(|| EngineError::param("batch", "no requests"))?;
        super::control::check_batch(items)?;
        for p in items {
            self.validate(p)?;
            if (p.width, p.height, p.steps) != (first.width, first.height, first.steps)
                || p.guidance != first.guidance
                || p.step_cache != first.step_cache
                || p.init_image.as_ref().map(|i| i.strength) != first.init_image.as_ref().map(|i| i.strength)
            {
                return Err(EngineError::param("batch", "batched requests must share size, steps, guidance, step cache and strength"));
            }
        }
        let m = self.size_multiple();
        let (lh, lw) = (first.height / m * 2, first.width / m * 2);
        let c = self.latent_channels();
        let mut timings = Timings::default();
        let mut scheduler = FlowMatchEuler::new(&self.scheduler_config, first.steps, (lh / 2) * (lw / 2))?;
        let start = match &first.init_image {
            Some(image) => image.first_step(first.steps, StrengthRounding::FlowMatch)?,
            None => 0,
        };

        // The init noise from each request's seed (or its init latents); for image-to-image,
        // the encoded image noised to the first step's level (FluxImg2ImgPipeline's scale_noise).
        // FLUX Fill also takes the masked picture and the mask beside the latents at every step
        // (FluxFillPipeline draws their latent sample after the picture's).
        // ControlNets read their control images' packed latents, one latent-distribution sample
        // per image row, drawn (in unit order) after the init noise, so a seed gives the same
        // init with or without them (FluxControlNetPipeline draws them before the init).
        let mut latents = vec![];
        let mut fill = vec![];
        let mut control_conds: Vec<Vec<Tensor>> = vec![vec![]; first.controlnets.len()];
        for p in items {
            let mut rng = SeededNoise::new(p.seed);
            let init = match &p.init_latents {
                Some(l) => l.to_device(&self.device)?.to_dtype(self.dtype)?,
                None => pack(&rng.randn(&[p.batch, c, lh, lw], self.dtype, &self.device)?)?,
            };
            let source: &mut dyn NoiseSource = match noise.as_mut() {
                Some(n) => &mut **n,
                None => &mut rng,
            };
            for (conds, unit) in control_conds.iter_mut().zip(&p.controlnets) {
                let images = unit.image.repeat((p.batch, 1, 1, 1))?;
                conds.push(pack(&self.vae.encode(&images, source)?.to_dtype(self.dtype)?)?);
            }
            latents.push(match &p.init_image {
                Some(image) => {
                    let start_latents = image.start_latents(&self.vae, source, pack, p.batch, &init, &scheduler, start)?;
                    if self.is_fill() {
                        fill.push(image.fill_condition(&self.vae, source, pack, p.batch, self.vae.scale_factor(), self.dtype)?);
                    }
                    start_latents
                }
                None => init,
            });
        }
        let mut latents = Tensor::cat(&latents, 0)?;
        let fill = if fill.is_empty() { None } else { Some(Tensor::cat(&fill, 0)?) };
        let control = if first.controlnets.is_empty() {
            None
        } else {
            Some(FluxControlStack::new(&first.controlnets, control_conds.iter().map(|c| Tensor::cat(c, 0)).collect::<candle_core::Result<_>>()?)?)
        };
        let rows = latents.dim(0)?;

        let t0 = Instant::now();
        let (mut states, mut pooled, mut truncated) = (vec![], vec![], vec![]);
        for p in items {
            let (s, pl, cut) = self.encode(&p.prompt)?;
            states.push(s.repeat((p.batch, 1, 1))?);
            pooled.push(pl.repeat((p.batch, 1))?);
            truncated.push(cut);
        }
        let states = Tensor::cat(&states, 0)?;
        let pooled = Tensor::cat(&pooled, 0)?;
        let txt_ids = Tensor::zeros((states.dim(1)?, 3), DType::F32, &self.device)?;
        let img_ids = latent_ids(lh / 2, lw / 2, &self.device)?;
        timings.text_encode = t0.elapsed();

        let t1 = Instant::now();
        let guidance = if self.uses_guidance() { Some(Tensor::full(first.guidance as f32, rows, &self.device)?) } else { None };
        // A ControlNet embeds the guidance scale when it was trained to, whatever the transformer does.
        let control_guidance = Tensor::full(first.guidance as f32, rows, &self.device)?;
        let timesteps = scheduler.timesteps().to_vec();
        let mut no_noise = SeededNoise::new(0);
        let mut first_block_cache = match first.step_cache {
            Some(StepCache::FirstBlock { threshold }) => Some(FirstBlockCache::new(threshold)),
            _ => None,
        };
        for (i, &t) in timesteps.iter().enumerate().skip(start) {
            let ts = Tensor::full((t / 1000.0) as f32, rows, &self.device)?;
            let img = match &fill {
                Some(condition) => Tensor::cat(&[&latents, condition], 2)?,
                None => latents.clone(),
            };
            let inputs = FluxInputs { img: &img, img_ids: &img_ids, txt: &states, txt_ids: &txt_ids, timesteps: &ts, pooled: &pooled, guidance: guidance.as_ref() };
            let residuals = match &control {
                Some(stack) => stack.residuals(i - start, timesteps.len() - start, &FluxInputs { guidance: Some(&control_guidance), ..inputs })?,
                None => None,
            };
            let pred = match (first_block_cache.as_mut(), &residuals) {
                (Some(cache), _) => self.transformer.forward_cached(&inputs, cache)?,
                (None, Some(r)) => self.transformer.forward_with_control(&inputs, r)?,
                (None, None) => self.transformer.forward(&inputs)?,
            };
            latents = scheduler.step(&pred, i, &latents, &mut no_noise as &mut dyn NoiseSource)?;
            if !on_step(&crate::preview::Step::packed(i + 1 - start, timesteps.len() - start, &latents, (lh / 2, lw / 2))) {
                return Err(EngineError::Canceled);
            }
        }
        timings.denoise = t1.elapsed();
        (timings.full_steps, timings.cached_steps) = match &first_block_cache {
            Some(cache) => (cache.full_steps, cache.cached_steps),
            None => (timesteps.len() - start, 0),
        };

        let t2 = Instant::now();
        let decoded = self.decode(&latents, first.height, first.width)?;
        timings.decode = t2.elapsed();
        split_batch(items, &truncated, &latents, &decoded, SchedulerKind::FlowMatchEuler, &timings)
    }

    /// Unpacks `[B, L, 4C]` latents for a `height x width` image and decodes them.
    pub fn decode(&self, packed: &Tensor, height: usize, width: usize) -> Result<Tensor> {
        let m = self.size_multiple();
        self.vae.decode(&unpack(packed, height / m, width / m)?)
    }

    /// One transformer evaluation (for benchmarks and component tests).
    pub fn transformer(&self) -> &FluxTransformer {
        &self.transformer
    }
}

/// `[B, C, 2h, 2w]` to `[B, h*w, 4C]`: each 2x2 patch becomes one token (diffusers' `_pack_latents`).
pub fn pack(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h / 2, 2, w / 2, 2))?.permute((0, 2, 4, 1, 3, 5))?.reshape((b, (h / 2) * (w / 2), c * 4))?)
}

/// The inverse of [`pack`] for an `h x w` grid of tokens.
pub fn unpack(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, _, d) = x.dims3()?;
    let c = d / 4;
    Ok(x.reshape((b, h, w, c, 2, 2))?.permute((0, 3, 1, 4, 2, 5))?.reshape((b, c, h * 2, w * 2))?)
}

/// Position ids `[h*w, 3]` of the latent tokens: `(0, row, column)`.
pub fn latent_ids(h: usize, w: usize, device: &Device) -> Result<Tensor> {
    let ids: Vec<f32> = (0..h).flat_map(|r| (0..w).flat_map(move |c| [0.0, r as f32, c as f32])).collect();
    Ok(Tensor::from_vec(ids, (h * w, 3), device)?)
}
