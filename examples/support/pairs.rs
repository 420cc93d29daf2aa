//! The harness of the scale-pair examples (`idle_cursors`,
//! `webhook_scale`): 16 threads publishing, and a small and a large case
//! alternated on fresh logs, 3 rounds each, compared by their medians.

use std::time::Instant;

use ctrlbus::{Bus, DurableBus, Event};

/// Events/s of `events` events made by `event`, published by 16 threads
/// (a thread each, fsync on).
pub fn publish_rate(
    bus: &DurableBus,
    events: usize,
    event: impl Fn() -> Event + Sync,
) -> (f64, usize) {
    let threads = 16;
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            let (bus, event) = (bus.clone(), &event);
            s.spawn(move || {
                for _ in 0..events / threads {
                    bus.publish(event()).expect("publish");
                }
            });
        }
    });
    let published = events / threads * threads;
    (events as f64 / start.elapsed().as_secs_f64(), published)
}

/// The two cases of a pair: what `round` is given, and how it is printed.
pub struct Pair<'a> {
    pub small: usize,
    pub large: usize,
    /// Each round's labels of the two rates (`"1 cursor"`, `"1,000 cursors"`).
    pub small_label: &'a str,
    pub large_label: &'a str,
    /// The label of the ratio of the medians, large over small.
    pub ratio_label: &'a str,
}

/// Runs `round` for the pair's small and large case in turn, 3 rounds
/// each, on `[EVENTS]` events (the first argument, default 40,000); prints
/// each round and the ratio of the medians, large over small.
pub fn alternate(
    pair: &Pair<'_>,
    mut round: impl FnMut(usize, usize) -> Result<f64, Box<dyn std::error::Error>>,
) -> Result<(), Box<dyn std::error::Error>> {
    let events: usize = match std::env::args().nth(1) {
        Some(n) => n.parse()?,
        None => 40_000,
    };
    let (mut smalls, mut larges) = (Vec::new(), Vec::new());
    for r in 0..3 {
        smalls.push(round(pair.small, events)?);
        larges.push(round(pair.large, events)?);
        println!(
            "round {r}: {} {:.0} events/s, {} {:.0} events/s",
            pair.small_label, smalls[r], pair.large_label, larges[r]
        );
    }
    println!(
        "{}: {:.3} (medians)",
        pair.ratio_label,
        median(larges) / median(smalls)
    );
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
