//! What a large `retain` does to publishers and readers running beside it
//! (issue 15: bounded chunks, no write stall over 10 ms, no read waiting
//! over 10 ms). Builds a log of N events, then removes all but the newest
//! 10,000 with `retain` while 4 threads publish and one reads the newest
//! event in a loop; prints how long the retain took, its chunks, and the
//! slowest publish and read during it, beside the same measured without a
//! retain running.
//!
//! Usage: `cargo run --release --example retain_under_load [EVENTS]`
//! (default 1,000,000).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ctrlbus::{Bus, DurableBus, Event, Filter, Retention, Type};

/// The slowest publish and read while `during` runs, 4 publishers and a
/// reader beside it.
fn slowest_beside(bus: &DurableBus, during: impl FnOnce()) -> (Duration, Duration, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let pubs: Vec<_> = (0..4)
        .map(|_| {
            let (bus, stop) = (bus.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut worst, mut n) = (Duration::ZERO, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    bus.publish(Event::new(Type::DEPLOY_STARTED, "t"))
                        .expect("publish");
                    worst = worst.max(t.elapsed());
                    n += 1;
                }
                (worst, n)
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
    let mut worst_pub = Duration::ZERO;
    let mut published = 0;
    for p in pubs {
        let (w, n) = p.join().expect("publisher");
        worst_pub = worst_pub.max(w);
        published += n;
    }
    (worst_pub, reader.join().expect("reader"), published)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let events: u64 = match std::env::args().nth(1) {
        Some(n) => n.parse()?,
        None => 1_000_000,
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
    let (p0, r0, n0) = slowest_beside(&bus, || std::thread::sleep(Duration::from_secs(3)));
    println!(
        "without retain (3 s): slowest publish {:.1} ms, slowest read {:.1} ms, {n0} published",
        p0.as_secs_f64() * 1e3,
        r0.as_secs_f64() * 1e3
    );
    let mut took = Duration::ZERO;
    let mut removed = 0;
    let (p1, r1, n1) = slowest_beside(&bus, || {
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
        "retain of {removed} events: {:.2} s; beside it: slowest publish {:.1} ms, slowest read {:.1} ms, {n1} published",
        took.as_secs_f64(),
        p1.as_secs_f64() * 1e3,
        r1.as_secs_f64() * 1e3
    );
    bus.close();
    Ok(())
}
