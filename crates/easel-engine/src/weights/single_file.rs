//! Stable Diffusion fine-tunes published as one `.safetensors` file (A1111, ComfyUI, civitai),
//! run without converting the file: [`prepare`] writes a small folder holding a diffusers
//! pipeline's configs and tokenizers (from `--config`, or from the family's reference repo that
//! [`LdmArchitecture::reference_repo`] names, as diffusers' `from_single_file` does) and an
//! `easel.json` whose `checkpoint` points at the file. The SD pipeline then loads that folder
//! like any other and takes every component's weights from the file ([`read_components`]), so
//! the weights are read once and never copied to disk; everything downstream of a model folder
//! (the server, workers, LoRAs, the warm pool) works unchanged.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

pub use super::keys::ldm::{LdmArchitecture, LdmComponents, LdmFamily};
use crate::config::{read_json, ModelIndex};
use crate::error::{EngineError, Result};
use crate::weights::{bad_weights, keys::ldm};

impl LdmArchitecture {
    /// The diffusers repo whose configs and tokenizers fit this architecture, as diffusers
    /// picks them for `from_single_file` without `config=`. SD 2.x files get the 768px
    /// v-prediction 2.1 config (diffusers' default too); a 512px epsilon SD 2 fine-tune needs
    /// `--config stabilityai/stable-diffusion-2-1-base`.
    pub fn reference_repo(&self) -> &'static str {
        match (self.family, self.inpainting) {
            (LdmFamily::Sd1, false) => "stable-diffusion-v1-5/stable-diffusion-v1-5",
            (LdmFamily::Sd1, true) => "stable-diffusion-v1-5/stable-diffusion-inpainting",
            (LdmFamily::Sd2, false) => "stabilityai/stable-diffusion-2-1",
            (LdmFamily::Sd2, true) => "stabilityai/stable-diffusion-2-inpainting",
            (LdmFamily::Sdxl, false) => "stabilityai/stable-diffusion-xl-base-1.0",
            (LdmFamily::Sdxl, true) => "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
        }
    }

    /// The diffusers pipeline classes whose configs fit.
    fn pipeline_classes(&self) -> &'static [&'static str] {
        match self.family {
            LdmFamily::Sd1 | LdmFamily::Sd2 => &["StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline", "LatentConsistencyModelPipeline"],
            LdmFamily::Sdxl => &["StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"],
        }
    }
}

/// Reads a file's architecture from its header alone (no weights are read).
pub fn inspect(file: &Path) -> Result<LdmArchitecture> {
    inspect_mapped(file, &map(file)?)
}

fn map(file: &Path) -> Result<candle_core::safetensors::MmapedSafetensors> {
    if !file.is_file() {
        return Err(EngineError::MissingFile { path: file.to_path_buf(), hint: "no such file".into() });
    }
    // SAFETY: read-only mapping, as in `load_var_builder`.
    unsafe { candle_core::safetensors::MmapedSafetensors::new(file) }.map_err(|e| bad_weights(file, &e))
}

fn inspect_mapped(file: &Path, mapped: &candle_core::safetensors::MmapedSafetensors) -> Result<LdmArchitecture> {
    let shapes: HashMap<String, Vec<usize>> = mapped.tensors().into_iter().map(|(name, view)| (name, view.shape().to_vec())).collect();
    ldm::detect(file, &shapes)
}

/// Writes (or refreshes) under `root` the folder that runs `file` with `config_dir`'s configs and
/// tokenizers, and returns it. The folder is named after the file and where it and the configs
/// live, so two fine-tunes never share one, and rewriting it costs a few small files.
pub fn prepare(file: &Path, config_dir: &Path, root: &Path) -> Result<PathBuf> {
    let arch = inspect(file)?;
    let file = file.canonicalize().map_err(|source| EngineError::Io { path: file.to_path_buf(), source })?;
    let index_path = config_dir.join("model_index.json");
    if !index_path.is_file() {
        return Err(EngineError::param("config", format!("{} has no model_index.json; --config names a diffusers pipeline folder or hub repo", config_dir.display())));
    }
    let index: ModelIndex = read_json(&index_path)?;
    if !arch.pipeline_classes().contains(&index.class_name.as_str()) {
        return Err(EngineError::param(
            "config",
            format!("{} is a {} but {} holds a {:?} checkpoint; give the configs of a matching pipeline, e.g. {}", config_dir.display(), index.class_name, file.display(), arch.family, arch.reference_repo()),
        ));
    }
    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("checkpoint");
    let stem: String = stem.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
    let dir = root.join(format!("{stem}-{:016x}", fingerprint(&[&file, &config_dir.canonicalize().unwrap_or(config_dir.to_path_buf())])));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EngineError::Io { path, source }
    };
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    std::fs::copy(&index_path, dir.join("model_index.json")).map_err(io(&index_path))?;
    for component in index.components.keys().filter(|c| index.has(c)) {
        let from = config_dir.join(component);
        let Ok(entries) = std::fs::read_dir(&from) else { continue };
        let to = dir.join(component);
        std::fs::create_dir_all(&to).map_err(io(&to))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let text = name.to_str().is_some_and(|n| n.ends_with(".json") || n.ends_with(".txt") || n.ends_with(".model"));
            if text && entry.path().is_file() {
                std::fs::copy(entry.path(), to.join(&name)).map_err(io(&entry.path()))?;
            }
        }
    }
    // The config folder's easel.json (steps, guidance) with the checkpoint added.
    let mut defaults = match config_dir.join("easel.json") {
        p if p.is_file() => read_json::<serde_json::Map<String, serde_json::Value>>(&p)?,
        _ => serde_json::Map::new(),
    };
    defaults.insert("checkpoint".into(), serde_json::Value::String(file.display().to_string()));
    let text = serde_json::to_string_pretty(&defaults).map_err(|e| EngineError::BadConfig { path: dir.join("easel.json"), message: e.to_string() })?;
    std::fs::write(dir.join("easel.json"), text).map_err(io(&dir.join("easel.json")))?;
    Ok(dir)
}

/// FNV-1a over paths: stable across runs and builds, unlike `DefaultHasher`.
fn fingerprint(paths: &[&Path]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for p in paths {
        for b in p.as_os_str().as_encoded_bytes().iter().chain([&0u8]) {
            h = (h ^ u64::from(*b)).wrapping_mul(0x100000001b3);
        }
    }
    h
}

/// Reads a single file's weights into diffusers' components and names, as `dtype` on `device`.
/// Only the components' tensors are read (not EMA copies), each converted as it is read, so the
/// file is never held twice.
pub fn read_components(file: &Path, dtype: DType, device: &Device) -> Result<LdmComponents> {
    let mapped = map(file)?;
    let arch = inspect_mapped(file, &mapped)?;
    let mut tensors = HashMap::new();
    for (name, _) in mapped.tensors().into_iter().filter(|(name, _)| ldm::is_component(name)) {
        let t = mapped.load(&name, &Device::Cpu).map_err(|e| bad_weights(file, &e))?;
        let t = if t.dtype().is_float() && t.dtype() != dtype { t.to_dtype(dtype)? } else { t };
        tensors.insert(name, t.to_device(device)?);
    }
    ldm::split(file, arch.family, tensors)
}
