//! The output store: images by key in a local folder.

use std::path::{Path, PathBuf};

/// Images on the local disk under one root.
#[derive(Clone)]
pub struct LocalStore {
    root: PathBuf,
}

/// Whether a store key is safe (no traversal, no absolute paths).
pub fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.split('/').all(|p| !p.is_empty() && p != "." && p != ".." && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
}

impl LocalStore {
    pub fn new(root: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(root)?;
        Ok(Self { root: root.to_path_buf() })
    }

    fn path(&self, key: &str) -> std::io::Result<PathBuf> {
        if !valid_key(key) {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "bad store key"));
        }
        Ok(self.root.join(key))
    }

    /// Writes atomically (temp file + rename), so readers never see half an image.
    pub fn put(&self, key: &str, bytes: &[u8]) -> std::io::Result<()> {
        let path = self.path(key)?;
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p)?;
        }
        let tmp = path.with_extension("partial");
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(tmp, path)
    }

    pub fn get(&self, key: &str) -> std::io::Result<Vec<u8>> {
        std::fs::read(self.path(key)?)
    }
}
