//! Every error ctrlbus returns, in one place.
//!
//! As in redb, there is one base error for the storage layer
//! ([`StorageError`]) and one enum per operation (`OpenError`,
//! `PublishError`, …). Every enum is `#[non_exhaustive]`; each variant says
//! what it means for durability: whether anything was written.

use std::fmt;

use std::net::IpAddr;

use crate::id::EventId;
use crate::webhook::signing::{
    HEADER_SIGNATURE, HEADER_TIMESTAMP, MAX_SECRET_LEN, MIN_SECRET_LEN, SECRET_PREFIX,
};

/// An identifier failed to parse. Nothing is written.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdError {
    /// No `prefix_` in front of the ULID.
    MissingPrefix {
        /// What kind of id was expected (`event id`, …).
        kind: &'static str,
        /// The expected prefix.
        expected: &'static str,
        /// The input.
        input: String,
    },
    /// A prefix, but not the expected one.
    WrongPrefix {
        /// What kind of id was expected.
        kind: &'static str,
        /// The expected prefix.
        expected: &'static str,
        /// The input.
        input: String,
    },
    /// The ULID part is not 26 characters.
    BadLength {
        /// What kind of id was expected.
        kind: &'static str,
        /// The input.
        input: String,
        /// Its ULID part's length.
        len: usize,
    },
    /// A character outside lowercase Crockford base32.
    BadCharacter {
        /// What kind of id was expected.
        kind: &'static str,
        /// The input.
        input: String,
        /// Position in the ULID part.
        position: usize,
    },
    /// The value is larger than 128 bits (first character above `7`).
    Overflow {
        /// What kind of id was expected.
        kind: &'static str,
        /// The input.
        input: String,
    },
}

impl fmt::Display for IdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdError::MissingPrefix {
                kind,
                expected,
                input,
            } => {
                write!(
                    f,
                    "invalid {kind} {input:?}: missing the prefix `{expected}_`"
                )
            }
            IdError::WrongPrefix {
                kind,
                expected,
                input,
            } => {
                write!(
                    f,
                    "invalid {kind} {input:?}: the prefix must be `{expected}_`"
                )
            }
            IdError::BadLength { kind, input, len } => write!(
                f,
                "invalid {kind} {input:?}: expected 26 base32 characters after the prefix, found {len}"
            ),
            IdError::BadCharacter {
                kind,
                input,
                position,
            } => write!(
                f,
                "invalid {kind} {input:?}: character {} after the prefix is not lowercase Crockford base32",
                position + 1
            ),
            IdError::Overflow { kind, input } => {
                write!(
                    f,
                    "invalid {kind} {input:?}: value exceeds 128 bits (first character above 7)"
                )
            }
        }
    }
}

impl std::error::Error for IdError {}

/// An event type failed validation. Nothing is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeError {
    /// The input.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl fmt::Display for TypeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid event type {:?}: it {}", self.input, self.reason)
    }
}

impl std::error::Error for TypeError {}

/// An event is invalid. Nothing is written.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventError {
    /// A required JSON field is missing.
    MissingField(&'static str),
    /// The id, or the instance id, is malformed.
    Id(IdError),
    /// The type is malformed.
    Type(TypeError),
    /// `payload` is present but not a JSON object.
    PayloadNotObject,
    /// The payload is larger than the limit, in bytes of compact JSON.
    PayloadTooLarge {
        /// The limit.
        limit: usize,
    },
    /// The timestamp is not RFC 3339, is outside years 0000–9999, or is a
    /// leap second.
    Timestamp(String),
    /// The JSON is malformed (the message names the field where it can).
    Json(String),
    /// `tenant_id` or `actor_id` is longer than its limit, in bytes.
    FieldTooLong {
        /// The field's JSON name.
        field: &'static str,
        /// The limit.
        limit: usize,
    },
    /// Objects and arrays are nested deeper than the limit (the envelope
    /// object counts as level 1, the payload object as level 2).
    TooDeep {
        /// The limit.
        limit: usize,
    },
    /// An integer literal is outside the range of `i64` and `u64`; it would
    /// be silently rounded to a float (send it as a string).
    NumberOutOfRange(String),
}

