//! Durable-log benchmarks: publish at 1, 16 and 64 publishers (fsync on; a
//! thread each, and 16 and 64 sharing one thread),
//! `publish_batch`, replay of a 1M-event log (decode, filter, JSON), and
//! seek to a time in it.
//!
//! Run: `cargo bench --bench durable`. The 1M-event log is built once per
//! run (with fsync off, in 10k-event batches) in a temp dir.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ctrlbus::{Bus, DurableBus, Event, Filter, Position, ReadOnlyLog, Type};
use serde_json::{Map, Value};

fn payload(bytes: usize) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert(
        "data".into(),
        Value::String("x".repeat(bytes.saturating_sub(11))),
    );
    m
}

fn event(p: &Map<String, Value>) -> Event {
    Event::new(Type::DEPLOY_STARTED, "tenant-1").with_payload(p.clone())
}

fn publish(c: &mut Criterion) {
    let mut g = c.benchmark_group("durable_publish");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(1));
    let dir = tempfile::tempdir().unwrap();
    let p = payload(300);
    for publishers in [1usize, 16, 64] {
        let bus =
            Arc::new(DurableBus::open(dir.path().join(format!("p{publishers}.redb"))).unwrap());
        g.bench_with_input(
            BenchmarkId::from_parameter(publishers),
            &publishers,
            |b, &n| {
                b.iter_custom(|iters| {
                    let per = iters.div_ceil(n as u64);
                    let start = Instant::now();
                    std::thread::scope(|s| {
                        for _ in 0..n {
                            let bus = bus.clone();
                            let p = &p;
                            s.spawn(move || {
                                for _ in 0..per {
                                    bus.publish(event(p)).unwrap();
                                }
                            });
                        }
                    });
                    // Time per event, as if `iters` events were published.
                    start
                        .elapsed()
                        .mul_f64(iters as f64 / (per * n as u64) as f64)
                });
            },
        );
    }
    g.finish();

    // The same publishers sharing one thread, each with one publish in
    // flight through `submit` (what `ctrlbus bench publish` and the Redis
    // side of compare.sh, redis-benchmark, do).
    let mut g = c.benchmark_group("durable_publish_shared_thread");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(1));
    for publishers in [16usize, 64] {
        let bus = DurableBus::open(dir.path().join(format!("s{publishers}.redb"))).unwrap();
        g.bench_with_input(
            BenchmarkId::from_parameter(publishers),
            &publishers,
            |b, &n| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    let mut in_flight: std::collections::VecDeque<ctrlbus::PendingPublish> =
                        std::collections::VecDeque::with_capacity(n);
                    for _ in 0..iters {
                        if in_flight.len() == n
                            && let Some(pending) = in_flight.pop_front()
                        {
                            pending.wait().unwrap();
                        }
                        in_flight.push_back(bus.submit(event(&p)).unwrap());
                    }
                    for pending in in_flight {
                        pending.wait().unwrap();
                    }
                    start.elapsed()
                });
            },
        );
    }
    g.finish();

    let mut g = c.benchmark_group("durable_publish_batch");
    g.sample_size(10);
    for batch in [100usize, 1000] {
        let bus = DurableBus::open(dir.path().join(format!("b{batch}.redb"))).unwrap();
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |b, &n| {
            b.iter(|| {
                bus.publish_batch((0..n).map(|_| event(&p)).collect())
                    .unwrap()
            });
        });
    }
    g.finish();
}

const LOG_EVENTS: u64 = 1_000_000;

fn build_log(path: &std::path::Path) -> DurableBus {
    let bus = DurableBus::builder().sync(false).open(path).unwrap();
    let p = payload(300);
    let tenants = ["tenant-1", "tenant-2", "tenant-3", "tenant-4"];
    let types = [
        Type::DEPLOY_STARTED,
        Type::HEALTH_PASSED,
        Type::INSTANCE_CREATED,
        Type::DEPLOY_FAILED,
    ];
    let mut i = 0u64;
    while i < LOG_EVENTS {
        let batch: Vec<Event> = (0..10_000)
            .map(|k| {
                let n = (i + k) as usize;
                Event::new(types[n % 4].clone(), tenants[n / 4 % 4]).with_payload(p.clone())
            })
            .collect();
        bus.publish_batch(batch).unwrap();
        i += 10_000;
    }
    bus
}

fn replay(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("replay.redb");
    drop(build_log(&path));
    let bus = ReadOnlyLog::open(&path).unwrap();
    // The same page cache as ReadOnlyLog (32 MiB), so both read the same way.
    let raw = redb::Builder::new()
        .set_cache_size(32 << 20)
        .set_concurrency_mode(redb::ConcurrencyMode::SingleWriter)
        .open_read_only(&path)
        .unwrap();
    let mut g = c.benchmark_group("replay_1m");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Elements(LOG_EVENTS));
    let filter = Filter::types(["deploy.*"]).unwrap().tenant("tenant-2");
    g.bench_function("events_filtered", |b| {
        b.iter(|| {
            bus.read(Position::Beginning, &filter)
                .unwrap()
                .map(|e| e.unwrap().seq)
                .max()
        });
    });
    g.bench_function("events_all", |b| {
        b.iter(|| {
            bus.read(Position::Beginning, &Filter::all())
                .unwrap()
                .map(|e| e.unwrap().seq)
                .max()
        });
    });
    g.bench_function("json_lines_all", |b| {
        let mut buf = Vec::with_capacity(1 << 20);
        b.iter(|| {
            let mut r = bus.read(Position::Beginning, &Filter::all()).unwrap();
            let mut n = 0u64;
            while let Some(x) = r.write_next_json(&mut buf) {
                x.unwrap();
                n += 1;
                if buf.len() > (1 << 20) - 4096 {
                    buf.clear();
                }
            }
            n
        });
    });
    g.bench_function("raw_redb_scan", |b| {
        // The floor: the same blocks of records read with plain redb, no
        // decoding.
        const EVENTS: redb::TableDefinition<u64, &[u8]> =
            redb::TableDefinition::new("event_blocks");
        b.iter(|| {
            use redb::{ReadableDatabase, ReadableTable};
            let txn = raw.begin_read().unwrap();
            let t = txn.open_table(EVENTS).unwrap();
            let mut bytes = 0usize;
            for kv in t.iter().unwrap() {
                bytes += kv.unwrap().1.value().len();
            }
            bytes
        });
    });
    g.finish();

    let first = bus
        .read(Position::Beginning, &Filter::all())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .appended_at;
    let last = bus
        .read(Position::Seq(LOG_EVENTS), &Filter::all())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .appended_at;
    let mid = first
        + jiff::SignedDuration::from_nanos(
            ((last.as_nanosecond() - first.as_nanosecond()) / 2) as i64,
        );
    let mut g = c.benchmark_group("seek_1m");
    g.bench_function("time", |b| {
        b.iter(|| {
            bus.read(Position::Time(mid), &Filter::all())
                .unwrap()
                .next_seq()
        });
    });
    g.finish();
}

criterion_group!(benches, publish, replay);
criterion_main!(benches);
