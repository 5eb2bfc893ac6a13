//! Hybrid routing through the real binary: an alias served locally, a tier served by a fake
//! Black Forest Labs server that follows BFL's documented protocol, fallback to another easel
//! (an OpenAI-compatible provider) when BFL fails, the privacy guarantee checked by counting
//! requests at the fakes, costs in the response and in /v1/usage, and config errors.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use base64::Engine as _;
use serde_json::{json, Value};

mod common;
use common::*;

/// A fake BFL API on a free port; counts every request it gets. Prompts containing
/// `fail-bfl` get an Error status from the poll.
fn fake_bfl(hits: Arc<AtomicUsize>) -> String {
    use axum::extract::Query;
    use axum::routing::{get, post};
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            let b = base.clone();
            let h1 = hits.clone();
            let h2 = hits.clone();
            let app = axum::Router::new()
                .route(
                    "/v1/{model}",
                    post(move |headers: axum::http::HeaderMap, axum::Json(body): axum::Json<Value>| {
                        let b = b.clone();
                        h1.fetch_add(1, Ordering::SeqCst);
                        async move {
                            assert_eq!(headers.get("x-key").unwrap(), "bfl-test-key");
                            let id = if body["prompt"].as_str().unwrap().contains("fail-bfl") { "bad" } else { "good" };
                            axum::Json(json!({"id": id, "polling_url": format!("{b}/v1/get_result?id={id}")}))
                        }
                    }),
                )
                .route(
                    "/v1/get_result",
                    get(move |Query(q): Query<std::collections::HashMap<String, String>>| {
                        h2.fetch_add(1, Ordering::SeqCst);
                        let base = base_for_sample();
                        async move {
                            if q["id"] == "bad" {
                                axum::Json(json!({"id": "bad", "status": "Error", "details": {"error": "capacity"}}))
                            } else {
                                axum::Json(json!({"id": "good", "status": "Ready", "result": {"sample": format!("{base}/sample.png")}}))
                            }
                        }
                    }),
                )
                .route("/sample.png", get(|| async { png_bytes() }));
            SAMPLE_BASE.set(format!("http://{}", listener.local_addr().unwrap())).ok();
            tx.send(SAMPLE_BASE.get().unwrap().clone()).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    rx.recv().unwrap()
}

static SAMPLE_BASE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn base_for_sample() -> String {
    SAMPLE_BASE.get().cloned().unwrap_or_default()
}

