//! Closed image APIs behind one enum, each client following its vendor's documented protocol.
//!
//! A client takes an [`ImageJob`] and returns the images' bytes, downloaded at once (vendors'
//! result URLs expire within minutes; easel keeps its own copy). Failures are sorted by what a
//! router should do next: [`ProviderError::falls_through`] says whether another candidate may
//! serve the request. API keys are read from the environment by name and never appear in
//! errors or logs.

mod bfl;
mod fal;
mod ideogram;
mod imagen;
mod openai;
mod recraft;
mod replicate;
mod stability;

use std::time::{Duration, Instant};

pub use bfl::BflClient;
pub use fal::FalClient;
pub use ideogram::IdeogramClient;
pub use imagen::ImagenClient;
pub use openai::OpenAiClient;
pub use recraft::RecraftClient;
pub use replicate::ReplicateClient;
pub use stability::StabilityClient;

/// What to generate, in provider-neutral terms.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageJob {
    /// The vendor's model name (e.g. `gpt-image-1`, `flux-pro-1.1`).
    pub model: String,
    pub prompt: String,
    /// For vendors that take one (Ideogram, Recraft); the others do not see it.
    pub negative_prompt: Option<String>,
    pub width: u32,
    pub height: u32,
    pub n: u32,
    pub seed: Option<u64>,
    /// Vendor quality level where it has one (OpenAI: low/medium/high, standard/hd; Ideogram's
    /// rendering speed).
    pub quality: Option<String>,
    /// Vendor style where it has one (Recraft's style, Ideogram's style type).
    pub style: Option<String>,
    /// png, jpeg or webp.
    pub output_format: String,
    /// A picture to edit, for the models that take one ([`Provider::edit_support`]).
    pub image: Option<EditImage>,
}

/// A picture to start from: image-to-image, or inpainting where a mask is given.
#[derive(Debug, Clone, PartialEq)]
pub struct EditImage {
    /// PNG bytes, already at the request's size.
    pub png: Vec<u8>,
    /// PNG bytes, white = repaint (easel's and diffusers' convention; each client converts to
    /// its vendor's).
    pub mask_png: Option<Vec<u8>>,
    /// How much to change, 0-1, as diffusers' `strength`. Only fal's image-to-image and
    /// inpainting apps take one; OpenAI's edits and BFL's fill and Kontext have none.
    pub strength: f64,
}

/// Which pictures a provider's model takes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EditSupport {
    /// Text only.
    None,
    /// A picture to edit, without a mask (BFL's Kontext, fal's image-to-image apps).
    Image,
    /// A picture, and optionally a mask (OpenAI's edits endpoint).
    ImageAndMask,
    /// A picture and a mask, both required (BFL's fill, fal's fill and inpainting apps).
    MaskRequired,
}

impl EditSupport {
    /// Whether a request with a picture (and a mask or not) can go to this model.
    pub fn accepts(self, mask: bool) -> bool {
        match self {
            EditSupport::None => false,
            EditSupport::Image => !mask,
            EditSupport::ImageAndMask => true,
            EditSupport::MaskRequired => mask,
        }
    }
}

/// What a provider returned.
#[derive(Debug, Clone)]
pub struct ProviderOutput {
    /// Encoded images, already downloaded.
    pub images: Vec<Vec<u8>>,
    /// Wall time from submission to the last byte.
    pub seconds: f64,
    /// The vendor's id for the request, for support tickets.
    pub vendor_id: Option<String>,
}

/// Why a provider did not deliver.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProviderError {
    /// 429: over the vendor's rate; `retry_after` from its Retry-After header.
    #[error("{provider}: rate limited{}", .retry_after.map(|d| format!(" (retry after {}s)", d.as_secs())).unwrap_or_default())]
    RateLimited { provider: String, retry_after: Option<Duration> },
    /// 5xx, connection failures, timeouts, vendor-side task errors.
    #[error("{provider}: unavailable: {message}")]
    Unavailable { provider: String, message: String },
    /// The vendor's moderation refused the prompt or the result.
    #[error("{provider}: moderated: {message}")]
    Moderated { provider: String, message: String },
    /// The vendor refused the request itself (4xx other than 429): bad parameters, bad key.
    #[error("{provider}: rejected: {message}")]
    Rejected { provider: String, message: String },
    /// The vendor answered with something its protocol does not allow.
    #[error("{provider}: malformed response: {message}")]
    Malformed { provider: String, message: String },
    /// The result URL had expired (or vanished) before it could be downloaded.
    #[error("{provider}: result expired before download: {message}")]
    Expired { provider: String, message: String },
}

