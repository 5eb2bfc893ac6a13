//! Google's Imagen 4 through the Gemini API: `POST {base}/v1beta/models/{model}:predict` with
//! `x-goog-api-key`, `{"instances": [{"prompt"}], "parameters": {"sampleCount", "aspectRatio",
//! "sampleImageSize", "outputOptions"}}`, answered `{"predictions": [{"bytesBase64Encoded",
//! "mimeType"}]}` (protocol as google-genai's `models.py` builds it). Models:
//! `imagen-4.0-generate-001`, `imagen-4.0-fast-generate-001`, `imagen-4.0-ultra-generate-001`.
//! Imagen takes an aspect ratio (the nearest of the five it offers is sent), at most 4 images a
//! call (more are asked for in further calls), and no seed on the Gemini API. Images its safety
//! filter drops are missing from `predictions`; none left is a moderation refusal.

use std::time::{Duration, Instant};

use base64::Engine as _;

use super::{Http, ImageJob, ProviderError, ProviderOutput};

#[derive(Debug, Clone)]
pub struct ImagenClient {
    pub name: String,
    /// e.g. https://generativelanguage.googleapis.com
    pub base_url: String,
    key: String,
    http: Http,
}

const RATIOS: [(&str, f64); 5] = [("1:1", 1.0), ("3:4", 0.75), ("4:3", 4.0 / 3.0), ("9:16", 9.0 / 16.0), ("16:9", 16.0 / 9.0)];

fn aspect_ratio(width: u32, height: u32) -> &'static str {
    super::nearest_shape(width, height, &RATIOS).unwrap_or("1:1")
}

impl ImagenClient {
    pub fn new(name: &str, base_url: &str, key: String, timeout: Duration) -> Self {
        Self { name: name.into(), base_url: base_url.trim_end_matches('/').into(), key, http: Http::new(name, timeout) }
    }

    pub async fn generate(&self, job: &ImageJob) -> Result<ProviderOutput, ProviderError> {
        let t = Instant::now();
        let mime = match job.output_format.as_str() {
            "png" => "image/png",
            "jpeg" => "image/jpeg",
            f => return Err(ProviderError::Rejected { provider: self.name.clone(), message: format!("Imagen answers png or jpeg, not {f}") }),
        };
        let mut images = vec![];
        let mut filtered = vec![];
        let mut left = job.n.max(1);
        while left > 0 {
            let count = left.min(4);
            let mut parameters = serde_json::json!({"sampleCount": count, "aspectRatio": aspect_ratio(job.width, job.height), "outputOptions": {"mimeType": mime}});
            // 2K exists for Standard and Ultra, not Fast.
            if job.width.max(job.height) > 1024 && !job.model.contains("fast") {
                parameters["sampleImageSize"] = "2K".into();
            }
            let body = serde_json::json!({"instances": [{"prompt": job.prompt}], "parameters": parameters});
            let req = self.http.client.post(format!("{}/v1beta/models/{}:predict", self.base_url, job.model)).header("x-goog-api-key", &self.key).json(&body);
            let v = self.http.json(req).await?;
            let predictions = v["predictions"].as_array().cloned().unwrap_or_default();
            for p in &predictions {
                match p["bytesBase64Encoded"].as_str() {
                    Some(b64) => images.push(base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| self.http.malformed(format!("bad base64: {e}")))?),
                    None => filtered.push(p["raiFilteredReason"].as_str().unwrap_or("filtered").to_string()),
                }
            }
            left -= count;
        }
        if images.is_empty() {
            let why = if filtered.is_empty() { "every image was filtered".to_string() } else { filtered.join("; ") };
            return Err(ProviderError::Moderated { provider: self.name.clone(), message: why });
        }
        Ok(ProviderOutput { images, seconds: t.elapsed().as_secs_f64(), vendor_id: None })
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake;
    use super::*;
    use axum::extract::Path;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;
    use axum::{Json, Router};

