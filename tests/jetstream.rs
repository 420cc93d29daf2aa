//! `JetStreamBus` on a real 3-node NATS JetStream cluster on 127.0.0.1
//! (feature `jetstream`).
#![cfg(feature = "jetstream")]

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::nats::Cluster;
use ctrlbus::{Bus, Event, EventId, Filter, JetStreamBus, Position, ReadError, StorageError, Type};

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
    // contiguous. The read itself may find the cluster still settling after
    // the restart (under CI's load its requests once timed out for the
    // whole 10 s publish deadline, `Cluster { reason: "timed out" }`): what
    // this test is about is what the log holds, so the read is started
    // again until the cluster answers, within a minute. That includes a
    // read refused as short (a consumer that ended before the leader's last
    // seq): an event really lost makes every read short, and the test
    // fails after the minute with that error.
    let settle = std::time::Instant::now() + Duration::from_secs(60);
    let read: Vec<(u64, EventId)> = loop {
        let whole = bus
            .read(Position::Beginning, &Filter::all())
            .and_then(|r| r.map(|e| e.map(|e| (e.seq, e.event.id))).collect());
        match whole {
            Ok(read) => break read,
            Err(ReadError::Storage(StorageError::Cluster { reason }))
                if std::time::Instant::now() < settle =>
            {
                println!("the cluster did not answer the read yet: {reason}");
            }
            Err(e) => panic!("the read after the failover failed: {e}"),
        }
    };
    assert!(read.windows(2).all(|w| w[0].0 + 1 == w[1].0), "contiguous");
    let stored: std::collections::HashMap<u64, EventId> = read.iter().copied().collect();
    let newest_acked = acked.iter().map(|a| a.0).max();
    for (seq, id) in &acked {
        assert_eq!(
            stored.get(seq),
            Some(id),
            "acknowledged seq {seq} lost or moved (read {} events up to seq {:?}; newest acknowledged {newest_acked:?})",
            read.len(),
            read.last().map(|r| r.0),
        );
    }
    let ids: BTreeSet<EventId> = read.iter().map(|r| r.1).collect();
    assert_eq!(ids.len(), read.len(), "no event stored twice");
    assert_ne!(bus.stream_leader().unwrap(), None);
}

#[test]
fn durable_subscriptions_resume_dead_letter_and_are_shared_between_processes() {
    let Some(cluster) = Cluster::start(3) else {
        return;
    };
    let open = || {
        JetStreamBus::builder()
            .stream("durable")
            .max_deliveries(3)
            .retry_backoff(Duration::from_millis(5), Duration::from_millis(20))
            .connect(&cluster.urls())
            .unwrap()
    };
    let bus = open();
    for i in 0..20 {
        bus.publish(event("acme", Type::DEPLOY_STARTED, i)).unwrap();
    }
    // One subscriber: every event in order; event 7 fails for good.
    let handled: Arc<Mutex<Vec<u64>>> = Arc::default();
    let h = handled.clone();
    let sub = bus
        .subscribe_durable(
            "billing.v1",
            Filter::types(["deploy.*"]).unwrap(),
            Position::Beginning,
            move |e: &Event| -> Result<(), ctrlbus::HandlerError> {
                let i = e.payload["i"].as_u64().unwrap();
                if i == 7 {
                    return Err("seven".into());
                }
                h.lock().unwrap().push(i);
                Ok(())
            },
        )
        .unwrap();
    common::wait_until("20 handled", || {
        bus.cursor_position("billing.v1").unwrap_or(0) == 20
    });
    drop(sub);
    let want: Vec<u64> = (0..20).filter(|i| *i != 7).collect();
    assert_eq!(*handled.lock().unwrap(), want, "in seq order, each once");
    let dead = bus.dead_letters("billing.v1").unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].seq, dead[0].attempts), (8, 3));
    assert!(dead[0].error.contains("seven"));

    // Two processes (two clients) share the name: each event handled by
    // one of them, in seq order overall.
    for i in 20..60 {
        bus.publish(event("acme", Type::DEPLOY_STARTED, i)).unwrap();
    }
    let order: Arc<Mutex<Vec<(u64, usize)>>> = Arc::default();
    let (a, b) = (open(), open());
    let subs: Vec<_> = [&a, &b]
        .iter()
        .enumerate()
        .map(|(who, bus)| {
            let order = order.clone();
            bus.subscribe_durable(
                "billing.v1",
                Filter::all(),
                Position::Beginning,
                move |e: &Event| -> Result<(), ctrlbus::HandlerError> {
                    order
                        .lock()
                        .unwrap()
                        .push((e.payload["i"].as_u64().unwrap(), who));
                    std::thread::sleep(Duration::from_millis(2));
                    Ok(())
                },
            )
            .unwrap()
        })
        .collect();
    common::wait_until("60 handled", || {
        bus.cursor_position("billing.v1").unwrap_or(0) == 60
    });
    drop(subs);
    let order = order.lock().unwrap().clone();
    let items: Vec<u64> = order.iter().map(|o| o.0).collect();
    assert_eq!(
        items,
        (20..60).collect::<Vec<_>>(),
        "resumed at 21, in order, once each"
    );
    assert!(bus.delete_cursor("billing.v1").is_ok());
    assert!(matches!(
        bus.cursor_position("billing.v1"),
        Err(ctrlbus::CursorError::Unknown(_))
    ));
    assert!(
        bus.subscribe_durable(
            "bad name",
            Filter::all(),
            Position::Beginning,
            |_: &Event| Ok::<(), ctrlbus::HandlerError>(())
        )
        .is_err()
    );
}

