//! Crash test (G2, G3, G5): a child process publishes from several threads
//! and consumes with two durable subscriptions; the parent kills it with
//! SIGKILL at a random moment, reopens the log and checks it, many times.
//!
//! The child is this test binary run again with `CTRLBUS_CRASH_CHILD` set
//! (the `crash_child` test below is a no-op otherwise). It appends every
//! acknowledged publish (`id seq`) to an acks file as soon as `publish`
//! returns, and every handled event (`sub id`) to a per-round handled file
//! from inside the handler, one `write` per line. SIGKILL does not lose the
//! page cache, so these files are exact.
//!
//! With the `tokio` feature the child also consumes a `durable_stream`
//! filtered to one of its two tenants (`t2`), so the rounds cover the
//! skip path of pull subscriptions (`PullWakers`): its cursor moves over
//! the other tenant's events without reading them, and a kill must still
//! leave it at or before its last acknowledged event.
//!
//! Rounds: 20 by default, `CTRLBUS_CRASH_ROUNDS` for more. The seed of the
//! random kill delays is printed; `CTRLBUS_CRASH_SEED` replays one. With the
//! `fuzzing` feature, odd rounds restart the WAL every 16 KiB and apply
//! every 2 ms, so kills land in restarts that carry unapplied frames.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Rng;
use ctrlbus::{DurableBus, Event, EventId, Filter, HandlerError, Position, Type};

/// Publisher threads in the child.
const PUBLISHERS: u64 = 4;
/// Largest `publish_batch` a child publisher makes.
const MAX_BATCH: u64 = 3;
/// The child's `ack_flush_events`.
const ACK_FLUSH_EVENTS: u64 = 50;
/// Largest commit group the child can form: every publisher has at most one
/// request (of at most `MAX_BATCH` events) in flight.
const MAX_GROUP: u64 = PUBLISHERS * MAX_BATCH;
/// The redelivery window of `src/durable/subscription.rs`: after a crash a
/// subscription sees again at most `ack_flush_events` plus one commit group.
const WINDOW: u64 = ACK_FLUSH_EVENTS + MAX_GROUP;

/// What the child prints once it publishes and consumes.
const READY: &str = "ctrlbus-crash-child-ready";

/// The handler subscriptions.
const HANDLER_SUBS: [&str; 2] = ["all", "deploys"];
/// Every consumer the parent checks: the handler subscriptions, then
/// (with `tokio`) the durable stream.
#[cfg(not(feature = "tokio"))]
const SUBS: [&str; 2] = HANDLER_SUBS;
#[cfg(feature = "tokio")]
const SUBS: [&str; 3] = [HANDLER_SUBS[0], HANDLER_SUBS[1], STREAM];
/// The durable stream's name (and its line prefix in the handled file).
#[cfg(feature = "tokio")]
const STREAM: &str = "t2-stream";

fn sub_filter(name: &str) -> Filter {
    match name {
        "all" => Filter::all(),
        "deploys" => Filter::types(["deploy.*"]).unwrap(),
        "t2-stream" => Filter::all().tenant("t2"),
        _ => unreachable!(),
    }
}

/// A publish's tenant: one in four goes to `t2`, so the stream passes
/// runs of `t1` events it never reads.
fn tenant(rng: &mut Rng) -> &'static str {
    if rng.below(4) == 0 { "t2" } else { "t1" }
}

/// The child's durable stream, on a runtime of its own: records each
/// delivery in the handled file before acknowledging it. In drain mode it
/// returns once its position reaches `drain_to`; else it runs until killed.
#[cfg(feature = "tokio")]
fn run_stream(bus: &DurableBus, handled: &Arc<Mutex<File>>, drain_to: Option<u64>) {
    use futures::StreamExt as _;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut stream = bus
            .durable_stream(STREAM, sub_filter(STREAM), Position::Beginning)
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(last) = drain_to {
                if stream.position() >= last {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the stream's drain did not finish"
                );
            }
            let Ok(next) = tokio::time::timeout(Duration::from_millis(20), stream.next()).await
            else {
                continue;
            };
            let d = next.expect("the bus closed").expect("a read error");
            append_line(handled, format!("{STREAM} {}\n", d.event().id));
            d.ack().await.unwrap();
        }
        // A clean close: the position of the last ack is stored.
        drop(stream);
    });
}

