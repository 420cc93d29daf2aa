//! Durable subscriptions on JetStream: named durable consumers.
//!
//! A subscription named `N` is the durable pull consumer `N` (a `.` in the
//! name is written `~`, which consumer names allow and subscription names
//! never hold) with explicit acks and `max_ack_pending = 1`: one event in
//! flight for the whole consumer, so events are handled in `seq` order even
//! when several processes share the name (each event goes to one of them),
//! and a redelivery can't overtake a later event (the pitfall of a larger
//! window). The thread of each subscription fetches one message at a time,
//! so a clean stop leaves none fetched and unanswered.
//!
//! After the handler: `Ok` is a double ack (the server confirms it, so the
//! position is stored when `Ok` is answered); an error is a NAK with the
//! delay the handler asked for, else the backoff (NATS's `backoff` list
//! applies to ack-wait timeouts, not to NAKs, so the delay goes with each
//! NAK); at `max_deliveries` deliveries the event goes to the dead letters
//! and is terminated. A process that dies mid-event leaves it unacked: the
//! server redelivers it after `ack_wait` (the bound on redelivery after a
//! crash), to whichever process asks next.
//!
//! Dead letters are messages of the stream `<stream>_dead`, one subject per
//! subscription.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use async_nats::jetstream;
use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::{JetStreamBus, cluster, entry_of, subject, to_offset};
use crate::bus::{Handler, SubscriptionId};
use crate::durable::{DeadLetter, Position, Pull, Verdict};
use crate::error::{CursorError, StorageError, SubscribeError};
use crate::fanout;
use crate::filter::Filter;
use crate::sync::Mutex;

/// The consumer a subscription name is written as.
pub(super) fn consumer_name(name: &str) -> String {
    name.replace('.', "~")
}

/// The subscription name a consumer is written for.
pub(super) fn subscription_name(consumer: &str) -> String {
    consumer.replace('~', ".")
}

/// The stream of dead letters of `stream`.
pub(super) fn dead_stream(stream: &str) -> String {
    format!("{stream}_dead")
}

#[derive(Serialize, Deserialize)]
struct DeadRecord {
    subscription: String,
    seq: u64,
    error: String,
    attempts: u32,
    at_ns: i64,
}

/// A running durable subscription on JetStream. Dropping it stops the
/// delivery (the position is the server's: every acked event).
pub struct JetStreamSubscription {
    name: String,
    stop: Arc<AtomicBool>,
    last_error: Arc<Mutex<Option<String>>>,
    /// Every event up to this `seq` was acknowledged (in this process).
    handled: Arc<AtomicU64>,
    /// The pulling consumer of a `DurableStream`, told to stop first.
    pull: Option<Arc<dyn Pull>>,
    thread: Option<JoinHandle<()>>,
}

/// A running subscription's state, shared with its handle.
struct Running {
    name: String,
    id: SubscriptionId,
    stop: Arc<AtomicBool>,
    last_error: Arc<Mutex<Option<String>>>,
    handled: Arc<AtomicU64>,
}

/// Who handles a durable subscription's events.
enum Taker {
    /// A handler, run on the subscription's thread.
    Handler(Box<dyn Handler>),
    /// A `DurableStream`, offered each event and answering it.
    Pull(Arc<dyn Pull>),
}

impl std::fmt::Debug for JetStreamSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamSubscription")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl JetStreamSubscription {
    /// The subscription's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The last handler error, if any.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().clone()
    }
}

impl crate::stream::Running for JetStreamSubscription {
    fn name(&self) -> &str {
        &self.name
    }
    fn position(&self) -> u64 {
        self.handled.load(Ordering::Acquire)
    }
}

impl Drop for JetStreamSubscription {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(pull) = &self.pull {
            pull.stop();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl JetStreamBus {
    /// Subscribes `handler` under the durable name `name`: from the
    /// consumer's stored position if it exists (in this or any process),
    /// else from `start`; in `seq` order, at least once. Several processes
    /// subscribing with the same name share it: each event is handled by
    /// one of them. A failing event is retried after the backoff (or the
    /// handler's `retry_after`) and dead-lettered after `max_deliveries`.
    ///
    /// # Errors
    /// [`SubscribeError::InvalidName`]; [`SubscribeError::Closed`];
    /// [`SubscribeError::Storage`] when the cluster fails.
    /// [`Position::Id`] is not supported on this backend (no index from
    /// id to `seq`): [`SubscribeError::UnknownPosition`].
    pub fn subscribe_durable<H: Handler + 'static>(
        &self,
        name: &str,
        filter: Filter,
        start: Position,
        handler: H,
    ) -> Result<JetStreamSubscription, SubscribeError> {
        self.subscribe_taker(name, filter, start, Taker::Handler(Box::new(handler)))
    }

