//! Where a model comes from: a diffusers-layout directory, or a Hugging Face hub id fetched
//! into the standard hub cache (honouring `HF_HOME` and `HF_HUB_OFFLINE`).

use std::path::{Path, PathBuf};

use hf_hub::api::Progress;
use hf_hub::{Cache, Repo};

use crate::config::{read_json, ModelIndex};
use crate::error::{EngineError, Result};

/// Download progress reporting, passed through to hf-hub.
pub use hf_hub::api::Progress as DownloadProgress;

/// Whether `spec` names a hub repository rather than a local path.
pub fn looks_like_hub_id(spec: &str) -> bool {
    let mut parts = spec.split('/');
    let (Some(owner), Some(name), None) = (parts.next(), parts.next(), parts.next()) else { return false };
    let ok = |s: &str| !s.is_empty() && !s.starts_with('.') && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    ok(owner) && ok(name) && !Path::new(spec).exists()
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"))
}

/// Resolves `spec` to a local diffusers-layout directory, downloading from the hub if needed.
///
/// `prefer_fp16` picks `*.fp16.safetensors` variant files where the repo has them.
pub fn resolve_model<P: Progress + Clone>(spec: &str, prefer_fp16: bool, progress: P) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.exists() {
        return Err(EngineError::MissingFile {
            path: path.join("model_index.json"),
            hint: format!("{spec} is a file; --model takes a diffusers-layout directory or a hub id"),
        });
    }
    if !looks_like_hub_id(spec) {
        return Err(EngineError::MissingFile {
            path: path.to_path_buf(),
            hint: "no such model directory (a hub id has the form owner/name)".into(),
        });
    }
    if offline() {
        return from_cache(spec);
    }
    download(spec, prefer_fp16, progress)
}

fn offline_hint(spec: &str) -> String {
    format!(
        "model `{spec}` is not in the hub cache ({}) and HF_HUB_OFFLINE is set; download it on a connected machine \
         or pass --model /path/to/a/diffusers-directory",
        Cache::from_env().path().display()
    )
}

