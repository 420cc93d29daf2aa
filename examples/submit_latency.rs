//! Latency of blocking publishes beside publishers that `submit` and wait
//! for the result later (a pipeline overlapping its own work with the
//! fsync).
//!
//! Two threads each submit an event, work for 3 ms, then wait; four threads
//! publish and wait at once. A group that holds both kinds must not leave
//! the waiting publishers asleep until a submitter calls `wait`.
//!
//! Usage: `cargo run --release --example submit_latency [PUBLISHES_PER_THREAD]`
//! (default 1500); prints the blocking publishes' latency percentiles.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ctrlbus::{Bus, DurableBus, Event, Type};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let per_thread: usize = match std::env::args().nth(1) {
        Some(n) => n.parse()?,
        None => 1500,
    };
    let dir = tempfile::tempdir()?;
    let bus = DurableBus::open(dir.path().join("events.redb"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let submitters: Vec<_> = (0..2)
        .map(|_| {
            let (bus, stop) = (bus.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let pending = bus.submit(Event::new(Type::DEPLOY_STARTED, "acme"))?;
                    std::thread::sleep(Duration::from_millis(3));
                    pending.wait()?;
                }
                Ok::<_, ctrlbus::PublishError>(())
            })
        })
        .collect();
    let publishers: Vec<_> = (0..4)
        .map(|_| {
            let bus = bus.clone();
            std::thread::spawn(move || {
                let mut micros = Vec::with_capacity(per_thread);
                for _ in 0..per_thread {
                    let start = Instant::now();
                    bus.publish(Event::new(Type::DEPLOY_STARTED, "acme"))?;
                    micros.push(start.elapsed().as_micros() as u64);
                }
                Ok::<_, ctrlbus::PublishError>(micros)
            })
        })
        .collect();
    let mut micros = Vec::new();
    for p in publishers {
        micros.extend(p.join().expect("publisher thread")?);
    }
    stop.store(true, Ordering::Relaxed);
    for s in submitters {
        s.join().expect("submitter thread")?;
    }
    micros.sort_unstable();
    // q is in 0..=1: a non-negative rank within the list.
    #[allow(clippy::cast_sign_loss)]
    let at = |q: f64| micros[((micros.len() - 1) as f64 * q) as usize];
    println!(
        "{{\"publishes\":{},\"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"max_us\":{}}}",
        micros.len(),
        at(0.5),
        at(0.9),
        at(0.99),
        micros[micros.len() - 1]
    );
    bus.close();
    Ok(())
}