    /// A named durable cursor as a `Stream` of deliveries to acknowledge,
    /// as [`DurableBus::durable_stream`](crate::DurableBus::durable_stream):
    /// one delivery unanswered at a time, in `seq` order; a nack (or a
    /// dropped delivery) is delivered again after its delay and
    /// dead-lettered after `max_deliveries`. Processes that open the same
    /// name share it. An ack resolves once the server confirmed it.
    ///
    /// # Errors
    /// As [`JetStreamBus::subscribe_durable`].
    pub fn durable_stream(
        &self,
        name: &str,
        filter: Filter,
        start: Position,
    ) -> Result<crate::stream::DurableStream, SubscribeError> {
        crate::stream::open_durable(|pull| {
            self.subscribe_taker(name, filter, start, Taker::Pull(Arc::from(pull)))
        })
    }

    fn subscribe_taker(
        &self,
        name: &str,
        filter: Filter,
        start: Position,
        taker: Taker,
    ) -> Result<JetStreamSubscription, SubscribeError> {
        if !crate::durable::valid_subscription_name(name) {
            return Err(SubscribeError::InvalidName(name.to_owned()));
        }
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(SubscribeError::Closed);
        }
        let deliver_policy = match start {
            Position::Beginning => DeliverPolicy::All,
            Position::End => DeliverPolicy::New,
            Position::Seq(s) => DeliverPolicy::ByStartSequence {
                start_sequence: s.max(1),
            },
            Position::Time(t) => DeliverPolicy::ByStartTime {
                start_time: to_offset(t),
            },
            Position::Id(id) => {
                return Err(SubscribeError::UnknownPosition(format!(
                    "{id} (starting from an event id is not supported on JetStream: the stream has no index from id to seq)"
                )));
            }
        };
        let cname = consumer_name(name);
        let opts = &inner.opts;
        let consumer = inner
            .block_on(async {
                let stream = inner.stream().await?;
                stream
                    .get_or_create_consumer(
                        &cname,
                        pull::Config {
                            durable_name: Some(cname.clone()),
                            deliver_policy,
                            filter_subjects: subject::of_filter(&inner.stream, &filter),
                            ack_policy: AckPolicy::Explicit,
                            ack_wait: opts.ack_wait,
                            max_ack_pending: 1,
                            // ctrlbus dead-letters at `max_deliveries`
                            // itself; the server's limit stays above it.
                            max_deliver: i64::from(opts.max_deliveries) + 1,
                            metadata: [(
                                super::cursors::FILTER_KEY.to_owned(),
                                serde_json::to_string(&filter).unwrap_or_default(),
                            )]
                            .into(),
                            ..Default::default()
                        },
                    )
                    .await
                    .map_err(cluster)
            })
            .map_err(SubscribeError::Storage)?;
        let state = Running {
            name: name.to_owned(),
            id: SubscriptionId(inner.subs.next_id.fetch_add(1, Ordering::Relaxed) + 1),
            stop: Arc::new(AtomicBool::new(false)),
            last_error: Arc::new(Mutex::new(None)),
            handled: Arc::new(AtomicU64::new(0)),
        };
        let pull = match &taker {
            Taker::Pull(p) => Some(p.clone()),
            Taker::Handler(_) => None,
        };
        let (stop, last_error, handled) = (
            state.stop.clone(),
            state.last_error.clone(),
            state.handled.clone(),
        );
        let bus = self.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ctrlbus-js-{name}"))
            .spawn(move || {
                bus.run_durable(&state, &consumer, &filter, &taker);
                if let Taker::Pull(p) = &taker {
                    p.finished();
                }
            })
            .map_err(|e| SubscribeError::Storage(cluster(e)))?;
        Ok(JetStreamSubscription {
            name: name.to_owned(),
            stop,
            last_error,
            handled,
            pull,
            thread: Some(thread),
        })
    }

