mod common;
use common::recorder;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ctrlbus::{Bus, DurableBus, Event, Filter, LogEntry, Position, Type};

/// The log's entry at `seq`.
fn entry_at(bus: &DurableBus, seq: u64) -> LogEntry {
    bus.read(Position::Seq(seq), &Filter::all())
        .unwrap()
        .next()
        .expect("an entry at seq")
        .unwrap()
}

#[test]
fn publish_read_subscribe_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.redb");
    let seen = Arc::new(Mutex::new(Vec::new()));
    {
        let bus = DurableBus::open(&path).unwrap();
        let sub = bus
            .subscribe_durable(
                "billing",
                Filter::types(["deploy.*"]).unwrap(),
                Position::Beginning,
                recorder(&seen),
            )
            .unwrap();
        assert!(sub.wait_live(Duration::from_secs(5)));
        for i in 0..10 {
            let t = if i % 2 == 0 {
                Type::DEPLOY_STARTED
            } else {
                Type::HEALTH_PASSED
            };
            let r = bus.publish(Event::new(t, "t1")).unwrap();
            assert_eq!(r.seq, i + 1);
        }
        assert_eq!(seen.lock().unwrap().len(), 5);
        let all: Vec<_> = bus
            .read(Position::Beginning, &Filter::all())
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(all.len(), 10);
        let e = all[3].event.clone();
        let dup = bus.publish(e).unwrap();
        assert!(dup.duplicate);
        assert_eq!(dup.seq, 4);
        drop(sub);
        let c = bus.cursor("billing").unwrap();
        assert_eq!(c.delivered_seq, 10);
    }
    let bus = DurableBus::open(&path).unwrap();
    assert_eq!(bus.last_seq(), 10);
    let r = bus.publish(Event::new(Type::DEPLOY_FAILED, "t1")).unwrap();
    assert_eq!(r.seq, 11);
    let sub = bus
        .subscribe_durable(
            "billing",
            Filter::types(["deploy.*"]).unwrap(),
            Position::Beginning,
            recorder(&seen),
        )
        .unwrap();
    assert!(sub.wait_live(Duration::from_secs(5)));
    assert_eq!(seen.lock().unwrap().len(), 6);
    let mut buf = Vec::new();
    let mut rd = bus.read(Position::Seq(11), &Filter::all()).unwrap();
    rd.write_next_json(&mut buf).unwrap().unwrap();
    let line = String::from_utf8(buf).unwrap();
    let entry = entry_at(&bus, 11);
    assert_eq!(line.trim_end(), entry.to_json());
}

#[test]
fn submit_keeps_publishes_in_flight_and_drop_still_fans_out() {
    let dir = tempfile::tempdir().unwrap();
    let bus = DurableBus::open(dir.path().join("log.redb")).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let _sub = bus.subscribe(Filter::all(), recorder(&seen)).unwrap();
    let events: Vec<Event> = (0..200)
        .map(|_| Event::new(Type::DEPLOY_STARTED, "t"))
        .collect();
    let ids: Vec<_> = events.iter().map(|e| e.id).collect();
    let pending: Vec<_> = events.into_iter().map(|e| bus.submit(e).unwrap()).collect();
    let receipts: Vec<_> = pending.into_iter().map(|p| p.wait().unwrap()).collect();
    // Submitted from one thread: acknowledged in submission order, no gaps.
    for (i, r) in receipts.iter().enumerate() {
        assert_eq!((r.seq, r.id), (i as u64 + 1, ids[i]));
    }
    assert_eq!(*seen.lock().unwrap(), ids, "fanned out in seq order");
    // A publish dropped without waiting is still durable and fanned out.
    let e = Event::new(Type::DEPLOY_FAILED, "t");
    let id = e.id;
    drop(bus.submit(e).unwrap());
    assert_eq!(seen.lock().unwrap().last(), Some(&id));
    let last = entry_at(&bus, 201);
    assert_eq!(last.event.id, id);
}

