//! Recraft: OpenAI-compatible `POST {base}/v1/images/generations` with a Bearer key, plus its
//! own fields: `style` (`realistic_image`, `digital_illustration`, `vector_illustration`, `icon`,
//! `logo_raster`), `model` (`recraftv3`, `recraftv2`, ...), `random_seed`, and sizes from its
//! fixed list (the nearest is sent). Answered `{"created", "credits", "data": [{"image_id",
//! "b64_json" | "url"}]}`; easel asks for `b64_json` and downloads a URL if one comes instead.
//! Vector styles answer SVG, which easel does not store (a script in an SVG served from
//! easel's origin would run there), so they are refused. More images than the 6 Recraft
//! makes at once are asked for in further calls.

use std::time::{Duration, Instant};

use base64::Engine as _;

use super::{Http, ImageJob, ProviderError, ProviderOutput};

#[derive(Debug, Clone)]
pub struct RecraftClient {
    pub name: String,
    /// e.g. https://external.api.recraft.ai
    pub base_url: String,
    key: String,
    http: Http,
}

const SIZES: [(u32, u32); 15] = [
    (1024, 1024), (1365, 1024), (1024, 1365), (1536, 1024), (1024, 1536), (1820, 1024), (1024, 1820), (1024, 2048), (2048, 1024),
    (1434, 1024), (1024, 1434), (1024, 1280), (1280, 1024), (1024, 1707), (1707, 1024),
];

/// Recraft's size nearest in shape to `width` x `height`.
fn size(width: u32, height: u32) -> (u32, u32) {
    let shapes: Vec<((u32, u32), f64)> = SIZES.iter().map(|&(w, h)| ((w, h), w as f64 / h as f64)).collect();
    super::nearest_shape(width, height, &shapes).unwrap_or((1024, 1024))
}

impl RecraftClient {
    pub fn new(name: &str, base_url: &str, key: String, timeout: Duration) -> Self {
        Self { name: name.into(), base_url: base_url.trim_end_matches('/').into(), key, http: Http::new(name, timeout) }
    }

    pub async fn generate(&self, job: &ImageJob) -> Result<ProviderOutput, ProviderError> {
        let t = Instant::now();
        let style = job.style.clone().unwrap_or_else(|| "realistic_image".into());
        if style.starts_with("vector") {
            return Err(ProviderError::Rejected { provider: self.name.clone(), message: format!("style `{style}` answers SVG, which easel does not store; use a raster style") });
        }
        let (w, h) = size(job.width, job.height);
        let mut images = vec![];
        let mut vendor_id = None;
        while images.len() < job.n.max(1) as usize {
            let count = (job.n.max(1) as usize - images.len()).min(6);
            let mut body = serde_json::json!({
                "prompt": job.prompt, "model": job.model, "n": count, "size": format!("{w}x{h}"), "response_format": "b64_json", "style": style,
            });
            if let Some(seed) = job.seed {
                body["random_seed"] = ((seed + images.len() as u64) % 4_294_967_296).into();
            }
            if let Some(negative) = &job.negative_prompt {
                body["negative_prompt"] = negative.clone().into();
            }
            let req = self.http.client.post(format!("{}/v1/images/generations", self.base_url)).bearer_auth(&self.key).json(&body);
            let v = self.http.json(req).await?;
            let data = v["data"].as_array().filter(|d| !d.is_empty()).ok_or_else(|| self.http.malformed("no `data` array"))?;
            for d in data {
                match (d["b64_json"].as_str(), d["url"].as_str()) {
                    (Some(b64), _) => images.push(base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| self.http.malformed(format!("bad base64: {e}")))?),
                    (None, Some(url)) => images.push(self.http.download(url).await?),
                    _ => return Err(self.http.malformed("an image with neither b64_json nor url")),
                }
            }
            vendor_id = vendor_id.or_else(|| data.first().and_then(|d| d["image_id"].as_str()).map(str::to_string));
        }
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

    /// Recraft's generations endpoint as its OpenAPI description defines it.
    async fn fake_recraft() -> String {
        let app = Router::new().route(
            "/v1/images/generations",
            post(|headers: HeaderMap, Json(body): Json<serde_json::Value>| async move {
                if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer rc-key") {
                    return (StatusCode::UNAUTHORIZED, r#"{"code":"not_authenticated","message":"Not authenticated"}"#.to_string());
                }
                assert_eq!(body["size"], "1820x1024", "the nearest of Recraft's sizes to 16:9");
                assert_eq!(body["response_format"], "b64_json");
                if !["realistic_image", "digital_illustration", "vector_illustration", "icon", "logo_raster"].contains(&body["style"].as_str().unwrap_or("")) {
                    return (StatusCode::BAD_REQUEST, r#"{"code":"invalid_style","message":"invalid style"}"#.into());
                }
                let b64 = base64::engine::general_purpose::STANDARD.encode(fake::PNG);
                let n = body["n"].as_u64().unwrap_or(1) as usize;
                let data: Vec<_> = (0..n).map(|i| serde_json::json!({"image_id": format!("img-{i}"), "b64_json": b64})).collect();
                (StatusCode::OK, serde_json::json!({"created": 1_764_000_000, "credits": 40 * n, "data": data}).to_string())
            }),
        );
        fake::serve(app).await
    }

    fn job(style: Option<&str>) -> ImageJob {
        ImageJob { model: "recraftv3".into(), prompt: "a fox logo".into(), negative_prompt: Some("blurry".into()), width: 1344, height: 768, n: 2, seed: Some(9), quality: None, style: style.map(Into::into), output_format: "png".into(), image: None }
    }

    #[tokio::test]
    async fn recraft_sends_its_style_and_size_fields_and_decodes_the_images() {
        let base = fake_recraft().await;
        let c = RecraftClient::new("recraft", &base, "rc-key".into(), Duration::from_secs(5));
        let out = c.generate(&job(Some("digital_illustration"))).await.expect("generates");
        assert_eq!((out.images.len(), out.vendor_id.as_deref()), (2, Some("img-0")));
        assert_eq!(out.images[0], fake::PNG);
        assert!(c.generate(&job(None)).await.is_ok(), "realistic_image by default");
        let mut eight = job(None);
        eight.n = 8;
        assert_eq!(c.generate(&eight).await.expect("two calls").images.len(), 8, "6 + 2");
        assert!(matches!(c.generate(&job(Some("vector_illustration"))).await, Err(ProviderError::Rejected { .. })), "SVG is not stored");
        match c.generate(&job(Some("watercolour"))).await {
            Err(ProviderError::Rejected { message, .. }) => assert!(message.contains("invalid style"), "{message}"),
            other => panic!("{other:?}"),
        }
        let wrong = RecraftClient::new("recraft", &base, "nope".into(), Duration::from_secs(5));
        assert!(matches!(wrong.generate(&job(None)).await, Err(ProviderError::Rejected { .. })));
    }
}
