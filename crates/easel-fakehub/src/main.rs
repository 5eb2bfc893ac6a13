//! `easel-fakehub`: serves folders as hub repos on 127.0.0.1 until stdin closes, for the Python
//! client's check of the fake and for trying easel against a hub by hand.
//!
//! ```text
//! easel-fakehub --repo owner/name=DIR [--gated owner/name] [--private owner/name] [--token T] [--grant owner/name=T]
//! ```
//! Prints `hub <endpoint> cdn <cdn>` on its first line.

use std::io::{BufRead, Write};

use easel_fakehub::{Access, FakeHub};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut repos: Vec<(String, String)> = Vec::new();
    let (mut gated, mut private, mut tokens, mut grants) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let Some(value) = it.next() else {
            eprintln!("error: {flag} needs a value");
            std::process::exit(2);
        };
        let pair = || value.split_once('=').map(|(a, b)| (a.to_string(), b.to_string()));
        match (flag.as_str(), pair()) {
            ("--repo", Some(p)) => repos.push(p),
            ("--grant", Some(p)) => grants.push(p),
            ("--gated", _) => gated.push(value.clone()),
            ("--private", _) => private.push(value.clone()),
            ("--token", _) => tokens.push(value.clone()),
            _ => {
                eprintln!("error: unknown flag or value `{flag} {value}`; see the module doc");
                std::process::exit(2);
            }
        }
    }
    let hub = FakeHub::start();
    for t in &tokens {
        hub.add_token(t);
    }
    for (id, dir) in &repos {
        let granted: Vec<String> = grants.iter().filter(|(r, _)| r == id).map(|(_, t)| t.clone()).collect();
        let access = if gated.contains(id) {
            Access::Gated { granted }
        } else if private.contains(id) {
            Access::Private { granted }
        } else {
            Access::Public
        };
        hub.add_repo(id, access);
        if let Err(e) = hub.commit_dir(id, std::path::Path::new(dir)) {
            eprintln!("error: {dir}: {e}");
            std::process::exit(2);
        }
    }
    println!("hub {} cdn {}", hub.endpoint, hub.cdn);
    let _ = std::io::stdout().flush();
    // Serve until whoever started us closes our stdin.
    for line in std::io::stdin().lock().lines() {
        if line.is_err() {
            break;
        }
    }
}
