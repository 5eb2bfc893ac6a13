//! Replicate's predictions API, so code written against Replicate (its official clients
//! included) moves to easel by changing the base URL: `POST /v1/models/{owner}/{name}/predictions`
//! and `POST /v1/predictions` (with `Prefer: wait`), `GET /v1/predictions/{id}`,
//! `POST /v1/predictions/{id}/cancel`, and webhooks in Replicate's shape, signed the Standard
//! Webhooks way with the secret `GET /v1/webhooks/default/secret` gives.
//!
//! A prediction is an easel job (its id is the job's); its input is mapped to easel's request
//! (`num_outputs`, `num_inference_steps`, `guidance_scale` or `guidance`, `aspect_ratio`, ...)
//! and takes the same path as every job. The model is `owner/name` if easel serves that id or
//! alias, else `name`. Statuses: queued is `starting`, running `processing`. A `Prefer: wait`
//! that runs out answers `starting`, because Replicate's clients take any other status of a
//! blocking answer as final. Webhooks: `completed` and `output` events are sent (once, at the
//! end: easel's outputs all arrive together); `start` and `logs` are not.

use super::*;

/// Replicate's error body (RFC 7807), which its clients read.
pub(super) struct Problem(ApiError);

impl From<ApiError> for Problem {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl From<ApiResponseError> for Problem {
    fn from(e: ApiResponseError) -> Self {
        Self(e.0)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let e = self.0;
        let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let title = status.canonical_reason().unwrap_or("Error");
        let body = serde_json::json!({"type": format!("https://easel/problems/{}", e.body.code.as_deref().unwrap_or("error")), "title": title, "status": e.status, "detail": e.body.message});
        let mut resp = (status, [(header::CONTENT_TYPE, "application/problem+json")], body.to_string()).into_response();
        if let Some(s) = e.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

type ProblemResult<T> = Result<T, Problem>;

/// A prediction request's body.
#[derive(serde::Deserialize)]
struct CreatePrediction {
    /// `owner/name:version`, `owner/name` or a version id (the model's id in easel).
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    input: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    webhook: Option<String>,
    #[serde(default)]
    webhook_events_filter: Option<Vec<String>>,
}

/// Replicate's scheduler names (SDXL-style models) as easel's.
fn scheduler(name: &str) -> Option<&'static str> {
    Some(match name {
        "K_EULER" => "euler",
        "K_EULER_ANCESTRAL" => "euler-a",
        "DDIM" => "ddim",
        "DPMSolverMultistep" => "dpmpp-2m",
        "KarrasDPM" => "dpmpp-2m-karras",
        _ => return None,
    })
}

/// A model's version id, as Replicate's 64 hex digits (stable for the model's name).
pub(crate) fn version_id(model: &str) -> String {
    hex::encode(Sha256::digest(format!("easel model {model}").as_bytes()))
}

/// The model a bare version id names, among the models and aliases served here.
fn model_of_version(state: &AppState, version: &str) -> Option<String> {
    let mut names: Vec<String> = state.catalogue().ok()?.into_iter().map(|(m, _)| m.id).collect();
    if let Some(g) = &state.gateway {
        names.extend(g.router.config().aliases.keys().cloned());
    }
    names.into_iter().find(|m| version_id(m) == version)
}

/// The model a Replicate name means here: `owner/name` if served or aliased as such, else `name`.
fn resolve_model(state: &AppState, name: &str) -> String {
    let known = |m: &str| state.model(Some(m)).is_ok() || state.gateway.as_ref().is_some_and(|g| g.router.knows(m));
    match name.split_once('/') {
        Some((_, short)) if !known(name) && known(short) => short.to_string(),
        _ => name.to_string(),
    }
}

/// Replicate's input, mapped to easel's request.
fn request(state: &AppState, model: String, input: &serde_json::Map<String, serde_json::Value>) -> Result<ImageRequest, ApiError> {
    let text = |k: &str| -> Result<Option<String>, ApiError> {
        match input.get(k) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(ApiError::invalid(&format!("input.{k}"), format!("input.{k} must be a string"))),
        }
    };
    let int = |k: &str| -> Result<Option<i64>, ApiError> {
        match input.get(k) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => v.as_i64().map(Some).ok_or_else(|| ApiError::invalid(&format!("input.{k}"), format!("input.{k} must be an integer"))),
        }
    };
    let num = |k: &str| -> Result<Option<f64>, ApiError> {
        match input.get(k) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| ApiError::invalid(&format!("input.{k}"), format!("input.{k} must be a number"))),
        }
    };
    let prompt = text("prompt")?.ok_or_else(|| ApiError::invalid("input.prompt", "input.prompt is required"))?;
    let mut req = ImageRequest {
        prompt,
        model: Some(model),
        negative_prompt: text("negative_prompt")?.filter(|p| !p.is_empty()),
        n: int("num_outputs")?,
        steps: int("num_inference_steps")?,
        guidance_scale: num("guidance_scale")?.or(num("guidance")?),
        seed: int("seed")?.filter(|s| *s >= 0).map(|s| s as u64),
        ..Default::default()
    };
    if let Some(s) = text("scheduler")? {
        req.scheduler = Some(scheduler(&s).ok_or_else(|| ApiError::invalid("input.scheduler", format!("scheduler `{s}` is not available; use K_EULER, K_EULER_ANCESTRAL, DDIM, DPMSolverMultistep or KarrasDPM")))?.to_string());
    }
    req.output_format = match text("output_format")?.as_deref() {
        None => None,
        Some("png") => Some(OutputFormat::Png),
        Some("jpg") | Some("jpeg") => Some(OutputFormat::Jpeg),
        Some("webp") => Some(OutputFormat::Webp),
        Some(f) => return Err(ApiError::invalid("input.output_format", format!("output_format `{f}` is not one of webp, jpg, png"))),
    };
    let (w, h) = (int("width")?, int("height")?);
    if w.is_some() || h.is_some() {
        req.size = Some(format!("{}x{}", w.or(h).unwrap_or(0), h.or(w).unwrap_or(0)));
    } else if let Some(ratio) = text("aspect_ratio")? {
        req.size = Some(size_for_ratio(state, req.model.as_deref(), &ratio)?);
    }
    Ok(req)
}

