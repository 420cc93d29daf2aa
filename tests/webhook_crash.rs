//! Crash safety of webhook deliveries (G8, G9): a child process publishes
//! events and delivers them; it is killed with SIGKILL at random moments and
//! restarted; finally everything pending is delivered. Every matching event
//! in the log must have reached its receiver at least once, no event may
//! reach the wrong webhook, every delivery record must end succeeded, and
//! there must be exactly one delivery record per (webhook, event).
//!
//! The child is this test binary itself, re-run with `CRASH_CHILD_DB` set
//! (the `crash_child` test does nothing otherwise).

mod common;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ctrlbus::webhook::DEFAULT_TOLERANCE;
use ctrlbus::{
    Bus, DeliveryOptions, DeliveryQuery, DeliveryStatus, DeliveryWorker, DurableBus, Event, Filter,
    NewWebhook, Position, Secret, Type,
};

const ENV_DB: &str = "CRASH_CHILD_DB";
const ENV_ACKS: &str = "CRASH_CHILD_ACKS";
const ENV_RUN: &str = "CRASH_CHILD_RUN";

fn opts() -> DeliveryOptions {
    DeliveryOptions {
        workers: 4,
        // Many short steps: a delivery never runs out of attempts here.
        retry_schedule: vec![Duration::from_millis(20); 12],
        allow_private_targets: true,
        timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

/// The events of run `run`: a mix of tenants and types.
fn events(run: u32) -> Vec<Event> {
    let kinds = [
        (Type::DEPLOY_STARTED, "t1"),
        (Type::DEPLOY_FAILED, "t2"),
        (Type::HEALTH_PASSED, "t1"),
        (Type::DEPLOY_SUCCEEDED, "t1"),
        (Type::HEALTH_DEGRADED, "t2"),
        (Type::INSTANCE_CREATED, "t3"),
    ];
    (0..60)
        .map(|i| {
            let (t, tenant) = &kinds[i % kinds.len()];
            Event::new(t.clone(), *tenant)
                .with_payload_value("run", run)
                .with_payload_value("i", i as u64)
        })
        .collect()
}

/// The child: publish (recording acknowledgements), deliver, exit when idle.
#[test]
fn crash_child() {
    let Ok(db) = std::env::var(ENV_DB) else {
        return;
    };
    let run: u32 = std::env::var(ENV_RUN).unwrap().parse().unwrap();
    let mut acks = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(std::env::var(ENV_ACKS).unwrap())
        .unwrap();
    let bus = DurableBus::open(&db).unwrap();
    let worker = DeliveryWorker::start(bus.clone(), opts()).unwrap();
    for e in events(run) {
        let id = e.id;
        bus.publish(e).unwrap();
        // One write call per line, so a kill cannot tear a line.
        acks.write_all(format!("{id}\n").as_bytes()).unwrap();
        // Paced so that a run outlasts the parent's longest kill delay
        // (60 events x 8 ms > 420 ms): kills land while it publishes.
        std::thread::sleep(Duration::from_millis(8));
    }
    worker.wait_idle(Some(Duration::from_secs(30)));
    worker.stop();
}

struct Got {
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

#[test]
fn kill_9_at_random_moments_loses_no_delivery() {
    if std::env::var(ENV_DB).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("events.redb");
    let acks_path = dir.path().join("acks.txt");

    // The receiver: fails about one request in eight, to exercise retries.
    let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
    let port = server.server_addr().to_ip().unwrap().port();
    let got: Arc<Mutex<Vec<Got>>> = Arc::default();
    let count = Arc::new(AtomicUsize::new(0));
    for _ in 0..4 {
        let (server, got, count) = (server.clone(), got.clone(), count.clone());
        std::thread::spawn(move || {
            while let Ok(mut req) = server.recv() {
                let mut body = Vec::new();
                std::io::Read::read_to_end(req.as_reader(), &mut body).unwrap();
                let headers = common::headers(&req);
                let n = count.fetch_add(1, Ordering::SeqCst);
                // Slow enough that kills often land with attempts in flight.
                std::thread::sleep(Duration::from_millis(5));
                let status = if n % 8 == 5 { 500 } else { 200 };
                if status == 200 {
                    got.lock().unwrap().push(Got {
                        path: req.url().to_owned(),
                        headers,
                        body,
                    });
                }
                let _ = req.respond(tiny_http::Response::empty(status));
            }
        });
    }

    // Register the webhooks once.
    let (hook_a, hook_b, secret_a, secret_b) = {
        let bus = DurableBus::open(&db).unwrap();
        let hooks = bus.webhooks().allow_private_targets(true);
        let a = hooks
            .create(NewWebhook {
                tenant_id: "t1".into(),
                url: format!("http://127.0.0.1:{port}/a"),
                events: vec!["deploy.*".into()],
                secret: None,
            })
            .unwrap();
        let b = hooks
            .create(NewWebhook {
                tenant_id: "t2".into(),
                url: format!("http://127.0.0.1:{port}/b"),
                events: vec!["health.*".into()],
                secret: None,
            })
            .unwrap();
        bus.close();
        (a.webhook, b.webhook, a.secret, b.secret)
    };

    // Runs killed at random moments.
    let exe = std::env::current_exe().unwrap();
    let mut killed = 0;
    for run in 0..6u32 {
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(ENV_DB, &db)
            .env(ENV_ACKS, &acks_path)
            .env(ENV_RUN, run.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let delay = 20 + u64::from(getrandom::u32().unwrap() % 400);
        std::thread::sleep(Duration::from_millis(delay));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            killed += 1;
        }
        let status = child.wait().unwrap();
        assert!(
            status.success() || status.code().is_none(),
            "child failed: {status}"
        );
    }
    assert!(killed >= 3, "only {killed} runs were killed");

    // Restart and deliver everything pending.
    let bus = DurableBus::open(&db).unwrap();
    DeliveryWorker::run_until_idle(bus.clone(), opts()).unwrap();

    let log: Vec<Event> = bus
        .read(Position::Beginning, &Filter::all())
        .unwrap()
        .map(|e| e.unwrap().event)
        .collect();
    let in_log: HashSet<String> = log.iter().map(|e| e.id.to_string()).collect();
    let acked: Vec<String> = std::fs::read_to_string(&acks_path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(!acked.is_empty());
    for id in &acked {
        assert!(
            in_log.contains(id),
            "acknowledged event {id} not in the log"
        );
    }

    let want_a: HashSet<String> = log
        .iter()
        .filter(|e| e.tenant_id == "t1" && e.event_type.as_str().starts_with("deploy."))
        .map(|e| e.id.to_string())
        .collect();
    let want_b: HashSet<String> = log
        .iter()
        .filter(|e| e.tenant_id == "t2" && e.event_type.as_str().starts_with("health."))
        .map(|e| e.id.to_string())
        .collect();
    let got = got.lock().unwrap();
    let mut seen_a = HashSet::new();
    let mut seen_b = HashSet::new();
    for g in got.iter() {
        let e = Event::from_json(&g.body).unwrap();
        assert_eq!(g.headers["webhook-id"], e.id.to_string());
        let (secret, seen, tenant, prefix): (&Secret, _, _, _) = match g.path.as_str() {
            "/a" => (&secret_a, &mut seen_a, "t1", "deploy."),
            "/b" => (&secret_b, &mut seen_b, "t2", "health."),
            other => panic!("unexpected path {other}"),
        };
        ctrlbus::webhook::verify(secret, &g.headers, &g.body, DEFAULT_TOLERANCE).unwrap();
        assert_eq!(e.tenant_id, tenant, "wrong tenant at {}", g.path);
        assert!(
            e.event_type.as_str().starts_with(prefix),
            "wrong type at {}",
            g.path
        );
        seen.insert(e.id.to_string());
    }
    assert_eq!(
        seen_a, want_a,
        "webhook a: every matching event, nothing else"
    );
    assert_eq!(
        seen_b, want_b,
        "webhook b: every matching event, nothing else"
    );

    let deliveries = bus
        .webhooks()
        .deliveries(&DeliveryQuery::default())
        .unwrap();
    let mut per_pair: HashMap<(String, String), usize> = HashMap::new();
    for d in &deliveries {
        assert_eq!(d.status, DeliveryStatus::Succeeded, "{d:?}");
        *per_pair
            .entry((d.webhook_id.to_string(), d.event_id.to_string()))
            .or_default() += 1;
    }
    assert!(
        per_pair.values().all(|&n| n == 1),
        "exactly one delivery per (webhook, event)"
    );
    assert_eq!(deliveries.len(), want_a.len() + want_b.len());
    let for_a = deliveries
        .iter()
        .filter(|d| d.webhook_id == hook_a.id)
        .count();
    let for_b = deliveries
        .iter()
        .filter(|d| d.webhook_id == hook_b.id)
        .count();
    assert_eq!((for_a, for_b), (want_a.len(), want_b.len()));
    eprintln!(
        "crash test: {killed} kills, {} events in the log, {} acked, {} deliveries, {} requests",
        log.len(),
        acked.len(),
        deliveries.len(),
        count.load(Ordering::SeqCst)
    );
}
