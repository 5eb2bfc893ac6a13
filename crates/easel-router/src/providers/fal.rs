//! fal's queue API: `POST https://queue.fal.run/{app}` with `Authorization: Key ...` answers a
//! request id with `status_url`, `response_url` and `cancel_url`; the status goes IN_QUEUE
//! (with queue_position), IN_PROGRESS, COMPLETED; the response holds image URLs (downloaded
//! at once) and `has_nsfw_concepts`. A request abandoned at the deadline is cancelled with
//! PUT on `cancel_url`, so it is not billed for nothing.
//!
//! Pictures in: fal's file inputs take data URIs, so a picture goes as `image_url` and a mask
//! (white = repaint, as diffusers) as `mask_url`. The image-to-image apps
//! (`fal-ai/flux/dev/image-to-image`) and the Kontext apps take a picture; the fill
//! (`fal-ai/flux-pro/v1/fill`) and inpainting (`fal-ai/flux-lora/inpainting`) apps take a
//! picture and a mask. Image-to-image and inpainting apps also take diffusers' `strength`.
//! An edit answers at the picture's size, so no `image_size` is sent with one.

use std::time::{Duration, Instant};

use base64::Engine as _;

use super::{EditSupport, Http, ImageJob, ProviderError, ProviderOutput};

/// What fal's app `model` takes in, read off its path as fal names its apps (a Kontext app's
/// `text-to-image` endpoint takes no picture).
pub(super) fn edit_support(model: &str) -> EditSupport {
    if model.ends_with("/text-to-image") {
        EditSupport::None
    } else if model.contains("fill") || model.contains("inpaint") {
        EditSupport::MaskRequired
    } else if model.contains("image-to-image") || model.contains("kontext") {
        EditSupport::Image
    } else {
        EditSupport::None
    }
}

/// Whether fal's app takes diffusers' `strength` with its picture.
fn takes_strength(model: &str) -> bool {
    model.contains("image-to-image") || model.contains("inpaint")
}

fn data_uri(png: &[u8]) -> String {
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png))
}

#[derive(Debug, Clone)]
pub struct FalClient {
    pub name: String,
    /// e.g. https://queue.fal.run
    pub base_url: String,
    key: String,
    http: Http,
    poll_every: Duration,
}

impl FalClient {
    pub fn new(name: &str, base_url: &str, key: String, timeout: Duration) -> Self {
        Self { name: name.into(), base_url: base_url.trim_end_matches('/').into(), key, http: Http::new(name, timeout), poll_every: Duration::from_millis(500) }
    }

    pub fn with_poll_interval(mut self, every: Duration) -> Self {
        self.poll_every = every;
        self
    }

    async fn call(&self, req: reqwest::RequestBuilder) -> Result<serde_json::Value, ProviderError> {
        self.http.json(req.header("authorization", format!("Key {}", self.key))).await
    }

