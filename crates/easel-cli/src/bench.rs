//! `easel bench`: timings that the Python harnesses in tools/bench compare with PyTorch.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use easel_engine::config::{read_json, UNetConfig};
use easel_engine::models::unet::UNet2DConditionModel;
use easel_engine::weights::source::component_weights;
use easel_engine::weights::load_var_builder;
use easel_engine::{DType, Device, Tensor};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchWhat,
}

#[derive(Subcommand, Debug)]
enum BenchWhat {
    /// Run the diffusers references of the tiny SD 1.5, SD 2.1, SDXL and FLUX pipelines on a
    /// device and dtype, and say how close each is (tools/gpu/check.sh runs it on the GPU).
    Parity {
        /// The repository's fixtures folder (pipelines/ and reference/).
        #[arg(long, default_value = "fixtures")]
        fixtures: PathBuf,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// f32 is held to the CPU parity tests' bounds; f16 and bf16 to looser ones (see
        /// `parity_bounds`).
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// Load a running `easel serve` over HTTP and report latency percentiles and throughput.
    Http {
        /// Base URL of the server, e.g. http://127.0.0.1:8000
        #[arg(long)]
        url: String,
        /// `cache`: the same seeded request (cache hits after the first);
        /// `unique`: a new seed per request (real generations).
        #[arg(long, default_value = "cache")]
        mode: String,
        #[arg(long, default_value_t = 100)]
        concurrency: usize,
        #[arg(long, default_value_t = 2000)]
        requests: usize,
        /// Extra JSON merged into each request body.
        #[arg(long, default_value = "{}")]
        body: String,
    },
    /// Grade the bundled easel-shapes model: colour and shape accuracy over random seeds,
    /// on training combinations and on held-out ones, and the time per image.
    Shapes {
        /// Images over combinations seen in training.
        #[arg(long, default_value_t = 200)]
        n: usize,
        /// Images over held-out combinations.
        #[arg(long, default_value_t = 96)]
        held_out: usize,
        #[arg(long, default_value_t = 20)]
        steps: usize,
        #[arg(long)]
        guidance: Option<f64>,
        #[arg(long)]
        scheduler: Option<String>,
        /// Seed of the first image; image i uses seed + i.
        #[arg(long, default_value_t = 1000)]
        seed: u64,
        /// Write every graded image here.
        #[arg(long)]
        save_dir: Option<PathBuf>,
        /// Grade this pipeline directory instead of the bundled model (e.g. a training checkpoint).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Step caching, as `easel generate --cache` (e.g. deepcache:2); the report counts the
        /// steps that ran the whole denoiser.
        #[arg(long)]
        cache: Option<String>,
    },
    /// Queue overhead per job with a deep backlog: a producer thread enqueues while a separate
    /// consumer thread claims and completes, on the embedded (SQLite) and a Redis queue, with no
    /// engine in the way; prints one JSON line per queue.
    Queue {
        /// Queues to measure: `sqlite` (a temporary database) and/or redis://HOST:PORT/DB.
        #[arg(long = "queue", default_values_t = ["sqlite".to_string()])]
        queues: Vec<String>,
        /// Jobs already queued when the measurement starts.
        #[arg(long, default_value_t = 10_000)]
        depth: usize,
        /// Jobs the producer enqueues while the consumer drains.
        #[arg(long, default_value_t = 2000)]
        jobs: usize,
    },
    /// Time loading a UNet and evaluating it once per iteration; prints one JSON line.
    Unet {
        /// A diffusers-layout model directory (its unet/ is used).
        #[arg(long)]
        model: PathBuf,
        /// Image side in pixels (latents are side / 8).
        #[arg(long, default_value_t = 256)]
        size: usize,
        #[arg(long, default_value_t = 2)]
        batch: usize,
        /// Inputs (safetensors with `sample`, `context`, and for SDXL `text_embeds`, `time_ids`;
        /// `control_image` with --controlnet) to use instead of zeros.
        #[arg(long)]
        inputs: Option<PathBuf>,
        /// Also run this ControlNet (a diffusers-layout folder) before each evaluation and add
        /// its residuals, as a ControlNet pipeline's step does.
        #[arg(long)]
        controlnet: Option<PathBuf>,
        /// With --controlnet: time the ControlNet alone (its output is the mid-block residual).
        #[arg(long, requires = "controlnet")]
        controlnet_only: bool,
        #[command(flatten)]
        timed: Timed,
    },
    /// Time one VAE decode (tools/gpu/vs_torch.py compares it with diffusers).
    Vae {
        /// A diffusers-layout model directory (its vae/ is used).
        #[arg(long)]
        model: PathBuf,
        /// Inputs: safetensors with `latents` (before the VAE's scaling, as a pipeline holds them).
        #[arg(long)]
        inputs: PathBuf,
        #[command(flatten)]
        timed: Timed,
    },
    /// Time one FLUX transformer evaluation (tools/bench/flux_vs_diffusers.py compares it with
    /// diffusers on the same weights and inputs).
    Flux {
        /// A FLUX diffusers-layout directory (transformer/config.json, and its weights unless
        /// --transformer is given).
        #[arg(long)]
        model: PathBuf,
        /// Transformer weights to use instead (BFL .safetensors or .gguf).
        #[arg(long)]
        transformer: Option<PathBuf>,
        /// Inputs: safetensors with `img`, `img_ids`, `txt`, `txt_ids`, `timesteps`, `pooled`
        /// and, for guidance-distilled models, `guidance`.
        #[arg(long)]
        inputs: PathBuf,
        /// A LoRA (kohya or diffusers format) to run with the transformer: merged into
        /// full-precision weights, beside quantized ones.
        #[arg(long)]
        lora: Option<PathBuf>,
        #[command(flatten)]
        timed: Timed,
    },
    /// Time one SD 3.5 transformer evaluation (tools/bench/sd3_vs_diffusers.py compares it with
    /// diffusers on the same weights and inputs).
    Sd3 {
        /// An SD 3.5 diffusers-layout directory (transformer/config.json, and its weights unless
        /// --transformer is given).
        #[arg(long)]
        model: PathBuf,
        /// Transformer weights to use instead (Stability-named .safetensors or .gguf).
        #[arg(long)]
        transformer: Option<PathBuf>,
        /// Inputs: safetensors with `hidden_states` `[B, 16, h, w]`, `timestep` `[B]` (0-1000),
        /// `encoder_hidden_states` and `pooled_projections`.
        #[arg(long)]
        inputs: PathBuf,
        #[command(flatten)]
        timed: Timed,
    },
    /// Time loading a model fresh against switching its LoRA stack (the base stays in memory).
    Lora {
        /// A diffusers-layout model directory.
        #[arg(long)]
        model: PathBuf,
        /// Two LoRA files: the stacks measured are [A], [B], [A, B] and [] in turn.
        #[arg(long = "lora", num_args = 2)]
        loras: Vec<PathBuf>,
    },
}

pub fn run(args: BenchArgs) -> Result<()> {
    match args.what {
        BenchWhat::Parity { fixtures, device, dtype } => parity(&fixtures, &device, &dtype)?,
        BenchWhat::Http { url, mode, concurrency, requests, body } => http_load(&url, &mode, concurrency, requests, &body)?,
        BenchWhat::Shapes { n, held_out, steps, guidance, scheduler, seed, save_dir, model, cache } => {
            let dir = match model {
                Some(d) => d,
                None => crate::bundled::model_dir()?,
            };
            shapes_quality(&dir, n, held_out, steps, guidance, scheduler, cache, seed, save_dir)?;
        }
        BenchWhat::Queue { queues, depth, jobs } => {
            for q in &queues {
                queue_overhead(q, depth, jobs)?;
            }
        }
        BenchWhat::Unet { model, size, batch, inputs, controlnet, controlnet_only, timed } => unet_eval(&model, size, batch, inputs, controlnet.as_deref().map(|dir| (dir, controlnet_only)), &timed)?,
        BenchWhat::Vae { model, inputs, timed } => vae_eval(&model, &inputs, &timed)?,
        BenchWhat::Flux { model, transformer, inputs, lora, timed } => flux_eval(&model, transformer, &inputs, lora, &timed)?,
        BenchWhat::Sd3 { model, transformer, inputs, timed } => sd3_eval(&model, transformer, &inputs, &timed)?,
        BenchWhat::Lora { model, loras } => lora_switch(&model, &loras)?,
    }
    Ok(())
}

/// How a timing benchmark runs: where, in which type, how often, and where its output goes.
#[derive(Args, Debug)]
struct Timed {
    /// cpu, cuda, cuda:N, metal or metal:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Timed evaluations are preceded by this many untimed ones.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Where to write the last output (safetensors `latents`), to compare it with PyTorch's.
    #[arg(long)]
    save_output: Option<PathBuf>,
}

impl Timed {
    fn open(&self) -> Result<(Device, DType)> {
        Ok((easel_engine::parse_device(&self.device)?, easel_engine::parse_dtype(&self.dtype)?))
    }

