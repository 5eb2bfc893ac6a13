//! `POST /v1/images/generations`: OpenAI's request shape plus easel's own fields.

use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::job::JobSpec;

/// How images come back.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ResponseFormat {
    #[default]
    B64Json,
    Url,
}

/// Image container format.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    #[default]
    Png,
    Jpeg,
    Webp,
}

impl OutputFormat {
    pub fn extension(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpeg",
            Self::Webp => "webp",
        }
    }

    pub fn mime(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
            Self::Webp => "image/webp",
        }
    }
}

/// The request body. Unknown fields are rejected so that typos do not pass silently.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ImageRequest {
    pub prompt: String,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub n: Option<i64>,
    #[serde(default)]
    pub size: Option<String>,
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
    #[serde(default)]
    pub output_format: Option<OutputFormat>,
    #[serde(default)]
    pub output_compression: Option<i64>,
    #[serde(default)]
    pub quality: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    /// Accepted for OpenAI compatibility; easel has no moderation, style or background options.
    #[serde(default)]
    pub style: Option<String>,
    #[serde(default)]
    pub moderation: Option<String>,
    #[serde(default)]
    pub background: Option<String>,
    // easel's own fields
    #[serde(default)]
    pub negative_prompt: Option<String>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub steps: Option<i64>,
    #[serde(default)]
    pub guidance_scale: Option<f64>,
    #[serde(default)]
    pub scheduler: Option<String>,
    #[serde(default)]
    pub priority: Option<i32>,
    /// Where to POST the job's final state (signed with HMAC-SHA256).
    #[serde(default)]
    pub webhook_url: Option<String>,
    /// Routing hint: `auto` (default), `local`, or a configured provider's name.
    #[serde(default)]
    pub route: Option<String>,
    /// `private`: the request never leaves the local engines (a hard guarantee); `standard`.
    #[serde(default)]
    pub privacy: Option<String>,
    /// A routing tier from the config (e.g. hero, standard, draft).
    #[serde(default)]
    pub tier: Option<String>,
    /// Send a `preview` event (a small picture of the image so far) every this many steps.
    #[serde(default)]
    pub preview_every: Option<i64>,
    /// SD 3.5: skip-layer guidance over these transformer blocks (diffusers'
    /// `skip_guidance_layers`, e.g. [7, 8, 9] for 3.5 medium).
    #[serde(default)]
    pub skip_guidance_layers: Option<Vec<i64>>,
    /// Skip-layer guidance scale (default 2.8, as diffusers).
    #[serde(default)]
    pub skip_layer_guidance_scale: Option<f64>,
    /// Skip-layer guidance runs on steps after this fraction of them (default 0.01)...
    #[serde(default)]
    pub skip_layer_guidance_start: Option<f64>,
    /// ...and before this one (default 0.2).
    #[serde(default)]
    pub skip_layer_guidance_stop: Option<f64>,
    /// A LoRA stack: `[{"name": REGISTRY_NAME, "scale": 0.8}, ...]`, applied in order.
    #[serde(default)]
    pub loras: Option<Vec<crate::LoraRef>>,
    /// Image-to-image: the picture to start from, base64 or a `data:image/...;base64,` URL
    /// (PNG, JPEG or WebP, at most 4096x4096). The result has its size unless `size` is given,
    /// in which case it is resized to that.
    #[serde(default)]
    pub image: Option<String>,
    /// Image-to-image: how much of the picture is repainted, 0 to 1 (default 0.8, or 1 with a
    /// mask), as diffusers' `strength`.
    #[serde(default)]
    pub strength: Option<f64>,
    /// Inpainting: a mask the picture's size, base64 or a data URL; white is repainted, black
    /// kept (as diffusers).
    #[serde(default)]
    pub mask: Option<String>,
    /// Step caching: `none`, `deepcache[:INTERVAL]` (SD, SDXL) or `fbcache[:THRESHOLD]`
    /// (FLUX); absent takes the model's default (`easel.json`'s `cache`, else none).
    #[serde(default)]
    pub cache: Option<String>,
    /// ControlNets (SD 1.x/2.x, SDXL and FLUX): `[{"name": REGISTRY_NAME, "image": BASE64,
    /// "scale": 1, "start": 0, "end": 1, "preprocess": "canny", "mode": 0}]` (`mode`: a Union
    /// FLUX ControlNet's control type); their residuals add up.
    #[serde(default)]
    pub controlnets: Option<Vec<crate::ControlNetRef>>,
    /// An IP-Adapter (SD 1.x/2.x and SDXL): `{"name": REGISTRY_NAME, "image": BASE64,
    /// "scale": 1}`; the picture steers the image as a prompt does.
    #[serde(default)]
    pub ip_adapter: Option<crate::IpAdapterRef>,
}

impl ImageRequest {
    /// Whether the request asked for `privacy: "private"`; other values than private and
    /// standard are refused.
    pub fn is_private(&self) -> Result<bool, ApiError> {
        match self.privacy.as_deref() {
            None | Some("standard") => Ok(false),
            Some("private") => Ok(true),
            Some(p) => Err(ApiError::invalid("privacy", format!("privacy must be private or standard, got `{p}`"))),
        }
    }
}