    pub async fn generate(&self, job: &ImageJob) -> Result<ProviderOutput, ProviderError> {
        let t = Instant::now();
        let deadline = self.http.deadline();
        let mut input = serde_json::json!({
            "prompt": job.prompt,
            "num_images": job.n,
            "output_format": if job.output_format == "png" { "png" } else { "jpeg" },
            "enable_safety_checker": true,
        });
        match &job.image {
            Some(image) => {
                input["image_url"] = data_uri(&image.png).into();
                if let Some(mask) = &image.mask_png {
                    input["mask_url"] = data_uri(mask).into();
                }
                if takes_strength(&job.model) {
                    input["strength"] = image.strength.into();
                }
            }
            None => input["image_size"] = serde_json::json!({"width": job.width, "height": job.height}),
        }
        if let Some(seed) = job.seed {
            input["seed"] = seed.into();
        }
        let sub = self.call(self.http.client.post(format!("{}/{}", self.base_url, job.model)).json(&input)).await?;
        let field = |k: &str| sub[k].as_str().map(str::to_string).ok_or_else(|| self.http.malformed(format!("no `{k}` in the submission answer")));
        let (id, status_url, response_url) = (field("request_id")?, field("status_url")?, field("response_url")?);
        let cancel_url = sub["cancel_url"].as_str().map(str::to_string);
        loop {
            if Instant::now() > deadline {
                if let Some(url) = &cancel_url {
                    let _ = self.call(self.http.client.put(url)).await;
                }
                return Err(self.http.unavailable(format!("timed out after {:?} (request cancelled)", self.http.timeout)));
            }
            let s = self.call(self.http.client.get(&status_url)).await?;
            match s["status"].as_str().unwrap_or_default() {
                "COMPLETED" => break,
                "IN_QUEUE" | "IN_PROGRESS" => tokio::time::sleep(self.poll_every).await,
                other => return Err(self.http.malformed(format!("unknown status `{other}`"))),
            }
        }
        let res = self.call(self.http.client.get(&response_url)).await?;
        let flagged = res["has_nsfw_concepts"].as_array().is_some_and(|a| a.iter().any(|b| b.as_bool() == Some(true)));
        if flagged {
            return Err(ProviderError::Moderated { provider: self.name.clone(), message: "the safety checker flagged the result".into() });
        }
        let list = res["images"].as_array().filter(|a| !a.is_empty()).ok_or_else(|| self.http.malformed("no `images` in the result"))?;
        let mut images = vec![];
        for img in list {
            let url = img["url"].as_str().ok_or_else(|| self.http.malformed("an image without url"))?;
            images.push(self.http.download(url).await?);
        }
        Ok(ProviderOutput { images, seconds: t.elapsed().as_secs_f64(), vendor_id: Some(id) })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{fake, EditImage, Provider};
    use super::*;
    use axum::extract::{Path, State};
    use axum::http::{HeaderMap, StatusCode, Uri};
    use axum::routing::{get, post, put};
    use axum::{Json, Router};
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Fake {
        base: Arc<Mutex<String>>,
        polls: Arc<Mutex<HashMap<String, u32>>>,
        canceled: Arc<Mutex<Vec<String>>>,
    }

    async fn fake_fal() -> (String, Fake) {
        let st = Fake::default();
        let app = Router::new()
            .route("/fal-ai/flux/dev", post(submit))
            .route("/fal-ai/flux/dev/image-to-image", post(submit))
            .route("/fal-ai/flux-pro/v1/fill", post(submit))
            .route(
                "/fal-ai/{app}/requests/{id}/status",
                get(|State(s): State<Fake>, Path((_app, id)): Path<(String, String)>| async move {
                    let n = {
                        let mut p = s.polls.lock().unwrap();
                        let n = p.entry(id.clone()).or_default();
                        *n += 1;
                        *n
                    };
                    Json(match (n, id.as_str()) {
                        (_, "forever") => serde_json::json!({"status": "IN_QUEUE", "queue_position": 5}),
                        (1, _) => serde_json::json!({"status": "IN_QUEUE", "queue_position": 1}),
                        (2, _) => serde_json::json!({"status": "IN_PROGRESS", "logs": []}),
                        _ => serde_json::json!({"status": "COMPLETED"}),
                    })
                }),
            )
            .route(
                "/fal-ai/{app}/requests/{id}",
                get(|State(s): State<Fake>, Path((_app, id)): Path<(String, String)>| async move {
                    let base = s.base.lock().unwrap().clone();
                    let nsfw = id == "naughty";
                    let file = if id == "late" { "gone.png" } else { "img.png" };
                    Json(serde_json::json!({"images": [{"url": format!("{base}/{file}"), "width": 512, "height": 512, "content_type": "image/png"}], "seed": 1, "has_nsfw_concepts": [nsfw]}))
                }),
            )
            .route(
                "/fal-ai/{app}/requests/{id}/cancel",
                put(|State(s): State<Fake>, Path((_app, id)): Path<(String, String)>| async move {
                    s.canceled.lock().unwrap().push(id);
                    (StatusCode::ACCEPTED, Json(serde_json::json!({"status": "CANCELLATION_REQUESTED"})))
                }),
            )
            .route("/img.png", get(|| async { fake::PNG.to_vec() }))
            .route("/gone.png", get(|| async { (StatusCode::NOT_FOUND, "expired") }))
            .with_state(st.clone());
        let base = fake::serve(app).await;
        *st.base.lock().unwrap() = base.clone();
        (base, st)
    }

    /// fal's submission: the key, then the app's input schema (required file inputs as URLs or
    /// data URIs, refused with 422 as its pydantic models do), then a queued request.
    async fn submit(State(s): State<Fake>, uri: Uri, headers: HeaderMap, Json(input): Json<serde_json::Value>) -> (StatusCode, String) {
        if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Key fal-key") {
            return (StatusCode::UNAUTHORIZED, r#"{"detail":"Invalid key"}"#.to_string());
        }
        let app = uri.path().trim_start_matches('/');
        let (files, strength): (&[&str], bool) = match app {
            "fal-ai/flux/dev/image-to-image" => (&["image_url"], true),
            "fal-ai/flux-pro/v1/fill" => (&["image_url", "mask_url"], false),
            _ => (&[], false),
        };
        for field in files {
            let png = input[*field].as_str().and_then(|u| u.strip_prefix("data:image/png;base64,")).and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok());
            if png.as_deref() != Some(fake::PNG) {
                return (StatusCode::UNPROCESSABLE_ENTITY, serde_json::json!({"detail": [{"loc": ["body", field], "msg": "Field required", "type": "missing"}]}).to_string());
            }
        }
        if files.is_empty() {
            assert_eq!(input["image_size"]["width"], 512);
        } else {
            assert!(input.get("image_size").is_none(), "an edit answers at the picture's size");
        }
        assert_eq!(input.get("strength").and_then(|v| v.as_f64()), strength.then_some(0.6), "{app}: strength only where the app takes it");
        let id = input["prompt"].as_str().unwrap_or_default().replace(' ', "-");
        match id.as_str() {
            "busy" => return (StatusCode::TOO_MANY_REQUESTS, r#"{"detail":"Too many requests"}"#.into()),
            "down" => return (StatusCode::BAD_GATEWAY, "upstream error".into()),
            "garbage" => return (StatusCode::OK, "<html>maintenance</html>".into()),
            _ => {}
        }
        let base = s.base.lock().unwrap().clone();
        // fal's status and response URLs name the app's owner/name, not its sub-path.
        let owner_name = app.split('/').take(2).collect::<Vec<_>>().join("/");
        let r = format!("{base}/{owner_name}/requests/{id}");
        (StatusCode::OK, serde_json::json!({"request_id": id, "status_url": format!("{r}/status"), "response_url": r, "cancel_url": format!("{r}/cancel"), "queue_position": 2}).to_string())
    }

    fn job(prompt: &str) -> ImageJob {
        ImageJob { model: "fal-ai/flux/dev".into(), prompt: prompt.into(), negative_prompt: None, width: 512, height: 512, n: 1, seed: Some(1), quality: None, style: None, output_format: "png".into(), image: None }
    }

    #[tokio::test]
    async fn queues_polls_fetches_and_cancels_at_the_deadline() {
        let (base, st) = fake_fal().await;
        let c = FalClient::new("fal", &base, "fal-key".into(), Duration::from_secs(10)).with_poll_interval(Duration::from_millis(10));
        let out = c.generate(&job("a cat")).await.expect("generates");
        assert_eq!((out.images, out.vendor_id.as_deref()), (vec![fake::PNG.to_vec()], Some("a-cat")));
        assert!(matches!(c.generate(&job("naughty")).await, Err(ProviderError::Moderated { .. })));
        assert!(matches!(c.generate(&job("busy")).await, Err(ProviderError::RateLimited { .. })));
        assert!(matches!(c.generate(&job("down")).await, Err(ProviderError::Unavailable { .. })));
        assert!(matches!(c.generate(&job("garbage")).await, Err(ProviderError::Malformed { .. })));
        assert!(matches!(c.generate(&job("late")).await, Err(ProviderError::Expired { .. })));
        let short = FalClient::new("fal", &base, "fal-key".into(), Duration::from_millis(200)).with_poll_interval(Duration::from_millis(20));
        let e = short.generate(&job("forever")).await.unwrap_err();
        assert!(e.to_string().contains("timed out"), "{e}");
        assert_eq!(*st.canceled.lock().unwrap(), vec!["forever".to_string()], "an abandoned request is cancelled");
        let bad = FalClient::new("fal", &base, "nope-secret".into(), Duration::from_secs(5));
        let e = bad.generate(&job("a cat")).await.unwrap_err();
        assert!(matches!(e, ProviderError::Rejected { .. }) && !e.to_string().contains("nope-secret"));
    }

    #[tokio::test]
    async fn pictures_go_as_data_uris_with_strength_only_where_the_app_takes_one() {
        let (base, _) = fake_fal().await;
        let c = FalClient::new("fal", &base, "fal-key".into(), Duration::from_secs(10)).with_poll_interval(Duration::from_millis(10));
        let picture = EditImage { png: fake::PNG.to_vec(), mask_png: None, strength: 0.6 };
        let img2img = ImageJob { model: "fal-ai/flux/dev/image-to-image".into(), image: Some(picture.clone()), ..job("make it night") };
        assert_eq!(c.generate(&img2img).await.expect("image-to-image").images, vec![fake::PNG.to_vec()]);
        let fill = ImageJob { model: "fal-ai/flux-pro/v1/fill".into(), image: Some(EditImage { mask_png: Some(fake::PNG.to_vec()), ..picture.clone() }), ..job("a red door") };
        assert_eq!(c.generate(&fill).await.expect("fill").images, vec![fake::PNG.to_vec()]);
        let no_mask = ImageJob { image: Some(picture), ..fill.clone() };
        let e = Provider::Fal(c.clone()).generate(&no_mask).await.unwrap_err();
        assert!(matches!(e, ProviderError::Rejected { .. }) && e.to_string().contains("fal-ai/flux-pro/v1/fill"), "{e}");
        assert_eq!(
            ["fal-ai/flux/dev", "fal-ai/flux/dev/image-to-image", "fal-ai/flux-pro/kontext", "fal-ai/flux-pro/kontext/text-to-image", "fal-ai/flux-pro/v1/fill", "fal-ai/flux-lora/inpainting"].map(edit_support),
            [EditSupport::None, EditSupport::Image, EditSupport::Image, EditSupport::None, EditSupport::MaskRequired, EditSupport::MaskRequired]
        );
    }
}
