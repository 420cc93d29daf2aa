//! Fault injection (G2, G10): a redb storage backend that fails writes or
//! fsyncs at a chosen point. `publish` must return an error (never panic),
//! no half-written event may ever be visible, and the file, reopened
//! normally, must hold every acknowledged event, each whole, with `check`
//! reporting it sound.
//!
//! Under the write-ahead log (the default for a log opened from a path) a
//! publish is durable once its WAL frame is, and redb's commits happen later
//! on the applier thread; `applier_failures_under_the_wal` fails those. Every
//! acknowledged event must then come back from the WAL on reopen, and the
//! WAL must not be emptied by a close that could not apply it.
//!
//! What the contract allows for an event whose `publish` failed: G2 only
//! requires acknowledged ⊆ durable. A failure that hits after redb's commit
//! point (the final fsync, once the new header is written) leaves the event
//! in the file although `publish` reported an error; that is allowed. Such an
//! event must still be whole, have the next `seq`, and never be followed by
//! an acknowledged event that reuses its `seq`.
#![cfg(feature = "fuzzing")] // uses fault injection through open_backend_with_wal, test hooks behind the feature

mod common;
use common::recorder;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};

use common::backend::{Hook, Hooked, Op};
use ctrlbus::{Bus, DurableBus, Event, EventId, Filter, Position, Type};
use redb::StorageBackend;
use redb::backends::FileBackend;

/// Which operation the countdown applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Write,
    Sync,
    /// Writes half the buffer, then fails (a torn write).
    TornWrite,
}

/// Counts panics anywhere in this test binary.
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            default(info);
        }));
    });
}

/// Fails (or tears) the writes or fsyncs of a [`Hooked`] file from a
/// countdown on.
#[derive(Debug)]
struct FaultyBackend {
    target: Target,
    /// Operations of `target` left before they start failing; `u64::MAX`
    /// disables the fault.
    countdown: Arc<AtomicU64>,
    /// Fail only once (a transient fault) instead of from then on.
    once: bool,
    fired: Arc<AtomicBool>,
}