impl ImageRequest {
    /// The request's control pictures, decoded (after checking the model takes ControlNets and
    /// how many there are), or a 400 naming `controlnets`.
    fn control_pictures(&self, model: &ModelInfo) -> Result<Vec<crate::InputImage>, ApiError> {
        let list = self.controlnets.as_deref().unwrap_or_default();
        if list.is_empty() {
            return Ok(vec![]);
        }
        if model.controlnet_family.is_none() {
            return Err(ApiError::invalid("controlnets", format!("`{}` does not take ControlNets (they run on local Stable Diffusion 1.x/2.x, SDXL and FLUX models)", model.id)));
        }
        if list.len() > crate::MAX_CONTROLNETS {
            return Err(ApiError::invalid("controlnets", format!("at most {} ControlNets may be stacked, got {}", crate::MAX_CONTROLNETS, list.len())));
        }
        list.iter().map(|c| crate::decode_base64_image("controlnets", &c.image)).collect()
    }

    /// The request's ControlNets prepared for the job, their pictures at its size.
    fn controlnets(&self, pictures: Vec<crate::InputImage>, width: usize, height: usize) -> Result<Vec<crate::ControlNetSpec>, ApiError> {
        let list = self.controlnets.as_deref().unwrap_or_default();
        list.iter().zip(pictures).map(|(c, picture)| c.to_spec(picture, width as u32, height as u32)).collect()
    }
}

/// What the server knows about a servable model, for validation and `/v1/models`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelInfo {
    pub id: String,
    pub default_steps: usize,
    pub default_guidance: f64,
    pub default_size: usize,
    pub max_side: usize,
    /// Width and height must be multiples of this (8 for SD, 16 for FLUX).
    #[serde(default = "default_size_multiple")]
    pub size_multiple: usize,
    /// The pictures the model takes besides the prompt.
    #[serde(default, skip_serializing_if = "ImageInputs::is_none")]
    pub image_inputs: ImageInputs,
    pub schedulers: Vec<String>,
    /// The scheduler a request without one runs (`None` for closed providers), so limits that
    /// belong to a scheduler hold for requests that do not name it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_scheduler: Option<String>,
    /// What one request needs in memory on the workers serving this model; `None` for closed
    /// providers (their memory is not ours).
    #[serde(default)]
    pub memory: Option<MemoryEstimate>,
    /// Served by a closed provider: `quality` and `style` are the vendor's words, passed on.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub closed: bool,
    /// SD 3.5: the transformer's block count, which skip-layer guidance may skip; `None` for
    /// models without skip-layer guidance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skippable_layers: Option<usize>,
    /// The step cache this model takes (`deepcache` for UNets, `fbcache` for FLUX); `None`
    /// for models without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_kind: Option<String>,
    /// The step cache a request without `cache` runs (`easel.json`'s `cache`), e.g.
    /// `deepcache:3`; `None`: no caching unless asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_cache: Option<String>,
    /// What an IP-Adapter must fit to run on this model (`None`: it takes none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_adapter_fit: Option<crate::IpAdapterFit>,
    /// The ControlNets this model takes: those trained for this family (`None`: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controlnet_family: Option<crate::ControlNetFamily>,
}

/// What pictures a model takes besides the prompt.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ImageInputs {
    /// The prompt only (closed providers, as easel routes them).
    #[default]
    None,
    /// A picture to start from (image-to-image).
    Image,
    /// A picture, and a mask to inpaint within (Stable Diffusion).
    ImageAndMask,
    /// An inpainting model: a picture and a mask, always.
    MaskRequired,
}

impl ImageInputs {
    pub fn is_none(&self) -> bool {
        *self == Self::None
    }
}

fn default_size_multiple() -> usize {
    8
}

/// A local model's memory per request, so the gateway refuses a request no worker can hold
/// with a 400 naming `size` or `n`, instead of queueing a job that aborts the worker that
/// takes it (and the next, and the next).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryEstimate {
    /// Bytes per output pixel of each image in the denoising batch (all `n` images at once).
    pub denoise_bytes_per_pixel: u64,
    /// Bytes per output pixel of decoding one image (images are decoded one at a time).
    pub decode_bytes_per_pixel: u64,
    /// Bytes independent of the request: the weights and fixed working buffers.
    pub fixed_bytes: u64,
    /// What a worker may spend on one request.
    pub budget_bytes: u64,
}

impl MemoryEstimate {
    /// Estimated bytes for `n` images of `width` x `height`.
    pub fn request_bytes(&self, width: usize, height: usize, n: usize) -> u64 {
        let pixels = (width as u64).saturating_mul(height as u64);
        let denoise = pixels.saturating_mul(n as u64).saturating_mul(self.denoise_bytes_per_pixel);
        self.fixed_bytes.saturating_add(denoise).saturating_add(pixels.saturating_mul(self.decode_bytes_per_pixel))
    }

