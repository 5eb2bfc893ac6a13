//! SD 3.5 against diffusers' StableDiffusion3Pipeline, on the tiny pipelines from
//! `tools/fixtures/make_sd3_fixtures.py`: one shaped like 3.5 medium (MMDiT-X dual attention,
//! qk RMS norm, T5 present, T5 prompts of 24 tokens) and one like 3.5 large (qk norm, no T5,
//! other widths, a deeper VAE). From the same init latents easel must give diffusers' final
//! latents within a relative L2 of 5e-6 (measured at most 5.4e-7): with classifier-free guidance, with skip-layer
//! guidance, without guidance (as large-turbo runs), for a batch of two, with the transformer
//! from Stability's single file, and (within stated bounds) from GGUF files. Each network and
//! the scheduler's tables are also checked on their own, so a failure points at its stage.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use common::{copy_dir, fixtures, psnr, reference, rel_l2};
use easel_engine::models::mmdit::MmditInputs;
use easel_engine::pipelines::common::TransformerSource;
use easel_engine::scheduler::{FlowMatchEuler, Scheduler};
use easel_engine::parity::Reference;
use easel_engine::{GenerateParams, Generated, LoadOptions, Pipeline, Sd3Pipeline, SkipLayerGuidance, Tensor};

/// Relative L2 bound for latents, transformer outputs and embeddings: the largest measured
/// error is 5.4e-7 (2026-11-30, x86-64), so this is under 10x it.
const LATENTS_BOUND: f64 = 5e-6;

fn pipeline(name: &str) -> PathBuf {
    fixtures().join("pipelines").join(name)
}

fn load(name: &str, transformer: Option<PathBuf>) -> Sd3Pipeline {
    match Pipeline::load(&pipeline(name), &LoadOptions { transformer, ..Default::default() }).expect("load") {
        Pipeline::Sd3(p) => p,
        _ => panic!("{name} is not loaded as SD 3.5"),
    }
}

/// Runs the reference case `case` and returns (output, reference tensors).
fn run_case(pipe: &Sd3Pipeline, case: &str) -> (Generated, HashMap<String, Tensor>) {
    let reference = Reference::load(&fixtures().join("reference").join(format!("{case}.safetensors"))).expect("reference");
    let params = reference.params().expect("reference parameters");
    (pipe.generate(&params, &mut |_| true).expect("generate"), reference.tensors)
}

fn assert_matches(label: &str, out: &Generated, t: &HashMap<String, Tensor>) {
    let err = rel_l2(&out.latents, &t["latents"]);
    let db = psnr(&out.decoded, &t["image"]);
    println!("{label}: latents rel L2 {err:.2e}, image PSNR {db:.1} dB");
    assert!(err < LATENTS_BOUND && db >= 120.0, "{label} differs from diffusers: rel L2 {err:.2e}, PSNR {db:.1} dB");
}

#[test]
fn medium_like_with_t5_and_guidance_matches_diffusers() {
    let pipe = load("sd35m-tiny", None);
    assert!(pipe.has_t5());
    let (out, t) = run_case(&pipe, "sd35m-tiny-cfg");
    assert_matches("sd35m-tiny cfg", &out, &t);
}

#[test]
fn medium_like_with_skip_layer_guidance_matches_diffusers() {
    let pipe = load("sd35m-tiny", None);
    let (out, t) = run_case(&pipe, "sd35m-tiny-slg");
    assert_matches("sd35m-tiny skip-layer guidance", &out, &t);
    // The case must exercise the skipped layer: it differs from plain guidance.
    let (plain, _) = reference("sd35m-tiny-cfg.safetensors");
    assert!(rel_l2(&t["latents"], &plain["latents"]) > 1e-2);
}

#[test]
fn large_like_without_t5_batch_of_two_matches_diffusers() {
    let pipe = load("sd35l-tiny", None);
    assert!(!pipe.has_t5());
    let (out, t) = run_case(&pipe, "sd35l-tiny-cfg");
    assert_eq!(out.images.len(), 2);
    assert_matches("sd35l-tiny cfg, batch 2, no T5", &out, &t);
}

#[test]
fn large_like_without_guidance_as_turbo_runs_matches_diffusers() {
    let pipe = load("sd35l-tiny", None);
    let (out, t) = run_case(&pipe, "sd35l-tiny-noguidance");
    assert_matches("sd35l-tiny guidance 0", &out, &t);
}

