//! End-to-end parity with diffusers: the same tiny pipelines, the same init latents (and,
//! for ancestral sampling, the same recorded noise) must give the same final latents and
//! decoded images, for every scheduler. Measured on the 2026-11-30 fixtures: DDIM at most
//! 4.2e-5 and 101.9 dB (sd15-tiny, whose schedule amplifies rounding most; bound 4e-4, 90 dB);
//! every other case at most 2.3e-6 and at least 125 dB (bound 2e-5, 110 dB).

mod common;

use common::{fixtures, psnr, reference, rel_l2};
use easel_engine::scheduler::ReplayNoise;
use easel_engine::{GenerateParams, LoadOptions, SchedulerKind, StableDiffusionPipeline};

fn check_pipeline(name: &str) {
    let pipe = StableDiffusionPipeline::load(&fixtures().join("pipelines").join(name), &LoadOptions::default()).expect("load");
    let cases = ["euler", "euler-a", "ddim", "dpmpp-2m", "dpmpp-2m-karras", "euler-noguidance"];
    let mut failures = vec![];
    for case in cases {
        let (t, meta) = reference(&format!("{name}-{case}.safetensors"));
        let kind = SchedulerKind::parse(&meta["scheduler"]).unwrap();
        let params = GenerateParams {
            prompt: meta["prompt"].clone(),
            negative_prompt: Some(meta["negative_prompt"].clone()),
            width: meta["width"].parse().unwrap(),
            height: meta["height"].parse().unwrap(),
            steps: meta["steps"].parse().unwrap(),
            guidance: meta["guidance"].parse().unwrap(),
            seed: 0,
            batch: 1,
            scheduler: Some(kind),
            init_latents: Some(t["init_latents"].clone()),
            skip_layer_guidance: None,
            step_cache: None,
            controlnets: Vec::new(),
            ip_adapter: None,
            init_image: None,
        };
        let mut replay = t.get("noise").map(|n| ReplayNoise::new(n).unwrap());
        let out = pipe
            .generate(&params, replay.as_mut().map(|r| r as &mut dyn easel_engine::scheduler::NoiseSource), &mut |_| true)
            .expect("generate");
        let err = rel_l2(&out.latents, &t["latents"]);
        let db = psnr(&out.decoded, &t["image"]);
        println!("{name} {case}: latents rel L2 {err:.2e}, image PSNR {db:.1} dB");
        let (bound, min_db) = if case == "ddim" { (4e-4, 90.0) } else { (2e-5, 110.0) };
        if !(err < bound && db >= min_db) {
            failures.push(format!("{case}: rel L2 {err:.2e}, PSNR {db:.1}"));
        }
    }
    assert!(failures.is_empty(), "{name} differs from diffusers: {failures:?}");
}

#[test]
fn sd15_matches_diffusers_for_every_scheduler() {
    check_pipeline("sd15-tiny");
}

#[test]
fn sd21_v_prediction_matches_diffusers_for_every_scheduler() {
    check_pipeline("sd21v-tiny");
}

#[test]
fn sdxl_matches_diffusers_for_every_scheduler() {
    check_pipeline("sdxl-tiny");
}

/// SD 1.5 layout, every axis different from sd15-tiny: CLIP width 48 (2 layers, 3 heads), a
/// 3-level UNet with head widths 4 and 8, a 4-level VAE (factor 8), DDIM with trailing
/// spacing as the model's own scheduler, and a wide non-square image (96x32).
#[test]
fn sd15_variant_with_other_widths_depths_and_a_wide_image_matches_diffusers() {
    check_pipeline("sd15-var-tiny");
}

/// SDXL layout unlike sdxl-tiny: text encoders of widths 24 and 40 (projection 36), two
/// transformer layers in the last block, v-prediction, a 4-level VAE and a tall image (32x96).
#[test]
fn sdxl_variant_with_other_widths_v_prediction_and_a_tall_image_matches_diffusers() {
    check_pipeline("sdxl-var-tiny");
}

/// The bundled, trained model: diffusers (StableDiffusionPipeline.from_pretrained) and easel
/// produce the same images from the same init latents.
#[test]
fn bundled_model_matches_diffusers() {
    let dir = fixtures().join("../models/easel-shapes");
    let pipe = StableDiffusionPipeline::load(&dir, &LoadOptions::default()).expect("load bundled model");
    let (t, meta) = reference("easel-shapes.safetensors");
    let prompts: Vec<String> = serde_json::from_str(&meta["prompts"]).unwrap();
    for (i, prompt) in prompts.iter().enumerate() {
        let params = GenerateParams {
            prompt: prompt.clone(),
            negative_prompt: None,
            width: 64,
            height: 64,
            steps: meta["steps"].parse().unwrap(),
            guidance: meta["guidance"].parse().unwrap(),
            seed: 0,
            batch: 1,
            scheduler: Some(SchedulerKind::Euler),
            init_latents: Some(t["init_latents"].narrow(0, i, 1).unwrap()),
            skip_layer_guidance: None,
            step_cache: None,
            controlnets: Vec::new(),
            ip_adapter: None,
            init_image: None,
        };
        let out = pipe.generate(&params, None, &mut |_| true).unwrap();
        let err = rel_l2(&out.latents, &t["latents"].narrow(0, i, 1).unwrap());
        let db = psnr(&out.decoded, &t["image"].narrow(0, i, 1).unwrap());
        println!("easel-shapes `{prompt}`: latents rel L2 {err:.2e}, image PSNR {db:.1} dB");
        assert!(err < 1e-3 && db >= 70.0, "`{prompt}`: rel L2 {err:.2e}, PSNR {db:.1}");
    }
}
