//! `JetStreamBus` on a real 3-node NATS JetStream cluster on 127.0.0.1
//! (feature `jetstream`).
#![cfg(feature = "jetstream")]

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::nats::Cluster;
use ctrlbus::{Bus, Event, EventId, Filter, HandlerError, JetStreamBus, Position, Type};

fn event(tenant: &str, ty: Type, i: u64) -> Event {
    Event::new(ty, tenant).with_payload(serde_json::json!({ "i": i }).as_object().unwrap().clone())
}

fn connect(cluster: &Cluster, stream: &str) -> JetStreamBus {
    JetStreamBus::builder()
        .stream(stream)
        .connect(&cluster.urls())
        .unwrap()
}

#[test]
fn publish_gives_contiguous_seqs_drops_repeated_ids_and_reads_back_filtered_on_the_server() {
    let Some(cluster) = Cluster::start(3) else {
        return;
    };
    let bus = connect(&cluster, "basics");
    let mut seqs = Vec::new();
    let mut first = None;
    for i in 0..30 {
        let (tenant, ty) = match i % 3 {
            0 => ("acme", Type::DEPLOY_STARTED),
            1 => ("beta", Type::DEPLOY_FAILED),
            _ => ("acme.with*odd >chars", Type::HEALTH_DEGRADED),
        };
        let e = event(tenant, ty, i);
        first.get_or_insert_with(|| e.clone());
        let r = bus.publish(e).unwrap();
        assert!(!r.duplicate);
        seqs.push(r.seq);
    }
    assert_eq!(
        seqs,
        (1..=30).collect::<Vec<_>>(),
        "seq is the stream sequence"
    );
    // The same id again: the original receipt, nothing stored.
    let again = bus.publish(first.clone().unwrap()).unwrap();
    assert!(again.duplicate);
    assert_eq!(again.seq, 1);
    assert_eq!(bus.last_seq().unwrap(), 30);

    // Everything, in order, exactly as published.
    let all: Vec<_> = bus
        .read(Position::Beginning, &Filter::all())
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(all.len(), 30);
    assert_eq!(all[0].event, first.unwrap());
    assert!(all.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
    assert!(
        all.windows(2).all(|w| w[0].appended_at <= w[1].appended_at),
        "append time never decreases"
    );
    // Type pattern and tenant, including a tenant that is not subject-safe.
    let f = Filter::types(["deploy.*"]).unwrap().tenant("acme");
    let got: Vec<u64> = bus
        .read(Position::Beginning, &f)
        .unwrap()
        .map(|e| e.unwrap().seq)
        .collect();
    assert_eq!(got, (0..10).map(|k| 3 * k + 1).collect::<Vec<_>>());
    let odd = Filter::all().tenant("acme.with*odd >chars");
    assert_eq!(bus.read(Position::Beginning, &odd).unwrap().count(), 10);
    assert_eq!(
        bus.read(Position::Beginning, &Filter::all().tenant("acme"))
            .unwrap()
            .count(),
        10,
        "a tenant never sees another's events"
    );
    // From a seq, from a time, from the end.
    assert_eq!(
        bus.read(Position::Seq(25), &Filter::all()).unwrap().count(),
        6
    );
    let t = all[20].appended_at;
    let from_t: Vec<u64> = bus
        .read(Position::Time(t), &Filter::all())
        .unwrap()
        .map(|e| e.unwrap().seq)
        .collect();
    assert_eq!(
        from_t.first(),
        Some(&all.iter().find(|e| e.appended_at >= t).unwrap().seq)
    );
    assert_eq!(bus.read(Position::End, &Filter::all()).unwrap().count(), 0);
    // An empty match ends at once.
    assert_eq!(
        bus.read(Position::Beginning, &Filter::all().tenant("nobody"))
            .unwrap()
            .count(),
        0
    );
    // recent_events: the newest, oldest first.
    let recent = bus.recent_events(3, &Filter::all()).unwrap();
    assert_eq!(recent.len(), 3);
    assert_eq!(recent[2], all[29].event);
    // Bad input is refused before anything is sent.
    assert!(
        bus.publish(Event::new(Type::DEPLOY_STARTED, "x".repeat(300)))
            .is_err()
    );
    assert_eq!(bus.last_seq().unwrap(), 30);
    // A second bus on the same stream sees the same log.
    let other = connect(&cluster, "basics");
    assert_eq!(
        other
            .read(Position::Beginning, &Filter::all())
            .unwrap()
            .count(),
        30
    );
    assert!(
        JetStreamBus::builder()
            .stream("bad.name")
            .connect(&cluster.urls())
            .is_err()
    );
}

#[test]
fn publish_returns_after_this_process_live_subscribers_ran() {
    let Some(cluster) = Cluster::start(3) else {
        return;
    };
    let bus = connect(&cluster, "live");
    bus.publish(event("acme", Type::DEPLOY_STARTED, 0)).unwrap();
    let seen: Arc<Mutex<Vec<EventId>>> = Arc::default();
    let s = seen.clone();
    let sub = bus
        .subscribe(
            Filter::types(["deploy.*"]).unwrap(),
            move |e: &Event| -> Result<(), HandlerError> {
                s.lock().unwrap().push(e.id);
                if e.payload["i"] == 7 {
                    return Err("seven".into());
                }
                Ok(())
            },
        )
        .unwrap();
    let mut published = Vec::new();
    for i in 1..=10 {
        let ty = if i % 2 == 0 {
            Type::HEALTH_PASSED
        } else {
            Type::DEPLOY_STARTED
        };
        let deploy = ty == Type::DEPLOY_STARTED;
        let e = event("acme", ty, i);
        let id = e.id;
        let r = bus.publish(e).unwrap();
        if deploy {
            // G4: the subscriber ran before publish returned.
            assert_eq!(seen.lock().unwrap().last(), Some(&id));
            published.push(id);
        }
        assert_eq!(r.handler_failures.len(), usize::from(i == 7), "{i}");
    }
    assert_eq!(
        *seen.lock().unwrap(),
        published,
        "from the subscription on, in order"
    );
    drop(sub);
    bus.publish(event("acme", Type::DEPLOY_STARTED, 11))
        .unwrap();
    assert_eq!(seen.lock().unwrap().len(), 5, "not after unsubscribe");
}

#[test]
fn killing_the_stream_leader_while_8_publishers_write_loses_nothing_acknowledged() {
    let Some(mut cluster) = Cluster::start(3) else {
        return;
    };
    // The default publish deadline (10 s) rides through the election.
    let bus = connect(&cluster, "failover");
    bus.publish(event("acme", Type::DEPLOY_STARTED, 0)).unwrap();
    let leader = bus.stream_leader().unwrap().expect("a leader");
    let acked: Arc<Mutex<Vec<(u64, EventId)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut publishers = Vec::new();
    for p in 0..8 {
        let (bus, acked, stop) = (bus.clone(), acked.clone(), stop.clone());
        publishers.push(std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let e = event("acme", Type::DEPLOY_STARTED, p * 1_000_000 + i);
                let id = e.id;
                // Rides through the election: an error here fails the test.
                let t = std::time::Instant::now();
                let r = bus
                    .publish(e)
                    .expect("a publish failed across the failover");
                if t.elapsed() > Duration::from_secs(1) {
                    println!("a publish waited {:?} for the failover", t.elapsed());
                }
                acked.lock().unwrap().push((r.seq, id));
                i += 1;
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(500));
    let before = acked.lock().unwrap().len();
    cluster.node(&leader).kill();
    // A new leader is elected and the publishers go on (the deadline of a
    // publish, 10 s, covers the election and the client's reconnect).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().len() < before + 100 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let during = acked.lock().unwrap().len();
    let new_leader = bus.stream_leader().unwrap();
    assert_ne!(new_leader.as_deref(), Some(leader.as_str()), "a new leader");
    cluster.node(&leader).restart();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for p in publishers {
        p.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        during >= before + 100,
        "publishers stalled after the leader died: {before} then {during}"
    );
    // Every acknowledged event is in the stream, at its seq, once; seqs are
    // contiguous.
    let read: Vec<(u64, EventId)> = bus
        .read(Position::Beginning, &Filter::all())
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.seq, e.event.id)
        })
        .collect();
    assert!(read.windows(2).all(|w| w[0].0 + 1 == w[1].0), "contiguous");
    let stored: std::collections::HashMap<u64, EventId> = read.iter().copied().collect();
    for (seq, id) in &acked {
        assert_eq!(
            stored.get(seq),
            Some(id),
            "acknowledged seq {seq} lost or moved"
        );
    }
    let ids: BTreeSet<EventId> = read.iter().map(|r| r.1).collect();
    assert_eq!(ids.len(), read.len(), "no event stored twice");
    assert_ne!(bus.stream_leader().unwrap(), None);
}
