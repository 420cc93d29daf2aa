//! The write-ahead log is never silently skipped (G2, G3, G10): a log killed
//! with frames the file does not hold yet is recovered whatever the options
//! of the next open, a missing or stale WAL is refused unless its loss is
//! accepted, an out-of-sequence frame ends the log with a warning, and
//! `check` reports frames waiting in the WAL. The WAL restarts at exactly
//! its restart size, and a WAL cut inside the frames a restart carried
//! keeps what precedes the cut.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ctrlbus::{Bus, DurableBus, Event, EventId, OpenError, PublishError, ReadOnlyLog, Type};

const CHILD: &str = "CTRLBUS_WAL_CHILD";

/// The child: publishes `n` events with applies held off for an hour,
/// prints their ids, then waits to be killed: the WAL holds them, the redb
/// file does not. With a third part, `carry`, it publishes
/// `carry_scenario`'s events instead, leaving a WAL that carries frames.
#[test]
fn wal_child() {
    let Ok(spec) = std::env::var(CHILD) else {
        return;
    };
    let mut spec = spec.split('|');
    let (path, n) = (spec.next().unwrap(), spec.next().unwrap());
    let builder = DurableBus::builder().apply_interval(Duration::from_secs(3600));
    let mut out = std::io::stdout().lock();
    // The bus stays open until the kill.
    let _bus = match spec.next() {
        None => {
            let bus = builder.open(path).unwrap();
            for _ in 0..n.parse::<usize>().unwrap() {
                let r = bus
                    .publish(Event::new(Type::DEPLOY_STARTED, "acme"))
                    .unwrap();
                writeln!(out, "{} {}", r.seq, r.id).unwrap();
            }
            bus
        }
        #[cfg(feature = "fuzzing")]
        Some("carry") => {
            let bus = builder.wal_restart_after(16 << 10).open(path).unwrap();
            for r in carry_scenario(&bus) {
                writeln!(out, "{} {}", r.seq, r.id).unwrap();
            }
            bus
        }
        Some(other) => panic!("unknown child scenario {other}"),
    };
    writeln!(out, "ready").unwrap();
    out.flush().unwrap();
    std::thread::sleep(Duration::from_secs(600));
}

/// Publishes `n` events (after any already there) in a child killed with
/// SIGKILL once they are acknowledged; their `(seq, id)`s.
fn killed_with_frames_pending(path: &Path, n: usize) -> Vec<(u64, EventId)> {
    let mut child = common::spawn_self("wal_child", (CHILD, format!("{}|{n}", path.display())));
    let acked = common::receipts_until_ready(&mut child);
    assert_eq!(acked.len(), n, "the child did not acknowledge every event");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    acked
}

/// Repairs the redb file after the kill the way any redb writer would,
/// without ctrlbus (so without replaying the WAL): the state a failed
/// recovery leaves, where a read-only open works and the WAL still holds
/// acknowledged events.
fn repair_file_only(path: &Path) {
    drop(
        redb::Database::builder()
            .set_concurrency_mode(redb::ConcurrencyMode::SingleWriter)
            .open(path)
            .unwrap(),
    );
}

fn scratch() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.redb");
    (dir, path)
}

fn wal_of(path: &Path) -> PathBuf {
    PathBuf::from(format!("{}.wal", path.display()))
}

/// Every `(seq, id)` in the log, in order.
fn contents(bus: &DurableBus) -> Vec<(u64, EventId)> {
    common::seq_ids(bus)
}

#[test]
fn the_file_alone_misses_the_events_the_test_relies_on() {
    // The harness itself: the child's events are in the WAL only.
    let (_dir, path) = scratch();
    let acked = killed_with_frames_pending(&path, 5);
    assert_eq!(acked.len(), 5);
    repair_file_only(&path);
    let log = ReadOnlyLog::open(&path).unwrap();
    assert_eq!(log.stats().unwrap().events, 0, "applied before the kill");
}

