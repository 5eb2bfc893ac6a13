//! fal's queue API: `POST https://queue.fal.run/{app}` with `Authorization: Key ...` answers a
//! request id with `status_url`, `response_url` and `cancel_url`; the status goes IN_QUEUE
//! (with queue_position), IN_PROGRESS, COMPLETED; the response holds image URLs (downloaded
//! at once) and `has_nsfw_concepts`. A request abandoned at the deadline is cancelled with
//! PUT on `cancel_url`, so it is not billed for nothing.

use std::time::{Duration, Instant};

use super::{Http, ImageJob, ProviderError, ProviderOutput};

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
            "image_size": {"width": job.width, "height": job.height},
            "num_images": job.n,
            "output_format": if job.output_format == "png" { "png" } else { "jpeg" },
            "enable_safety_checker": true,
        });
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
    use super::super::fake;
    use super::*;
    use axum::extract::{Path, State};
    use axum::http::{HeaderMap, StatusCode};
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
            .route(
                "/fal-ai/flux/dev",
                post(|State(s): State<Fake>, headers: HeaderMap, Json(input): Json<serde_json::Value>| async move {
                    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Key fal-key") {
                        return (StatusCode::UNAUTHORIZED, r#"{"detail":"Invalid key"}"#.to_string());
                    }
                    assert_eq!(input["image_size"]["width"], 512);
                    let id = input["prompt"].as_str().unwrap_or_default().replace(' ', "-");
                    match id.as_str() {
                        "busy" => return (StatusCode::TOO_MANY_REQUESTS, r#"{"detail":"Too many requests"}"#.into()),
                        "down" => return (StatusCode::BAD_GATEWAY, "upstream error".into()),
                        "garbage" => return (StatusCode::OK, "<html>maintenance</html>".into()),
                        _ => {}
                    }
                    let base = s.base.lock().unwrap().clone();
                    let r = format!("{base}/fal-ai/flux/requests/{id}");
                    (StatusCode::OK, serde_json::json!({"request_id": id, "status_url": format!("{r}/status"), "response_url": r, "cancel_url": format!("{r}/cancel"), "queue_position": 2}).to_string())
                }),
            )
            .route(
                "/fal-ai/flux/requests/{id}/status",
                get(|State(s): State<Fake>, Path(id): Path<String>| async move {
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
                "/fal-ai/flux/requests/{id}",
                get(|State(s): State<Fake>, Path(id): Path<String>| async move {
                    let base = s.base.lock().unwrap().clone();
                    let nsfw = id == "naughty";
                    let file = if id == "late" { "gone.png" } else { "img.png" };
                    Json(serde_json::json!({"images": [{"url": format!("{base}/{file}"), "width": 512, "height": 512, "content_type": "image/png"}], "seed": 1, "has_nsfw_concepts": [nsfw]}))
                }),
            )
            .route(
                "/fal-ai/flux/requests/{id}/cancel",
                put(|State(s): State<Fake>, Path(id): Path<String>| async move {
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
}
