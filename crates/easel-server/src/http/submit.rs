//! One path for every request: validate, route (local engine or closed provider, with the
//! router's plan kept on the job for fallback), answer from the per-tenant result cache, or
//! enqueue; and waiting for a queued job's end.

use super::*;

pub(super) fn random_seed() -> u64 {
    let u = uuid::Uuid::new_v4();
    u64::from_le_bytes(u.as_bytes()[..8].try_into().unwrap_or([0; 8])) % (1 << 53)
}

/// A validated request, queued (or answered from the cache).
pub(super) struct Submitted {
    pub job: Job,
    pub format: ResponseFormat,
    /// Answered from the result cache without running.
    pub hit: bool,
}

/// What the router needs to know about this node right now.
pub(super) fn situation_parts(state: &AppState, api_key: Option<&str>) -> Result<(Vec<String>, f64, Vec<String>, f64, f64), ApiError> {
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
pub(super) fn submit(state: &AppState, headers: &HeaderMap, body: &Bytes) -> Result<Submitted, ApiError> {
    let caller = state.authorize(headers)?;
    let req: ImageRequest = parse_body(body)?;
    let idempotency = idempotency_key(headers, &caller)?;
    let fingerprint = fingerprint(body);
    let format = easel_api::WebhookFormat::Easel { base_url: public_base(headers) };
    let absolute_webhook_urls = |spec: &mut easel_api::JobSpec| {
        if spec.webhook_url.is_some() {
            spec.webhook_format = Some(format.clone());
        }
    };
    submit_request(state, &caller, &req, idempotency.as_deref().map(|key| easel_queue::Idempotency { key, fingerprint: &fingerprint }), &absolute_webhook_urls)
}

/// [`submit`] off the async runtime: validating a request decodes, resizes and re-encodes its
/// pictures, seconds of CPU for a large one, which must not stall other connections.
pub(super) async fn submit_off_runtime(state: &AppState, headers: &HeaderMap, body: &Bytes) -> Result<Submitted, ApiError> {
    let (state, headers, body) = (state.clone(), headers.clone(), body.clone());
    tokio::task::spawn_blocking(move || submit(&state, &headers, &body)).await.map_err(|e| ApiError::internal(format!("request validation stopped: {e}")))?
}

/// A request body's identity for idempotency: the SHA-256 of its JSON in canonical form (keys
/// sorted, no whitespace), so the same request reformatted is still the same request.
pub(super) fn fingerprint(body: &[u8]) -> String {
    let canonical = serde_json::from_slice::<serde_json::Value>(body).map(|v| v.to_string().into_bytes()).unwrap_or_else(|_| body.to_vec());
    hex::encode(Sha256::digest(&canonical))
}

/// The request's Idempotency-Key, scoped to the caller's API key.
pub(super) fn idempotency_key(headers: &HeaderMap, caller: &Caller) -> Result<Option<String>, ApiError> {
    match headers.get("idempotency-key").map(|v| v.to_str()) {
        None => Ok(None),
        Some(Ok(k)) if !k.is_empty() && k.len() <= 256 => Ok(Some(format!("{}\u{1f}{k}", caller.name().unwrap_or("")))),
        Some(_) => Err(ApiError::invalid("Idempotency-Key", "Idempotency-Key must be 1-256 visible ASCII characters")),
    }
}

/// [`submit_request`] on the blocking pool, without idempotency: validation decodes and resizes
/// pictures, CPU work that must not hold an async worker (the A1111 and fal drop-ins).
pub(super) async fn submit_request_off_runtime(state: &AppState, caller: &Caller, req: ImageRequest, adjust: fn(&mut easel_api::JobSpec)) -> Result<Submitted, ApiError> {
    let (state, caller) = (state.clone(), caller.clone());
    tokio::task::spawn_blocking(move || submit_request(&state, &caller, &req, None, &adjust)).await.map_err(|e| ApiError::internal(format!("request validation stopped: {e}")))?
}

/// [`submit`] for a request already in easel's terms (the drop-in protocols map theirs to
/// it); `adjust` sets what only the protocol knows (e.g. its webhook format) on the spec.
pub(super) fn submit_request(
    state: &AppState,
    caller: &Caller,
    req: &ImageRequest,
    idempotency: Option<easel_queue::Idempotency<'_>>,
    adjust: &dyn Fn(&mut easel_api::JobSpec),
) -> Result<Submitted, ApiError> {
    let key_name = caller.name().map(str::to_owned);
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
            // LoRA stacks run on local engines only; pictures on local engines and on the
            // providers' models that take them (with a mask or not).
            let first = plan[0].provider.clone();
            let model_name = req.model.as_deref().unwrap_or("");
            if req.loras.as_ref().is_some_and(|l| !l.is_empty()) {
                plan.retain(Candidate::is_local);
                if plan.is_empty() {
                    return Err(ApiError::invalid("loras", format!("LoRAs run on local engines; `{model_name}` routes to {first} (use route: local)")));
                }
            }
            if req.controlnets.as_ref().is_some_and(|c| !c.is_empty()) {
                plan.retain(Candidate::is_local);
                if plan.is_empty() {
                    return Err(ApiError::invalid("controlnets", format!("ControlNets run on local engines; `{model_name}` routes to {first} (use route: local)")));
                }
            }
            if req.ip_adapter.is_some() {
                plan.retain(Candidate::is_local);
                if plan.is_empty() {
                    return Err(ApiError::invalid("ip_adapter", format!("IP-Adapters run on local engines; `{model_name}` routes to {first} (use route: local)")));
                }
            }
            if req.image.is_some() {
                let mask = req.mask.is_some();
                plan.retain(|c| c.is_local() || gw.edit_support(c).accepts(mask));
                if plan.is_empty() {
                    let what = if mask { "a picture with a mask" } else { "a picture" };
                    return Err(ApiError::invalid("image", format!("no candidate for `{model_name}` takes {what}: {first}'s model does not (edits run on local engines, OpenAI-compatible providers, BFL's and fal's fill and Kontext models, fal's image-to-image and inpainting apps)")));
                }
            }
            if plan[0].is_local() {
                local_model = Some(plan[0].model.clone());
            } else {
                provider_first = Some(plan[0].clone());
            }
            let candidates = plan.into_iter().map(|c| RouteCandidate { provider: c.provider, model: c.model, reason: c.reason }).collect();
            route = Some(RoutePlan { candidates, current: 0, failures: vec![], quality: req.quality.clone(), style: req.style.clone() });
        }
        None if hints.tier.is_some() || hints.route.as_deref().is_some_and(|r| r != "auto" && r != LOCAL) => {
            return Err(ApiError::invalid(if hints.tier.is_some() { "tier" } else { "route" }, "no closed providers or tiers are configured on this server"));
        }
        _ => {}
    }
    // The provider executor runs in every API node that has the gateway: always served.
    let (model, served) = match &provider_first {
        Some(c) => (crate::gateway::remote_model_info(c, state.gateway.as_ref().map(|g| g.edit_support(c)).unwrap_or(easel_router::providers::EditSupport::None)), true),
        None => state.model(local_model.as_deref())?,
    };
    let (mut spec, format) = req.validate(&model, random_seed)?;
    spec.route = route;
    adjust(&mut spec);
    for l in &spec.loras {
        state.loras.source(&l.name)?;
    }
    for c in &spec.controlnets {
        let info = state.controlnets.info(&c.name)?;
        if let Some(served) = model.controlnet_family.filter(|f| *f != info.family) {
            return Err(ApiError::invalid(
                "controlnets",
                format!("ControlNet `{}` is for {}, and `{}` is {}", c.name, info.family.describe(), model.id, served.describe()),
            ));
        }
        if let Some(why) = info.unsupported.clone().or_else(|| info.mode_mismatch(&c.name, c.mode)) {
            return Err(ApiError::invalid("controlnets", why));
        }
    }
    if let Some(ip) = &spec.ip_adapter {
        let fit = state.ip_adapters.fit(&ip.name)?;
        if let Some(served) = model.ip_adapter_fit.filter(|f| *f != fit) {
            return Err(ApiError::invalid("ip_adapter", format!("IP-Adapter `{}` is made for {fit}, and `{}` has {served}", ip.name, model.id)));
        }
    }
    if let Some(url) = &spec.webhook_url {
        crate::webhooks::validate_url(url, state.config.allow_private_webhooks)?;
    }
    if let Some(name) = &key_name {
        let active = state.queue.active_for(name).map_err(queue_error)?;
        if active >= state.config.max_jobs_per_key {
            // A retry of a request already accepted is not a new job: it gets its job back.
            if let Some(idem) = idempotency {
                if let Some(found) = state.queue.find_idempotent(idem.key).map_err(queue_error)? {
                    if found.fingerprint != idem.fingerprint {
                        return Err(ApiError::idempotency_key_reused(&found.job.id));
                    }
                    return Ok(Submitted { job: found.job, format, hit: false });
                }
            }
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
    // A webhook or an idempotency key asks for a job of the request's own, not an earlier one's.
    if let Some(ck) = cache_key.as_ref().filter(|_| spec.webhook_url.is_none() && idempotency.is_none()) {
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
            return Ok(Submitted { job: Job { cache_hit: true, ..job }, format, hit: true });
        }
    }
    if !served {
        return Err(ApiError::unavailable(format!("no worker is serving model `{}` right now; retry later", model.id)));
    }
    let enq = state.queue.enqueue(&spec, cache_key.as_deref(), idempotency).map_err(queue_error)?;
    if !enq.existing {
        state.doorbell.ring();
        let position = state.queue.position(&enq.job.id).ok().flatten().unwrap_or(0);
        state.bus.publish(Event::Queued { job_id: enq.job.id.clone(), position });
    }
    Ok(Submitted { job: enq.job, format, hit: false })
}

/// The answer to a synchronous request whose job did not succeed.
pub(super) fn unsuccessful(job: &Job) -> ApiError {
    let reason = job.error.clone().unwrap_or_else(|| "generation failed".into());
    if job.status == JobStatus::Canceled {
        return ApiError::canceled(&job.id);
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

pub(super) fn easel_object(job: &Job, cache_hit: bool) -> serde_json::Value {
    let candidate = job.spec.route.as_ref().and_then(|r| r.candidate());
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
        // Until it has a result: where its route has it now.
        "provider": job.result.as_ref().map(|r| r.provider.as_str()).or_else(|| candidate.map(|c| c.provider.as_str())).unwrap_or("local"),
        "route_reason": job.result.as_ref().and_then(|r| r.route_reason.as_deref()).or_else(|| candidate.map(|c| c.reason.as_str())).unwrap_or("the local engine"),
        "vendor_id": job.result.as_ref().and_then(|r| r.vendor_id.as_deref()),
        "cost_usd": job.result.as_ref().map(|r| r.cost_usd),
    })
}

pub(super) async fn wait_final(state: &AppState, id: &str) -> Result<Job, ApiError> {
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

