//! ControlNets against diffusers' StableDiffusionControlNetPipeline and
//! StableDiffusionXLControlNetPipeline on the tiny pipelines, with tiny ControlNets made by
//! `ControlNetModel.from_unet` (tools/fixtures/make_controlnet_fixtures.py). From the same init
//! latents and conditioning images easel must give diffusers' final latents. The cases vary what
//! changes the arithmetic: SD 1.x and SDXL (its `text_time` embedding in the ControlNet too), one
//! ControlNet and two summed (with different images, scales and start/end windows), guided and
//! unguided, two images per prompt, wide and tall images, and image-to-image and inpainting
//! (StableDiffusion(XL)ControlNetImg2ImgPipeline and ...InpaintPipeline, references from
//! make_img2img_fixtures.py with diffusers' noise replayed). FLUX ControlNets are checked against
//! FluxControlNetPipeline (tools/fixtures/make_flux_controlnet_fixtures.py: plain and Union nets,
//! fewer blocks than the transformer, stacked, the control images' latent samples replayed).
//! Each case also runs without its ControlNets, to show the residuals move the output far more
//! than the bound.

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
    #[serde(default)]
    mode: Option<usize>,
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
        params.controlnets.push(ControlUnit { net, image, scale: u.scale, start: u.start, end: u.end, mode: u.mode });
    }
    params
}

fn check(case: &str) {
    check_within(case, LATENTS_BOUND, IMAGE_PSNR_DB);
}

