//! How long a durable subscription takes to catch up on a log while four
//! threads keep publishing, and how long `subscribe_durable` itself takes:
//! catch-up reads the log in chunks, and each chunk used to make the
//! applier commit first (issue 15; `read_tail`).
//!
//! Builds a log of N events, then, with 4 publishers running, subscribes
//! from the beginning and waits until the subscription is live; prints the
//! time to subscribe, the time to go live and the events handled.
//!
//! Usage: `cargo run --release --example catch_up_under_load [EVENTS]`
//! (default 200,000).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ctrlbus::{Bus, DurableBus, Event, Filter, Position, Type};

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .map_or(200_000, |a| a.parse().expect("EVENTS is a number"));
    let dir = tempfile::tempdir().expect("a scratch directory");
    let bus = DurableBus::open(dir.path().join("log.redb")).expect("open");
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..n / 4 {
                    bus.publish(Event::new(Type::DEPLOY_STARTED, "t"))
                        .expect("publish");
                }
            });
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let pubs: Vec<_> = (0..4)
        .map(|_| {
            let (bus, stop) = (bus.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut k = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    bus.publish(Event::new(Type::DEPLOY_STARTED, "t"))
                        .expect("publish");
                    k += 1;
                }
                k
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let handled = Arc::new(AtomicU64::new(0));
    let count = handled.clone();
    let t = Instant::now();
    let sub = bus
        .subscribe_durable(
            "catch-up",
            Filter::all(),
            Position::Beginning,
            move |_: &Event| {
                count.fetch_add(1, Ordering::Relaxed);
                Ok(())
            },
        )
        .expect("subscribe");
    let subscribed = t.elapsed();
    assert!(sub.wait_live(Duration::from_secs(600)), "never went live");
    let live = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let published: u64 = pubs.into_iter().map(|p| p.join().expect("publisher")).sum();
    println!(
        "log of {n} events, 4 publishers beside: subscribe_durable {:.1} ms, live after {:.0} ms, \
         {} handled while catching up ({:.0}k/s), {published} published meanwhile",
        subscribed.as_secs_f64() * 1e3,
        live.as_secs_f64() * 1e3,
        handled.load(Ordering::Relaxed),
        handled.load(Ordering::Relaxed) as f64 / live.as_secs_f64() / 1e3,
    );
}
