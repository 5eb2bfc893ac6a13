//! Jobs: what was asked (`JobSpec`), where it stands (`JobStatus`), what came out (`JobResult`).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::request::OutputFormat;

/// A validated generation request, as stored in the queue.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobSpec {
    pub model: String,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: usize,
    pub height: usize,
    pub n: usize,
    pub steps: usize,
    pub guidance: f64,
    /// Seed of the first image; `None` until the server picks one.
    pub seed: u64,
    /// Whether the client chose the seed (only then is the result cacheable).
    pub seed_explicit: bool,
    pub scheduler: Option<String>,
    pub output_format: OutputFormat,
    pub output_compression: Option<u8>,
    pub priority: i32,
    pub user: Option<String>,
    #[serde(default)]
    pub webhook_url: Option<String>,
    /// The LoRA stack (registry names and scales), applied in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<crate::LoraRef>,
    /// `privacy: "private"`: the job never reaches a closed provider.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub private: bool,
    /// Where the job may run, in order, as the router planned it (None: the local model only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<RoutePlan>,
    /// Send a `preview` event every this many steps (None: no previews).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_every: Option<usize>,
    /// How the webhook reads (None: easel's final event).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_format: Option<WebhookFormat>,
    /// SD 3.5's skip-layer guidance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_layer_guidance: Option<SkipLayerGuidance>,
    /// Image-to-image: the picture to start from, already at the job's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_image: Option<InitImageSpec>,
    /// Step caching, as the request or the model's default chose it (None: every step runs the
    /// whole denoiser).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_cache: Option<crate::StepCache>,
    /// ControlNets with their control images at the job's size, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub controlnets: Vec<crate::ControlNetSpec>,
    /// An IP-Adapter with its reference picture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_adapter: Option<crate::IpAdapterSpec>,
}

/// Image-to-image's input as a job carries it through the queue: the picture checked and resized
/// by the gateway (so a worker never meets a bad one), and diffusers' `strength`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InitImageSpec {
    /// PNG bytes, base64, at the job's width and height.
    pub png_base64: String,
    pub strength: f64,
    /// Inpainting: the mask as PNG, base64, at the job's size (white repaints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_png_base64: Option<String>,
}

impl InitImageSpec {
    /// A short digest of the picture, for batch and cache keys.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.png_base64.as_bytes());
        if let Some(mask) = &self.mask_png_base64 {
            h.update(b"\x1fmask\x1f");
            h.update(mask.as_bytes());
        }
        hex::encode(&h.finalize()[..12])
    }
}

/// Skip-layer guidance as diffusers' StableDiffusion3Pipeline takes it: `layers` are the
/// transformer blocks skipped in one more evaluation on steps `i` with
/// `steps * start < i < steps * stop`, whose difference from the conditional prediction is added
/// at `scale`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SkipLayerGuidance {
    pub layers: Vec<usize>,
    pub scale: f64,
    pub start: f64,
    pub stop: f64,
}

/// How a job's webhook reads: easel's own event, or another API's shape for clients that came
/// through that API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum WebhookFormat {
    /// easel's final event, its image URLs absolute under `base_url` (where the client
    /// reached easel), so the receiver can open them.
    Easel { base_url: String },
    /// Replicate's: the prediction, signed the Standard Webhooks way; its output URLs are
    /// absolute under `base_url`.
    Replicate { base_url: String },
}

/// Queue names of closed-provider executors start with this: `@bfl` is BFL's.
pub const PROVIDER_QUEUE_PREFIX: &str = "@";

/// One place a job may run: `local` and a local model, or a closed provider and its model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RouteCandidate {
    pub provider: String,
    pub model: String,
    /// Why the router put it there.
    pub reason: String,
}

impl RouteCandidate {
    pub fn is_local(&self) -> bool {
        self.provider == "local"
    }
}

