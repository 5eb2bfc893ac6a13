//! LoRA stacks against diffusers: LoRAs made with peft for the tiny SD-1.5-like, SDXL-like,
//! FLUX-like and SD-3.5-medium-like pipelines (tools/fixtures/make_lora_fixtures.py), in
//! diffusers/PEFT format and (except SD 3.5, which diffusers loads from PEFT files only) the same
//! LoRAs in kohya format, one LoRA and a stack of two with different scales, must give
//! diffusers' final latents (`pipe.load_lora_weights` + `set_adapters`) within relative L2
//! 1.5e-5 (measured at most 1.6e-6 on 2026-11-30).

mod common;

use std::path::PathBuf;

use common::{fixtures, reference, rel_l2};
use easel_engine::weights::lora::LoraSpec;
use easel_engine::{GenerateParams, LoadOptions, Pipeline, SchedulerKind};

fn load(name: &str, transformer: Option<PathBuf>) -> Pipeline {
    Pipeline::load(&fixtures().join("pipelines").join(name), &LoadOptions { transformer, ..Default::default() }).expect("load")
}

fn lora(name: &str) -> PathBuf {
    fixtures().join("loras").join(name)
}

/// The reference case `{pipeline}-lora-{case}`: its parameters and tensors.
fn case(pipeline: &str, case: &str) -> (GenerateParams, std::collections::HashMap<String, easel_engine::Tensor>) {
    let (t, meta) = reference(&format!("{pipeline}-lora-{case}.safetensors"));
    let params = GenerateParams {
        prompt: meta["prompt"].clone(),
        negative_prompt: meta.get("negative_prompt").cloned(),
        width: meta["width"].parse().unwrap(),
        height: meta["height"].parse().unwrap(),
        steps: meta["num_inference_steps"].parse().unwrap(),
        guidance: meta["guidance_scale"].parse().unwrap(),
        seed: 0,
        batch: 1,
        scheduler: if pipeline.starts_with("flux") || pipeline.starts_with("sd35") { None } else { Some(SchedulerKind::Euler) },
        init_latents: Some(t["init_latents"].clone()),
        skip_layer_guidance: None,
        step_cache: None,
        controlnets: Vec::new(),
        ip_adapter: None,
        init_image: None,
    };
    (params, t)
}

/// Runs the reference case with `stack` and returns the rel L2 error of the final latents.
fn error_against_reference(pipe: &Pipeline, pipeline: &str, name: &str, stack: &[LoraSpec]) -> f64 {
    let (params, t) = case(pipeline, name);
    let out = pipe.with_loras(stack).expect("apply the stack").generate(&params, None, &mut |_| true).expect("generate");
    rel_l2(&out.latents, &t["latents"])
}

