//! easel-local: the local engine as the rest of easel uses it.
//!
//! `easel generate`, `easel bench` and the server's workers all run models through this crate,
//! so a model's defaults (`easel.json`, the catalogue, the family's) are applied by one function,
//! [`settings`], whichever way a request arrives. The server's side is [`EngineExecutor`]: a
//! warm pool of loaded pipelines (LoRA stacks built from the warm base model, never reloaded),
//! evicted by idle time and a memory budget, running the batches the worker hands it.
//!
//! This crate depends on the engine (and so on candle); the gateway's crates do not depend on
//! it, so a gateway-only build never compiles candle.

mod defaults;
mod executor;
mod memory;

pub use defaults::{model_info, settings, Requested, Settings};
pub use executor::{EngineExecutor, ServedModel};
pub use memory::{default_request_memory, dir_bytes, memory_estimate};

/// Why the local engine could not start serving a model.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("model `{model}` ({dir}): {source}")]
    Load {
        model: String,
        dir: std::path::PathBuf,
        #[source]
        source: easel_engine::EngineError,
    },
}
