//! Which files of a local diffusers-layout folder hold a component's weights. Where a model
//! comes from (a folder, a hub repo, a catalogue name) is easel-hub's job.

use std::path::{Path, PathBuf};

use crate::error::{EngineError, Result};

/// The safetensors files holding one component's weights, preferring the fp16 variant when asked.
pub fn component_weights(dir: &Path, component: &str, prefer_fp16: bool) -> Result<Vec<PathBuf>> {
    let cdir = dir.join(component);
    let entries = std::fs::read_dir(&cdir).map_err(|_| EngineError::MissingFile {
        path: cdir.clone(),
        hint: format!("the pipeline lists `{component}` but its folder is absent"),
    })?;
    let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    files.sort();
    let name = |p: &PathBuf| p.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
    let weights: Vec<PathBuf> = files.iter().filter(|p| name(p).ends_with(".safetensors")).cloned().collect();
    let chosen = easel_hub::pick_variant(weights, |p| name(p).contains(".fp16."), prefer_fp16);
    if chosen.is_empty() {
        let default_name = if component.starts_with("text_encoder") { "model.safetensors" } else { "diffusion_pytorch_model.safetensors" };
        let has_bin = files.iter().any(|p| name(p).ends_with(".bin"));
        let hint = if has_bin {
            "only PyTorch .bin weights are present; easel reads safetensors (convert with diffusers' save_pretrained(safe_serialization=True))".into()
        } else {
            "weights file not found".into()
        };
        return Err(EngineError::MissingFile { path: cdir.join(default_name), hint });
    }
    Ok(chosen)
}