/// Polls until the log's last `seq` reaches `seq` (nobody waits for it).
fn committed_without_waiting(bus: &DurableBus, seq: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while bus.last_seq() < seq {
        assert!(
            std::time::Instant::now() < deadline,
            "seq {seq} never committed"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[test]
fn submits_nobody_waits_for_are_committed_while_the_writer_watches_and_after() {
    let dir = tempfile::tempdir().unwrap();
    let bus = DurableBus::open(dir.path().join("log.redb")).unwrap();
    // The first wakes the writer thread, which then watches the queue for
    // a while without being woken again: the next ones, submitted while it
    // watches, must still be committed by it.
    let mut pending = Vec::new();
    for seq in 1..=5u64 {
        pending.push(bus.submit(Event::new(Type::DEPLOY_STARTED, "t")).unwrap());
        committed_without_waiting(&bus, seq);
    }
    // Long after it stopped watching: a submit wakes it again.
    std::thread::sleep(Duration::from_millis(100));
    pending.push(bus.submit(Event::new(Type::DEPLOY_STARTED, "t")).unwrap());
    committed_without_waiting(&bus, 6);
    let seqs: Vec<u64> = pending.into_iter().map(|p| p.wait().unwrap().seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5, 6]);
}

#[test]
fn a_submitted_publish_becomes_durable_without_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.redb");
    let bus = DurableBus::open(&path).unwrap();
    bus.publish(Event::new(Type::DEPLOY_STARTED, "t")).unwrap();
    // Nobody waits for this one: the writer thread commits it.
    let e = Event::new(Type::DEPLOY_FAILED, "t");
    let id = e.id;
    let pending = bus.submit(e).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while bus.last_seq() < 2 {
        assert!(std::time::Instant::now() < deadline, "never committed");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let got = entry_at(&bus, 2);
    assert_eq!(got.event.id, id);
    assert_eq!(pending.wait().unwrap().seq, 2);
    // Submitted and not waited for when the bus closes: committed too.
    let late: Vec<_> = (0..50)
        .map(|_| {
            bus.submit(Event::new(Type::DEPLOY_STARTED, "late"))
                .unwrap()
        })
        .collect();
    drop(bus);
    let receipts: Vec<_> = late.into_iter().map(|p| p.wait().unwrap()).collect();
    let bus = DurableBus::open(&path).unwrap();
    assert_eq!(bus.last_seq(), 52);
    for r in receipts {
        let e = entry_at(&bus, r.seq);
        assert_eq!(e.event.id, r.id);
    }
}

#[test]
fn a_wal_left_beside_a_new_file_is_not_replayed_into_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.redb");
    let wal = dir.path().join("log.redb.wal");
    let frames = dir.path().join("frames.wal");
    {
        let bus = DurableBus::open(&path).unwrap();
        for _ in 0..5 {
            bus.publish(Event::new(Type::DEPLOY_STARTED, "old"))
                .unwrap();
        }
        // The WAL as a crash would leave it: every frame still in it (a
        // clean close empties it).
        std::fs::copy(&wal, &frames).unwrap();
    }
    std::fs::rename(&frames, &wal).unwrap();
    assert!(std::fs::metadata(&wal).unwrap().len() > 4096);
    // The operator removes the log but not its WAL, then starts afresh.
    std::fs::remove_file(&path).unwrap();
    let bus = DurableBus::open(&path).unwrap();
    assert_eq!(bus.last_seq(), 0, "events of the removed log came back");
    let r = bus
        .publish(Event::new(Type::DEPLOY_STARTED, "new"))
        .unwrap();
    assert_eq!(r.seq, 1);
    drop(bus);
    let bus = DurableBus::open(&path).unwrap();
    let tenants: Vec<String> = bus
        .read(Position::Beginning, &Filter::all())
        .unwrap()
        .map(|e| e.unwrap().event.tenant_id)
        .collect();
    assert_eq!(tenants, vec!["new".to_string()]);
}

#[test]
fn a_clean_close_trims_the_wal_to_8_mib() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.redb");
    let wal = dir.path().join("log.redb.wal");
    let big = "x".repeat(200_000);
    for round in 1..=2u64 {
        let bus = DurableBus::open(&path).unwrap();
        // 60 events of ~200 KB: the WAL grows past 8 MiB.
        for _ in 0..60 {
            bus.publish(Event::new(Type::DEPLOY_STARTED, "t").with_payload_value("x", big.clone()))
                .unwrap();
        }
        assert!(std::fs::metadata(&wal).unwrap().len() > 12 << 20);
        drop(bus);
        // Closed: everything is in the redb file; the WAL keeps its header
        // and 8 MiB of space.
        assert_eq!(std::fs::metadata(&wal).unwrap().len(), 4096 + (8 << 20));
        let bus = DurableBus::open(&path).unwrap();
        assert_eq!(bus.last_seq(), 60 * round);
        let n = bus
            .read(Position::Beginning, &Filter::all())
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
            .len();
        assert_eq!(n as u64, 60 * round);
        drop(bus);
    }
    // A small log keeps what it had: less than the limit.
    let small = dir.path().join("small.redb");
    let bus = DurableBus::open(&small).unwrap();
    bus.publish(Event::new(Type::DEPLOY_STARTED, "t")).unwrap();
    drop(bus);
    let len = std::fs::metadata(dir.path().join("small.redb.wal"))
        .unwrap()
        .len();
    assert!(len <= 4096 + (1 << 20), "{len}");
}