#[test]
fn opening_without_the_wal_still_recovers_it_first() {
    let (_dir, path) = scratch();
    let acked = killed_with_frames_pending(&path, 5);
    let bus = DurableBus::builder()
        .write_ahead_log(false)
        .open(&path)
        .unwrap();
    assert_eq!(contents(&bus), acked, "every acknowledged event, same seq");
    // New events continue the order, reusing nothing.
    let next = bus
        .publish(Event::new(Type::DEPLOY_STARTED, "acme"))
        .unwrap();
    assert_eq!(next.seq, 6);
    drop(bus);
    // A later open with the WAL replays no stale frame on top.
    let bus = DurableBus::open(&path).unwrap();
    let all = contents(&bus);
    assert_eq!(all.len(), 6);
    assert_eq!(&all[..5], &acked[..]);
    assert_eq!(all[5], (6, next.id));
    assert!(bus.check(&mut |_, _| {}).unwrap().is_sound());
}

#[test]
fn a_wal_deleted_after_a_crash_is_refused_unless_the_loss_is_accepted() {
    let (_dir, path) = scratch();
    let acked = killed_with_frames_pending(&path, 3);
    std::fs::remove_file(wal_of(&path)).unwrap();
    for wal in [true, false] {
        let err = DurableBus::builder()
            .write_ahead_log(wal)
            .open(&path)
            .unwrap_err();
        assert!(
            matches!(&err, OpenError::WalMissing { reason, .. } if reason.contains("missing")),
            "{err}"
        );
        assert!(err.to_string().contains("--accept-wal-loss"), "{err}");
    }
    // A truncated WAL (its header gone) is not a WAL: refused too.
    std::fs::write(wal_of(&path), b"").unwrap();
    assert!(matches!(
        DurableBus::open(&path),
        Err(OpenError::WalMissing { .. })
    ));
    let bus = DurableBus::builder()
        .accept_wal_loss(true)
        .open(&path)
        .unwrap();
    assert!(contents(&bus).is_empty(), "the loss, as accepted");
    let r = bus
        .publish(Event::new(Type::DEPLOY_STARTED, "acme"))
        .unwrap();
    assert_eq!(r.seq, acked[0].0, "the lost seqs are reused, as documented");
    drop(bus);
    // Accepted once: opens normally from then on.
    DurableBus::open(&path).unwrap();
}

#[test]
fn a_stale_or_foreign_wal_is_refused_after_a_crash() {
    let (dir, path) = scratch();
    // An older copy of this log's WAL, taken before more was published.
    {
        let bus = DurableBus::open(&path).unwrap();
        bus.publish(Event::new(Type::DEPLOY_STARTED, "acme"))
            .unwrap();
    }
    let old_copy = dir.path().join("old.wal");
    std::fs::copy(wal_of(&path), &old_copy).unwrap();
    let acked = killed_with_frames_pending(&path, 3);
    std::fs::copy(&old_copy, wal_of(&path)).unwrap();
    let err = DurableBus::open(&path).unwrap_err();
    assert!(
        matches!(&err, OpenError::WalMissing { reason, .. } if reason.contains("older copy")),
        "{err}"
    );
    // Accepting the loss of an older copy opens the log as its file holds
    // it, sound. (The copy here has no frames the file lacks; that none of
    // a copy's frames are replayed is not shown by this test.)
    {
        let scratch = dir.path().join("accepted.redb");
        std::fs::copy(&path, &scratch).unwrap();
        std::fs::copy(&old_copy, format!("{}.wal", scratch.display())).unwrap();
        let bus = DurableBus::builder()
            .accept_wal_loss(true)
            .open(&scratch)
            .unwrap();
        let seqs: Vec<u64> = contents(&bus).into_iter().map(|(s, _)| s).collect();
        assert_eq!(seqs, vec![1], "the file's event, nothing from the copy");
        assert!(bus.check(&mut |_, _| {}).unwrap().is_sound());
    }
    // Another log's WAL.
    let (_other_dir, other) = scratch();
    DurableBus::open(&other).unwrap();
    std::fs::copy(wal_of(&other), wal_of(&path)).unwrap();
    let err = DurableBus::open(&path).unwrap_err();
    assert!(
        matches!(&err, OpenError::WalMissing { reason, .. } if reason.contains("another log")),
        "{err}"
    );
    assert_eq!(acked.len(), 3);
}

