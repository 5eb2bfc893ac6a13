//! OpenAI's images API (`POST /v1/images/generations`), which any OpenAI-compatible image
//! server also speaks: gpt-image-1 always answers base64; dall-e-3 and most compatible
//! servers are asked for `b64_json`; a `url` answer is downloaded at once.

use std::time::{Duration, Instant};

use base64::Engine as _;

use super::{retry_after, Http, ImageJob, ProviderError, ProviderOutput};

/// A client for one OpenAI-compatible endpoint.
#[derive(Debug, Clone)]
pub struct OpenAiClient {
    pub name: String,
    /// e.g. https://api.openai.com/v1, or http://easel-2:8000/v1
    pub base_url: String,
    key: Option<String>,
    http: Http,
}

impl OpenAiClient {
    pub fn new(name: &str, base_url: &str, key: Option<String>, timeout: Duration) -> Self {
        Self { name: name.into(), base_url: base_url.trim_end_matches('/').into(), key, http: Http::new(name, timeout) }
    }

    pub async fn generate(&self, job: &ImageJob) -> Result<ProviderOutput, ProviderError> {
        let t = Instant::now();
        let mut body = serde_json::json!({
            "model": job.model,
            "prompt": job.prompt,
            "n": job.n,
            "size": format!("{}x{}", job.width, job.height),
        });
        if job.model.starts_with("gpt-image") {
            body["output_format"] = job.output_format.clone().into();
        } else {
            body["response_format"] = "b64_json".into();
        }
        if let Some(q) = &job.quality {
            body["quality"] = q.clone().into();
        }
        let mut req = self.http.client.post(format!("{}/images/generations", self.base_url)).json(&body);
        if let Some(k) = &self.key {
            req = req.bearer_auth(k);
        }
        let r = req.send().await.map_err(|e| self.http.transport(e))?;
        let status = r.status();
        let ra = retry_after(r.headers());
        let text = r.text().await.map_err(|e| self.http.transport(e))?;
        if !status.is_success() {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            let code = v["error"]["code"].as_str().unwrap_or_default();
            if status.as_u16() == 400 && (code == "moderation_blocked" || code == "content_policy_violation") {
                return Err(ProviderError::Moderated { provider: self.name.clone(), message: super::vendor_message(&text) });
            }
            return Err(self.http.status_error(status, ra, &text));
        }
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| self.http.malformed(format!("not JSON: {e}")))?;
        let data = v["data"].as_array().filter(|d| !d.is_empty()).ok_or_else(|| self.http.malformed("no `data` array"))?;
        let mut images = vec![];
        for item in data {
            if let Some(b64) = item["b64_json"].as_str() {
                images.push(base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| self.http.malformed(format!("bad b64_json: {e}")))?);
            } else if let Some(url) = item["url"].as_str() {
                images.push(self.http.download(url).await?);
            } else {
                return Err(self.http.malformed("an image with neither b64_json nor url"));
            }
        }
        let vendor_id = v["easel"]["job_id"].as_str().map(str::to_string);
        Ok(ProviderOutput { images, seconds: t.elapsed().as_secs_f64(), vendor_id })
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake;
    use super::*;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;
    use axum::{Json, Router};

    fn job(model: &str, prompt: &str) -> ImageJob {
        ImageJob { model: model.into(), prompt: prompt.into(), negative_prompt: None, width: 1024, height: 1024, n: 1, seed: None, quality: None, style: None, output_format: "png".into() }
    }

    /// Follows OpenAI's documented behaviour, keyed by the prompt.
    async fn fake_openai() -> String {
        let app = Router::new().route("/gone.png", axum::routing::get(|| async { (StatusCode::FORBIDDEN, "Request has expired") })).route(
            "/v1/images/generations",
            post(|headers: HeaderMap, Json(body): Json<serde_json::Value>| async move {
                let b64 = base64::engine::general_purpose::STANDARD.encode(fake::PNG);
                if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer sk-test") {
                    return (StatusCode::UNAUTHORIZED, HeaderMap::new(), r#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","code":"invalid_api_key"}}"#.to_string());
                }
                let mut h = HeaderMap::new();
                match body["prompt"].as_str().unwrap_or_default() {
                    "busy" => {
                        h.insert("retry-after", "7".parse().unwrap());
                        (StatusCode::TOO_MANY_REQUESTS, h, r#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#.into())
                    }
                    "down" => (StatusCode::INTERNAL_SERVER_ERROR, h, r#"{"error":{"message":"The server had an error","type":"server_error"}}"#.into()),
                    "garbage" => (StatusCode::OK, h, "<html>oops</html>".into()),
                    // A server that answers with a URL that has already expired.
                    "expired" => (StatusCode::OK, h, serde_json::json!({"created": 1, "data": [{"url": format!("http://{}/gone.png", headers.get("host").and_then(|v| v.to_str().ok()).unwrap_or_default())}]}).to_string()),
                    "naughty" => (StatusCode::BAD_REQUEST, h, r#"{"error":{"message":"Your request was rejected by the safety system.","type":"image_generation_user_error","code":"moderation_blocked"}}"#.into()),
                    "slow" => {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        (StatusCode::OK, h, "{}".into())
                    }
                    _ => {
                        // gpt-image-1 takes no response_format; dall-e-3 is asked for b64_json.
                        let ok = if body["model"] == "gpt-image-1" { body.get("response_format").is_none() } else { body["response_format"] == "b64_json" };
                        assert!(ok, "{body}");
                        (StatusCode::OK, h, serde_json::json!({"created": 1, "data": [{"b64_json": b64}]}).to_string())
                    }
                }
            }),
        );
        format!("{}/v1", fake::serve(app).await)
    }

    #[tokio::test]
    async fn follows_the_protocol_and_sorts_failures() {
        let base = fake_openai().await;
        let c = OpenAiClient::new("openai", &base, Some("sk-test".into()), Duration::from_secs(2));
        for model in ["gpt-image-1", "dall-e-3"] {
            let out = c.generate(&job(model, "a cat")).await.expect("generates");
            assert_eq!(out.images, vec![fake::PNG.to_vec()]);
        }
        let e = c.generate(&job("gpt-image-1", "busy")).await.unwrap_err();
        assert_eq!(e, ProviderError::RateLimited { provider: "openai".into(), retry_after: Some(Duration::from_secs(7)) });
        assert!(matches!(c.generate(&job("gpt-image-1", "down")).await, Err(ProviderError::Unavailable { .. })));
        assert!(matches!(c.generate(&job("gpt-image-1", "garbage")).await, Err(ProviderError::Malformed { .. })));
        assert!(matches!(c.generate(&job("dall-e-3", "expired")).await, Err(ProviderError::Expired { .. })));
        let m = c.generate(&job("gpt-image-1", "naughty")).await.unwrap_err();
        assert!(matches!(m, ProviderError::Moderated { .. }) && !m.falls_through());
        let t = c.generate(&job("gpt-image-1", "slow")).await.unwrap_err();
        assert!(t.to_string().contains("timed out") && t.falls_through(), "{t}");
        let bad = OpenAiClient::new("openai", &base, Some("sk-wrong-secret".into()), Duration::from_secs(2));
        let e = bad.generate(&job("gpt-image-1", "a cat")).await.unwrap_err();
        assert!(matches!(e, ProviderError::Rejected { .. }) && !e.to_string().contains("sk-wrong-secret"), "{e}");
    }
}