fn stacks(pipeline: &str, suffix: &str) -> [(&'static str, Vec<LoraSpec>); 2] {
    let spec = |tag: &str, scale: f64| LoraSpec { path: lora(&format!("{pipeline}-{tag}{suffix}.safetensors")), scale };
    [("one", vec![spec("a", 0.8)]), ("stack", vec![spec("a", 0.7), spec("b", -0.5)])]
}

fn check(pipeline: &str, transformer: Option<PathBuf>) {
    let pipe = load(pipeline, transformer);
    let mut failures = vec![];
    let formats: &[(&str, &str)] = if pipeline.starts_with("sd35") { &[("diffusers", "")] } else { &[("diffusers", ""), ("kohya", "-kohya")] };
    for &(format, suffix) in formats {
        for (name, stack) in stacks(pipeline, suffix) {
            let err = error_against_reference(&pipe, pipeline, name, &stack);
            println!("{pipeline} {format} {name}: latents rel L2 {err:.2e}");
            if !(err < 1.5e-5) {
                failures.push(format!("{format} {name}: {err:.2e}"));
            }
        }
    }
    // The base weights are never changed: an empty stack gives the LoRA-free output again.
    let (params, t) = case(pipeline, "one");
    let out = pipe.with_loras(&[]).unwrap().generate(&params, None, &mut |_| true).unwrap();
    let err = rel_l2(&out.latents, &t["base_latents"]);
    assert!(err < 1.5e-5, "{pipeline}: without LoRAs: {err:.2e}");
    assert!(failures.is_empty(), "{pipeline} differs from diffusers: {failures:?}");
}

#[test]
fn sd15_lora_stacks_match_diffusers() {
    check("sd15-tiny", None);
}

#[test]
fn sdxl_lora_stacks_match_diffusers() {
    check("sdxl-tiny", None);
}

#[test]
fn flux_lora_stacks_match_diffusers() {
    check("flux-dev-tiny", None);
}

/// PEFT LoRAs in diffusers' SD3 naming (split q/k/v onto Stability's fused qkv, the dual
/// attention's attn2, the last block's and the final norm's swapped halves, a CLIP-L part).
#[test]
fn sd35_lora_stacks_match_diffusers() {
    check("sd35m-tiny", None);
}

/// Quantized weights keep LoRAs beside them (low-rank at run time). With GGUF tensors stored
/// as F32 the run-time path must equal the merged one, so diffusers is matched exactly.
#[test]
fn flux_lora_runs_beside_gguf_weights() {
    let dir = tempfile::tempdir().unwrap();
    let (w, _) = easel_engine::pipelines::flux::read_transformer(&fixtures().join("pipelines/flux-dev-tiny"), None, easel_engine::DType::F32, &easel_engine::Device::Cpu).unwrap();
    let path = dir.path().join("f32.gguf");
    easel_engine::weights::gguf::quantize_weights(&w.into_dense().unwrap(), candle_core::quantized::GgmlDType::F32, "flux", &path).unwrap();
    let pipe = load("flux-dev-tiny", Some(path));
    for (name, stack) in stacks("flux-dev-tiny", "-kohya") {
        let err = error_against_reference(&pipe, "flux-dev-tiny", name, &stack);
        println!("flux-dev-tiny GGUF (F32) run-time LoRA {name}: latents rel L2 {err:.2e}");
        assert!(err < 1.5e-5, "{name}: {err:.2e}");
    }
    // And on q8_0 weights the LoRA still moves the output the same way.
    let pipe = load("flux-dev-tiny", Some(fixtures().join("pipelines/flux-dev-tiny-q8_0.gguf")));
    let err = error_against_reference(&pipe, "flux-dev-tiny", "stack", &stacks("flux-dev-tiny", "")[1].1);
    println!("flux-dev-tiny q8_0 run-time LoRA stack: latents rel L2 {err:.2e}");
    assert!(err < 2e-2, "q8_0: {err:.2e}");
}

#[test]
fn bad_loras_get_clear_errors() {
    let sd15 = load("sd15-tiny", None);
    let apply = |pipe: &Pipeline, path: PathBuf, scale: f64| pipe.with_loras(&[LoraSpec { path, scale }]).err().expect("must fail").to_string();
    // Another size: a LoRA whose matrices are wider than the layer; another family: an SDXL
    // LoRA on SD 1.5 targets a second text encoder SD 1.5 lacks.
    let dir = tempfile::tempdir().unwrap();
    let mut wider = easel_engine::read_tensors(&lora("sd15-tiny-a.safetensors")).unwrap();
    let key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight";
    wider.insert(key.into(), easel_engine::Tensor::zeros((64, 4), easel_engine::DType::F32, &easel_engine::Device::Cpu).unwrap());
    let wider_path = dir.path().join("wider.safetensors");
    candle_core::safetensors::save(&wider, &wider_path).unwrap();
    let e = apply(&sd15, wider_path, 1.0);
    assert!(e.contains("attn1.to_q") && e.contains("[64, 4]") && e.contains("of shape [16, 16]"), "{e}");
    let e = apply(&sd15, lora("sdxl-tiny-a.safetensors"), 1.0);
    assert!(e.contains("text_encoder_2") && e.contains("matches no layer"), "{e}");
    // FLUX names match nothing in a UNet.
    let e = apply(&sd15, lora("flux-dev-tiny-a-kohya.safetensors"), 1.0);
    assert!(e.contains("matches no layer") && e.contains("kohya") && e.contains("PEFT"), "{e}");
    let e = apply(&sd15, lora("sd15-tiny-a.safetensors"), f64::NAN);
    assert!(e.contains("finite"), "{e}");
    // A file with no LoRA tensors (the VAE's weights).
    let e = apply(&sd15, fixtures().join("pipelines/sd15-tiny/vae/diffusion_pytorch_model.safetensors"), 1.0);
    assert!(e.contains("not a LoRA tensor") && e.contains("formats tried"), "{e}");
    let e = apply(&sd15, lora("missing.safetensors"), 1.0);
    assert!(e.contains("missing.safetensors"), "{e}");
}
