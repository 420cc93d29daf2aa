//! Metrics (feature `metrics`): a recording backend sees the counters,
//! gauges and histograms move as events flow. One test: the recorder is
//! process-wide.
#![cfg(all(feature = "metrics", feature = "tokio"))]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ctrlbus::telemetry;
use ctrlbus::{
    Bus, DeliveryOptions, DeliveryWorker, DurableBus, Event, Filter, HandlerError, Position, Type,
};
mod common;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

/// Recorded values by metric name and sorted labels.
type Metrics = HashMap<(String, Vec<(String, String)>), DebugValue>;

/// The metrics recorded so far, by name and sorted labels.
fn snapshot(s: &Snapshotter) -> Metrics {
    s.snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let key = key.key();
            let mut labels: Vec<(String, String)> = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            ((key.name().to_owned(), labels), value)
        })
        .collect()
}

fn counter(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> u64 {
    let labels = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    match m.get(&(name.to_owned(), labels)) {
        Some(DebugValue::Counter(n)) => *n,
        None => 0,
        other => panic!("{name} is not a counter: {other:?}"),
    }
}

fn gauge(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let labels = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    match m.get(&(name.to_owned(), labels)) {
        Some(DebugValue::Gauge(v)) => Some(v.into_inner()),
        None => None,
        other => panic!("{name} is not a gauge: {other:?}"),
    }
}

/// The values a histogram recorded (since the last snapshot).
fn histogram(m: &Metrics, name: &str) -> Vec<f64> {
    match m.get(&(name.to_owned(), Vec::new())) {
        Some(DebugValue::Histogram(v)) => v.iter().map(|x| x.into_inner()).collect(),
        None => Vec::new(),
        other => panic!("{name} is not a histogram: {other:?}"),
    }
}

/// An HTTP receiver on 127.0.0.1 answering every request with `status`
/// after `delay`.
fn receiver(status: u16, delay: Duration) -> (String, Arc<AtomicUsize>) {
    let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
    let port = server.server_addr().to_ip().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    for _ in 0..2 {
        let (server, count) = (server.clone(), count.clone());
        std::thread::spawn(move || {
            while let Ok(req) = server.recv() {
                count.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(delay);
                let _ = req.respond(tiny_http::Response::empty(status));
            }
        });
    }
    (format!("http://127.0.0.1:{port}/hook"), count)
}

#[test]
fn the_metrics_move_as_events_flow() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();
    telemetry::describe();

    let dir = tempfile::tempdir().unwrap();
    let bus = DurableBus::builder()
        .max_deliveries(2)
        .retry_backoff(Duration::from_millis(1), Duration::from_millis(2))
        .open(dir.path().join("log.redb"))
        .unwrap();
    // A subscription that fails seq 3 for good: one dead letter.
    let sub = bus
        .subscribe_durable(
            "billing",
            Filter::all(),
            Position::Beginning,
            |e: &Event| -> Result<(), HandlerError> {
                if e.payload.get("fail").is_some() {
                    Err("refused".into())
                } else {
                    Ok(())
                }
            },
        )
        .unwrap();
    // Webhooks: one answering 200 (tenant ok), one 410 (tenant gone: then
    // disabled), one too slow (tenant slow), and one on a private address
    // the worker refuses (tenant private, created while allowed).
    let (ok_url, ok_hits) = receiver(200, Duration::ZERO);
    let (gone_url, _) = receiver(410, Duration::ZERO);
    let (slow_url, _) = receiver(200, Duration::from_millis(1500));
    let hooks = bus.webhooks().allow_private_targets(true);
    hooks.create(common::hook_for("ok", &ok_url)).unwrap();
    hooks.create(common::hook_for("gone", &gone_url)).unwrap();
    hooks.create(common::hook_for("slow", &slow_url)).unwrap();
    hooks.create(common::hook_for("private", &ok_url)).unwrap();

    // 10 events through `publish`, 10 through `publish_async`.
    for i in 0..10 {
        let e = Event::new(Type::DEPLOY_STARTED, "ok")
            .with_payload(serde_json::json!({ "i": i }).as_object().unwrap().clone());
        bus.publish(e).unwrap();
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for i in 0..9 {
            let e = Event::new(Type::DEPLOY_STARTED, "t2")
                .with_payload(serde_json::json!({ "i": i }).as_object().unwrap().clone());
            bus.publish_async(e).await.unwrap();
        }
        let failing = Event::new(Type::DEPLOY_FAILED, "t2").with_payload(
            serde_json::json!({ "fail": true })
                .as_object()
                .unwrap()
                .clone(),
        );
        bus.publish_async(failing).await.unwrap();
        for tenant in ["gone", "slow"] {
            bus.publish_async(Event::new(Type::DEPLOY_STARTED, tenant))
                .await
                .unwrap();
        }
    });
    // A duplicate is not counted as published.
    let first = bus
        .read(Position::Beginning, &Filter::all())
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    assert!(bus.publish(first.event).unwrap().duplicate);

    let m = snapshot(&snapshotter);
    assert_eq!(counter(&m, telemetry::EVENTS_PUBLISHED, &[]), 22);
    let publish = histogram(&m, telemetry::PUBLISH_SECONDS);
    assert_eq!(publish.len(), 23, "one per publish, the duplicate's too");
    assert!(publish.iter().all(|s| *s > 0.0 && *s < 60.0), "{publish:?}");
    let groups = histogram(&m, telemetry::GROUP_COMMIT_EVENTS);
    assert_eq!(
        groups.iter().sum::<f64>().to_string(),
        "22",
        "every event in one group"
    );
    assert!(!histogram(&m, telemetry::FSYNC_SECONDS).is_empty());

    // The subscription catches up (lag 0) and dead-letters the failing one.
    common_wait("the dead letter", || {
        bus.dead_letters("billing").unwrap().len() == 1
    });
    common_wait("the subscription to catch up", || sub.position() == 22);
    bus.stats().unwrap(); // an apply: the gauges are set after each
    let m = snapshot(&snapshotter);
    assert_eq!(
        counter(&m, telemetry::DEAD_LETTERS, &[("subscription", "billing")]),
        1
    );
    assert_eq!(
        gauge(
            &m,
            telemetry::SUBSCRIPTION_LAG_EVENTS,
            &[("subscription", "billing")]
        ),
        Some(0.0)
    );
    assert_eq!(gauge(&m, telemetry::APPLY_LAG_EVENTS, &[]), Some(0.0));

    // Deliveries: ok and gone are answered, slow times out.
    let worker = DeliveryWorker::start(
        bus.clone(),
        DeliveryOptions {
            workers: 4,
            allow_private_targets: true,
            retry_schedule: Vec::new(),
            timeout: Duration::from_millis(300),
            ..DeliveryOptions::default()
        },
    )
    .unwrap();
    assert!(worker.wait_idle(Some(Duration::from_secs(30))));
    worker.stop();
    // A worker that refuses private targets refuses 127.0.0.1.
    bus.publish(Event::new(Type::DEPLOY_STARTED, "private"))
        .unwrap();
    let worker = DeliveryWorker::start(
        bus.clone(),
        DeliveryOptions {
            allow_private_targets: false,
            retry_schedule: Vec::new(),
            ..DeliveryOptions::default()
        },
    )
    .unwrap();
    assert!(worker.wait_idle(Some(Duration::from_secs(30))));
    worker.stop();
    let m = snapshot(&snapshotter);
    assert_eq!(
        counter(&m, telemetry::WEBHOOK_ATTEMPTS, &[("outcome", "refused")]),
        1
    );
    let ok = ok_hits.load(Ordering::SeqCst) as u64;
    assert!(ok >= 10, "the ok receiver got {ok}");
    assert_eq!(
        counter(&m, telemetry::WEBHOOK_ATTEMPTS, &[("outcome", "success")]),
        ok,
        "every 200 is a success"
    );
    assert!(counter(&m, telemetry::WEBHOOK_ATTEMPTS, &[("outcome", "timeout")]) >= 1);
    assert!(
        counter(&m, telemetry::WEBHOOK_ATTEMPTS, &[("outcome", "failure")]) >= 1,
        "the 410"
    );
    assert_eq!(
        counter(&m, telemetry::WEBHOOKS_DISABLED, &[]),
        1,
        "the 410 disables"
    );
    assert!(!histogram(&m, telemetry::WEBHOOK_ATTEMPT_SECONDS).is_empty());
    assert_eq!(gauge(&m, telemetry::WEBHOOK_PENDING, &[]), Some(0.0));
    drop(sub);
}

/// Waits up to 20 s for `cond`.
fn common_wait(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
