//! The gateway: closed providers behind the same endpoint, chosen per request by the routing
//! policy, with every image's provider, reason, cost and time on the job record and ledger.

use std::collections::HashMap;
use std::time::Duration;

use easel_api::{ApiError, JobResult, JobSpec, ModelInfo, StoredImage, Timings};
use base64::Engine as _;
use easel_router::providers::{key_from_env, BflClient, EditImage, EditSupport, FalClient, IdeogramClient, ImageJob, ImagenClient, OpenAiClient, Provider, ProviderError, RecraftClient, ReplicateClient, StabilityClient};
use easel_router::routing::{Candidate, Hints, RouteError, Router, RoutingConfig, Situation, LOCAL};
use easel_router::{Price, PriceTable};
use serde::Deserialize;

/// The kinds of closed provider easel speaks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProviderKind {
    Openai,
    /// Any OpenAI-compatible image server: another easel, LocalAI, stable-diffusion.cpp.
    OpenaiCompatible,
    Bfl,
    Fal,
    Replicate,
    Stability,
    /// Google's Imagen 4 through the Gemini API.
    Imagen,
    Ideogram,
    Recraft,
}

impl ProviderKind {
    fn defaults(self) -> (&'static str, Option<&'static str>) {
        match self {
            ProviderKind::Openai => ("https://api.openai.com/v1", Some("OPENAI_API_KEY")),
            ProviderKind::OpenaiCompatible => ("", None),
            ProviderKind::Bfl => ("https://api.bfl.ai", Some("BFL_API_KEY")),
            ProviderKind::Fal => ("https://queue.fal.run", Some("FAL_KEY")),
            ProviderKind::Replicate => ("https://api.replicate.com", Some("REPLICATE_API_TOKEN")),
            ProviderKind::Stability => ("https://api.stability.ai", Some("STABILITY_API_KEY")),
            ProviderKind::Imagen => ("https://generativelanguage.googleapis.com", Some("GEMINI_API_KEY")),
            ProviderKind::Ideogram => ("https://api.ideogram.ai", Some("IDEOGRAM_API_KEY")),
            ProviderKind::Recraft => ("https://external.api.recraft.ai", Some("RECRAFT_API_KEY")),
        }
    }
}

/// One provider in the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderEntry {
    pub name: String,
    pub kind: ProviderKind,
    #[serde(default)]
    pub base_url: Option<String>,
    /// The environment variable holding the key (default: the vendor's usual one).
    #[serde(default)]
    pub api_key_env: Option<String>,
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
}

fn default_timeout() -> f64 {
    120.0
}

/// The gateway's part of the config file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    #[serde(default)]
    pub providers: Vec<ProviderEntry>,
    #[serde(default)]
    pub routing: RoutingConfig,
    /// Overrides of the default price table.
    #[serde(default)]
    pub prices: Vec<Price>,
}

/// Why the gateway could not be built.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("provider `{0}`: {1}")]
    Provider(String, String),
    #[error("{0}")]
    Prices(String),
}

/// Configured providers (the enabled ones), routing policy and prices.
pub struct Gateway {
    pub router: Router,
    pub providers: HashMap<String, Provider>,
    pub prices: PriceTable,
    /// Warnings from start-up (providers disabled for want of a key), printed once.
    pub warnings: Vec<String>,
}

