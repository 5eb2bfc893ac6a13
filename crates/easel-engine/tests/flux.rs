//! FLUX against diffusers: the tiny dev-like and schnell-like pipelines from
//! `tools/fixtures/make_flux_fixtures.py`, from the same packed init latents, must give
//! diffusers' final latents (relative L2 < 2e-5; measured at most 2.3e-6) and images
//! (PSNR >= 110 dB; measured at least 122 dB); likewise with the
//! transformer read from the BFL-named single file. Quantized weights (the community's GGUF
//! layout, and easel's own quantizer) are held to the unquantized output within stated bounds.

mod common;

use std::path::PathBuf;

use common::{copy_dir, fixtures, psnr, reference, rel_l2};
use easel_engine::pipelines::flux::{latent_ids, pack, unpack};
use easel_engine::models::flux::FluxInputs;
use easel_engine::scheduler::FlowMatchEuler;
use easel_engine::{GenerateParams, Generated, LoadOptions, Pipeline, Tensor};

fn pipeline(name: &str) -> PathBuf {
    fixtures().join("pipelines").join(name)
}

fn load(name: &str, transformer: Option<PathBuf>) -> easel_engine::FluxPipeline {
    match Pipeline::load(&pipeline(name), &LoadOptions { transformer, ..Default::default() }).expect("load") {
        Pipeline::Flux(p) => p,
        _ => panic!("{name} is not loaded as FLUX"),
    }
}

/// Runs the reference case of `reference_name` and returns (output, reference tensors).
fn run_case(pipe: &easel_engine::FluxPipeline, reference_name: &str) -> (Generated, std::collections::HashMap<String, Tensor>) {
    let (t, meta) = reference(&format!("{reference_name}.safetensors"));
    let params = GenerateParams {
        prompt: meta["prompt"].clone(),
        negative_prompt: None,
        width: meta["width"].parse().unwrap(),
        height: meta["height"].parse().unwrap(),
        steps: meta["steps"].parse().unwrap(),
        guidance: meta["guidance"].parse().unwrap(),
        seed: 0,
        batch: 1,
        scheduler: None,
        init_latents: Some(t["init_latents"].clone()),
        skip_layer_guidance: None,
        step_cache: None,
        controlnets: Vec::new(),
        ip_adapter: None,
        init_image: None,
    };
    (pipe.generate(&params, &mut |_| true).expect("generate"), t)
}

fn assert_matches(label: &str, out: &Generated, t: &std::collections::HashMap<String, Tensor>) {
    let err = rel_l2(&out.latents, &t["latents"]);
    let db = psnr(&out.decoded, &t["image"]);
    println!("{label}: latents rel L2 {err:.2e}, image PSNR {db:.1} dB");
    assert!(err < 2e-5 && db >= 110.0, "{label} differs from diffusers: rel L2 {err:.2e}, PSNR {db:.1} dB");
}

#[test]
fn flux_dev_matches_diffusers() {
    let pipe = load("flux-dev-tiny", None);
    assert!(pipe.uses_guidance());
    let (out, t) = run_case(&pipe, "flux-dev-tiny");
    assert_matches("flux-dev-tiny (diffusers layout)", &out, &t);
}

/// Unlike flux-dev-tiny on every axis: CLIP width 24, T5 width 40 with 128-token prompts (from
/// the model's easel.json), 3 heads of 8 with rotary axes (2, 4, 2), more double than single
/// blocks, a 3-level VAE (factor 4), another shift, and a tall image (48x96).
#[test]
fn flux_dev_variant_with_other_widths_and_a_tall_image_matches_diffusers() {
    let pipe = load("flux-dev-var-tiny", None);
    let (out, t) = run_case(&pipe, "flux-dev-var-tiny");
    assert_matches("flux-dev-var-tiny", &out, &t);
}

#[test]
fn flux_schnell_matches_diffusers() {
    let pipe = load("flux-schnell-tiny", None);
    assert!(!pipe.uses_guidance());
    let (out, t) = run_case(&pipe, "flux-schnell-tiny");
    assert_matches("flux-schnell-tiny", &out, &t);
}

