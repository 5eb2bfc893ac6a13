//! Helpers shared by the parity tests: fixture paths and error metrics.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use easel_engine::Tensor;

/// The repository's `fixtures/` folder.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// A reference file's tensors and its string metadata.
pub fn reference(name: &str) -> (HashMap<String, Tensor>, HashMap<String, String>) {
    let r = easel_engine::parity::Reference::load(&fixtures().join("reference").join(name)).expect("reference file");
    (r.tensors, r.meta)
}

/// ||a - b|| / ||b||.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    easel_engine::parity::rel_l2(a, b).unwrap()
}

/// PSNR in dB of two images with values in [0, 1].
pub fn psnr(a: &Tensor, b: &Tensor) -> f64 {
    easel_engine::parity::psnr(a, b).unwrap()
}
