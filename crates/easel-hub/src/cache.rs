//! The standard hub cache (`$HF_HUB_CACHE`, or `$HF_HOME/hub`), laid out exactly as the Python
//! client lays it out, so either client can fill it and the other reuses it:
//!
//! ```text
//! models--owner--name/blobs/<etag>              file contents, named by git sha1 or LFS sha256
//! models--owner--name/refs/main                 the commit a branch pointed at when last fetched
//! models--owner--name/snapshots/<commit>/<path> relative symlinks into blobs/
//! .locks/models--owner--name/<etag>.lock        the lock huggingface_hub takes while writing a blob
//! ```
//!
//! A snapshot folder only ever holds files of its own commit, so a load never mixes commits.

use std::path::{Path, PathBuf};

use crate::error::{HubError, Result};

/// One repo's folder in the cache.
#[derive(Debug, Clone)]
pub struct RepoCache {
    pub repo: String,
    pub dir: PathBuf,
    locks: PathBuf,
}

/// The folder name the Python client gives a model repo.
pub fn folder_name(repo: &str) -> String {
    format!("models--{}", repo.replace('/', "--"))
}

/// The repo id of a snapshot folder (`.../models--owner--name/snapshots/<commit>`), if `dir` is one.
pub fn repo_of_snapshot(dir: &Path) -> Option<String> {
    let snapshots = dir.parent()?;
    if snapshots.file_name()? != "snapshots" {
        return None;
    }
    let folder = snapshots.parent()?.file_name()?.to_str()?;
    let rest = folder.strip_prefix("models--")?;
    let (owner, name) = rest.split_once("--")?;
    Some(format!("{owner}/{name}"))
}

impl RepoCache {
    pub fn new(root: &Path, repo: &str) -> Self {
        let name = folder_name(repo);
        RepoCache { repo: repo.to_string(), dir: root.join(&name), locks: root.join(".locks").join(name) }
    }

    pub fn snapshot_dir(&self, commit: &str) -> PathBuf {
        self.dir.join("snapshots").join(commit)
    }

    pub fn blob_path(&self, etag: &str) -> PathBuf {
        self.dir.join("blobs").join(etag)
    }

    pub fn lock_path(&self, etag: &str) -> PathBuf {
        self.locks.join(format!("{etag}.lock"))
    }

    /// The commit `revision` pointed at when last fetched; a commit hash is its own answer.
    pub fn read_ref(&self, revision: &str) -> Option<String> {
        if is_commit_hash(revision) {
            return Some(revision.to_string());
        }
        let commit = std::fs::read_to_string(self.dir.join("refs").join(revision)).ok()?;
        let commit = commit.trim().to_string();
        is_commit_hash(&commit).then_some(commit)
    }

    pub fn write_ref(&self, revision: &str, commit: &str) -> Result<()> {
        if is_commit_hash(revision) {
            return Ok(());
        }
        let path = self.dir.join("refs").join(revision);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(HubError::io(parent))?;
        }
        std::fs::write(&path, commit).map_err(HubError::io(path))
    }

    /// Whether a snapshot file is present and its blob whole (a dangling link is not).
    pub fn has_file(&self, commit: &str, file: &str) -> bool {
        std::fs::metadata(self.snapshot_dir(commit).join(file)).is_ok_and(|m| m.is_file())
    }

    /// Points `snapshots/<commit>/<file>` at `blobs/<etag>` with a relative link, as Python does
    /// (a copy where links are not allowed).
    pub fn link(&self, commit: &str, file: &str, etag: &str) -> Result<PathBuf> {
        let target = self.snapshot_dir(commit).join(file);
        let parent = target.parent().unwrap_or(&self.dir).to_path_buf();
        std::fs::create_dir_all(&parent).map_err(HubError::io(&parent))?;
        let _ = std::fs::remove_file(&target);
        // Up through the file's own folders, then <commit> and snapshots/.
        let ups = Path::new(file).components().count() + 1;
        let mut relative = PathBuf::new();
        for _ in 0..ups {
            relative.push("..");
        }
        relative.push("blobs");
        relative.push(etag);
        #[cfg(unix)]
        let linked = std::os::unix::fs::symlink(&relative, &target);
        #[cfg(not(unix))]
        let linked = std::fs::copy(self.blob_path(etag), &target).map(|_| ());
        linked.map_err(HubError::io(&target))?;
        Ok(target)
    }

    /// The files of a cached snapshot, relative to it, in sorted order.
    pub fn snapshot_files(&self, commit: &str) -> Vec<String> {
        let root = self.snapshot_dir(commit);
        let mut out = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if let Ok(rel) = path.strip_prefix(&root) {
                    out.push(rel.to_string_lossy().replace('\\', "/"));
                }
            }
        }
        out.sort();
        out
    }
}

