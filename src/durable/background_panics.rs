//! A background thread that panics poisons the bus with a clear error; no
//! caller waits for it forever.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::DurableBus;
use super::hooks::FnHook;
use crate::bus::Bus;
use crate::error::{PublishError, StorageError};
use crate::event::{Event, Type};
use crate::filter::Filter;

#[test]
fn a_panicking_applier_poisons_the_bus_and_nobody_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let bus = DurableBus::builder()
        .apply_interval(Duration::from_millis(1))
        .open(dir.path().join("log.redb"))
        .unwrap();
    // Panics inside the applier's transaction once armed.
    let armed = Arc::new(AtomicBool::new(false));
    let bomb = armed.clone();
    bus.shared()
        .hooks
        .write()
        .push(Arc::new(FnHook(move |_: &[(u64, &Event)], _: i64| {
            assert!(!bomb.load(Ordering::SeqCst), "boom in a hook");
        })));
    bus.publish(Event::new(Type::DEPLOY_STARTED, "t")).unwrap();
    armed.store(true, Ordering::SeqCst);
    // Acknowledged through the WAL; the applier then panics applying it.
    let acked = bus.publish(Event::new(Type::DEPLOY_STARTED, "t"));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !bus.shared().poisoned.load(Ordering::Acquire) {
        assert!(std::time::Instant::now() < deadline, "never poisoned");
        std::thread::sleep(Duration::from_millis(2));
    }
    // Every later call fails, naming the cause, and returns.
    let err = bus
        .publish(Event::new(Type::DEPLOY_STARTED, "t"))
        .unwrap_err();
    assert!(
        matches!(err, PublishError::Storage(StorageError::Poisoned)),
        "{err}"
    );
    assert!(err.to_string().contains("background threads"), "{err}");
    // A read still gives every acknowledged event, the one the applier
    // panicked on included (from memory, `read_tail`): never short.
    let read: Vec<u64> = bus
        .read(super::Position::Beginning, &Filter::all())
        .unwrap()
        .map(|e| e.unwrap().seq)
        .collect();
    let want = if acked.is_ok() { vec![1, 2] } else { vec![1] };
    assert_eq!(read, want);
    if acked.is_ok() {
        // What waits for the applier says why it can't.
        assert!(matches!(bus.stats(), Err(StorageError::Poisoned)));
    }
    drop(bus); // closing returns too
}
