//! easel-fakehub: a Hugging Face hub on 127.0.0.1 for tests, following the protocol the hub
//! documents and huggingface_hub speaks (checked by `tests/hub/test_fake_hub.py`, which runs the
//! Python client's own `snapshot_download` against it):
//!
//! - `GET /api/models/{repo}/revision/{rev}`: `sha` and `siblings`; `GET .../tree/{rev}` too.
//! - `HEAD|GET /{repo}/resolve/{rev}/{file}`: `X-Repo-Commit`, `ETag` (git blob sha1); LFS files
//!   (`.safetensors`, `.gguf`, `.bin`) answer 302 to a CDN on another host (`localhost` instead
//!   of `127.0.0.1`) with `X-Linked-Etag` (sha256) and `X-Linked-Size`.
//! - The CDN honours `Range` and refuses requests that carry an `Authorization` header, as a
//!   presigned S3 URL does.
//! - Gated repos: metadata is public, files need a granted token (401 `GatedRepo` without one,
//!   403 with an ungranted one). Private and unknown repos: 401 `RepoNotFound` without a token,
//!   404 with one. Missing files: 404 `EntryNotFound`; missing revisions: 404 `RevisionNotFound`.
//!   Each with `X-Error-Code` and `X-Error-Message`. An unknown token: 401.
//! - Faults: cut the next CDN download after N bytes. Every request is logged for assertions.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::Digest;

/// Who may read a repo's files.
#[derive(Debug, Clone)]
pub enum Access {
    Public,
    /// Metadata public; files only for the granted tokens.
    Gated { granted: Vec<String> },
    /// Invisible except to the granted tokens.
    Private { granted: Vec<String> },
}

/// Which server a request reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    Hub,
    Cdn,
}

/// One request, as the fake saw it.
#[derive(Debug, Clone)]
pub struct Logged {
    pub host: Host,
    pub method: String,
    pub path: String,
    pub authorized: bool,
    pub range: Option<String>,
    pub status: u16,
}

struct Commit {
    sha: String,
    files: BTreeMap<String, Arc<Vec<u8>>>,
}

struct Repo {
    access: Access,
    commits: Vec<Commit>,
}

#[derive(Default)]
struct Inner {
    repos: HashMap<String, Repo>,
    tokens: HashSet<String>,
    blobs: HashMap<String, Arc<Vec<u8>>>,
    log: Vec<Logged>,
    cut_next_download: Option<usize>,
    fail_downloads: usize,
    claimed_size: Option<u64>,
    cdn: String,
}

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Inner>>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running fake hub. Dropping it stops the servers.
pub struct FakeHub {
    /// The hub's base URL, for `HF_ENDPOINT`.
    pub endpoint: String,
    /// The CDN's base URL (another host name for the same machine).
    pub cdn: String,
    shared: Shared,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub fn is_lfs(file: &str) -> bool {
    [".safetensors", ".gguf", ".bin", ".pt", ".ckpt"].iter().any(|e| file.ends_with(e))
}

/// Git's blob id of some content: what the hub's `ETag` is for a non-LFS file.
pub fn git_sha1(content: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", content.len()).as_bytes());
    h.update(content);
    hex::encode(h.finalize())
}

pub fn sha256(content: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(content))
}

/// The pointer file git-lfs commits in place of an LFS file.
fn lfs_pointer(content: &[u8]) -> Vec<u8> {
    format!("version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize {}\n", sha256(content), content.len()).into_bytes()
}

impl FakeHub {
    /// Starts the hub and its CDN on free loopback ports, in a thread of their own.
    pub fn start() -> FakeHub {
        Self::start_on(0, 0)
    }

