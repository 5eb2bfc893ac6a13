//! Routes: OpenAI-compatible images, async jobs with SSE, models, images, health, metrics.
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
        Self { max_body_bytes: 1 << 20, sync_timeout: Duration::from_secs(600), api_keys: None, allow_private_webhooks: false, max_jobs_per_key: 100, metrics_need_admin: false }
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
        Self { services, config, rate: Default::default(), hot: Default::default(), live: Default::default(), gateway: None }
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

    /// Checks the Bearer token and the key's rate.
    fn authorize(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let Some(keys) = &self.config.api_keys else { return Ok(Caller::Anyone) };
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
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
        .route("/v1/jobs", post(create_job))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/events", get(job_events))
        .route("/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/v1/models", get(list_models))
        .route("/v1/loras", get(list_loras))
        .route("/v1/usage", get(usage))
        .route("/v1/images/{job}/{file}", get(get_image))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], crate::http::OPENAPI) }))
        .fallback(|| async { ApiResponseError(ApiError::not_found("no such route")) })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// The OpenAPI description of this API.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Reads the body, answering 413 in the API's shape when it is over the limit.
async fn read_body(body: Result<Bytes, axum::extract::rejection::BytesRejection>, limit: usize) -> Result<Bytes, ApiError> {
    body.map_err(|r| if r.status() == StatusCode::PAYLOAD_TOO_LARGE { ApiError::too_large(limit) } else { ApiError::bad_body(r.body_text()) })
}

fn random_seed() -> u64 {
    let u = uuid::Uuid::new_v4();
    u64::from_le_bytes(u.as_bytes()[..8].try_into().unwrap_or([0; 8])) % (1 << 53)
}

/// A validated request, queued (or answered from the cache).
struct Submitted {
    job: Job,
    format: ResponseFormat,
    /// Answered from the result cache without running.
    hit: bool,
}

/// What the router needs to know about this node right now.
fn situation_parts(state: &AppState, api_key: Option<&str>) -> Result<(Vec<String>, f64, Vec<String>, f64, f64), ApiError> {
    let local: Vec<String> = state.catalogue()?.into_iter().filter(|(_, live)| *live).map(|(m, _)| m.id).collect();
    let depth = state.queue.depth().map_err(queue_error)? as f64;
    let wait = depth * state.metrics.mean_job_seconds().unwrap_or(1.0);
    let enabled = state.gateway.as_ref().map(|g| g.providers.keys().cloned().collect()).unwrap_or_default();
    let (all, mine) = match &state.ledger {
        Some(l) => (l.spent_on(None, None).unwrap_or(0.0), api_key.map(|k| l.spent_on(None, Some(k)).unwrap_or(0.0)).unwrap_or(0.0)),
        None => (0.0, 0.0),
    };
    Ok((local, wait, enabled, all, mine))
}

