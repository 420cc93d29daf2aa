//! One suite of contract checks, run against every backend that implements
//! [`EventLog`]: `DurableBus` on a redb file, and (feature `jetstream`)
//! `JetStreamBus` on a 3-node NATS JetStream cluster on 127.0.0.1. Each
//! check is generic over the backend and gets a fresh log by name.
//!
//! Covered: G3 (contiguous `seq`s, one order under concurrent publishers),
//! idempotency by id, G4 and G6 for live subscribers of this process, G7
//! (read from a time; append time never decreases), G9 (tenant filters),
//! G10 (bad input refused, nothing written), G11 (what is read publishes
//! again, as a duplicate), G5 (durable subscriptions: order, resume, dead
//! letters), the cursors (list, show, seek to a `seq`, a time and the end,
//! delete), and webhooks (G8, G9): one signed delivery per matching event
//! after the webhook's creation, tenants kept apart, retries on the
//! schedule with the attempt log, 410 Gone disabling, manual retry,
//! deletion keeping the records.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::receiver::Receiver;
use ctrlbus::webhook::DEFAULT_TOLERANCE;
use ctrlbus::{
    CursorError, CursorState, Deliverer, DeliveryOptions, DeliveryQuery, DeliveryStatus, Event,
    EventId, EventLog, Filter, HandlerError, NewWebhook, Position, Type, WebhookError,
    WebhookRegistry,
};

fn event(tenant: &str, ty: Type, i: u64) -> Event {
    Event::new(ty, tenant).with_payload(serde_json::json!({ "i": i }).as_object().unwrap().clone())
}

fn seqs<L: EventLog>(log: &L, from: Position, filter: &Filter) -> Vec<u64> {
    log.read(from, filter)
        .unwrap()
        .map(|e| e.unwrap().seq)
        .collect()
}

/// G3 and idempotency: `seq` from 1, no gap; the same id again is the
/// original receipt, nothing written; a batch gets consecutive `seq`s.
fn seqs_are_contiguous_and_ids_idempotent<L: EventLog>(log: &L) {
    let first = event("acme", Type::DEPLOY_STARTED, 0);
    let r = log.publish(first.clone()).unwrap();
    assert_eq!((r.seq, r.duplicate), (1, false));
    for i in 1..10 {
        assert_eq!(
            log.publish(event("acme", Type::DEPLOY_STARTED, i))
                .unwrap()
                .seq,
            i + 1
        );
    }
    let again = log.publish(first.clone()).unwrap();
    assert_eq!((again.seq, again.duplicate, again.id), (1, true, first.id));
    let batch: Vec<Event> = (10..15)
        .map(|i| event("beta", Type::HEALTH_PASSED, i))
        .collect();
    let receipts = log.publish_batch(batch).unwrap();
    assert_eq!(
        receipts.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (11..=15).collect::<Vec<_>>()
    );
    assert_eq!(log.last_seq().unwrap(), 15);
    assert_eq!(
        seqs(log, Position::Beginning, &Filter::all()),
        (1..=15).collect::<Vec<_>>()
    );
    // A batch naming one id twice is refused whole.
    let e = event("acme", Type::DEPLOY_STARTED, 99);
    assert!(log.publish_batch(vec![e.clone(), e]).is_err());
    assert_eq!(log.last_seq().unwrap(), 15);
}

