//! `easel models`: inspect a model (what its weights need in memory) and quantize FLUX
//! transformers to GGUF.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use easel_engine::config::FluxTransformerConfig;
use easel_engine::quant::{quantized_bytes, Weights, QUANTIZE_TYPES};
use easel_engine::{DType, Device};

#[derive(Args, Debug)]
pub struct ModelsArgs {
    #[command(subcommand)]
    what: ModelsWhat,
}

#[derive(Subcommand, Debug)]
enum ModelsWhat {
    /// Write a FLUX transformer's weights as GGUF (BFL names, as the community publishes them).
    Quantize {
        /// A FLUX diffusers-layout directory, or a transformer file (BFL or diffusers names).
        #[arg(long)]
        model: String,
        /// q8_0, q5_0, q5_1, q4_0, q4_1 or q4_k.
        #[arg(long = "type")]
        quant: String,
        /// The GGUF file to write.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// How much memory a FLUX transformer's weights take at each type, from the tensor shapes of
    /// a model's config (default: FLUX.1-dev, 12B parameters).
    Memory {
        /// A FLUX diffusers-layout directory (its transformer/config.json).
        #[arg(long)]
        model: Option<String>,
    },
}

pub fn run(args: ModelsArgs) -> Result<()> {
    match args.what {
        ModelsWhat::Quantize { model, quant, output } => quantize(&model, &quant, &output),
        ModelsWhat::Memory { model } => memory(model.as_deref()),
    }
}

/// The transformer weights of a model directory (or hub id), or of a single file.
fn transformer_weights(spec: &str) -> Result<Weights> {
    let path = Path::new(spec);
    let (w, _) = if path.is_file() {
        easel_engine::flux_pipeline::read_transformer(Path::new("."), Some(path), DType::F32, &Device::Cpu)?
    } else {
        let dir = easel_engine::source::resolve_model(spec, false, ())?;
        easel_engine::flux_pipeline::read_transformer(&dir, None, DType::F32, &Device::Cpu)?
    };
    Ok(w)
}

fn quantize(model: &str, quant: &str, output: &Path) -> Result<()> {
    let t = easel_engine::quant::parse_quant_type(quant)?;
    if output.extension().and_then(|e| e.to_str()) != Some("gguf") {
        bail!("the output file must end in .gguf: {}", output.display());
    }
    let tensors = transformer_weights(model)?.into_dense()?;
    let source_bytes: usize = tensors.iter().map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes()).sum();
    let written = easel_engine::quant::quantize_weights(&tensors, t, "flux", output).with_context(|| format!("writing {}", output.display()))?;
    println!("{}", output.display());
    eprintln!(
        "{} tensors: {:.1} MiB -> {:.1} MiB ({quant}; 2-D weights whose rows are whole blocks are quantized, the rest stay f32)",
        tensors.len(),
        source_bytes as f64 / (1 << 20) as f64,
        written as f64 / (1 << 20) as f64
    );
    Ok(())
}

fn memory(model: Option<&str>) -> Result<()> {
    let (name, config) = match model {
        None => ("FLUX.1-dev".to_string(), FluxTransformerConfig::flux1_dev()),
        Some(spec) => {
            let dir = easel_engine::source::resolve_model(spec, false, ())?;
            (spec.to_string(), easel_engine::config::read_json(&dir.join("transformer").join("config.json"))?)
        }
    };
    let shapes = easel_engine::models::flux::expected_shapes(&config);
    let params: usize = shapes.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    println!("{name} transformer: {} tensors, {params} parameters", shapes.len());
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    println!("{:<6} {:>10} {:>12}  {}", "type", "GiB", "MiB", "transformer fits a 16 GB card (1.5 GiB left for activations, VAE)");
    let rows = [("f32", params * 4), ("bf16", params * 2)]
        .into_iter()
        .map(|(n, b)| (n.to_string(), b))
        .chain(QUANTIZE_TYPES.iter().map(|(n, t)| (n.to_string(), shapes.iter().map(|(_, s)| quantized_bytes(s, *t)).sum())));
    for (n, bytes) in rows {
        // A 16 GB card has about 14.9 GiB usable; activations and the VAE need ~1.5 GiB more.
        let fits = if gib(bytes) + 1.5 < 14.9 { "yes" } else { "no" };
        println!("{n:<6} {:>10.2} {:>12.2}  {fits}", gib(bytes), bytes as f64 / (1 << 20) as f64);
    }
    Ok(())
}
