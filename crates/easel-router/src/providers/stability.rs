//! Stability's v2beta stable-image API: `POST /v2beta/stable-image/generate/{core|ultra|sd3}`
//! as multipart form data with `Accept: application/json`, answered with the image in base64
//! and a `finish_reason` (SUCCESS or CONTENT_FILTERED). It takes an aspect ratio, not a size:
//! the nearest one it offers is sent.

use std::time::{Duration, Instant};

use base64::Engine as _;

use super::{retry_after, Http, ImageJob, ProviderError, ProviderOutput};

#[derive(Debug, Clone)]
pub struct StabilityClient {
    pub name: String,
    /// e.g. https://api.stability.ai
    pub base_url: String,
    key: String,
    http: Http,
}

const RATIOS: [(&str, f64); 9] = [("21:9", 21.0 / 9.0), ("16:9", 16.0 / 9.0), ("3:2", 1.5), ("5:4", 1.25), ("1:1", 1.0), ("4:5", 0.8), ("2:3", 2.0 / 3.0), ("9:16", 9.0 / 16.0), ("9:21", 9.0 / 21.0)];

/// The vendor's aspect ratio closest to `width` x `height`.
pub fn aspect_ratio(width: u32, height: u32) -> &'static str {
    super::nearest_shape(width, height, &RATIOS).unwrap_or("1:1")
}

impl StabilityClient {
    pub fn new(name: &str, base_url: &str, key: String, timeout: Duration) -> Self {
        Self { name: name.into(), base_url: base_url.trim_end_matches('/').into(), key, http: Http::new(name, timeout) }
    }

