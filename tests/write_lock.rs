//! No user code runs while ctrlbus holds redb's write lock: a handler that
//! writes (creates a webhook, moves a cursor) during a re-drive of dead
//! letters would otherwise wait on a lock its own caller holds.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ctrlbus::{Bus, DurableBus, Event, Filter, HandlerError, Position, Type};

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
                    .create(common::hook_for("acme", "http://127.0.0.1:9/hook"))
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

/// Blocks the first read of the thread named `replayer` once armed, telling
/// the test, until the test lets it go (or 10 s pass).
#[derive(Debug)]
struct PauseReplay {
    armed: Arc<AtomicBool>,
    reached: std::sync::Mutex<std::sync::mpsc::Sender<()>>,
    resume: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl common::backend::Hook for PauseReplay {
    fn before(
        &self,
        op: common::backend::Op,
        _: &redb::backends::FileBackend,
        _: u64,
        _: &[u8],
    ) -> Option<std::io::Result<()>> {
        if op == common::backend::Op::Read
            && std::thread::current().name() == Some("replayer")
            && self.armed.swap(false, Ordering::SeqCst)
        {
            let _ = self.reached.lock().unwrap().send(());
            let _ = self
                .resume
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(10));
        }
        None
    }
}

#[test]
fn a_webhook_replay_scans_the_log_without_the_write_lock() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.redb");
    // A log of events, written and closed, so the replay reads it from the
    // file (a cold cache).
    let hook = {
        let bus = DurableBus::open(&path).unwrap();
        let hook = bus
            .webhooks()
            .allow_private_targets(true)
            .create(common::hook_for("acme", "http://127.0.0.1:9/hook"))
            .unwrap();
        for _ in 0..2000 {
            bus.publish(Event::new(Type::DEPLOY_STARTED, "acme"))
                .unwrap();
        }
        hook.webhook.id
    };
    let armed = Arc::new(AtomicBool::new(false));
    let (reached_tx, reached) = std::sync::mpsc::channel();
    let (resume, resume_rx) = std::sync::mpsc::channel();
    // On a backend there is no WAL: a publish commits to redb itself, so it
    // needs the write lock.
    let bus = DurableBus::builder()
        .cache_bytes(0)
        .open_backend(common::backend::Hooked::open(
            &path,
            PauseReplay {
                armed: armed.clone(),
                reached: std::sync::Mutex::new(reached_tx),
                resume: std::sync::Mutex::new(resume_rx),
            },
        ))
        .unwrap();
    let since = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(3600);
    armed.store(true, Ordering::SeqCst);
    let b = bus.clone();
    let replay = std::thread::Builder::new()
        .name("replayer".into())
        .spawn(move || b.webhooks().replay(hook, since, None))
        .unwrap();
    // The replay is paused in a read of the log: a publish must still go
    // through.
    reached
        .recv_timeout(Duration::from_secs(20))
        .expect("the replay read the file");
    let (done_tx, done) = std::sync::mpsc::channel();
    let b = bus.clone();
    let publisher = std::thread::spawn(move || {
        let r = b.publish(Event::new(Type::DEPLOY_STARTED, "beta"));
        let _ = done_tx.send(());
        r
    });
    let went_through = done.recv_timeout(Duration::from_secs(5)).is_ok();
    resume.send(()).unwrap();
    publisher.join().unwrap().unwrap();
    let created = replay.join().unwrap().unwrap();
    assert!(
        went_through,
        "a publish waited for a replay that was reading the log: the replay held the write lock"
    );
    assert_eq!(created.len(), 2000, "one new delivery per event of acme");
}
