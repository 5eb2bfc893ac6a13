//! OpenAI's images API: `POST /v1/images/generations` and `POST /v1/images/edits` (multipart),
//! waiting for the job and answering in OpenAI's shape (b64_json or signed URLs), with hot cache
//! hits served from memory.
//!
//! An edit is a generation with a picture: the multipart form becomes the same request as a
//! JSON body (`image`, and `mask` with OpenAI's meaning turned into easel's), so it is
//! validated, routed, queued, cached and answered by the one path.

use axum::extract::Multipart;

use super::*;

pub(super) async fn generations(State(state): State<AppState>, headers: HeaderMap, body: Result<Bytes, axum::extract::rejection::BytesRejection>) -> ApiResult<Response> {
    let body = read_body(body, state.config.max_body_bytes).await?;
    answer(&state, &headers, &body).await
}

/// `POST /v1/images/edits`: OpenAI's multipart form (`image` or `image[]`, `mask`, `prompt`,
/// `model`, `n`, `size`, `response_format`, and easel's own fields as text parts).
pub(super) async fn edits(State(state): State<AppState>, headers: HeaderMap, form: Result<Multipart, axum::extract::multipart::MultipartRejection>) -> ApiResult<Response> {
    let form = form.map_err(|e| ApiError::bad_body(format!("images/edits takes a multipart/form-data body: {}", e.body_text())))?;
    let body = edit_request(form, state.config.max_body_bytes).await?;
    answer(&state, &headers, &body).await
}

/// The fields of an edit form whose values are numbers in the JSON request.
const NUMERIC_FIELDS: [&str; 11] = [
    "n",
    "seed",
    "steps",
    "guidance_scale",
    "strength",
    "output_compression",
    "priority",
    "preview_every",
    "skip_layer_guidance_scale",
    "skip_layer_guidance_start",
    "skip_layer_guidance_stop",
];
/// The fields of an edit form whose values are JSON (arrays, objects) in the JSON request.
const JSON_FIELDS: [&str; 4] = ["loras", "skip_guidance_layers", "ip_adapter", "controlnets"];

/// An edit form's parts as read off the wire, before any picture is decoded.
struct EditForm {
    image: Bytes,
    mask: Option<Bytes>,
    /// The text parts, already typed as the JSON request has them.
    fields: serde_json::Map<String, serde_json::Value>,
}

/// An edit form as the JSON body of the equivalent generation request. The parts are read on
/// the runtime; decoding the mask (and the picture's own alpha) is CPU work and runs on the
/// blocking pool, as request validation does.
async fn edit_request(form: Multipart, limit: usize) -> Result<Bytes, ApiError> {
    let form = read_edit_form(form, limit).await?;
    tokio::task::spawn_blocking(move || edit_body(form)).await.map_err(|e| ApiError::internal(format!("reading the edit form stopped: {e}")))?
}

async fn read_edit_form(mut form: Multipart, limit: usize) -> Result<EditForm, ApiError> {
    let multipart_error = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return ApiError::too_large(limit);
        }
        ApiError::bad_body(format!("the multipart body is malformed: {}", e.body_text()))
    };
    let (mut image, mut mask, mut fields) = (None, None, serde_json::Map::new());
    while let Some(part) = form.next_field().await.map_err(multipart_error)? {
        let name = part.name().unwrap_or_default().to_string();
        let bytes = part.bytes().await.map_err(multipart_error)?;
        match name.as_str() {
            "image" | "image[]" if image.is_some() => return Err(ApiError::invalid("image", "local models edit one image; send one `image`")),
            "image" | "image[]" => image = Some(bytes),
            "mask" => mask = Some(bytes),
            field => {
                let text = String::from_utf8(bytes.to_vec()).map_err(|_| ApiError::invalid(field, format!("{field} must be text")))?;
                let value = if NUMERIC_FIELDS.contains(&field) {
                    let number: serde_json::Number = text.trim().parse().map_err(|_| ApiError::invalid(field, format!("{field} must be a number, got `{text}`")))?;
                    serde_json::Value::Number(number)
                } else if JSON_FIELDS.contains(&field) {
                    serde_json::from_str(&text).map_err(|e| ApiError::invalid(field, format!("{field} must be JSON: {e}")))?
                } else {
                    serde_json::Value::String(text)
                };
                fields.insert(field.to_string(), value);
            }
        }
    }
    let image = image.ok_or_else(|| ApiError::invalid("image", "images/edits needs an `image` to edit"))?;
    Ok(EditForm { image, mask, fields })
}

/// The JSON request of an edit form: the picture as base64, and the mask turned from OpenAI's
/// meaning into easel's. Without a mask, OpenAI edits where the picture itself is fully
/// transparent, if anywhere.
fn edit_body(form: EditForm) -> Result<Bytes, ApiError> {
    let EditForm { image, mask, mut fields } = form;
    let mask = match mask {
        Some(bytes) => Some(easel_api::decode_openai_mask("mask", &bytes)?),
        None => transparency_mask(&image),
    };
    fields.insert("image".into(), serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(&image)));
    if let Some(mask) = mask {
        fields.insert("mask".into(), serde_json::Value::String(mask.to_base64_png()));
    }
    Ok(Bytes::from(serde_json::Value::Object(fields).to_string()))
}

/// The edit mask a picture carries in its own alpha channel: its fully transparent pixels, or
/// `None` when it has none (or is not a picture: validation names that later).
fn transparency_mask(image: &[u8]) -> Option<easel_api::InputImage> {
    easel_api::decode_openai_mask("image", image).ok().filter(|mask| mask.rgb().contains(&255))
}

/// Submits a request body, waits for its job and answers in OpenAI's shape.
async fn answer(state: &AppState, headers: &HeaderMap, body: &Bytes) -> ApiResult<Response> {
    let Submitted { job, format, hit } = submit_off_runtime(state, headers, body).await.inspect_err(|e| state.metrics.error(&format!("http_{}", e.status)))?;
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
                let url = state.store.signed_url(&img.key).unwrap_or_else(|| absolute_url(headers, &state.image_urls.path(&img.key)));
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

