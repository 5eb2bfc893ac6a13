//! The worker loop: claim a batch of compatible jobs, run it on an [`Executor`], store the
//! images, record the result, publish events.
//!
//! Leases: a [`LeaseKeeper`] thread renews the batch's leases on its own timer for the whole
//! life of the batch (model load, text encoding, steps, decode, storing), so no stage can
//! outlive a lease however long it takes, and a worker that dies (even by kill -9) lets its
//! jobs run again elsewhere. Fencing: a worker that learns (at a heartbeat, or at a step after
//! it was stopped for longer than a heartbeat period) that it lost a job's lease stops that job
//! at once: it publishes none of its events and stores none of its images, and the queue
//! would refuse its result anyway. Images are stored under the attempt's own keys
//! (`{job}/{attempt}_{i}.{ext}`), so even a write already under way cannot replace the files of
//! the attempt that took over.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use easel_api::{Event, Job, JobResult, JobStatus, ModelInfo, StoredImage, Timings};
use base64::Engine as _;
use easel_queue::{JobQueue, Lease};

/// One encoded output image.
#[derive(Debug, Clone)]
pub struct EncodedImage {
    pub bytes: Vec<u8>,
    pub seed: u64,
}

/// Why a batch did not produce images. Unless it was refused or canceled, a job whose route
/// has another candidate moves on to it (fallback) rather than failing.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// This executor cannot serve it (a model file broke, a provider is down): do not retry here.
    #[error("{0}")]
    Permanent(String),
    /// A fault that may pass (out of memory, device reset): retry.
    #[error("{0}")]
    Transient(String),
    /// A provider's content policy refused the prompt or its result: the job fails, and is not
    /// quietly resent to another provider.
    #[error("{CONTENT_POLICY}: {0}")]
    Refused(String),
    #[error("canceled")]
    Canceled,
}

/// How a job refused by a content policy reads in its error (the API answers it with 400).
pub const CONTENT_POLICY: &str = "content_policy_violation";

/// What a batch produced: each job's images, the batch's timings, and, when a closed provider
/// made them, what it charged (local images are priced from engine time instead).
#[derive(Debug, Clone, Default)]
pub struct BatchOutput {
    pub images: Vec<Vec<EncodedImage>>,
    pub timings: BatchTimings,
    pub charge: Option<ProviderCharge>,
}

/// A closed provider's bill for a one-job batch.
#[derive(Debug, Clone)]
pub struct ProviderCharge {
    pub provider: String,
    pub model: String,
    pub usd: f64,
    pub vendor_id: Option<String>,
    /// Why the router sent it there.
    pub reason: String,
    /// The vendor's wall time.
    pub seconds: f64,
}

/// Stage timings of one batch, shared by its jobs.
#[derive(Debug, Clone, Default)]
pub struct BatchTimings {
    pub load_s: f64,
    pub text_encode_s: f64,
    pub denoise_s: f64,
    pub decode_s: f64,
    pub cached_steps: usize,
}

/// Where a batch stands after a denoising step, as an executor reports it.
pub trait StepProgress {
    fn done(&self) -> usize;
    fn total(&self) -> usize;
    /// A small PNG of the first image of the batch's `job`-th job so far, if the executor can
    /// draw one.
    fn preview_png(&self, job: usize) -> Option<Vec<u8>>;
}

/// A step without previews.
pub struct PlainStep {
    pub done: usize,
    pub total: usize,
}

impl StepProgress for PlainStep {
    fn done(&self) -> usize {
        self.done
    }
    fn total(&self) -> usize {
        self.total
    }
    fn preview_png(&self, _job: usize) -> Option<Vec<u8>> {
        None
    }
}

/// Runs generation: the engine behind the queue.
pub trait Executor: Send + Sync {
    /// The models this executor serves.
    fn models(&self) -> Vec<ModelInfo>;
    /// A string that changes whenever a model's weights change (for the result cache).
    fn model_identity(&self, model: &str) -> String;
    /// Runs compatible jobs as one batch; `on_step` after each step returns false to cancel.
    fn run_batch(&self, jobs: &[Job], on_step: &mut dyn FnMut(&dyn StepProgress) -> bool) -> Result<BatchOutput, ExecError>;
    /// Evicts idle models; called between jobs.
    fn maintain(&self) {}
    /// Models loaded and warm right now.
    fn warm_models(&self) -> Vec<String> {
        vec![]
    }
}