impl Gateway {
    /// Builds the providers; one without its key is disabled with a warning, never routed to.
    pub fn new(cfg: GatewayConfig) -> Result<Self, GatewayError> {
        let mut providers = HashMap::new();
        let mut warnings = vec![];
        for p in cfg.providers {
            if p.name == LOCAL || p.name.is_empty() || p.name.contains(':') {
                return Err(GatewayError::Provider(p.name, "names must be non-empty, without ':', and not `local`".into()));
            }
            if providers.contains_key(&p.name) {
                return Err(GatewayError::Provider(p.name, "configured twice".into()));
            }
            let (default_url, default_env) = p.kind.defaults();
            let base = p.base_url.clone().unwrap_or_else(|| default_url.to_string());
            if base.is_empty() {
                return Err(GatewayError::Provider(p.name, "needs a base_url".into()));
            }
            let env = p.api_key_env.as_deref().or(default_env);
            let key = env.and_then(key_from_env);
            if !(p.timeout_s.is_finite() && p.timeout_s > 0.0) {
                return Err(GatewayError::Provider(p.name, "timeout_s must be > 0".into()));
            }
            let timeout = Duration::from_secs_f64(p.timeout_s);
            let provider = match (p.kind, key) {
                (ProviderKind::OpenaiCompatible, key) => Provider::OpenAi(OpenAiClient::new(&p.name, &base, key, timeout)),
                (_, None) => {
                    warnings.push(format!("provider `{}` is disabled: {} is not set", p.name, env.unwrap_or("its key variable")));
                    continue;
                }
                (ProviderKind::Openai, Some(k)) => Provider::OpenAi(OpenAiClient::new(&p.name, &base, Some(k), timeout)),
                (ProviderKind::Bfl, Some(k)) => Provider::Bfl(BflClient::new(&p.name, &base, k, timeout)),
                (ProviderKind::Fal, Some(k)) => Provider::Fal(FalClient::new(&p.name, &base, k, timeout)),
                (ProviderKind::Replicate, Some(k)) => Provider::Replicate(ReplicateClient::new(&p.name, &base, k, timeout)),
                (ProviderKind::Stability, Some(k)) => Provider::Stability(StabilityClient::new(&p.name, &base, k, timeout)),
                (ProviderKind::Imagen, Some(k)) => Provider::Imagen(ImagenClient::new(&p.name, &base, k, timeout)),
                (ProviderKind::Ideogram, Some(k)) => Provider::Ideogram(IdeogramClient::new(&p.name, &base, k, timeout)),
                (ProviderKind::Recraft, Some(k)) => Provider::Recraft(RecraftClient::new(&p.name, &base, k, timeout)),
            };
            providers.insert(p.name.clone(), provider);
        }
        let prices = PriceTable::with_overrides(cfg.prices).map_err(|e| GatewayError::Prices(e.to_string()))?;
        Ok(Self { router: Router::new(cfg.routing), providers, prices, warnings })
    }

    /// Whether a request for `model` with these hints goes through the router.
    pub fn routes(&self, model: &str, hints: &Hints) -> bool {
        hints.tier.is_some() || self.router.knows(model) || model.contains(':') || hints.route.as_deref().is_some_and(|r| r != "auto" && r != LOCAL)
    }

    pub fn plan(&self, model: &str, hints: &Hints, situation: &Situation) -> Result<Vec<Candidate>, ApiError> {
        self.router.plan(model, hints, situation).map_err(|e| match e {
            RouteError::UnknownModel(m) => ApiError::unknown_model(&m),
            RouteError::UnknownTier(_) => ApiError::invalid("tier", e.to_string()),
            RouteError::UnknownRoute(_) => ApiError::invalid("route", e.to_string()),
            RouteError::PrivateWithoutLocal(_) | RouteError::NoCandidate { .. } => ApiError::unavailable(e.to_string()),
        })
    }

    /// Which pictures a candidate's model takes in (none at an unconfigured provider).
    pub fn edit_support(&self, c: &Candidate) -> EditSupport {
        self.providers.get(&c.provider).map(|p| p.edit_support(&c.model)).unwrap_or(EditSupport::None)
    }

    /// The list price of one image at a closed provider.
    pub fn remote_price(&self, c: &Candidate, quality: Option<&str>, width: usize, height: usize) -> Option<f64> {
        self.prices.image_usd(&c.provider, &c.model, quality, width as u32, height as u32)
    }
}