#[test]
fn duplicates_are_found_in_one_group_before_and_after_the_apply() {
    let dir = tempfile::tempdir().unwrap();
    // No timed apply: until a read asks, acknowledged events are only in
    // the WAL, and their ids only in the writer's memory.
    let bus = DurableBus::builder()
        .apply_interval(Duration::from_secs(3600))
        .open(dir.path().join("log.redb"))
        .unwrap();
    let a = Event::new(Type::DEPLOY_STARTED, "t");
    // The same id twice in flight: committed in one group (or the second
    // right after the first).
    let first = bus.submit(a.clone()).unwrap();
    let second = bus.submit(a.clone()).unwrap();
    let (r1, r2) = (first.wait().unwrap(), second.wait().unwrap());
    assert_eq!((r1.seq, r1.duplicate), (1, false));
    assert_eq!((r2.seq, r2.duplicate), (1, true));
    // Acknowledged, not applied: found in memory.
    let r = bus.publish(a.clone()).unwrap();
    assert_eq!((r.seq, r.duplicate), (1, true));
    // A read applies it; the next publish forgets it in memory, so the id
    // must be found in the file's index.
    assert_eq!(
        bus.read(Position::Beginning, &Filter::all())
            .unwrap()
            .count(),
        1
    );
    let b = Event::new(Type::DEPLOY_STARTED, "t");
    assert_eq!(bus.publish(b.clone()).unwrap().seq, 2);
    let r = bus.publish(a).unwrap();
    assert_eq!((r.seq, r.duplicate), (1, true));
    let r = bus.publish(b).unwrap();
    assert_eq!((r.seq, r.duplicate), (2, true));
    assert_eq!(bus.last_seq(), 2);
}

#[test]
fn idempotency_holds_for_old_ids_and_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.redb");
    let newest = Event::new(Type::DEPLOY_STARTED, "t");
    // An imported event whose id is older than every id in the log.
    let old = Event::new(Type::DEPLOY_STARTED, "t")
        .with_id(ctrlbus::EventId::from_ulid(ulid::Ulid::from_parts(1, 42)));
    {
        let bus = DurableBus::open(&path).unwrap();
        assert_eq!(bus.publish(newest.clone()).unwrap().seq, 1);
        let r = bus.publish(old.clone()).unwrap();
        assert_eq!((r.seq, r.duplicate), (2, false));
        let r = bus.publish(old.clone()).unwrap();
        assert_eq!((r.seq, r.duplicate), (2, true));
        let r = bus.publish(newest.clone()).unwrap();
        assert_eq!((r.seq, r.duplicate), (1, true));
    }
    let bus = DurableBus::open(&path).unwrap();
    for (e, seq) in [(old, 2), (newest, 1)] {
        let r = bus.publish(e).unwrap();
        assert_eq!((r.seq, r.duplicate), (seq, true));
    }
    assert_eq!(bus.last_seq(), 2);
}

/// Fresh ids (in order, not indexed one by one) and imported ones (out of
/// order) interleaved in runs of every length around the index's stride:
/// after a reopen, each is a duplicate at its own `seq`, each is a start
/// position for a read, an id that was never published is not, and
/// `check` finds the index sound.
#[test]
fn every_id_is_found_after_reopen_whatever_order_ids_came_in() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.redb");
    let mut rng = common::Rng(7);
    let mut published: Vec<(Event, u64)> = Vec::new();
    let mut never = Vec::new();
    {
        let bus = DurableBus::open(&path).unwrap();
        for run in 0..60u64 {
            let len = rng.below(40) + 1;
            for k in 0..len {
                let e = if run % 3 == 2 {
                    let id = ulid::Ulid::from_parts(1_000 + run * 100 + k, u128::from(rng.next()));
                    Event::new(Type::DEPLOY_STARTED, "t").with_id(ctrlbus::EventId::from_ulid(id))
                } else {
                    Event::new(Type::DEPLOY_STARTED, "t")
                };
                let r = bus.publish(e.clone()).unwrap();
                assert!(!r.duplicate);
                published.push((e, r.seq));
            }
            if run % 7 == 0 {
                // An id between two of the log's, never published.
                never.push(ctrlbus::EventId::new());
            }
        }
    }
    let bus = DurableBus::open(&path).unwrap();
    for (e, seq) in &published {
        let r = bus.publish(e.clone()).unwrap();
        assert_eq!((r.seq, r.duplicate), (*seq, true), "{}", e.id);
    }
    for (e, seq) in published.iter().step_by(7) {
        let first = bus.read(Position::Id(e.id), &Filter::all()).unwrap().next();
        assert_eq!(first.unwrap().unwrap().seq, *seq);
    }
    for id in never {
        assert!(bus.read(Position::Id(id), &Filter::all()).is_err(), "{id}");
    }
    assert_eq!(bus.last_seq(), published.len() as u64);
    bus.close();
    let report = ctrlbus::ReadOnlyLog::open(&path).unwrap().check().unwrap();
    assert!(report.is_sound(), "{:?}", report.problems);
}

