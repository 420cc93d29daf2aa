//! Publish cost with many idle durable cursors beside one (issue 15's
//! scale case: within 10%). Each round opens a fresh log, creates N cursors
//! (a durable subscription started, caught up, and dropped), then times
//! 16 threads publishing; N = 1 and N = 1,000 alternate, 3 rounds each.
//!
//! Usage: `cargo run --release --example idle_cursors [EVENTS]` (default
//! 40,000); prints events/s per round and the ratio of the medians.

use std::time::Instant;

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
    let threads = 16;
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            let bus = bus.clone();
            s.spawn(move || {
                for _ in 0..events / threads {
                    bus.publish(Event::new(Type::DEPLOY_STARTED, "t").with_payload_value("k", 1))
                        .expect("publish");
                }
            });
        }
    });
    let rate = events as f64 / start.elapsed().as_secs_f64();
    bus.close();
    Ok(rate)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let events: usize = match std::env::args().nth(1) {
        Some(n) => n.parse()?,
        None => 40_000,
    };
    let (mut one, mut many) = (Vec::new(), Vec::new());
    for r in 0..3 {
        one.push(round(1, events)?);
        many.push(round(1000, events)?);
        println!(
            "round {r}: 1 cursor {:.0} events/s, 1,000 cursors {:.0} events/s",
            one[r], many[r]
        );
    }
    println!(
        "1,000 idle cursors / 1: {:.3} (medians)",
        median(many) / median(one)
    );
    Ok(())
}