impl FaultyBackend {
    /// True if this operation of `kind` must fail.
    fn fault(&self, kind: Target) -> bool {
        let matches =
            kind == self.target || (kind == Target::Write && self.target == Target::TornWrite);
        if !matches {
            return false;
        }
        if self.once && self.fired.load(Ordering::SeqCst) {
            return false;
        }
        let left = self.countdown.load(Ordering::SeqCst);
        if left == u64::MAX {
            return false;
        }
        if left > 0 {
            self.countdown.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        self.fired.store(true, Ordering::SeqCst);
        true
    }
}

fn injected() -> std::io::Error {
    std::io::Error::other("injected fault")
}

impl Hook for FaultyBackend {
    fn before(
        &self,
        op: Op,
        inner: &FileBackend,
        offset: u64,
        data: &[u8],
    ) -> Option<std::io::Result<()>> {
        let kind = match op {
            Op::Read => return None,
            Op::Write | Op::SetLen => Target::Write,
            Op::Sync => Target::Sync,
        };
        if !self.fault(kind) {
            return None;
        }
        if op == Op::Write
            && self.target == Target::TornWrite
            && data.len() > 1
            && let Err(e) = inner.write(offset, &data[..data.len() / 2])
        {
            return Some(Err(e));
        }
        Some(Err(injected()))
    }
}

fn backend(
    path: &Path,
    target: Target,
    countdown: &Arc<AtomicU64>,
    once: bool,
) -> Hooked<FaultyBackend> {
    Hooked::open(
        path,
        FaultyBackend {
            target,
            countdown: countdown.clone(),
            once,
            fired: Arc::new(AtomicBool::new(false)),
        },
    )
}

const BASE: usize = 3;
const ATTEMPTS: usize = 12;

fn event(i: usize) -> Event {
    let t = if i.is_multiple_of(2) {
        Type::DEPLOY_STARTED
    } else {
        Type::HEALTH_FAILED
    };
    Event::new(t, "tenant-1")
        .with_actor("tester")
        .with_payload_value("i", i as u64)
        .with_payload_value("pad", "x".repeat(200 + i * 37))
}

/// Reads the whole log; every record must decode.
fn read_all(bus: &DurableBus) -> Vec<(u64, Event)> {
    bus.read(Position::Beginning, &Filter::all())
        .unwrap()
        .map(|r| {
            let e = r.expect("a record in the log must decode");
            (e.seq, e.event)
        })
        .collect()
}

/// Creates the log at `path` with `BASE` events, closed; returns them with
/// their seqs.
fn base_log(path: &Path) -> Vec<(u64, Event)> {
    let bus = DurableBus::open(path).unwrap();
    (0..BASE)
        .map(|i| {
            let e = event(i);
            (bus.publish(e.clone()).unwrap().seq, e)
        })
        .collect()
}

/// One run: a log with `BASE` events, reopened on the faulty backend whose
/// countdown starts at `k` once it is open; `ATTEMPTS` publishes (singles and
/// a batch), then the checks.
fn run_point(target: Target, k: u64, once: bool) -> Point {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.redb");
    let base = base_log(&path);
    let countdown = Arc::new(AtomicU64::new(u64::MAX));
    let be = backend(&path, target, &countdown, once);
    let fired = be.hook.fired.clone();
    let bus = DurableBus::builder()
        .open_backend(be)
        .expect("open with the fault disabled");
    let seen: Arc<Mutex<Vec<EventId>>> = Arc::default();
    let sub = bus.subscribe(Filter::all(), recorder(&seen)).unwrap();
    countdown.store(k, Ordering::SeqCst);

    let mut acked: Vec<(u64, Event)> = base.clone();
    let mut failed: Vec<Event> = Vec::new();
    // The events of the first publish that failed.
    let mut first_failed: Option<Vec<Event>> = None;
    let mut ok_after_failure = 0;
    let mut i = BASE;
    while i < BASE + ATTEMPTS {
        let ctx = format!("{target:?} k={k} once={once} publish {i}");
        if i % 5 == 4 {
            let batch: Vec<Event> = (i..i + 2).map(event).collect();
            match bus.publish_batch(batch.clone()) {
                Ok(rs) => {
                    ok_after_failure += usize::from(first_failed.is_some());
                    for (r, e) in rs.iter().zip(batch) {
                        assert!(!r.duplicate, "{ctx}");
                        acked.push((r.seq, e));
                    }
                }
                Err(ctrlbus::PublishError::Storage(_)) => {
                    first_failed.get_or_insert_with(|| batch.clone());
                    failed.extend(batch);
                }
                Err(e) => panic!("{ctx}: unexpected error {e}"),
            }
            i += 2;
        } else {
            let e = event(i);
            match bus.publish(e.clone()) {
                Ok(r) => {
                    ok_after_failure += usize::from(first_failed.is_some());
                    assert!(!r.duplicate, "{ctx}");
                    acked.push((r.seq, e));
                }
                Err(ctrlbus::PublishError::Storage(_)) => {
                    first_failed.get_or_insert_with(|| vec![e.clone()]);
                    failed.push(e);
                }
                Err(e) => panic!("{ctx}: unexpected error {e}"),
            }
            i += 1;
        }
        // Acknowledged seqs are consecutive from 1 (G3), even across failures.
        let seqs: Vec<u64> = acked.iter().map(|a| a.0).collect();
        let want: Vec<u64> = (1..=acked.len() as u64).collect();
        assert_eq!(seqs, want, "{ctx}: acknowledged seqs");
        // No half-written event is visible: whatever the bus still reads
        // decodes and is exactly an event we published, at its seq.
        if let Ok(reader) = bus.read(Position::Beginning, &Filter::all()) {
            for entry in reader {
                let Ok(entry) = entry else { break };
                if let Some((_, e)) = acked.iter().find(|(s, _)| *s == entry.seq) {
                    assert_eq!(&entry.event, e, "{ctx}: seq {}", entry.seq);
                } else {
                    panic!("{ctx}: unacknowledged event visible at seq {}", entry.seq);
                }
            }
        }
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    drop(sub);
    drop(bus);

    // Reopen normally: redb repairs, and the log holds every acknowledged
    // event, whole, at its seq.
    let bus = DurableBus::open(&path).unwrap_or_else(|e| panic!("{target:?} k={k}: reopen: {e}"));
    let report = bus.check(&mut |_, _| {}).unwrap();
    assert!(report.is_sound(), "{target:?} k={k}: {:?}", report.problems);
    let present = read_all(&bus);
    for (n, (seq, _)) in present.iter().enumerate() {
        assert_eq!(*seq, n as u64 + 1, "{target:?} k={k}: seqs contiguous");
    }
    for (seq, e) in &acked {
        let got = present.iter().find(|(s, _)| s == seq);
        assert_eq!(
            got.map(|g| &g.1),
            Some(e),
            "{target:?} k={k}: acknowledged seq {seq} lost or changed"
        );
    }
    // Anything else present is the first failed publish, whose failure hit
    // after the commit point: whole, right after the acknowledged ones.
    // Nothing after it (the bus stops writing after a storage failure).
    let extra: Vec<Event> = present
        .iter()
        .skip(acked.len())
        .map(|p| p.1.clone())
        .collect();
    if !extra.is_empty() {
        assert_eq!(
            Some(&extra),
            first_failed.as_ref(),
            "{target:?} k={k}: unacknowledged events in the log other than the failed commit"
        );
    }
    // G1: handlers saw only events that are durable.
    for id in &seen {
        assert!(
            present.iter().any(|(_, e)| e.id == *id),
            "{target:?} k={k}: a handler saw {id}, which is not in the log"
        );
    }
    // The reopened log takes new events after everything present.
    let r = bus.publish(event(999)).unwrap();
    assert_eq!(r.seq, present.len() as u64 + 1);
    Point {
        ok_after_failure,
        fired: fired.load(Ordering::SeqCst),
        failed: failed.len(),
        durable_despite_error: present.len() - acked.len(),
    }
}

/// What one run saw.
struct Point {
    /// Publishes that succeeded after one had failed.
    ok_after_failure: usize,
    fired: bool,
    /// Events whose publish failed.
    failed: usize,
    /// Of those, events found in the file after reopening.
    durable_despite_error: usize,
}

/// Runs `point` at every countdown `k` (every one up to 40, then every
/// third) until the fault no longer fires within a run (past the last
/// operation of its kind); `point` says whether it fired. Returns the
/// number of points and the last `k`.
fn each_point(mut point: impl FnMut(u64) -> bool) -> (usize, u64) {
    let (mut k, mut not_fired, mut points) = (0, 0, 0);
    while not_fired < 2 {
        not_fired = if point(k) { 0 } else { not_fired + 1 };
        points += 1;
        k += if k < 40 { 1 } else { 3 };
        assert!(k < 2000, "the sweep does not end");
    }
    (points, k)
}

fn sweep(target: Target, once: bool) {
    count_panics();
    let (mut with_errors, mut durable_despite_error) = (0, 0);
    let mut ok_after_failure = 0;
    let (points, k) = each_point(|k| {
        let p = run_point(target, k, once);
        with_errors += usize::from(p.failed > 0);
        durable_despite_error += p.durable_despite_error;
        ok_after_failure += p.ok_after_failure;
        p.fired
    });
    eprintln!(
        "{target:?} once={once}: {points} points up to k={k}, {with_errors} with failed \
         publishes, {durable_despite_error} failed events durable after all, \
         {ok_after_failure} publishes succeeded after a failure"
    );
    // The fault must have made publishes fail somewhere, or the sweep tested
    // nothing.
    assert!(with_errors > 0, "no publish ever failed");
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "something panicked");
}

#[test]
fn failing_writes() {
    sweep(Target::Write, false);
}

#[test]
fn torn_writes() {
    sweep(Target::TornWrite, false);
}

#[test]
fn failing_fsyncs() {
    sweep(Target::Sync, false);
}

#[test]
fn transient_write_fault() {
    sweep(Target::Write, true);
}

#[test]
fn transient_fsync_fault() {
    sweep(Target::Sync, true);
}

/// A fault while opening is an error, never a panic, and leaves the file
/// reopenable at its last durable state.
#[test]
fn fault_during_open() {
    count_panics();
    for target in [Target::Write, Target::Sync] {
        for k in 0..12 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("log.redb");
            let first = event(0);
            {
                let bus = DurableBus::open(&path).unwrap();
                bus.publish(first.clone()).unwrap();
            }
            let countdown = Arc::new(AtomicU64::new(k));
            let be = backend(&path, target, &countdown, false);
            if let Ok(bus) = DurableBus::builder().open_backend(be) {
                let _ = bus.publish(event(1));
            }
            let bus = DurableBus::open(&path).unwrap();
            assert!(bus.check(&mut |_, _| {}).unwrap().is_sound());
            let all = read_all(&bus);
            assert_eq!(all[0], (1, first), "{target:?} k={k}");
            assert!(all.len() <= 2, "{target:?} k={k}");
        }
    }
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "something panicked");
}