/// Validates, routes, consults the cache, enqueues. Every job takes the queue, whoever runs
/// it: a local engine's worker, or the executor of the closed provider the router chose
/// (`@provider`), with the rest of the router's plan on the job for fallback.
fn submit(state: &AppState, headers: &HeaderMap, body: &Bytes) -> Result<Submitted, ApiError> {
    let caller = state.authorize(headers)?;
    let key_name = caller.name().map(str::to_owned);
    let req: ImageRequest = parse_body(body)?;
    req.check_lengths()?;
    let hints = Hints { route: req.route.clone(), private: req.is_private()?, tier: req.tier.clone(), api_key: key_name.clone() };
    let mut local_model = req.model.clone();
    let mut route: Option<RoutePlan> = None;
    let mut provider_first: Option<Candidate> = None;
    match &state.gateway {
        Some(gw) if gw.routes(req.model.as_deref().unwrap_or(""), &hints) => {
            let (local, wait, enabled, all, mine) = situation_parts(state, key_name.as_deref())?;
            let local_cost = state.local_cost;
            let price = |p: &str, m: &str| -> Option<f64> {
                if p == LOCAL {
                    Some(local_cost.image_usd(state.metrics.mean_job_seconds().unwrap_or(1.0)))
                } else {
                    gw.prices.image_usd(p, m, req.quality.as_deref(), 1024, 1024)
                }
            };
            let situation = Situation { local_models: &local, local_wait_s: wait, enabled: &enabled, price: &price, spent_today_usd: all, spent_today_by_key_usd: mine };
            let mut plan = gw.plan(req.model.as_deref().unwrap_or(""), &hints, &situation)?;
            // A LoRA stack runs on local engines only.
            if req.loras.as_ref().is_some_and(|l| !l.is_empty()) {
                let first = plan[0].provider.clone();
                plan.retain(Candidate::is_local);
                if plan.is_empty() {
                    return Err(ApiError::invalid("loras", format!("LoRAs run on local engines; `{}` routes to {first} (use route: local)", req.model.as_deref().unwrap_or(""))));
                }
            }
            if plan[0].is_local() {
                local_model = Some(plan[0].model.clone());
            } else {
                provider_first = Some(plan[0].clone());
            }
            let candidates = plan.into_iter().map(|c| RouteCandidate { provider: c.provider, model: c.model, reason: c.reason }).collect();
            route = Some(RoutePlan { candidates, current: 0, failures: vec![], quality: req.quality.clone() });
        }
        None if hints.tier.is_some() || hints.route.as_deref().is_some_and(|r| r != "auto" && r != LOCAL) => {
            return Err(ApiError::invalid(if hints.tier.is_some() { "tier" } else { "route" }, "no closed providers or tiers are configured on this server"));
        }
        _ => {}
    }
    // The provider executor runs in every API node that has the gateway: always served.
    let (model, served) = match &provider_first {
        Some(c) => (crate::gateway::remote_model_info(c), true),
        None => state.model(local_model.as_deref())?,
    };
    let (mut spec, format) = req.validate(&model, random_seed)?;
    spec.route = route;
    for l in &spec.loras {
        state.loras.source(&l.name)?;
    }
    if let Some(url) = &spec.webhook_url {
        crate::webhooks::validate_url(url, state.config.allow_private_webhooks)?;
    }
    if let Some(name) = &key_name {
        let active = state.queue.active_for(name).map_err(queue_error)?;
        if active >= state.config.max_jobs_per_key {
            return Err(ApiError::overloaded(format!("API key `{name}` has {active} jobs queued or running (limit {})", state.config.max_jobs_per_key), 2));
        }
        spec.user = Some(name.clone());
    }
    // Per tenant: a hit hands back the job record, which holds the request and its webhook.
    // Closed providers' images are not reproducible from a seed: never cached.
    let cacheable = provider_first.is_none();
    let cache_key = spec.cache_key(&state.executor.model_identity(&spec.model)).filter(|_| cacheable).map(|k| match &key_name {
        Some(name) => hex::encode(Sha256::digest(format!("{name}\u{1f}{k}").as_bytes())),
        None => k,
    });
    if let Some(ck) = &cache_key {
        let hot = state.hot.lock().unwrap_or_else(|p| p.into_inner()).jobs.get(ck).cloned();
        let hit = match hot {
            Some(j) => Some(j),
            None => state.queue.cached(ck).map_err(queue_error)?,
        };
        if let Some(job) = hit.filter(|j| j.result.is_some()) {
            state.metrics.cache_hit();
            let mut hot = state.hot.lock().unwrap_or_else(|p| p.into_inner());
            hot.bound();
            hot.jobs.insert(ck.clone(), job.clone());
            return Ok(Submitted { job, format, hit: true });
        }
    }
    if !served {
        return Err(ApiError::unavailable(format!("no worker is serving model `{}` right now; retry later", model.id)));
    }
    // Scoped to the caller's key, and tied to this exact body.
    let idem = match headers.get("idempotency-key").map(|v| v.to_str()) {
        None => None,
        Some(Ok(k)) if !k.is_empty() && k.len() <= 256 => Some(format!("{}\u{1f}{k}", key_name.as_deref().unwrap_or(""))),
        Some(_) => return Err(ApiError::invalid("Idempotency-Key", "Idempotency-Key must be 1-256 visible ASCII characters")),
    };
    let fingerprint = hex::encode(Sha256::digest(body));
    let idempotency = idem.as_deref().map(|key| easel_queue::Idempotency { key, fingerprint: &fingerprint });
    let enq = state.queue.enqueue(&spec, cache_key.as_deref(), idempotency).map_err(queue_error)?;
    if !enq.existing {
        state.doorbell.ring();
        let position = state.queue.position(&enq.job.id).ok().flatten().unwrap_or(0);
        state.bus.publish(Event::Queued { job_id: enq.job.id.clone(), position });
    }
    Ok(Submitted { job: enq.job, format, hit: false })
}

