//! The engine behind the server: a warm pool of loaded pipelines and batch execution.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use easel_api::{Job, ModelInfo, OutputFormat};
use easel_engine::output::{encode_image, ImageFormat, ImageMetadata};
use easel_engine::pipeline::ModelDefaults;
use easel_engine::{EngineError, GenerateParams, LoadOptions, SchedulerKind, StableDiffusionPipeline};
use easel_server::worker::BatchTimings;
use easel_server::{EncodedImage, ExecError, Executor};

/// A model the server offers.
pub struct ServedModel {
    pub info: ModelInfo,
    pub dir: PathBuf,
    /// Bytes of weights, for the memory budget.
    pub weight_bytes: u64,
}

struct Warm {
    pipe: Arc<StableDiffusionPipeline>,
    last_used: Instant,
}

/// Loaded models stay warm until idle for `idle_timeout` or until the memory budget needs
/// room (least recently used first). A model is loaded once however many jobs ask for it.
pub struct EngineExecutor {
    models: Vec<ServedModel>,
    pool: Mutex<HashMap<String, Warm>>,
    load: LoadOptions,
    idle_timeout: Duration,
    memory_budget: u64,
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| if e.path().is_dir() { dir_bytes(&e.path()) } else { e.metadata().map(|m| m.len()).unwrap_or(0) }).sum())
        .unwrap_or(0)
}

impl EngineExecutor {
    /// Describes each model directory (loading none of them yet).
    pub fn new(models: Vec<(String, PathBuf)>, load: LoadOptions, idle_timeout: Duration, memory_budget: u64) -> anyhow::Result<Self> {
        let mut served = vec![];
        let mut pool = HashMap::new();
        for (id, dir) in models {
            // Load once to validate the model and learn its defaults; the pool keeps it warm.
            let pipe = StableDiffusionPipeline::load(&dir, &load)?;
            let d = ModelDefaults::load(&dir, pipe.family())?;
            let info = ModelInfo {
                id,
                default_steps: d.steps.unwrap_or(30),
                default_guidance: d.guidance.unwrap_or(7.5),
                default_size: pipe.default_size(),
                max_side: 2048,
                schedulers: SchedulerKind::ALL.iter().map(|(n, _)| n.to_string()).collect(),
            };
            let weight_bytes = dir_bytes(&dir);
            let in_pool: u64 = pool.keys().filter_map(|k: &String| served.iter().find(|m: &&ServedModel| &m.info.id == k)).map(|m| m.weight_bytes).sum();
            if in_pool + weight_bytes <= memory_budget {
                pool.insert(info.id.clone(), Warm { pipe: Arc::new(pipe), last_used: Instant::now() });
            }
            served.push(ServedModel { weight_bytes, info, dir });
        }
        Ok(Self { models: served, pool: Mutex::new(pool), load, idle_timeout, memory_budget })
    }

    fn served(&self, id: &str) -> Option<&ServedModel> {
        self.models.iter().find(|m| m.info.id == id)
    }

    /// The warm pipeline for `id`, loading it (and evicting others) if needed.
    fn pipeline(&self, id: &str) -> Result<(Arc<StableDiffusionPipeline>, f64), ExecError> {
        let served = self.served(id).ok_or_else(|| ExecError::Permanent(format!("model `{id}` is not served here")))?;
        // Holding the lock while loading makes concurrent requests for one model share one load.
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = pool.get_mut(id) {
            w.last_used = Instant::now();
            return Ok((w.pipe.clone(), 0.0));
        }
        let bytes = |pool: &HashMap<String, Warm>| pool.keys().filter_map(|k| self.served(k)).map(|m| m.weight_bytes).sum::<u64>();
        while !pool.is_empty() && bytes(&pool) + served.weight_bytes > self.memory_budget {
            let lru = pool.iter().min_by_key(|(_, w)| w.last_used).map(|(k, _)| k.clone());
            if let Some(k) = lru {
                tracing::info!(model = %k, "evicting to fit the memory budget");
                pool.remove(&k);
            }
        }
        let t = Instant::now();
        let pipe = Arc::new(StableDiffusionPipeline::load(&served.dir, &self.load).map_err(|e| ExecError::Permanent(e.to_string()))?);
        pool.insert(id.to_string(), Warm { pipe: pipe.clone(), last_used: Instant::now() });
        Ok((pipe, t.elapsed().as_secs_f64()))
    }
}

fn format_of(f: OutputFormat) -> ImageFormat {
    match f {
        OutputFormat::Png => ImageFormat::Png,
        OutputFormat::Jpeg => ImageFormat::Jpeg,
        OutputFormat::Webp => ImageFormat::Webp,
    }
}

impl Executor for EngineExecutor {
    fn models(&self) -> Vec<ModelInfo> {
        self.models.iter().map(|m| m.info.clone()).collect()
    }

