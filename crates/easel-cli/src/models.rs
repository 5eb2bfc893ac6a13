//! `easel models`: fetch, list and remove hub models in the cache; inspect a model (what its
//! weights need in memory); quantize FLUX and SD 3.5 transformers to GGUF.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use easel_engine::config::{FluxTransformerConfig, Sd3TransformerConfig};
use easel_engine::weights::{gguf::{quantized_bytes, QUANTIZE_TYPES}, store::Weights};
use easel_engine::{DType, Device};
use easel_hub::{catalogue, Hub, Resolved, Spec};

#[derive(Args, Debug)]
pub struct ModelsArgs {
    #[command(subcommand)]
    what: ModelsWhat,
}

#[derive(Subcommand, Debug)]
enum ModelsWhat {
    /// Download a model into the hub cache without running it: a hub repo (owner/name[@revision]),
    /// a known model's short name, or one file (owner/name/file.gguf).
    Pull {
        model: String,
        /// f16 or bf16 fetch the repo's fp16 variant files where it has them.
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// The models in the hub cache (with their size), and the known models easel has defaults for.
    List,
    /// Remove a model from the hub cache.
    Rm { model: String },
    /// Write a FLUX or SD 3.5 transformer's weights as GGUF (BFL's or Stability's names, as the
    /// community publishes them).
    Quantize {
        /// A FLUX or SD 3.5 diffusers-layout directory, or a transformer file (reference or
        /// diffusers names).
        #[arg(long)]
        model: String,
        /// q8_0, q5_0, q5_1, q4_0, q4_1 or q4_k.
        #[arg(long = "type")]
        quant: String,
        /// The GGUF file to write.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// How much memory a transformer's weights take at each type (from the tensor shapes of a
    /// model's config; default FLUX.1-dev, 12B parameters), and which fit a GPU.
    Memory {
        /// flux-dev, sd3.5-large or sd3.5-medium (built-in configs, no download), or a FLUX or
        /// SD 3.5 diffusers-layout directory or hub repo (its transformer/config.json).
        #[arg(long)]
        model: Option<String>,
        /// The GPU's memory in GB: says which types fit it, with and without offloading the
        /// text encoders.
        #[arg(long, default_value_t = 16.0)]
        vram: f64,
    },
}

pub fn run(args: ModelsArgs) -> Result<()> {
    match args.what {
        ModelsWhat::Pull { model, dtype } => pull(&model, &dtype),
        ModelsWhat::List => list(),
        ModelsWhat::Rm { model } => remove(&model),
        ModelsWhat::Quantize { model, quant, output } => quantize(&model, &quant, &output),
        ModelsWhat::Memory { model, vram } => memory(model.as_deref(), vram),
    }
}

/// The transformer weights of a model directory (or hub id), or of a single file, with the
/// GGUF architecture name of its family (`flux` or `sd3`).
fn transformer_weights(spec: &str) -> Result<(Weights, &'static str)> {
    let path = Path::new(spec);
    let (dir, file) = if path.is_file() { (PathBuf::from("."), Some(path)) } else { (crate::hub::model_dir(spec, false, None)?, None) };
    let sd3 = match file {
        // Stability's names, or diffusers' SD3 names (FLUX's diffusers names have single blocks).
        Some(f) => {
            let names = easel_engine::read_tensor_names(f)?;
            names.iter().any(|n| n.contains("joint_blocks.")) || (names.iter().any(|n| n.contains("transformer_blocks.")) && !names.iter().any(|n| n.contains("single_transformer_blocks.")))
        }
        None => transformer_class(&dir)? == "SD3Transformer2DModel",
    };
    Ok(if sd3 {
        (easel_engine::pipelines::sd3::read_transformer(&dir, file, DType::F32, &Device::Cpu)?.0, "sd3")
    } else {
        (easel_engine::pipelines::flux::read_transformer(&dir, file, DType::F32, &Device::Cpu)?.0, "flux")
    })
}

/// The `_class_name` of a model folder's `transformer/config.json` (a folder may hold only the
/// transformer).
fn transformer_class(dir: &Path) -> Result<String> {
    #[derive(serde::Deserialize)]
    struct Class {
        #[serde(rename = "_class_name", default)]
        class_name: String,
    }
    Ok(easel_engine::config::read_json::<Class>(&dir.join("transformer").join("config.json"))?.class_name)
}

fn quantize(model: &str, quant: &str, output: &Path) -> Result<()> {
    let t = easel_engine::weights::gguf::parse_quant_type(quant)?;
    if output.extension().and_then(|e| e.to_str()) != Some("gguf") {
        bail!("the output file must end in .gguf: {}", output.display());
    }
    let (weights, architecture) = transformer_weights(model)?;
    let tensors = weights.into_dense()?;
    let source_bytes: usize = tensors.iter().map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes()).sum();
    let written = easel_engine::weights::gguf::quantize_weights(&tensors, t, architecture, output).with_context(|| format!("writing {}", output.display()))?;
    println!("{}", output.display());
    eprintln!(
        "{} tensors: {:.1} MiB -> {:.1} MiB ({quant}; 2-D weights whose rows are whole blocks are quantized, the rest stay f32)",
        tensors.len(),
        source_bytes as f64 / (1 << 20) as f64,
        written as f64 / (1 << 20) as f64
    );
    Ok(())
}

/// The other components, in parameters: CLIP-L's and OpenCLIP bigG's text models and T5-XXL's
/// encoder (the text encoders), and the 16-channel VAE (FLUX's and SD 3.5's differ by a few
/// thousand).
const CLIP_L_PARAMS: f64 = 123_060_480.0;
const CLIP_G_PARAMS: f64 = 694_659_840.0;
const T5_XXL_ENCODER_PARAMS: f64 = 4_762_310_656.0;
const VAE16_PARAMS: f64 = 83_819_683.0;
/// Device memory beside the weights at 1024x1024, batch 1, in GiB: a transformer step's
/// activations (attention included), the VAE decode (which does not overlap the steps), and
/// the CUDA context with cuBLAS's workspace. Estimates: tools/gpu/check.sh measures the peaks.
const STEP_ACTIVATIONS_GIB: f64 = 1.5;
const VAE_DECODE_GIB: f64 = 2.5;
const CUDA_CONTEXT_GIB: f64 = 0.6;
/// What a card's driver and display keep for themselves, in GiB.
const CARD_RESERVE_GIB: f64 = 1.0;

fn memory(model: Option<&str>, vram_gb: f64) -> Result<()> {
    if !(vram_gb.is_finite() && vram_gb > CARD_RESERVE_GIB) {
        bail!("--vram {vram_gb}: give the card's memory in GB, e.g. --vram 16");
    }
    let flux = |c: &FluxTransformerConfig| (easel_engine::models::flux::expected_shapes(c), CLIP_L_PARAMS + T5_XXL_ENCODER_PARAMS);
    let sd3 = |c: &Sd3TransformerConfig| (easel_engine::models::mmdit::expected_shapes(c), CLIP_L_PARAMS + CLIP_G_PARAMS + T5_XXL_ENCODER_PARAMS);
    let (name, (shapes, text_params)) = match model {
        None | Some("flux-dev") => ("FLUX.1-dev".to_string(), flux(&FluxTransformerConfig::flux1_dev())),
        Some("sd3.5-large") | Some("sd3.5-large-turbo") => ("SD 3.5 large".to_string(), sd3(&Sd3TransformerConfig::sd35_large())),
        Some("sd3.5-medium") => ("SD 3.5 medium".to_string(), sd3(&Sd3TransformerConfig::sd35_medium())),
        Some(spec) => {
            let dir = crate::hub::model_dir(spec, false, None)?;
            let config = dir.join("transformer").join("config.json");
            let plan = if transformer_class(&dir)? == "SD3Transformer2DModel" { sd3(&easel_engine::config::read_json(&config)?) } else { flux(&easel_engine::config::read_json(&config)?) };
            (spec.to_string(), plan)
        }
    };
    let params: usize = shapes.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    println!("{name} transformer: {} tensors, {params} parameters", shapes.len());
    let gib = |b: f64| b / (1u64 << 30) as f64;
    let budget = vram_gb - CARD_RESERVE_GIB;
    let text_encoders = gib(text_params * 2.0);
    let rest = gib(VAE16_PARAMS * 2.0) + CUDA_CONTEXT_GIB + STEP_ACTIVATIONS_GIB.max(VAE_DECODE_GIB);
    println!(
        "device peak at 1024x1024 = transformer + VAE {:.2} + activations {:.1} + CUDA context {:.1} GiB, plus the text encoders ({text_encoders:.2} GiB in bf16) unless offloaded",
        gib(VAE16_PARAMS * 2.0),
        STEP_ACTIVATIONS_GIB.max(VAE_DECODE_GIB),
        CUDA_CONTEXT_GIB
    );
    println!("{:<6} {:>10} {:>12} {:>14} {:>14}  fits a {vram_gb} GB card ({budget:.1} GiB usable)?", "type", "GiB", "MiB", "peak GiB", "offloaded GiB");
    let rows = [("f32", params * 4), ("bf16", params * 2)]
        .into_iter()
        .map(|(n, b)| (n.to_string(), b))
        .chain(QUANTIZE_TYPES.iter().map(|(n, t)| (n.to_string(), shapes.iter().map(|(_, s)| quantized_bytes(s, *t)).sum())));
    for (n, bytes) in rows {
        let weights = gib(bytes as f64);
        let offloaded = weights + rest;
        let resident = offloaded + text_encoders;
        let fits = if resident <= budget {
            "yes"
        } else if offloaded <= budget {
            "yes, with --offload-text-encoders"
        } else {
            "no"
        };
        println!("{n:<6} {weights:>10.2} {:>12.2} {resident:>14.2} {offloaded:>14.2}  {fits}", bytes as f64 / (1 << 20) as f64);
    }
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

fn pull(spec: &str, dtype: &str) -> Result<()> {
    let dtype = easel_engine::parse_dtype(dtype)?;
    let hub = Hub::from_env();
    let resolved = easel_hub::resolve_model(&hub, spec, dtype != DType::F32, &crate::hub::DownloadBars::default())?;
    let path = match resolved {
        Resolved::Dir(p) | Resolved::File(p) => p,
    };
    println!("{spec}: {}", path.display());
    Ok(())
}

fn list() -> Result<()> {
    let hub = Hub::from_env();
    let cached = easel_hub::cache::list(hub.cache_root())?;
    println!("hub cache {}:", hub.cache_root().display());
    if cached.is_empty() {
        println!("  (empty)");
    }
    for repo in &cached {
        let known = catalogue::lookup(&repo.repo).map(|k| format!(" [{}]", k.name)).unwrap_or_default();
        let main = repo.main.as_deref().map(|c| &c[..8.min(c.len())]).unwrap_or("-");
        println!("  {:<48} {:>10.1} MiB  main {main}  {} snapshot(s){known}", repo.repo, mib(repo.bytes), repo.snapshots);
    }
    println!("known models (--model NAME; a model's own easel.json overrides these defaults):");
    for k in catalogue::CATALOGUE {
        let gated = if k.gated { "gated: accept the licence on the hub, set HF_TOKEN" } else { "open" };
        println!("  {:<13} {:<44} steps {:<2} guidance {:<4} {} ({gated})", k.name, k.repo, k.steps, k.guidance, k.licence);
    }
    Ok(())
}

fn remove(spec: &str) -> Result<()> {
    let hub = Hub::from_env();
    let repo = match easel_hub::parse_spec(spec)? {
        Spec::Repo { repo, .. } | Spec::RepoFile { repo, .. } => repo,
        Spec::Local(p) => bail!("{} is a local path, not a hub model; remove it yourself", p.display()),
    };
    let cached = easel_hub::cache::list(hub.cache_root())?;
    let Some(entry) = cached.into_iter().find(|c| c.repo == repo) else {
        bail!("`{repo}` is not in the hub cache ({})", hub.cache_root().display());
    };
    std::fs::remove_dir_all(&entry.dir).with_context(|| format!("removing {}", entry.dir.display()))?;
    let locks = hub.cache_root().join(".locks").join(easel_hub::cache::folder_name(&repo));
    let _ = std::fs::remove_dir_all(locks);
    println!("removed {repo} ({:.1} MiB) from {}", mib(entry.bytes), hub.cache_root().display());
    Ok(())
}
