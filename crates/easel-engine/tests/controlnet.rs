//! ControlNets against diffusers' StableDiffusionControlNetPipeline and
//! StableDiffusionXLControlNetPipeline on the tiny pipelines, with tiny ControlNets made by
//! `ControlNetModel.from_unet` (tools/fixtures/make_controlnet_fixtures.py). From the same init
//! latents and conditioning images easel must give diffusers' final latents. The cases vary what
//! changes the arithmetic: SD 1.x and SDXL (its `text_time` embedding in the ControlNet too), one
//! ControlNet and two summed (with different images, scales and start/end windows), guided and
//! unguided, two images per prompt, wide and tall images, and image-to-image and inpainting
//! (StableDiffusion(XL)ControlNetImg2ImgPipeline and ...InpaintPipeline, references from
//! make_img2img_fixtures.py with diffusers' noise replayed). Each case also runs without its ControlNets, to show the
//! residuals move the output far more than the bound.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::fixtures;
use easel_engine::parity::{psnr, rel_l2, Reference};
use easel_engine::{ControlNet, ControlUnit, DType, Device, GenerateParams, LoadOptions, Pipeline};

/// Relative L2 bound on the final latents: the largest error measured over these cases (9.0e-7;
/// 4.9e-7 to 9.0e-7, printed by each) times fewer than 10.
const LATENTS_BOUND: f64 = 8e-6;
/// Decoded images must agree to at least this PSNR: the lowest measured (129.4 dB) less 9 dB.
const IMAGE_PSNR_DB: f64 = 120.0;

#[derive(serde::Deserialize)]
struct UnitMeta {
    path: String,
    scale: f64,
    start: f64,
    end: f64,
    image: String,
}

fn load_net(path: &str) -> Arc<ControlNet> {
    Arc::new(ControlNet::load(&fixtures().join(path), None, DType::F32, &Device::Cpu).expect("load the ControlNet"))
}

/// The reference's request with its ControlNets (a ControlNet named twice is loaded once).
fn params(reference: &Reference) -> GenerateParams {
    let mut params = reference.params().expect("reference request");
    let units: Vec<UnitMeta> = serde_json::from_str(&reference.meta["controlnets"]).expect("controlnets metadata");
    let mut nets: HashMap<String, Arc<ControlNet>> = HashMap::new();
    for u in units {
        let net = nets.entry(u.path.clone()).or_insert_with(|| load_net(&u.path)).clone();
        let image = (reference.tensor(&u.image).unwrap().to_dtype(DType::F32).unwrap() / 255.0).unwrap();
        params.controlnets.push(ControlUnit { net, image, scale: u.scale, start: u.start, end: u.end });
    }
    params
}

fn check(case: &str) {
    let reference = Reference::load(&fixtures().join("reference").join(format!("{case}.safetensors"))).expect("reference");
    let pipe = Pipeline::load(&fixtures().join("pipelines").join(&reference.meta["pipeline"]), &LoadOptions::default()).expect("load");
    let mut params = params(&reference);
    let want = reference.tensor("latents").unwrap();
    let out = reference.generate(&pipe, &params).expect("generate");
    let (err, db) = (rel_l2(&out.latents, want).unwrap(), psnr(&out.decoded, reference.tensor("image").unwrap()).unwrap());
    params.controlnets.clear();
    let without = reference.generate(&pipe, &params).expect("generate without ControlNets");
    let moved = rel_l2(&without.latents, want).unwrap();
    println!("{case}: latents rel L2 {err:.2e}, image PSNR {db:.1} dB; without its ControlNets {moved:.2e}");
    assert!(err < LATENTS_BOUND && db >= IMAGE_PSNR_DB, "{case} differs from diffusers: rel L2 {err:.2e}, PSNR {db:.1} dB");
    assert!(moved > 1000.0 * LATENTS_BOUND, "{case}: the ControlNets barely change the output ({moved:.2e})");
}