/// G3 under concurrency: 8 publishers, every receipt a distinct `seq`,
/// the log contiguous and holding each event once, at its receipt's `seq`.
fn concurrent_publishers_share_one_order<L: EventLog + Clone + Send + 'static>(log: &L) {
    let receipts: Arc<Mutex<Vec<(u64, EventId)>>> = Arc::default();
    let threads: Vec<_> = (0..8)
        .map(|p| {
            let (log, receipts) = (log.clone(), receipts.clone());
            std::thread::spawn(move || {
                for i in 0..40 {
                    let e = event("acme", Type::DEPLOY_STARTED, p * 100 + i);
                    let id = e.id;
                    let r = log.publish(e).unwrap();
                    receipts.lock().unwrap().push((r.seq, id));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let receipts: HashMap<u64, EventId> = receipts.lock().unwrap().iter().copied().collect();
    assert_eq!(receipts.len(), 320, "no seq given twice");
    let read: Vec<(u64, EventId)> = log
        .read(Position::Beginning, &Filter::all())
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.seq, e.event.id)
        })
        .collect();
    assert_eq!(read.len(), 320);
    for (n, (seq, id)) in read.iter().enumerate() {
        assert_eq!(*seq, n as u64 + 1, "no gap");
        assert_eq!(receipts[seq], *id, "each event at its receipt's seq");
    }
    let ids: BTreeSet<EventId> = read.iter().map(|r| r.1).collect();
    assert_eq!(ids.len(), 320, "no duplicate");
}

/// G7, G9: reads by type pattern and tenant, from a `seq`, a time and the
/// end; append times never decrease; a tenant sees only its own events.
fn reads_filter_and_start_where_asked<L: EventLog>(log: &L) {
    for i in 0..30 {
        let (tenant, ty) = match i % 3 {
            0 => ("acme", Type::DEPLOY_STARTED),
            1 => ("beta", Type::DEPLOY_FAILED),
            _ => ("acme", Type::HEALTH_DEGRADED),
        };
        log.publish(event(tenant, ty, i)).unwrap();
    }
    let deploys_of_acme = Filter::types(["deploy.*"]).unwrap().tenant("acme");
    assert_eq!(
        seqs(log, Position::Beginning, &deploys_of_acme),
        (0..10).map(|k| 3 * k + 1).collect::<Vec<_>>()
    );
    let acme = Filter::all().tenant("acme");
    for e in log.read(Position::Beginning, &acme).unwrap() {
        assert_eq!(e.unwrap().event.tenant_id, "acme");
    }
    assert_eq!(
        seqs(
            log,
            Position::Beginning,
            &Filter::types(["health.degraded"]).unwrap()
        )
        .len(),
        10
    );
    assert_eq!(
        seqs(log, Position::Seq(25), &Filter::all()),
        (25..=30).collect::<Vec<_>>()
    );
    assert!(seqs(log, Position::End, &Filter::all()).is_empty());
    assert!(seqs(log, Position::Beginning, &Filter::all().tenant("nobody")).is_empty());
    let all: Vec<_> = log
        .read(Position::Beginning, &Filter::all())
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(all.windows(2).all(|w| w[0].appended_at <= w[1].appended_at));
    let t = all[17].appended_at;
    let first_at_t = all.iter().find(|e| e.appended_at >= t).unwrap().seq;
    assert_eq!(
        seqs(log, Position::Time(t), &Filter::all()).first(),
        Some(&first_at_t)
    );
    // Past the newest event, by time or by seq: empty (not an error after
    // waiting for events that are not there).
    let after_newest = all[29].appended_at + jiff::SignedDuration::from_secs(60);
    assert!(seqs(log, Position::Time(after_newest), &Filter::all()).is_empty());
    assert!(seqs(log, Position::Seq(31), &Filter::all()).is_empty());
    assert_eq!(seqs(log, Position::Seq(30), &Filter::all()), [30]);
    // recent_events: the newest matching, oldest first.
    let recent = log.recent_events(4, &deploys_of_acme).unwrap();
    assert_eq!(
        recent
            .iter()
            .map(|e| e.payload["i"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [18, 21, 24, 27]
    );
}

/// G4, G6: when `publish` returns, this process's matching live
/// subscribers have run; a failing handler is reported in the receipt and
/// the others still get the event; after unsubscribe, nothing more.
fn live_subscribers_run_before_publish_returns<L: EventLog>(log: &L) {
    log.publish(event("acme", Type::DEPLOY_STARTED, 0)).unwrap();
    let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
    let s = seen.clone();
    let sub = log
        .subscribe_boxed(
            Filter::types(["deploy.*"]).unwrap(),
            Box::new(move |e: &Event| -> Result<(), HandlerError> {
                let i = e.payload["i"].as_u64().unwrap();
                s.lock().unwrap().push(i);
                if i == 3 {
                    return Err("three".into());
                }
                Ok(())
            }),
        )
        .unwrap();
    let other: Arc<Mutex<Vec<u64>>> = Arc::default();
    let o = other.clone();
    let _other = log
        .subscribe_boxed(
            Filter::all(),
            Box::new(move |e: &Event| -> Result<(), HandlerError> {
                o.lock().unwrap().push(e.payload["i"].as_u64().unwrap());
                Ok(())
            }),
        )
        .unwrap();
    for i in 1..=6 {
        let ty = if i % 2 == 1 {
            Type::DEPLOY_STARTED
        } else {
            Type::HEALTH_PASSED
        };
        let deploy = i % 2 == 1;
        let r = log.publish(event("acme", ty, i)).unwrap();
        if deploy {
            assert_eq!(seen.lock().unwrap().last(), Some(&i), "G4");
        }
        assert_eq!(
            other.lock().unwrap().last(),
            Some(&i),
            "G4, every subscriber"
        );
        assert_eq!(r.handler_failures.len(), usize::from(i == 3), "event {i}");
    }
    assert_eq!(
        *seen.lock().unwrap(),
        [1, 3, 5],
        "only from subscribing on, in order"
    );
    assert_eq!(
        *other.lock().unwrap(),
        [1, 2, 3, 4, 5, 6],
        "a failure holds up no one"
    );
    drop(sub);
    log.publish(event("acme", Type::DEPLOY_STARTED, 7)).unwrap();
    assert_eq!(seen.lock().unwrap().len(), 3, "nothing after unsubscribe");
}

/// G10, G11: bad input is refused with nothing written; what is read back
/// is the event as published, and publishing it again is a duplicate.
fn bad_input_is_refused_and_what_is_read_publishes_again<L: EventLog>(log: &L) {
    log.publish(event("acme", Type::DEPLOY_STARTED, 1)).unwrap();
    let long_tenant = Event::new(
        Type::DEPLOY_STARTED,
        "x".repeat(ctrlbus::MAX_TENANT_LEN + 1),
    );
    assert!(log.publish(long_tenant).is_err());
    let at_limit = Event::new(Type::DEPLOY_STARTED, "x".repeat(ctrlbus::MAX_TENANT_LEN));
    assert!(
        log.publish(at_limit).is_ok(),
        "the limit itself is accepted"
    );
    assert_eq!(log.last_seq().unwrap(), 2);
    let entry = log
        .read(Position::Beginning, &Filter::all())
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let json = entry.event.to_json();
    let back = Event::from_json(json.as_bytes()).unwrap();
    assert_eq!(back, entry.event);
    assert!(log.publish(back).unwrap().duplicate);
}

/// G5: a durable subscription handles every matching event in `seq`
/// order, resumes after its last handled event when subscribed again, and
/// dead-letters an event that keeps failing after `max_deliveries` (3 in
/// these logs) without holding up the rest.
fn durable_subscriptions_resume_and_dead_letter<L: EventLog>(log: &L) {
    for i in 0..10 {
        log.publish(event("acme", Type::DEPLOY_STARTED, i)).unwrap();
        log.publish(event("acme", Type::HEALTH_PASSED, i)).unwrap();
    }
    let handled: Arc<Mutex<Vec<u64>>> = Arc::default();
    let subscribe = |stop_after: Option<u64>| {
        let h = handled.clone();
        log.subscribe_durable_boxed(
            "billing.v1",
            Filter::types(["deploy.*"]).unwrap(),
            Position::Beginning,
            Box::new(move |e: &Event| -> Result<(), HandlerError> {
                let i = e.payload["i"].as_u64().unwrap();
                if i == 4 {
                    return Err("four".into());
                }
                if stop_after.is_some_and(|n| i > n) {
                    // Slow, so that the subscription is dropped long before
                    // this event could use up its deliveries.
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    return Err("not now".into());
                }
                h.lock().unwrap().push(i);
                Ok(())
            }),
        )
        .unwrap()
    };
    // The deploys are the odd seqs 1, 3, …, 19; i = (seq - 1) / 2.
    let sub = subscribe(Some(6));
    common::wait_until("up to i = 6 handled", || {
        log.cursor_position("billing.v1").unwrap_or(0) >= 13
    });
    drop(sub);
    let first: Vec<u64> = handled.lock().unwrap().clone();
    assert_eq!(
        first,
        [0, 1, 2, 3, 5, 6],
        "in order, 4 dead-lettered, none twice"
    );
    let dead = log.dead_letters("billing.v1").unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].seq, dead[0].attempts), (9, 3));
    assert!(dead[0].error.contains("four"), "{}", dead[0].error);
    // Again under the same name: from where it stopped, the rest once.
    handled.lock().unwrap().clear();
    let sub = subscribe(None);
    common::wait_until("every deploy handled", || {
        log.cursor_position("billing.v1").unwrap_or(0) >= 19
    });
    drop(sub);
    let rest = handled.lock().unwrap().clone();
    assert!(
        rest.starts_with(&[7]) || rest.starts_with(&[6, 7]),
        "resumed after its position (at most the last one again): {rest:?}"
    );
    assert!(rest.ends_with(&[7, 8, 9]), "{rest:?}");
    log.delete_cursor("billing.v1").unwrap();
    assert!(log.cursor_position("billing.v1").is_err(), "deleted");
    assert!(
        log.subscribe_durable_boxed(
            "no spaces",
            Filter::all(),
            Position::Beginning,
            Box::new(|_: &Event| -> Result<(), HandlerError> { Ok(()) })
        )
        .is_err()
    );
}