/// A real 8x8 PNG, as BFL's sample would be.
fn png_bytes() -> Vec<u8> {
    let img = image::RgbImage::from_pixel(8, 8, image::Rgb([200, 30, 30]));
    let mut out = std::io::Cursor::new(vec![]);
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn serve_with_config(data: &Path, config: &Value, extra: &[&str]) -> Result<Server, String> {
    let path = data.join("easel.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_easel"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir", data.to_str().unwrap(), "--model", &format!("tiny={}", fixture("sd15-tiny"))])
        .arg("--config")
        .arg(&path)
        .args(extra)
        .env("EASEL_TEST_BFL_KEY", "bfl-test-key")
        .env_remove("EASEL_TEST_SURELY_UNSET")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start easel serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    match line.trim().strip_prefix("easel listening on ") {
        Some(base) => Ok(Server { base: base.to_string(), child }),
        None => Err(String::from_utf8_lossy(&child.wait_with_output().unwrap().stderr).to_string()),
    }
}

fn jobs_done(s: &Server) -> u64 {
    let m = client().get(format!("{}/metrics", s.base)).send().unwrap().text().unwrap();
    m.lines().filter(|l| l.starts_with("easel_jobs_total{")).filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok()).sum()
}

/// Another easel serving the tiny model (an OpenAI-compatible provider) and the fake BFL, with
/// the count of BFL's requests and the providers' config entries for both.
struct Providers {
    _peer_dir: tempfile::TempDir,
    peer: Server,
    bfl_hits: Arc<AtomicUsize>,
    entries: [Value; 2],
}

fn peer_and_bfl() -> Providers {
    let peer_dir = tempfile::tempdir().unwrap();
    let peer = serve(peer_dir.path(), &[]);
    let bfl_hits = Arc::new(AtomicUsize::new(0));
    let bfl = fake_bfl(bfl_hits.clone());
    let entries = [
        json!({"name": "peer", "kind": "openai-compatible", "base_url": format!("{}/v1", peer.base)}),
        json!({"name": "bfl", "kind": "bfl", "base_url": bfl, "api_key_env": "EASEL_TEST_BFL_KEY", "timeout_s": 20}),
    ];
    Providers { _peer_dir: peer_dir, peer, bfl_hits, entries }
}

#[test]
fn aliases_tiers_fallback_privacy_and_costs() {
    let Providers { _peer_dir: _keep, peer, bfl_hits: hits, entries: [peer_entry, bfl_entry] } = peer_and_bfl();
    let tmp = tempfile::tempdir().unwrap();
    let config = json!({
        "providers": [
            peer_entry,
            bfl_entry,
            {"name": "stability", "kind": "stability", "api_key_env": "EASEL_TEST_SURELY_UNSET"}
        ],
        "routing": {
            "aliases": {"shapes": ["local:tiny", "bfl:flux-pro-1.1", "peer:tiny"]},
            "tiers": {"hero": ["bfl:flux-pro-1.1", "stability:ultra", "peer:tiny"]},
            "strategy": "local-first"
        }
    });
    let s = serve_with_config(tmp.path(), &config, &[]).expect("starts");
    let body = |extra: Value| {
        let mut b = json!({"prompt": "a red circle", "size": "64x64", "steps": 2, "seed": 5});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    // The alias runs locally (local-first).
    let (st, r) = post(&s, "/v1/images/generations", body(json!({"model": "shapes"})));
    assert_eq!((st, r["easel"]["provider"].as_str()), (200, Some("local")), "{r}");
    // The hero tier goes to BFL: the image is BFL's, stored by easel, priced from the table.
    let (st, r) = post(&s, "/v1/images/generations", body(json!({"tier": "hero"})));
    assert_eq!((st, r["easel"]["provider"].as_str()), (200, Some("bfl")), "{r}");
    let png = base64::engine::general_purpose::STANDARD.decode(r["data"][0]["b64_json"].as_str().unwrap()).unwrap();
    assert_eq!(png, png_bytes());
    assert_eq!(r["easel"]["cost_usd"].as_f64(), Some(0.04));
    assert!(r["easel"]["route_reason"].as_str().unwrap().contains("fallback") || r["easel"]["route_reason"].as_str().unwrap().contains("local-first"), "{r}");
    let job = get(&s, &format!("/v1/jobs/{}", r["easel"]["job_id"].as_str().unwrap())).1;
    assert_eq!(job["easel"]["provider"], "bfl", "the job record says who served it");
    // BFL fails: the request falls through to the next candidate, the peer easel.
    let (st, r) = post(&s, "/v1/images/generations", body(json!({"tier": "hero", "prompt": "fail-bfl please"})));
    assert_eq!((st, r["easel"]["provider"].as_str()), (200, Some("peer")), "{r}");
    // The same through the async API: a closed-provider job takes the queue like any other,
    // falls back to the next candidate, and its record says who served it and why.
    let (st, job) = post(&s, "/v1/jobs", body(json!({"tier": "hero", "prompt": "fail-bfl once more", "seed": 8})));
    assert_eq!(st, 202, "{job}");
    let done = wait_done(&s, job["id"].as_str().unwrap());
    assert_eq!((done["status"].as_str(), done["easel"]["provider"].as_str()), (Some("succeeded"), Some("peer")), "{done}");
    assert!(done["request"]["route"]["failures"][0].as_str().unwrap().starts_with("bfl: "), "{done}");
    let (st, job) = post(&s, "/v1/jobs", body(json!({"tier": "hero", "seed": 9})));
    assert_eq!(st, 202, "{job}");
    let done = wait_done(&s, job["id"].as_str().unwrap());
    assert_eq!((done["easel"]["provider"].as_str(), done["easel"]["cost_usd"].as_f64()), (Some("bfl"), Some(0.04)), "{done}");
    // route: pick a provider explicitly.
    let (st, r) = post(&s, "/v1/images/generations", body(json!({"model": "shapes", "route": "bfl", "seed": 6})));
    assert_eq!((st, r["easel"]["provider"].as_str()), (200, Some("bfl")), "{r}");
    // Private requests never leave: with a local candidate they run locally, without one they
    // fail with a clear 503, and neither fake sees a request.
    let (bfl_before, peer_before) = (hits.load(Ordering::SeqCst), jobs_done(&peer));
    let (st, r) = post(&s, "/v1/images/generations", body(json!({"model": "shapes", "privacy": "private", "seed": 7})));
    assert_eq!((st, r["easel"]["provider"].as_str()), (200, Some("local")), "{r}");
    let (st, r) = post(&s, "/v1/images/generations", body(json!({"tier": "hero", "privacy": "private"})));
    assert_eq!(st, 503, "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("private"), "{r}");
    let (st, _) = post(&s, "/v1/images/generations", body(json!({"model": "shapes", "route": "bfl", "privacy": "private"})));
    assert_eq!(st, 503);
    assert_eq!((hits.load(Ordering::SeqCst), jobs_done(&peer)), (bfl_before, peer_before), "nothing private reached a provider");
    // Bad hints are 400s naming the field; unknown models 404.
    assert_eq!(post(&s, "/v1/images/generations", body(json!({"tier": "gold"}))).1["error"]["param"], "tier");
    assert_eq!(post(&s, "/v1/images/generations", body(json!({"model": "shapes", "route": "midjourney"}))).1["error"]["param"], "route");
    assert_eq!(post(&s, "/v1/images/generations", body(json!({"privacy": "secret"}))).1["error"]["param"], "privacy");
    assert_eq!(post(&s, "/v1/images/generations", body(json!({"model": "nope"}))).0, 404);
    // The ledger: rows per provider with their costs.
    let usage = get(&s, "/v1/usage").1;
    let providers: std::collections::BTreeSet<&str> = usage["data"].as_array().unwrap().iter().filter_map(|r| r["provider"].as_str()).collect();
    assert_eq!(providers.into_iter().collect::<Vec<_>>(), ["bfl", "local", "peer"], "{usage}");
    let bfl_cost: f64 = usage["data"].as_array().unwrap().iter().filter(|r| r["provider"] == "bfl").map(|r| r["cost_usd"].as_f64().unwrap()).sum();
    assert!((bfl_cost - 0.12).abs() < 1e-9, "{usage}");
}

#[test]
fn provider_config_errors_and_missing_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let err = serve_with_config(tmp.path(), &json!({"providers": [{"name": "mj", "kind": "midjourney"}]}), &[]).err().expect("refused");
    assert!(err.contains("unknown variant `midjourney`") && err.contains("providers[0].kind"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let mut s = serve_with_config(tmp.path(), &json!({"providers": [{"name": "stability", "kind": "stability", "api_key_env": "EASEL_TEST_SURELY_UNSET"}], "routing": {"tiers": {"hero": ["stability:ultra"]}}}), &[]).expect("starts without the key");
    let (st, r) = post(&s, "/v1/images/generations", json!({"prompt": "x", "tier": "hero"}));
    assert_eq!(st, 503, "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("stability is not configured or has no API key"), "{r}");
    let mut pipe = s.child.stderr.take().unwrap();
    let _ = s.child.kill();
    let _ = s.child.wait();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut pipe, &mut stderr).unwrap();
    assert_eq!(stderr.matches("provider `stability` is disabled: EASEL_TEST_SURELY_UNSET is not set").count(), 1, "{stderr}");
}

#[test]
fn a_spent_daily_budget_stops_paid_providers_but_not_local_engines() {
    let hits = Arc::new(AtomicUsize::new(0));
    let bfl = fake_bfl(hits.clone());
    let tmp = tempfile::tempdir().unwrap();
    let config = json!({
        "providers": [{"name": "bfl", "kind": "bfl", "base_url": bfl, "api_key_env": "EASEL_TEST_BFL_KEY"}],
        "routing": {"tiers": {"hero": ["bfl:flux-pro-1.1"]}, "aliases": {"shapes": ["bfl:flux-pro-1.1", "local:tiny"]}, "daily_budget_usd": 0.05}
    });
    let s = serve_with_config(tmp.path(), &config, &[]).expect("starts");
    let hero = |seed: u64| json!({"prompt": "a red circle", "tier": "hero", "seed": seed});
    assert_eq!(post(&s, "/v1/images/generations", hero(1)).0, 200);
    assert_eq!(post(&s, "/v1/images/generations", hero(2)).0, 200);
    // $0.08 spent against a $0.05 cap: BFL is no longer a candidate.
    let before = hits.load(Ordering::SeqCst);
    let (st, r) = post(&s, "/v1/images/generations", hero(3));
    assert_eq!(st, 503, "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("daily budget"), "{r}");
    assert_eq!(hits.load(Ordering::SeqCst), before, "no request after the cap");
    // The alias still has its local candidate.
    let (st, r) = post(&s, "/v1/images/generations", json!({"prompt": "a red circle", "model": "shapes", "size": "64x64", "steps": 2, "seed": 4}));
    assert_eq!((st, r["easel"]["provider"].as_str()), (200, Some("local")), "{r}");
}

/// Pictures route like generations, to the candidates that take them: an edit with a mask for
/// an OpenAI-compatible provider (here another easel) reaches its `/v1/images/edits` with the
/// mask in OpenAI's convention (the peer's record says a mask came, so it round-tripped), a
/// model that takes no pictures is a 400 naming `image` and never reaches its vendor, and a
/// private edit runs locally.
#[test]
fn edits_route_only_to_candidates_that_take_pictures() {
    let Providers { _peer_dir: _keep, peer, bfl_hits: hits, entries } = peer_and_bfl();
    let tmp = tempfile::tempdir().unwrap();
    let config = json!({
        "providers": entries,
        "routing": {"aliases": {"editor": ["peer:tiny"], "pro": ["bfl:flux-pro-1.1"], "either": ["peer:tiny", "local:tiny"]}}
    });
    let s = serve_with_config(tmp.path(), &config, &[]).expect("starts");
    let encode = |img: image::DynamicImage| {
        let mut out = std::io::Cursor::new(vec![]);
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        base64::engine::general_purpose::STANDARD.encode(out.into_inner())
    };
    let picture = encode(image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([(4 * x) as u8, (4 * y) as u8, 90]))));
    let mask = encode(image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(64, 64, |x, _| image::Luma([if x < 32 { 255 } else { 0 }]))));
    let edit = |model: &str, extra: Value| {
        let mut b = json!({"model": model, "prompt": "a red door", "image": picture, "mask": mask, "size": "64x64", "steps": 2});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let (st, r) = post(&s, "/v1/images/generations", edit("editor", json!({})));
    assert_eq!((st, r["easel"]["provider"].as_str()), (200, Some("peer")), "{r}");
    let peer_job = get(&peer, &format!("/v1/jobs/{}", r["easel"]["vendor_id"].as_str().expect("the peer's job id"))).1;
    assert_eq!(peer_job["request"]["init_image"]["mask"], true, "{peer_job}");

    let before = hits.load(Ordering::SeqCst);
    let (st, r) = post(&s, "/v1/images/generations", edit("pro", json!({})));
    assert_eq!((st, r["error"]["param"].as_str()), (400, Some("image")), "{r}");
    assert_eq!(hits.load(Ordering::SeqCst), before, "BFL never saw the picture");

    let (st, r) = post(&s, "/v1/images/generations", edit("either", json!({"privacy": "private"})));
    assert_eq!((st, r["easel"]["provider"].as_str()), (200, Some("local")), "{r}");
}