    /// Starts on the given ports (0: any free one).
    pub fn start_on(hub_port: u16, cdn_port: u16) -> FakeHub {
        let shared = Shared::default();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let for_thread = shared.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
            rt.block_on(async move {
                let hub = tokio::net::TcpListener::bind(("127.0.0.1", hub_port)).await.expect("bind hub");
                let cdn = tokio::net::TcpListener::bind(("127.0.0.1", cdn_port)).await.expect("bind cdn");
                let hub_addr = hub.local_addr().expect("hub addr");
                let cdn_url = format!("http://localhost:{}", cdn.local_addr().expect("cdn addr").port());
                for_thread.lock().cdn = cdn_url.clone();
                let hub_app = Router::new()
                    .route("/api/models/{owner}/{name}", get(repo_info_main))
                    .route("/api/models/{owner}/{name}/revision/{rev}", get(repo_info))
                    .route("/api/models/{owner}/{name}/tree/{rev}", get(repo_tree))
                    .route("/{owner}/{name}/resolve/{rev}/{*file}", get(resolve))
                    .with_state(for_thread.clone());
                let cdn_app = Router::new().route("/lfs/{oid}", get(cdn_blob)).with_state(for_thread.clone());
                let _ = ready_tx.send((format!("http://{hub_addr}"), cdn_url));
                let hub_server = axum::serve(hub, hub_app);
                let cdn_server = axum::serve(cdn, cdn_app);
                tokio::select! {
                    _ = hub_server => {}
                    _ = cdn_server => {}
                    _ = stop_rx => {}
                }
            });
        });
        let (endpoint, cdn) = ready_rx.recv().expect("fake hub started");
        FakeHub { endpoint, cdn, shared, stop: Some(stop_tx), thread: Some(thread) }
    }

    /// Adds a repo with no commits yet.
    pub fn add_repo(&self, id: &str, access: Access) {
        self.shared.lock().repos.insert(id.to_string(), Repo { access, commits: Vec::new() });
    }

    /// A token the hub knows (valid, but granted nothing special).
    pub fn add_token(&self, token: &str) {
        self.shared.lock().tokens.insert(token.to_string());
    }

    /// Pushes a commit whose tree is the previous one with `changes` applied (`None` deletes a
    /// file); returns its sha, which `main` now points at.
    pub fn commit(&self, id: &str, changes: Vec<(String, Option<Vec<u8>>)>) -> String {
        let mut inner = self.shared.lock();
        let inner = &mut *inner;
        let repo = inner.repos.get_mut(id).expect("add_repo first");
        let mut files = repo.commits.last().map(|c| c.files.clone()).unwrap_or_default();
        for (path, content) in changes {
            match content {
                Some(bytes) => {
                    let bytes = Arc::new(bytes);
                    inner.blobs.insert(sha256(&bytes), bytes.clone());
                    files.insert(path, bytes);
                }
                None => {
                    files.remove(&path);
                }
            }
        }
        let mut h = sha1::Sha1::new();
        h.update(repo.commits.last().map(|c| c.sha.clone()).unwrap_or_default());
        for (path, content) in &files {
            h.update(path.as_bytes());
            h.update(git_sha1(content));
        }
        let sha = hex::encode(h.finalize());
        repo.commits.push(Commit { sha: sha.clone(), files });
        sha
    }

    /// Commits every file below `dir`, with paths relative to it.
    pub fn commit_dir(&self, id: &str, dir: &std::path::Path) -> std::io::Result<String> {
        let mut changes = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d)? {
                let path = entry?.path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    let rel = path.strip_prefix(dir).map_err(std::io::Error::other)?.to_string_lossy().replace('\\', "/");
                    changes.push((rel, Some(std::fs::read(&path)?)));
                }
            }
        }
        Ok(self.commit(id, changes))
    }

    /// The next CDN download sends `bytes` bytes, then drops the connection.
    pub fn cut_next_download(&self, bytes: usize) {
        self.shared.lock().cut_next_download = Some(bytes);
    }

    /// The next `n` CDN downloads answer 500.
    pub fn fail_downloads(&self, n: usize) {
        self.shared.lock().fail_downloads = n;
    }

    /// From now on every LFS file claims this size in `X-Linked-Size` (a repo too large for the disk).
    pub fn claim_size(&self, bytes: u64) {
        self.shared.lock().claimed_size = Some(bytes);
    }

    /// Every request so far.
    pub fn log(&self) -> Vec<Logged> {
        self.shared.lock().log.clone()
    }

    pub fn clear_log(&self) {
        self.shared.lock().log.clear();
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn token_of(headers: &HeaderMap) -> Option<String> {
    headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).map(str::to_string)
}

fn hub_error(status: StatusCode, code: Option<&str>, message: &str) -> Response {
    let mut r = (status, axum::Json(serde_json::json!({ "error": message }))).into_response();
    if let Some(code) = code {
        r.headers_mut().insert("X-Error-Code", HeaderValue::from_str(code).expect("ascii code"));
    }
    r.headers_mut().insert("X-Error-Message", HeaderValue::from_str(message).unwrap_or(HeaderValue::from_static("error")));
    r
}

enum Want {
    Metadata,
    Files,
}