impl ProviderError {
    /// Whether another candidate may be tried: everything but moderation (a prompt one
    /// vendor's policy refused is not quietly resent to another).
    pub fn falls_through(&self) -> bool {
        !matches!(self, ProviderError::Moderated { .. })
    }
}

/// One configured closed provider.
#[derive(Debug, Clone)]
pub enum Provider {
    /// OpenAI's images API, or any OpenAI-compatible server (another easel, LocalAI,
    /// stable-diffusion.cpp's server).
    OpenAi(OpenAiClient),
    /// Black Forest Labs' API: submit, poll, download.
    Bfl(BflClient),
    /// fal's queue API.
    Fal(FalClient),
    /// Replicate's predictions.
    Replicate(ReplicateClient),
    /// Stability's v2beta stable-image.
    Stability(StabilityClient),
    /// Google's Imagen 4 through the Gemini API.
    Imagen(ImagenClient),
    /// Ideogram 3.0.
    Ideogram(IdeogramClient),
    /// Recraft's OpenAI-compatible API with its styles.
    Recraft(RecraftClient),
}

impl Provider {
    pub fn name(&self) -> &str {
        match self {
            Provider::OpenAi(c) => &c.name,
            Provider::Bfl(c) => &c.name,
            Provider::Fal(c) => &c.name,
            Provider::Replicate(c) => &c.name,
            Provider::Stability(c) => &c.name,
            Provider::Imagen(c) => &c.name,
            Provider::Ideogram(c) => &c.name,
            Provider::Recraft(c) => &c.name,
        }
    }

    /// What `model` at this provider takes in: OpenAI-compatible servers take pictures and
    /// masks on `/images/edits` (all but dall-e-3); BFL's and fal's fill (and fal's inpainting)
    /// models a picture and a mask, their Kontext (and fal's image-to-image) models a picture;
    /// the other clients send text only.
    pub fn edit_support(&self, model: &str) -> EditSupport {
        match self {
            Provider::OpenAi(_) if model == "dall-e-3" => EditSupport::None,
            Provider::OpenAi(_) => EditSupport::ImageAndMask,
            Provider::Bfl(_) => bfl::edit_support(model),
            Provider::Fal(_) => fal::edit_support(model),
            _ => EditSupport::None,
        }
    }

    pub async fn generate(&self, job: &ImageJob) -> Result<ProviderOutput, ProviderError> {
        if let Some(image) = &job.image {
            if !self.edit_support(&job.model).accepts(image.mask_png.is_some()) {
                let what = if image.mask_png.is_some() { "a picture with a mask" } else { "a picture" };
                return Err(ProviderError::Rejected { provider: self.name().to_string(), message: format!("model `{}` does not take {what}", job.model) });
            }
        }
        match self {
            Provider::OpenAi(c) => c.generate(job).await,
            Provider::Bfl(c) => c.generate(job).await,
            Provider::Fal(c) => c.generate(job).await,
            Provider::Replicate(c) => c.generate(job).await,
            Provider::Stability(c) => c.generate(job).await,
            Provider::Imagen(c) => c.generate(job).await,
            Provider::Ideogram(c) => c.generate(job).await,
            Provider::Recraft(c) => c.generate(job).await,
        }
    }
}

/// Shared HTTP plumbing: the client, the provider's name for errors, and the deadline.
#[derive(Debug, Clone)]
pub(crate) struct Http {
    pub name: String,
    pub client: reqwest::Client,
    pub timeout: Duration,
}

