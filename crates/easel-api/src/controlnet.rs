//! ControlNets on the wire: a request's `controlnets` (a registry name, a conditioning picture,
//! a scale and a start/end window each), checked and prepared at the gateway into what a job
//! carries ([`ControlNetSpec`]: the picture at the job's size, edge-detected when asked), and the
//! registry that turns names into folders. As with LoRAs, requests name entries of a configured
//! folder, never paths.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ApiError;

/// The most ControlNets one request may stack.
pub const MAX_CONTROLNETS: usize = 4;

/// One entry of a request's `controlnets`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlNetRef {
    /// A registry name (a ControlNet folder in the server's `--controlnet-dir`).
    pub name: String,
    /// The conditioning picture (an edge, depth or pose map, or a photo with `preprocess`),
    /// base64 or a `data:image/...;base64,` URL; resized to the output's size.
    pub image: String,
    /// diffusers' `controlnet_conditioning_scale` (default 1).
    #[serde(default)]
    pub scale: Option<f64>,
    /// diffusers' `control_guidance_start` and `control_guidance_end`: the fractions of the
    /// steps between which this ControlNet runs (default 0 and 1).
    #[serde(default)]
    pub start: Option<f64>,
    #[serde(default)]
    pub end: Option<f64>,
    /// Turn a photo into the control image first: `canny` (OpenCV's Canny, thresholds 100 and
    /// 200) or `canny:LOW:HIGH`; absent or `none`: the picture is the control image.
    #[serde(default)]
    pub preprocess: Option<String>,
    /// The control type of a Union FLUX ControlNet (diffusers' `control_mode`; InstantX's
    /// Union: 0 canny, 1 tile, 2 depth, 3 blur, 4 pose, 5 gray, 6 low quality).
    #[serde(default)]
    pub mode: Option<u32>,
}

/// A ControlNet as a job carries it: the registry name, the control image at the job's size
/// (PNG, base64), and its settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlNetSpec {
    pub name: String,
    pub png_base64: String,
    pub scale: f64,
    pub start: f64,
    pub end: f64,
    /// A Union FLUX ControlNet's control type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

impl ControlNetSpec {
    /// What decides the pixels besides the picture, and a short digest of the picture, for
    /// batch and cache keys.
    pub fn key(&self) -> String {
        format!("{}:{}", self.settings_key(), self.image_digest())
    }

    /// The settings alone (a batch shares them; each job keeps its picture). The mode is
    /// appended only when set, so keys without one stay as they were.
    pub fn settings_key(&self) -> String {
        let mode = self.mode.map(|m| format!(":m{m}")).unwrap_or_default();
        format!("{}:{}:{}:{}{mode}", self.name, self.scale, self.start, self.end)
    }

    /// A short digest of the control image.
    pub fn image_digest(&self) -> String {
        hex::encode(&Sha256::digest(self.png_base64.as_bytes())[..12])
    }
}

/// How a request's picture becomes the control image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Preprocess {
    None,
    Canny { low: f64, high: f64 },
}

impl Preprocess {
    /// `none`, `canny` or `canny:LOW:HIGH`.
    pub fn parse(text: Option<&str>) -> Result<Self, ApiError> {
        let bad = || ApiError::invalid("controlnets", format!("preprocess `{}` must be none, canny or canny:LOW:HIGH (thresholds 0 to 1000)", text.unwrap_or_default()));
        match text.map(str::trim) {
            None | Some("none") | Some("") => Ok(Self::None),
            Some("canny") => Ok(Self::Canny { low: 100.0, high: 200.0 }),
            Some(other) => {
                let rest = other.strip_prefix("canny:").ok_or_else(bad)?;
                let (low, high) = rest.split_once(':').ok_or_else(bad)?;
                let (low, high) = (low.parse::<f64>().map_err(|_| bad())?, high.parse::<f64>().map_err(|_| bad())?);
                if !(0.0..=1000.0).contains(&low) || !(0.0..=1000.0).contains(&high) {
                    return Err(bad());
                }
                Ok(Self::Canny { low, high })
            }
        }
    }

