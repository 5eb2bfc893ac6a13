//! Hub failures, each phrased as what the user should do next.

use std::path::PathBuf;

/// Everything that can go wrong resolving or downloading a model.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The hub wants a token: the repo is private, gated, or does not exist (the hub answers all
    /// three with 401 to an anonymous request).
    #[error("`{repo}` needs a Hugging Face token: it is gated, private or does not exist (hub: {message}); set HF_TOKEN, or log in with `hf auth login`")]
    NeedsToken { repo: String, message: String },
    /// The token was refused outright.
    #[error("the hub refused {token_source} (hub: {message}); check it, or unset it for public repos")]
    TokenRefused { token_source: String, message: String },
    /// A gated repo whose licence the token's account has not accepted.
    #[error("`{repo}` is gated: accept its licence at {url} with the account of {token_source} (hub: {message})")]
    Gated { repo: String, url: String, token_source: String, message: String },
    /// No such repo, or the token cannot see it.
    #[error("`{repo}` does not exist on the hub, or is private and {token_source} cannot see it (hub: {message})")]
    RepoNotFound { repo: String, token_source: String, message: String },
    /// The repo exists but has no such branch, tag or commit.
    #[error("`{repo}` has no revision `{revision}` (hub: {message})")]
    RevisionNotFound { repo: String, revision: String, message: String },
    /// The repo exists but not this file.
    #[error("`{repo}` has no file `{file}` at {revision} (hub: {message})")]
    EntryNotFound { repo: String, file: String, revision: String, message: String },
    /// Any other answer the hub gives.
    #[error("the hub answered {status} for {url} (hub: {message})")]
    Status { status: u16, url: String, message: String },
    /// The hub could not be reached at all.
    #[error("cannot reach the hub at {endpoint}; set HF_HUB_OFFLINE=1 to use the cache only, or pass a local directory")]
    Unreachable {
        endpoint: String,
        #[source]
        source: Box<ureq::Transport>,
    },
    /// An answer that does not follow the hub's protocol.
    #[error("unexpected answer from {url}: {what}")]
    Protocol { url: String, what: String },
    /// Offline, and the cache lacks what is needed.
    #[error("`{repo}` is not in the hub cache ({cache}){detail} and HF_HUB_OFFLINE is set; download it with `easel models pull {repo}` on a connected machine, or pass a local directory")]
    NotCached { repo: String, cache: PathBuf, detail: String },
    /// A downloaded file does not hash to what the hub promised.
    #[error("{file} of `{repo}`: downloaded {algorithm} {actual} but the hub promised {expected}; the partial file was removed, run again")]
    Checksum { repo: String, file: String, algorithm: &'static str, expected: String, actual: String },
    /// The download would not fit on the disk.
    #[error("downloading `{repo}` needs {needed} more bytes but {dir} has {available} free; free space or set HF_HOME to a larger disk")]
    DiskSpace { repo: String, needed: u64, available: u64, dir: PathBuf },
    /// The spec names nothing easel can use.
    #[error("{0}")]
    BadSpec(String),
    /// A file in the cache could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl HubError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> HubError {
        let path = path.into();
        move |source| HubError::Io { path, source }
    }
}

/// Shorthand for hub results.
pub type Result<T> = std::result::Result<T, HubError>;