fn from_cache(spec: &str) -> Result<PathBuf> {
    let repo = Cache::from_env().repo(Repo::model(spec.to_string()));
    let index = repo.get("model_index.json").ok_or_else(|| EngineError::Hub(offline_hint(spec)))?;
    Ok(index.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// Chooses the fp16 variant files or the full-precision ones: the preferred kind where present.
fn pick_variant<T>(files: Vec<T>, is_fp16: impl Fn(&T) -> bool, prefer_fp16: bool) -> Vec<T> {
    let (fp16, full): (Vec<T>, Vec<T>) = files.into_iter().partition(|f| is_fp16(f));
    match (prefer_fp16, fp16.is_empty(), full.is_empty()) {
        (true, false, _) | (false, false, true) => fp16,
        _ => full,
    }
}

/// The files of one component that a pipeline needs.
fn wanted_files(siblings: &[String], component: &str, prefer_fp16: bool) -> Vec<String> {
    let prefix = format!("{component}/");
    let files: Vec<&String> = siblings.iter().filter(|s| s.starts_with(&prefix)).collect();
    let config: Vec<String> = files.iter().filter(|f| f.ends_with(".json") || f.ends_with(".txt")).map(|f| f.to_string()).collect();
    let weights: Vec<&String> = files.iter().copied().filter(|f| f.ends_with(".safetensors")).collect();
    let chosen = pick_variant(weights, |f| f.contains(".fp16."), prefer_fp16);
    config.into_iter().chain(chosen.into_iter().cloned()).collect()
}

fn download<P: Progress + Clone>(spec: &str, prefer_fp16: bool, progress: P) -> Result<PathBuf> {
    let hub_err = |e: hf_hub::api::sync::ApiError| {
        let text = e.to_string();
        if text.contains("404") {
            EngineError::Hub(format!("hub model `{spec}` does not exist (or is private: set HF_TOKEN)"))
        } else {
            EngineError::Hub(format!(
                "cannot fetch `{spec}` from the hub: {text}; set HF_HUB_OFFLINE=1 to use the cache, or pass --model /path/to/a/diffusers-directory"
            ))
        }
    };
    let api = hf_hub::api::sync::ApiBuilder::from_env().with_progress(false).build().map_err(hub_err)?;
    let repo = api.repo(Repo::model(spec.to_string()));
    let info = repo.info().map_err(hub_err)?;
    let siblings: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
    let index_path = repo.get("model_index.json").map_err(hub_err)?;
    let index: ModelIndex = read_json(&index_path)?;
    for component in index.components.keys().filter(|c| index.has(c)) {
        for file in wanted_files(&siblings, component, prefer_fp16) {
            repo.download_with_progress(&file, progress.clone()).map_err(hub_err)?;
        }
    }
    Ok(index_path.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// A LoRA published on the hub (`owner/name`): its safetensors file, from the hub cache or
/// downloaded into it. A repo with several files must have `pytorch_lora_weights.safetensors`
/// (diffusers' name) or exactly one `.safetensors` file.
pub fn resolve_hub_lora(id: &str) -> Result<PathBuf> {
    if !looks_like_hub_id(id) {
        return Err(EngineError::Hub(format!("`{id}` is not a hub id (owner/name)")));
    }
    const DIFFUSERS_NAME: &str = "pytorch_lora_weights.safetensors";
    if offline() {
        let repo = Cache::from_env().repo(Repo::model(id.to_string()));
        return repo.get(DIFFUSERS_NAME).ok_or_else(|| {
            EngineError::Hub(format!("LoRA `{id}` is not in the hub cache ({}) and HF_HUB_OFFLINE is set", Cache::from_env().path().display()))
        });
    }
    let hub_err = |e: hf_hub::api::sync::ApiError| EngineError::Hub(format!("cannot fetch LoRA `{id}` from the hub: {e}"));
    let api = hf_hub::api::sync::ApiBuilder::from_env().with_progress(false).build().map_err(hub_err)?;
    let repo = api.repo(Repo::model(id.to_string()));
    let info = repo.info().map_err(hub_err)?;
    let files: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).filter(|f| f.ends_with(".safetensors")).collect();
    let file = match files.as_slice() {
        [one] => *one,
        many if many.contains(&DIFFUSERS_NAME) => DIFFUSERS_NAME,
        [] => return Err(EngineError::Hub(format!("hub repo `{id}` has no .safetensors LoRA file"))),
        many => return Err(EngineError::Hub(format!("hub repo `{id}` has several .safetensors files ({}); put the one you want in the LoRA folder", many.join(", ")))),
    };
    repo.get(file).map_err(hub_err)
}

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
    let chosen = pick_variant(weights, |p| name(p).contains(".fp16."), prefer_fp16);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_told_from_paths() {
        assert!(looks_like_hub_id("stabilityai/sdxl-turbo"));
        assert!(looks_like_hub_id("runwayml/stable-diffusion-v1-5"));
        assert!(!looks_like_hub_id("./models/x"));
        assert!(!looks_like_hub_id("/abs/path"));
        assert!(!looks_like_hub_id("a/b/c"));
        assert!(!looks_like_hub_id("plainname"));
    }

    #[test]
    fn fp16_variant_is_preferred_only_when_asked() {
        let s: Vec<String> = ["unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors", "vae/config.json"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let half = wanted_files(&s, "unet", true);
        assert!(half.contains(&"unet/diffusion_pytorch_model.fp16.safetensors".to_string()));
        assert!(!half.contains(&"unet/diffusion_pytorch_model.safetensors".to_string()));
        let full = wanted_files(&s, "unet", false);
        assert!(full.contains(&"unet/diffusion_pytorch_model.safetensors".to_string()));
        assert!(full.contains(&"unet/config.json".to_string()));
    }
}
