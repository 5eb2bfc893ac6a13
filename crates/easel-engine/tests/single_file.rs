//! Single-file SD checkpoints (LDM names, fp16, as fine-tunes are published) against diffusers:
//! tools/fixtures/make_single_file_fixtures.py writes three (SD 1.x, SD 2.x with OpenCLIP, SDXL
//! with both encoders), proves each equal to its original pipeline by loading it back with
//! diffusers' `from_single_file`, and records that loader's output. easel runs the same file
//! through the config folder `single_file::prepare` writes, from the same init latents.
//! Measured 2026-11-30: final latents 9.1e-7 to 9.8e-7, images 131.1 to 135.6 dB (bounds 9e-6
//! and 112 dB, within 10x of the largest error).

mod common;

use common::fixtures;
use easel_engine::parity::Reference;
use easel_engine::weights::single_file::{self, LdmFamily};
use easel_engine::{EngineError, LoadOptions, Pipeline};

/// Loads `fixtures/single_file/{name}.safetensors` with its config folder, as `--model FILE
/// --config DIR` does.
fn load(name: &str, out: &std::path::Path) -> Pipeline {
    let dir = fixtures().join("single_file");
    let prepared = single_file::prepare(&dir.join(format!("{name}.safetensors")), &dir.join(name), out).expect("prepare");
    Pipeline::load(&prepared, &LoadOptions::default()).expect("load")
}

fn check(name: &str, family: LdmFamily) {
    let file = fixtures().join("single_file").join(format!("{name}.safetensors"));
    assert_eq!(single_file::inspect(&file).unwrap().family, family);
    let tmp = tempfile::tempdir().unwrap();
    let pipe = load(name, tmp.path());
    let reference = Reference::load(&fixtures().join("reference").join(format!("{name}-single-file.safetensors"))).unwrap();
    let a = reference.check(&pipe).unwrap();
    println!("{name}: latents rel L2 {:.2e}, image PSNR {:.1} dB", a.latents_rel_l2, a.image_psnr_db);
    assert!(a.latents_rel_l2 < 9e-6 && a.image_psnr_db > 112.0, "{name} differs from diffusers' from_single_file: {a:?}");
}

#[test]
fn sd1_single_file_with_clip_l_names_matches_diffusers_from_single_file() {
    check("sd1-mini", LdmFamily::Sd1);
}

#[test]
fn sd2_single_file_with_open_clip_names_and_v_prediction_matches_diffusers_from_single_file() {
    check("sd2-mini", LdmFamily::Sd2);
}

#[test]
fn sdxl_single_file_with_both_encoders_matches_diffusers_from_single_file() {
    check("sdxl-mini", LdmFamily::Sdxl);
}

#[test]
fn a_config_of_another_family_is_refused_naming_config() {
    let dir = fixtures().join("single_file");
    let tmp = tempfile::tempdir().unwrap();
    let err = single_file::prepare(&dir.join("sd1-mini.safetensors"), &dir.join("sdxl-mini"), tmp.path()).unwrap_err();
    assert!(matches!(&err, EngineError::InvalidParam { param: "config", .. }), "{err}");
    assert!(err.to_string().contains("StableDiffusionXLPipeline"), "{err}");
}

#[test]
fn transformer_files_and_diffusers_components_are_not_taken_for_sd_single_files() {
    for (file, hint) in [
        ("pipelines/flux-dev-tiny-bfl.safetensors", "--transformer"),
        // Stability's SD 3.5 file shares the UNet's `model.diffusion_model.` prefix.
        ("pipelines/sd35m-tiny-sai.safetensors", "--transformer"),
        ("pipelines/sd15-tiny/unet/diffusion_pytorch_model.safetensors", "no `model.diffusion_model.*`"),
    ] {
        let err = single_file::inspect(&fixtures().join(file)).unwrap_err().to_string();
        assert!(err.contains(hint), "{file}: {err}");
    }
}

#[test]
fn an_inpainting_unet_is_recognised_by_its_nine_input_channels() {
    use std::collections::HashMap;
    let shapes = |conv_in: usize| -> HashMap<String, Vec<usize>> {
        [
            ("model.diffusion_model.input_blocks.0.0.weight", vec![320, conv_in, 3, 3]),
            ("first_stage_model.decoder.conv_in.weight", vec![512, 4, 3, 3]),
            ("cond_stage_model.transformer.text_model.final_layer_norm.weight", vec![768]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    };
    let path = std::path::Path::new("x.safetensors");
    let plain = easel_engine::weights::keys::ldm::detect(path, &shapes(4)).unwrap();
    let inpainting = easel_engine::weights::keys::ldm::detect(path, &shapes(9)).unwrap();
    assert!(!plain.inpainting && inpainting.inpainting);
    assert_eq!(plain.reference_repo(), "stable-diffusion-v1-5/stable-diffusion-v1-5");
    assert_eq!(inpainting.reference_repo(), "stable-diffusion-v1-5/stable-diffusion-inpainting");
}
