//! The preview decoder (diffusers' `AutoencoderTiny` decoder: TAESD, TAEF1) against diffusers
//! on tiny random decoders (tools/fixtures/make_taesd_fixtures.py): an SD-like one (4 latent
//! channels, three upsamplings, no scaling) and a FLUX-like one (16 channels, taef1's scaling
//! and shift, two levels), on non-square latents.

mod common;

use common::{fixtures, rel_l2};
use easel_engine::models::autoencoder_tiny::TinyDecoder;
use easel_engine::preview::{Step, SD15};
use easel_engine::Device;

fn check(name: &str) -> f64 {
    let dir = fixtures().join("taesd").join(name);
    let decoder = TinyDecoder::load(&dir, &Device::Cpu).unwrap();
    let t = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let image = decoder.decode(&t["latents"]).unwrap();
    assert_eq!(image.dims(), t["image"].dims(), "{name}: shape");
    let max = (image - &t["image"]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap() as f64;
    let rel = rel_l2(&decoder.decode(&t["latents"]).unwrap(), &t["image"]);
    // Measured here: max |error| 1.9e-7 (taesd-tiny) and 7.8e-7 (taef1-tiny), relative L2
    // 3.6e-7 and 3.0e-7; the bounds are under 10x the larger.
    eprintln!("{name}: max |error| {max:.2e}, relative L2 {rel:.2e}");
    assert!(max < 5e-6 && rel < 3e-6, "{name}: max |error| {max:.2e}, relative L2 {rel:.2e}");
    max
}

#[test]
fn sd_like_tiny_autoencoder_decodes_as_diffusers_does() {
    check("taesd-tiny");
}

#[test]
fn flux_like_tiny_autoencoder_with_scaling_and_shift_decodes_as_diffusers_does() {
    check("taef1-tiny");
}

#[test]
fn a_step_preview_with_the_decoder_is_full_size() {
    let dir = fixtures().join("taesd").join("taesd-tiny");
    let decoder = TinyDecoder::load(&dir, &Device::Cpu).unwrap();
    let t = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let step = Step::new(1, 2, &t["latents"], &SD15);
    let p = step.preview_with(1, Some(&decoder)).unwrap();
    assert_eq!((p.width, p.height), (7 * 8, 5 * 8), "three 2x upsamplings of 5x7 latents");
    let linear = step.preview_with(1, None).unwrap();
    assert_eq!((linear.width, linear.height), (7, 5), "without a decoder: latent resolution");
    // The decoded preview is the decoder's image of that row, in bytes.
    let want = (t["image"].get(1).unwrap().permute((1, 2, 0)).unwrap() * 255.0).unwrap().round().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(p.rgb.iter().zip(&want).all(|(a, b)| (*a as f32 - b).abs() <= 1.0));
}
