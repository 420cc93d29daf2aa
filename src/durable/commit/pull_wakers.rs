//! What wakes the pull subscriptions (`durable_stream`) when a group has
//! been fanned out: only those whose filter wants one of its events.
//!
//! Waking every pull subscription after every group made each one's
//! worker thread read the group and find nothing for it: with 200 active
//! streams, each filtered to a tenant of its own, another tenant's
//! publishes ran at 0.37× the rate beside one stream ("one tenant slowing
//! another", `examples/tenant_streams`). Subscriptions whose filter names
//! a tenant are kept by tenant (`ByTenant`), so a group costs a lookup per
//! event however many tenants have streams; the others are matched against
//! each event.
//!
//! Each waker also remembers since where every group it was judged
//! against held nothing for it (`clean_from`): a subscription at or past
//! that point skips to the last group judged without reading the events
//! (`clean_through`), so a stream costs nothing for the events it doesn't
//! want, not a decode and a filter each.
//!
//! Invariants:
//! - Groups are judged in `seq` order, each once (the fan-out baton), and
//!   `judged` is the last `seq` of the last group judged.
//! - A pull subscription is woken after every group holding an event its
//!   filter matches. A group it doesn't want leaves it asleep: its position
//!   moves past that group at its next wake (a later group it wants, or
//!   its worker's 500 ms timeout), which is only bookkeeping.
//! - Every event in `[clean_from, judged]` was judged against the waker's
//!   filter and not wanted. A waker added after `judged` starts with
//!   `clean_from = judged + 1`: what came before it was never judged for it.
//! - A wake is a `try_send` on the subscription's bounded(1) channel: a
//!   wake already waiting there stands for this one too.

use crossbeam_channel::Sender;

use super::by_tenant::ByTenant;
use crate::bus::SubscriptionId;
use crate::event::Event;
use crate::filter::Filter;

struct PullWaker {
    id: SubscriptionId,
    filter: Filter,
    wake: Sender<()>,
    /// Every event judged from here on was not wanted.
    clean_from: u64,
}

impl PullWaker {
    /// Wakes it if it wants `event`, which ends in group `last`.
    fn wake_if_wanted(&mut self, event: &Event, last: u64) -> bool {
        if self.filter.matches(event) {
            let _ = self.wake.try_send(());
            self.clean_from = last + 1;
            true
        } else {
            false
        }
    }
}

/// The pull subscriptions' wakers, by the tenant their filter names.
pub(crate) struct PullWakers {
    wakers: ByTenant<PullWaker>,
    /// The last `seq` of the last group judged.
    judged: u64,
}

impl PullWakers {
    /// No wakers; the groups up to `judged` were fanned out before any.
    pub(crate) fn new(judged: u64) -> PullWakers {
        PullWakers {
            wakers: ByTenant::default(),
            judged,
        }
    }

    /// Adds subscription `id`, which `wake` wakes, for events `filter`
    /// matches.
    pub(crate) fn add(&mut self, id: SubscriptionId, filter: Filter, wake: Sender<()>) {
        let clean_from = self.judged + 1;
        let tenant = filter.tenant_id.clone();
        let waker = PullWaker {
            id,
            filter,
            wake,
            clean_from,
        };
        self.wakers.push(tenant.as_deref(), waker);
    }

    /// Removes subscription `id` (nothing if it isn't here).
    pub(crate) fn remove(&mut self, id: SubscriptionId) {
        self.wakers.retain(|w| w.id != id);
    }

    /// Removes every subscription (the bus is closing).
    pub(crate) fn clear(&mut self) {
        self.wakers = ByTenant::default();
    }

    /// Judges the group `events`, which ends at `last`: wakes every pull
    /// subscription that wants one of them.
    pub(crate) fn wake(&mut self, events: &[(u64, Event)], last: u64) {
        for (_, event) in events {
            for w in self.wakers.list_mut(Some(&event.tenant_id)) {
                w.wake_if_wanted(event, last);
            }
        }
        for w in self.wakers.list_mut(None) {
            for (_, event) in events {
                if w.wake_if_wanted(event, last) {
                    break;
                }
            }
        }
        self.judged = last;
    }