    fn model_identity(&self, model: &str) -> String {
        match self.served(model) {
            Some(m) => format!("{}@{}:{}", m.info.id, m.dir.display(), m.weight_bytes),
            None => model.to_string(),
        }
    }

    fn run_batch(&self, jobs: &[Job], on_step: &mut dyn FnMut(usize, usize) -> bool) -> Result<(Vec<Vec<EncodedImage>>, BatchTimings), ExecError> {
        let model = &jobs[0].spec.model;
        let (pipe, load_s) = self.pipeline(model)?;
        let mut params = vec![];
        for j in jobs {
            let s = &j.spec;
            let scheduler = s.scheduler.as_deref().map(SchedulerKind::parse).transpose().map_err(|e| ExecError::Permanent(e.to_string()))?;
            params.push(GenerateParams {
                prompt: s.prompt.clone(),
                negative_prompt: s.negative_prompt.clone(),
                width: s.width,
                height: s.height,
                steps: s.steps,
                guidance: s.guidance,
                seed: s.seed,
                batch: s.n,
                scheduler,
                init_latents: None,
            });
        }
        let outs = pipe.generate_batch(&params, None, on_step).map_err(|e| match e {
            EngineError::Canceled => ExecError::Canceled,
            EngineError::Tensor(t) => ExecError::Transient(t.to_string()),
            other => ExecError::Permanent(other.to_string()),
        })?;
        // Idle time counts from the end of the last job, not its start.
        if let Some(w) = self.pool.lock().unwrap_or_else(|p| p.into_inner()).get_mut(model) {
            w.last_used = Instant::now();
        }
        let timings = outs
            .first()
            .map(|o| BatchTimings {
                load_s,
                text_encode_s: o.timings.text_encode.as_secs_f64(),
                denoise_s: o.timings.denoise.as_secs_f64(),
                decode_s: o.timings.decode.as_secs_f64(),
            })
            .unwrap_or_default();
        let mut all = vec![];
        for (job, out) in jobs.iter().zip(outs) {
            let s = &job.spec;
            let mut images = vec![];
            for (i, img) in out.images.iter().enumerate() {
                let meta = ImageMetadata {
                    prompt: s.prompt.clone(),
                    negative_prompt: s.negative_prompt.clone(),
                    seed: s.seed,
                    steps: s.steps,
                    scheduler: out.scheduler.name().to_string(),
                    guidance: s.guidance,
                    width: s.width,
                    height: s.height,
                    model: s.model.clone(),
                    batch_index: i,
                };
                let quality = s.output_compression.map(|c| 100 - c.min(99)).unwrap_or(90);
                let bytes = encode_image(img, format_of(s.output_format), Some(&meta), quality).map_err(|e| ExecError::Permanent(e.to_string()))?;
                images.push(EncodedImage { bytes, seed: s.seed });
            }
            all.push(images);
        }
        Ok((all, timings))
    }

    fn warm_models(&self) -> Vec<String> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect()
    }

    fn maintain(&self) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        pool.retain(|id, w| {
            let keep = w.last_used.elapsed() < self.idle_timeout;
            if !keep {
                tracing::info!(model = %id, "evicting idle model");
            }
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/pipelines").join(name)
    }

    #[test]
    fn memory_budget_evicts_least_recently_used_first() {
        let dirs = ["sd15-tiny", "sd21v-tiny", "sdxl-tiny"].map(fixture);
        let [a, b, c] = dirs.clone().map(|d| dir_bytes(&d));
        // Room for `a` beside either of the others, never for all three.
        let budget = (a + b).max(a + c);
        let models = vec![("a".to_string(), dirs[0].clone()), ("b".to_string(), dirs[1].clone()), ("c".to_string(), dirs[2].clone())];
        let exec = EngineExecutor::new(models, LoadOptions::default(), Duration::from_secs(600), budget).expect("fixtures load");
        let warm = |e: &EngineExecutor| {
            let mut w = e.warm_models();
            w.sort();
            w
        };
        // Start-up keeps what fits, in order.
        assert_eq!(warm(&exec), ["a", "b"]);
        // Touch `a`, so `b` is the least recently used: loading `c` must evict `b`, not `a`.
        assert_eq!(exec.pipeline("a").expect("warm").1, 0.0, "a warm model is not reloaded");
        let (_, load_s) = exec.pipeline("c").expect("loads");
        assert!(load_s > 0.0);
        assert_eq!(warm(&exec), ["a", "c"]);
        // And back: `b` evicts the now least recently used `a` first.
        exec.pipeline("b").expect("loads");
        let w = warm(&exec);
        assert!(w.contains(&"b".to_string()) && !w.contains(&"a".to_string()), "{w:?}");
    }
}
