//! easel-api: the wire types every layer shares, with no dependency on the engine.
//!
//! OpenAI-compatible image requests and responses (plus easel's own fields), job records and
//! their states, progress events, and errors in OpenAI's `{"error": {...}}` shape. Validation
//! turns a request into a [`JobSpec`] or an [`ApiError`] that names the bad parameter.

mod error;
mod job;
mod lora;
mod request;

pub use error::{ApiError, ErrorBody};
pub use job::{Event, Job, JobResult, JobSpec, JobStatus, RouteCandidate, RoutePlan, SkipLayerGuidance, StoredImage, Timings, WebhookFormat, PROVIDER_QUEUE_PREFIX};
pub use lora::{check_name as check_lora_name, validate_loras, LoraRef, LoraRegistry, LoraSource, MAX_LORAS};
pub use request::{ImageRequest, MemoryEstimate, ModelInfo, OutputFormat, ResponseFormat};
