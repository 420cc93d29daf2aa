//! [`JetStreamBus`]: the log on a NATS JetStream cluster (feature
//! `jetstream`), for control planes with several replicas.
//!
//! One stream per log holds every event, under a subject that carries its
//! tenant and type (`subject`), so filters run on the server. A receipt's
//! `seq` is the stream sequence: contiguous and never reused. A publish is
//! sent with the event id as `Nats-Msg-Id`, so the stream drops a repeat
//! within its duplicate window, and it rides through a leader election by
//! sending again with the same id until `publish_deadline`.
//!
//! The client (`async-nats`) is async; the bus owns a small tokio runtime
//! and runs it there, so the blocking API (`Bus`) works from any thread.
//!
//! How the contract (G1–G12) holds on this backend, and where it differs
//! from a redb file (`DurableBus`):
//! - **G1, G2.** An event is acknowledged once the stream's leader has it
//!   stored on a quorum of replicas (the `PublishAck`). It is fsync'd only
//!   if the servers sync always (`jetstream { sync_interval: always }`);
//!   NATS's default syncs every 2 minutes, so a simultaneous power loss of
//!   a quorum could lose acknowledged events. The tests run with `always`.
//!   Readers and subscribers read from the stream, so nobody sees an event
//!   that is not stored.
//! - **G3.** `seq` is the stream sequence: contiguous, never reused.
//!   `publish_batch` is not atomic (each event is its own message).
//! - **Idempotency by id** holds within the stream's duplicate window
//!   ([`JetStreamBusBuilder::duplicate_window`], default 1 hour), not
//!   forever as on a file. Reading, subscribing or seeking from an event id
//!   ([`Position::Id`]) is refused: the stream has no index from id to
//!   `seq`.
//! - **G4.** `publish` returns once the live subscriptions *of this
//!   process* have run for its event; subscribers in other processes are
//!   not waited for.
//! - **G5.** Durable subscriptions are durable consumers (`durable`):
//!   shared by every process that subscribes with the name, in `seq` order,
//!   at least once; after a crash the event in flight is redelivered after
//!   `ack_wait` (30 s by default), the bound on redelivery.
//! - **G6.** As on a file for handlers; a failing durable handler holds
//!   up only its own subscription (it never goes live: it always reads the
//!   stream).
//! - **G7.** "From time T" uses `DeliverPolicy::ByStartTime` on the
//!   server's store time of each message (the append time).
//! - **G8.** Webhooks (`webhooks`, `delivery`): the registry and the
//!   delivery records are KV buckets of the cluster; dispatch creates
//!   exactly one delivery per matching event, crash-safely, and delivery
//!   workers in any number of processes share the jobs, each attempted by
//!   one worker at a time.
//! - **G9.** Tenants are in the subject and filtered by the server; a
//!   webhook only receives its own tenant's events.
//! - **G10, G11.** Events are checked as on a file before anything is
//!   sent; an undecodable message is reported and skipped (a durable
//!   subscription dead-letters it).
//! - **G12.** The per-webhook cap on attempts in flight holds per process;
//!   there is no circuit breaker across a failing webhook's deliveries.
//!
//! Also: `durable_stream`, `publish_async` and `stream` work as on a file,
//! from async code too (a blocking call made inside a tokio runtime runs
//! on a thread of its own). The command line runs every command that
//! applies with `--nats`.

mod cursors;
mod delivery;
mod durable;
mod subject;
mod webhooks;

pub use delivery::JetStreamDeliveryWorker;
pub use durable::JetStreamSubscription;
pub use webhooks::JetStreamWebhooks;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::consumer::DeliverPolicy;
use futures_util::StreamExt;
use jiff::Timestamp;

use crate::bus::{Bus, Detach, Handler, HandlerFailure, Receipt, Subscription, SubscriptionId};
use crate::durable::{LogEntry, Position};
use crate::error::{OpenError, PublishError, ReadError, StorageError, SubscribeError};
use crate::event::{DEFAULT_MAX_PAYLOAD_BYTES, Event};
use crate::fanout;
use crate::filter::Filter;
use crate::sync::{Condvar, Mutex};

/// How long a publish goes on retrying through a leader election (or a
/// server restart) by default before it reports an error.
pub const DEFAULT_PUBLISH_DEADLINE: Duration = Duration::from_secs(10);

