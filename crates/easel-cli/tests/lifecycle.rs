//! A job's life at its edges, driving the real binaries: a worker stopped (SIGSTOP) past its
//! lease while another finishes its job, webhooks counted at a receiver with two API nodes
//! and a worker on Redis, tenants kept apart, and random kill -9 of servers and workers during
//! bursts on SQLite and on Redis.

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::*;

fn tiny() -> String {
    format!("tiny={}", fixture("sd15-tiny"))
}

fn api_node(data: &Path, extra: &[&str]) -> Server {
    serve(data, &[&["--workers", "0"], extra].concat())
}

fn logged_worker(data: &Path, extra: &[&str], log: &Path) -> Child {
    let model = tiny();
    let (child, line) = spawn_logged(&[&["worker", "--data-dir", data.to_str().unwrap(), "--model", &model], extra].concat(), log);
    assert!(line.starts_with("easel worker running"), "unexpected banner: {line} ({})", std::fs::read_to_string(log).unwrap_or_default());
    child
}

fn signal(child: &Child, sig: &str) {
    let ok = std::process::Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap().success();
    assert!(ok, "kill {sig}");
}

/// The attempt numbers of the image files stored for a job (`{attempt}_{i}.png`).
fn stored_attempts(data: &Path, job: &str) -> Vec<u32> {
    let mut out: Vec<u32> = std::fs::read_dir(data.join("images").join(job))
        .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.split('_').next()?.parse().ok()).collect())
        .unwrap_or_default();
    out.sort();
    out.dedup();
    out
}

