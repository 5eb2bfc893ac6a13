//! The HTTP face: shared state, authentication, errors in OpenAI's shape, and the routes, each
//! family in its own module: [`submit`] (validate, route, cache, enqueue: one path for every
//! job), [`openai`] (OpenAI's images API), [`jobs`] (async jobs and their events), [`resources`]
//! (models, LoRAs, usage, images, health, metrics).
//!
//! Tenancy: when API keys are configured, a job, its events, its images and its usage belong
//! to the key that made it. Another key gets 404 for them, as if they did not exist (a 403
//! would confirm the id); a key marked admin sees everything. Image URLs are signed and expire
//! ([`crate::image_urls`]), or are fetched with the owner's key. Idempotency keys are scoped
//! to the API key, and a reused key with a different body gets 409 `idempotency_key_reused`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use easel_api::{ApiError, Event, ImageRequest, Job, JobStatus, ModelInfo, ResponseFormat, RouteCandidate, RoutePlan};
use easel_router::routing::{Candidate, Hints, Situation, LOCAL};
use easel_queue::QueueError;
use futures::stream::{self, Stream, StreamExt};
use sha2::{Digest, Sha256};

use crate::Services;
use easel_api::OutputFormat;

mod a1111;
mod fal;
mod jobs;
mod openai;
mod replicate;
mod resources;
mod studio;
mod submit;

use jobs::{cancel_job, create_job, get_job, job_events, job_id};
use openai::generations;
use resources::{get_image, list_loras, list_models, metrics, readyz, usage};
use openai::b64_image;
use submit::{easel_object, fingerprint, idempotency_key, submit_off_runtime, submit_request, submit_request_off_runtime, unsuccessful, wait_final, Submitted};

/// An API key, stored as its SHA-256.
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub name: String,
    pub sha256: String,
    /// Requests per minute.
    pub rate_per_minute: u32,
    /// Sees every key's jobs, images and usage, and /metrics.
    pub admin: bool,
}

impl ApiKey {
    /// A key from its secret (hashed at once; the secret is not kept).
    pub fn from_secret(name: &str, secret: &str, rate_per_minute: u32) -> Self {
        Self { name: name.into(), sha256: hex::encode(Sha256::digest(secret.as_bytes())), rate_per_minute, admin: false }
    }
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No API keys are configured: one tenant, who sees everything.
    Anyone,
    Key { name: String, admin: bool },
}

impl Caller {
    /// The key's name, recorded as the owner of what it submits.
    pub fn name(&self) -> Option<&str> {
        match self {
            Caller::Anyone => None,
            Caller::Key { name, .. } => Some(name),
        }
    }

    /// Whether the caller may see this job (and its events, images and cancel).
    pub fn sees(&self, job: &Job) -> bool {
        match self {
            Caller::Anyone | Caller::Key { admin: true, .. } => true,
            Caller::Key { name, .. } => job.spec.user.as_deref() == Some(name.as_str()),
        }
    }

    /// Whose usage rows the caller sees (None: everyone's).
    fn usage_scope(&self) -> Option<&str> {
        match self {
            Caller::Anyone | Caller::Key { admin: true, .. } => None,
            Caller::Key { name, .. } => Some(name),
        }
    }
}

/// Server knobs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub max_body_bytes: usize,
    /// How long a synchronous request waits for its job.
    pub sync_timeout: Duration,
    /// None: no authentication (loopback only unless the operator allows otherwise).
    pub api_keys: Option<Vec<ApiKey>>,
    /// Permit webhooks to loopback and private addresses.
    pub allow_private_webhooks: bool,
    /// Queued plus running jobs one API key may have at once.
    pub max_jobs_per_key: usize,
    /// /metrics answers only an admin key (when keys are configured).
    pub metrics_need_admin: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self { max_body_bytes: 32 << 20, sync_timeout: Duration::from_secs(600), api_keys: None, allow_private_webhooks: false, max_jobs_per_key: 100, metrics_need_admin: false }
    }
}

