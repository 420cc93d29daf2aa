//! `ctrlbus bench publish`: the durable-publish workload of
//! `../shared/peers`, appended to the log at `--db`.

use std::fs::{File, OpenOptions};
use std::io::Write;
#[cfg(unix)]
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use ctrlbus::{Bus, Event, Type};
use serde::Serialize;
use serde_json::{Map, Value};

use super::cpu_time;
use super::error::{CliError, Result};
use super::open;
use super::output::Out;

/// `bench` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// N events of B payload bytes from P concurrent publishers, each
    /// publish waiting until its event is durable; prints one JSON line.
    #[command(after_help = "\
Examples:
  ctrlbus --db /tmp/bench.redb bench publish --events 20000 --publishers 16 --payload-bytes 300
  ctrlbus bench publish --events 100000 --publishers 8 --acks acked.txt
  ctrlbus bench publish --events 100000 --publishers 64 --threads 64

The P publishers run on T threads (--threads, default 1): each thread keeps
one publish per publisher in flight with `submit` and waits for each in
order, as redis-benchmark (which compare.sh runs for Redis) drives its P
connections from one thread. A publisher publishes again only once its last
publish is durable. --threads P gives every publisher its own thread, as a
program with a thread per request would.

The line has the fields of the peer scripts (system, publishers, events,
payload_bytes, events_per_sec) plus latency percentiles in microseconds, and,
where Linux's /proc tells them, cpu_us_per_event (the process's user + system
CPU from the first submit to the last acknowledgement, divided by N; ±10 ms
of CPU in all) and steal_pct (the share of the machine's CPU time a
hypervisor gave to others meanwhile).
--acks appends each acknowledged event id to FILE, one per line, as soon as
its publish returned (written to the OS, not fsync'd): after a kill -9, every
id in FILE must be in the log.")]
    Publish(PublishArgs),
}

/// `bench publish` flags.
#[derive(Debug, clap::Args)]
pub(crate) struct PublishArgs {
    /// Events to publish in all.
    #[arg(long, value_name = "N", default_value_t = 20_000)]
    events: u64,
    /// Concurrent publishers, each with one publish in flight.
    #[arg(long, value_name = "P", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..=4096))]
    publishers: u64,
    /// Payload size in bytes.
    #[arg(long, value_name = "B", default_value_t = 300)]
    payload_bytes: usize,
    /// OS threads to run the publishers on.
    #[arg(long, value_name = "T", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..=4096))]
    threads: u64,
    /// Append each acknowledged event id to FILE.
    #[arg(long, value_name = "FILE")]
    acks: Option<PathBuf>,
}

#[derive(Serialize)]
struct Report {
    system: &'static str,
    publishers: u64,
    events: u64,
    payload_bytes: usize,
    events_per_sec: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
    elapsed_ms: u64,
    /// CPU (user + system, every thread) this process spent from the
    /// first submit to the last acknowledgement, per event; left out
    /// where `/proc` can't tell it.
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_us_per_event: Option<f64>,
    /// The share of the machine's CPU time the hypervisor took meanwhile,
    /// in percent: a run with much of it stolen is slow for reasons that
    /// are not the log's.
    #[serde(skip_serializing_if = "Option::is_none")]
    steal_pct: Option<f64>,
}

/// Options that create a missing file owner-only (0600), as every file
/// ctrlbus makes.
fn private_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    #[cfg(unix)]
    o.mode(0o600);
    o
}

/// Runs a `bench` subcommand on the file at `db`.
pub(crate) fn run(db: &Path, cmd: Command, out: &mut Out) -> Result {
    let bus = open::writable(db, true)?;
    let r = run_on(&bus, cmd, out);
    bus.close();
    r
}

/// A log that takes a publish now and acknowledges it later, so that one
/// thread keeps several in flight.
pub(crate) trait Submit: Sync {
    /// The `system` field of the report.
    const SYSTEM: &'static str;
    /// A publish in flight.
    type Pending;
    /// Starts publishing `event`.
    fn submit(&self, event: Event) -> Result<Self::Pending>;
    /// Waits for the receipt of a publish in flight.
    fn wait(&self, pending: Self::Pending) -> Result<ctrlbus::Receipt>;
    /// Publishes `event` and waits for its receipt: what a publisher with
    /// one publish in flight calls.
    fn publish(&self, event: Event) -> Result<ctrlbus::Receipt> {
        self.wait(self.submit(event)?)
    }
}

impl Submit for ctrlbus::DurableBus {
    const SYSTEM: &'static str = "ctrlbus";
    type Pending = ctrlbus::PendingPublish;
    fn submit(&self, event: Event) -> Result<Self::Pending> {
        Ok(ctrlbus::DurableBus::submit(self, event)?)
    }
    fn wait(&self, pending: Self::Pending) -> Result<ctrlbus::Receipt> {
        Ok(pending.wait()?)
    }
    fn publish(&self, event: Event) -> Result<ctrlbus::Receipt> {
        Ok(ctrlbus::Bus::publish(self, event)?)
    }
}

impl Submit for ctrlbus::JetStreamBus {
    const SYSTEM: &'static str = "ctrlbus-jetstream";
    type Pending = ctrlbus::stream::PublishFuture;
    fn submit(&self, event: Event) -> Result<Self::Pending> {
        Ok(self.publish_async(event))
    }
    fn wait(&self, pending: Self::Pending) -> Result<ctrlbus::Receipt> {
        Ok(block_on(pending)?)
    }
}

