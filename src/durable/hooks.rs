//! The log's one extension point: append hooks, owned by the log and
//! implemented elsewhere (the webhook dispatcher is one). The log knows
//! nothing of what a hook does; a hook knows the log only through this
//! trait and the transactions it is handed.
//!
//! Hooks are handed to a bus when it is built ([`HookFactories`], in the
//! builder, the way redb takes a `StorageBackend`), one fresh hook per bus,
//! and installed before anything is read or replayed: a hook sees every
//! event, those replayed from the WAL after a crash included (G8).

use std::any::Any;
use std::sync::Arc;

use crate::error::StorageError;
use crate::event::Event;

/// Something that writes beside the events in their own transaction (the
/// webhook dispatcher creates delivery records this way, so that no crash
/// can separate an event from its deliveries).
pub(crate) trait AppendHook: Send + Sync {
    /// Creates the tables the hook writes (in the open's transaction, for
    /// a new log or one made by an older build).
    ///
    /// # Errors
    /// [`StorageError`]: the open fails, nothing is committed.
    fn create_tables(&self, _txn: &redb::WriteTransaction) -> Result<(), StorageError> {
        Ok(())
    }

    /// Whether the hook may want the events of a group committed now: when
    /// false, the committer doesn't keep the group's events for the
    /// applier (only its records). A guess from what the hook knows
    /// without a transaction; `wants_events` decides at the apply.
    fn may_want_events(&self) -> bool {
        true
    }

    /// Whether `on_append` would do anything with events, in the apply's
    /// transaction `txn`: when no hook would, the events of groups not kept
    /// for the hooks are not decoded and `on_append` is not called for them.
    ///
    /// # Errors
    /// [`StorageError`]: the whole transaction, events included, fails.
    fn wants_events(&self, _txn: &redb::WriteTransaction) -> Result<bool, StorageError> {
        Ok(true)
    }

    /// Called inside the write transaction, after the events are inserted.
    ///
    /// # Errors
    /// [`StorageError`]: the whole transaction, events included, fails.
    fn on_append(
        &self,
        txn: &redb::WriteTransaction,
        appended: &[(u64, &Event)],
        append_ns: i64,
    ) -> Result<(), StorageError>;

    /// Called after the transaction committed.
    fn after_commit(&self) {}

    /// Adds what is unsound in the hook's tables to `check`'s problems.
    ///
    /// # Errors
    /// [`StorageError`] when they can't be read.
    fn check(
        &self,
        _txn: &redb::ReadTransaction,
        _problems: &mut Vec<String>,
    ) -> Result<(), StorageError> {
        Ok(())
    }

    /// The hook as `Any`, so its implementer can find its own typed handle
    /// on a bus (no process-wide registry).
    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
}

/// A hook that hands what `on_append` gets (the events and their append
/// time) to a closure: the tests' recording and panicking hooks.
#[cfg(test)]
pub(crate) struct FnHook<F>(pub(crate) F);

#[cfg(test)]
impl<F> AppendHook for FnHook<F>
where
    F: Fn(&[(u64, &Event)], i64) + Send + Sync + 'static,
{
    fn on_append(
        &self,
        _txn: &redb::WriteTransaction,
        appended: &[(u64, &Event)],
        append_ns: i64,
    ) -> Result<(), StorageError> {
        (self.0)(appended, append_ns);
        Ok(())
    }

    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}

/// Makes one hook for a new bus.
pub(crate) type HookFactory = Arc<dyn Fn() -> Arc<dyn AppendHook> + Send + Sync>;

/// The hooks a builder installs on each bus it opens (each open gets new
/// ones). The default is the crate's: `crate::append_hooks`.
#[derive(Clone)]
pub(crate) struct HookFactories(pub(crate) Vec<HookFactory>);

impl HookFactories {
    /// One fresh hook from each factory.
    pub(crate) fn make(&self) -> Vec<Arc<dyn AppendHook>> {
        self.0.iter().map(|f| f()).collect()
    }
}

impl Default for HookFactories {
    fn default() -> Self {
        HookFactories(crate::append_hooks())
    }
}

impl std::fmt::Debug for HookFactories {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} append hook(s)", self.0.len())
    }
}
