//! `publish_async` from 64 tokio tasks against blocking `publish` from 64
//! threads, in the same run, on the same disk: events/s and CPU per event
//! (user + system time of the whole process, every ctrlbus thread
//! included), alternating A/B rounds and reporting medians.
//!
//! Run: `cargo bench --bench async_publish --features tokio -- [EVENTS] [DIR]`
//! (default 32,000 events a round, 5 rounds each, in a temp dir).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ctrlbus::{Bus, DurableBus, Event, Type};
use serde_json::{Map, Value};

const PUBLISHERS: usize = 64;

fn event(p: &Map<String, Value>) -> Event {
    Event::new(Type::DEPLOY_STARTED, "tenant-1").with_payload(p.clone())
}

/// User + system CPU time of this process so far.
fn cpu() -> Duration {
    // (`getrusage` needs unsafe, which this crate forbids: /proc instead.)
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which may hold spaces): utime is the
    // 14th field, stime the 15th, in clock ticks.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // /proc counts in USER_HZ, which Linux fixes at 100 for user space.
    Duration::from_secs_f64(ticks as f64 / 100.0)
}

struct Run {
    events_per_sec: f64,
    cpu_us_per_event: f64,
}

fn blocking(bus: &Arc<DurableBus>, n: usize, p: &Map<String, Value>) -> Run {
    let (t0, c0) = (Instant::now(), cpu());
    std::thread::scope(|s| {
        for _ in 0..PUBLISHERS {
            let bus = bus.clone();
            s.spawn(move || {
                for _ in 0..n / PUBLISHERS {
                    bus.publish(event(p)).unwrap();
                }
            });
        }
    });
    finish(t0, c0, n)
}

fn async_tasks(
    rt: &tokio::runtime::Runtime,
    bus: &Arc<DurableBus>,
    n: usize,
    p: &Map<String, Value>,
) -> Run {
    let (t0, c0) = (Instant::now(), cpu());
    rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..PUBLISHERS {
            let bus = bus.clone();
            let p = p.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..n / PUBLISHERS {
                    bus.publish_async(event(&p)).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    finish(t0, c0, n)
}

fn finish(t0: Instant, c0: Duration, n: usize) -> Run {
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu().saturating_sub(c0).as_secs_f64();
    Run {
        events_per_sec: n as f64 / wall,
        cpu_us_per_event: cpu * 1e6 / n as f64,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let n: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(32_000);
    let tmp = tempfile::tempdir().unwrap();
    let dir = args
        .get(1)
        .map_or_else(|| tmp.path().to_path_buf(), std::path::PathBuf::from);
    let p = {
        let mut m = Map::new();
        m.insert("data".into(), Value::String("x".repeat(289)));
        m
    };
    // The runtime a tokio control plane would run: a worker per core.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (mut b, mut a) = (Vec::new(), Vec::new());
    for round in 0..5 {
        for mode in ["blocking", "async"] {
            let path = dir.join(format!("async_bench_{round}_{mode}.redb"));
            let bus = Arc::new(DurableBus::open(&path).unwrap());
            let run = if mode == "blocking" {
                blocking(&bus, n, &p)
            } else {
                async_tasks(&rt, &bus, n, &p)
            };
            println!(
                "round {round} {mode:>8}: {:>8.0} events/s, {:>5.1} µs CPU/event",
                run.events_per_sec, run.cpu_us_per_event
            );
            if mode == "blocking" {
                b.push(run);
            } else {
                a.push(run);
            }
            drop(bus);
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_file(path.with_extension("redb.wal"));
        }
    }
    let (bt, at) = (
        median(b.iter().map(|r| r.events_per_sec).collect()),
        median(a.iter().map(|r| r.events_per_sec).collect()),
    );
    let (bc, ac) = (
        median(b.iter().map(|r| r.cpu_us_per_event).collect()),
        median(a.iter().map(|r| r.cpu_us_per_event).collect()),
    );
    println!("median blocking (64 threads): {bt:.0} events/s, {bc:.1} µs CPU/event");
    println!("median async (64 tasks):      {at:.0} events/s, {ac:.1} µs CPU/event");
    println!(
        "async/blocking: throughput {:.2}x, CPU per event {:.2}x",
        at / bt,
        ac / bc
    );
}