/// How often a worker renews its advertisement, and how long one stays valid.
pub const ADVERTISE_EVERY: Duration = Duration::from_secs(2);
pub const ADVERTISE_TTL: Duration = Duration::from_secs(10);

/// How long a worker keeps retrying a failing store write before failing the attempt.
const STORE_PATIENCE: Duration = Duration::from_secs(15);

/// Worker knobs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub name: String,
    pub max_batch: usize,
    pub lease: Duration,
    pub poll: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self { name: format!("worker-{}", std::process::id()), max_batch: 4, lease: Duration::from_secs(30), poll: Duration::from_millis(250) }
    }
}

/// Wakes idle workers in this process as soon as a job is queued (no polling delay).
#[derive(Default)]
pub struct Doorbell {
    rung: std::sync::Mutex<bool>,
    cv: std::sync::Condvar,
}

impl Doorbell {
    pub fn ring(&self) {
        *self.rung.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cv.notify_all();
    }

    /// Waits for a ring or `timeout`, whichever comes first.
    pub fn wait(&self, timeout: Duration) {
        let guard = self.rung.lock().unwrap_or_else(|p| p.into_inner());
        let (mut guard, _) = self.cv.wait_timeout_while(guard, timeout, |rung| !*rung).unwrap_or_else(|p| p.into_inner());
        *guard = false;
    }
}

/// A worker: the shared services and its own knobs.
pub struct Worker {
    pub services: crate::Services,
    pub config: WorkerConfig,
}

impl std::ops::Deref for Worker {
    type Target = crate::Services;
    fn deref(&self) -> &crate::Services {
        &self.services
    }
}

/// Renews a batch's leases on its own timer and remembers which ones were lost.
struct LeaseKeeper<'a> {
    queue: &'a dyn JobQueue,
    leases: Vec<Lease>,
    lease: Duration,
    /// How often to renew: a third of the lease, so two renewals may fail before it lapses.
    every: Duration,
    state: Mutex<KeeperState>,
    wake: Condvar,
}

struct KeeperState {
    lost: HashSet<String>,
    /// When the queue last confirmed the leases still held.
    confirmed: Instant,
    stopped: bool,
}