#[test]
fn a_wal_deleted_after_a_clean_close_loses_nothing() {
    let (_dir, path) = scratch();
    let ids: Vec<_> = {
        let bus = DurableBus::open(&path).unwrap();
        (0..3)
            .map(|_| {
                bus.publish(Event::new(Type::DEPLOY_STARTED, "acme"))
                    .unwrap()
                    .id
            })
            .collect()
    };
    std::fs::remove_file(wal_of(&path)).unwrap();
    let bus = DurableBus::open(&path).unwrap();
    let got: Vec<_> = contents(&bus).into_iter().map(|(_, id)| id).collect();
    assert_eq!(got, ids);
}

/// Byte offset of the frame holding `seq` in a WAL whose frames each hold
/// one record; frames are `[magic][generation][len][crc]` + payload.
fn frame_offsets(wal: &[u8]) -> Vec<usize> {
    let mut at = 4096;
    let mut out = Vec::new();
    while at + 20 <= wal.len() && wal[at..at + 4] == 0xC7B0_5E01u32.to_le_bytes() {
        out.push(at);
        let len = u32::from_le_bytes(wal[at + 12..at + 16].try_into().unwrap()) as usize;
        at += 20 + len;
    }
    out
}

#[test]
fn an_out_of_sequence_frame_ends_the_log_with_a_warning() {
    let (_dir, path) = scratch();
    let acked = killed_with_frames_pending(&path, 4);
    // Rewrite frame 3's first seq (3 → 9), with a valid CRC: not a torn
    // write, but no longer in sequence.
    let wal_path = wal_of(&path);
    let mut wal = std::fs::read(&wal_path).unwrap();
    let offsets = frame_offsets(&wal);
    assert_eq!(offsets.len(), 4, "one frame per publish");
    let at = offsets[2];
    wal[at + 20..at + 28].copy_from_slice(&9u64.to_le_bytes());
    let len = u32::from_le_bytes(wal[at + 12..at + 16].try_into().unwrap()) as usize;
    let mut h = crc32fast::Hasher::new();
    h.update(&wal[at + 4..at + 12]);
    h.update(&(len as u32).to_le_bytes());
    h.update(&wal[at + 20..at + 20 + len]);
    wal[at + 16..at + 20].copy_from_slice(&h.finalize().to_le_bytes());
    std::fs::write(&wal_path, &wal).unwrap();

    // check (read-only) reports what waits in the WAL.
    repair_file_only(&path);
    let report = ReadOnlyLog::open(&path).unwrap().check().unwrap();
    assert_eq!(report.wal_pending_events, 2, "{report:?}");
    assert!(!report.is_sound());
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("write-ahead log") && p.contains("seq 1-2")),
        "{:?}",
        report.problems
    );

    let bus = DurableBus::open(&path).unwrap();
    assert_eq!(contents(&bus), acked[..2].to_vec(), "up to the bad frame");
    let r = bus
        .publish(Event::new(Type::DEPLOY_STARTED, "acme"))
        .unwrap();
    assert_eq!(r.seq, 3);
    let report = bus.check(&mut |_, _| {}).unwrap();
    assert!(report.is_sound(), "{report:?}");
    assert_eq!(report.wal_pending_events, 0);
}

#[test]
fn check_reports_frames_waiting_in_the_wal_after_a_crash() {
    let (_dir, path) = scratch();
    killed_with_frames_pending(&path, 3);
    repair_file_only(&path);
    let report = ReadOnlyLog::open(&path).unwrap().check().unwrap();
    assert_eq!(report.wal_pending_events, 3);
    assert!(!report.is_sound(), "{report:?}");
    // Recovered by the next writable open.
    drop(DurableBus::open(&path).unwrap());
    let report = ReadOnlyLog::open(&path).unwrap().check().unwrap();
    assert_eq!(report.wal_pending_events, 0);
    assert!(report.is_sound(), "{report:?}");
    assert_eq!(report.events_checked, 3);
}

