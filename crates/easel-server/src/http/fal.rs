//! fal's queue protocol under `/fal`, so code written against fal moves to easel by pointing
//! its queue host at easel (`FAL_QUEUE_RUN_HOST=HOST/fal` for fal's official client, which
//! speaks https only: put easel behind TLS).
//!
//! `POST /fal/{app}` queues an easel job and answers `request_id`, `status_url`,
//! `response_url` and `cancel_url`; the client follows those URLs as given. Status is
//! `IN_QUEUE` (with `queue_position`), `IN_PROGRESS` or `COMPLETED` (failed and canceled
//! requests are `COMPLETED` with an `error`, and their result answers with fal's `detail`);
//! the result is fal's image output (`images[{url, width, height, content_type}]`, `seed`,
//! `timings`, `has_nsfw_concepts`, `prompt`). Status and result also answer under
//! `/fal/{owner}/{alias}/requests/{id}`, the path fal's client builds from a request id. The
//! app names the model: the whole app id if easel serves it (or aliases it), else its last
//! part (`easel/tiny` is `tiny`). Pictures come as fal's image-to-image, fill and inpainting
//! apps take them (`image_url`, `mask_url`, `strength`), as data URIs only: easel fetches no
//! URL a caller names. fal's `fal_webhook` is not implemented.

use super::*;

/// fal's error body: `{"detail": ...}`.
pub(super) struct FalError(ApiError);

impl From<ApiError> for FalError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for FalError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(serde_json::json!({"detail": self.0.body.message}))).into_response()
    }
}

type FalResult<T> = Result<T, FalError>;

/// fal's named image sizes.
fn preset(name: &str) -> Option<(u64, u64)> {
    Some(match name {
        "square_hd" => (1024, 1024),
        "square" => (512, 512),
        "portrait_4_3" => (768, 1024),
        "portrait_16_9" => (576, 1024),
        "landscape_4_3" => (1024, 768),
        "landscape_16_9" => (1024, 576),
        _ => return None,
    })
}

/// fal's arguments, mapped to easel's request.
fn request(model: String, args: &serde_json::Map<String, serde_json::Value>) -> Result<ImageRequest, ApiError> {
    let get = |k: &str| args.get(k).filter(|v| !v.is_null());
    let int = |k: &str| get(k).map(|v| v.as_i64().ok_or_else(|| ApiError::invalid(k, format!("{k} must be an integer")))).transpose();
    let prompt = get("prompt").and_then(|v| v.as_str()).ok_or_else(|| ApiError::invalid("prompt", "prompt is required (a string)"))?;
    let mut req = ImageRequest {
        prompt: prompt.to_string(),
        model: Some(model),
        negative_prompt: get("negative_prompt").and_then(|v| v.as_str()).filter(|p| !p.is_empty()).map(str::to_string),
        n: int("num_images")?,
        steps: int("num_inference_steps")?,
        guidance_scale: get("guidance_scale").map(|v| v.as_f64().ok_or_else(|| ApiError::invalid("guidance_scale", "guidance_scale must be a number"))).transpose()?,
        seed: int("seed")?.filter(|s| *s >= 0).map(|s| s as u64),
        ..Default::default()
    };
    req.size = match get("image_size") {
        None => None,
        Some(serde_json::Value::String(name)) => {
            let (w, h) = preset(name).ok_or_else(|| ApiError::invalid("image_size", format!("image_size `{name}` is not one of square_hd, square, portrait_4_3, portrait_16_9, landscape_4_3, landscape_16_9")))?;
            Some(format!("{w}x{h}"))
        }
        Some(v) => {
            let side = |k: &str| v.get(k).and_then(|x| x.as_u64()).ok_or_else(|| ApiError::invalid("image_size", "image_size must be a preset name or {width, height}"));
            Some(format!("{}x{}", side("width")?, side("height")?))
        }
    };
    // Pictures in, as fal's image-to-image, fill and inpainting apps take them: file inputs as
    // data URIs (fal_client.encode_image); easel fetches no URL a caller names.
    let picture = |k: &str| -> Result<Option<String>, ApiError> {
        match get(k) {
            None => Ok(None),
            Some(serde_json::Value::String(uri)) if uri.starts_with("data:") => Ok(Some(uri.clone())),
            Some(_) => Err(ApiError::invalid(k, format!("{k} must be a data URI (data:image/png;base64,...): easel fetches no URLs"))),
        }
    };
    req.image = picture("image_url")?;
    req.mask = picture("mask_url")?;
    req.strength = get("strength").map(|v| v.as_f64().ok_or_else(|| ApiError::invalid("strength", "strength must be a number"))).transpose()?;
    req.output_format = match get("output_format").map(|v| v.as_str().unwrap_or("")) {
        None => None,
        Some("png") => Some(OutputFormat::Png),
        Some("jpeg") => Some(OutputFormat::Jpeg),
        Some(f) => return Err(ApiError::invalid("output_format", format!("output_format `{f}` is not jpeg or png"))),
    };
    Ok(req)
}