impl<'a> LeaseKeeper<'a> {
    fn new(queue: &'a dyn JobQueue, leases: Vec<Lease>, lease: Duration) -> Self {
        let every = (lease / 3).max(Duration::from_millis(50));
        Self { queue, leases, lease, every, state: Mutex::new(KeeperState { lost: HashSet::new(), confirmed: Instant::now(), stopped: false }), wake: Condvar::new() }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, KeeperState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Renews the leases still held, noting the lost ones.
    fn beat(&self) {
        let held: Vec<Lease> = {
            let st = self.state();
            self.leases.iter().filter(|l| !st.lost.contains(&l.job_id)).cloned().collect()
        };
        if held.is_empty() {
            return;
        }
        match self.queue.heartbeat(&held, self.lease) {
            Ok(lost) => {
                let mut st = self.state();
                for id in lost {
                    if st.lost.insert(id.clone()) {
                        tracing::warn!(job = %id, "lost the lease of this job (another worker took it over, or it ended); stopping work on it");
                    }
                }
                st.confirmed = Instant::now();
            }
            Err(e) => tracing::error!("renewing leases: {e}"),
        }
    }

    /// The leases still held. When the last confirmation is older than a renewal period (this
    /// process was stopped, or the queue was unreachable), the queue is asked first.
    fn held(&self) -> Vec<Lease> {
        if self.state().confirmed.elapsed() > self.every {
            self.beat();
        }
        let st = self.state();
        self.leases.iter().filter(|l| !st.lost.contains(&l.job_id)).cloned().collect()
    }

    fn holds(&self, id: &str) -> bool {
        self.held().iter().any(|l| l.job_id == id)
    }

    /// Sleeps one renewal period; false once stopped.
    fn wait(&self) -> bool {
        let st = self.state();
        let (st, _) = self.wake.wait_timeout_while(st, self.every, |s| !s.stopped).unwrap_or_else(|p| p.into_inner());
        !st.stopped
    }

    fn stop(&self) {
        self.state().stopped = true;
        self.wake.notify_all();
    }
}

impl Worker {
    /// Runs until `stop` is set. Blocking: call from a dedicated thread.
    pub fn run(&self, stop: &AtomicBool) {
        let infos = self.executor.models();
        let models: Vec<String> = infos.iter().map(|m| m.id.clone()).collect();
        let mut last_recover = Instant::now() - Duration::from_secs(3600);
        let mut last_advert = last_recover;
        while !stop.load(Ordering::Relaxed) {
            if last_advert.elapsed() >= ADVERTISE_EVERY {
                self.advertise(&infos, ADVERTISE_TTL);
                last_advert = Instant::now();
            }
            if last_recover.elapsed() > Duration::from_secs(1) {
                if let Err(e) = self.queue.recover_expired() {
                    tracing::error!("recovering expired jobs: {e}");
                }
                last_recover = Instant::now();
            }
            let warm = self.executor.warm_models();
            let jobs = match self.queue.claim(&self.config.name, &models, &warm, self.config.max_batch, self.config.lease) {
                Ok(j) => j,
                Err(e) => {
                    tracing::error!("claiming jobs: {e}");
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                }
            };
            if jobs.is_empty() {
                self.executor.maintain();
                // In-process enqueues ring the doorbell; a shared queue may signal the rest.
                if !self.queue.wait_for_work(&self.config.name, self.config.poll) {
                    self.doorbell.wait(self.config.poll);
                }
                continue;
            }
            self.run_jobs(jobs);
        }
        // Stop counting as a server of these models at once.
        self.advertise(&infos, Duration::ZERO);
    }

    /// Tells API nodes (through the queue) which models this worker serves, for `ttl`.
    pub fn advertise(&self, infos: &[ModelInfo], ttl: Duration) {
        if let Err(e) = self.queue.advertise(&self.config.name, infos, &self.executor.warm_models(), ttl) {
            tracing::error!("advertising models: {e}");
        }
    }

    fn run_jobs(&self, jobs: Vec<Job>) {
        let ids: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
        let span = tracing::info_span!("batch", jobs = ?ids, model = %jobs[0].spec.model);
        let _enter = span.enter();
        for j in &jobs {
            self.bus.publish(Event::Started { job_id: j.id.clone() });
        }
        let started = Instant::now();
        let keeper = LeaseKeeper::new(&*self.queue, jobs.iter().map(Lease::of).collect(), self.config.lease);
        std::thread::scope(|scope| {
            let keeper = &keeper;
            scope.spawn(move || {
                let mut last_advert = Instant::now();
                while keeper.wait() {
                    keeper.beat();
                    if last_advert.elapsed() >= ADVERTISE_EVERY {
                        self.advertise(&self.executor.models(), ADVERTISE_TTL);
                        last_advert = Instant::now();
                    }
                }
            });
            self.run_held(&jobs, keeper, started);
            keeper.stop();
        });
    }

