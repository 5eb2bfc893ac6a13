//! Image-to-image against diffusers' StableDiffusionImg2ImgPipeline,
//! StableDiffusionXLImg2ImgPipeline, FluxImg2ImgPipeline and StableDiffusion3Img2ImgPipeline on
//! the tiny pipelines (`tools/fixtures/make_img2img_fixtures.py`). The references record every
//! normal draw diffusers made (the VAE's latent sample, the noise added to the encoded image, and
//! an ancestral scheduler's noise), and easel replays them, so from the same drawn test image
//! easel must give diffusers' final latents. The cases vary every axis that changes the
//! arithmetic: each scheduler's `add_noise` (Euler, ancestral Euler, DDIM with v-prediction,
//! DPM++ 2M with and without Karras sigmas, flow matching twice), the two ways diffusers rounds
//! `strength`, VAE depths, non-square images and two images per prompt.
//!
//! Inpainting against StableDiffusionInpaintPipeline and StableDiffusionXLInpaintPipeline the
//! same way: latent blending on ordinary 4-channel UNets, and a 9-channel inpainting UNet
//! (latents, mask, masked picture), each at strength 1 (from pure noise) and below; and FLUX Fill
//! against FluxFillPipeline (the masked picture's latents and the mask folded to the latent grid
//! beside the latents at every step) on a wide image below full strength.

mod common;

use common::fixtures;
use easel_engine::parity::Reference;
use easel_engine::{GenerateParams, InitImage, LoadOptions, Pipeline, Tensor};

/// Relative L2 bound on the final latents: the largest error measured over these cases, times
/// fewer than 10 (see each case's printed figure).
const LATENTS_BOUND: f64 = 2e-5;
/// Decoded images must agree to at least this PSNR: the lowest measured (110.1 dB, FLUX Fill at
/// guidance 30; 121.6 dB without it) less 9 dB, under 10x in error.
const IMAGE_PSNR_DB: f64 = 101.0;

fn check(case: &str) {
    let reference = Reference::load(&fixtures().join("reference").join(format!("{case}.safetensors"))).expect("reference");
    let pipeline = fixtures().join("pipelines").join(&reference.meta["pipeline"]);
    let pipe = Pipeline::load(&pipeline, &LoadOptions::default()).expect("load");
    let a = reference.check(&pipe).expect("generate");
    println!("{case}: latents rel L2 {:.2e}, image PSNR {:.1} dB", a.latents_rel_l2, a.image_psnr_db);
    assert!(
        a.latents_rel_l2 < LATENTS_BOUND && a.image_psnr_db >= IMAGE_PSNR_DB,
        "{case} differs from diffusers: rel L2 {:.2e}, PSNR {:.1} dB",
        a.latents_rel_l2,
        a.image_psnr_db
    );
}

#[test]
fn sd15_img2img_with_euler_matches_diffusers() {
    check("sd15-tiny-img2img-euler");
}

#[test]
fn sd15_variant_img2img_with_ancestral_euler_on_a_wide_image_matches_diffusers() {
    check("sd15-var-tiny-img2img-euler-a");
}

#[test]
fn sd15_variant_img2img_with_dpmpp_2m_at_half_strength_matches_diffusers() {
    check("sd15-var-tiny-img2img-dpmpp-2m");
}

#[test]
fn sd21_v_prediction_img2img_with_ddim_matches_diffusers() {
    check("sd21v-tiny-img2img-ddim");
}

#[test]
fn sdxl_img2img_two_images_per_prompt_matches_diffusers() {
    check("sdxl-tiny-img2img-euler-batch");
}

#[test]
fn sdxl_variant_img2img_with_karras_sigmas_on_a_tall_image_matches_diffusers() {
    check("sdxl-var-tiny-img2img-dpmpp-2m-karras");
}

#[test]
fn flux_img2img_matches_diffusers() {
    check("flux-dev-tiny-img2img");
}

#[test]
fn flux_variant_img2img_at_high_strength_on_a_tall_image_matches_diffusers() {
    check("flux-dev-var-tiny-img2img");
}

#[test]
fn sd35_img2img_with_guidance_matches_diffusers() {
    check("sd35m-tiny-img2img");
}

#[test]
fn flux_fill_with_the_masked_picture_and_folded_mask_beside_the_latents_matches_diffusers() {
    check("flux-dev-fill-tiny");
}

#[test]
fn sd15_inpaint_blending_on_a_4_channel_unet_matches_diffusers() {
    check("sd15-tiny-inpaint-euler");
}

#[test]
fn sd15_variant_inpaint_from_pure_noise_with_ancestral_euler_matches_diffusers() {
    check("sd15-var-tiny-inpaint-euler-a-full");
}

#[test]
fn inpainting_unet_with_9_channels_below_full_strength_matches_diffusers() {
    check("sd15-var-inpaint-tiny-dpmpp-2m");
}

