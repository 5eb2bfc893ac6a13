//! Step caching: DeepCache on Stable Diffusion's UNets, the First-Block Cache on FLUX.
//!
//! Neither is part of diffusers' pipelines, so there is no reference output to match. What
//! each must hold exactly is pinned here instead, and how far cached output strays from
//! uncached is measured and bounded:
//! - a cached step fed the inputs of the full step before it returns that step's output, to
//!   float precision (so the shallow path wires every skip connection and residual right), on
//!   UNets unlike each other (SD 1.x-like, SDXL-like, non-square latents) and on FLUX;
//! - a cache that never reuses (DeepCache interval 1, FBCache threshold 0) gives the uncached
//!   output bit for bit;
//! - a cache that reuses runs the whole denoiser on exactly the steps it reports.

mod common;

use common::{fixtures, psnr, reference};
use easel_engine::config::{read_json, UNetConfig};
use easel_engine::models::flux::{FirstBlockCache, FluxInputs};
use easel_engine::models::unet::{AddedCond, DeepCache, UNet2DConditionModel};
use easel_engine::weights::load_var_builder;
use easel_engine::weights::source::component_weights;
use easel_engine::{DType, Device, GenerateParams, LoadOptions, Pipeline, StepCache, Tensor};

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn a_deepcache_step_on_the_last_full_steps_inputs_returns_its_output() {
    for pipe in ["sd15-tiny", "sd15-var-tiny", "sdxl-var-tiny"] {
        let dir = fixtures().join("pipelines").join(pipe);
        let cfg: UNetConfig = read_json(&dir.join("unet/config.json")).unwrap();
        let vb = load_var_builder(&component_weights(&dir, "unet", false).unwrap(), DType::F32, &Device::Cpu).unwrap();
        let unet = UNet2DConditionModel::new(vb, &cfg).unwrap();
        let (t, _) = reference(&format!("{pipe}-components.safetensors"));
        let added = t.get("unet_text_embeds").map(|te| AddedCond { text_embeds: te.clone(), time_ids: t["unet_time_ids"].clone() });
        let ts = t["unet_timestep"].to_vec1::<f32>().unwrap()[0] as f64;
        let (sample, context) = (&t["unet_sample"], &t["unet_context"]);

        let full = unet.forward(sample, ts, context, added.as_ref(), None).unwrap();
        let mut cache = DeepCache::new(3);
        let first = unet.forward_cached(sample, ts, context, added.as_ref(), None, &mut cache).unwrap();
        let shallow = unet.forward_cached(sample, ts, context, added.as_ref(), None, &mut cache).unwrap();
        assert_eq!((cache.full_steps, cache.shallow_steps), (1, 1), "{pipe}");
        assert_eq!(max_abs_diff(&first, &full), 0.0, "{pipe}: a full cached step is the plain evaluation");
        let d = max_abs_diff(&shallow, &full);
        println!("{pipe}: shallow step vs full, max abs diff {d:.2e}");
        // Measured 0: the shallow step runs the same operations on the same values.
        assert!(d < 1e-6, "{pipe}: the shallow step on the same inputs differs by {d:.2e}");
        // A different sample changes the shallow step's output (it really runs the outer blocks).
        let other = (sample * 0.5).unwrap();
        let changed = unet.forward_cached(&other, ts, context, added.as_ref(), None, &mut cache).unwrap();
        assert!(max_abs_diff(&changed, &full) > 1e-3, "{pipe}: the shallow step ignored its sample");
    }
}