/// The router's ordered candidates for a job and where it stands among them. A job runs on
/// `candidates[current]`; when that fails, the executor re-queues it for the next one
/// (fallback), noting why in `failures`, so the synchronous and async endpoints behave alike.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RoutePlan {
    pub candidates: Vec<RouteCandidate>,
    #[serde(default)]
    pub current: usize,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<String>,
    /// The OpenAI-style `quality` the request asked for (priced per quality).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<String>,
    /// The `style` the request asked for, for closed providers that have styles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub style: Option<String>,
}

impl RoutePlan {
    pub fn candidate(&self) -> Option<&RouteCandidate> {
        self.candidates.get(self.current)
    }
}

impl JobSpec {
    /// The closed provider the job is queued for now, if any.
    pub fn provider_candidate(&self) -> Option<&RouteCandidate> {
        self.route.as_ref().and_then(RoutePlan::candidate).filter(|c| !c.is_local())
    }

    /// The name the queue serves the job under: the local model, or `@provider` for a closed
    /// provider (whose executor takes any of that provider's models).
    pub fn queue_model(&self) -> String {
        match self.provider_candidate() {
            Some(c) => format!("{PROVIDER_QUEUE_PREFIX}{}", c.provider),
            None => self.model.clone(),
        }
    }

    /// The same job re-targeted at the plan's next candidate after `failure`; None when the
    /// plan has no candidate left.
    pub fn next_candidate(&self, failure: &str) -> Option<JobSpec> {
        let plan = self.route.as_ref()?;
        let next = plan.candidates.get(plan.current + 1)?;
        let mut spec = self.clone();
        spec.model = if next.is_local() { next.model.clone() } else { format!("{}:{}", next.provider, next.model) };
        if let Some(p) = spec.route.as_mut() {
            p.current += 1;
            p.failures.push(failure.to_string());
        }
        Some(spec)
    }

    /// Jobs that may run together as one batch share these.
    pub fn batch_key(&self) -> String {
        // Only jobs with the same LoRA stack share a batch: the stack changes the weights.
        let stack: Vec<String> = self.loras.iter().map(|l| format!("{}:{}", l.name, l.scale)).collect();
        let slg = self.skip_layer_guidance.as_ref().map(|g| format!("{:?}:{}:{}:{}", g.layers, g.scale, g.start, g.stop)).unwrap_or_default();
        // Image-to-image jobs batch with others of the same strength (it sets the first step);
        // each keeps its own picture.
        let strength = self.init_image.as_ref().map(|i| format!("{}{}", i.strength, if i.mask_png_base64.is_some() { "+mask" } else { "" })).unwrap_or_default();
        let cache = self.step_cache.map(|c| c.to_string()).unwrap_or_default();
        // ControlNets batch with the same ControlNets and settings; each job keeps its images.
        let control: Vec<String> = self.controlnets.iter().map(crate::ControlNetSpec::settings_key).collect();
        // The same goes for an IP-Adapter: one adapter and scale per batch, pictures per job.
        let ip = self.ip_adapter.as_ref().map(crate::IpAdapterSpec::batch_key).unwrap_or_default();
        format!(
            "{}|{}x{}|{}|{:?}|{}|{}|{slg}|{strength}|{cache}|{}|{ip}",
            self.queue_model(),
            self.width,
            self.height,
            self.steps,
            self.scheduler,
            self.guidance,
            stack.join(","),
            control.join(",")
        )
    }

