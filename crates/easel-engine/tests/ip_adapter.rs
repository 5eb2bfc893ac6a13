//! IP-Adapters against diffusers' `load_ip_adapter` + `ip_adapter_image` on the tiny
//! pipelines, with tiny random adapters and CLIP image encoders made by
//! tools/fixtures/make_ip_adapter_fixtures.py (h94/IP-Adapter's layout under
//! fixtures/ip_adapters). From the same init latents and reference picture easel must give
//! diffusers' final latents. The cases vary what changes the arithmetic: plain and Plus
//! projections, SD 1.x and SDXL (different layer numbering), two encoders (exact and quick
//! GELU, different sizes), pictures shrunk, enlarged and not resized, guided and unguided, two
//! images per prompt, and an adapter stacked with a ControlNet or a LoRA. Each case also runs
//! without its adapter, to show the adapter moves the output far more than the bound.

mod common;

use std::sync::Arc;

use common::fixtures;
use easel_engine::parity::{psnr, rel_l2, Reference};
use easel_engine::weights::lora::LoraSpec;
use easel_engine::{ControlNet, ControlUnit, DType, Device, GenerateParams, IpAdapter, IpAdapterUnit, LoadOptions, Pipeline, RgbPicture};

/// Relative L2 bound on the final latents: the largest error measured over these cases
/// (1.06e-6, 2026-12-02) times 7.5 (see each case's printout).
const LATENTS_BOUND: f64 = 8e-6;
/// Decoded images must agree to at least this PSNR (the lowest measured, 130.4 dB, less 9 dB).
const IMAGE_PSNR_DB: f64 = 121.0;
/// Relative L2 bound on the image encoder's output and the image tokens (largest measured
/// 3.9e-7, times 7.7).
const COMPONENT_BOUND: f64 = 3e-6;

#[derive(serde::Deserialize)]
struct AdapterMeta {
    path: String,
    encoder: String,
    scale: f64,
    image: String,
}

#[derive(serde::Deserialize)]
struct ControlMeta {
    path: String,
    scale: f64,
    start: f64,
    end: f64,
    image: String,
}

#[derive(serde::Deserialize)]
struct LoraMeta {
    path: String,
    scale: f64,
}

fn reference(case: &str) -> Reference {
    Reference::load(&fixtures().join("reference").join(format!("{case}.safetensors"))).expect("reference")
}

fn adapter_meta(reference: &Reference) -> AdapterMeta {
    serde_json::from_str(&reference.meta["ip_adapter"]).expect("ip_adapter metadata")
}

fn load_adapter(meta: &AdapterMeta) -> Arc<IpAdapter> {
    let encoder = fixtures().join(&meta.encoder);
    Arc::new(IpAdapter::load(&fixtures().join(&meta.path), Some(&encoder), DType::F32, &Device::Cpu).expect("load the IP-Adapter"))
}

/// A `[1, 3, H, W]` u8 tensor as an RGB picture.
fn picture(t: &easel_engine::Tensor) -> RgbPicture {
    let (_, _, h, w) = t.dims4().unwrap();
    let bytes = t.squeeze(0).unwrap().permute((1, 2, 0)).unwrap().flatten_all().unwrap().to_vec1::<u8>().unwrap();
    RgbPicture::new(w, h, bytes).unwrap()
}

/// The reference's pipeline (with its LoRA merged) and request (with its adapter and ControlNets).
fn setup(reference: &Reference) -> (Pipeline, GenerateParams) {
    let pipe = Pipeline::load(&fixtures().join("pipelines").join(&reference.meta["pipeline"]), &LoadOptions::default()).expect("load");
    let pipe = match reference.meta.get("lora") {
        Some(lora) => {
            let lora: LoraMeta = serde_json::from_str(lora).unwrap();
            pipe.with_loras(&[LoraSpec { path: fixtures().join(lora.path), scale: lora.scale }]).expect("merge the LoRA")
        }
        None => pipe,
    };
    let mut params = reference.params().expect("reference request");
    let meta = adapter_meta(reference);
    params.ip_adapter = Some(IpAdapterUnit { adapter: load_adapter(&meta), picture: picture(reference.tensor(&meta.image).unwrap()), scale: meta.scale });
    if let Some(units) = reference.meta.get("controlnets") {
        for u in serde_json::from_str::<Vec<ControlMeta>>(units).unwrap() {
            let net = Arc::new(ControlNet::load(&fixtures().join(&u.path), None, DType::F32, &Device::Cpu).unwrap());
            let image = (reference.tensor(&u.image).unwrap().to_dtype(DType::F32).unwrap() / 255.0).unwrap();
            params.controlnets.push(ControlUnit { net, image, scale: u.scale, start: u.start, end: u.end, mode: None });
        }
    }
    (pipe, params)
}

fn check(case: &str) {
    let reference = reference(case);
    let (pipe, mut params) = setup(&reference);
    let want = reference.tensor("latents").unwrap();
    let out = pipe.generate(&params, None, &mut |_| true).expect("generate");
    let (err, db) = (rel_l2(&out.latents, want).unwrap(), psnr(&out.decoded, reference.tensor("image").unwrap()).unwrap());
    params.ip_adapter = None;
    let without = pipe.generate(&params, None, &mut |_| true).expect("generate without the IP-Adapter");
    let moved = rel_l2(&without.latents, want).unwrap();
    println!("{case}: latents rel L2 {err:.2e}, image PSNR {db:.1} dB; without its IP-Adapter {moved:.2e}");
    assert!(err < LATENTS_BOUND && db >= IMAGE_PSNR_DB, "{case} differs from diffusers: rel L2 {err:.2e}, PSNR {db:.1} dB");
    assert!(moved > 1000.0 * LATENTS_BOUND, "{case}: the IP-Adapter barely changes the output ({moved:.2e})");
}

