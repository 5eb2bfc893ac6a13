//! Drives the real `easel` binary: successful runs on the tiny pipelines, reproducibility,
//! latents in and out, and a one-line error with a non-zero exit for every kind of bad input.

use std::path::PathBuf;
use std::process::{Command, Output};

mod common;
use common::copy_dir;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/pipelines")
}

fn easel(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_easel")).args(args).env("HF_HUB_OFFLINE", "1").output().expect("run easel")
}

/// Asserts a clean failure: non-zero exit, one `error:` line naming `needle`, no panic.
fn assert_fails_with(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success: {stderr}");
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "expected one error line: {stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "error line lacks `{n}`: {}", lines[0]);
    }
}

/// A copy of a tiny pipeline: untouched components are symlinked, `writable` ones copied.
fn pipeline_copy(name: &str, writable: &[&str]) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join(name);
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        let file_name = entry.file_name();
        let dst = tmp.path().join(&file_name);
        if writable.iter().any(|w| file_name == *w) || entry.path().is_file() {
            copy_dir(&entry.path(), &dst);
        } else {
            std::os::unix::fs::symlink(entry.path(), &dst).unwrap();
        }
    }
    tmp
}

fn sd15() -> String {
    fixtures().join("sd15-tiny").display().to_string()
}

#[test]
fn generates_reproducibly_with_metadata_and_latents_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a.png");
    let b = tmp.path().join("b.png");
    let lat = tmp.path().join("lat.safetensors");
    let base = ["generate", "--model", &sd15(), "--prompt", "a red circle", "--steps", "3", "--seed", "42", "--width", "64", "--height", "64"];
    let out = easel(&[&base[..], &["-o", a.to_str().unwrap(), "--save-latents", lat.to_str().unwrap()]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), a.display().to_string());
    let out = easel(&[&base[..], &["-o", b.to_str().unwrap()]].concat());
    assert!(out.status.success());
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap(), "same seed must give the same image");

    // The PNG carries everything needed to reproduce it.
    let bytes = std::fs::read(&a).unwrap();
    let chunks = easel_engine::output::png_text_chunks(&bytes).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&chunks.iter().find(|(k, _)| k == "easel").unwrap().1).unwrap();
    assert_eq!(meta["prompt"], "a red circle");
    assert_eq!(meta["seed"], 42);
    assert_eq!(meta["steps"], 3);
    assert_eq!(meta["scheduler"], "euler");
    assert_eq!(meta["width"], 64);
    assert!(chunks.iter().any(|(k, v)| k == "parameters" && v.contains("Seed: 42")));

    // Starting from the saved final latents with the same settings is valid input.
    let c = tmp.path().join("c.webp");
    let out = easel(&["generate", "--model", &sd15(), "a red circle", "--steps", "2", "--init-latents", lat.to_str().unwrap(), "-o", c.to_str().unwrap(), "--guidance", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(c.exists());
}

#[test]
fn batches_write_numbered_files() {
    let tmp = tempfile::tempdir().unwrap();
    let o = tmp.path().join("img.jpg");
    let out = easel(&["generate", "--model", &fixtures().join("sdxl-tiny").display().to_string(), "a cat", "--steps", "2", "-n", "2", "-o", o.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(tmp.path().join("img-1.jpg").exists() && tmp.path().join("img-2.jpg").exists());
}

#[test]
fn bad_parameters_get_one_line_errors() {
    let m = sd15();
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["--width", "0"], vec!["width"]),
        (vec!["--height", "100"], vec!["height", "multiple of 8"]),
        (vec!["--steps", "0"], vec!["steps"]),
        (vec!["--steps", "1001"], vec!["steps", "1000"]),
        (vec!["--scheduler", "plms"], vec!["scheduler", "plms", "euler-a"]),
        (vec!["--dtype", "f8"], vec!["dtype"]),
        (vec!["--device", "tpu"], vec!["device"]),
        (vec!["--device", "cuda:x"], vec!["device", "cuda:x", "number"]),
        // This test binary is the default (CPU) build: CUDA and cuda:N say how to get a GPU build.
        (vec!["--device", "cuda:1"], vec!["cuda:1", "--features cuda", "--device cpu"]),
        (vec!["-o", "out.gif"], vec!["output", ".png"]),
        (vec!["--init-latents", "/nonexistent/l.safetensors"], vec!["/nonexistent/l.safetensors"]),
    ];
    for (extra, needles) in cases {
        let out = easel(&[&["generate", "--model", &m, "p"][..], &extra[..]].concat());
        assert_fails_with(&out, &needles);
    }
}

#[test]
fn serve_and_worker_refuse_a_gpu_they_cannot_open_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    for cmd in ["serve", "worker"] {
        let out = easel(&[cmd, "--device", "cuda:0", "--data-dir", tmp.path().to_str().unwrap(), "--model", &format!("tiny={}", sd15())]);
        assert_fails_with(&out, &["cuda:0", "--device cpu"]);
    }
}