/// How long the stream remembers message ids for de-duplication by
/// default.
pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(3600);

/// Options of a [`JetStreamBus`].
#[derive(Debug, Clone)]
pub struct JetStreamBusBuilder {
    stream: String,
    replicas: Option<usize>,
    publish_deadline: Duration,
    duplicate_window: Duration,
    max_payload_bytes: usize,
    max_deliveries: u32,
    retry_backoff: Duration,
    max_retry_backoff: Duration,
    ack_wait: Duration,
}

impl Default for JetStreamBusBuilder {
    fn default() -> Self {
        JetStreamBusBuilder {
            stream: "ctrlbus".into(),
            replicas: None,
            publish_deadline: DEFAULT_PUBLISH_DEADLINE,
            duplicate_window: DEFAULT_DUPLICATE_WINDOW,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            max_deliveries: 5,
            retry_backoff: Duration::from_millis(20),
            max_retry_backoff: Duration::from_secs(5),
            ack_wait: Duration::from_secs(30),
        }
    }
}

impl JetStreamBusBuilder {
    /// The stream that holds the log (default `ctrlbus`): 1–64 of
    /// `[A-Za-z0-9_-]`.
    pub fn stream(mut self, name: impl Into<String>) -> Self {
        self.stream = name.into();
        self
    }

    /// Replicas of a stream this bus creates (default: `min(3, servers in
    /// the cluster)`). An existing stream keeps its own.
    pub fn replicas(mut self, n: usize) -> Self {
        self.replicas = Some(n.max(1));
        self
    }

    /// How long a publish retries through a leader election before it
    /// reports an error (default 10 s).
    pub fn publish_deadline(mut self, d: Duration) -> Self {
        self.publish_deadline = d;
        self
    }

    /// How long the stream drops a repeated event id (default 1 hour).
    pub fn duplicate_window(mut self, d: Duration) -> Self {
        self.duplicate_window = d;
        self
    }

    /// Largest payload accepted, in bytes of JSON (default 1 MiB). The
    /// servers' `max_payload` must allow it with the envelope.
    pub fn max_payload_bytes(mut self, bytes: usize) -> Self {
        self.max_payload_bytes = bytes;
        self
    }

