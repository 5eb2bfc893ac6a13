//! AUTOMATIC1111's WebUI API, the subset that Open WebUI, SillyTavern and most scripts use
//! (`/sdapi/v1/...`), so they can point at easel unchanged.
//!
//! A txt2img request is mapped to easel's request and takes the same path as every other job
//! (queue, worker, store, ledger); the answer is A1111's `{images, parameters, info}`. A1111's
//! fields map as: `cfg_scale` to guidance, `batch_size x n_iter` to `n`, `seed: -1` to a random
//! seed, `sampler_name` plus `scheduler` to easel's schedulers, and `sd_model_checkpoint` (from
//! `override_settings` or set with `POST /options`) to the model. Fields easel has no use for
//! (hires fix, face restoration, scripts) are accepted and ignored, as A1111 ignores unknown
//! scripts. The current model and the current job (for `/progress` and `/interrupt`) are kept
//! per API key, since one easel serves many clients where one WebUI serves one.
//! `/sdapi/v1/img2img` is not served yet: easel has no img2img. `/progress` carries a step
//! preview (`current_image`), a linear map of the latents to RGB at latent resolution.

use std::collections::HashMap;

use super::*;

/// A1111's sampler names easel implements, with their aliases, and the easel scheduler each
/// means under A1111's "Automatic" and "Karras" schedules.
const SAMPLERS: [(&str, &[&str], &str, Option<&str>); 5] = [
    ("Euler", &["k_euler"], "euler", None),
    ("Euler a", &["k_euler_a", "k_euler_ancestral"], "euler-a", None),
    ("DDIM", &["ddim"], "ddim", None),
    ("DPM++ 2M", &["k_dpmpp_2m"], "dpmpp-2m", Some("dpmpp-2m-karras")),
    ("LCM", &["k_lcm"], "lcm", None),
];

/// Per API key: the model `POST /options` chose and the job `/progress` reports on.
#[derive(Default)]
pub(super) struct Sessions {
    inner: Mutex<HashMap<String, Session>>,
}

#[derive(Default, Clone)]
struct Session {
    model: Option<String>,
    job: Option<String>,
    step: usize,
    steps: usize,
    /// The latest step preview of the current job, base64 PNG as the WebUI sends it.
    preview: Option<String>,
}

impl Sessions {
    fn with<T>(&self, who: &str, f: impl FnOnce(&mut Session) -> T) -> T {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(map.entry(who.to_string()).or_default())
    }
}

fn who(caller: &Caller) -> String {
    caller.name().unwrap_or("").to_string()
}

/// `POST /sdapi/v1/txt2img`'s body (StableDiffusionTxt2ImgProcessingAPI); unknown fields are
/// accepted and ignored, as the WebUI does for scripts it does not have.
#[derive(serde::Deserialize, serde::Serialize, Default)]
struct Txt2Img {
    #[serde(default)]
    prompt: String,
    #[serde(default)]
    negative_prompt: Option<String>,
    #[serde(default)]
    steps: Option<i64>,
    #[serde(default)]
    cfg_scale: Option<f64>,
    #[serde(default)]
    width: Option<usize>,
    #[serde(default)]
    height: Option<usize>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    sampler_name: Option<String>,
    #[serde(default)]
    sampler_index: Option<String>,
    #[serde(default)]
    scheduler: Option<String>,
    #[serde(default)]
    batch_size: Option<u32>,
    #[serde(default)]
    n_iter: Option<u32>,
    #[serde(default)]
    override_settings: Option<HashMap<String, serde_json::Value>>,
}