#[test]
fn a_batch_at_its_byte_limit_is_taken_and_one_byte_past_is_refused_whole() {
    let (_dir, path) = scratch();
    let batch = || -> Vec<Event> {
        (0..3)
            .map(|i| Event::new(Type::DEPLOY_STARTED, "acme").with_payload_value("i", i))
            .collect()
    };
    let size = {
        let bus = DurableBus::builder()
            .max_batch_bytes(1)
            .open(&path)
            .unwrap();
        match bus.publish_batch(batch()) {
            Err(PublishError::BatchTooLarge { limit: 1, size }) => size,
            other => panic!("{other:?}"),
        }
    };
    let bus = DurableBus::builder()
        .max_batch_bytes(size - 1)
        .open(&path)
        .unwrap();
    let err = bus.publish_batch(batch()).unwrap_err();
    assert!(err.to_string().contains("split it"), "{err}");
    assert_eq!(bus.last_seq(), 0, "nothing written");
    drop(bus);
    let bus = DurableBus::builder()
        .max_batch_bytes(size)
        .open(&path)
        .unwrap();
    assert_eq!(bus.publish_batch(batch()).unwrap().len(), 3);
    // Single publishes count one by one: they group below the limit.
    for _ in 0..10 {
        bus.publish(Event::new(Type::DEPLOY_STARTED, "acme"))
            .unwrap();
    }
    assert_eq!(bus.last_seq(), 13);
}

/// Restarts that carry unapplied frames (the WAL restarting every 16 KiB,
/// applies every 2 ms, four publishing threads) lose, reorder and repeat
/// nothing, with sync on and off, and with a webhook whose dispatch keeps
/// the events of each group: every acknowledged event is read back in `seq`
/// order while the log runs and after a reopen, and the WAL stayed small.
/// The WAL's header is sampled meanwhile: a version-2 header (a carry) must
/// have been seen, or the test proved nothing.
#[cfg(feature = "fuzzing")]
#[test]
fn restarts_that_carry_frames_lose_nothing_with_sync_on_and_off_and_a_webhook() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    for (sync, webhook) in [(true, false), (false, false), (true, true), (false, true)] {
        let (_dir, path) = scratch();
        let open = || {
            DurableBus::builder()
                .sync(sync)
                .wal_restart_after(16 << 10)
                .apply_interval(Duration::from_millis(2))
                .open(&path)
                .unwrap()
        };
        let bus = open();
        if webhook {
            bus.webhooks()
                .allow_private_targets(true)
                .create(ctrlbus::NewWebhook {
                    tenant_id: "acme".into(),
                    url: "http://127.0.0.1:9/hook".into(),
                    events: vec![],
                    secret: None,
                })
                .unwrap();
        }
        let wal = wal_of(&path);
        let done = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (wal, done) = (wal.clone(), done.clone());
            std::thread::spawn(move || {
                let (mut carried, mut largest) = (false, 0);
                // The header's version and the file's length only: reading
                // the whole file this often took a core from the tests
                // running beside this one.
                let mut head = [0u8; 12];
                while !done.load(Ordering::Relaxed) {
                    if let Ok(mut f) = std::fs::File::open(&wal)
                        && std::io::Read::read_exact(&mut f, &mut head).is_ok()
                    {
                        carried |= head[8..12] == 2u32.to_le_bytes();
                        largest = largest.max(f.metadata().map_or(0, |m| m.len()));
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                (carried, largest)
            })
        };
        let acked = Arc::new(Mutex::new(Vec::new()));
        let payload = "p".repeat(1500);
        std::thread::scope(|s| {
            for t in 0..4 {
                let (bus, acked, payload) = (&bus, &acked, &payload);
                s.spawn(move || {
                    for i in 0..500u64 {
                        let event = || {
                            Event::new(Type::DEPLOY_STARTED, "acme")
                                .with_payload_value("p", payload.as_str())
                        };
                        let receipts = if t == 3 && i % 5 == 0 {
                            bus.publish_batch(vec![event(), event(), event()]).unwrap()
                        } else {
                            vec![bus.publish(event()).unwrap()]
                        };
                        let mut acked = acked.lock().unwrap();
                        acked.extend(receipts.iter().map(|r| (r.seq, r.id)));
                    }
                });
            }
        });
        done.store(true, Ordering::Relaxed);
        let (carried, largest) = sampler.join().unwrap();
        let mut want = acked.lock().unwrap().clone();
        want.sort_unstable();
        let seqs: Vec<u64> = want.iter().map(|a| a.0).collect();
        assert_eq!(
            seqs,
            (1..=want.len() as u64).collect::<Vec<_>>(),
            "sync {sync}, webhook {webhook}: seqs with a gap or a repeat"
        );
        assert_eq!(
            contents(&bus),
            want,
            "sync {sync}, webhook {webhook}: while open"
        );
        drop(bus);
        assert_eq!(
            contents(&open()),
            want,
            "sync {sync}, webhook {webhook}: after a reopen"
        );
        assert!(
            carried,
            "sync {sync}, webhook {webhook}: no restart carried frames"
        );
        // ~3.5 MB of frames went through a WAL that never grew past its
        // header and first megabyte of zeros.
        assert!(
            largest <= 4096 + (1 << 20),
            "sync {sync}, webhook {webhook}: the WAL grew to {largest} bytes"
        );
    }
}

