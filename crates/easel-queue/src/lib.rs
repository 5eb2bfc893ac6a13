//! easel-queue: the durable job queue behind the API.
//!
//! [`JobQueue`] is the seam: the API layer only talks to the trait. [`SqliteQueue`] is the
//! embedded default (one machine, several processes); [`RedisQueue`] is shared by API nodes
//! and workers on many machines. Both pass the same [`conformance`] checks.
//! Guarantees: an accepted job is never lost. A job whose worker dies keeps its lease until
//! it expires, then returns to the queue; a job whose worker dies twice fails as
//! [`WORKER_CRASHED`] (a request that kills its worker must not crash-loop the fleet), and one
//! that fails `max_attempts` times fails with its last reason.
//!
//! Fencing: every claim is a new attempt, and the worker holds a [`Lease`] naming it. Renewing,
//! completing, failing and canceling take the lease, and the queue accepts them only from the
//! current attempt, so a worker that stalled past its lease cannot overwrite the result of the
//! worker that took the job over.
//!
//! Webhooks are an outbox in the same store: the transition that ends a job with a
//! `webhook_url` also queues its delivery, in the same transaction, and deliverers claim
//! deliveries with a lease like jobs. Whatever the number of API nodes and workers, each final
//! state is delivered by one of them, and a pending delivery survives a restart.

#[doc(hidden)]
pub mod conformance;
#[doc(hidden)]
pub mod testing;
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
    /// An idempotency key came back with a different request.
    #[error("idempotency key already used for job {job_id} with a different request")]
    IdempotencyKeyReused { job_id: String },
}

/// The error a job ends with when its worker died twice while running it.
pub const WORKER_CRASHED: &str = "worker_crashed";

/// How many times a job's worker may die (its lease expire) before the job fails as
/// [`WORKER_CRASHED`].
pub const MAX_CRASHES: u32 = 2;

/// A worker's hold on one claimed job: the job and the attempt it claimed. Only the current
/// attempt's holder may renew, complete, fail or cancel the job.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Lease {
    pub job_id: String,
    pub attempt: u32,
}

impl Lease {
    /// The lease of a job as [`JobQueue::claim`] returned it.
    pub fn of(job: &Job) -> Self {
        Self { job_id: job.id.clone(), attempt: job.attempts }
    }
}

/// An idempotency key as the queue keeps it: already scoped to one API key by the caller, with
/// a fingerprint of the request, so a reuse with another request is refused, not answered with
/// the old job.
#[derive(Debug, Clone, Copy)]
pub struct Idempotency<'a> {
    pub key: &'a str,
    pub fingerprint: &'a str,
}

/// The job an idempotency key names, and the fingerprint of the request that made it.
#[derive(Debug, Clone)]
pub struct IdempotentJob {
    pub job: Job,
    pub fingerprint: String,
}

/// One pending webhook delivery: the final state of a job, for its `webhook_url`.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// Stable across retries (receivers deduplicate on it).
    pub id: String,
    pub job_id: String,
    pub url: String,
    /// 1 on the first try.
    pub attempt: u32,
}

impl Delivery {
    /// The delivery id of a job's final-state webhook.
    pub fn id_for(job_id: &str) -> String {
        format!("dlv_{}", job_id.strip_prefix("job_").unwrap_or(job_id))
    }
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
    /// Adds a job, or returns the one with the same idempotency key and fingerprint
    /// ([`QueueError::IdempotencyKeyReused`] when the fingerprint differs).
    fn enqueue(&self, spec: &JobSpec, cache_key: Option<&str>, idempotency: Option<Idempotency<'_>>) -> Result<Enqueued>;
    /// A job by id.
    fn get(&self, id: &str) -> Result<Option<Job>>;
    /// 0-based position among queued jobs (None unless queued).
    fn position(&self, id: &str) -> Result<Option<usize>>;
    /// Claims the next job and up to `max_batch - 1` compatible ones for `worker`, leased for
    /// `lease`. Higher priority first; within a priority, jobs for the `prefer`red (warm)
    /// models first unless an older job has waited [`PREFERENCE_WINDOW`]; then FIFO.
    fn claim(&self, worker: &str, models: &[String], prefer: &[String], max_batch: usize, lease: Duration) -> Result<Vec<Job>>;
    /// Extends the leases still held; returns the ids of the jobs whose lease was lost (the
    /// job was reclaimed by another attempt, canceled or finished).
    fn heartbeat(&self, leases: &[Lease], lease: Duration) -> Result<Vec<String>>;
    /// Marks a running job succeeded; false if the lease is no longer current.
    fn complete(&self, lease: &Lease, result: &JobResult) -> Result<bool>;
    /// Records a failure: the job goes back to the queue, or fails for good after max attempts.
    /// A lease that is no longer current changes nothing; the job's status is returned.
    fn fail(&self, lease: &Lease, reason: &str, retryable: bool) -> Result<JobStatus>;
    /// Cancels a queued job at once, or asks a running one to stop; returns the new status.
    fn cancel(&self, id: &str) -> Result<Option<JobStatus>>;
    /// Whether cancellation was requested for a running job.
    fn cancel_requested(&self, id: &str) -> Result<bool>;
    /// Marks a running job canceled (the worker stopped it), if the lease is current.
    fn mark_canceled(&self, lease: &Lease) -> Result<()>;
    /// The job an idempotency key was first used for, with that request's fingerprint.
    fn find_idempotent(&self, key: &str) -> Result<Option<IdempotentJob>>;
    /// A succeeded job with this cache key.
    fn cached(&self, cache_key: &str) -> Result<Option<Job>>;
    /// Number of queued jobs.
    fn depth(&self) -> Result<usize>;
    /// Queued plus running jobs submitted under this API key.
    fn active_for(&self, key: &str) -> Result<usize>;
    /// Jobs newest first: those submitted under `owner` (None: every job), at most `limit`,
    /// older than the job `before` when given (pages of a history).
    fn list(&self, owner: Option<&str>, limit: usize, before: Option<&str>) -> Result<Vec<Job>>;
    /// Returns running jobs whose lease expired to the queue (the number returned); a job
    /// whose worker died [`MAX_CRASHES`] times fails as [`WORKER_CRASHED`] instead.
    fn recover_expired(&self) -> Result<usize>;
    /// Claims up to `max` webhook deliveries that are due, each for `lease` (then due again).
    fn claim_deliveries(&self, max: usize, lease: Duration) -> Result<Vec<Delivery>>;
    /// A delivery is done (the receiver answered 2xx, or it was given up): it leaves the outbox.
    fn delivery_done(&self, id: &str) -> Result<()>;
    /// A delivery failed: it is due again after `after`.
    fn delivery_retry(&self, id: &str, after: Duration) -> Result<()>;
    /// Re-queues a running job for another executor (fallback to the next routing candidate):
    /// `spec` replaces its spec, and it waits under `spec.queue_model()`. False if the lease is
    /// no longer current.
    fn reroute(&self, lease: &Lease, spec: &JobSpec) -> Result<bool>;
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
