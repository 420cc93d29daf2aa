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
use std::sync::atomic::{AtomicBool, Ordering};

/// A one-shot reply slot: one `send`, and a receiver that parks at once
/// instead of spinning. (crossbeam's channels spin and yield before
/// parking, which with dozens of publishers waiting on two cores spent a
/// sixth of the CPU in `recv`.) A [`Nudger`] can wake the receiver without
/// a value, to hand it work.
///
/// Invariant: the value is set at most once; a sender dropped without
/// sending wakes the receiver with `None`; a nudge never replaces a value.
pub(crate) fn oneshot<T>() -> (OneshotSender<T>, OneshotReceiver<T>) {
    let slot = Arc::new(Slot {
        state: Mutex::new(SlotState::Waiting),
        ready: Condvar::new(),
        awaited: AtomicBool::new(false),
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
    /// Woken without a value (see [`Nudger`]); back to `Waiting` once seen.
    Nudged,
    Sent(T),
    Dropped,
}

struct Slot<T> {
    state: Mutex<SlotState<T>>,
    ready: Condvar,
    /// Set once the receiver has begun to wait (a hint for a sender picking
    /// whom to hand work to; nothing depends on it for correctness).
    awaited: AtomicBool,
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

    /// True once the receiver has said it waits ([`OneshotReceiver::awaiting`]).
    pub(crate) fn is_awaited(&self) -> bool {
        self.slot
            .as_ref()
            .is_some_and(|s| s.awaited.load(Ordering::Relaxed))
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

/// What [`OneshotReceiver::wait_for`] saw.
pub(crate) enum Waited<T> {
    /// The value (`None` if the sender was dropped without sending).
    Done(Option<T>),
    /// A [`Nudger`] woke the receiver, or the time ran out.
    Woken,
}

impl<T: Send + 'static> OneshotReceiver<T> {
    /// Tells the sender that this receiver is now waiting for its value.
    pub(crate) fn awaiting(&self) {
        self.slot.awaited.store(true, Ordering::Relaxed);
    }

    /// The value if it is there (`Some(None)` if the sender was dropped
    /// without sending); `None` while it is still awaited. Consumes a nudge.
    #[allow(clippy::option_option)] // two absences that mean different things
    pub(crate) fn try_take(&mut self) -> Option<Option<T>> {
        match take(&mut self.slot.state.lock()) {
            Some(Waited::Done(v)) => Some(v),
            Some(Waited::Woken) | None => None,
        }
    }

    /// Waits for the value, a nudge, or `timeout`.
    pub(crate) fn wait_for(&mut self, timeout: std::time::Duration) -> Waited<T> {
        let deadline = std::time::Instant::now() + timeout;
        let mut state = self.slot.state.lock();
        loop {
            if let Some(got) = take(&mut state) {
                return got;
            }
            if self.slot.ready.wait_until(&mut state, deadline).timed_out() {
                return take(&mut state).unwrap_or(Waited::Woken);
            }
        }
    }

    /// A handle that wakes this receiver without a value.
    pub(crate) fn nudger(&self) -> Nudger {
        Nudger(self.slot.clone())
    }
}

/// Takes what a slot holds, leaving it `Waiting`: the value, the sender's
/// drop, or a nudge; `None` while it still waits.
fn take<T>(state: &mut SlotState<T>) -> Option<Waited<T>> {
    match std::mem::replace(state, SlotState::Waiting) {
        SlotState::Sent(v) => Some(Waited::Done(Some(v))),
        SlotState::Dropped => Some(Waited::Done(None)),
        SlotState::Nudged => Some(Waited::Woken),
        SlotState::Waiting => None,
    }
}

trait Nudge: Send + Sync {
    /// Wakes a receiver still waiting for its value; false if the value (or
    /// the sender's drop) is already there.
    fn nudge(&self) -> bool;
}

impl<T: Send> Nudge for Slot<T> {
    fn nudge(&self) -> bool {
        let mut state = self.state.lock();
        if matches!(*state, SlotState::Waiting) {
            *state = SlotState::Nudged;
            self.ready.notify_one();
            true
        } else {
            matches!(*state, SlotState::Nudged)
        }
    }
}

/// Wakes a [`OneshotReceiver`] without giving it a value (to hand it work).
pub(crate) struct Nudger(Arc<dyn Nudge>);

impl Nudger {
    /// Wakes the receiver if it still waits for its value; false if it no
    /// longer does (so the caller can nudge another).
    pub(crate) fn nudge(&self) -> bool {
        self.0.nudge()
    }
}

/// A one-shot slot filled by a thread and awaited by a future: the async
/// counterpart of [`oneshot`], completed through the task's waker (no
/// thread waits for it).
///
/// Invariant: the value is set at most once; a sender dropped without
/// sending completes the receiver with `None`; the waker stored last is the
/// one woken.
#[cfg(feature = "tokio")]
pub(crate) fn async_oneshot<T>() -> (AsyncSender<T>, AsyncReceiver<T>) {
    let slot = Arc::new(Mutex::new(AsyncState {
        value: None,
        sender_gone: false,
        waker: None,
    }));
    (
        AsyncSender {
            slot: Some(slot.clone()),
        },
        AsyncReceiver { slot },
    )
}

#[cfg(feature = "tokio")]
struct AsyncState<T> {
    value: Option<T>,
    sender_gone: bool,
    waker: Option<std::task::Waker>,
}

/// The sending half of [`async_oneshot`].
#[cfg(feature = "tokio")]
pub(crate) struct AsyncSender<T> {
    slot: Option<Arc<Mutex<AsyncState<T>>>>,
}

#[cfg(feature = "tokio")]
impl<T> AsyncSender<T> {
    /// Completes the receiver with `value` and wakes its task.
    pub(crate) fn send(mut self, value: T) {
        if let Some(slot) = self.slot.take() {
            let waker = {
                let mut st = slot.lock();
                st.value = Some(value);
                st.waker.take()
            };
            if let Some(w) = waker {
                w.wake();
            }
        }
    }
}

#[cfg(feature = "tokio")]
impl<T> Drop for AsyncSender<T> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            let waker = {
                let mut st = slot.lock();
                st.sender_gone = true;
                st.waker.take()
            };
            if let Some(w) = waker {
                w.wake();
            }
        }
    }
}

