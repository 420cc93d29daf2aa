//! Issue 15's scale cases as criterion benches, each a pair to compare in
//! one run: the publish cost per event at 16 publishers (a thread each,
//! fsync on) with
//! - 1 and 1,000 idle durable cursors (`scale_idle_cursors`);
//! - 10 and 10,000 registered webhooks over 1,000 tenants, each event
//!   matching exactly one (`scale_webhooks`: dispatch, no worker);
//! - an empty log and a log of 1M events (`scale_log_size`);
//! - 1 and 200 active durable consumers each filtered to another tenant:
//!   live handlers (`scale_tenant_handlers`) and, with the `tokio`
//!   feature, durable streams awaited by tasks (`scale_tenant_streams`).
//!
//! Run: `cargo bench --bench scale` (`--features tokio` for the streams).
//! The examples `idle_cursors`, `webhook_scale` and `tenant_streams`
//! alternate the same pairs on fresh logs and print the ratios;
//! BENCHMARKS.md keeps both.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ctrlbus::{Bus, DurableBus, Event, Filter, HandlerError, NewWebhook, Position, Type};

const PUBLISHERS: u64 = 16;

/// Time per event of `iters` events published by 16 threads.
fn publish_16(bus: &DurableBus, iters: u64, tenant: &str) -> Duration {
    let per = iters.div_ceil(PUBLISHERS);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..PUBLISHERS {
            s.spawn(|| {
                for _ in 0..per {
                    bus.publish(
                        Event::new(Type::DEPLOY_STARTED, tenant).with_payload_value("k", 1),
                    )
                    .unwrap();
                }
            });
        }
    });
    start
        .elapsed()
        .mul_f64(iters as f64 / (per * PUBLISHERS) as f64)
}

/// Benches the publish cost of `bus` as case `case` of `g`, events of
/// `tenant`.
fn bench_publish(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    case: impl std::fmt::Display,
    bus: &DurableBus,
    tenant: &str,
) {
    g.bench_function(BenchmarkId::from_parameter(case), |b| {
        b.iter_custom(|iters| publish_16(bus, iters, tenant));
    });
}

fn group<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(1));
    g
}

fn idle_cursors(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut g = group(c, "scale_idle_cursors");
    for cursors in [1usize, 1000] {
        let bus = DurableBus::open(dir.path().join(format!("c{cursors}.redb"))).unwrap();
        bus.publish(Event::new(Type::DEPLOY_STARTED, "t")).unwrap();
        for i in 0..cursors {
            let sub = bus
                .subscribe_durable(
                    &format!("cursor-{i}"),
                    Filter::types(["deploy.*"]).unwrap(),
                    Position::Beginning,
                    |_: &Event| -> Result<(), HandlerError> { Ok(()) },
                )
                .unwrap();
            drop(sub);
        }
        assert_eq!(bus.cursors().unwrap().len(), cursors);
        bench_publish(&mut g, cursors, &bus, "t");
        bus.close();
    }
    g.finish();
}

fn webhooks(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut g = group(c, "scale_webhooks");
    for count in [10usize, 10_000] {
        let bus = DurableBus::open(dir.path().join(format!("w{count}.redb"))).unwrap();
        let hooks = bus.webhooks();
        for i in 0..count {
            // Tenant 0's first webhook takes every deploy; the rest watch
            // health, or are other tenants'.
            let events = if i == 0 { "deploy.*" } else { "health.*" };
            hooks
                .create(NewWebhook {
                    tenant_id: format!("tenant-{}", i % 1000),
                    // A public address literal: checked without a DNS lookup.
                    url: format!("https://93.184.215.14/hooks/{i}"),
                    events: vec![events.into()],
                    secret: None,
                })
                .unwrap();
        }
        bench_publish(&mut g, count, &bus, "tenant-0");
        let made = hooks
            .deliveries(&ctrlbus::DeliveryQuery::default())
            .unwrap()
            .len() as u64;
        // Nothing was published when a filter (`cargo bench -- NAME`) left
        // this group out.
        assert_eq!(made, bus.last_seq(), "one delivery per event");
        bus.close();
    }
    g.finish();
}

fn log_size(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut g = group(c, "scale_log_size");
    for events in [0u64, 1_000_000] {
        let path = dir.path().join(format!("l{events}.redb"));
        {
            // Built without fsync, in 10k-event batches.
            let bus = DurableBus::builder().sync(false).open(&path).unwrap();
            let mut n = 0;
            while n < events {
                let batch = (0..10_000)
                    .map(|_| {
                        Event::new(Type::HEALTH_PASSED, "t")
                            .with_payload_value("d", "x".repeat(300))
                    })
                    .collect();
                bus.publish_batch(batch).unwrap();
                n += 10_000;
            }
            bus.close();
        }
        let bus = DurableBus::open(&path).unwrap();
        assert_eq!(bus.last_seq(), events);
        bench_publish(&mut g, events, &bus, "t");
        bus.close();
    }
    g.finish();
}

fn tenant_handlers(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut g = group(c, "scale_tenant_handlers");
    for consumers in [1usize, 200] {
        let bus = DurableBus::open(dir.path().join(format!("h{consumers}.redb"))).unwrap();
        let subs: Vec<_> = (0..consumers)
            .map(|i| {
                bus.subscribe_durable(
                    &format!("consumer-{i}"),
                    Filter::all().tenant(format!("t-{i}")),
                    Position::Beginning,
                    |_: &Event| -> Result<(), HandlerError> { Ok(()) },
                )
                .unwrap()
            })
            .collect();
        bench_publish(&mut g, consumers, &bus, "hot");
        drop(subs);
        bus.close();
    }
    g.finish();
}

#[cfg(feature = "tokio")]
fn tenant_streams(c: &mut Criterion) {
    use futures::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut g = group(c, "scale_tenant_streams");
    for consumers in [1usize, 200] {
        let bus = DurableBus::open(dir.path().join(format!("s{consumers}.redb"))).unwrap();
        let tasks: Vec<_> = (0..consumers)
            .map(|i| {
                let mut stream = bus
                    .durable_stream(
                        &format!("consumer-{i}"),
                        Filter::all().tenant(format!("t-{i}")),
                        Position::Beginning,
                    )
                    .unwrap();
                rt.spawn(async move {
                    while let Some(d) = stream.next().await {
                        if let Ok(d) = d {
                            let _ = d.ack().await;
                        }
                    }
                })
            })
            .collect();
        bench_publish(&mut g, consumers, &bus, "hot");
        for t in &tasks {
            t.abort();
        }
        bus.close();
    }
    g.finish();
}

#[cfg(not(feature = "tokio"))]
fn tenant_streams(_: &mut Criterion) {}

criterion_group!(
    benches,
    idle_cursors,
    webhooks,
    log_size,
    tenant_handlers,
    tenant_streams
);
criterion_main!(benches);
