//! The async API (feature `tokio`): `publish_async`, `stream` and
//! `durable_stream`, on a real tokio runtime.
#![cfg(feature = "tokio")]

mod common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::BufRead;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ctrlbus::stream::{AckError, Delivery, DurableStream, Lagged};
use ctrlbus::{
    Bus, DurableBus, Event, EventId, Filter, HandlerError, Position, PublishError, Type,
};
use futures::StreamExt;

fn event(i: u64) -> Event {
    Event::new(Type::DEPLOY_STARTED, "t1").with_payload(payload(serde_json::json!({ "i": i })))
}

fn payload(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    v.as_object().unwrap().clone()
}

/// The `i` in an event's payload.
fn index(e: &Event) -> u64 {
    e.payload["i"].as_u64().unwrap()
}

/// The next delivery of a durable stream, failing the test after 20 s.
async fn next(stream: &mut DurableStream) -> Delivery {
    let got = tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("no delivery within 20 s");
    match got {
        Some(Ok(d)) => d,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_tasks_publish_at_once_each_with_a_distinct_seq_after_its_subscribers_ran() {
    let dir = tempfile::tempdir().unwrap();
    let bus = DurableBus::open(dir.path().join("log.redb")).unwrap();
    let seen: Arc<Mutex<HashSet<EventId>>> = Arc::default();
    let s = seen.clone();
    let _sub = bus
        .subscribe(
            Filter::all(),
            move |e: &Event| -> Result<(), HandlerError> {
                s.lock().unwrap().insert(e.id);
                Ok(())
            },
        )
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let bus = bus.clone();
        let seen = seen.clone();
        tasks.push(tokio::spawn(async move {
            let e = event(i);
            let id = e.id;
            let receipt = bus.publish_async(e).await.unwrap();
            assert_eq!(receipt.id, id);
            assert!(!receipt.duplicate);
            // Resolved as `publish` returns: the subscriber already ran.
            assert!(
                seen.lock().unwrap().contains(&id),
                "resolved before fan-out"
            );
            receipt.seq
        }));
    }
    let mut seqs = BTreeSet::new();
    for t in tasks {
        assert!(seqs.insert(t.await.unwrap()), "a seq was given twice");
    }
    assert_eq!(seqs, (1..=200).collect(), "seqs are 1..=200 with no gap");
    assert_eq!(bus.last_seq(), 200);
    // Every event is in the log once, in seq order.
    let read: Vec<u64> = bus
        .read(Position::Beginning, &Filter::all())
        .unwrap()
        .map(|e| e.unwrap().seq)
        .collect();
    assert_eq!(read, (1..=200).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_cancelled_at_any_point_is_in_the_log_at_most_once_and_its_retry_is_idempotent() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("seed {seed}");
    let mut rng = common::Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let bus = DurableBus::open(dir.path().join("log.redb")).unwrap();
    let mut tasks = Vec::new();
    for i in 0..300 {
        let bus = bus.clone();
        // Cancel after a random number of polls (0: never polled), or let
        // it finish.
        let polls = rng.below(6);
        tasks.push(tokio::spawn(async move {
            let e = event(i);
            let first = if polls == 5 {
                Some(bus.publish_async(e.clone()).await.unwrap())
            } else {
                let mut fut = std::pin::pin!(bus.publish_async(e.clone()));
                let mut done = None;
                for _ in 0..polls {
                    if let Ok(r) = tokio::time::timeout(Duration::from_micros(50), &mut fut).await {
                        done = Some(r.unwrap());
                        break;
                    }
                }
                done // else dropped here, unresolved
            };
            // The retry: same id.
            let retry = bus.publish_async(e.clone()).await.unwrap();
            if let Some(first) = &first {
                assert!(
                    retry.duplicate,
                    "a completed publish retried is a duplicate"
                );
                assert_eq!(retry.seq, first.seq);
            }
            let again = bus.publish_async(e).await.unwrap();
            assert!(again.duplicate);
            assert_eq!(again.seq, retry.seq, "every retry gives the same receipt");
            (i, retry.seq)
        }));
    }
    let mut by_seq = HashMap::new();
    for t in tasks {
        let (i, seq) = t.await.unwrap();
        assert!(
            by_seq.insert(seq, i).is_none(),
            "two events share seq {seq}"
        );
    }
    // Each of the 300 events is in the log exactly once, with no gap.
    let read: Vec<(u64, u64)> = bus
        .read(Position::Beginning, &Filter::all())
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.seq, index(&e.event))
        })
        .collect();
    assert_eq!(read.len(), 300, "every event once, none twice");
    for (n, (seq, i)) in read.iter().enumerate() {
        assert_eq!(*seq, n as u64 + 1);
        assert_eq!(by_seq[seq], *i);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_stream_never_polled_holds_up_no_publisher_and_reports_lagged() {
    const CAPACITY: usize = 256;
    const EVENTS: u64 = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let bus = DurableBus::open(dir.path().join("log.redb")).unwrap();
    let mut stream = bus.stream_with_capacity(Filter::all(), CAPACITY).unwrap();
    let publisher = {
        let bus = bus.clone();
        tokio::spawn(async move {
            let mut inflight = Vec::new();
            for i in 0..EVENTS {
                inflight.push(bus.publish_async(event(i)));
                if inflight.len() == 500 {
                    for f in inflight.drain(..) {
                        f.await.unwrap();
                    }
                }
            }
            for f in inflight {
                f.await.unwrap();
            }
        })
    };
    // A guard against a hang, not a measurement: a publisher blocked on
    // the stream would never finish.
    tokio::time::timeout(Duration::from_secs(120), publisher)
        .await
        .expect("publishers were blocked by a stream nobody polls")
        .unwrap();
    // The first item reports the gap, then the newest CAPACITY events follow
    // in order.
    let first = stream.next().await.unwrap();
    assert_eq!(
        first,
        Err(Lagged {
            missed: EVENTS - CAPACITY as u64
        })
    );
    for i in EVENTS - CAPACITY as u64..EVENTS {
        let e = stream.next().await.unwrap().unwrap();
        assert_eq!(index(&e), i);
    }
    // Then live again, with no lag.
    bus.publish_async(event(EVENTS)).await.unwrap();
    assert_eq!(index(&stream.next().await.unwrap().unwrap()), EVENTS);
    // Closing the bus ends the stream.
    bus.close();
    assert!(stream.next().await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_stream_keeps_its_filter_and_order() {
    let dir = tempfile::tempdir().unwrap();
    let bus = DurableBus::open(dir.path().join("log.redb")).unwrap();
    let mut stream = bus
        .stream(Filter::types(["health.*"]).unwrap().tenant("t2"))
        .unwrap();
    for i in 0..50 {
        let ty = if i % 2 == 0 {
            Type::HEALTH_DEGRADED
        } else {
            Type::DEPLOY_FAILED
        };
        let tenant = if i % 3 == 0 { "t1" } else { "t2" };
        bus.publish_async(
            Event::new(ty, tenant).with_payload(payload(serde_json::json!({ "i": i }))),
        )
        .await
        .unwrap();
    }
    let want: Vec<u64> = (0..50).filter(|i| i % 2 == 0 && i % 3 != 0).collect();
    let mut got = Vec::new();
    for _ in &want {
        got.push(index(&stream.next().await.unwrap().unwrap()));
    }
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_async_refuses_what_publish_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let bus = DurableBus::builder()
        .max_payload_bytes(64)
        .open(dir.path().join("log.redb"))
        .unwrap();
    let big = Event::new(Type::DEPLOY_STARTED, "t1")
        .with_payload(payload(serde_json::json!({ "x": "y".repeat(100) })));
    assert!(matches!(
        bus.publish_async(big).await,
        Err(PublishError::Invalid(_))
    ));
    assert_eq!(bus.last_seq(), 0, "nothing written");
    bus.close();
    assert!(matches!(
        bus.publish_async(event(1)).await,
        Err(PublishError::Closed)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_async_on_every_option_combination() {
    for wal in [true, false] {
        for sync in [true, false] {
            for shared_reads in [true, false] {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("log.redb");
                let combo = format!("wal={wal} sync={sync} shared_reads={shared_reads}");
                {
                    let bus = DurableBus::builder()
                        .write_ahead_log(wal)
                        .sync(sync)
                        .shared_reads(shared_reads)
                        .open(&path)
                        .unwrap();
                    let mut stream = bus
                        .durable_stream("s", Filter::all(), Position::Beginning)
                        .unwrap();
                    let mut futs = Vec::new();
                    for i in 0..20 {
                        futs.push(bus.publish_async(event(i)));
                    }
                    for (i, f) in futs.into_iter().enumerate() {
                        assert_eq!(f.await.unwrap().seq, i as u64 + 1, "{combo}");
                    }
                    for seq in 1..=10 {
                        let d = next(&mut stream).await;
                        assert_eq!(d.seq(), seq, "{combo}");
                        d.ack().await.unwrap();
                    }
                }
                let bus = DurableBus::open(&path).unwrap();
                assert_eq!(bus.last_seq(), 20, "{combo}");
                let mut stream = bus
                    .durable_stream("s", Filter::all(), Position::Beginning)
                    .unwrap();
                assert_eq!(next(&mut stream).await.seq(), 11, "{combo}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_stream_acking_100_of_200_resumes_at_101_after_a_clean_close() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.redb");
    {
        let bus = DurableBus::open(&path).unwrap();
        let mut stream = bus
            .durable_stream("sse", Filter::all(), Position::Beginning)
            .unwrap();
        for i in 0..200 {
            bus.publish_async(event(i)).await.unwrap();
        }
        for seq in 1..=100 {
            let d = next(&mut stream).await;
            assert_eq!(d.seq(), seq, "in seq order, no gap");
            assert_eq!(index(d.event()), seq - 1);
            d.ack().await.unwrap();
        }
        // The 101st arrives and is left unanswered when the stream closes.
        let unanswered = next(&mut stream).await;
        assert_eq!(unanswered.seq(), 101);
        assert_eq!(stream.position(), 100);
        drop(stream);
        // An ack after the close is not recorded, and says so.
        assert_eq!(unanswered.ack().await, Err(AckError::Closed));
    }
    let bus = DurableBus::open(&path).unwrap();
    assert_eq!(bus.cursor("sse").unwrap().delivered_seq, 100);
    let mut stream = bus
        .durable_stream("sse", Filter::all(), Position::Beginning)
        .unwrap();
    let d = next(&mut stream).await;
    assert_eq!(d.seq(), 101, "resumes after the last ack");
    assert_eq!(d.attempt(), 1, "the unanswered delivery did not count");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_redelivers_after_its_delay_and_dead_letters_after_max_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    let bus = DurableBus::builder()
        .max_deliveries(3)
        .open(dir.path().join("log.redb"))
        .unwrap();
    for i in 0..3 {
        bus.publish_async(event(i)).await.unwrap();
    }
    let mut stream = bus
        .durable_stream("n", Filter::all(), Position::Beginning)
        .unwrap();
    // seq 1: nacked once, then acked on its second delivery.
    let d = next(&mut stream).await;
    assert_eq!((d.seq(), d.attempt()), (1, 1));
    d.nack(Duration::from_millis(30));
    let d = next(&mut stream).await;
    assert_eq!(
        (d.seq(), d.attempt()),
        (1, 2),
        "the same event comes again first"
    );
    d.ack().await.unwrap();
    // seq 2: dropped (a nack without delay), nacked, nacked: dead-lettered.
    let d = next(&mut stream).await;
    assert_eq!((d.seq(), d.attempt()), (2, 1));
    drop(d);
    for attempt in 2..=3 {
        let d = next(&mut stream).await;
        assert_eq!((d.seq(), d.attempt()), (2, attempt));
        d.nack(Duration::ZERO);
    }
    let d = next(&mut stream).await;
    assert_eq!(d.seq(), 3, "past the dead letter");
    d.ack().await.unwrap();
    let dead = bus.dead_letters("n").unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].seq, 2);
    assert_eq!(dead[0].attempts, 3);
    assert!(dead[0].error.contains("nack"), "{}", dead[0].error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_stream_not_polled_holds_up_no_publisher_and_then_follows_live_events() {
    let dir = tempfile::tempdir().unwrap();
    let bus = DurableBus::open(dir.path().join("log.redb")).unwrap();
    let mut stream = bus
        .durable_stream(
            "slow",
            Filter::types(["deploy.*"]).unwrap(),
            Position::Beginning,
        )
        .unwrap();
    let publisher = {
        let bus = bus.clone();
        tokio::spawn(async move {
            for i in 0..2000 {
                bus.publish_async(event(i)).await.unwrap();
            }
        })
    };
    tokio::time::timeout(Duration::from_secs(120), publisher)
        .await
        .expect("a durable stream nobody polls blocked the publisher")
        .unwrap();
    for seq in 1..=2000 {
        let d = next(&mut stream).await;
        assert_eq!(d.seq(), seq);
        d.ack().await.unwrap();
    }
    // Caught up: new events arrive as they are published.
    bus.publish_async(event(2000)).await.unwrap();
    let d = next(&mut stream).await;
    assert_eq!(d.seq(), 2001);
    // A second stream on the same name is refused while this one runs.
    assert!(
        bus.durable_stream("slow", Filter::all(), Position::Beginning)
            .is_err()
    );
    // Closing the bus ends the stream.
    bus.close();
    drop(d);
    let end = tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("the stream ends when the bus closes");
    assert!(end.is_none());
}

/// The child of the kill -9 test: a durable stream that acks every event
/// and prints `<seq> <id>` once each ack is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_stream_crash_child() {
    let Ok(path) = std::env::var("CTRLBUS_STREAM_CHILD") else {
        return;
    };
    let bus = DurableBus::open(&path).unwrap();
    let mut stream = bus
        .durable_stream("crash", Filter::all(), Position::Beginning)
        .unwrap();
    println!("ready");
    loop {
        let d = next(&mut stream).await;
        let (seq, id) = (d.seq(), d.event().id);
        d.ack().await.unwrap();
        println!("acked {seq} {id}");
    }
}

#[test]
fn after_kill_9_a_durable_stream_resumes_within_the_window() {
    const EVENTS: u64 = 3000;
    if std::env::var("CTRLBUS_STREAM_CHILD").is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.redb");
    {
        let bus = DurableBus::open(&path).unwrap();
        for i in 0..EVENTS {
            bus.publish(event(i)).unwrap();
        }
    }
    let mut child = common::spawn_self(
        "durable_stream_crash_child",
        ("CTRLBUS_STREAM_CHILD", path.display().to_string()),
    );
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut last_acked = 0;
    for line in stdout.lines() {
        let line = line.unwrap();
        if let Some(rest) = line.split("acked ").nth(1) {
            last_acked = rest.split_whitespace().next().unwrap().parse().unwrap();
            // Kill it mid-stream, past the first acknowledgement window.
            if last_acked >= 1500 {
                break;
            }
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(last_acked >= 1500);
    let bus = DurableBus::open(&path).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut stream = bus
            .durable_stream("crash", Filter::all(), Position::Beginning)
            .unwrap();
        let first = next(&mut stream).await.seq();
        // Nothing acknowledged-and-unrecorded is skipped past...
        assert!(
            first <= last_acked + 1,
            "resumed at {first}, after the last ack {last_acked}"
        );
        // ...and what comes again is within the documented window: fewer
        // than `ack_flush_events` (1000) past the last durable position,
        // plus the acks printed in flight.
        assert!(
            last_acked + 1 - first <= 1000 + 1,
            "resumed at {first}, {} before the last ack",
            last_acked + 1 - first
        );
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_stream_holds_exactly_its_capacity_and_lags_one_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let bus = DurableBus::open(dir.path().join("log.redb")).unwrap();
    // At the capacity: nothing missed.
    let mut at = bus.stream_with_capacity(Filter::all(), 4).unwrap();
    // One past it: the oldest is dropped and reported.
    let mut past = bus.stream_with_capacity(Filter::all(), 4).unwrap();
    // A capacity of 0 holds one event.
    let mut zero = bus.stream_with_capacity(Filter::all(), 0).unwrap();
    for i in 0..4 {
        bus.publish_async(event(i)).await.unwrap();
    }
    for i in 0..4 {
        assert_eq!(index(&at.next().await.unwrap().unwrap()), i);
    }
    bus.publish_async(event(4)).await.unwrap();
    assert_eq!(
        index(&at.next().await.unwrap().unwrap()),
        4,
        "taken in time: no lag"
    );
    assert_eq!(past.next().await.unwrap(), Err(Lagged { missed: 1 }));
    for i in 1..5 {
        assert_eq!(index(&past.next().await.unwrap().unwrap()), i);
    }
    assert_eq!(zero.next().await.unwrap(), Err(Lagged { missed: 4 }));
    assert_eq!(index(&zero.next().await.unwrap().unwrap()), 4);
}

/// A durable stream reads what the fan-out has passed, from memory while
/// the file does not hold it: with no apply at all (no timed apply, no
/// timed flush of positions), events published before and after it
/// started all arrive, in order. It used to read only applied events, so
/// here it received nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_stream_gets_events_the_file_does_not_hold_yet() {
    let dir = tempfile::tempdir().unwrap();
    let bus = DurableBus::builder()
        .apply_interval(Duration::from_secs(3600))
        .ack_flush_interval(Duration::from_secs(3600))
        .open(dir.path().join("log.redb"))
        .unwrap();
    for i in 0..5 {
        bus.publish_async(event(i)).await.unwrap();
    }
    let mut stream = bus
        .durable_stream("s", Filter::all(), Position::Beginning)
        .unwrap();
    for seq in 1..=5 {
        let d = next(&mut stream).await;
        assert_eq!((d.seq(), index(d.event())), (seq, seq - 1));
        d.ack().await.unwrap();
    }
    // Published once the stream waits: the fan-out wakes it.
    for i in 5..10 {
        bus.publish_async(event(i)).await.unwrap();
        let d = next(&mut stream).await; // woken by the fan-out
        assert_eq!((d.seq(), index(d.event())), (i + 1, i));
        d.ack().await.unwrap();
    }
}

/// A durable stream read while four tasks publish and the applier moves
/// events into the file every 2 ms, so its reads cross from memory to the
/// file as they run (G5): every event once, in `seq` order, with the id
/// its publisher was given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_stream_beside_publishers_and_applies_gets_each_event_once_in_order() {
    const PER_TASK: u64 = 500;
    let dir = tempfile::tempdir().unwrap();
    let bus = DurableBus::builder()
        .apply_interval(Duration::from_millis(2))
        .open(dir.path().join("log.redb"))
        .unwrap();
    let mut stream = bus
        .durable_stream("s", Filter::all(), Position::Beginning)
        .unwrap();
    let publishers: Vec<_> = (0..4)
        .map(|t| {
            let bus = bus.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..PER_TASK {
                    let r = bus.publish_async(event(t * PER_TASK + i)).await.unwrap();
                    ids.push((r.seq, r.id));
                }
                ids
            })
        })
        .collect();
    let mut got = Vec::new();
    for seq in 1..=4 * PER_TASK {
        let d = next(&mut stream).await;
        assert_eq!(d.seq(), seq, "a gap or a repeat");
        got.push((d.seq(), d.event().id));
        d.ack().await.unwrap();
    }
    let mut acked = Vec::new();
    for p in publishers {
        acked.extend(p.await.unwrap());
    }
    acked.sort_unstable();
    assert_eq!(got, acked);
}

/// An event of `tenant` with `i` in its payload.
fn tenant_event(tenant: &str, i: u64) -> Event {
    Event::new(Type::DEPLOY_STARTED, tenant).with_payload(payload(serde_json::json!({ "i": i })))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_streams_get_exactly_their_tenants_events_in_order_and_pass_the_others() {
    // Streams filtered to a tenant skip what the fan-out judged unwanted
    // without reading it (`PullWakers`): the events before a stream
    // started were never judged for it and must be read; after, every
    // event of its tenant must arrive once, in order, and its cursor must
    // move past the other tenants' events, with publishers on 4 tasks.
    const PER_TASK: u64 = 300;
    let dir = tempfile::tempdir().unwrap();
    let bus = DurableBus::open(dir.path().join("log.redb")).unwrap();
    let tenant_of = |i: u64| ["a", "b", "c"][(i % 3) as usize];
    let mut want: HashMap<&str, Vec<u64>> = HashMap::new();
    // Before any stream: 60 events over three tenants.
    for i in 0..60 {
        let r = bus.publish(tenant_event(tenant_of(i), i)).unwrap();
        want.entry(tenant_of(i)).or_default().push(r.seq);
    }
    let mut a = bus
        .durable_stream("a", Filter::all().tenant("a"), Position::Beginning)
        .unwrap();
    let mut b_deploys = bus
        .durable_stream(
            "b",
            Filter::types(["deploy.*"]).unwrap().tenant("b"),
            Position::Beginning,
        )
        .unwrap();
    // Wants nothing that is published: its cursor must still move.
    let _none = bus
        .durable_stream("none", Filter::all().tenant("z"), Position::Beginning)
        .unwrap();
    let publishers: Vec<_> = (0..4)
        .map(|t| {
            let bus = bus.clone();
            tokio::spawn(async move {
                let mut seqs = Vec::new();
                for k in 0..PER_TASK {
                    let i = 60 + t * PER_TASK + k;
                    let tenant = ["a", "b", "c"][(i % 3) as usize];
                    let r = bus.publish_async(tenant_event(tenant, i)).await.unwrap();
                    seqs.push((tenant, r.seq));
                }
                seqs
            })
        })
        .collect();
    for p in publishers {
        for (tenant, seq) in p.await.unwrap() {
            want.entry(tenant).or_default().push(seq);
        }
    }
    for seqs in want.values_mut() {
        seqs.sort_unstable();
    }
    for (stream, tenant) in [(&mut a, "a"), (&mut b_deploys, "b")] {
        let mut got = Vec::new();
        for _ in 0..want[tenant].len() {
            let d = next(stream).await;
            assert_eq!(d.event().tenant_id, tenant);
            got.push(d.seq());
            d.ack().await.unwrap();
        }
        assert_eq!(
            got, want[tenant],
            "stream {tenant}: a gap, a repeat or out of order"
        );
    }
    // Nothing more for either.
    for stream in [&mut a, &mut b_deploys] {
        let more = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
        assert!(
            more.is_err(),
            "a delivery past the tenant's events: {more:?}"
        );
    }
    // Every cursor reaches the last seq (the unwanted events are passed).
    let last = bus.last_seq();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let cursors = bus.cursors().unwrap();
        let behind: Vec<_> = cursors
            .iter()
            .filter(|c| c.delivered_seq != last)
            .map(|c| (c.name.clone(), c.delivered_seq))
            .collect();
        if behind.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "cursors behind {last}: {behind:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
