//! What `--model`, `--transformer` and a hub LoRA name resolve to: a local path, a catalogue
//! short name, a hub repo (`owner/name`, optionally `@revision`) fetched as a diffusers pipeline,
//! or one file of a repo (`owner/name/path/file.gguf`), as GGUF transformers and fine-tunes are
//! published.

use std::path::{Path, PathBuf};

use crate::catalogue;
use crate::client::{Hub, Snapshot};
use crate::error::{HubError, Result};
use crate::progress::DownloadProgress;

/// A parsed model spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    /// A path on this machine.
    Local(PathBuf),
    /// A hub repo at a revision (a branch, tag or commit).
    Repo { repo: String, revision: String },
    /// One file of a hub repo at a revision.
    RepoFile { repo: String, revision: String, file: String },
}

/// What a model spec resolved to on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// A diffusers-layout folder.
    Dir(PathBuf),
    /// A single weights file.
    File(PathBuf),
}

fn valid_part(s: &str) -> bool {
    !s.is_empty() && !s.starts_with('.') && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// Reads a spec: an existing path wins, then a catalogue name, then the hub forms.
pub fn parse_spec(spec: &str) -> Result<Spec> {
    let path = Path::new(spec);
    if path.exists() {
        return Ok(Spec::Local(path.to_path_buf()));
    }
    if let Some(known) = catalogue::lookup(spec) {
        return Ok(Spec::Repo { repo: known.repo.to_string(), revision: "main".into() });
    }
    let (body, revision) = match spec.rsplit_once('@') {
        Some((b, r)) if !r.is_empty() && !r.contains('/') => (b, r.to_string()),
        _ => (spec, "main".to_string()),
    };
    let parts: Vec<&str> = body.split('/').collect();
    let bad = || {
        HubError::BadSpec(format!(
            "no such file or directory `{spec}` (a hub repo is owner/name[@revision], a file in one owner/name/path/file.safetensors, a known model one of {})",
            catalogue::names()
        ))
    };
    if parts.len() < 2 || !valid_part(parts[0]) || !valid_part(parts[1]) || spec.starts_with('/') || spec.starts_with('.') {
        return Err(bad());
    }
    let repo = format!("{}/{}", parts[0], parts[1]);
    if parts.len() == 2 {
        return Ok(Spec::Repo { repo, revision });
    }
    let file = parts[2..].join("/");
    if parts[2..].iter().any(|p| p.is_empty() || *p == "..") || !file.contains('.') {
        return Err(bad());
    }
    Ok(Spec::RepoFile { repo, revision, file })
}

/// Resolves `--model`: a folder or file on disk, or a pipeline or single file from the hub.
/// `prefer_fp16` picks `*.fp16.safetensors` variants where a repo has them.
pub fn resolve_model(hub: &Hub, spec: &str, prefer_fp16: bool, progress: &dyn DownloadProgress) -> Result<Resolved> {
    match parse_spec(spec)? {
        Spec::Local(p) if p.is_dir() => Ok(Resolved::Dir(p)),
        Spec::Local(p) => Ok(Resolved::File(p)),
        Spec::Repo { repo, revision } => fetch_pipeline(hub, &repo, &revision, Some(prefer_fp16), progress).map(Resolved::Dir),
        Spec::RepoFile { repo, revision, file } => fetch_file(hub, &repo, &revision, &file, progress).map(Resolved::File),
    }
}

/// Resolves `--config` for a single-file checkpoint: a local diffusers folder, or a hub repo of
/// which only `model_index.json` and the components' configs and tokenizers are fetched (a few
/// hundred kilobytes), as diffusers' `from_single_file` fetches them.
pub fn resolve_config(hub: &Hub, spec: &str, progress: &dyn DownloadProgress) -> Result<PathBuf> {
    match parse_spec(spec)? {
        Spec::Local(p) if p.is_dir() => Ok(p),
        Spec::Local(p) => Err(HubError::BadSpec(format!("`{}` is a file; the configs come from a diffusers pipeline folder or hub repo", p.display()))),
        Spec::Repo { repo, revision } => fetch_pipeline(hub, &repo, &revision, None, progress),
        Spec::RepoFile { repo, .. } => Err(HubError::BadSpec(format!("`{spec}` names a file; the configs come from the whole repo, `{repo}`"))),
    }
}

/// Resolves a single weights file (`--transformer`, a LoRA): a path, or `owner/name/file`.
pub fn resolve_file(hub: &Hub, spec: &str, progress: &dyn DownloadProgress) -> Result<PathBuf> {
    match parse_spec(spec)? {
        Spec::Local(p) => Ok(p),
        Spec::RepoFile { repo, revision, file } => fetch_file(hub, &repo, &revision, &file, progress),
        Spec::Repo { repo, .. } => Err(HubError::BadSpec(format!("`{spec}` names the repo `{repo}`, not a file in it: use {repo}/FILE"))),
    }
}

/// A LoRA published on the hub: `owner/name/file.safetensors`, or `owner/name` when the repo has
/// diffusers' `pytorch_lora_weights.safetensors` or exactly one `.safetensors` file.
pub fn resolve_lora(hub: &Hub, id: &str) -> Result<PathBuf> {
    const DIFFUSERS_NAME: &str = "pytorch_lora_weights.safetensors";
    match parse_spec(id)? {
        Spec::Local(_) => Err(HubError::BadSpec(format!("`{id}` is a local path, not a hub id"))),
        Spec::RepoFile { repo, revision, file } => fetch_file(hub, &repo, &revision, &file, &crate::NoProgress),
        Spec::Repo { repo, revision } => {
            let snap = hub.open(&repo, &revision)?;
            let files: Vec<&String> = snap.files().iter().filter(|f| f.ends_with(".safetensors")).collect();
            let file = match files.as_slice() {
                [one] => one.to_string(),
                many if many.iter().any(|f| *f == DIFFUSERS_NAME) => DIFFUSERS_NAME.to_string(),
                [] => return Err(HubError::BadSpec(format!("hub repo `{repo}` has no .safetensors LoRA file"))),
                many => {
                    let names: Vec<&str> = many.iter().map(|s| s.as_str()).collect();
                    return Err(HubError::BadSpec(format!("hub repo `{repo}` has several .safetensors files ({}); name one as {repo}/FILE", names.join(", "))));
                }
            };
            fetch_into(&snap, &[file.clone()], &crate::NoProgress)?;
            Ok(snap.dir().join(file))
        }
    }
}

fn fetch_into(snap: &Snapshot<'_>, files: &[String], progress: &dyn DownloadProgress) -> Result<()> {
    snap.fetch(files, progress)?;
    snap.complete()
}

fn fetch_file(hub: &Hub, repo: &str, revision: &str, file: &str, progress: &dyn DownloadProgress) -> Result<PathBuf> {
    let snap = hub.open(repo, revision)?;
    if !snap.is_offline() && !snap.files().iter().any(|f| f == file) {
        return Err(HubError::EntryNotFound { repo: repo.into(), file: file.into(), revision: revision.into(), message: "not in the repo's file list".into() });
    }
    fetch_into(&snap, &[file.to_string()], progress)?;
    Ok(snap.dir().join(file))
}

/// The components `model_index.json` lists with a class (`[library, class]`, not `[null, null]`).
fn listed_components(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(HubError::io(index))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| HubError::BadSpec(format!("{}: not JSON: {e}", index.display())))?;
    let map = value.as_object().ok_or_else(|| HubError::BadSpec(format!("{}: not a JSON object", index.display())))?;
    Ok(map
        .iter()
        .filter(|(k, _)| !k.starts_with('_'))
        .filter(|(_, v)| v.as_array().is_some_and(|a| a.len() == 2 && a.iter().all(|x| !x.is_null())))
        .map(|(k, _)| k.clone())
        .collect())
}

