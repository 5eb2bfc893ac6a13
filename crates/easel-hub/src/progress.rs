//! Download progress, reported per file and in total; the CLI draws bars from it.

/// Receives download progress. Every method has a no-op default.
pub trait DownloadProgress: Sync {
    /// The download is about to start: `files` files, `bytes` bytes still to fetch in all.
    fn start(&self, _files: usize, _bytes: u64) {}
    /// A file starts; `resumed_from` bytes of it were already on disk.
    fn file(&self, _name: &str, _size: u64, _resumed_from: u64) {}
    /// `n` more bytes of the current file arrived.
    fn bytes(&self, _n: u64) {}
    /// The current file is complete and verified.
    fn file_done(&self, _name: &str) {}
    /// Every file is complete.
    fn finish(&self) {}
}

/// Reports nothing.
pub struct NoProgress;

impl DownloadProgress for NoProgress {}
