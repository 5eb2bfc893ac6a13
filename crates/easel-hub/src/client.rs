//! The hub's HTTP protocol, as huggingface_hub speaks it: repo info for the commit a revision
//! points at, `HEAD .../resolve/<commit>/<file>` for a file's ETag and size (`X-Linked-Etag` and
//! `X-Linked-Size` for LFS files, whose 302 goes to a CDN), and a ranged GET of the blob.
//!
//! The token goes to the hub's own host only, never to the CDN a redirect names. Errors read the
//! hub's `X-Error-Code` and `X-Error-Message` headers and say what to do.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::Digest;

use crate::cache::{available_space, RepoCache};
use crate::error::{HubError, Result};
use crate::progress::DownloadProgress;
use crate::token::{describe, Token};

/// A client for one hub endpoint and one cache folder.
pub struct Hub {
    endpoint: String,
    cache_root: PathBuf,
    token: Option<Token>,
    offline: bool,
    agent: ureq::Agent,
}

/// Where the hub is, where its cache lives, and how to authenticate; `from_env` reads the
/// variables the Python client reads.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub endpoint: String,
    pub cache_root: PathBuf,
    pub token: Option<Token>,
    pub offline: bool,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl HubConfig {
    /// `HF_ENDPOINT`, `HF_HUB_CACHE` (or `$HF_HOME/hub`), `HF_HUB_OFFLINE` and the token.
    pub fn from_env() -> HubConfig {
        let home = env("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let cache = env("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env("HOME").unwrap_or_else(|| ".".into())).join(".cache"));
            cache.join("huggingface")
        });
        let cache_root = env("HF_HUB_CACHE").or_else(|| env("HUGGINGFACE_HUB_CACHE")).map(PathBuf::from).unwrap_or_else(|| home.join("hub"));
        let offline = env("HF_HUB_OFFLINE").is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"));
        HubConfig {
            endpoint: env("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into()).trim_end_matches('/').to_string(),
            cache_root,
            token: Token::from_env(&home),
            offline,
        }
    }
}

/// What a HEAD of `resolve/<commit>/<file>` says about one file.
#[derive(Debug, Clone)]
struct FileMeta {
    file: String,
    etag: String,
    size: u64,
    location: String,
}

impl FileMeta {
    /// LFS files are named by their sha256 (64 hex digits), others by their git blob sha1.
    fn is_lfs(&self) -> bool {
        self.etag.len() == 64
    }
}

/// Percent-encodes a path for a URL, keeping `/` when `keep_slash`.
fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `scheme://host:port` of a URL, to tell the hub's own host from a CDN's.
fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let end = url[after_scheme..].find('/').map_or(url.len(), |i| after_scheme + i);
    &url[..end]
}

fn normalize_etag(raw: &str) -> String {
    raw.trim().trim_start_matches("W/").trim_matches('"').to_string()
}

#[derive(serde::Deserialize)]
struct RepoInfo {
    sha: Option<String>,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(serde::Deserialize)]
struct Sibling {
    rfilename: String,
}

impl Hub {
    pub fn new(config: HubConfig) -> Hub {
        let agent = ureq::AgentBuilder::new()
            .redirects(0)
            .timeout_connect(Duration::from_secs(10))
            .timeout_read(Duration::from_secs(60))
            .user_agent(concat!("easel/", env!("CARGO_PKG_VERSION")))
            .build();
        Hub { endpoint: config.endpoint, cache_root: config.cache_root, token: config.token, offline: config.offline, agent }
    }

    pub fn from_env() -> Hub {
        Hub::new(HubConfig::from_env())
    }

    pub fn cache_root(&self) -> &Path {
        &self.cache_root
    }

    pub fn is_offline(&self) -> bool {
        self.offline
    }

