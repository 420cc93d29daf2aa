//! Bad input (G10) and the edges of the durable log's API: invalid events,
//! cursor names and positions, corrupted records, foreign and newer files,
//! a second writer, a reader beside the writer, dead letters and retention.

mod common;
use common::recorder;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ctrlbus::{
    Bus, CursorError, DurableBus, Event, EventError, EventId, Filter, HandlerError, OpenError,
    Position, PublishError, ReadError, ReadOnlyLog, Retention, StorageError, SubscribeError, Type,
};

fn quick() -> ctrlbus::DurableBusBuilder {
    DurableBus::builder().sync(false)
}

fn all(bus: &DurableBus) -> Vec<(u64, Event)> {
    bus.read(Position::Beginning, &Filter::all())
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.seq, e.event)
        })
        .collect()
}

fn noop() -> impl Fn(&Event) -> Result<(), HandlerError> + Send + Sync + 'static {
    |_: &Event| Ok(())
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn invalid_events_are_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let bus = quick()
        .max_payload_bytes(100)
        .open(dir.path().join("log.redb"))
        .unwrap();
    bus.publish(Event::new(Type::DEPLOY_STARTED, "t")).unwrap();
    let before = all(&bus);

    let big = Event::new(Type::DEPLOY_STARTED, "t").with_payload_value("x", "y".repeat(200));
    match bus.publish(big.clone()) {
        Err(PublishError::Invalid(EventError::PayloadTooLarge { limit: 100 })) => {}
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    // One bad event refuses the whole batch.
    let good = Event::new(Type::DEPLOY_STARTED, "t");
    assert!(matches!(
        bus.publish_batch(vec![good.clone(), big]),
        Err(PublishError::Invalid(EventError::PayloadTooLarge { .. }))
    ));
    // The same id twice in one batch.
    assert!(matches!(
        bus.publish_batch(vec![good.clone(), good.clone()]),
        Err(PublishError::DuplicateInBatch(id)) if id == good.id
    ));
    // An invalid type cannot be built; from JSON it is refused by name.
    assert!(Type::new("Deploy Started").is_err());
    assert!(Type::new("").is_err());
    assert!(Type::new("x".repeat(129)).is_err());
    let json = format!(
        r#"{{"id":"{}","type":"Bad Type!","tenant_id":"t","timestamp":"2024-01-01T00:00:00Z"}}"#,
        EventId::new()
    );
    assert!(matches!(
        Event::from_json(json.as_bytes()),
        Err(EventError::Type(_))
    ));
    assert!(serde_json::from_str::<Event>(&json).is_err());
    let no_ts = format!(r#"{{"id":"{}","type":"deploy.started"}}"#, EventId::new());
    assert!(matches!(
        Event::from_json(no_ts.as_bytes()),
        Err(EventError::MissingField("timestamp"))
    ));
    let bad_id = r#"{"id":"evt_nope","type":"deploy.started","timestamp":"2024-01-01T00:00:00Z"}"#;
    assert!(matches!(
        Event::from_json(bad_id.as_bytes()),
        Err(EventError::Id(_))
    ));
    let payload_array = format!(
        r#"{{"id":"{}","type":"deploy.started","payload":[1],"timestamp":"2024-01-01T00:00:00Z"}}"#,
        EventId::new()
    );
    assert!(matches!(
        Event::from_json(payload_array.as_bytes()),
        Err(EventError::PayloadNotObject)
    ));

    assert_eq!(all(&bus), before, "the log changed");
    assert_eq!(bus.last_seq(), 1);
    // Publishing still works, with the next seq.
    assert_eq!(bus.publish(good).unwrap().seq, 2);
}

#[test]
fn cursor_names_and_positions() {
    let dir = tempfile::tempdir().unwrap();
    let bus = quick().open(dir.path().join("log.redb")).unwrap();
    bus.publish(Event::new(Type::DEPLOY_STARTED, "t")).unwrap();
    let long = "a".repeat(129);
    for bad in [
        "",
        long.as_str(),
        "has space",
        "a/b",
        "ünï",
        "tab\t",
        "semi;colon",
    ] {
        assert!(
            matches!(
                bus.subscribe_durable(bad, Filter::all(), Position::Beginning, noop()),
                Err(SubscribeError::InvalidName(_))
            ),
            "subscribe {bad:?}"
        );
        assert!(
            matches!(
                bus.seek(bad, Position::Beginning),
                Err(CursorError::InvalidName(_))
            ),
            "seek {bad:?}"
        );
        assert!(
            matches!(bus.delete_cursor(bad), Err(CursorError::InvalidName(_))),
            "delete {bad:?}"
        );
        assert!(
            matches!(
                bus.cursor(bad),
                Err(CursorError::InvalidName(_) | CursorError::Unknown(_))
            ),
            "cursor {bad:?}"
        );
    }
    assert!(
        bus.cursors().unwrap().is_empty(),
        "a refused name left a cursor"
    );
    // The longest valid name.
    let max = "A-z_0.9".repeat(19)[..128].to_owned();
    drop(
        bus.subscribe_durable(&max, Filter::all(), Position::End, noop())
            .unwrap(),
    );
    assert_eq!(bus.cursor(&max).unwrap().delivered_seq, 1);

    // Unknown cursors.
    assert!(matches!(bus.cursor("nobody"), Err(CursorError::Unknown(n)) if n == "nobody"));
    assert!(matches!(
        bus.seek("nobody", Position::Beginning),
        Err(CursorError::Unknown(_))
    ));
    assert!(matches!(
        bus.delete_cursor("nobody"),
        Err(CursorError::Unknown(_))
    ));

    // Unknown event ids as positions.
    let ghost = EventId::new();
    assert!(matches!(
        bus.read(Position::Id(ghost), &Filter::all()),
        Err(ReadError::UnknownEvent(id)) if id == ghost
    ));
    assert!(matches!(
        bus.seek(&max, Position::Id(ghost)),
        Err(CursorError::UnknownEvent(id)) if id == ghost
    ));
    assert!(matches!(
        bus.subscribe_durable("fresh", Filter::all(), Position::Id(ghost), noop()),
        Err(SubscribeError::UnknownPosition(_))
    ));
    assert!(
        bus.cursor("fresh").is_err(),
        "a refused subscribe stored a cursor"
    );
    assert_eq!(
        bus.cursor(&max).unwrap().delivered_seq,
        1,
        "a refused seek moved the cursor"
    );

    // Positions naming an event published just before resolve to it.
    let fresh = bus.publish(Event::new(Type::DEPLOY_STARTED, "t")).unwrap();
    assert_eq!(
        bus.seek(&max, Position::Id(fresh.id)).unwrap().next_seq,
        fresh.seq
    );
    assert_eq!(
        bus.seek(&max, Position::End).unwrap().next_seq,
        fresh.seq + 1
    );
    let fresh = bus.publish(Event::new(Type::DEPLOY_STARTED, "t")).unwrap();
    drop(
        bus.subscribe_durable("at-id", Filter::all(), Position::Id(fresh.id), noop())
            .unwrap(),
    );
    assert_eq!(bus.cursor("at-id").unwrap().next_seq, fresh.seq);
    let fresh = bus.publish(Event::new(Type::DEPLOY_STARTED, "t")).unwrap();
    drop(
        bus.subscribe_durable("at-end", Filter::all(), Position::End, noop())
            .unwrap(),
    );
    assert_eq!(bus.cursor("at-end").unwrap().next_seq, fresh.seq + 1);

    // Seek and delete refuse a running subscription; the same name twice too.
    let sub = bus
        .subscribe_durable("running", Filter::all(), Position::Beginning, noop())
        .unwrap();
    assert!(matches!(
        bus.seek("running", Position::Beginning),
        Err(CursorError::Active(_))
    ));
    assert!(matches!(
        bus.delete_cursor("running"),
        Err(CursorError::Active(_))
    ));
    assert!(matches!(
        bus.subscribe_durable("running", Filter::all(), Position::Beginning, noop()),
        Err(SubscribeError::AlreadyActive(_))
    ));
    drop(sub);
    let c = bus.seek("running", Position::Beginning).unwrap();
    assert_eq!(c.next_seq, 1);
    bus.delete_cursor("running").unwrap();
    assert!(matches!(
        bus.cursor("running"),
        Err(CursorError::Unknown(_))
    ));
}

/// A log at `path` holding four events (seqs 1–4); the events.
fn log_of_four(path: &Path) -> Vec<Event> {
    let events: Vec<Event> = (0..4)
        .map(|i| Event::new(Type::DEPLOY_STARTED, "t").with_payload_value("i", i))
        .collect();
    let bus = quick().open(path).unwrap();
    bus.publish_batch(events.clone()).unwrap();
    events
}

/// Asserts that a read gave the corruption error of the `events` record of
/// seq 3.
fn assert_corrupted_seq_3<T: std::fmt::Debug>(got: Option<Result<T, ReadError>>, what: &str) {
    match got {
        Some(Err(ReadError::Storage(StorageError::Corrupted { table, key, .. }))) => {
            assert_eq!(table, "events", "{what}");
            assert!(
                key.contains('3'),
                "{what}: the error names {key}, not seq 3"
            );
        }
        other => panic!("{what}: expected a corruption error, got {other:?}"),
    }
}

/// Writes `bytes` as the record of `seq` with plain redb.
fn overwrite_record(path: &Path, seq: u64, bytes: &[u8]) {
    common::stored::replace_record(path, seq, bytes);
}

#[test]
fn corrupted_record_is_an_error_naming_its_seq() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.redb");
    let events = log_of_four(&path);
    for (bad, what) in [
        (vec![1u8, 0, 0], "short header"),
        (vec![7u8; 40], "unknown version"),
        (
            {
                let mut v = vec![1u8];
                v.extend_from_slice(&0i64.to_be_bytes());
                v.extend_from_slice(&[0xff; 30]);
                v
            },
            "garbage body",
        ),
    ] {
        overwrite_record(&path, 3, &bad);
        let bus = quick().open(&path).unwrap();
        let mut reader = bus.read(Position::Beginning, &Filter::all()).unwrap();
        assert_eq!(reader.next().unwrap().unwrap().event, events[0], "{what}");
        assert_eq!(reader.next().unwrap().unwrap().event, events[1], "{what}");
        assert_corrupted_seq_3(reader.next(), what);
        assert!(
            reader.next().is_none(),
            "{what}: the reader stops after an error"
        );
        let report = bus.check(&mut |_, _| {}).unwrap();
        assert!(!report.is_sound(), "{what}");
        assert!(
            report.problems.iter().any(|p| p.contains("seq 3")),
            "{what}: {:?}",
            report.problems
        );
        // A filtered read that skips the bad record still reports it: the
        // filter needs the record's fields.
        assert!(
            bus.read(Position::Beginning, &Filter::types(["health.*"]).unwrap())
                .unwrap()
                .any(|r| r.is_err()),
            "{what}"
        );
        // Seeking past it works, and publishing goes on.
        let rest: Vec<_> = bus
            .read(Position::Seq(4), &Filter::all())
            .unwrap()
            .map(|r| r.unwrap().event)
            .collect();
        assert_eq!(rest, vec![events[3].clone()], "{what}");
        assert!(bus.recent_events(10, &Filter::all()).is_err(), "{what}");
        // A durable subscription meeting it dead-letters it with the real
        // reason and goes on (issue 11: before, it retried it forever).
        let seen = Arc::new(AtomicU64::new(0));
        let s2 = seen.clone();
        let sub = bus
            .subscribe_durable(
                "reader",
                Filter::all(),
                Position::Beginning,
                move |_: &Event| -> Result<(), HandlerError> {
                    s2.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                },
            )
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while seen.load(Ordering::SeqCst) < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: stuck on the corrupted record"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(seen.load(Ordering::SeqCst), 3, "{what}: 1, 2 and 4");
        assert_eq!(sub.position(), 4, "{what}");
        assert!(
            sub.last_error().is_some_and(|e| e.contains("seq 3")),
            "{what}"
        );
        let letters = bus.dead_letters("reader").unwrap();
        assert_eq!(letters.len(), 1, "{what}");
        assert_eq!(letters[0].seq, 3, "{what}");
        assert!(
            letters[0].error.contains("can't be decoded"),
            "{what}: {}",
            letters[0].error
        );
        drop(sub);
        bus.delete_cursor("reader").unwrap();
        drop(bus);
        // Reading did not change the record.
        assert_eq!(
            common::stored::record_of(&path, 3).as_deref(),
            Some(bad.as_slice()),
            "{what}"
        );
    }
}

