//! Black Forest Labs' API: `POST {base}/v1/{model}` with the `x-key` header answers an id and
//! a `polling_url`; polling it reports Pending until Ready (with `result.sample`, a signed URL
//! that expires within minutes, downloaded at once), or Error/Failed, "Request Moderated",
//! "Content Moderated", "Task not found".
//!
//! Pictures in: the fill models (`flux-pro-1.0-fill`) take `image` and `mask` (base64, white =
//! repaint) and answer at the picture's size; the Kontext models (`flux-kontext-pro`, `-max`)
//! take `input_image` and edit it as the prompt says.

use std::time::{Duration, Instant};

use base64::Engine as _;

use super::{EditSupport, Http, ImageJob, ProviderError, ProviderOutput};

/// What BFL's `model` takes in.
pub(super) fn edit_support(model: &str) -> EditSupport {
    if model.contains("fill") {
        EditSupport::MaskRequired
    } else if model.contains("kontext") {
        EditSupport::Image
    } else {
        EditSupport::None
    }
}

/// A client for BFL's API (or a regional endpoint of it).
#[derive(Debug, Clone)]
pub struct BflClient {
    pub name: String,
    /// e.g. https://api.bfl.ai
    pub base_url: String,
    key: String,
    http: Http,
    poll_every: Duration,
}

impl BflClient {
    pub fn new(name: &str, base_url: &str, key: String, timeout: Duration) -> Self {
        Self { name: name.into(), base_url: base_url.trim_end_matches('/').into(), key, http: Http::new(name, timeout), poll_every: Duration::from_millis(500) }
    }

    /// Polls this often (the vendor suggests about twice a second).
    pub fn with_poll_interval(mut self, every: Duration) -> Self {
        self.poll_every = every;
        self
    }


