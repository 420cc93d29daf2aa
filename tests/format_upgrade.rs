//! A log written by the previous file format (2: one `events` row per
//! event) is read as it is, upgraded at its first writable open (format 3:
//! events in blocks), and reads, seeks, retention and `check` work across
//! the rows it kept and the blocks written after.

mod common;

use std::path::Path;

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};

use ctrlbus::{Bus, DurableBus, Event, EventId, Filter, Position, ReadOnlyLog, Retention, Type};

const META: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("ctrlbus_meta");
const EVENTS: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("events");
const BLOCKS: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("event_blocks");

fn event(i: u64) -> Event {
    Event::new(Type::DEPLOY_STARTED, "t").with_payload_value("i", i)
}

fn redb_file(path: &Path) -> redb::Database {
    redb::Database::builder()
        .set_concurrency_mode(redb::ConcurrencyMode::SingleWriter)
        .open(path)
        .unwrap()
}

fn format_of(path: &Path) -> u8 {
    let db = redb_file(path);
    let txn = db.begin_read().unwrap();
    txn.open_table(META)
        .unwrap()
        .get("format")
        .unwrap()
        .unwrap()
        .value()[0]
}

/// Rewrites a closed log as format 2 stored it: every record its own row
/// of `events`, no `event_blocks`. (The id index and the rest are the same
/// in both formats.)
fn as_format_2(path: &Path) {
    let db = redb_file(path);
    let txn = db.begin_write().unwrap();
    {
        let blocks = txn.open_table(BLOCKS).unwrap();
        let mut events = txn.open_table(EVENTS).unwrap();
        for kv in blocks.iter().unwrap() {
            let (k, v) = kv.unwrap();
            for (i, r) in common::stored::records_of(v.value()).iter().enumerate() {
                events.insert(k.value() + i as u64, r.as_slice()).unwrap();
            }
        }
    }
    txn.delete_table(BLOCKS).unwrap();
    txn.open_table(META)
        .unwrap()
        .insert("format", [2u8].as_slice())
        .unwrap();
    txn.commit().unwrap();
}

fn all(
    read: impl Iterator<Item = Result<ctrlbus::LogEntry, ctrlbus::ReadError>>,
) -> Vec<(u64, EventId)> {
    read.map(|r| {
        let e = r.unwrap();
        (e.seq, e.event.id)
    })
    .collect()
}

#[test]
fn a_format_2_log_is_read_upgraded_and_continued_in_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.redb");
    let old: Vec<Event> = (0..100).map(event).collect();
    {
        let bus = DurableBus::open(&path).unwrap();
        for chunk in old.chunks(7) {
            bus.publish_batch(chunk.to_vec()).unwrap();
        }
        drop(bus);
    }
    as_format_2(&path);
    let expected_old: Vec<(u64, EventId)> = (1..).zip(old.iter().map(|e| e.id)).collect();

    // Read-only: read as it is, and left as it is.
    {
        let log = ReadOnlyLog::open(&path).unwrap();
        assert_eq!(
            all(log.read(Position::Beginning, &Filter::all()).unwrap()),
            expected_old
        );
        assert!(log.check().unwrap().is_sound());
        assert_eq!(log.stats().unwrap().events, 100);
    }
    assert_eq!(format_of(&path), 2, "a read-only open changed the format");

    // The first writable open upgrades it; new events go to blocks.
    let new: Vec<Event> = (100..250).map(event).collect();
    {
        let bus = DurableBus::open(&path).unwrap();
        for chunk in new.chunks(11) {
            bus.publish_batch(chunk.to_vec()).unwrap();
        }
        drop(bus);
    }
    assert_eq!(
        format_of(&path),
        3,
        "not upgraded: a format-2 build would miss the blocks"
    );
    assert!(!common::stored::block_starts(&path).is_empty());
    {
        let db = redb_file(&path);
        let txn = db.begin_read().unwrap();
        assert_eq!(
            txn.open_table(EVENTS).unwrap().len().unwrap(),
            100,
            "the old rows stay"
        );
    }

    let bus = DurableBus::open(&path).unwrap();
    let every: Vec<(u64, EventId)> = (1..).zip(old.iter().chain(&new).map(|e| e.id)).collect();
    assert_eq!(
        all(bus.read(Position::Beginning, &Filter::all()).unwrap()),
        every
    );
    // Positions on both sides of the boundary, and across it.
    for seq in [1u64, 50, 100, 101, 102, 180, 250] {
        let got = all(bus.read(Position::Seq(seq), &Filter::all()).unwrap());
        assert_eq!(got, every[seq as usize - 1..], "from seq {seq}");
        let id = every[seq as usize - 1].1;
        let got = all(bus.read(Position::Id(id), &Filter::all()).unwrap());
        assert_eq!(got.first(), Some(&(seq, id)), "from the id of seq {seq}");
    }
    let recent = bus.recent_events(120, &Filter::all()).unwrap();
    let ids: Vec<EventId> = recent.iter().map(|e| e.id).collect();
    let want: Vec<EventId> = every[130..].iter().map(|&(_, id)| id).collect();
    assert_eq!(ids, want, "recent events across the boundary");
    assert!(bus.check(&mut |_, _| {}).unwrap().is_sound());

    // Retention through the old rows, then into a block.
    for (keep, first) in [(200u64, 51u64), (143, 108), (1, 250)] {
        let r = bus
            .retain(&Retention {
                max_events: Some(keep),
                ..Retention::default()
            })
            .unwrap();
        assert_eq!(r.first_seq, first, "keeping {keep}");
        assert_eq!(
            all(bus.read(Position::Beginning, &Filter::all()).unwrap()),
            every[first as usize - 1..],
            "keeping {keep}"
        );
        let report = bus.check(&mut |_, _| {}).unwrap();
        assert!(report.is_sound(), "keeping {keep}: {:?}", report.problems);
        assert_eq!(report.events_checked, keep);
    }
    drop(bus);
    let bus = DurableBus::open(&path).unwrap();
    let receipt = bus.publish(event(999)).unwrap();
    assert_eq!(receipt.seq, 251);
    assert_eq!(
        all(bus.read(Position::Beginning, &Filter::all()).unwrap())
            .iter()
            .map(|p| p.0)
            .collect::<Vec<_>>(),
        vec![250, 251]
    );
}