impl Http {
    pub fn new(name: &str, timeout: Duration) -> Self {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(10).min(timeout))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Self { name: name.to_string(), client, timeout }
    }

    pub fn unavailable(&self, message: impl std::fmt::Display) -> ProviderError {
        ProviderError::Unavailable { provider: self.name.clone(), message: message.to_string() }
    }

    pub fn malformed(&self, message: impl std::fmt::Display) -> ProviderError {
        ProviderError::Malformed { provider: self.name.clone(), message: message.to_string() }
    }

    /// A transport error, without the request (which may carry a key) in the message.
    pub fn transport(&self, e: reqwest::Error) -> ProviderError {
        let what = if e.is_timeout() {
            "timed out".to_string()
        } else if e.is_connect() {
            "connection failed".to_string()
        } else {
            e.without_url().to_string()
        };
        self.unavailable(what)
    }

    /// Sorts a non-success response by status; `body` is the vendor's error text.
    pub fn status_error(&self, status: reqwest::StatusCode, retry_after: Option<Duration>, body: &str) -> ProviderError {
        let message = vendor_message(body);
        let provider = self.name.clone();
        match status.as_u16() {
            429 => ProviderError::RateLimited { provider, retry_after },
            s if s >= 500 => ProviderError::Unavailable { provider, message: format!("HTTP {s}: {message}") },
            s => ProviderError::Rejected { provider, message: format!("HTTP {s}: {message}") },
        }
    }

    /// Sends `req`, sorting a non-success status into a [`ProviderError`], and parses the JSON.
    pub async fn json(&self, req: reqwest::RequestBuilder) -> Result<serde_json::Value, ProviderError> {
        let r = req.send().await.map_err(|e| self.transport(e))?;
        let status = r.status();
        let ra = retry_after(r.headers());
        let text = r.text().await.map_err(|e| self.transport(e))?;
        if !status.is_success() {
            return Err(self.status_error(status, ra, &text));
        }
        serde_json::from_str(&text).map_err(|e| self.malformed(format!("not JSON: {e}")))
    }

    /// Downloads a result URL at once; 403/404/410 mean it expired.
    pub async fn download(&self, url: &str) -> Result<Vec<u8>, ProviderError> {
        let r = self.client.get(url).send().await.map_err(|e| self.transport(e))?;
        let status = r.status();
        if matches!(status.as_u16(), 403 | 404 | 410) {
            return Err(ProviderError::Expired { provider: self.name.clone(), message: format!("HTTP {status} from the result URL") });
        }
        if !status.is_success() {
            let ra = retry_after(r.headers());
            let body = r.text().await.unwrap_or_default();
            return Err(self.status_error(status, ra, &body));
        }
        Ok(r.bytes().await.map_err(|e| self.transport(e))?.to_vec())
    }

    pub fn deadline(&self) -> Instant {
        Instant::now() + self.timeout
    }
}

/// The Retry-After header in seconds, if any.
pub(crate) fn retry_after(h: &reqwest::header::HeaderMap) -> Option<Duration> {
    h.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The human part of a vendor's error body (OpenAI's error.message, BFL's detail), trimmed.
pub(crate) fn vendor_message(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    let msg = v["error"]["message"].as_str().or_else(|| v["detail"].as_str()).or_else(|| v["message"].as_str()).map(str::to_string);
    let mut m = msg.unwrap_or_else(|| body.trim().to_string());
    if m.len() > 300 {
        m.truncate(300);
    }
    m
}

/// Of a vendor's fixed shapes (each with its width / height ratio), the one closest to
/// `width` x `height` (by the ratios' logarithms, so 2:1 and 1:2 are as far from 1:1).
pub(crate) fn nearest_shape<T: Copy>(width: u32, height: u32, shapes: &[(T, f64)]) -> Option<T> {
    let r = (width.max(1) as f64 / height.max(1) as f64).ln();
    shapes.iter().min_by(|a, b| (a.1.ln() - r).abs().total_cmp(&(b.1.ln() - r).abs())).map(|x| x.0)
}

/// Reads a provider's key from the named environment variable.
pub fn key_from_env(var: &str) -> Option<String> {
    std::env::var(var).ok().map(|k| k.trim().to_string()).filter(|k| !k.is_empty())
}

#[cfg(test)]
pub(crate) mod fake {
    //! A tiny PNG and a way to run a fake vendor server on a free port.

    pub const PNG: &[u8] = &[0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 0];

    pub async fn serve(app: axum::Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        format!("http://{addr}")
    }
}
