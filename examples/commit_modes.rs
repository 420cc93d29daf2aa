//! Measures one-publisher durable publish latency under each redb commit
//! mode ctrlbus can use, beside a raw 4 KiB write+fdatasync loop on the same
//! disk in the same run. Used to choose the defaults (see BENCHMARKS.md).
//!
//! `cargo run --release --example commit_modes -- [N] [DIR]`

use std::io::Write;
use std::time::Instant;

use ctrlbus::{Bus, DurableBus, Event, Type};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(300);
    let dir = match args.get(2) {
        Some(d) => std::path::PathBuf::from(d),
        None => std::env::temp_dir(),
    };
    let payload = serde_json::json!({"data": "x".repeat(289)});
    let payload = payload.as_object().unwrap().clone();
    // Raw fdatasync floor.
    let path = dir.join("commit_modes_fsync.bin");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = vec![7u8; 4096];
    let start = Instant::now();
    for _ in 0..n {
        f.write_all(&block).unwrap();
        f.sync_data().unwrap();
    }
    let fsync_us = start.elapsed().as_secs_f64() * 1e6 / n as f64;
    drop(f);
    let _ = std::fs::remove_file(&path);
    println!("{{\"mode\":\"fdatasync-4k\",\"us_per_op\":{fsync_us:.0}}}");
    for (name, shared, quick, wal) in [
        ("exclusive", false, false, false),
        ("exclusive+quick_repair", false, true, false),
        ("single_writer", true, false, false),
        ("single_writer+quick_repair", true, true, false),
        ("wal+single_writer+quick_repair (default)", true, true, true),
    ] {
        let path = dir.join(format!("commit_modes_{name}.redb"));
        let _ = std::fs::remove_file(&path);
        let bus = DurableBus::builder()
            .shared_reads(shared)
            .quick_repair(quick)
            .write_ahead_log(wal)
            .open(&path)
            .unwrap();
        for _ in 0..20 {
            bus.publish(Event::new(Type::DEPLOY_STARTED, "t").with_payload(payload.clone()))
                .unwrap();
        }
        let start = Instant::now();
        for _ in 0..n {
            bus.publish(Event::new(Type::DEPLOY_STARTED, "t").with_payload(payload.clone()))
                .unwrap();
        }
        let us = start.elapsed().as_secs_f64() * 1e6 / n as f64;
        println!(
            "{{\"mode\":\"{name}\",\"us_per_op\":{us:.0},\"vs_fdatasync\":{:.2}}}",
            us / fsync_us
        );
        drop(bus);
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(path.with_extension("redb.wal"));
    }
}