    /// Refuses what cannot fit: naming `size` when one image is already too much, else `n`.
    pub fn check(&self, width: usize, height: usize, n: usize) -> Result<(), ApiError> {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let one = self.request_bytes(width, height, 1);
        if one > self.budget_bytes {
            return Err(ApiError::invalid(
                "size",
                format!("size {width}x{height} needs about {:.1} GiB, over the {:.1} GiB a request may use here; ask for a smaller size", gib(one), gib(self.budget_bytes)),
            ));
        }
        let all = self.request_bytes(width, height, n);
        if all > self.budget_bytes {
            let fits = (1..n).rev().find(|&k| self.request_bytes(width, height, k) <= self.budget_bytes).unwrap_or(1);
            return Err(ApiError::invalid(
                "n",
                format!("n={n} at {width}x{height} needs about {:.1} GiB, over the {:.1} GiB a request may use here; at most n={fits} fits", gib(all), gib(self.budget_bytes)),
            ));
        }
        Ok(())
    }
}

const MAX_PROMPT_CHARS: usize = 32_000;
/// OpenAI's `user` is an end-user id, not text.
const MAX_USER_CHARS: usize = 256;
/// Names and hints (model, size, scheduler, quality, route, tier, privacy, OpenAI's style,
/// moderation and background): longer ones are never valid, and are refused before routing.
const MAX_NAME_CHARS: usize = 256;
/// URLs (webhook_url).
const MAX_URL_CHARS: usize = 2048;

