//! Helpers shared by the parity tests: fixture paths and error metrics.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use easel_engine::{Device, Tensor};

/// The repository's `fixtures/` folder.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// A reference file's tensors and its string metadata.
pub fn reference(name: &str) -> (HashMap<String, Tensor>, HashMap<String, String>) {
    let path = fixtures().join("reference").join(name);
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).expect("reference tensors");
    let bytes = std::fs::read(&path).expect("reference file");
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("reference metadata");
    (tensors, meta.metadata().clone().unwrap_or_default())
}

/// ||a - b|| / ||b||.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(candle_core::DType::F64).unwrap();
    let b = b.to_dtype(candle_core::DType::F64).unwrap();
    let diff = (&a - &b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
    let norm = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
    diff / norm.max(1e-12)
}

/// PSNR in dB of two images with values in [0, 1].
pub fn psnr(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(candle_core::DType::F64).unwrap();
    let b = b.to_dtype(candle_core::DType::F64).unwrap();
    let mse = (&a - &b).unwrap().sqr().unwrap().mean_all().unwrap().to_scalar::<f64>().unwrap();
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (1.0 / mse).log10()
    }
}