/// The child of the kill -9 test: handles events of a shared durable
/// subscription, printing `handled <i>`, and hangs on event 5.
#[test]
fn shared_subscription_child() {
    let Ok(urls) = std::env::var("CTRLBUS_JS_CHILD") else {
        return;
    };
    let bus = JetStreamBus::builder()
        .stream("shared")
        .ack_wait(Duration::from_secs(2))
        .connect(&urls)
        .unwrap();
    let _sub = bus
        .subscribe_durable(
            "worker",
            Filter::all(),
            Position::Beginning,
            |e: &Event| -> Result<(), ctrlbus::HandlerError> {
                let i = e.payload["i"].as_u64().unwrap();
                println!("handled {i}");
                if i == 5 {
                    std::thread::sleep(Duration::from_secs(3600));
                }
                Ok(())
            },
        )
        .unwrap();
    println!("ready");
    std::thread::sleep(Duration::from_secs(3600));
}

#[test]
fn a_process_killed_mid_event_hands_it_to_the_other_within_ack_wait() {
    use std::io::BufRead;
    if std::env::var("CTRLBUS_JS_CHILD").is_ok() {
        return;
    }
    let Some(cluster) = Cluster::start(3) else {
        return;
    };
    let bus = JetStreamBus::builder()
        .stream("shared")
        .ack_wait(Duration::from_secs(2))
        .connect(&cluster.urls())
        .unwrap();
    for i in 0..10 {
        bus.publish(event("acme", Type::DEPLOY_STARTED, i)).unwrap();
    }
    let mut child = common::spawn_self(
        "shared_subscription_child",
        ("CTRLBUS_JS_CHILD", cluster.urls()),
    );
    let out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut by_child = Vec::new();
    for line in out.lines() {
        let line = line.unwrap();
        if let Some(i) = line.split("handled ").nth(1) {
            let i: u64 = i.trim().parse().unwrap();
            by_child.push(i);
            if i == 5 {
                break; // it hangs on 5 now
            }
        }
    }
    child.kill().unwrap(); // SIGKILL, mid-event
    child.wait().unwrap();
    assert_eq!(by_child, [0, 1, 2, 3, 4, 5]);
    // This process takes over: 5 comes again (unacked, after ack_wait),
    // then the rest, in order, none lost.
    let handled: Arc<Mutex<Vec<u64>>> = Arc::default();
    let h = handled.clone();
    let started = std::time::Instant::now();
    let _sub = bus
        .subscribe_durable(
            "worker",
            Filter::all(),
            Position::Beginning,
            move |e: &Event| -> Result<(), ctrlbus::HandlerError> {
                h.lock().unwrap().push(e.payload["i"].as_u64().unwrap());
                Ok(())
            },
        )
        .unwrap();
    common::wait_until("the rest handled", || handled.lock().unwrap().len() == 5);
    assert_eq!(*handled.lock().unwrap(), [5, 6, 7, 8, 9]);
    println!("took over after {:?} (ack_wait 2 s)", started.elapsed());
    // The last ack is confirmed by the server just after its handler ran.
    common::wait_until("the position past the last event", || {
        bus.cursor_position("worker").unwrap() == 10
    });
}

