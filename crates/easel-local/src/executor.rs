//! The engine behind the server's workers: a warm pool of loaded pipelines and batch execution.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use easel_api::{Job, ModelInfo, OutputFormat};
use easel_engine::models::autoencoder_tiny::TinyDecoder;
use easel_engine::output::{encode_image, ImageFormat, ImageMetadata};
use easel_engine::weights::lora::LoraSpec;
use easel_engine::{EngineError, GenerateParams, LoadOptions, ModelDefaults, Pipeline};
use easel_server::worker::BatchTimings;
use easel_server::{BatchOutput, EncodedImage, ExecError, Executor, StepProgress};

use crate::{dir_bytes, model_info, settings, LocalError, Requested};

/// A model the server offers.
pub struct ServedModel {
    pub info: ModelInfo,
    pub dir: PathBuf,
    /// Bytes of weights, for the memory budget.
    pub weight_bytes: u64,
    /// The model's tiny autoencoder for step previews (`taesd/` in its folder), if it has one.
    pub preview_decoder: Option<Arc<TinyDecoder>>,
    /// Its generation defaults, applied to every job by [`settings`].
    pub defaults: ModelDefaults,
}

/// A model folder's tiny autoencoder for previews: a diffusers `AutoencoderTiny` (TAESD for SD
/// 1.x/2.x, TAESDXL, TAEF1) saved as `taesd/` beside `unet/` or `transformer/`.
fn preview_decoder(dir: &std::path::Path, device: &easel_engine::Device) -> Result<Option<Arc<TinyDecoder>>, EngineError> {
    let taesd = dir.join("taesd");
    if !taesd.join("config.json").is_file() {
        return Ok(None);
    }
    Ok(Some(Arc::new(TinyDecoder::load(&taesd, device)?)))
}

struct Warm {
    pipe: Arc<Pipeline>,
    last_used: Instant,
}

/// Loaded models stay warm until idle for `idle_timeout` or until the memory budget needs
/// room (least recently used first). A model is loaded once however many jobs ask for it.
pub struct EngineExecutor {
    models: Vec<ServedModel>,
    /// Keyed by model id, and `id|stack` for a model with a LoRA stack applied (those share
    /// the base model's weights and go when it goes).
    pool: Mutex<HashMap<String, Warm>>,
    load: LoadOptions,
    idle_timeout: Duration,
    memory_budget: u64,
    loras: easel_api::LoraRegistry,
    /// Hub LoRA ids already fetched, to their files.
    hub_loras: Mutex<HashMap<String, PathBuf>>,
    controlnets: easel_api::ControlNetRegistry,
    /// Loaded ControlNets, keyed by name (a folder's, shared by every model) or `name@model` (a
    /// single file's, whose architecture is that model's UNet); switching them never reloads a
    /// model.
    warm_controlnets: WarmSet<easel_engine::ControlNet>,
    ip_adapters: easel_api::IpAdapterRegistry,
    /// Loaded IP-Adapters with their image encoders, keyed by name, shared by every model.
    warm_ip_adapters: WarmSet<easel_engine::IpAdapter>,
}

/// Add-ons (ControlNets, IP-Adapters) kept loaded at once per kind, the least recently used
/// going first (an SD 1.5 ControlNet is 1.4 GB in f32).
const MAX_WARM_ADDONS: usize = 4;

/// Loaded add-ons with when each was last used.
struct WarmSet<T> {
    entries: Mutex<HashMap<String, (Arc<T>, Instant)>>,
}

// Not derived: the derive would require `T: Default`, which loaded models are not.
impl<T> Default for WarmSet<T> {
    fn default() -> Self {
        Self { entries: Mutex::new(HashMap::new()) }
    }
}

impl<T> WarmSet<T> {
    /// The entry under `key`, loaded by `load` on first use; at most [`MAX_WARM_ADDONS`] stay.
    fn get_or_load(&self, key: &str, load: impl FnOnce() -> Result<T, ExecError>) -> Result<Arc<T>, ExecError> {
        if let Some((item, used)) = self.entries.lock().unwrap_or_else(|p| p.into_inner()).get_mut(key) {
            *used = Instant::now();
            return Ok(item.clone());
        }
        let item = Arc::new(load()?);
        let mut warm = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        while warm.len() >= MAX_WARM_ADDONS {
            match warm.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| k.clone()) {
                Some(k) => warm.remove(&k),
                None => break,
            };
        }
        warm.insert(key.to_string(), (item.clone(), Instant::now()));
        Ok(item)
    }
}

/// LoRA stacks kept warm per model.
const MAX_WARM_STACKS: usize = 4;

