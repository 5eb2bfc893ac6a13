//! IP-Adapters on the wire: a request's `ip_adapter` (a registry name, a reference picture and
//! a scale), checked at the gateway into what a job carries ([`IpAdapterSpec`]: the picture as
//! given, re-encoded as PNG, since the engine resizes it exactly as CLIP's processor does), and
//! the registry that turns names into files. As with LoRAs and ControlNets, requests name
//! entries of a configured folder, never paths.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ApiError;

/// A request's `ip_adapter`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpAdapterRef {
    /// A registry name (an adapter file in the server's `--ip-adapter-dir`).
    pub name: String,
    /// The reference picture, base64 or a `data:image/...;base64,` URL.
    pub image: String,
    /// How strongly the picture steers the image (diffusers' `set_ip_adapter_scale`, default 1;
    /// 0 turns it off, 0.5 is a common blend with the prompt).
    #[serde(default)]
    pub scale: Option<f64>,
}

/// An IP-Adapter as a job carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IpAdapterSpec {
    pub name: String,
    /// The reference picture at its own size (PNG, base64).
    pub png_base64: String,
    pub scale: f64,
}

impl IpAdapterSpec {
    /// The adapter and scale (what batched jobs must share).
    pub fn batch_key(&self) -> String {
        format!("{}:{}", self.name, self.scale)
    }

    /// [`Self::batch_key`] and a digest of the picture, for cache keys.
    pub fn key(&self) -> String {
        format!("{}:{}", self.batch_key(), self.image_digest())
    }

    /// A short digest of the reference picture.
    pub fn image_digest(&self) -> String {
        hex::encode(&Sha256::digest(self.png_base64.as_bytes())[..12])
    }
}

impl IpAdapterRef {
    /// Checks the entry and prepares what the job carries (not whether the name exists: see
    /// [`IpAdapterRegistry`]).
    pub fn to_spec(&self) -> Result<IpAdapterSpec, ApiError> {
        crate::lora::check_registry_name("ip_adapter", &self.name)?;
        let scale = self.scale.unwrap_or(1.0);
        if !scale.is_finite() || scale.abs() > 100.0 {
            return Err(ApiError::invalid("ip_adapter", format!("scale of IP-Adapter `{}` must be a finite number between -100 and 100", self.name)));
        }
        let picture = crate::decode_base64_image("ip_adapter", &self.image)?;
        Ok(IpAdapterSpec { name: self.name.clone(), png_base64: picture.to_base64_png(), scale })
    }
}

/// What an adapter must match in a model's UNet: the text states' width (its image tokens'),
/// and the number of cross-attention layers (one key/value pair each). An SDXL adapter on an
/// SD 1.5 model differs in both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpAdapterFit {
    pub text_width: usize,
    pub layers: usize,
}

impl std::fmt::Display for IpAdapterFit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} cross-attention layers over {}-wide text states", self.layers, self.text_width)
    }
}

/// The configured IP-Adapter folder: every `NAME.safetensors` in it, or in a folder directly
/// below it (h94/IP-Adapter's `models/` and `sdxl_models/`), is a name requests may use. Each
/// adapter's image encoder is found beside it (see the engine's `IpAdapter::load`).
#[derive(Debug, Clone, Default)]
pub struct IpAdapterRegistry {
    dir: Option<PathBuf>,
}

