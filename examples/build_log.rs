//! Builds a log of N events (300-byte payloads, four types, four tenants)
//! for replay, memory and seek measurements.
//!
//! `cargo run --release --example build_log -- N PATH`

use ctrlbus::{DurableBus, Event, Type};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: u64 = args
        .get(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let path = args
        .get(2)
        .cloned()
        .unwrap_or_else(|| "build_log.redb".into());
    let bus = DurableBus::builder().sync(false).open(&path).unwrap();
    let types = [
        Type::DEPLOY_STARTED,
        Type::HEALTH_PASSED,
        Type::INSTANCE_CREATED,
        Type::DEPLOY_FAILED,
    ];
    let mut i = 0;
    while i < n {
        let batch: Vec<Event> = (i..(i + 10_000).min(n))
            .map(|k| {
                Event::new(
                    types[(k % 4) as usize].clone(),
                    format!("tenant-{}", k / 4 % 4),
                )
                .with_payload_value("data", "x".repeat(289))
            })
            .collect();
        i += batch.len() as u64;
        bus.publish_batch(batch).unwrap();
    }
    println!("{{\"events\":{n},\"path\":\"{path}\"}}");
}