#[test]
fn a_first_block_cache_step_on_the_last_full_steps_inputs_returns_its_output() {
    for name in ["flux-dev-tiny", "flux-dev-var-tiny"] {
        let Pipeline::Flux(pipe) = Pipeline::load(&fixtures().join("pipelines").join(name), &LoadOptions::default()).unwrap() else { panic!("{name} is FLUX") };
        let (t, _) = reference(&format!("{name}-components.safetensors"));
        let txt_ids = Tensor::zeros((t["transformer_context"].dim(1).unwrap(), 3), DType::F32, &Device::Cpu).unwrap();
        let inputs = FluxInputs {
            img: &t["transformer_hidden"],
            img_ids: &t["img_ids"],
            txt: &t["transformer_context"],
            txt_ids: &txt_ids,
            timesteps: &t["transformer_timestep"],
            pooled: &t["transformer_pooled"],
            guidance: t.get("transformer_guidance"),
        };
        let full = pipe.transformer().forward(&inputs).unwrap();
        let mut cache = FirstBlockCache::new(0.5);
        let first = pipe.transformer().forward_cached(&inputs, &mut cache).unwrap();
        let reused = pipe.transformer().forward_cached(&inputs, &mut cache).unwrap();
        assert_eq!((cache.full_steps, cache.cached_steps), (1, 1), "{name}");
        assert_eq!(max_abs_diff(&first, &full), 0.0, "{name}");
        let d = max_abs_diff(&reused, &full);
        println!("{name}: cached step vs full, max abs diff {d:.2e}");
        // Measured 1.2e-7 and 1.8e-7 (the residuals are subtracted and added back).
        assert!(d < 2e-6, "{name}: the cached step on the same inputs differs by {d:.2e}");
        // A threshold of 0 never reuses.
        let mut never = FirstBlockCache::new(0.0);
        for _ in 0..2 {
            pipe.transformer().forward_cached(&inputs, &mut never).unwrap();
        }
        assert_eq!((never.full_steps, never.cached_steps), (2, 0), "{name}");
    }
}

fn params(width: usize, height: usize, steps: usize, guidance: f64, step_cache: Option<StepCache>) -> GenerateParams {
    GenerateParams {
        prompt: "a red circle on a blue background".into(),
        negative_prompt: None,
        width,
        height,
        steps,
        guidance,
        seed: 7,
        batch: 1,
        scheduler: None,
        init_latents: None,
        skip_layer_guidance: None,
        step_cache,
        init_image: None,
        controlnets: Vec::new(),
        ip_adapter: None,
    }
}

/// Generates uncached, with a cache that never reuses, and with one that does; returns the
/// reusing run's (full steps, cached steps, PSNR against uncached).
fn generate_three_ways(name: &str, p: GenerateParams, never: StepCache, reusing: StepCache) -> (usize, usize, f64) {
    let pipe = Pipeline::load(&fixtures().join("pipelines").join(name), &LoadOptions::default()).unwrap();
    let plain = pipe.generate(&p, None, &mut |_| true).unwrap();
    assert_eq!((plain.timings.full_steps, plain.timings.cached_steps), (p.steps, 0), "{name}");
    let same = pipe.generate(&GenerateParams { step_cache: Some(never), ..p.clone() }, None, &mut |_| true).unwrap();
    assert_eq!(max_abs_diff(&same.latents, &plain.latents), 0.0, "{name}: {never:?} changed the output");
    let cached = pipe.generate(&GenerateParams { step_cache: Some(reusing), ..p.clone() }, None, &mut |_| true).unwrap();
    let db = psnr(&cached.decoded, &plain.decoded);
    println!("{name} {reusing:?}: {} full + {} cached steps, image PSNR against uncached {db:.1} dB", cached.timings.full_steps, cached.timings.cached_steps);
    (cached.timings.full_steps, cached.timings.cached_steps, db)
}