    /// The control image from a picture: edges as white on black in all three channels (as
    /// diffusers' canny examples stack them), or the picture itself. Run on the picture as
    /// given, before it is resized to the output, as diffusers' examples run `cv2.Canny` on the
    /// photo and the pipeline then resizes the edge map.
    pub fn apply(self, picture: crate::InputImage) -> crate::InputImage {
        match self {
            Self::None => picture,
            Self::Canny { low, high } => {
                let (w, h) = (picture.width() as usize, picture.height() as usize);
                let edges = crate::canny::canny(picture.rgb(), w, h, 3, low, high);
                let rgb = edges.iter().flat_map(|&v| [v, v, v]).collect();
                crate::InputImage::new(picture.width(), picture.height(), rgb).unwrap_or(picture)
            }
        }
    }
}

impl ControlNetRef {
    /// Checks the entry and prepares what the job carries from its decoded `picture`, at
    /// `width` x `height` (not whether the name exists: see [`ControlNetRegistry`]).
    pub fn to_spec(&self, picture: crate::InputImage, width: u32, height: u32) -> Result<ControlNetSpec, ApiError> {
        crate::lora::check_registry_name("controlnets", &self.name)?;
        let scale = self.scale.unwrap_or(1.0);
        if !scale.is_finite() || scale.abs() > 100.0 {
            return Err(ApiError::invalid("controlnets", format!("scale of ControlNet `{}` must be a finite number between -100 and 100", self.name)));
        }
        let (start, end) = (self.start.unwrap_or(0.0), self.end.unwrap_or(1.0));
        if !(0.0..=1.0).contains(&start) || !(0.0..=1.0).contains(&end) || start >= end {
            return Err(ApiError::invalid("controlnets", format!("start {start} and end {end} of ControlNet `{}` must be fractions of the steps with start < end", self.name)));
        }
        let preprocess = Preprocess::parse(self.preprocess.as_deref())?;
        let control = preprocess.apply(picture).resized(width, height);
        Ok(ControlNetSpec { name: self.name.clone(), png_base64: control.to_base64_png(), scale, start, end, mode: self.mode })
    }
}

/// What the gateway reads about a registry entry without loading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlNetInfo {
    pub family: ControlNetFamily,
    /// A Union ControlNet's number of control modes; `None` for others.
    pub modes: Option<u32>,
    /// Why easel cannot run it, when the registry entry says so without loading it (kinds of
    /// FLUX ControlNet the engine refuses); the gateway refuses requests naming it.
    pub unsupported: Option<String>,
}

impl ControlNetInfo {
    /// Why `mode` does not suit this ControlNet (`None`: it does): a Union net needs one in
    /// range, and other nets take none.
    pub fn mode_mismatch(&self, name: &str, mode: Option<u32>) -> Option<String> {
        match (self.modes, mode) {
            (Some(n), Some(m)) if m >= n => Some(format!("control mode {m} is out of range: the Union ControlNet `{name}` has modes 0 to {}", n.saturating_sub(1))),
            (Some(n), None) => Some(format!("ControlNet `{name}` is a Union ControlNet: give a `mode` (0 to {})", n.saturating_sub(1))),
            (None, Some(m)) => Some(format!("control mode {m} is for Union FLUX ControlNets, and `{name}` is not one")),
            _ => None,
        }
    }
}

/// The model family a ControlNet was trained for, read from its `config.json` without loading
/// it (the gateway checks a request against the model before queueing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControlNetFamily {
    /// Stable Diffusion 1.x/2.x.
    Sd,
    Sdxl,
    Flux,
}

impl ControlNetFamily {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Sd => "Stable Diffusion 1.x/2.x",
            Self::Sdxl => "SDXL",
            Self::Flux => "FLUX",
        }
    }
}

/// The configured ControlNet folder: a subfolder holding a `config.json` (the diffusers layout)
/// or a `NAME.safetensors` file (a community single file) is a name requests may use.
#[derive(Debug, Clone, Default)]
pub struct ControlNetRegistry {
    dir: Option<PathBuf>,
}

