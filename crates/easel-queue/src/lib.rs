//! easel-queue: the durable job queue behind the API.
//!
//! [`JobQueue`] is the seam: the API layer only talks to the trait. [`SqliteQueue`] is the
//! embedded default (one machine, several processes); [`RedisQueue`] is shared by API nodes
//! and workers on many machines. Both pass the same [`conformance`] checks.
//! Guarantees: an accepted job is never lost. A job whose worker dies keeps its lease until
//! it expires, then returns to the queue; after `max_attempts` it fails with its last reason.

#[doc(hidden)]
pub mod conformance;
mod redis_queue;
mod sqlite;

use std::time::Duration;

use easel_api::{Job, JobResult, JobSpec, JobStatus, ModelInfo};

pub use redis_queue::RedisQueue;
pub use sqlite::SqliteQueue;

/// How long a job for a cold model may be passed over for jobs of warm models.
pub const PREFERENCE_WINDOW: Duration = Duration::from_secs(10);

/// Queue failures.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The queue holds its maximum number of waiting jobs.
    #[error("the queue is full ({0} jobs waiting)")]
    Full(usize),
    /// The backing store failed.
    #[error("queue storage: {0}")]
    Storage(String),
}

impl From<rusqlite::Error> for QueueError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Storage(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, QueueError>;

/// The outcome of an enqueue.
#[derive(Debug, Clone)]
pub struct Enqueued {
    pub job: Job,
    /// The Idempotency-Key matched an earlier job, which is returned instead.
    pub existing: bool,
}

/// A durable priority queue of generation jobs.
pub trait JobQueue: Send + Sync {
    /// Adds a job (or returns the one with the same idempotency key).
    fn enqueue(&self, spec: &JobSpec, cache_key: Option<&str>, idempotency_key: Option<&str>) -> Result<Enqueued>;
    /// A job by id.
    fn get(&self, id: &str) -> Result<Option<Job>>;
    /// 0-based position among queued jobs (None unless queued).
    fn position(&self, id: &str) -> Result<Option<usize>>;
    /// Claims the next job and up to `max_batch - 1` compatible ones for `worker`, leased for
    /// `lease`. Higher priority first; within a priority, jobs for the `prefer`red (warm)
    /// models first unless an older job has waited [`PREFERENCE_WINDOW`]; then FIFO.
    fn claim(&self, worker: &str, models: &[String], prefer: &[String], max_batch: usize, lease: Duration) -> Result<Vec<Job>>;
    /// Extends the lease of running jobs.
    fn heartbeat(&self, ids: &[String], lease: Duration) -> Result<()>;
    /// Marks a running job succeeded; false if it was no longer running (canceled, reclaimed).
    fn complete(&self, id: &str, result: &JobResult) -> Result<bool>;
    /// Records a failure: the job goes back to the queue, or fails for good after max attempts.
    fn fail(&self, id: &str, reason: &str, retryable: bool) -> Result<JobStatus>;
    /// Cancels a queued job at once, or asks a running one to stop; returns the new status.
    fn cancel(&self, id: &str) -> Result<Option<JobStatus>>;
    /// Whether cancellation was requested for a running job.
    fn cancel_requested(&self, id: &str) -> Result<bool>;
    /// Marks a running job canceled (the worker stopped it).
    fn mark_canceled(&self, id: &str) -> Result<()>;
    /// A succeeded job with this cache key.
    fn cached(&self, cache_key: &str) -> Result<Option<Job>>;
    /// Number of queued jobs.
    fn depth(&self) -> Result<usize>;
    /// Queued plus running jobs submitted under this API key.
    fn active_for(&self, key: &str) -> Result<usize>;
    /// Returns running jobs whose lease expired to the queue; the number returned.
    fn recover_expired(&self) -> Result<usize>;
    /// Records a job that ran outside the queue (a closed provider served it) as succeeded,
    /// so it has a job record like every other.
    fn insert_finished(&self, spec: &JobSpec, result: &JobResult) -> Result<Job>;
    /// Records that `worker` serves `models` (those in `warm` are loaded), valid for `ttl`;
    /// workers repeat it while they live, so API nodes know which models can run now.
    fn advertise(&self, worker: &str, models: &[ModelInfo], warm: &[String], ttl: Duration) -> Result<()>;
    /// The models that some live worker serves.
    fn live_models(&self) -> Result<Vec<ModelInfo>>;
    /// Blocks up to `timeout` for a sign that new work arrived from another process; false
    /// (at once) when this queue has no such signal and the caller should poll.
    fn wait_for_work(&self, _worker: &str, _timeout: Duration) -> bool {
        false
    }
}

/// The union (first advertisement of each id wins) of workers' advertised model lists (JSON).
fn merge_advertised(lists: Vec<String>) -> Result<Vec<ModelInfo>> {
    let mut out: Vec<ModelInfo> = vec![];
    for list in lists {
        let models: Vec<ModelInfo> = serde_json::from_str(&list).map_err(|e| QueueError::Storage(format!("bad worker advertisement: {e}")))?;
        for m in models {
            if !out.iter().any(|o| o.id == m.id) {
                out.push(m);
            }
        }
    }
    Ok(out)
}
