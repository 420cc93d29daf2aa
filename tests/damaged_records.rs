//! Records damaged behind ctrlbus's back (disk corruption, a bad edit):
//! readers report them with the real reason and go on, and a webhook whose
//! secret or patterns can't be read fails closed (G10, G11).

mod common;

use redb::ReadableTable;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ctrlbus::{
    Bus, DeliveryOptions, DeliveryQuery, DeliveryStatus, DeliveryWorker, DurableBus, Event, Filter,
    NewWebhook, Position, ReadError, ReadOnlyLog, StorageError, Type,
};

const WEBHOOKS: redb::TableDefinition<[u8; 16], &[u8]> = redb::TableDefinition::new("webhooks");

fn redb_file(path: &Path) -> redb::Database {
    redb::Database::builder()
        .set_concurrency_mode(redb::ConcurrencyMode::SingleWriter)
        .open(path)
        .unwrap()
}

/// Overwrites the record of `seq` with bytes no decoder accepts.
fn damage_event(path: &Path, seq: u64) {
    common::stored::replace_record(path, seq, b"\x01garbage");
}

/// Replaces `from` by `to` (same length) in every stored webhook record.
fn edit_webhooks(path: &Path, from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let db = redb_file(path);
    let txn = db.begin_write().unwrap();
    {
        let mut table = txn.open_table(WEBHOOKS).unwrap();
        let rows: Vec<([u8; 16], Vec<u8>)> = table
            .iter()
            .unwrap()
            .map(|r| {
                let (k, v) = r.unwrap();
                (k.value(), v.value().to_vec())
            })
            .collect();
        for (k, mut v) in rows {
            let at = v
                .windows(from.len())
                .position(|w| w == from)
                .expect("the stored record holds the text");
            v[at..at + from.len()].copy_from_slice(to);
            table.insert(k, v.as_slice()).unwrap();
        }
    }
    txn.commit().unwrap();
}

/// A receiver on 127.0.0.1 answering 200, recording bodies.
fn receiver() -> (String, Arc<Mutex<Vec<Vec<u8>>>>) {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", server.server_addr().to_ip().unwrap());
    let got = Arc::new(Mutex::new(Vec::new()));
    let bodies = got.clone();
    std::thread::spawn(move || {
        for mut req in server.incoming_requests() {
            let mut body = Vec::new();
            let _ = req.as_reader().read_to_end(&mut body);
            bodies.lock().unwrap().push(body);
            let _ = req.respond(tiny_http::Response::empty(200));
        }
    });
    (url, got)
}

fn options() -> DeliveryOptions {
    DeliveryOptions {
        allow_private_targets: true,
        retry_schedule: vec![Duration::from_millis(50)],
        timeout: Duration::from_secs(5),
        ..DeliveryOptions::default()
    }
}

#[test]
fn a_durable_subscription_dead_letters_an_undecodable_record_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.redb");
    let bus = DurableBus::open(&path).unwrap();
    let ids: Vec<_> = (0..3)
        .map(|_| {
            bus.publish(Event::new(Type::DEPLOY_STARTED, "acme"))
                .unwrap()
                .id
        })
        .collect();
    drop(bus);
    damage_event(&path, 2);

    let bus = DurableBus::builder()
        .retry_backoff(Duration::from_millis(1), Duration::from_millis(5))
        .open(&path)
        .unwrap();
    let log = common::Log::default();
    let sub = bus
        .subscribe_durable(
            "audit",
            Filter::all(),
            Position::Beginning,
            common::recorder(&log),
        )
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while log.lock().unwrap().len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "stuck on the damaged record"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(*log.lock().unwrap(), vec![ids[0], ids[2]]);
    let letters = bus.dead_letters("audit").unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].seq, 2);
    assert!(
        letters[0].error.contains("can't be decoded"),
        "{}",
        letters[0].error
    );
    drop(sub);
    assert_eq!(bus.cursor("audit").unwrap().delivered_seq, 3);
}