impl ControlNetRegistry {
    /// A registry over `dir` (none: requests with ControlNets are refused).
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self { dir }
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The names in the registry, sorted.
    pub fn names(&self) -> Vec<String> {
        let Some(dir) = &self.dir else { return vec![] };
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let name = e.file_name().to_str()?.to_string();
                        if e.path().join("config.json").is_file() {
                            Some(name)
                        } else {
                            name.strip_suffix(".safetensors").filter(|_| e.path().is_file()).map(str::to_string)
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// The folder or file of a registry name: 400 for a path-like name or without a registry,
    /// 404 for an unknown one.
    pub fn resolve(&self, name: &str) -> Result<PathBuf, ApiError> {
        crate::lora::check_registry_name("controlnets", name)?;
        let Some(dir) = &self.dir else {
            return Err(ApiError::invalid("controlnets", "this server has no ControlNet registry (start it with --controlnet-dir)"));
        };
        let (folder, file) = (dir.join(name), dir.join(format!("{name}.safetensors")));
        if folder.join("config.json").is_file() {
            Ok(folder)
        } else if file.is_file() {
            Ok(file)
        } else {
            let mut e = ApiError::not_found(format!("unknown ControlNet `{name}`; the registry has: {}", self.names().join(", ")));
            e.body.param = Some("controlnets".into());
            Err(e)
        }
    }

    /// A registry entry's family, read from a folder's `config.json` (`_class_name`, SDXL's
    /// `text_time` embedding) or from a single file's tensor names (SDXL's
    /// `label_emb`/`add_embedding`; FLUX's `controlnet_x_embedder`, XLabs' `double_blocks`);
    /// for a Union FLUX ControlNet, how many control modes it has (`num_mode`); and why easel
    /// cannot run it, for the FLUX kinds the engine refuses.
    pub fn info(&self, name: &str) -> Result<ControlNetInfo, ApiError> {
        let path = self.resolve(name)?;
        let unreadable = |e: &dyn std::fmt::Display| ApiError::internal(format!("ControlNet `{name}` ({}): {e}", path.display()));
        if path.is_file() {
            let shapes = crate::safetensors_header::read(&path).map_err(|e| unreadable(&e))?;
            let names: Vec<&str> = shapes.keys().map(String::as_str).collect();
            // The names the engine keys on too (InstantX's diffusers names, XLabs' BFL ones).
            const FLUX_NAMES: [&str; 4] = ["controlnet_x_embedder.weight", "controlnet_single_blocks.0.weight", "pos_embed_input.weight", "double_blocks.0.img_attn.qkv.weight"];
            let family = if names.iter().any(|n| FLUX_NAMES.contains(n)) {
                ControlNetFamily::Flux
            } else if names.iter().any(|n| n.ends_with("label_emb.0.0.weight") || *n == "add_embedding.linear_1.weight") {
                ControlNetFamily::Sdxl
            } else {
                ControlNetFamily::Sd
            };
            let modes = shapes.get("controlnet_mode_embedder.weight").and_then(|s| s.first()).map(|&m| m as u32).filter(|_| family == ControlNetFamily::Flux);
            let xlabs = names.iter().any(|n| *n == "pos_embed_input.weight" || n.starts_with("input_hint_block."));
            let unsupported = xlabs.then(|| format!("ControlNet `{name}` is an XLabs-style FLUX ControlNet (a pixel hint block), which easel does not run yet"));
            return Ok(ControlNetInfo { family, modes, unsupported });
        }
        let config_path = path.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| unreadable(&e))?;
        let config: serde_json::Value = serde_json::from_str(&text).map_err(|e| unreadable(&e))?;
        let class = config.get("_class_name").and_then(|c| c.as_str()).unwrap_or("ControlNetModel");
        let family = if class.starts_with("Flux") {
            ControlNetFamily::Flux
        } else if config.get("addition_embed_type").and_then(|t| t.as_str()) == Some("text_time") {
            ControlNetFamily::Sdxl
        } else {
            ControlNetFamily::Sd
        };
        let modes = config.get("num_mode").and_then(|m| m.as_u64()).map(|m| m as u32).filter(|_| family == ControlNetFamily::Flux);
        let unsupported = if family != ControlNetFamily::Flux {
            None
        } else if class != "FluxControlNetModel" {
            Some(format!("ControlNet `{name}` is a `{class}`; a FLUX ControlNet folder holds one FluxControlNetModel"))
        } else if config.get("conditioning_embedding_channels").is_some_and(|c| !c.is_null()) {
            Some(format!("ControlNet `{name}` reads pixels through its own convolutions (conditioning_embedding_channels, XLabs style), which easel does not run yet"))
        } else {
            None
        };
        Ok(ControlNetInfo { family, modes, unsupported })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocess_parses_canny_with_and_without_thresholds() {
        assert_eq!(Preprocess::parse(None).unwrap(), Preprocess::None);
        assert_eq!(Preprocess::parse(Some("canny")).unwrap(), Preprocess::Canny { low: 100.0, high: 200.0 });
        assert_eq!(Preprocess::parse(Some("canny:50:150")).unwrap(), Preprocess::Canny { low: 50.0, high: 150.0 });
        for bad in ["depth", "canny:50", "canny:a:b", "canny:-1:5"] {
            assert_eq!(Preprocess::parse(Some(bad)).unwrap_err().body.param.as_deref(), Some("controlnets"), "{bad}");
        }
    }

    #[test]
    fn registry_names_folders_with_a_config_and_single_files_and_refuses_others() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("canny-xl")).unwrap();
        std::fs::write(dir.path().join("canny-xl/config.json"), r#"{"_class_name": "ControlNetModel", "addition_embed_type": "text_time"}"#).unwrap();
        std::fs::create_dir_all(dir.path().join("empty")).unwrap();
        let header = br#"{"control_model.time_embed.0.weight":{"dtype":"F16","shape":[1],"data_offsets":[0,2]}}"#;
        let file = [&(header.len() as u64).to_le_bytes()[..], header, &[0, 0]].concat();
        std::fs::write(dir.path().join("canny-sd15.safetensors"), file).unwrap();
        std::fs::create_dir_all(dir.path().join("union-flux")).unwrap();
        std::fs::write(dir.path().join("union-flux/config.json"), r#"{"_class_name": "FluxControlNetModel", "num_mode": 10}"#).unwrap();
        let header = br#"{"controlnet_x_embedder.weight":{"dtype":"F16","shape":[1],"data_offsets":[0,2]},"controlnet_mode_embedder.weight":{"dtype":"F16","shape":[1],"data_offsets":[0,2]}}"#;
        let file = [&(header.len() as u64).to_le_bytes()[..], header, &[0, 0]].concat();
        std::fs::write(dir.path().join("flux-file.safetensors"), file).unwrap();
        let reg = ControlNetRegistry::new(Some(dir.path().to_path_buf()));
        assert_eq!(reg.names(), vec!["canny-sd15".to_string(), "canny-xl".to_string(), "flux-file".to_string(), "union-flux".to_string()]);
        assert_eq!(reg.info("union-flux").unwrap(), ControlNetInfo { family: ControlNetFamily::Flux, modes: Some(10), unsupported: None });
        assert!(reg.info("union-flux").unwrap().mode_mismatch("union-flux", None).unwrap().contains("0 to 9"));
        assert!(reg.info("union-flux").unwrap().mode_mismatch("union-flux", Some(10)).unwrap().contains("out of range"));
        assert_eq!(reg.info("union-flux").unwrap().mode_mismatch("union-flux", Some(3)), None);
        assert!(reg.info("canny-xl").unwrap().mode_mismatch("canny-xl", Some(0)).unwrap().contains("not one"));
        assert_eq!(reg.info("flux-file").unwrap(), ControlNetInfo { family: ControlNetFamily::Flux, modes: Some(1), unsupported: None });
        std::fs::create_dir_all(dir.path().join("xlabs-style")).unwrap();
        std::fs::write(dir.path().join("xlabs-style/config.json"), r#"{"_class_name": "FluxControlNetModel", "conditioning_embedding_channels": 16}"#).unwrap();
        assert!(reg.info("xlabs-style").unwrap().unsupported.unwrap().contains("conditioning_embedding_channels"));
        let header = br#"{"pos_embed_input.weight":{"dtype":"F16","shape":[1],"data_offsets":[0,2]}}"#;
        let file = [&(header.len() as u64).to_le_bytes()[..], header, &[0, 0]].concat();
        std::fs::write(dir.path().join("xlabs.safetensors"), file).unwrap();
        assert!(reg.info("xlabs").unwrap().unsupported.unwrap().contains("XLabs"));
        assert_eq!(reg.info("canny-xl").unwrap().family, ControlNetFamily::Sdxl);
        assert_eq!(reg.info("canny-sd15").unwrap().family, ControlNetFamily::Sd);
        assert!(reg.resolve("canny-sd15").unwrap().is_file());
        assert_eq!(reg.resolve("empty").unwrap_err().status, 404);
        assert_eq!(reg.resolve("../etc").unwrap_err().status, 400);
        assert_eq!(ControlNetRegistry::new(None).resolve("canny").unwrap_err().status, 400);
    }
}
