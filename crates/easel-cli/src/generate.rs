//! `easel generate`: one prompt to image files, with a progress bar and reproducible metadata.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use easel_engine::output::{save_image, ImageFormat, ImageMetadata};
use easel_engine::weights::lora::LoraSpec;
use easel_engine::{GenerateParams, LoadOptions, ModelDefaults, Pipeline};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// The prompt (or use --prompt).
    #[arg(value_name = "PROMPT")]
    prompt_positional: Option<String>,
    /// The prompt.
    #[arg(short, long)]
    prompt: Option<String>,
    /// A diffusers-layout directory, a hub repo (owner/name[@revision]), a known model's short
    /// name (flux-dev, sdxl-turbo, ...; `easel models list` shows them), or an SD 1.x/2.x/XL
    /// single-file checkpoint (fine-tune.safetensors, a path or owner/name/file) (default: the
    /// bundled model).
    #[arg(short, long)]
    model: Option<String>,
    /// For a single-file --model: the diffusers folder or hub repo whose configs and tokenizers
    /// it runs with (default: the reference repo of the family its tensors show, e.g.
    /// stable-diffusion-v1-5/stable-diffusion-v1-5).
    #[arg(long, value_name = "REPO_OR_DIR")]
    config: Option<String>,
    #[arg(long)]
    negative_prompt: Option<String>,
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    /// Denoising steps (1-1000).
    #[arg(long)]
    steps: Option<usize>,
    /// Guidance scale: classifier-free guidance for SD (1 or less runs one UNet pass per step),
    /// the distilled guidance embedding for FLUX.1-dev (default 3.5); FLUX.1-schnell ignores it.
    #[arg(long)]
    guidance: Option<f64>,
    /// Random seed; the same seed, device and parameters give the same image.
    #[arg(long)]
    seed: Option<u64>,
    /// Images to generate.
    #[arg(short = 'n', long, default_value_t = 1)]
    batch: usize,
    /// euler, euler-a, ddim, dpmpp-2m, dpmpp-2m-karras, lcm (LCM models and LCM-LoRAs); flow-match-euler for FLUX and SD 3.5 (default: the model's own).
    #[arg(long)]
    scheduler: Option<String>,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// cpu, cuda, cuda:N, metal or metal:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// FLUX: keep the text encoders on the CPU, so a 16 GB GPU holds only the transformer and
    /// VAE (see `easel models memory --vram 16`); new prompts then encode on the CPU.
    #[arg(long)]
    offload_text_encoders: bool,
    /// Output file (.png, .jpg or .webp); batches get -1, -2, ... suffixes.
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// FLUX: transformer weights to use instead of the model's `transformer/` folder: Black Forest
    /// Labs' single file (flux1-dev.safetensors) or a GGUF file (q8_0, q5_0/q5_1, q4_0, q4_K, ...),
    /// a path or a file on the hub (owner/name/file.gguf).
    #[arg(long)]
    transformer: Option<String>,
    /// CLIP-L weights from a single file (ComfyUI's clip_l.safetensors) instead of the model's
    /// text_encoder/ (its config and tokenizer stay the folder's).
    #[arg(long, value_name = "FILE")]
    clip_l: Option<PathBuf>,
    /// CLIP-G weights from a single file (clip_g.safetensors): SDXL's and SD 3.5's text_encoder_2/.
    #[arg(long, value_name = "FILE")]
    clip_g: Option<PathBuf>,
    /// T5-XXL weights from a single file (t5xxl_fp16.safetensors): FLUX's and SD 3.5's T5.
    #[arg(long, value_name = "FILE")]
    t5: Option<PathBuf>,
    /// A LoRA to apply, as PATH or registry NAME, with an optional :SCALE (default 1);
    /// repeatable: the LoRAs stack in order.
    #[arg(long = "lora", value_name = "PATH_OR_NAME[:SCALE]")]
    loras: Vec<String>,
    /// The LoRA registry for names (a folder of NAME.safetensors files).
    #[arg(long)]
    lora_dir: Option<PathBuf>,
    /// Start from these latents (safetensors, tensor `latents`, as diffusers' `latents` argument;
    /// packed `[batch, tokens, 64]` for FLUX, as FluxPipeline takes them).
    #[arg(long)]
    init_latents: Option<PathBuf>,
    /// Image-to-image: start from this picture (PNG, JPEG or WebP). The output has its size
    /// (rounded down to the model's multiple) unless --width/--height say otherwise, in which
    /// case it is resized to fit (Lanczos, as diffusers).
    #[arg(long, value_name = "PATH")]
    init_image: Option<PathBuf>,
    /// Image-to-image: how much of the picture is repainted, from 0 (none) to 1 (all), as
    /// diffusers' `strength`: the last strength x steps steps run (default 0.8, or 1 with --mask).
    #[arg(long, value_name = "S")]
    strength: Option<f64>,
    /// Inpainting (Stable Diffusion): a mask the --init-image's size; white is repainted, black
    /// kept, as diffusers. Inpainting models (9-channel UNets) need one.
    #[arg(long, value_name = "PATH")]
    mask: Option<PathBuf>,
    /// SD 3.5: skip-layer guidance over these transformer layers (comma-separated, e.g. 7,8,9
    /// for 3.5 medium), as diffusers' `skip_guidance_layers`.
    #[arg(long, value_delimiter = ',', value_name = "LAYERS")]
    skip_layers: Vec<usize>,
    /// Skip-layer guidance scale (diffusers' default 2.8).
    #[arg(long, default_value_t = 2.8)]
    skip_layer_scale: f64,
    /// Skip-layer guidance runs on steps after this fraction of them (default 0.01)...
    #[arg(long, default_value_t = 0.01)]
    skip_layer_start: f64,
    /// ...and before this fraction (default 0.2).
    #[arg(long, default_value_t = 0.2)]
    skip_layer_stop: f64,
    /// Step caching: none, deepcache[:INTERVAL] (SD, SDXL: the whole UNet every INTERVAL
    /// steps, default 3) or fbcache[:THRESHOLD] (FLUX's First-Block Cache, default 0.08);
    /// default: the model's easel.json `cache`, else none.
    #[arg(long, value_name = "CACHE")]
    cache: Option<String>,
    /// A ControlNet (SD 1.x/2.x, SDXL or FLUX): a folder in the diffusers layout, a single
    /// .safetensors file (SD's LDM names, as lllyasviel and ComfyUI publish them), or a NAME in
    /// --controlnet-dir, with an optional :SCALE (diffusers' controlnet_conditioning_scale,
    /// default 1); repeatable, one --control-image each, in order; their residuals add up.
    #[arg(long = "controlnet", value_name = "PATH_OR_NAME[:SCALE]")]
    controlnets: Vec<String>,
    /// The conditioning image (an edge, depth or pose map) of each --controlnet, in order;
    /// resized to the output (Lanczos), whose size defaults to the first one's.
    #[arg(long = "control-image", value_name = "PATH")]
    control_images: Vec<PathBuf>,
    /// Turn each --control-image (a photo) into the control image first: canny (OpenCV's
    /// Canny, thresholds 100 and 200), canny:LOW:HIGH, or none (default).
    #[arg(long, value_name = "PREPROCESS")]
    control_preprocess: Option<String>,
    /// The ControlNets run from this fraction of the steps (diffusers' control_guidance_start)...
    #[arg(long, default_value_t = 0.0, value_name = "FRACTION")]
    control_start: f64,
    /// ...to this one (control_guidance_end).
    #[arg(long, default_value_t = 1.0, value_name = "FRACTION")]
    control_end: f64,
    /// The control type of a Union FLUX ControlNet (diffusers' control_mode; InstantX's Union:
    /// 0 canny, 1 tile, 2 depth, 3 blur, 4 pose, 5 gray, 6 low quality), for every --controlnet.
    #[arg(long, value_name = "MODE")]
    control_mode: Option<usize>,
    /// The ControlNet registry for names (a folder of ControlNet folders and .safetensors files).
    #[arg(long, value_name = "DIR")]
    controlnet_dir: Option<PathBuf>,
    /// An IP-Adapter (SD 1.x/2.x and SDXL): a .safetensors file (h94/IP-Adapter's, plain or
    /// Plus) with its image encoder in an image_encoder/ folder beside it (or
    /// ../models/image_encoder), or a NAME in --ip-adapter-dir; needs --ip-adapter-image.
    #[arg(long, value_name = "PATH_OR_NAME")]
    ip_adapter: Option<String>,
    /// The reference picture the IP-Adapter conditions on (any size: CLIP's processor resizes
    /// and centre-crops it).
    #[arg(long, value_name = "PATH")]
    ip_adapter_image: Option<PathBuf>,
    /// How strongly the picture steers the image (diffusers' set_ip_adapter_scale).
    #[arg(long, default_value_t = 1.0, value_name = "SCALE")]
    ip_adapter_scale: f64,
    /// The IP-Adapter registry for names.
    #[arg(long, value_name = "DIR")]
    ip_adapter_dir: Option<PathBuf>,
    /// Write the final latents (diffusers' output_type="latent") to this safetensors file.
    #[arg(long)]
    save_latents: Option<PathBuf>,
    /// Also print the stage timings as one JSON line on stdout (for benchmark harnesses).
    #[arg(long)]
    timings_json: bool,
}