/// The answer to a synchronous request whose job did not succeed.
fn unsuccessful(job: &Job) -> ApiError {
    let reason = job.error.clone().unwrap_or_else(|| "generation failed".into());
    if job.status == JobStatus::Canceled {
        return ApiError::internal(format!("job {} was canceled", job.id));
    }
    if let Some(refusal) = reason.strip_prefix(crate::worker::CONTENT_POLICY) {
        return ApiError::content_policy(refusal.trim_start_matches(':').trim());
    }
    match job.spec.route.as_ref().filter(|r| !r.failures.is_empty() || r.candidate().is_some_and(|c| !c.is_local())) {
        Some(route) => {
            let mut all = route.failures.clone();
            all.push(reason);
            ApiError::unavailable(format!("job {} failed on every candidate: {}", job.id, all.join("; ")))
        }
        None => ApiError::internal(format!("job {} failed: {reason}", job.id)),
    }
}

fn easel_object(job: &Job, cache_hit: bool) -> serde_json::Value {
    let seeds: Vec<u64> = match &job.result {
        Some(r) => r.images.iter().map(|i| i.seed).collect(),
        None => (0..job.spec.n as u64).map(|i| job.spec.seed + i).collect(),
    };
    serde_json::json!({
        "job_id": job.id,
        "status": job.status,
        "seeds": seeds,
        "timings": job.result.as_ref().map(|r| &r.timings),
        "batch_size": job.result.as_ref().map(|r| r.batch_size),
        "cache_hit": cache_hit,
        "model": job.spec.model,
        "steps": job.spec.steps,
        "provider": job.result.as_ref().map(|r| r.provider.as_str()).unwrap_or("local"),
        "route_reason": job.result.as_ref().and_then(|r| r.route_reason.as_deref()).unwrap_or("the local engine"),
        "vendor_id": job.result.as_ref().and_then(|r| r.vendor_id.as_deref()),
        "cost_usd": job.result.as_ref().map(|r| r.cost_usd),
    })
}

async fn wait_final(state: &AppState, id: &str) -> Result<Job, ApiError> {
    let mut rx = state.bus.subscribe();
    let deadline = tokio::time::Instant::now() + state.config.sync_timeout;
    loop {
        let job = state.queue.get(id).map_err(queue_error)?.ok_or_else(|| ApiError::internal("accepted job vanished"))?;
        if job.status.is_final() {
            return Ok(job);
        }
        // Wake on this job's events, or poll at least every 250 ms (events are a hint, the queue is truth).
        let wait = tokio::time::timeout(Duration::from_millis(250), async {
            loop {
                match rx.recv().await {
                    Ok(e) if e.job_id() == id && e.is_final() => break,
                    Ok(_) => continue,
                    Err(_) => break,
                }
            }
        });
        let _ = wait.await;
        if tokio::time::Instant::now() > deadline {
            return Err(ApiError::unavailable(format!("job {id} did not finish within {:?}; follow it at /v1/jobs/{id}", state.config.sync_timeout)));
        }
    }
}