impl ImageRequest {
    /// Checks every field and resolves defaults; `pick_seed` supplies a seed when none is given.
    pub fn validate(&self, model: &ModelInfo, pick_seed: impl FnOnce() -> u64) -> Result<(JobSpec, ResponseFormat), ApiError> {
        self.check_lengths()?;
        if self.prompt.trim().is_empty() {
            return Err(ApiError::invalid("prompt", "prompt must not be empty"));
        }
        if self.prompt.len() > MAX_PROMPT_CHARS {
            return Err(ApiError::invalid("prompt", format!("prompt is longer than {MAX_PROMPT_CHARS} characters")));
        }
        if self.negative_prompt.as_ref().is_some_and(|p| p.len() > MAX_PROMPT_CHARS) {
            return Err(ApiError::invalid("negative_prompt", format!("negative_prompt is longer than {MAX_PROMPT_CHARS} characters")));
        }
        if self.user.as_ref().is_some_and(|u| u.len() > MAX_USER_CHARS) {
            return Err(ApiError::invalid("user", format!("user is longer than {MAX_USER_CHARS} characters")));
        }
        let n = self.n.unwrap_or(1);
        if !(1..=10).contains(&n) {
            return Err(ApiError::invalid("n", format!("n must be between 1 and 10, got {n}")));
        }
        let image = self.image.as_deref().map(|text| crate::decode_base64_image("image", text)).transpose()?;
        let control_pictures = self.control_pictures(model)?;
        let multiple = model.size_multiple.max(1);
        // Without `size`: the input picture's size, else the first control picture's (as
        // diffusers' ControlNet pipelines take it), else the model's default.
        let (width, height) = match (self.size.as_deref(), &image, control_pictures.first()) {
            (None | Some("auto"), Some(image), _) => image_size("image", image, model)?,
            (None | Some("auto"), None, Some(control)) => image_size("controlnets", control, model)?,
            (None | Some("auto"), None, None) => (model.default_size, model.default_size),
            (Some(s), _, _) => parse_size(s, model.max_side, multiple)?,
        };
        if let Some(memory) = &model.memory {
            memory.check(width, height, n as usize).map_err(|e| match (&image, self.size.as_deref()) {
                // The size came from the picture: say so.
                (Some(_), None | Some("auto")) if e.body.param.as_deref() == Some("size") => ApiError::invalid("image", e.body.message.replace("size ", "the image's size ")),
                _ => e,
            })?;
        }
        let quality_steps = match self.quality.as_deref() {
            None | Some("auto") | Some("standard") | Some("medium") => model.default_steps,
            Some("low") => model.default_steps.div_ceil(2),
            Some("high") | Some("hd") => (model.default_steps * 3).div_ceil(2),
            Some(_) if model.closed => model.default_steps,
            Some(q) => return Err(ApiError::invalid("quality", format!("quality must be low, medium, high or auto, got `{q}`"))),
        };
        let steps = match self.steps {
            None => quality_steps,
            Some(s) if (1..=1000).contains(&s) => s as usize,
            Some(s) => return Err(ApiError::invalid("steps", format!("steps must be between 1 and 1000, got {s}"))),
        };
        let guidance = self.guidance_scale.unwrap_or(model.default_guidance);
        if !guidance.is_finite() || !(0.0..=100.0).contains(&guidance) {
            return Err(ApiError::invalid("guidance_scale", "guidance_scale must be a number between 0 and 100"));
        }
        // LCMScheduler picks its steps from the distillation's 50 (diffusers refuses more), named
        // or the model's own (LCM-distilled models).
        if self.scheduler.as_deref().or(model.default_scheduler.as_deref()) == Some("lcm") && steps > LCM_MAX_STEPS {
            return Err(ApiError::invalid("steps", format!("the lcm scheduler runs at most {LCM_MAX_STEPS} steps (its distillation schedule's), got {steps}")));
        }
        if let Some(s) = &self.scheduler {
            if !model.schedulers.iter().any(|k| k == s) {
                return Err(ApiError::invalid("scheduler", format!("unknown scheduler `{s}`; expected one of {}", model.schedulers.join(", "))));
            }
        }
        let output_compression = match self.output_compression {
            None => None,
            Some(c) if (0..=100).contains(&c) => Some(c as u8),
            Some(c) => return Err(ApiError::invalid("output_compression", format!("output_compression must be between 0 and 100, got {c}"))),
        };
        let priority = self.priority.unwrap_or(0);
        if !(-100..=100).contains(&priority) {
            return Err(ApiError::invalid("priority", "priority must be between -100 and 100"));
        }
        if let Some(seed) = self.seed {
            if seed >= 1 << 53 {
                return Err(ApiError::invalid("seed", "seed must be below 2^53"));
            }
        }
        let preview_every = match self.preview_every {
            None | Some(0) => None,
            Some(k) if (1..=1000).contains(&k) => Some(k as usize),
            Some(k) => return Err(ApiError::invalid("preview_every", format!("preview_every must be between 0 (none) and 1000 steps, got {k}"))),
        };
        let loras = self.loras.clone().unwrap_or_default();
        crate::validate_loras(&loras)?;
        let skip_layer_guidance = self.skip_layer_guidance()?;
        if let Some(g) = &skip_layer_guidance {
            match model.skippable_layers {
                None => return Err(ApiError::invalid("skip_guidance_layers", format!("skip-layer guidance is for SD 3.5 models; `{}` is not one", model.id))),
                Some(n) => {
                    if let Some(bad) = g.layers.iter().find(|&&l| l >= n) {
                        return Err(ApiError::invalid("skip_guidance_layers", format!("layer {bad} does not exist; `{}` has layers 0 to {}", model.id, n.saturating_sub(1))));
                    }
                }
            }
        }
        let mut step_cache = self.step_cache(model)?;
        let controlnets = self.controlnets(control_pictures, width, height)?;
        if !controlnets.is_empty() {
            if self.cache.as_deref().is_some_and(|c| c.trim() != "none") {
                return Err(ApiError::invalid("cache", "step caching does not run with ControlNets (their residuals change every step)"));
            }
            // The model's default cache gives way to the ControlNets.
            step_cache = None;
        }
        let ip_adapter = match &self.ip_adapter {
            Some(_) if model.ip_adapter_fit.is_none() => {
                return Err(ApiError::invalid("ip_adapter", format!("`{}` does not take IP-Adapters (they run on local Stable Diffusion 1.x/2.x and SDXL models)", model.id)))
            }
            Some(r) => Some(r.to_spec()?),
            None => None,
        };
        let mask = self.mask.as_deref().map(|text| crate::decode_base64_image("mask", text)).transpose()?;
        let init_image = match image {
            Some(image) => {
                match (model.image_inputs, &mask) {
                    (ImageInputs::None, _) => return Err(ApiError::invalid("image", format!("`{}` does not take an input image", model.id))),
                    (ImageInputs::Image, Some(_)) => return Err(ApiError::invalid("mask", format!("`{}` does not inpaint; send the image without a mask", model.id))),
                    (ImageInputs::MaskRequired, None) => return Err(ApiError::invalid("mask", format!("`{}` is an inpainting model: send a mask with the image", model.id))),
                    _ => {}
                }
                if let Some(m) = &mask {
                    if (m.width(), m.height()) != (image.width(), image.height()) {
                        return Err(ApiError::invalid("mask", format!("mask is {}x{}, the image {}x{}: they must be the same size", m.width(), m.height(), image.width(), image.height())));
                    }
                }
                let strength = self.strength.unwrap_or(default_strength(mask.is_some()));
                if !strength.is_finite() || !(0.0..=1.0).contains(&strength) {
                    return Err(ApiError::invalid("strength", format!("strength must be between 0 and 1, got {strength}")));
                }
                // At least one whole step must run, however the model's family rounds.
                if (steps as f64 * strength) < 1.0 {
                    return Err(ApiError::invalid("strength", format!("strength {strength} with {steps} steps leaves no step to run; raise strength or steps")));
                }
                let mask_png_base64 = mask.map(|m| m.resized(width as u32, height as u32).to_base64_png());
                Some(crate::InitImageSpec { png_base64: image.resized(width as u32, height as u32).to_base64_png(), strength, mask_png_base64 })
            }
            None if self.strength.is_some() => return Err(ApiError::invalid("strength", "strength needs an image to start from")),
            None if self.mask.is_some() => return Err(ApiError::invalid("mask", "a mask needs the image it masks")),
            None if model.image_inputs == ImageInputs::MaskRequired => {
                return Err(ApiError::invalid("image", format!("`{}` is an inpainting model: send an image and a mask", model.id)))
            }
            None => None,
        };
        let spec = JobSpec {
            model: model.id.clone(),
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            width,
            height,
            n: n as usize,
            steps,
            guidance,
            seed: self.seed.unwrap_or_else(pick_seed),
            seed_explicit: self.seed.is_some(),
            scheduler: self.scheduler.clone(),
            output_format: self.output_format.unwrap_or_default(),
            output_compression,
            priority,
            user: self.user.clone(),
            webhook_url: self.webhook_url.clone(),
            loras,
            private: self.is_private()?,
            route: None,
            preview_every,
            webhook_format: None,
            skip_layer_guidance,
            init_image,
            step_cache,
            controlnets,
            ip_adapter,
        };
        Ok((spec, self.response_format.unwrap_or_default()))
    }

