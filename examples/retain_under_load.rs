//! What a large `retain` does to publishers and readers running beside it
//! (issue 15: bounded chunks, no write stall over 10 ms, no read waiting
//! over 10 ms). Builds a log of N events, then removes all but the newest
//! 10,000 with `retain` while 4 threads publish and one reads the newest
//! event in a loop; prints how long the retain took, its chunks, and the
//! slowest publish and read during it, beside the same measured without a
//! retain running.
//!
//! Usage: `cargo run --release --example retain_under_load [EVENTS
//! [PUBLISHERS]]` (defaults 1,000,000 and 4). Besides the slowest publish
//! it prints the p99.9 of all of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ctrlbus::{Bus, DurableBus, Event, Filter, Retention, Type};

/// What the publishers and the reader saw while `during` ran.
struct Beside {
    slowest_publish: Duration,
    p999_publish: Duration,
    slowest_read: Duration,
    published: usize,
}

/// The publishes and reads while `during` runs, `publishers` threads and a
/// reader beside it.
fn beside(bus: &DurableBus, publishers: usize, during: impl FnOnce()) -> Beside {
    let stop = Arc::new(AtomicBool::new(false));
    let pubs: Vec<_> = (0..publishers)
        .map(|_| {
            let (bus, stop) = (bus.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut took = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    bus.publish(Event::new(Type::DEPLOY_STARTED, "t"))
                        .expect("publish");
                    took.push(t.elapsed());
                }
                took
            })
        })
        .collect();
    let reader = {
        let (bus, stop) = (bus.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut worst = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                bus.recent_events(1, &Filter::all()).expect("read");
                worst = worst.max(t.elapsed());
                std::thread::sleep(Duration::from_millis(1));
            }
            worst
        })
    };
    during();
    stop.store(true, Ordering::Relaxed);
    let mut took: Vec<Duration> = pubs
        .into_iter()
        .flat_map(|p| p.join().expect("publisher"))
        .collect();
    took.sort_unstable();
    // The publish at the given thousandth of the sorted latencies.
    let at = |permille: usize| {
        took.get((took.len() * permille / 1000).min(took.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Beside {
        slowest_publish: took.last().copied().unwrap_or_default(),
        p999_publish: at(999),
        slowest_read: reader.join().expect("reader"),
        published: took.len(),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let events: u64 = match std::env::args().nth(1) {
        Some(n) => n.parse()?,
        None => 1_000_000,
    };
    let publishers: usize = match std::env::args().nth(2) {
        Some(n) => n.parse()?,
        None => 4,
    };
    let dir = tempfile::tempdir()?;
    let bus = DurableBus::open(dir.path().join("events.redb"))?;
    let mut left = events;
    while left > 0 {
        let n = left.min(1000);
        let batch = (0..n)
            .map(|_| {
                Event::new(Type::DEPLOY_STARTED, "t").with_payload_value("pad", "x".repeat(200))
            })
            .collect();
        bus.publish_batch(batch)?;
        left -= n;
    }
    let quiet = beside(&bus, publishers, || {
        std::thread::sleep(Duration::from_secs(3));
    });
    println!(
        "without retain (3 s): publishes p99.9 {:.2} ms, slowest {:.1} ms; slowest read {:.1} ms; {} published",
        ms(quiet.p999_publish),
        ms(quiet.slowest_publish),
        ms(quiet.slowest_read),
        quiet.published
    );
    let mut took = Duration::ZERO;
    let mut removed = 0;
    let busy = beside(&bus, publishers, || {
        let t = Instant::now();
        let report = bus
            .retain(&Retention {
                max_events: Some(10_000),
                ..Retention::default()
            })
            .expect("retain");
        took = t.elapsed();
        removed = report.removed;
    });
    println!(
        "retain of {removed} events: {:.2} s; beside it: publishes p99.9 {:.2} ms, slowest {:.1} ms; slowest read {:.1} ms; {} published",
        took.as_secs_f64(),
        ms(busy.p999_publish),
        ms(busy.slowest_publish),
        ms(busy.slowest_read),
        busy.published
    );
    bus.close();
    Ok(())
}
