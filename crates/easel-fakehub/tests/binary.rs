//! The `easel-fakehub` binary that tests/hub/test_fake_hub.py drives (this test also makes
//! `cargo test --workspace` build it).

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};

#[test]
fn binary_serves_a_folder_as_a_repo_until_stdin_closes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("model_index.json"), b"{}").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_easel-fakehub"))
        .args(["--repo", &format!("acme/x={}", dir.path().display())])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut banner = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut banner).unwrap();
    let words: Vec<&str> = banner.split_whitespace().collect();
    assert_eq!((words[0], words[2]), ("hub", "cdn"), "{banner}");
    let addr = words[1].trim_start_matches("http://");
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    write!(conn, "GET /api/models/acme/x/revision/main HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200") && answer.contains("\"rfilename\":\"model_index.json\""), "{answer}");
    drop(child.stdin.take());
    let status = child.wait().unwrap();
    assert!(status.success());
}