/// Shared state of the HTTP layer.
#[derive(Clone)]
pub struct AppState {
    pub services: Services,
    pub config: ServerConfig,
    rate: Arc<Mutex<HashMap<String, (Instant, f64)>>>,
    /// Hot cache hits in memory: cache key to the finished job, and b64 of stored images.
    hot: Arc<Mutex<HotCache>>,
    /// Models that live workers advertise, re-read from the queue at most once a second.
    live: Arc<Mutex<Option<(Instant, Vec<ModelInfo>)>>>,
    /// Closed providers and the routing policy (None: local engines only).
    pub gateway: Option<Arc<crate::gateway::Gateway>>,
    /// A1111 clients' chosen model and current job, per API key.
    a1111: Arc<a1111::Sessions>,
}

/// Recently served cache hits, so a repeated request touches neither SQLite nor the disk.
#[derive(Default)]
struct HotCache {
    jobs: HashMap<String, Job>,
    images: HashMap<String, Arc<String>>,
    /// Whole b64_json response bodies of cache hits, by job id: the same hit always answers
    /// with the same bytes, so they are rendered once.
    responses: HashMap<String, Bytes>,
}

const HOT_CACHE_ENTRIES: usize = 4096;

impl HotCache {
    fn bound(&mut self) {
        // Crude but bounded: start over when full (a miss only costs a SQLite lookup).
        if self.jobs.len() > HOT_CACHE_ENTRIES {
            self.jobs.clear();
        }
        if self.images.len() > HOT_CACHE_ENTRIES {
            self.images.clear();
        }
        if self.responses.len() > HOT_CACHE_ENTRIES {
            self.responses.clear();
        }
    }
}

impl std::ops::Deref for AppState {
    type Target = Services;
    fn deref(&self) -> &Services {
        &self.services
    }
}

impl AppState {
    pub fn new(services: Services, config: ServerConfig) -> Self {
        Self { services, config, rate: Default::default(), hot: Default::default(), live: Default::default(), gateway: None, a1111: Default::default() }
    }

    /// Puts closed providers and a routing policy in front of the local engines.
    pub fn with_gateway(mut self, gateway: Arc<crate::gateway::Gateway>) -> Self {
        self.gateway = Some(gateway);
        self
    }

    /// Models some live worker serves (from the queue's advertisements, cached for a second).
    fn live_models(&self) -> Result<Vec<ModelInfo>, ApiError> {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        match &*live {
            Some((at, models)) if at.elapsed() < Duration::from_secs(1) => Ok(models.clone()),
            _ => {
                let models = self.queue.live_models().map_err(queue_error)?;
                *live = Some((Instant::now(), models.clone()));
                Ok(models)
            }
        }
    }

    /// Every model this node knows: the ones it was configured with, and any a live worker
    /// advertises. Each with whether a live worker serves it now.
    fn catalogue(&self) -> Result<Vec<(ModelInfo, bool)>, ApiError> {
        let live = self.live_models()?;
        let mut all: Vec<(ModelInfo, bool)> = self.executor.models().into_iter().map(|m| {
            let up = live.iter().any(|l| l.id == m.id);
            (m, up)
        }).collect();
        // `@provider` entries are closed providers' executors, not models a request can name.
        for m in live.into_iter().filter(|m| !m.id.starts_with(easel_api::PROVIDER_QUEUE_PREFIX)) {
            if !all.iter().any(|(a, _)| a.id == m.id) {
                all.push((m, true));
            }
        }
        Ok(all)
    }

    /// The requested model (or the default one), and whether a live worker serves it.
    fn model(&self, id: Option<&str>) -> Result<(ModelInfo, bool), ApiError> {
        let models = self.catalogue()?;
        match id {
            None => models.into_iter().next().ok_or_else(|| ApiError::unavailable("no model is being served")),
            Some(id) => models.into_iter().find(|(m, _)| m.id == id).ok_or_else(|| ApiError::unknown_model(id)),
        }
    }