/// The easel scheduler for A1111's sampler and schedule names (None: the model's default).
fn scheduler_for(sampler: Option<&str>, schedule: Option<&str>) -> Result<Option<&'static str>, ApiError> {
    let Some(name) = sampler.filter(|s| !s.is_empty()) else { return Ok(None) };
    // Before A1111 1.9, the schedule was part of the sampler's name ("DPM++ 2M Karras").
    let (base, karras_in_name) = match name.strip_suffix(" Karras") {
        Some(b) => (b, true),
        None => (name, false),
    };
    // Schedules by id or label, as A1111 takes them; easel has Automatic (the sampler's own) and Karras.
    let karras = match schedule.filter(|s| !s.is_empty()) {
        None => karras_in_name,
        Some(s) if s.eq_ignore_ascii_case("automatic") => karras_in_name,
        Some(s) if s.eq_ignore_ascii_case("karras") => true,
        Some(s) => return Err(ApiError::invalid("scheduler", format!("schedule `{s}` is not available; use Automatic or Karras"))),
    };
    let found = SAMPLERS.iter().find(|(n, aliases, _, _)| n.eq_ignore_ascii_case(base) || aliases.iter().any(|a| a.eq_ignore_ascii_case(base)));
    match found {
        Some((_, _, plain, with_karras)) if karras => with_karras.map(Some).ok_or_else(|| ApiError::invalid("scheduler", format!("easel has no Karras schedule for sampler `{base}`"))),
        Some((_, _, plain, _)) => Ok(Some(plain)),
        None => {
            let names: Vec<&str> = SAMPLERS.iter().map(|(n, ..)| *n).collect();
            Err(ApiError::invalid("sampler_name", format!("sampler `{name}` is not available; use one of {}", names.join(", "))))
        }
    }
}

/// A model named the way A1111 names checkpoints (`name.safetensors [hash]`) as easel's id.
fn model_id(title: &str) -> String {
    let t = title.split(" [").next().unwrap_or(title).trim();
    t.strip_suffix(".safetensors").or_else(|| t.strip_suffix(".ckpt")).unwrap_or(t).to_string()
}

pub(super) async fn txt2img(State(state): State<AppState>, headers: HeaderMap, body: Result<Bytes, axum::extract::rejection::BytesRejection>) -> ApiResult<Json<serde_json::Value>> {
    let body = read_body(body, state.config.max_body_bytes).await?;
    let caller = state.authorize(&headers)?;
    let a: Txt2Img = parse_body(&body)?;
    let req = image_request(&state, &caller, &a)?;
    run(&state, &caller, req, &body).await
}

/// `POST /sdapi/v1/img2img`: txt2img's fields plus `init_images` (the first is used),
/// `denoising_strength` (A1111's default 0.75), and for inpainting `mask` (white repaints) and
/// `inpainting_mask_invert`. A1111's inpainting refinements (`mask_blur`, `inpainting_fill`,
/// `inpaint_full_res`) are not applied: the mask is used as diffusers uses it.
pub(super) async fn img2img(State(state): State<AppState>, headers: HeaderMap, body: Result<Bytes, axum::extract::rejection::BytesRejection>) -> ApiResult<Json<serde_json::Value>> {
    let body = read_body(body, state.config.max_body_bytes).await?;
    let caller = state.authorize(&headers)?;
    let a: Img2Img = parse_body(&body)?;
    let mut req = image_request(&state, &caller, &a.base)?;
    let image = a.init_images.first().ok_or_else(|| ApiError::invalid("init_images", "init_images needs the picture to start from"))?;
    req.image = Some(image.clone());
    req.strength = Some(a.denoising_strength.unwrap_or(0.75));
    req.mask = match &a.mask {
        Some(mask) if a.inpainting_mask_invert == Some(1) => {
            let m = easel_api::decode_base64_image("mask", mask)?;
            let inverted = m.rgb().iter().map(|v| 255 - v).collect();
            easel_api::InputImage::new(m.width(), m.height(), inverted).map(|m| m.to_base64_png())
        }
        other => other.clone(),
    };
    run(&state, &caller, req, &body).await
}

#[derive(serde::Deserialize)]
struct Img2Img {
    #[serde(flatten)]
    base: Txt2Img,
    #[serde(default)]
    init_images: Vec<String>,
    #[serde(default)]
    denoising_strength: Option<f64>,
    #[serde(default)]
    mask: Option<String>,
    #[serde(default)]
    inpainting_mask_invert: Option<i64>,
}