#[test]
fn missing_component_file_is_named() {
    let tmp = pipeline_copy("sd15-tiny", &["unet"]);
    std::fs::remove_file(tmp.path().join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let out = easel(&["generate", "--model", tmp.path().to_str().unwrap(), "p", "--steps", "1"]);
    assert_fails_with(&out, &["unet/diffusion_pytorch_model.safetensors"]);

    let tmp = pipeline_copy("sd15-tiny", &["vae"]);
    std::fs::remove_file(tmp.path().join("vae/config.json")).unwrap();
    let out = easel(&["generate", "--model", tmp.path().to_str().unwrap(), "p", "--steps", "1"]);
    assert_fails_with(&out, &["vae/config.json"]);

    let tmp = tempfile::tempdir().unwrap();
    let out = easel(&["generate", "--model", tmp.path().to_str().unwrap(), "p"]);
    assert_fails_with(&out, &["model_index.json"]);
}

#[test]
fn malformed_config_names_file_and_field() {
    let tmp = pipeline_copy("sd15-tiny", &["unet"]);
    let path = tmp.path().join("unet/config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["block_out_channels"] = serde_json::json!("wide");
    std::fs::write(&path, cfg.to_string()).unwrap();
    let out = easel(&["generate", "--model", tmp.path().to_str().unwrap(), "p", "--steps", "1"]);
    assert_fails_with(&out, &["unet/config.json", "block_out_channels"]);

    std::fs::write(&path, "{ not json").unwrap();
    let out = easel(&["generate", "--model", tmp.path().to_str().unwrap(), "p", "--steps", "1"]);
    assert_fails_with(&out, &["unet/config.json", "malformed"]);
}

#[test]
fn truncated_or_corrupt_weights_are_reported() {
    let tmp = pipeline_copy("sd15-tiny", &["unet"]);
    let path = tmp.path().join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let out = easel(&["generate", "--model", tmp.path().to_str().unwrap(), "p", "--steps", "1"]);
    assert_fails_with(&out, &["diffusion_pytorch_model.safetensors", "truncated"]);

    let mut corrupt = bytes.clone();
    corrupt[8..40].copy_from_slice(&[0xAB; 32]);
    std::fs::write(&path, &corrupt).unwrap();
    let out = easel(&["generate", "--model", tmp.path().to_str().unwrap(), "p", "--steps", "1"]);
    assert_fails_with(&out, &["diffusion_pytorch_model.safetensors"]);

    // Weights that do not fit the config name the tensor.
    let cfg_path = tmp.path().join("unet/config.json");
    std::fs::write(&path, &bytes).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["block_out_channels"] = serde_json::json!([64, 64]);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let out = easel(&["generate", "--model", tmp.path().to_str().unwrap(), "p", "--steps", "1"]);
    assert_fails_with(&out, &["unet", "shape"]);
}

#[test]
fn hub_ids_offline_or_missing_say_what_to_do() {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_easel"))
        .args(["generate", "--model", "nobody/no-such-model", "p"])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", home.path())
        .output()
        .unwrap();
    assert_fails_with(&out, &["nobody/no-such-model", "HF_HUB_OFFLINE", "easel models pull nobody/no-such-model"]);

    // A hub that answers 404, as huggingface.co does for an unknown repo.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for stream in listener.incoming().take(8) {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let body = r#"{"error":"Repository not found"}"#;
            let _ = write!(s, "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
        }
    });
    let out = Command::new(env!("CARGO_BIN_EXE_easel"))
        .args(["generate", "--model", "nobody/no-such-model", "p"])
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_HOME", home.path())
        .env("HF_ENDPOINT", format!("http://{addr}"))
        .output()
        .unwrap();
    assert_fails_with(&out, &["nobody/no-such-model", "does not exist"]);
}