#[test]
fn medium_from_stability_single_file_matches_diffusers() {
    let pipe = load("sd35m-tiny", Some(pipeline("sd35m-tiny-sai.safetensors")));
    assert_eq!(pipe.transformer_source(), TransformerSource::ReferenceFile);
    let (out, t) = run_case(&pipe, "sd35m-tiny-slg");
    assert_matches("sd35m-tiny from sd35m-tiny-sai.safetensors", &out, &t);
}

/// A ComfyUI-style setup: the transformer from Stability's single file and the three text
/// encoders from their own files (clip_l, clip_g, t5xxl), named in `easel.json`, with the
/// folder holding only configs, tokenizers, the VAE and the scheduler.
#[test]
fn medium_from_single_files_for_transformer_and_text_encoders_matches_diffusers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sd35m");
    copy_dir(&pipeline("sd35m-tiny"), &dir);
    for (component, file) in [("text_encoder", "clip_l.safetensors"), ("text_encoder_2", "clip_g.safetensors"), ("text_encoder_3", "t5xxl.safetensors")] {
        std::fs::rename(dir.join(component).join("model.safetensors"), dir.join(file)).unwrap();
    }
    std::fs::remove_file(dir.join("transformer/diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::copy(pipeline("sd35m-tiny-sai.safetensors"), dir.join("sd3.5_medium.safetensors")).unwrap();
    let easel_json = r#"{"max_sequence_length": 24, "transformer": "sd3.5_medium.safetensors", "clip_l": "clip_l.safetensors", "clip_g": "clip_g.safetensors", "t5": "t5xxl.safetensors"}"#;
    std::fs::write(dir.join("easel.json"), easel_json).unwrap();
    let pipe = match Pipeline::load(&dir, &LoadOptions::default()).expect("load") {
        Pipeline::Sd3(p) => p,
        _ => panic!("not SD 3.5"),
    };
    assert_eq!(pipe.transformer_source(), TransformerSource::ReferenceFile);
    let (out, t) = run_case(&pipe, "sd35m-tiny-cfg");
    assert_matches("sd35m-tiny from single files", &out, &t);
    // A named file that is not there is one clear error naming it.
    std::fs::remove_file(dir.join("clip_g.safetensors")).unwrap();
    let e = Pipeline::load(&dir, &LoadOptions::default()).err().expect("refused").to_string();
    assert!(e.contains("clip_g.safetensors") && e.contains("text_encoder_2"), "{e}");
}

/// PSNR of the decoded image against the unquantized reference, per community GGUF type
/// (measured 51.0 dB for q8_0 and 36.8 dB for q4_0 on the tiny model).
#[test]
fn community_gguf_files_stay_close_to_the_unquantized_output() {
    for (q, min_db) in [("q8_0", 48.0), ("q4_0", 33.0)] {
        let pipe = load("sd35m-tiny", Some(pipeline(&format!("sd35m-tiny-{q}.gguf"))));
        assert_eq!(pipe.transformer_source(), TransformerSource::Gguf);
        let (out, t) = run_case(&pipe, "sd35m-tiny-cfg");
        let db = psnr(&out.decoded, &t["image"]);
        println!("{q}: weights {} bytes ({}), latents rel L2 {:.2e}, image PSNR {db:.1} dB", pipe.weights_memory().0, pipe.weights_memory().1, rel_l2(&out.latents, &t["latents"]));
        assert!(pipe.weights_memory().1.contains(q), "{q}: {}", pipe.weights_memory().1);
        assert!(db >= min_db, "{q}: PSNR {db:.1} dB below {min_db}");
    }
}

#[test]
fn one_transformer_evaluation_with_and_without_skipped_layers_matches_diffusers() {
    for name in ["sd35m-tiny", "sd35l-tiny"] {
        let pipe = load(name, None);
        let (t, _) = reference(&format!("{name}-components.safetensors"));
        let run = |skip: &[usize]| {
            pipe.transformer()
                .forward(&MmditInputs { x: &t["transformer_hidden"], timesteps: &t["transformer_timestep"], pooled: &t["transformer_pooled"], context: &t["transformer_context"], skip_layers: skip })
                .unwrap()
        };
        let err = rel_l2(&run(&[]), &t["transformer_out"]);
        println!("{name} transformer: rel L2 {err:.2e}");
        assert!(err < LATENTS_BOUND, "{name} transformer: {err:.2e}");
        if let Some(skipped) = t.get("transformer_out_skip1") {
            let err = rel_l2(&run(&[1]), skipped);
            println!("{name} transformer skipping layer 1: rel L2 {err:.2e}");
            assert!(err < LATENTS_BOUND, "{name} skip: {err:.2e}");
        }
    }
}

#[test]
fn prompt_embeddings_match_diffusers_with_and_without_t5() {
    for (name, case) in [("sd35m-tiny", "sd35m-tiny-cfg"), ("sd35l-tiny", "sd35l-tiny-noguidance")] {
        let pipe = load(name, None);
        let (t, meta) = reference(&format!("{case}.safetensors"));
        let (states, pooled) = pipe.encode_prompt(&meta["prompt"]).unwrap();
        let (e_states, e_pooled) = (rel_l2(&states, &t["prompt_embeds"].narrow(0, 0, 1).unwrap()), rel_l2(&pooled, &t["pooled_prompt_embeds"].narrow(0, 0, 1).unwrap()));
        println!("{name}: prompt states rel L2 {e_states:.2e}, pooled {e_pooled:.2e}");
        assert!(e_states < LATENTS_BOUND && e_pooled < LATENTS_BOUND, "{name}: states {e_states:.2e}, pooled {e_pooled:.2e}");
    }
}

#[test]
fn scheduler_tables_match_diffusers_shifted_twice_at_the_low_end() {
    let (t, _) = reference("sd35m-tiny-components.safetensors");
    let config: easel_engine::config::SchedulerConfig = easel_engine::config::read_json(&pipeline("sd35m-tiny").join("scheduler/scheduler_config.json")).unwrap();
    for steps in [1, 4, 5, 8, 28, 40] {
        let s = FlowMatchEuler::sd3(&config, steps).unwrap();
        let f32s = |name: String| -> Vec<f32> { t[&name].to_dtype(easel_engine::DType::F32).unwrap().to_vec1().unwrap() };
        let (want_t, want_s) = (f32s(format!("scheduler/{steps}/timesteps")), f32s(format!("scheduler/{steps}/sigmas")));
        let got_t: Vec<f32> = s.timesteps().iter().map(|&x| x as f32).collect();
        let got_s: Vec<f32> = s.sigmas().unwrap().iter().map(|&x| x as f32).collect();
        assert_eq!(got_t, want_t, "{steps} steps: timesteps");
        assert_eq!(got_s, want_s, "{steps} steps: sigmas");
    }
}

#[test]
fn sizes_must_be_multiples_of_16_and_other_schedulers_are_refused() {
    let pipe = load("sd35l-tiny", None);
    let base = GenerateParams {
        prompt: "a".into(),
        negative_prompt: None,
        width: 48,
        height: 80,
        steps: 2,
        guidance: 0.0,
        seed: 1,
        batch: 1,
        scheduler: None,
        init_latents: None,
        skip_layer_guidance: None,
        step_cache: None,
        controlnets: Vec::new(),
        ip_adapter: None,
        init_image: None,
    };
    let e = pipe.validate(&GenerateParams { width: 40, ..base.clone() }).unwrap_err().to_string();
    assert!(e.contains("width") && e.contains("16"), "{e}");
    let e = pipe.validate(&GenerateParams { scheduler: Some(easel_engine::SchedulerKind::Euler), ..base.clone() }).unwrap_err().to_string();
    assert!(e.contains("scheduler") && e.contains("flow-match-euler"), "{e}");
    let slg = SkipLayerGuidance { layers: vec![9], scale: 2.8, start: 0.01, stop: 0.2 };
    let e = pipe.validate(&GenerateParams { skip_layer_guidance: Some(slg), ..base.clone() }).unwrap_err().to_string();
    assert!(e.contains("skip_layer_guidance") && e.contains("layer 9"), "{e}");
    // The position table covers 12 patches of 2 latent cells of 8 pixels: 192 pixels.
    let e = pipe.validate(&GenerateParams { width: 208, ..base }).unwrap_err().to_string();
    assert!(e.contains("width") && e.contains("192"), "{e}");
}