#[test]
fn sd15_controlnet_on_a_wide_image_matches_diffusers() {
    check("sd15-var-tiny-controlnet-euler");
}

#[test]
fn sd15_two_controlnets_with_their_own_windows_and_two_images_per_prompt_match_diffusers() {
    check("sd15-var-tiny-two-controlnets-dpmpp-2m-batch");
}

#[test]
fn sdxl_controlnet_inside_a_start_end_window_on_a_tall_image_matches_diffusers() {
    check("sdxl-var-tiny-controlnet-window-euler");
}

#[test]
fn sdxl_two_controlnets_without_guidance_match_diffusers() {
    check("sdxl-var-tiny-two-controlnets-unguided");
}

/// Image-to-image runs 6 of 8 steps here, and the window 0.2-0.8 counts those 6 (diffusers'
/// `controlnet_keep` over the truncated schedule): the ControlNet runs on the 3rd and 4th.
#[test]
fn sd15_controlnet_on_image_to_image_with_its_window_over_the_steps_that_run_matches_diffusers() {
    check("sd15-var-tiny-controlnet-img2img-euler-a");
}

/// 3 of 6 steps run and the window is 0-0.5, so the ControlNet runs on the first of them only;
/// counting all 6 steps it would never run.
#[test]
fn sdxl_controlnet_on_image_to_image_two_images_per_prompt_matches_diffusers() {
    check("sdxl-var-tiny-controlnet-img2img-dpmpp-2m-batch");
}

#[test]
fn sd15_controlnet_with_inpainting_by_latent_blending_matches_diffusers() {
    check("sd15-var-tiny-controlnet-inpaint-euler");
}

#[test]
fn sdxl_controlnet_with_inpainting_from_pure_noise_inside_a_window_matches_diffusers() {
    check("sdxl-var-tiny-controlnet-inpaint-ddim-full");
}