#[test]
fn flux_dev_from_the_bfl_single_file_matches_diffusers() {
    let pipe = load("flux-dev-tiny", Some(pipeline("flux-dev-tiny-bfl.safetensors")));
    assert_eq!(pipe.transformer_source(), easel_engine::pipelines::common::TransformerSource::ReferenceFile);
    let (out, t) = run_case(&pipe, "flux-dev-tiny");
    assert_matches("flux-dev-tiny (BFL single file)", &out, &t);
}

/// PSNR of the decoded image against the unquantized reference, per GGUF type. The bounds are
/// the documented quality loss of the tiny model (docs/flux.md); q8_0 is near-lossless.
#[test]
fn community_gguf_files_stay_close_to_the_unquantized_output() {
    let mut bytes = vec![];
    for (q, min_db) in [("q8_0", 55.0), ("q5_1", 40.0), ("q4_0", 35.0)] {
        let pipe = load("flux-dev-tiny", Some(pipeline(&format!("flux-dev-tiny-{q}.gguf"))));
        let (out, t) = run_case(&pipe, "flux-dev-tiny");
        let db = psnr(&out.decoded, &t["image"]);
        let err = rel_l2(&out.latents, &t["latents"]);
        println!("{q}: weights {} bytes ({}), latents rel L2 {err:.2e}, image PSNR {db:.1} dB", pipe.weights_memory().0, pipe.weights_memory().1);
        assert!(db >= min_db, "{q}: PSNR {db:.1} dB below {min_db}");
        assert!(pipe.weights_memory().1.contains(q), "{q}: {}", pipe.weights_memory().1);
        bytes.push(pipe.weights_memory().0);
    }
    assert!(bytes[0] > bytes[1] && bytes[1] > bytes[2], "sizes do not shrink with the type: {bytes:?}");
}

#[test]
fn easel_quantizer_output_loads_and_stays_close() {
    let dir = tempfile::tempdir().unwrap();
    let (w, _) = easel_engine::pipelines::flux::read_transformer(&pipeline("flux-dev-tiny"), None, easel_engine::DType::F32, &easel_engine::Device::Cpu).unwrap();
    let tensors = w.into_dense().unwrap();
    for (q, min_db) in [("q8_0", 55.0), ("q5_0", 40.0), ("q5_1", 40.0), ("q4_0", 35.0), ("q4_1", 35.0), ("q4_k", 35.0)] {
        let path = dir.path().join(format!("{q}.gguf"));
        easel_engine::weights::gguf::quantize_weights(&tensors, easel_engine::weights::gguf::parse_quant_type(q).unwrap(), "flux", &path).unwrap();
        let pipe = load("flux-dev-tiny", Some(path));
        let (out, t) = run_case(&pipe, "flux-dev-tiny");
        let db = psnr(&out.decoded, &t["image"]);
        println!("easel {q}: {} bytes ({}), image PSNR {db:.1} dB", pipe.weights_memory().0, pipe.weights_memory().1);
        assert!(db >= min_db, "{q}: PSNR {db:.1} dB below {min_db}");
    }
}

#[test]
fn one_transformer_step_and_the_latent_ids_match_diffusers() {
    for (name, grid) in [("flux-dev-tiny", (4, 5)), ("flux-schnell-tiny", (4, 5)), ("flux-dev-var-tiny", (12, 6))] {
        let pipe = load(name, None);
        let (t, _) = reference(&format!("{name}-components.safetensors"));
        let ids = &t["transformer_hidden"];
        let guidance = t.get("transformer_guidance");
        let out = pipe
            .transformer()
            .forward(&FluxInputs {
                img: ids,
                img_ids: &t["img_ids"],
                txt: &t["transformer_context"],
                txt_ids: &Tensor::zeros((7, 3), easel_engine::DType::F32, &easel_engine::Device::Cpu).unwrap(),
                timesteps: &t["transformer_timestep"],
                pooled: &t["transformer_pooled"],
                guidance,
            })
            .unwrap();
        let err = rel_l2(&out, &t["transformer_out"]);
        println!("{name} transformer: rel L2 {err:.2e}");
        assert!(err < 1e-4, "{name} transformer differs: {err:.2e}");
        let ids = latent_ids(grid.0, grid.1, &easel_engine::Device::Cpu).unwrap();
        assert_eq!(ids.to_vec2::<f32>().unwrap(), t["img_ids"].to_vec2::<f32>().unwrap());
    }
}