    /// Times `eval` after the untimed runs, waiting for the device each time (GPU work is
    /// asynchronous), saves the last output if asked, and prints the one JSON line the
    /// harnesses read: load time, median and every evaluation time, and `extra` fields.
    fn run(&self, device: &Device, load_s: f64, extra: serde_json::Value, mut eval: impl FnMut() -> Result<Tensor>) -> Result<()> {
        // The first evaluation on its own: with the load, it is what a cold request waits for.
        let mut first_eval_s = None;
        for _ in 0..self.warmup {
            let t = Instant::now();
            eval()?;
            device.synchronize()?;
            first_eval_s.get_or_insert(t.elapsed().as_secs_f64());
        }
        let mut times = vec![];
        let mut out = None;
        for _ in 0..self.iters.max(1) {
            let t = Instant::now();
            out = Some(eval()?);
            device.synchronize()?;
            times.push(t.elapsed().as_secs_f64());
        }
        if let (Some(path), Some(out)) = (&self.save_output, out) {
            easel_engine::write_latents(path, &out.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)?;
        }
        let first_eval_s = first_eval_s.unwrap_or(times[0]);
        times.sort_by(f64::total_cmp);
        let mut line = serde_json::json!({"load_s": load_s, "first_eval_s": first_eval_s, "eval_s_median": times[times.len() / 2], "eval_s": times});
        if let (Some(line), serde_json::Value::Object(extra)) = (line.as_object_mut(), extra) {
            line.extend(extra);
        }
        println!("{line}");
        Ok(())
    }
}

/// Reads named input tensors onto the device: activations in the compute type; positions,
/// timesteps and guidance stay f32, as the pipelines pass them.
fn inputs_on(path: &std::path::Path, device: &Device, dtype: DType) -> Result<std::collections::HashMap<String, Tensor>> {
    const F32_INPUTS: [&str; 4] = ["img_ids", "txt_ids", "timesteps", "guidance"];
    easel_engine::read_tensors(path)?
        .into_iter()
        .map(|(k, t)| {
            let t = if t.dtype().is_float() && !F32_INPUTS.contains(&k.as_str()) { t.to_dtype(dtype)? } else { t };
            Ok((k, t.to_device(device)?))
        })
        .collect()
}

/// `controlnet`: a ControlNet folder, and whether to time it alone.
fn unet_eval(model: &std::path::Path, size: usize, batch: usize, inputs: Option<PathBuf>, controlnet: Option<(&std::path::Path, bool)>, timed: &Timed) -> Result<()> {
    let (device, dtype) = timed.open()?;
    let t0 = Instant::now();
    let cfg: UNetConfig = read_json(&model.join("unet/config.json"))?;
    let vb = load_var_builder(&component_weights(model, "unet", dtype != DType::F32)?, dtype, &device)?;
    let unet = UNet2DConditionModel::new(vb, &cfg).context("building the UNet")?;
    let controlnet_only = controlnet.is_some_and(|(_, only)| only);
    let controlnet = match controlnet.map(|(dir, _)| dir) {
        Some(dir) => {
            let cfg: easel_engine::config::ControlNetConfig = read_json(&dir.join("config.json"))?;
            let files = component_weights(dir.parent().context("--controlnet: a folder")?, &dir.file_name().context("--controlnet: a folder")?.to_string_lossy(), dtype != DType::F32)?;
            Some(easel_engine::models::controlnet::ControlNetModel::new(load_var_builder(&files, dtype, &device)?, &cfg).context("building the ControlNet")?)
        }
        None => None,
    };
    device.synchronize()?;
    let load_s = t0.elapsed().as_secs_f64();
    let ctx_dim = match &cfg.cross_attention_dim {
        easel_engine::config::PerBlock::One(d) => *d,
        easel_engine::config::PerBlock::Many(v) => v[0],
    };
    let mut control_image = None;
    let (sample, context, added) = match inputs {
        Some(p) => {
            let t = inputs_on(&p, &device, dtype)?;
            control_image = t.get("control_image").cloned();
            // SDXL's UNets also take `text_embeds` and `time_ids`.
            let added = match (t.get("text_embeds"), t.get("time_ids")) {
                (Some(e), Some(ids)) => Some(easel_engine::models::unet::AddedCond { text_embeds: e.clone(), time_ids: ids.clone() }),
                _ => None,
            };
            (t.get("sample").context("inputs lack `sample`")?.clone(), t.get("context").context("inputs lack `context`")?.clone(), added)
        }
        None => (Tensor::zeros((batch, cfg.in_channels, size / 8, size / 8), dtype, &device)?, Tensor::zeros((batch, 77, ctx_dim), dtype, &device)?, None),
    };
    // An LCM-distilled UNet also takes the guidance embedding (at LatentConsistencyModelPipeline's 8.5).
    let guidance = match unet.guidance_embedding_dim() {
        Some(dim) => Some(easel_engine::models::unet::guidance_embedding(8.5 - 1.0, dim, sample.dim(0)?, &device)?),
        None => None,
    };
    match controlnet {
        Some(net) => {
            let (_, _, h, w) = sample.dims4()?;
            let image = match control_image {
                Some(image) => image,
                None => Tensor::zeros((sample.dim(0)?, 3, h * 8, w * 8), dtype, &device)?,
            };
            if controlnet_only {
                return timed.run(&device, load_s, serde_json::json!({"controlnet": "alone"}), || Ok(net.forward(&sample, 500.0, &context, added.as_ref(), &image, 1.0)?.mid));
            }
            timed.run(&device, load_s, serde_json::json!({"controlnet": true}), || {
                let residuals = net.forward(&sample, 500.0, &context, added.as_ref(), &image, 1.0)?;
                Ok(unet.forward_with_control(&sample, 500.0, &context, added.as_ref(), guidance.as_ref(), &residuals)?)
            })
        }
        None => timed.run(&device, load_s, serde_json::json!({}), || Ok(unet.forward(&sample, 500.0, &context, added.as_ref(), guidance.as_ref())?)),
    }
}

fn vae_eval(model: &std::path::Path, inputs: &std::path::Path, timed: &Timed) -> Result<()> {
    let (device, dtype) = timed.open()?;
    let t0 = Instant::now();
    let vae = easel_engine::pipelines::vae::Vae::load(model, dtype != DType::F32, dtype, &device)?;
    device.synchronize()?;
    let load_s = t0.elapsed().as_secs_f64();
    let t = inputs_on(inputs, &device, dtype)?;
    let latents = t.get("latents").context("inputs lack `latents`")?;
    timed.run(&device, load_s, serde_json::json!({}), || Ok(vae.decode(latents)?))
}

/// The reference cases `easel bench parity` runs: (pipeline, reference file).
const PARITY_CASES: &[(&str, &str)] = &[
    ("sd15-tiny", "sd15-tiny-euler"),
    ("sd21v-tiny", "sd21v-tiny-euler"),
    ("sdxl-tiny", "sdxl-tiny-euler"),
    ("flux-dev-tiny", "flux-dev-tiny"),
    ("sd35m-tiny", "sd35m-tiny-slg"),
    ("sd35l-tiny", "sd35l-tiny-cfg"),
];
/// Bounds (latents relative L2 below, image PSNR in dB at least) per compute type. f32: the CPU
/// parity tests'. f16: 10x the worst latents error measured on the CPU (4.1e-3, sd21v-tiny;
/// 2026-11-30 fixtures) and 20 dB under the worst PSNR (60.7 dB). bf16 (no CPU matmul in candle, so not
/// measured here): f16's bound times 8, bf16's unit roundoff over f16's; provisional until a GPU
/// run measures it (docs/gpu.md).
fn parity_bounds(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F16 => (4e-2, 41.0),
        DType::BF16 => (3.2e-1, 23.0),
        _ => (1e-3, 70.0),
    }
}