fn error_text(pipe: &Pipeline, params: &GenerateParams) -> String {
    match pipe.generate(params, None, &mut |_| true) {
        Ok(_) => panic!("the request was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn an_sdxl_controlnet_on_an_sd15_model_is_refused_naming_both_families() {
    let reference = Reference::load(&fixtures().join("reference/sd15-var-tiny-controlnet-euler.safetensors")).unwrap();
    let pipe = Pipeline::load(&fixtures().join("pipelines/sd15-var-tiny"), &LoadOptions::default()).unwrap();
    let mut p = params(&reference);
    p.controlnets[0].net = load_net("controlnets/sdxl-var-tiny");
    let text = error_text(&pipe, &p);
    assert!(text.contains("controlnets") && text.contains("is for SDXL") && text.contains("this model is Stable Diffusion 1.x/2.x"), "{text}");
}

#[test]
fn a_control_image_of_another_size_or_a_bad_window_is_refused_naming_controlnets() {
    let reference = Reference::load(&fixtures().join("reference/sd15-var-tiny-controlnet-euler.safetensors")).unwrap();
    let pipe = Pipeline::load(&fixtures().join("pipelines/sd15-var-tiny"), &LoadOptions::default()).unwrap();
    let mut p = params(&reference);
    p.controlnets[0].image = p.controlnets[0].image.narrow(3, 0, 32).unwrap();
    let text = error_text(&pipe, &p);
    assert!(text.contains("controlnets") && text.contains("[1, 3, 32, 96]"), "{text}");
    let mut p = params(&reference);
    (p.controlnets[0].start, p.controlnets[0].end) = (0.7, 0.2);
    let text = error_text(&pipe, &p);
    assert!(text.contains("controlnets") && text.contains("start < end"), "{text}");
}

/// ControlNets take the latents alone, so an inpainting UNet's 9-channel input does not fit
/// one made for the 4-channel UNet.
#[test]
fn a_controlnet_on_a_9_channel_inpainting_unet_is_refused_naming_controlnets() {
    let reference = Reference::load(&fixtures().join("reference/sd15-var-tiny-controlnet-inpaint-euler.safetensors")).unwrap();
    let pipe = Pipeline::load(&fixtures().join("pipelines/sd15-var-inpaint-tiny"), &LoadOptions::default()).unwrap();
    let text = error_text(&pipe, &params(&reference));
    assert!(text.contains("controlnets") && text.contains("in_channels"), "{text}");
}

#[test]
fn a_controlnet_with_a_step_cache_is_refused_naming_cache() {
    let reference = Reference::load(&fixtures().join("reference/sd15-var-tiny-controlnet-euler.safetensors")).unwrap();
    let pipe = Pipeline::load(&fixtures().join("pipelines/sd15-var-tiny"), &LoadOptions::default()).unwrap();
    let mut p = params(&reference);
    p.step_cache = Some(easel_engine::StepCache::DeepCache { interval: 2 });
    let text = error_text(&pipe, &p);
    assert!(text.contains("cache") && text.contains("ControlNet"), "{text}");
}

/// A ControlNet published as one file in the original LDM names (written by the fixture tool and
/// checked there to load back equal through diffusers' `from_single_file`), its architecture
/// taken from the model's UNet: exactly the output of the same ControlNet from its diffusers
/// folder, so diffusers' output too.
#[test]
fn an_ldm_single_file_controlnet_gives_exactly_its_diffusers_folders_output() {
    let reference = Reference::load(&fixtures().join("reference/sd15-var-tiny-controlnet-euler.safetensors")).unwrap();
    let pipe = Pipeline::load(&fixtures().join("pipelines/sd15-var-tiny"), &LoadOptions::default()).unwrap();
    let mut p = params(&reference);
    let folder = pipe.generate(&p, None, &mut |_| true).unwrap();
    let file = fixtures().join("controlnets/sd15-var-tiny-ldm.safetensors");
    p.controlnets[0].net = Arc::new(ControlNet::load(&file, pipe.unet_config(), DType::F32, &Device::Cpu).expect("load the single file"));
    let single = pipe.generate(&p, None, &mut |_| true).unwrap();
    let diff = (&single.latents - &folder.latents).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(diff, 0.0, "the single file's output differs from the folder's by {diff}");
    let err = rel_l2(&single.latents, reference.tensor("latents").unwrap()).unwrap();
    assert!(err < LATENTS_BOUND, "{err:.2e}");
    let no_host = ControlNet::load(&file, None, DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(no_host.contains("architecture from the model"), "{no_host}");
}

/// Two requests with the same ControlNet but their own control images (and seeds) in one batch,
/// as the server batches them: each gets the image it gets alone.
#[test]
fn batched_requests_with_their_own_control_images_equal_their_solo_runs() {
    let reference = Reference::load(&fixtures().join("reference/sd15-var-tiny-controlnet-euler.safetensors")).unwrap();
    let pipe = Pipeline::load(&fixtures().join("pipelines/sd15-var-tiny"), &LoadOptions::default()).unwrap();
    let a = params(&reference);
    let mut b = a.clone();
    b.controlnets[0].image = (1.0 - &a.controlnets[0].image).unwrap();
    b.prompt = "a yellow triangle".into();
    let solo: Vec<_> = [&a, &b].iter().map(|p| pipe.generate(p, None, &mut |_| true).unwrap()).collect();
    let batched = pipe.generate_batch(&[a, b], None, &mut |_| true).unwrap();
    for (i, (s, t)) in solo.iter().zip(&batched).enumerate() {
        let err = rel_l2(&t.latents, &s.latents).unwrap();
        println!("request {i}: batched against solo, rel L2 {err:.2e}");
        assert!(err < 1e-6, "request {i}: batched differs from solo by {err:.2e}");
    }
    assert!(rel_l2(&solo[0].latents, &solo[1].latents).unwrap() > 1e-2, "the two requests gave the same image");
}
