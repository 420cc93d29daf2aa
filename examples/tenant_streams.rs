//! Publish cost beside many active durable streams that each want another
//! tenant's events (issue 15's scale case for pull consumers, and "one
//! tenant slowing another"). Each round opens a fresh log, starts N
//! `durable_stream`s filtered to tenants `t-0`..`t-N`, each awaited by a
//! task, then times 16 threads publishing tenant `hot`'s events, which
//! no stream wants; N = 1 and N = 200 alternate, 3 rounds each.
//!
//! Usage: `cargo run --release --features tokio --example tenant_streams
//! [EVENTS]` (default 40,000); prints events/s per round and the ratio of
//! the medians.

#[path = "support/pairs.rs"]
mod pairs;

use ctrlbus::{Bus, DurableBus, Event, Filter, Position, Type};
use futures::StreamExt;

fn round(streams: usize, events: usize) -> Result<f64, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let bus = DurableBus::open(dir.path().join("events.redb"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let mut tasks = Vec::new();
    for i in 0..streams {
        let mut stream = bus.durable_stream(
            &format!("stream-{i}"),
            Filter::all().tenant(format!("t-{i}")),
            Position::Beginning,
        )?;
        tasks.push(rt.spawn(async move {
            while let Some(d) = stream.next().await {
                if let Ok(d) = d {
                    let _ = d.ack().await;
                }
            }
        }));
    }
    let (rate, _) = pairs::publish_rate(&bus, events, || {
        Event::new(Type::DEPLOY_STARTED, "hot").with_payload_value("k", 1)
    });
    for t in &tasks {
        t.abort();
    }
    drop(tasks);
    bus.close();
    Ok(rate)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    pairs::alternate(
        &pairs::Pair {
            small: 1,
            large: 200,
            small_label: "1 stream",
            large_label: "200 streams",
            ratio_label: "200 tenant streams / 1",
        },
        round,
    )
}