fn flux(name: &str) -> String {
    fixtures().join(name).display().to_string()
}

/// `easel generate` on the tiny FLUX.1-dev-like pipeline from diffusers' packed init latents
/// returns diffusers' packed final latents.
#[test]
fn flux_generate_takes_and_returns_packed_latents_like_diffusers() {
    let refs = easel_engine::read_tensors(&fixtures().join("../reference/flux-dev-tiny.safetensors")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let init = tmp.path().join("init.safetensors");
    easel_engine::write_latents(&init, &refs["init_latents"]).unwrap();
    let (saved, png) = (tmp.path().join("out.safetensors"), tmp.path().join("out.png"));
    let out = easel(&[
        "generate", "a red circle on a blue background, high quality", "--model", &flux("flux-dev-tiny"), "--width", "80", "--height", "64",
        "--steps", "5", "--init-latents", init.to_str().unwrap(), "--save-latents", saved.to_str().unwrap(), "-o", png.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = easel_engine::read_latents(&saved).unwrap();
    assert_eq!(got.dims(), &[1, 20, 64]);
    let want = &refs["latents"];
    let err = ((&got - want).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()
        / want.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap())
    .sqrt();
    assert!(err < 1e-3, "rel L2 {err}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("transformer weights:"));
    assert_eq!(image::open(&png).unwrap().to_rgb8().dimensions(), (80, 64));
}

#[test]
fn flux_models_quantize_then_generate_from_the_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("t.gguf");
    let out = easel(&["models", "quantize", "--model", &flux("flux-dev-tiny"), "--type", "q8_0", "-o", gguf.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let png = tmp.path().join("q.png");
    let out = easel(&["generate", "a red circle", "--model", &flux("flux-dev-tiny"), "--transformer", gguf.to_str().unwrap(), "--width", "64", "--height", "64", "--steps", "2", "-o", png.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("transformer weights:") && stderr.contains("q8_0"), "{stderr}");

    assert_fails_with(&easel(&["models", "quantize", "--model", &flux("flux-dev-tiny"), "--type", "q3_k", "-o", gguf.to_str().unwrap()]), &["q3_k", "q8_0", "q4_k"]);
    let out = easel(&["models", "memory"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("11901408320 parameters") && stdout.contains("q4_k"), "{stdout}");
}

#[test]
fn flux_bad_input_gets_one_line_errors_and_schnell_warns_about_guidance() {
    let tmp = tempfile::tempdir().unwrap();
    let png = tmp.path().join("s.png");
    let out = easel(&["generate", "a red circle", "--model", &flux("flux-schnell-tiny"), "--guidance", "3.5", "--width", "64", "--height", "64", "-o", png.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("warning: --guidance is ignored"), "{stderr}");
    assert_fails_with(&easel(&["generate", "x", "--model", &flux("flux-schnell-tiny"), "--width", "72", "--height", "64", "-o", png.to_str().unwrap()]), &["width", "multiple of 16"]);
    assert_fails_with(
        &easel(&["generate", "x", "--model", &flux("flux-schnell-tiny"), "--transformer", &flux("flux-dev-tiny-q4_0.gguf"), "-o", png.to_str().unwrap()]),
        &["guidance_in"],
    );
    assert_fails_with(&easel(&["generate", "x", "--model", &sd15(), "--transformer", &flux("flux-dev-tiny-q4_0.gguf"), "-o", png.to_str().unwrap()]), &["FLUX"]);
}

/// `easel generate` on the tiny SD-3.5-medium-like pipeline with skip-layer guidance flags, from
/// diffusers' init latents, returns diffusers' final latents; quantizing its transformer writes
/// an `sd3` GGUF that generates; SD 3.5 sizes are multiples of 16; `models memory` knows 3.5.
#[test]
fn sd35_generate_with_skip_layer_guidance_matches_diffusers_and_quantizes() {
    let refs = easel_engine::read_tensors(&fixtures().join("../reference/sd35m-tiny-slg.safetensors")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let init = tmp.path().join("init.safetensors");
    easel_engine::write_latents(&init, &refs["init_latents"]).unwrap();
    let (saved, png) = (tmp.path().join("out.safetensors"), tmp.path().join("out.png"));
    let model = flux("sd35m-tiny");
    let out = easel(&[
        "generate", "a red circle on a blue background, high quality", "--model", &model, "--negative-prompt", "blurry, low quality", "--width", "96", "--height", "64",
        "--steps", "5", "--guidance", "4.5", "--skip-layers", "1", "--skip-layer-start", "0.01", "--skip-layer-stop", "0.9",
        "--init-latents", init.to_str().unwrap(), "--save-latents", saved.to_str().unwrap(), "-o", png.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (got, want) = (easel_engine::read_latents(&saved).unwrap(), &refs["latents"]);
    let err = ((&got - want).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() / want.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()).sqrt();
    assert!(err < 5e-6, "rel L2 {err}");
    assert_eq!(image::open(&png).unwrap().to_rgb8().dimensions(), (96, 64));

    let gguf = tmp.path().join("t.gguf");
    let out = easel(&["models", "quantize", "--model", &model, "--type", "q8_0", "-o", gguf.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = easel(&["generate", "a red circle", "--model", &model, "--transformer", gguf.to_str().unwrap(), "--width", "64", "--height", "64", "--steps", "2", "-o", png.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.contains("q8_0"), "{stderr}");

    assert_fails_with(&easel(&["generate", "x", "--model", &model, "--width", "72", "--height", "64", "-o", png.to_str().unwrap()]), &["width", "multiple of 16"]);
    assert_fails_with(&easel(&["generate", "x", "--model", &model, "--scheduler", "euler", "-o", png.to_str().unwrap()]), &["scheduler", "flow-match-euler"]);
    assert_fails_with(&easel(&["generate", "x", "--model", &sd15(), "--skip-layers", "1", "-o", png.to_str().unwrap()]), &["skip_layer_guidance", "SD 3.5"]);
    for (name, title) in [("sd3.5-large", "SD 3.5 large transformer"), ("sd3.5-medium", "SD 3.5 medium transformer")] {
        let out = easel(&["models", "memory", "--model", name]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && stdout.contains(title) && stdout.contains("q4_k"), "{name}: {stdout}");
    }
}

/// `easel generate --lora` (a path, or a registry name with --lora-dir; repeatable, with
/// scales) gives diffusers' latents for the same stack.
#[test]
fn lora_stacks_on_the_cli_match_diffusers() {
    let refs = easel_engine::read_tensors(&fixtures().join("../reference/sd15-tiny-lora-stack.safetensors")).unwrap();
    let loras = fixtures().join("../loras");
    let tmp = tempfile::tempdir().unwrap();
    let init = tmp.path().join("init.safetensors");
    easel_engine::write_latents(&init, &refs["init_latents"]).unwrap();
    let saved = tmp.path().join("out.safetensors");
    let a = loras.join("sd15-tiny-a.safetensors");
    let out = easel(&[
        "generate", "a red circle on a blue background, high quality", "--model", &sd15(), "--steps", "4", "--guidance", "7.5", "--scheduler", "euler",
        "--width", "64", "--height", "64", "--lora", &format!("{}:0.7", a.display()), "--lora-dir", loras.to_str().unwrap(), "--lora", "sd15-tiny-b-kohya:-0.5",
        "--init-latents", init.to_str().unwrap(), "--save-latents", saved.to_str().unwrap(), "-o", tmp.path().join("o.png").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = easel_engine::read_latents(&saved).unwrap();
    let want = &refs["latents"];
    let err = ((&got - want).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()
        / want.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap())
    .sqrt();
    assert!(err < 1e-3, "rel L2 {err}");

    let png = tmp.path().join("x.png");
    assert_fails_with(&easel(&["generate", "x", "--model", &sd15(), "--lora", "no-such-lora", "-o", png.to_str().unwrap()]), &["no-such-lora", "--lora-dir"]);
    // A hub id is fetched into the hub cache; offline, a missing one says so.
    assert_fails_with(&easel(&["generate", "x", "--model", &sd15(), "--lora", "someone/some-lora:0.5", "-o", png.to_str().unwrap()]), &["someone/some-lora", "hub cache"]);
    assert_fails_with(
        &easel(&["generate", "x", "--model", &sd15(), "--lora", loras.join("flux-dev-tiny-a-kohya.safetensors").to_str().unwrap(), "-o", png.to_str().unwrap()]),
        &["matches no layer", "formats tried"],
    );
    assert_fails_with(&easel(&["generate", "x", "--model", &sd15(), "--lora", &format!("{}:inf", a.display()), "-o", png.to_str().unwrap()]), &["finite"]);
}

/// `--init-image` and `--strength`: a FLUX image-to-image run keeps the picture's size, and bad
/// pictures and strengths are one-line errors naming the flag.
#[test]
fn init_image_keeps_its_size_and_bad_images_and_strengths_are_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let picture = tmp.path().join("in.png");
    image::RgbImage::from_fn(80, 48, |x, y| image::Rgb([(3 * x) as u8, (5 * y) as u8, 128])).save(&picture).unwrap();
    let out = tmp.path().join("out.png");
    let flux = fixtures().join("flux-dev-tiny").display().to_string();
    let ok = easel(&["generate", "--model", &flux, "a lighthouse", "--init-image", picture.to_str().unwrap(), "--strength", "0.6", "--steps", "5", "-o", out.to_str().unwrap()]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert_eq!(image::image_dimensions(&out).unwrap(), (80, 48));

    let junk = tmp.path().join("junk.png");
    std::fs::write(&junk, b"not a picture").unwrap();
    let sd = fixtures().join("sd15-tiny").display().to_string();
    let o = out.to_str().unwrap();
    assert_fails_with(&easel(&["generate", "--model", &sd, "x", "--strength", "0.5", "-o", o]), &["--strength", "--init-image"]);
    assert_fails_with(&easel(&["generate", "--model", &sd, "x", "--init-image", junk.to_str().unwrap(), "-o", o]), &["--init-image", "not a PNG"]);
    assert_fails_with(&easel(&["generate", "--model", &sd, "x", "--init-image", picture.to_str().unwrap(), "--strength", "2", "-o", o]), &["strength"]);
    assert_fails_with(&easel(&["generate", "--model", &sd, "x", "--init-image", picture.to_str().unwrap(), "--strength", "0.1", "--steps", "4", "-o", o]), &["strength", "no step"]);
}

/// `--model fine-tune.safetensors`: with `--config DIR` it runs; without one it fetches the
/// configs of the family its tensors show, so offline that is one line naming the repo and
/// `--config`; `--config` with a diffusers folder, or a config of another family, is refused.
#[test]
fn single_file_checkpoints_run_with_a_config_and_say_what_they_need_without_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixtures().join("../single_file");
    let file = dir.join("sd1-mini.safetensors").display().to_string();
    let config = dir.join("sd1-mini").display().to_string();
    let out = tmp.path().join("out.png");
    let o = out.to_str().unwrap();
    let run = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_easel")).args(args).env("HF_HUB_OFFLINE", "1").env("HF_HOME", tmp.path()).env("EASEL_DATA_DIR", tmp.path()).output().unwrap();
    let ok = run(&["generate", "--model", &file, "--config", &config, "a blue square", "--width", "48", "--height", "32", "--steps", "3", "-o", o]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert_eq!(image::image_dimensions(&out).unwrap(), (48, 32));

    assert_fails_with(&run(&["generate", "--model", &file, "x", "-o", o]), &["--config stable-diffusion-v1-5/stable-diffusion-v1-5", "HF_HUB_OFFLINE"]);
    let sd = fixtures().join("sd15-tiny").display().to_string();
    assert_fails_with(&run(&["generate", "--model", &sd, "--config", &config, "x", "-o", o]), &["--config", "single-file"]);
    let xl_config = dir.join("sdxl-mini").display().to_string();
    assert_fails_with(&run(&["generate", "--model", &file, "--config", &xl_config, "x", "-o", o]), &["config", "StableDiffusionXLPipeline"]);
}