    /// For subscription `id` (whose filter names `tenant`) at `from`: the
    /// last `seq` it may skip to without reading, when every event from
    /// `from` to there was judged and not wanted.
    pub(crate) fn clean_through(
        &self,
        id: SubscriptionId,
        tenant: Option<&str>,
        from: u64,
    ) -> Option<u64> {
        let w = self.wakers.list(tenant).iter().find(|w| w.id == id)?;
        (w.clean_from <= from && from <= self.judged).then_some(self.judged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Type;
    use crossbeam_channel::{Receiver, bounded};

    fn sub(wakers: &mut PullWakers, id: u64, filter: Filter) -> Receiver<()> {
        let (tx, rx) = bounded(1);
        wakers.add(SubscriptionId(id), filter, tx);
        rx
    }

    /// Judges a group of `events` (type, tenant) following the last one.
    fn judge(w: &mut PullWakers, events: &[(&str, &str)]) {
        let first = w.judged + 1;
        let events: Vec<(u64, Event)> = events
            .iter()
            .enumerate()
            .map(|(i, (ty, tenant))| {
                (
                    first + i as u64,
                    Event::new(Type::new(*ty).unwrap(), *tenant),
                )
            })
            .collect();
        let last = first + events.len() as u64 - 1;
        w.wake(&events, last);
    }

    fn woken(rx: &Receiver<()>) -> bool {
        rx.try_recv().is_ok()
    }

    #[test]
    fn only_the_subscriptions_that_want_an_event_of_the_group_wake() {
        let mut w = PullWakers::new(0);
        let a = sub(&mut w, 1, Filter::all().tenant("a"));
        let a_deploys = sub(&mut w, 2, Filter::types(["deploy.*"]).unwrap().tenant("a"));
        let b = sub(&mut w, 3, Filter::all().tenant("b"));
        let any_health = sub(&mut w, 4, Filter::types(["health.*"]).unwrap());
        let all = sub(&mut w, 5, Filter::all());

        judge(
            &mut w,
            &[("instance.created", "a"), ("instance.created", "c")],
        );
        let got: Vec<bool> = [&a, &a_deploys, &b, &any_health, &all].map(woken).to_vec();
        assert_eq!(got, [true, false, false, false, true]);

        judge(&mut w, &[("health.degraded", "b"), ("deploy.failed", "a")]);
        let got: Vec<bool> = [&a, &a_deploys, &b, &any_health, &all].map(woken).to_vec();
        assert_eq!(got, [true, true, true, true, true]);

        judge(&mut w, &[("instance.created", "c")]);
        let got: Vec<bool> = [&a, &a_deploys, &b, &any_health, &all].map(woken).to_vec();
        assert_eq!(got, [false, false, false, false, true]);
    }

    #[test]
    fn a_removed_subscription_is_not_woken_and_the_others_stay() {
        let mut w = PullWakers::new(0);
        let a1 = sub(&mut w, 1, Filter::all().tenant("a"));
        let a2 = sub(&mut w, 2, Filter::all().tenant("a"));
        let any = sub(&mut w, 3, Filter::all());
        w.remove(SubscriptionId(1));
        w.remove(SubscriptionId(3));
        w.remove(SubscriptionId(99));
        judge(&mut w, &[("instance.created", "a")]);
        assert!(!woken(&a1));
        assert!(woken(&a2));
        assert!(!woken(&any));
        w.remove(SubscriptionId(2));
        assert!(!w.wakers.has_tenants(), "an emptied tenant is dropped");
        w.clear();
        judge(&mut w, &[("instance.created", "a")]);
        assert!(!woken(&a2));
    }

    #[test]
    fn a_subscription_skips_only_what_was_judged_and_not_wanted() {
        let mut w = PullWakers::new(0);
        judge(&mut w, &[("instance.created", "a")]); // 1, before the waker
        let _a = sub(&mut w, 1, Filter::all().tenant("a"));
        let _any = sub(&mut w, 2, Filter::types(["health.*"]).unwrap());
        let (a, any) = (SubscriptionId(1), SubscriptionId(2));
        // Seq 1 came before it: never skipped.
        assert_eq!(w.clean_through(a, Some("a"), 1), None);
        judge(
            &mut w,
            &[("instance.created", "b"), ("instance.created", "b")],
        ); // 2-3
        assert_eq!(
            w.clean_through(a, Some("a"), 1),
            None,
            "1 was not judged for it"
        );
        assert_eq!(w.clean_through(a, Some("a"), 2), Some(3));
        assert_eq!(w.clean_through(any, None, 2), Some(3));
        judge(
            &mut w,
            &[("instance.created", "a"), ("health.degraded", "b")],
        ); // 4-5
        // Both wanted the group: nothing up to 5 may be skipped.
        assert_eq!(w.clean_through(a, Some("a"), 2), None);
        assert_eq!(w.clean_through(a, Some("a"), 4), None);
        assert_eq!(w.clean_through(any, None, 5), None);
        judge(&mut w, &[("instance.created", "c")]); // 6
        assert_eq!(
            w.clean_through(a, Some("a"), 5),
            None,
            "5 was in a wanted group"
        );
        assert_eq!(w.clean_through(a, Some("a"), 6), Some(6));
        assert_eq!(w.clean_through(any, None, 6), Some(6));
        assert_eq!(
            w.clean_through(a, Some("a"), 7),
            None,
            "nothing judged past 6"
        );
        assert_eq!(
            w.clean_through(a, Some("b"), 6),
            None,
            "looked up by its tenant"
        );
        assert_eq!(w.clean_through(SubscriptionId(9), None, 6), None);
    }

    #[test]
    fn a_wake_waiting_in_the_channel_stands_for_the_next() {
        let mut w = PullWakers::new(0);
        let a = sub(&mut w, 1, Filter::all());
        judge(&mut w, &[("instance.created", "a")]);
        judge(&mut w, &[("instance.created", "a")]);
        assert!(woken(&a));
        assert!(!woken(&a), "two groups before the worker looked: one wake");
    }
}
