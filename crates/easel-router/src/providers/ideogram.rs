//! Ideogram 3.0: `POST {base}/v1/ideogram-v3/generate` with `Api-Key`, multipart form data
//! (`prompt`, `aspect_ratio` as `WxH`, `rendering_speed`, `num_images`, `seed`, `style_type`),
//! answered `{"created", "data": [{"url", "seed", "resolution", "is_image_safe", ...}]}`; the
//! URLs expire, so each image is downloaded at once. The model is `ideogram-v3`; `quality`
//! picks the rendering speed (`turbo`, `default`, `quality`), and `style` the style type
//! (`auto`, `general`, `realistic`, `design`, `fiction`). An image Ideogram marks unsafe comes
//! without a URL; none left is a moderation refusal.

use std::time::{Duration, Instant};

use super::{retry_after, Http, ImageJob, ProviderError, ProviderOutput};

#[derive(Debug, Clone)]
pub struct IdeogramClient {
    pub name: String,
    /// e.g. https://api.ideogram.ai
    pub base_url: String,
    key: String,
    http: Http,
}

const RATIOS: [(&str, f64); 15] = [
    ("1x3", 1.0 / 3.0), ("3x1", 3.0), ("1x2", 0.5), ("2x1", 2.0), ("9x16", 9.0 / 16.0), ("16x9", 16.0 / 9.0), ("10x16", 0.625), ("16x10", 1.6),
    ("2x3", 2.0 / 3.0), ("3x2", 1.5), ("3x4", 0.75), ("4x3", 4.0 / 3.0), ("4x5", 0.8), ("5x4", 1.25), ("1x1", 1.0),
];

fn aspect_ratio(width: u32, height: u32) -> &'static str {
    super::nearest_shape(width, height, &RATIOS).unwrap_or("1x1")
}

impl IdeogramClient {
    pub fn new(name: &str, base_url: &str, key: String, timeout: Duration) -> Self {
        Self { name: name.into(), base_url: base_url.trim_end_matches('/').into(), key, http: Http::new(name, timeout) }
    }

    pub async fn generate(&self, job: &ImageJob) -> Result<ProviderOutput, ProviderError> {
        let t = Instant::now();
        let speed = match job.quality.as_deref().unwrap_or("default") {
            "turbo" => "TURBO",
            "default" | "auto" => "DEFAULT",
            "quality" => "QUALITY",
            q => return Err(ProviderError::Rejected { provider: self.name.clone(), message: format!("quality `{q}` is not turbo, default or quality") }),
        };
        let mut images = vec![];
        let mut asked = 0;
        // At most 8 a call: more are asked for in further calls.
        while asked < job.n.max(1) {
            let count = (job.n.max(1) - asked).min(8);
            let mut form = reqwest::multipart::Form::new()
                .text("prompt", job.prompt.clone())
                .text("aspect_ratio", aspect_ratio(job.width, job.height))
                .text("rendering_speed", speed)
                .text("num_images", count.to_string());
            if let Some(seed) = job.seed {
                form = form.text("seed", ((seed + asked as u64) % 2_147_483_648).to_string());
            }
            if let Some(style) = &job.style {
                form = form.text("style_type", style.to_ascii_uppercase());
            }
            if let Some(negative) = &job.negative_prompt {
                form = form.text("negative_prompt", negative.clone());
            }
            let r = self.http.client.post(format!("{}/v1/ideogram-v3/generate", self.base_url)).header("Api-Key", &self.key).multipart(form).send().await.map_err(|e| self.http.transport(e))?;
            let status = r.status();
            let ra = retry_after(r.headers());
            let text = r.text().await.map_err(|e| self.http.transport(e))?;
            if !status.is_success() {
                return Err(self.http.status_error(status, ra, &text));
            }
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| self.http.malformed(format!("not JSON: {e}")))?;
            let data = v["data"].as_array().ok_or_else(|| self.http.malformed("no `data` array"))?;
            for d in data {
                if let (Some(url), Some(true) | None) = (d["url"].as_str(), d["is_image_safe"].as_bool()) {
                    images.push(self.http.download(url).await?);
                }
            }
            asked += count;
        }
        if images.is_empty() {
            return Err(ProviderError::Moderated { provider: self.name.clone(), message: "every image was marked unsafe".into() });
        }
        Ok(ProviderOutput { images, seconds: t.elapsed().as_secs_f64(), vendor_id: None })
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake;
    use super::*;
    use axum::extract::Multipart;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::{get, post};
    use axum::Router;

