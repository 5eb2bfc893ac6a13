//! Drives `easel serve` over real HTTP: the OpenAI-compatible endpoint, async jobs with SSE,
//! cancel, idempotency, the result cache, auth, overload, every kind of bad input, and
//! durability across kill -9.

use std::io::Read;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

mod common;
use common::*;

const SMALL: fn() -> Value = || json!({"prompt": "a red circle", "size": "64x64", "steps": 2});

#[test]
fn openai_shape_cache_and_images() {
    let tmp = tempfile::tempdir().unwrap();
    let s = serve(tmp.path(), &[]);
    let mut body = SMALL();
    body["seed"] = json!(11);
    let (st, r) = post(&s, "/v1/images/generations", body.clone());
    assert_eq!(st, 200, "{r}");
    let b64 = r["data"][0]["b64_json"].as_str().unwrap();
    assert!(b64.len() > 100);
    assert_eq!(r["easel"]["cache_hit"], false);
    assert_eq!(r["easel"]["seeds"], json!([11]));

    // The same deterministic request is a cache hit with the same bytes.
    let (st, again) = post(&s, "/v1/images/generations", body.clone());
    assert_eq!(st, 200);
    assert_eq!(again["easel"]["cache_hit"], true);
    assert_eq!(again["data"][0]["b64_json"], r["data"][0]["b64_json"]);

    // url mode serves the image from the store.
    body["response_format"] = json!("url");
    body["output_format"] = json!("jpeg");
    let (st, u) = post(&s, "/v1/images/generations", body);
    assert_eq!(st, 200);
    let url = u["data"][0]["url"].as_str().unwrap();
    let img = client().get(url).send().unwrap();
    assert_eq!(img.headers()["content-type"], "image/jpeg");
    assert_eq!(&img.bytes().unwrap()[..2], &[0xFF, 0xD8]);

    let (st, models) = get(&s, "/v1/models");
    assert_eq!((st, models["object"].as_str(), models["data"][0]["id"].as_str()), (200, Some("list"), Some("tiny")));
    let (st, spec) = get(&s, "/openapi.json");
    assert_eq!(st, 200);
    assert!(spec["paths"]["/v1/images/generations"].is_object());
    let metrics = client().get(format!("{}/metrics", s.base)).send().unwrap().text().unwrap();
    for m in ["easel_queue_depth", "easel_job_latency_seconds_bucket", "easel_images_total{model=\"tiny\"}", "easel_cache_hits_total 1", "easel_denoise_steps_per_second"] {
        assert!(metrics.contains(m), "metrics lack {m}");
    }
    assert_eq!(get(&s, "/readyz").0, 200);
}