    pub async fn generate(&self, job: &ImageJob) -> Result<ProviderOutput, ProviderError> {
        let t = Instant::now();
        let deadline = self.http.deadline();
        let mut images = vec![];
        let mut vendor_id = None;
        // BFL makes one image per request.
        for i in 0..job.n.max(1) {
            let mut body = serde_json::json!({
                "prompt": job.prompt,
                "output_format": if job.output_format == "png" { "png" } else { "jpeg" },
            });
            let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
            match (&job.image, edit_support(&job.model)) {
                (Some(image), EditSupport::MaskRequired) => {
                    body["image"] = b64(&image.png).into();
                    body["mask"] = image.mask_png.as_deref().map(b64).into();
                }
                (Some(image), _) => body["input_image"] = b64(&image.png).into(),
                (None, _) => {
                    body["width"] = job.width.into();
                    body["height"] = job.height.into();
                }
            }
            if let Some(seed) = job.seed {
                body["seed"] = (seed + i as u64).into();
            }
            let v = self.http.json(self.http.client.post(format!("{}/v1/{}", self.base_url, job.model)).header("x-key", &self.key).json(&body)).await?;
            let id = v["id"].as_str().ok_or_else(|| self.http.malformed("no `id` in the submission answer"))?.to_string();
            let polling_url = v["polling_url"].as_str().map(str::to_string).unwrap_or_else(|| format!("{}/v1/get_result?id={id}", self.base_url));
            vendor_id = Some(id);
            loop {
                if Instant::now() > deadline {
                    return Err(self.http.unavailable(format!("timed out after {:?} waiting for the result", self.http.timeout)));
                }
                let p = self.http.json(self.http.client.get(&polling_url).header("x-key", &self.key)).await?;
                match p["status"].as_str().unwrap_or_default() {
                    "Ready" => {
                        let url = p["result"]["sample"].as_str().ok_or_else(|| self.http.malformed("Ready without result.sample"))?;
                        images.push(self.http.download(url).await?);
                        break;
                    }
                    "Pending" | "Queued" | "Processing" => tokio::time::sleep(self.poll_every).await,
                    s @ ("Request Moderated" | "Content Moderated") => {
                        return Err(ProviderError::Moderated { provider: self.name.clone(), message: s.to_string() });
                    }
                    s @ ("Error" | "Failed" | "Task not found") => {
                        let detail = p["details"].to_string();
                        return Err(self.http.unavailable(format!("{s}: {detail}")));
                    }
                    other => return Err(self.http.malformed(format!("unknown status `{other}`"))),
                }
            }
        }
        Ok(ProviderOutput { images, seconds: t.elapsed().as_secs_f64(), vendor_id })
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake;
    use super::*;
    use axum::extract::{Query, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::{get, post};
    use axum::{Json, Router};
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Fake {
        base: Arc<Mutex<String>>,
        polls: Arc<Mutex<HashMap<String, u32>>>,
    }

    /// BFL's documented flow: submit, then Pending a couple of times, then the outcome the
    /// prompt asks for.
    async fn fake_bfl() -> String {
        let state = Fake::default();
        let app = Router::new()
            .route(
                "/v1/{model}",
                post(|State(s): State<Fake>, axum::extract::Path(model): axum::extract::Path<String>, headers: HeaderMap, Json(body): Json<serde_json::Value>| async move {
                    if headers.get("x-key").and_then(|v| v.to_str().ok()) != Some("bfl-key") {
                        return (StatusCode::FORBIDDEN, r#"{"detail":"Not authenticated - Invalid Authentication"}"#.to_string());
                    }
                    // The edit endpoints' required fields, refused as FastAPI does (422).
                    let required: &[&str] = match model.as_str() {
                        "flux-pro-1.0-fill" => &["image", "mask"],
                        m if m.starts_with("flux-kontext") => &["input_image"],
                        _ => &["width", "height"],
                    };
                    for field in required {
                        let present = body[*field].as_str().map(|b| base64::engine::general_purpose::STANDARD.decode(b).is_ok()).unwrap_or(body[*field].is_u64());
                        if !present {
                            return (StatusCode::UNPROCESSABLE_ENTITY, serde_json::json!({"detail": [{"loc": ["body", field], "msg": "Field required", "type": "missing"}]}).to_string());
                        }
                    }
                    if model == "flux-pro-1.0-fill" && body.get("width").is_some() {
                        return (StatusCode::UNPROCESSABLE_ENTITY, r#"{"detail":[{"loc":["body","width"],"msg":"Extra inputs are not permitted"}]}"#.into());
                    }
                    let prompt = body["prompt"].as_str().unwrap_or_default().to_string();
                    match prompt.as_str() {
                        "busy" => return (StatusCode::TOO_MANY_REQUESTS, r#"{"detail":"You have exceeded the number of active tasks"}"#.into()),
                        "garbage" => return (StatusCode::OK, "not json".into()),
                        "down" => return (StatusCode::INTERNAL_SERVER_ERROR, r#"{"detail":"Internal Server Error"}"#.into()),
                        _ => {}
                    }
                    let base = s.base.lock().unwrap().clone();
                    (StatusCode::OK, serde_json::json!({"id": prompt, "polling_url": format!("{base}/v1/get_result?id={prompt}")}).to_string())
                }),
            )
            .route(
                "/v1/get_result",
                get(|State(s): State<Fake>, Query(q): Query<HashMap<String, String>>| async move {
                    let id = q.get("id").cloned().unwrap_or_default();
                    let n = {
                        let mut polls = s.polls.lock().unwrap();
                        let n = polls.entry(id.clone()).or_default();
                        *n += 1;
                        *n
                    };
                    let base = s.base.lock().unwrap().clone();
                    let body = if n < 3 {
                        serde_json::json!({"id": id, "status": "Pending", "result": null})
                    } else {
                        match id.as_str() {
                            "naughty" => serde_json::json!({"id": id, "status": "Content Moderated", "result": null}),
                            "broken" => serde_json::json!({"id": id, "status": "Error", "details": {"error": "GPU fell over"}}),
                            "late" => serde_json::json!({"id": id, "status": "Ready", "result": {"sample": format!("{base}/expired.png")}}),
                            _ => serde_json::json!({"id": id, "status": "Ready", "result": {"sample": format!("{base}/sample.png")}}),
                        }
                    };
                    Json(body)
                }),
            )
            .route("/sample.png", get(|| async { fake::PNG.to_vec() }))
            .route("/expired.png", get(|| async { (StatusCode::FORBIDDEN, "<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>") }))
            .with_state(state.clone());
        let base = fake::serve(app).await;
        *state.base.lock().unwrap() = base.clone();
        base
    }

    fn job(prompt: &str) -> ImageJob {
        ImageJob { model: "flux-pro-1.1".into(), prompt: prompt.into(), negative_prompt: None, width: 1024, height: 768, n: 1, seed: Some(3), quality: None, style: None, output_format: "png".into(), image: None }
    }

    #[tokio::test]
    async fn pictures_go_to_fill_with_their_mask_and_to_kontext_alone() {
        use super::super::{EditImage, EditSupport, Provider};
        let base = fake_bfl().await;
        let c = BflClient::new("bfl", &base, "bfl-key".into(), Duration::from_secs(10)).with_poll_interval(Duration::from_millis(10));
        let picture = EditImage { png: fake::PNG.to_vec(), mask_png: Some(fake::PNG.to_vec()), strength: 1.0 };
        let fill = ImageJob { model: "flux-pro-1.0-fill".into(), image: Some(picture.clone()), ..job("a red door") };
        assert_eq!(c.generate(&fill).await.expect("fill").images, vec![fake::PNG.to_vec()]);
        let kontext = ImageJob { model: "flux-kontext-pro".into(), image: Some(EditImage { mask_png: None, ..picture.clone() }), ..job("make it night") };
        assert_eq!(c.generate(&kontext).await.expect("kontext").images, vec![fake::PNG.to_vec()]);
        // Which models take what, and a picture the model cannot take is refused before sending.
        let p = Provider::Bfl(c);
        assert_eq!([p.edit_support("flux-pro-1.0-fill"), p.edit_support("flux-kontext-max"), p.edit_support("flux-pro-1.1")], [EditSupport::MaskRequired, EditSupport::Image, EditSupport::None]);
        let e = p.generate(&ImageJob { image: Some(picture), ..job("a cat") }).await.unwrap_err();
        assert!(matches!(e, ProviderError::Rejected { .. }) && e.to_string().contains("flux-pro-1.1"), "{e}");
    }

    #[tokio::test]
    async fn submits_polls_downloads_and_sorts_outcomes() {
        let base = fake_bfl().await;
        let c = BflClient::new("bfl", &base, "bfl-key".into(), Duration::from_secs(10)).with_poll_interval(Duration::from_millis(10));
        let out = c.generate(&job("a cat")).await.expect("generates");
        assert_eq!(out.images, vec![fake::PNG.to_vec()]);
        assert_eq!(out.vendor_id.as_deref(), Some("a cat"));
        assert!(matches!(c.generate(&job("naughty")).await, Err(ProviderError::Moderated { .. })));
        let e = c.generate(&job("broken")).await.unwrap_err();
        assert!(matches!(e, ProviderError::Unavailable { .. }) && e.to_string().contains("GPU fell over"), "{e}");
        assert!(matches!(c.generate(&job("late")).await, Err(ProviderError::Expired { .. })));
        assert!(matches!(c.generate(&job("busy")).await, Err(ProviderError::RateLimited { .. })));
        assert!(matches!(c.generate(&job("garbage")).await, Err(ProviderError::Malformed { .. })));
        assert!(matches!(c.generate(&job("down")).await, Err(ProviderError::Unavailable { .. })));
        let wrong = BflClient::new("bfl", &base, "stolen".into(), Duration::from_secs(10));
        let e = wrong.generate(&job("a cat")).await.unwrap_err();
        assert!(matches!(e, ProviderError::Rejected { .. }) && !e.to_string().contains("stolen"), "{e}");
        // A deadline shorter than the polling takes is a clear timeout, not a hang.
        let hurried = BflClient::new("bfl", &base, "bfl-key".into(), Duration::from_millis(100)).with_poll_interval(Duration::from_millis(80));
        let e = hurried.generate(&job("slowpoke")).await.unwrap_err();
        assert!(e.to_string().contains("timed out"), "{e}");
    }
}
