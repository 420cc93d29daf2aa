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

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ctrlbus::{Bus, DurableBus, Event, Filter, Position, Type};

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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Ok(spec) = std::env::var("REOPEN_CHILD") {
        let (path, rest) = spec.split_once('|').unwrap();
        let (mib, quick) = rest.split_once('|').unwrap();
        child(path, mib.parse().unwrap(), quick == "true");
        return;
    }
    let mib: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let dir = args
        .get(2)
        .cloned()
        .unwrap_or_else(|| std::env::temp_dir().display().to_string());
    for quick in [true, false] {
        let path = format!("{dir}/reopen-{mib}-{quick}.redb");
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(format!("{path}.wal"));
        let mut c = Command::new(std::env::current_exe().unwrap())
            .env("REOPEN_CHILD", format!("{path}|{mib}|{quick}"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(c.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
        std::thread::sleep(Duration::from_millis(300));
        c.kill().unwrap(); // SIGKILL
        c.wait().unwrap();
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