    /// Ideogram's v3 generate endpoint as its API reference documents it, with expiring URLs.
    async fn fake_ideogram() -> String {
        let base = std::sync::Arc::new(std::sync::OnceLock::<String>::new());
        let b = base.clone();
        let app = Router::new()
            .route(
                "/v1/ideogram-v3/generate",
                post(move |headers: HeaderMap, mut form: Multipart| {
                    let b = b.clone();
                    async move {
                        if headers.get("api-key").and_then(|v| v.to_str().ok()) != Some("ideo-key") {
                            return (StatusCode::UNAUTHORIZED, r#"{"detail":"Invalid API key"}"#.to_string());
                        }
                        let mut f = std::collections::HashMap::new();
                        while let Ok(Some(field)) = form.next_field().await {
                            let name = field.name().unwrap_or_default().to_string();
                            f.insert(name, field.text().await.unwrap_or_default());
                        }
                        assert_eq!(f["aspect_ratio"], "16x9");
                        let n: usize = f["num_images"].parse().unwrap();
                        let base = b.get().cloned().unwrap_or_default();
                        let safe = f["prompt"] != "unsafe";
                        if f["prompt"] == "down" {
                            return (StatusCode::SERVICE_UNAVAILABLE, "upstream".into());
                        }
                        let url = if f["prompt"] == "expired" { format!("{base}/gone.png") } else { format!("{base}/img.png") };
                        let data: Vec<_> = (0..n)
                            .map(|i| serde_json::json!({"url": if safe { serde_json::json!(url) } else { serde_json::Value::Null }, "prompt": f["prompt"], "resolution": "1312x736", "seed": i, "is_image_safe": safe, "style_type": f.get("style_type").cloned().unwrap_or("AUTO".into())}))
                            .collect();
                        assert_eq!(f["rendering_speed"], if f["prompt"] == "fast" { "TURBO" } else { "DEFAULT" });
                        (StatusCode::OK, serde_json::json!({"created": "2026-11-30T07:00:00Z", "data": data}).to_string())
                    }
                }),
            )
            .route("/img.png", get(|| async { fake::PNG.to_vec() }))
            .route("/gone.png", get(|| async { (StatusCode::NOT_FOUND, "expired") }));
        let url = fake::serve(app).await;
        let _ = base.set(url.clone());
        url
    }

    fn job(prompt: &str, quality: Option<&str>) -> ImageJob {
        ImageJob { model: "ideogram-v3".into(), prompt: prompt.into(), negative_prompt: None, width: 1344, height: 768, n: 2, seed: Some(3), quality: quality.map(Into::into), style: Some("realistic".into()), output_format: "png".into(), image: None }
    }

    #[tokio::test]
    async fn ideogram_posts_multipart_downloads_expiring_urls_and_sorts_refusals() {
        let base = fake_ideogram().await;
        let c = IdeogramClient::new("ideogram", &base, "ideo-key".into(), Duration::from_secs(5));
        let out = c.generate(&job("a poster that says HELLO", None)).await.expect("generates");
        assert_eq!(out.images, vec![fake::PNG.to_vec(); 2]);
        let mut ten = job("a poster that says HELLO", None);
        ten.n = 10;
        assert_eq!(c.generate(&ten).await.expect("8 + 2").images.len(), 10);
        assert_eq!(c.generate(&job("fast", Some("turbo"))).await.expect("turbo").images.len(), 2);
        assert!(matches!(c.generate(&job("unsafe", None)).await, Err(ProviderError::Moderated { .. })));
        assert!(matches!(c.generate(&job("expired", None)).await, Err(ProviderError::Expired { .. })));
        assert!(matches!(c.generate(&job("down", None)).await, Err(ProviderError::Unavailable { .. })));
        assert!(matches!(c.generate(&job("x", Some("ultra"))).await, Err(ProviderError::Rejected { .. })));
        let wrong = IdeogramClient::new("ideogram", &base, "nope".into(), Duration::from_secs(5));
        assert!(matches!(wrong.generate(&job("x", None)).await, Err(ProviderError::Rejected { .. })));
    }
}