/// The easel request for A1111's txt2img fields.
fn image_request(state: &AppState, caller: &Caller, a: &Txt2Img) -> Result<ImageRequest, ApiError> {
    let who = who(caller);
    let checkpoint = a.override_settings.as_ref().and_then(|o| o.get("sd_model_checkpoint")).and_then(|v| v.as_str()).map(model_id);
    let model = checkpoint.or_else(|| state.a1111.with(&who, |s| s.model.clone()));
    let n = (a.batch_size.unwrap_or(1).max(1) as u64).saturating_mul(a.n_iter.unwrap_or(1).max(1) as u64).min(i64::MAX as u64);
    let sampler = a.sampler_name.as_deref().or(a.sampler_index.as_deref());
    let mut req = ImageRequest {
        prompt: a.prompt.clone(),
        model,
        n: Some(n as i64),
        negative_prompt: a.negative_prompt.clone().filter(|p| !p.is_empty()),
        steps: a.steps,
        guidance_scale: a.cfg_scale,
        scheduler: scheduler_for(sampler, a.scheduler.as_deref())?.map(str::to_string),
        seed: a.seed.filter(|s| *s >= 0).map(|s| s as u64),
        ..Default::default()
    };
    if a.width.is_some() || a.height.is_some() {
        let (w, h) = (a.width.unwrap_or(512), a.height.unwrap_or(512));
        req.size = Some(format!("{w}x{h}"));
    }
    Ok(req)
}

/// Runs an A1111 request to its end, with `/progress` following it, and answers in A1111's shape.
async fn run(state: &AppState, caller: &Caller, req: ImageRequest, body: &Bytes) -> ApiResult<Json<serde_json::Value>> {
    let who = who(caller);
    let state = state.clone();
    // Previews every step, for `/progress`'s current_image (at latent resolution: small).
    let Submitted { job, .. } = submit_request_off_runtime(&state, caller, req, |spec| spec.preview_every = Some(1)).await?;
    state.a1111.with(&who, |s| {
        s.job = Some(job.id.clone());
        (s.step, s.steps, s.preview) = (0, job.spec.steps, None);
    });
    // Steps reach /progress from the job's events while this request waits.
    let mut rx = state.bus.subscribe();
    let sessions = state.a1111.clone();
    let (id, me) = (job.id.clone(), who.clone());
    let watcher = tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok(Event::Progress { job_id, step, total }) if job_id == id => sessions.with(&me, |s| (s.step, s.steps) = (step, total)),
                Ok(Event::Preview { job_id, image, .. }) if job_id == id => {
                    let b64 = image.split_once(',').map(|(_, b)| b.to_string());
                    sessions.with(&me, |s| s.preview = b64);
                }
                Ok(e) if e.job_id() == id && e.is_final() => break,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
    });
    let done = wait_final(&state, &job.id).await;
    watcher.abort();
    let job = done?;
    // Interrupted, the WebUI answers with what it has; easel has no partial images: none.
    if !matches!(job.status, JobStatus::Succeeded | JobStatus::Canceled) {
        return Err(unsuccessful(&job).into());
    }
    let stored = job.result.as_ref().map(|r| r.images.as_slice()).unwrap_or_default();
    let mut images = vec![];
    for img in stored {
        images.push(b64_image(&state, &img.key)?.to_string());
    }
    let seeds: Vec<u64> = stored.iter().map(|i| i.seed).collect();
    let s = &job.spec;
    let sampler_name = SAMPLERS.iter().find(|(_, _, plain, karras)| s.scheduler.as_deref().is_some_and(|x| x == *plain || Some(x) == *karras)).map(|(n, ..)| *n).unwrap_or("Automatic");
    let info = serde_json::json!({
        "prompt": s.prompt, "all_prompts": vec![&s.prompt; seeds.len()],
        "negative_prompt": s.negative_prompt.clone().unwrap_or_default(), "all_negative_prompts": vec![s.negative_prompt.clone().unwrap_or_default(); seeds.len()],
        "seed": seeds.first().copied().unwrap_or(s.seed), "all_seeds": seeds, "subseed": -1, "all_subseeds": vec![-1; seeds.len()],
        "width": s.width, "height": s.height, "sampler_name": sampler_name, "cfg_scale": s.guidance, "steps": s.steps,
        "batch_size": seeds.len(), "sd_model_name": s.model, "sd_model_hash": null, "job_timestamp": job.created_at as i64,
        "infotexts": seeds.iter().map(|seed| format!("{}\nNegative prompt: {}\nSteps: {}, Sampler: {sampler_name}, CFG scale: {}, Seed: {seed}, Size: {}x{}, Model: {}",
            s.prompt, s.negative_prompt.clone().unwrap_or_default(), s.steps, s.guidance, s.width, s.height, s.model)).collect::<Vec<_>>(),
        "interrupted": job.status == JobStatus::Canceled,
        "easel": easel_object(&job, false),
    });
    let parameters: serde_json::Value = serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
    Ok(Json(serde_json::json!({ "images": images, "parameters": parameters, "info": info.to_string() })))
}

