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

/// Copies a folder tree (a model, to change a file of it).
pub fn copy_dir(src: &std::path::Path, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}