#[test]
fn foreign_files_are_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    // Random bytes.
    let junk = dir.path().join("junk.bin");
    let bytes: Vec<u8> = (0..10_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&junk, &bytes).unwrap();
    assert!(matches!(
        DurableBus::open(&junk),
        Err(OpenError::NotCtrlbus { .. })
    ));
    assert!(matches!(
        ReadOnlyLog::open(&junk),
        Err(OpenError::NotCtrlbus { .. })
    ));
    assert!(matches!(
        DurableBus::compact(&junk),
        Err(OpenError::NotCtrlbus { .. })
    ));
    assert_eq!(std::fs::read(&junk).unwrap(), bytes);

    // A redb database of someone else's.
    let other = dir.path().join("other.redb");
    {
        let db = redb::Database::create(&other).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn
                .open_table(redb::TableDefinition::<&str, u64>::new("inventory"))
                .unwrap();
            t.insert("apples", 3).unwrap();
        }
        txn.commit().unwrap();
    }
    let before = std::fs::read(&other).unwrap();
    match DurableBus::open(&other) {
        Err(OpenError::NotCtrlbus { reason, .. }) => assert!(!reason.is_empty()),
        other => panic!("expected NotCtrlbus, got {other:?}"),
    }
    assert!(matches!(
        ReadOnlyLog::open(&other),
        Err(OpenError::NotCtrlbus { .. })
    ));
    assert!(matches!(
        DurableBus::compact(&other),
        Err(OpenError::NotCtrlbus { .. })
    ));
    assert!(
        std::fs::read(&other).unwrap() == before,
        "opening someone else's redb file modified it"
    );
    let mut wal = other.as_os_str().to_owned();
    wal.push(".wal");
    assert!(
        !Path::new(&wal).exists(),
        "a refused open left a WAL behind"
    );

    // redb's magic followed by garbage.
    let fake = dir.path().join("fake.redb");
    let mut fake_bytes = vec![b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];
    fake_bytes.extend_from_slice(&bytes[..4000]);
    std::fs::write(&fake, &fake_bytes).unwrap();
    assert!(DurableBus::open(&fake).is_err());
    assert_eq!(std::fs::read(&fake).unwrap(), fake_bytes);

    // A missing file for a read-only open.
    assert!(matches!(
        ReadOnlyLog::open(dir.path().join("missing.redb")),
        Err(OpenError::NotFound(_))
    ));
}