#[test]
fn t5_hidden_states_and_clip_pooled_output_match_transformers() {
    // The conditioning the fixtures store for the prompt: T5's last hidden state (512, 256 and
    // 128 tokens) and CLIP's pooled output, each from the pipeline's own encoders.
    for name in ["flux-dev-tiny", "flux-schnell-tiny", "flux-dev-var-tiny"] {
        let pipe = load(name, None);
        let (t, _) = reference(&format!("{name}-components.safetensors"));
        let (t5, pooled) = pipe.encode_prompt("a red circle on a blue background, high quality").unwrap();
        assert_eq!(t5.dims(), t["t5_hidden"].dims(), "{name}: T5 states shape");
        let e_t5 = rel_l2(&t5, &t["t5_hidden"]);
        let e_pooled = rel_l2(&pooled, &t["clip_pooled"]);
        println!("{name}: T5 states rel L2 {e_t5:.2e}, CLIP pooled rel L2 {e_pooled:.2e}");
        // Measured: T5 2.6e-6 (dev) and 4.2e-7 (schnell), pooled 2.9e-7 and 1.8e-7.
        assert!(e_t5 < 1e-5 && e_pooled < 2.5e-6, "{name}: T5 {e_t5:.2e}, CLIP pooled {e_pooled:.2e}");
    }
}

#[test]
fn t5_tokens_and_states_match_transformers() {
    use easel_engine::tokenizer::PromptTokenizer;
    for (name, max_len) in [("flux-dev-tiny", 512), ("flux-schnell-tiny", 256), ("flux-dev-var-tiny", 128)] {
        let (t, _) = reference(&format!("{name}-components.safetensors"));
        let tok = PromptTokenizer::from_dir(&pipeline(name).join("tokenizer_2"), max_len).unwrap();
        for key in ["prompt", "empty", "long"] {
            let text = match key {
                "prompt" => "a red circle on a blue background, high quality".to_string(),
                "empty" => String::new(),
                _ => vec!["a small red circle"; 200].join(" "),
            };
            let got: Vec<i64> = tok.encode(&text).unwrap().ids.iter().map(|&i| i as i64).collect();
            let want = t[&format!("t5_ids_{key}")].flatten_all().unwrap().to_vec1::<i64>().unwrap();
            assert_eq!(got, want, "{name} T5 ids for {key}");
        }
    }
}

#[test]
fn packing_round_trips_and_matches_the_diffusers_layout() {
    let x = Tensor::arange(0f32, 2.0 * 16.0 * 8.0 * 10.0, &easel_engine::Device::Cpu).unwrap().reshape((2, 16, 8, 10)).unwrap();
    let packed = pack(&x).unwrap();
    assert_eq!(packed.dims(), &[2, 20, 64]);
    // Token (row 1, column 2), feature (channel 3, dy 1, dx 0) is pixel (3, 2*1+1, 2*2+0).
    let v = packed.get(0).unwrap().get(5 + 2).unwrap().get(3 * 4 + 2).unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(v, x.get(0).unwrap().get(3).unwrap().get(3).unwrap().get(4).unwrap().to_scalar::<f32>().unwrap());
    let back = unpack(&packed, 4, 5).unwrap();
    assert_eq!(back.flatten_all().unwrap().to_vec1::<f32>().unwrap(), x.flatten_all().unwrap().to_vec1::<f32>().unwrap());
}