    /// Deliveries of an event to a durable subscription before it is
    /// dead-lettered (default 5, as `DurableBus`).
    pub fn max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = n.max(1);
        self
    }

    /// The first wait before a failed event is delivered again, doubling
    /// up to `max` (defaults 20 ms and 5 s, as `DurableBus`).
    pub fn retry_backoff(mut self, first: Duration, max: Duration) -> Self {
        self.retry_backoff = first;
        self.max_retry_backoff = max.max(first);
        self
    }

    /// How long the server waits for a durable subscription's answer
    /// before it delivers the event again (default 30 s): the bound on
    /// redelivery after a process dies mid-event. Used when a
    /// subscription's consumer is created.
    pub fn ack_wait(mut self, d: Duration) -> Self {
        self.ack_wait = d;
        self
    }

    /// Connects to the servers at `urls` (comma-separated) and finds or
    /// creates the stream.
    ///
    /// # Errors
    /// [`OpenError::InvalidStreamName`]; [`OpenError::Connect`] when no
    /// server answers or the stream can't be created.
    pub fn connect(self, urls: &str) -> Result<JetStreamBus, OpenError> {
        // From async code: the bus's runtime can't be started, nor blocked
        // on, from a task of the application's; connect on a thread.
        if tokio::runtime::Handle::try_current().is_ok() {
            return std::thread::scope(|s| match s.spawn(|| self.connect_here(urls)).join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            });
        }
        self.connect_here(urls)
    }

    fn connect_here(self, urls: &str) -> Result<JetStreamBus, OpenError> {
        if !subject::valid_stream_name(&self.stream) {
            return Err(OpenError::InvalidStreamName(self.stream));
        }
        let fail = |reason: String| OpenError::Connect {
            urls: urls.to_owned(),
            reason,
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ctrlbus-nats")
            .enable_all()
            .build()
            .map_err(|e| fail(e.to_string()))?;
        let servers: Vec<String> = urls.split(',').map(|s| s.trim().to_owned()).collect();
        let (client, js, stream) = rt.block_on(async {
            let client = async_nats::ConnectOptions::new()
                .connection_timeout(Duration::from_secs(5))
                .connect(servers.clone())
                .await
                .map_err(|e| fail(e.to_string()))?;
            let js = jetstream::new(client.clone());
            let mut config = jetstream::stream::Config {
                name: self.stream.clone(),
                subjects: vec![subject::all(&self.stream)],
                num_replicas: self.replicas.unwrap_or(3),
                duplicate_window: self.duplicate_window,
                storage: jetstream::stream::StorageType::File,
                allow_direct: true,
                ..Default::default()
            };
            // The cluster may still be electing its meta leader, or its
            // servers may still be joining: retry. Fewer servers than
            // replicas ("insufficient resources") is not transient: without
            // an explicit count, `min(3, cluster size)` is then 1.
            let deadline = Instant::now() + Duration::from_secs(30);
            let stream = loop {
                match js.get_or_create_stream(config.clone()).await {
                    Ok(s) => break s,
                    Err(e)
                        if self.replicas.is_none()
                            && config.num_replicas > 1
                            && e.to_string().contains("insufficient resources") =>
                    {
                        config.num_replicas = 1;
                    }
                    Err(e) if Instant::now() < deadline => {
                        tracing::debug!(error = %e, "stream not ready; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => return Err(fail(format!("stream {}: {e}", self.stream))),
                }
            };
            Ok((client, js, stream))
        })?;
        let last = stream.cached_info().state.last_sequence;
        let replicas = stream.cached_info().config.num_replicas;
        Ok(JetStreamBus {
            inner: Arc::new(Inner {
                runtime: Some(rt),
                conn: Some((client, js)),
                stream: self.stream.clone(),
                opts: self,
                closed: AtomicBool::new(false),
                subs: Arc::new(LiveSubs::default()),
                last_seq: AtomicU64::new(last),
                replicas,
                webhook_stores: std::sync::OnceLock::new(),
            }),
        })
    }
}

/// The event bus on a NATS JetStream cluster. Cloning gives another handle
/// to the same bus.
#[derive(Clone)]
pub struct JetStreamBus {
    inner: Arc<Inner>,
}

struct Inner {
    /// `Some` until dropped.
    runtime: Option<tokio::runtime::Runtime>,
    /// The connection; `Some` until dropped (inside the runtime: the
    /// client's parts unsubscribe from tasks of the runtime's).
    conn: Option<(async_nats::Client, jetstream::Context)>,
    stream: String,
    opts: JetStreamBusBuilder,
    closed: AtomicBool,
    subs: Arc<LiveSubs>,
    /// The newest `seq` this process has seen acknowledged.
    last_seq: AtomicU64,
    /// The stream's replicas (the dead letters' stream gets as many).
    replicas: usize,
    /// The webhook registry's buckets and the jobs stream, once opened.
    webhook_stores: std::sync::OnceLock<webhooks::Stores>,
}

impl Inner {
    fn rt(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("a runtime until dropped")
    }

    /// Runs `f` on the bus's runtime and waits for it. Called from inside
    /// a tokio runtime (an application's async code calling the blocking
    /// API), it waits on a scoped thread of its own, since a runtime can't
    /// be blocked on from one of its tasks.
    fn block_on<F>(&self, f: F) -> F::Output
    where
        F: std::future::Future + Send,
        F::Output: Send,
    {
        if tokio::runtime::Handle::try_current().is_err() {
            return self.rt().block_on(f);
        }
        std::thread::scope(|s| match s.spawn(|| self.rt().block_on(f)).join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        })
    }

    fn js(&self) -> &jetstream::Context {
        &self.conn.as_ref().expect("connected until dropped").1
    }

    /// The log's stream.
    async fn stream(&self) -> Result<jetstream::stream::Stream, StorageError> {
        self.js().get_stream(&self.stream).await.map_err(cluster)
    }

    fn client(&self) -> &async_nats::Client {
        &self.conn.as_ref().expect("connected until dropped").0
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let Some(rt) = self.runtime.take() else {
            return;
        };
        {
            let _in_runtime = rt.enter();
            self.conn.take();
        }
        // Dropped from async code (the last handle in a task), the runtime
        // can't wait for its threads there: they finish in the background.
        if tokio::runtime::Handle::try_current().is_ok() {
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for JetStreamBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamBus")
            .field("stream", &self.inner.stream)
            .finish_non_exhaustive()
    }
}

impl JetStreamBus {
    /// Connects with the default options (stream `ctrlbus`).
    ///
    /// # Errors
    /// As [`JetStreamBusBuilder::connect`].
    pub fn connect(urls: &str) -> Result<JetStreamBus, OpenError> {
        JetStreamBusBuilder::default().connect(urls)
    }

    /// A builder for other options.
    pub fn builder() -> JetStreamBusBuilder {
        JetStreamBusBuilder::default()
    }

    /// The stream's name.
    pub fn stream_name(&self) -> &str {
        &self.inner.stream
    }

    /// The `seq` of the newest event in the stream.
    ///
    /// # Errors
    /// [`StorageError::Cluster`] when the cluster does not answer.
    pub fn last_seq(&self) -> Result<u64, StorageError> {
        Ok(self.stream_info()?.state.last_sequence)
    }

    /// The stream's info, asked again through elections.
    fn stream_info(&self) -> Result<jetstream::stream::Info, StorageError> {
        let inner = &self.inner;
        inner.block_on(self.retrying(|| async {
            let mut stream = inner.stream().await?;
            Ok(stream.info().await.map_err(cluster)?.clone())
        }))
    }

    /// Runs a request to the cluster again while it fails, up to the
    /// publish deadline: a leader election or a restarting server delays a
    /// read as it delays a publish, without failing it.
    async fn retrying<T, F, Fut>(&self, mut request: F) -> Result<T, StorageError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StorageError>>,
    {
        let deadline = Instant::now() + self.inner.opts.publish_deadline;
        loop {
            match request().await {
                Ok(v) => return Ok(v),
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "the cluster did not answer; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The server that leads the stream (its Raft leader), if one is
    /// elected.
    ///
    /// # Errors
    /// [`StorageError::Cluster`] when the cluster does not answer.
    pub fn stream_leader(&self) -> Result<Option<String>, StorageError> {
        Ok(self.stream_info()?.cluster.and_then(|c| c.leader))
    }

    /// Publishes several events, in order, with consecutive receipts for
    /// those not already in the stream. Unlike `DurableBus`, the batch is
    /// not atomic: on an error, the events before the failing one are
    /// published (their ids make a retry of the whole batch safe within
    /// the duplicate window).
    ///
    /// # Errors
    /// As [`Bus::publish`], for the first event that failed.
    pub fn publish_batch(&self, events: Vec<Event>) -> Result<Vec<Receipt>, PublishError> {
        let mut seen = std::collections::HashSet::with_capacity(events.len());
        for e in &events {
            if !seen.insert(e.id) {
                return Err(PublishError::DuplicateInBatch(e.id));
            }
            self.check(e)?;
        }
        events.into_iter().map(|e| self.publish(e)).collect()
    }

    fn check(&self, event: &Event) -> Result<(), PublishError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(PublishError::Closed);
        }
        event.validate_but_size()?;
        if !event.payload.is_empty()
            && event.payload_json().len() > self.inner.opts.max_payload_bytes
        {
            return Err(PublishError::Invalid(crate::EventError::PayloadTooLarge {
                limit: self.inner.opts.max_payload_bytes,
            }));
        }
        Ok(())
    }

    /// The log from `from`, as it is at this call, yielding the events that
    /// match `filter` in `seq` order. The type patterns and tenant are
    /// applied by the server.
    ///
    /// # Errors
    /// [`ReadError::Storage`] when the cluster fails; [`ReadError::Closed`].
    /// [`Position::Id`] is not supported on this backend (the stream has
    /// no index from id to `seq`): [`ReadError::Storage`].
    pub fn read(&self, from: Position, filter: &Filter) -> Result<JetStreamReader, ReadError> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(ReadError::Closed);
        }
        let deliver_policy = match from {
            Position::Beginning => DeliverPolicy::All,
            Position::Seq(s) => DeliverPolicy::ByStartSequence {
                start_sequence: s.max(1),
            },
            Position::Time(t) => DeliverPolicy::ByStartTime {
                start_time: to_offset(t),
            },
            Position::End => return Ok(JetStreamReader::empty(self.clone())),
            Position::Id(_) => {
                return Err(ReadError::Storage(StorageError::Cluster {
                    reason: "reading from an event id is not supported on JetStream (the stream has no index from id to seq): read from a seq or a time".into(),
                }));
            }
        };
        let subjects = subject::of_filter(&inner.stream, filter);
        let whole = subject::is_every_event(&inner.stream, &subjects);
        let (messages, pending, last) = inner.block_on(self.retrying(|| async {
            // The stream's last seq as its leader has it: what a read of
            // every subject must reach (see `JetStreamReader::until`).
            let stream = inner.stream().await?;
            let last = stream.cached_info().state.last_sequence;
            let mut consumer = stream
                .create_consumer(jetstream::consumer::pull::OrderedConfig {
                    deliver_policy,
                    filter_subjects: subjects.clone(),
                    ..Default::default()
                })
                .await
                .map_err(cluster)?;
            let pending = consumer.info().await.map_err(cluster)?.num_pending;
            let messages = consumer.messages().await.map_err(cluster)?;
            Ok::<_, StorageError>((messages, pending, last))
        }))?;
        // Only where the read starts at a known seq: from a time, the
        // consumer alone knows where it starts (maybe past `last`).
        let start = match from {
            Position::Beginning => Some(1),
            Position::Seq(s) => Some(s.max(1)),
            _ => None,
        };
        let until = start.filter(|&s| whole && last >= s).map(|_| last);
        let mut reader = JetStreamReader {
            bus: self.clone(),
            messages: Some(messages),
            filter: filter.clone(),
            until,
        };
        if pending == 0 && until.is_none() {
            reader.finish();
        }
        Ok(reader)
    }
}

/// `time` for `async-nats` from a `jiff` timestamp.
fn to_offset(t: Timestamp) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(t.as_nanosecond())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn from_offset(t: time::OffsetDateTime) -> Timestamp {
    Timestamp::from_nanosecond(t.unix_timestamp_nanos()).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// Fetches one message of `consumer`, waiting up to 500 ms.
pub(super) async fn fetch_one(
    consumer: &jetstream::consumer::Consumer<jetstream::consumer::pull::Config>,
) -> Result<Option<jetstream::Message>, StorageError> {
    let mut batch = consumer
        .fetch()
        .max_messages(1)
        .expires(Duration::from_millis(500))
        .messages()
        .await
        .map_err(cluster)?;
    match batch.next().await {
        Some(Ok(m)) => Ok(Some(m)),
        Some(Err(e)) => Err(cluster(e)),
        None => Ok(None),
    }
}

fn cluster(e: impl std::fmt::Display) -> StorageError {
    StorageError::Cluster {
        reason: e.to_string(),
    }
}

/// A streaming reader over a JetStream log (see [`JetStreamBus::read`]).
pub struct JetStreamReader {
    bus: JetStreamBus,
    /// `None` once the snapshot is read.
    messages: Option<jetstream::consumer::pull::Ordered>,
    filter: Filter,
    /// For a read of every subject, the stream's last seq when it began,
    /// as the stream's leader had it: the read ends there, not where the
    /// consumer first says nothing is pending. A consumer's server may be
    /// a replica still catching up after a failover, whose count of what
    /// is pending is short (a read right after a leader's restart once
    /// ended before acknowledged events).
    until: Option<u64>,
}

impl JetStreamReader {
    fn empty(bus: JetStreamBus) -> JetStreamReader {
        JetStreamReader {
            bus,
            messages: None,
            filter: Filter::all(),
            until: None,
        }
    }
}

impl JetStreamReader {
    /// Ends the read; the consumer is dropped inside the runtime (its
    /// subscription unsubscribes from a task of the runtime's).
    fn finish(&mut self) {
        let _in_runtime = self.bus.inner.rt().enter();
        self.messages.take();
    }
}

impl Drop for JetStreamReader {
    fn drop(&mut self) {
        self.finish();
    }
}

impl std::fmt::Debug for JetStreamReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JetStreamReader")
    }
}