    /// Runs a claimed batch while `keeper` renews its leases, and records each job's end.
    fn run_held(&self, jobs: &[Job], keeper: &LeaseKeeper<'_>, started: Instant) {
        let mut canceled_ids: Vec<String> = vec![];
        let mut on_step = |p: &dyn StepProgress| -> bool {
            let held = keeper.held();
            let (done, total) = (p.done(), p.total());
            for (index, job) in jobs.iter().enumerate().filter(|(_, j)| held.iter().any(|l| l.job_id == j.id)) {
                self.bus.publish(Event::Progress { job_id: job.id.clone(), step: done, total });
                let due = job.spec.preview_every.is_some_and(|every| done % every.max(1) == 0 || done == total);
                if let Some(png) = p.preview_png(index).filter(|_| due) {
                    let image = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png));
                    self.bus.publish(Event::Preview { job_id: job.id.clone(), step: done, total, image });
                }
            }
            // A canceled job stops the batch between steps; its batch-mates run again.
            canceled_ids = held.iter().filter(|l| self.queue.cancel_requested(&l.job_id).unwrap_or(false)).map(|l| l.job_id.clone()).collect();
            !held.is_empty() && canceled_ids.is_empty()
        };
        let outcome = self.executor.run_batch(jobs, &mut on_step);
        let held = keeper.held();
        for job in jobs.iter().filter(|j| !held.iter().any(|l| l.job_id == j.id)) {
            tracing::warn!(job = %job.id, "not recording this job's outcome: its lease was lost");
        }
        match outcome {
            Ok(out) => {
                for (job, imgs) in jobs.iter().zip(out.images) {
                    if let Some(lease) = held.iter().find(|l| l.job_id == job.id) {
                        self.finish(job, lease, keeper, imgs, &out.timings, out.charge.as_ref(), started.elapsed().as_secs_f64(), jobs.len());
                    }
                }
            }
            Err(ExecError::Canceled) => {
                for lease in &held {
                    let Some(job) = jobs.iter().find(|j| j.id == lease.job_id) else { continue };
                    if canceled_ids.contains(&job.id) {
                        let _ = self.queue.mark_canceled(lease);
                        self.bus.publish(Event::Canceled { job_id: job.id.clone() });
                        self.metrics.job_done("canceled", &job.spec.model, 0, now() - job.created_at, None);
                    } else {
                        let _ = self.queue.fail(lease, "batch-mate canceled", true);
                    }
                }
            }
            Err(e) => {
                let retry = matches!(e, ExecError::Transient(_));
                for lease in &held {
                    let Some(job) = jobs.iter().find(|j| j.id == lease.job_id) else { continue };
                    let reason = e.to_string();
                    if !matches!(e, ExecError::Refused(_)) && self.fall_back(job, lease, &reason) {
                        continue;
                    }
                    match self.queue.fail(lease, &reason, retry) {
                        Ok(JobStatus::Failed) => {
                            self.metrics.error(if retry { "transient" } else { "permanent" });
                            self.metrics.job_done("failed", &job.spec.model, 0, now() - job.created_at, None);
                            self.bus.publish(Event::Failed { job_id: job.id.clone(), reason });
                        }
                        Ok(_) => {}
                        Err(e) => tracing::error!("recording failure of {}: {e}", job.id),
                    }
                }
            }
        }
    }

    /// Re-queues a failed job for its route's next candidate; false when there is none.
    fn fall_back(&self, job: &Job, lease: &Lease, reason: &str) -> bool {
        let here = job.spec.route.as_ref().and_then(|r| r.candidate()).map(|c| c.provider.clone()).unwrap_or_else(|| "local".into());
        let Some(next) = job.spec.next_candidate(&format!("{here}: {reason}")) else { return false };
        match self.queue.reroute(lease, &next) {
            Ok(true) => {
                tracing::warn!(job = %job.id, from = %job.spec.model, to = %next.model, "falling back to the next candidate: {reason}");
                self.doorbell.ring();
                true
            }
            Ok(false) => true, // no longer ours: nothing to record
            Err(e) => {
                tracing::error!("re-routing {}: {e}", job.id);
                false
            }
        }
    }

    /// Writes an image, riding out a short store outage (the keeper renews the lease meanwhile)
    /// before giving the attempt up; stops at once if the lease is lost.
    fn put_with_retries(&self, keeper: &LeaseKeeper<'_>, job_id: &str, key: &str, bytes: &[u8]) -> Result<(), String> {
        let mut wait = Duration::from_millis(250);
        let deadline = Instant::now() + STORE_PATIENCE;
        loop {
            if !keeper.holds(job_id) {
                return Err("the lease was lost".into());
            }
            match self.store.put(key, bytes) {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() + wait > deadline => return Err(e.to_string()),
                Err(e) => {
                    tracing::warn!("storing {key}: {e}; retrying in {wait:?}");
                    self.metrics.error("store");
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_secs(4));
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(&self, job: &Job, lease: &Lease, keeper: &LeaseKeeper<'_>, images: Vec<EncodedImage>, t: &BatchTimings, charge: Option<&ProviderCharge>, run_s: f64, batch: usize) {
        let mut stored = vec![];
        for (i, img) in images.iter().enumerate() {
            // A closed provider may answer in another format than asked: the file is named
            // (and served) for what it is.
            let ext = charge.and_then(|_| sniff_format(&img.bytes)).unwrap_or(job.spec.output_format.extension());
            let key = format!("{}/{}_{i}.{ext}", job.id, lease.attempt);
            if let Err(e) = self.put_with_retries(keeper, &job.id, &key, &img.bytes) {
                let reason = format!("storing output: {e}");
                self.metrics.error("store");
                if let Ok(JobStatus::Failed) = self.queue.fail(lease, &reason, true) {
                    self.bus.publish(Event::Failed { job_id: job.id.clone(), reason });
                }
                return;
            }
            stored.push(StoredImage { key, seed: img.seed });
        }
        let queued_s = job.started_at.map(|s| s - job.created_at).unwrap_or(0.0);
        // A closed provider's bill, or this job's share of the batch's engine time priced at
        // the machine's amortised rate.
        let engine_s = (t.text_encode_s + t.denoise_s + t.decode_s) / batch.max(1) as f64;
        let (provider, model, cost_usd, seconds) = match charge {
            Some(c) => (c.provider.clone(), c.model.clone(), c.usd, c.seconds),
            None => {
                let usd = self.local_cost.image_usd(engine_s / stored.len().max(1) as f64) * stored.len() as f64;
                ("local".to_string(), job.spec.model.clone(), usd, engine_s)
            }
        };
        let result = JobResult {
            images: stored.clone(),
            timings: Timings {
                queued_s,
                load_s: t.load_s,
                text_encode_s: t.text_encode_s,
                denoise_s: t.denoise_s,
                decode_s: t.decode_s,
                total_s: run_s,
                cached_steps: t.cached_steps,
            },
            batch_size: batch,
            cost_usd,
            provider: provider.clone(),
            route_reason: charge.map(|c| c.reason.clone()).or_else(|| job.spec.route.as_ref().and_then(|r| r.candidate()).map(|c| c.reason.clone())),
            vendor_id: charge.and_then(|c| c.vendor_id.clone()),
        };
        // The ledger first: a worker killed between the two leaves the job to run again, and
        // the ledger keeps one row per job (the first recorded), so it is never missing one.
        self.record_cost(&easel_router::LedgerEntry {
            job_id: job.id.clone(),
            at: now(),
            api_key: job.spec.user.clone(),
            provider,
            model,
            images: stored.len() as u32,
            cost_usd,
            seconds,
        });
        match self.queue.complete(lease, &result) {
            Ok(true) => {
                let steps_per_s = (t.denoise_s > 0.0).then(|| job.spec.steps as f64 / t.denoise_s);
                self.metrics.job_done("succeeded", &job.spec.model, stored.len(), now() - job.created_at, steps_per_s);
                let urls = stored.iter().map(|s| self.image_urls.path(&s.key)).collect();
                self.bus.publish(Event::Completed { job_id: job.id.clone(), urls });
            }
            Ok(false) => tracing::warn!("job {} was no longer this attempt's when it finished (reclaimed or canceled); result discarded", job.id),
            Err(e) => tracing::error!("recording result of {}: {e}", job.id),
        }
    }
}

/// The image format of encoded bytes, by their magic numbers: png, jpeg or webp.
fn sniff_format(bytes: &[u8]) -> Option<&'static str> {
    match bytes {
        [0x89, b'P', b'N', b'G', ..] => Some("png"),
        [0xff, 0xd8, 0xff, ..] => Some("jpeg"),
        [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => Some("webp"),
        _ => None,
    }
}

pub(crate) fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::sniff_format;

    #[test]
    fn stored_files_are_named_for_the_format_the_bytes_are_in() {
        assert_eq!(sniff_format(b"\x89PNG\r\n\x1a\n..."), Some("png"));
        assert_eq!(sniff_format(&[0xff, 0xd8, 0xff, 0xe0, 0, 0]), Some("jpeg"));
        assert_eq!(sniff_format(b"RIFF\x10\0\0\0WEBPVP8 "), Some("webp"));
        assert_eq!(sniff_format(b"<svg xmlns="), None);
    }
}