#[test]
fn a_handler_can_ask_for_its_redelivery_delay_live_and_in_catch_up() {
    use ctrlbus::HandlerError;
    use std::time::Instant;
    let dir = tempfile::tempdir().unwrap();
    // The backoff is 1 ms: a redelivery 150 ms later is the handler's ask.
    let bus = DurableBus::builder()
        .retry_backoff(Duration::from_millis(1), Duration::from_millis(1))
        .open(dir.path().join("log.redb"))
        .unwrap();
    let event = |n: u64| {
        Event::new(Type::DEPLOY_STARTED, "t")
            .with_payload(serde_json::json!({ "n": n }).as_object().unwrap().clone())
    };
    // Event 1 is delivered in catch-up (published before the subscription
    // exists), event 2 live.
    bus.publish(event(1)).unwrap();
    let calls: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let c = calls.clone();
    let sub = bus
        .subscribe_durable(
            "delayed",
            Filter::all(),
            Position::Beginning,
            move |e: &Event| -> Result<(), HandlerError> {
                let n = e.payload["n"].as_u64().unwrap();
                let mut calls = c.lock().unwrap();
                let first = !calls.iter().any(|(m, _)| *m == n);
                calls.push((n, Instant::now()));
                if first {
                    Err(HandlerError::msg("not yet").retry_after(Duration::from_millis(150)))
                } else {
                    Ok(())
                }
            },
        )
        .unwrap();
    common::wait_until("the first redelivered", || sub.position() == 1);
    assert!(sub.wait_live(Duration::from_secs(20)));
    bus.publish(event(2)).unwrap();
    common::wait_until("the second redelivered", || sub.position() == 2);
    let calls = calls.lock().unwrap().clone();
    for n in [1, 2] {
        let at: Vec<Instant> = calls.iter().filter(|(m, _)| *m == n).map(|c| c.1).collect();
        assert_eq!(at.len(), 2, "event {n}: one failure, one success");
        assert!(
            at[1] - at[0] >= Duration::from_millis(150),
            "event {n} came again after {:?}, before the 150 ms asked for",
            at[1] - at[0]
        );
    }
}

/// Retention removes in chunks of 2,000 events, one transaction each: an
/// explicit `retain` of exactly one chunk, one past it and several chunks
/// leaves exactly the newest events, each still found by its id, the index
/// sound; a background policy gets there over several ticks.
#[test]
fn retention_of_several_chunks_keeps_exactly_the_newest_and_their_ids() {
    for (events, keep) in [(2_100u64, 100u64), (2_101, 100), (4_600, 99)] {
        let dir = tempfile::tempdir().unwrap();
        let bus = DurableBus::open(dir.path().join("log.redb")).unwrap();
        let mut ids = Vec::new();
        for _ in 0..events / 100 {
            let batch: Vec<Event> = (0..100)
                .map(|_| Event::new(Type::DEPLOY_STARTED, "t"))
                .collect();
            ids.extend(batch.iter().map(|e| e.id));
            bus.publish_batch(batch).unwrap();
        }
        for _ in 0..events % 100 {
            let e = Event::new(Type::DEPLOY_STARTED, "t");
            ids.push(e.id);
            bus.publish(e).unwrap();
        }
        let r = bus
            .retain(&ctrlbus::Retention {
                max_events: Some(keep),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            (r.removed, r.first_seq),
            (events - keep, events - keep + 1),
            "{events}"
        );
        for (i, id) in ids.iter().enumerate() {
            let found = bus.read(Position::Id(*id), &Filter::all()).is_ok();
            assert_eq!(found, i as u64 >= events - keep, "{events}: seq {}", i + 1);
        }
        assert!(bus.check(&mut |_, _| {}).unwrap().is_sound(), "{events}");
    }
    // In the background: a policy, applied over ticks, chunk by chunk.
    let dir = tempfile::tempdir().unwrap();
    let bus = DurableBus::builder()
        .retention(
            ctrlbus::Retention {
                max_events: Some(500),
                ..Default::default()
            },
            Duration::from_millis(50),
        )
        .open(dir.path().join("log.redb"))
        .unwrap();
    for _ in 0..50 {
        let batch: Vec<Event> = (0..100)
            .map(|_| Event::new(Type::DEPLOY_STARTED, "t"))
            .collect();
        bus.publish_batch(batch).unwrap();
    }
    common::wait_until("background retention down to 500", || {
        bus.stats().unwrap().events == 500
    });
    assert!(bus.check(&mut |_, _| {}).unwrap().is_sound());
}
