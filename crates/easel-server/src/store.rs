//! The output store: images by key, in a local folder (the default) or in any object store
//! the `object_store` crate speaks to (S3, R2, MinIO and other S3-compatible servers, GCS,
//! Azure), with presigned URLs where the backend can sign them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;
use object_store::{ClientOptions, ObjectStore, PutPayload, RetryConfig};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no such object")]
    NotFound,
    #[error("bad store key `{0}`")]
    BadKey(String),
    #[error("{0}")]
    Backend(String),
}

/// Where finished images go, and where the API reads them back.
pub trait OutputStore: Send + Sync {
    /// Writes an object; readers never see half of it.
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError>;
    fn get(&self, key: &str) -> Result<Vec<u8>, StoreError>;
    /// A time-limited URL that reads the object directly from the backend, if it can sign one.
    fn signed_url(&self, _key: &str) -> Option<String> {
        None
    }
}

/// Whether a store key is safe (no traversal, no absolute paths).
pub fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.split('/').all(|p| !p.is_empty() && p != "." && p != ".." && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
}

fn checked(key: &str) -> Result<&str, StoreError> {
    if valid_key(key) {
        Ok(key)
    } else {
        Err(StoreError::BadKey(key.to_string()))
    }
}

/// Images on the local disk under one root.
#[derive(Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    pub fn new(root: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(root)?;
        Ok(Self { root: root.to_path_buf() })
    }
}

fn io(e: std::io::Error) -> StoreError {
    if e.kind() == std::io::ErrorKind::NotFound {
        StoreError::NotFound
    } else {
        StoreError::Backend(e.to_string())
    }
}

impl OutputStore for LocalStore {
    /// Writes atomically (temp file + rename).
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.root.join(checked(key)?);
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p).map_err(io)?;
        }
        let tmp = path.with_extension("partial");
        std::fs::write(&tmp, bytes).map_err(io)?;
        std::fs::rename(tmp, path).map_err(io)
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        std::fs::read(self.root.join(checked(key)?)).map_err(io)
    }
}

/// An object store bucket (plus a key prefix), reached over HTTP by its own small runtime so
/// that blocking callers (workers) and async ones (handlers) can both use it.
pub struct BucketStore {
    store: Arc<dyn ObjectStore>,
    signer: Option<Arc<dyn Signer>>,
    prefix: String,
    url_lifetime: Duration,
    rt: tokio::runtime::Runtime,
}

fn backend(e: object_store::Error) -> StoreError {
    match e {
        object_store::Error::NotFound { .. } => StoreError::NotFound,
        other => StoreError::Backend(other.to_string()),
    }
}

impl BucketStore {
    /// Opens `url` (`s3://bucket/prefix`, `gs://…`, `az://…`, `file:///…`) with settings from
    /// the usual environment variables (AWS_ENDPOINT, AWS_REGION, AWS_ACCESS_KEY_ID, …), then
    /// writes and reads back a probe object, so a missing bucket or bad credentials stop
    /// start-up with one message instead of failing the first job.
    pub fn open(url: &str, url_lifetime: Duration) -> Result<Self, StoreError> {
        let parsed = url::Url::parse(url).map_err(|e| StoreError::Backend(format!("store URL `{url}`: {e}")))?;
        let prefix = parsed.path().trim_matches('/').to_string();
        // Fail fast: a store outage must turn into a failed (and retried) job, not a hang.
        let retry = RetryConfig { max_retries: 2, retry_timeout: Duration::from_secs(10), ..Default::default() };
        let options = ClientOptions::new().with_timeout(Duration::from_secs(30)).with_connect_timeout(Duration::from_secs(3));
        let (store, signer): (Arc<dyn ObjectStore>, Option<Arc<dyn Signer>>) = match parsed.scheme() {
            "s3" | "s3a" => {
                let mut b = object_store::aws::AmazonS3Builder::from_env().with_url(url).with_retry(retry).with_client_options(options);
                let endpoint = std::env::var("AWS_ENDPOINT").or_else(|_| std::env::var("AWS_ENDPOINT_URL")).unwrap_or_default();
                if endpoint.starts_with("http://") {
                    b = b.with_endpoint(&endpoint).with_allow_http(true);
                } else if !endpoint.is_empty() {
                    b = b.with_endpoint(&endpoint);
                }
                let s3 = Arc::new(b.build().map_err(backend)?);
                (s3.clone(), Some(s3))
            }
            "gs" => {
                let gcs = Arc::new(
                    object_store::gcp::GoogleCloudStorageBuilder::from_env().with_url(url).with_retry(retry).with_client_options(options).build().map_err(backend)?,
                );
                (gcs.clone(), Some(gcs))
            }
            "az" | "azure" | "abfs" | "abfss" => {
                let az = Arc::new(
                    object_store::azure::MicrosoftAzureBuilder::from_env().with_url(url).with_retry(retry).with_client_options(options).build().map_err(backend)?,
                );
                (az.clone(), Some(az))
            }
            "file" => {
                let root = parsed.to_file_path().map_err(|_| StoreError::Backend(format!("store URL `{url}` is not a local path")))?;
                std::fs::create_dir_all(&root).map_err(io)?;
                (Arc::new(object_store::local::LocalFileSystem::new_with_prefix(&root).map_err(backend)?), None)
            }
            other => return Err(StoreError::Backend(format!("unsupported store URL scheme `{other}` (use s3://, gs://, az:// or file://)"))),
        };
        let prefix = if parsed.scheme() == "file" { String::new() } else { prefix };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("easel-store")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let s = Self { store, signer, prefix, url_lifetime, rt };
        s.put(".easel-probe", b"easel").map_err(|e| StoreError::Backend(format!("cannot write to {url}: {e}")))?;
        s.get(".easel-probe").map_err(|e| StoreError::Backend(format!("cannot read from {url}: {e}")))?;
        Ok(s)
    }