/// Reads `--init-image` under the API's rules (format, at most 4096x4096, no decompression
/// bomb), checking that it is at least one size multiple on each side.
fn read_init_image(path: &Path, multiple: usize) -> Result<easel_api::InputImage> {
    let image = read_picture("--init-image", path)?;
    if (image.width() as usize) < multiple || (image.height() as usize) < multiple {
        anyhow::bail!("--init-image {}: {}x{} is smaller than the model's {multiple}-pixel size step", path.display(), image.width(), image.height());
    }
    Ok(image)
}

/// Reads a picture given by `flag` under the API's rules.
fn read_picture(flag: &str, path: &Path) -> Result<easel_api::InputImage> {
    let bytes = std::fs::read(path).with_context(|| format!("{flag} {}", path.display()))?;
    easel_api::decode_image(flag.trim_start_matches('-'), &bytes).map_err(|e| anyhow::anyhow!("{flag} {}: {}", path.display(), e.body.message))
}

/// The path of image `i` of `n` for a requested output path.
fn numbered(path: &Path, i: usize, n: usize) -> PathBuf {
    if n == 1 {
        return path.to_path_buf();
    }
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("easel");
    let ext = path.extension().and_then(|s| s.to_str()).unwrap_or("png");
    path.with_file_name(format!("{stem}-{}.{ext}", i + 1))
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let prompt = args.prompt.clone().or(args.prompt_positional.clone()).context("a prompt is required: easel generate \"a red circle on a blue background\"")?;
    let device = easel_engine::parse_device(&args.device)?;
    let dtype = easel_engine::parse_dtype(&args.dtype)?;
    let output = args.output.clone().unwrap_or_else(|| PathBuf::from("easel.png"));
    ImageFormat::from_path(&output)?;

    let model_spec = match &args.model {
        Some(m) => m.clone(),
        None => crate::bundled::model_dir()?.display().to_string(),
    };
    let started = Instant::now();
    let dir = crate::hub::model_dir(&model_spec, dtype != easel_engine::DType::F32, args.config.as_deref())?;
    let transformer = args.transformer.as_deref().map(crate::hub::weights_file).transpose()?;
    let stack = args.loras.iter().map(|l| parse_lora(l, args.lora_dir.as_deref())).collect::<Result<Vec<_>>>()?;
    let mut pipe = Pipeline::load(&dir, &LoadOptions {
        device: device.clone(),
        dtype,
        transformer,
        offload_text_encoders: args.offload_text_encoders,
        text_encoders: easel_engine::TextEncoderFiles { clip_l: args.clip_l.clone(), clip_g: args.clip_g.clone(), t5: args.t5.clone() },
    })?;
    if !stack.is_empty() {
        pipe = pipe.with_loras(&stack)?;
    }
    let defaults = ModelDefaults::load(&dir, pipe.family())?;
    let load_time = started.elapsed();
    if let Some((bytes, types)) = pipe.weights_memory() {
        eprintln!("transformer weights: {:.2} GiB in memory ({types})", bytes as f64 / (1u64 << 30) as f64);
    }
    if args.guidance.is_some() && !pipe.uses_guidance() {
        eprintln!("warning: --guidance is ignored: this model (FLUX.1-schnell-like) has no guidance input");
    }
    if args.negative_prompt.is_some() && matches!(pipe, Pipeline::Flux(_)) {
        eprintln!("warning: --negative-prompt is ignored: FLUX runs without classifier-free guidance, as diffusers' FluxPipeline");
    }

    let asked = easel_local::Requested { steps: args.steps, guidance: args.guidance, scheduler: args.scheduler.clone(), negative_prompt: args.negative_prompt.clone(), cache: args.cache.clone() };
    let settings = easel_local::settings(&defaults, &asked)?;
    if settings.scheduler.is_none() {
        if let Some(class) = pipe.substituted_scheduler() {
            eprintln!("warning: the model's scheduler {class} is not implemented in easel; using euler");
        }
    }
    let size = pipe.default_size();
    let seed = args.seed.unwrap_or_else(rand_seed);
    let init_latents = args.init_latents.as_deref().map(easel_engine::read_latents).transpose()?;
    let init = args.init_image.as_deref().map(|path| read_init_image(path, pipe.size_multiple())).transpose()?;
    if args.controlnets.len() != args.control_images.len() {
        anyhow::bail!("--control-image: {} given for {} --controlnet; each ControlNet takes one, in order", args.control_images.len(), args.controlnets.len());
    }
    let control_pictures = args.control_images.iter().map(|path| read_picture("--control-image", path)).collect::<Result<Vec<_>>>()?;
    // The output's size: --width/--height, else the picture's (init image, then control image)
    // rounded down to the model's multiple, else the model's default.
    let m = pipe.size_multiple();
    let (width, height) = match init.as_ref().or(control_pictures.first()) {
        Some(image) => (args.width.unwrap_or(image.width() as usize / m * m), args.height.unwrap_or(image.height() as usize / m * m)),
        None => (args.width.unwrap_or(size), args.height.unwrap_or(size)),
    };
    let controlnets = args
        .controlnets
        .iter()
        .zip(control_pictures)
        .map(|(arg, picture)| control_unit(arg, picture, &args, width, height, &pipe, &device))
        .collect::<Result<Vec<_>>>()?;
    let init_image = match init {
        Some(image) => {
            let (image_w, image_h) = (image.width(), image.height());
            let image = image.resized(width as u32, height as u32);
            let strength = args.strength.unwrap_or(easel_api::default_strength(args.mask.is_some()));
            let init = easel_engine::InitImage::from_rgb(width, height, image.rgb(), strength)?;
            match &args.mask {
                Some(path) => {
                    let mask = read_picture("--mask", path)?;
                    if (mask.width(), mask.height()) != (image_w, image_h) {
                        anyhow::bail!("--mask {}: {}x{}, but --init-image is {image_w}x{image_h}; they must be the same size", path.display(), mask.width(), mask.height());
                    }
                    Some(init.with_mask(width, height, &mask.resized(width as u32, height as u32).luma())?)
                }
                None => Some(init),
            }
        }
        None if args.strength.is_some() => anyhow::bail!("--strength: needs --init-image (the picture to start from)"),
        None if args.mask.is_some() => anyhow::bail!("--mask: needs --init-image (the picture it masks)"),
        None => None,
    };
    let params = GenerateParams {
        prompt: prompt.clone(),
        negative_prompt: settings.negative_prompt,
        width,
        height,
        steps: settings.steps,
        guidance: settings.guidance,
        seed,
        batch: args.batch,
        scheduler: settings.scheduler,
        init_latents,
        skip_layer_guidance: (!args.skip_layers.is_empty()).then(|| easel_engine::SkipLayerGuidance {
            layers: args.skip_layers.clone(),
            scale: args.skip_layer_scale,
            start: args.skip_layer_start,
            stop: args.skip_layer_stop,
        }),
        init_image,
        // The model's default step cache gives way to ControlNets, as at the gateway; one asked
        // for is refused by the pipeline.
        step_cache: if controlnets.is_empty() || args.cache.is_some() { settings.step_cache } else { None },
        controlnets,
        ip_adapter: ip_adapter_unit(&args, &device)?,
    };
    pipe.validate(&params)?;
    let steps_to_run = match &params.init_image {
        Some(image) => params.steps - image.first_step(params.steps, pipe.strength_rounding())?,
        None => params.steps,
    };
    let estimate = easel_local::memory_estimate(&pipe, easel_local::dir_bytes(&dir), easel_local::default_request_memory());
    if let Err(e) = estimate.check(params.width, params.height, params.batch) {
        let flag = if e.body.param.as_deref() == Some("n") { "-n" } else { "--width/--height" };
        anyhow::bail!("{flag}: {}", e.body.message);
    }

    let bar = ProgressBar::new(steps_to_run as u64);
    bar.set_style(ProgressStyle::with_template("denoising {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}]").unwrap_or_else(|_| ProgressStyle::default_bar()));
    let span = tracing::info_span!("generate", model = %model_spec, seed, steps = params.steps);
    let _enter = span.enter();
    let gen_start = Instant::now();
    let out = pipe.generate(&params, None, &mut |step| {
        bar.set_position(step.done as u64);
        true
    })?;
    bar.finish_and_clear();
    let gen_time = gen_start.elapsed();
    if out.truncated {
        eprintln!("warning: the prompt is longer than the text encoder's limit and was truncated");
    }
    if let Some(path) = &args.save_latents {
        easel_engine::write_latents(path, &out.latents)?;
    }
    for (i, img) in out.images.iter().enumerate() {
        let meta = ImageMetadata {
            prompt: prompt.clone(),
            negative_prompt: params.negative_prompt.clone(),
            seed,
            steps: params.steps,
            scheduler: out.scheduler.name().to_string(),
            guidance: params.guidance,
            width: params.width,
            height: params.height,
            model: model_spec.clone(),
            batch_index: i,
        };
        let path = numbered(&output, i, out.images.len());
        save_image(img, &path, Some(&meta))?;
        println!("{}", path.display());
    }
    eprintln!(
        "generated {} image(s) in {:.2}s (load {:.2}s, text {:.3}s, denoise {:.2}s, decode {:.3}s), seed {seed}{}",
        out.images.len(),
        gen_time.as_secs_f64(),
        load_time.as_secs_f64(),
        out.timings.text_encode.as_secs_f64(),
        out.timings.denoise.as_secs_f64(),
        out.timings.decode.as_secs_f64(),
        match out.timings.cached_steps {
            0 => String::new(),
            cached => format!(", {cached} of {} steps from the step cache", cached + out.timings.full_steps),
        }
    );
    if args.timings_json {
        let t = &out.timings;
        let line = serde_json::json!({"load_s": load_time.as_secs_f64(), "encode_s": t.text_encode.as_secs_f64(), "denoise_s": t.denoise.as_secs_f64(), "decode_s": t.decode.as_secs_f64(), "full_steps": t.full_steps, "cached_steps": t.cached_steps});
        println!("{line}");
    }
    Ok(())
}