#[test]
fn async_jobs_events_cancel_and_idempotency() {
    let tmp = tempfile::tempdir().unwrap();
    let s = serve(tmp.path(), &["--max-batch", "1"]);
    let (st, job) = post(&s, "/v1/jobs", SMALL());
    assert_eq!(st, 202, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    assert!(job["urls"]["events"].as_str().unwrap().ends_with("/events"));

    // SSE: the stream ends with `completed`, after progress events.
    let mut resp = client().get(format!("{}/v1/jobs/{id}/events", s.base)).send().unwrap();
    let mut text = String::new();
    resp.read_to_string(&mut text).unwrap();
    let events: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
    assert_eq!(events.last(), Some(&"completed"), "{text}");
    assert!(!events.contains(&"preview"), "previews are opt-in: {text}");
    assert_eq!(wait_done(&s, &id)["status"], "succeeded");

    // preview_every: `preview` events carry a small PNG of the image so far, every N steps.
    let mut body = SMALL();
    body["steps"] = json!(4);
    body["preview_every"] = json!(2);
    body["seed"] = json!(77);
    let (_, pj) = post(&s, "/v1/jobs", body);
    let mut resp = client().get(format!("{}/v1/jobs/{}/events", s.base, pj["id"].as_str().unwrap())).send().unwrap();
    let mut text = String::new();
    resp.read_to_string(&mut text).unwrap();
    let previews: Vec<Value> = text.split("\n\n").filter(|e| e.contains("event: preview")).filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")).and_then(|d| serde_json::from_str(d).ok())).collect();
    let steps: Vec<u64> = previews.iter().map(|p| p["step"].as_u64().unwrap()).collect();
    if !steps.is_empty() {
        // The stream may start after the first step; the ones it saw are every 2nd step.
        assert!(steps.iter().all(|s| s % 2 == 0), "{steps:?}");
        let b64 = previews[0]["image"].as_str().unwrap().strip_prefix("data:image/png;base64,").unwrap();
        let png = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        // sd15-tiny carries a tiny autoencoder (taesd/): its 32x32 latents preview at 8x, not
        // at latent resolution as the linear map would.
        let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
        assert_eq!(width, 256, "decoded by the preview decoder");
    }
    assert!(steps.contains(&4), "the last step always has one: {text}");
    let (st, err) = post(&s, "/v1/jobs", json!({"prompt": "x", "preview_every": -1}));
    assert_eq!((st, err["error"]["param"].as_str()), (400, Some("preview_every")));

    // Idempotency-Key returns the same job.
    let c = client();
    let a: Value = c.post(format!("{}/v1/jobs", s.base)).header("Idempotency-Key", "k1").json(&SMALL()).send().unwrap().json().unwrap();
    let b: Value = c.post(format!("{}/v1/jobs", s.base)).header("Idempotency-Key", "k1").json(&SMALL()).send().unwrap().json().unwrap();
    assert_eq!(a["id"], b["id"]);

    // A long job canceled while running stops between steps.
    let mut long = SMALL();
    long["steps"] = json!(400);
    let (_, lj) = post(&s, "/v1/jobs", long);
    let lid = lj["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    while get(&s, &format!("/v1/jobs/{lid}")).1["status"] != "running" {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let (st, _) = post(&s, &format!("/v1/jobs/{lid}/cancel"), json!({}));
    assert_eq!(st, 200);
    assert_eq!(wait_done(&s, &lid)["status"], "canceled");
    assert_eq!(get(&s, "/v1/jobs/job_nope").0, 404);
}

#[test]
fn bad_input_gets_4xx_in_openai_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let s = serve(tmp.path(), &["--max-body-bytes", "4096"]);
    let cases = [
        (json!({"prompt": ""}), 400, Some("prompt")),
        (json!({"prompt": "x", "n": 0}), 400, Some("n")),
        (json!({"prompt": "x", "n": "two"}), 400, Some("n")),
        (json!({"prompt": "x", "size": "65x64"}), 400, Some("size")),
        (json!({"prompt": "x", "steps": 5000}), 400, Some("steps")),
        (json!({"prompt": "x", "quality": "max"}), 400, Some("quality")),
        (json!({"prompt": "x", "response_format": "gif"}), 400, Some("response_format")),
        (json!({"prompt": "x", "output_format": "bmp"}), 400, Some("output_format")),
        (json!({"prompt": "x", "output_compression": -1}), 400, Some("output_compression")),
        (json!({"prompt": "x", "guidance_scale": "high"}), 400, Some("guidance_scale")),
        (json!({"prompt": "x", "scheduler": "plms"}), 400, Some("scheduler")),
        (json!({"prompt": "x", "seed": -5}), 400, Some("seed")),
        (json!({"prompt": "x", "model": "dall-e-9"}), 404, Some("model")),
        (json!({"prompt": 3}), 400, Some("prompt")),
        (json!({"prompt": "x", "unknown_field": 1}), 400, None),
        (json!([1, 2]), 400, None),
        (json!({"prompt": "x".repeat(5000)}), 413, None),
        (json!({"prompt": "x", "scheduler": "e".repeat(300)}), 400, Some("scheduler")),
        (json!({"prompt": "x", "webhook_url": format!("https://example.com/{}", "a".repeat(2100))}), 400, Some("webhook_url")),
    ];
    for (body, status, param) in cases {
        let (st, r) = post(&s, "/v1/images/generations", body.clone());
        assert_eq!(st, status, "{body} -> {r}");
        assert!(r["error"]["message"].is_string() && r["error"]["type"].is_string(), "{r}");
        if let Some(p) = param {
            assert_eq!(r["error"]["param"], p, "{body} -> {r}");
        }
    }
    let raw = client().post(format!("{}/v1/images/generations", s.base)).header("content-type", "application/json").body("{not json").send().unwrap();
    assert_eq!(raw.status().as_u16(), 400);
    let r: Value = raw.json().unwrap();
    assert_eq!(r["error"]["code"], "invalid_json");
    // Paths and query strings the router cannot even decode still answer in the API's shape.
    for (path, status) in [("/v1/jobs/%FF", 404), ("/v1/jobs/%FF/events", 404), ("/v1/images/%FF/0.png", 404), ("/v1/usage?since=2026-01-01&since=2026-01-02", 400)] {
        let (st, r) = get(&s, path);
        assert_eq!(st, status, "{path} -> {r}");
        assert!(r["error"]["message"].is_string(), "{path} -> {r}");
    }
}

#[test]
fn requests_beyond_the_memory_budget_get_400_naming_size_or_n() {
    let tmp = tempfile::tempdir().unwrap();
    let s = serve(tmp.path(), &["--request-memory-mb", "512"]);
    for (path, body, param) in [
        ("/v1/images/generations", json!({"prompt": "x", "size": "2048x2048"}), "size"),
        ("/v1/jobs", json!({"prompt": "x", "size": "512x512"}), "size"),
        ("/v1/images/generations", json!({"prompt": "x", "size": "256x256", "n": 10}), "n"),
    ] {
        let (st, r) = post(&s, path, body.clone());
        assert_eq!((st, r["error"]["param"].as_str()), (400, Some(param)), "{body} -> {r}");
        assert!(r["error"]["message"].as_str().unwrap_or("").contains("GiB"), "{r}");
    }
    let (st, r) = post(&s, "/v1/images/generations", json!({"prompt": "x", "size": "64x64", "n": 2}));
    assert_eq!(st, 200, "{r}");
}

#[test]
fn api_keys_and_overload() {
    let tmp = tempfile::tempdir().unwrap();
    let s = serve(tmp.path(), &["--api-key", "team:sekrit:1000", "--queue-cap", "2", "--max-batch", "1"]);
    let (st, r) = post(&s, "/v1/images/generations", SMALL());
    assert_eq!((st, r["error"]["code"].as_str()), (401, Some("invalid_api_key")));
    let c = client();
    let auth = |rb: reqwest::blocking::RequestBuilder| rb.header("Authorization", "Bearer sekrit");
    let bad = c.get(format!("{}/v1/models", s.base)).header("Authorization", "Bearer wrong").send().unwrap();
    assert_eq!(bad.status().as_u16(), 401);

    // Far more concurrent submissions than the queue holds: each is 202 or 429, none lost,
    // and the server's memory stays bounded.
    let rss_before = rss_kb(s.child.id());
    let mut long = SMALL();
    long["steps"] = json!(30);
    let handles: Vec<_> = (0..24)
        .map(|_| {
            let (url, body) = (format!("{}/v1/jobs", s.base), long.clone());
            std::thread::spawn(move || {
                let r = client().post(url).header("Authorization", "Bearer sekrit").json(&body).send().unwrap();
                let status = r.status().as_u16();
                let retry = r.headers().get("retry-after").is_some();
                (status, retry, r.json::<Value>().unwrap())
            })
        })
        .collect();
    let mut accepted = vec![];
    for h in handles {
        let (status, retry, body) = h.join().unwrap();
        match status {
            202 => accepted.push(body["id"].as_str().unwrap().to_string()),
            429 => assert!(retry, "429 without Retry-After"),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(!accepted.is_empty() && accepted.len() < 24, "accepted {}", accepted.len());
    let rss_after = rss_kb(s.child.id());
    assert!(rss_after < rss_before + 300_000, "RSS grew from {rss_before} kB to {rss_after} kB");
    for id in &accepted {
        let j: Value = auth(c.get(format!("{}/v1/jobs/{id}", s.base))).send().unwrap().json().unwrap();
        // Generous: 30-step jobs in a debug build, beside the other tests, on 2 cores.
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut j = j;
        while j["status"] != "succeeded" {
            assert!(Instant::now() < deadline && j["status"] != "failed", "{j}");
            std::thread::sleep(Duration::from_millis(50));
            j = auth(c.get(format!("{}/v1/jobs/{id}", s.base))).send().unwrap().json().unwrap();
        }
    }
}

#[test]
fn accepted_jobs_survive_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ids = vec![];
    {
        let s = serve(tmp.path(), &["--max-batch", "1", "--lease", "2"]);
        let mut body = SMALL();
        body["steps"] = json!(12);
        for _ in 0..4 {
            let (st, j) = post(&s, "/v1/jobs", body.clone());
            assert_eq!(st, 202);
            ids.push(j["id"].as_str().unwrap().to_string());
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while get(&s, &format!("/v1/jobs/{}", ids[0])).1["status"] != "running" {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(20));
        }
        // Drop sends SIGKILL: no shutdown handler runs.
    }
    let s = serve(tmp.path(), &["--max-batch", "1", "--lease", "2"]);
    for id in &ids {
        let j = wait_done(&s, id);
        assert_eq!(j["status"], "succeeded", "{j}");
        assert_eq!(j["images"].as_array().unwrap().len(), 1, "completed exactly once: {j}");
    }
}

#[test]
fn webhooks_are_signed_and_private_targets_refused() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    // Without permission, a loopback webhook is refused at submission.
    {
        let s = serve(tmp.path(), &[]);
        let mut body = SMALL();
        body["webhook_url"] = json!("http://127.0.0.1:9/hook");
        let (st, r) = post(&s, "/v1/jobs", body);
        assert_eq!((st, r["error"]["param"].as_str()), (400, Some("webhook_url")), "{r}");
    }
    let receiver = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = receiver.local_addr().unwrap();
    let got = std::thread::spawn(move || {
        let (mut sock, _) = receiver.accept().unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = vec![0u8; 65536];
        let mut req = Vec::new();
        loop {
            let n = sock.read(&mut buf).unwrap_or(0);
            req.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&req).to_string();
            if let Some(i) = text.find("\r\n\r\n") {
                let len: usize = text.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(|v| v.trim().parse().unwrap())).unwrap_or(0);
                if req.len() >= i + 4 + len || n == 0 {
                    break;
                }
            }
            if n == 0 {
                break;
            }
        }
        let _ = sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        String::from_utf8_lossy(&req).to_string()
    });
    let s = serve(tmp.path(), &["--allow-private-webhooks", "--webhook-secret", "whsec"]);
    let mut body = SMALL();
    body["webhook_url"] = json!(format!("http://{addr}/hook"));
    let (st, job) = post(&s, "/v1/jobs", body);
    assert_eq!(st, 202, "{job}");
    let req = got.join().unwrap();
    let (head, payload) = req.split_once("\r\n\r\n").unwrap();
    let header = |name: &str| head.lines().find_map(|l| l.to_ascii_lowercase().starts_with(name).then(|| l.split_once(": ").unwrap().1.trim().to_string())).unwrap();
    let ts: u64 = header("x-easel-timestamp").parse().unwrap();
    assert_eq!(header("x-easel-signature"), easel_server::webhooks::signature("whsec", ts, payload.as_bytes()));
    let event: Value = serde_json::from_str(payload).unwrap();
    assert_eq!((event["type"].as_str(), event["job_id"].as_str()), (Some("completed"), job["id"].as_str()));
}