    /// Checks the API key and the key's rate.
    fn authorize(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let Some(keys) = &self.config.api_keys else { return Ok(Caller::Anyone) };
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(api_key_of)
            .ok_or_else(|| ApiError::unauthorized("missing API key: send Authorization: Bearer <key>"))?;
        let digest = hex::encode(Sha256::digest(token.trim().as_bytes()));
        let key = keys.iter().find(|k| k.sha256 == digest).ok_or_else(|| ApiError::unauthorized("invalid API key"))?;
        // Token bucket: rate_per_minute tokens, refilled continuously.
        let mut rate = self.rate.lock().unwrap_or_else(|p| p.into_inner());
        let cap = key.rate_per_minute.max(1) as f64;
        let (last, tokens) = rate.entry(key.name.clone()).or_insert((Instant::now(), cap));
        let refill = last.elapsed().as_secs_f64() * cap / 60.0;
        *tokens = (*tokens + refill).min(cap);
        *last = Instant::now();
        if *tokens < 1.0 {
            let wait = ((1.0 - *tokens) * 60.0 / cap).ceil() as u64;
            return Err(ApiError::overloaded(format!("API key `{}` is over its rate of {} requests per minute", key.name, key.rate_per_minute), wait.max(1)));
        }
        *tokens -= 1.0;
        Ok(Caller::Key { name: key.name.clone(), admin: key.admin })
    }

    /// A job the caller may see; 404 otherwise, exactly as for a job that does not exist.
    fn job_for(&self, caller: &Caller, id: &str) -> Result<Job, ApiError> {
        self.queue.get(id).map_err(queue_error)?.filter(|j| caller.sees(j)).ok_or_else(|| ApiError::not_found(format!("no job `{id}`")))
    }
}

/// Where the client reached easel: `http(s)://HOST` from the Host header (`X-Forwarded-Proto:
/// https` honoured behind a TLS proxy), for absolute URLs in answers and webhooks.
fn public_base(headers: &HeaderMap) -> String {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost");
    let scheme = headers.get("x-forwarded-proto").and_then(|h| h.to_str().ok()).filter(|p| *p == "https").unwrap_or("http");
    format!("{scheme}://{host}")
}

/// The key in an Authorization header, in the schemes the clients easel speaks to use:
/// `Bearer` (OpenAI, Replicate), `Token` (Replicate's older clients), `Key` (fal), and `Basic`
/// (A1111 clients with --api-auth: the password is the key, the user name is ignored).
fn api_key_of(header: &str) -> Option<String> {
    let (scheme, value) = header.trim().split_once(' ')?;
    match scheme.to_ascii_lowercase().as_str() {
        "bearer" | "token" | "key" => Some(value.trim().to_string()),
        "basic" => {
            let decoded = base64::engine::general_purpose::STANDARD.decode(value.trim()).ok()?;
            let text = String::from_utf8(decoded).ok()?;
            text.split_once(':').map(|(_, password)| password.to_string())
        }
        _ => None,
    }
}

/// An error response in OpenAI's shape.
pub struct ApiResponseError(pub ApiError);

impl From<ApiError> for ApiResponseError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for ApiResponseError {
    fn into_response(self) -> Response {
        let e = self.0;
        let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, Json(e.to_json())).into_response();
        if let Some(s) = e.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

type ApiResult<T> = Result<T, ApiResponseError>;

fn queue_error(e: QueueError) -> ApiError {
    match e {
        QueueError::Full(n) => ApiError::overloaded(format!("the queue is full ({n} jobs waiting); retry later"), 2),
        QueueError::Storage(m) => ApiError::unavailable(format!("the job queue is unavailable: {m}")),
        QueueError::IdempotencyKeyReused { job_id } => ApiError::idempotency_key_reused(&job_id),
    }
}

/// Parses a JSON body into `T`, naming the offending field.
fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() || path == "." {
            ApiError::bad_body(format!("malformed request body: {inner}"))
        } else {
            ApiError::invalid(&path, format!("{path}: {inner}"))
        }
    })
}