impl fmt::Display for EventError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventError::MissingField(name) => write!(f, "invalid event: missing field `{name}`"),
            EventError::Id(e) => write!(f, "invalid event: {e}"),
            EventError::Type(e) => write!(f, "invalid event: {e}"),
            EventError::PayloadNotObject => {
                write!(f, "invalid event: `payload` must be a JSON object")
            }
            EventError::PayloadTooLarge { limit } => {
                write!(
                    f,
                    "invalid event: payload is larger than the limit of {limit} bytes"
                )
            }
            EventError::Timestamp(m) | EventError::Json(m) => write!(f, "invalid event: {m}"),
            EventError::FieldTooLong { field, limit } => {
                write!(
                    f,
                    "invalid event: `{field}` is longer than the limit of {limit} bytes"
                )
            }
            EventError::TooDeep { limit } => write!(
                f,
                "invalid event: JSON nested deeper than the limit of {limit} levels"
            ),
            EventError::NumberOutOfRange(n) => write!(
                f,
                "invalid event: the integer {n} is outside the 64-bit range and would lose \
                 precision; send it as a string"
            ),
        }
    }
}

impl std::error::Error for EventError {}

/// A filter is invalid. Nothing is written.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FilterError {
    /// A type pattern is invalid.
    Pattern {
        /// The pattern.
        pattern: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FilterError::Pattern { pattern, reason } => {
                write!(f, "invalid type pattern {pattern:?}: it {reason}")
            }
        }
    }
}

impl std::error::Error for FilterError {}

/// What a handler returns when it could not process an event.
///
/// Any `std::error::Error` converts into it with `?`, a message with
/// `.into()` (`Err("boom".into())`), as `Box<dyn Error + Send + Sync>` does,
/// and [`HandlerError::msg`] makes one from anything `Display`. On a durable subscription
/// the event is retried and, after the configured number of deliveries, moved
/// to the subscription's dead letters; nothing is lost.
///
/// Two words, so that a handler's `Result<(), HandlerError>` comes back in
/// registers: a delay from [`HandlerError::retry_after`] goes inside the box
/// (as a field beside it, it made every handler call 3.5 ns slower).
pub struct HandlerError(Box<dyn std::error::Error + Send + Sync>);

/// An error with the redelivery delay asked for by
/// [`HandlerError::retry_after`]; shows as the error it wraps.
struct RetryAfter {
    error: Box<dyn std::error::Error + Send + Sync>,
    delay: std::time::Duration,
}

impl fmt::Display for RetryAfter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)
    }
}

impl fmt::Debug for RetryAfter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.error, f)
    }
}

impl std::error::Error for RetryAfter {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

impl HandlerError {
    /// An error with a message.
    pub fn msg(message: impl fmt::Display) -> HandlerError {
        HandlerError::from(message.to_string())
    }

    /// Asks a durable subscription to deliver the event again after
    /// `delay` instead of after its backoff (the delivery still counts
    /// toward `max_deliveries`), as a NAK with a delay does in `JetStream`.
    /// Plain (non-durable) subscriptions don't retry, and ignore it.
    #[must_use]
    pub fn retry_after(self, delay: std::time::Duration) -> HandlerError {
        let error = match self.0.downcast::<RetryAfter>() {
            Ok(earlier) => earlier.error,
            Err(error) => error,
        };
        HandlerError(Box::new(RetryAfter { error, delay }))
    }

    /// The delay set by [`HandlerError::retry_after`].
    pub fn retry_delay(&self) -> Option<std::time::Duration> {
        self.0.downcast_ref::<RetryAfter>().map(|r| r.delay)
    }
}

/// Whatever converts into `Box<dyn Error + Send + Sync>` converts into a
/// `HandlerError`: any error with `?`, and a message with `.into()`
/// (`Err("boom".into())`, `Err(format!("bad {x}").into())`).
impl<E: Into<Box<dyn std::error::Error + Send + Sync>>> From<E> for HandlerError {
    fn from(e: E) -> HandlerError {
        HandlerError(e.into())
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// A [`DurableStream`](crate::stream::DurableStream) item that is not a
/// delivery: the stream goes on (it retries on its own).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamError {
    /// Reading the log failed; the read is retried after the backoff.
    ReadFailed {
        /// What failed.
        reason: String,
    },
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamError::ReadFailed { reason } => {
                write!(f, "reading the log failed (retrying): {reason}")
            }
        }
    }
}