#[test]
fn a_worker_stopped_past_its_lease_records_nothing_and_the_second_workers_result_stands() {
    let tmp = tempfile::tempdir().unwrap();
    let api = api_node(tmp.path(), &[]);
    let first_log = tmp.path().join("first.log");
    let mut first = logged_worker(tmp.path(), &["--lease", "2"], &first_log);
    // Long enough (about 0.3 s a step here, 24 s in all) that the first worker is mid-denoise when
    // stopped even on a machine several times faster.
    let (st, job) = post(&api, "/v1/jobs", json!({"prompt": "a red circle", "size": "64x64", "steps": 80, "seed": 11}));
    assert_eq!(st, 202, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    wait_for(&api, &format!("/v1/jobs/{id}"), Duration::from_secs(60), |j| j["status"] == "running");
    std::thread::sleep(Duration::from_millis(300));
    signal(&first, "-STOP");
    let second = worker(tmp.path(), &["--lease", "2"]);
    let done = wait_done(&api, &id);
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 2, "{done}");
    // The stopped worker resumes, learns it lost the job, and stops without writing anything.
    signal(&first, "-CONT");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&first_log).unwrap_or_default().contains("lost the lease") {
        assert!(Instant::now() < deadline, "the resumed worker never noticed: {}", std::fs::read_to_string(&first_log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    let after = get(&api, &format!("/v1/jobs/{id}")).1;
    let paths = |j: &Value| -> Vec<String> { j["images"].as_array().unwrap().iter().map(|i| i["url"].as_str().unwrap().split('?').next().unwrap().to_string()).collect() };
    assert_eq!(paths(&after), paths(&done), "the result recorded is the second worker's, once");
    assert!(after["images"][0]["url"].as_str().unwrap().contains(&format!("{id}/2_0.png")), "{after}");
    assert_eq!(stored_attempts(tmp.path(), &id), [2], "the first attempt stored no image");
    let _ = first.kill();
    let _ = first.wait();
    drop(second);
}

#[test]
fn each_webhook_is_delivered_once_with_two_api_nodes_and_a_worker_on_redis() {
    let tmp = tempfile::tempdir().unwrap();
    let queue = easel_queue::testing::redis_url(12);
    let flush = || {
        let mut c = redis::Client::open(queue.as_str()).unwrap().get_connection().unwrap();
        redis::cmd("FLUSHDB").query::<()>(&mut c).unwrap();
    };
    flush();
    let hooks = receiver();
    let shared = ["--queue", &queue, "--allow-private-webhooks", "--signing-secret", "s3cret"];
    let nodes = [api_node(tmp.path(), &shared), api_node(tmp.path(), &shared)];
    let _w = worker(tmp.path(), &shared);
    let mut ids = vec![];
    for i in 0..6 {
        let body = json!({"prompt": "a blue square", "size": "64x64", "steps": 2, "seed": 200 + i, "webhook_url": hooks.url});
        let (st, job) = post(&nodes[i as usize % 2], "/v1/jobs", body);
        assert_eq!(st, 202, "{job}");
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        assert_eq!(wait_done(&nodes[0], id)["status"], "succeeded");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while hooks.got.lock().unwrap().len() < ids.len() {
        assert!(Instant::now() < deadline, "deliveries missing: {:?}", hooks.got.lock().unwrap());
        std::thread::sleep(Duration::from_millis(100));
    }
    // Three processes deliver from the outbox: give a duplicate the time to arrive.
    std::thread::sleep(Duration::from_secs(2));
    let got = hooks.got.lock().unwrap().clone();
    let mut jobs: Vec<String> = got.iter().map(|(_, e)| e["job_id"].as_str().unwrap().to_string()).collect();
    jobs.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(jobs, want, "each job's webhook exactly once: {got:?}");
    let mut deliveries: Vec<&str> = got.iter().map(|(d, _)| d.as_str()).collect();
    deliveries.sort();
    deliveries.dedup();
    assert_eq!(deliveries.len(), ids.len(), "a delivery id per job: {got:?}");
    assert!(got.iter().all(|(_, e)| e["type"] == "completed"));
    let url = got[0].1["urls"][0].as_str().unwrap().to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "absolute, where the client reached easel: {url}");
    assert_eq!(client().get(&url).send().unwrap().status().as_u16(), 200, "and it opens (signed)");
    flush();
}

#[test]
fn tenants_see_only_their_own_jobs_events_images_and_usage() {
    let tmp = tempfile::tempdir().unwrap();
    let s = serve(tmp.path(), &["--api-key", "alice:a-secret", "--api-key", "bob:b-secret", "--admin-key", "root:r-secret", "--metrics-need-admin"]);
    let c = client();
    let as_key = |rb: reqwest::blocking::RequestBuilder, secret: &str| rb.header("Authorization", format!("Bearer {secret}"));
    let body = json!({"prompt": "a green triangle", "size": "64x64", "steps": 2, "seed": 5});
    let job: Value = as_key(c.post(format!("{}/v1/jobs", s.base)), "a-secret").header("Idempotency-Key", "k1").json(&body).send().unwrap().json().unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    let status = |path: &str, secret: Option<&str>| {
        let rb = c.get(format!("{}{path}", s.base));
        let rb = match secret {
            Some(k) => as_key(rb, k),
            None => rb,
        };
        rb.send().unwrap().status().as_u16()
    };
    // Alice waits for her job; Bob cannot read, stream or cancel it (404, as if it did not exist).
    let deadline = Instant::now() + Duration::from_secs(60);
    let done: Value = loop {
        let j: Value = as_key(c.get(format!("{}/v1/jobs/{id}", s.base)), "a-secret").send().unwrap().json().unwrap();
        if j["status"] == "succeeded" {
            break j;
        }
        assert!(Instant::now() < deadline, "{j}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status(&format!("/v1/jobs/{id}"), Some("b-secret")), 404);
    assert_eq!(status(&format!("/v1/jobs/{id}/events"), Some("b-secret")), 404);
    assert_eq!(as_key(c.post(format!("{}/v1/jobs/{id}/cancel", s.base)), "b-secret").send().unwrap().status().as_u16(), 404);
    assert_eq!(status(&format!("/v1/jobs/{id}"), Some("r-secret")), 200, "an admin key sees every job");
    // Images: the signed URL works without a key; the bare path needs the owner's key.
    let signed = done["images"][0]["url"].as_str().unwrap().to_string();
    assert!(signed.contains("expires=") && signed.contains("sig="), "{signed}");
    assert_eq!(status(&signed, None), 200);
    let bare = signed.split('?').next().unwrap().to_string();
    assert_eq!(status(&bare, None), 401);
    assert_eq!(status(&bare, Some("b-secret")), 404);
    assert_eq!(status(&bare, Some("a-secret")), 200);
    let tampered = signed.replace("sig=", "sig=00");
    assert_eq!(status(&tampered, None), 403);
    let other_file = signed.replace("_0.png", "_1.png");
    assert_eq!(status(&other_file, None), 403, "a signature is for one image");
    // Usage: each key its own rows; the admin all of them.
    let usage = |secret: &str| -> Value { as_key(c.get(format!("{}/v1/usage", s.base)), secret).send().unwrap().json().unwrap() };
    assert_eq!(usage("a-secret")["data"][0]["api_key"], "alice");
    assert_eq!(usage("b-secret")["data"], json!([]));
    assert_eq!(usage("r-secret")["data"][0]["api_key"], "alice");
    // Idempotency keys are per key; a reuse with another body is a 409.
    let again: Value = as_key(c.post(format!("{}/v1/jobs", s.base)), "a-secret").header("Idempotency-Key", "k1").json(&body).send().unwrap().json().unwrap();
    assert_eq!(again["id"], job["id"]);
    let mut other = body.clone();
    other["prompt"] = json!("something else");
    let reused = as_key(c.post(format!("{}/v1/jobs", s.base)), "a-secret").header("Idempotency-Key", "k1").json(&other).send().unwrap();
    assert_eq!(reused.status().as_u16(), 409);
    let err: Value = reused.json().unwrap();
    assert_eq!((err["error"]["code"].as_str(), err["error"]["param"].as_str()), (Some("idempotency_key_reused"), Some("Idempotency-Key")), "{err}");
    let bobs: Value = as_key(c.post(format!("{}/v1/jobs", s.base)), "b-secret").header("Idempotency-Key", "k1").json(&body).send().unwrap().json().unwrap();
    assert_ne!(bobs["id"], job["id"], "Bob's k1 is not Alice's k1");
    assert_ne!(bobs["easel"]["cache_hit"], json!(true), "nor is Alice's cached result handed to Bob: {bobs}");
    // /metrics needs an admin key here.
    assert_eq!(status("/metrics", Some("a-secret")), 403);
    assert_eq!(status("/metrics", Some("r-secret")), 200);
}

/// One trial: a burst of jobs, one process killed with -9 at a random moment and restarted;
/// every job accepted (202) ends succeeded, and each is recorded once.
fn kill_9_trials(queue: Option<&str>, trials: u32) {
    let tmp = tempfile::tempdir().unwrap();
    let mut shared: Vec<String> = vec!["--lease".into(), "2".into()];
    if let Some(q) = queue {
        shared.extend(["--queue".into(), q.into()]);
    }
    let shared: Vec<&str> = shared.iter().map(String::as_str).collect();
    let mut api = api_node(tmp.path(), &shared);
    let mut workers = vec![worker(tmp.path(), &shared), worker(tmp.path(), &shared)];
    let mut accepted: Vec<String> = vec![];
    // A small deterministic generator: the trials differ, and a failure can be replayed.
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    for trial in 0..trials {
        let burst = 3 + next(4);
        for i in 0..burst {
            let body = json!({"prompt": "a red circle", "size": "64x64", "steps": 1 + next(3), "seed": trial * 100 + i as u32});
            // A request cut off by the kill is not accepted; only 202s count.
            if let Ok(r) = client().post(format!("{}/v1/jobs", api.base)).json(&body).send() {
                if r.status().as_u16() == 202 {
                    accepted.push(r.json::<Value>().unwrap()["id"].as_str().unwrap().to_string());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(next(400)));
        match next(3) {
            0 => {
                let _ = api.child.kill();
                let _ = api.child.wait();
                api = api_node(tmp.path(), &shared);
            }
            w => {
                let i = (w - 1) as usize;
                let _ = workers[i].0.kill();
                let _ = workers[i].0.wait();
                workers[i] = worker(tmp.path(), &shared);
            }
        }
    }
    let mut succeeded = 0;
    for id in &accepted {
        let done = wait_done(&api, id);
        // Never lost: it ends, succeeded, or failed as worker_crashed when both of its attempts'
        // workers were the ones killed.
        if done["status"] == "failed" && done["error"]["code"] == "worker_crashed" {
            continue;
        }
        assert_eq!(done["status"], "succeeded", "{done}");
        succeeded += 1;
        let attempts: Vec<u32> = done["images"].as_array().unwrap().iter().map(|i| i["url"].as_str().unwrap().rsplit('/').next().unwrap().split('_').next().unwrap().parse().unwrap()).collect();
        assert!(attempts.iter().all(|a| *a == attempts[0]), "one attempt's images: {done}");
    }
    // Recorded once: one ledger row per job.
    let usage = get(&api, "/v1/usage").1;
    let jobs: u64 = usage["data"].as_array().unwrap().iter().map(|r| r["jobs"].as_u64().unwrap()).sum();
    assert_eq!(jobs, succeeded, "{usage}");
    assert!(accepted.len() >= trials as usize * 2, "bursts were accepted: {}", accepted.len());
}

#[test]
fn random_kill_9_during_bursts_loses_no_accepted_job_on_sqlite() {
    kill_9_trials(None, 20);
}

#[test]
fn random_kill_9_during_bursts_loses_no_accepted_job_on_redis() {
    let queue = easel_queue::testing::redis_url(11);
    let mut c = redis::Client::open(queue.as_str()).unwrap().get_connection().unwrap();
    redis::cmd("FLUSHDB").query::<()>(&mut c).unwrap();
    kill_9_trials(Some(&queue), 20);
    redis::cmd("FLUSHDB").query::<()>(&mut c).unwrap();
}

#[test]
fn an_idempotent_retry_at_the_per_key_job_cap_gets_its_job_back() {
    let tmp = tempfile::tempdir().unwrap();
    let s = serve(tmp.path(), &["--api-key", "alice:a-secret", "--max-jobs-per-key", "1"]);
    let send = |key: &str, body: &Value| {
        let r = client().post(format!("{}/v1/jobs", s.base)).header("Authorization", "Bearer a-secret").header("Idempotency-Key", key).json(body).send().unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    };
    let slow = json!({"prompt": "a slow one", "size": "64x64", "steps": 300});
    let (st, first) = send("k1", &slow);
    assert_eq!(st, 202, "{first}");
    let (st, again) = send("k1", &slow);
    assert_eq!((st, &again["id"]), (202, &first["id"]), "the retry is the same job, not a 429");
    let (st, err) = send("k1", &json!({"prompt": "another", "size": "64x64"}));
    assert_eq!((st, err["error"]["code"].as_str()), (409, Some("idempotency_key_reused")));
    let (st, _) = send("k2", &slow);
    assert_eq!(st, 429, "a new job over the cap is refused");
    client().post(format!("{}/v1/jobs/{}/cancel", s.base, first["id"].as_str().unwrap())).header("Authorization", "Bearer a-secret").send().unwrap();
}