    pub async fn generate(&self, job: &ImageJob) -> Result<ProviderOutput, ProviderError> {
        let t = Instant::now();
        // core and ultra are endpoints; the sd3.5 family shares the sd3 endpoint with a model field.
        let (endpoint, model) = match job.model.as_str() {
            "core" | "ultra" => (job.model.as_str(), None),
            m => ("sd3", Some(m.to_string())),
        };
        let mut images = vec![];
        for i in 0..job.n.max(1) {
            let mut form = reqwest::multipart::Form::new()
                .text("prompt", job.prompt.clone())
                .text("output_format", job.output_format.clone())
                .text("aspect_ratio", aspect_ratio(job.width, job.height));
            if let Some(m) = &model {
                form = form.text("model", m.clone());
            }
            if let Some(seed) = job.seed {
                form = form.text("seed", ((seed + i as u64) % 4_294_967_295).to_string());
            }
            let r = self
                .http
                .client
                .post(format!("{}/v2beta/stable-image/generate/{endpoint}", self.base_url))
                .bearer_auth(&self.key)
                .header("accept", "application/json")
                .multipart(form)
                .send()
                .await
                .map_err(|e| self.http.transport(e))?;
            let status = r.status();
            let ra = retry_after(r.headers());
            let text = r.text().await.map_err(|e| self.http.transport(e))?;
            if !status.is_success() {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                if status.as_u16() == 403 && v["name"] == "content_moderation" {
                    return Err(ProviderError::Moderated { provider: self.name.clone(), message: v["errors"].to_string() });
                }
                let message = v["errors"].as_array().map(|e| e.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join("; ")).filter(|m| !m.is_empty());
                return Err(self.http.status_error(status, ra, &message.unwrap_or(text)));
            }
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| self.http.malformed(format!("not JSON: {e}")))?;
            if v["finish_reason"] == "CONTENT_FILTERED" {
                return Err(ProviderError::Moderated { provider: self.name.clone(), message: "CONTENT_FILTERED".into() });
            }
            let b64 = v["image"].as_str().ok_or_else(|| self.http.malformed("no `image` in the answer"))?;
            images.push(base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| self.http.malformed(format!("bad base64: {e}")))?);
        }
        Ok(ProviderOutput { images, seconds: t.elapsed().as_secs_f64(), vendor_id: None })
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake;
    use super::*;
    use axum::extract::{Multipart, Path};
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;
    use axum::Router;

    async fn fake_stability() -> String {
        let app = Router::new().route(
            "/v2beta/stable-image/generate/{endpoint}",
            post(|Path(endpoint): Path<String>, headers: HeaderMap, mut form: Multipart| async move {
                if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer sk-stab") {
                    return (StatusCode::UNAUTHORIZED, r#"{"name":"unauthorized","errors":["authorization: invalid or missing"]}"#.to_string());
                }
                let mut fields = std::collections::HashMap::new();
                while let Ok(Some(f)) = form.next_field().await {
                    let name = f.name().unwrap_or_default().to_string();
                    fields.insert(name, f.text().await.unwrap_or_default());
                }
                assert_eq!(fields["aspect_ratio"], "16:9");
                assert_eq!(fields.get("model").is_some(), endpoint == "sd3");
                let b64 = base64::engine::general_purpose::STANDARD.encode(fake::PNG);
                match fields["prompt"].as_str() {
                    "naughty" => (StatusCode::FORBIDDEN, r#"{"name":"content_moderation","errors":["Your request was flagged by our content moderation system"]}"#.into()),
                    "filtered" => (StatusCode::OK, serde_json::json!({"image": b64, "finish_reason": "CONTENT_FILTERED", "seed": 1}).to_string()),
                    "bad" => (StatusCode::BAD_REQUEST, r#"{"name":"bad_request","errors":["prompt: cannot be empty"]}"#.into()),
                    "down" => (StatusCode::SERVICE_UNAVAILABLE, "upstream connect error".into()),
                    "busy" => (StatusCode::TOO_MANY_REQUESTS, r#"{"name":"rate_limit_exceeded","errors":["You have exceeded the rate limit"]}"#.into()),
                    "garbage" => (StatusCode::OK, "<html>oops</html>".into()),
                    "slow" => {
                        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
                        (StatusCode::OK, "{}".into())
                    }
                    _ => (StatusCode::OK, serde_json::json!({"image": b64, "finish_reason": "SUCCESS", "seed": 1}).to_string()),
                }
            }),
        );
        fake::serve(app).await
    }

    fn job(model: &str, prompt: &str) -> ImageJob {
        ImageJob { model: model.into(), prompt: prompt.into(), negative_prompt: None, width: 1344, height: 768, n: 1, seed: Some(5), quality: None, style: None, output_format: "png".into(), image: None }
    }

    #[tokio::test]
    async fn multipart_json_answers_and_moderation() {
        let base = fake_stability().await;
        let c = StabilityClient::new("stability", &base, "sk-stab".into(), Duration::from_secs(5));
        assert_eq!(c.generate(&job("core", "a cat")).await.expect("core").images, vec![fake::PNG.to_vec()]);
        assert_eq!(c.generate(&job("sd3.5-large", "a cat")).await.expect("sd3").images.len(), 1);
        assert!(matches!(c.generate(&job("core", "naughty")).await, Err(ProviderError::Moderated { .. })));
        assert!(matches!(c.generate(&job("core", "filtered")).await, Err(ProviderError::Moderated { .. })));
        let e = c.generate(&job("core", "bad")).await.unwrap_err();
        assert!(matches!(e, ProviderError::Rejected { .. }) && e.to_string().contains("prompt: cannot be empty"), "{e}");
        assert!(matches!(c.generate(&job("core", "down")).await, Err(ProviderError::Unavailable { .. })));
        assert!(matches!(c.generate(&job("core", "busy")).await, Err(ProviderError::RateLimited { .. })));
        assert!(matches!(c.generate(&job("core", "garbage")).await, Err(ProviderError::Malformed { .. })));
        let hurried = StabilityClient::new("stability", &base, "sk-stab".into(), Duration::from_millis(500));
        let e = hurried.generate(&job("core", "slow")).await.unwrap_err();
        assert!(e.to_string().contains("timed out"), "{e}");
    }

    #[test]
    fn sizes_map_to_the_nearest_aspect_ratio() {
        assert_eq!(aspect_ratio(1024, 1024), "1:1");
        assert_eq!(aspect_ratio(1344, 768), "16:9");
        assert_eq!(aspect_ratio(832, 1216), "2:3");
    }
}