impl Iterator for JetStreamReader {
    type Item = Result<LogEntry, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let messages = self.messages.as_mut()?;
            let got = self.bus.inner.block_on(async {
                tokio::time::timeout(Duration::from_secs(30), messages.next()).await
            });
            let msg = match got {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => {
                    self.finish();
                    return Some(Err(ReadError::Storage(cluster(e))));
                }
                Ok(None) => {
                    self.finish();
                    // A read of every subject ends at `until`, which it
                    // has not reached: say so, rather than end short.
                    return self.until.map(|until| {
                        Err(ReadError::Storage(cluster(format!(
                            "the stream's consumer ended before seq {until}, the last when the read began"
                        ))))
                    });
                }
                Err(_) => {
                    self.finish();
                    return Some(Err(ReadError::Storage(cluster(
                        "no message from the stream within 30 s",
                    ))));
                }
            };
            let entry = match entry_of(&msg) {
                Ok(e) => e,
                Err(e) => return Some(Err(e)),
            };
            let last_one = match self.until {
                Some(until) => entry.seq >= until,
                None => msg.info().is_ok_and(|i| i.pending == 0),
            };
            if last_one {
                // The last one of the snapshot.
                self.finish();
            }
            // The instance filter is the client's; types and tenant were
            // the server's.
            if self.filter.matches(&entry.event) {
                return Some(Ok(entry));
            }
        }
    }
}

