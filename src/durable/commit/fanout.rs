//! Fan-out in `seq` order: groups are dispatched to live subscribers
//! strictly in `seq` order, one thread at a time (the thread holding the
//! baton, one of the waiting publishers), so every live subscriber sees
//! events in `seq` order (G3, G4, G5).

pub(crate) use super::live_subs::{LiveIndex, LiveSubs};
pub(crate) use super::pull_wakers::PullWakers;
use super::*;

/// Events committed together, waiting for or undergoing fan-out.
pub(crate) struct Group {
    pub(crate) last: u64,
    pub(crate) events: Vec<(u64, Event)>,
    pub(crate) failures: Mutex<Vec<(u64, HandlerFailure)>>,
    pub(crate) done: Mutex<bool>,
    pub(crate) done_cv: Condvar,
}

impl Group {
    pub(super) fn wait(&self) {
        let mut done = self.done.lock();
        while !*done {
            self.done_cv.wait(&mut done);
        }
    }
}

pub(crate) struct FanState {
    /// First `seq` not yet taken for dispatch.
    pub(crate) next_seq: u64,
    pub(crate) pending: BTreeMap<u64, Arc<Group>>,
    pub(crate) busy: bool,
    /// Durable subscriptions in live mode, by tenant.
    pub(crate) live_durable: LiveSubs,
    /// What wakes each pull subscription (`durable_stream`) when a group
    /// it wants has been fanned out: they read it from the log (from memory
    /// until it is applied), never live.
    pub(crate) pull_wakers: PullWakers,
}

impl FanState {
    pub(crate) fn new(next_seq: u64) -> FanState {
        FanState {
            next_seq,
            pending: BTreeMap::new(),
            busy: false,
            live_durable: LiveSubs::default(),
            pull_wakers: PullWakers::new(next_seq - 1),
        }
    }
}

thread_local! {
    /// True while this thread holds the fan-out baton (runs handlers).
    pub(super) static DISPATCHING: Cell<bool> = const { Cell::new(false) };
}

/// Takes the baton if nobody holds it and dispatches every ready group in
/// order. A re-entrant publish (from inside a handler) returns at once: its
/// group is dispatched by the loop that is already running.
pub(super) fn fan_out(shared: &Shared) {
    if DISPATCHING.get() {
        return;
    }
    let mut st = shared.fan.lock();
    if st.busy {
        return;
    }
    st.busy = true;
    DISPATCHING.set(true);
    loop {
        let next = st.next_seq;
        let Some(group) = st.pending.remove(&next) else {
            break;
        };
        st.next_seq = group.last + 1;
        let durable = st.live_durable.snapshot();
        drop(st);
        dispatch(shared, &group, &durable);
        *group.done.lock() = true;
        group.done_cv.notify_all();
        st = shared.fan.lock();
        st.pull_wakers.wake(&group.events, group.last);
    }
    st.busy = false;
    DISPATCHING.set(false);
}

/// Runs the handlers of every live subscriber for one group.
fn dispatch(shared: &Shared, group: &Group, durable: &LiveIndex) {
    // One snapshot of the plain subscribers per group, not per event.
    let live = shared.live.snapshot();
    if live.is_empty() && durable.is_empty() {
        return;
    }
    let mut failures = Vec::new();
    let mut tagged = Vec::new();
    for (seq, event) in &group.events {
        dispatch_to(&live, event, &mut failures);
        for sub in durable.for_event(event) {
            sub.deliver_live(shared, *seq, event, &mut failures);
        }
        tagged.extend(failures.drain(..).map(|f| (*seq, f)));
    }
    for sub in durable.all() {
        sub.finish_live_group(shared, group.last);
    }
    if !tagged.is_empty() {
        group.failures.lock().extend(tagged);
    }
}
