//! Stable Diffusion 3 / 3.5 (medium, large, large-turbo) run as diffusers'
//! `StableDiffusion3Pipeline` runs it: CLIP-L and CLIP-G penultimate states side by side,
//! zero-padded to T5's width and followed by T5's states (zeros when the model has no T5),
//! pooled CLIP-L and CLIP-G embeddings, flow-matching Euler steps with classifier-free guidance
//! above 1, and skip-layer guidance when asked.
//!
//! The transformer's weights come from the diffusers layout (`transformer/`), from Stability's
//! single file (`sd3.5_large.safetensors`, `model.diffusion_model.` names; its other tensors are
//! ignored) or from a GGUF file, given as `--transformer` or in `easel.json`. The text
//! encoders, tokenizers and VAE come from the diffusers layout.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};

use super::common::{read_transformer_weights, TransformerSource, TransformerWeights, component_config, split_batch, Family, GenerateParams, Generated, LoadOptions, ModelDefaults, PromptCache, StepCallback, T5Stack, TextStack, Timings};
use super::images_in::StrengthRounding;
use super::vae::Vae;
use crate::config::{read_json, ModelIndex, SchedulerConfig, Sd3TransformerConfig};
use crate::error::{EngineError, Result};
use crate::models::mmdit::{Mmdit, MmditInputs};
use crate::scheduler::{FlowMatchEuler, NoiseSource, Scheduler, SchedulerKind, SeededNoise};
use crate::weights::keys::sd3 as sd3_keys;
use crate::weights::lora::{self, Component, LoraSpec, LoraTargets, TargetFamily};
use crate::weights::store::Weights;

/// Text conditioning of one prompt: (states `[1, 77 + T, joint_dim]`, pooled `[1, P]`, truncated?).
type Encoded = (Tensor, Tensor, bool);

/// diffusers' default T5 prompt length for SD 3.5.
const T5_TOKENS: usize = 256;
/// CLIP's prompt length (the tokenizers' `model_max_length`), also the zeros' length without T5.
const CLIP_TOKENS: usize = 77;

/// A loaded, ready-to-run SD 3 / 3.5 pipeline.
pub struct Sd3Pipeline {
    clip_l: TextStack,
    clip_g: TextStack,
    /// Absent when the model ships without `text_encoder_3` (its states are zeros then).
    t5: Option<T5Stack>,
    text_dtype: DType,
    text_device: Device,
    transformer: Mmdit,
    /// The transformer's weights before any LoRA.
    weights: TransformerWeights,
    vae: Arc<Vae>,
    scheduler_config: SchedulerConfig,
    dtype: DType,
    device: Device,
    dir: PathBuf,
    embeddings: PromptCache<Encoded>,
}

/// Reads SD3 transformer weights, renamed to Stability's names: from `file` (a `.gguf`, or a
/// Stability- or diffusers-named `.safetensors`) when given, else from `dir/transformer/`.
pub fn read_transformer(dir: &Path, file: Option<&Path>, dtype: DType, device: &Device) -> Result<(Weights, TransformerSource)> {
    let (mut w, source) = read_transformer_weights(dir, file, dtype, device, sd3_keys::to_sai)?;
    // Stability's full checkpoints also hold the VAE and text encoders under other prefixes.
    let foreign: Vec<String> = w.names().filter(|n| !is_transformer_key(n)).cloned().collect();
    for name in foreign {
        w.take(&name);
    }
    Ok((w, source))
}

fn is_transformer_key(name: &str) -> bool {
    const ROOTS: [&str; 7] = ["x_embedder.", "pos_embed", "t_embedder.", "y_embedder.", "context_embedder.", "joint_blocks.", "final_layer."];
    ROOTS.iter().any(|r| name.starts_with(r))
}

impl Sd3Pipeline {
    /// Loads a diffusers-layout SD 3 / 3.5 pipeline, with the transformer weights from
    /// `opts.transformer` (or `easel.json`'s `transformer`) when given.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let index: ModelIndex = read_json(&dir.join("model_index.json"))?;
        index.require(dir, &["text_encoder", "text_encoder_2", "vae", "scheduler"])?;
        let half = opts.dtype != DType::F32;
        let (dtype, device) = (opts.dtype, &opts.device);
        let config: Sd3TransformerConfig = component_config(dir, "transformer", "config.json")?;
        let defaults = ModelDefaults::load(dir, Family::Sd3)?;
        let weights = TransformerWeights::load(dir, opts, &defaults, read_transformer)?;
        let weights_compute = weights.compute;
        let transformer = Mmdit::new(&weights.base, &config, weights_compute, device)?;