/// The receiving half of [`async_oneshot`].
#[cfg(feature = "tokio")]
pub(crate) struct AsyncReceiver<T> {
    slot: Arc<Mutex<AsyncState<T>>>,
}

#[cfg(feature = "tokio")]
impl<T> AsyncReceiver<T> {
    /// The value once sent (`Some(None)` if the sender was dropped without
    /// sending); otherwise stores the task's waker and returns `Pending`.
    pub(crate) fn poll_take(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        let mut st = self.slot.lock();
        if let Some(v) = st.value.take() {
            return std::task::Poll::Ready(Some(v));
        }
        if st.sender_gone {
            return std::task::Poll::Ready(None);
        }
        match &st.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => st.waker = Some(cx.waker().clone()),
        }
        std::task::Poll::Pending
    }
}

/// Poisons what a background thread serves if the thread panics (after
/// fjall's `PoisonDart`): dropped while unwinding, it sets `flag` and runs
/// `on_panic`, so the bus fails with a clear error instead of waiting for a
/// thread that is gone. Hold it for the thread's whole life.
pub(crate) struct PoisonDart<'a> {
    flag: &'a AtomicBool,
    thread: &'static str,
    on_panic: Option<Box<dyn FnOnce() + 'a>>,
}

impl<'a> PoisonDart<'a> {
    /// A dart for the thread named `thread`, poisoning `flag`.
    pub(crate) fn new(flag: &'a AtomicBool, thread: &'static str) -> PoisonDart<'a> {
        PoisonDart {
            flag,
            thread,
            on_panic: None,
        }
    }

    /// Also runs `f` if the thread panics (to wake whoever waits on it).
    pub(crate) fn on_panic(mut self, f: impl FnOnce() + 'a) -> PoisonDart<'a> {
        self.on_panic = Some(Box::new(f));
        self
    }
}

impl Drop for PoisonDart<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.flag.store(true, Ordering::Release);
            tracing::error!(
                thread = self.thread,
                "a ctrlbus background thread panicked; the bus refuses further work until reopened"
            );
            if let Some(f) = self.on_panic.take() {
                f();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits for the value, through nudges and timeouts.
    fn recv<T: Send + 'static>(mut rx: OneshotReceiver<T>) -> Option<T> {
        loop {
            if let Waited::Done(v) = rx.wait_for(std::time::Duration::from_secs(1)) {
                return v;
            }
        }
    }

    #[test]
    fn a_nudge_wakes_a_waiting_receiver_without_a_value() {
        let (tx, mut rx) = oneshot::<u8>();
        let nudger = rx.nudger();
        let t = std::thread::spawn(move || {
            let woken = matches!(
                rx.wait_for(std::time::Duration::from_secs(60)),
                Waited::Woken
            );
            (woken, rx)
        });
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(nudger.nudge(), "the receiver was waiting");
        let (woken, mut rx) = t.join().unwrap();
        assert!(woken);
        // The nudge is consumed; the value still arrives.
        assert!(rx.try_take().is_none());
        tx.send(3);
        assert!(!nudger.nudge(), "a receiver with its value is not nudged");
        assert_eq!(rx.try_take(), Some(Some(3)));
        // A wait with nothing coming times out.
        let (_tx, mut rx) = oneshot::<u8>();
        assert!(matches!(
            rx.wait_for(std::time::Duration::from_millis(2)),
            Waited::Woken
        ));
    }

    #[cfg(feature = "tokio")]
    #[test]
    fn async_oneshot_wakes_the_task_once_filled_or_dropped() {
        use std::sync::atomic::AtomicUsize;
        use std::task::{Context, Poll, Wake, Waker};
        struct Count(AtomicUsize);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let (tx, mut rx) = async_oneshot::<u8>();
        assert!(rx.poll_take(&mut cx).is_pending());
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        tx.send(5);
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "sending woke the task");
        assert_eq!(rx.poll_take(&mut cx), Poll::Ready(Some(5)));
        let (tx, mut rx) = async_oneshot::<u8>();
        assert!(rx.poll_take(&mut cx).is_pending());
        drop(tx);
        assert_eq!(count.0.load(Ordering::SeqCst), 2, "dropping woke the task");
        assert_eq!(rx.poll_take(&mut cx), Poll::Ready(None));
    }

    #[test]
    fn oneshot_delivers_or_reports_a_dropped_sender() {
        let (tx, rx) = oneshot();
        let t = std::thread::spawn(move || recv(rx));
        tx.send(7);
        assert_eq!(t.join().unwrap(), Some(7));
        let (tx, rx) = oneshot();
        let t = std::thread::spawn(move || recv(rx));
        let waker = tx.fill(8);
        std::thread::sleep(std::time::Duration::from_millis(5));
        waker.wake();
        assert_eq!(t.join().unwrap(), Some(8));
        let (tx, rx) = oneshot::<u8>();
        let t = std::thread::spawn(move || recv(rx));
        drop(tx);
        assert_eq!(t.join().unwrap(), None);
    }
}
