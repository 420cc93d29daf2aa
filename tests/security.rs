//! Security at the seams: the environment a delivery runs in, the files
//! ctrlbus creates, secrets kept off command lines and terminals, and
//! webhooks whose stored state can't be trusted failing closed.
#![cfg(feature = "cli")]

mod cli_support;

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cli_support::{Scratch, lines, receiver};

/// A listener standing in for a proxy: counts the connections it gets.
fn fake_proxy() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(conn);
        }
    });
    (format!("http://{addr}"), hits)
}

#[test]
fn deliveries_never_use_a_proxy_from_the_environment() {
    let s = Scratch::new();
    let recv = receiver();
    let (proxy, hits) = fake_proxy();
    s.add_local_hook("acme", &recv.url);
    s.ok(&["publish", "deploy.started", "--tenant", "acme"]);
    let mut cmd = s.cmd(&[
        "deliver",
        "--until-idle",
        "--allow-private-targets",
        "--retry-schedule",
        "100ms",
        "--timeout",
        "5s",
    ]);
    for var in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        cmd.env(var, &proxy);
    }
    cmd.env_remove("NO_PROXY").env_remove("no_proxy");
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = &lines(&String::from_utf8(out.stdout).unwrap())[0];
    assert_eq!(summary["succeeded"], 1, "{summary}");
    recv.rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the delivery reaches the receiver directly");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "the proxy from the environment was connected to"
    );
}

#[cfg(unix)]
fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[cfg(unix)]
#[test]
fn every_file_ctrlbus_creates_is_private() {
    let s = Scratch::new();
    let acks = s.path("acks.txt");
    s.ok(&[
        "webhooks",
        "add",
        "--tenant",
        "acme",
        "--url",
        "http://127.0.0.1:9/x",
        "--allow-private-targets",
    ]);
    s.ok(&[
        "bench",
        "publish",
        "--events",
        "10",
        "--publishers",
        "2",
        "--payload-bytes",
        "20",
        "--acks",
        acks.to_str().unwrap(),
    ]);
    let wal = s.path("events.redb.wal");
    for path in [&s.db, &wal, &acks] {
        assert_eq!(mode(path), 0o600, "{}", path.display());
    }

    // The library too, whatever the umask lets through.
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("lib.redb");
    let bus = ctrlbus::DurableBus::open(&db).unwrap();
    drop(bus);
    assert_eq!(mode(&db), 0o600);
    assert_eq!(mode(&dir.path().join("lib.redb.wal")), 0o600);
}

#[test]
fn table_output_escapes_control_characters() {
    let s = Scratch::new();
    let forged = "alice\u{1b}[2J\u{1b}]0;owned\u{7}\n99  2026-01-01T00:00:00Z  deploy.forged";
    s.ok(&[
        "publish",
        "deploy.started",
        "--tenant",
        "acme\r",
        "--actor",
        forged,
    ]);
    for args in [
        &["--format", "table", "replay"][..],
        &["--format", "table", "tail"][..],
    ] {
        let out = s.ok(args);
        assert!(
            !out.bytes().any(|b| b == 0x1b || b == 0x07 || b == b'\r'),
            "{args:?}: {out:?}"
        );
        assert_eq!(out.lines().count(), 2, "header and one row: {out}");
        assert!(out.contains(r"alice\u{1b}[2J"), "{out}");
        assert!(out.contains(r"\n99"), "{out}");
    }
    // JSON lines keep the exact value (escaped by JSON itself).
    let json = &lines(&s.ok(&["replay"]))[0];
    assert_eq!(json["actor_id"], forged);
}

/// Borrowed arguments for `Scratch::ok` and `Scratch::fails`.
fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

#[test]
fn secrets_can_come_from_a_file_or_stdin_instead_of_the_command_line() {
    let s = Scratch::new();
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let file = s.path("secret.txt");
    std::fs::write(&file, format!("{secret}\n")).unwrap();
    // `webhooks add` with `extra` flags.
    let add = |extra: &[&str]| -> Vec<String> {
        [
            "webhooks",
            "add",
            "--tenant",
            "acme",
            "--url",
            "http://127.0.0.1:9/x",
            "--allow-private-targets",
        ]
        .iter()
        .chain(extra)
        .map(|a| (*a).to_owned())
        .collect()
    };
    let added = &lines(&s.ok(&strs(&add(&["--secret-file", file.to_str().unwrap()]))))[0];
    assert_eq!(added["secret"], secret);
    let id = added["id"].as_str().unwrap().to_owned();

    // rotate-secret from standard input.
    let rotated = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    let out = s.with_stdin(
        &["webhooks", "rotate-secret", &id, "--secret-file", "-"],
        rotated.as_bytes(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        lines(&String::from_utf8(out.stdout).unwrap())[0]["secret"],
        rotated
    );

    // Missing, empty, oversized and not-a-secret files are refused, and
    // --secret with --secret-file is a usage error.
    let empty = s.path("empty.txt");
    std::fs::write(&empty, "\n").unwrap();
    let big = s.path("big.txt");
    std::fs::write(&big, "x".repeat(5000)).unwrap();
    let junk = s.path("junk.txt");
    std::fs::write(&junk, "not a secret").unwrap();
    for (path, expect) in [
        (s.path("missing.txt"), "cannot read the secret"),
        (empty, "holds no secret"),
        (big, "longer than 4096 bytes"),
        (junk, "secret"),
    ] {
        let err = s.fails(&strs(&add(&["--secret-file", path.to_str().unwrap()])), 1);
        cli_support::one_line_error(&err);
        assert!(err.contains(expect), "{path:?}: {err}");
        assert!(!err.contains("xxxx"), "the file's text is not echoed");
    }
    s.fails(
        &strs(&add(&[
            "--secret",
            secret,
            "--secret-file",
            file.to_str().unwrap(),
        ])),
        2,
    );
    assert_eq!(lines(&s.ok(&["webhooks", "list"])).len(), 1);
}