#[test]
fn newer_format_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.redb");
    {
        let bus = quick().open(&path).unwrap();
        bus.publish(Event::new(Type::DEPLOY_STARTED, "t")).unwrap();
    }
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn
                .open_table(redb::TableDefinition::<&str, &[u8]>::new("ctrlbus_meta"))
                .unwrap();
            t.insert("format", [99u8].as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    match DurableBus::open(&path) {
        Err(OpenError::NewerFormat {
            found: 99,
            supported,
        }) => assert!(supported < 99),
        other => panic!("expected NewerFormat, got {other:?}"),
    }
    assert!(matches!(
        ReadOnlyLog::open(&path),
        Err(OpenError::NewerFormat { found: 99, .. })
    ));
    assert!(matches!(
        DurableBus::compact(&path),
        Err(OpenError::NewerFormat { .. })
    ));
    assert!(
        std::fs::read(&path).unwrap() == before,
        "opening a newer log modified it"
    );
}

/// Run by `second_writer_in_another_process_is_refused` in a child.
#[test]
fn second_writer_child() {
    let Ok(path) = std::env::var("CTRLBUS_SECOND_WRITER") else {
        return;
    };
    match DurableBus::open(&path) {
        Err(OpenError::InUse(_)) => println!("result: in-use"),
        Err(e) => println!("result: other error: {e}"),
        Ok(_) => println!("result: opened"),
    }
    match ReadOnlyLog::open(&path) {
        Ok(log) => println!("reader: {} events", log.stats().unwrap().events),
        Err(e) => println!("reader: error: {e}"),
    }
}

