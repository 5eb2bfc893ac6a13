//! Replicate's predictions API: official models at `POST /v1/models/{owner}/{name}/predictions`,
//! versioned ones (`owner/name:version`) at `POST /v1/predictions`, with `Prefer: wait` so
//! most answers are final at once; otherwise `urls.get` is polled until succeeded, failed or
//! canceled. Output URLs are downloaded at once. A prediction abandoned at the deadline is
//! cancelled (`POST urls.cancel`).

use std::time::{Duration, Instant};

use super::{Http, ImageJob, ProviderError, ProviderOutput};

#[derive(Debug, Clone)]
pub struct ReplicateClient {
    pub name: String,
    /// e.g. https://api.replicate.com
    pub base_url: String,
    key: String,
    http: Http,
    poll_every: Duration,
}

impl ReplicateClient {
    pub fn new(name: &str, base_url: &str, key: String, timeout: Duration) -> Self {
        Self { name: name.into(), base_url: base_url.trim_end_matches('/').into(), key, http: Http::new(name, timeout), poll_every: Duration::from_millis(500) }
    }

    pub fn with_poll_interval(mut self, every: Duration) -> Self {
        self.poll_every = every;
        self
    }

    async fn call(&self, req: reqwest::RequestBuilder) -> Result<serde_json::Value, ProviderError> {
        self.http.json(req.bearer_auth(&self.key)).await
    }