impl EngineExecutor {
    /// Describes each model directory (loading none of them yet).
    pub fn new(
        models: Vec<(String, PathBuf)>,
        load: LoadOptions,
        idle_timeout: Duration,
        memory_budget: u64,
        request_memory: u64,
        loras: easel_api::LoraRegistry,
    ) -> Result<Self, LocalError> {
        let mut served = vec![];
        let mut pool = HashMap::new();
        for (id, dir) in models {
            let failed = |source| LocalError::Load { model: id.clone(), dir: dir.clone(), source };
            // Load once to validate the model and learn its defaults; the pool keeps it warm.
            let pipe = Pipeline::load(&dir, &load).map_err(failed)?;
            let defaults = ModelDefaults::load(&dir, pipe.family()).map_err(failed)?;
            let weight_bytes = dir_bytes(&dir);
            let info = model_info(&id, &pipe, &defaults, weight_bytes, request_memory).map_err(failed)?;
            let in_pool: u64 = pool.keys().filter_map(|k: &String| served.iter().find(|m: &&ServedModel| &m.info.id == k)).map(|m| m.weight_bytes).sum();
            if in_pool + weight_bytes <= memory_budget {
                pool.insert(info.id.clone(), Warm { pipe: Arc::new(pipe), last_used: Instant::now() });
            }
            let preview_decoder = preview_decoder(&dir, &load.device).map_err(failed)?;
            served.push(ServedModel { weight_bytes, info, dir, preview_decoder, defaults });
        }
        Ok(Self {
            models: served,
            pool: Mutex::new(pool),
            load,
            idle_timeout,
            memory_budget,
            loras,
            hub_loras: Default::default(),
            controlnets: Default::default(),
            warm_controlnets: Default::default(),
            ip_adapters: Default::default(),
            warm_ip_adapters: Default::default(),
        })
    }

    /// Serves the ControlNets of this registry (by default, none).
    pub fn with_controlnets(mut self, registry: easel_api::ControlNetRegistry) -> Self {
        self.controlnets = registry;
        self
    }

    /// Serves the IP-Adapters of this registry (by default, none).
    pub fn with_ip_adapters(mut self, registry: easel_api::IpAdapterRegistry) -> Self {
        self.ip_adapters = registry;
        self
    }

    /// A registry ControlNet, loaded on first use and kept. A folder's is shared by every
    /// model; a single file takes its architecture from `pipe`'s UNet (or, for FLUX, its rotary
    /// axes from the transformer), so it is kept per model.
    fn controlnet(&self, name: &str, model: &str, pipe: &Pipeline) -> Result<Arc<easel_engine::ControlNet>, ExecError> {
        let path = self.controlnets.resolve(name).map_err(|e| ExecError::Permanent(e.body.message))?;
        let key = if path.is_file() { format!("{name}@{model}") } else { name.to_string() };
        self.warm_controlnets.get_or_load(&key, || {
            let t = Instant::now();
            let net = easel_engine::ControlNet::load(&path, pipe.controlnet_host(), self.load.dtype, &self.load.device).map_err(|e| ExecError::Permanent(format!("ControlNet `{name}`: {e}")))?;
            tracing::info!(controlnet = %name, seconds = t.elapsed().as_secs_f64(), "ControlNet loaded");
            Ok(net)
        })
    }

    /// A registry IP-Adapter with its image encoder, loaded on first use and kept.
    fn ip_adapter(&self, name: &str) -> Result<Arc<easel_engine::IpAdapter>, ExecError> {
        let path = self.ip_adapters.resolve(name).map_err(|e| ExecError::Permanent(e.body.message))?;
        self.warm_ip_adapters.get_or_load(name, || {
            let t = Instant::now();
            let adapter = easel_engine::IpAdapter::load(&path, None, self.load.dtype, &self.load.device).map_err(|e| ExecError::Permanent(format!("IP-Adapter `{name}`: {e}")))?;
            tracing::info!(ip_adapter = %name, seconds = t.elapsed().as_secs_f64(), "IP-Adapter loaded");
            Ok(adapter)
        })
    }

    /// A job's IP-Adapter with its picture; `adapter` is the batch's, resolved once (it is part
    /// of the batch key).
    fn ip_adapter_unit(spec: &easel_api::JobSpec, adapter: Option<&Arc<easel_engine::IpAdapter>>) -> Result<Option<easel_engine::IpAdapterUnit>, ExecError> {
        let (Some(ip), Some(adapter)) = (&spec.ip_adapter, adapter) else { return Ok(None) };
        let picture = easel_api::decode_base64_image("ip_adapter", &ip.png_base64).map_err(|e| ExecError::Permanent(e.body.message))?;
        let picture = easel_engine::RgbPicture::new(picture.width() as usize, picture.height() as usize, picture.rgb().to_vec()).map_err(|e| ExecError::Permanent(e.to_string()))?;
        Ok(Some(easel_engine::IpAdapterUnit { adapter: adapter.clone(), picture, scale: ip.scale }))
    }