async fn generations(State(state): State<AppState>, headers: HeaderMap, body: Result<Bytes, axum::extract::rejection::BytesRejection>) -> ApiResult<Response> {
    let body = read_body(body, state.config.max_body_bytes).await?;
    let Submitted { job, format, hit } = submit(&state, &headers, &body).inspect_err(|e| state.metrics.error(&format!("http_{}", e.status)))?;
    if hit && format == ResponseFormat::B64Json {
        if let Some(bytes) = state.hot.lock().unwrap_or_else(|p| p.into_inner()).responses.get(&job.id) {
            return Ok(json_bytes(bytes.clone()));
        }
    }
    let job = if hit { job } else { wait_final(&state, &job.id).await? };
    if job.status != JobStatus::Succeeded {
        return Err(unsuccessful(&job).into());
    }
    let result = job.result.as_ref().ok_or_else(|| ApiError::internal("succeeded job without result"))?;
    let mut data = vec![];
    for img in &result.images {
        data.push(match format {
            ResponseFormat::Url => {
                let url = state.store.signed_url(&img.key).unwrap_or_else(|| absolute_url(&headers, &state.image_urls.path(&img.key)));
                serde_json::json!({ "url": url, "revised_prompt": null })
            }
            ResponseFormat::B64Json => serde_json::json!({ "b64_json": &*b64_image(&state, &img.key)?, "revised_prompt": null }),
        });
    }
    let created = job.finished_at.unwrap_or(job.created_at) as i64;
    let size = format!("{}x{}", job.spec.width, job.spec.height);
    let body = serde_json::json!({
        "created": created,
        "data": data,
        "output_format": job.spec.output_format,
        "size": size,
        "easel": easel_object(&job, hit),
    });
    let bytes = Bytes::from(serde_json::to_vec(&body).map_err(|e| ApiError::internal(e.to_string()))?);
    if hit && format == ResponseFormat::B64Json {
        let mut hot = state.hot.lock().unwrap_or_else(|p| p.into_inner());
        hot.bound();
        hot.responses.insert(job.id.clone(), bytes.clone());
    }
    Ok(json_bytes(bytes))
}

fn json_bytes(bytes: Bytes) -> Response {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], bytes).into_response()
}

/// A stored image as base64, from memory when it was served recently.
fn b64_image(state: &AppState, key: &str) -> Result<Arc<String>, ApiError> {
    if let Some(b) = state.hot.lock().unwrap_or_else(|p| p.into_inner()).images.get(key) {
        return Ok(b.clone());
    }
    let bytes = state.store.get(key).map_err(|e| ApiError::unavailable(format!("reading the stored image: {e}")))?;
    let b64 = Arc::new(base64::engine::general_purpose::STANDARD.encode(bytes));
    let mut hot = state.hot.lock().unwrap_or_else(|p| p.into_inner());
    hot.bound();
    hot.images.insert(key.to_string(), b64.clone());
    Ok(b64)
}

fn absolute_url(headers: &HeaderMap, path: &str) -> String {
    match headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
        Some(host) => format!("http://{host}{path}"),
        None => path.to_string(),
    }
}

fn job_json(state: &AppState, job: &Job) -> serde_json::Value {
    let position = if job.status == JobStatus::Queued { state.queue.position(&job.id).ok().flatten() } else { None };
    serde_json::json!({
        "id": job.id,
        "object": "easel.job",
        "status": job.status,
        "queue_position": position,
        "error": job.error.as_ref().filter(|_| job.status == JobStatus::Failed).map(|e| {
            let code = if e.starts_with(easel_queue::WORKER_CRASHED) { easel_queue::WORKER_CRASHED } else { "generation_failed" };
            serde_json::json!({"message": e, "code": code})
        }),
        "attempts": job.attempts,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "request": &job.spec,
        "images": job.result.as_ref().map(|r| r.images.iter().map(|i| serde_json::json!({"url": state.image_urls.path(&i.key), "seed": i.seed})).collect::<Vec<_>>()),
        "urls": {
            "self": format!("/v1/jobs/{}", job.id),
            "events": format!("/v1/jobs/{}/events", job.id),
            "cancel": format!("/v1/jobs/{}/cancel", job.id),
        },
        "easel": easel_object(job, job.cache_hit),
    })
}