/// Runs `future` to its end on this thread (it is completed by the bus's
/// own runtime; this thread only sleeps until woken).
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(std::sync::Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let std::task::Poll::Ready(v) = future.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

/// Runs a `bench` subcommand on any log that takes publishes in flight.
pub(crate) fn run_on<B: Submit>(bus: &B, cmd: Command, out: &mut Out) -> Result {
    let Command::Publish(args) = cmd;
    let acks = match &args.acks {
        Some(p) => Some(Mutex::new(
            private_options()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| CliError::msg(format!("cannot open {}: {e}", p.display())))?,
        )),
        None => None,
    };
    // `{"data":"xx…"}` of about B bytes of compact JSON.
    let mut payload = Map::new();
    payload.insert(
        "data".into(),
        Value::String("x".repeat(args.payload_bytes.saturating_sub(11))),
    );
    let threads = args.threads.min(args.publishers);
    let share = |total: u64, i: u64| total / threads + u64::from(i < total % threads);
    let cpu_start = cpu_time::Sample::now();
    let start = Instant::now();
    let results: Vec<Result<Latencies>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let (payload, acks) = (&payload, acks.as_ref());
                let (count, window) = (share(args.events, i), share(args.publishers, i));
                s.spawn(move || publisher(bus, count, window as usize, payload, acks))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(CliError::msg("a publisher panicked")))
            })
            .collect()
    });
    let elapsed = start.elapsed();
    let spent = cpu_start
        .zip(cpu_time::Sample::now())
        .map(|(then, now)| now.since(&then));
    let mut latencies = latencies();
    for r in results {
        latencies
            .add(r?)
            .map_err(|e| CliError::msg(format!("cannot merge latencies: {e}")))?;
    }
    let pct = |p: f64| -> u64 {
        if latencies.is_empty() {
            0
        } else {
            latencies.value_at_quantile(p)
        }
    };
    let secs = elapsed.as_secs_f64().max(1e-9);
    out.record(&Report {
        system: B::SYSTEM,
        publishers: args.publishers,
        events: args.events,
        payload_bytes: args.payload_bytes,
        events_per_sec: (args.events as f64 / secs * 10.0).round() / 10.0,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        p999_us: pct(0.999),
        max_us: if latencies.is_empty() {
            0
        } else {
            latencies.max()
        },
        elapsed_ms: elapsed.as_millis() as u64,
        cpu_us_per_event: spent
            .filter(|_| args.events > 0)
            .map(|s| (s.process_secs * 1e6 / args.events as f64 * 100.0).round() / 100.0),
        steal_pct: spent.map(|s| (s.steal_pct * 10.0).round() / 10.0),
    })?;
    Ok(())
}

/// Publish latencies in µs. A histogram (3 significant digits), not every
/// latency: a list of 10M would hold 80 MB and make the publisher's peak
/// RSS grow with `--events` (BENCHMARKS.md, "Log size").
type Latencies = hdrhistogram::Histogram<u32>;

/// An empty [`Latencies`]: 1 µs to an hour, growing past it if need be.
fn latencies() -> Latencies {
    let mut h = Latencies::new_with_bounds(1, 3_600_000_000, 3)
        .unwrap_or_else(|_| unreachable!("valid bounds"));
    h.auto(true);
    h
}

/// Records one latency, from `t0` to now.
fn record(latencies: &mut Latencies, t0: Instant) {
    let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
    latencies.saturating_record(us.max(1));
}

/// One thread of `window` publishers: `count` publishes, at most `window`
/// in flight, each timed from submit to acknowledgement; returns latencies
/// in µs.
fn publisher<B: Submit>(
    bus: &B,
    count: u64,
    window: usize,
    payload: &Map<String, Value>,
    acks: Option<&Mutex<File>>,
) -> Result<Latencies> {
    let mut latencies = latencies();
    let mut line = String::with_capacity(40);
    let mut in_flight = std::collections::VecDeque::with_capacity(window);
    let mut submitted = 0;
    let event = || Event::new(Type::INSTANCE_STARTED, "bench").with_payload(payload.clone());
    while submitted < count || !in_flight.is_empty() {
        if submitted < count && window <= 1 {
            // One in flight: a plain publish, as such a publisher calls it.
            let event = event();
            let t0 = Instant::now();
            let receipt = bus.publish(event)?;
            submitted += 1;
            record(&mut latencies, t0);
            record_ack(acks, &mut line, &receipt)?;
            continue;
        }
        if submitted < count && in_flight.len() < window {
            let event = event();
            let t0 = Instant::now();
            in_flight.push_back((t0, bus.submit(event)?));
            submitted += 1;
            continue;
        }
        let Some((t0, pending)) = in_flight.pop_front() else {
            break;
        };
        let receipt = bus.wait(pending)?;
        record(&mut latencies, t0);
        record_ack(acks, &mut line, &receipt)?;
    }
    Ok(latencies)
}

/// With `--acks`, writes the receipt's id on its own line.
fn record_ack(
    acks: Option<&Mutex<File>>,
    line: &mut String,
    receipt: &ctrlbus::Receipt,
) -> Result<()> {
    if let Some(acks) = acks {
        use std::fmt::Write as _;
        line.clear();
        let _ = writeln!(line, "{}", receipt.id);
        // One write(2) per id: in the OS as soon as publish returned.
        let mut f = acks.lock().unwrap_or_else(|p| p.into_inner());
        f.write_all(line.as_bytes())?;
    }
    Ok(())
}