impl IpAdapterRegistry {
    /// A registry over `dir` (none: requests with an IP-Adapter are refused).
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self { dir }
    }

    fn files(&self) -> Vec<PathBuf> {
        let Some(dir) = &self.dir else { return vec![] };
        let list = |d: &Path| -> Vec<PathBuf> { std::fs::read_dir(d).map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect()).unwrap_or_default() };
        let mut files = vec![];
        for entry in list(dir) {
            if entry.is_dir() {
                files.extend(list(&entry).into_iter().filter(|p| is_adapter_file(p)));
            } else if is_adapter_file(&entry) {
                files.push(entry);
            }
        }
        files.sort();
        files
    }

    /// The names in the registry, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.files().iter().filter_map(|p| p.file_stem()?.to_str().map(str::to_string)).collect();
        names.sort();
        names.dedup();
        names
    }

    /// The file of a registry name: 400 for a path-like name or without a registry, 404 for an
    /// unknown one.
    pub fn resolve(&self, name: &str) -> Result<PathBuf, ApiError> {
        crate::lora::check_registry_name("ip_adapter", name)?;
        if self.dir.is_none() {
            return Err(ApiError::invalid("ip_adapter", "this server has no IP-Adapter registry (start it with --ip-adapter-dir)"));
        }
        match self.files().into_iter().find(|p| p.file_stem().and_then(|s| s.to_str()) == Some(name)) {
            Some(path) => Ok(path),
            None => {
                let mut e = ApiError::not_found(format!("unknown IP-Adapter `{name}`; the registry has: {}", self.names().join(", ")));
                e.body.param = Some("ip_adapter".into());
                Err(e)
            }
        }
    }
}

impl IpAdapterRegistry {
    /// What a registry entry fits, read off its file's header: the width of its image tokens
    /// (`image_proj.norm` of a plain adapter, `image_proj.norm_out` of Plus) and its
    /// `ip_adapter.N.to_k_ip` layers.
    pub fn fit(&self, name: &str) -> Result<IpAdapterFit, ApiError> {
        let path = self.resolve(name)?;
        let shapes = crate::safetensors_header::read(&path).map_err(|e| ApiError::internal(format!("IP-Adapter `{name}` ({}): {e}", path.display())))?;
        let width = ["image_proj.norm.weight", "image_proj.norm_out.weight"].iter().find_map(|k| shapes.get(*k)?.first().copied());
        let layers = shapes.keys().filter(|k| k.starts_with("ip_adapter.") && k.ends_with(".to_k_ip.weight")).count();
        match width {
            Some(text_width) if layers > 0 => Ok(IpAdapterFit { text_width, layers }),
            _ => Err(ApiError::invalid("ip_adapter", format!("`{name}` is not a plain or Plus IP-Adapter (no image_proj.norm or ip_adapter.N.to_k_ip tensors)"))),
        }
    }
}

fn is_adapter_file(path: &Path) -> bool {
    path.is_file() && path.extension().and_then(|e| e.to_str()) == Some("safetensors")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_names_adapter_files_at_the_top_and_one_folder_down_and_refuses_others() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sdxl_models/image_encoder")).unwrap();
        std::fs::write(dir.path().join("sdxl_models/ip-adapter_sdxl.safetensors"), b"x").unwrap();
        std::fs::write(dir.path().join("sdxl_models/image_encoder/model.safetensors"), b"x").unwrap();
        std::fs::write(dir.path().join("ip-adapter_sd15.safetensors"), b"x").unwrap();
        std::fs::write(dir.path().join("ip-adapter_sd15.bin"), b"x").unwrap();
        let reg = IpAdapterRegistry::new(Some(dir.path().to_path_buf()));
        assert_eq!(reg.names(), vec!["ip-adapter_sd15".to_string(), "ip-adapter_sdxl".to_string()]);
        assert!(reg.resolve("ip-adapter_sdxl").unwrap().ends_with("sdxl_models/ip-adapter_sdxl.safetensors"));
        assert_eq!(reg.resolve("model").unwrap_err().status, 404);
        assert_eq!(reg.resolve("../x").unwrap_err().status, 400);
        assert_eq!(IpAdapterRegistry::new(None).resolve("a").unwrap_err().status, 400);
    }

    #[test]
    fn a_bad_scale_or_picture_is_refused_naming_ip_adapter() {
        let bad = IpAdapterRef { name: "a".into(), image: "not base64!".into(), scale: None };
        assert_eq!(bad.to_spec().unwrap_err().body.param.as_deref(), Some("ip_adapter"));
        let bad = IpAdapterRef { name: "a".into(), image: String::new(), scale: Some(f64::NAN) };
        assert_eq!(bad.to_spec().unwrap_err().body.param.as_deref(), Some("ip_adapter"));
    }
}