/// The hub's access rules; `Err` is the answer to send.
fn check(inner: &Inner, id: &str, headers: &HeaderMap, want: Want) -> Result<(), Response> {
    let token = token_of(headers);
    if let Some(t) = &token {
        if !inner.tokens.contains(t) {
            return Err(hub_error(StatusCode::UNAUTHORIZED, None, "Invalid credentials in Authorization header"));
        }
    }
    let not_found = || {
        let status = if token.is_some() { StatusCode::NOT_FOUND } else { StatusCode::UNAUTHORIZED };
        hub_error(status, Some("RepoNotFound"), "Repository not found")
    };
    let granted_to = |granted: &Vec<String>| token.as_ref().is_some_and(|t| granted.contains(t));
    match inner.repos.get(id).map(|r| &r.access) {
        None => Err(not_found()),
        Some(Access::Private { granted }) if !granted_to(granted) => Err(not_found()),
        Some(Access::Gated { granted }) if matches!(want, Want::Files) && !granted_to(granted) => Err(match token {
            None => hub_error(StatusCode::UNAUTHORIZED, Some("GatedRepo"), &format!("Access to model {id} is restricted. You must have access to it and be authenticated to access it. Please log in.")),
            Some(_) => hub_error(StatusCode::FORBIDDEN, Some("GatedRepo"), &format!("Access to model {id} is restricted and you are not in the authorized list. Visit https://huggingface.co/{id} to ask for access.")),
        }),
        Some(_) => Ok(()),
    }
}

fn find_commit<'a>(repo: &'a Repo, rev: &str) -> Option<&'a Commit> {
    if rev == "main" {
        repo.commits.last()
    } else {
        repo.commits.iter().find(|c| c.sha == rev)
    }
}

fn log(shared: &Shared, host: Host, method: &Method, path: &str, headers: &HeaderMap, status: u16) {
    shared.lock().log.push(Logged {
        host,
        method: method.to_string(),
        path: path.to_string(),
        authorized: headers.contains_key("authorization"),
        range: headers.get("range").and_then(|v| v.to_str().ok()).map(str::to_string),
        status,
    });
}

fn info_response(shared: &Shared, id: &str, rev: &str, headers: &HeaderMap) -> Response {
    let inner = shared.lock();
    if let Err(r) = check(&inner, id, headers, Want::Metadata) {
        return r;
    }
    let repo = &inner.repos[id];
    let Some(commit) = find_commit(repo, rev) else {
        return hub_error(StatusCode::NOT_FOUND, Some("RevisionNotFound"), &format!("Invalid rev id: {rev}"));
    };
    let gated = match repo.access {
        Access::Gated { .. } => serde_json::json!("manual"),
        _ => serde_json::json!(false),
    };
    let siblings: Vec<_> = commit.files.keys().map(|f| serde_json::json!({ "rfilename": f })).collect();
    axum::Json(serde_json::json!({
        "_id": commit.sha, "id": id, "modelId": id, "sha": commit.sha, "private": matches!(repo.access, Access::Private { .. }),
        "gated": gated, "disabled": false, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
        "lastModified": "2026-11-30T00:00:00.000Z", "createdAt": "2026-11-30T00:00:00.000Z",
    }))
    .into_response()
}

async fn repo_info_main(State(shared): State<Shared>, Path((owner, name)): Path<(String, String)>, req: Request) -> Response {
    let r = info_response(&shared, &format!("{owner}/{name}"), "main", req.headers());
    log(&shared, Host::Hub, req.method(), req.uri().path(), req.headers(), r.status().as_u16());
    r
}

async fn repo_info(State(shared): State<Shared>, Path((owner, name, rev)): Path<(String, String, String)>, req: Request) -> Response {
    let r = info_response(&shared, &format!("{owner}/{name}"), &rev, req.headers());
    log(&shared, Host::Hub, req.method(), req.uri().path(), req.headers(), r.status().as_u16());
    r
}

async fn repo_tree(State(shared): State<Shared>, Path((owner, name, rev)): Path<(String, String, String)>, req: Request) -> Response {
    let id = format!("{owner}/{name}");
    let r = {
        let inner = shared.lock();
        match check(&inner, &id, req.headers(), Want::Metadata) {
            Err(r) => r,
            Ok(()) => match find_commit(&inner.repos[&id], &rev) {
                None => hub_error(StatusCode::NOT_FOUND, Some("RevisionNotFound"), &format!("Invalid rev id: {rev}")),
                Some(commit) => {
                    let entries: Vec<_> = commit
                        .files
                        .iter()
                        .map(|(path, content)| {
                            let mut e = serde_json::json!({ "type": "file", "path": path, "size": content.len() });
                            if is_lfs(path) {
                                e["oid"] = git_sha1(&lfs_pointer(content)).into();
                                e["lfs"] = serde_json::json!({ "oid": sha256(content), "size": content.len(), "pointerSize": lfs_pointer(content).len() });
                            } else {
                                e["oid"] = git_sha1(content).into();
                            }
                            e
                        })
                        .collect();
                    axum::Json(entries).into_response()
                }
            },
        }
    };
    log(&shared, Host::Hub, req.method(), req.uri().path(), req.headers(), r.status().as_u16());
    r
}

