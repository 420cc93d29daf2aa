//! Measures how long reopening a log takes after the owning process was
//! killed with SIGKILL while publishing, at a given file size, with redb's
//! quick repair on (the default) and off.
//!
//! `cargo run --release --example reopen_after_crash -- [MiB] [DIR]`
//!
//! The parent builds each log in a child process (bulk `publish_batch`,
//! fsync off, until the file reaches the size), lets the child publish
//! single durable events, kills it with SIGKILL, then times
//! `DurableBus::open` (redb recovery plus WAL replay) and checks the log.

use std::time::Instant;

use ctrlbus::{DurableBus, Filter, Position};

#[path = "support/crashed_log.rs"]
mod crashed_log;

fn main() {
    crashed_log::run_child_if_asked();
    let args: Vec<String> = std::env::args().collect();
    let mib: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let dir = args
        .get(2)
        .cloned()
        .unwrap_or_else(|| std::env::temp_dir().display().to_string());
    for quick in [true, false] {
        let path = format!("{dir}/reopen-{mib}-{quick}.redb");
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(format!("{path}.wal"));
        crashed_log::crashed_log(std::path::Path::new(&path), mib, quick);
        let size = std::fs::metadata(&path).unwrap().len();
        let start = Instant::now();
        let bus = DurableBus::builder()
            .quick_repair(quick)
            .open(&path)
            .unwrap();
        let open_ms = start.elapsed().as_secs_f64() * 1e3;
        let last = bus.last_seq();
        let tail = bus
            .read(Position::Seq(last.saturating_sub(5)), &Filter::all())
            .unwrap()
            .count();
        println!(
            "{{\"quick_repair\":{quick},\"file_mib\":{},\"events\":{last},\"reopen_ms\":{open_ms:.1},\"tail_readable\":{}}}",
            size >> 20,
            tail > 0
        );
        drop(bus);
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(format!("{path}.wal"));
    }
}
