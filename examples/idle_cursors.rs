//! Publish cost with many idle durable cursors beside one (issue 15's
//! scale case: within 10%). Each round opens a fresh log, creates N cursors
//! (a durable subscription started, caught up, and dropped), then times
//! 16 threads publishing; N = 1 and N = 1,000 alternate, 3 rounds each.
//!
//! Usage: `cargo run --release --example idle_cursors [EVENTS]` (default
//! 40,000); prints events/s per round and the ratio of the medians.

#[path = "support/pairs.rs"]
mod pairs;

use ctrlbus::{Bus, DurableBus, Event, Filter, HandlerError, Position, Type};

fn round(cursors: usize, events: usize) -> Result<f64, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let bus = DurableBus::open(dir.path().join("events.redb"))?;
    bus.publish(Event::new(Type::DEPLOY_STARTED, "t"))?;
    for i in 0..cursors {
        let sub = bus.subscribe_durable(
            &format!("cursor-{i}"),
            Filter::types(["deploy.*"])?,
            Position::Beginning,
            |_: &Event| -> Result<(), HandlerError> { Ok(()) },
        )?;
        drop(sub);
    }
    assert_eq!(bus.cursors()?.len(), cursors);
    let (rate, _) = pairs::publish_rate(&bus, events, || {
        Event::new(Type::DEPLOY_STARTED, "t").with_payload_value("k", 1)
    });
    bus.close();
    Ok(rate)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    pairs::alternate(
        &pairs::Pair {
            small: 1,
            large: 1000,
            small_label: "1 cursor",
            large_label: "1,000 cursors",
            ratio_label: "1,000 idle cursors / 1",
        },
        round,
    )
}
