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

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::Criterion;
use ctrlbus::DurableBus;

#[path = "../examples/support/crashed_log.rs"]
mod crashed_log;

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
        crashed_log::crashed_log(&image, mib, quick);
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
    crashed_log::run_child_if_asked();
    let mut c = Criterion::default().configure_from_args();
    reopen(&mut c);
    c.final_summary();
}