async fn resolve(State(shared): State<Shared>, Path((owner, name, rev, file)): Path<(String, String, String, String)>, req: Request) -> Response {
    let id = format!("{owner}/{name}");
    let r = {
        let inner = shared.lock();
        match check(&inner, &id, req.headers(), Want::Files) {
            Err(r) => r,
            Ok(()) => match find_commit(&inner.repos[&id], &rev) {
                None => hub_error(StatusCode::NOT_FOUND, Some("RevisionNotFound"), &format!("Invalid rev id: {rev}")),
                Some(commit) => match commit.files.get(&file) {
                    None => hub_error(StatusCode::NOT_FOUND, Some("EntryNotFound"), &format!("{file} does not exist on \"{rev}\"")),
                    Some(content) => {
                        let mut headers = HeaderMap::new();
                        let set = |h: &mut HeaderMap, k: &'static str, v: String| {
                            h.insert(k, HeaderValue::from_str(&v).expect("ascii header"));
                        };
                        set(&mut headers, "X-Repo-Commit", commit.sha.clone());
                        if is_lfs(&file) {
                            set(&mut headers, "ETag", format!("\"{}\"", git_sha1(&lfs_pointer(content))));
                            set(&mut headers, "X-Linked-Etag", format!("\"{}\"", sha256(content)));
                            set(&mut headers, "X-Linked-Size", inner.claimed_size.unwrap_or(content.len() as u64).to_string());
                            set(&mut headers, "Location", format!("{}/lfs/{}?X-Amz-Signature=fake", inner.cdn, sha256(content)));
                            (StatusCode::FOUND, headers).into_response()
                        } else {
                            set(&mut headers, "ETag", format!("\"{}\"", git_sha1(content)));
                            (StatusCode::OK, headers, Body::from(content.as_ref().clone())).into_response()
                        }
                    }
                },
            },
        }
    };
    log(&shared, Host::Hub, req.method(), req.uri().path(), req.headers(), r.status().as_u16());
    r
}

/// `bytes=N-` or `bytes=N-M`, as the clients send them.
fn parse_range(range: &str, len: usize) -> Option<(usize, usize)> {
    let spec = range.strip_prefix("bytes=")?;
    let (start, end) = spec.split_once('-')?;
    let start: usize = start.parse().ok()?;
    let end: usize = if end.is_empty() { len.checked_sub(1)? } else { end.parse::<usize>().ok()?.min(len.checked_sub(1)?) };
    (start <= end).then_some((start, end))
}

async fn cdn_blob(State(shared): State<Shared>, Path(oid): Path<String>, req: Request) -> Response {
    let headers = req.headers().clone();
    let (blob, cut, fail) = {
        let mut inner = shared.lock();
        let blob = inner.blobs.get(&oid).cloned();
        let cut = if blob.is_some() { inner.cut_next_download.take() } else { None };
        let fail = inner.fail_downloads > 0;
        inner.fail_downloads = inner.fail_downloads.saturating_sub(1);
        (blob, cut, fail)
    };
    let r = if fail {
        (StatusCode::INTERNAL_SERVER_ERROR, "injected failure").into_response()
    } else if headers.contains_key("authorization") {
        (StatusCode::BAD_REQUEST, "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, Signature query string parameter or the Authorization header should be specified").into_response()
    } else if let Some(blob) = blob {
        let (status, start, end) = match headers.get("range").and_then(|v| v.to_str().ok()) {
            None => (StatusCode::OK, 0, blob.len()),
            Some(r) => match parse_range(r, blob.len()) {
                Some((s, e)) => (StatusCode::PARTIAL_CONTENT, s, e + 1),
                None => return (StatusCode::RANGE_NOT_SATISFIABLE, [("Content-Range", format!("bytes */{}", blob.len()))]).into_response(),
            },
        };
        let body = blob[start..end].to_vec();
        let len = body.len();
        let mut response = match cut {
            Some(after) if after < len => {
                // The first part, then (once it has surely left) a dropped connection.
                let first = Bytes::from(body[..after].to_vec());
                let stream = futures::stream::unfold(Some(first), |state| async move {
                    match state {
                        Some(first) => Some((Ok(first), None)),
                        None => {
                            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                            Some((Err(std::io::Error::other("connection cut by the fake")), None))
                        }
                    }
                });
                Response::new(Body::from_stream(stream))
            }
            _ => Response::new(Body::from(body)),
        };
        *response.status_mut() = status;
        response.headers_mut().insert("Content-Length", HeaderValue::from(len));
        if status == StatusCode::PARTIAL_CONTENT {
            response.headers_mut().insert("Content-Range", HeaderValue::from_str(&format!("bytes {start}-{}/{}", end - 1, blob.len())).expect("ascii"));
        }
        response
    } else {
        (StatusCode::NOT_FOUND, "NoSuchKey").into_response()
    };
    log(&shared, Host::Cdn, req.method(), req.uri().path(), &headers, r.status().as_u16());
    r
}
