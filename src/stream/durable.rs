//! [`DurableStream`]: a named durable cursor as a `Stream` of
//! [`Delivery`] items to acknowledge.
//!
//! It is a durable subscription whose consumer pulls (`Consumer::Pull`):
//! the subscription's own thread reads applied events from the log in
//! `seq` order and offers each to the stream, one at a time, then waits for
//! its verdict. It never runs inside `publish`, so a stream that is not
//! polled holds up no publisher (G6), and it follows the rules of
//! `subscribe_durable` (G5): at least once, in `seq` order, retried with
//! backoff (or the delay given to [`Delivery::nack`]) and dead-lettered
//! after `max_deliveries`.
//!
//! Invariants:
//! - At most one delivery is unanswered at a time (`JetStream`'s
//!   `max_ack_pending = 1`), so acknowledgements are in order and the
//!   stored position is the last ack.
//! - A delivery dropped without an answer counts as a nack (redelivered
//!   after the backoff); one left unanswered when the stream closes is not
//!   counted as an attempt, and comes first when the cursor resumes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use tokio::sync::mpsc;

use crate::durable::{DurableSubscription, Pull, Verdict};
use crate::error::{ReadError, StreamError};
use crate::event::Event;
use crate::sync::{
    AsyncReceiver, AsyncSender, Mutex, Nudger, OneshotSender, Waited, async_oneshot, oneshot,
};

/// Items a stream holds: the one delivery in flight and a few read errors.
const CHANNEL: usize = 4;
/// How often a waiting delivery looks whether the stream closed (a close
/// normally wakes it at once).
const RECHECK: Duration = Duration::from_millis(200);

/// One event of a [`DurableStream`], to [`ack`](Delivery::ack) or
/// [`nack`](Delivery::nack). The next event comes once this one is
/// answered. Dropping it unanswered is a nack without a delay.
pub struct Delivery {
    seq: u64,
    attempt: u32,
    event: Event,
    answer: Option<OneshotSender<Answer>>,
}

enum Answer {
    Ack(AsyncSender<()>),
    Nack(Duration),
    Dropped,
}

impl Delivery {
    /// The event's `seq`.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Which delivery of this event this is, from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The event.
    pub fn event(&self) -> &Event {
        &self.event
    }

    /// Acknowledges the event: the cursor moves past it. The future
    /// resolves once the subscription has recorded the new position; it is
    /// stored durably within the acknowledgement window (`ack_flush_interval`
    /// or `ack_flush_events`, and on a clean close), so after a crash the
    /// events acknowledged in that window may come again (at least once).
    pub fn ack(mut self) -> AckFuture {
        let (tx, rx) = async_oneshot();
        if let Some(answer) = self.answer.take() {
            answer.send(Answer::Ack(tx));
        }
        AckFuture(rx)
    }

    /// Declines the event for now: it is delivered again after `delay`,
    /// before any later event, and dead-lettered once `max_deliveries`
    /// deliveries have failed (as `JetStream`'s NAK with a delay).
    pub fn nack(mut self, delay: Duration) {
        if let Some(answer) = self.answer.take() {
            answer.send(Answer::Nack(delay));
        }
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if let Some(answer) = self.answer.take() {
            answer.send(Answer::Dropped);
        }
    }
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("seq", &self.seq)
            .field("attempt", &self.attempt)
            .field("event", &self.event)
            .finish_non_exhaustive()
    }
}

/// The acknowledgement of a [`Delivery`]: `Ok` once recorded.
#[must_use = "the ack is recorded when the future resolves"]
pub struct AckFuture(AsyncReceiver<()>);

impl Future for AckFuture {
    type Output = Result<(), AckError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.get_mut()
            .0
            .poll_take(cx)
            .map(|got| got.ok_or(AckError::Closed))
    }
}

impl std::fmt::Debug for AckFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AckFuture")
    }
}

/// An acknowledgement that was not recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AckError {
    /// The stream (or the bus) closed before the subscription took the
    /// ack: the event will be delivered again when the cursor resumes.
    Closed,
}

impl std::fmt::Display for AckError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the stream closed before the acknowledgement was recorded; the event will be delivered again")
    }
}

impl std::error::Error for AckError {}

/// The subscription's side: offers events to the stream and waits for the
/// answers.
struct Bridge {
    tx: Mutex<Option<mpsc::Sender<Result<Delivery, StreamError>>>>,
    /// Set when the stream is dropped.
    closed: AtomicBool,
    /// Wakes the delivery waiting for its answer (set while one waits).
    waiting: Mutex<Option<Nudger>>,
    /// The ack to complete once its position is recorded.
    ack: Mutex<Option<(u64, AsyncSender<()>)>>,
}

impl Bridge {
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        if let Some(n) = self.waiting.lock().take() {
            n.nudge();
        }
    }
}