    /// The snapshot `revision` of `repo` points at: online, one metadata request; offline, the
    /// commit the cache last fetched for it.
    pub fn open(&self, repo: &str, revision: &str) -> Result<Snapshot<'_>> {
        let cache = RepoCache::new(&self.cache_root, repo);
        let cached = |cache: RepoCache| -> Result<Snapshot<'_>> {
            let commit = cache.read_ref(revision).ok_or_else(|| HubError::NotCached {
                repo: repo.to_string(),
                cache: self.cache_root.clone(),
                detail: String::new(),
            })?;
            let files = cache.snapshot_files(&commit);
            Ok(Snapshot { hub: self, cache, revision: revision.to_string(), commit, files, offline: true })
        };
        if self.offline {
            return cached(cache);
        }
        let url = format!("{}/api/models/{}/revision/{}", self.endpoint, repo, encode(revision, false));
        let response = match self.call(self.request("GET", &url), repo, None, revision) {
            Err(unreachable @ HubError::Unreachable { .. }) => {
                // As huggingface_hub does: no network, so use what the cache has for this revision.
                return match cache.read_ref(revision) {
                    Some(_) => {
                        tracing::warn!(repo, "{unreachable}; using the cached snapshot");
                        cached(cache)
                    }
                    None => Err(unreachable),
                };
            }
            other => other?,
        };
        let info: RepoInfo = serde_json::from_reader(response.into_reader()).map_err(|e| HubError::Protocol { url: url.clone(), what: format!("repo info is not JSON: {e}") })?;
        let commit = info.sha.filter(|s| crate::cache::is_commit_hash(s)).ok_or_else(|| HubError::Protocol { url, what: "repo info has no commit `sha`".into() })?;
        let files = info.siblings.into_iter().map(|s| s.rfilename).collect();
        Ok(Snapshot { hub: self, cache, revision: revision.to_string(), commit, files, offline: false })
    }

    fn request(&self, method: &str, url: &str) -> ureq::Request {
        let mut req = self.agent.request(method, url);
        if let Some(token) = &self.token {
            if origin(url) == origin(&self.endpoint) {
                req = req.set("Authorization", &token.bearer());
            }
        }
        req
    }

    /// Sends a request; a 4xx/5xx becomes the error that says what to do.
    fn call(&self, req: ureq::Request, repo: &str, file: Option<&str>, revision: &str) -> Result<ureq::Response> {
        match req.call() {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(status, r)) => Err(self.status_error(status, r, repo, file, revision)),
            Err(ureq::Error::Transport(t)) => Err(HubError::Unreachable { endpoint: self.endpoint.clone(), source: Box::new(t) }),
        }
    }

    fn status_error(&self, status: u16, r: ureq::Response, repo: &str, file: Option<&str>, revision: &str) -> HubError {
        let url = r.get_url().to_string();
        let code = r.header("X-Error-Code").unwrap_or_default().to_string();
        let header_message = r.header("X-Error-Message").map(str::to_string);
        let message = header_message.unwrap_or_else(|| {
            let body = r.into_string().unwrap_or_default();
            serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or_else(|| body.chars().take(200).collect())
        });
        let token = self.token.as_ref();
        let token_source = describe(token);
        let repo = repo.to_string();
        match (code.as_str(), status, token) {
            ("GatedRepo", _, None) | ("RepoNotFound", 401, None) | ("", 401, None) => HubError::NeedsToken { repo, message },
            ("GatedRepo", _, Some(_)) => {
                let url = format!("{}/{}", self.endpoint, repo);
                HubError::Gated { repo, url, token_source, message }
            }
            ("RepoNotFound", _, _) => HubError::RepoNotFound { repo, token_source, message },
            // A hub (or mirror) that answers the repo-info request 404 without a code.
            ("", 404, _) if file.is_none() => HubError::RepoNotFound { repo, token_source, message },
            ("RevisionNotFound", _, _) => HubError::RevisionNotFound { repo, revision: revision.to_string(), message },
            ("EntryNotFound", _, _) => HubError::EntryNotFound { repo, file: file.unwrap_or_default().to_string(), revision: revision.to_string(), message },
            (_, 401, Some(_)) => HubError::TokenRefused { token_source, message },
            _ => HubError::Status { status, url, message },
        }
    }

    /// HEAD of a file at a commit, following the hub's relative redirects (renamed repos) but not
    /// the absolute one to the CDN, whose address becomes the download location.
    fn file_meta(&self, repo: &str, commit: &str, file: &str) -> Result<FileMeta> {
        let mut url = format!("{}/{}/resolve/{}/{}", self.endpoint, repo, commit, encode(file, true));
        for _ in 0..5 {
            let response = self.call(self.request("HEAD", &url).set("Accept-Encoding", "identity"), repo, Some(file), commit)?;
            let location = response.header("Location").map(str::to_string);
            let redirect = (300..400).contains(&response.status());
            if let (true, Some(loc)) = (redirect, &location) {
                if loc.starts_with('/') {
                    url = format!("{}{}", origin(&self.endpoint), loc);
                    continue;
                }
            }
            let etag = response.header("X-Linked-Etag").or(response.header("ETag")).map(normalize_etag);
            let size = response.header("X-Linked-Size").or(if redirect { None } else { response.header("Content-Length") }).and_then(|s| s.trim().parse::<u64>().ok());
            let protocol = |what: &str| HubError::Protocol { url: url.clone(), what: what.to_string() };
            let etag = etag.filter(|e| !e.is_empty()).ok_or_else(|| protocol("no ETag"))?;
            let size = size.ok_or_else(|| protocol("no size (X-Linked-Size or Content-Length)"))?;
            if response.header("X-Repo-Commit").is_some_and(|c| c != commit) {
                return Err(protocol("X-Repo-Commit names another commit than the one asked for"));
            }
            return Ok(FileMeta { file: file.to_string(), etag, size, location: location.unwrap_or(url) });
        }
        Err(HubError::Protocol { url, what: "too many redirects".into() })
    }

    /// Fetches one blob into the cache: locked against other processes (the Python client's
    /// lock file), resumed from a partial download with `Range`, verified against its ETag
    /// (sha256 for LFS files, git's blob sha1 otherwise), then renamed into place.
    fn download_blob(&self, cache: &RepoCache, meta: &FileMeta, progress: &dyn DownloadProgress) -> Result<()> {
        let blob = cache.blob_path(&meta.etag);
        let blobs = blob.parent().unwrap_or(&cache.dir).to_path_buf();
        std::fs::create_dir_all(&blobs).map_err(HubError::io(&blobs))?;
        let lock_path = cache.lock_path(&meta.etag);
        if let Some(dir) = lock_path.parent() {
            std::fs::create_dir_all(dir).map_err(HubError::io(dir))?;
        }
        let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(HubError::io(&lock_path))?;
        lock.lock().map_err(HubError::io(&lock_path))?;
        if blob.is_file() {
            return Ok(());
        }
        let partial = blobs.join(format!("{}.incomplete", meta.etag));
        let mut out = std::fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&partial).map_err(HubError::io(&partial))?;
        let mut have = out.metadata().map_err(HubError::io(&partial))?.len();
        if have > meta.size {
            out.set_len(0).map_err(HubError::io(&partial))?;
            have = 0;
        }
        progress.file(&meta.file, meta.size, have);
        let mut attempt = 0;
        while have < meta.size {
            attempt += 1;
            let mut req = self.request("GET", &meta.location);
            if have > 0 {
                req = req.set("Range", &format!("bytes={have}-"));
            }
            let response = match self.call(req, &cache.repo, Some(&meta.file), "") {
                Err(HubError::Unreachable { source, .. }) if attempt < 5 => {
                    tracing::warn!(file = %meta.file, "download failed ({source}); retrying");
                    std::thread::sleep(Duration::from_millis(200 * attempt));
                    continue;
                }
                other => other?,
            };
            if response.status() == 200 && have > 0 {
                // The server ignored the Range: start over.
                out.set_len(0).map_err(HubError::io(&partial))?;
                have = 0;
            } else if response.status() != 200 && response.status() != 206 {
                return Err(HubError::Protocol { url: meta.location.clone(), what: format!("status {} for a download", response.status()) });
            }
            out.seek(std::io::SeekFrom::Start(have)).map_err(HubError::io(&partial))?;
            match copy_counting(response.into_reader(), &mut out, progress) {
                Ok(n) => have += n,
                Err(CopyError::Write(e)) => return Err(HubError::Io { path: partial, source: e }),
                Err(CopyError::Read { copied, source }) => {
                    have += copied;
                    tracing::warn!(file = %meta.file, have, size = meta.size, "download interrupted ({source}); resuming");
                    if attempt >= 5 {
                        return Err(HubError::Io { path: partial, source });
                    }
                }
            }
            if have < meta.size && attempt >= 5 {
                return Err(HubError::Protocol { url: meta.location.clone(), what: format!("the download stopped at {have} of {} bytes", meta.size) });
            }
        }
        out.flush().map_err(HubError::io(&partial))?;
        drop(out);
        if let Err(e) = verify(&partial, meta, &cache.repo) {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        std::fs::rename(&partial, &blob).map_err(HubError::io(&blob))?;
        progress.file_done(&meta.file);
        Ok(())
    }
}

