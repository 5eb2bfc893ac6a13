//! Scale-out, driving the real binaries: an API node with no workers of its own (503 until a
//! worker serves the model), `easel worker` processes over the shared SQLite and Redis queues,
//! a worker killed with -9 mid-job whose job another worker finishes, job events relayed
//! through Redis, a Redis restart (append-only) with jobs queued, and images in S3.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::*;

/// The test Redis (started if none runs); each test owns one database number.
fn redis_url(db: u32) -> String {
    let url = easel_queue::testing::redis_url(db);
    flush(&url);
    url
}

fn flush(url: &str) {
    let client = redis::Client::open(url).expect("redis url");
    let mut c = client.get_connection().expect("the test Redis");
    redis::cmd("FLUSHDB").query::<()>(&mut c).expect("flushdb");
}

fn job_body(steps: u32) -> Value {
    json!({"prompt": "a red circle", "size": "64x64", "steps": steps, "seed": 7})
}

#[test]
fn api_node_answers_503_until_a_worker_serves_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let api = serve(tmp.path(), &["--workers", "0"]);
    let (st, err) = post(&api, "/v1/images/generations", job_body(2));
    assert_eq!(st, 503, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("no worker is serving model `tiny`"), "{err}");
    let (_, models) = get(&api, "/v1/models");
    assert_eq!(models["data"][0]["ready"], json!(false));
    assert_eq!(get(&api, "/readyz").0, 503);
    // Unknown models are still 404, not 503.
    let (st, _) = post(&api, "/v1/images/generations", json!({"prompt": "x", "model": "nope"}));
    assert_eq!(st, 404);
    // A worker process on the same data dir (SQLite in WAL mode, one machine) serves it.
    let _w = worker(tmp.path(), &[]);
    wait_for(&api, "/v1/models", Duration::from_secs(5), |m| m["data"][0]["ready"] == json!(true));
    let (st, body) = post(&api, "/v1/images/generations", job_body(2));
    assert_eq!(st, 200, "{body}");
    assert!(body["data"][0]["b64_json"].as_str().unwrap().len() > 100);
}

#[test]
fn redis_worker_killed_mid_job_is_finished_by_another_with_events_relayed() {
    let tmp = tempfile::tempdir().unwrap();
    let queue = redis_url(14);
    let api = serve(tmp.path(), &["--workers", "0", "--queue", &queue]);
    let mut first = worker(tmp.path(), &["--queue", &queue, "--lease", "2"]);
    let (st, job) = post(&api, "/v1/jobs", job_body(20));
    assert_eq!(st, 202, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    // Events from the worker process reach this API node through Redis.
    let mut events = BufReader::new(client().get(format!("{}/v1/jobs/{id}/events", api.base)).send().unwrap());
    let mut seen = String::new();
    while !seen.contains("event: progress") {
        let mut line = String::new();
        assert!(events.read_line(&mut line).unwrap() > 0, "event stream ended early: {seen}");
        seen.push_str(&line);
    }
    let _ = first.0.kill();
    let _ = first.0.wait();
    let _second = worker(tmp.path(), &["--queue", &queue, "--lease", "2"]);
    let done = wait_done(&api, &id);
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 2, "the first attempt died with its worker: {done}");
    assert_eq!(done["images"].as_array().unwrap().len(), 1, "recorded exactly once");
    let (st, img) = post(&api, "/v1/images/generations", job_body(20));
    assert_eq!((st, img["easel"]["cache_hit"].as_bool()), (200, Some(true)), "the finished job is the cached result");
    flush(&queue);
}

/// A Redis server of this test's own, with append-only persistence.
struct OwnRedis {
    child: Option<std::process::Child>,
    port: u16,
    dir: std::path::PathBuf,
}