    /// The step cache the job runs: the request's `cache`, else the model's default; refused
    /// when the model takes another kind or none.
    fn step_cache(&self, model: &ModelInfo) -> Result<Option<crate::StepCache>, ApiError> {
        let Some(text) = self.cache.as_deref() else {
            // A default the server itself advertises was checked when the model was loaded.
            return Ok(model.default_cache.as_deref().and_then(|d| crate::StepCache::parse(d).ok().flatten()));
        };
        let Some(cache) = crate::StepCache::parse(text).map_err(|m| ApiError::invalid("cache", m))? else {
            return Ok(None);
        };
        match model.cache_kind.as_deref() {
            Some(kind) if kind == cache.kind() => Ok(Some(cache)),
            Some(kind) => Err(ApiError::invalid("cache", format!("`{}` takes the {kind} step cache, not {}", model.id, cache.kind()))),
            None if model.closed => Err(ApiError::invalid("cache", format!("`{}` is a closed provider's model; step caching is for local models", model.id))),
            None => Err(ApiError::invalid("cache", format!("`{}` has no step cache (deepcache is for SD and SDXL, fbcache for FLUX)", model.id))),
        }
    }

    /// The skip-layer guidance fields, checked; the scale and window need the layers.
    fn skip_layer_guidance(&self) -> Result<Option<crate::SkipLayerGuidance>, ApiError> {
        let fraction = |name: &str, v: Option<f64>, default: f64| -> Result<f64, ApiError> {
            match v {
                None => Ok(default),
                Some(f) if f.is_finite() && (0.0..=1.0).contains(&f) => Ok(f),
                Some(f) => Err(ApiError::invalid(name, format!("{name} must be a fraction of the steps between 0 and 1, got {f}"))),
            }
        };
        let Some(layers) = &self.skip_guidance_layers else {
            for (name, set) in [
                ("skip_layer_guidance_scale", self.skip_layer_guidance_scale.is_some()),
                ("skip_layer_guidance_start", self.skip_layer_guidance_start.is_some()),
                ("skip_layer_guidance_stop", self.skip_layer_guidance_stop.is_some()),
            ] {
                if set {
                    return Err(ApiError::invalid(name, format!("{name} needs skip_guidance_layers (the layers to skip)")));
                }
            }
            return Ok(None);
        };
        if layers.is_empty() || layers.len() > 100 || layers.iter().any(|l| !(0..1000).contains(l)) {
            return Err(ApiError::invalid("skip_guidance_layers", "skip_guidance_layers must list 1 to 100 layer indices, each from 0 to 999"));
        }
        let scale = self.skip_layer_guidance_scale.unwrap_or(2.8);
        if !scale.is_finite() || !(0.0..=100.0).contains(&scale) {
            return Err(ApiError::invalid("skip_layer_guidance_scale", "skip_layer_guidance_scale must be a number between 0 and 100"));
        }
        Ok(Some(crate::SkipLayerGuidance {
            layers: layers.iter().map(|&l| l as usize).collect(),
            scale,
            start: fraction("skip_layer_guidance_start", self.skip_layer_guidance_start, 0.01)?,
            stop: fraction("skip_layer_guidance_stop", self.skip_layer_guidance_stop, 0.2)?,
        }))
    }
}

impl ImageRequest {
    /// Every text field within its cap, naming the first one that is not.
    pub fn check_lengths(&self) -> Result<(), ApiError> {
        let names = [
            ("model", &self.model),
            ("size", &self.size),
            ("scheduler", &self.scheduler),
            ("quality", &self.quality),
            ("route", &self.route),
            ("tier", &self.tier),
            ("privacy", &self.privacy),
            ("style", &self.style),
            ("moderation", &self.moderation),
            ("background", &self.background),
        ];
        for (field, value) in names {
            if value.as_ref().is_some_and(|v| v.len() > MAX_NAME_CHARS) {
                return Err(ApiError::invalid(field, format!("{field} is longer than {MAX_NAME_CHARS} characters")));
            }
        }
        if self.webhook_url.as_ref().is_some_and(|u| u.len() > MAX_URL_CHARS) {
            return Err(ApiError::invalid("webhook_url", format!("webhook_url is longer than {MAX_URL_CHARS} characters")));
        }
        Ok(())
    }
}

/// diffusers' default `strength`: 1 for inpainting (StableDiffusionInpaintPipeline: the masked
/// region from pure noise), 0.8 for image-to-image (StableDiffusionImg2ImgPipeline).
pub fn default_strength(masked: bool) -> f64 {
    if masked {
        1.0
    } else {
        0.8
    }
}
/// LCMScheduler's default `original_inference_steps`: its schedule has no more steps.
const LCM_MAX_STEPS: usize = 50;

