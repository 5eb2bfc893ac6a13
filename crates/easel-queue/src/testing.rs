//! For tests: the Redis they run against. A fresh machine may have none running, so the first
//! caller starts `redis-server` on 127.0.0.1:6379 (detached, like the one `.ci/run` starts);
//! a machine without the binary gets one line saying how to install it, not a connection error.

use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The test Redis's address: `EASEL_TEST_REDIS_ADDR`, else 127.0.0.1:6379.
fn address() -> String {
    std::env::var("EASEL_TEST_REDIS_ADDR").unwrap_or_else(|_| "127.0.0.1:6379".into())
}

/// `redis://HOST:PORT/DB` of a Redis that is running, started here if nothing listens.
pub fn redis_url(db: u32) -> String {
    static STARTED: std::sync::Once = std::sync::Once::new();
    let addr = address();
    STARTED.call_once(|| {
        if TcpStream::connect(&addr).is_ok() {
            return;
        }
        let port = addr.rsplit(':').next().unwrap_or("6379").to_string();
        let spawned = Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        match spawned {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("redis-server exited with {s} while starting on port {port}"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                panic!("the Redis tests need redis-server: install it (Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis) or run .ci/run")
            }
            Err(e) => panic!("starting redis-server: {e}"),
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start listening on {addr}");
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    format!("redis://{addr}/{db}")
}