async fn create_job(State(state): State<AppState>, headers: HeaderMap, body: Result<Bytes, axum::extract::rejection::BytesRejection>) -> ApiResult<Response> {
    let body = read_body(body, state.config.max_body_bytes).await?;
    let job = submit(&state, &headers, &body).inspect_err(|e| state.metrics.error(&format!("http_{}", e.status)))?.job;
    Ok((StatusCode::ACCEPTED, Json(job_json(&state, &job))).into_response())
}

/// A job id from the path; one that is not even UTF-8 names no job.
fn job_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(id)| id).map_err(|_| ApiError::not_found("no such job"))
}

async fn get_job(State(state): State<AppState>, headers: HeaderMap, id: Result<Path<String>, PathRejection>) -> ApiResult<Json<serde_json::Value>> {
    let caller = state.authorize(&headers)?;
    let id = job_id(id)?;
    let job = state.job_for(&caller, &id)?;
    Ok(Json(job_json(&state, &job)))
}

async fn cancel_job(State(state): State<AppState>, headers: HeaderMap, id: Result<Path<String>, PathRejection>) -> ApiResult<Json<serde_json::Value>> {
    let caller = state.authorize(&headers)?;
    let id = job_id(id)?;
    state.job_for(&caller, &id)?;
    let status = state.queue.cancel(&id).map_err(queue_error)?.ok_or_else(|| ApiError::not_found(format!("no job `{id}`")))?;
    if status == JobStatus::Canceled {
        state.bus.publish(Event::Canceled { job_id: id.clone() });
    }
    let job = state.job_for(&caller, &id)?;
    Ok(Json(job_json(&state, &job)))
}

fn sse(e: &Event) -> SseEvent {
    SseEvent::default().event(e.name()).data(serde_json::to_string(e).unwrap_or_default())
}

async fn job_events(State(state): State<AppState>, headers: HeaderMap, id: Result<Path<String>, PathRejection>) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let caller = state.authorize(&headers)?;
    let id = job_id(id)?;
    let rx = state.bus.subscribe();
    let job = state.job_for(&caller, &id)?;
    let first = match (crate::events::final_event(&job, &state.image_urls), job.status) {
        (Some(e), _) => e,
        (None, JobStatus::Queued) => Event::Queued { job_id: id.clone(), position: state.queue.position(&id).ok().flatten().unwrap_or(0) },
        (None, _) => Event::Started { job_id: id.clone() },
    };
    let done = first.is_final();
    let head = stream::iter(vec![Ok(sse(&first))]);
    let queue = state.queue.clone();
    let urls = state.image_urls.clone();
    let tail = stream::unfold((rx, done, id), move |(mut rx, done, id)| {
        let queue = queue.clone();
        let urls = urls.clone();
        async move {
            if done {
                return None;
            }
            loop {
                match tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
                    Ok(Ok(e)) if e.job_id() == id => {
                        let fin = e.is_final();
                        return Some((Ok(sse(&e)), (rx, fin, id)));
                    }
                    Ok(Ok(_)) => continue,
                    // Lagged, closed or quiet: consult the queue, which is the record.
                    _ => {
                        if let Ok(Some(job)) = queue.get(&id) {
                            if let Some(e) = crate::events::final_event(&job, &urls) {
                                return Some((Ok(sse(&e)), (rx, true, id)));
                            }
                        }
                    }
                }
            }
        }
    });
    Ok(Sse::new(head.chain(tail)).keep_alive(KeepAlive::default()))
}

