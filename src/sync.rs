//! The one place locks come from.
//!
//! Every lock in ctrlbus is a `parking_lot` lock taken through this module, so
//! that lock types can be swapped (for example for a model checker) in one
//! place. `parking_lot` locks do not poison: a handler that panics while the
//! bus holds no lock cannot wedge the bus, and the bus never calls a handler
//! while holding one of these locks (see `fanout`).

#[allow(unused_imports)]
pub(crate) use parking_lot::{Condvar, Mutex, MutexGuard, RwLock};

use std::sync::Arc;

/// A one-shot reply slot: one `send`, one `recv`, and a receiver that parks
/// at once instead of spinning. (crossbeam's channels spin and yield before
/// parking, which with dozens of publishers waiting on two cores spent a
/// sixth of the CPU in `recv`.)
///
/// Invariant: the value is set at most once; a sender dropped without
/// sending wakes the receiver with `None`.
pub(crate) fn oneshot<T>() -> (OneshotSender<T>, OneshotReceiver<T>) {
    let slot = Arc::new(Slot {
        state: Mutex::new(SlotState::Waiting),
        ready: Condvar::new(),
    });
    (
        OneshotSender {
            slot: Some(slot.clone()),
        },
        OneshotReceiver { slot },
    )
}

enum SlotState<T> {
    Waiting,
    Sent(T),
    Dropped,
}

struct Slot<T> {
    state: Mutex<SlotState<T>>,
    ready: Condvar,
}

/// The sending half of [`oneshot`].
pub(crate) struct OneshotSender<T> {
    slot: Option<Arc<Slot<T>>>,
}

impl<T: Send + 'static> OneshotSender<T> {
    /// Sends the value and wakes the receiver.
    pub(crate) fn send(mut self, value: T) {
        if let Some(slot) = self.slot.take() {
            *slot.state.lock() = SlotState::Sent(value);
            slot.ready.notify_one();
        }
    }

    /// Stores the value without waking the receiver; the returned waker
    /// wakes it. Lets one thread hand out many replies and another do the
    /// waking (each wake is a system call).
    pub(crate) fn fill(mut self, value: T) -> Waker {
        let slot = self.slot.take();
        if let Some(slot) = &slot {
            *slot.state.lock() = SlotState::Sent(value);
        }
        Waker(slot.map(|s| s as Arc<dyn Wake>))
    }
}

trait Wake: Send + Sync {
    fn wake(&self);
}

impl<T: Send> Wake for Slot<T> {
    fn wake(&self) {
        // Taking the lock orders the wake after a receiver that found the
        // slot empty has started waiting.
        let _guard = self.state.lock();
        self.ready.notify_one();
    }
}

/// Wakes the receiver of a filled [`OneshotSender`]. Dropping it wakes too,
/// so a filled reply is never lost.
pub(crate) struct Waker(Option<Arc<dyn Wake>>);

impl Waker {
    /// Wakes the receiver.
    pub(crate) fn wake(mut self) {
        if let Some(w) = self.0.take() {
            w.wake();
        }
    }
}

impl Drop for Waker {
    fn drop(&mut self) {
        if let Some(w) = self.0.take() {
            w.wake();
        }
    }
}

impl<T> Drop for OneshotSender<T> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            *slot.state.lock() = SlotState::Dropped;
            slot.ready.notify_one();
        }
    }
}

/// The receiving half of [`oneshot`].
pub(crate) struct OneshotReceiver<T> {
    slot: Arc<Slot<T>>,
}

impl<T> OneshotReceiver<T> {
    /// Waits for the value; `None` if the sender was dropped without sending.
    pub(crate) fn recv(self) -> Option<T> {
        let mut state = self.slot.state.lock();
        loop {
            match std::mem::replace(&mut *state, SlotState::Waiting) {
                SlotState::Sent(v) => return Some(v),
                SlotState::Dropped => return None,
                SlotState::Waiting => self.slot.ready.wait(&mut state),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oneshot_delivers_or_reports_a_dropped_sender() {
        let (tx, rx) = oneshot();
        let t = std::thread::spawn(move || rx.recv());
        tx.send(7);
        assert_eq!(t.join().unwrap(), Some(7));
        let (tx, rx) = oneshot();
        let t = std::thread::spawn(move || rx.recv());
        let waker = tx.fill(8);
        std::thread::sleep(std::time::Duration::from_millis(5));
        waker.wake();
        assert_eq!(t.join().unwrap(), Some(8));
        let (tx, rx) = oneshot::<u8>();
        let t = std::thread::spawn(move || rx.recv());
        drop(tx);
        assert_eq!(t.join().unwrap(), None);
    }
}
