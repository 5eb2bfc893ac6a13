//! LCMScheduler against diffusers, on the tiny pipelines (`tools/fixtures/make_lcm_fixtures.py`):
//! its schedule (timesteps picked from the distillation's 50), the consistency step, and the
//! fresh noise between steps (replayed from diffusers' draws). With a LoRA standing in for an
//! LCM-LoRA (a random one: what is checked is the scheduler through the LoRA path) at guidance 1.5 (classifier-free guidance on), with v-prediction at guidance 1, and on
//! SDXL at 8 steps on a tall image. LCM-distilled UNets (`time_cond_proj_dim`: the guidance scale
//! as an embedding, no classifier-free guidance) against LatentConsistencyModelPipeline on SD 1.x
//! (a wide image) and StableDiffusionXLPipeline on SDXL, as each is published.

mod common;

use common::fixtures;
use easel_engine::parity::Reference;
use easel_engine::weights::lora::LoraSpec;
use easel_engine::{LoadOptions, Pipeline};

/// The largest error measured is 6.9e-7 (2026-11-30, x86-64); under 10x it.
const LATENTS_BOUND: f64 = 6e-6;
/// The lowest image PSNR measured (131.5 dB) less 20 dB: 10x in error.
const IMAGE_PSNR_DB: f64 = 111.0;

fn check(case: &str) {
    let reference = Reference::load(&fixtures().join("reference").join(format!("{case}.safetensors"))).expect("reference");
    let mut pipe = Pipeline::load(&fixtures().join("pipelines").join(&reference.meta["pipeline"]), &LoadOptions::default()).expect("load");
    let lora = &reference.meta["lora"];
    if !lora.is_empty() {
        let scale = reference.meta["lora_scale"].parse().unwrap();
        pipe = pipe.with_loras(&[LoraSpec { path: fixtures().join("loras").join(lora), scale }]).expect("LoRA");
    }
    let a = reference.check(&pipe).expect("generate");
    println!("{case}: latents rel L2 {:.2e}, image PSNR {:.1} dB", a.latents_rel_l2, a.image_psnr_db);
    assert!(a.latents_rel_l2 < LATENTS_BOUND && a.image_psnr_db >= IMAGE_PSNR_DB, "{case}: rel L2 {:.2e}, PSNR {:.1} dB", a.latents_rel_l2, a.image_psnr_db);
}

#[test]
fn lcm_through_the_lora_path_at_guidance_one_and_a_half_matches_diffusers() {
    check("sd15-tiny-lcm-lora");
}

#[test]
fn lcm_with_v_prediction_without_guidance_matches_diffusers() {
    check("sd21v-tiny-lcm");
}

#[test]
fn lcm_on_sdxl_in_eight_steps_on_a_tall_image_matches_diffusers() {
    check("sdxl-var-tiny-lcm");
}

#[test]
fn an_lcm_distilled_unet_takes_guidance_as_an_embedding_as_latent_consistency_model_pipeline_does() {
    check("sd15-var-lcm-tiny-distilled");
}

#[test]
fn an_lcm_distilled_sdxl_unet_takes_guidance_as_an_embedding_as_the_sdxl_pipeline_does() {
    check("sdxl-var-lcm-tiny-distilled");
}

#[test]
fn lcm_distilled_models_default_to_four_steps_at_latent_consistency_model_pipelines_guidance() {
    use easel_engine::{Family, ModelDefaults};
    for (name, family) in [("sd15-var-lcm-tiny", Family::StableDiffusion), ("sdxl-var-lcm-tiny", Family::StableDiffusionXl)] {
        let d = ModelDefaults::load(&fixtures().join("pipelines").join(name), family).expect("defaults");
        assert_eq!((d.steps, d.guidance), (Some(4), Some(8.5)), "{name}");
    }
    let base = ModelDefaults::load(&fixtures().join("pipelines").join("sd15-var-tiny"), Family::StableDiffusion).expect("defaults");
    assert_eq!((base.steps, base.guidance), (Some(30), Some(7.5)));
}

#[test]
fn lcm_timesteps_are_picked_from_the_distillation_schedule_as_diffusers_does() {
    use easel_engine::scheduler::SchedulerKind;
    let config: easel_engine::config::SchedulerConfig = serde_json::from_str(r#"{"num_train_timesteps": 1000}"#).unwrap();
    let timesteps = |steps| SchedulerKind::Lcm.build(&config, steps, 0).unwrap().timesteps().to_vec();
    assert_eq!(timesteps(4), [999.0, 759.0, 499.0, 259.0]);
    assert_eq!(timesteps(6), [999.0, 839.0, 679.0, 499.0, 339.0, 179.0]);
    assert_eq!(timesteps(1), [999.0]);
    let e = SchedulerKind::Lcm.build(&config, 51, 0).err().unwrap().to_string();
    assert!(e.contains("steps") && e.contains("50"), "{e}");
}