const TYPES: [Type; 6] = [
    Type::DEPLOY_STARTED,
    Type::DEPLOY_SUCCEEDED,
    Type::HEALTH_PASSED,
    Type::INSTANCE_CREATED,
    Type::DEPLOY_FAILED,
    Type::HEALTH_DEGRADED,
];

/// Never set: the child's publishers stop only when the child is killed.
static STOP: AtomicBool = AtomicBool::new(false);

fn append_line(file: &Mutex<File>, line: String) {
    // One write per line: a kill never leaves half a line behind.
    file.lock().unwrap().write_all(line.as_bytes()).unwrap();
}

fn open_append(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
}

fn builder() -> ctrlbus::DurableBusBuilder {
    DurableBus::builder().ack_flush_events(ACK_FLUSH_EVENTS)
}

/// The child: runs until killed (mode `run`) or until both subscriptions
/// have handled the whole log (mode `drain`).
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var("CTRLBUS_CRASH_CHILD") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let round: u64 = std::env::var("CTRLBUS_CRASH_ROUND")
        .unwrap()
        .parse()
        .unwrap();
    let drain = std::env::var("CTRLBUS_CRASH_MODE").as_deref() == Ok("drain");
    #[cfg(feature = "fuzzing")]
    let b = if round % 2 == 1 {
        builder()
            .wal_restart_after(16 << 10)
            .apply_interval(Duration::from_millis(2))
    } else {
        builder()
    };
    #[cfg(not(feature = "fuzzing"))]
    let b = builder();
    let bus = b.open(dir.join("log.redb")).unwrap();
    let acks = Arc::new(Mutex::new(open_append(&dir.join("acks"))));
    let handled = Arc::new(Mutex::new(open_append(
        &dir.join(format!("handled.{round}")),
    )));
    let mut subs = Vec::new();
    for name in HANDLER_SUBS {
        let handled = handled.clone();
        let sub = bus
            .subscribe_durable(
                name,
                sub_filter(name),
                Position::Beginning,
                move |e: &Event| -> Result<(), HandlerError> {
                    append_line(&handled, format!("{name} {}\n", e.id));
                    Ok(())
                },
            )
            .unwrap();
        subs.push(sub);
    }
    #[cfg(feature = "tokio")]
    let stream = {
        let (bus, handled) = (bus.clone(), handled.clone());
        let drain_to = drain.then(|| bus.last_seq());
        std::thread::spawn(move || run_stream(&bus, &handled, drain_to))
    };
    println!("{READY}");
    std::io::stdout().flush().unwrap();
    if drain {
        let last = bus.last_seq();
        let deadline = Instant::now() + Duration::from_secs(60);
        while subs.iter().any(|s| s.position() < last) {
            assert!(Instant::now() < deadline, "drain did not finish");
            std::thread::sleep(Duration::from_millis(5));
        }
        #[cfg(feature = "tokio")]
        stream.join().unwrap();
        drop(subs);
        drop(bus);
        return;
    }
    let mut threads = Vec::new();
    for p in 0..PUBLISHERS {
        let bus = bus.clone();
        let acks = acks.clone();
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (round << 8) ^ p ^ 1);
            // Nothing sets it: the publishers run until SIGKILL.
            while !STOP.load(Ordering::Relaxed) {
                let n = 1 + rng.below(MAX_BATCH);
                let events: Vec<Event> = (0..n)
                    .map(|_| {
                        let t = TYPES[rng.below(TYPES.len() as u64) as usize].clone();
                        Event::new(t, tenant(&mut rng)).with_payload_value("round", round)
                    })
                    .collect();
                let receipts = if n == 1 {
                    vec![ctrlbus::Bus::publish(&bus, events.into_iter().next().unwrap()).unwrap()]
                } else {
                    bus.publish_batch(events).unwrap()
                };
                let mut lines = String::new();
                for r in receipts {
                    let _ = writeln!(lines, "{} {}", r.id, r.seq);
                }
                append_line(&acks, lines);
            }
        }));
    }
    // Diagnostics: note each subscription's mode changes in the handled
    // file (`~name live|catch-up position`).
    {
        let handled = handled.clone();
        let subs = std::mem::take(&mut subs);
        std::thread::spawn(move || {
            let mut was = vec![None; subs.len()];
            loop {
                for (i, s) in subs.iter().enumerate() {
                    let live = s.is_live();
                    if was[i] != Some(live) {
                        was[i] = Some(live);
                        let mode = if live { "live" } else { "catch-up" };
                        append_line(&handled, format!("~{} {mode} {}\n", s.name(), s.position()));
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
    }
    // A failed publish panics its thread and ends the child early, which
    // the parent reports.
    for t in threads {
        t.join().unwrap();
    }
}

/// Kills the child if the parent fails first, so no orphan keeps running.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_child(dir: &Path, round: u64, mode: &str) -> ChildGuard {
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env("CTRLBUS_CRASH_CHILD", dir)
        .env("CTRLBUS_CRASH_ROUND", round.to_string())
        .env("CTRLBUS_CRASH_MODE", mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    ChildGuard(child)
}

/// Waits for the child's `ready` line, up to a deadline.
fn wait_ready(child: &mut std::process::Child) {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // libtest may print `test crash_child ... ` on the same line.
            if line.contains(READY) {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("child did not become ready");
}

/// Lines that end in a newline (a line cut by the kill would not, though one
/// `write` of a short line to a regular file is not cut in practice).
fn lines(path: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let mut out: Vec<String> = text.split_inclusive('\n').map(str::to_owned).collect();
    if out.last().is_some_and(|l| !l.ends_with('\n')) {
        out.pop();
    }
    out.into_iter().map(|l| l.trim_end().to_owned()).collect()
}

struct LogView {
    /// Index = seq - 1.
    events: Vec<Event>,
    seq_of: HashMap<EventId, u64>,
}

/// Reopens the log in this process and checks G2/G3; returns its content.
fn check_log(dir: &Path, round: u64) -> (LogView, HashMap<&'static str, u64>) {
    let bus = builder().open(dir.join("log.redb")).unwrap();
    let report = bus.check(&mut |_, _| {}).unwrap();
    assert!(
        report.is_sound(),
        "round {round}: check found {:?}",
        report.problems
    );
    let mut events = Vec::new();
    let mut seq_of = HashMap::new();
    for (i, entry) in bus
        .read(Position::Beginning, &Filter::all())
        .unwrap()
        .enumerate()
    {
        let entry = entry.unwrap();
        assert_eq!(
            entry.seq,
            i as u64 + 1,
            "round {round}: seqs must run from 1 without gaps"
        );
        seq_of.insert(entry.event.id, entry.seq);
        events.push(entry.event);
    }
    assert_eq!(bus.last_seq(), events.len() as u64, "round {round}");
    // G2: every acknowledged event is there with its seq.
    let mut acked = 0usize;
    for line in lines(&dir.join("acks")) {
        let (id, seq) = line.split_once(' ').unwrap();
        let id = EventId::parse(id).unwrap();
        let seq: u64 = seq.parse().unwrap();
        assert_eq!(
            seq_of.get(&id),
            Some(&seq),
            "round {round}: acknowledged event {id} (seq {seq}) is missing or moved"
        );
        acked += 1;
    }
    assert!(acked <= events.len());
    let mut stored = HashMap::new();
    for name in SUBS {
        let c = bus.cursor(name).unwrap();
        assert!(c.delivered_seq <= events.len() as u64);
        stored.insert(name, c.delivered_seq);
    }
    drop(bus);
    (LogView { events, seq_of }, stored)
}

#[test]
fn kill_9_at_random_moments() {
    if std::env::var("CTRLBUS_CRASH_CHILD").is_ok() {
        return;
    }
    let rounds: u64 = std::env::var("CTRLBUS_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("CTRLBUS_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("crash test: {rounds} rounds, CTRLBUS_CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Create the log before the first kill (a kill while the file is being
    // created is not what this test is about).
    drop(builder().open(dir.join("log.redb")).unwrap());

    // Per subscription: the stored position before the round, and every seq
    // handled so far.
    let mut before: HashMap<&str, u64> = SUBS.iter().map(|s| (*s, 0)).collect();
    let mut handled_all: HashMap<&str, BTreeSet<u64>> =
        SUBS.iter().map(|s| (*s, BTreeSet::new())).collect();
    let mut max_redelivered: HashMap<&str, u64> = SUBS.iter().map(|s| (*s, 0)).collect();
    let started = Instant::now();
    for round in 0..=rounds {
        let drain = round == rounds;
        let mut guard = spawn_child(dir, round, if drain { "drain" } else { "run" });
        let child = &mut guard.0;
        wait_ready(child);
        if drain {
            let status = child.wait().unwrap();
            assert!(status.success(), "drain child failed: {status}");
        } else {
            std::thread::sleep(Duration::from_millis(50 + rng.below(350)));
            if let Some(status) = child.try_wait().unwrap() {
                panic!("round {round}: the child exited by itself: {status}");
            }
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
        }
        drop(guard);
        let (log, stored) = check_log(dir, round);
        for name in SUBS {
            let filter = sub_filter(name);
            let handled: Vec<u64> = lines(&dir.join(format!("handled.{round}")))
                .iter()
                .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' ').map(str::to_owned))
                .map(|id| {
                    let id = EventId::parse(&id).unwrap();
                    // G1: a handler only sees durable events.
                    *log.seq_of.get(&id).unwrap_or_else(|| {
                        panic!("round {round}: {name} handled {id}, which is not in the log")
                    })
                })
                .collect();
            let from = before[name];
            let last_handled = handled.last().copied().unwrap_or(from);
            // G5: the round delivers exactly the matching events after the
            // stored position, in seq order, once each (handlers never fail
            // here, so nothing is retried).
            let expected: Vec<u64> = (from + 1..=last_handled)
                .filter(|s| filter.matches(&log.events[*s as usize - 1]))
                .collect();
            assert_eq!(
                handled, expected,
                "round {round}: {name} resumed after {from} but its deliveries are not the \
                 matching events in order"
            );
            let now = stored[name];
            assert!(
                now >= from,
                "round {round}: {name}'s stored position went back"
            );
            // No skip: every matching event up to the stored position was
            // handled (those up to `last_handled` are, by the check above).
            let skipped: Vec<u64> = (last_handled + 1..=now)
                .filter(|s| filter.matches(&log.events[*s as usize - 1]))
                .collect();
            assert!(
                skipped.is_empty(),
                "round {round}: {name}'s stored position {now} passes unhandled events {skipped:?}"
            );
            // The window: what was handled past the stored position will be
            // delivered again next round.
            let again = handled.iter().filter(|s| **s > now).count() as u64;
            if again > WINDOW {
                let modes: Vec<String> = lines(&dir.join(format!("handled.{round}")))
                    .into_iter()
                    .filter(|l| l.starts_with(&format!("~{name} ")))
                    .collect();
                let acked_after: Vec<u64> = lines(&dir.join("acks"))
                    .iter()
                    .filter_map(|l| l.split_once(' ')?.1.parse::<u64>().ok())
                    .filter(|s| *s > now)
                    .collect();
                panic!(
                    "round {round}: {name} will see {again} events again, more than the \
                     documented window of {WINDOW}: resumed after {from}, stored {now}, handled \
                     up to {last_handled}, log ends at {}; modes {modes:?}; acked after the \
                     stored position: {acked_after:?}",
                    log.events.len()
                );
            }
            let m = max_redelivered.get_mut(name).unwrap();
            *m = (*m).max(again);
            handled_all.get_mut(name).unwrap().extend(handled);
            before.insert(name, now);
        }
        if drain {
            for name in SUBS {
                let filter = sub_filter(name);
                let want: BTreeSet<u64> = (1..=log.events.len() as u64)
                    .filter(|s| filter.matches(&log.events[*s as usize - 1]))
                    .collect();
                assert_eq!(handled_all[name], want, "{name} skipped events");
                assert_eq!(before[name], log.events.len() as u64);
            }
            eprintln!(
                "crash test: {} events in {:?}; largest redelivery per crash {:?} (window {WINDOW})",
                log.events.len(),
                started.elapsed(),
                max_redelivered
            );
        }
    }
}