    fn path(&self, key: &str) -> Result<ObjectPath, StoreError> {
        let key = checked(key)?;
        Ok(ObjectPath::from(if self.prefix.is_empty() { key.to_string() } else { format!("{}/{key}", self.prefix) }))
    }

    /// Runs `fut` on the store's runtime and waits for it, from any thread.
    fn block<T: Send + 'static>(&self, fut: impl std::future::Future<Output = T> + Send + 'static) -> Result<T, StoreError> {
        futures::executor::block_on(self.rt.spawn(fut)).map_err(|e| StoreError::Backend(e.to_string()))
    }
}

impl OutputStore for BucketStore {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let (store, path, payload) = (self.store.clone(), self.path(key)?, PutPayload::from(bytes.to_vec()));
        self.block(async move { store.put(&path, payload).await })?.map(|_| ()).map_err(backend)
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        let (store, path) = (self.store.clone(), self.path(key)?);
        self.block(async move {
            let r = store.get(&path).await?;
            r.bytes().await
        })?
        .map(|b| b.to_vec())
        .map_err(backend)
    }

    fn signed_url(&self, key: &str) -> Option<String> {
        let signer = self.signer.clone()?;
        let path = self.path(key).ok()?;
        let life = self.url_lifetime;
        if life.is_zero() {
            return None;
        }
        self.block(async move { signer.signed_url(reqwest::Method::GET, &path, life).await }).ok()?.ok().map(|u| u.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_escape_the_store() {
        for bad in ["", "/abs", "../x", "a/../b", "a//b", "a/./b", "a b"] {
            assert!(!valid_key(bad), "{bad}");
        }
        assert!(valid_key("job_1/0.png"));
    }

    #[test]
    fn local_store_round_trips_and_reports_missing() {
        let d = tempfile::tempdir().expect("tempdir");
        let s = LocalStore::new(d.path()).expect("store");
        s.put("j/0.png", b"png").expect("put");
        assert_eq!(s.get("j/0.png").expect("get"), b"png");
        assert!(matches!(s.get("j/1.png"), Err(StoreError::NotFound)));
        assert!(matches!(s.put("../x", b""), Err(StoreError::BadKey(_))));
    }

    #[test]
    fn file_urls_go_through_object_store() {
        let d = tempfile::tempdir().expect("tempdir");
        let url = format!("file://{}", d.path().display());
        let s = BucketStore::open(&url, Duration::from_secs(60)).expect("opens");
        s.put("j/0.png", b"png").expect("put");
        assert_eq!(s.get("j/0.png").expect("get"), b"png");
        assert!(matches!(s.get("j/9.png"), Err(StoreError::NotFound)));
        assert!(s.signed_url("j/0.png").is_none(), "a local folder cannot sign URLs");
        let err = BucketStore::open("ftp://x/y", Duration::ZERO).err().expect("refused");
        assert!(err.to_string().contains("unsupported store URL scheme `ftp`"), "{err}");
    }
}