impl Pull for Bridge {
    fn deliver(&self, seq: u64, event: &Event, attempt: u32) -> Verdict {
        let (answer, mut rx) = oneshot::<Answer>();
        {
            let mut waiting = self.waiting.lock();
            if self.closed.load(Ordering::Acquire) {
                return Verdict::Closed;
            }
            *waiting = Some(rx.nudger());
        }
        let mut item = Ok(Delivery {
            seq,
            attempt,
            event: event.clone(),
            answer: Some(answer),
        });
        loop {
            let Some(tx) = self.tx.lock().clone() else {
                return Verdict::Closed;
            };
            match tx.try_send(item) {
                Ok(()) => break,
                Err(mpsc::error::TrySendError::Closed(_)) => return Verdict::Closed,
                // Read errors fill it; the consumer takes them first.
                Err(mpsc::error::TrySendError::Full(back)) => {
                    item = back;
                    if self.closed.load(Ordering::Acquire) {
                        return Verdict::Closed;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        let verdict = loop {
            match rx.wait_for(RECHECK) {
                Waited::Done(Some(Answer::Ack(done))) => {
                    *self.ack.lock() = Some((seq, done));
                    break Verdict::Ack;
                }
                Waited::Done(Some(Answer::Nack(delay))) => {
                    break Verdict::Nack {
                        error: "declined by the stream's consumer (nack)".into(),
                        retry_after: Some(delay),
                    };
                }
                Waited::Done(Some(Answer::Dropped) | None) => {
                    if self.closed.load(Ordering::Acquire) {
                        break Verdict::Closed;
                    }
                    break Verdict::Nack {
                        error: "the delivery was dropped without an ack or a nack".into(),
                        retry_after: None,
                    };
                }
                Waited::Woken => {
                    if self.closed.load(Ordering::Acquire) {
                        break Verdict::Closed;
                    }
                }
            }
        };
        self.waiting.lock().take();
        verdict
    }

    fn recorded(&self, seq: u64) {
        let mut ack = self.ack.lock();
        if ack.as_ref().is_some_and(|(s, _)| *s == seq)
            && let Some((_, done)) = ack.take()
        {
            done.send(());
        }
    }

    fn read_failed(&self, error: &ReadError) {
        if let Some(tx) = self.tx.lock().as_ref() {
            let _ = tx.try_send(Err(StreamError::ReadFailed {
                reason: error.to_string(),
            }));
        }
    }

    fn stop(&self) {
        self.close();
    }

    fn finished(&self) {
        // Ends the stream once its items are taken.
        self.tx.lock().take();
        self.ack.lock().take();
    }
}

/// The running subscription behind a [`DurableStream`], on either backend.
pub(crate) trait Running: Send {
    /// The subscription's name.
    fn name(&self) -> &str;
    /// Every event up to this `seq` is acknowledged (or dead-lettered).
    fn position(&self) -> u64;
}

impl Running for DurableSubscription {
    fn name(&self) -> &str {
        DurableSubscription::name(self)
    }
    fn position(&self) -> u64 {
        DurableSubscription::position(self)
    }
}

/// A `Stream` over a named durable cursor (see
/// [`DurableBus::durable_stream`](crate::DurableBus::durable_stream) and,
/// on a cluster, `JetStreamBus::durable_stream`).
/// Items are `Ok(Delivery)` in `seq` order, or `Err(StreamError)` when
/// reading the log failed (retried on its own). It ends when the bus
/// closes. Dropping it is a clean close: the position of the last ack is
/// stored, durably, before the drop returns (so the drop blocks its thread
/// for one flush of the positions, as dropping a `DurableSubscription`
/// does).
pub struct DurableStream {
    rx: mpsc::Receiver<Result<Delivery, StreamError>>,
    bridge: Arc<Bridge>,
    sub: Option<Box<dyn Running>>,
}

impl DurableStream {
    /// The subscription's name.
    pub fn name(&self) -> &str {
        self.sub.as_ref().map_or("", |s| s.name())
    }

    /// Every event with `seq` up to this one has been acknowledged (or
    /// dead-lettered).
    pub fn position(&self) -> u64 {
        self.sub.as_ref().map_or(0, |s| s.position())
    }
}

impl Drop for DurableStream {
    fn drop(&mut self) {
        self.bridge.close();
        // Stops the subscription's thread and stores its final position.
        drop(self.sub.take());
    }
}

impl Stream for DurableStream {
    type Item = Result<Delivery, StreamError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().rx.poll_recv(cx)
    }
}

impl std::fmt::Debug for DurableStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableStream")
            .field("name", &self.name())
            .field("position", &self.position())
            .finish()
    }
}

/// Opens a durable stream: `subscribe` starts the subscription with the
/// consumer it is given.
pub(crate) fn open<E, S: Running + 'static>(
    subscribe: impl FnOnce(Box<dyn Pull>) -> Result<S, E>,
) -> Result<DurableStream, E> {
    let (tx, rx) = mpsc::channel(CHANNEL);
    let bridge = Arc::new(Bridge {
        tx: Mutex::new(Some(tx)),
        closed: AtomicBool::new(false),
        waiting: Mutex::new(None),
        ack: Mutex::new(None),
    });
    let sub = subscribe(Box::new(bridge.clone()))?;
    Ok(DurableStream {
        rx,
        bridge,
        sub: Some(Box::new(sub)),
    })
}