impl std::error::Error for StreamError {}

/// The storage layer failed. What it means for durability is said where it
/// is returned.
#[derive(Debug)]
#[non_exhaustive]
pub enum StorageError {
    /// redb reported an error (I/O, a full disk, a lock).
    Redb(redb::Error),
    /// A record failed to decode: the file holds bytes this version cannot
    /// read at that key. Nothing was changed.
    Corrupted {
        /// The table.
        table: &'static str,
        /// The key, as text (a `seq`, an id, a name).
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The bus is poisoned: an earlier commit failed in a way that leaves the
    /// in-memory state uncertain, or one of its background threads panicked.
    /// Reopen the file.
    Poisoned,
    /// The commit this operation shared with others (a group commit, or an
    /// apply of several groups) failed; `reason` is that failure, reported
    /// to each operation of the commit. What it means for durability is
    /// said where it is returned.
    CommitFailed {
        /// The underlying error, as text.
        reason: String,
    },
    /// The NATS JetStream cluster failed or did not answer in time
    /// (`JetStreamBus`). What it means for durability is said where it is
    /// returned.
    Cluster {
        /// What failed, as text.
        reason: String,
    },
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageError::Redb(e) => write!(f, "storage error: {e}"),
            StorageError::Corrupted { table, key, reason } => {
                write!(f, "corrupted record in {table} at {key}: {reason}")
            }
            StorageError::Poisoned => {
                write!(
                    f,
                    "the log is unusable after an earlier storage failure or a panic in one of \
                     its background threads (see the error log); reopen it"
                )
            }
            StorageError::CommitFailed { reason } => write!(f, "the commit failed: {reason}"),
            StorageError::Cluster { reason } => write!(f, "the JetStream cluster: {reason}"),
        }
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StorageError::Redb(e) => Some(e),
            _ => None,
        }
    }
}

macro_rules! redb_into_storage {
    ($($t:ty),*) => {$(
        impl From<$t> for StorageError {
            fn from(e: $t) -> StorageError {
                StorageError::Redb(e.into())
            }
        }
    )*};
}
redb_into_storage!(
    redb::Error,
    redb::StorageError,
    redb::TransactionError,
    redb::TableError,
    redb::CommitError,
    redb::DatabaseError,
    redb::CompactionError,
    redb::SetDurabilityError
);

/// Publishing failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum PublishError {
    /// The event is invalid; nothing was written.
    Invalid(EventError),
    /// The bus is closed; nothing was written.
    Closed,
    /// Storing failed: the event was not acknowledged and no subscriber saw
    /// it. It is usually not in the log; but when the failure came after the
    /// commit point (an fsync error after the data reached the disk, or a
    /// write-ahead-log frame that was written before the failure), it may
    /// appear after the log is reopened. G2 holds either way: every event
    /// whose publish returned `Ok` is in the log. The bus refuses further
    /// writes after such a failure until it is reopened.
    Storage(StorageError),
    /// A batch holds the same event id twice; nothing was written.
    DuplicateInBatch(EventId),
    /// A batch's encoded events are larger than the limit
    /// ([`DurableBusBuilder::max_batch_bytes`](crate::DurableBusBuilder::max_batch_bytes),
    /// at most [`MAX_BATCH_BYTES`](crate::MAX_BATCH_BYTES)); nothing was
    /// written. Split it: a batch is one write-ahead-log frame, all or
    /// nothing.
    BatchTooLarge {
        /// The limit, in bytes of encoded events.
        limit: usize,
        /// The batch's size, in the same bytes.
        size: usize,
    },
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublishError::Invalid(e) => write!(f, "publish refused: {e}"),
            PublishError::Closed => write!(f, "publish refused: the bus is closed"),
            PublishError::Storage(e) => write!(f, "publish failed, event not stored: {e}"),
            PublishError::BatchTooLarge { limit, .. } => write!(
                f,
                "publish refused: the batch is larger than the limit of {limit} bytes; split it"
            ),
            PublishError::DuplicateInBatch(id) => {
                write!(
                    f,
                    "publish refused: event id {id} appears twice in the batch"
                )
            }
        }
    }
}