/// Builds the router with all routes.
pub fn router(state: AppState) -> Router {
    let limit = state.config.max_body_bytes;
    Router::new()
        .route("/v1/images/generations", post(generations))
        .route("/v1/images/edits", post(openai::edits))
        .route("/v1/jobs", post(create_job).get(jobs::list_jobs))
        .route("/v1/cost", get(resources::cost))
        .route("/", get(studio::index))
        .route("/studio/{file}", get(studio::asset))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/events", get(job_events))
        .route("/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/v1/models", get(list_models))
        .route("/v1/loras", get(list_loras))
        .route("/v1/controlnets", get(resources::list_controlnets))
        .route("/v1/usage", get(usage))
        .route("/v1/images/{job}/{file}", get(get_image))
        .route("/sdapi/v1/txt2img", post(a1111::txt2img))
        .route("/sdapi/v1/img2img", post(a1111::img2img))
        .route("/sdapi/v1/sd-models", get(a1111::sd_models))
        .route("/sdapi/v1/samplers", get(a1111::samplers))
        .route("/sdapi/v1/schedulers", get(a1111::schedulers))
        .route("/sdapi/v1/options", get(a1111::get_options).post(a1111::set_options))
        .route("/sdapi/v1/progress", get(a1111::progress))
        .route("/sdapi/v1/interrupt", post(a1111::interrupt))
        .route("/sdapi/v1/upscalers", get(a1111::empty_list))
        .route("/sdapi/v1/sd-vae", get(a1111::empty_list))
        .route("/sdapi/v1/sd-modules", get(a1111::empty_list))
        .route("/sdapi/v1/latent-upscale-modes", get(a1111::empty_list))
        .route("/sdapi/v1/loras", get(a1111::empty_list))
        .route("/v1/predictions", post(replicate::create_for_version))
        .route("/v1/models/{owner}/{name}/predictions", post(replicate::create_for_model))
        .route("/v1/predictions/{id}", get(replicate::get_prediction))
        .route("/v1/models/{owner}/{name}/versions/{id}", get(replicate::get_version))
        .route("/v1/predictions/{id}/cancel", post(replicate::cancel_prediction))
        .route("/v1/webhooks/default/secret", get(replicate::webhook_secret))
        .route("/fal/{*path}", post(fal::submit_app).get(fal::get_request).put(fal::cancel_request))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], crate::http::OPENAPI) }))
        .fallback(|| async { ApiResponseError(ApiError::not_found("no such route")) })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

pub(crate) use replicate::prediction as replicate_prediction;

/// The OpenAPI description of this API.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Reads the body, answering 413 in the API's shape when it is over the limit.
async fn read_body(body: Result<Bytes, axum::extract::rejection::BytesRejection>, limit: usize) -> Result<Bytes, ApiError> {
    body.map_err(|r| if r.status() == StatusCode::PAYLOAD_TOO_LARGE { ApiError::too_large(limit) } else { ApiError::bad_body(r.body_text()) })
}


#[cfg(test)]
mod tests {
    use super::api_key_of;

    #[test]
    fn api_keys_are_read_from_bearer_token_key_and_basic_authorization() {
        assert_eq!(api_key_of("Bearer s3cret").as_deref(), Some("s3cret"));
        assert_eq!(api_key_of("Token s3cret").as_deref(), Some("s3cret"));
        assert_eq!(api_key_of("Key s3cret").as_deref(), Some("s3cret"));
        // base64("webui:s3cret")
        assert_eq!(api_key_of("Basic d2VidWk6czNjcmV0").as_deref(), Some("s3cret"));
        assert_eq!(api_key_of("Basic !!!"), None);
        assert_eq!(api_key_of("Digest x"), None);
        assert_eq!(api_key_of("s3cret"), None);
    }
}