#[test]
fn inpainting_unet_with_9_channels_from_pure_noise_two_images_matches_diffusers() {
    check("sd15-var-inpaint-tiny-euler-full-batch");
}

#[test]
fn sdxl_inpaint_blending_matches_diffusers() {
    check("sdxl-tiny-inpaint-euler");
}

#[test]
fn sdxl_variant_inpaint_from_pure_noise_with_ddim_on_a_tall_image_matches_diffusers() {
    check("sdxl-var-tiny-inpaint-ddim-full");
}

/// The mask decides what changes: two 4-channel inpainting runs from different noise (the same
/// latent sample of the picture) end with identical latents outside the mask, which blending
/// pins to the picture's, and different ones inside it.
#[test]
fn inpainting_changes_only_the_masked_region() {
    use easel_engine::scheduler::ReplayNoise;
    let reference = Reference::load(&fixtures().join("reference").join("sd15-tiny-inpaint-euler.safetensors")).expect("reference");
    let pipe = Pipeline::load(&fixtures().join("pipelines").join("sd15-tiny"), &LoadOptions::default()).expect("load");
    let run = |flip: bool| {
        let mut p = reference.params().unwrap();
        if flip {
            p.init_latents = Some(p.init_latents.unwrap().neg().unwrap());
        }
        let mut replay = ReplayNoise::new(reference.tensor("noise").unwrap()).unwrap();
        pipe.generate(&p, Some(&mut replay), &mut |_| true).unwrap().latents
    };
    let (a, b) = (run(false), run(true));
    let (_, _, h, w) = a.dims4().unwrap();
    // The mask at latent size, as diffusers' nearest interpolation takes it (an integer factor).
    let mask = reference.tensor("mask").unwrap();
    let f = mask.dim(2).unwrap() / h;
    let small = mask.to_dtype(easel_engine::DType::F32).unwrap().max_pool2d((f, f)).unwrap();
    let diff = (a - b).unwrap().abs().unwrap().max_keepdim(1).unwrap();
    let inside = diff.mul(&small).unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let outside = diff.mul(&(1.0 - &small).unwrap()).unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    println!("largest latent change between the runs: inside the mask {inside:.3}, outside {outside:.2e} ({h}x{w} latents)");
    assert!(outside < 1e-6 && inside > 0.1, "inside {inside}, outside {outside}");
}

#[test]
fn masks_are_refused_where_they_cannot_work_and_required_by_inpainting_and_fill_models() {
    let pixels = |w: usize, h: usize| Tensor::zeros((1, 3, h, w), easel_engine::DType::F32, &easel_engine::Device::Cpu).unwrap();
    let mask = |w: usize, h: usize| Tensor::ones((1, 1, h, w), easel_engine::DType::F32, &easel_engine::Device::Cpu).unwrap();
    let params = |w: usize, h: usize, init_image: Option<InitImage>| GenerateParams {
        prompt: "a cat".into(),
        negative_prompt: None,
        width: w,
        height: h,
        steps: 4,
        guidance: 4.0,
        seed: 0,
        batch: 1,
        scheduler: None,
        init_latents: None,
        skip_layer_guidance: None,
        step_cache: None,
        controlnets: Vec::new(),
        ip_adapter: None,
        init_image,
    };
    let load = |name: &str| Pipeline::load(&fixtures().join("pipelines").join(name), &LoadOptions::default()).expect("load");
    // An inpainting model needs a picture and a mask.
    let inpainting = load("sd15-var-inpaint-tiny");
    let e = inpainting.validate(&params(96, 32, None)).unwrap_err().to_string();
    assert!(e.contains("mask"), "{e}");
    inpainting.validate(&params(96, 32, Some(InitImage { pixels: pixels(96, 32), strength: 1.0, mask: Some(mask(96, 32)) }))).expect("picture and mask");
    // A mask of another size.
    let e = inpainting.validate(&params(96, 32, Some(InitImage { pixels: pixels(96, 32), strength: 1.0, mask: Some(mask(32, 32)) }))).unwrap_err().to_string();
    assert!(e.contains("mask"), "{e}");
    // FLUX takes a picture but no mask; FLUX Fill needs both.
    let flux = load("flux-dev-tiny");
    let e = flux.validate(&params(80, 64, Some(InitImage { pixels: pixels(80, 64), strength: 0.5, mask: Some(mask(80, 64)) }))).unwrap_err().to_string();
    assert!(e.contains("mask") && e.contains("Fill"), "{e}");
    let fill = load("flux-dev-fill-tiny");
    for without_mask in [None, Some(InitImage { pixels: pixels(48, 16), strength: 1.0, mask: None })] {
        let e = fill.validate(&params(48, 16, without_mask)).unwrap_err().to_string();
        assert!(e.contains("mask"), "{e}");
    }
    fill.validate(&params(48, 16, Some(InitImage { pixels: pixels(48, 16), strength: 1.0, mask: Some(mask(48, 16)) }))).expect("picture and mask");
}