impl std::error::Error for PublishError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PublishError::Invalid(e) => Some(e),
            PublishError::Storage(e) => Some(e),
            _ => None,
        }
    }
}

impl From<EventError> for PublishError {
    fn from(e: EventError) -> Self {
        PublishError::Invalid(e)
    }
}

impl From<StorageError> for PublishError {
    fn from(e: StorageError) -> Self {
        PublishError::Storage(e)
    }
}

/// Subscribing failed; no subscription exists.
#[derive(Debug)]
#[non_exhaustive]
pub enum SubscribeError {
    /// The bus is closed.
    Closed,
    /// The subscription name is empty, longer than 128 bytes, or has a
    /// character outside `[A-Za-z0-9_.-]`.
    InvalidName(String),
    /// A durable subscription of this name is already active in this process.
    AlreadyActive(String),
    /// The starting position does not exist (an unknown event id).
    UnknownPosition(String),
    /// Reading or writing the cursor failed; nothing was changed.
    Storage(StorageError),
}

impl fmt::Display for SubscribeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubscribeError::Closed => write!(f, "subscribe refused: the bus is closed"),
            SubscribeError::InvalidName(n) => write!(
                f,
                "invalid subscription name {n:?}: use 1-128 characters of A-Z a-z 0-9 _ . -"
            ),
            SubscribeError::AlreadyActive(n) => {
                write!(
                    f,
                    "durable subscription {n:?} is already active in this process"
                )
            }
            SubscribeError::UnknownPosition(p) => write!(f, "unknown start position: {p}"),
            SubscribeError::Storage(e) => write!(f, "subscribe failed: {e}"),
        }
    }
}

impl std::error::Error for SubscribeError {}

impl From<StorageError> for SubscribeError {
    fn from(e: StorageError) -> Self {
        SubscribeError::Storage(e)
    }
}

/// Reading the log failed. Reading never changes anything.
#[derive(Debug)]
#[non_exhaustive]
pub enum ReadError {
    /// The bus is closed.
    Closed,
    /// The starting position names an event id that is not in the log.
    UnknownEvent(EventId),
    /// Storage failed, or a record is corrupted (the error names its `seq`).
    Storage(StorageError),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Closed => write!(f, "read refused: the bus is closed"),
            ReadError::UnknownEvent(id) => write!(f, "no event {id} in the log"),
            ReadError::Storage(e) => write!(f, "read failed: {e}"),
        }
    }
}

impl std::error::Error for ReadError {}

impl From<StorageError> for ReadError {
    fn from(e: StorageError) -> Self {
        ReadError::Storage(e)
    }
}