/// The header of a WAL: (version, generation, where carried frames start).
#[cfg(feature = "fuzzing")]
fn wal_header(wal: &[u8]) -> (u32, u64, Option<u64>) {
    let word = |at: usize| u64::from_le_bytes(wal[at..at + 8].try_into().unwrap());
    let version = u32::from_le_bytes(wal[8..12].try_into().unwrap());
    (version, word(12), (version == 2).then(|| word(36)))
}

/// The first seq of the frame at `at` (see `frame_offsets`), and where it ends.
#[cfg(feature = "fuzzing")]
fn frame_at(wal: &[u8], at: usize) -> (u64, usize) {
    assert_eq!(
        wal[at..at + 4],
        0xC7B0_5E01u32.to_le_bytes(),
        "no frame at {at}"
    );
    let len = u32::from_le_bytes(wal[at + 12..at + 16].try_into().unwrap()) as usize;
    let seq = u64::from_le_bytes(wal[at + 20..at + 28].try_into().unwrap());
    (seq, at + 20 + len)
}

/// With the WAL restarting at 16 KiB and applies held off: seqs 1-3 of
/// ~3 KB each, applied (`stats` waits for the applier); 4-6 of ~3 KB, which
/// take the WAL past 16 KiB; then 7 and 8, small, written by a new
/// generation below the carried frames of 4-6.
#[cfg(feature = "fuzzing")]
fn carry_scenario(bus: &DurableBus) -> Vec<ctrlbus::Receipt> {
    let big = || Event::new(Type::DEPLOY_STARTED, "acme").with_payload_value("p", "x".repeat(3000));
    let mut acked = Vec::new();
    for _ in 0..3 {
        acked.push(bus.publish(big()).unwrap());
    }
    assert_eq!(bus.stats().unwrap().events, 3);
    for _ in 0..3 {
        acked.push(bus.publish(big()).unwrap());
    }
    for _ in 0..2 {
        acked.push(
            bus.publish(Event::new(Type::DEPLOY_STARTED, "acme"))
                .unwrap(),
        );
    }
    acked
}