/// One run under the WAL: the applier's redb commits reach the faulty
/// backend, whose countdown starts at `k`; every publish is followed by
/// `stats`, which makes the applier commit, and a read. Returns whether
/// the fault fired and how many publishes failed.
fn run_wal_point(target: Target, k: u64) -> (bool, usize) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.redb");
    let mut acked = base_log(&path);
    let countdown = Arc::new(AtomicU64::new(u64::MAX));
    let be = backend(&path, target, &countdown, false);
    let fired = be.hook.fired.clone();
    let bus = DurableBus::builder()
        .open_backend_with_wal(&path, be)
        .expect("open with the fault disabled");
    let seen: Arc<Mutex<Vec<EventId>>> = Arc::default();
    let sub = bus.subscribe(Filter::all(), recorder(&seen)).unwrap();
    countdown.store(k, Ordering::SeqCst);
    let mut failed = 0;
    for i in BASE..BASE + ATTEMPTS {
        let ctx = format!("WAL {target:?} k={k} publish {i}");
        let e = event(i);
        match bus.publish(e.clone()) {
            Ok(r) => {
                assert_eq!(failed, 0, "{ctx}: a publish succeeded after a failed apply");
                acked.push((r.seq, e));
            }
            Err(ctrlbus::PublishError::Storage(_)) => failed += 1,
            Err(e) => panic!("{ctx}: unexpected error {e}"),
        }
        // The apply (failing once the fault fires).
        let _ = bus.stats();
        // Whatever the bus still reads is an acknowledged event, whole.
        if let Ok(reader) = bus.read(Position::Beginning, &Filter::all()) {
            for entry in reader {
                let Ok(entry) = entry else { break };
                let want = acked.iter().find(|(s, _)| *s == entry.seq);
                assert_eq!(want.map(|w| &w.1), Some(&entry.event), "{ctx}");
            }
        }
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    drop(sub);
    drop(bus);

    // Reopen normally: the WAL gives back what redb did not get.
    let bus = DurableBus::open(&path).unwrap_or_else(|e| panic!("WAL {target:?} k={k}: {e}"));
    let report = bus.check(&mut |_, _| {}).unwrap();
    assert!(
        report.is_sound(),
        "WAL {target:?} k={k}: {:?}",
        report.problems
    );
    let present = read_all(&bus);
    assert_eq!(
        present, acked,
        "WAL {target:?} k={k}: the log is exactly the acknowledged events"
    );
    // Handlers saw exactly the acknowledged events (all durable in the WAL).
    let want: Vec<EventId> = acked[BASE..].iter().map(|a| a.1.id).collect();
    assert_eq!(seen, want, "WAL {target:?} k={k}: what handlers saw");
    let r = bus.publish(event(999)).unwrap();
    assert_eq!(r.seq, acked.len() as u64 + 1);
    (fired.load(Ordering::SeqCst), failed)
}