#[cfg(feature = "cli")]
#[test]
fn the_command_line_runs_on_the_cluster_with_nats() {
    let Some(cluster) = Cluster::start(3) else {
        return;
    };
    let bin = env!("CARGO_BIN_EXE_ctrlbus");
    let run = |args: &[&str], stdin: Option<&str>| {
        let mut c = std::process::Command::new(bin);
        c.env_remove("CTRLBUS_DB")
            .env("CTRLBUS_NATS", cluster.urls())
            .args(["--stream", "cli"])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        if let Some(input) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        } else {
            drop(child.stdin.take());
        }
        child.wait_with_output().unwrap()
    };
    let ok = |args: &[&str], stdin: Option<&str>| {
        let out = run(args, stdin);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .collect::<Vec<_>>()
    };
    let one = ok(
        &[
            "publish",
            "deploy.started",
            "--tenant",
            "acme",
            "--payload",
            r#"{"v":1}"#,
        ],
        None,
    );
    assert_eq!(one[0]["seq"], 1);
    assert_eq!(one[0]["payload"]["v"], 1);
    let file = "{\"type\":\"health.passed\",\"tenant_id\":\"acme\"}\n\
                {\"type\":\"deploy.failed\",\"tenant_id\":\"beta\"}\n\
                {\"type\":\"deploy.succeeded\",\"tenant_id\":\"acme\"}\n";
    let summary = ok(&["publish", "--file", "-"], Some(file));
    assert_eq!(summary[0]["published"], 3);
    assert_eq!(summary[0]["last_seq"], 4);
    let all = ok(&["replay"], None);
    assert_eq!(
        all.iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    let deploys = ok(&["replay", "--type", "deploy.*", "--tenant", "acme"], None);
    assert_eq!(
        deploys
            .iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 4]
    );
    assert_eq!(
        ok(&["replay", "--from-seq", "3", "--limit", "1"], None)[0]["seq"],
        3
    );
    let tail = ok(&["tail", "-n", "2"], None);
    assert_eq!(
        tail.iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [3, 4]
    );
    let stats = ok(&["stats"], None);
    assert_eq!(stats[0]["last_seq"], 4);
    assert_eq!(stats[0]["stream"], "cli");
    // What doesn't apply says so; what isn't there yet says so.
    let out = run(&["compact"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not apply"));
    let out = run(&["check"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not available with --nats yet"));
    // The events are the same as the library reads.
    let bus = JetStreamBus::builder()
        .stream("cli")
        .connect(&cluster.urls())
        .unwrap();
    // Cursors: a library subscription, listed, moved and deleted.
    let sub = bus
        .subscribe_durable(
            "billing",
            Filter::types(["deploy.*"]).unwrap(),
            Position::Beginning,
            |_: &Event| -> Result<(), ctrlbus::HandlerError> { Ok(()) },
        )
        .unwrap();
    common::wait_until("billing caught up", || {
        bus.cursor_position("billing").unwrap() == 4
    });
    drop(sub);
    let cursors = ok(&["cursors", "list"], None);
    assert_eq!(cursors.len(), 1, "{cursors:?}");
    assert_eq!(cursors[0]["name"], "billing");
    assert_eq!(cursors[0]["delivered_seq"], 4);
    assert_eq!(cursors[0]["filter"]["types"][0], "deploy.*");
    common::wait_until("billing idle", || {
        ok(&["cursors", "show", "billing"], None)[0]["state"] == "idle"
    });
    let moved = ok(&["cursors", "seek", "billing", "--to-seq", "2"], None);
    assert_eq!(
        (moved[0]["delivered_seq"].as_u64(), moved[0]["lag"].as_u64()),
        (Some(1), Some(3))
    );
    let out = run(&["cursors", "show", "nope"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown cursor"));
    assert_eq!(
        ok(&["cursors", "delete", "billing"], None)[0]["deleted"],
        "billing"
    );
    assert!(ok(&["cursors", "list"], None).is_empty());
    let lib: Vec<String> = bus
        .read(Position::Beginning, &Filter::all())
        .unwrap()
        .map(|e| e.unwrap().event.id.to_string())
        .collect();
    let cli: Vec<String> = all
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(lib, cli);
}

#[test]
fn publish_async_from_200_tasks_gives_distinct_contiguous_seqs_after_local_subscribers_ran() {
    let Some(cluster) = Cluster::start(3) else {
        return;
    };
    let bus = connect(&cluster, "async");
    let seen: Arc<Mutex<BTreeSet<EventId>>> = Arc::default();
    let s = seen.clone();
    let _sub = bus
        .subscribe(
            Filter::all(),
            move |e: &Event| -> Result<(), ctrlbus::HandlerError> {
                s.lock().unwrap().insert(e.id);
                Ok(())
            },
        )
        .unwrap();
    // The application's own runtime, not the bus's.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let seqs: BTreeSet<u64> = rt.block_on(async {
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let (bus, seen) = (bus.clone(), seen.clone());
                tokio::spawn(async move {
                    let e = event("acme", Type::DEPLOY_STARTED, i);
                    let id = e.id;
                    let r = bus.publish_async(e.clone()).await.unwrap();
                    assert!(
                        seen.lock().unwrap().contains(&id),
                        "G4: resolved after the subscriber ran"
                    );
                    let again = bus.publish_async(e).await.unwrap();
                    assert!(again.duplicate);
                    assert_eq!(again.seq, r.seq);
                    r.seq
                })
            })
            .collect();
        let mut seqs = BTreeSet::new();
        for t in tasks {
            assert!(seqs.insert(t.await.unwrap()), "a seq given twice");
        }
        seqs
    });
    assert_eq!(seqs, (1..=200).collect());
    // A live stream: bounded, reporting what it dropped.
    let mut stream = bus.stream_with_capacity(Filter::all(), 8).unwrap();
    for i in 0..20 {
        bus.publish(event("acme", Type::DEPLOY_STARTED, 1000 + i))
            .unwrap();
    }
    rt.block_on(async {
        use futures::StreamExt;
        assert_eq!(
            stream.next().await.unwrap(),
            Err(ctrlbus::stream::Lagged { missed: 12 })
        );
        for i in 12..20 {
            let e = stream.next().await.unwrap().unwrap();
            assert_eq!(e.payload["i"], 1000 + i);
        }
    });
    let bad = rt.block_on(bus.publish_async(Event::new(Type::DEPLOY_STARTED, "x".repeat(300))));
    assert!(bad.is_err());
    assert_eq!(
        bus.last_seq().unwrap(),
        220,
        "200, then the stream's 20; nothing refused"
    );
}

/// Kill -9 of the publishing process: `ctrlbus --nats … bench publish
/// --acks FILE` (8 publishers, each id appended to FILE once its publish
/// returned) is killed with SIGKILL mid-run. Every acknowledged id is in the stream,
/// each once, and the stream's seqs are contiguous.
#[cfg(feature = "cli")]
#[test]
fn killing_the_publishing_process_loses_nothing_acknowledged() {
    let Some(cluster) = Cluster::start(3) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let acks = dir.path().join("acked.txt");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ctrlbus"))
        .env_remove("CTRLBUS_DB")
        .args([
            "--nats",
            &cluster.urls(),
            "--stream",
            "killed",
            "bench",
            "publish",
        ])
        .args(["--events", "1000000", "--publishers", "8", "--threads", "8"])
        .arg("--acks")
        .arg(&acks)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let acked_lines = || std::fs::read_to_string(&acks).map_or(0, |s| s.lines().count());
    common::wait_until("500 publishes acknowledged", || acked_lines() >= 500);
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success(), "killed before it finished");
    // Only whole lines count: the last write may have been cut.
    let text = std::fs::read_to_string(&acks).unwrap();
    let acked: Vec<EventId> = text
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert!(acked.len() >= 500);
    let bus = connect(&cluster, "killed");
    let mut seqs = Vec::new();
    let mut ids = std::collections::HashMap::new();
    for entry in bus.read(Position::Beginning, &Filter::all()).unwrap() {
        let entry = entry.unwrap();
        seqs.push(entry.seq);
        assert!(
            ids.insert(entry.event.id, entry.seq).is_none(),
            "an id stored twice"
        );
    }
    let n = seqs.len() as u64;
    assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "contiguous seqs");
    let lost: Vec<_> = acked.iter().filter(|id| !ids.contains_key(id)).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged events lost: {lost:?}",
        lost.len()
    );
    println!(
        "{} acknowledged, {n} stored (the rest were in flight)",
        acked.len()
    );
}

