//! OpenAI's images API (`POST /v1/images/generations`, and `POST /v1/images/edits` for a job
//! with a picture), which any OpenAI-compatible image server also speaks: gpt-image-1 always
//! answers base64; dall-e-3 and most compatible servers are asked for `b64_json`; a `url`
//! answer is downloaded at once. An edit's mask goes in OpenAI's convention: a PNG whose
//! transparent pixels mark what to repaint.

use std::time::{Duration, Instant};

use base64::Engine as _;

use super::{retry_after, EditImage, Http, ImageJob, ProviderError, ProviderOutput};

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
        let gpt_image = job.model.starts_with("gpt-image");
        let mut req = match &job.image {
            None => {
                let mut body = serde_json::json!({
                    "model": job.model,
                    "prompt": job.prompt,
                    "n": job.n,
                    "size": format!("{}x{}", job.width, job.height),
                });
                if gpt_image {
                    body["output_format"] = job.output_format.clone().into();
                } else {
                    body["response_format"] = "b64_json".into();
                }
                if let Some(q) = &job.quality {
                    body["quality"] = q.clone().into();
                }
                self.http.client.post(format!("{}/images/generations", self.base_url)).json(&body)
            }
            Some(image) => self.http.client.post(format!("{}/images/edits", self.base_url)).multipart(self.edit_form(job, image)?),
        };
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

    /// The multipart form of `POST /images/edits`, as the openai SDK sends it.
    fn edit_form(&self, job: &ImageJob, image: &EditImage) -> Result<reqwest::multipart::Form, ProviderError> {
        let bad = |message: String| ProviderError::Rejected { provider: self.name.clone(), message };
        let png = |bytes: Vec<u8>, name: &str| reqwest::multipart::Part::bytes(bytes).file_name(name.to_string()).mime_str("image/png").map_err(|e| bad(e.to_string()));
        let mut form = reqwest::multipart::Form::new()
            .text("model", job.model.clone())
            .text("prompt", job.prompt.clone())
            .text("n", job.n.to_string())
            .text("size", format!("{}x{}", job.width, job.height))
            .part("image", png(image.png.clone(), "image.png")?);
        if let Some(mask) = &image.mask_png {
            form = form.part("mask", png(transparent_mask(mask).map_err(bad)?, "mask.png")?);
        }
        form = if job.model.starts_with("gpt-image") { form.text("output_format", job.output_format.clone()) } else { form.text("response_format", "b64_json") };
        if let Some(q) = &job.quality {
            form = form.text("quality", q.clone());
        }
        Ok(form)
    }
}

/// easel's mask (white = repaint) as OpenAI's: an RGBA PNG, transparent where it repaints.
fn transparent_mask(mask_png: &[u8]) -> Result<Vec<u8>, String> {
    let mask = image::load_from_memory(mask_png).map_err(|e| format!("the mask is not an image: {e}"))?.to_luma8();
    let rgba = image::RgbaImage::from_fn(mask.width(), mask.height(), |x, y| {
        let repaint = mask.get_pixel(x, y).0[0] >= 128;
        image::Rgba([0, 0, 0, if repaint { 0 } else { 255 }])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    rgba.write_to(&mut out, image::ImageFormat::Png).map_err(|e| format!("encoding the mask: {e}"))?;
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests {
    use super::super::fake;
    use super::*;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;
    use axum::{Json, Router};

    fn job(model: &str, prompt: &str) -> ImageJob {
        ImageJob { model: model.into(), prompt: prompt.into(), negative_prompt: None, width: 1024, height: 1024, n: 1, seed: None, quality: None, style: None, output_format: "png".into(), image: None }
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

    fn png(img: image::DynamicImage) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    /// OpenAI's edits endpoint: multipart with `image` and an optional `mask` whose transparent
    /// pixels mark what to repaint; the fake answers with what it understood the mask to be.
    async fn fake_openai_edits() -> String {
        let app = Router::new().route(
            "/v1/images/edits",
            post(|mut form: axum::extract::Multipart| async move {
                let mut fields = std::collections::HashMap::new();
                let mut files = std::collections::HashMap::new();
                while let Some(f) = form.next_field().await.unwrap() {
                    let name = f.name().unwrap().to_string();
                    match f.file_name() {
                        Some(_) => {
                            assert_eq!(f.content_type(), Some("image/png"));
                            files.insert(name, f.bytes().await.unwrap().to_vec());
                        }
                        None => _ = fields.insert(name, f.text().await.unwrap()),
                    }
                }
                assert_eq!((fields["model"].as_str(), fields["prompt"].as_str(), fields["size"].as_str()), ("gpt-image-1", "a red door", "4x2"));
                assert!(!fields.contains_key("response_format"), "gpt-image-1 takes output_format");
                image::load_from_memory(&files["image"]).expect("the picture is a PNG");
                // Transparent = edit: report the repainted pixels, row by row.
                let repaint: Vec<bool> = files.get("mask").map(|m| image::load_from_memory(m).unwrap().to_rgba8().pixels().map(|p| p.0[3] == 0).collect()).unwrap_or_default();
                let b64 = base64::engine::general_purpose::STANDARD.encode(fake::PNG);
                Json(serde_json::json!({"created": 1, "data": [{"b64_json": b64}], "easel": {"job_id": format!("{repaint:?}")}}))
            }),
        );
        format!("{}/v1", fake::serve(app).await)
    }

    #[tokio::test]
    async fn edits_go_multipart_with_the_mask_made_transparent_where_it_repaints() {
        let base = fake_openai_edits().await;
        let c = OpenAiClient::new("openai", &base, None, Duration::from_secs(5));
        let picture = png(image::DynamicImage::ImageRgb8(image::RgbImage::new(4, 2)));
        // easel's mask: white = repaint, here the left half.
        let mask = png(image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(4, 2, |x, _| image::Luma([if x < 2 { 255 } else { 0 }]))));
        let edit = |mask_png| ImageJob { width: 4, height: 2, image: Some(EditImage { png: picture.clone(), mask_png, strength: 1.0 }), ..job("gpt-image-1", "a red door") };
        let out = c.generate(&edit(Some(mask))).await.expect("edits");
        assert_eq!(out.images, vec![fake::PNG.to_vec()]);
        assert_eq!(out.vendor_id.as_deref(), Some("[true, true, false, false, true, true, false, false]"));
        let out = c.generate(&edit(None)).await.expect("edits without a mask");
        assert_eq!(out.vendor_id.as_deref(), Some("[]"));
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