const CASES: [&str; 4] = [
    "sd15-var-tiny-ip-adapter-euler",
    "sd15-var-tiny-ip-adapter-plus-controlnet-dpmpp-2m-batch",
    "sdxl-var-tiny-ip-adapter-euler",
    "sdxl-tiny-ip-adapter-plus-lora-unguided",
];

#[test]
fn sd15_plain_ip_adapter_on_a_shrunk_wide_picture_matches_diffusers() {
    check(CASES[0]);
}

#[test]
fn sd15_plus_ip_adapter_with_a_controlnet_two_images_per_prompt_and_an_unresized_picture_matches_diffusers() {
    check(CASES[1]);
}

#[test]
fn sdxl_plain_ip_adapter_with_a_quick_gelu_encoder_on_a_tall_image_matches_diffusers() {
    check(CASES[2]);
}

#[test]
fn sdxl_plus_ip_adapter_with_a_lora_unguided_on_an_enlarged_picture_matches_diffusers() {
    check(CASES[3]);
}

/// CLIP's image processing is exact (the same bytes after Pillow's bicubic, the same f32
/// arithmetic after), and the encoder and projection agree with transformers and diffusers.
#[test]
fn clip_image_processing_encoder_and_projection_match_transformers_in_every_case() {
    for case in CASES {
        let reference = reference(case);
        let meta = adapter_meta(&reference);
        let adapter = load_adapter(&meta);
        let picture = picture(reference.tensor(&meta.image).unwrap());
        let pixels = adapter.pixel_values(&picture, &Device::Cpu).unwrap();
        let want = reference.tensor("pixel_values").unwrap();
        let pixel_diff = (&pixels - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let encoded = adapter.encode(&pixels).unwrap();
        let encoder_err = rel_l2(&encoded, reference.tensor("image_embeds").unwrap()).unwrap();
        let tokens = adapter.tokens(&picture, DType::F32, &Device::Cpu).unwrap().positive;
        let want_tokens = reference.tensor("ip_tokens").unwrap();
        let tokens_err = rel_l2(&tokens.reshape(want_tokens.shape()).unwrap(), want_tokens).unwrap();
        println!("{case}: pixel values max |diff| {pixel_diff:.1e}, encoder rel L2 {encoder_err:.2e}, tokens rel L2 {tokens_err:.2e}");
        assert!(pixel_diff <= 1e-6, "{case}: pixel values differ by {pixel_diff}");
        assert!(encoder_err < COMPONENT_BOUND && tokens_err < COMPONENT_BOUND, "{case}: encoder {encoder_err:.2e}, tokens {tokens_err:.2e}");
    }
}

/// Scale 0 skips the image attention altogether, as diffusers does: the output is exactly the
/// adapter-free one.
#[test]
fn ip_adapter_at_scale_zero_gives_exactly_the_output_without_it() {
    let reference = reference(CASES[0]);
    let (pipe, mut params) = setup(&reference);
    if let Some(unit) = params.ip_adapter.as_mut() {
        unit.scale = 0.0;
    }
    let zero = pipe.generate(&params, None, &mut |_| true).unwrap();
    params.ip_adapter = None;
    let without = pipe.generate(&params, None, &mut |_| true).unwrap();
    assert_eq!(zero.latents.flatten_all().unwrap().to_vec1::<f32>().unwrap(), without.latents.flatten_all().unwrap().to_vec1::<f32>().unwrap());
}

fn refusal(pipeline: &str, adapter: Arc<IpAdapter>) -> String {
    let pipe = Pipeline::load(&fixtures().join("pipelines").join(pipeline), &LoadOptions::default()).unwrap();
    let picture = RgbPicture::new(2, 2, vec![0; 12]).unwrap();
    let params = GenerateParams { ip_adapter: Some(IpAdapterUnit { adapter, picture, scale: 1.0 }), ..reference(CASES[0]).params().unwrap() };
    let err = pipe.validate(&params).expect_err("refused");
    err.to_string()
}

#[test]
fn ip_adapters_for_another_model_and_unsupported_files_are_refused_naming_ip_adapter() {
    let sdxl = load_adapter(&adapter_meta(&reference(CASES[2])));
    let message = refusal("sd15-var-tiny", sdxl.clone());
    assert!(message.contains("ip_adapter") && message.contains("wide"), "{message}");
    // The SD 1.5 adapter (48-wide image tokens) on the other tiny SD 1.5 model (32-wide text).
    let sd15 = load_adapter(&adapter_meta(&reference(CASES[0])));
    let message = refusal("sd15-tiny", sd15);
    assert!(message.contains("ip_adapter") && message.contains("48"), "{message}");
    assert!(refusal("flux-dev-tiny", sdxl).contains("ip_adapter"));

    // A FaceID file, and a `.bin` file, are refused when loaded.
    let dir = tempfile::tempdir().unwrap();
    let faceid = dir.path().join("ip-adapter-faceid.safetensors");
    let t = easel_engine::Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
    t.save_safetensors("image_proj.perceiver_resampler.proj_in.weight", &faceid).unwrap();
    let err = IpAdapter::load(&faceid, None, DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("ip_adapter") && err.contains("FaceID"), "{err}");
    let bin = dir.path().join("ip-adapter_sd15.bin");
    std::fs::write(&bin, b"pickle").unwrap();
    let err = IpAdapter::load(&bin, None, DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains(".safetensors"), "{err}");
}