/// Cursors: listed with their filter and position, moved by `seek` (to a
/// `seq`, a time, the end), after which the subscription next handles the
/// event at the new position; unknown names are errors; deleted, gone.
fn cursors_list_show_and_seek<L: EventLog>(log: &L) {
    for i in 0..6 {
        log.publish(event("acme", Type::DEPLOY_STARTED, i)).unwrap();
    }
    let filter = Filter::types(["deploy.*"]).unwrap();
    let handled: Arc<Mutex<Vec<u64>>> = Arc::default();
    let run_until = |seq: u64| {
        let h = handled.clone();
        let sub = log
            .subscribe_durable_boxed(
                "audit",
                filter.clone(),
                Position::Beginning,
                Box::new(move |e: &Event| -> Result<(), HandlerError> {
                    h.lock().unwrap().push(e.payload["i"].as_u64().unwrap());
                    Ok(())
                }),
            )
            .unwrap();
        common::wait_until("handled", || {
            log.cursor_position("audit").unwrap_or(0) >= seq
        });
        drop(sub);
        common::wait_until("idle", || {
            log.cursor("audit").unwrap().state == CursorState::Idle
        });
        std::mem::take(&mut *handled.lock().unwrap())
    };
    assert_eq!(run_until(6), [0, 1, 2, 3, 4, 5]);
    let listed = log.cursors().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let c = &listed[0];
    assert_eq!(
        (c.name.as_str(), c.delivered_seq, c.next_seq, c.lag),
        ("audit", 6, 7, 0)
    );
    assert_eq!(c.filter, filter);
    assert_eq!(c.dead_letters, 0);
    assert_eq!(&log.cursor("audit").unwrap(), c);

    // Back to seq 3: 3..=6 again (i = 2..=5).
    let moved = log.seek("audit", Position::Seq(3)).unwrap();
    assert_eq!((moved.delivered_seq, moved.next_seq, moved.lag), (2, 3, 4));
    assert_eq!(moved.filter, filter, "the seek keeps the filter");
    assert_eq!(run_until(6), [2, 3, 4, 5]);

    // To the time of seq 5: 5 and 6 again.
    let at5 = log
        .read(Position::Seq(5), &Filter::all())
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    log.seek("audit", Position::Time(at5.appended_at)).unwrap();
    let again = run_until(6);
    assert!(
        again == [4, 5] || again.ends_with(&[4, 5]),
        "from the first event at or after seq 5's time: {again:?}"
    );

    // To the end: only what comes after.
    let end = log.seek("audit", Position::End).unwrap();
    assert_eq!((end.delivered_seq, end.lag), (6, 0));
    log.publish(event("acme", Type::DEPLOY_FAILED, 6)).unwrap();
    assert_eq!(run_until(7), [6]);

    assert!(matches!(log.cursor("nope"), Err(CursorError::Unknown(_))));
    assert!(matches!(
        log.seek("nope", Position::Beginning),
        Err(CursorError::Unknown(_))
    ));
    assert!(matches!(
        log.cursor("no spaces"),
        Err(CursorError::InvalidName(_))
    ));
    log.delete_cursor("audit").unwrap();
    assert!(log.cursors().unwrap().is_empty());
    assert!(matches!(log.cursor("audit"), Err(CursorError::Unknown(_))));
}