fn parity(fixtures: &std::path::Path, device: &str, dtype: &str) -> Result<()> {
    use easel_engine::parity::Reference;
    let opts = easel_engine::LoadOptions { device: easel_engine::parse_device(device)?, dtype: easel_engine::parse_dtype(dtype)?, ..Default::default() };
    let (max_rel, min_db) = parity_bounds(opts.dtype);
    let mut failed = 0;
    for (pipeline, case) in PARITY_CASES {
        let pipe = easel_engine::Pipeline::load(&fixtures.join("pipelines").join(pipeline), &opts)?;
        let reference = Reference::load(&fixtures.join("reference").join(format!("{case}.safetensors")))?;
        let a = reference.check(&pipe)?;
        let ok = a.latents_rel_l2 < max_rel && a.image_psnr_db >= min_db;
        failed += usize::from(!ok);
        println!(
            "{}",
            serde_json::json!({"case": case, "device": device, "dtype": dtype, "latents_rel_l2": a.latents_rel_l2, "image_psnr_db": a.image_psnr_db,
                "bound_rel_l2": max_rel, "bound_psnr_db": min_db, "ok": ok})
        );
    }
    println!("parity {device} {dtype}: {} passed, {failed} failed", PARITY_CASES.len() - failed);
    if failed > 0 {
        anyhow::bail!("{failed} of {} cases differ from diffusers beyond the bounds", PARITY_CASES.len());
    }
    Ok(())
}

