//! LoRA stacks on the wire, and the registry that turns names into files: requests name
//! entries of a configured folder, never paths, so nothing outside it is ever opened.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ApiError;

/// The most LoRAs one request may stack.
pub const MAX_LORAS: usize = 8;

/// One entry of a request's `loras`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraRef {
    /// A registry name (a file `NAME.safetensors` in the LoRA folder).
    pub name: String,
    /// Strength; 1 when absent.
    #[serde(default = "one")]
    pub scale: f64,
}

fn one() -> f64 {
    1.0
}

/// Checks a stack's names and scales (not whether the names exist: see [`LoraRegistry`]).
pub fn validate_loras(loras: &[LoraRef]) -> Result<(), ApiError> {
    if loras.len() > MAX_LORAS {
        return Err(ApiError::invalid("loras", format!("at most {MAX_LORAS} LoRAs may be stacked, got {}", loras.len())));
    }
    for l in loras {
        check_name(&l.name)?;
        if !l.scale.is_finite() || l.scale.abs() > 100.0 {
            return Err(ApiError::invalid("loras", format!("scale of LoRA `{}` must be a finite number between -100 and 100", l.name)));
        }
    }
    Ok(())
}

/// A registry name (letters, digits, `-`, `_` and `.`, not starting with a dot) or a hub id
/// `owner/name` made of two such parts; never a path.
pub fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = match name.split_once('/') {
        None => is_plain_name(name),
        Some((owner, repo)) => is_plain_name(owner) && is_plain_name(repo),
    };
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid("loras", format!("`{name}` is not a LoRA name or hub id (letters, digits, - _ . only, owner/name for the hub; paths are not accepted)")))
    }
}

/// Letters, digits, `-`, `_` and `.`, not starting with a dot, at most 96 characters.
fn is_plain_name(p: &str) -> bool {
    !p.is_empty() && p.len() <= 96 && !p.starts_with('.') && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// A name of a registry folder's entry (never a path or a hub id); `param` names the field.
pub(crate) fn check_registry_name(param: &str, name: &str) -> Result<(), ApiError> {
    if is_plain_name(name) {
        Ok(())
    } else {
        Err(ApiError::invalid(param, format!("`{name}` is not a registry name (letters, digits, - _ . only; paths are not accepted)")))
    }
}

/// Whether a checked name is a hub id rather than a registry entry.
pub fn is_hub_id(name: &str) -> bool {
    name.contains('/')
}

/// Where a LoRA name points.
#[derive(Debug, Clone, PartialEq)]
pub enum LoraSource {
    /// A file in the registry folder.
    File(PathBuf),
    /// A hub repo id, fetched into the hub cache by the worker.
    Hub(String),
}

/// The configured LoRA folder (`NAME.safetensors` files are the names requests may use), and
/// whether hub ids (`owner/name`) are allowed too.
#[derive(Debug, Clone, Default)]
pub struct LoraRegistry {
    dir: Option<PathBuf>,
    hub: bool,
}

impl LoraRegistry {
    /// A registry over `dir` (none: requests with LoRAs are refused).
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self { dir, hub: false }
    }

    /// Also accept hub ids (`owner/name`), fetched into the hub cache when first used.
    pub fn with_hub(mut self, hub: bool) -> Self {
        self.hub = hub;
        self
    }

    /// Where `name` points: a registry file (400 for a path-like name, 404 for an unknown one)
    /// or, when allowed, a hub id (whether it exists is known only once it is fetched).
    pub fn source(&self, name: &str) -> Result<LoraSource, ApiError> {
        check_name(name)?;
        if is_hub_id(name) {
            return if self.hub {
                Ok(LoraSource::Hub(name.to_string()))
            } else {
                Err(ApiError::invalid("loras", format!("`{name}` is a hub id; this server takes LoRAs from its registry only (start it with --lora-hub to allow hub ids)")))
            };
        }
        self.resolve(name).map(LoraSource::File)
    }

    /// The folder, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The names in the registry, sorted.
    pub fn names(&self) -> Vec<String> {
        let Some(dir) = &self.dir else { return vec![] };
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|rd| rd.filter_map(|e| e.ok()).filter_map(|e| e.file_name().to_str()?.strip_suffix(".safetensors").map(str::to_string)).collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    /// The file of a registry name: 400 for a path-like name or a hub id, 404 for an unknown one.
    pub fn resolve(&self, name: &str) -> Result<PathBuf, ApiError> {
        check_name(name)?;
        if is_hub_id(name) {
            return Err(ApiError::invalid("loras", format!("`{name}` is a hub id, not a registry name")));
        }
        let Some(dir) = &self.dir else {
            return Err(ApiError::invalid("loras", "this server has no LoRA registry (start it with --lora-dir)"));
        };
        let path = dir.join(format!("{name}.safetensors"));
        if path.is_file() {
            Ok(path)
        } else {
            let mut e = ApiError::not_found(format!("unknown LoRA `{name}`; the registry has: {}", self.names().join(", ")));
            e.body.param = Some("loras".into());
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_never_paths() {
        for bad in ["../secret", "/etc/passwd", "a/b/c", "a\\b", ".hidden", "", "x y", "owner/..", "./x"] {
            assert_eq!(check_name(bad).unwrap_err().status, 400, "{bad}");
        }
        check_name("brand-style_v2.1").unwrap();
        check_name("owner/brand-lora").unwrap();
        let reg = LoraRegistry::new(None);
        assert_eq!(reg.source("owner/brand-lora").unwrap_err().status, 400);
        assert_eq!(reg.with_hub(true).source("owner/brand-lora").unwrap(), LoraSource::Hub("owner/brand-lora".into()));
    }

    #[test]
    fn the_registry_resolves_names_inside_its_folder_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("brand.safetensors"), b"x").unwrap();
        let reg = LoraRegistry::new(Some(dir.path().to_path_buf()));
        assert_eq!(reg.resolve("brand").unwrap(), dir.path().join("brand.safetensors"));
        assert_eq!(reg.resolve("other").unwrap_err().status, 404);
        assert_eq!(reg.resolve("../brand").unwrap_err().status, 400);
        assert_eq!(LoraRegistry::new(None).resolve("brand").unwrap_err().status, 400);
        assert!(validate_loras(&[LoraRef { name: "brand".into(), scale: f64::INFINITY }]).is_err());
    }
}