enum CopyError {
    Read { copied: u64, source: std::io::Error },
    Write(std::io::Error),
}

fn copy_counting(mut from: impl Read, to: &mut std::fs::File, progress: &dyn DownloadProgress) -> std::result::Result<u64, CopyError> {
    let mut buf = vec![0u8; 1 << 16];
    let mut copied = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(copied),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(CopyError::Read { copied, source }),
        };
        to.write_all(&buf[..n]).map_err(CopyError::Write)?;
        copied += n as u64;
        progress.bytes(n as u64);
    }
}

/// Checks a downloaded file's size and hash against what the hub promised.
fn verify(path: &Path, meta: &FileMeta, repo: &str) -> Result<()> {
    let mut file = std::fs::File::open(path).map_err(HubError::io(path))?;
    let len = file.metadata().map_err(HubError::io(path))?.len();
    let mismatch = |algorithm: &'static str, actual: String| HubError::Checksum { repo: repo.to_string(), file: meta.file.clone(), algorithm, expected: meta.etag.clone(), actual };
    if len != meta.size {
        return Err(mismatch("size", len.to_string()));
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut sha256 = sha2::Sha256::new();
    let mut sha1 = sha1::Sha1::new();
    if !meta.is_lfs() {
        sha1.update(format!("blob {len}\0").as_bytes());
    }
    loop {
        let n = file.read(&mut buf).map_err(HubError::io(path))?;
        if n == 0 {
            break;
        }
        if meta.is_lfs() {
            sha256.update(&buf[..n]);
        } else {
            sha1.update(&buf[..n]);
        }
    }
    let (algorithm, actual) = if meta.is_lfs() { ("sha256", hex::encode(sha256.finalize())) } else { ("git sha1", hex::encode(sha1.finalize())) };
    if actual != meta.etag.to_ascii_lowercase() {
        return Err(mismatch(algorithm, actual));
    }
    Ok(())
}

/// One commit of one repo: the files it has, and a cache folder holding only its files.
pub struct Snapshot<'h> {
    hub: &'h Hub,
    cache: RepoCache,
    revision: String,
    commit: String,
    files: Vec<String>,
    /// Built from the cache alone (offline, or the hub unreachable): nothing may be fetched.
    offline: bool,
}