fn lora_switch(model: &std::path::Path, loras: &[PathBuf]) -> Result<()> {
    use easel_engine::weights::lora::LoraSpec;
    let t = Instant::now();
    let pipe = easel_engine::Pipeline::load(model, &easel_engine::LoadOptions::default())?;
    let load_s = t.elapsed().as_secs_f64();
    let spec = |i: usize, scale: f64| LoraSpec { path: loras[i].clone(), scale };
    let mut switches = serde_json::Map::new();
    for (name, stack) in [("a", vec![spec(0, 0.8)]), ("b", vec![spec(1, 0.8)]), ("a+b", vec![spec(0, 0.7), spec(1, -0.5)]), ("none", vec![])] {
        let t = Instant::now();
        let switched = pipe.with_loras(&stack)?;
        switches.insert(name.into(), serde_json::json!(t.elapsed().as_secs_f64()));
        drop(switched);
    }
    println!("{}", serde_json::json!({"load_s": load_s, "switch_s": switches}));
    Ok(())
}

fn flux_eval(model: &std::path::Path, transformer: Option<PathBuf>, inputs: &std::path::Path, lora: Option<PathBuf>, timed: &Timed) -> Result<()> {
    use easel_engine::config::FluxTransformerConfig;
    use easel_engine::models::flux::{FluxInputs, FluxTransformer};
    let (device, dtype) = timed.open()?;
    let t0 = Instant::now();
    let config: FluxTransformerConfig = read_json(&model.join("transformer/config.json"))?;
    let (mut weights, source) = easel_engine::pipelines::flux::read_transformer(model, transformer.as_deref(), dtype, &device)?;
    // Quantized weights compute in f32, as the pipeline runs them.
    let compute = if source == easel_engine::pipelines::common::TransformerSource::Gguf { DType::F32 } else { dtype };
    weights.set_dtype(compute);
    if let Some(path) = lora {
        use easel_engine::weights::lora::{Component, LoraSpec, LoraTargets, TargetFamily};
        let targets = LoraTargets { family: TargetFamily::flux(&config), weights: [(Component::Transformer, weights.shapes())].into() };
        let adapters = easel_engine::weights::lora::load_adapters(&LoraSpec { path, scale: 1.0 }, &targets)?;
        weights = weights.with_adapters(&adapters.iter().collect::<Vec<_>>())?;
    }
    let (bytes, types) = weights.memory();
    let net = FluxTransformer::new(&weights, &config, compute, &device)?;
    drop(weights);
    device.synchronize()?;
    let load_s = t0.elapsed().as_secs_f64();
    let t = inputs_on(inputs, &device, compute)?;
    let get = |k: &str| t.get(k).with_context(|| format!("inputs lack `{k}`"));
    let x = FluxInputs {
        img: get("img")?,
        img_ids: get("img_ids")?,
        txt: get("txt")?,
        txt_ids: get("txt_ids")?,
        timesteps: get("timesteps")?,
        pooled: get("pooled")?,
        guidance: t.get("guidance"),
    };
    timed.run(&device, load_s, serde_json::json!({"weights_bytes": bytes, "weights": types}), || Ok(net.forward(&x)?))
}