pub(super) async fn sd_models(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Json<serde_json::Value>> {
    state.authorize(&headers)?;
    let models: Vec<_> = state
        .catalogue()?
        .into_iter()
        .map(|(m, _)| serde_json::json!({"title": m.id, "model_name": m.id, "hash": null, "sha256": null, "filename": m.id, "config": null}))
        .collect();
    Ok(Json(serde_json::Value::Array(models)))
}

pub(super) async fn samplers(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Json<serde_json::Value>> {
    state.authorize(&headers)?;
    let list: Vec<_> = SAMPLERS.iter().map(|(name, aliases, ..)| serde_json::json!({"name": name, "aliases": aliases, "options": {}})).collect();
    Ok(Json(serde_json::Value::Array(list)))
}

pub(super) async fn schedulers(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Json<serde_json::Value>> {
    state.authorize(&headers)?;
    Ok(Json(serde_json::json!([
        {"name": "automatic", "label": "Automatic", "aliases": null, "default_rho": -1, "need_inner_model": false},
        {"name": "karras", "label": "Karras", "aliases": null, "default_rho": 7.0, "need_inner_model": false},
    ])))
}

/// Lists easel has nothing to put in (upscalers, VAEs, embeddings...): empty, not 404, so
/// clients that read them at start-up carry on.
pub(super) async fn empty_list(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Json<serde_json::Value>> {
    state.authorize(&headers)?;
    Ok(Json(serde_json::json!([])))
}

/// The caller's current model: the one `POST /options` chose, else the default.
fn current_model(state: &AppState, who: &str) -> Result<String, ApiError> {
    match state.a1111.with(who, |s| s.model.clone()) {
        Some(m) => Ok(m),
        None => Ok(state.model(None)?.0.id),
    }
}

pub(super) async fn get_options(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Json<serde_json::Value>> {
    let caller = state.authorize(&headers)?;
    let model = current_model(&state, &who(&caller))?;
    Ok(Json(serde_json::json!({
        "sd_model_checkpoint": model, "sd_checkpoint_hash": null, "sd_vae": "Automatic",
        "samples_format": "png", "CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 0,
    })))
}

/// Switches the caller's model (`sd_model_checkpoint`); other options are accepted and ignored.
pub(super) async fn set_options(State(state): State<AppState>, headers: HeaderMap, body: Result<Bytes, axum::extract::rejection::BytesRejection>) -> ApiResult<Json<serde_json::Value>> {
    let body = read_body(body, state.config.max_body_bytes).await?;
    let caller = state.authorize(&headers)?;
    let options: HashMap<String, serde_json::Value> = parse_body(&body)?;
    if let Some(v) = options.get("sd_model_checkpoint") {
        let title = v.as_str().ok_or_else(|| ApiError::invalid("sd_model_checkpoint", "sd_model_checkpoint must be a string"))?;
        let id = model_id(title);
        state.model(Some(&id)).map_err(|_| ApiError::invalid("sd_model_checkpoint", format!("no model `{title}`; GET /sdapi/v1/sd-models lists them")))?;
        state.a1111.with(&who(&caller), |s| s.model = Some(id));
    }
    Ok(Json(serde_json::Value::Null))
}

pub(super) async fn progress(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Json<serde_json::Value>> {
    let caller = state.authorize(&headers)?;
    let session = state.a1111.with(&who(&caller), |s| s.clone());
    let job = match &session.job {
        Some(id) => state.queue.get(id).map_err(queue_error)?,
        None => None,
    };
    let (running, progress, eta) = match &job {
        Some(j) if j.status == JobStatus::Running => {
            let p = if session.steps > 0 { session.step as f64 / session.steps as f64 } else { 0.0 };
            let elapsed = j.started_at.map(|t| crate::worker::now() - t).unwrap_or(0.0);
            let eta = if p > 0.0 { elapsed * (1.0 - p) / p } else { 0.0 };
            (true, p, eta)
        }
        Some(j) if j.status == JobStatus::Queued => (true, 0.0, 0.0),
        _ => (false, 0.0, 0.0),
    };
    Ok(Json(serde_json::json!({
        "progress": progress,
        "eta_relative": eta,
        "state": {
            "skipped": false, "interrupted": job.as_ref().is_some_and(|j| j.status == JobStatus::Canceled),
            "job": if running { job.as_ref().map(|j| j.id.clone()).unwrap_or_default() } else { String::new() },
            "job_count": running as u32, "job_timestamp": job.as_ref().map(|j| (j.created_at as i64).to_string()).unwrap_or_else(|| "0".into()),
            "job_no": 0, "sampling_step": if running { session.step } else { 0 }, "sampling_steps": if running { session.steps } else { 0 },
        },
        // A linear latent-to-RGB preview at latent resolution, as the WebUI's "Approx cheap".
        "current_image": if running { session.preview.clone() } else { None },
        "textinfo": null,
    })))
}

/// Stops the caller's current job (between steps, as the WebUI does).
pub(super) async fn interrupt(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Json<serde_json::Value>> {
    let caller = state.authorize(&headers)?;
    if let Some(id) = state.a1111.with(&who(&caller), |s| s.job.clone()) {
        if state.queue.cancel(&id).map_err(queue_error)? == Some(JobStatus::Canceled) {
            state.bus.publish(Event::Canceled { job_id: id });
        }
    }
    Ok(Json(serde_json::json!({})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a1111_sampler_and_schedule_names_map_to_easel_schedulers() {
        assert_eq!(scheduler_for(Some("Euler a"), None).unwrap(), Some("euler-a"));
        assert_eq!(scheduler_for(Some("k_euler"), Some("Automatic")).unwrap(), Some("euler"));
        assert_eq!(scheduler_for(Some("DPM++ 2M"), Some("Karras")).unwrap(), Some("dpmpp-2m-karras"));
        assert_eq!(scheduler_for(Some("DPM++ 2M Karras"), None).unwrap(), Some("dpmpp-2m-karras"), "the pre-1.9 name");
        assert_eq!(scheduler_for(None, Some("Karras")).unwrap(), None, "no sampler: the model's default");
        assert_eq!(scheduler_for(Some("DPM++ SDE"), None).unwrap_err().body.param.as_deref(), Some("sampler_name"));
        assert_eq!(scheduler_for(Some("Euler"), Some("karras")).unwrap_err().body.param.as_deref(), Some("scheduler"));
        assert_eq!(scheduler_for(Some("Euler"), Some("Exponential")).unwrap_err().body.param.as_deref(), Some("scheduler"));
    }

    #[test]
    fn a1111_checkpoint_titles_name_easel_models() {
        assert_eq!(model_id("sd15.safetensors [6ce0161689]"), "sd15");
        assert_eq!(model_id("tiny"), "tiny");
        assert_eq!(model_id("v1-5.ckpt"), "v1-5");
    }
}
