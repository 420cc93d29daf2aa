//! No user code runs while ctrlbus holds redb's write lock: a handler that
//! writes (creates a webhook, moves a cursor) during a re-drive of dead
//! letters would otherwise wait on a lock its own caller holds.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ctrlbus::{Bus, DurableBus, Event, Filter, HandlerError, NewWebhook, Position, Type};

#[test]
fn a_redriven_handler_may_write_to_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let bus = DurableBus::builder()
        .max_deliveries(1)
        .retry_backoff(Duration::from_millis(1), Duration::from_millis(2))
        .open(dir.path().join("log.redb"))
        .unwrap();
    bus.subscribe_durable("other", Filter::all(), Position::Beginning, |_: &Event| {
        Ok::<(), HandlerError>(())
    })
    .unwrap();
    let healed = Arc::new(AtomicBool::new(false));
    let (h, b) = (healed.clone(), bus.clone());
    let sub = bus
        .subscribe_durable(
            "picky",
            Filter::all(),
            Position::Beginning,
            move |_: &Event| -> Result<(), HandlerError> {
                if !h.load(Ordering::SeqCst) {
                    return Err("not yet".into());
                }
                // Writes from inside the handler: each needs the write lock.
                b.webhooks()
                    .allow_private_targets(true)
                    .create(NewWebhook {
                        tenant_id: "acme".into(),
                        url: "http://127.0.0.1:9/hook".into(),
                        events: vec![],
                        secret: None,
                    })
                    .map_err(|e| HandlerError::msg(e.to_string()))?;
                Ok(())
            },
        )
        .unwrap();
    bus.publish(Event::new(Type::DEPLOY_STARTED, "acme"))
        .unwrap();
    common::wait_until("the dead letter", || {
        !bus.dead_letters("picky").unwrap().is_empty()
    });
    healed.store(true, Ordering::SeqCst);
    let (tx, rx) = std::sync::mpsc::channel();
    let redrive = std::thread::spawn(move || {
        let report = sub.redrive_dead_letters();
        let _ = tx.send(());
        (report, sub)
    });
    assert!(
        rx.recv_timeout(Duration::from_secs(20)).is_ok(),
        "the re-drive deadlocked on its own write lock"
    );
    let (report, sub) = redrive.join().unwrap();
    let report = report.unwrap();
    assert_eq!((report.succeeded, report.failed), (1, 0));
    assert_eq!(bus.webhooks().list(None).unwrap().len(), 1);
    drop(sub);
}