fn sd3_eval(model: &std::path::Path, transformer: Option<PathBuf>, inputs: &std::path::Path, timed: &Timed) -> Result<()> {
    use easel_engine::config::Sd3TransformerConfig;
    use easel_engine::models::mmdit::{Mmdit, MmditInputs};
    let (device, dtype) = timed.open()?;
    let t0 = Instant::now();
    let config: Sd3TransformerConfig = read_json(&model.join("transformer/config.json"))?;
    let (mut weights, source) = easel_engine::pipelines::sd3::read_transformer(model, transformer.as_deref(), dtype, &device)?;
    // Quantized weights compute in f32, as the pipeline runs them.
    let compute = if source == easel_engine::pipelines::common::TransformerSource::Gguf { DType::F32 } else { dtype };
    weights.set_dtype(compute);
    let (bytes, types) = weights.memory();
    let net = Mmdit::new(&weights, &config, compute, &device)?;
    drop(weights);
    device.synchronize()?;
    let load_s = t0.elapsed().as_secs_f64();
    let t = inputs_on(inputs, &device, compute)?;
    let get = |k: &str| t.get(k).with_context(|| format!("inputs lack `{k}`"));
    let x = MmditInputs { x: get("hidden_states")?, timesteps: get("timestep")?, pooled: get("pooled_projections")?, context: get("encoder_hidden_states")?, skip_layers: &[] };
    timed.run(&device, load_s, serde_json::json!({"weights_bytes": bytes, "weights": types}), || Ok(net.forward(&x)?))
}

