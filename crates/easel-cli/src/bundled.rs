//! easel-shapes, the small trained model compiled into the binary, so `easel generate` works
//! offline out of the box. On first use its files are written once to the data directory.

use std::path::PathBuf;

use anyhow::{Context, Result};

macro_rules! bundled_files {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/easel-shapes/", $path)) as &[u8])),*]
    };
}

/// (relative path, contents) of every file easel needs from the bundled model.
const FILES: &[(&str, &[u8])] = bundled_files!(
    "model_index.json",
    "easel.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
);

/// The name under which the bundled model is listed and served.
pub const NAME: &str = "easel-shapes";

/// FNV-1a over every file, so a changed model extracts to a new folder.
fn fingerprint() -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for (name, bytes) in FILES {
        for b in name.bytes().chain(bytes.iter().copied()) {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

/// easel's data directory: `$EASEL_DATA_DIR`, else the platform data dir, else `./.easel`.
pub fn data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("EASEL_DATA_DIR") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")));
    base.map(|b| b.join("easel")).unwrap_or_else(|| PathBuf::from(".easel"))
}

/// The bundled model's directory, written on first use.
pub fn model_dir() -> Result<PathBuf> {
    let dir = data_dir().join("models").join(format!("{NAME}-{:016x}", fingerprint()));
    if dir.join("model_index.json").exists() {
        return Ok(dir);
    }
    let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
    for (name, bytes) in FILES {
        let path = tmp.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    // Another process may have won the race; either copy is complete.
    if std::fs::rename(&tmp, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    Ok(dir)
}