#[test]
fn second_writer_is_refused() {
    if std::env::var("CTRLBUS_SECOND_WRITER").is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.redb");
    let bus = DurableBus::open(&path).unwrap();
    bus.publish(Event::new(Type::DEPLOY_STARTED, "t")).unwrap();
    // Other processes see events once they are applied to the file (within
    // the apply interval); stats() waits for that.
    assert_eq!(bus.stats().unwrap().events, 1);
    // In this process.
    assert!(matches!(DurableBus::open(&path), Err(OpenError::InUse(_))));
    // In another process.
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "second_writer_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("CTRLBUS_SECOND_WRITER", &path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("result: in-use"), "{stdout}");
    // A reader in another process sees the applied log.
    assert!(stdout.contains("reader: 1 events"), "{stdout}");
    bus.publish(Event::new(Type::DEPLOY_STARTED, "t")).unwrap();
    drop(bus);
    assert_eq!(all(&DurableBus::open(&path).unwrap()).len(), 2);
}

#[test]
fn read_only_log_reads_while_the_bus_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.redb");
    let bus = DurableBus::open(&path).unwrap();
    for _ in 0..5 {
        bus.publish(Event::new(Type::DEPLOY_STARTED, "t")).unwrap();
    }
    let log = ReadOnlyLog::open(&path).unwrap();
    let count = |log: &ReadOnlyLog| {
        log.read(Position::Beginning, &Filter::all())
            .unwrap()
            .map(|e| e.unwrap().seq)
            .collect::<Vec<_>>()
    };
    // Events reach the file within the apply interval.
    wait_until("the reader to see 5 events", || count(&log).len() == 5);
    let writer = {
        let bus = bus.clone();
        std::thread::spawn(move || {
            for _ in 0..50 {
                bus.publish(Event::new(Type::HEALTH_PASSED, "t")).unwrap();
            }
        })
    };
    // While the writer writes, every read is a gap-free prefix.
    let mut last = 0;
    while !writer.is_finished() {
        let seqs = count(&log);
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
        assert!(seqs.len() as u64 >= last, "the reader went back");
        last = seqs.len() as u64;
    }
    writer.join().unwrap();
    wait_until("the reader to see 55 events", || count(&log).len() == 55);
    assert!(log.check().unwrap().is_sound());
    assert_eq!(log.stats().unwrap().last_seq, 55);
}