fn check_within(case: &str, latents_bound: f64, image_psnr_db: f64) {
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
    assert!(err < latents_bound && db >= image_psnr_db, "{case} differs from diffusers: rel L2 {err:.2e}, PSNR {db:.1} dB");
    assert!(moved > 1000.0 * latents_bound, "{case}: the ControlNets barely change the output ({moved:.2e})");
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

/// A 9-channel inpainting UNet with the ControlNet made for its 4-channel base: the ControlNet
/// sees the scheduler-scaled latents alone, the UNet the latents, mask and masked picture, as
/// StableDiffusionControlNetInpaintPipeline runs them.
#[test]
fn sd15_controlnet_on_a_9_channel_inpainting_unet_matches_diffusers() {
    check("sd15-var-inpaint-tiny-controlnet-dpmpp-2m");
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
    p.controlnets[0].net = Arc::new(ControlNet::load(&file, pipe.controlnet_host(), DType::F32, &Device::Cpu).expect("load the single file"));
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
    assert_batched_equal_solo(&pipe, a, b);
}

/// `a` and `b` batched give what each gives alone, and differ from each other.
fn assert_batched_equal_solo(pipe: &Pipeline, a: GenerateParams, b: GenerateParams) {
    let solo: Vec<_> = [&a, &b].iter().map(|p| pipe.generate(p, None, &mut |_| true).unwrap()).collect();
    let batched = pipe.generate_batch(&[a, b], None, &mut |_| true).unwrap();
    for (i, (s, t)) in solo.iter().zip(&batched).enumerate() {
        let err = rel_l2(&t.latents, &s.latents).unwrap();
        println!("request {i}: batched against solo, rel L2 {err:.2e}");
        assert!(err < 1e-6, "request {i}: batched differs from solo by {err:.2e}");
    }
    assert!(rel_l2(&solo[0].latents, &solo[1].latents).unwrap() > 1e-2, "the two requests gave the same image");
}

/// FLUX bounds: FluxControlNetPipeline against easel measured 3.4e-7 to 2.3e-6 (latents) and
/// 122.0 to 134.1 dB (image) over the three cases below; the bounds are under 10x the largest
/// error and 10 dB under the lowest PSNR.
const FLUX_LATENTS_BOUND: f64 = 2e-5;
const FLUX_IMAGE_PSNR_DB: f64 = 112.0;

/// A ControlNet of one double block on a transformer of two: its residual is added after both
/// (diffusers' `ceil(blocks / residuals)` blocks per residual), on a wide image.
#[test]
fn flux_controlnet_with_fewer_blocks_than_the_transformer_on_a_wide_image_matches_diffusers() {
    check_within("flux-dev-tiny-controlnet", FLUX_LATENTS_BOUND, FLUX_IMAGE_PSNR_DB);
}

/// Two double blocks' residuals over three transformer blocks (the first two get the first) and
/// no single-block residuals; the same ControlNet twice with its own image, scale and window
/// (FluxMultiControlNetModel sums them), through a VAE with a shift factor, on a tall image.
#[test]
fn flux_two_controlnets_with_their_own_windows_and_no_single_block_residuals_match_diffusers() {
    check_within("flux-dev-var-tiny-two-controlnets-window", FLUX_LATENTS_BOUND, FLUX_IMAGE_PSNR_DB);
}

/// A Union ControlNet (a learned token for control mode 2 before the text, so its single
/// block's image tokens start one later) trained on a dev model embeds the guidance scale though
/// the schnell transformer does not; its single-block residual goes after both of the
/// transformer's single blocks; two images per prompt, one latent sample of the control image
/// per image.
#[test]
fn flux_union_controlnet_with_a_mode_and_its_own_guidance_on_schnell_with_two_images_matches_diffusers() {
    check_within("flux-schnell-tiny-union-controlnet-batch", FLUX_LATENTS_BOUND, FLUX_IMAGE_PSNR_DB);
}

/// FluxControlNetImg2ImgPipeline: 4 of 6 steps run and the window 0-0.6 counts those 4, so
/// the ControlNet runs on the first 2; the control image's latent sample is drawn before the
/// picture's (make_img2img_fixtures.py).
#[test]
fn flux_controlnet_on_image_to_image_with_its_window_over_the_steps_that_run_matches_diffusers() {
    check_within("flux-dev-tiny-controlnet-img2img", FLUX_LATENTS_BOUND, FLUX_IMAGE_PSNR_DB);
}

/// A FLUX ControlNet as one file in diffusers' names (as ComfyUI repackages InstantX's): its
/// config read off its weights, its rotary axes from the model's transformer, it gives exactly
/// its folder's output. Without a model, or with a UNet model, it is refused saying why, and so
/// is an XLabs-style file.
#[test]
fn a_flux_controlnet_single_file_in_diffusers_names_gives_exactly_its_folders_output() {
    let (reference, pipe, mut p) = flux_case("flux-schnell-tiny-union-controlnet-batch");
    let folder = reference.generate(&pipe, &p).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("flux-union.safetensors");
    std::fs::copy(fixtures().join("controlnets/flux-dev-tiny-union/diffusion_pytorch_model.safetensors"), &file).unwrap();
    p.controlnets[0].net = Arc::new(ControlNet::load(&file, pipe.controlnet_host(), DType::F32, &Device::Cpu).expect("load the single file"));
    let single = reference.generate(&pipe, &p).unwrap();
    let diff = (&single.latents - &folder.latents).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(diff, 0.0, "the single file's output differs from the folder's by {diff}");
    let no_host = ControlNet::load(&file, None, DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(no_host.contains("architecture from the model"), "{no_host}");
    let sd = Pipeline::load(&fixtures().join("pipelines/sd15-var-tiny"), &LoadOptions::default()).unwrap();
    let on_sd = ControlNet::load(&file, sd.controlnet_host(), DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(on_sd.contains("controlnets") && on_sd.contains("is for FLUX"), "{on_sd}");
    // XLabs' files (BFL names and a pixel hint block) are told apart by their header.
    let header = br#"{"pos_embed_input.weight":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    let xlabs = dir.path().join("xlabs.safetensors");
    std::fs::write(&xlabs, [&(header.len() as u64).to_le_bytes()[..], header, &[0; 4]].concat()).unwrap();
    let refused = ControlNet::load(&xlabs, pipe.controlnet_host(), DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(refused.contains("XLabs-style"), "{refused}");
}

fn flux_case(case: &str) -> (Reference, Pipeline, GenerateParams) {
    let reference = Reference::load(&fixtures().join("reference").join(format!("{case}.safetensors"))).unwrap();
    let pipe = Pipeline::load(&fixtures().join("pipelines").join(&reference.meta["pipeline"]), &LoadOptions::default()).unwrap();
    let p = params(&reference);
    (reference, pipe, p)
}

#[test]
fn a_flux_controlnet_on_sd15_and_an_sd15_controlnet_on_flux_are_refused_naming_both_families() {
    let (_, sd, mut p) = flux_case("sd15-var-tiny-controlnet-euler");
    p.controlnets[0].net = load_net("controlnets/flux-dev-tiny");
    let text = error_text(&sd, &p);
    assert!(text.contains("controlnets") && text.contains("is for FLUX") && text.contains("this model is Stable Diffusion 1.x/2.x"), "{text}");
    let (_, flux, mut p) = flux_case("flux-dev-tiny-controlnet");
    p.controlnets[0].net = load_net("controlnets/sd15-var-tiny");
    let text = error_text(&flux, &p);
    assert!(text.contains("controlnets") && text.contains("is for Stable Diffusion 1.x/2.x") && text.contains("this model is FLUX"), "{text}");
}

#[test]
fn a_union_flux_controlnet_without_a_mode_or_out_of_range_and_a_mode_for_a_plain_one_are_refused() {
    let (_, pipe, p) = flux_case("flux-schnell-tiny-union-controlnet-batch");
    let mut none = p.clone();
    none.controlnets[0].mode = None;
    let text = error_text(&pipe, &none);
    assert!(text.contains("controlnets") && text.contains("Union") && text.contains("0 to 3"), "{text}");
    let mut high = p.clone();
    high.controlnets[0].mode = Some(4);
    let text = error_text(&pipe, &high);
    assert!(text.contains("controlnets") && text.contains("out of range"), "{text}");
    let (_, pipe, mut plain) = flux_case("flux-dev-tiny-controlnet");
    plain.controlnets[0].mode = Some(1);
    let text = error_text(&pipe, &plain);
    assert!(text.contains("controlnets") && text.contains("not one"), "{text}");
}

/// diffusers' FluxMultiControlNetModel zips the nets' residuals, silently dropping the deeper
/// net's extra ones; easel refuses the stack instead.
#[test]
fn flux_controlnets_of_different_depths_together_are_refused() {
    let (_, pipe, mut p) = flux_case("flux-dev-tiny-controlnet");
    let mut union = p.controlnets[0].clone();
    (union.net, union.mode) = (load_net("controlnets/flux-dev-tiny-union"), Some(0));
    p.controlnets.push(union);
    let text = error_text(&pipe, &p);
    assert!(text.contains("controlnets") && text.contains("as many double and single blocks"), "{text}");
}

#[test]
fn a_flux_controlnet_with_the_first_block_cache_is_refused_naming_cache() {
    let (_, pipe, mut p) = flux_case("flux-dev-tiny-controlnet");
    p.step_cache = Some(easel_engine::StepCache::FirstBlock { threshold: 0.1 });
    let text = error_text(&pipe, &p);
    assert!(text.contains("cache") && text.contains("ControlNet"), "{text}");
}

/// Two FLUX requests with the same ControlNet and their own control images in one batch: each
/// gets the image it gets alone (its control latents stay on its rows).
#[test]
fn batched_flux_requests_with_their_own_control_images_equal_their_solo_runs() {
    let (_, pipe, a) = flux_case("flux-dev-tiny-controlnet");
    let mut b = a.clone();
    b.controlnets[0].image = (1.0 - &a.controlnets[0].image).unwrap();
    b.seed = 9;
    assert_batched_equal_solo(&pipe, a, b);
}