/// Opening a log failed. The file was not modified.
#[derive(Debug)]
#[non_exhaustive]
pub enum OpenError {
    /// The file does not exist (read-only opens do not create).
    NotFound(std::path::PathBuf),
    /// The file is not a ctrlbus log (not redb, or redb without ctrlbus
    /// tables).
    NotCtrlbus {
        /// The file.
        path: std::path::PathBuf,
        /// Why it is not a ctrlbus log.
        reason: String,
    },
    /// The file was written by a newer ctrlbus with a format this build
    /// cannot read.
    NewerFormat {
        /// The file's format version.
        found: u8,
        /// The newest this build reads.
        supported: u8,
    },
    /// Another process has the log open for writing.
    InUse(std::path::PathBuf),
    /// The last writer crashed and the file needs recovery, which only a
    /// writable open performs; open it for writing once (any `ctrlbus`
    /// writing command does).
    NeedsRecovery(std::path::PathBuf),
    /// The log was last written through a write-ahead log that may hold
    /// acknowledged events the file does not, and that WAL is missing, or
    /// is another log's, or an older copy. Opening anyway would lose those
    /// events and reuse their `seq`s, so nothing was opened: put the WAL
    /// back, or accept the loss explicitly
    /// ([`DurableBusBuilder::accept_wal_loss`](crate::DurableBusBuilder::accept_wal_loss),
    /// `ctrlbus --accept-wal-loss`).
    WalMissing {
        /// Where the WAL should be.
        wal: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An I/O error on the file.
    Io(std::path::PathBuf, std::io::Error),
    /// redb failed.
    Storage(StorageError),
    /// The NATS servers could not be reached, or the stream could not be
    /// found or created (`JetStreamBus`).
    Connect {
        /// The server URLs tried.
        urls: String,
        /// What failed.
        reason: String,
    },
    /// The stream name is not 1–64 of `[A-Za-z0-9_-]`.
    InvalidStreamName(String),
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::NotFound(p) => write!(f, "no log at {}", p.display()),
            OpenError::NotCtrlbus { path, reason } => {
                write!(f, "{} is not a ctrlbus log: {reason}", path.display())
            }
            OpenError::NewerFormat { found, supported } => write!(
                f,
                "the log has format version {found}, newer than the {supported} this ctrlbus reads; upgrade ctrlbus"
            ),
            OpenError::InUse(p) => write!(
                f,
                "{} is in use by another process (only one process may write a log; reading commands work while it runs)",
                p.display()
            ),
            OpenError::NeedsRecovery(p) => write!(
                f,
                "{} needs recovery after a crash; open it for writing once to repair it",
                p.display()
            ),
            OpenError::WalMissing { wal, reason } => write!(
                f,
                "the write-ahead log {} {reason}: it may hold acknowledged events the log file \
                 does not; put it back, or accept their loss with --accept-wal-loss",
                wal.display()
            ),
            OpenError::Io(p, e) => write!(f, "{}: {e}", p.display()),
            OpenError::Storage(e) => write!(f, "cannot open log: {e}"),
            OpenError::Connect { urls, reason } => {
                write!(f, "cannot open the JetStream log at {urls}: {reason}")
            }
            OpenError::InvalidStreamName(n) => write!(
                f,
                "invalid stream name {n:?}: use 1-64 letters, digits, '_' or '-'"
            ),
        }
    }
}

impl std::error::Error for OpenError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            OpenError::Io(_, e) => Some(e),
            OpenError::Storage(e) => Some(e),
            _ => None,
        }
    }
}

/// A cursor operation failed; nothing was changed.
#[derive(Debug)]
#[non_exhaustive]
pub enum CursorError {
    /// The name is empty, longer than 128 bytes, or has a character outside
    /// `[A-Za-z0-9_.-]`.
    InvalidName(String),
    /// No cursor of that name.
    Unknown(String),
    /// The subscription is running in this process; drop it first.
    Active(String),
    /// The position names an event id that is not in the log.
    UnknownEvent(EventId),
    /// The bus is closed.
    Closed,
    /// Storage failed or the cursor record is corrupted.
    Storage(StorageError),
}

impl fmt::Display for CursorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CursorError::InvalidName(n) => write!(
                f,
                "invalid subscription name {n:?}: use 1-128 characters of A-Z a-z 0-9 _ . -"
            ),
            CursorError::Unknown(n) => write!(f, "unknown cursor {n:?}"),
            CursorError::Active(n) => write!(
                f,
                "cursor {n:?} belongs to a running subscription; stop it first"
            ),
            CursorError::UnknownEvent(id) => write!(f, "no event {id} in the log"),
            CursorError::Closed => write!(f, "the bus is closed"),
            CursorError::Storage(e) => write!(f, "cursor operation failed: {e}"),
        }
    }
}

impl std::error::Error for CursorError {}

impl From<StorageError> for CursorError {
    fn from(e: StorageError) -> Self {
        CursorError::Storage(e)
    }
}