/// A 40-hex-digit git commit id.
pub fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// One cached repo, for `easel models list`.
#[derive(Debug, Clone)]
pub struct CachedRepo {
    pub repo: String,
    pub bytes: u64,
    pub snapshots: usize,
    pub main: Option<String>,
    pub dir: PathBuf,
}

/// Every model repo in the cache, by name.
pub fn list(root: &Path) -> Result<Vec<CachedRepo>> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(HubError::Io { path: root.to_path_buf(), source: e }),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix("models--") else { continue };
        let Some((owner, model)) = rest.split_once("--") else { continue };
        let repo = format!("{owner}/{model}");
        let cache = RepoCache::new(root, &repo);
        let bytes = std::fs::read_dir(cache.dir.join("blobs"))
            .map(|it| it.flatten().filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum())
            .unwrap_or(0);
        let snapshots = std::fs::read_dir(cache.dir.join("snapshots")).map(|it| it.flatten().count()).unwrap_or(0);
        let main = cache.read_ref("main");
        out.push(CachedRepo { repo, bytes, snapshots, main, dir: cache.dir });
    }
    out.sort_by(|a, b| a.repo.cmp(&b.repo));
    Ok(out)
}

/// Free bytes on the file system holding `dir` (or its nearest existing ancestor).
pub fn available_space(dir: &Path) -> Option<u64> {
    let mut probe = dir;
    while !probe.exists() {
        probe = probe.parent()?;
    }
    available_space_at(probe)
}

#[cfg(unix)]
fn available_space_at(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid NUL-terminated string and `stat` a properly sized out-parameter.
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut stat) };
    (rc == 0).then(|| stat.f_bavail as u64 * stat.f_frsize as u64)
}

#[cfg(not(unix))]
fn available_space_at(_dir: &Path) -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_folders_name_their_repo() {
        let dir = Path::new("/c/hub/models--black-forest-labs--FLUX.1-dev/snapshots/0123456789abcdef0123456789abcdef01234567");
        assert_eq!(repo_of_snapshot(dir).as_deref(), Some("black-forest-labs/FLUX.1-dev"));
        assert_eq!(repo_of_snapshot(Path::new("/models/sd15")), None);
        assert_eq!(folder_name("stabilityai/sdxl-turbo"), "models--stabilityai--sdxl-turbo");
    }

    #[test]
    fn links_are_relative_and_resolve_from_nested_folders() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = RepoCache::new(tmp.path(), "o/n");
        let commit = "a".repeat(40);
        std::fs::create_dir_all(cache.dir.join("blobs")).unwrap();
        std::fs::write(cache.blob_path("e1"), b"x").unwrap();
        let linked = cache.link(&commit, "unet/config.json", "e1").unwrap();
        assert_eq!(std::fs::read(&linked).unwrap(), b"x");
        assert!(std::fs::read_link(&linked).unwrap().is_relative());
        assert!(cache.has_file(&commit, "unet/config.json"));
        assert_eq!(cache.snapshot_files(&commit), vec!["unet/config.json".to_string()]);
    }
}