#[test]
fn flow_match_schedules_match_diffusers() {
    let (t, _) = reference("flux-scheduler-tables.safetensors");
    for (variant, dynamic, shift) in [("flux-dev-tiny", true, 3.0), ("flux-schnell-tiny", false, 1.0)] {
        let cfg: easel_engine::config::SchedulerConfig = serde_json::from_value(serde_json::json!({
            "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "max_image_seq_len": 4096,
            "base_shift": 0.5, "max_shift": 1.15, "shift": shift, "use_dynamic_shifting": dynamic, "num_train_timesteps": 1000
        }))
        .unwrap();
        for steps in [1, 4, 28, 50] {
            for seq in [16, 256, 1024, 4096, 6000] {
                let s = FlowMatchEuler::new(&cfg, steps, seq).unwrap();
                let key = format!("{variant}/{steps}/{seq}");
                let want_t = t[&format!("{key}/timesteps")].to_vec1::<f64>().unwrap();
                let want_s = t[&format!("{key}/sigmas")].to_vec1::<f64>().unwrap();
                use easel_engine::scheduler::Scheduler;
                for (a, b) in s.timesteps().iter().zip(&want_t).chain(s.sigmas().unwrap().iter().zip(&want_s)) {
                    assert!((a - b).abs() < 1e-4 * b.abs().max(1.0), "{key}: {a} vs {b}");
                }
                assert_eq!(s.timesteps().len(), want_t.len(), "{key}");
            }
        }
    }
}

#[test]
fn bad_flux_input_gets_clear_errors() {
    let pipe = load("flux-schnell-tiny", None);
    let p = GenerateParams {
        prompt: "x".into(),
        negative_prompt: None,
        width: 72,
        height: 64,
        steps: 4,
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
    let e = pipe.validate(&p).unwrap_err().to_string();
    assert!(e.contains("width") && e.contains("multiple of 16"), "{e}");
    let e = pipe.validate(&GenerateParams { width: 64, scheduler: Some(easel_engine::SchedulerKind::Euler), ..p.clone() }).unwrap_err().to_string();
    assert!(e.contains("flow-match-euler"), "{e}");
    let wrong = Tensor::zeros((1, 16, 8, 8), easel_engine::DType::F32, &easel_engine::Device::Cpu).unwrap();
    let e = pipe.validate(&GenerateParams { width: 64, init_latents: Some(wrong), ..p }).unwrap_err().to_string();
    assert!(e.contains("packed") && e.contains("[1, 16, 64]"), "{e}");
}

#[test]
fn weights_that_do_not_fit_the_config_name_the_tensor_and_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&pipeline("flux-dev-tiny"), dir.path());
    let cfg_path = dir.path().join("transformer/config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["joint_attention_dim"] = 64.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    for weights in [None, Some(pipeline("flux-dev-tiny-q8_0.gguf")), Some(pipeline("flux-dev-tiny-bfl.safetensors"))] {
        let e = Pipeline::load(dir.path(), &LoadOptions { transformer: weights.clone(), ..Default::default() }).err().expect("must fail").to_string();
        assert!(e.contains("`txt_in.weight`") && e.contains("[32, 32]") && e.contains("[32, 64]"), "{weights:?}: {e}");
    }
}

#[test]
fn unreadable_gguf_types_are_named_with_the_supported_ones() {
    // A GGUF header with one IQ4_XS (type 23) tensor, which candle cannot read.
    let mut b: Vec<u8> = vec![];
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    let name = b"img_in.weight";
    b.extend((name.len() as u64).to_le_bytes());
    b.extend(name);
    b.extend(2u32.to_le_bytes());
    b.extend(256u64.to_le_bytes());
    b.extend(32u64.to_le_bytes());
    b.extend(23u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.resize(b.len() + 4096, 0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("iq4.gguf");
    std::fs::write(&path, b).unwrap();
    let e = Pipeline::load(&pipeline("flux-dev-tiny"), &LoadOptions { transformer: Some(path), ..Default::default() }).err().expect("must fail").to_string();
    assert!(e.contains("IQ4_XS") && e.contains("Q8_0") && e.contains("Q4_K"), "{e}");
}

/// `offload_text_encoders` keeps CLIP and T5 on the CPU in f32 and sends only their outputs to
/// the pipeline's device: the conditioning, and so the output, must still be diffusers'.
#[test]
fn flux_dev_with_offloaded_text_encoders_matches_diffusers() {
    let pipe = match Pipeline::load(&pipeline("flux-dev-tiny"), &LoadOptions { offload_text_encoders: true, ..Default::default() }).expect("load") {
        Pipeline::Flux(p) => p,
        _ => panic!("not FLUX"),
    };
    let (out, t) = run_case(&pipe, "flux-dev-tiny");
    assert_matches("flux-dev-tiny (text encoders offloaded)", &out, &t);
}
