//! Every combination of `sync`, `shared_reads`, `write_ahead_log` and
//! `quick_repair`, each with webhooks, a durable subscription and a crash
//! (SIGKILL of a child process) and its recovery. The options once drifted
//! apart per caller: `sync(false)` made every webhook write fail.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use ctrlbus::{
    Bus, DeliveryQuery, DurableBus, DurableBusBuilder, Event, EventId, Filter, NewWebhook,
    Position, Type,
};

const CHILD: &str = "CTRLBUS_MATRIX_CHILD";

#[derive(Debug, Clone, Copy)]
#[allow(clippy::struct_excessive_bools)] // the four switches under test
struct Combo {
    sync: bool,
    shared_reads: bool,
    wal: bool,
    quick_repair: bool,
}

impl Combo {
    fn all() -> Vec<Combo> {
        (0..16u8)
            .map(|b| Combo {
                sync: b & 1 != 0,
                shared_reads: b & 2 != 0,
                wal: b & 4 != 0,
                quick_repair: b & 8 != 0,
            })
            .collect()
    }

    fn encode(self) -> String {
        format!(
            "{}{}{}{}",
            u8::from(self.sync),
            u8::from(self.shared_reads),
            u8::from(self.wal),
            u8::from(self.quick_repair)
        )
    }

    fn decode(s: &str) -> Combo {
        let b: Vec<bool> = s.bytes().map(|c| c == b'1').collect();
        Combo {
            sync: b[0],
            shared_reads: b[1],
            wal: b[2],
            quick_repair: b[3],
        }
    }

    fn builder(self) -> DurableBusBuilder {
        DurableBus::builder()
            .sync(self.sync)
            .shared_reads(self.shared_reads)
            .write_ahead_log(self.wal)
            .quick_repair(self.quick_repair)
    }
}

fn hook() -> NewWebhook {
    NewWebhook {
        tenant_id: "acme".into(),
        url: "http://127.0.0.1:9/hook".into(),
        events: vec!["deploy.*".into()],
        secret: None,
    }
}

/// The child: opens with the combination, makes a webhook and a durable
/// subscription, publishes, prints each receipt, then waits to be killed.
#[test]
fn matrix_child() {
    let Ok(spec) = std::env::var(CHILD) else {
        return;
    };
    let (combo, path) = spec.split_once('|').unwrap();
    let combo = Combo::decode(combo);
    let bus = combo.builder().open(path).unwrap();
    bus.webhooks()
        .allow_private_targets(true)
        .create(hook())
        .unwrap();
    let sub = bus
        .subscribe_durable(
            "audit",
            Filter::all(),
            Position::Beginning,
            |_: &Event| -> Result<(), ctrlbus::HandlerError> { Ok(()) },
        )
        .unwrap();
    let mut out = std::io::stdout().lock();
    for i in 0..40u64 {
        let r = bus
            .publish(Event::new(Type::DEPLOY_STARTED, "acme").with_payload_value("i", i))
            .unwrap();
        writeln!(out, "{} {}", r.seq, r.id).unwrap();
    }
    writeln!(out, "ready").unwrap();
    out.flush().unwrap();
    std::thread::sleep(Duration::from_secs(600));
    drop(sub);
}

fn crash(combo: Combo, path: &Path) -> HashMap<u64, EventId> {
    let mut child = common::spawn_self(
        "matrix_child",
        (CHILD, format!("{}|{}", combo.encode(), path.display())),
    );
    let acked: HashMap<u64, EventId> = common::receipts_until_ready(&mut child)
        .into_iter()
        .collect();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(acked.len(), 40, "{combo:?}: the child did not finish");
    acked
}

#[test]
fn every_option_combination_runs_webhooks_subscriptions_and_recovery() {
    for combo in Combo::all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.redb");
        // In-process first: webhooks and a subscription work at all.
        {
            let bus = combo.builder().open(&path).unwrap();
            let created = bus
                .webhooks()
                .allow_private_targets(true)
                .create(hook())
                .unwrap_or_else(|e| panic!("{combo:?}: webhook create: {e}"));
            bus.webhooks()
                .rotate_secret(created.webhook.id, None)
                .unwrap_or_else(|e| panic!("{combo:?}: rotate: {e}"));
            bus.webhooks()
                .delete(created.webhook.id)
                .unwrap_or_else(|e| panic!("{combo:?}: delete: {e}"));
            let log = common::Log::default();
            let sub = bus
                .subscribe_durable(
                    "warmup",
                    Filter::all(),
                    Position::Beginning,
                    common::recorder(&log),
                )
                .unwrap_or_else(|e| panic!("{combo:?}: subscribe: {e}"));
            assert!(sub.wait_live(Duration::from_secs(10)), "{combo:?}");
            let r = bus
                .publish(Event::new(Type::DEPLOY_STARTED, "acme"))
                .unwrap();
            assert_eq!(*log.lock().unwrap(), vec![r.id], "{combo:?}");
            drop(sub);
            bus.seek("warmup", Position::Beginning)
                .unwrap_or_else(|e| panic!("{combo:?}: seek: {e}"));
            bus.delete_cursor("warmup")
                .unwrap_or_else(|e| panic!("{combo:?}: delete cursor: {e}"));
        }
        std::fs::remove_file(&path).unwrap();
        let _ = std::fs::remove_file(format!("{}.wal", path.display()));

        // Then a crash and its recovery.
        let acked = crash(combo, &path);
        let bus = combo
            .builder()
            .open(&path)
            .unwrap_or_else(|e| panic!("{combo:?}: reopen after kill: {e}"));
        let mut seen = HashMap::new();
        let mut last = 0;
        for e in bus.read(Position::Beginning, &Filter::all()).unwrap() {
            let e = e.unwrap();
            assert_eq!(e.seq, last + 1, "{combo:?}: a gap");
            last = e.seq;
            seen.insert(e.seq, e.event.id);
        }
        // A kill keeps the page cache, so without fsync every acknowledged
        // event is still there when it was written somewhere durable or to
        // the WAL (power loss is another test). Only redb's non-durable
        // commits (sync off, exclusive, no WAL) roll back to the last
        // durable one, as `sync(false)` documents: what remains is a prefix.
        let keeps_all = combo.sync || combo.shared_reads || combo.wal;
        for (seq, id) in &acked {
            if keeps_all || *seq <= last {
                assert_eq!(seen.get(seq), Some(id), "{combo:?}: seq {seq} lost");
            }
        }
        assert!(bus.check(&mut |_, _| {}).unwrap().is_sound(), "{combo:?}");
        let deliveries = bus
            .webhooks()
            .deliveries(&DeliveryQuery::default())
            .unwrap();
        assert_eq!(
            deliveries.len(),
            seen.len(),
            "{combo:?}: one delivery record per event"
        );
        // The subscription resumes from its stored position and reaches
        // the end.
        let log = common::Log::default();
        let sub = common::audit(&bus, &log);
        common::wait_until("the subscription to reach the end", || {
            sub.position() >= last
        });
        drop(sub);
        // New publishes continue the order.
        let r = bus
            .publish(Event::new(Type::DEPLOY_STARTED, "acme"))
            .unwrap();
        assert_eq!(r.seq, last + 1, "{combo:?}");
    }
}