/// Chooses the fp16 variant files or the full-precision ones: the preferred kind where present.
pub fn pick_variant<T>(files: Vec<T>, is_fp16: impl Fn(&T) -> bool, prefer_fp16: bool) -> Vec<T> {
    let (fp16, full): (Vec<T>, Vec<T>) = files.into_iter().partition(|f| is_fp16(f));
    match (prefer_fp16, fp16.is_empty(), full.is_empty()) {
        (true, false, _) | (false, false, true) => fp16,
        _ => full,
    }
}

/// The files of one component that a pipeline needs: its configs and, unless `weights` is
/// `None`, one variant of its weights (`Some(true)` prefers fp16).
fn wanted_files(files: &[String], component: &str, weights: Option<bool>) -> Vec<String> {
    let prefix = format!("{component}/");
    let own: Vec<&String> = files.iter().filter(|s| s.starts_with(&prefix)).collect();
    let configs = own.iter().filter(|f| f.ends_with(".json") || f.ends_with(".txt") || f.ends_with(".model")).map(|f| f.to_string());
    let Some(prefer_fp16) = weights else { return configs.collect() };
    let weights: Vec<&String> = own.iter().copied().filter(|f| f.ends_with(".safetensors")).collect();
    let chosen = pick_variant(weights, |f| f.contains(".fp16."), prefer_fp16);
    configs.chain(chosen.into_iter().cloned()).collect()
}

