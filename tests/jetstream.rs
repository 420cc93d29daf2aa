//! `JetStreamBus` on a real 3-node NATS JetStream cluster on 127.0.0.1
//! (feature `jetstream`).
#![cfg(feature = "jetstream")]

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::nats::Cluster;
use ctrlbus::{Bus, Event, EventId, Filter, JetStreamBus, Position, Type};

fn event(tenant: &str, ty: Type, i: u64) -> Event {
    Event::new(ty, tenant).with_payload(serde_json::json!({ "i": i }).as_object().unwrap().clone())
}

fn connect(cluster: &Cluster, stream: &str) -> JetStreamBus {
    JetStreamBus::builder()
        .stream(stream)
        .connect(&cluster.urls())
        .unwrap()
}

/// What only this backend has: tenants that are not subject-safe, stream
/// names, a second client on the same stream. The contract itself is in
/// `tests/contract.rs`.
#[test]
fn any_tenant_is_stored_and_filtered_and_a_second_client_sees_the_same_log() {
    let Some(cluster) = Cluster::start(3) else {
        return;
    };
    let bus = connect(&cluster, "tenants");
    let odd = ["acme.with*odd >chars", "", "ünï", "a\tb", "*", ">"];
    for (i, tenant) in odd.iter().enumerate() {
        bus.publish(event(tenant, Type::DEPLOY_STARTED, i as u64))
            .unwrap();
        bus.publish(event("plain", Type::DEPLOY_STARTED, i as u64))
            .unwrap();
    }
    for tenant in odd {
        let got: Vec<_> = bus
            .read(Position::Beginning, &Filter::all().tenant(tenant))
            .unwrap()
            .map(|e| e.unwrap().event.tenant_id)
            .collect();
        assert_eq!(got, [tenant], "{tenant:?} alone, filtered on the server");
    }
    let other = connect(&cluster, "tenants");
    assert_eq!(
        other
            .read(Position::Beginning, &Filter::all())
            .unwrap()
            .count(),
        12
    );
    assert_eq!(other.last_seq().unwrap(), 12);
    for bad in ["bad.name", "", "a b", "x*"] {
        assert!(
            JetStreamBus::builder()
                .stream(bad)
                .connect(&cluster.urls())
                .is_err(),
            "{bad:?}"
        );
    }
    // Nothing listens there: a clear error, not a hang.
    let err = JetStreamBus::builder()
        .connect("nats://127.0.0.1:1")
        .unwrap_err();
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
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