#[test]
fn dead_letters_after_max_deliveries_and_redrive() {
    for max in [1u32, 3] {
        let dir = tempfile::tempdir().unwrap();
        let bus = quick()
            .max_deliveries(max)
            .retry_backoff(Duration::from_millis(1), Duration::from_millis(2))
            .open(dir.path().join("log.redb"))
            .unwrap();
        let calls: Arc<Mutex<Vec<u64>>> = Arc::default();
        let healed = Arc::new(AtomicBool::new(false));
        let (c2, h2) = (calls.clone(), healed.clone());
        let sub = bus
            .subscribe_durable(
                "picky",
                Filter::all(),
                Position::Beginning,
                move |e: &Event| -> Result<(), HandlerError> {
                    let i = e.payload["i"].as_u64().unwrap();
                    c2.lock().unwrap().push(i);
                    if i == 2 && !h2.load(Ordering::SeqCst) {
                        return Err(HandlerError::msg("cannot take 2"));
                    }
                    Ok(())
                },
            )
            .unwrap();
        assert!(sub.wait_live(Duration::from_secs(5)));
        for i in 1..=4u64 {
            bus.publish(Event::new(Type::DEPLOY_STARTED, "t").with_payload_value("i", i))
                .unwrap();
        }
        wait_until("the cursor to pass the bad event", || sub.position() == 4);
        let got = calls.lock().unwrap().clone();
        let twos = got.iter().filter(|i| **i == 2).count() as u32;
        assert_eq!(
            twos, max,
            "max_deliveries {max}: deliveries of the failing event {got:?}"
        );
        assert_eq!(
            got.iter().filter(|i| **i != 2).copied().collect::<Vec<_>>(),
            vec![1, 3, 4],
            "max_deliveries {max}"
        );
        let dead = bus.dead_letters("picky").unwrap();
        assert_eq!(dead.len(), 1, "max_deliveries {max}");
        assert_eq!(dead[0].seq, 2);
        assert_eq!(dead[0].attempts, max);
        assert!(dead[0].error.contains("cannot take 2"));
        assert_eq!(bus.cursor("picky").unwrap().dead_letters, 1);

        // Still failing: the letter stays, with one more attempt.
        let r = sub.redrive_dead_letters().unwrap();
        assert_eq!((r.succeeded, r.failed, r.gone), (0, 1, 0));
        assert_eq!(bus.dead_letters("picky").unwrap()[0].attempts, max + 1);
        healed.store(true, Ordering::SeqCst);
        let r = sub.redrive_dead_letters().unwrap();
        assert_eq!((r.succeeded, r.failed, r.gone), (1, 0, 0));
        assert!(bus.dead_letters("picky").unwrap().is_empty());
        drop(sub);
        // Deleting a cursor deletes its dead letters.
        bus.delete_cursor("picky").unwrap();
        assert!(bus.dead_letters("picky").unwrap().is_empty());
    }
}