/// A log of three blocks, seqs 1–5, 6–10 and 11–15 (one apply each); the
/// ids in order.
fn three_blocks(path: &Path) -> Vec<ctrlbus::EventId> {
    let bus = DurableBus::open(path).unwrap();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let batch: Vec<Event> = (0..5)
            .map(|_| Event::new(Type::DEPLOY_STARTED, "acme"))
            .collect();
        ids.extend(batch.iter().map(|e| e.id));
        bus.publish_batch(batch).unwrap();
        bus.stats().unwrap(); // applies: the next batch is a block of its own
    }
    drop(bus);
    assert_eq!(common::stored::block_starts(path), vec![1, 6, 11]);
    ids
}

#[test]
fn a_damaged_block_is_an_error_for_each_of_its_seqs_and_the_rest_reads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.redb");
    // Each way a block's layout can be damaged.
    for (what, damage) in [
        (
            "truncated",
            (|b: &mut Vec<u8>| b.truncate(b.len() - 1)) as fn(&mut Vec<u8>),
        ),
        ("no records", |b: &mut Vec<u8>| {
            *b = 0u32.to_le_bytes().to_vec();
        }),
        ("a count past its bytes", |b: &mut Vec<u8>| {
            b[..4].copy_from_slice(&1000u32.to_le_bytes());
        }),
        ("shorter than a count", |b: &mut Vec<u8>| b.truncate(2)),
    ] {
        let _ = std::fs::remove_file(&path);
        let ids = three_blocks(&path);
        common::stored::edit_block(&path, 6, |_, b| damage(b));
        let bus = DurableBus::open(&path).unwrap();
        let mut reader = bus.read(Position::Beginning, &Filter::all()).unwrap();
        for id in &ids[..5] {
            assert_eq!(reader.next().unwrap().unwrap().event.id, *id, "{what}");
        }
        match reader.next() {
            Some(Err(ReadError::Storage(StorageError::Corrupted { table, key, .. }))) => {
                assert_eq!((table, key.as_str()), ("event_blocks", "seq 6"), "{what}");
            }
            other => panic!("{what}: expected the damaged block, got {other:?}"),
        }
        assert!(
            reader.next().is_none(),
            "{what}: the reader stops after an error"
        );
        let rest: Vec<_> = bus
            .read(Position::Seq(11), &Filter::all())
            .unwrap()
            .map(|r| r.unwrap().event.id)
            .collect();
        assert_eq!(rest, ids[10..], "{what}");
        assert!(
            bus.recent_events(10, &Filter::all()).is_err(),
            "{what}: the newest 10 reach the damaged block"
        );
        assert_eq!(
            bus.recent_events(5, &Filter::all()).unwrap().len(),
            5,
            "{what}"
        );

        let report = bus.check(&mut |_, _| {}).unwrap();
        assert_eq!(report.events_checked, 15, "{what}");
        let named: Vec<&String> = report
            .problems
            .iter()
            .filter(|p| p.contains("damaged block"))
            .collect();
        assert_eq!(
            named.len(),
            5,
            "{what}: one per seq 6-10: {:?}",
            report.problems
        );
        for seq in 6..=10 {
            assert!(
                named.iter().any(|p| p.starts_with(&format!("seq {seq}:"))),
                "{what}: seq {seq} in {:?}",
                report.problems
            );
        }
        assert!(
            !report.problems.iter().any(|p| p.contains("gap")),
            "{what}: the damaged seqs are not a gap: {:?}",
            report.problems
        );

        // A durable subscription dead-letters each, with the reason, and
        // goes on; none counts as removed by retention.
        let log = common::Log::default();
        let sub = bus
            .subscribe_durable(
                "audit",
                Filter::all(),
                Position::Beginning,
                common::recorder(&log),
            )
            .unwrap();
        common::wait_until(&format!("{what}: the 10 readable events"), || {
            log.lock().unwrap().len() >= 10
        });
        let want: Vec<_> = ids[..5].iter().chain(&ids[10..]).copied().collect();
        assert_eq!(*log.lock().unwrap(), want, "{what}");
        let letters = bus.dead_letters("audit").unwrap();
        assert_eq!(
            letters.iter().map(|l| l.seq).collect::<Vec<_>>(),
            (6..=10).collect::<Vec<_>>(),
            "{what}"
        );
        assert!(
            letters.iter().all(|l| l.error.contains("damaged block")),
            "{what}: {letters:?}"
        );
        drop(sub);
        let cursor = bus.cursor("audit").unwrap();
        assert_eq!((cursor.delivered_seq, cursor.missed), (15, 0), "{what}");
        drop(bus);
        let log = ReadOnlyLog::open(&path).unwrap();
        assert_eq!(log.check().unwrap().events_checked, 15, "{what}");
    }
}