#[test]
fn deepcache_runs_the_whole_unet_every_interval_steps_and_stays_near_uncached() {
    // Image PSNR against uncached, measured 51.0, 41.3 and 35.9 dB; bounds 10 dB below (a
    // tenfold squared error).
    for (name, w, h, min_db) in [("sd15-tiny", 64, 64, 41.0), ("sd15-var-tiny", 48, 96, 31.0), ("sdxl-var-tiny", 64, 32, 25.5)] {
        let (full, cached, db) = generate_three_ways(name, params(w, h, 7, 5.0, None), StepCache::DeepCache { interval: 1 }, StepCache::DeepCache { interval: 3 });
        assert_eq!((full, cached), (3, 4), "{name}: steps 0, 3 and 6 run the whole UNet");
        assert!(db > min_db, "{name}: deepcache:3 image PSNR {db:.1} dB against uncached");
    }
}

#[test]
fn the_first_block_cache_reuses_more_as_its_threshold_rises_and_stays_near_uncached() {
    // Image PSNR against uncached at threshold 1 (measured 49.7 and 46.0 dB; bounds 10 dB
    // below, a tenfold squared error).
    for (name, w, h, min_db) in [("flux-dev-tiny", 64, 80, 39.0), ("flux-dev-var-tiny", 96, 48, 36.0)] {
        let p = params(w, h, 8, 3.5, None);
        let mut last_cached = 0;
        for threshold in [0.08, 0.25, 0.5, 1.0] {
            let (full, cached, db) = generate_three_ways(name, p.clone(), StepCache::FirstBlock { threshold: 0.0 }, StepCache::FirstBlock { threshold });
            assert_eq!(full + cached, 8, "{name}");
            assert!(full >= 1 && cached >= last_cached, "{name}: threshold {threshold} reused {cached} steps, a lower one {last_cached}");
            last_cached = cached;
            if threshold == 1.0 {
                assert!(cached > 0, "{name}: threshold 1 never reused");
                assert!(db > min_db, "{name}: fbcache:1 image PSNR {db:.1} dB against uncached");
            }
        }
    }
}

#[test]
fn each_family_refuses_the_other_familys_cache_naming_cache() {
    for (name, w, cache) in [
        ("sd15-tiny", 64, StepCache::FirstBlock { threshold: 0.1 }),
        ("flux-dev-tiny", 64, StepCache::DeepCache { interval: 2 }),
        ("sd35m-tiny", 48, StepCache::DeepCache { interval: 2 }),
    ] {
        let pipe = Pipeline::load(&fixtures().join("pipelines").join(name), &LoadOptions::default()).unwrap();
        let e = pipe.validate(&params(w, w, 4, 3.0, Some(cache))).unwrap_err().to_string();
        assert!(e.contains("cache"), "{name}: {e}");
    }
}

#[test]
fn batched_fbcache_images_equal_their_solo_runs() {
    // Two prompts and seeds at a threshold where some steps reuse (3 of 8 each, measured). On
    // this fixture both images happen to reuse on the same steps; per-image decisions that
    // differ within a batch are checked by the unit test in models/flux.rs.
    let Pipeline::Flux(pipe) = Pipeline::load(&fixtures().join("pipelines/flux-dev-tiny"), &LoadOptions::default()).unwrap() else { panic!("FLUX") };
    let cache = Some(StepCache::FirstBlock { threshold: 0.25 });
    let a = GenerateParams { step_cache: cache, ..params(64, 80, 8, 3.5, None) };
    let b = GenerateParams { prompt: "a yellow triangle".into(), seed: 99, ..a.clone() };
    let solo: Vec<_> = [&a, &b].iter().map(|p| pipe.generate(p, &mut |_| true).unwrap()).collect();
    let batched = pipe.generate_batch(&[a, b], &mut |_| true).unwrap();
    for (i, (s, t)) in solo.iter().zip(&batched).enumerate() {
        let e = common::rel_l2(&t.latents, &s.latents);
        println!("image {i}: batched vs solo rel L2 {e:.2e} ({} cached steps alone)", s.timings.cached_steps);
        // The bound of batched_requests_match_solo_runs (tests/batching.rs).
        assert!(e < 1e-5, "image {i}: batched differs from solo by {e:.2e}");
    }
}