/// `W:H` at the model's default area, on its size grid.
fn size_for_ratio(state: &AppState, model: Option<&str>, ratio: &str) -> Result<String, ApiError> {
    let bad = || ApiError::invalid("input.aspect_ratio", format!("aspect_ratio must be W:H, got `{ratio}`"));
    let (a, b) = ratio.split_once(':').ok_or_else(bad)?;
    let (a, b): (f64, f64) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
    if !(a > 0.0 && b > 0.0 && a / b < 16.0 && b / a < 16.0) {
        return Err(bad());
    }
    let info = state.model(model).map(|(m, _)| m).ok();
    let (side, grid) = info.map(|m| (m.default_size as f64, m.size_multiple.max(1) as f64)).unwrap_or((1024.0, 16.0));
    let w = (side * (a / b).sqrt() / grid).round().max(1.0) * grid;
    let h = (side * (b / a).sqrt() / grid).round().max(1.0) * grid;
    Ok(format!("{}x{}", w as usize, h as usize))
}

/// Unix seconds as RFC 3339 UTC (`2025-01-02T03:04:05.678Z`), as Replicate writes times.
pub(crate) fn rfc3339(t: f64) -> String {
    let secs = t.floor() as i64;
    let millis = ((t - t.floor()) * 1000.0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + (month <= 2) as i64;
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// A job as Replicate's prediction object; `base` makes its URLs absolute.
pub(crate) fn prediction(job: &Job, base: &str, urls: &crate::image_urls::ImageUrls) -> serde_json::Value {
    let s = &job.spec;
    let status = match job.status {
        JobStatus::Queued => "starting",
        JobStatus::Running => "processing",
        JobStatus::Succeeded => "succeeded",
        JobStatus::Failed => "failed",
        JobStatus::Canceled => "canceled",
    };
    let output = job.result.as_ref().filter(|_| job.status == JobStatus::Succeeded).map(|r| r.images.iter().map(|i| format!("{base}{}", urls.path(&i.key))).collect::<Vec<_>>());
    serde_json::json!({
        "id": job.id,
        "model": s.model,
        "version": version_id(&s.model),
        "input": {
            "prompt": s.prompt, "negative_prompt": s.negative_prompt, "width": s.width, "height": s.height,
            "num_outputs": s.n, "num_inference_steps": s.steps, "guidance_scale": s.guidance, "seed": s.seed,
        },
        "output": output,
        "logs": "",
        "error": job.error.as_ref().filter(|_| job.status == JobStatus::Failed),
        "status": status,
        "data_removed": false,
        "source": "api",
        "created_at": rfc3339(job.created_at),
        "started_at": job.started_at.map(rfc3339),
        "completed_at": job.finished_at.map(rfc3339),
        "metrics": job.result.as_ref().map(|r| serde_json::json!({"predict_time": r.timings.total_s, "image_count": r.images.len()})),
        "urls": {
            "get": format!("{base}/v1/predictions/{}", job.id),
            "cancel": format!("{base}/v1/predictions/{}/cancel", job.id),
        },
    })
}

/// How long `Prefer: wait[=N]` asks to wait (Replicate's limit is 60 s).
fn prefer_wait(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("prefer")?.to_str().ok()?.trim().to_ascii_lowercase();
    let secs = match v.strip_prefix("wait") {
        Some("") => 60,
        Some(rest) => rest.trim_start_matches('=').trim().parse::<u64>().ok()?.clamp(1, 60),
        None => return None,
    };
    Some(Duration::from_secs(secs))
}

async fn create(state: &AppState, headers: &HeaderMap, body: &Bytes, model: Option<String>) -> ProblemResult<Response> {
    let caller = state.authorize(headers)?;
    let p: CreatePrediction = parse_body(body)?;
    let name = match (model, &p.version) {
        (Some(m), _) => m,
        // `owner/name:version` and `owner/name` name the model; a bare version id is looked up.
        (None, Some(v)) if v.contains('/') => v.split(':').next().unwrap_or(v).to_string(),
        (None, Some(v)) => model_of_version(state, v).unwrap_or_else(|| v.clone()),
        (None, None) => return Err(ApiError::invalid("version", "version (or a model path) is required").into()),
    };
    let mut req = request(state, resolve_model(state, &name), &p.input)?;
    let wants_completion = p.webhook_events_filter.as_ref().is_none_or(|f| f.iter().any(|e| e == "completed" || e == "output"));
    if let Some(events) = &p.webhook_events_filter {
        if let Some(bad) = events.iter().find(|e| !["start", "output", "logs", "completed"].contains(&e.as_str())) {
            return Err(ApiError::invalid("webhook_events_filter", format!("unknown webhook event `{bad}`; use start, output, logs or completed")).into());
        }
    }
    req.webhook_url = p.webhook.clone().filter(|_| wants_completion);
    let base = public_base(headers);
    let idempotency = idempotency_key(headers, &caller)?;
    let fingerprint = fingerprint(body);
    let format = easel_api::WebhookFormat::Replicate { base_url: base.clone() };
    let submitted = submit_request(state, &caller, &req, idempotency.as_deref().map(|key| easel_queue::Idempotency { key, fingerprint: &fingerprint }), &|spec| {
        spec.webhook_format = Some(format.clone());
    })?;
    let mut job = submitted.job;
    if let Some(wait) = prefer_wait(headers) {
        if let Ok(done) = tokio::time::timeout(wait, wait_final(state, &job.id)).await {
            job = done?;
        }
    }
    let mut body = prediction(&job, &base, &state.image_urls);
    if !job.status.is_final() {
        body["status"] = "starting".into();
    }
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

pub(super) async fn create_for_model(
    State(state): State<AppState>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ProblemResult<Response> {
    let Path((owner, name)) = path.map_err(|_| ApiError::not_found("no such model"))?;
    let body = read_body(body, state.config.max_body_bytes).await?;
    create(&state, &headers, &body, Some(format!("{owner}/{name}"))).await
}

pub(super) async fn create_for_version(State(state): State<AppState>, headers: HeaderMap, body: Result<Bytes, axum::extract::rejection::BytesRejection>) -> ProblemResult<Response> {
    let body = read_body(body, state.config.max_body_bytes).await?;
    create(&state, &headers, &body, None).await
}

pub(super) async fn get_prediction(State(state): State<AppState>, headers: HeaderMap, id: Result<Path<String>, PathRejection>) -> ProblemResult<Json<serde_json::Value>> {
    let caller = state.authorize(&headers)?;
    let job = state.job_for(&caller, &job_id(id)?)?;
    Ok(Json(prediction(&job, &public_base(&headers), &state.image_urls)))
}

pub(super) async fn cancel_prediction(State(state): State<AppState>, headers: HeaderMap, id: Result<Path<String>, PathRejection>) -> ProblemResult<Json<serde_json::Value>> {
    let caller = state.authorize(&headers)?;
    let id = job_id(id)?;
    state.job_for(&caller, &id)?;
    if state.queue.cancel(&id).map_err(queue_error)? == Some(JobStatus::Canceled) {
        state.bus.publish(Event::Canceled { job_id: id.clone() });
    }
    let job = state.job_for(&caller, &id)?;
    Ok(Json(prediction(&job, &public_base(&headers), &state.image_urls)))
}

/// `GET /v1/models/{owner}/{name}/versions/{id}`: what Replicate's client reads of a version
/// before running `owner/name:version`.
pub(super) async fn get_version(
    State(state): State<AppState>,
    headers: HeaderMap,
    path: Result<Path<(String, String, String)>, PathRejection>,
) -> ProblemResult<Json<serde_json::Value>> {
    state.authorize(&headers)?;
    let Path((owner, name, id)) = path.map_err(|_| ApiError::not_found("no such version"))?;
    let model = resolve_model(&state, &format!("{owner}/{name}"));
    if version_id(&model) != id {
        return Err(ApiError::not_found(format!("model {owner}/{name} has no version {id}")).into());
    }
    Ok(Json(serde_json::json!({"id": id, "created_at": rfc3339(0.0), "cog_version": "easel", "openapi_schema": {}})))
}

/// The key Replicate-shaped webhooks are signed with, as `whsec_<base64>`.
pub(super) async fn webhook_secret(State(state): State<AppState>, headers: HeaderMap) -> ProblemResult<Json<serde_json::Value>> {
    state.authorize(&headers)?;
    Ok(Json(serde_json::json!({ "key": state.webhook_signing.replicate_secret() })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicate_times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0.0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_764_115_200.25), "2025-11-26T00:00:00.250Z");
        assert_eq!(rfc3339(951_782_400.0), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn prefer_wait_is_read_as_replicate_defines_it() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert("prefer", HeaderValue::from_str(v).unwrap());
            prefer_wait(&m)
        };
        assert_eq!(h("wait"), Some(Duration::from_secs(60)));
        assert_eq!(h("wait=5"), Some(Duration::from_secs(5)));
        assert_eq!(h("wait=600"), Some(Duration::from_secs(60)));
        assert_eq!(h("respond-async"), None);
        assert_eq!(prefer_wait(&HeaderMap::new()), None);
    }

    #[test]
    fn replicate_scheduler_names_map_to_easel_schedulers() {
        assert_eq!(scheduler("K_EULER_ANCESTRAL"), Some("euler-a"));
        assert_eq!(scheduler("KarrasDPM"), Some("dpmpp-2m-karras"));
        assert_eq!(scheduler("PNDM"), None);
    }
}
