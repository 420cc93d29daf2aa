//! The redb tables of a ctrlbus file and the small records stored beside the
//! events.
//!
//! Invariants:
//! - the stored `seq`s (`event_blocks`, and `events` in older files) are
//!   contiguous: from the oldest retained `seq` to the newest, with no gap
//!   (retention removes a prefix only).
//! - every stored event is found by its id through `events_by_id` (out
//!   of order ids, and every id before the sparse start) and
//!   `events_by_id_marks` (see `id_index`).
//! - Append times (record header) never decrease along `seq`.
//! - `meta["retained_through"]`, when present, is the largest `seq` ever
//!   removed by retention, so the next `seq` is never reused even when the
//!   log is empty.

use redb::TableDefinition;
use serde::{Deserialize, Serialize};

use crate::error::StorageError;

/// Format facts and counters: `format` → version byte, `retained_through` → u64 BE.
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("ctrlbus_meta");
// The events themselves: `event_blocks` (and `events` in older files).
pub(crate) use super::event_blocks::{EVENT_BLOCKS, EVENTS};
/// Event id (16 bytes) → `seq`, for the ids `id_index` indexes one by one.
pub(crate) const BY_ID: TableDefinition<u128, u64> = TableDefinition::new("events_by_id");

/// The `events_by_id` key of an event id: its 16 bytes as a big-endian
/// integer (same order; redb compares a `u128` in one step, a `[u8; 16]`
/// byte by byte, which was the top cost of applying in a profile).
pub(crate) fn id_key(id: [u8; 16]) -> u128 {
    u128::from_be_bytes(id)
}
/// Subscription name → [`CursorRecord`].
pub(crate) const CURSORS: TableDefinition<&str, &[u8]> = TableDefinition::new("cursors");
/// (subscription name, `seq`) → [`DeadLetterRecord`].
pub(crate) const DEAD_LETTERS: TableDefinition<(&str, u64), &[u8]> =
    TableDefinition::new("dead_letters");

/// The file format version this build writes. A file with a larger one is
/// refused, untouched. 2: the sparse id index (`id_index`), which a build
/// of version 1 would misread (it would not find in-order ids, and accept
/// them again); a version-1 file is upgraded at its first writable open.
/// 3: events in blocks (`event_blocks`), which a build of version 2 would
/// not see; a version-2 file is upgraded at its first writable open (its
/// rows in `events` stay, and are read as they are).
pub(crate) const FORMAT_VERSION: u8 = 3;
pub(crate) const META_FORMAT: &str = "format";
pub(crate) const META_RETAINED: &str = "retained_through";
/// 16 random bytes naming this log; its WAL carries them, so a WAL left
/// beside another file is never replayed into it.
pub(crate) const META_LOG_ID: &str = "log_id";
/// Whether a write-ahead log holds acknowledged events the file may not:
/// `[in_use u8][generation u64 LE]` (see `recovery`).
pub(crate) const META_WAL: &str = "wal";

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
}

/// Encodes a small record with bincode.
pub(crate) fn to_bytes<T: Serialize>(value: &T) -> Vec<u8> {
    // These records are plain structs of strings and integers: encoding
    // cannot fail.
    bincode::serde::encode_to_vec(value, config()).unwrap_or_default()
}

/// Decodes a small record, naming the table and key on failure.
pub(crate) fn from_bytes<T: for<'de> Deserialize<'de>>(
    bytes: &[u8],
    table: &'static str,
    key: impl std::fmt::Display,
) -> Result<T, StorageError> {
    match bincode::serde::decode_from_slice(bytes, config()) {
        Ok((v, used)) if used == bytes.len() => Ok(v),
        Ok(_) => Err(StorageError::Corrupted {
            table,
            key: key.to_string(),
            reason: "trailing bytes".into(),
        }),
        Err(e) => Err(StorageError::Corrupted {
            table,
            key: key.to_string(),
            reason: e.to_string(),
        }),
    }
}

/// A durable subscription's stored state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub(crate) struct CursorRecord {
    /// The filter, as JSON.
    pub(crate) filter_json: String,
    /// Every event with `seq <= delivered` has been handled (acknowledged or
    /// dead-lettered).
    pub(crate) delivered: u64,
    /// Events removed by retention before this cursor reached them.
    pub(crate) missed: u64,
    /// Unix nanoseconds.
    pub(crate) created_ns: i64,
    /// Unix nanoseconds of the last stored change.
    pub(crate) updated_ns: i64,
}

/// One event a durable subscription gave up on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub(crate) struct DeadLetterRecord {
    pub(crate) error: String,
    pub(crate) attempts: u32,
    pub(crate) at_ns: i64,
}
