//! easel-hub against the fake hub (crates/easel-fakehub), whose protocol the Python client's own
//! `snapshot_download` checks in tests/hub/test_fake_hub.py.

use std::path::{Path, PathBuf};

use easel_fakehub::{Access, FakeHub, Host, Logged};
use easel_hub::{resolve_file, resolve_lora, resolve_model, Hub, HubConfig, HubError, NoProgress, Resolved, Token, TokenSource};

const REPO: &str = "acme/tiny-pipe";

/// Deterministic bytes that do not compress or repeat.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A diffusers-shaped repo: an index listing unet and a text encoder, configs, a tokenizer, and
/// full and fp16 weights.
fn pipeline_files(unet_seed: u64) -> Vec<(String, Option<Vec<u8>>)> {
    let index = br#"{"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.35.2", "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"], "safety_checker": [null, null]}"#;
    [
        ("model_index.json", index.to_vec()),
        ("README.md", b"# tiny".to_vec()),
        ("unet/config.json", br#"{"sample_size": 8}"#.to_vec()),
        ("unet/diffusion_pytorch_model.safetensors", noise(200_000, unet_seed)),
        ("unet/diffusion_pytorch_model.fp16.safetensors", noise(100_000, unet_seed + 1)),
        ("text_encoder/config.json", br#"{"hidden_size": 8}"#.to_vec()),
        ("text_encoder/model.safetensors", noise(50_000, 7)),
        ("tokenizer/vocab.json", br#"{"a": 0}"#.to_vec()),
        ("tokenizer/merges.txt", b"#version: 0.2\n".to_vec()),
        ("safety_checker/model.safetensors", noise(1000, 9)),
    ]
    .into_iter()
    .map(|(p, c)| (p.to_string(), Some(c)))
    .collect()
}

struct Setup {
    fake: FakeHub,
    cache: tempfile::TempDir,
}

fn setup(access: Access) -> Setup {
    let fake = FakeHub::start();
    fake.add_repo(REPO, access);
    fake.commit(REPO, pipeline_files(1));
    Setup { fake, cache: tempfile::tempdir().unwrap() }
}

fn token(secret: &str) -> Token {
    Token::new(secret, TokenSource::File("/home/u/.cache/huggingface/token".into()))
}

impl Setup {
    fn hub_with(&self, token: Option<Token>, offline: bool) -> Hub {
        Hub::new(HubConfig { endpoint: self.fake.endpoint.clone(), cache_root: self.cache.path().to_path_buf(), token, offline })
    }
    fn hub(&self) -> Hub {
        self.hub_with(None, false)
    }
    fn load(&self, hub: &Hub) -> Result<PathBuf, HubError> {
        match resolve_model(hub, REPO, false, &NoProgress)? {
            Resolved::Dir(d) => Ok(d),
            Resolved::File(f) => panic!("a repo resolved to a file {}", f.display()),
        }
    }
    fn cdn_gets(&self) -> Vec<Logged> {
        self.fake.log().into_iter().filter(|l| l.host == Host::Cdn).collect()
    }
}

fn read(dir: &Path, file: &str) -> Vec<u8> {
    std::fs::read(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

#[test]
fn first_load_fetches_one_variant_of_each_listed_component_and_nothing_else() {
    let s = setup(Access::Public);
    let dir = s.load(&s.hub()).unwrap();
    assert_eq!(read(&dir, "unet/diffusion_pytorch_model.safetensors"), noise(200_000, 1));
    assert_eq!(read(&dir, "text_encoder/model.safetensors"), noise(50_000, 7));
    assert_eq!(read(&dir, "tokenizer/merges.txt"), b"#version: 0.2\n");
    for absent in ["unet/diffusion_pytorch_model.fp16.safetensors", "safety_checker/model.safetensors", "README.md"] {
        assert!(!dir.join(absent).exists(), "{absent} was fetched");
    }
    // The layout huggingface_hub uses: relative links into blobs named by sha256 (LFS) or git sha1.
    let link = std::fs::read_link(dir.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    assert_eq!(link, Path::new("../../../blobs").join(easel_fakehub::sha256(&noise(200_000, 1))));
    let link = std::fs::read_link(dir.join("model_index.json")).unwrap();
    assert!(link.starts_with("../../blobs"), "{}", link.display());
    let main = std::fs::read_to_string(s.cache.path().join("models--acme--tiny-pipe/refs/main")).unwrap();
    assert_eq!(dir.file_name().unwrap().to_str().unwrap(), main);
}

#[test]
fn fp16_variant_files_are_fetched_when_asked() {
    let s = setup(Access::Public);
    let Resolved::Dir(dir) = resolve_model(&s.hub(), REPO, true, &NoProgress).unwrap() else { panic!() };
    assert_eq!(read(&dir, "unet/diffusion_pytorch_model.fp16.safetensors"), noise(100_000, 2));
    assert!(!dir.join("unet/diffusion_pytorch_model.safetensors").exists());
}

#[test]
fn second_online_load_costs_one_metadata_request() {
    let s = setup(Access::Public);
    let first = s.load(&s.hub()).unwrap();
    s.fake.clear_log();
    let second = s.load(&s.hub()).unwrap();
    assert_eq!(first, second);
    let log = s.fake.log();
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!((log[0].method.as_str(), log[0].path.as_str()), ("GET", "/api/models/acme/tiny-pipe/revision/main"));
}

#[test]
fn interrupted_download_resumes_with_a_range_request() {
    let s = setup(Access::Public);
    s.fake.cut_next_download(30_000);
    let dir = s.load(&s.hub()).unwrap();
    let gets = s.cdn_gets();
    assert!(gets.iter().any(|l| l.range.as_deref() == Some("bytes=30000-")), "{gets:?}");
    let unet = read(&dir, "unet/diffusion_pytorch_model.safetensors");
    let text = read(&dir, "text_encoder/model.safetensors");
    assert!(unet == noise(200_000, 1) && text == noise(50_000, 7));
}

/// The `.incomplete` file of an earlier, killed run.
fn partial_path(s: &Setup, content: &[u8]) -> PathBuf {
    let blobs = s.cache.path().join("models--acme--tiny-pipe/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    blobs.join(format!("{}.incomplete", easel_fakehub::sha256(content)))
}

#[test]
fn partial_file_from_an_earlier_run_is_resumed_not_refetched() {
    let s = setup(Access::Public);
    let unet = noise(200_000, 1);
    std::fs::write(partial_path(&s, &unet), &unet[..120_000]).unwrap();
    let dir = s.load(&s.hub()).unwrap();
    assert_eq!(read(&dir, "unet/diffusion_pytorch_model.safetensors"), unet);
    let gets = s.cdn_gets();
    assert!(gets.iter().any(|l| l.range.as_deref() == Some("bytes=120000-")), "{gets:?}");
    assert!(!partial_path(&s, &unet).exists());
}

#[test]
fn corrupt_partial_download_fails_the_checksum_and_is_removed() {
    let s = setup(Access::Public);
    let unet = noise(200_000, 1);
    std::fs::write(partial_path(&s, &unet), noise(120_000, 99)).unwrap();
    let err = s.load(&s.hub()).unwrap_err();
    assert!(matches!(&err, HubError::Checksum { algorithm: "sha256", .. }), "{err}");
    assert!(err.to_string().contains("unet/diffusion_pytorch_model.safetensors"), "{err}");
    assert!(!partial_path(&s, &unet).exists());
    // Nothing half-made was recorded: the next run fetches the file whole and succeeds.
    let dir = s.load(&s.hub()).unwrap();
    assert_eq!(read(&dir, "unet/diffusion_pytorch_model.safetensors"), unet);
}

#[test]
fn new_upstream_commit_loads_every_file_from_the_new_commit() {
    let s = setup(Access::Public);
    let old = s.load(&s.hub()).unwrap();
    let mut changes = vec![("unet/diffusion_pytorch_model.safetensors".to_string(), Some(noise(200_000, 42)))];
    changes.push(("unet/config.json".to_string(), Some(br#"{"sample_size": 16}"#.to_vec())));
    let new_commit = s.fake.commit(REPO, changes);
    s.fake.clear_log();
    let new = s.load(&s.hub()).unwrap();
    assert_eq!(new.file_name().unwrap().to_str().unwrap(), new_commit);
    assert_eq!(read(&new, "unet/diffusion_pytorch_model.safetensors"), noise(200_000, 42));
    assert_eq!(read(&new, "unet/config.json"), br#"{"sample_size": 16}"#);
    assert_eq!(read(&new, "model_index.json"), read(&old, "model_index.json"));
    // Unchanged blobs are linked, not fetched again: only the new weights went over the CDN.
    let gets = s.cdn_gets();
    assert_eq!(gets.len(), 1, "{gets:?}");
    // The old snapshot is untouched, and an offline run now uses the new one.
    assert_eq!(read(&old, "unet/diffusion_pytorch_model.safetensors"), noise(200_000, 1));
    let offline = s.load(&s.hub_with(None, true)).unwrap();
    assert_eq!(offline, new);
}

#[test]
fn ref_moves_only_when_the_new_snapshot_is_whole() {
    let s = setup(Access::Public);
    let old = s.load(&s.hub()).unwrap();
    s.fake.commit(REPO, vec![("text_encoder/model.safetensors".to_string(), Some(noise(50_000, 77)))]);
    s.fake.fail_downloads(1);
    let err = s.load(&s.hub()).unwrap_err();
    assert!(matches!(err, HubError::Status { status: 500, .. }), "{err}");
    // refs/main still names the whole old snapshot, so offline runs keep working.
    assert_eq!(s.load(&s.hub_with(None, true)).unwrap(), old);
}

#[test]
fn hub_down_falls_back_to_the_cached_snapshot() {
    let s = setup(Access::Public);
    let dir = s.load(&s.hub()).unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let down = Hub::new(HubConfig { endpoint: endpoint.clone(), cache_root: s.cache.path().to_path_buf(), token: None, offline: false });
    assert_eq!(s.load(&down).unwrap(), dir);
    let empty = tempfile::tempdir().unwrap();
    let down = Hub::new(HubConfig { endpoint, cache_root: empty.path().to_path_buf(), token: None, offline: false });
    let err = s.load(&down).unwrap_err();
    assert!(matches!(err, HubError::Unreachable { .. }) && err.to_string().contains("HF_HUB_OFFLINE=1"), "{err}");
}

#[test]
fn offline_without_a_cached_snapshot_says_how_to_get_one() {
    let s = setup(Access::Public);
    let err = s.load(&s.hub_with(None, true)).unwrap_err();
    assert!(matches!(err, HubError::NotCached { .. }), "{err}");
    assert!(err.to_string().contains("easel models pull acme/tiny-pipe"), "{err}");
    assert!(s.fake.log().is_empty(), "offline runs send nothing");
}

#[test]
fn token_goes_to_the_hub_and_never_to_the_cdn() {
    let s = setup(Access::Gated { granted: vec!["hf_granted".into()] });
    s.fake.add_token("hf_granted");
    let dir = s.load(&s.hub_with(Some(token("hf_granted")), false)).unwrap();
    assert_eq!(read(&dir, "text_encoder/model.safetensors"), noise(50_000, 7));
    let log = s.fake.log();
    assert!(log.iter().filter(|l| l.host == Host::Hub).all(|l| l.authorized), "{log:?}");
    let cdn: Vec<&Logged> = log.iter().filter(|l| l.host == Host::Cdn).collect();
    assert!(!cdn.is_empty() && cdn.iter().all(|l| !l.authorized), "{cdn:?}");
}

#[test]
fn gated_repo_without_a_token_says_to_set_one() {
    let s = setup(Access::Gated { granted: vec![] });
    let err = s.load(&s.hub()).unwrap_err();
    assert!(matches!(err, HubError::NeedsToken { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("HF_TOKEN") && text.contains("You must have access to it and be authenticated"), "{text}");
    assert!(!text.contains("HF_HUB_OFFLINE"), "{text}");
}

#[test]
fn gated_repo_with_an_ungranted_token_says_to_accept_the_licence() {
    let s = setup(Access::Gated { granted: vec![] });
    s.fake.add_token("hf_someone");
    let err = s.load(&s.hub_with(Some(token("hf_someone")), false)).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, HubError::Gated { .. }), "{text}");
    assert!(text.contains("accept its licence") && text.contains(&format!("{}/{REPO}", s.fake.endpoint)), "{text}");
    assert!(text.contains("not in the authorized list"), "hub's X-Error-Message kept: {text}");
    assert!(!text.contains("hf_someone"), "the token itself is never printed: {text}");
}

#[test]
fn unknown_or_private_repo_without_a_token_says_it_may_need_one() {
    let s = setup(Access::Private { granted: vec![] });
    for repo in [REPO, "acme/does-not-exist"] {
        let err = resolve_model(&s.hub(), repo, false, &NoProgress).unwrap_err();
        assert!(matches!(err, HubError::NeedsToken { .. }), "{repo}: {err}");
        assert!(err.to_string().contains("does not exist"), "{err}");
    }
}

#[test]
fn unknown_repo_with_a_token_says_not_found() {
    let s = setup(Access::Public);
    s.fake.add_token("hf_valid");
    let err = resolve_model(&s.hub_with(Some(token("hf_valid")), false), "acme/does-not-exist", false, &NoProgress).unwrap_err();
    assert!(matches!(err, HubError::RepoNotFound { .. }), "{err}");
    assert!(err.to_string().contains("Repository not found"), "{err}");
}

#[test]
fn refused_token_is_named_by_its_source_not_its_value() {
    let s = setup(Access::Public);
    let err = s.load(&s.hub_with(Some(token("hf_revoked")), false)).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, HubError::TokenRefused { .. }), "{text}");
    assert!(text.contains("/token") && text.contains("Invalid credentials") && !text.contains("hf_revoked"), "{text}");
}

#[test]
fn missing_revision_and_missing_file_are_named() {
    let s = setup(Access::Public);
    let err = resolve_model(&s.hub(), "acme/tiny-pipe@v9", false, &NoProgress).unwrap_err();
    assert!(matches!(err, HubError::RevisionNotFound { .. }) && err.to_string().contains("v9"), "{err}");
    let err = resolve_file(&s.hub(), "acme/tiny-pipe/transformer/q4.gguf", &NoProgress).unwrap_err();
    assert!(matches!(err, HubError::EntryNotFound { .. }) && err.to_string().contains("transformer/q4.gguf"), "{err}");
}

#[test]
fn repo_without_model_index_points_at_its_single_files() {
    let fake = FakeHub::start();
    fake.add_repo("acme/flux-gguf", Access::Public);
    fake.commit("acme/flux-gguf", vec![("flux1-dev-Q4_K_S.gguf".into(), Some(noise(30_000, 5))), ("README.md".into(), Some(b"x".to_vec()))]);
    let cache = tempfile::tempdir().unwrap();
    let hub = Hub::new(HubConfig { endpoint: fake.endpoint.clone(), cache_root: cache.path().to_path_buf(), token: None, offline: false });
    let err = resolve_model(&hub, "acme/flux-gguf", false, &NoProgress).unwrap_err();
    assert!(err.to_string().contains("acme/flux-gguf/flux1-dev-Q4_K_S.gguf"), "{err}");
    let path = resolve_file(&hub, "acme/flux-gguf/flux1-dev-Q4_K_S.gguf", &NoProgress).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), noise(30_000, 5));
    let Resolved::File(same) = resolve_model(&hub, "acme/flux-gguf/flux1-dev-Q4_K_S.gguf", false, &NoProgress).unwrap() else { panic!() };
    assert_eq!(same, path);
}

#[test]
fn hub_lora_is_the_single_safetensors_file_or_diffusers_name() {
    let fake = FakeHub::start();
    fake.add_repo("acme/one-lora", Access::Public);
    fake.commit("acme/one-lora", vec![("style.safetensors".into(), Some(noise(4000, 3)))]);
    fake.add_repo("acme/two-loras", Access::Public);
    fake.commit("acme/two-loras", vec![("a.safetensors".into(), Some(noise(10, 1))), ("b.safetensors".into(), Some(noise(10, 2)))]);
    let cache = tempfile::tempdir().unwrap();
    let hub = Hub::new(HubConfig { endpoint: fake.endpoint.clone(), cache_root: cache.path().to_path_buf(), token: None, offline: false });
    assert_eq!(std::fs::read(resolve_lora(&hub, "acme/one-lora").unwrap()).unwrap(), noise(4000, 3));
    let err = resolve_lora(&hub, "acme/two-loras").unwrap_err();
    assert!(err.to_string().contains("a.safetensors, b.safetensors"), "{err}");
    assert_eq!(std::fs::read(resolve_lora(&hub, "acme/two-loras/b.safetensors").unwrap()).unwrap(), noise(10, 2));
}

#[test]
fn download_larger_than_the_free_disk_is_refused_before_the_first_byte() {
    let s = setup(Access::Public);
    s.fake.claim_size(u64::MAX / 4);
    let err = s.load(&s.hub()).unwrap_err();
    assert!(matches!(err, HubError::DiskSpace { .. }), "{err}");
    assert!(s.cdn_gets().is_empty(), "nothing was downloaded");
}
