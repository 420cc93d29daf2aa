//! Cost of `InMemoryBus::publish` with no-op handlers.
//!
//! Compare with the Go original's `InMemoryBus.Publish`: about 118 ns to one
//! handler and 245 ns to ten on the same machines; the aim is under a third.
//!
//! Two ways of measuring:
//! - `publish_prebuilt/*`: the event is built (cloned from a template) in
//!   `iter_batched`'s setup with `BatchSize::SmallInput`, so making the event
//!   (a fresh id, the clock, the tenant string) is *not* timed; only
//!   `publish` is, including dropping the event it evicts from the history.
//!   This is what the Go benchmark measures: it publishes a pre-built event.
//! - `publish_built_inside/*`: `Event::new` runs inside the timed loop, for
//!   honesty about what a caller pays end to end.
//! - `floor/*`: the same harness moving an event in and dropping it, without
//!   a bus: what a publish costs before the bus does anything.
//!
//! Every run first fills the history ring, so each timed publish also evicts
//! the oldest event (the steady state of a running bus).

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use ctrlbus::{Bus, Event, Filter, HandlerError, InMemoryBus, Subscription, Type};

/// A bus with `handlers` no-op subscribers and a full history.
fn bus_with(handlers: usize) -> (InMemoryBus, Vec<Subscription>) {
    let bus = InMemoryBus::new();
    let subs = (0..handlers)
        .map(|_| {
            bus.subscribe(Filter::all(), |e: &Event| -> Result<(), HandlerError> {
                black_box(e);
                Ok(())
            })
            .expect("subscribe")
        })
        .collect();
    for _ in 0..ctrlbus::DEFAULT_HISTORY {
        bus.publish(Event::new(Type::DEPLOY_STARTED, "tenant-1"))
            .expect("publish");
    }
    (bus, subs)
}

fn publish(c: &mut Criterion) {
    let template = Event::new(Type::DEPLOY_STARTED, "tenant-1");

    let mut group = c.benchmark_group("publish_prebuilt");
    for (name, handlers) in [("0_handlers", 0), ("1_handler", 1), ("10_handlers", 10)] {
        let (bus, _subs) = bus_with(handlers);
        group.bench_function(name, |b| {
            b.iter_batched(
                || template.clone(),
                |event| bus.publish(event).expect("publish"),
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();

    // What every publish pays before the bus does anything: taking the
    // event in (a 160-byte move) and, in the steady state, freeing the one it
    // evicts. Same harness as `publish_prebuilt`, so the figures subtract.
    let mut group = c.benchmark_group("floor");
    group.bench_function("move_event", |b| {
        b.iter_batched(|| template.clone(), black_box, BatchSize::SmallInput);
    });
    group.bench_function("drop_event", |b| {
        b.iter_batched(
            || template.clone(),
            |event| drop(black_box(event)),
            BatchSize::SmallInput,
        );
    });
    group.finish();

    let mut group = c.benchmark_group("publish_built_inside");
    for (name, handlers) in [("1_handler", 1), ("10_handlers", 10)] {
        let (bus, _subs) = bus_with(handlers);
        group.bench_function(name, |b| {
            b.iter(|| {
                bus.publish(Event::new(Type::DEPLOY_STARTED, "tenant-1"))
                    .expect("publish")
            });
        });
    }
    group.finish();

    let mut group = c.benchmark_group("event_new");
    group.bench_function("event_new", |b| {
        b.iter(|| Event::new(Type::DEPLOY_STARTED, black_box("tenant-1")));
    });
    group.finish();
}

criterion_group!(benches, publish);
criterion_main!(benches);