#[derive(Default)]
struct Tally {
    images: usize,
    background: usize,
    color: usize,
    shape: usize,
    all: usize,
}

impl Tally {
    fn add(&mut self, (b, c, s): (bool, bool, bool)) {
        self.images += 1;
        self.background += b as usize;
        self.color += c as usize;
        self.shape += s as usize;
        self.all += (b && c && s) as usize;
    }

    fn json(&self) -> serde_json::Value {
        let pct = |k: usize| if self.images == 0 { 0.0 } else { 100.0 * k as f64 / self.images as f64 };
        serde_json::json!({
            "images": self.images,
            "background_pct": pct(self.background),
            "shape_color_pct": pct(self.color),
            "shape_class_pct": pct(self.shape),
            "all_three_pct": pct(self.all),
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn shapes_quality(
    dir: &std::path::Path,
    n: usize,
    held_out: usize,
    steps: usize,
    guidance: Option<f64>,
    scheduler: Option<String>,
    cache: Option<String>,
    seed: u64,
    save_dir: Option<PathBuf>,
) -> Result<()> {
    use easel_engine::{GenerateParams, LoadOptions, ModelDefaults, Pipeline};
    use rand::{Rng, SeedableRng};

    let spec = easel_shapes::Spec::bundled();
    let pipe = Pipeline::load(dir, &LoadOptions::default())?;
    let defaults = ModelDefaults::load(dir, pipe.family())?;
    let settings = easel_local::settings(&defaults, &easel_local::Requested { steps: Some(steps), guidance, scheduler, negative_prompt: None, cache: cache.clone() })?;
    let (scheduler, guidance) = (settings.scheduler, settings.guidance);
    let (train, held): (Vec<_>, Vec<_>) = spec.combos().into_iter().partition(|c| !spec.is_held_out(c));
    if let Some(d) = &save_dir {
        std::fs::create_dir_all(d)?;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut tallies = [Tally::default(), Tally::default()];
    let mut gen_time = 0.0;
    let (mut full_steps, mut cached_steps) = (0, 0);
    let mut i = 0u64;
    for (which, pool, count) in [(0, &train, n), (1, &held, held_out)] {
        for _ in 0..count {
            let combo = &pool[rng.random_range(0..pool.len())];
            let params = GenerateParams {
                prompt: spec.prompt(combo),
                negative_prompt: settings.negative_prompt.clone(),
                width: 64,
                height: 64,
                steps,
                guidance,
                seed: seed + i,
                batch: 1,
                scheduler,
                init_latents: None,
                skip_layer_guidance: None,
                step_cache: settings.step_cache,
                controlnets: Vec::new(),
                ip_adapter: None,
                init_image: None,
            };
            let t = Instant::now();
            let out = pipe.generate(&params, None, &mut |_| true)?;
            gen_time += t.elapsed().as_secs_f64();
            full_steps += out.timings.full_steps;
            cached_steps += out.timings.cached_steps;
            let got = spec.classify(&out.images[0]);
            tallies[which].add(got.grade(combo));
            if let Some(d) = &save_dir {
                let ok = if got.grade(combo) == (true, true, true) { "ok" } else { "miss" };
                let name = format!("{i:04}-{ok}-{}-{}-{}.png", combo.color, combo.shape, combo.background);
                easel_engine::output::save_image(&out.images[0], &d.join(name), None)?;
            }
            i += 1;
        }
    }
    let report = serde_json::json!({
        "steps": steps,
        "guidance": guidance,
        "seconds_per_image": gen_time / i.max(1) as f64,
        "cache": cache.as_deref().unwrap_or("none"),
        "full_steps": full_steps,
        "cached_steps": cached_steps,
        "trained_combinations": tallies[0].json(),
        "held_out_combinations": tallies[1].json(),
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn http_load(url: &str, mode: &str, concurrency: usize, requests: usize, extra: &str) -> Result<()> {
    let extra: serde_json::Value = serde_json::from_str(extra).context("--body is not JSON")?;
    let unique = match mode {
        "cache" => false,
        "unique" => true,
        other => anyhow::bail!("unknown --mode {other}; expected cache or unique"),
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let client = reqwest::Client::builder().pool_max_idle_per_host(concurrency).timeout(std::time::Duration::from_secs(600)).build()?;
        let endpoint = format!("{}/v1/images/generations", url.trim_end_matches('/'));
        let body_for = |i: usize| {
            let mut b = serde_json::json!({"prompt": "a red circle on a blue background", "seed": if unique { 10_000 + i as u64 } else { 1 }});
            if let (Some(b), Some(e)) = (b.as_object_mut(), extra.as_object()) {
                for (k, v) in e {
                    b.insert(k.clone(), v.clone());
                }
            }
            b
        };
        // Prime the cache (and the model) once.
        client.post(&endpoint).json(&body_for(1 << 30)).send().await?.error_for_status()?;
        if !unique {
            client.post(&endpoint).json(&body_for(0)).send().await?.error_for_status()?;
        }
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let start = Instant::now();
        let mut tasks = vec![];
        for _ in 0..concurrency {
            let (client, endpoint, next) = (client.clone(), endpoint.clone(), next.clone());
            let bodies: Vec<serde_json::Value> = (0..requests).map(body_for).collect();
            tasks.push(tokio::spawn(async move {
                let mut lat = vec![];
                let mut engine = vec![];
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= bodies.len() {
                        break;
                    }
                    let t = Instant::now();
                    let r = client.post(&endpoint).json(&bodies[i]).send().await?.error_for_status()?;
                    let v: serde_json::Value = r.json().await?;
                    lat.push(t.elapsed().as_secs_f64());
                    if unique && v["easel"]["cache_hit"].as_bool() != Some(false) {
                        anyhow::bail!("--mode unique measures real generations, but request {i} was answered from the result cache (or said nothing about it): {}", v["easel"]);
                    }
                    let tm = &v["easel"]["timings"];
                    let e = ["text_encode_s", "denoise_s", "decode_s"].iter().map(|k| tm[k].as_f64().unwrap_or(0.0)).sum::<f64>();
                    engine.push((e, tm["batch_size"].as_f64().unwrap_or(1.0), v["easel"]["batch_size"].as_f64().unwrap_or(1.0)));
                }
                anyhow::Ok((lat, engine))
            }));
        }
        let mut lat = vec![];
        let mut engine = vec![];
        for t in tasks {
            let (l, e) = t.await??;
            lat.extend(l);
            engine.extend(e);
        }
        let wall = start.elapsed().as_secs_f64();
        lat.sort_by(f64::total_cmp);
        let pct = |q: f64| lat[((lat.len() - 1) as f64 * q).round() as usize];
        let mean_engine = engine.iter().map(|e| e.0).sum::<f64>() / engine.len().max(1) as f64;
        let mean_batch = engine.iter().map(|e| e.2).sum::<f64>() / engine.len().max(1) as f64;
        println!(
            "{}",
            serde_json::json!({
                "mode": mode, "concurrency": concurrency, "requests": lat.len(), "wall_s": wall,
                "requests_per_s": lat.len() as f64 / wall,
                "latency_p50_ms": pct(0.5) * 1e3, "latency_p99_ms": pct(0.99) * 1e3, "latency_mean_ms": lat.iter().sum::<f64>() / lat.len() as f64 * 1e3,
                "engine_mean_ms": mean_engine * 1e3, "mean_batch_size": mean_batch,
            })
        );
        anyhow::Ok(())
    })
}

/// Queue overhead with a deep backlog, the way a busy server sees it: first `depth` jobs are
/// enqueued (the queue's depth when the measurement starts), then a producer thread enqueues
/// `jobs` more at full speed while a separate consumer thread claims and completes jobs until
/// the queue is empty. Every job must be claimed exactly once. No engine is in the way.
fn queue_overhead(which: &str, depth: usize, jobs: usize) -> Result<()> {
    use easel_queue::{conformance::spec, JobQueue, RedisQueue, SqliteQueue};
    use std::collections::HashSet;
    use std::sync::Arc;
    use std::time::Duration;
    let tmp = std::env::temp_dir().join(format!("easel-bench-queue-{}.db", std::process::id()));
    let total = depth + jobs;
    let prefix = format!("easel-bench-{}", std::process::id());
    let queue: Arc<dyn JobQueue> = if which == "sqlite" {
        Arc::new(SqliteQueue::open(&tmp, total + 1, 3)?)
    } else {
        let q = RedisQueue::open(which, total + 1, 3)?.with_prefix(&prefix);
        q.purge()?;
        Arc::new(q)
    };
    let pct = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(((v.len().max(1) - 1) as f64 * p).round() as usize).copied().unwrap_or(0.0)
    };
    let t0 = Instant::now();
    for i in 0..depth {
        queue.enqueue(&spec("m", 0, 20 + i % 3), None, None)?;
    }
    let fill_s = t0.elapsed().as_secs_f64();

    let producer_queue = queue.clone();
    let start = Instant::now();
    let producer = std::thread::spawn(move || -> Result<Vec<f64>> {
        let mut enqueue_us = Vec::with_capacity(jobs);
        for i in 0..jobs {
            let t = Instant::now();
            producer_queue.enqueue(&spec("m", 0, 20 + i % 3), None, None)?;
            enqueue_us.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok(enqueue_us)
    });
    let consumer_queue = queue.clone();
    let consumer = std::thread::spawn(move || -> Result<(Vec<f64>, Vec<f64>, HashSet<String>)> {
        let models = vec!["m".to_string()];
        let (mut claim_us, mut complete_us, mut seen) = (Vec::with_capacity(total), Vec::with_capacity(total), HashSet::with_capacity(total));
        let result = easel_api::JobResult { images: vec![], timings: Default::default(), batch_size: 1, cost_usd: 0.0, provider: "local".into(), route_reason: None, vendor_id: None };
        let deadline = Instant::now() + Duration::from_secs(600);
        while seen.len() < total && Instant::now() < deadline {
            let t = Instant::now();
            let got = consumer_queue.claim("bench", &models, &[], 1, Duration::from_secs(30))?;
            let Some(job) = got.first() else {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            };
            claim_us.push(t.elapsed().as_secs_f64() * 1e6);
            anyhow::ensure!(seen.insert(job.id.clone()), "job {} was claimed twice", job.id);
            let t = Instant::now();
            consumer_queue.complete(&easel_queue::Lease::of(&job), &result)?;
            complete_us.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok((claim_us, complete_us, seen))
    });
    let mut enqueue_us = producer.join().map_err(|_| anyhow::anyhow!("the producer thread panicked"))??;
    let (mut claim_us, mut complete_us, seen) = consumer.join().map_err(|_| anyhow::anyhow!("the consumer thread panicked"))??;
    let wall = start.elapsed().as_secs_f64();
    anyhow::ensure!(seen.len() == total, "the consumer finished {} of {total} jobs", seen.len());
    println!(
        "{}",
        serde_json::json!({
            "queue": if which == "sqlite" { "sqlite" } else { "redis" },
            "depth_at_start": depth, "jobs_enqueued_during": jobs,
            "fill_jobs_per_s": depth as f64 / fill_s.max(1e-9),
            "enqueue_us_p50": pct(&mut enqueue_us, 0.5), "enqueue_us_p99": pct(&mut enqueue_us, 0.99),
            "claim_us_p50": pct(&mut claim_us, 0.5), "claim_us_p99": pct(&mut claim_us, 0.99),
            "complete_us_p50": pct(&mut complete_us, 0.5), "complete_us_p99": pct(&mut complete_us, 0.99),
            "drain_jobs_per_s": total as f64 / wall,
            "claimed_exactly_once": true,
        })
    );
    if which == "sqlite" {
        let _ = std::fs::remove_file(&tmp);
    } else if let Ok(q) = RedisQueue::open(which, 1, 3) {
        let _ = q.with_prefix(&prefix).purge();
    }
    Ok(())
}