    /// A job's ControlNets with their control images; `nets` are the batch's, resolved once
    /// (every job of a batch names the same ones: they are part of the batch key).
    fn control_units(&self, spec: &easel_api::JobSpec, nets: &[Arc<easel_engine::ControlNet>]) -> Result<Vec<easel_engine::ControlUnit>, ExecError> {
        if spec.controlnets.len() != nets.len() {
            return Err(ExecError::Permanent("jobs with different ControlNets in one batch".into()));
        }
        spec.controlnets
            .iter()
            .zip(nets)
            .map(|(c, net)| {
                let picture = easel_api::decode_base64_image("controlnets", &c.png_base64).map_err(|e| ExecError::Permanent(e.body.message))?;
                let image = easel_engine::rgb_pixels("controlnets", picture.width() as usize, picture.height() as usize, picture.rgb()).map_err(|e| ExecError::Permanent(e.to_string()))?;
                Ok(easel_engine::ControlUnit { net: net.clone(), image, scale: c.scale, start: c.start, end: c.end, mode: c.mode.map(|m| m as usize) })
            })
            .collect()
    }

    fn served(&self, id: &str) -> Option<&ServedModel> {
        self.models.iter().find(|m| m.info.id == id)
    }

    /// The warm pipeline for `id` with a LoRA `stack`: built from the warm base model (never
    /// reloaded from disk for a new stack) and kept warm under `id|stack`, at most
    /// [`MAX_WARM_STACKS`] per model (least recently used go first: each holds copies of the
    /// weights its LoRAs touch).
    fn pipeline_with(&self, id: &str, stack: &[LoraSpec]) -> Result<(Arc<Pipeline>, f64, String), ExecError> {
        if stack.is_empty() {
            let (p, s) = self.pipeline(id)?;
            return Ok((p, s, id.to_string()));
        }
        let key = format!("{id}|{}", easel_engine::weights::lora::stack_key(stack));
        if let Some(w) = self.pool.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&key) {
            w.last_used = Instant::now();
            return Ok((w.pipe.clone(), 0.0, key));
        }
        let (base, load_s) = self.pipeline(id)?;
        let t = Instant::now();
        let pipe = Arc::new(base.with_loras(stack).map_err(|e| ExecError::Permanent(e.to_string()))?);
        tracing::info!(model = %id, stack = %key, seconds = t.elapsed().as_secs_f64(), "LoRA stack applied");
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let prefix = format!("{id}|");
        while pool.keys().filter(|k| k.starts_with(&prefix)).count() >= MAX_WARM_STACKS {
            let lru = pool.iter().filter(|(k, _)| k.starts_with(&prefix)).min_by_key(|(_, w)| w.last_used).map(|(k, _)| k.clone());
            if let Some(k) = lru {
                pool.remove(&k);
            }
        }
        pool.insert(key.clone(), Warm { pipe: pipe.clone(), last_used: Instant::now() });
        Ok((pipe, load_s + t.elapsed().as_secs_f64(), key))
    }

    /// A stack entry's file: a registry file, or a hub LoRA (fetched once, then remembered).
    fn lora_path(&self, name: &str) -> Result<PathBuf, ExecError> {
        match self.loras.source(name).map_err(|e| ExecError::Permanent(e.body.message))? {
            easel_api::LoraSource::File(path) => Ok(path),
            easel_api::LoraSource::Hub(id) => {
                if let Some(p) = self.hub_loras.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
                    return Ok(p.clone());
                }
                let path = easel_hub::resolve_lora(&easel_hub::Hub::from_env(), &id).map_err(|e| ExecError::Permanent(e.to_string()))?;
                self.hub_loras.lock().unwrap_or_else(|p| p.into_inner()).insert(id, path.clone());
                Ok(path)
            }
        }
    }

    /// The warm pipeline for `id`, loading it (and evicting others) if needed.
    fn pipeline(&self, id: &str) -> Result<(Arc<Pipeline>, f64), ExecError> {
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
                let model = k.split('|').next().unwrap_or(&k).to_string();
                pool.retain(|key, _| key != &model && !key.starts_with(&format!("{model}|")));
            }
        }
        let t = Instant::now();
        let pipe = Arc::new(Pipeline::load(&served.dir, &self.load).map_err(|e| ExecError::Permanent(e.to_string()))?);
        pool.insert(id.to_string(), Warm { pipe: pipe.clone(), last_used: Instant::now() });
        Ok((pipe, t.elapsed().as_secs_f64()))
    }
}

