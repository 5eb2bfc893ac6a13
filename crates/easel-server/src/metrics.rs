//! Prometheus metrics, rendered by hand in the text exposition format.

use std::collections::BTreeMap;
use std::sync::Mutex;

const LATENCY_BUCKETS: [f64; 12] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0];

#[derive(Default)]
struct Inner {
    images_by_model: BTreeMap<String, u64>,
    errors_by_kind: BTreeMap<String, u64>,
    jobs_by_status: BTreeMap<String, u64>,
    latency_counts: [u64; 12],
    latency_sum: f64,
    latency_count: u64,
    steps_per_second: f64,
    cache_hits: u64,
    cost_by_provider_model: BTreeMap<(String, String), f64>,
}

/// Counters and histograms for `/metrics`.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut Inner)) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g);
    }

    pub fn error(&self, kind: &str) {
        self.with(|m| *m.errors_by_kind.entry(kind.to_string()).or_default() += 1);
    }

    /// Mean time from acceptance to completion of finished jobs, if any finished.
    pub fn mean_job_seconds(&self) -> Option<f64> {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (m.latency_count > 0).then(|| m.latency_sum / m.latency_count as f64)
    }

    /// Money spent on a job, by provider and model.
    pub fn cost(&self, provider: &str, model: &str, usd: f64) {
        self.with(|m| *m.cost_by_provider_model.entry((provider.to_string(), model.to_string())).or_default() += usd);
    }

    pub fn cache_hit(&self) {
        self.with(|m| m.cache_hits += 1);
    }

    /// A finished job: its status, model, images, end-to-end latency and denoising speed.
    pub fn job_done(&self, status: &str, model: &str, images: usize, latency_s: f64, steps_per_s: Option<f64>) {
        self.with(|m| {
            *m.jobs_by_status.entry(status.to_string()).or_default() += 1;
            *m.images_by_model.entry(model.to_string()).or_default() += images as u64;
            for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
                if latency_s <= *b {
                    m.latency_counts[i] += 1;
                }
            }
            m.latency_sum += latency_s;
            m.latency_count += 1;
            if let Some(s) = steps_per_s {
                m.steps_per_second = s;
            }
        });
    }

    pub fn render(&self, queue_depth: usize, warm_models: &[String]) -> String {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut s = String::new();
        s += "# HELP easel_model_warm Models loaded in the warm pool.\n# TYPE easel_model_warm gauge\n";
        for w in warm_models {
            s += &format!("easel_model_warm{{model=\"{w}\"}} 1\n");
        }
        s += "# HELP easel_queue_depth Jobs waiting in the queue.\n# TYPE easel_queue_depth gauge\n";
        s += &format!("easel_queue_depth {queue_depth}\n");
        s += "# HELP easel_images_total Images generated, by model.\n# TYPE easel_images_total counter\n";
        for (k, v) in &m.images_by_model {
            s += &format!("easel_images_total{{model=\"{k}\"}} {v}\n");
        }
        s += "# HELP easel_jobs_total Finished jobs, by status.\n# TYPE easel_jobs_total counter\n";
        for (k, v) in &m.jobs_by_status {
            s += &format!("easel_jobs_total{{status=\"{k}\"}} {v}\n");
        }
        s += "# HELP easel_errors_total Errors, by kind.\n# TYPE easel_errors_total counter\n";
        for (k, v) in &m.errors_by_kind {
            s += &format!("easel_errors_total{{kind=\"{k}\"}} {v}\n");
        }
        s += "# HELP easel_cost_usd_total Amortised or billed cost of finished jobs, by provider and model.\n# TYPE easel_cost_usd_total counter\n";
        for ((p, k), v) in &m.cost_by_provider_model {
            s += &format!("easel_cost_usd_total{{provider=\"{p}\",model=\"{k}\"}} {v}\n");
        }
        s += "# HELP easel_cache_hits_total Requests answered from the result cache.\n# TYPE easel_cache_hits_total counter\n";
        s += &format!("easel_cache_hits_total {}\n", m.cache_hits);
        s += "# HELP easel_denoise_steps_per_second Denoising steps per second of the last job.\n# TYPE easel_denoise_steps_per_second gauge\n";
        s += &format!("easel_denoise_steps_per_second {}\n", m.steps_per_second);
        s += "# HELP easel_job_latency_seconds Time from acceptance to completion.\n# TYPE easel_job_latency_seconds histogram\n";
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            s += &format!("easel_job_latency_seconds_bucket{{le=\"{b}\"}} {}\n", m.latency_counts[i]);
        }
        s += &format!("easel_job_latency_seconds_bucket{{le=\"+Inf\"}} {}\n", m.latency_count);
        s += &format!("easel_job_latency_seconds_sum {}\neasel_job_latency_seconds_count {}\n", m.latency_sum, m.latency_count);
        s
    }
}
