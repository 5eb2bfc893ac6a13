//! A model's defaults applied to a request, in one place for the CLI and the server.
//!
//! [`easel_engine::ModelDefaults`] reads them (`easel.json`, then the catalogue, then the
//! family); [`settings`] fills what a request left out; [`model_info`] tells the server the
//! same defaults, so the gateway's validation and the worker agree.

use easel_api::{ImageInputs, ModelInfo};
use easel_engine::{EngineError, Family, ModelDefaults, Pipeline, SchedulerKind, StepCache};

/// What a request asked for; `None` takes the model's default.
#[derive(Debug, Clone, Default)]
pub struct Requested {
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub scheduler: Option<String>,
    pub negative_prompt: Option<String>,
    /// `cache` as the request spells it (`none` turns off a model's default).
    pub cache: Option<String>,
}

/// What a request runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub steps: usize,
    pub guidance: f64,
    /// `None`: the pipeline's own scheduler (from its `scheduler/` config).
    pub scheduler: Option<SchedulerKind>,
    pub negative_prompt: Option<String>,
    pub step_cache: Option<StepCache>,
}

/// Steps when neither the request nor any default says (diffusers' default).
const FALLBACK_STEPS: usize = 30;
/// Guidance when neither the request nor any default says (diffusers' SD default).
const FALLBACK_GUIDANCE: f64 = 7.5;

/// The request's values, else the model's defaults.
pub fn settings(defaults: &ModelDefaults, requested: &Requested) -> Result<Settings, EngineError> {
    let scheduler = requested.scheduler.as_deref().or(defaults.scheduler.as_deref()).map(SchedulerKind::parse).transpose()?;
    let cache_text = requested.cache.as_deref().or(defaults.cache.as_deref());
    let step_cache = cache_text.map(easel_api::StepCache::parse).transpose().map_err(|message| EngineError::InvalidParam { param: "cache", message })?.flatten();
    Ok(Settings {
        step_cache: step_cache.map(engine_step_cache),
        steps: requested.steps.or(defaults.steps).unwrap_or(FALLBACK_STEPS),
        guidance: requested.guidance.or(defaults.guidance).unwrap_or(FALLBACK_GUIDANCE),
        scheduler,
        negative_prompt: requested.negative_prompt.clone().or(defaults.negative_prompt.clone()),
    })
}

/// The engine's form of a step cache the API read.
fn engine_step_cache(cache: easel_api::StepCache) -> StepCache {
    match cache {
        easel_api::StepCache::DeepCache { interval } => StepCache::DeepCache { interval },
        easel_api::StepCache::FirstBlock { threshold } => StepCache::FirstBlock { threshold },
    }
}

/// The step cache a pipeline's denoiser takes, by the name requests use.
fn cache_kind(pipe: &Pipeline) -> Option<&'static str> {
    match pipe {
        Pipeline::StableDiffusion(_) => Some("deepcache"),
        Pipeline::Flux(_) => Some("fbcache"),
        Pipeline::Sd3(_) => None,
    }
}

/// `easel.json`'s `cache`, checked against the model's denoiser, as the server advertises it.
fn default_cache(pipe: &Pipeline, defaults: &ModelDefaults) -> Result<Option<String>, EngineError> {
    let Some(text) = defaults.cache.as_deref() else { return Ok(None) };
    let cache = easel_api::StepCache::parse(text).map_err(|m| EngineError::InvalidParam { param: "cache", message: format!("easel.json's cache: {m}") })?;
    match cache {
        Some(c) if cache_kind(pipe) != Some(c.kind()) => Err(EngineError::InvalidParam {
            param: "cache",
            message: format!("easel.json's cache `{text}` does not fit this model (its step cache: {})", cache_kind(pipe).unwrap_or("none")),
        }),
        Some(c) => Ok(Some(c.to_string())),
        None => Ok(None),
    }
}

/// What the server advertises for a loaded model: its defaults, sizes, schedulers and memory.
pub fn model_info(id: &str, pipe: &Pipeline, defaults: &ModelDefaults, weight_bytes: u64, request_memory: u64) -> Result<ModelInfo, EngineError> {
    // easel.json's cache first: its error names easel.json, where settings() would not.
    let default_cache = default_cache(pipe, defaults)?;
    let none = settings(defaults, &Requested::default())?;
    Ok(ModelInfo {
        id: id.to_string(),
        default_steps: none.steps,
        default_guidance: none.guidance,
        default_size: pipe.default_size(),
        max_side: 2048,
        size_multiple: pipe.size_multiple(),
        schedulers: pipe.schedulers().iter().map(|k| k.name().to_string()).collect(),
        default_scheduler: Some(none.scheduler.unwrap_or_else(|| pipe.default_scheduler()).name().to_string()),
        memory: Some(crate::memory_estimate(pipe, weight_bytes, request_memory)),
        closed: false,
        cache_kind: cache_kind(pipe).map(str::to_string),
        default_cache,
        skippable_layers: match pipe {
            Pipeline::Sd3(p) => Some(p.transformer().config.num_layers),
            _ => None,
        },
        image_inputs: match pipe {
            Pipeline::StableDiffusion(p) if p.is_inpainting_unet() => ImageInputs::MaskRequired,
            Pipeline::StableDiffusion(_) => ImageInputs::ImageAndMask,
            Pipeline::Flux(p) if p.is_fill() => ImageInputs::MaskRequired,
            Pipeline::Flux(_) | Pipeline::Sd3(_) => ImageInputs::Image,
        },
        controlnet_family: match pipe.family() {
            Family::StableDiffusion => Some(easel_api::ControlNetFamily::Sd),
            Family::StableDiffusionXl => Some(easel_api::ControlNetFamily::Sdxl),
            Family::FluxDev | Family::FluxSchnell if !matches!(pipe, Pipeline::Flux(p) if p.is_fill()) => Some(easel_api::ControlNetFamily::Flux),
            _ => None,
        },
        ip_adapter_fit: match pipe {
            Pipeline::StableDiffusion(p) => Some(easel_api::IpAdapterFit { text_width: p.text_width(), layers: p.cross_attention_widths().len() }),
            Pipeline::Flux(_) | Pipeline::Sd3(_) => None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> ModelDefaults {
        ModelDefaults { steps: Some(20), guidance: Some(4.0), scheduler: Some("euler-a".into()), negative_prompt: Some("blurry".into()), transformer: None, max_sequence_length: None, text_encoders: Default::default(), checkpoint: None, cache: None }
    }

    #[test]
    fn a_request_without_values_gets_every_default() {
        let s = settings(&defaults(), &Requested::default()).unwrap();
        assert_eq!((s.steps, s.guidance, s.scheduler, s.negative_prompt.as_deref()), (20, 4.0, Some(SchedulerKind::EulerAncestral), Some("blurry")));
    }

    #[test]
    fn a_request_s_own_values_win() {
        let asked = Requested { steps: Some(3), guidance: Some(1.0), scheduler: Some("ddim".into()), negative_prompt: Some("dark".into()), cache: None };
        let s = settings(&defaults(), &asked).unwrap();
        assert_eq!((s.steps, s.guidance, s.scheduler, s.negative_prompt.as_deref()), (3, 1.0, Some(SchedulerKind::Ddim), Some("dark")));
    }

    #[test]
    fn an_unknown_default_scheduler_names_the_parameter() {
        let d = ModelDefaults { scheduler: Some("nope".into()), ..defaults() };
        let e = settings(&d, &Requested::default()).unwrap_err().to_string();
        assert!(e.contains("scheduler") && e.contains("nope"), "{e}");
    }
}