/// An engine step as the worker sees it: steps, and previews of each job's first image.
struct EngineStep<'a, 'b> {
    step: &'a easel_engine::preview::Step<'b>,
    first_rows: &'a [usize],
    decoder: Option<&'a TinyDecoder>,
}

impl StepProgress for EngineStep<'_, '_> {
    fn done(&self) -> usize {
        self.step.done
    }
    fn total(&self) -> usize {
        self.step.total
    }
    fn preview_png(&self, job: usize) -> Option<Vec<u8>> {
        let png = self.step.preview_with(*self.first_rows.get(job)?, self.decoder).and_then(|p| p.png());
        png.map_err(|e| tracing::warn!("drawing a preview: {e}")).ok()
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

    fn run_batch(&self, jobs: &[Job], on_step: &mut dyn FnMut(&dyn StepProgress) -> bool) -> Result<BatchOutput, ExecError> {
        let model = &jobs[0].spec.model;
        // Jobs in one batch share their LoRA stack (it is part of the batch key).
        let mut stack = vec![];
        for l in &jobs[0].spec.loras {
            stack.push(LoraSpec { path: self.lora_path(&l.name)?, scale: l.scale });
        }
        let (pipe, load_s, used) = self.pipeline_with(model, &stack)?;
        if !pipe.uses_guidance() {
            for j in jobs.iter().filter(|j| j.spec.guidance != 0.0) {
                tracing::warn!(job = %j.id, guidance = j.spec.guidance, "guidance_scale is ignored: this model (FLUX.1-schnell-like) has no guidance input");
            }
        }
        let defaults = &self.served(model).ok_or_else(|| ExecError::Permanent(format!("model `{model}` is not served here")))?.defaults;
        let nets = jobs[0].spec.controlnets.iter().map(|c| self.controlnet(&c.name, model, &pipe)).collect::<Result<Vec<_>, _>>()?;
        let adapter = jobs[0].spec.ip_adapter.as_ref().map(|a| self.ip_adapter(&a.name)).transpose()?;
        let mut params = vec![];
        for j in jobs {
            let s = &j.spec;
            // The gateway already applied the model's default cache: `none` when the job has none.
            let cache = Some(s.step_cache.map(|c| c.to_string()).unwrap_or_else(|| "none".into()));
            let asked = Requested { steps: Some(s.steps), guidance: Some(s.guidance), scheduler: s.scheduler.clone(), negative_prompt: s.negative_prompt.clone(), cache };
            let settings = settings(defaults, &asked).map_err(|e| ExecError::Permanent(e.to_string()))?;
            let init_image = match &s.init_image {
                Some(image) => {
                    let pixels = easel_api::decode_base64_image("image", &image.png_base64).map_err(|e| ExecError::Permanent(e.body.message))?;
                    let (w, h) = (pixels.width() as usize, pixels.height() as usize);
                    let mut init = easel_engine::InitImage::from_rgb(w, h, pixels.rgb(), image.strength).map_err(|e| ExecError::Permanent(e.to_string()))?;
                    if let Some(mask) = &image.mask_png_base64 {
                        let mask = easel_api::decode_base64_image("mask", mask).map_err(|e| ExecError::Permanent(e.body.message))?;
                        init = init.with_mask(mask.width() as usize, mask.height() as usize, &mask.luma()).map_err(|e| ExecError::Permanent(e.to_string()))?;
                    }
                    Some(init)
                }
                None => None,
            };
            params.push(GenerateParams {
                prompt: s.prompt.clone(),
                negative_prompt: settings.negative_prompt,
                width: s.width,
                height: s.height,
                steps: settings.steps,
                guidance: settings.guidance,
                seed: s.seed,
                batch: s.n,
                scheduler: settings.scheduler,
                init_latents: None,
                skip_layer_guidance: s.skip_layer_guidance.as_ref().map(|g| easel_engine::SkipLayerGuidance { layers: g.layers.clone(), scale: g.scale, start: g.start, stop: g.stop }),
                init_image,
                step_cache: settings.step_cache,
                controlnets: self.control_units(s, &nets)?,
                ip_adapter: Self::ip_adapter_unit(s, adapter.as_ref())?,
            });
        }
        // Each job's first image is the batch row after the images of the jobs before it.
        let first_rows: Vec<usize> = jobs.iter().scan(0, |row, j| {
            let first = *row;
            *row += j.spec.n;
            Some(first)
        }).collect();
        let decoder = self.served(model).and_then(|m| m.preview_decoder.clone());
        let mut engine_step = |step: &easel_engine::preview::Step<'_>| on_step(&EngineStep { step, first_rows: &first_rows, decoder: decoder.as_deref() });
        let outs = pipe.generate_batch(&params, None, &mut engine_step).map_err(|e| match e {
            EngineError::Canceled => ExecError::Canceled,
            EngineError::Tensor(t) => ExecError::Transient(t.to_string()),
            other => ExecError::Permanent(other.to_string()),
        })?;
        // Idle time counts from the end of the last job, not its start.
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        for key in [model, &used] {
            if let Some(w) = pool.get_mut(key) {
                w.last_used = Instant::now();
            }
        }
        drop(pool);
        let timings = outs
            .first()
            .map(|o| BatchTimings {
                load_s,
                text_encode_s: o.timings.text_encode.as_secs_f64(),
                denoise_s: o.timings.denoise.as_secs_f64(),
                decode_s: o.timings.decode.as_secs_f64(),
                cached_steps: o.timings.cached_steps,
            })
            .unwrap_or_default();
        let mut all = vec![];
        for ((job, out), p) in jobs.iter().zip(outs).zip(&params) {
            let s = &job.spec;
            let mut images = vec![];
            for (i, img) in out.images.iter().enumerate() {
                let meta = ImageMetadata {
                    prompt: s.prompt.clone(),
                    negative_prompt: p.negative_prompt.clone(),
                    seed: s.seed,
                    steps: p.steps,
                    scheduler: out.scheduler.name().to_string(),
                    guidance: p.guidance,
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
        Ok(BatchOutput { images: all, timings, charge: None })
    }

    fn warm_models(&self) -> Vec<String> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).keys().filter(|k| !k.contains('|')).cloned().collect()
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
        let exec = EngineExecutor::new(models, LoadOptions::default(), Duration::from_secs(600), budget, u64::MAX, Default::default()).expect("fixtures load");
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

    /// A new LoRA stack is built from the warm base model: with the model's weight files gone
    /// from disk, switching stacks still works, and the pool keys on model + stack.
    #[test]
    fn switching_stacks_never_reloads_the_base_model() {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("m");
        copy_dir(&fixture("sd15-tiny"), &model);
        let loras = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/loras");
        let exec = EngineExecutor::new(vec![("m".into(), model.clone())], LoadOptions::default(), Duration::from_secs(600), u64::MAX, u64::MAX, easel_api::LoraRegistry::new(Some(loras.clone()))).unwrap();
        std::fs::remove_dir_all(model.join("unet")).unwrap();
        std::fs::remove_dir_all(model.join("text_encoder")).unwrap();
        let spec = |name: &str, scale: f64| LoraSpec { path: loras.join(format!("{name}.safetensors")), scale };
        let (a, _, _) = exec.pipeline_with("m", &[spec("sd15-tiny-a", 0.8)]).expect("stack a from memory");
        let (b, _, _) = exec.pipeline_with("m", &[spec("sd15-tiny-b", 0.5)]).expect("stack b from memory");
        let (a_again, took, _) = exec.pipeline_with("m", &[spec("sd15-tiny-a", 0.8)]).expect("warm");
        assert!(Arc::ptr_eq(&a, &a_again) && took == 0.0, "a warm stack is reused");
        assert!(!Arc::ptr_eq(&a, &b));
        let keys = |e: &EngineExecutor| e.pool.lock().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&exec).len(), 3, "{:?}", keys(&exec));
        assert_eq!(exec.warm_models(), ["m"]);
        // Warm stacks per model are capped; the least recently used goes first.
        for scale in [0.1, 0.2, 0.3, 0.4] {
            exec.pipeline_with("m", &[spec("sd15-tiny-b", scale)]).expect("from memory");
        }
        assert_eq!(keys(&exec).len(), 1 + MAX_WARM_STACKS, "{:?}", keys(&exec));
        assert!(!keys(&exec).iter().any(|k| k.contains("sd15-tiny-a")), "the least recently used stack stays: {:?}", keys(&exec));
    }

    fn copy_dir(src: &std::path::Path, dst: &std::path::Path) {
        std::fs::create_dir_all(dst).unwrap();
        for e in std::fs::read_dir(src).unwrap() {
            let e = e.unwrap();
            let to = dst.join(e.file_name());
            if e.path().is_dir() {
                copy_dir(&e.path(), &to);
            } else {
                std::fs::copy(e.path(), to).unwrap();
            }
        }
    }
}
