//! `easel generate`, `easel models pull|list|rm` against the fake hub (crates/easel-fakehub),
//! through the real binary and the environment variables a user sets.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use easel_fakehub::{Access, FakeHub, Host};

fn easel(fake: &FakeHub, home: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_easel"));
    cmd.args(args).env("HF_ENDPOINT", &fake.endpoint).env("HF_HOME", home);
    for var in ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH"] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied()).output().expect("run easel")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The `parameters` text chunk easel writes into its PNGs.
fn parameters(png: &Path) -> String {
    let bytes = std::fs::read(png).unwrap();
    let chunks = easel_engine::output::png_text_chunks(&bytes).unwrap();
    chunks.into_iter().find(|(k, _)| k == "parameters").map(|(_, v)| v).expect("parameters chunk")
}

fn hub_with(repo: &str, fixture: &str, access: Access) -> FakeHub {
    let fake = FakeHub::start();
    fake.add_repo(repo, access);
    fake.commit_dir(repo, Path::new(&common::fixture(fixture))).unwrap();
    fake
}

#[test]
fn generate_from_the_hub_downloads_once_then_costs_one_request() {
    let fake = hub_with("acme/sd-tiny", "sd15-tiny", Access::Public);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("a.png");
    let args = ["generate", "--model", "acme/sd-tiny", "a cat", "--steps", "2", "--seed", "3", "-o", out.to_str().unwrap()];
    let first = easel(&fake, tmp.path(), &[], &args);
    assert!(first.status.success(), "{}", text(&first));
    assert!(fake.log().iter().any(|l| l.host == Host::Cdn), "weights came from the CDN");
    fake.clear_log();
    let second = easel(&fake, tmp.path(), &[], &args);
    assert!(second.status.success(), "{}", text(&second));
    let log = fake.log();
    assert_eq!(log.len(), 1, "{log:?}");
    // Offline, the same command needs nothing from the network.
    fake.clear_log();
    let offline = easel(&fake, tmp.path(), &[("HF_HUB_OFFLINE", "1")], &args);
    assert!(offline.status.success() && fake.log().is_empty(), "{}", text(&offline));
}

#[test]
fn hf_token_and_the_older_variable_reach_a_gated_repo() {
    let fake = hub_with("acme/gated-tiny", "sd15-tiny", Access::Gated { granted: vec!["hf_granted".into()] });
    fake.add_token("hf_granted");
    let tmp = tempfile::tempdir().unwrap();
    let no_token = easel(&fake, tmp.path(), &[], &["models", "pull", "acme/gated-tiny"]);
    let err = text(&no_token);
    assert!(!no_token.status.success(), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains("needs a Hugging Face token") && err.contains("HF_TOKEN"), "{err}");
    for var in ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"] {
        let home = tempfile::tempdir().unwrap();
        let ok = easel(&fake, home.path(), &[(var, "hf_granted")], &["models", "pull", "acme/gated-tiny"]);
        assert!(ok.status.success(), "{var}: {}", text(&ok));
        assert!(!text(&ok).contains("hf_granted"), "the token is never printed");
    }
    // The token file `hf auth login` writes.
    std::fs::write(tmp.path().join("token"), "hf_granted\n").unwrap();
    let ok = easel(&fake, tmp.path(), &[], &["models", "pull", "acme/gated-tiny"]);
    assert!(ok.status.success(), "{}", text(&ok));
}

#[test]
fn pull_list_and_rm_manage_the_cache() {
    let fake = hub_with("acme/sd-tiny", "sd15-tiny", Access::Public);
    let tmp = tempfile::tempdir().unwrap();
    let pulled = easel(&fake, tmp.path(), &[], &["models", "pull", "acme/sd-tiny"]);
    assert!(pulled.status.success(), "{}", text(&pulled));
    let listed = easel(&fake, tmp.path(), &[], &["models", "list"]);
    let out = text(&listed);
    assert!(out.contains("acme/sd-tiny") && out.contains("MiB") && out.contains("flux-dev"), "{out}");
    let removed = easel(&fake, tmp.path(), &[], &["models", "rm", "acme/sd-tiny"]);
    assert!(removed.status.success(), "{}", text(&removed));
    assert!(!tmp.path().join("hub/models--acme--sd-tiny").exists());
    let again = easel(&fake, tmp.path(), &[], &["models", "rm", "acme/sd-tiny"]);
    assert!(!again.status.success() && text(&again).contains("not in the hub cache"), "{}", text(&again));
}