/// A WAL cut inside the frames it carries (damage: those frames were
/// acknowledged and synced before the restart) keeps what comes before
/// the cut: the carried frames up to it are replayed, and the new
/// generation's frames, now out of sequence, end the log with a warning,
/// as any out-of-sequence frame does. The log is sound and goes on from
/// the last event kept. Cut at the carry's start, nothing carried is kept.
#[cfg(feature = "fuzzing")]
#[test]
fn a_wal_cut_inside_its_carried_frames_keeps_what_precedes_the_cut() {
    for cut_inside_the_second in [true, false] {
        let (_dir, path) = scratch();
        let mut child =
            common::spawn_self("wal_child", (CHILD, format!("{}|8|carry", path.display())));
        let acked = common::receipts_until_ready(&mut child);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert_eq!(acked.len(), 8);
        let wal_path = wal_of(&path);
        let wal = std::fs::read(&wal_path).unwrap();
        // The scenario happened: a carry of seqs 4-6, frames 7 and 8
        // below it.
        let (version, _, carry) = wal_header(&wal);
        assert_eq!(version, 2, "the WAL is not carrying");
        let carry = carry.unwrap() as usize;
        let (first, end) = frame_at(&wal, carry);
        assert_eq!(first, 4, "the carry starts at seq 4");
        assert_eq!(frame_at(&wal, end).0, 5);
        let own: Vec<u64> = frame_offsets(&wal)
            .iter()
            .map(|&at| frame_at(&wal, at).0)
            .collect();
        assert_eq!(own, vec![7, 8], "the new generation's frames");

        let (cut, kept) = if cut_inside_the_second {
            (end + 100, 4)
        } else {
            (carry, 3)
        };
        std::fs::OpenOptions::new()
            .write(true)
            .open(&wal_path)
            .unwrap()
            .set_len(cut as u64)
            .unwrap();
        let bus = DurableBus::open(&path).unwrap();
        assert_eq!(contents(&bus), acked[..kept].to_vec(), "cut at {cut}");
        assert!(bus.check(&mut |_, _| {}).unwrap().is_sound());
        let next = bus
            .publish(Event::new(Type::DEPLOY_STARTED, "acme"))
            .unwrap();
        assert_eq!(next.seq, kept as u64 + 1);
        drop(bus);
        let bus = DurableBus::open(&path).unwrap();
        assert_eq!(contents(&bus).len(), kept + 1, "nothing replayed twice");
    }
}

/// The WAL restarts before the group that finds it holding at least its
/// restart size: at exactly the size (the first frame's length) the second
/// publish starts a new generation at the WAL's start; one byte more and it
/// follows the first frame. Both with sync on and off, and both read back.
#[cfg(feature = "fuzzing")]
#[test]
fn the_wal_restarts_at_its_restart_size_and_not_one_byte_before() {
    let open = |path: &Path, sync: bool, restart: u64| {
        DurableBus::builder()
            .sync(sync)
            .wal_restart_after(restart)
            .apply_interval(Duration::from_secs(3600))
            .open(path)
            .unwrap()
    };
    let event =
        || Event::new(Type::DEPLOY_STARTED, "acme").with_payload_value("p", "x".repeat(500));
    // The first frame's length, from a probe.
    let frame = {
        let (_dir, path) = scratch();
        let bus = open(&path, true, 16 << 20);
        bus.publish(event()).unwrap();
        let wal = std::fs::read(wal_of(&path)).unwrap();
        let (seq, end) = frame_at(&wal, 4096);
        assert_eq!(seq, 1);
        (end - 4096) as u64
    };
    for sync in [true, false] {
        for (restart, restarts) in [(frame, true), (frame + 1, false)] {
            let (_dir, path) = scratch();
            let bus = open(&path, sync, restart);
            let first = bus.publish(event()).unwrap();
            let wal = std::fs::read(wal_of(&path)).unwrap();
            let (_, generation, _) = wal_header(&wal);
            assert_eq!(
                frame_at(&wal, 4096),
                (1, 4096 + frame as usize),
                "sync {sync}"
            );
            let second = bus.publish(event()).unwrap();
            let wal = std::fs::read(wal_of(&path)).unwrap();
            let (_, now, _) = wal_header(&wal);
            let what = format!("sync {sync}, restart at {restart} bytes, a frame of {frame}");
            if restarts {
                assert_eq!(now, generation + 1, "{what}: no restart");
                assert_eq!(frame_at(&wal, 4096).0, 2, "{what}");
            } else {
                assert_eq!(now, generation, "{what}: restarted");
                assert_eq!(frame_at(&wal, 4096 + frame as usize).0, 2, "{what}");
            }
            drop(bus);
            let bus = open(&path, sync, restart);
            assert_eq!(
                contents(&bus),
                vec![(1, first.id), (2, second.id)],
                "{what}"
            );
        }
    }
}