/// Why a webhook secret was refused. The messages never include any part of
/// the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SecretError {
    /// The secret does not start with `whsec_`.
    MissingPrefix,
    /// The part after `whsec_` is not standard base64.
    InvalidBase64,
    /// The key is not 24 to 64 bytes long.
    InvalidLength {
        /// The length of the decoded key, in bytes.
        len: usize,
    },
}

impl fmt::Display for SecretError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretError::MissingPrefix => {
                write!(f, "webhook secret must start with `{SECRET_PREFIX}`")
            }
            SecretError::InvalidBase64 => write!(
                f,
                "webhook secret is not valid base64 after `{SECRET_PREFIX}`"
            ),
            SecretError::InvalidLength { len } => write!(
                f,
                "webhook secret key is {len} bytes; it must be \
                 {MIN_SECRET_LEN} to {MAX_SECRET_LEN} bytes"
            ),
        }
    }
}

impl std::error::Error for SecretError {}

/// Why a received webhook failed verification. Whatever the variant, the
/// message is not authentic and must not be acted on.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum VerifyError {
    /// The named header (`webhook-id`, `webhook-timestamp` or
    /// `webhook-signature`) is absent.
    MissingHeader(&'static str),
    /// `webhook-timestamp` is not a decimal integer of Unix seconds.
    InvalidTimestamp,
    /// The timestamp is further in the past than the tolerance allows: a
    /// possible replay, or a slow or skewed clock.
    TimestampTooOld,
    /// The timestamp is further in the future than the tolerance allows: a
    /// skewed clock on one side.
    TimestampTooNew,
    /// `webhook-signature` is blank, or one of its space-separated entries is
    /// not of the form `<version>,<signature>`.
    InvalidSignatureHeader,
    /// No `v1` signature matches: the secret is wrong, or the id, timestamp or
    /// body was altered.
    NoMatchingSignature,
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VerifyError::MissingHeader(name) => write!(f, "missing `{name}` header"),
            VerifyError::InvalidTimestamp => {
                write!(f, "`{HEADER_TIMESTAMP}` is not a Unix time in seconds")
            }
            VerifyError::TimestampTooOld => {
                write!(f, "`{HEADER_TIMESTAMP}` is too old (outside the tolerance)")
            }
            VerifyError::TimestampTooNew => write!(
                f,
                "`{HEADER_TIMESTAMP}` is too far in the future (outside the tolerance)"
            ),
            VerifyError::InvalidSignatureHeader => {
                write!(f, "`{HEADER_SIGNATURE}` header is malformed")
            }
            VerifyError::NoMatchingSignature => write!(f, "no matching webhook signature"),
        }
    }
}

impl std::error::Error for VerifyError {}

/// Why a webhook target URL was refused. Nothing is delivered to a refused
/// target.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum UrlError {
    /// The URL is malformed or uses a form that is not accepted (too long,
    /// not absolute, whitespace, a fragment, a bad port or host, …).
    Invalid {
        /// What is wrong, for the user.
        reason: String,
    },
    /// The scheme is not `http` or `https`.
    UnsupportedScheme {
        /// The scheme as written.
        scheme: String,
    },
    /// The URL has no host.
    MissingHost,
    /// The URL contains a `user:password@` part; put credentials in the
    /// webhook secret or the path instead.
    CredentialsNotAllowed,
    /// The host name could not be resolved (or has no addresses). This may be
    /// temporary.
    Resolve {
        /// The host that was looked up.
        host: String,
        /// The resolver's message.
        message: String,
    },
    /// The host resolves to a loopback, private, link-local or otherwise
    /// reserved address, and private targets are not allowed.
    ForbiddenAddress {
        /// The host that was looked up.
        host: String,
        /// The first forbidden address found.
        addr: IpAddr,
    },
}

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UrlError::Invalid { reason } => write!(f, "invalid webhook URL: {reason}"),
            UrlError::UnsupportedScheme { scheme } => write!(
                f,
                "unsupported webhook URL scheme `{scheme}` (use http or https)"
            ),
            UrlError::MissingHost => write!(f, "webhook URL has no host"),
            UrlError::CredentialsNotAllowed => {
                write!(f, "webhook URL must not contain credentials (`user@`)")
            }
            UrlError::Resolve { host, message } => {
                write!(f, "cannot resolve webhook host `{host}`: {message}")
            }
            UrlError::ForbiddenAddress { host, addr } => write!(
                f,
                "webhook host `{host}` resolves to {addr}, a loopback, private or \
                 reserved address (private targets are not allowed)"
            ),
        }
    }
}

