//! easel-server: the HTTP face of easel, and the worker loop that feeds it.
//!
//! Request path: HTTP (axum) -> validate ([`easel_api`]) -> result cache -> queue
//! ([`easel_queue::JobQueue`]) -> worker ([`worker`]) -> [`Executor`] (the engine, provided by
//! the binary) -> output store -> events (SSE) and responses. This crate never depends on
//! candle: a gateway-only build links no tensor code.

pub mod events;
pub mod gateway;
pub mod http;
pub mod image_urls;
pub mod metrics;
pub mod provider_executor;
pub mod store;
pub mod ssrf;
pub mod webhooks;
pub mod worker;

pub use http::{router, AppState, ServerConfig};

use std::sync::Arc;

/// The handles every stage shares: queue, engine, output store, event bus, metrics.
#[derive(Clone)]
pub struct Services {
    pub queue: Arc<dyn easel_queue::JobQueue>,
    pub executor: Arc<dyn Executor>,
    pub store: Arc<dyn store::OutputStore>,
    pub bus: events::EventBus,
    pub metrics: Arc<metrics::Metrics>,
    /// Rung on every enqueue so an idle in-process worker starts at once.
    pub doorbell: Arc<worker::Doorbell>,
    /// Where each finished job's cost is recorded (None: not kept).
    pub ledger: Option<Arc<easel_router::Ledger>>,
    /// What this node's machine costs, for the amortised cost of a local image.
    pub local_cost: easel_router::LocalCost,
    /// The LoRA names requests may use (a folder of `NAME.safetensors`).
    pub loras: easel_api::LoraRegistry,
    /// The ControlNet names requests may use (a folder of ControlNet folders).
    pub controlnets: easel_api::ControlNetRegistry,
    /// The IP-Adapter names requests may use (a folder of adapter files).
    pub ip_adapters: easel_api::IpAdapterRegistry,
    /// Signs the image URLs in responses, events and webhooks (same secret on every node).
    pub image_urls: image_urls::ImageUrls,
    /// Signs webhooks (same secret on every node).
    pub webhook_signing: webhooks::WebhookSigning,
}

impl Services {
    /// Puts a finished job's cost on the record: the cost counter in /metrics and the ledger
    /// (settling the budget reservation a closed provider's job made).
    pub fn record_cost(&self, entry: &easel_router::LedgerEntry) {
        self.metrics.cost(&entry.provider, &entry.model, entry.cost_usd);
        if let Some(ledger) = &self.ledger {
            if let Err(e) = ledger.settle(entry) {
                tracing::error!("recording the cost of {}: {e}", entry.job_id);
            }
        }
    }
}

pub use worker::{BatchOutput, EncodedImage, ExecError, Executor, PlainStep, ProviderCharge, StepProgress, WorkerConfig};
