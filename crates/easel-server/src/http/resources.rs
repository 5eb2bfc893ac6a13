//! What the API serves besides jobs: the model, LoRA and ControlNet lists, usage, stored images (signed
//! URLs or the owner's key), health, readiness and metrics.

use super::*;

pub(super) async fn list_models(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Json<serde_json::Value>> {
    state.authorize(&headers)?;
    let data: Vec<_> = state
        .catalogue()?
        .into_iter()
        .map(|(m, live)| serde_json::json!({"id": m.id, "object": "model", "created": 0, "owned_by": "easel", "easel": m, "ready": live}))
        .collect();
    Ok(Json(serde_json::json!({"object": "list", "data": data})))
}

/// The LoRA registry's names, for `loras` in requests.
pub(super) async fn list_loras(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Json<serde_json::Value>> {
    state.authorize(&headers)?;
    let data: Vec<_> = state.loras.names().into_iter().map(|name| serde_json::json!({"name": name, "object": "lora"})).collect();
    Ok(Json(serde_json::json!({"object": "list", "data": data})))
}

/// The ControlNet registry's names and the family each was trained for, for `controlnets` in
/// requests, with a Union FLUX ControlNet's number of control modes (`mode` is 0 to modes-1).
pub(super) async fn list_controlnets(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Json<serde_json::Value>> {
    state.authorize(&headers)?;
    let mut data = vec![];
    for name in state.controlnets.names() {
        // An entry whose config cannot be read is listed without a family (requests naming it
        // get the reason).
        let mut entry = serde_json::json!({"name": name, "object": "controlnet"});
        match state.controlnets.info(&name) {
            Ok(info) => {
                entry["family"] = serde_json::json!(info.family);
                if let Some(modes) = info.modes {
                    entry["modes"] = serde_json::json!(modes);
                }
            }
            Err(_) => entry["family"] = serde_json::Value::Null,
        }
        data.push(entry);
    }
    Ok(Json(serde_json::json!({"object": "list", "data": data})))
}

/// What an image costs here and at each configured closed provider, for the studio's
/// break-even (the machine's price settings; the local seconds per image come from usage),
/// with each provider's health (circuit breaker, last error) and the routing aliases and tiers.
pub(super) async fn cost(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Json<serde_json::Value>> {
    state.authorize(&headers)?;
    let c = state.local_cost;
    // One entry per provider and model: a 1024x1024 image at the vendor's default quality.
    let mut closed: Vec<serde_json::Value> = vec![];
    if let Some(g) = &state.gateway {
        let mut seen = std::collections::HashSet::new();
        for p in g.prices.entries().iter().filter(|p| g.providers.contains_key(&p.provider)) {
            if seen.insert((p.provider.clone(), p.model.clone())) {
                if let Some(usd) = g.prices.image_usd(&p.provider, &p.model, None, 1024, 1024) {
                    closed.push(serde_json::json!({"provider": p.provider, "model": p.model, "usd_per_image": usd}));
                }
            }
        }
    }
    let (health, aliases, tiers) = match &state.gateway {
        Some(g) => {
            let mut names: Vec<String> = g.providers.keys().cloned().collect();
            names.sort();
            let mut aliases: Vec<&String> = g.router.config().aliases.keys().collect();
            let mut tiers: Vec<&String> = g.router.config().tiers.keys().collect();
            aliases.sort();
            tiers.sort();
            (serde_json::to_value(g.router.health(&names)).unwrap_or_default(), serde_json::json!(aliases), serde_json::json!(tiers))
        }
        None => (serde_json::json!([]), serde_json::json!([]), serde_json::json!([])),
    };
    Ok(Json(serde_json::json!({
        "local": {"gpu_hourly_usd": c.hourly_usd, "utilisation": c.utilisation, "per_image_overhead_usd": c.per_image_overhead_usd},
        "closed": closed,
        "providers": health,
        "aliases": aliases,
        "tiers": tiers,
        "prices_as_of": easel_router::price::DEFAULTS_AS_OF,
    })))
}

#[derive(serde::Deserialize)]
pub(super) struct UsageQuery {
    /// First UTC day (YYYY-MM-DD) to include.
    since: Option<String>,
}

/// Cost and volume per day, API key, provider and model. A key sees only its own rows.
pub(super) async fn usage(
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
pub(super) struct SignedQuery {
    expires: Option<u64>,
    sig: Option<String>,
}

/// A stored image: with a valid signature (from a response, event or webhook), or with the key
/// that owns the job; without keys configured, to anyone.
pub(super) async fn get_image(
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

pub(super) async fn readyz(State(state): State<AppState>) -> ApiResult<&'static str> {
    state.queue.depth().map_err(queue_error)?;
    if !state.catalogue()?.iter().any(|(_, live)| *live) {
        return Err(ApiError::unavailable("no worker is serving any model").into());
    }
    Ok("ready")
}

pub(super) async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    if state.config.metrics_need_admin && state.config.api_keys.is_some() {
        match state.authorize(&headers)? {
            Caller::Key { admin: true, .. } => {}
            _ => return Err(ApiError::forbidden("/metrics needs an admin key").into()),
        }
    }
    let depth = state.queue.depth().unwrap_or(0);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render(depth, &state.executor.warm_models())).into_response())
}