impl Snapshot<'_> {
    pub fn repo(&self) -> &str {
        &self.cache.repo
    }

    pub fn commit(&self) -> &str {
        &self.commit
    }

    /// The snapshot folder (`.../snapshots/<commit>`).
    pub fn dir(&self) -> PathBuf {
        self.cache.snapshot_dir(&self.commit)
    }

    /// The repo's files at this commit (offline: those in the cache).
    pub fn files(&self) -> &[String] {
        &self.files
    }

    /// Whether this snapshot comes from the cache alone, so `files` lists only cached ones.
    pub fn is_offline(&self) -> bool {
        self.offline
    }

    /// Makes `files` present in the snapshot folder. Files already there cost nothing; the rest
    /// cost one HEAD each, and a download unless their blob is cached already. Checks the disk
    /// has room for everything before the first byte.
    pub fn fetch(&self, files: &[String], progress: &dyn DownloadProgress) -> Result<()> {
        let missing: Vec<&String> = files.iter().filter(|f| !self.cache.has_file(&self.commit, f)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        if self.offline {
            let names: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
            return Err(HubError::NotCached {
                repo: self.cache.repo.clone(),
                cache: self.hub.cache_root.clone(),
                detail: format!(": commit {} lacks {}", &self.commit[..8], names.join(", ")),
            });
        }
        let metas = missing.iter().map(|f| self.hub.file_meta(&self.cache.repo, &self.commit, f)).collect::<Result<Vec<_>>>()?;
        let mut to_download = Vec::new();
        for meta in metas {
            if self.cache.blob_path(&meta.etag).is_file() {
                self.cache.link(&self.commit, &meta.file, &meta.etag)?;
            } else {
                to_download.push(meta);
            }
        }
        if to_download.is_empty() {
            return Ok(());
        }
        let partial_len = |m: &FileMeta| std::fs::metadata(self.cache.dir.join("blobs").join(format!("{}.incomplete", m.etag))).map_or(0, |md| md.len());
        let needed: u64 = to_download.iter().map(|m| m.size.saturating_sub(partial_len(m))).sum();
        let blobs = self.cache.dir.join("blobs");
        if let Some(available) = available_space(&blobs) {
            if needed > available {
                return Err(HubError::DiskSpace { repo: self.cache.repo.clone(), needed, available, dir: blobs });
            }
        }
        progress.start(to_download.len(), needed);
        for meta in &to_download {
            self.hub.download_blob(&self.cache, meta, progress)?;
            self.cache.link(&self.commit, &meta.file, &meta.etag)?;
        }
        progress.finish();
        Ok(())
    }

    /// Records that the revision (e.g. `main`) points at this commit. Called once every file a
    /// load needs is present, so an offline run never finds a ref to a half-fetched snapshot.
    pub fn complete(&self) -> Result<()> {
        if self.offline {
            return Ok(());
        }
        self.cache.write_ref(&self.revision, &self.commit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_tell_hosts_apart() {
        assert_eq!(origin("https://huggingface.co/a/b/resolve/x"), "https://huggingface.co");
        assert_eq!(origin("http://127.0.0.1:9/x"), "http://127.0.0.1:9");
        assert_ne!(origin("https://cdn-lfs.hf.co/x"), origin("https://huggingface.co"));
    }

    #[test]
    fn paths_are_encoded_like_huggingface_hub() {
        assert_eq!(encode("unet/diffusion pytorch.safetensors", true), "unet/diffusion%20pytorch.safetensors");
        assert_eq!(encode("refs/pr/1", false), "refs%2Fpr%2F1");
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
    }
}