/// Webhooks from the command line on the cluster, and kill -9 of a
/// delivery process mid-delivery: `deliver` process A hangs in an attempt
/// (the receiver holds event 3's first request) and killed with SIGKILL; two
/// `deliver --until-idle` processes, B and C, then share the rest. Every
/// delivery succeeds; every event reaches its own tenant's URL, signed with
/// that webhook's secret, at least once; event 3 and at most one other
/// attempt A had in flight are made again, and nothing else is.
#[cfg(feature = "cli")]
#[test]
fn killing_a_delivery_process_mid_delivery_leaves_the_rest_to_the_others() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let Some(cluster) = Cluster::start(3) else {
        return;
    };
    let hang = Arc::new(AtomicBool::new(true));
    let hanging = Arc::new(AtomicBool::new(false));
    let (in_flight, max_in_flight) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (hold, held, now_in, most) = (
        hang.clone(),
        hanging.clone(),
        in_flight.clone(),
        max_in_flight.clone(),
    );
    let rx = common::receiver::Receiver::start(Arc::new(move |_, got| {
        let now = now_in.fetch_add(1, Ordering::SeqCst) + 1;
        most.fetch_max(now, Ordering::SeqCst);
        let event = Event::from_json(&got.body).unwrap();
        if event.payload["i"] == 3 && hold.load(Ordering::SeqCst) {
            held.store(true, Ordering::SeqCst);
            while hold.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
            }
        } else {
            std::thread::sleep(Duration::from_millis(50));
        }
        now_in.fetch_sub(1, Ordering::SeqCst);
        (200, vec![])
    }));
    let bin = env!("CARGO_BIN_EXE_ctrlbus");
    let ctrlbus = |args: &[&str]| {
        let mut c = std::process::Command::new(bin);
        c.env_remove("CTRLBUS_DB")
            .args(["--nats", &cluster.urls(), "--stream", "hooks"])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        c
    };
    let json = |out: std::process::Output| -> Vec<serde_json::Value> {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let mut secrets = std::collections::HashMap::new();
    for tenant in ["a", "b"] {
        let url = format!("{}/{tenant}", rx.url);
        let added = json(
            ctrlbus(&["webhooks", "add", "--tenant", tenant, "--url", &url])
                .arg("--allow-private-targets")
                .output()
                .unwrap(),
        );
        secrets.insert(tenant, added[0]["secret"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        json(ctrlbus(&["webhooks", "list"]).output().unwrap()).len(),
        2
    );
    let listed = json(
        ctrlbus(&["webhooks", "list", "--tenant", "a"])
            .output()
            .unwrap(),
    );
    assert!(
        listed[0].get("secret").is_none(),
        "a listing shows no secret"
    );
    let bus = connect(&cluster, "hooks");
    for i in 0..20 {
        bus.publish(event(["a", "b"][i as usize % 2], Type::DEPLOY_STARTED, i))
            .unwrap();
    }
    let deliver = |extra: &[&str]| {
        ctrlbus(&["deliver", "--allow-private-targets", "--timeout", "2s"])
            .args(extra)
            .spawn()
            .unwrap()
    };
    let mut first = deliver(&["--workers", "2"]);
    let hooks = bus.webhooks();
    common::wait_until("A mid-delivery, every delivery created", || {
        hanging.load(Ordering::SeqCst)
            && hooks
                .deliveries(&ctrlbus::DeliveryQuery::default())
                .unwrap()
                .len()
                == 20
    });
    first.kill().unwrap(); // SIGKILL, mid-attempt
    let killed_at = std::time::Instant::now();
    first.wait().unwrap();
    hang.store(false, Ordering::SeqCst);
    max_in_flight.store(0, Ordering::SeqCst);
    let others = [
        deliver(&["--workers", "1", "--until-idle"]),
        deliver(&["--workers", "1", "--until-idle"]),
    ];
    for p in others {
        let summary = json(p.wait_with_output().unwrap());
        assert_eq!(summary[0]["stopped_by"], "idle");
        assert_eq!(
            (
                summary[0]["pending"].as_u64(),
                summary[0]["failed"].as_u64()
            ),
            (Some(0), Some(0))
        );
        assert_eq!(summary[0]["succeeded"], 20);
    }
    let got = rx.got();
    let mut per_event = std::collections::HashMap::<String, usize>::new();
    for g in &got {
        let event = Event::from_json(&g.body).unwrap();
        assert!(
            g.path.ends_with(&format!("/{}", event.tenant_id)),
            "misrouted: {}",
            g.path
        );
        let secret = ctrlbus::Secret::parse(&secrets[event.tenant_id.as_str()]).unwrap();
        ctrlbus::webhook::verify(
            &secret,
            &g.headers,
            &g.body,
            ctrlbus::webhook::DEFAULT_TOLERANCE,
        )
        .unwrap();
        *per_event
            .entry(g.headers["webhook-id"].clone())
            .or_default() += 1;
    }
    assert_eq!(per_event.len(), 20, "every event delivered");
    // At least once: an attempt A had in flight (or made but not yet
    // recorded) when it was killed is made again, and only those.
    let twice: Vec<u64> = bus
        .read(Position::Beginning, &Filter::all())
        .unwrap()
        .map(|e| e.unwrap().event)
        .filter(|e| per_event[&e.id.to_string()] > 1)
        .map(|e| e.payload["i"].as_u64().unwrap())
        .collect();
    assert!(
        twice.contains(&3),
        "the held attempt was made again: {twice:?}"
    );
    assert!(
        twice.len() <= 2,
        "at most A's 2 attempts in flight: {twice:?}"
    );
    assert!(per_event.values().all(|n| *n <= 2), "{per_event:?}");
    for g in &got {
        let event = Event::from_json(&g.body).unwrap();
        let i = event.payload["i"].as_u64().unwrap();
        let first = got
            .iter()
            .find(|o| o.headers["webhook-id"] == event.id.to_string())
            .unwrap();
        if twice.contains(&i) {
            assert!(first.at < killed_at, "event {i}'s first attempt was A's");
        }
    }
    println!(
        "B and C: up to {} attempts at once",
        max_in_flight.load(Ordering::SeqCst)
    );
    // The records, from the command line.
    let done = json(
        ctrlbus(&["deliveries", "list", "--status", "succeeded"])
            .output()
            .unwrap(),
    );
    assert_eq!(done.len(), 20);
    let id = done[0]["id"].as_str().unwrap();
    let shown = json(ctrlbus(&["deliveries", "show", id]).output().unwrap());
    assert_eq!(shown[0]["attempt_log"].as_array().unwrap().len(), 1);
    let retried = json(ctrlbus(&["deliveries", "retry", id]).output().unwrap());
    assert_eq!(retried[0]["status"], "pending");
    let webhook = done[0]["webhook_id"].as_str().unwrap();
    let disabled = json(ctrlbus(&["webhooks", "disable", webhook]).output().unwrap());
    assert_eq!(disabled[0]["active"], false);
    let failed = json(ctrlbus(&["deliveries", "show", id]).output().unwrap());
    assert_eq!(
        failed[0]["status"], "failed",
        "disabling fails the pending delivery"
    );
    assert!(failed[0]["error"].as_str().unwrap().contains("disabled"));
}

/// The next delivery of a durable stream, failing the test after 20 s.
async fn next(s: &mut ctrlbus::stream::DurableStream) -> ctrlbus::stream::Delivery {
    use futures::StreamExt;
    match tokio::time::timeout(Duration::from_secs(20), s.next()).await {
        Ok(Some(Ok(d))) => d,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

/// `durable_stream` on the cluster: deliveries in `seq` order, one
/// unanswered at a time; a nack comes again after its delay as the next
/// attempt; dropped with a delivery unanswered, the stream resumes (under
/// the same name) at that delivery, the server counting it as an attempt.
/// Every call is made from async code, the last handle dropped in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_stream_on_the_cluster_acks_nacks_and_resumes() {
    let Some(cluster) = Cluster::start(3) else {
        return;
    };
    let urls = cluster.urls();
    let bus = tokio::task::spawn_blocking(move || {
        JetStreamBus::builder()
            .stream("sse")
            .connect(&urls)
            .unwrap()
    })
    .await
    .unwrap();
    for i in 0..30 {
        bus.publish_async(event("acme", Type::DEPLOY_STARTED, i))
            .await
            .unwrap();
    }
    let open = |bus: &JetStreamBus| {
        bus.durable_stream("sse", Filter::all(), Position::Beginning)
            .unwrap()
    };
    let mut stream = open(&bus);
    for seq in 1..=10 {
        let d = next(&mut stream).await;
        assert_eq!((d.seq(), d.attempt()), (seq, 1));
        assert_eq!(d.event().payload["i"], seq - 1);
        d.ack().await.unwrap();
    }
    assert_eq!(stream.position(), 10);
    let d = next(&mut stream).await;
    assert_eq!(d.seq(), 11);
    let nacked_at = std::time::Instant::now();
    d.nack(Duration::from_millis(300));
    let d = next(&mut stream).await;
    assert_eq!(
        (d.seq(), d.attempt()),
        (11, 2),
        "the nacked one, before any later"
    );
    assert!(nacked_at.elapsed() >= Duration::from_millis(250));
    d.ack().await.unwrap();
    let unanswered = next(&mut stream).await;
    assert_eq!(unanswered.seq(), 12);
    let b = bus.clone();
    tokio::task::spawn_blocking(move || drop((stream, b)))
        .await
        .unwrap();
    drop(unanswered);
    let b = bus.clone();
    let position = tokio::task::spawn_blocking(move || b.cursor_position("sse").unwrap())
        .await
        .unwrap();
    assert_eq!(position, 11);
    let mut stream = open(&bus);
    let d = next(&mut stream).await;
    assert_eq!(d.seq(), 12, "resumes at the unanswered delivery");
    assert_eq!(d.attempt(), 2, "the server counted the unanswered delivery");
    d.ack().await.unwrap();
    tokio::task::spawn_blocking(move || drop((stream, bus)))
        .await
        .unwrap();
}

/// Foreign entries in the cluster's webhook state: a registry entry that
/// isn't a webhook, a delivery record that isn't one, a job that isn't
/// one. Listings name the damaged entry; dispatch and delivery skip it and
/// deliver every other webhook's events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_entries_in_the_webhook_buckets_are_reported_and_hold_up_nothing() {
    let Some(cluster) = Cluster::start(3) else {
        return;
    };
    let rx = common::receiver::Receiver::ok();
    let bus = connect(&cluster, "foreign");
    let hooks = bus.webhooks().allow_private_targets(true);
    let good = hooks.create(common::hook_for("acme", &rx.url)).unwrap();
    let urls: Vec<String> = cluster.urls().split(',').map(str::to_owned).collect();
    let client = async_nats::connect(urls).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let registry = js.get_key_value("foreign_webhooks").await.unwrap();
    let damaged = ctrlbus::WebhookId::new().to_string();
    registry
        .put(&damaged, "not a webhook".into())
        .await
        .unwrap();
    let deliveries = js.get_key_value("foreign_deliveries").await.unwrap();
    let bad_delivery = ctrlbus::DeliveryId::new();
    deliveries
        .put(bad_delivery.to_string(), r#"{"nope":1}"#.into())
        .await
        .unwrap();
    for job in [format!("{bad_delivery}:0"), "garbage".to_owned()] {
        js.publish(format!("foreign_jobs.{}", good.webhook.id), job.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let e = bus
        .publish(Event::new(Type::DEPLOY_STARTED, "acme"))
        .unwrap();
    let worker = ctrlbus::JetStreamDeliveryWorker::start(
        bus.clone(),
        ctrlbus::DeliveryOptions {
            allow_private_targets: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(
        worker.wait_idle(Some(Duration::from_secs(30))),
        "the bad jobs were dropped"
    );
    worker.stop();
    let got = rx.got();
    assert_eq!(got.len(), 1, "the good webhook got its event");
    assert_eq!(got[0].headers["webhook-id"], e.id.to_string());
    let err = hooks.list(None).unwrap_err().to_string();
    assert!(
        err.contains(&damaged),
        "the listing names the damaged entry: {err}"
    );
    let err = hooks
        .deliveries(&ctrlbus::DeliveryQuery::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains(&bad_delivery.to_string()), "{err}");
    assert!(hooks.get(good.webhook.id).unwrap().active);
    drop(bus);
}