/// Webhooks (G8, G9): an event appended before a webhook was created never
/// reaches it; every matching event after it gets exactly one delivery,
/// signed with its secret, of its own tenant only; a failed attempt is
/// retried on the schedule and logged; 410 Gone disables the webhook;
/// a manual retry attempts once more; deleting keeps the records.
fn webhooks_deliver_once_signed_and_retry<L: EventLog>(log: &L) {
    // /acme: the first request for each event fails with 500; /beta: 410.
    let seen = Arc::new(Mutex::new(std::collections::HashSet::<String>::new()));
    let s = seen.clone();
    let rx = Receiver::start(Arc::new(move |_, got| {
        if got.path.ends_with("/beta") {
            return (410, vec![]);
        }
        let first = s.lock().unwrap().insert(got.headers["webhook-id"].clone());
        (if first { 500 } else { 200 }, vec![])
    }));
    let before = event("acme", Type::DEPLOY_STARTED, 0);
    log.publish(before.clone()).unwrap();
    let hooks = log.webhook_registry().allow_private_targets(true);
    let new = |tenant: &str, path: &str, events: &[&str]| NewWebhook {
        tenant_id: tenant.into(),
        url: format!("{}{path}", rx.url),
        events: events.iter().map(|e| (*e).to_owned()).collect(),
        secret: None,
    };
    let acme = hooks.create(new("acme", "/acme", &["deploy.*"])).unwrap();
    let beta = hooks.create(new("beta", "/beta", &[])).unwrap();
    let shown = serde_json::to_string(&acme.webhook).unwrap();
    assert!(
        !shown.contains(acme.secret.expose()),
        "no secret in {shown}"
    );
    assert!(matches!(
        log.webhook_registry()
            .create(new("acme", "/x", &["deploy.*"])),
        Err(WebhookError::Url(_))
    ));
    let a1 = event("acme", Type::DEPLOY_STARTED, 1);
    let a2 = event("acme", Type::DEPLOY_FAILED, 2);
    for e in [
        a1.clone(),
        event("acme", Type::HEALTH_PASSED, 3), // not a deploy
        a2.clone(),
        event("beta", Type::DEPLOY_STARTED, 4),
    ] {
        log.publish(e).unwrap();
    }
    let worker = log
        .start_delivery(DeliveryOptions {
            workers: 2,
            retry_schedule: vec![Duration::from_millis(100); 2],
            jitter: 0.0,
            allow_private_targets: true,
            timeout: Duration::from_secs(5),
            ..Default::default()
        })
        .unwrap();
    assert!(worker.wait_idle(Some(Duration::from_secs(30))), "idle");

    let of = |id| {
        hooks
            .deliveries(&DeliveryQuery {
                webhook_id: Some(id),
                ..Default::default()
            })
            .unwrap()
    };
    let acme_d = of(acme.webhook.id);
    assert_eq!(
        acme_d.iter().map(|d| d.event_id).collect::<Vec<_>>(),
        [a1.id, a2.id],
        "one delivery per matching event after creation, in log order"
    );
    for d in &acme_d {
        assert_eq!(
            (d.status, d.attempts, d.status_code),
            (DeliveryStatus::Succeeded, 2, 200)
        );
        let attempts = hooks.attempts(d.id).unwrap();
        assert_eq!(
            attempts.iter().map(|a| a.status_code).collect::<Vec<_>>(),
            [500, 200]
        );
        assert!(attempts[1].at >= attempts[0].at);
    }
    let got = rx.got();
    assert!(
        got.iter()
            .all(|g| g.headers["webhook-id"] != before.id.to_string()),
        "the event before the webhook was never sent"
    );
    for g in got.iter().filter(|g| g.path.ends_with("/acme")) {
        ctrlbus::webhook::verify(&acme.secret, &g.headers, &g.body, DEFAULT_TOLERANCE)
            .expect("signed with the webhook's secret");
        let sent = Event::from_json(&g.body).unwrap();
        assert_eq!(sent.tenant_id, "acme", "tenants kept apart");
    }
    assert_eq!(got.len(), 5, "4 acme attempts + 1 to beta: {got:?}");
    // 410 Gone: beta's one delivery failed, its webhook disabled.
    let beta_d = of(beta.webhook.id);
    assert_eq!(beta_d.len(), 1);
    assert_eq!(
        (beta_d[0].status, beta_d[0].attempts),
        (DeliveryStatus::Failed, 1)
    );
    let beta_now = hooks.get(beta.webhook.id).unwrap();
    assert!(!beta_now.active);
    assert!(beta_now.disabled_reason.unwrap().contains("410"));
    assert!(matches!(
        hooks.retry(beta_d[0].id),
        Err(WebhookError::Inactive(_))
    ));
    // A manual retry: one more attempt, succeeded again.
    let again = hooks.retry(acme_d[0].id).unwrap();
    assert_eq!(again.status, DeliveryStatus::Pending);
    assert!(
        worker.wait_idle(Some(Duration::from_secs(30))),
        "idle again"
    );
    let d = hooks.delivery(acme_d[0].id).unwrap();
    assert_eq!((d.status, d.attempts), (DeliveryStatus::Succeeded, 3));
    worker.stop();
    // Deleted: gone from the registry, its records kept.
    hooks.delete(acme.webhook.id).unwrap();
    assert!(matches!(
        hooks.get(acme.webhook.id),
        Err(WebhookError::UnknownWebhook(_))
    ));
    assert_eq!(hooks.list(None).unwrap().len(), 1);
    assert_eq!(hooks.list(Some("acme")).unwrap().len(), 0);
    assert_eq!(of(acme.webhook.id).len(), 2);
    assert!(matches!(
        hooks.delivery(ctrlbus::DeliveryId::new()),
        Err(WebhookError::UnknownDelivery(_))
    ));
}

