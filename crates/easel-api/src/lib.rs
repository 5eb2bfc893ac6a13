//! easel-api: the wire types every layer shares, with no dependency on the engine.
//!
//! OpenAI-compatible image requests and responses (plus easel's own fields), job records and
//! their states, progress events, and errors in OpenAI's `{"error": {...}}` shape. Validation
//! turns a request into a [`JobSpec`] or an [`ApiError`] that names the bad parameter.

pub mod canny;
mod controlnet;
mod error;
mod image_input;
mod ip_adapter;
mod job;
mod lora;
mod request;
mod safetensors_header;
mod step_cache;

pub use controlnet::{ControlNetFamily, ControlNetInfo, ControlNetRef, ControlNetRegistry, ControlNetSpec, Preprocess, MAX_CONTROLNETS};
pub use error::{ApiError, ErrorBody};
pub use ip_adapter::{IpAdapterFit, IpAdapterRef, IpAdapterRegistry, IpAdapterSpec};
pub use image_input::{decode_base64_image, decode_image, decode_openai_mask, InputImage, MAX_INPUT_SIDE};
pub use job::{Event, InitImageSpec, Job, JobResult, JobSpec, JobStatus, RouteCandidate, RoutePlan, SkipLayerGuidance, StoredImage, Timings, WebhookFormat, PROVIDER_QUEUE_PREFIX};
pub use lora::{check_name as check_lora_name, validate_loras, LoraRef, LoraRegistry, LoraSource, MAX_LORAS};
pub use step_cache::StepCache;
pub use request::{default_strength, ImageInputs, ImageRequest, MemoryEstimate, ModelInfo, OutputFormat, ResponseFormat};
