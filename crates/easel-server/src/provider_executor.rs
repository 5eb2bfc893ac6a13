//! Closed providers as an [`Executor`], so a job for one takes the same path as a local job:
//! queued, claimed under a lease, stored, recorded and notified by the worker loop.
//!
//! A job routed to provider `bfl` waits in the queue under `@bfl` (see
//! [`easel_api::JobSpec::queue_model`]); this executor serves `@NAME` for every configured
//! provider, one job per batch. Before calling a paid provider it reserves the job's list
//! price against the daily budgets, so concurrent requests cannot overshoot a cap by more than
//! one image; the worker settles the reservation when it records the result. A private job
//! never reaches a provider here, whatever its route says (the router never plans one, and this
//! is the second lock).

use std::sync::Arc;

use easel_api::{Job, ModelInfo, PROVIDER_QUEUE_PREFIX};
use easel_router::providers::ProviderError;
use easel_router::routing::Candidate;

use crate::gateway::Gateway;
use crate::worker::{BatchOutput, BatchTimings, EncodedImage, ExecError, Executor, PlainStep, ProviderCharge, StepProgress};

/// Runs queued jobs on the gateway's closed providers.
pub struct ProviderExecutor {
    gateway: Arc<Gateway>,
    ledger: Option<Arc<easel_router::Ledger>>,
    runtime: tokio::runtime::Handle,
}

impl ProviderExecutor {
    /// `runtime` drives the providers' HTTP clients (worker threads are plain threads).
    pub fn new(gateway: Arc<Gateway>, ledger: Option<Arc<easel_router::Ledger>>, runtime: tokio::runtime::Handle) -> Self {
        Self { gateway, ledger, runtime }
    }
}

impl Executor for ProviderExecutor {
    fn models(&self) -> Vec<ModelInfo> {
        let mut names: Vec<&String> = self.gateway.providers.keys().collect();
        names.sort();
        names.into_iter().map(|p| ModelInfo { id: format!("{PROVIDER_QUEUE_PREFIX}{p}"), ..crate::gateway::remote_model_info(&Candidate { provider: p.clone(), model: String::new(), reason: String::new() }, easel_router::providers::EditSupport::None) }).collect()
    }

    fn model_identity(&self, model: &str) -> String {
        model.to_string()
    }

    fn run_batch(&self, jobs: &[Job], on_step: &mut dyn FnMut(&dyn StepProgress) -> bool) -> Result<BatchOutput, ExecError> {
        let [job] = jobs else { return Err(ExecError::Permanent("closed providers take one job per batch".into())) };
        let spec = &job.spec;
        let rc = spec.provider_candidate().ok_or_else(|| ExecError::Permanent("this job is not routed to a closed provider".into()))?;
        if spec.private {
            return Err(ExecError::Permanent("a private job never goes to a closed provider".into()));
        }
        let candidate = Candidate { provider: rc.provider.clone(), model: rc.model.clone(), reason: rc.reason.clone() };
        let provider = self.gateway.providers.get(&candidate.provider).ok_or_else(|| ExecError::Permanent(format!("provider `{}` is not configured here", candidate.provider)))?;
        let request = crate::gateway::image_job(&candidate, spec).map_err(|e| ExecError::Permanent(format!("the job's picture is not base64: {e}")))?;
        let quality = spec.route.as_ref().and_then(|r| r.quality.clone());
        let unit = self.gateway.remote_price(&candidate, quality.as_deref(), spec.width, spec.height).unwrap_or(0.0);
        let estimate = unit * spec.n as f64;
        if let Some(ledger) = &self.ledger {
            let config = self.gateway.router.config();
            let cap_key = spec.user.as_ref().and_then(|k| config.daily_budget_per_key_usd.get(k).copied());
            let claim = easel_router::Reservation { job_id: &job.id, api_key: spec.user.as_deref(), usd: estimate, image_usd: unit, cap_all: config.daily_budget_usd, cap_key };
            let reserved = ledger.reserve(&claim).map_err(|e| ExecError::Transient(format!("reserving budget: {e}")))?;
            if !reserved {
                return Err(ExecError::Permanent(format!("the daily budget for paid providers is spent ({} skipped)", candidate.provider)));
            }
        }
        if !on_step(&PlainStep { done: 0, total: 1 }) {
            self.release(&job.id);
            return Err(ExecError::Canceled);
        }
        match self.runtime.block_on(provider.generate(&request)) {
            Ok(out) => {
                self.gateway.router.succeeded(&candidate.provider, out.seconds);
                let images = out.images.into_iter().enumerate().map(|(i, bytes)| EncodedImage { bytes, seed: spec.seed + i as u64 }).collect::<Vec<_>>();
                let usd = unit * images.len() as f64;
                Ok(BatchOutput {
                    images: vec![images],
                    timings: BatchTimings::default(),
                    charge: Some(ProviderCharge { provider: candidate.provider.clone(), model: candidate.model.clone(), usd, vendor_id: out.vendor_id, reason: candidate.reason.clone(), seconds: out.seconds }),
                })
            }
            Err(e) => {
                self.release(&job.id);
                Err(match e {
                    ProviderError::Moderated { .. } => ExecError::Refused(e.to_string()),
                    e => {
                        self.gateway.router.failed(&candidate.provider, &e.to_string());
                        ExecError::Permanent(e.to_string())
                    }
                })
            }
        }
    }
}

impl ProviderExecutor {
    fn release(&self, job_id: &str) {
        if let Some(ledger) = &self.ledger {
            if let Err(e) = ledger.release(job_id) {
                tracing::error!("releasing the budget reservation of {job_id}: {e}");
            }
        }
    }
}