async fn list_models(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Json<serde_json::Value>> {
    state.authorize(&headers)?;
    let data: Vec<_> = state
        .catalogue()?
        .into_iter()
        .map(|(m, live)| serde_json::json!({"id": m.id, "object": "model", "created": 0, "owned_by": "easel", "easel": m, "ready": live}))
        .collect();
    Ok(Json(serde_json::json!({"object": "list", "data": data})))
}

/// The LoRA registry's names, for `loras` in requests.
async fn list_loras(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Json<serde_json::Value>> {
    state.authorize(&headers)?;
    let data: Vec<_> = state.loras.names().into_iter().map(|name| serde_json::json!({"name": name, "object": "lora"})).collect();
    Ok(Json(serde_json::json!({"object": "list", "data": data})))
}

#[derive(serde::Deserialize)]
struct UsageQuery {
    /// First UTC day (YYYY-MM-DD) to include.
    since: Option<String>,
}

/// Cost and volume per day, API key, provider and model. A key sees only its own rows.
async fn usage(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<axum::extract::Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let caller = state.authorize(&headers)?;
    let axum::extract::Query(q) = query.map_err(|e| ApiError::invalid("since", format!("bad query string: {}", e.body_text())))?;
    if let Some(since) = &q.since {
        let ok = since.len() == 10 && since.chars().enumerate().all(|(i, c)| if i == 4 || i == 7 { c == '-' } else { c.is_ascii_digit() });
        if !ok {
            return Err(ApiError::invalid("since", "since must be a UTC day, YYYY-MM-DD").into());
        }
    }
    let Some(ledger) = &state.ledger else { return Ok(Json(serde_json::json!({"object": "list", "data": []}))) };
    let rows = ledger.usage(q.since.as_deref(), caller.usage_scope()).map_err(|e| ApiError::unavailable(format!("the ledger is unavailable: {e}")))?;
    let total: f64 = rows.iter().map(|r| r.cost_usd).sum();
    Ok(Json(serde_json::json!({"object": "list", "data": rows, "total_cost_usd": total})))
}

#[derive(serde::Deserialize)]
struct SignedQuery {
    expires: Option<u64>,
    sig: Option<String>,
}

/// A stored image: with a valid signature (from a response, event or webhook), or with the key
/// that owns the job; without keys configured, to anyone.
async fn get_image(
    State(state): State<AppState>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<axum::extract::Query<SignedQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Path((job, file)) = path.map_err(|_| ApiError::not_found("no such image"))?;
    let key = format!("{job}/{file}");
    if !crate::store::valid_key(&key) {
        return Err(ApiError::not_found("no such image").into());
    }
    let signed = query.ok().and_then(|q| Some((q.0.expires?, q.0.sig?)));
    match signed {
        Some((expires, sig)) => state.image_urls.verify(&key, expires, &sig).map_err(|e| ApiError::forbidden(e.to_string()))?,
        None if state.config.api_keys.is_some() => {
            let caller = state.authorize(&headers)?;
            state.job_for(&caller, &job).map_err(|_| ApiError::not_found("no such image"))?;
        }
        None => {}
    }
    let bytes = state.store.get(&key).map_err(|e| match e {
        crate::store::StoreError::NotFound => ApiError::not_found("no such image"),
        other => ApiError::unavailable(format!("the image store is unavailable: {other}")),
    })?;
    let mime = match file.rsplit('.').next() {
        Some("png") => "image/png",
        Some("jpeg") | Some("jpg") => "image/jpeg",
        Some("webp") => "image/webp",
        _ => "application/octet-stream",
    };
    Ok(([(header::CONTENT_TYPE, mime)], bytes).into_response())
}

async fn readyz(State(state): State<AppState>) -> ApiResult<&'static str> {
    state.queue.depth().map_err(queue_error)?;
    if !state.catalogue()?.iter().any(|(_, live)| *live) {
        return Err(ApiError::unavailable("no worker is serving any model").into());
    }
    Ok("ready")
}

async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    if state.config.metrics_need_admin && state.config.api_keys.is_some() {
        match state.authorize(&headers)? {
            Caller::Key { admin: true, .. } => {}
            _ => return Err(ApiError::unauthorized("/metrics needs an admin key").into()),
        }
    }
    let depth = state.queue.depth().unwrap_or(0);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render(depth, &state.executor.warm_models())).into_response())
}