#[test]
fn retention_never_reuses_seqs_and_reports_missed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.redb");
    {
        let bus = quick().open(&path).unwrap();
        // A cursor at the beginning, then idle.
        drop(
            bus.subscribe_durable("behind", Filter::all(), Position::Beginning, noop())
                .unwrap(),
        );
        for i in 0..10u64 {
            bus.publish(Event::new(Type::DEPLOY_STARTED, "t").with_payload_value("i", i))
                .unwrap();
        }
        let r = bus
            .retain(&Retention {
                max_events: Some(4),
                ..Retention::default()
            })
            .unwrap();
        assert_eq!((r.removed, r.first_seq), (6, 7));
        // An idle cursor behind the new oldest event is moved at once.
        let c = bus.cursor("behind").unwrap();
        assert_eq!((c.delivered_seq, c.missed), (6, 6), "{c:?}");
        let seqs: Vec<u64> = all(&bus).iter().map(|e| e.0).collect();
        assert_eq!(seqs, vec![7, 8, 9, 10]);
        assert!(bus.check(&mut |_, _| {}).unwrap().is_sound());
        assert_eq!(
            bus.publish(Event::new(Type::DEPLOY_STARTED, "t"))
                .unwrap()
                .seq,
            11
        );
        // Reading from a removed seq starts at the oldest one.
        assert_eq!(
            bus.read(Position::Seq(2), &Filter::all())
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
                .seq,
            7
        );
        // Remove everything: the next seq still follows the last one.
        let r = bus
            .retain(&Retention {
                max_events: Some(0),
                ..Retention::default()
            })
            .unwrap();
        assert_eq!(r.removed, 5);
        assert!(all(&bus).is_empty());
        assert_eq!(bus.last_seq(), 11);
    }
    let bus = quick().open(&path).unwrap();
    assert_eq!(
        bus.last_seq(),
        11,
        "reopening an emptied log forgot its seqs"
    );
    assert_eq!(bus.stats().unwrap().last_seq, 11);
    for _ in 0..3 {
        bus.publish(Event::new(Type::DEPLOY_STARTED, "t")).unwrap();
    }
    assert_eq!(
        all(&bus).iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![12, 13, 14]
    );

    // The idle cursor behind the retained range resumes at the oldest event
    // and reports what it missed.
    let seen: Arc<Mutex<Vec<EventId>>> = Arc::default();
    let sub = bus
        .subscribe_durable(
            "behind",
            Filter::all(),
            Position::Beginning,
            recorder(&seen),
        )
        .unwrap();
    wait_until("the cursor to catch up", || sub.position() == 14);
    let retained: Vec<EventId> = all(&bus).iter().map(|e| e.1.id).collect();
    assert_eq!(*seen.lock().unwrap(), retained);
    let c = bus.cursor("behind").unwrap();
    assert_eq!(c.missed, 11, "{c:?}");
    drop(sub);
    let c = bus.cursor("behind").unwrap();
    assert_eq!((c.delivered_seq, c.missed), (14, 11), "{c:?}");
}

/// A record that decodes but holds an invalid event (here a type with
/// capitals): both the event reader and the JSON-lines writer report a
/// corruption naming its seq, and stop there.
#[cfg(feature = "fuzzing")] // the record encoder is a test hook
#[test]
fn a_record_with_an_invalid_event_is_reported_with_its_seq() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.redb");
    let events = log_of_four(&path);
    let mut bad = ctrlbus::__fuzz::encoded_record(&events[2], 1);
    let at = bad
        .windows(6)
        .position(|w| w == b"deploy")
        .expect("the type is in the record");
    bad[at..at + 6].copy_from_slice(b"DEPLOY");
    overwrite_record(&path, 3, &bad);
    let bus = quick().open(&path).unwrap();
    let mut reader = bus.read(Position::Seq(3), &Filter::all()).unwrap();
    assert_corrupted_seq_3(reader.next(), "events");
    assert!(reader.next().is_none(), "the reader stops after an error");
    let mut reader = bus.read(Position::Seq(3), &Filter::all()).unwrap();
    let mut out = Vec::new();
    assert_corrupted_seq_3(reader.write_next_json(&mut out), "json lines");
    assert!(
        reader.write_next_json(&mut out).is_none(),
        "stops after an error"
    );
}
