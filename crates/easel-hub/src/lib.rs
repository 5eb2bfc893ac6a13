//! easel-hub: models from the Hugging Face hub, done the way the Python client does them.
//!
//! - Tokens from `HF_TOKEN`, `HUGGING_FACE_HUB_TOKEN`, then `$HF_HOME/token`; never printed.
//! - The standard cache layout, shared with huggingface_hub both ways ([`cache`]).
//! - One commit per load: the revision is resolved to a commit once, every file comes from
//!   that commit's snapshot, and `refs/main` moves only when the load has all it needs.
//! - Online runs with everything cached cost one metadata request; missing files cost a HEAD,
//!   and a download only when their blob is not cached. Downloads resume with `Range`, are
//!   verified against their sha256 (LFS) or git sha1, and check the disk has room first.
//! - Errors say what to do: a token, a licence to accept, a name that does not exist.
//! - A [`catalogue`] of known models with their authors' defaults and short names.
//!
//! No candle here: the gateway and `easel models` use it without the engine.

pub mod cache;
pub mod catalogue;
mod client;
mod error;
mod model;
mod progress;
mod token;

pub use client::{Hub, HubConfig, Snapshot};
pub use error::{HubError, Result};
pub use model::{parse_spec, pick_variant, resolve_config, resolve_file, resolve_lora, resolve_model, Resolved, Spec};
pub use progress::{DownloadProgress, NoProgress};
pub use token::{Token, TokenSource};