    pub async fn generate(&self, job: &ImageJob) -> Result<ProviderOutput, ProviderError> {
        let t = Instant::now();
        let deadline = self.http.deadline();
        let mut input = serde_json::json!({
            "prompt": job.prompt,
            "width": job.width,
            "height": job.height,
            "num_outputs": job.n,
            "output_format": job.output_format,
        });
        if let Some(seed) = job.seed {
            input["seed"] = seed.into();
        }
        let req = match job.model.split_once(':') {
            Some((_, version)) => self.http.client.post(format!("{}/v1/predictions", self.base_url)).json(&serde_json::json!({"version": version, "input": input})),
            None => self.http.client.post(format!("{}/v1/models/{}/predictions", self.base_url, job.model)).json(&serde_json::json!({"input": input})),
        };
        let wait = self.http.timeout.as_secs().clamp(1, 60);
        let mut p = self.call(req.header("prefer", format!("wait={wait}"))).await?;
        let id = p["id"].as_str().map(str::to_string);
        loop {
            match p["status"].as_str().unwrap_or_default() {
                "succeeded" => break,
                "failed" => {
                    let err = p["error"].as_str().unwrap_or("failed").to_string();
                    if err.to_ascii_lowercase().contains("nsfw") {
                        return Err(ProviderError::Moderated { provider: self.name.clone(), message: err });
                    }
                    return Err(self.http.unavailable(err));
                }
                "canceled" => return Err(self.http.unavailable("the prediction was canceled")),
                "starting" | "processing" => {
                    let get = p["urls"]["get"].as_str().ok_or_else(|| self.http.malformed("no urls.get to poll"))?.to_string();
                    if Instant::now() > deadline {
                        if let Some(cancel) = p["urls"]["cancel"].as_str() {
                            let _ = self.call(self.http.client.post(cancel)).await;
                        }
                        return Err(self.http.unavailable(format!("timed out after {:?} (prediction cancelled)", self.http.timeout)));
                    }
                    tokio::time::sleep(self.poll_every).await;
                    p = self.call(self.http.client.get(&get)).await?;
                }
                other => return Err(self.http.malformed(format!("unknown status `{other}`"))),
            }
        }
        let urls: Vec<String> = match &p["output"] {
            serde_json::Value::String(u) => vec![u.clone()],
            serde_json::Value::Array(a) => a.iter().filter_map(|u| u.as_str().map(str::to_string)).collect(),
            _ => vec![],
        };
        if urls.is_empty() {
            return Err(self.http.malformed("succeeded without output URLs"));
        }
        let mut images = vec![];
        for u in urls {
            images.push(self.http.download(&u).await?);
        }
        Ok(ProviderOutput { images, seconds: t.elapsed().as_secs_f64(), vendor_id: id })
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake;
    use super::*;
    use axum::extract::{Path, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::{get, post};
    use axum::{Json, Router};
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Fake {
        base: Arc<Mutex<String>>,
        canceled: Arc<Mutex<Vec<String>>>,
    }

    fn prediction(base: &str, id: &str, status: &str, output: serde_json::Value, error: Option<&str>) -> serde_json::Value {
        serde_json::json!({"id": id, "status": status, "output": output, "error": error,
            "urls": {"get": format!("{base}/v1/predictions/{id}"), "cancel": format!("{base}/v1/predictions/{id}/cancel")}})
    }

    async fn fake_replicate() -> (String, Fake) {
        let st = Fake::default();
        let create = |s: Fake, headers: HeaderMap, body: serde_json::Value, versioned: bool| {
            let base = s.base.lock().unwrap().clone();
            if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer r8-key") {
                return (StatusCode::UNAUTHORIZED, Json(serde_json::json!({"detail": "Unauthenticated"})));
            }
            assert!(headers.get("prefer").is_some_and(|v| v.to_str().unwrap().starts_with("wait")));
            assert_eq!(body.get("version").is_some(), versioned);
            let prompt = body["input"]["prompt"].as_str().unwrap_or_default();
            let p = match prompt {
                "slow" | "forever" => prediction(&base, prompt, "processing", serde_json::Value::Null, None),
                "naughty" => prediction(&base, "n", "failed", serde_json::Value::Null, Some("NSFW content detected. Try running it again, or try a different prompt.")),
                "busy" => return (StatusCode::TOO_MANY_REQUESTS, Json(serde_json::json!({"detail": "Request was throttled."}))),
                "down" => return (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"detail": "Service Unavailable"}))),
                "garbage" => prediction(&base, "g", "weird-status", serde_json::Value::Null, None),
                "late" => prediction(&base, "l", "succeeded", serde_json::json!([format!("{base}/gone.png")]), None),
                _ => prediction(&base, "p1", "succeeded", serde_json::json!([format!("{base}/out.png")]), None),
            };
            (StatusCode::CREATED, Json(p))
        };
        let app = Router::new()
            .route("/v1/models/{owner}/{name}/predictions", post(move |State(s): State<Fake>, h: HeaderMap, Json(b): Json<serde_json::Value>| async move { create(s, h, b, false) }))
            .route("/v1/predictions", post(move |State(s): State<Fake>, h: HeaderMap, Json(b): Json<serde_json::Value>| async move { create(s, h, b, true) }))
            .route(
                "/v1/predictions/{id}",
                get(|State(s): State<Fake>, Path(id): Path<String>| async move {
                    let base = s.base.lock().unwrap().clone();
                    Json(if id == "forever" { prediction(&base, &id, "processing", serde_json::Value::Null, None) } else { prediction(&base, &id, "succeeded", serde_json::json!(format!("{base}/out.png")), None) })
                }),
            )
            .route(
                "/v1/predictions/{id}/cancel",
                post(|State(s): State<Fake>, Path(id): Path<String>| async move {
                    s.canceled.lock().unwrap().push(id.clone());
                    let base = s.base.lock().unwrap().clone();
                    Json(prediction(&base, &id, "canceled", serde_json::Value::Null, None))
                }),
            )
            .route("/out.png", get(|| async { fake::PNG.to_vec() }))
            .route("/gone.png", get(|| async { (StatusCode::GONE, "expired") }))
            .with_state(st.clone());
        let base = fake::serve(app).await;
        *st.base.lock().unwrap() = base.clone();
        (base, st)
    }

    fn job(model: &str, prompt: &str) -> ImageJob {
        ImageJob { model: model.into(), prompt: prompt.into(), negative_prompt: None, width: 1024, height: 1024, n: 1, seed: None, quality: None, style: None, output_format: "png".into(), image: None }
    }

    #[tokio::test]
    async fn waits_polls_downloads_and_cancels() {
        let (base, st) = fake_replicate().await;
        let c = ReplicateClient::new("replicate", &base, "r8-key".into(), Duration::from_secs(10)).with_poll_interval(Duration::from_millis(10));
        let official = "black-forest-labs/flux-schnell";
        assert_eq!(c.generate(&job(official, "a cat")).await.expect("Prefer: wait answers at once").images, vec![fake::PNG.to_vec()]);
        assert_eq!(c.generate(&job("someone/model:abc123", "a cat")).await.expect("versioned").images.len(), 1);
        assert_eq!(c.generate(&job(official, "slow")).await.expect("polled to success").images.len(), 1);
        assert!(matches!(c.generate(&job(official, "naughty")).await, Err(ProviderError::Moderated { .. })));
        assert!(matches!(c.generate(&job(official, "busy")).await, Err(ProviderError::RateLimited { .. })));
        assert!(matches!(c.generate(&job(official, "down")).await, Err(ProviderError::Unavailable { .. })));
        assert!(matches!(c.generate(&job(official, "garbage")).await, Err(ProviderError::Malformed { .. })));
        assert!(matches!(c.generate(&job(official, "late")).await, Err(ProviderError::Expired { .. })));
        let short = ReplicateClient::new("replicate", &base, "r8-key".into(), Duration::from_millis(150)).with_poll_interval(Duration::from_millis(20));
        let e = short.generate(&job(official, "forever")).await.unwrap_err();
        assert!(e.to_string().contains("timed out"), "{e}");
        assert_eq!(*st.canceled.lock().unwrap(), vec!["forever".to_string()]);
    }
}