/// Every check, each on a fresh log from `make(name)`.
fn run_all<L: EventLog + Clone + Send + 'static>(make: impl Fn(&str) -> L) {
    seqs_are_contiguous_and_ids_idempotent(&make("ids"));
    concurrent_publishers_share_one_order(&make("concurrent"));
    reads_filter_and_start_where_asked(&make("reads"));
    live_subscribers_run_before_publish_returns(&make("live"));
    bad_input_is_refused_and_what_is_read_publishes_again(&make("input"));
    durable_subscriptions_resume_and_dead_letter(&make("durable"));
    cursors_list_show_and_seek(&make("cursors"));
    webhooks_deliver_once_signed_and_retry(&make("webhooks"));
}

#[test]
fn the_contract_on_durable_bus() {
    let dir = tempfile::tempdir().unwrap();
    run_all(|name| {
        ctrlbus::DurableBus::builder()
            .max_deliveries(3)
            .retry_backoff(Duration::from_millis(5), Duration::from_millis(20))
            .open(dir.path().join(format!("{name}.redb")))
            .unwrap()
    });
}

#[cfg(feature = "jetstream")]
#[test]
fn the_contract_on_jetstream_bus() {
    let Some(cluster) = common::nats::Cluster::start(3) else {
        return;
    };
    run_all(|name| {
        ctrlbus::JetStreamBus::builder()
            .stream(name)
            .max_deliveries(3)
            .retry_backoff(Duration::from_millis(5), Duration::from_millis(20))
            .connect(&cluster.urls())
            .unwrap()
    });
}