#[test]
fn rate_limits_and_idle_eviction() {
    let tmp = tempfile::tempdir().unwrap();
    let s = serve(tmp.path(), &["--api-key", "slow:pw:2", "--idle-timeout", "1"]);
    let c = client();
    let send = || c.post(format!("{}/v1/images/generations", s.base)).header("Authorization", "Bearer pw").json(&SMALL()).send().unwrap();
    assert_eq!(send().status().as_u16(), 200);
    let metrics = || c.get(format!("{}/metrics", s.base)).send().unwrap().text().unwrap();
    assert!(metrics().contains("easel_model_warm{model=\"tiny\"} 1"), "the model stays warm after a job");
    assert_eq!(send().status().as_u16(), 200);
    let third = send();
    assert_eq!(third.status().as_u16(), 429);
    assert!(third.headers().get("retry-after").is_some());
    let body: Value = third.json().unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    // Idle longer than --idle-timeout: the model is evicted.
    let deadline = Instant::now() + Duration::from_secs(20);
    while metrics().contains("easel_model_warm{model=\"tiny\"}") {
        assert!(Instant::now() < deadline, "model was not evicted after its idle timeout");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn api_keys_from_a_config_file_and_the_loopback_rule() {
    let tmp = tempfile::tempdir().unwrap();
    // sha256("pw2"), so the file does not hold the secret.
    let cfg = tmp.path().join("easel.json");
    std::fs::write(&cfg, r#"{"api_keys": [{"name": "ops", "sha256": "93915a0a4bf8f634cb1856494dd4304472ad46b9827f541f76b6761c49cc55b0", "rate_per_minute": 60}]}"#).unwrap();
    let s = serve(tmp.path(), &["--config", cfg.to_str().unwrap()]);
    let c = client();
    assert_eq!(c.get(format!("{}/v1/models", s.base)).send().unwrap().status().as_u16(), 401);
    assert_eq!(c.get(format!("{}/v1/models", s.base)).header("Authorization", "Bearer pw2").send().unwrap().status().as_u16(), 200);

    // Without keys, a non-loopback address is refused unless explicitly allowed.
    let out = Command::new(env!("CARGO_BIN_EXE_easel"))
        .args(["serve", "--listen", "0.0.0.0:0", "--data-dir", tmp.path().to_str().unwrap(), "--model", &fixture("sd15-tiny")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-unauthenticated"));
}

#[test]
fn every_job_has_its_cost_on_the_record() {
    let tmp = tempfile::tempdir().unwrap();
    // $3.60/h at 50% utilisation: $0.002 per engine second.
    let s = serve(tmp.path(), &["--gpu-hourly-usd", "3.6", "--utilisation", "0.5", "--api-key", "alice:pw"]);
    let c = client();
    let r: Value = c.post(format!("{}/v1/images/generations", s.base)).header("Authorization", "Bearer pw").json(&SMALL()).send().unwrap().json().unwrap();
    let cost = r["easel"]["cost_usd"].as_f64().expect("cost in the easel object");
    let t = &r["easel"]["timings"];
    let engine_s = t["text_encode_s"].as_f64().unwrap() + t["denoise_s"].as_f64().unwrap() + t["decode_s"].as_f64().unwrap();
    assert!((cost - engine_s * 0.002).abs() < 1e-9, "{cost} for {engine_s} s");
    assert_eq!(r["easel"]["provider"], "local");
    let usage: Value = c.get(format!("{}/v1/usage", s.base)).header("Authorization", "Bearer pw").send().unwrap().json().unwrap();
    let row = &usage["data"][0];
    assert_eq!((row["provider"].as_str(), row["model"].as_str(), row["api_key"].as_str(), row["images"].as_u64()), (Some("local"), Some("tiny"), Some("alice"), Some(1)), "{usage}");
    assert!((row["cost_usd"].as_f64().unwrap() - cost).abs() < 1e-12);
    let bad = c.get(format!("{}/v1/usage?since=yesterday", s.base)).header("Authorization", "Bearer pw").send().unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    let metrics = c.get(format!("{}/metrics", s.base)).send().unwrap().text().unwrap();
    assert!(metrics.contains("easel_cost_usd_total{provider=\"local\",model=\"tiny\"}"), "{metrics}");
}

/// A FLUX model behind the OpenAI-compatible endpoint: generation, and FLUX's own limits
/// (sizes in multiples of 16, flow-matching scheduler only) as 400s in OpenAI's error shape.
#[test]
fn flux_models_are_served_with_their_own_limits_and_step_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let s = serve(tmp.path(), &["--model", &format!("flux={}", fixture("flux-schnell-tiny"))]);
    // FLUX takes the first-block cache, not DeepCache, and says so in /v1/models.
    let (st, r) = post(&s, "/v1/images/generations", json!({"model": "flux", "prompt": "a red circle", "size": "64x64", "seed": 4, "steps": 4, "cache": "fbcache:1"}));
    assert_eq!(st, 200, "{r}");
    // Threshold 1 reuses whenever the first block changed less than its own size: on the tiny
    // model, every step after the first (as the engine test measures).
    assert_eq!(r["easel"]["timings"]["cached_steps"], 3, "{r}");
    let (st, r) = post(&s, "/v1/images/generations", json!({"model": "flux", "prompt": "a red circle", "size": "80x64", "seed": 3}));
    assert_eq!(st, 200, "{r}");
    use base64::Engine;
    let png = base64::engine::general_purpose::STANDARD.decode(r["data"][0]["b64_json"].as_str().unwrap()).unwrap();
    assert_eq!(image::load_from_memory(&png).unwrap().to_rgb8().dimensions(), (80, 64));
    let (_, models) = get(&s, "/v1/models");
    let flux = models["data"].as_array().unwrap().iter().find(|m| m["id"] == "flux").cloned().unwrap();
    assert_eq!(flux["easel"]["default_steps"], 4, "{flux}");
    assert_eq!(flux["easel"]["cache_kind"], "fbcache", "{flux}");
    for (body, param, needle) in [
        (json!({"model": "flux", "prompt": "x", "size": "64x64", "cache": "deepcache"}), "cache", "fbcache"),
        (json!({"model": "flux", "prompt": "x", "size": "64x64", "cache": "fbcache:7"}), "cache", "0 to 1"),
        (json!({"model": "flux", "prompt": "x", "size": "72x72"}), "size", "16"),
        (json!({"model": "flux", "prompt": "x", "size": "64x64", "scheduler": "euler"}), "scheduler", "flow-match-euler"),
    ] {
        let (st, r) = post(&s, "/v1/images/generations", body.clone());
        assert_eq!(st, 400, "{body} -> {r}");
        assert_eq!(r["error"]["param"], param, "{r}");
        assert!(r["error"]["message"].as_str().unwrap().contains(needle), "{r}");
    }
}

/// An SD 3.5 model is served with its own limits: sizes in multiples of 16, flow-matching only,
/// skip-layer guidance over the layers it has; and its `easel.json` defaults reach the server
/// (the same defaults `easel generate` applies).
#[test]
fn sd35_models_are_served_with_skip_layer_guidance_and_their_limits() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("sd35");
    common::copy_dir(std::path::Path::new(&fixture("sd35l-tiny")), &model);
    std::fs::write(model.join("easel.json"), r#"{"steps": 3, "guidance": 2.5, "negative_prompt": "blurry"}"#).unwrap();
    let s = serve(tmp.path(), &["--model", &format!("sd35={}", model.display()), "--model", &format!("sd15={}", fixture("sd15-tiny"))]);
    let body = json!({"model": "sd35", "prompt": "a red circle", "size": "48x80", "seed": 3, "skip_guidance_layers": [1], "skip_layer_guidance_stop": 0.9});
    let (st, r) = post(&s, "/v1/images/generations", body);
    assert_eq!(st, 200, "{r}");
    use base64::Engine;
    let png = base64::engine::general_purpose::STANDARD.decode(r["data"][0]["b64_json"].as_str().unwrap()).unwrap();
    assert_eq!(image::load_from_memory(&png).unwrap().to_rgb8().dimensions(), (48, 80));
    let text = String::from_utf8_lossy(&png).to_string();
    assert!(text.contains("blurry") && text.contains("2.5"), "the model's default negative prompt and guidance are in the image's metadata");
    let (_, models) = get(&s, "/v1/models");
    let sd35 = models["data"].as_array().unwrap().iter().find(|m| m["id"] == "sd35").cloned().unwrap();
    assert_eq!((sd35["easel"]["default_steps"].as_u64(), sd35["easel"]["skippable_layers"].as_u64()), (Some(3), Some(2)), "{sd35}");
    for (body, param, needle) in [
        (json!({"model": "sd35", "prompt": "x", "size": "40x80"}), "size", "16"),
        (json!({"model": "sd35", "prompt": "x", "size": "48x80", "scheduler": "euler"}), "scheduler", "flow-match-euler"),
        (json!({"model": "sd35", "prompt": "x", "size": "48x80", "skip_guidance_layers": [2]}), "skip_guidance_layers", "layers 0 to 1"),
        (json!({"model": "sd15", "prompt": "x", "skip_guidance_layers": [1]}), "skip_guidance_layers", "SD 3.5"),
    ] {
        let (st, r) = post(&s, "/v1/images/generations", body.clone());
        assert_eq!(st, 400, "{body} -> {r}");
        assert_eq!(r["error"]["param"], param, "{r}");
        assert!(r["error"]["message"].as_str().unwrap().contains(needle), "{r}");
    }
}

fn decoded_pixels(b64: &str) -> Vec<u8> {
    use base64::Engine;
    let png = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
    image::load_from_memory(&png).unwrap().to_rgb8().into_raw()
}

/// LoRA stacks by registry name: each job gets exactly its own stack even when jobs with
/// different stacks are queued together (batches hold one stack), names are never paths.
#[test]
fn lora_stacks_by_name_each_job_gets_its_own() {
    let tmp = tempfile::tempdir().unwrap();
    let loras = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/loras");
    let s = serve(tmp.path(), &["--lora-dir", loras.to_str().unwrap(), "--max-batch", "4"]);
    let body = |loras: Value| json!({"prompt": "a red circle", "size": "64x64", "steps": 3, "seed": 5, "loras": loras});
    let stacks = [json!([]), json!([{"name": "sd15-tiny-a", "scale": 0.8}]), json!([{"name": "sd15-tiny-a-kohya", "scale": 0.8}]), json!([{"name": "sd15-tiny-b", "scale": -0.5}])];
    // Queued together (async jobs; compatible ones batch, and a batch holds one stack).
    let ids: Vec<String> = stacks.iter().map(|st| {
        let (code, j) = post(&s, "/v1/jobs", body(st.clone()));
        assert_eq!(code, 202, "{j}");
        j["id"].as_str().unwrap().to_string()
    }).collect();
    let mut pixels = vec![];
    for id in &ids {
        let j = wait_done(&s, id);
        assert_eq!(j["status"], "succeeded", "{j}");
        let (_, img) = get(&s, &format!("/v1/jobs/{id}"));
        let url = img["result"]["images"][0]["url"].as_str().or(img["images"][0]["url"].as_str()).map(str::to_string);
        let bytes = match url {
            Some(u) => client().get(if u.starts_with("http") { u } else { format!("{}{u}", s.base) }).send().unwrap().bytes().unwrap().to_vec(),
            None => panic!("no image url in {img}"),
        };
        pixels.push(image::load_from_memory(&bytes).unwrap().to_rgb8().into_raw());
    }
    assert_ne!(pixels[0], pixels[1], "the LoRA changed nothing");
    let (_, listed) = get(&s, "/v1/loras");
    assert!(listed["data"].as_array().unwrap().iter().any(|l| l["name"] == "sd15-tiny-b-kohya"), "{listed}");
    assert_ne!(pixels[1], pixels[3], "different stacks gave the same image");
    // The same LoRA in diffusers and kohya format is the same stack of weights.
    let close = pixels[1].iter().zip(&pixels[2]).filter(|(a, b)| (**a as i32 - **b as i32).abs() > 1).count();
    assert!(close == 0, "{close} pixels differ between the diffusers and kohya files of one LoRA");
    // Alone, synchronously (a different output_compression misses the cache; PNG pixels are
    // unaffected by it): the same pixels as in the mixed queue.
    let (code, alone) = post(&s, "/v1/images/generations", json!({"prompt": "a red circle", "size": "64x64", "steps": 3, "seed": 5, "n": 1, "loras": [{"name": "sd15-tiny-b", "scale": -0.5}], "output_compression": 50}));
    assert_eq!(code, 200, "{alone}");
    assert_eq!(decoded_pixels(alone["data"][0]["b64_json"].as_str().unwrap()), pixels[3]);

    for (loras, status) in [
        (json!([{"name": "../../etc/passwd"}]), 400),
        (json!([{"name": "/tmp/x"}]), 400),
        (json!([{"name": "no-such-lora"}]), 404),
        (json!([{"name": "owner/hub-lora"}]), 400),
        (json!([{"name": "sd15-tiny-a", "scale": 1e9}]), 400),
        (json!([{"name": "sd15-tiny-a", "weight": 1}]), 400),
    ] {
        let (code, r) = post(&s, "/v1/images/generations", body(loras.clone()));
        assert_eq!(code, status, "{loras} -> {r}");
        assert!(r["error"]["param"].as_str().unwrap_or("").starts_with("loras"), "{r}");
    }
}

/// A drawn RGB picture as PNG bytes: ramps in two channels, so resizing and encoding show.
fn test_png(width: u32, height: u32) -> Vec<u8> {
    // The green channel is a hash of the position, so the PNG does not compress to nothing.
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(255 * x / width.max(1)) as u8, ((x.wrapping_mul(2654435761) ^ y.wrapping_mul(40503)) >> 13) as u8, (255 * y / height.max(1)) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// Image-to-image over HTTP: `image` (base64 or a data URL) and `strength` on generations and
/// jobs; the result has the input's size unless `size` asks otherwise; the server and
/// `easel generate --init-image` give the same pixels; inpainting with `mask`, on ordinary and
/// inpainting models; bad images, masks and strengths are 400s naming the field, and an
/// oversized body is a 413.
#[test]
fn img2img_and_inpainting_over_http_match_the_cli_and_refuse_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let s = serve(tmp.path(), &[]);
    let png = test_png(48, 32);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
    let body = json!({"prompt": "a red circle", "image": format!("data:image/png;base64,{b64}"), "strength": 0.5, "steps": 4, "seed": 3});
    let (st, r) = post(&s, "/v1/images/generations", body);
    assert_eq!(st, 200, "{r}");
    let out = base64::engine::general_purpose::STANDARD.decode(r["data"][0]["b64_json"].as_str().unwrap()).unwrap();
    let served = image::load_from_memory(&out).unwrap().to_rgb8();
    assert_eq!(served.dimensions(), (48, 32), "the input's size");

    // The CLI on the same picture, seed, steps and strength gives the same pixels.
    let input = tmp.path().join("in.png");
    std::fs::write(&input, &png).unwrap();
    let cli_out = tmp.path().join("cli.png");
    let cli = Command::new(env!("CARGO_BIN_EXE_easel"))
        .args(["generate", "--model", &fixture("sd15-tiny"), "a red circle", "--init-image", input.to_str().unwrap(), "--strength", "0.5", "--steps", "4", "--seed", "3", "-o", cli_out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(cli.status.success(), "{}", String::from_utf8_lossy(&cli.stderr));
    assert_eq!(image::open(&cli_out).unwrap().to_rgb8().into_raw(), served.into_raw(), "server and CLI agree");

    // Jobs take it too, with a size to resize to.
    let (st, job) = post(&s, "/v1/jobs", json!({"prompt": "a red circle", "image": b64, "strength": 0.75, "steps": 4, "size": "64x64"}));
    assert_eq!(st, 202, "{job}");
    let done = wait_done(&s, job["id"].as_str().unwrap());
    assert_eq!(done["status"], "succeeded", "{done}");
    // The job's record names the picture by digest; it does not carry it.
    assert!(done["request"]["init_image"]["digest"].is_string() && done["request"]["init_image"]["strength"] == 0.75, "{}", done["request"]);
    assert!(!done.to_string().contains(&b64[..64]), "the picture is not repeated in the record");

    let junk = base64::engine::general_purpose::STANDARD.encode(b"not an image at all");
    let huge = base64::engine::general_purpose::STANDARD.encode(test_png(4104, 8));
    for (body, param) in [
        (json!({"prompt": "x", "image": "%%%"}), "image"),
        (json!({"prompt": "x", "image": junk}), "image"),
        (json!({"prompt": "x", "image": huge}), "image"),
        (json!({"prompt": "x", "image": b64, "strength": 1.5}), "strength"),
        (json!({"prompt": "x", "image": b64, "strength": 0.1, "steps": 4}), "strength"),
        (json!({"prompt": "x", "strength": 0.5}), "strength"),
        (json!({"prompt": "x", "image": base64::engine::general_purpose::STANDARD.encode(test_png(4, 4))}), "image"),
    ] {
        let (st, r) = post(&s, "/v1/images/generations", body.clone());
        assert_eq!((st, r["error"]["param"].as_str()), (400, Some(param)), "{r}");
    }
    // Inpainting: a mask (white repaints) the picture's size; an inpainting model needs both.
    let mask_png = {
        let m = image::GrayImage::from_fn(48, 32, |x, _| image::Luma([if x >= 24 { 255 } else { 0 }]));
        let mut out = std::io::Cursor::new(Vec::new());
        m.write_to(&mut out, image::ImageFormat::Png).unwrap();
        base64::engine::general_purpose::STANDARD.encode(out.into_inner())
    };
    let (st, r) = post(&s, "/v1/images/generations", json!({"prompt": "x", "image": b64, "mask": mask_png, "strength": 1.0, "steps": 3, "seed": 1}));
    assert_eq!(st, 200, "{r}");
    for (body, param) in [
        (json!({"prompt": "x", "mask": mask_png}), "mask"),
        (json!({"prompt": "x", "image": base64::engine::general_purpose::STANDARD.encode(test_png(64, 32)), "mask": mask_png}), "mask"),
    ] {
        let (st, r) = post(&s, "/v1/images/generations", body.clone());
        assert_eq!((st, r["error"]["param"].as_str()), (400, Some(param)), "{r}");
    }
    drop(s);
    let inpainting = serve(tmp.path(), &["--model", &format!("inpaint={}", fixture("sd15-var-inpaint-tiny"))]);
    let (st, r) = post(&inpainting, "/v1/images/generations", json!({"model": "inpaint", "prompt": "x"}));
    assert_eq!((st, r["error"]["param"].as_str()), (400, Some("image")), "{r}");
    let wide = base64::engine::general_purpose::STANDARD.encode(test_png(96, 32));
    let (st, r) = post(&inpainting, "/v1/images/generations", json!({"model": "inpaint", "prompt": "x", "image": wide}));
    assert_eq!((st, r["error"]["param"].as_str()), (400, Some("mask")), "{r}");
    let wide_mask = {
        let m = image::GrayImage::from_fn(96, 32, |x, _| image::Luma([if x >= 40 { 255 } else { 0 }]));
        let mut out = std::io::Cursor::new(Vec::new());
        m.write_to(&mut out, image::ImageFormat::Png).unwrap();
        base64::engine::general_purpose::STANDARD.encode(out.into_inner())
    };
    let (st, r) = post(&inpainting, "/v1/images/generations", json!({"model": "inpaint", "prompt": "x", "image": wide, "mask": wide_mask, "steps": 3}));
    assert_eq!(st, 200, "{r}");
    drop(inpainting);
    let small = serve(tmp.path(), &["--max-body-bytes", "2048"]);
    let (st, _) = post(&small, "/v1/images/generations", json!({"prompt": "x", "image": base64::engine::general_purpose::STANDARD.encode(test_png(256, 256))}));
    assert_eq!(st, 413);
}

/// An SD single file served under a name (`--model mini=FILE.safetensors --checkpoint-config
/// DIR`) answers
/// like any model and gives the CLI's pixels for the same request.
#[test]
fn a_single_file_checkpoint_is_served_by_name_and_matches_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/single_file");
    let file = dir.join("sd1-mini.safetensors").display().to_string();
    let config = dir.join("sd1-mini").display().to_string();
    let s = serve(tmp.path(), &["--model", &format!("mini={file}"), "--checkpoint-config", &config]);
    let (st, r) = post(&s, "/v1/images/generations", json!({"model": "mini", "prompt": "a blue square", "size": "48x32", "steps": 3, "seed": 5}));
    assert_eq!(st, 200, "{r}");
    let out = base64::engine::general_purpose::STANDARD.decode(r["data"][0]["b64_json"].as_str().unwrap()).unwrap();
    let served = image::load_from_memory(&out).unwrap().to_rgb8();

    let cli_out = tmp.path().join("cli.png");
    let cli = Command::new(env!("CARGO_BIN_EXE_easel"))
        .args(["generate", "--model", &file, "--config", &config, "a blue square", "--width", "48", "--height", "32", "--steps", "3", "--seed", "5", "-o", cli_out.to_str().unwrap()])
        .env("EASEL_DATA_DIR", tmp.path())
        .output()
        .unwrap();
    assert!(cli.status.success(), "{}", String::from_utf8_lossy(&cli.stderr));
    assert_eq!(image::open(&cli_out).unwrap().to_rgb8().into_raw(), served.into_raw(), "server and CLI agree");
    let (_, models) = get(&s, "/v1/models");
    assert!(models["data"].as_array().unwrap().iter().any(|m| m["id"] == "mini"), "{models}");
}

/// ControlNets by registry name over HTTP: `GET /v1/controlnets` lists them with their family;
/// a request with one (its picture as base64, or a photo with `preprocess: canny`) runs and
/// gives the CLI's pixels for the same request; ControlNets change the image and enter the
/// result-cache key; unknown names are 404s, another family's ControlNet, a bad window, a
/// bad preprocess, a step cache or an input image are 400s naming the field.
#[test]
fn controlnets_by_name_over_http_match_the_cli_and_refuse_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let nets = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/controlnets");
    let s = serve(tmp.path(), &["--model", &format!("var={}", fixture("sd15-var-tiny")), "--controlnet-dir", nets.to_str().unwrap()]);
    let (st, listed) = get(&s, "/v1/controlnets");
    assert_eq!(st, 200);
    assert_eq!(
        listed["data"],
        json!([
            {"name": "flux-dev-tiny", "object": "controlnet", "family": "flux"},
            {"name": "flux-dev-tiny-union", "object": "controlnet", "family": "flux", "modes": 4},
            {"name": "flux-dev-var-tiny", "object": "controlnet", "family": "flux"},
            {"name": "sd15-var-tiny", "object": "controlnet", "family": "sd"},
            {"name": "sd15-var-tiny-ldm", "object": "controlnet", "family": "sd"},
            {"name": "sdxl-var-tiny", "object": "controlnet", "family": "sdxl"}
        ])
    );
    let png = test_png(96, 32);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
    let body = |nets: Value| json!({"model": "var", "prompt": "a red circle", "size": "96x32", "steps": 3, "seed": 4, "controlnets": nets});
    let one = json!([{"name": "sd15-var-tiny", "image": b64, "scale": 0.7, "start": 0.0, "end": 0.8}]);
    let (st, r) = post(&s, "/v1/images/generations", body(one.clone()));
    assert_eq!(st, 200, "{r}");
    let with = decoded_pixels(r["data"][0]["b64_json"].as_str().unwrap());
    let (st, r) = post(&s, "/v1/images/generations", body(json!([])));
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["easel"]["cache_hit"], false, "ControlNets are part of the cache key");
    assert_ne!(decoded_pixels(r["data"][0]["b64_json"].as_str().unwrap()), with, "the ControlNet changed nothing");
    // Without `size`, the output takes the control picture's size (as diffusers' pipelines).
    let mut sized = body(one.clone());
    sized.as_object_mut().unwrap().remove("size");
    let (st, r) = post(&s, "/v1/images/generations", sized);
    assert_eq!(st, 200, "{r}");
    let served = base64::engine::general_purpose::STANDARD.decode(r["data"][0]["b64_json"].as_str().unwrap()).unwrap();
    assert_eq!(image::load_from_memory(&served).unwrap().to_rgb8().dimensions(), (96, 32));
    // The same ControlNet as a single file in LDM names gives the same picture.
    let mut single = one.clone();
    single[0]["name"] = json!("sd15-var-tiny-ldm");
    let (st, r) = post(&s, "/v1/images/generations", body(single));
    assert_eq!(st, 200, "{r}");
    assert_eq!(decoded_pixels(r["data"][0]["b64_json"].as_str().unwrap()), with, "the single file and the folder differ");
    // Canny on the gateway: a different control image, so a different picture.
    let (st, r) = post(&s, "/v1/images/generations", body(json!([{"name": "sd15-var-tiny", "image": b64, "preprocess": "canny:50:150"}])));
    assert_eq!(st, 200, "{r}");
    let edged = decoded_pixels(r["data"][0]["b64_json"].as_str().unwrap());
    assert_ne!(edged, with, "the edge map changed nothing");

    // The CLI on the same picture and settings gives the same pixels, with and without canny.
    let input = tmp.path().join("control.png");
    std::fs::write(&input, &png).unwrap();
    let out = tmp.path().join("cli.png");
    let cli = |extra: &[&str]| {
        let run = Command::new(env!("CARGO_BIN_EXE_easel"))
            .args(["generate", "--model", &fixture("sd15-var-tiny"), "a red circle", "--steps", "3", "--seed", "4", "-o", out.to_str().unwrap()])
            .args(["--controlnet-dir", nets.to_str().unwrap(), "--control-image", input.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        image::open(&out).unwrap().to_rgb8().into_raw()
    };
    assert_eq!(cli(&["--controlnet", "sd15-var-tiny:0.7", "--control-end", "0.8"]), with, "server and CLI agree");
    assert_eq!(cli(&["--controlnet", "sd15-var-tiny", "--control-preprocess", "canny:50:150"]), edged, "server and CLI agree on canny");

    for (nets, status, param) in [
        (json!([{"name": "no-such-net", "image": b64}]), 404, "controlnets"),
        (json!([{"name": "../controlnets/sd15-var-tiny", "image": b64}]), 400, "controlnets"),
        (json!([{"name": "sdxl-var-tiny", "image": b64}]), 400, "controlnets"),
        (json!([{"name": "sd15-var-tiny", "image": b64, "start": 0.6, "end": 0.2}]), 400, "controlnets"),
        (json!([{"name": "sd15-var-tiny", "image": b64, "preprocess": "depth"}]), 400, "controlnets"),
        (json!([{"name": "sd15-var-tiny", "image": "%%%"}]), 400, "controlnets"),
    ] {
        let (st, r) = post(&s, "/v1/images/generations", body(nets.clone()));
        assert_eq!((st, r["error"]["param"].as_str()), (status, Some(param)), "{nets} -> {r}");
    }
    let (_, r) = post(&s, "/v1/images/generations", body(json!([{"name": "sdxl-var-tiny", "image": b64}])));
    let message = r["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("is for SDXL") && message.contains("Stable Diffusion 1.x/2.x"), "{r}");
    let mut cached = body(one.clone());
    cached["cache"] = json!("deepcache:2");
    let (st, r) = post(&s, "/v1/images/generations", cached);
    assert_eq!((st, r["error"]["param"].as_str()), (400, Some("cache")), "{r}");
    // Image-to-image and inpainting take ControlNets.
    let mut edit = body(one);
    edit["image"] = json!(b64);
    let (st, r) = post(&s, "/v1/images/generations", edit.clone());
    assert_eq!(st, 200, "{r}");
    edit["mask"] = json!(b64);
    let (st, r) = post(&s, "/v1/images/generations", edit);
    assert_eq!(st, 200, "{r}");
}

/// FLUX ControlNets by registry name over HTTP: a Union net with its control mode gives the
/// CLI's pixels, the mode is part of the cache key, and a UNet's ControlNet is refused naming
/// both families.
#[test]
fn flux_controlnets_by_name_over_http_match_the_cli_and_refuse_another_family() {
    let tmp = tempfile::tempdir().unwrap();
    let nets = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/controlnets");
    let s = serve(tmp.path(), &["--model", &format!("flux={}", fixture("flux-dev-tiny")), "--controlnet-dir", nets.to_str().unwrap()]);
    let png = test_png(64, 48);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
    let body = |nets: Value| json!({"model": "flux", "prompt": "a red circle", "size": "64x48", "steps": 3, "seed": 4, "controlnets": nets});
    let union = |mode: u32| json!([{"name": "flux-dev-tiny-union", "image": b64, "scale": 0.7, "mode": mode}]);
    let (st, r) = post(&s, "/v1/images/generations", body(union(2)));
    assert_eq!(st, 200, "{r}");
    let with = decoded_pixels(r["data"][0]["b64_json"].as_str().unwrap());
    let (st, r) = post(&s, "/v1/images/generations", body(union(1)));
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["easel"]["cache_hit"], false, "the control mode is part of the cache key");
    assert_ne!(decoded_pixels(r["data"][0]["b64_json"].as_str().unwrap()), with, "the control mode changed nothing");
    let (st, r) = post(&s, "/v1/images/generations", body(json!([])));
    assert_eq!(st, 200, "{r}");
    assert_ne!(decoded_pixels(r["data"][0]["b64_json"].as_str().unwrap()), with, "the ControlNet changed nothing");

    let input = tmp.path().join("control.png");
    std::fs::write(&input, &png).unwrap();
    let out = tmp.path().join("cli.png");
    let run = Command::new(env!("CARGO_BIN_EXE_easel"))
        .args(["generate", "--model", &fixture("flux-dev-tiny"), "a red circle", "--steps", "3", "--seed", "4", "-o", out.to_str().unwrap()])
        .args(["--controlnet-dir", nets.to_str().unwrap(), "--controlnet", "flux-dev-tiny-union:0.7", "--control-mode", "2", "--control-image", input.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(image::open(&out).unwrap().to_rgb8().into_raw(), with, "server and CLI agree");

    let (st, r) = post(&s, "/v1/images/generations", body(json!([{"name": "sd15-var-tiny", "image": b64}])));
    assert_eq!((st, r["error"]["param"].as_str()), (400, Some("controlnets")), "{r}");
    let message = r["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("Stable Diffusion 1.x/2.x") && message.contains("FLUX"), "{r}");
    // A Union net without a mode or out of range, and a mode for a plain net: 400s before queueing.
    for nets in [
        json!([{"name": "flux-dev-tiny-union", "image": b64}]),
        json!([{"name": "flux-dev-tiny-union", "image": b64, "mode": 4}]),
        json!([{"name": "flux-dev-tiny", "image": b64, "mode": 0}]),
    ] {
        let (st, r) = post(&s, "/v1/images/generations", body(nets.clone()));
        assert_eq!((st, r["error"]["param"].as_str()), (400, Some("controlnets")), "{nets} -> {r}");
    }
}

/// IP-Adapters by registry name over HTTP (h94's layout: adapters one folder down, encoders
/// beside them): the server gives the CLI's pixels, alone and stacked with a ControlNet, the
/// edit form takes `ip_adapter` as a JSON field, and bad input is refused naming `ip_adapter`.
#[test]
fn ip_adapters_by_name_over_http_match_the_cli_stack_with_controlnets_and_refuse_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let fixtures = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    let (adapters, nets) = (fixtures.join("ip_adapters"), fixtures.join("controlnets"));
    let s = serve(tmp.path(), &["--model", &format!("var={}", fixture("sd15-var-tiny")), "--ip-adapter-dir", adapters.to_str().unwrap(), "--controlnet-dir", nets.to_str().unwrap()]);
    let png = test_png(70, 50);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
    let body = |ip: Value| json!({"model": "var", "prompt": "a red circle", "size": "64x48", "steps": 3, "seed": 4, "ip_adapter": ip});
    let plain = json!({"name": "ip-adapter_sd15-var-tiny", "image": b64, "scale": 0.6});
    let (st, r) = post(&s, "/v1/images/generations", body(plain.clone()));
    assert_eq!(st, 200, "{r}");
    let with = decoded_pixels(r["data"][0]["b64_json"].as_str().unwrap());
    let (st, r) = post(&s, "/v1/images/generations", body(Value::Null));
    assert_eq!(st, 200, "{r}");
    assert_ne!(decoded_pixels(r["data"][0]["b64_json"].as_str().unwrap()), with, "the IP-Adapter changed nothing");
    let mut stacked = body(json!({"name": "ip-adapter-plus_sd15-var-tiny", "image": b64}));
    stacked["controlnets"] = json!([{"name": "sd15-var-tiny", "image": b64, "scale": 0.8}]);
    let (st, r) = post(&s, "/v1/images/generations", stacked);
    assert_eq!(st, 200, "{r}");
    let plus_with_control = decoded_pixels(r["data"][0]["b64_json"].as_str().unwrap());

    // The CLI on the same picture and settings gives the same pixels.
    let input = tmp.path().join("reference.png");
    std::fs::write(&input, &png).unwrap();
    let out = tmp.path().join("cli.png");
    let cli = |extra: &[&str]| {
        let run = Command::new(env!("CARGO_BIN_EXE_easel"))
            .args(["generate", "--model", &fixture("sd15-var-tiny"), "a red circle", "--steps", "3", "--seed", "4", "--width", "64", "--height", "48", "-o", out.to_str().unwrap()])
            .args(["--ip-adapter-dir", adapters.to_str().unwrap(), "--ip-adapter-image", input.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        image::open(&out).unwrap().to_rgb8().into_raw()
    };
    assert_eq!(cli(&["--ip-adapter", "ip-adapter_sd15-var-tiny", "--ip-adapter-scale", "0.6"]), with, "server and CLI agree");
    let control = ["--controlnet", &format!("{}:0.8", nets.join("sd15-var-tiny").display()), "--control-image", input.to_str().unwrap()];
    assert_eq!(cli(&[&["--ip-adapter", "ip-adapter-plus_sd15-var-tiny"][..], &control[..]].concat()), plus_with_control, "server and CLI agree, stacked");

    // The edit form takes ip_adapter and controlnets as JSON.
    let boundary = "easel-test-boundary";
    let mut form = vec![];
    let controlnets = json!([{"name": "sd15-var-tiny", "image": b64}]).to_string();
    for (name, value) in [("model", "var".to_string()), ("prompt", "a red circle".into()), ("steps", "2".into()), ("ip_adapter", plain.to_string()), ("controlnets", controlnets)] {
        form.extend(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").into_bytes());
    }
    form.extend(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"in.png\"\r\nContent-Type: image/png\r\n\r\n").into_bytes());
    form.extend(test_png(64, 48));
    form.extend(format!("\r\n--{boundary}--\r\n").into_bytes());
    let edited = client()
        .post(format!("{}/v1/images/edits", s.base))
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(form)
        .send()
        .unwrap();
    assert_eq!(edited.status().as_u16(), 200, "{}", edited.text().unwrap_or_default());

    for (ip, status) in [
        (json!({"name": "no-such-adapter", "image": b64}), 404),
        (json!({"name": "../ip_adapters/x", "image": b64}), 400),
        (json!({"name": "ip-adapter_sdxl-var-tiny", "image": b64}), 400),
        (json!({"name": "ip-adapter_sd15-var-tiny", "image": "%%%"}), 400),
        (json!({"name": "ip-adapter_sd15-var-tiny", "image": b64, "scale": 1e9}), 400),
    ] {
        let (st, r) = post(&s, "/v1/images/generations", body(ip.clone()));
        assert_eq!((st, r["error"]["param"].as_str()), (status, Some("ip_adapter")), "{ip} -> {r}");
    }
    let (_, r) = post(&s, "/v1/images/generations", body(json!({"name": "ip-adapter_sdxl-var-tiny", "image": b64})));
    assert!(r["error"]["message"].as_str().unwrap_or_default().contains("cross-attention layers"), "{r}");
}
