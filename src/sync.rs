//! The one place locks come from.
//!
//! Every lock in ctrlbus is a `parking_lot` lock taken through this module, so
//! that lock types can be swapped (for example for a model checker) in one
//! place. `parking_lot` locks do not poison: a handler that panics while the
//! bus holds no lock cannot wedge the bus, and the bus never calls a handler
//! while holding one of these locks (see `fanout`).

#[allow(unused_imports)]
pub(crate) use parking_lot::{Condvar, Mutex, MutexGuard, RwLock};