/// `NAME[:SCALE]`: the name and the scale (default 1), which must be finite.
fn split_scale<'a>(flag: &str, arg: &'a str) -> Result<(&'a str, f64)> {
    let (name, scale) = match arg.rsplit_once(':').and_then(|(n, s)| Some((n, s.parse::<f64>().ok()?))) {
        Some((n, scale)) if !n.is_empty() => (n, scale),
        _ => (arg, 1.0),
    };
    if !scale.is_finite() {
        anyhow::bail!("{flag} {arg}: the scale must be a finite number");
    }
    Ok((name, scale))
}

/// `--controlnet PATH_OR_NAME[:SCALE]` with its `--control-image`, resized to the output (and
/// preprocessed as `--control-preprocess` says).
fn control_unit(arg: &str, picture: easel_api::InputImage, args: &GenerateArgs, width: usize, height: usize, pipe: &Pipeline, device: &easel_engine::Device) -> Result<easel_engine::ControlUnit> {
    let (name, scale) = split_scale("--controlnet", arg)?;
    let path = match Path::new(name) {
        p if p.exists() => p.to_path_buf(),
        _ if args.controlnet_dir.is_none() => anyhow::bail!("--controlnet {arg}: no such folder or file (names need --controlnet-dir)"),
        _ => easel_api::ControlNetRegistry::new(args.controlnet_dir.clone()).resolve(name).map_err(|e| anyhow::anyhow!("--controlnet {arg}: {}", e.body.message))?,
    };
    let dtype = easel_engine::parse_dtype(&args.dtype)?;
    let net = easel_engine::ControlNet::load(&path, pipe.controlnet_host(), dtype, device).with_context(|| format!("--controlnet {arg}"))?;
    let preprocess = easel_api::Preprocess::parse(args.control_preprocess.as_deref()).map_err(|e| anyhow::anyhow!("--control-preprocess: {}", e.body.message))?;
    let picture = preprocess.apply(picture).resized(width as u32, height as u32);
    let image = easel_engine::rgb_pixels("controlnets", width, height, picture.rgb())?;
    Ok(easel_engine::ControlUnit { net: std::sync::Arc::new(net), image, scale, start: args.control_start, end: args.control_end, mode: args.control_mode })
}