/// The size an input image gives a request without `size`: its own, rounded down to the model's
/// multiple, as diffusers' image processor does.
fn image_size(param: &str, image: &crate::InputImage, model: &ModelInfo) -> Result<(usize, usize), ApiError> {
    let multiple = model.size_multiple.max(1);
    let (w, h) = (image.width() as usize / multiple * multiple, image.height() as usize / multiple * multiple);
    if w == 0 || h == 0 || w > model.max_side || h > model.max_side {
        return Err(ApiError::invalid(
            param,
            format!("{param}: the picture is {}x{}; without `size` it must be {multiple} to {} pixels on each side for this model (give `size` to resize it)", image.width(), image.height(), model.max_side),
        ));
    }
    Ok((w, h))
}

fn parse_size(s: &str, max_side: usize, multiple: usize) -> Result<(usize, usize), ApiError> {
    let bad = || ApiError::invalid("size", format!("size must be WIDTHxHEIGHT with multiples of {multiple} up to {max_side} for this model, got `{s}`"));
    let (w, h) = s.split_once('x').ok_or_else(bad)?;
    let (w, h): (usize, usize) = (w.parse().map_err(|_| bad())?, h.parse().map_err(|_| bad())?);
    if w == 0 || h == 0 || w % multiple != 0 || h % multiple != 0 || w > max_side || h > max_side {
        return Err(bad());
    }
    Ok((w, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> ModelInfo {
        ModelInfo { id: "m".into(), default_steps: 20, default_guidance: 4.0, default_size: 64, max_side: 1024, size_multiple: 8, schedulers: vec!["euler".into()], default_scheduler: None, memory: None, closed: false, skippable_layers: None, cache_kind: None, default_cache: None, image_inputs: ImageInputs::None, controlnet_family: None, ip_adapter_fit: None }
    }

    fn req(v: serde_json::Value) -> Result<ImageRequest, serde_json::Error> {
        serde_json::from_value(v)
    }

    #[test]
    fn cache_takes_the_models_own_kind_its_default_and_none_and_changes_the_keys() {
        use crate::StepCache;
        let sd = ModelInfo { cache_kind: Some("deepcache".into()), default_cache: Some("deepcache:2".into()), ..model() };
        let run = |body: serde_json::Value, m: &ModelInfo| req(body).unwrap().validate(m, || 7).map(|(s, _)| s);
        assert_eq!(run(serde_json::json!({"prompt": "x"}), &sd).unwrap().step_cache, Some(StepCache::DeepCache { interval: 2 }), "the model's default");
        assert_eq!(run(serde_json::json!({"prompt": "x", "cache": "none"}), &sd).unwrap().step_cache, None, "none turns the default off");
        let asked = run(serde_json::json!({"prompt": "x", "cache": "deepcache", "seed": 1}), &sd).unwrap();
        assert_eq!(asked.step_cache, Some(StepCache::DeepCache { interval: 3 }));
        let plain = run(serde_json::json!({"prompt": "x", "cache": "none", "seed": 1}), &sd).unwrap();
        assert_ne!(asked.batch_key(), plain.batch_key(), "cached and uncached jobs never share a batch");
        assert_ne!(asked.cache_key("m"), plain.cache_key("m"), "nor a cached result");
        let flux = ModelInfo { cache_kind: Some("fbcache".into()), ..model() };
        let closed = ModelInfo { closed: true, ..model() };
        for (body, m, words) in [
            (serde_json::json!({"prompt": "x", "cache": "fbcache"}), &sd, "deepcache"),
            (serde_json::json!({"prompt": "x", "cache": "deepcache:2"}), &flux, "fbcache"),
            (serde_json::json!({"prompt": "x", "cache": "deepcache"}), &model(), "no step cache"),
            (serde_json::json!({"prompt": "x", "cache": "fbcache"}), &closed, "closed provider"),
            (serde_json::json!({"prompt": "x", "cache": "deepcache:0"}), &sd, "1 to 50"),
            (serde_json::json!({"prompt": "x", "cache": "teacache"}), &flux, "deepcache[:INTERVAL]"),
        ] {
            let e = run(body.clone(), m).unwrap_err();
            assert_eq!(e.body.param.as_deref(), Some("cache"), "{body}");
            assert!(e.body.message.contains(words), "{body}: {}", e.body.message);
        }
        // A job spec carries the cache through the queue as its one-string form.
        let json = serde_json::to_value(&asked).unwrap();
        assert_eq!(json["step_cache"], "deepcache:3");
        assert_eq!(serde_json::from_value::<JobSpec>(json).unwrap(), asked);
    }

    #[test]
    fn defaults_and_quality_presets() {
        let (s, f) = req(serde_json::json!({"prompt": "x"})).unwrap().validate(&model(), || 7).unwrap();
        assert_eq!((s.width, s.height, s.steps, s.n, s.seed, s.seed_explicit), (64, 64, 20, 1, 7, false));
        assert_eq!(f, ResponseFormat::B64Json);
        let (s, _) = req(serde_json::json!({"prompt": "x", "quality": "low"})).unwrap().validate(&model(), || 7).unwrap();
        assert_eq!(s.steps, 10);
        let (s, _) = req(serde_json::json!({"prompt": "x", "quality": "high", "seed": 3})).unwrap().validate(&model(), || 7).unwrap();
        assert_eq!((s.steps, s.seed, s.seed_explicit), (30, 3, true));
    }

    #[test]
    fn skip_layer_guidance_needs_an_sd35_model_layers_it_has_and_fractions() {
        let sd35 = ModelInfo { skippable_layers: Some(24), ..model() };
        let (s, _) = req(serde_json::json!({"prompt": "x", "skip_guidance_layers": [7, 8, 9]})).unwrap().validate(&sd35, || 1).unwrap();
        assert_eq!(s.skip_layer_guidance, Some(crate::SkipLayerGuidance { layers: vec![7, 8, 9], scale: 2.8, start: 0.01, stop: 0.2 }), "diffusers' defaults");
        let cases = [
            (serde_json::json!({"prompt": "x", "skip_guidance_layers": [24]}), &sd35, "skip_guidance_layers"),
            (serde_json::json!({"prompt": "x", "skip_guidance_layers": []}), &sd35, "skip_guidance_layers"),
            (serde_json::json!({"prompt": "x", "skip_guidance_layers": [7], "skip_layer_guidance_stop": 1.5}), &sd35, "skip_layer_guidance_stop"),
            (serde_json::json!({"prompt": "x", "skip_layer_guidance_scale": 3.0}), &sd35, "skip_layer_guidance_scale"),
        ];
        for (body, m, param) in cases {
            let e = req(body.clone()).unwrap().validate(m, || 1).unwrap_err();
            assert_eq!((e.status, e.body.param.as_deref()), (400, Some(param)), "{body}");
        }
        let e = req(serde_json::json!({"prompt": "x", "skip_guidance_layers": [1]})).unwrap().validate(&model(), || 1).unwrap_err();
        assert!(e.body.message.contains("SD 3.5"), "{}", e.body.message);
    }

    #[test]
    fn every_bad_parameter_is_named() {
        let cases = [
            (serde_json::json!({"prompt": ""}), "prompt"),
            (serde_json::json!({"prompt": "x", "n": 0}), "n"),
            (serde_json::json!({"prompt": "x", "n": 11}), "n"),
            (serde_json::json!({"prompt": "x", "size": "100x100"}), "size"),
            (serde_json::json!({"prompt": "x", "size": "big"}), "size"),
            (serde_json::json!({"prompt": "x", "size": "4096x4096"}), "size"),
            (serde_json::json!({"prompt": "x", "steps": 0}), "steps"),
            (serde_json::json!({"prompt": "x", "steps": 1001}), "steps"),
            (serde_json::json!({"prompt": "x", "quality": "ultra"}), "quality"),
            (serde_json::json!({"prompt": "x", "guidance_scale": -1.0}), "guidance_scale"),
            (serde_json::json!({"prompt": "x", "scheduler": "plms"}), "scheduler"),
            (serde_json::json!({"prompt": "x", "output_compression": 101}), "output_compression"),
            (serde_json::json!({"prompt": "x", "priority": 1000}), "priority"),
        ];
        for (body, param) in cases {
            let e = req(body.clone()).unwrap().validate(&model(), || 1).unwrap_err();
            assert_eq!((e.status, e.body.param.as_deref()), (400, Some(param)), "{body}");
        }
        assert!(req(serde_json::json!({"prompt": "x", "bogus": 1})).is_err());
        assert!(req(serde_json::json!({"prompt": 5})).is_err());
    }

    #[test]
    fn requests_over_the_memory_budget_are_refused_naming_size_or_n() {
        // 1 KiB per pixel per image denoising, 2 KiB per pixel decoding, 1 MiB fixed, 2 GiB budget.
        let memory = MemoryEstimate { denoise_bytes_per_pixel: 1024, decode_bytes_per_pixel: 2048, fixed_bytes: 1 << 20, budget_bytes: 2 << 30 };
        let m = ModelInfo { memory: Some(memory), ..model() };
        let ok = |body: serde_json::Value| req(body).unwrap().validate(&m, || 1);
        assert!(ok(serde_json::json!({"prompt": "x", "size": "512x512", "n": 4})).is_ok());
        let e = ok(serde_json::json!({"prompt": "x", "size": "1024x1024"})).unwrap_err();
        assert_eq!((e.status, e.body.param.as_deref()), (400, Some("size")), "{}", e.body.message);
        let e = ok(serde_json::json!({"prompt": "x", "size": "512x512", "n": 10})).unwrap_err();
        assert_eq!((e.status, e.body.param.as_deref()), (400, Some("n")));
        // At 512x512: 1 MiB + 512 MiB decoding + 256 MiB per image denoising, so 5 images fit in 2 GiB.
        assert!(e.body.message.contains("at most n=5 fits"), "{}", e.body.message);
        assert_eq!(memory.request_bytes(512, 512, 2), (1 << 20) + 262_144 * (2 * 1024 + 2048));
    }

    #[test]
    fn text_fields_are_capped() {
        let long = "x".repeat(MAX_PROMPT_CHARS + 1);
        for (body, param) in [
            (serde_json::json!({"prompt": long}), "prompt"),
            (serde_json::json!({"prompt": "x", "negative_prompt": long}), "negative_prompt"),
            (serde_json::json!({"prompt": "x", "user": "u".repeat(MAX_USER_CHARS + 1)}), "user"),
        ] {
            let e = req(body).unwrap().validate(&model(), || 1).unwrap_err();
            assert_eq!(e.body.param.as_deref(), Some(param));
        }
    }

    #[test]
    fn cache_key_needs_an_explicit_seed_and_covers_every_parameter() {
        let (a, _) = req(serde_json::json!({"prompt": "x", "seed": 1})).unwrap().validate(&model(), || 1).unwrap();
        let (b, _) = req(serde_json::json!({"prompt": "x", "seed": 1, "steps": 21})).unwrap().validate(&model(), || 1).unwrap();
        let (c, _) = req(serde_json::json!({"prompt": "x"})).unwrap().validate(&model(), || 1).unwrap();
        assert!(a.cache_key("m@1").is_some());
        assert_ne!(a.cache_key("m@1"), b.cache_key("m@1"));
        assert_ne!(a.cache_key("m@1"), a.cache_key("m@2"));
        assert_eq!(c.cache_key("m@1"), None);
    }

    fn png_b64(width: u32, height: u32, value: u8) -> String {
        crate::InputImage::new(width, height, vec![value; (width * height * 3) as usize]).unwrap().to_base64_png()
    }

    #[test]
    fn the_lcm_step_cap_holds_for_models_whose_own_scheduler_is_lcm() {
        let distilled = ModelInfo { schedulers: vec!["euler".into(), "lcm".into()], default_scheduler: Some("lcm".into()), ..model() };
        let e = req(serde_json::json!({"prompt": "x", "steps": 60})).unwrap().validate(&distilled, || 7).unwrap_err();
        assert_eq!(e.body.param.as_deref(), Some("steps"), "{}", e.body.message);
        req(serde_json::json!({"prompt": "x", "steps": 60, "scheduler": "euler"})).unwrap().validate(&distilled, || 7).expect("euler has no cap");
        req(serde_json::json!({"prompt": "x", "steps": 50})).unwrap().validate(&distilled, || 7).expect("50 is the distillation's own");
    }

    #[test]
    fn pictures_set_size_strength_defaults_and_their_own_refusals() {
        let sd = ModelInfo { image_inputs: ImageInputs::ImageAndMask, ..model() };
        let image = png_b64(48, 36, 100);
        // The size comes from the picture, rounded down to the multiple; 0.8 without a mask, 1 with one.
        let (s, _) = req(serde_json::json!({"prompt": "x", "image": image})).unwrap().validate(&sd, || 7).unwrap();
        let init = s.init_image.unwrap();
        assert_eq!((s.width, s.height, init.strength, init.mask_png_base64.is_some()), (48, 32, 0.8, false));
        let (s, _) = req(serde_json::json!({"prompt": "x", "image": image, "mask": png_b64(48, 36, 255)})).unwrap().validate(&sd, || 7).unwrap();
        assert_eq!(s.init_image.unwrap().strength, 1.0, "inpainting defaults to 1, as diffusers");
        // A memory refusal for a size that came from the picture names the picture.
        let tight = ModelInfo { memory: Some(MemoryEstimate { denoise_bytes_per_pixel: 1 << 20, decode_bytes_per_pixel: 0, fixed_bytes: 0, budget_bytes: 1 << 30 }), ..sd.clone() };
        let e = req(serde_json::json!({"prompt": "x", "image": image})).unwrap().validate(&tight, || 7).unwrap_err();
        assert_eq!(e.body.param.as_deref(), Some("image"), "{}", e.body.message);
        for (body, param) in [
            (serde_json::json!({"prompt": "x", "image": image, "mask": png_b64(40, 36, 255)}), "mask"),
            (serde_json::json!({"prompt": "x", "mask": png_b64(48, 36, 255)}), "mask"),
            (serde_json::json!({"prompt": "x", "strength": 0.5}), "strength"),
            (serde_json::json!({"prompt": "x", "image": image, "strength": 0.01}), "strength"),
            (serde_json::json!({"prompt": "x", "scheduler": "lcm", "steps": 60}), "steps"),
        ] {
            let sd_lcm = ModelInfo { schedulers: vec!["euler".into(), "lcm".into()], ..sd.clone() };
            let e = req(body.clone()).unwrap().validate(&sd_lcm, || 7).unwrap_err();
            assert_eq!(e.body.param.as_deref(), Some(param), "{body}: {}", e.body.message);
        }
        // Models that take no picture, or no mask, or need one.
        let e = req(serde_json::json!({"prompt": "x", "image": image})).unwrap().validate(&model(), || 7).unwrap_err();
        assert_eq!(e.body.param.as_deref(), Some("image"));
        let flux = ModelInfo { image_inputs: ImageInputs::Image, ..model() };
        let e = req(serde_json::json!({"prompt": "x", "image": image, "mask": png_b64(48, 36, 255)})).unwrap().validate(&flux, || 7).unwrap_err();
        assert_eq!(e.body.param.as_deref(), Some("mask"));
        let inpainting = ModelInfo { image_inputs: ImageInputs::MaskRequired, ..model() };
        let e = req(serde_json::json!({"prompt": "x"})).unwrap().validate(&inpainting, || 7).unwrap_err();
        assert_eq!(e.body.param.as_deref(), Some("image"));
    }
}