#[test]
fn known_models_get_their_authors_defaults_and_short_names() {
    // The tiny SDXL pipeline published under SDXL-Turbo's repo id: `--model sdxl-turbo` finds it,
    // and it runs SDXL-Turbo's 1 step at guidance 0 rather than SDXL's 30 at 5.
    let fake = hub_with("stabilityai/sdxl-turbo", "sdxl-tiny", Access::Public);
    fake.add_repo("acme/sdxl-tiny", Access::Public);
    fake.commit_dir("acme/sdxl-tiny", Path::new(&common::fixture("sdxl-tiny"))).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let known = tmp.path().join("known.png");
    let o = easel(&fake, tmp.path(), &[], &["generate", "--model", "sdxl-turbo", "a cat", "-o", known.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let p = parameters(&known);
    assert!(p.contains("Steps: 1,") && p.contains("CFG scale: 0,"), "{p}");
    let plain = tmp.path().join("plain.png");
    let o = easel(&fake, tmp.path(), &[], &["generate", "--model", "acme/sdxl-tiny", "a cat", "-o", plain.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let p = parameters(&plain);
    assert!(p.contains("Steps: 30,") && p.contains("CFG scale: 5,"), "{p}");
}

#[test]
fn transformer_file_from_the_hub() {
    let fake = hub_with("acme/flux-tiny", "flux-dev-tiny", Access::Public);
    fake.add_repo("acme/flux-gguf", Access::Public);
    let gguf = std::fs::read(common::fixture("flux-dev-tiny-q8_0.gguf")).unwrap();
    fake.commit("acme/flux-gguf", vec![("flux-tiny-q8_0.gguf".into(), Some(gguf))]);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("f.png");
    let o = easel(
        &fake,
        tmp.path(),
        &[],
        &["generate", "--model", "acme/flux-tiny", "--transformer", "acme/flux-gguf/flux-tiny-q8_0.gguf", "a cat", "--steps", "2", "-o", out.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("q8_0"), "the GGUF weights were used: {}", text(&o));
}

#[test]
fn hub_repo_without_a_pipeline_points_at_its_weights_file() {
    let fake = FakeHub::start();
    fake.add_repo("acme/finetune", Access::Public);
    fake.commit("acme/finetune", vec![("model.safetensors".into(), Some(vec![0u8; 64]))]);
    let tmp = tempfile::tempdir().unwrap();
    let o = easel(&fake, tmp.path(), &[], &["generate", "--model", "acme/finetune", "a cat"]);
    let err = text(&o);
    assert!(!o.status.success() && err.contains("acme/finetune/model.safetensors"), "{err}");
}

/// `--model owner/name/fine-tune.safetensors` without `--config`: the tensors show an SD 1.x
/// checkpoint, so easel fetches the configs and tokenizers of SD 1.5's reference repo (and none
/// of its weights), as diffusers' `from_single_file` does, and gives the same pixels as with
/// `--config` pointing at those configs on disk.
#[test]
fn a_single_file_from_the_hub_runs_with_its_familys_configs_and_no_reference_weights() {
    const REFERENCE: &str = "stable-diffusion-v1-5/stable-diffusion-v1-5";
    let single = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/single_file");
    let fake = FakeHub::start();
    let file_repo = tempfile::tempdir().unwrap();
    std::fs::copy(single.join("sd1-mini.safetensors"), file_repo.path().join("sd1-mini.safetensors")).unwrap();
    fake.add_repo("acme/fine-tunes", Access::Public);
    fake.commit_dir("acme/fine-tunes", file_repo.path()).unwrap();
    // The reference repo: the configs, and weights a single file must not pull.
    let reference = tempfile::tempdir().unwrap();
    common::copy_dir(&single.join("sd1-mini"), reference.path());
    std::fs::write(reference.path().join("unet/diffusion_pytorch_model.safetensors"), vec![0u8; 4096]).unwrap();
    fake.add_repo(REFERENCE, Access::Public);
    fake.commit_dir(REFERENCE, reference.path()).unwrap();

    let home = tempfile::tempdir().unwrap();
    let data = [("EASEL_DATA_DIR", home.path().to_str().unwrap())];
    let hub_png = home.path().join("hub.png");
    let args = ["generate", "--model", "acme/fine-tunes/sd1-mini.safetensors", "a blue square", "--width", "48", "--height", "32", "--steps", "3", "--seed", "2"];
    let out = easel(&fake, home.path(), &data, &[&args[..], &["-o", hub_png.to_str().unwrap()]].concat());
    assert!(out.status.success(), "{}", text(&out));
    let pulled: Vec<String> = fake.log().iter().filter(|l| l.path.contains("stable-diffusion-v1-5") && l.path.ends_with(".safetensors")).map(|l| l.path.clone()).collect();
    assert!(pulled.is_empty(), "no weights of the reference repo: {pulled:?}");

    let local_png = home.path().join("local.png");
    let config = single.join("sd1-mini").display().to_string();
    let local = easel(&fake, home.path(), &data, &[&args[..], &["--config", &config, "-o", local_png.to_str().unwrap()]].concat());
    assert!(local.status.success(), "{}", text(&local));
    let pixels = |p: &Path| image::open(p).unwrap().to_rgb8().into_raw();
    assert_eq!(pixels(&hub_png), pixels(&local_png));
}
