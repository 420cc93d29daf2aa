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
    s.ok(&[
        "webhooks",
        "add",
        "--tenant",
        "acme",
        "--url",
        &recv.url,
        "--allow-private-targets",
    ]);
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