/// diffusers' two roundings of `strength`: the SD pipelines run `int(steps * strength)` steps,
/// the flow-matching ones start at `int(steps - steps * strength)`.
#[test]
fn strength_picks_the_first_step_as_each_diffusers_pipeline_does() {
    use easel_engine::pipelines::images_in::StrengthRounding::{FlowMatch, WholeSteps};
    let image = |strength| InitImage { pixels: Tensor::zeros((1, 3, 8, 8), easel_engine::DType::F32, &easel_engine::Device::Cpu).unwrap(), strength, mask: None };
    assert_eq!(image(0.6).first_step(6, WholeSteps).unwrap(), 3, "int(3.6) = 3 steps run");
    assert_eq!(image(0.55).first_step(6, WholeSteps).unwrap(), 3);
    assert_eq!(image(0.55).first_step(6, FlowMatch).unwrap(), 2, "int(6 - 3.3) = 2");
    assert_eq!(image(1.0).first_step(6, WholeSteps).unwrap(), 0);
    assert_eq!(image(1.0).first_step(6, FlowMatch).unwrap(), 0);
    let e = image(0.1).first_step(5, WholeSteps).unwrap_err().to_string();
    assert!(e.contains("strength") && e.contains("no step"), "{e}");
    let e = image(0.0).first_step(5, FlowMatch).unwrap_err().to_string();
    assert!(e.contains("strength"), "{e}");
}

#[test]
fn bad_strength_and_a_wrong_sized_image_are_refused_naming_the_field() {
    let pipe = Pipeline::load(&fixtures().join("pipelines").join("sd15-tiny"), &LoadOptions::default()).expect("load");
    let pixels = |w: usize, h: usize| Tensor::zeros((1, 3, h, w), easel_engine::DType::F32, &easel_engine::Device::Cpu).unwrap();
    let base = GenerateParams {
        prompt: "a cat".into(),
        negative_prompt: None,
        width: 64,
        height: 64,
        steps: 4,
        guidance: 7.5,
        seed: 0,
        batch: 1,
        scheduler: None,
        init_latents: None,
        skip_layer_guidance: None,
        step_cache: None,
        controlnets: Vec::new(),
        ip_adapter: None,
        init_image: Some(InitImage { pixels: pixels(64, 64), strength: 0.5, mask: None }),
    };
    pipe.validate(&base).expect("a good request");
    for strength in [1.5, -0.1, f64::NAN] {
        let p = GenerateParams { init_image: Some(InitImage { pixels: pixels(64, 64), strength, mask: None }), ..base.clone() };
        let e = pipe.validate(&p).unwrap_err().to_string();
        assert!(e.contains("strength"), "{strength}: {e}");
    }
    let p = GenerateParams { init_image: Some(InitImage { pixels: pixels(32, 64), strength: 0.5, mask: None }), ..base.clone() };
    let e = pipe.validate(&p).unwrap_err().to_string();
    assert!(e.contains("image"), "{e}");
    // A strength that leaves no step is refused when the run starts, before any work.
    let p = GenerateParams { init_image: Some(InitImage { pixels: pixels(64, 64), strength: 0.1, mask: None }), ..base };
    let e = pipe.generate(&p, None, &mut |_| true).unwrap_err().to_string();
    assert!(e.contains("strength"), "{e}");
}

/// The seeded path (no replayed noise): the same seed gives the same image, and the init image
/// shapes the result (a different image gives a different result at the same seed).
#[test]
fn seeded_img2img_is_reproducible_and_follows_the_image() {
    let pipe = Pipeline::load(&fixtures().join("pipelines").join("flux-dev-tiny"), &LoadOptions::default()).expect("load");
    let reference = Reference::load(&fixtures().join("reference").join("flux-dev-tiny-img2img.safetensors")).expect("reference");
    let mut p = reference.params().expect("params");
    p.init_latents = None;
    p.seed = 11;
    let a = pipe.generate(&p, None, &mut |_| true).expect("first");
    let b = pipe.generate(&p, None, &mut |_| true).expect("second");
    assert_eq!(common::rel_l2(&a.latents, &b.latents), 0.0, "same seed, same latents");
    let mut other = p.clone();
    let image = other.init_image.as_mut().unwrap();
    image.pixels = (image.pixels.ones_like().unwrap() - &image.pixels).unwrap();
    let c = pipe.generate(&other, None, &mut |_| true).expect("inverted image");
    assert!(common::rel_l2(&a.latents, &c.latents) > 1e-2, "the init image must shape the result");
}