fn entry_of(msg: &jetstream::Message) -> Result<LogEntry, ReadError> {
    let info = msg.info().map_err(|e| ReadError::Storage(cluster(e)))?;
    let seq = info.stream_sequence;
    let event = Event::from_json(&msg.payload).map_err(|e| {
        ReadError::Storage(StorageError::Corrupted {
            table: "stream",
            key: seq.to_string(),
            reason: e.to_string(),
        })
    })?;
    Ok(LogEntry {
        seq,
        appended_at: from_offset(info.published),
        event,
    })
}

/// The live subscriptions of this process.
#[derive(Default)]
struct LiveSubs {
    next_id: AtomicU64,
    subs: Mutex<HashMap<u64, Arc<LiveSub>>>,
}

/// One live subscription: a thread reading the stream in order from the
/// position it was created at, running the handler on matching events.
struct LiveSub {
    /// Every event up to this `seq` has been offered to the handler.
    passed: Mutex<u64>,
    passed_cv: Condvar,
    stop: AtomicBool,
    /// Handler failures by `seq`, for the publisher of that `seq`.
    failures: Mutex<HashMap<u64, Vec<HandlerFailure>>>,
}

impl Detach for LiveSubs {
    fn detach(&self, id: SubscriptionId) -> bool {
        match self.subs.lock().remove(&id.0) {
            Some(s) => {
                s.stop.store(true, Ordering::Release);
                s.passed_cv.notify_all();
                true
            }
            None => false,
        }
    }
}