#[test]
fn applier_failures_under_the_wal() {
    count_panics();
    for target in [Target::Write, Target::TornWrite, Target::Sync] {
        let mut with_errors = 0;
        let (points, k) = each_point(|k| {
            let (fired, failed) = run_wal_point(target, k);
            with_errors += usize::from(failed > 0);
            fired
        });
        eprintln!(
            "WAL {target:?}: {points} points up to k={k}, {with_errors} with failed publishes"
        );
        assert!(with_errors > 0, "WAL {target:?}: no publish ever failed");
    }
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "something panicked");
}

/// Fails the `n`-th read of the file (from 0), once; counts reads.
#[derive(Debug)]
struct FailNthRead {
    n: u64,
    reads: Arc<AtomicU64>,
}

impl Hook for FailNthRead {
    fn before(&self, op: Op, _: &FileBackend, _: u64, _: &[u8]) -> Option<std::io::Result<()>> {
        if op != Op::Read {
            return None;
        }
        (self.reads.fetch_add(1, Ordering::SeqCst) == self.n).then(|| Err(injected()))
    }
}

#[test]
fn a_read_failing_while_opening_never_skips_the_duplicate_check() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.redb");
    let events: Vec<Event> = (0..50)
        .map(|_| Event::new(Type::DEPLOY_STARTED, "acme"))
        .collect();
    {
        let bus = DurableBus::open(&path).unwrap();
        bus.publish_batch(events.clone()).unwrap();
    }
    // How many reads opening takes (from a cold cache), then each of them
    // failing in turn: the open either fails, or the log it opens still
    // knows every id it holds (the largest id, read at open, lets fresh ids
    // skip the index; not knowing it must mean checking every id). With
    // redb 4.6 a failed read also poisons the file's later commits
    // ("Previous I/O error"), so this passes on code that skipped the check
    // too: it guards the outcome, and `Core::new` the cause.
    let open = |n: u64| {
        let reads = Arc::new(AtomicU64::new(0));
        let bus = DurableBus::builder()
            .cache_bytes(0)
            .open_backend(Hooked::open(
                &path,
                FailNthRead {
                    n,
                    reads: reads.clone(),
                },
            ));
        (bus, reads.load(Ordering::SeqCst))
    };
    let (bus, reads) = open(u64::MAX);
    drop(bus.unwrap());
    assert!(reads > 0);
    let mut opened = 0;
    for n in 0..reads {
        let (bus, _) = open(n);
        let Ok(bus) = bus else { continue };
        opened += 1;
        for e in [&events[0], &events[49]] {
            if let Ok(r) = bus.publish(e.clone()) {
                assert!(
                    r.duplicate,
                    "read {n} of the open failed, and an id already in the log was written again at seq {}",
                    r.seq
                );
            }
        }
        assert_eq!(bus.last_seq(), 50, "read {n}: nothing new written");
    }
    assert!(opened > 0, "some failed read is survived");
}
