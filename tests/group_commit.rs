//! Group commit's wait for the rest of a group (`commit::gather`): a
//! committer waits only for publishers the last group expects, so a lone
//! publisher never waits and one left alone after a crowd waits once at
//! most, a group already whole in events waits for nobody, nor does
//! anything with `sync(false)`; and a
//! crowd that waits loses, duplicates and reorders nothing.
//! One test: the metrics recorder is process-wide.
#![cfg(feature = "metrics")]

use std::collections::HashMap;
use std::sync::Arc;

use ctrlbus::telemetry::GROUP_COMMIT_WAITS;
use ctrlbus::{Bus, DurableBus, Event, Filter, Position, Type};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

/// (waits that filled, waits that ran out) since the last call (taking a
/// snapshot of the debugging recorder resets its counters).
fn waits(s: &Snapshotter) -> (u64, u64) {
    let (mut filled, mut ran_out) = (0, 0);
    for (key, _, _, value) in s.snapshot().into_vec() {
        let key = key.key();
        if key.name() != GROUP_COMMIT_WAITS {
            continue;
        }
        let DebugValue::Counter(n) = value else {
            panic!("{GROUP_COMMIT_WAITS} is not a counter: {value:?}");
        };
        match key
            .labels()
            .find(|l| l.key() == "outcome")
            .map(|l| l.value())
        {
            Some("filled") => filled += n,
            Some("ran_out") => ran_out += n,
            other => panic!("unexpected outcome label {other:?}"),
        }
    }
    (filled, ran_out)
}

/// The crowd: threads, and publishes each.
const THREADS: usize = 8;
const EACH: u64 = 100;

fn publish_alone(bus: &DurableBus, n: usize) {
    for i in 0..n {
        bus.publish(Event::new(Type::INSTANCE_STARTED, "alone").with_payload_value("i", i as u64))
            .unwrap();
    }
}

#[test]
fn a_committer_waits_only_for_the_publishers_it_expects() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bus = Arc::new(DurableBus::open(dir.path().join("events.redb")).unwrap());

    // One publisher: nobody else is expected, so no commit waits.
    publish_alone(&bus, 200);
    assert_eq!(waits(&snapshotter), (0, 0), "a lone publisher waited");

    // A crowd of 8 threads: whether and how often its committers wait
    // depends on scheduling; what must hold is every event once, in order.
    let receipts: Vec<Vec<(u64, ctrlbus::EventId)>> = (0..THREADS)
        .map(|t| {
            let bus = bus.clone();
            std::thread::spawn(move || {
                (0..EACH)
                    .map(|i| {
                        let e = Event::new(Type::INSTANCE_STARTED, format!("crowd-{t}"))
                            .with_payload_value("i", i);
                        let id = e.id;
                        let r = bus.publish(e).unwrap();
                        assert_eq!(r.id, id);
                        assert!(!r.duplicate);
                        (r.seq, id)
                    })
                    .collect()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    let crowd = waits(&snapshotter);

    // Left alone again: the last crowd group expects the others back, so
    // the first publish may wait for them (and run out); after that group
    // of one, nobody is expected, and no wait can fill with one publisher.
    publish_alone(&bus, 200);
    let (filled, ran_out) = waits(&snapshotter);
    assert_eq!(filled, 0, "a wait filled with one publisher");
    assert!(
        ran_out <= 1,
        "a publisher left alone waited {ran_out} times"
    );
    eprintln!("the crowd's waits: {} filled, {} ran out", crowd.0, crowd.1);

    // A group already whole in events waits for nobody: four submits in
    // one group make the next commit expect four requests, but a batch of
    // `max_group_events` events alone fills a group.
    let small = DurableBus::builder()
        .max_group_events(10)
        .open(dir.path().join("small.redb"))
        .unwrap();
    let pending: Vec<_> = (0..4)
        .map(|i| {
            small
                .submit(Event::new(Type::INSTANCE_STARTED, "w").with_payload_value("i", i))
                .unwrap()
        })
        .collect();
    for p in pending {
        p.wait().unwrap();
    }
    waits(&snapshotter);
    let batch = (0..10)
        .map(|i| Event::new(Type::INSTANCE_STARTED, "w").with_payload_value("b", i))
        .collect();
    assert_eq!(small.publish_batch(batch).unwrap().len(), 10);
    assert_eq!(waits(&snapshotter), (0, 0), "a whole group waited");
    drop(small);

    // Without fsyncs there is nothing to share: a crowd never waits.
    let unsynced = Arc::new(
        DurableBus::builder()
            .sync(false)
            .open(dir.path().join("unsynced.redb"))
            .unwrap(),
    );
    let crowd: Vec<_> = (0..THREADS)
        .map(|t| {
            let bus = unsynced.clone();
            std::thread::spawn(move || {
                for i in 0..EACH {
                    bus.publish(
                        Event::new(Type::INSTANCE_STARTED, format!("u-{t}"))
                            .with_payload_value("i", i),
                    )
                    .unwrap();
                }
            })
        })
        .collect();
    for h in crowd {
        h.join().unwrap();
    }
    assert_eq!(waits(&snapshotter), (0, 0), "a commit without fsync waited");
    drop(unsynced);

    // Every crowd receipt is the event at its seq; each thread's seqs rise;
    // the log is 1..=N without a gap or a duplicate.
    let log: Vec<_> = bus
        .read(Position::Beginning, &Filter::all())
        .unwrap()
        .map(|e| e.unwrap())
        .collect();
    let total = 200 + THREADS as u64 * EACH + 200;
    assert_eq!(log.len() as u64, total);
    for (i, e) in log.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1, "gap or duplicate at {i}");
    }
    let at: HashMap<u64, ctrlbus::EventId> = log.iter().map(|e| (e.seq, e.event.id)).collect();
    for thread in &receipts {
        assert!(thread.windows(2).all(|w| w[0].0 < w[1].0), "out of order");
        for (seq, id) in thread {
            assert_eq!(at.get(seq), Some(id), "receipt seq {seq} is another event");
        }
    }
}
