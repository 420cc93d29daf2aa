//! Webhook deliveries per second to a local keep-alive receiver, side by
//! side with a plain loop of the same HTTP agent posting the same bodies.
//!
//! - `plain_loop/1`: one thread posts the bodies with the delivery agent
//!   (no signing, no storage): the HTTP floor.
//! - `worker/N`: the events are published (not timed), then a
//!   `DeliveryWorker` with N sender threads delivers them: claim, read the
//!   event, sign, POST, and record every attempt durably.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ctrlbus::{DeliveryOptions, DeliveryWorker, DurableBus, Event, NewWebhook, Type};

const BATCH: u64 = 500;

fn receiver() -> (String, Arc<tiny_http::Server>) {
    let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
    let port = server.server_addr().to_ip().unwrap().port();
    for _ in 0..8 {
        let s = server.clone();
        std::thread::spawn(move || {
            while let Ok(mut req) = s.recv() {
                let mut sink = Vec::new();
                let _ = std::io::Read::read_to_end(req.as_reader(), &mut sink);
                let _ = req.respond(tiny_http::Response::empty(204));
            }
        });
    }
    (format!("http://127.0.0.1:{port}/hook"), server)
}

fn opts(workers: usize) -> DeliveryOptions {
    DeliveryOptions {
        workers,
        allow_private_targets: true,
        ..Default::default()
    }
}

fn event() -> Event {
    Event::new(Type::DEPLOY_SUCCEEDED, "t1")
        .with_actor("bench")
        .with_payload_value("detail", "x".repeat(200))
}

fn bench(c: &mut Criterion) {
    let (url, _server) = receiver();
    let mut g = c.benchmark_group("webhook_delivery");
    g.throughput(Throughput::Elements(BATCH));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(5));

    let body = event().to_json().into_bytes();
    // The peer: a plain ureq agent as deliveries configure theirs (keep-
    // alive, no redirects, statuses as responses, the same timeouts).
    let o = opts(1);
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .proxy(None)
            .timeout_connect(Some(o.connect_timeout))
            .timeout_global(Some(o.timeout))
            .max_redirects(0)
            .http_status_as_error(false)
            .build(),
    );
    g.bench_function("plain_loop/1", |b| {
        b.iter(|| {
            for _ in 0..BATCH {
                let mut r = agent
                    .post(&url)
                    .header("content-type", "application/json")
                    .send(body.as_slice())
                    .unwrap();
                let _ = r.body_mut().read_to_vec();
            }
        });
    });

    for workers in [1usize, 4] {
        let dir = tempfile::tempdir().unwrap();
        let bus = DurableBus::open(dir.path().join("bench.redb")).unwrap();
        bus.webhooks()
            .allow_private_targets(true)
            .create(NewWebhook {
                tenant_id: "t1".into(),
                url: url.clone(),
                events: vec![],
                secret: None,
            })
            .unwrap();
        g.bench_function(format!("worker/{workers}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    bus.publish_batch((0..BATCH).map(|_| event()).collect())
                        .unwrap();
                    let start = Instant::now();
                    let w = DeliveryWorker::start(bus.clone(), opts(workers)).unwrap();
                    assert!(w.wait_idle(Some(Duration::from_secs(120))));
                    total += start.elapsed();
                    w.stop();
                }
                total
            });
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
