//! Dispatch: turning appended events into delivery records, inside the
//! events' own write transaction.
//!
//! The dispatcher is an `AppendHook`: for each group commit the writer calls
//! [`Dispatcher::on_append`] inside the transaction that inserts the events,
//! and the dispatcher adds, for each event and each active webhook of the
//! event's tenant whose patterns match, one delivery record, one due-queue
//! entry and one index entry. Events and their deliveries therefore commit
//! together or not at all: no crash can separate them (G8), and a webhook
//! only ever gets its own tenant's events (G9).
//!
//! The cache of active webhooks is keyed by the registry version
//! (`webhook_meta["version"]`), which every registry change bumps in its
//! own transaction. `on_append` reads the version in the append
//! transaction: redb serializes write transactions, so that read sees every
//! registry change committed before the append, and a stale cache is
//! reloaded from the same transaction. A webhook committed before an
//! event's commit therefore always gets the event, without scanning the
//! registry per event. Reloading is correct even if the append then fails:
//! the cache only ever holds committed registry state (appends never change
//! the registry).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::{Receiver, Sender};
use redb::ReadableTable;

use super::store::{
    BY_HOOK, DELIVERIES, DUE, HOOK_META, META_VERSION, WEBHOOKS, decode_hook, insert_delivery,
};
use crate::durable::{AppendHook, Shared};
use crate::error::StorageError;
use crate::event::Event;
use crate::filter::Pattern;
use crate::sync::RwLock;

/// One active webhook, as dispatch needs it.
struct ActiveHook {
    id: [u8; 16],
    patterns: Vec<Pattern>,
}

impl ActiveHook {
    fn matches(&self, event_type: &str) -> bool {
        self.patterns.is_empty() || self.patterns.iter().any(|p| p.matches(event_type))
    }
}

/// Active webhooks by tenant, as of registry `version`.
#[derive(Default)]
struct Cache {
    /// `None` until loaded.
    version: Option<u64>,
    by_tenant: HashMap<String, Vec<ActiveHook>>,
}

/// The webhook `AppendHook` of one bus.
pub(crate) struct Dispatcher {
    cache: RwLock<Arc<Cache>>,
    /// Set by `on_append` when it created deliveries; `after_commit` then
    /// wakes the delivery worker. A spurious wake (the commit failed) is
    /// harmless.
    created: AtomicBool,
    wake_tx: Sender<()>,
    pub(crate) wake_rx: Receiver<()>,
    /// Whether a `DeliveryWorker` runs on this bus.
    pub(crate) worker_running: AtomicBool,
}

impl Dispatcher {
    fn new() -> Dispatcher {
        let (wake_tx, wake_rx) = crossbeam_channel::bounded(1);
        Dispatcher {
            cache: RwLock::new(Arc::new(Cache::default())),
            created: AtomicBool::new(false),
            wake_tx,
            wake_rx,
            worker_running: AtomicBool::new(false),
        }
    }

    pub(crate) fn wake(&self) {
        let _ = self.wake_tx.try_send(());
    }

    fn load(txn: &redb::WriteTransaction, version: u64) -> Result<Cache, StorageError> {
        let table = txn.open_table(WEBHOOKS)?;
        let mut by_tenant: HashMap<String, Vec<ActiveHook>> = HashMap::new();
        for row in table.iter()? {
            let (k, v) = row?;
            let id = k.value();
            let rec = decode_hook(v.value(), &id)?;
            if rec.active {
                // Unreadable patterns match every type of the tenant: the
                // deliveries are made, and the worker fails each with the
                // reason instead of sending it, so the events are neither
                // sent where they may not belong nor lost without a trace.
                let patterns = rec.patterns().unwrap_or_default();
                by_tenant
                    .entry(rec.tenant_id)
                    .or_default()
                    .push(ActiveHook { id, patterns });
            }
        }
        Ok(Cache {
            version: Some(version),
            by_tenant,
        })
    }
}

impl Dispatcher {
    /// The registry as `txn` has it (reloaded when its version moved).
    fn current(&self, txn: &redb::WriteTransaction) -> Result<Arc<Cache>, StorageError> {
        let version = {
            let meta = txn.open_table(HOOK_META)?;
            meta.get(META_VERSION)?.map_or(0, |g| g.value())
        };
        let mut cache = self.cache.read().clone();
        if cache.version != Some(version) {
            cache = Arc::new(Self::load(txn, version)?);
            *self.cache.write() = cache.clone();
        }
        Ok(cache)
    }
}

impl AppendHook for Dispatcher {
    /// No webhook active as of the last apply (or not loaded yet: maybe).
    fn may_want_events(&self) -> bool {
        let cache = self.cache.read();
        cache.version.is_none() || !cache.by_tenant.is_empty()
    }

    fn wants_events(&self, txn: &redb::WriteTransaction) -> Result<bool, StorageError> {
        Ok(!self.current(txn)?.by_tenant.is_empty())
    }

    fn on_append(
        &self,
        txn: &redb::WriteTransaction,
        appended: &[(u64, &Event)],
        append_ns: i64,
    ) -> Result<(), StorageError> {
        let cache = self.current(txn)?;
        if cache.by_tenant.is_empty() {
            return Ok(());
        }
        let mut deliveries = txn.open_table(DELIVERIES)?;
        let mut due = txn.open_table(DUE)?;
        let mut by_hook = txn.open_table(BY_HOOK)?;
        let mut created = false;
        for (seq, event) in appended {
            let Some(hooks) = cache.by_tenant.get(&event.tenant_id) else {
                continue;
            };
            for hook in hooks
                .iter()
                .filter(|h| h.matches(event.event_type.as_str()))
            {
                insert_delivery(
                    &mut deliveries,
                    &mut due,
                    &mut by_hook,
                    hook.id,
                    event.id,
                    *seq,
                    append_ns,
                )?;
                created = true;
            }
        }
        if created {
            self.created.store(true, Ordering::Release);
        }
        Ok(())
    }

    fn after_commit(&self) {
        if self.created.swap(false, Ordering::AcqRel) {
            self.wake();
        }
    }

    fn create_tables(&self, txn: &redb::WriteTransaction) -> Result<(), StorageError> {
        super::create_tables(txn)
    }

    fn check(
        &self,
        txn: &redb::ReadTransaction,
        problems: &mut Vec<String>,
    ) -> Result<(), StorageError> {
        super::store::check_registry(txn, problems)
    }

    fn into_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        self
    }
}

/// A new dispatcher, as a bus's append hook (see `crate::append_hooks`).
pub(crate) fn hook() -> Arc<dyn AppendHook> {
    Arc::new(Dispatcher::new())
}

/// The dispatcher of a bus: its append hook of that type.
pub(crate) fn dispatcher(shared: &Arc<Shared>) -> Option<Arc<Dispatcher>> {
    shared
        .hooks
        .read()
        .iter()
        .find_map(|h| h.clone().into_any().downcast::<Dispatcher>().ok())
}

/// Wakes the delivery worker of a bus, if any (after a registry change).
pub(crate) fn wake(shared: &Arc<Shared>) {
    if let Some(d) = dispatcher(shared) {
        d.wake();
    }
}