#[test]
fn a_delivery_of_an_undecodable_event_fails_with_the_real_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.redb");
    let (url, got) = receiver();
    let bus = DurableBus::open(&path).unwrap();
    bus.webhooks()
        .allow_private_targets(true)
        .create(NewWebhook {
            tenant_id: "acme".into(),
            url,
            events: vec![],
            secret: None,
        })
        .unwrap();
    for _ in 0..3 {
        bus.publish(Event::new(Type::DEPLOY_STARTED, "acme"))
            .unwrap();
    }
    drop(bus);
    damage_event(&path, 2);
    let bus = DurableBus::open(&path).unwrap();
    DeliveryWorker::run_until_idle(bus.clone(), options()).unwrap();
    let all = bus
        .webhooks()
        .deliveries(&DeliveryQuery::default())
        .unwrap();
    assert_eq!(all.len(), 3);
    for d in &all {
        if d.seq == 2 {
            assert_eq!(d.status, DeliveryStatus::Failed);
            assert!(d.error.contains("can't be read"), "{}", d.error);
            assert!(!d.error.contains("retention"), "{}", d.error);
        } else {
            assert_eq!(d.status, DeliveryStatus::Succeeded, "{d:?}");
        }
    }
    assert_eq!(got.lock().unwrap().len(), 2);
}

/// A webhook on `acme` for `deploy.*`, three events, then `damage` applied
/// to the file: nothing may be sent, every delivery fails with a reason
/// holding `why`, and `check` reports the webhook.
fn fails_closed(damage: impl Fn(&Path), why: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.redb");
    let (url, got) = receiver();
    let bus = DurableBus::open(&path).unwrap();
    let hook = bus
        .webhooks()
        .allow_private_targets(true)
        .create(NewWebhook {
            tenant_id: "acme".into(),
            url,
            events: vec!["deploy.*".into()],
            secret: None,
        })
        .unwrap()
        .webhook
        .id;
    bus.publish(Event::new(Type::DEPLOY_STARTED, "acme"))
        .unwrap();
    drop(bus);
    damage(&path);
    let bus = DurableBus::open(&path).unwrap();
    // After the damage: a matching and a non-matching type.
    bus.publish(Event::new(Type::DEPLOY_FAILED, "acme"))
        .unwrap();
    bus.publish(Event::new(Type::HEALTH_PASSED, "acme"))
        .unwrap();
    DeliveryWorker::run_until_idle(bus.clone(), options()).unwrap();
    assert!(got.lock().unwrap().is_empty(), "{why}: something was sent");
    let all = bus
        .webhooks()
        .deliveries(&DeliveryQuery::default())
        .unwrap();
    assert!(!all.is_empty(), "{why}");
    for d in &all {
        assert_eq!(d.status, DeliveryStatus::Failed, "{why}: {d:?}");
        assert!(d.error.contains(why), "{why}: {}", d.error);
    }
    let err = bus
        .webhooks()
        .replay(hook, jiff::Timestamp::UNIX_EPOCH, None)
        .unwrap_err();
    assert!(err.to_string().contains(why), "{err}");
    let report = bus.check(&mut |_, _| {}).unwrap();
    assert!(!report.is_sound());
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains(&hook.to_string()) && p.contains(why)),
        "{:?}",
        report.problems
    );
    drop(bus);
    let report = ReadOnlyLog::open(&path).unwrap().check().unwrap();
    assert!(!report.is_sound(), "read-only check too");
}

#[test]
fn an_unreadable_secret_stops_delivery_instead_of_sending_unsigned() {
    fails_closed(
        |path| edit_webhooks(path, b"whsec_", b"wxsec_"),
        "secret is unreadable",
    );
}

#[test]
fn an_unreadable_pattern_stops_delivery_instead_of_matching_everything() {
    fails_closed(
        |path| edit_webhooks(path, b"deploy.*", b"Deploy.*"),
        "pattern \"Deploy.*\" is unreadable",
    );
}