/// `--ip-adapter PATH_OR_NAME` with its `--ip-adapter-image` and `--ip-adapter-scale`.
fn ip_adapter_unit(args: &GenerateArgs, device: &easel_engine::Device) -> Result<Option<easel_engine::IpAdapterUnit>> {
    let (arg, image) = match (&args.ip_adapter, &args.ip_adapter_image) {
        (None, None) => return Ok(None),
        (Some(arg), Some(image)) => (arg, image),
        (Some(_), None) => anyhow::bail!("--ip-adapter: needs --ip-adapter-image (the reference picture)"),
        (None, Some(_)) => anyhow::bail!("--ip-adapter-image: needs --ip-adapter (the adapter it feeds)"),
    };
    if !args.ip_adapter_scale.is_finite() {
        anyhow::bail!("--ip-adapter-scale {}: must be a finite number", args.ip_adapter_scale);
    }
    let path = match Path::new(arg) {
        p if p.is_file() => p.to_path_buf(),
        _ if args.ip_adapter_dir.is_none() => anyhow::bail!("--ip-adapter {arg}: no such file (names need --ip-adapter-dir)"),
        _ => easel_api::IpAdapterRegistry::new(args.ip_adapter_dir.clone()).resolve(arg).map_err(|e| anyhow::anyhow!("--ip-adapter {arg}: {}", e.body.message))?,
    };
    let dtype = easel_engine::parse_dtype(&args.dtype)?;
    let adapter = easel_engine::IpAdapter::load(&path, None, dtype, device).with_context(|| format!("--ip-adapter {arg}"))?;
    let picture = read_picture("--ip-adapter-image", image)?;
    let picture = easel_engine::RgbPicture::new(picture.width() as usize, picture.height() as usize, picture.rgb().to_vec())?;
    Ok(Some(easel_engine::IpAdapterUnit { adapter: std::sync::Arc::new(adapter), picture, scale: args.ip_adapter_scale }))
}

/// `PATH_OR_NAME[:SCALE]`: a file, or a name in the registry folder.
fn parse_lora(arg: &str, registry: Option<&Path>) -> Result<LoraSpec> {
    let (name, scale) = split_scale("--lora", arg)?;
    let path = Path::new(name);
    if path.is_file() {
        return Ok(LoraSpec { path: path.to_path_buf(), scale });
    }
    let registry = easel_api::LoraRegistry::new(registry.map(Path::to_path_buf)).with_hub(true);
    match registry.source(name) {
        Ok(easel_api::LoraSource::File(path)) => Ok(LoraSpec { path, scale }),
        Ok(easel_api::LoraSource::Hub(id)) => Ok(LoraSpec { path: crate::hub::lora_file(&id)?, scale }),
        Err(e) if registry.dir().is_none() => anyhow::bail!("--lora {arg}: no such file (names need --lora-dir: {})", e.body.message),
        Err(e) => anyhow::bail!("--lora {arg}: no such file, and {}", e.body.message),
    }
}

fn rand_seed() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    (nanos as u64 ^ (std::process::id() as u64).rotate_left(32)) % (1 << 53)
}