/// A request routed to a closed provider, validated like a local one; `pictures` is what the
/// provider's model takes in.
pub fn remote_model_info(c: &Candidate, pictures: EditSupport) -> ModelInfo {
    let image_inputs = match pictures {
        EditSupport::None => easel_api::ImageInputs::None,
        EditSupport::Image => easel_api::ImageInputs::Image,
        EditSupport::ImageAndMask => easel_api::ImageInputs::ImageAndMask,
        EditSupport::MaskRequired => easel_api::ImageInputs::MaskRequired,
    };
    ModelInfo { id: format!("{}:{}", c.provider, c.model), default_steps: 28, default_guidance: 3.5, default_size: 1024, max_side: 2048, size_multiple: 16, schedulers: vec![], default_scheduler: None, memory: None, closed: true, skippable_layers: None, cache_kind: None, default_cache: None, image_inputs, controlnet_family: None, ip_adapter_fit: None }
}

/// What a closed provider's answer becomes: the job record's result (images already stored).
pub fn remote_result(c: &Candidate, images: Vec<StoredImage>, seconds: f64, cost_usd: f64, vendor_id: Option<String>) -> JobResult {
    JobResult {
        images,
        timings: Timings { total_s: seconds, ..Default::default() },
        batch_size: 1,
        cost_usd,
        provider: c.provider.clone(),
        route_reason: Some(c.reason.clone()),
        vendor_id,
    }
}

/// The provider-neutral job for a spec (quality and style from the request, kept on its route).
pub fn image_job(c: &Candidate, spec: &JobSpec) -> Result<ImageJob, base64::DecodeError> {
    let route = spec.route.as_ref();
    let image = match &spec.init_image {
        Some(i) => Some(EditImage { png: decode_png(&i.png_base64)?, mask_png: i.mask_png_base64.as_deref().map(decode_png).transpose()?, strength: i.strength }),
        None => None,
    };
    Ok(ImageJob {
        model: c.model.clone(),
        prompt: spec.prompt.clone(),
        negative_prompt: spec.negative_prompt.clone(),
        width: spec.width as u32,
        height: spec.height as u32,
        n: spec.n as u32,
        seed: spec.seed_explicit.then_some(spec.seed),
        quality: route.and_then(|r| r.quality.clone()),
        style: route.and_then(|r| r.style.clone()),
        output_format: spec.output_format.extension().to_string(),
        image,
    })
}

fn decode_png(b64: &str) -> Result<Vec<u8>, base64::DecodeError> {
    base64::engine::general_purpose::STANDARD.decode(b64)
}

/// The API error for a provider failure that ends the request.
pub fn provider_error(e: &ProviderError) -> ApiError {
    match e {
        ProviderError::Moderated { .. } => ApiError::content_policy(e.to_string()),
        ProviderError::RateLimited { retry_after, .. } => ApiError::overloaded(e.to_string(), retry_after.map(|d| d.as_secs().max(1)).unwrap_or(5)),
        _ => ApiError::unavailable(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_kinds_stop_start_up_and_keyless_providers_are_disabled() {
        let err = serde_json::from_value::<GatewayConfig>(serde_json::json!({"providers": [{"name": "mj", "kind": "midjourney"}]})).unwrap_err();
        assert!(err.to_string().contains("unknown variant `midjourney`"), "{err}");
        let cfg: GatewayConfig = serde_json::from_value(serde_json::json!({"providers": [
            {"name": "bfl", "kind": "bfl", "api_key_env": "EASEL_TEST_SURELY_UNSET_KEY"},
            {"name": "peer", "kind": "openai-compatible", "base_url": "http://127.0.0.1:9/v1"}
        ]}))
        .unwrap();
        let g = Gateway::new(cfg).unwrap();
        assert!(!g.providers.contains_key("bfl") && g.providers.contains_key("peer"));
        assert_eq!(g.warnings, ["provider `bfl` is disabled: EASEL_TEST_SURELY_UNSET_KEY is not set"]);
    }
}