impl std::error::Error for UrlError {}

/// A webhook registry operation (create, update, delete, rotate, retry,
/// replay, …) failed. Every variant but [`WebhookError::Storage`] is found
/// before anything is written; `Storage` means the change was not committed.
/// Either way the registry and the deliveries are as they were.
#[derive(Debug)]
#[non_exhaustive]
pub enum WebhookError {
    /// The URL is refused: malformed, not http(s), with credentials, or a
    /// loopback/private/reserved target while private targets are not
    /// allowed. Nothing was written.
    Url(UrlError),
    /// The secret given is malformed (not `whsec_` + base64 of 24–64 bytes).
    /// Nothing was written.
    Secret(SecretError),
    /// An event pattern is invalid. Nothing was written.
    Pattern(FilterError),
    /// The tenant id is empty, longer than 256 bytes or holds a control
    /// character. Nothing was written.
    InvalidTenant(String),
    /// No webhook has this id. Nothing was written.
    UnknownWebhook(crate::id::WebhookId),
    /// No delivery has this id. Nothing was written.
    UnknownDelivery(crate::id::DeliveryId),
    /// The webhook is disabled; enable it before retrying or replaying.
    /// Nothing was written.
    Inactive(crate::id::WebhookId),
    /// A replay window ends before it starts. Nothing was written.
    InvalidWindow,
    /// The webhook's stored record can't be used as it is (an unreadable
    /// secret, pattern or URL: a damaged file); fix it with `update` or
    /// `rotate_secret`. Nothing was written.
    Unsound {
        /// The webhook.
        id: crate::id::WebhookId,
        /// What is wrong with it.
        reason: String,
    },
    /// The bus is closed. Nothing was written.
    Closed,
    /// Storage failed; the change was not committed (a read-only listing
    /// changed nothing).
    Storage(StorageError),
}

impl fmt::Display for WebhookError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WebhookError::Url(e) => write!(f, "webhook refused: {e}"),
            WebhookError::Secret(e) => write!(f, "webhook refused: {e}"),
            WebhookError::Pattern(e) => write!(f, "webhook refused: {e}"),
            WebhookError::InvalidTenant(t) => write!(
                f,
                "webhook refused: invalid tenant id {t:?} (1-256 bytes, no control characters)"
            ),
            WebhookError::UnknownWebhook(id) => write!(f, "no webhook {id}"),
            WebhookError::UnknownDelivery(id) => write!(f, "no webhook delivery {id}"),
            WebhookError::Inactive(id) => {
                write!(f, "webhook {id} is disabled; enable it first")
            }
            WebhookError::InvalidWindow => {
                write!(f, "invalid replay window: `until` is before `since`")
            }
            WebhookError::Unsound { id, reason } => {
                write!(f, "webhook {id} can't be used: {reason}")
            }
            WebhookError::Closed => write!(f, "webhook operation refused: the bus is closed"),
            WebhookError::Storage(e) => write!(f, "webhook operation failed, nothing changed: {e}"),
        }
    }
}

impl std::error::Error for WebhookError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            WebhookError::Url(e) => Some(e),
            WebhookError::Secret(e) => Some(e),
            WebhookError::Pattern(e) => Some(e),
            WebhookError::Storage(e) => Some(e),
            _ => None,
        }
    }
}

impl From<StorageError> for WebhookError {
    fn from(e: StorageError) -> Self {
        WebhookError::Storage(e)
    }
}

impl From<UrlError> for WebhookError {
    fn from(e: UrlError) -> Self {
        WebhookError::Url(e)
    }
}

impl From<SecretError> for WebhookError {
    fn from(e: SecretError) -> Self {
        WebhookError::Secret(e)
    }
}

