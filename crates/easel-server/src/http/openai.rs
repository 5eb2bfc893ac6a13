//! OpenAI's images API: `POST /v1/images/generations`, waiting for the job and answering in
//! OpenAI's shape (b64_json or signed URLs), with hot cache hits served from memory.

use super::*;

pub(super) async fn generations(State(state): State<AppState>, headers: HeaderMap, body: Result<Bytes, axum::extract::rejection::BytesRejection>) -> ApiResult<Response> {
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

pub(super) fn json_bytes(bytes: Bytes) -> Response {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], bytes).into_response()
}

/// A stored image as base64, from memory when it was served recently.
pub(super) fn b64_image(state: &AppState, key: &str) -> Result<Arc<String>, ApiError> {
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

pub(super) fn absolute_url(headers: &HeaderMap, path: &str) -> String {
    match headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
        Some(host) => format!("http://{host}{path}"),
        None => path.to_string(),
    }
}