impl LiveSubs {
    /// True when this process has live subscriptions.
    fn any(&self) -> bool {
        !self.subs.lock().is_empty()
    }

    /// Waits until every live subscription of this process has passed
    /// `seq` (G4), and gathers their failures on it.
    fn wait(&self, seq: u64) -> Vec<HandlerFailure> {
        let subs: Vec<Arc<LiveSub>> = self.subs.lock().values().cloned().collect();
        let mut failures = Vec::new();
        for sub in subs {
            let mut passed = sub.passed.lock();
            while *passed < seq && !sub.stop.load(Ordering::Acquire) {
                sub.passed_cv
                    .wait_for(&mut passed, Duration::from_millis(100));
            }
            drop(passed);
            if let Some(f) = sub.failures.lock().remove(&seq) {
                failures.extend(f);
            }
        }
        failures
    }
}

/// What a publish needs, apart from the bus (a task of the bus's runtime
/// must not hold the bus: dropping its last handle there would drop the
/// runtime from inside itself).
#[derive(Clone)]
struct Sender {
    js: jetstream::Context,
    stream: String,
    deadline: Duration,
}

impl Sender {
    /// Sends `event` until the stream acknowledges it, resending with the
    /// same id through elections and restarts up to the deadline.
    async fn send(&self, event: &Event) -> Result<jetstream::publish::PublishAck, PublishError> {
        let subject = subject::of_event(&self.stream, event);
        let payload = bytes_of(event);
        let id = event.id.to_string();
        let deadline = Instant::now() + self.deadline;
        loop {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.as_str());
            let sent = self
                .js
                .publish_with_headers(subject.clone(), headers, payload.clone())
                .await;
            let last_error = match sent {
                Ok(ack) => match ack.await {
                    Ok(ack) => return Ok(ack),
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(PublishError::Storage(StorageError::Cluster {
                    reason: format!(
                        "no acknowledgement within {:?} ({last_error}); the event may have \
                         been stored: publish it again (same id) to find out",
                        self.deadline
                    ),
                }));
            }
            // A leader election or a restarting server: the same id again.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl JetStreamBus {
    fn sender(&self) -> Sender {
        Sender {
            js: self.inner.js().clone(),
            stream: self.inner.stream.clone(),
            deadline: self.inner.opts.publish_deadline,
        }
    }

    /// A stream of the live events matching `filter`, from now on, as
    /// [`DurableBus::stream`](crate::DurableBus::stream): bounded, never
    /// holding up a publisher, `Lagged` instead of a silent gap.
    ///
    /// # Errors
    /// As [`Bus::subscribe`].
    pub fn stream(&self, filter: Filter) -> Result<crate::stream::EventStream, SubscribeError> {
        self.stream_with_capacity(filter, crate::stream::DEFAULT_STREAM_CAPACITY)
    }

    /// As [`JetStreamBus::stream`], holding up to `capacity` events.
    ///
    /// # Errors
    /// As [`Bus::subscribe`].
    pub fn stream_with_capacity(
        &self,
        filter: Filter,
        capacity: usize,
    ) -> Result<crate::stream::EventStream, SubscribeError> {
        crate::stream::open_live(self, filter, capacity)
    }

    /// Publishes one event; the future resolves to its receipt once the
    /// stream has acknowledged it (a quorum of replicas stored it) and this
    /// process's live subscribers have run, as [`Bus::publish`] returns. It
    /// runs on the bus's runtime, so it can be awaited on any executor, and
    /// many publishes in flight from one task or many are pipelined to the
    /// servers. Dropping the future doesn't cancel the publish (see
    /// [`PublishFuture`](crate::stream::PublishFuture)).
    ///
    /// # Errors
    /// As [`Bus::publish`].
    pub fn publish_async(&self, event: Event) -> crate::stream::PublishFuture {
        use crate::stream::PublishFuture;
        if let Err(e) = self.check(&event) {
            return PublishFuture::refused(e);
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sender = self.sender();
        let subs = self.inner.subs.clone();
        self.inner.rt().spawn(async move {
            let result = match sender.send(&event).await {
                Err(e) => Err(e),
                Ok(ack) => {
                    let handler_failures = if !ack.duplicate && subs.any() {
                        let seq = ack.sequence;
                        tokio::task::spawn_blocking(move || subs.wait(seq))
                            .await
                            .unwrap_or_default()
                    } else {
                        Vec::new()
                    };
                    Ok(Receipt {
                        seq: ack.sequence,
                        id: event.id,
                        duplicate: ack.duplicate,
                        handler_failures,
                    })
                }
            };
            let _ = tx.send(result);
        });
        PublishFuture::remote(rx)
    }
}

impl Bus for JetStreamBus {
    fn publish(&self, event: Event) -> Result<Receipt, PublishError> {
        self.check(&event)?;
        let inner = &self.inner;
        let ack = inner.block_on(self.sender().send(&event))?;
        inner.last_seq.fetch_max(ack.sequence, Ordering::AcqRel);
        let handler_failures = if ack.duplicate {
            Vec::new()
        } else {
            inner.subs.wait(ack.sequence)
        };
        Ok(Receipt {
            seq: ack.sequence,
            id: event.id,
            duplicate: ack.duplicate,
            handler_failures,
        })
    }

    fn subscribe_boxed(
        &self,
        filter: Filter,
        handler: Box<dyn Handler>,
    ) -> Result<Subscription, SubscribeError> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(SubscribeError::Closed);
        }
        // From the next `seq`: every event published after this returns.
        // The consumer reads every subject, so that `passed` moves with
        // each `seq` (publishers wait for it); the filter is applied here.
        let start = self.last_seq().map_err(SubscribeError::Storage)? + 1;
        let id = inner.subs.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let messages = inner
            .block_on(async {
                let stream = inner.stream().await?;
                let consumer = stream
                    .create_consumer(jetstream::consumer::pull::OrderedConfig {
                        deliver_policy: DeliverPolicy::ByStartSequence {
                            start_sequence: start,
                        },
                        filter_subject: subject::all(&inner.stream),
                        ..Default::default()
                    })
                    .await
                    .map_err(cluster)?;
                consumer.messages().await.map_err(cluster)
            })
            .map_err(SubscribeError::Storage)?;
        let sub = Arc::new(LiveSub {
            passed: Mutex::new(start - 1),
            passed_cv: Condvar::new(),
            stop: AtomicBool::new(false),
            failures: Mutex::new(HashMap::new()),
        });
        inner.subs.subs.lock().insert(id, sub.clone());
        let bus = self.clone();
        let sid = SubscriptionId(id);
        std::thread::Builder::new()
            .name(format!("ctrlbus-js-sub-{id}"))
            .spawn(move || bus.run_live(&sub, sid, messages, &filter, handler.as_ref()))
            .map_err(|e| SubscribeError::Storage(cluster(e)))?;
        let owner: Arc<dyn Detach> = inner.subs.clone();
        Ok(Subscription::new(sid, Arc::downgrade(&owner)))
    }

    fn recent_events(&self, limit: usize, filter: &Filter) -> Result<Vec<Event>, ReadError> {
        let last = self.last_seq()?;
        // Read back from far enough for `limit` matches, widening as
        // needed (the filter may match few).
        let mut span = (limit as u64).max(16);
        loop {
            let from = last.saturating_sub(span) + 1;
            let mut events: Vec<Event> = self
                .read(Position::Seq(from), filter)?
                .map(|e| e.map(|e| e.event))
                .collect::<Result<_, _>>()?;
            if events.len() >= limit || from == 1 {
                let skip = events.len().saturating_sub(limit);
                events.drain(..skip);
                return Ok(events);
            }
            span *= 4;
        }
    }

    fn close(&self) {
        let inner = &self.inner;
        inner.closed.store(true, Ordering::Release);
        let subs: Vec<u64> = inner.subs.subs.lock().keys().copied().collect();
        for id in subs {
            inner.subs.detach(SubscriptionId(id));
        }
        let client = inner.client().clone();
        let _ = inner.block_on(client.flush());
    }
}

impl JetStreamBus {
    /// A live subscription's thread.
    fn run_live(
        &self,
        sub: &LiveSub,
        id: SubscriptionId,
        mut messages: jetstream::consumer::pull::Ordered,
        filter: &Filter,
        handler: &dyn Handler,
    ) {
        let rt = self.inner.rt();
        while !sub.stop.load(Ordering::Acquire) {
            let got = rt.block_on(async {
                tokio::time::timeout(Duration::from_millis(200), messages.next()).await
            });
            let msg = match got {
                Err(_) => continue, // looks at `stop` again
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    tracing::warn!(error = %e, "live subscription: reading the stream failed; retrying");
                    continue;
                }
                Ok(Some(Ok(m))) => m,
            };
            // Looked at after the message came: one published after
            // `unsubscribe` returned never reaches the handler.
            if sub.stop.load(Ordering::Acquire) {
                break;
            }
            match entry_of(&msg) {
                Ok(entry) => {
                    if filter.matches(&entry.event)
                        && let Err(f) = fanout::call(id, handler, &entry.event)
                    {
                        let mut failures = sub.failures.lock();
                        failures.entry(entry.seq).or_default().push(f);
                        // Failures on events published by other processes
                        // have no publisher here to take them.
                        if failures.len() > 4096 {
                            failures.retain(|s, _| *s + 4096 > entry.seq);
                        }
                    }
                    let mut passed = sub.passed.lock();
                    *passed = (*passed).max(entry.seq);
                }
                Err(e) => {
                    tracing::error!(error = %e, "live subscription: an undecodable message was skipped");
                    if let Ok(info) = msg.info() {
                        let mut passed = sub.passed.lock();
                        *passed = (*passed).max(info.stream_sequence);
                    }
                }
            }
            sub.passed_cv.notify_all();
        }
        // However it ended, publishers no longer wait for it.
        sub.stop.store(true, Ordering::Release);
        sub.passed_cv.notify_all();
        // The consumer's tasks are the runtime's: dropped inside it.
        let _in_runtime = rt.enter();
        drop(messages);
    }
}

fn bytes_of(event: &Event) -> bytes::Bytes {
    bytes::Bytes::from(event.to_json().into_bytes())
}
