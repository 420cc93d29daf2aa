//! `InMemoryBus`: the faults of the Go original, fixed, a test each.
//!
//! The Go `InMemoryBus` stopped fan-out at the first failing handler (and a
//! panic took the publisher down), removed the wrong subscriber when
//! subscriptions were cancelled out of order, held its lock while calling
//! handlers (so a handler that published or subscribed deadlocked), and kept
//! an unbounded history. Each test below fails on that behaviour.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use ctrlbus::{
    Bus, DEFAULT_HISTORY, Event, EventId, Filter, HandlerError, InMemoryBus, PublishError,
    ReadError, SubscribeError, Subscription, Type,
};

/// Runs `f` on another thread and fails the test if it has not finished in
/// `secs` seconds (a deadlock shows up as a failure, not a hung test run).
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("deadlock: not done after {secs} s"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("the scenario panicked"),
    }
}

/// A handler counting its calls.
fn counter(bus: &InMemoryBus, filter: Filter) -> (Subscription, Arc<AtomicUsize>) {
    let n = Arc::new(AtomicUsize::new(0));
    let c = n.clone();
    let sub = bus
        .subscribe(filter, move |_: &Event| -> Result<(), HandlerError> {
            c.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
    (sub, n)
}

fn ev(t: Type) -> Event {
    Event::new(t, "tenant-1")
}

fn counts(counters: &[Arc<AtomicUsize>]) -> Vec<usize> {
    counters.iter().map(|c| c.load(Ordering::SeqCst)).collect()
}

// (a) ------------------------------------------------ failure isolation

#[test]
fn failing_and_panicking_handlers_do_not_stop_the_others() {
    let bus = InMemoryBus::new();
    let order = Arc::new(Mutex::new(Vec::<&'static str>::new()));
    let mut subs = Vec::new();
    for (name, kind) in [
        ("first", 0),
        ("fails", 1),
        ("middle", 0),
        ("panics", 2),
        ("last", 0),
    ] {
        let order = order.clone();
        subs.push(
            bus.subscribe(
                Filter::all(),
                move |_: &Event| -> Result<(), HandlerError> {
                    order.lock().unwrap().push(name);
                    match kind {
                        1 => Err(HandlerError::msg("quota exceeded")),
                        2 => panic!("handler bug"),
                        _ => Ok(()),
                    }
                },
            )
            .unwrap(),
        );
    }

    let receipt = bus.publish(ev(Type::DEPLOY_FAILED)).unwrap();
    assert_eq!(receipt.seq, 1);
    // Every handler ran, in subscription order, the later ones included.
    assert_eq!(
        *order.lock().unwrap(),
        ["first", "fails", "middle", "panics", "last"]
    );
    // The publisher learns exactly which subscriptions failed, and how.
    let failed: Vec<_> = receipt
        .handler_failures
        .iter()
        .map(|f| f.subscription)
        .collect();
    assert_eq!(failed, [subs[1].id(), subs[3].id()]);
    let [err, panic] = &receipt.handler_failures[..] else {
        unreachable!()
    };
    assert!(!err.panicked);
    assert!(err.error.contains("quota exceeded"), "{}", err.error);
    assert!(panic.panicked);
    assert!(panic.error.contains("handler bug"), "{}", panic.error);

    // The event counts as published, and the bus keeps working.
    assert_eq!(
        bus.recent_events(10, &Filter::all()).unwrap()[0].id,
        receipt.id
    );
    order.lock().unwrap().clear();
    let receipt = bus.publish(ev(Type::DEPLOY_STARTED)).unwrap();
    assert_eq!(receipt.seq, 2);
    assert_eq!(order.lock().unwrap().len(), 5);
    assert_eq!(receipt.handler_failures.len(), 2);
}

#[test]
fn clean_publish_reports_no_failures() {
    let bus = InMemoryBus::new();
    let (_sub, n) = counter(&bus, Filter::all());
    let receipt = bus.publish(ev(Type::HEALTH_PASSED)).unwrap();
    assert!(receipt.handler_failures.is_empty());
    assert!(!receipt.duplicate);
    assert_eq!(n.load(Ordering::SeqCst), 1);
}

// (b) ------------------------------------------- unsubscribe in any order

#[test]
fn unsubscribing_in_any_order_removes_exactly_that_one() {
    let bus = InMemoryBus::new();
    let mut subs: Vec<Option<Subscription>> = Vec::new();
    let mut counters = Vec::new();
    for _ in 0..6 {
        let (sub, n) = counter(&bus, Filter::all());
        subs.push(Some(sub));
        counters.push(n);
    }
    bus.publish(ev(Type::INSTANCE_CREATED)).unwrap();
    assert_eq!(counts(&counters), [1, 1, 1, 1, 1, 1]);

    // Middle, by `unsubscribe`.
    assert!(subs[2].take().unwrap().unsubscribe());
    bus.publish(ev(Type::INSTANCE_CREATED)).unwrap();
    assert_eq!(counts(&counters), [2, 2, 1, 2, 2, 2]);
    assert_eq!(bus.subscriber_count(), 5);

    // First, by drop.
    drop(subs[0].take());
    bus.publish(ev(Type::INSTANCE_CREATED)).unwrap();
    assert_eq!(counts(&counters), [2, 3, 1, 3, 3, 3]);

    // Last, by `unsubscribe`.
    assert!(subs[5].take().unwrap().unsubscribe());
    bus.publish(ev(Type::INSTANCE_CREATED)).unwrap();
    assert_eq!(counts(&counters), [2, 4, 1, 4, 4, 3]);

    // A subscription made now goes at the end and is distinct.
    let (late, late_n) = counter(&bus, Filter::all());
    counters.push(late_n);
    subs.push(Some(late));

    // Then the new last by drop, then one in the middle by drop.
    drop(subs[6].take());
    drop(subs[3].take());
    bus.publish(ev(Type::INSTANCE_CREATED)).unwrap();
    assert_eq!(counts(&counters), [2, 5, 1, 4, 5, 3, 0]);
    assert_eq!(bus.subscriber_count(), 2);

    // The rest, and nothing is left.
    drop(subs[4].take());
    assert!(subs[1].take().unwrap().unsubscribe());
    bus.publish(ev(Type::INSTANCE_CREATED)).unwrap();
    assert_eq!(counts(&counters), [2, 5, 1, 4, 5, 3, 0]);
    assert_eq!(bus.subscriber_count(), 0);
}

#[test]
fn unsubscribe_in_every_order_of_four() {
    // All 24 orders of removing four subscriptions, alternating unsubscribe
    // and drop: after each removal exactly the remaining ones are called.
    let mut orders = Vec::new();
    permutations(&mut vec![0, 1, 2, 3], 0, &mut orders);
    assert_eq!(orders.len(), 24);
    for order in orders {
        let bus = InMemoryBus::new();
        let mut subs: Vec<Option<Subscription>> = Vec::new();
        let mut counters = Vec::new();
        for _ in 0..4 {
            let (s, n) = counter(&bus, Filter::all());
            subs.push(Some(s));
            counters.push(n);
        }
        let mut alive = [true; 4];
        let mut expected = [0usize; 4];
        for (step, &victim) in order.iter().enumerate() {
            let sub = subs[victim].take().unwrap();
            if step % 2 == 0 {
                assert!(sub.unsubscribe());
            } else {
                drop(sub);
            }
            alive[victim] = false;
            bus.publish(ev(Type::HEALTH_PASSED)).unwrap();
            for i in 0..4 {
                if alive[i] {
                    expected[i] += 1;
                }
            }
            assert_eq!(counts(&counters), expected, "order {order:?}, step {step}");
        }
    }
}

#[test]
fn unsubscribe_drops_the_handler() {
    // Ending a subscription releases what its handler holds (a channel, a
    // connection), even if nothing is published afterwards.
    let bus = InMemoryBus::new();
    let state = Arc::new(());
    let held = state.clone();
    let sub = bus
        .subscribe(Filter::all(), move |_: &Event| {
            let _ = &held;
            Ok(())
        })
        .unwrap();
    bus.publish(ev(Type::HEALTH_PASSED)).unwrap();
    assert_eq!(Arc::strong_count(&state), 2);
    assert!(sub.unsubscribe());
    assert_eq!(
        Arc::strong_count(&state),
        1,
        "handler dropped on unsubscribe"
    );

    let held = state.clone();
    let _sub = bus
        .subscribe(Filter::all(), move |_: &Event| {
            let _ = &held;
            Ok(())
        })
        .unwrap();
    bus.publish(ev(Type::HEALTH_PASSED)).unwrap();
    bus.close();
    assert_eq!(Arc::strong_count(&state), 1, "handler dropped on close");
}

fn permutations(v: &mut Vec<usize>, k: usize, out: &mut Vec<Vec<usize>>) {
    if k == v.len() {
        out.push(v.clone());
        return;
    }
    for i in k..v.len() {
        v.swap(k, i);
        permutations(v, k + 1, out);
        v.swap(k, i);
    }
}

// (c) ---------------------------------------------- re-entrant handlers

#[test]
fn handler_may_publish_subscribe_and_unsubscribe() {
    within(10, || {
        let bus = InMemoryBus::new();
        let (victim, victim_n) = counter(&bus, Filter::types(["deploy.*"]).unwrap());
        let (_nested_seen, nested_n) = counter(&bus, Filter::types(["health.*"]).unwrap());

        let victim_slot = Arc::new(Mutex::new(Some(victim)));
        let self_slot: Arc<Mutex<Option<Subscription>>> = Arc::new(Mutex::new(None));
        let added: Arc<Mutex<Vec<Subscription>>> = Arc::new(Mutex::new(Vec::new()));
        let added_n = Arc::new(AtomicUsize::new(0));
        let inner_receipts = Arc::new(Mutex::new(Vec::new()));

        let reentrant = {
            let bus = bus.clone();
            let victim_slot = victim_slot.clone();
            let self_slot = self_slot.clone();
            let added = added.clone();
            let added_n = added_n.clone();
            let inner_receipts = inner_receipts.clone();
            move |e: &Event| -> Result<(), HandlerError> {
                if e.event_type != Type::DEPLOY_STARTED {
                    return Ok(());
                }
                // Publish from inside: the nested event is fanned out
                // before this publish returns.
                let before = nested_n.load(Ordering::SeqCst);
                let r = bus.publish(Event::new(Type::HEALTH_DEGRADED, "tenant-1"))?;
                assert_eq!(nested_n.load(Ordering::SeqCst), before + 1);
                inner_receipts.lock().unwrap().push(r.seq);
                // Subscribe from inside.
                let n = added_n.clone();
                let sub = bus.subscribe(Filter::all(), move |_: &Event| {
                    n.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                })?;
                added.lock().unwrap().push(sub);
                // Unsubscribe another subscription from inside.
                if let Some(v) = victim_slot.lock().unwrap().take() {
                    assert!(v.unsubscribe());
                }
                // And unsubscribe itself.
                drop(self_slot.lock().unwrap().take());
                // Reading the history from inside works too.
                bus.recent_events(10, &Filter::all())?;
                Ok(())
            }
        };
        let me = bus
            .subscribe(Filter::types(["deploy.*"]).unwrap(), reentrant)
            .unwrap();
        *self_slot.lock().unwrap() = Some(me);

        let outer = bus.publish(ev(Type::DEPLOY_STARTED)).unwrap();
        assert!(outer.handler_failures.is_empty(), "{outer:?}");
        assert_eq!(inner_receipts.lock().unwrap().len(), 1);
        assert_eq!(victim_n.load(Ordering::SeqCst), 1, "victim ran before");
        assert_eq!(added.lock().unwrap().len(), 1);
        // It unsubscribed itself: a second deploy event runs no re-entrant
        // code; the victim is gone; the handler added from inside sees it.
        let second = bus.publish(ev(Type::DEPLOY_STARTED)).unwrap();
        assert!(second.handler_failures.is_empty());
        assert_eq!(inner_receipts.lock().unwrap().len(), 1);
        assert_eq!(victim_n.load(Ordering::SeqCst), 1);
        // The handler added from inside came after the nested publish and
        // after the first event's snapshot: it sees only the second event.
        assert_eq!(added_n.load(Ordering::SeqCst), 1);
        assert_eq!(bus.subscriber_count(), 2); // health counter + added
        let mut seqs = vec![outer.seq, second.seq];
        seqs.extend(inner_receipts.lock().unwrap().iter());
        seqs.sort_unstable();
        assert_eq!(seqs, [1, 2, 3]);
    });
}

#[test]
fn dropping_a_handler_that_holds_a_subscription_does_not_deadlock() {
    // A handler's captures are dropped when it is unsubscribed; if they hold
    // another subscription, that one ends too, from inside the bus's own
    // bookkeeping. With and without a publish in between, by unsubscribe
    // and by close.
    for (publish_first, by_close) in [(false, false), (true, false), (false, true), (true, true)] {
        within(10, move || {
            let bus = InMemoryBus::new();
            let (other, other_n) = counter(&bus, Filter::all());
            let held = Mutex::new(Some(other));
            let holder = bus
                .subscribe(
                    Filter::types(["never.matches"]).unwrap(),
                    move |_: &Event| {
                        let _ = &held;
                        Ok(())
                    },
                )
                .unwrap();
            if publish_first {
                bus.publish(ev(Type::HEALTH_PASSED)).unwrap();
            }
            if by_close {
                bus.close();
                assert!(!holder.unsubscribe());
            } else {
                assert!(holder.unsubscribe());
                // The held subscription ended with its holder.
                assert_eq!(bus.subscriber_count(), 0);
                let before = other_n.load(Ordering::SeqCst);
                bus.publish(ev(Type::HEALTH_PASSED)).unwrap();
                assert_eq!(other_n.load(Ordering::SeqCst), before);
            }
        });
    }
}

#[test]
fn handler_may_close_the_bus() {
    within(10, || {
        let bus = InMemoryBus::new();
        let b = bus.clone();
        let _sub = bus
            .subscribe(Filter::all(), move |_: &Event| {
                b.close();
                Ok(())
            })
            .unwrap();
        assert!(bus.publish(ev(Type::INSTANCE_DELETED)).is_ok());
        assert!(matches!(
            bus.publish(ev(Type::INSTANCE_DELETED)),
            Err(PublishError::Closed)
        ));
    });
}

#[test]
fn handlers_publishing_from_many_threads_do_not_deadlock() {
    within(30, || {
        let bus = InMemoryBus::new();
        let echoes = Arc::new(AtomicUsize::new(0));
        let b = bus.clone();
        let _echo = bus
            .subscribe(
                Filter::types(["deploy.started"]).unwrap(),
                move |_: &Event| {
                    // Each handler publishes and subscribes/unsubscribes while
                    // other threads do the same.
                    b.publish(Event::new(Type::DEPLOY_SUCCEEDED, "t"))?;
                    let s = b.subscribe(Filter::all(), |_: &Event| Ok(()))?;
                    drop(s);
                    Ok(())
                },
            )
            .unwrap();
        let e = echoes.clone();
        let _count = bus
            .subscribe(
                Filter::types(["deploy.succeeded"]).unwrap(),
                move |_: &Event| {
                    e.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                },
            )
            .unwrap();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let bus = bus.clone();
                thread::spawn(move || {
                    for _ in 0..500 {
                        let r = bus.publish(ev(Type::DEPLOY_STARTED)).unwrap();
                        assert!(r.handler_failures.is_empty());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(echoes.load(Ordering::SeqCst), 2000);
        assert_eq!(bus.subscriber_count(), 2);
    });
}

// (d) ----------------------------------------------------- bounded history

#[test]
fn history_is_a_bounded_ring_of_1000_by_default() {
    assert_eq!(DEFAULT_HISTORY, 1000);
    let bus = InMemoryBus::new();
    let mut ids = Vec::new();
    for i in 0..5000 {
        let t = if i % 5 == 0 {
            Type::DEPLOY_FAILED
        } else {
            Type::HEALTH_PASSED
        };
        let r = bus
            .publish(Event::new(t, format!("tenant-{}", i % 2)))
            .unwrap();
        assert_eq!(r.seq, i + 1);
        ids.push(r.id);
    }
    let all = bus.recent_events(usize::MAX, &Filter::all()).unwrap();
    assert_eq!(all.len(), 1000);
    let got: Vec<EventId> = all.iter().map(|e| e.id).collect();
    assert_eq!(got, ids[4000..], "the newest 1000, oldest first");

    // A limit takes the newest, still oldest first.
    let last3: Vec<EventId> = bus
        .recent_events(3, &Filter::all())
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(last3, ids[4997..]);

    // A filter applies before the limit.
    let deploys = bus
        .recent_events(10, &Filter::types(["deploy.*"]).unwrap())
        .unwrap();
    let expected: Vec<EventId> = (4950..5000).step_by(5).map(|i| ids[i]).collect();
    assert_eq!(deploys.iter().map(|e| e.id).collect::<Vec<_>>(), expected);
    let tenant = bus
        .recent_events(usize::MAX, &Filter::all().tenant("tenant-1"))
        .unwrap();
    assert_eq!(tenant.len(), 500);
    assert!(tenant.iter().all(|e| e.tenant_id == "tenant-1"));
    // Only what the ring holds: 200 deploy events among the last 1000.
    let deploys = bus
        .recent_events(usize::MAX, &Filter::types(["deploy.failed"]).unwrap())
        .unwrap();
    assert_eq!(deploys.len(), 200);
    assert!(bus.recent_events(0, &Filter::all()).unwrap().is_empty());
}

#[test]
fn history_capacity_is_configurable() {
    let bus = InMemoryBus::with_history(3);
    let ids: Vec<EventId> = (0..10)
        .map(|_| bus.publish(ev(Type::HEALTH_PASSED)).unwrap().id)
        .collect();
    let got: Vec<EventId> = bus
        .recent_events(100, &Filter::all())
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(got, ids[7..]);

    let none = InMemoryBus::with_history(0);
    let (_s, n) = counter(&none, Filter::all());
    assert_eq!(none.publish(ev(Type::HEALTH_PASSED)).unwrap().seq, 1);
    assert_eq!(n.load(Ordering::SeqCst), 1);
    assert!(none.recent_events(10, &Filter::all()).unwrap().is_empty());
}

#[test]
fn history_keeps_events_unchanged() {
    let bus = InMemoryBus::new();
    let event = Event::new(Type::INSTANCE_SCALED, "tenant-9")
        .with_actor("alice")
        .with_payload_value("replicas", 3);
    bus.publish(event.clone()).unwrap();
    assert_eq!(bus.recent_events(1, &Filter::all()).unwrap(), [event]);
}

#[test]
fn event_is_in_history_before_its_handlers_run() {
    // As on the durable bus (G1): by the time a handler sees an event, the
    // event is recorded, so a handler reading history sees it.
    let bus = InMemoryBus::new();
    let b = bus.clone();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let _sub = bus
        .subscribe(Filter::all(), move |e: &Event| {
            let newest = b.recent_events(1, &Filter::all())?;
            s.lock()
                .unwrap()
                .push(newest.first().map(|n| n.id) == Some(e.id));
            Ok(())
        })
        .unwrap();
    for _ in 0..3 {
        bus.publish(ev(Type::HEALTH_PASSED)).unwrap();
    }
    assert_eq!(*seen.lock().unwrap(), [true, true, true]);
}

#[test]
fn history_order_is_seq_order_with_nested_publishes() {
    // A handler reacting to event 1 publishes event 2: the history shows the
    // cause before the effect, matching the sequence numbers.
    let bus = InMemoryBus::new();
    let b = bus.clone();
    let nested = Arc::new(Mutex::new(None));
    let n = nested.clone();
    let _sub = bus
        .subscribe(
            Filter::types(["deploy.failed"]).unwrap(),
            move |_: &Event| {
                let r = b.publish(Event::new(Type::DEPLOY_ROLLED_BACK, "tenant-1"))?;
                *n.lock().unwrap() = Some(r);
                Ok(())
            },
        )
        .unwrap();
    let outer = bus.publish(ev(Type::DEPLOY_FAILED)).unwrap();
    let inner = nested.lock().unwrap().take().unwrap();
    assert_eq!((outer.seq, inner.seq), (1, 2));
    let history: Vec<EventId> = bus
        .recent_events(10, &Filter::all())
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(history, [outer.id, inner.id]);
}

// (e) --------------------------------------------------------------- close

#[test]
fn publish_subscribe_and_read_after_close_are_errors() {
    let bus = InMemoryBus::new();
    let (sub, n) = counter(&bus, Filter::all());
    bus.publish(ev(Type::HEALTH_PASSED)).unwrap();
    let other_handle = bus.clone();
    bus.close();

    assert!(matches!(
        bus.publish(ev(Type::HEALTH_PASSED)),
        Err(PublishError::Closed)
    ));
    assert!(matches!(
        other_handle.publish(ev(Type::HEALTH_PASSED)),
        Err(PublishError::Closed)
    ));
    assert!(matches!(
        bus.subscribe(Filter::all(), |_: &Event| Ok(())),
        Err(SubscribeError::Closed)
    ));
    assert!(matches!(
        bus.recent_events(10, &Filter::all()),
        Err(ReadError::Closed)
    ));
    assert_eq!(n.load(Ordering::SeqCst), 1);
    assert_eq!(bus.subscriber_count(), 0, "close ends subscriptions");
    assert!(!sub.unsubscribe(), "already ended by close");
    bus.close(); // closing twice is harmless
    for e in [
        PublishError::Closed.to_string(),
        SubscribeError::Closed.to_string(),
        ReadError::Closed.to_string(),
    ] {
        assert!(e.contains("closed"), "{e}");
    }
}

#[test]
fn subscription_outliving_its_bus_is_harmless() {
    let bus = InMemoryBus::new();
    let (sub, _n) = counter(&bus, Filter::all());
    drop(bus);
    assert!(!sub.unsubscribe());
}

// (f) ------------------------------------------------------- concurrency

#[test]
fn concurrent_publishers_each_handler_sees_each_event_exactly_once() {
    const THREADS: usize = 8;
    const PER_THREAD: usize = 2000;
    const TOTAL: usize = THREADS * PER_THREAD;

    within(120, || {
        let bus = InMemoryBus::with_history(TOTAL);
        let mut sets = Vec::new();
        let mut subs = Vec::new();
        let duplicates = Arc::new(AtomicUsize::new(0));
        for _ in 0..4 {
            let set = Arc::new(Mutex::new(HashSet::<EventId>::with_capacity(TOTAL)));
            let s = set.clone();
            let d = duplicates.clone();
            subs.push(
                bus.subscribe(Filter::all(), move |e: &Event| {
                    if !s.lock().unwrap().insert(e.id) {
                        d.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(())
                })
                .unwrap(),
            );
            sets.push(set);
        }

        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let bus = bus.clone();
                thread::spawn(move || {
                    let mut receipts = Vec::with_capacity(PER_THREAD);
                    for i in 0..PER_THREAD {
                        let e = Event::new(Type::INSTANCE_STARTED, format!("tenant-{t}"))
                            .with_payload_value("i", i);
                        let r = bus.publish(e).unwrap();
                        assert!(r.handler_failures.is_empty());
                        receipts.push((r.seq, r.id));
                    }
                    receipts
                })
            })
            .collect();
        let mut receipts: Vec<(u64, EventId)> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();

        assert_eq!(duplicates.load(Ordering::SeqCst), 0);
        let published: HashSet<EventId> = receipts.iter().map(|r| r.1).collect();
        assert_eq!(published.len(), TOTAL);
        for set in &sets {
            let set = set.lock().unwrap();
            assert_eq!(set.len(), TOTAL);
            assert!(*set == published);
        }

        // Sequence numbers: unique, exactly 1..=TOTAL.
        receipts.sort_unstable_by_key(|r| r.0);
        let seqs: Vec<u64> = receipts.iter().map(|r| r.0).collect();
        assert_eq!(seqs, (1..=TOTAL as u64).collect::<Vec<_>>());

        // The history is in sequence-number order.
        let history: Vec<EventId> = bus
            .recent_events(TOTAL, &Filter::all())
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect();
        let by_seq: Vec<EventId> = receipts.iter().map(|r| r.1).collect();
        assert!(history == by_seq, "recent_events is not in seq order");
        drop(subs);
    });
}

#[test]
fn subscribing_and_unsubscribing_while_publishing() {
    // A subscription's handler runs only while it is live, and never twice
    // for one event, while other threads publish.
    within(60, || {
        let bus = InMemoryBus::new();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let publishers: Vec<_> = (0..4)
            .map(|_| {
                let bus = bus.clone();
                let stop = stop.clone();
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        bus.publish(ev(Type::HEALTH_PASSED)).unwrap();
                    }
                })
            })
            .collect();
        for _ in 0..200 {
            let seen = Arc::new(Mutex::new(HashSet::new()));
            let dup = Arc::new(AtomicUsize::new(0));
            let (s, d) = (seen.clone(), dup.clone());
            let sub = bus
                .subscribe(Filter::all(), move |e: &Event| {
                    if !s.lock().unwrap().insert(e.id) {
                        d.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(())
                })
                .unwrap();
            thread::yield_now();
            drop(sub);
            assert_eq!(dup.load(Ordering::SeqCst), 0);
        }
        stop.store(true, Ordering::Relaxed);
        for p in publishers {
            p.join().unwrap();
        }
        assert_eq!(bus.subscriber_count(), 0);
    });
}

// Fan-out basics ------------------------------------------------------------

#[test]
fn fan_out_is_synchronous_in_subscription_order_and_filtered() {
    let bus = InMemoryBus::new();
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut subs = Vec::new();
    for (name, filter) in [
        ("all", Filter::all()),
        ("deploys", Filter::types(["deploy.*"]).unwrap()),
        ("tenant-2", Filter::all().tenant("tenant-2")),
        (
            "failures",
            Filter::types(["deploy.failed", "health.failed"]).unwrap(),
        ),
    ] {
        let log = log.clone();
        subs.push(
            bus.subscribe(filter, move |e: &Event| {
                log.lock().unwrap().push(format!("{name}:{}", e.event_type));
                Ok(())
            })
            .unwrap(),
        );
    }
    bus.publish(Event::new(Type::DEPLOY_FAILED, "tenant-1"))
        .unwrap();
    // Synchronous: everything ran before publish returned.
    assert_eq!(
        *log.lock().unwrap(),
        [
            "all:deploy.failed",
            "deploys:deploy.failed",
            "failures:deploy.failed"
        ]
    );
    log.lock().unwrap().clear();
    bus.publish(Event::new(Type::HEALTH_PASSED, "tenant-2"))
        .unwrap();
    assert_eq!(
        *log.lock().unwrap(),
        ["all:health.passed", "tenant-2:health.passed"]
    );
}

// (g) ------------------------------------------------------- object safety

#[test]
fn bus_is_object_safe() {
    fn publish_three(bus: &dyn Bus) -> Vec<u64> {
        (0..3)
            .map(|_| bus.publish(ev(Type::INSTANCE_STOPPED)).unwrap().seq)
            .collect()
    }

    let bus: Arc<dyn Bus> = Arc::new(InMemoryBus::new());
    let n = Arc::new(AtomicUsize::new(0));
    let c = n.clone();
    let sub = bus
        .subscribe_boxed(
            Filter::all(),
            Box::new(move |_: &Event| -> Result<(), HandlerError> {
                c.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }),
        )
        .unwrap();
    assert_eq!(publish_three(bus.as_ref()), [1, 2, 3]);
    assert_eq!(n.load(Ordering::SeqCst), 3);
    assert_eq!(bus.recent_events(10, &Filter::all()).unwrap().len(), 3);

    // Shared across threads as `Arc<dyn Bus>`.
    let b = bus.clone();
    thread::spawn(move || b.publish(ev(Type::INSTANCE_STOPPED)).unwrap())
        .join()
        .unwrap();
    assert_eq!(n.load(Ordering::SeqCst), 4);

    assert!(sub.unsubscribe());
    bus.publish(ev(Type::INSTANCE_STOPPED)).unwrap();
    assert_eq!(n.load(Ordering::SeqCst), 4);
    bus.close();
    assert!(matches!(
        bus.publish(ev(Type::INSTANCE_STOPPED)),
        Err(PublishError::Closed)
    ));
}
