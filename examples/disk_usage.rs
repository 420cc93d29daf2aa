//! Bytes per stored event: ctrlbus's file against SQLite holding the same
//! events. Writes N events (300-byte payloads, mixed types and tenants)
//! through `publish_batch`, closes and compacts the log, and writes the same
//! events as JSON lines for `examples/disk_usage_sqlite.py`.
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
    let before = std::fs::metadata(&path).unwrap().len();
    let (_, after) = DurableBus::compact(&path).unwrap();
    std::fs::write(dir.join("disk_usage.jsonl"), lines).unwrap();
    println!(
        "{{\"system\":\"ctrlbus\",\"events\":{n},\"bytes_per_event\":{:.1},\"bytes_per_event_before_compact\":{:.1}}}",
        after as f64 / n as f64,
        before as f64 / n as f64
    );
}
