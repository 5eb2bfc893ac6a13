//! The worker loop: claim a batch of compatible jobs, run it on an [`Executor`], store the
//! images, record the result, publish events. Leases are renewed while a batch runs, so a
//! worker that dies (even by kill -9) lets its jobs run again elsewhere.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use easel_api::{Event, Job, JobResult, JobStatus, ModelInfo, StoredImage, Timings};

/// One encoded output image.
#[derive(Debug, Clone)]
pub struct EncodedImage {
    pub bytes: Vec<u8>,
    pub seed: u64,
}

/// Why a batch did not produce images.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// Bad input the validator could not see (e.g. a model file broke): do not retry.
    #[error("{0}")]
    Permanent(String),
    /// A fault that may pass (out of memory, device reset): retry.
    #[error("{0}")]
    Transient(String),
    #[error("canceled")]
    Canceled,
}

/// Stage timings of one batch, shared by its jobs.
#[derive(Debug, Clone, Default)]
pub struct BatchTimings {
    pub load_s: f64,
    pub text_encode_s: f64,
    pub denoise_s: f64,
    pub decode_s: f64,
}

/// Runs generation: the engine behind the queue.
pub trait Executor: Send + Sync {
    /// The models this executor serves.
    fn models(&self) -> Vec<ModelInfo>;
    /// A string that changes whenever a model's weights change (for the result cache).
    fn model_identity(&self, model: &str) -> String;
    /// Runs compatible jobs as one batch; `on_step(done, total)` returns false to cancel.
    fn run_batch(&self, jobs: &[Job], on_step: &mut dyn FnMut(usize, usize) -> bool) -> Result<(Vec<Vec<EncodedImage>>, BatchTimings), ExecError>;
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

/// The URL path under which a stored image is served.
pub fn image_path(key: &str) -> String {
    format!("/v1/images/{key}")
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
        let mut last_beat = Instant::now();
        let mut canceled_ids: Vec<String> = vec![];
        let mut on_step = |done: usize, total: usize| -> bool {
            for id in &ids {
                self.bus.publish(Event::Progress { job_id: id.clone(), step: done, total });
            }
            if last_beat.elapsed() > (self.config.lease / 3).min(ADVERTISE_EVERY) {
                let _ = self.queue.heartbeat(&ids, self.config.lease);
                self.advertise(&self.executor.models(), ADVERTISE_TTL);
                last_beat = Instant::now();
            }
            // A canceled job stops the batch between steps; its batch-mates run again.
            canceled_ids = ids.iter().filter(|id| self.queue.cancel_requested(id).unwrap_or(false)).cloned().collect();
            canceled_ids.is_empty()
        };
        let outcome = self.executor.run_batch(&jobs, &mut on_step);
        match outcome {
            Ok((images, timings)) => {
                for (job, imgs) in jobs.iter().zip(images) {
                    self.finish(job, imgs, &timings, started.elapsed().as_secs_f64(), jobs.len());
                }
            }
            Err(ExecError::Canceled) => {
                for job in &jobs {
                    if canceled_ids.contains(&job.id) {
                        let _ = self.queue.mark_canceled(&job.id);
                        self.bus.publish(Event::Canceled { job_id: job.id.clone() });
                        self.metrics.job_done("canceled", &job.spec.model, 0, now() - job.created_at, None);
                    } else {
                        let _ = self.queue.fail(&job.id, "batch-mate canceled", true);
                    }
                }
            }
            Err(e) => {
                let retry = matches!(e, ExecError::Transient(_));
                for job in &jobs {
                    let reason = e.to_string();
                    match self.queue.fail(&job.id, &reason, retry) {
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

    /// Writes an image, riding out a short store outage (with the job's lease renewed) before
    /// giving the attempt up.
    fn put_with_retries(&self, job_id: &str, key: &str, bytes: &[u8]) -> Result<(), crate::store::StoreError> {
        let mut wait = Duration::from_millis(250);
        let deadline = Instant::now() + STORE_PATIENCE;
        loop {
            match self.store.put(key, bytes) {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() + wait > deadline => return Err(e),
                Err(e) => {
                    tracing::warn!("storing {key}: {e}; retrying in {wait:?}");
                    self.metrics.error("store");
                    std::thread::sleep(wait);
                    let _ = self.queue.heartbeat(&[job_id.to_string()], self.config.lease);
                    wait = (wait * 2).min(Duration::from_secs(4));
                }
            }
        }
    }

    fn finish(&self, job: &Job, images: Vec<EncodedImage>, t: &BatchTimings, run_s: f64, batch: usize) {
        let ext = job.spec.output_format.extension();
        let mut stored = vec![];
        for (i, img) in images.iter().enumerate() {
            let key = format!("{}/{i}.{ext}", job.id);
            if let Err(e) = self.put_with_retries(&job.id, &key, &img.bytes) {
                let reason = format!("storing output: {e}");
                self.metrics.error("store");
                if let Ok(JobStatus::Failed) = self.queue.fail(&job.id, &reason, true) {
                    self.bus.publish(Event::Failed { job_id: job.id.clone(), reason });
                }
                return;
            }
            stored.push(StoredImage { key, seed: img.seed });
        }
        let queued_s = job.started_at.map(|s| s - job.created_at).unwrap_or(0.0);
        // This job's share of the batch's engine time, priced at the machine's amortised rate.
        let engine_s = (t.text_encode_s + t.denoise_s + t.decode_s) / batch.max(1) as f64;
        let cost_usd = self.local_cost.image_usd(engine_s / stored.len().max(1) as f64) * stored.len() as f64;
        let result = JobResult {
            images: stored.clone(),
            timings: Timings {
                queued_s,
                load_s: t.load_s,
                text_encode_s: t.text_encode_s,
                denoise_s: t.denoise_s,
                decode_s: t.decode_s,
                total_s: run_s,
            },
            batch_size: batch,
            cost_usd,
            provider: "local".into(),
            route_reason: None,
            vendor_id: None,
        };
        match self.queue.complete(&job.id, &result) {
            Ok(true) => {
                let steps_per_s = (t.denoise_s > 0.0).then(|| job.spec.steps as f64 / t.denoise_s);
                self.metrics.job_done("succeeded", &job.spec.model, stored.len(), now() - job.created_at, steps_per_s);
                self.record_cost(&easel_router::LedgerEntry {
                    job_id: job.id.clone(),
                    at: now(),
                    api_key: job.spec.user.clone(),
                    provider: "local".into(),
                    model: job.spec.model.clone(),
                    images: stored.len() as u32,
                    cost_usd,
                    seconds: engine_s,
                });
                let urls = stored.iter().map(|s| image_path(&s.key)).collect();
                self.bus.publish(Event::Completed { job_id: job.id.clone(), urls });
            }
            Ok(false) => tracing::warn!("job {} was no longer running when it finished (reclaimed or canceled)", job.id),
            Err(e) => tracing::error!("recording result of {}: {e}", job.id),
        }
    }
}

pub(crate) fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}