    fn run_durable(
        &self,
        state: &Running,
        consumer: &jetstream::consumer::Consumer<pull::Config>,
        filter: &Filter,
        taker: &Taker,
    ) {
        let inner = &self.inner;
        let opts = &inner.opts;
        let name = state.name.as_str();
        let last_error = &state.last_error;
        while !state.stop.load(Ordering::Acquire) && !inner.closed.load(Ordering::Acquire) {
            // One message at a time, waiting up to 500 ms for it.
            let fetched = inner.block_on(super::fetch_one(consumer));
            let msg = match fetched {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(subscription = name, error = %e, "fetching failed; retrying");
                    *last_error.lock() = Some(e.to_string());
                    if let Taker::Pull(p) = taker {
                        p.read_failed(&crate::error::ReadError::Storage(e));
                    }
                    std::thread::sleep(opts.max_retry_backoff);
                    continue;
                }
            };
            let attempt = msg
                .info()
                .map_or(1, |i| u32::try_from(i.delivered).unwrap_or(1));
            let outcome = match entry_of(&msg) {
                Ok(entry) if !filter.matches(&entry.event) => Ok(entry.seq),
                Ok(entry) => match taker {
                    Taker::Handler(h) => fanout::call_for_retry(state.id, h.as_ref(), &entry.event)
                        .map(|()| entry.seq)
                        .map_err(|(f, delay)| Some((f.error, delay, entry.seq))),
                    Taker::Pull(p) => match p.deliver(entry.seq, &entry.event, attempt) {
                        Verdict::Ack => Ok(entry.seq),
                        Verdict::Nack { error, retry_after } => {
                            Err(Some((error, retry_after, entry.seq)))
                        }
                        Verdict::Closed => Err(None),
                    },
                },
                Err(e) => {
                    let seq = msg.info().map_or(0, |i| i.stream_sequence);
                    // Undecodable: dead-lettered at once, never retried.
                    Err(Some((e.to_string(), None, seq)))
                }
            };
            let answered = inner.block_on(async {
                match outcome {
                    Ok(seq) => {
                        msg.double_ack().await.map_err(cluster)?;
                        state.handled.fetch_max(seq, Ordering::AcqRel);
                        if let Taker::Pull(p) = taker {
                            p.recorded(seq);
                        }
                        Ok(())
                    }
                    // The stream closed with the event unanswered: it
                    // comes again at once, to whoever asks next.
                    Err(None) => msg.ack_with(AckKind::Nak(None)).await.map_err(cluster),
                    Err(Some((error, delay, seq))) => {
                        *last_error.lock() = Some(error.clone());
                        let exhausted = attempt >= opts.max_deliveries || entry_of(&msg).is_err();
                        if exhausted {
                            self.store_dead_letter(name, seq, &error, attempt).await?;
                            msg.double_ack_with(AckKind::Term).await.map_err(cluster)?;
                            state.handled.fetch_max(seq, Ordering::AcqRel);
                            if let Taker::Pull(p) = taker {
                                p.recorded(seq);
                            }
                            Ok(())
                        } else {
                            let backoff = delay.unwrap_or_else(|| {
                                (opts.retry_backoff * 2u32.saturating_pow(attempt - 1))
                                    .min(opts.max_retry_backoff)
                            });
                            msg.ack_with(AckKind::Nak(Some(backoff)))
                                .await
                                .map_err(cluster)
                        }
                    }
                }
            });
            if let Err(e) = answered {
                // Unanswered: the server redelivers it after `ack_wait`.
                tracing::warn!(subscription = name, error = %e, "answering the server failed");
                *last_error.lock() = Some(e.to_string());
            }
        }
    }

    async fn store_dead_letter(
        &self,
        name: &str,
        seq: u64,
        error: &str,
        attempts: u32,
    ) -> Result<(), StorageError> {
        let inner = &self.inner;
        let dead = dead_stream(&inner.stream);
        inner
            .js()
            .get_or_create_stream(jetstream::stream::Config {
                name: dead.clone(),
                subjects: vec![format!("{dead}.>")],
                num_replicas: inner.replicas,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(cluster)?;
        let record = DeadRecord {
            subscription: name.to_owned(),
            seq,
            error: error.to_owned(),
            attempts,
            at_ns: crate::time::now_ns(),
        };
        let body = serde_json::to_vec(&record).unwrap_or_default();
        inner
            .js()
            .publish(format!("{dead}.{}", consumer_name(name)), body.into())
            .await
            .map_err(cluster)?
            .await
            .map_err(cluster)?;
        tracing::warn!(
            subscription = name,
            seq,
            attempts,
            error,
            "event moved to dead letters"
        );
        Ok(())
    }

    /// The position of the durable subscription `name`: every event up to
    /// this `seq` has been handled (acknowledged or dead-lettered).
    ///
    /// # Errors
    /// [`CursorError::InvalidName`], [`CursorError::Unknown`],
    /// [`CursorError::Storage`].
    pub fn cursor_position(&self, name: &str) -> Result<u64, CursorError> {
        self.on_consumer(name, |stream, cname| async move {
            stream
                .consumer_info(cname)
                .await
                .map(|info| super::cursors::handled_seq(&info))
                .map_err(|e| e.to_string())
        })
    }

    /// Deletes the durable subscription `name`: its consumer and its dead
    /// letters.
    ///
    /// # Errors
    /// [`CursorError::InvalidName`], [`CursorError::Unknown`],
    /// [`CursorError::Storage`].
    pub fn delete_cursor(&self, name: &str) -> Result<(), CursorError> {
        let dead = dead_stream(&self.inner.stream);
        let js = self.inner.js().clone();
        self.on_consumer(name, |stream, cname| async move {
            stream
                .delete_consumer(&cname)
                .await
                .map_err(|e| e.to_string())?;
            if let Ok(dead_letters) = js.get_stream(&dead).await {
                dead_letters
                    .purge()
                    .filter(format!("{dead}.{cname}"))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        })
    }

    /// Runs `op` on the consumer of the subscription `name`; a server's
    /// "not found" is [`CursorError::Unknown`].
    pub(super) fn on_consumer<T, F, Fut>(&self, name: &str, op: F) -> Result<T, CursorError>
    where
        T: Send,
        F: FnOnce(jetstream::stream::Stream, String) -> Fut + Send,
        Fut: std::future::Future<Output = Result<T, String>> + Send,
    {
        if !crate::durable::valid_subscription_name(name) {
            return Err(CursorError::InvalidName(name.to_owned()));
        }
        let inner = &self.inner;
        inner.block_on(async {
            let stream = inner.stream().await?;
            match op(stream, consumer_name(name)).await {
                Ok(v) => Ok(v),
                Err(e) if e.contains("not found") => Err(CursorError::Unknown(name.to_owned())),
                Err(e) => Err(CursorError::Storage(cluster(e))),
            }
        })
    }

    /// The dead letters of the subscription `name`, oldest first.
    ///
    /// # Errors
    /// [`StorageError`] when the cluster fails.
    pub fn dead_letters(&self, name: &str) -> Result<Vec<DeadLetter>, StorageError> {
        let inner = &self.inner;
        let dead = dead_stream(&inner.stream);
        inner.block_on(async {
            let Ok(stream) = inner.js().get_stream(&dead).await else {
                return Ok(Vec::new()); // none yet
            };
            let mut consumer = stream
                .create_consumer(pull::OrderedConfig {
                    filter_subject: format!("{dead}.{}", consumer_name(name)),
                    ..Default::default()
                })
                .await
                .map_err(cluster)?;
            let pending = consumer.info().await.map_err(cluster)?.num_pending;
            let mut out = Vec::new();
            if pending == 0 {
                return Ok(out);
            }
            let mut messages = consumer.messages().await.map_err(cluster)?;
            while let Some(m) = messages.next().await {
                let m = m.map_err(cluster)?;
                if let Ok(r) = serde_json::from_slice::<DeadRecord>(&m.payload) {
                    out.push(DeadLetter {
                        subscription: r.subscription,
                        seq: r.seq,
                        error: r.error,
                        attempts: r.attempts,
                        at: crate::time::ts(r.at_ns),
                    });
                }
                if m.info().is_ok_and(|i| i.pending == 0) {
                    break;
                }
            }
            Ok(out)
        })
    }
}