/// Fetches what a diffusers pipeline needs, all from one commit, and only then moves the ref;
/// `weights` as in [`wanted_files`] (`None` fetches the configs only).
fn fetch_pipeline(hub: &Hub, repo: &str, revision: &str, weights: Option<bool>, progress: &dyn DownloadProgress) -> Result<PathBuf> {
    let snap = hub.open(repo, revision)?;
    const INDEX: &str = "model_index.json";
    if !snap.is_offline() && !snap.files().iter().any(|f| f == INDEX) {
        let weights: Vec<&str> = snap.files().iter().map(|s| s.as_str()).filter(|f| f.ends_with(".safetensors") || f.ends_with(".gguf")).take(3).collect();
        let hint = weights.first().map(|f| format!("; for a single file name it, e.g. {repo}/{f}")).unwrap_or_default();
        return Err(HubError::BadSpec(format!("hub repo `{repo}` has no model_index.json, so it is not a diffusers pipeline{hint}")));
    }
    snap.fetch(&[INDEX.to_string()], progress)?;
    let mut wanted: Vec<String> = snap.files().iter().filter(|f| *f == "easel.json").cloned().collect();
    wanted.push(INDEX.to_string());
    for component in listed_components(&snap.dir().join(INDEX))? {
        let files = wanted_files(snap.files(), &component, weights);
        if weights.is_some() && snap.is_offline() && !files.iter().any(|f| f.ends_with(".safetensors")) && !["tokenizer", "tokenizer_2", "tokenizer_3", "scheduler", "feature_extractor"].contains(&component.as_str()) {
            return Err(HubError::NotCached { repo: repo.into(), cache: hub.cache_root().to_path_buf(), detail: format!(": commit {} lacks {component} weights", &snap.commit()[..8]) });
        }
        wanted.extend(files);
    }
    fetch_into(&snap, &wanted, progress)?;
    Ok(snap.dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_are_told_apart() {
        assert_eq!(parse_spec("stabilityai/sdxl-turbo").unwrap(), Spec::Repo { repo: "stabilityai/sdxl-turbo".into(), revision: "main".into() });
        assert_eq!(parse_spec("o/n@v1.0").unwrap(), Spec::Repo { repo: "o/n".into(), revision: "v1.0".into() });
        assert_eq!(parse_spec("flux-dev").unwrap(), Spec::Repo { repo: "black-forest-labs/FLUX.1-dev".into(), revision: "main".into() });
        assert_eq!(
            parse_spec("city96/FLUX.1-dev-gguf/flux1-dev-Q4_K_S.gguf").unwrap(),
            Spec::RepoFile { repo: "city96/FLUX.1-dev-gguf".into(), revision: "main".into(), file: "flux1-dev-Q4_K_S.gguf".into() }
        );
        for bad in ["plainname", "./nope/x", "/abs/nope", "a/b/../c.gguf", "a/b/noext"] {
            assert!(matches!(parse_spec(bad), Err(HubError::BadSpec(_))), "{bad}");
        }
    }

    #[test]
    fn fp16_variant_is_preferred_only_when_asked() {
        let s: Vec<String> = ["unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors", "vae/config.json"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let half = wanted_files(&s, "unet", Some(true));
        assert!(half.contains(&"unet/diffusion_pytorch_model.fp16.safetensors".to_string()));
        assert!(!half.contains(&"unet/diffusion_pytorch_model.safetensors".to_string()));
        let full = wanted_files(&s, "unet", Some(false));
        assert!(full.contains(&"unet/diffusion_pytorch_model.safetensors".to_string()));
        assert!(full.contains(&"unet/config.json".to_string()));
        assert_eq!(wanted_files(&s, "unet", None), vec!["unet/config.json".to_string()]);
    }
}
