//! Reopen after an unclean shutdown: `DurableBus::open` of a log whose
//! writer was killed with SIGKILL while publishing, at 1 GiB (set
//! `CTRLBUS_REOPEN_MIB` for another size), with redb's quick repair on (the
//! default) and off.
//!
//! Run: `cargo bench --bench reopen`. A child process (this binary again)
//! builds the log with bulk `publish_batch` (fsync off) until the file is
//! that long, reopens it with the defaults, publishes single durable events
//! and is killed. That crashed image is kept; every timed reopen runs on a
//! fresh copy of it (the copy is not timed), since a reopen repairs the file.
//! Each reopen costs a 1 GiB copy, so the measurement time is short and
//! criterion takes few samples.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use criterion::Criterion;
use ctrlbus::{Bus, DurableBus, Event, Type};

const CHILD: &str = "CTRLBUS_REOPEN_BENCH_CHILD";

fn child(path: &str, mib: u64, quick: bool) {
    let payload = serde_json::json!({"data": "x".repeat(289)});
    let payload = payload.as_object().unwrap().clone();
    let bus = DurableBus::builder()
        .sync(false)
        .quick_repair(quick)
        .open(path)
        .unwrap();
    while std::fs::metadata(path).map(|m| m.len()).unwrap_or(0) < mib << 20 {
        let batch = (0..10_000)
            .map(|_| Event::new(Type::DEPLOY_STARTED, "t").with_payload(payload.clone()))
            .collect();
        bus.publish_batch(batch).unwrap();
    }
    drop(bus);
    let bus = DurableBus::builder()
        .quick_repair(quick)
        .open(path)
        .unwrap();
    println!("ready");
    loop {
        bus.publish(Event::new(Type::DEPLOY_STARTED, "t").with_payload(payload.clone()))
            .unwrap();
    }
}

/// Builds the log at `image` in a child and kills it with SIGKILL.
fn crashed_image(image: &Path, mib: u64, quick: bool) {
    let mut c = Command::new(std::env::current_exe().unwrap())
        .env(CHILD, format!("{}|{mib}|{quick}", image.display()))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(c.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready", "the child did not build the log");
    std::thread::sleep(Duration::from_millis(300));
    c.kill().unwrap(); // SIGKILL
    c.wait().unwrap();
}

fn wal(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".wal");
    PathBuf::from(s)
}

fn reopen(c: &mut Criterion) {
    let mib: u64 = std::env::var("CTRLBUS_REOPEN_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    let dir = tempfile::tempdir().unwrap();
    let mut g = c.benchmark_group(format!("reopen_after_kill_{mib}MiB"));
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_millis(200));
    for quick in [true, false] {
        let image = dir.path().join(format!("image-{quick}.redb"));
        crashed_image(&image, mib, quick);
        let work = dir.path().join("work.redb");
        let name = if quick { "quick_repair" } else { "full_repair" };
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    std::fs::copy(&image, &work).unwrap();
                    std::fs::copy(wal(&image), wal(&work)).unwrap();
                    let start = Instant::now();
                    let bus = DurableBus::builder()
                        .quick_repair(quick)
                        .open(&work)
                        .unwrap();
                    timed += start.elapsed();
                    assert!(bus.last_seq() > 0);
                    drop(bus);
                }
                timed
            });
        });
        let _ = std::fs::remove_file(&image);
        let _ = std::fs::remove_file(wal(&image));
    }
    g.finish();
}

fn main() {
    if let Ok(spec) = std::env::var(CHILD) {
        let mut parts = spec.split('|');
        let (path, mib, quick) = (parts.next(), parts.next(), parts.next());
        child(
            path.unwrap(),
            mib.and_then(|m| m.parse().ok()).unwrap(),
            quick == Some("true"),
        );
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    reopen(&mut c);
    c.final_summary();
}