    /// Imagen's predict endpoint as google-genai calls it.
    async fn fake_imagen() -> String {
        let app = Router::new().route(
            "/v1beta/models/{model}",
            post(|Path(model): Path<String>, headers: HeaderMap, Json(body): Json<serde_json::Value>| async move {
                if headers.get("x-goog-api-key").and_then(|v| v.to_str().ok()) != Some("AIza-test") {
                    return (StatusCode::FORBIDDEN, r#"{"error":{"code":403,"message":"Method doesn't allow unregistered callers","status":"PERMISSION_DENIED"}}"#.to_string());
                }
                let Some(model) = model.strip_suffix(":predict") else { return (StatusCode::NOT_FOUND, "{}".into()) };
                if !model.starts_with("imagen-4.0-") {
                    return (StatusCode::NOT_FOUND, format!(r#"{{"error":{{"code":404,"message":"models/{model} is not found","status":"NOT_FOUND"}}}}"#));
                }
                let prompt = body["instances"][0]["prompt"].as_str().unwrap_or_default();
                let count = body["parameters"]["sampleCount"].as_u64().unwrap_or(4);
                assert!((1..=4).contains(&count));
                assert_eq!(body["parameters"]["aspectRatio"], "16:9");
                assert_eq!(body["parameters"].get("sampleImageSize").is_some(), !model.contains("fast"));
                let b64 = base64::engine::general_purpose::STANDARD.encode(fake::PNG);
                match prompt {
                    "blocked" => (StatusCode::OK, r#"{"predictions":[{"raiFilteredReason":"Unable to show generated images due to safety filters."}]}"#.into()),
                    "bad" => (StatusCode::BAD_REQUEST, r#"{"error":{"code":400,"message":"Invalid sample count","status":"INVALID_ARGUMENT"}}"#.into()),
                    "busy" => (StatusCode::TOO_MANY_REQUESTS, r#"{"error":{"code":429,"message":"Resource has been exhausted","status":"RESOURCE_EXHAUSTED"}}"#.into()),
                    _ => {
                        let preds: Vec<_> = (0..count).map(|_| serde_json::json!({"bytesBase64Encoded": b64, "mimeType": "image/png"})).collect();
                        (StatusCode::OK, serde_json::json!({"predictions": preds}).to_string())
                    }
                }
            }),
        );
        fake::serve(app).await
    }

    fn job(model: &str, prompt: &str, n: u32) -> ImageJob {
        ImageJob { model: model.into(), prompt: prompt.into(), negative_prompt: None, width: 1408, height: 768, n, seed: Some(1), quality: None, style: None, output_format: "png".into(), image: None }
    }

    #[tokio::test]
    async fn imagen_predicts_in_batches_of_four_and_sorts_refusals() {
        let base = fake_imagen().await;
        let c = ImagenClient::new("imagen", &base, "AIza-test".into(), Duration::from_secs(5));
        let out = c.generate(&job("imagen-4.0-generate-001", "a lighthouse", 6)).await.expect("generates");
        assert_eq!(out.images.len(), 6, "4 + 2 over two calls");
        assert_eq!(out.images[0], fake::PNG);
        assert_eq!(c.generate(&job("imagen-4.0-fast-generate-001", "a lighthouse", 1)).await.expect("fast").images.len(), 1);
        assert!(matches!(c.generate(&job("imagen-4.0-ultra-generate-001", "blocked", 1)).await, Err(ProviderError::Moderated { .. })));
        match c.generate(&job("imagen-4.0-generate-001", "bad", 1)).await {
            Err(ProviderError::Rejected { message, .. }) => assert!(message.contains("Invalid sample count"), "{message}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(c.generate(&job("imagen-4.0-generate-001", "busy", 1)).await, Err(ProviderError::RateLimited { .. })));
        assert!(matches!(c.generate(&job("imagen-3.9", "x", 1)).await, Err(ProviderError::Rejected { .. })));
        let wrong_key = ImagenClient::new("imagen", &base, "nope".into(), Duration::from_secs(5));
        assert!(matches!(wrong_key.generate(&job("imagen-4.0-generate-001", "x", 1)).await, Err(ProviderError::Rejected { .. })));
    }
}
