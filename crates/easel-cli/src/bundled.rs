//! The small trained model that ships with easel, so it works offline out of the box.

use std::path::PathBuf;

use anyhow::{bail, Result};

/// Where the bundled model lives in the source tree.
const SOURCE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/easel-shapes");

/// The bundled model's directory.
pub fn model_dir() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("EASEL_BUNDLED_MODEL") {
        return Ok(PathBuf::from(dir));
    }
    let dir = PathBuf::from(SOURCE_DIR);
    if dir.join("model_index.json").exists() {
        return Ok(dir);
    }
    bail!("the bundled model is not at {}; pass --model DIR_OR_HUB_ID", dir.display())
}