        let text_device = if opts.offload_text_encoders { Device::Cpu } else { device.clone() };
        let text_dtype = if opts.offload_text_encoders { DType::F32 } else { dtype };
        let text_half = text_dtype != DType::F32;
        let files = opts.text_encoders.or_defaults(dir, &defaults);
        let clip_l = TextStack::load(dir, "text_encoder", "tokenizer", files.clip_l.as_deref(), text_half, text_dtype, &text_device)?;
        let clip_g = TextStack::load(dir, "text_encoder_2", "tokenizer_2", files.clip_g.as_deref(), text_half, text_dtype, &text_device)?;
        let t5 = if index.has("text_encoder_3") {
            let tokens = defaults.max_sequence_length.unwrap_or(T5_TOKENS);
            Some(T5Stack::load(dir, "text_encoder_3", "tokenizer_3", files.t5.as_deref(), tokens, text_dtype, &text_device)?)
        } else {
            None
        };
        let vae = Arc::new(Vae::load(dir, half, dtype, device)?);
        let scheduler_config: SchedulerConfig = component_config(dir, "scheduler", "scheduler_config.json")?;
        if SchedulerKind::from_config(&scheduler_config) != Some(SchedulerKind::FlowMatchEuler) {
            return Err(EngineError::BadConfig {
                path: dir.join("scheduler/scheduler_config.json"),
                message: format!("SD 3.5 needs FlowMatchEulerDiscreteScheduler, not {:?}", scheduler_config.class_name.as_deref().unwrap_or("none")),
            });
        }
        FlowMatchEuler::sd3(&scheduler_config, 1)?;
        Ok(Self {
            clip_l,
            clip_g,
            t5,
            text_dtype,
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

    /// What LoRAs may target: the transformer (Stability's names) and both CLIP encoders.
    pub fn lora_targets(&self) -> LoraTargets {
        let c = &self.transformer.config;
        LoraTargets {
            family: TargetFamily::Sd3 { hidden: c.hidden_size(), blocks: c.num_layers },
            weights: HashMap::from([
                (Component::Transformer, self.weights.base.shapes()),
                (Component::TextEncoder, self.clip_l.shapes()),
                (Component::TextEncoder2, self.clip_g.shapes()),
            ]),
        }
    }

    /// This pipeline with a LoRA stack (see the FLUX pipeline's: the same sharing).
    pub fn with_loras(&self, stack: &[LoraSpec]) -> Result<Self> {
        let loaded = lora::LoadedStack::load(stack, &self.lora_targets())?;
        let pick = |c: Component| loaded.for_component(c);
        let merged = self.weights.base.with_adapters(&pick(Component::Transformer))?;
        let transformer = Mmdit::new(&merged, &self.transformer.config, self.dtype, &self.device)?;
        Ok(Self {
            clip_l: self.clip_l.with_adapters(&pick(Component::TextEncoder), self.text_dtype, &self.text_device)?,
            clip_g: self.clip_g.with_adapters(&pick(Component::TextEncoder2), self.text_dtype, &self.text_device)?,
            t5: self.t5.clone(),
            text_dtype: self.text_dtype,
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

    /// The directory the pipeline was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the transformer weights came from.
    pub fn transformer_source(&self) -> TransformerSource {
        self.weights.source
    }

    /// Whether the model has a T5 encoder.
    pub fn has_t5(&self) -> bool {
        self.t5.is_some()
    }

    /// The transformer weights' memory in bytes, and a summary of their types.
    pub fn weights_memory(&self) -> (usize, &str) {
        (self.weights.bytes, &self.weights.summary)
    }

    /// Width and height must be multiples of this (VAE factor times the 2x2 patches): 16.
    pub fn size_multiple(&self) -> usize {
        self.vae.scale_factor() * self.transformer.config.patch_size
    }

    /// diffusers' default image side: the transformer's sample size times the VAE factor.
    pub fn default_size(&self) -> usize {
        self.transformer.config.sample_size * self.vae.scale_factor()
    }

    /// See [`super::Pipeline::activation_memory`]: as FLUX's, per 2x2 patch of latent cells.
    pub fn activation_memory(&self) -> super::ActivationMemory {
        let hidden = self.transformer.config.hidden_size() as u64;
        let pixels_per_token = (self.size_multiple() * self.size_multiple()) as u64;
        super::ActivationMemory {
            // Classifier-free guidance doubles the batch.
            denoise_bytes_per_pixel: (2 * 13 * hidden * self.dtype.size_in_bytes() as u64).div_ceil(pixels_per_token),
            decode_bytes_per_pixel: self.vae.decode_bytes_per_pixel(),
            fixed_bytes: crate::models::sdpa::SCORE_BLOCK_BYTES,
        }
    }

    /// Latent shape `[batch, 16, H/8, W/8]`, the layout StableDiffusion3Pipeline's `latents` takes.
    pub fn latent_shape(&self, p: &GenerateParams) -> [usize; 4] {
        let f = self.vae.scale_factor();
        [p.batch, self.transformer.config.in_channels, p.height / f, p.width / f]
    }

    /// Checks request parameters before any work is done.
    pub fn validate(&self, p: &GenerateParams) -> Result<()> {
        if let Some(unit) = &p.ip_adapter {
            return Err(EngineError::param("ip_adapter", format!("the IP-Adapter {} is for a UNet (Stable Diffusion); SD 3.5 IP-Adapters are not supported yet", unit.adapter.path.display())));
        }
        if let Some(unit) = p.controlnets.first() {
            return Err(EngineError::param("controlnets", format!("the ControlNet {} is for a UNet (Stable Diffusion); SD 3.5 ControlNets are not supported yet", unit.net.path.display())));
        }
        if p.init_image.as_ref().is_some_and(|i| i.mask.is_some()) {
            return Err(EngineError::param("mask", "inpainting runs on Stable Diffusion models; SD 3.5 takes an image without a mask (image-to-image)"));
        }
        let m = self.size_multiple();
        p.check_ranges(m, " for SD 3.5")?;
        let max = self.transformer.max_latent_side() * self.vae.scale_factor();
        for (name, v) in [("width", p.width), ("height", p.height)] {
            if v > max {
                return Err(EngineError::param(name, format!("{v} is larger than this model's position table allows ({max})")));
            }
        }
        if let Some(kind) = p.scheduler.filter(|k| !k.is_flow_matching()) {
            return Err(EngineError::param("scheduler", format!("`{}` is not for SD 3.5 models; they use flow-match-euler", kind.name())));
        }
        if p.step_cache.is_some() {
            return Err(EngineError::param("cache", "SD 3.5 has no step cache in easel yet (deepcache is for UNets, fbcache for FLUX)"));
        }
        if let Some(slg) = &p.skip_layer_guidance {
            let layers = self.transformer.config.num_layers;
            if let Some(bad) = slg.layers.iter().find(|&&l| l >= layers) {
                return Err(EngineError::param("skip_layer_guidance", format!("layer {bad} does not exist; this transformer has layers 0 to {}", layers - 1)));
            }
        }
        if let Some(l) = &p.init_latents {
            let want = self.latent_shape(p);
            if l.dims() != want {
                return Err(EngineError::param("init_latents", format!("shape {:?} does not match {:?} (batch, channels, height/8, width/8)", l.dims(), want)));
            }
        }
        Ok(())
    }

    fn encode(&self, prompt: &str) -> Result<Encoded> {
        self.embeddings.get_or_encode(prompt, |p| {
            let (l, l_cut) = self.clip_l.run(p, &self.text_device)?;
            let (g, g_cut) = self.clip_g.run(p, &self.text_device)?;
            let joint = self.transformer.config.joint_attention_dim;
            let clip = Tensor::cat(&[&l.penultimate, &g.penultimate], D::Minus1)?;
            let width = clip.dim(D::Minus1)?;
            if width > joint {
                return Err(EngineError::BadConfig {
                    path: self.dir.join("text_encoder_2/config.json"),
                    message: format!("CLIP-L and CLIP-G together are {width} wide, more than the transformer's joint_attention_dim {joint}"),
                });
            }
            let clip = clip.pad_with_zeros(D::Minus1, 0, joint - width)?;
            let (t5, t5_cut) = match &self.t5 {
                Some(t5) => t5.run(p)?,
                None => (Tensor::zeros((1, CLIP_TOKENS, joint), clip.dtype(), clip.device())?, false),
            };
            let states = Tensor::cat(&[clip, t5.to_dtype(l.penultimate.dtype())?], 1)?;
            let pooled = Tensor::cat(&[&l.pooled, &g.pooled], D::Minus1)?;
            // Offloaded encoders ran on the CPU: only their outputs go to the device.
            Ok((states.to_device(&self.device)?, pooled.to_device(&self.device)?, l_cut || g_cut || t5_cut))
        })
    }

    /// A prompt's text conditioning as the transformer gets it: the joint states and the
    /// pooled embeddings (for component tests and tools).
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

    /// Runs several requests as one batch; they must share size, steps, guidance and skip-layer
    /// guidance.
    /// [`Self::generate_batch`], with image-to-image's latent sample noise drawn from `noise`
    /// when given (parity tests replay diffusers' draws) rather than each request's seed.
    pub fn generate_batch_with_noise(&self, items: &[GenerateParams], mut noise: Option<&mut dyn NoiseSource>, on_step: StepCallback) -> Result<Vec<Generated>> {
        let first = items.first().ok_or_else(|| EngineError::param("batch", "no requests"))?;
        for p in items {
            self.validate(p)?;
            if (p.width, p.height, p.steps) != (first.width, first.height, first.steps)
                || p.guidance != first.guidance
                || p.skip_layer_guidance != first.skip_layer_guidance
                || p.init_image.as_ref().map(|i| i.strength) != first.init_image.as_ref().map(|i| i.strength)
            {
                return Err(EngineError::param("batch", "batched requests must share size, steps, guidance, skip-layer guidance and strength"));
            }
        }
        let mut timings = Timings::default();
        let mut scheduler = FlowMatchEuler::sd3(&self.scheduler_config, first.steps)?;
        // StableDiffusion3Img2ImgPipeline rounds strength as FluxImg2ImgPipeline does.
        let start = match &first.init_image {
            Some(image) => image.first_step(first.steps, StrengthRounding::FlowMatch)?,
            None => 0,
        };
        let mut latents = vec![];
        for p in items {
            let mut rng = SeededNoise::new(p.seed);
            let init = match &p.init_latents {
                Some(l) => l.to_device(&self.device)?.to_dtype(self.dtype)?,
                None => rng.randn(&self.latent_shape(p), self.dtype, &self.device)?,
            };
            latents.push(match &p.init_image {
                Some(image) => {
                    let source: &mut dyn NoiseSource = match noise.as_mut() {
                        Some(n) => &mut **n,
                        None => &mut rng,
                    };
                    image.start_latents(&self.vae, source, |t| Ok(t.clone()), p.batch, &init, &scheduler, start)?
                }
                None => init,
            });
        }
        let mut latents = Tensor::cat(&latents, 0)?;
        let rows = latents.dim(0)?;
        let guided = first.guidance > 1.0;

        let t0 = Instant::now();
        let (mut states, mut pooled, mut neg_states, mut neg_pooled, mut truncated) = (vec![], vec![], vec![], vec![], vec![]);
        for p in items {
            let (s, pl, cut) = self.encode(&p.prompt)?;
            states.push(s.repeat((p.batch, 1, 1))?);
            pooled.push(pl.repeat((p.batch, 1))?);
            truncated.push(cut);
            if guided {
                let (s, pl, _) = self.encode(p.negative_prompt.as_deref().unwrap_or(""))?;
                neg_states.push(s.repeat((p.batch, 1, 1))?);
                neg_pooled.push(pl.repeat((p.batch, 1))?);
            }
        }
        let (states, pooled) = (Tensor::cat(&states, 0)?, Tensor::cat(&pooled, 0)?);
        // diffusers' order: negative rows first, then positive.
        let (all_states, all_pooled) = if guided {
            (Tensor::cat(&[Tensor::cat(&neg_states, 0)?, states.clone()], 0)?, Tensor::cat(&[Tensor::cat(&neg_pooled, 0)?, pooled.clone()], 0)?)
        } else {
            (states.clone(), pooled.clone())
        };
        timings.text_encode = t0.elapsed();

        let t1 = Instant::now();
        let timesteps = scheduler.timesteps().to_vec();
        let mut no_noise = SeededNoise::new(0);
        for (i, &t) in timesteps.iter().enumerate().skip(start) {
            let input = if guided { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
            let ts = Tensor::full(t as f32, input.dim(0)?, &self.device)?;
            let pred = self.transformer.forward(&MmditInputs { x: &input, timesteps: &ts, pooled: &all_pooled, context: &all_states, skip_layers: &[] })?;
            let pred = if guided {
                let (uncond, cond) = (pred.narrow(0, 0, rows)?, pred.narrow(0, rows, rows)?);
                let mut guided_pred = (&uncond + ((&cond - &uncond)? * first.guidance)?)?;
                if let Some(slg) = first.skip_layer_guidance.as_ref().filter(|s| s.applies(i, timesteps.len())) {
                    let ts = Tensor::full(t as f32, rows, &self.device)?;
                    let skipped = self.transformer.forward(&MmditInputs { x: &latents, timesteps: &ts, pooled: &pooled, context: &states, skip_layers: &slg.layers })?;
                    guided_pred = (guided_pred + ((&cond - skipped)? * slg.scale)?)?;
                }
                guided_pred
            } else {
                pred
            };
            latents = scheduler.step(&pred, i, &latents, &mut no_noise as &mut dyn NoiseSource)?;
            if !on_step(&crate::preview::Step::new(i + 1 - start, timesteps.len() - start, &latents, &crate::preview::SD3)) {
                return Err(EngineError::Canceled);
            }
        }
        timings.denoise = t1.elapsed();
        timings.full_steps = timesteps.len() - start;

        let t2 = Instant::now();
        let decoded = self.vae.decode(&latents)?;
        timings.decode = t2.elapsed();
        split_batch(items, &truncated, &latents, &decoded, SchedulerKind::FlowMatchEuler, &timings)
    }

    /// The transformer (for benchmarks and component tests).
    pub fn transformer(&self) -> &Mmdit {
        &self.transformer
    }
}