impl From<FilterError> for WebhookError {
    fn from(e: FilterError) -> Self {
        WebhookError::Pattern(e)
    }
}

/// Starting or running the webhook delivery workers failed. Delivery state
/// is in the log: nothing pending is lost, and a later worker resumes it.
#[derive(Debug)]
#[non_exhaustive]
pub enum DeliveryError {
    /// A delivery worker already runs on this bus in this process (deliveries
    /// are claimed in memory, so only one may).
    AlreadyRunning,
    /// The options are unusable (no workers, a zero timeout, …).
    InvalidOptions(String),
    /// The bus is closed.
    Closed,
    /// A thread could not be started.
    Io(std::io::Error),
    /// Storage failed while reading or recording deliveries; the delivery
    /// records are at their last committed state.
    Storage(StorageError),
}

impl fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeliveryError::AlreadyRunning => {
                write!(f, "a webhook delivery worker already runs on this bus")
            }
            DeliveryError::InvalidOptions(m) => write!(f, "invalid delivery options: {m}"),
            DeliveryError::Closed => write!(f, "webhook delivery refused: the bus is closed"),
            DeliveryError::Io(e) => write!(f, "cannot start the delivery workers: {e}"),
            DeliveryError::Storage(e) => write!(f, "webhook delivery failed: {e}"),
        }
    }
}

impl std::error::Error for DeliveryError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DeliveryError::Io(e) => Some(e),
            DeliveryError::Storage(e) => Some(e),
            _ => None,
        }
    }
}

impl From<StorageError> for DeliveryError {
    fn from(e: StorageError) -> Self {
        DeliveryError::Storage(e)
    }
}

#[cfg(test)]
mod handler_error_tests {
    use super::HandlerError;
    use std::time::Duration;

    #[test]
    fn a_handler_result_is_two_words() {
        // Returned in registers by every handler call of a fan-out.
        assert_eq!(
            std::mem::size_of::<Result<(), HandlerError>>(),
            2 * std::mem::size_of::<usize>()
        );
    }

    /// An error with a source.
    #[derive(Debug)]
    struct Outer(std::fmt::Error);
    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("outer")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn retry_after_keeps_the_error_and_the_last_delay() {
        let plain = HandlerError::msg("busy");
        assert_eq!(plain.retry_delay(), None);
        let later = plain.retry_after(Duration::from_millis(250));
        assert_eq!(later.retry_delay(), Some(Duration::from_millis(250)));
        assert_eq!(later.to_string(), "busy");
        assert_eq!(format!("{later:?}"), format!("{:?}", "busy"));
        // Asked again: the new delay, still the same error (not wrapped twice).
        let again = later.retry_after(Duration::from_secs(2));
        assert_eq!(again.retry_delay(), Some(Duration::from_secs(2)));
        assert_eq!(again.to_string(), "busy");
        // An error's source is kept through the delay.
        let e = HandlerError::from(Outer(std::fmt::Error)).retry_after(Duration::from_secs(1));
        assert_eq!(e.to_string(), "outer");
        assert!(std::error::Error::source(&*e.0).is_some());
    }

    fn message() -> Result<(), HandlerError> {
        Err("boom".into())
    }

    fn formatted(n: u32) -> Result<(), HandlerError> {
        Err(format!("bad {n}").into())
    }

    fn question_mark() -> Result<(), HandlerError> {
        std::fs::read("/nonexistent/ctrlbus/handler")?;
        Ok(())
    }

    fn boxed() -> Result<(), HandlerError> {
        let e: Box<dyn std::error::Error + Send + Sync> = "boxed".into();
        Err(e.into())
    }

    #[test]
    fn a_first_handler_compiles_the_obvious_ways() {
        assert_eq!(message().unwrap_err().to_string(), "boom");
        assert_eq!(formatted(7).unwrap_err().to_string(), "bad 7");
        assert!(
            question_mark()
                .unwrap_err()
                .to_string()
                .contains("No such file")
        );
        assert_eq!(boxed().unwrap_err().to_string(), "boxed");
        assert_eq!(HandlerError::msg(42).to_string(), "42");
    }
}
