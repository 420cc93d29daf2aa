//! Helpers for the tests that run the `ctrlbus` binary (each test crate
//! uses some).
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_ctrlbus");

/// A scratch directory with a log path in it.
pub struct Scratch {
    pub dir: tempfile::TempDir,
    pub db: PathBuf,
}

impl Scratch {
    pub fn new() -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("events.redb");
        Scratch { dir, db }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A `ctrlbus --db <db> …` command, with no `CTRLBUS_DB` from outside.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.env_remove("CTRLBUS_DB")
            .arg("--db")
            .arg(&self.db)
            .args(args);
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// `webhooks add --tenant TENANT --url URL --allow-private-targets`
    /// (a receiver on 127.0.0.1); returns the new webhook's JSON.
    pub fn add_local_hook(&self, tenant: &str, url: &str) -> Value {
        let out = self.ok(&[
            "webhooks",
            "add",
            "--tenant",
            tenant,
            "--url",
            url,
            "--allow-private-targets",
        ]);
        serde_json::from_str(out.lines().next().unwrap()).unwrap()
    }

    /// Runs and expects exit 0; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "ctrlbus {args:?} failed: {:?}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs and expects `code`; returns stderr.
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        let out = self.run(args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "ctrlbus {args:?}: stdout {} stderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    /// Runs with `stdin` as standard input.
    pub fn with_stdin(&self, args: &[&str], stdin: &[u8]) -> Output {
        let mut child = self
            .cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child.wait_with_output().unwrap()
    }
}

pub fn lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

pub fn seqs(stdout: &str) -> Vec<u64> {
    lines(stdout)
        .iter()
        .map(|v| v["seq"].as_u64().unwrap())
        .collect()
}

pub fn one_line_error(stderr: &str) {
    assert!(stderr.starts_with("ctrlbus: "), "{stderr:?}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr:?}");
}

pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// One received webhook request: lowercase header names and values, body.
pub type Request = (Vec<(String, String)>, Vec<u8>);

/// A webhook receiver on 127.0.0.1 that answers 200 and hands over each
/// request's headers and body.
pub struct Receiver {
    pub url: String,
    pub rx: std::sync::mpsc::Receiver<Request>,
}

pub fn receiver() -> Receiver {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", server.server_addr().to_ip().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for mut req in server.incoming_requests() {
            let headers = req
                .headers()
                .iter()
                .map(|h| {
                    (
                        h.field.as_str().as_str().to_ascii_lowercase(),
                        h.value.as_str().to_owned(),
                    )
                })
                .collect();
            let mut body = Vec::new();
            let _ = req.as_reader().read_to_end(&mut body);
            let _ = req.respond(tiny_http::Response::empty(200));
            if tx.send((headers, body)).is_err() {
                return;
            }
        }
    });
    Receiver { url, rx }
}
