//! Bytes per stored event: ctrlbus's file against `SQLite` holding the same
//! events. Writes N events (300-byte payloads, mixed types and tenants)
//! through `publish_batch`, closes and compacts the log, and writes the same
//! events as JSON lines for `examples/disk_usage_sqlite.py`. Sizes are disk
//! blocks of the log and its WAL, before and after compaction; also the log
//! file's blocks alone after compaction, and the live file's length (which
//! includes a sparse tail).
//!
//! `cargo run --release --example disk_usage -- [N] [DIR]`

use ctrlbus::{DurableBus, Event, InstanceId, Type};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let dir = std::path::PathBuf::from(args.get(2).cloned().unwrap_or_else(|| ".".into()));
    let path = dir.join("disk_usage.redb");
    let _ = std::fs::remove_file(&path);
    let mut lines = String::new();
    {
        let bus = DurableBus::builder().sync(false).open(&path).unwrap();
        let types = [
            Type::DEPLOY_STARTED,
            Type::HEALTH_DEGRADED,
            Type::INSTANCE_CREATED,
            Type::DEPLOY_ROLLED_BACK,
        ];
        let mut i = 0;
        while i < n {
            let batch: Vec<Event> = (i..(i + 1000).min(n))
                .map(|k| {
                    Event::new(types[k % 4].clone(), format!("tenant-{}", k % 7))
                        .with_instance(InstanceId::new())
                        .with_actor("deployer")
                        .with_payload_value("data", "x".repeat(289))
                })
                .collect();
            for e in &batch {
                lines.push_str(&e.to_json());
                lines.push('\n');
            }
            i += batch.len();
            bus.publish_batch(batch).unwrap();
        }
    }
    let wal = dir.join("disk_usage.redb.wal");
    // A live redb file grows by doubling with `set_len`: its length counts
    // a sparse tail that takes no disk blocks. So both are reported, and the
    // blocks (of the log and its WAL) are what is compared.
    let apparent = std::fs::metadata(&path).unwrap().len();
    let before = disk_bytes(&path) + disk_bytes(&wal);
    DurableBus::compact(&path).unwrap();
    let log_after = disk_bytes(&path);
    let after = log_after + disk_bytes(&wal);
    std::fs::write(dir.join("disk_usage.jsonl"), lines).unwrap();
    let per = |b: u64| b as f64 / n as f64;
    println!(
        "{{\"system\":\"ctrlbus\",\"events\":{n},\"bytes_per_event\":{:.1},\"bytes_per_event_before_compact\":{:.1},\"log_file_bytes_per_event\":{:.1},\"file_length_per_event_before_compact\":{:.1}}}",
        per(after),
        per(before),
        per(log_after),
        per(apparent)
    );
}

/// Bytes a file takes on disk (its allocated blocks); 0 if it is missing.
fn disk_bytes(path: &std::path::Path) -> u64 {
    let Ok(meta) = std::fs::metadata(path) else {
        return 0;
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        meta.blocks() * 512
    }
    #[cfg(not(unix))]
    {
        meta.len()
    }
}
