//! Async jobs: create (202), read, cancel, and follow over SSE, each visible only to the key
//! that made it.

use super::*;

pub(super) fn job_json(state: &AppState, job: &Job) -> serde_json::Value {
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
        "request": request_view(&job.spec),
        "images": job.result.as_ref().map(|r| r.images.iter().map(|i| serde_json::json!({"url": state.image_urls.path(&i.key), "seed": i.seed})).collect::<Vec<_>>()),
        "urls": {
            "self": format!("/v1/jobs/{}", job.id),
            "events": format!("/v1/jobs/{}/events", job.id),
            "cancel": format!("/v1/jobs/{}/cancel", job.id),
        },
        "easel": easel_object(job, job.cache_hit),
    })
}

pub(super) async fn create_job(State(state): State<AppState>, headers: HeaderMap, body: Result<Bytes, axum::extract::rejection::BytesRejection>) -> ApiResult<Response> {
    let body = read_body(body, state.config.max_body_bytes).await?;
    let job = submit_off_runtime(&state, &headers, &body).await.inspect_err(|e| state.metrics.error(&format!("http_{}", e.status)))?.job;
    Ok((StatusCode::ACCEPTED, Json(job_json(&state, &job))).into_response())
}

#[derive(serde::Deserialize)]
pub(super) struct ListQuery {
    limit: Option<usize>,
    before: Option<String>,
}

/// `GET /v1/jobs?limit=&before=`: the caller's jobs, newest first (an admin key: everyone's),
/// in pages: `before` is the last id of the previous page.
pub(super) async fn list_jobs(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<axum::extract::Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let caller = state.authorize(&headers)?;
    let axum::extract::Query(q) = query.map_err(|e| ApiError::invalid("limit", format!("bad query string: {}", e.body_text())))?;
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::invalid("limit", format!("limit must be between 1 and 100, got {limit}")).into());
    }
    let owner = match &caller {
        Caller::Key { name, admin: false } => Some(name.as_str()),
        _ => None,
    };
    // One more than asked says whether another page follows.
    let mut jobs = state.queue.list(owner, limit + 1, q.before.as_deref()).map_err(queue_error)?;
    let has_more = jobs.len() > limit;
    jobs.truncate(limit);
    let data: Vec<_> = jobs.iter().map(|j| job_json(&state, j)).collect();
    Ok(Json(serde_json::json!({"object": "list", "data": data, "has_more": has_more, "last_id": jobs.last().map(|j| j.id.clone())})))
}

/// A job id from the path; one that is not even UTF-8 names no job.
pub(super) fn job_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(id)| id).map_err(|_| ApiError::not_found("no such job"))
}

pub(super) async fn get_job(State(state): State<AppState>, headers: HeaderMap, id: Result<Path<String>, PathRejection>) -> ApiResult<Json<serde_json::Value>> {
    let caller = state.authorize(&headers)?;
    let id = job_id(id)?;
    let job = state.job_for(&caller, &id)?;
    Ok(Json(job_json(&state, &job)))
}

pub(super) async fn cancel_job(State(state): State<AppState>, headers: HeaderMap, id: Result<Path<String>, PathRejection>) -> ApiResult<Json<serde_json::Value>> {
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

pub(super) fn sse(e: &Event) -> SseEvent {
    SseEvent::default().event(e.name()).data(serde_json::to_string(e).unwrap_or_default())
}

pub(super) async fn job_events(State(state): State<AppState>, headers: HeaderMap, id: Result<Path<String>, PathRejection>) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
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

/// A job's request as the API shows it: an input picture (and a ControlNet's or IP-Adapter's) is named by its
/// digest rather than repeated (a page of jobs would otherwise carry every picture and mask, base64).
fn request_view(spec: &easel_api::JobSpec) -> serde_json::Value {
    let mut view = serde_json::to_value(spec).unwrap_or(serde_json::Value::Null);
    if let (Some(image), Some(obj)) = (&spec.init_image, view.as_object_mut()) {
        obj.insert("init_image".into(), serde_json::json!({"digest": image.digest(), "strength": image.strength, "mask": image.mask_png_base64.is_some()}));
    }
    if let Some(obj) = view.as_object_mut().filter(|_| !spec.controlnets.is_empty()) {
        let nets: Vec<_> = spec
            .controlnets
            .iter()
            .map(|c| {
                let mut net = serde_json::json!({"name": c.name, "scale": c.scale, "start": c.start, "end": c.end, "image_digest": c.image_digest()});
                if let Some(mode) = c.mode {
                    net["mode"] = serde_json::json!(mode);
                }
                net
            })
            .collect();
        obj.insert("controlnets".into(), serde_json::Value::Array(nets));
    }
    if let (Some(ip), Some(obj)) = (&spec.ip_adapter, view.as_object_mut()) {
        obj.insert("ip_adapter".into(), serde_json::json!({"name": ip.name, "scale": ip.scale, "image_digest": ip.image_digest()}));
    }
    view
}