    /// A canonical hash of everything that determines the pixels; `None` without an explicit seed.
    pub fn cache_key(&self, model_identity: &str) -> Option<String> {
        if !self.seed_explicit {
            return None;
        }
        let canonical = serde_json::json!({
            "model": model_identity, "prompt": self.prompt, "negative_prompt": self.negative_prompt,
            "width": self.width, "height": self.height, "n": self.n, "steps": self.steps,
            "guidance": self.guidance, "seed": self.seed, "scheduler": self.scheduler,
            "output_format": self.output_format, "output_compression": self.output_compression,
            "loras": self.loras, "skip_layer_guidance": self.skip_layer_guidance,
            "init_image": self.init_image.as_ref().map(|i| (i.digest(), i.strength)),
            "step_cache": self.step_cache,
            "controlnets": self.controlnets.iter().map(crate::ControlNetSpec::key).collect::<Vec<_>>(),
            "ip_adapter": self.ip_adapter.as_ref().map(crate::IpAdapterSpec::key),
        });
        Some(hex::encode(Sha256::digest(canonical.to_string().as_bytes())))
    }
}

/// Where a job stands.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Canceled,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "canceled" => Self::Canceled,
            _ => return None,
        })
    }

    /// Whether the job will change no more.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Canceled)
    }
}

/// One stored output image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoredImage {
    /// Key in the output store, e.g. `<job>/0.png`.
    pub key: String,
    pub seed: u64,
}

/// Stage timings in seconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Timings {
    pub queued_s: f64,
    pub load_s: f64,
    pub text_encode_s: f64,
    pub denoise_s: f64,
    pub decode_s: f64,
    pub total_s: f64,
    /// Denoising steps that reused the step cache's work instead of running the whole
    /// denoiser (see `JobSpec::step_cache`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cached_steps: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// What a finished job produced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobResult {
    pub images: Vec<StoredImage>,
    pub timings: Timings,
    /// Jobs run together in this job's batch (1 = alone).
    pub batch_size: usize,
    /// Amortised cost in USD (this job's share of the batch's engine time at the configured
    /// machine price), as recorded in the ledger.
    #[serde(default)]
    pub cost_usd: f64,
    /// Who made the images: `local` or a closed provider's configured name.
    #[serde(default = "local_provider")]
    pub provider: String,
    /// Why the router chose that provider.
    #[serde(default)]
    pub route_reason: Option<String>,
    /// The provider's own id for the request.
    #[serde(default)]
    pub vendor_id: Option<String>,
}

fn local_provider() -> String {
    "local".into()
}

/// A job record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Job {
    pub id: String,
    pub status: JobStatus,
    pub spec: JobSpec,
    pub result: Option<JobResult>,
    pub error: Option<String>,
    pub attempts: u32,
    pub created_at: f64,
    pub started_at: Option<f64>,
    pub finished_at: Option<f64>,
    pub cache_key: Option<String>,
    /// Served from the result cache without recomputing.
    pub cache_hit: bool,
}

/// Progress events streamed over SSE.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Event {
    Queued { job_id: String, position: usize },
    Started { job_id: String },
    Progress { job_id: String, step: usize, total: usize },
    /// A rough picture of the first image so far (a `data:image/png;base64,` URL), sent every
    /// `preview_every` steps to requests that ask for it.
    Preview { job_id: String, step: usize, total: usize, image: String },
    Completed { job_id: String, urls: Vec<String> },
    Failed { job_id: String, reason: String },
    Canceled { job_id: String },
}

impl Event {
    pub fn job_id(&self) -> &str {
        match self {
            Event::Queued { job_id, .. }
            | Event::Started { job_id }
            | Event::Progress { job_id, .. }
            | Event::Preview { job_id, .. }
            | Event::Completed { job_id, .. }
            | Event::Failed { job_id, .. }
            | Event::Canceled { job_id } => job_id,
        }
    }

    /// The SSE event name.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Queued { .. } => "queued",
            Event::Started { .. } => "started",
            Event::Progress { .. } => "progress",
            Event::Preview { .. } => "preview",
            Event::Completed { .. } => "completed",
            Event::Failed { .. } => "failed",
            Event::Canceled { .. } => "canceled",
        }
    }

    /// Whether no event follows this one.
    pub fn is_final(&self) -> bool {
        matches!(self, Event::Completed { .. } | Event::Failed { .. } | Event::Canceled { .. })
    }
}