/// The model an app id means: the whole id if easel knows it, else its last part.
fn model_for(state: &AppState, app: &str) -> String {
    let known = |m: &str| state.model(Some(m)).is_ok() || state.gateway.as_ref().is_some_and(|g| g.router.knows(m));
    if known(app) {
        return app.to_string();
    }
    app.rsplit('/').next().unwrap_or(app).to_string()
}

/// Where the client reached easel's fal queue (`X-Forwarded-Proto` honoured behind TLS).
fn queue_base(headers: &HeaderMap) -> String {
    format!("{}/fal", public_base(headers))
}

fn request_urls(base: &str, app: &str, id: &str) -> serde_json::Value {
    let root = format!("{base}/{app}/requests/{id}");
    serde_json::json!({"response_url": root, "status_url": format!("{root}/status"), "cancel_url": format!("{root}/cancel")})
}

/// `POST /fal/{app}`: queue a request.
pub(super) async fn submit_app(
    State(state): State<AppState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> FalResult<Json<serde_json::Value>> {
    let Path(app) = path.map_err(|_| ApiError::not_found("no such app"))?;
    let body = read_body(body, state.config.max_body_bytes).await?;
    let caller = state.authorize(&headers)?;
    let args: serde_json::Map<String, serde_json::Value> = parse_body(&body)?;
    let req = request(model_for(&state, &app), &args)?;
    let Submitted { job, .. } = submit_request_off_runtime(&state, &caller, req, |_| {}).await?;
    let position = state.queue.position(&job.id).map_err(queue_error)?.unwrap_or(0);
    let mut out = request_urls(&queue_base(&headers), &app, &job.id);
    out["request_id"] = job.id.clone().into();
    out["queue_position"] = position.into();
    out["status"] = "IN_QUEUE".into();
    Ok(Json(out))
}

/// What follows `/fal/`: an app path, `requests`, the id, and what is asked of it.
struct RequestPath {
    app: String,
    id: String,
    /// "", "status" or "cancel".
    action: String,
}

fn parse_request_path(rest: &str) -> Option<RequestPath> {
    let (app, tail) = rest.rsplit_once("/requests/")?;
    let (id, action) = tail.split_once('/').unwrap_or((tail, ""));
    (!app.is_empty() && !id.is_empty() && matches!(action, "" | "status" | "cancel")).then(|| RequestPath { app: app.to_string(), id: id.to_string(), action: action.to_string() })
}

/// `GET /fal/{app}/requests/{id}/status` and `GET /fal/{app}/requests/{id}` (the result).
pub(super) async fn get_request(State(state): State<AppState>, headers: HeaderMap, path: Result<Path<String>, PathRejection>) -> FalResult<Response> {
    let Path(rest) = path.map_err(|_| ApiError::not_found("no such request"))?;
    let caller = state.authorize(&headers)?;
    let p = parse_request_path(&rest).ok_or_else(|| ApiError::not_found("no such request"))?;
    let job = state.job_for(&caller, &p.id)?;
    let urls = request_urls(&queue_base(&headers), &p.app, &job.id);
    match p.action.as_str() {
        "status" => {
            let mut out = urls;
            out["request_id"] = job.id.clone().into();
            match job.status {
                JobStatus::Queued => {
                    out["status"] = "IN_QUEUE".into();
                    out["queue_position"] = state.queue.position(&job.id).map_err(queue_error)?.unwrap_or(0).into();
                }
                JobStatus::Running => {
                    out["status"] = "IN_PROGRESS".into();
                    out["logs"] = serde_json::Value::Null;
                }
                s => {
                    out["status"] = "COMPLETED".into();
                    out["logs"] = serde_json::Value::Null;
                    out["metrics"] = serde_json::json!({"inference_time": job.result.as_ref().map(|r| r.timings.total_s)});
                    if s != JobStatus::Succeeded {
                        out["error"] = job.error.clone().unwrap_or_else(|| "canceled".into()).into();
                        out["error_type"] = if s == JobStatus::Canceled { "request_cancelled" } else { "generation_failed" }.into();
                    }
                }
            }
            Ok(Json(out).into_response())
        }
        "" => result(&state, &headers, &job),
        _ => Err(ApiError::not_found("cancel takes PUT").into()),
    }
}

fn result(state: &AppState, headers: &HeaderMap, job: &Job) -> FalResult<Response> {
    match job.status {
        JobStatus::Succeeded => {}
        JobStatus::Queued | JobStatus::Running => return Err(ApiError::invalid("request_id", "Request is still in progress").into()),
        _ => return Err(unsuccessful(job).into()),
    }
    let r = job.result.as_ref().ok_or_else(|| ApiError::internal("succeeded job without result"))?;
    let base = queue_base(headers);
    let origin = base.strip_suffix("/fal").unwrap_or(&base);
    let s = &job.spec;
    let images: Vec<_> = r
        .images
        .iter()
        .map(|i| serde_json::json!({"url": format!("{origin}{}", state.image_urls.path(&i.key)), "width": s.width, "height": s.height, "content_type": s.output_format.mime()}))
        .collect();
    Ok(Json(serde_json::json!({
        "images": images,
        "timings": {"inference": r.timings.denoise_s + r.timings.decode_s + r.timings.text_encode_s},
        "seed": r.images.first().map(|i| i.seed).unwrap_or(s.seed),
        "has_nsfw_concepts": vec![false; r.images.len()],
        "prompt": s.prompt,
    }))
    .into_response())
}

/// `PUT /fal/{app}/requests/{id}/cancel`.
pub(super) async fn cancel_request(State(state): State<AppState>, headers: HeaderMap, path: Result<Path<String>, PathRejection>) -> FalResult<Response> {
    let Path(rest) = path.map_err(|_| ApiError::not_found("no such request"))?;
    let caller = state.authorize(&headers)?;
    let p = parse_request_path(&rest).filter(|p| p.action == "cancel").ok_or_else(|| ApiError::not_found("no such request"))?;
    let job = state.job_for(&caller, &p.id)?;
    if job.status.is_final() {
        return Ok((StatusCode::BAD_REQUEST, Json(serde_json::json!({"status": "ALREADY_COMPLETED"}))).into_response());
    }
    if state.queue.cancel(&job.id).map_err(queue_error)? == Some(JobStatus::Canceled) {
        state.bus.publish(Event::Canceled { job_id: job.id.clone() });
    }
    Ok((StatusCode::ACCEPTED, Json(serde_json::json!({"status": "CANCELLATION_REQUESTED"}))).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fal_request_paths_name_the_app_the_request_and_the_action() {
        let p = parse_request_path("fal-ai/flux/dev/requests/job_1/status").unwrap();
        assert_eq!((p.app.as_str(), p.id.as_str(), p.action.as_str()), ("fal-ai/flux/dev", "job_1", "status"));
        let p = parse_request_path("fal-ai/flux/requests/job_1").unwrap();
        assert_eq!((p.app.as_str(), p.action.as_str()), ("fal-ai/flux", ""));
        assert!(parse_request_path("fal-ai/flux/requests/job_1/logs").is_none());
        assert!(parse_request_path("fal-ai/flux/dev").is_none());
    }

    #[test]
    fn fal_arguments_map_to_easel_requests() {
        let args = serde_json::json!({"prompt": "a cat", "image_size": "landscape_4_3", "num_images": 2, "num_inference_steps": 4, "seed": 7, "output_format": "jpeg", "enable_safety_checker": true});
        let r = request("tiny".into(), args.as_object().unwrap()).unwrap();
        assert_eq!((r.size.as_deref(), r.n, r.steps, r.seed, r.output_format), (Some("1024x768"), Some(2), Some(4), Some(7), Some(OutputFormat::Jpeg)));
        let args = serde_json::json!({"prompt": "a cat", "image_size": {"width": 64, "height": 96}});
        assert_eq!(request("tiny".into(), args.as_object().unwrap()).unwrap().size.as_deref(), Some("64x96"));
        let bad = serde_json::json!({"prompt": "a cat", "image_size": "huge"});
        assert_eq!(request("tiny".into(), bad.as_object().unwrap()).unwrap_err().body.param.as_deref(), Some("image_size"));
        assert_eq!(request("tiny".into(), &serde_json::Map::new()).unwrap_err().body.param.as_deref(), Some("prompt"));
    }

    #[test]
    fn fal_pictures_come_as_data_uris_with_strength_and_urls_are_refused_naming_the_field() {
        let png = "data:image/png;base64,iVBORw0KGgo=";
        let args = serde_json::json!({"prompt": "a cat", "image_url": png, "mask_url": png, "strength": 0.6});
        let r = request("tiny".into(), args.as_object().unwrap()).unwrap();
        assert_eq!((r.image.as_deref(), r.mask.as_deref(), r.strength), (Some(png), Some(png), Some(0.6)));
        for field in ["image_url", "mask_url"] {
            let args = serde_json::json!({"prompt": "a cat", field: "https://example.com/cat.png"});
            let e = request("tiny".into(), args.as_object().unwrap()).unwrap_err();
            assert_eq!(e.body.param.as_deref(), Some(field), "{}", e.body.message);
        }
        let bad = serde_json::json!({"prompt": "a cat", "image_url": png, "strength": "lots"});
        assert_eq!(request("tiny".into(), bad.as_object().unwrap()).unwrap_err().body.param.as_deref(), Some("strength"));
    }
}