impl OwnRedis {
    fn start(dir: &Path, port: u16) -> Self {
        let mut r = Self { child: None, port, dir: dir.to_path_buf() };
        r.restart();
        r
    }

    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--appendonly", "yes", "--appendfsync", "always", "--save", ""])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("redis-server ({e}): install it (Debian/Ubuntu: apt-get install redis-server) or run .ci/run"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

#[test]
fn a_redis_restart_loses_no_accepted_job() {
    let tmp = tempfile::tempdir().unwrap();
    let port = 16379 + (std::process::id() % 1000) as u16;
    let mut redis = OwnRedis::start(tmp.path(), port);
    let queue = format!("redis://127.0.0.1:{port}/0");
    let api = serve(tmp.path(), &["--workers", "0", "--queue", &queue]);
    // Accept jobs while a worker is up, then take the worker away so they stay queued.
    let w = worker(tmp.path(), &["--queue", &queue]);
    let mut ids = vec![];
    drop(w);
    for i in 0..5 {
        let mut body = job_body(3);
        body["seed"] = json!(100 + i);
        let (st, job) = post(&api, "/v1/jobs", body);
        assert_eq!(st, 202, "{job}");
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    redis.kill();
    // While Redis is down: a clear 503 in OpenAI's shape, never a hang or a panic.
    let (st, err) = post(&api, "/v1/jobs", job_body(3));
    assert_eq!(st, 503, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("queue is unavailable"), "{err}");
    redis.restart();
    let _w = worker(tmp.path(), &["--queue", &queue]);
    for id in &ids {
        let done = wait_done(&api, id);
        assert_eq!(done["status"], "succeeded", "{done}");
    }
}

/// An S3-compatible server: EASEL_TEST_S3, else moto's server on 127.0.0.1:5055, which
/// .ci/run starts; started here (and installed from PyPI if missing) when nothing listens.
fn s3_endpoint() -> String {
    if let Ok(url) = std::env::var("EASEL_TEST_S3") {
        return url;
    }
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        if TcpStream::connect("127.0.0.1:5055").is_ok() {
            return;
        }
        let have_moto = Command::new("python3").args(["-c", "import moto.server"]).status().map(|s| s.success()).unwrap_or(false);
        if !have_moto {
            let ok = Command::new("python3").args(["-m", "pip", "install", "-q", "moto[server]>=5"]).status().map(|s| s.success()).unwrap_or(false);
            assert!(ok, "the S3 tests need moto's server: pip install 'moto[server]' (or run .ci/run)");
        }
        // Detached on purpose: it outlives this test binary, like the service .ci/run starts.
        Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", "5055"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto's S3 server");
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect("127.0.0.1:5055").is_err() {
            assert!(Instant::now() < deadline, "moto's S3 server did not start on 127.0.0.1:5055");
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    "http://127.0.0.1:5055".into()
}

/// A TCP proxy in front of the S3 server that can be told to refuse writes (503 SlowDown to
/// every PUT), the way an overloaded or failing bucket does. One request per connection.
struct FlakyS3 {
    addr: std::net::SocketAddr,
    refuse: std::sync::Arc<std::sync::atomic::AtomicBool>,
    refused: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl FlakyS3 {
    fn start(upstream: &str) -> Self {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let up = upstream.trim_start_matches("http://").to_string();
        let refuse = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (r, n) = (refuse.clone(), refused.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut client) = conn else { continue };
                let (up, r, n) = (up.clone(), r.clone(), n.clone());
                std::thread::spawn(move || {
                    let mut head = vec![];
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if client.read(&mut byte).unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let text = String::from_utf8_lossy(&head).to_string();
                    if text.starts_with("PUT ") && r.load(Ordering::SeqCst) {
                        n.fetch_add(1, Ordering::SeqCst);
                        let body = "<?xml version=\"1.0\"?><Error><Code>SlowDown</Code><Message>refusing writes</Message></Error>";
                        let _ = write!(client, "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/xml\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
                        return;
                    }
                    let Ok(mut server) = TcpStream::connect(&up) else { return };
                    let mut lines: Vec<&str> = text.trim_end().split("\r\n").filter(|l| !l.to_ascii_lowercase().starts_with("connection:")).collect();
                    lines.push("connection: close");
                    let _ = server.write_all(format!("{}\r\n\r\n", lines.join("\r\n")).as_bytes());
                    let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut c2, &mut s2);
                    });
                    let _ = std::io::copy(&mut server, &mut client);
                });
            }
        });
        Self { addr, refuse, refused }
    }
}

fn serve_with_env(data: &Path, extra: &[&str], env: &[(&str, String)]) -> Result<Server, String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_easel"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir", data.to_str().unwrap(), "--model", &format!("tiny={}", fixture("sd15-tiny"))])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start easel serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    match line.trim().strip_prefix("easel listening on ") {
        Some(base) => Ok(Server { base: base.to_string(), child }),
        None => {
            let out = child.wait_with_output().unwrap();
            Err(String::from_utf8_lossy(&out.stderr).to_string())
        }
    }
}

#[test]
fn images_in_s3_with_presigned_urls_survive_refused_writes() {
    use std::sync::atomic::Ordering;
    let tmp = tempfile::tempdir().unwrap();
    let endpoint = s3_endpoint();
    let bucket = format!("easel-test-{}", std::process::id());
    let created = client().put(format!("{endpoint}/{bucket}")).send().expect("S3 server on 127.0.0.1:5055 (started by .ci/run)");
    assert!(created.status().is_success(), "creating bucket: {}", created.status());
    let proxy = FlakyS3::start(&endpoint);
    let env = [
        ("AWS_ENDPOINT", format!("http://{}", proxy.addr)),
        ("AWS_ACCESS_KEY_ID", "testing".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "testing".to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
    ];
    // A missing bucket stops start-up with one clear line.
    let err = serve_with_env(tmp.path(), &["--store", "s3://no-such-bucket-here/x"], &env).err().expect("refused to start");
    assert!(err.contains("cannot write to s3://no-such-bucket-here/x"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let store = format!("s3://{bucket}/images");
    let api = serve_with_env(tmp.path(), &["--store", &store, "--url-lifetime", "600"], &env).expect("starts");
    let mut body = job_body(2);
    body["response_format"] = json!("url");
    let (st, resp) = post(&api, "/v1/images/generations", body);
    assert_eq!(st, 200, "{resp}");
    let url = resp["data"][0]["url"].as_str().unwrap();
    assert!(url.contains(&bucket) && url.contains("X-Amz-Signature"), "a presigned S3 URL: {url}");
    let png = client().get(url).send().unwrap().bytes().unwrap();
    assert_eq!(&png[1..4], b"PNG", "the URL serves the image straight from the bucket");
    // Still readable through the API too, by the job's signed URL.
    let id = resp["easel"]["job_id"].as_str().unwrap();
    let (_, record) = get(&api, &format!("/v1/jobs/{id}"));
    let path = record["images"][0]["url"].as_str().unwrap();
    assert_eq!(client().get(format!("{}{path}", api.base)).send().unwrap().status().as_u16(), 200);

    // The bucket refuses writes for a while: the job is retried, then finishes.
    proxy.refuse.store(true, Ordering::SeqCst);
    let mut body = job_body(2);
    body["seed"] = json!(99);
    let (st, job) = post(&api, "/v1/jobs", body);
    assert_eq!(st, 202);
    let deadline = Instant::now() + Duration::from_secs(60);
    while proxy.refused.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "the worker never tried to write");
        std::thread::sleep(Duration::from_millis(50));
    }
    proxy.refuse.store(false, Ordering::SeqCst);
    let done = wait_done(&api, job["id"].as_str().unwrap());
    assert_eq!(done["status"], "succeeded", "{done}");
}
