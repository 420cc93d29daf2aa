//! Webhook deliveries on JetStream: dispatch (one delivery record per
//! matching event, crash-safe) and delivery workers that any number of
//! processes run side by side.
//!
//! **Dispatch.** The durable consumer `ctrlbus=dispatch` of the log's
//! stream (one event in flight, as a durable subscription) is shared by
//! every worker process. For each event, the worker that got it creates a
//! delivery for each matching webhook, under an id computed from the
//! webhook and the `seq` (`webhooks::delivery_id`) with a create-if-absent
//! on the deliveries bucket, and publishes its job with that id as
//! `Nats-Msg-Id`; then it acknowledges the event (double ack). A worker
//! that dies midway leaves the event unacked; whoever gets it next finds
//! the deliveries already made and the jobs already sent (de-duplicated),
//! so every matching event has exactly one delivery.
//!
//! **Delivery.** Jobs are messages of the work-queue stream `<stream>_jobs`,
//! read through the shared durable consumer `ctrlbus=deliver`. A job is
//! outstanding to one worker at a time (its ack wait is the attempt's total
//! timeout plus 5 s, set by the first worker that creates the consumer), so each delivery is attempted by one worker at
//! a time. After an attempt the worker records it on the delivery
//! (compare-and-set) and then answers the job: acknowledged when the
//! delivery succeeded or failed for good, or answered with a NAK carrying the retry wait
//! (the schedule's step, jittered, or a longer `Retry-After`), which the
//! server holds the job for. A worker killed mid-attempt leaves its job
//! unanswered: another worker gets it after the ack wait and attempts
//! again (at least once; receivers de-duplicate on `webhook-id`).
//!
//! As on a file: signing, the retry schedule, `Retry-After`, 410 Gone,
//! disabling after `disable_after` of failures, the address policy and the
//! attempt log. The per-webhook cap on attempts in flight holds within each
//! process. Unlike a file's worker there is no circuit breaker across
//! deliveries: each delivery of a failing webhook waits out its own
//! schedule.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};

use super::webhooks::{PROVISIONAL_FOR, StoredHook, Stores, delivery_id, new_delivery};
use super::{JetStreamBus, cluster, entry_of, fetch_one};
use crate::durable::LogEntry;
use crate::error::{DeliveryError, StorageError};
use crate::id::{DeliveryId, WebhookId};
use crate::sync::Mutex;
use crate::webhook::DeliveryOptions;
use crate::webhook::store::{AttemptRec, DeliveryStatus, now_ns};
use crate::webhook::worker::{Job, Outcome, attempt, http_agent, humanize, jittered};

/// The shared consumer that dispatches events to webhooks.
const DISPATCH: &str = "ctrlbus=dispatch";

/// The shared consumer of delivery jobs.
const DELIVER: &str = "ctrlbus=deliver";

impl JetStreamBus {
    /// Creates the dispatch consumer, starting at `start`, unless it
    /// exists (then it keeps its position).
    pub(super) fn ensure_dispatch(&self, start: u64) -> Result<(), StorageError> {
        let inner = &self.inner;
        inner.block_on(self.retrying(|| async { self.dispatch_consumer(start).await.map(drop) }))
    }

    async fn dispatch_consumer(
        &self,
        start: u64,
    ) -> Result<jetstream::consumer::Consumer<pull::Config>, StorageError> {
        let inner = &self.inner;
        let stream = inner.stream().await?;
        stream
            .get_or_create_consumer(
                DISPATCH,
                pull::Config {
                    durable_name: Some(DISPATCH.to_owned()),
                    deliver_policy: DeliverPolicy::ByStartSequence {
                        start_sequence: start.max(1),
                    },
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: inner.opts.ack_wait,
                    max_ack_pending: 1,
                    ..Default::default()
                },
            )
            .await
            .map_err(cluster)
    }
}

/// Delivers the webhook deliveries of a [`JetStreamBus`] until stopped,
/// sharing the work with the workers of every other process on the same
/// log: dispatch creates each matching event's delivery once, and each
/// delivery is attempted by one worker at a time.
///
/// ```no_run
/// # use ctrlbus::{JetStreamBus, JetStreamDeliveryWorker, DeliveryOptions};
/// let bus = JetStreamBus::connect("nats://127.0.0.1:4222")?;
/// let worker = JetStreamDeliveryWorker::start(bus.clone(), DeliveryOptions::default())?;
/// // … publish …
/// worker.stop();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct JetStreamDeliveryWorker {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for JetStreamDeliveryWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamDeliveryWorker")
            .field("opts", &self.shared.opts)
            .finish_non_exhaustive()
    }
}

/// Every webhook, by id.
type Registry = Arc<Vec<(WebhookId, StoredHook)>>;

/// What the worker's threads share.
struct Shared {
    bus: JetStreamBus,
    stores: Stores,
    opts: DeliveryOptions,
    stop: AtomicBool,
    dispatch: jetstream::consumer::Consumer<pull::Config>,
    deliver: jetstream::consumer::Consumer<pull::Config>,
    events: jetstream::stream::Stream,
    /// The webhooks as of the registry bucket's last sequence.
    registry: Mutex<(u64, Registry)>,
    /// Attempts in flight in this process, per webhook.
    in_flight: Mutex<HashMap<[u8; 16], usize>>,
}

impl JetStreamDeliveryWorker {
    /// Starts the dispatcher and `opts.workers` sender threads.
    ///
    /// # Errors
    /// [`DeliveryError::InvalidOptions`], [`DeliveryError::Closed`],
    /// [`DeliveryError::Storage`] when the cluster fails,
    /// [`DeliveryError::Io`] when a thread can't start.
    pub fn start(
        bus: JetStreamBus,
        opts: DeliveryOptions,
    ) -> Result<JetStreamDeliveryWorker, DeliveryError> {
        opts.validate()?;
        if bus.inner.closed.load(Ordering::Acquire) {
            return Err(DeliveryError::Closed);
        }
        let stores = bus.stores().map_err(DeliveryError::Storage)?;
        // Longer than an attempt (bounded by the total timeout) and its
        // recording: a job is outstanding to one worker at a time.
        let ack_wait = opts.timeout + Duration::from_secs(5);
        let start = bus.last_seq().map_err(DeliveryError::Storage)? + 1;
        let (dispatch, deliver, events) = bus
            .inner
            .block_on(bus.retrying(|| async {
                let dispatch = bus.dispatch_consumer(start).await?;
                let deliver = stores
                    .jobs
                    .get_or_create_consumer(
                        DELIVER,
                        pull::Config {
                            durable_name: Some(DELIVER.to_owned()),
                            ack_policy: AckPolicy::Explicit,
                            ack_wait,
                            // Jobs waiting out a retry are outstanding: no
                            // cap, or they would hold back new deliveries.
                            max_ack_pending: -1,
                            ..Default::default()
                        },
                    )
                    .await
                    .map_err(cluster)?;
                let events = bus.inner.stream().await?;
                Ok((dispatch, deliver, events))
            }))
            .map_err(DeliveryError::Storage)?;
        let shared = Arc::new(Shared {
            bus,
            stores,
            opts,
            stop: AtomicBool::new(false),
            dispatch,
            deliver,
            events,
            registry: Mutex::new((u64::MAX, Arc::new(Vec::new()))),
            in_flight: Mutex::new(HashMap::new()),
        });
        let mut worker = JetStreamDeliveryWorker {
            shared: shared.clone(),
            threads: Vec::new(),
        };
        let agent = http_agent(&shared.opts);
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new().name(name).spawn(f)
        };
        let s = shared.clone();
        worker.threads.push(
            spawn(
                "ctrlbus-js-dispatch".into(),
                Box::new(move || dispatch_loop(&s)),
            )
            .map_err(DeliveryError::Io)?,
        );
        for i in 0..shared.opts.workers {
            let (s, agent) = (shared.clone(), agent.clone());
            worker.threads.push(
                spawn(
                    format!("ctrlbus-js-webhook-{i}"),
                    Box::new(move || deliver_loop(&s, &agent)),
                )
                .map_err(DeliveryError::Io)?,
            );
        }
        Ok(worker)
    }

    /// Waits until every event appended before this call is dispatched and
    /// no delivery job is waiting or in flight, in any process (jobs
    /// waiting for a retry are waited for). Returns false on timeout or if
    /// the cluster does not answer.
    pub fn wait_idle(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        let s = &self.shared;
        loop {
            let idle = s.bus.inner.block_on(async {
                let mut dispatch = s.dispatch.clone();
                let mut deliver = s.deliver.clone();
                let d = dispatch.info().await.map_err(cluster)?.clone();
                let j = deliver.info().await.map_err(cluster)?.clone();
                Ok::<_, StorageError>(
                    d.num_pending == 0
                        && d.num_ack_pending == 0
                        && j.num_pending == 0
                        && j.num_ack_pending == 0,
                )
            });
            if idle.unwrap_or(false) {
                return true;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops: no new attempt starts; attempts in flight finish and are
    /// recorded; the rest stay for the other workers (or the next run).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for JetStreamDeliveryWorker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Runs `body` with each message of `consumer` until the worker stops.
fn each_message(
    s: &Shared,
    consumer: &jetstream::consumer::Consumer<pull::Config>,
    what: &str,
    mut body: impl FnMut(jetstream::Message),
) {
    while !s.stop.load(Ordering::Acquire) && !s.bus.inner.closed.load(Ordering::Acquire) {
        match s.bus.inner.block_on(fetch_one(consumer)) {
            Ok(Some(m)) => body(m),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "{what}: fetching failed; retrying");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

/// What became of a dispatch.
enum Dispatched {
    Done,
    /// A webhook of the event's tenant is being created: try again soon.
    Wait,
}

fn dispatch_loop(s: &Shared) {
    each_message(s, &s.dispatch, "dispatch", |msg| {
        let rt = &s.bus.inner;
        let answer = match entry_of(&msg) {
            // Undecodable: nothing to deliver (the reader reports it).
            Err(e) => {
                tracing::error!(error = %e, "dispatch: an undecodable event was skipped");
                Ok(AckKind::Ack)
            }
            Ok(entry) => match rt.block_on(dispatch(s, &entry)) {
                Ok(Dispatched::Done) => Ok(AckKind::Ack),
                Ok(Dispatched::Wait) => Ok(AckKind::Nak(Some(Duration::from_millis(50)))),
                Err(e) => Err(e),
            },
        };
        let answered = rt.block_on(async {
            match answer {
                Ok(AckKind::Ack) => msg.double_ack().await.map_err(cluster),
                Ok(kind) => msg.ack_with(kind).await.map_err(cluster),
                Err(e) => {
                    tracing::warn!(error = %e, "dispatch failed; retrying");
                    msg.ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                        .await
                        .map_err(cluster)
                }
            }
        });
        if let Err(e) = answered {
            // Unanswered: the server redelivers it after the ack wait.
            tracing::warn!(error = %e, "dispatch: answering the server failed");
        }
    });
}

/// The registry as it is now (reloaded when its bucket changed).
async fn registry(s: &Shared) -> Result<Registry, StorageError> {
    let last = s.stores.state(&s.stores.hooks).await?.last_sequence;
    {
        let cached = s.registry.lock();
        if cached.0 == last {
            return Ok(cached.1.clone());
        }
    }
    let hooks = Arc::new(s.stores.sound_hooks().await?);
    *s.registry.lock() = (last, hooks.clone());
    Ok(hooks)
}

async fn dispatch(s: &Shared, entry: &LogEntry) -> Result<Dispatched, StorageError> {
    let hooks = registry(s).await?;
    let event = &entry.event;
    let now = now_ns();
    let provisional_ns = i64::try_from(PROVISIONAL_FOR.as_nanos()).unwrap_or(i64::MAX);
    let mut targets = Vec::new();
    for (id, hook) in hooks.iter() {
        if hook.rec.tenant_id != event.tenant_id {
            continue;
        }
        match hook.from_seq {
            None if now.saturating_sub(hook.rec.created_ns) < provisional_ns => {
                return Ok(Dispatched::Wait);
            }
            Some(from) if entry.seq > from => {}
            _ => continue,
        }
        if !hook.rec.active {
            continue;
        }
        // An unreadable stored pattern matches nothing (never widens).
        let Ok(patterns) = hook.rec.patterns() else {
            continue;
        };
        if patterns.is_empty()
            || patterns
                .iter()
                .any(|p| p.matches(event.event_type.as_str()))
        {
            targets.push(*id);
        }
    }
    let at_ns = entry.appended_at.as_nanosecond();
    let at_ms = u64::try_from(at_ns / 1_000_000).unwrap_or(0);
    let created_ns = i64::try_from(at_ns).unwrap_or(now);
    for hook in targets {
        let id = delivery_id(hook, entry.seq, at_ms);
        let rec = new_delivery(hook, event.id, entry.seq, created_ns);
        s.stores.create_delivery(id, rec).await?;
    }
    Ok(Dispatched::Done)
}

fn deliver_loop(s: &Shared, agent: &ureq::Agent) {
    each_message(s, &s.deliver, "delivery", |msg| {
        let rt = &s.bus.inner;
        let answer = match parse_job(&msg.payload) {
            None => {
                tracing::error!("delivery: an unreadable job was dropped");
                AckKind::Ack
            }
            Some((id, generation)) => match deliver(s, agent, id, generation) {
                Ok(kind) => kind,
                // Its record (or its webhook's) is damaged: it can't be
                // attempted or recorded; retrying would loop forever.
                Err(e @ StorageError::Corrupted { .. }) => {
                    tracing::error!(delivery = %id, error = %e, "delivery: a damaged record; its job is dropped");
                    AckKind::Ack
                }
                Err(e) => {
                    tracing::warn!(delivery = %id, error = %e, "delivery failed; retrying");
                    AckKind::Nak(Some(Duration::from_secs(1)))
                }
            },
        };
        let answered = rt.block_on(async {
            match answer {
                AckKind::Ack => msg.double_ack().await.map_err(cluster),
                kind => msg.ack_with(kind).await.map_err(cluster),
            }
        });
        if let Err(e) = answered {
            tracing::warn!(error = %e, "delivery: answering the server failed");
        }
    });
}

fn parse_job(payload: &[u8]) -> Option<(DeliveryId, u32)> {
    let text = std::str::from_utf8(payload).ok()?;
    let (id, generation) = text.split_once(':')?;
    Some((DeliveryId::parse(id).ok()?, generation.parse().ok()?))
}

/// Fails a pending delivery that can't be attempted.
fn fail(s: &Shared, id: DeliveryId, reason: &str) -> Result<AckKind, StorageError> {
    s.bus.inner.block_on(s.stores.fail_delivery(id, reason))?;
    Ok(AckKind::Ack)
}

/// One job: checks, one attempt, the record, and how to answer the job.
fn deliver(
    s: &Shared,
    agent: &ureq::Agent,
    id: DeliveryId,
    generation: u32,
) -> Result<AckKind, StorageError> {
    let rt = &s.bus.inner;
    let Some((d, _)) = rt.block_on(s.stores.delivery(id))? else {
        return Ok(AckKind::Ack); // gone
    };
    if d.generation != generation || d.rec.status != DeliveryStatus::Pending {
        return Ok(AckKind::Ack); // replaced by a retry, or finished
    }
    let hook_id = WebhookId::from_bytes(d.rec.webhook);
    let hook = match rt.block_on(s.stores.hook(hook_id))? {
        None => return fail(s, id, "webhook deleted"),
        Some((h, _)) if !h.rec.active => {
            let reason = h.rec.disabled_reason.as_deref().unwrap_or("disabled");
            return fail(s, id, &format!("webhook disabled: {reason}"));
        }
        Some((h, _)) => h,
    };
    let now = now_ns();
    if let Some(reason) = hook.rec.unsound(now) {
        return fail(s, id, &reason);
    }
    let secrets = match hook.rec.signing_secrets(now) {
        Ok(secrets) => secrets,
        Err(reason) => return fail(s, id, &reason),
    };
    {
        let mut in_flight = s.in_flight.lock();
        let n = in_flight.entry(d.rec.webhook).or_default();
        if *n >= s.opts.per_webhook() {
            return Ok(AckKind::Nak(Some(Duration::from_millis(100))));
        }
        *n += 1;
    }
    let body = rt.block_on(async {
        s.events
            .direct_get(d.rec.seq)
            .await
            .map(|m| m.payload.to_vec())
            .map_err(cluster)
    });
    let outcome = body.map(|body| {
        let job = Job {
            delivery: id.to_bytes(),
            hook: d.rec.webhook,
            url: hook.rec.url.clone(),
            event_id: crate::id::EventId::from_bytes(d.rec.event).to_string(),
            body: Arc::new(body),
            secrets,
        };
        attempt(agent, &job)
    });
    {
        let mut in_flight = s.in_flight.lock();
        if let Some(n) = in_flight.get_mut(&d.rec.webhook) {
            *n = n.saturating_sub(1);
        }
    }
    record(s, id, generation, hook_id, &outcome?)
}

/// What an attempt leads to.
enum Next {
    Done,
    Retry(Duration),
}

/// Records an attempt on its delivery and its webhook; returns how to
/// answer the job.
fn record(
    s: &Shared,
    id: DeliveryId,
    generation: u32,
    hook: WebhookId,
    o: &Outcome,
) -> Result<AckKind, StorageError> {
    let opts = &s.opts;
    let rt = &s.bus.inner;
    let now = now_ns();
    let recorded = rt.block_on(s.stores.modify_delivery(id, |d| {
        // The attempt is logged even if the delivery failed meanwhile.
        d.rec.attempts += 1;
        d.log.push(AttemptRec {
            at_ns: o.at_ns,
            duration_us: u64::try_from(o.duration.as_micros()).unwrap_or(u64::MAX),
            status_code: o.status_code,
            error: o.error.clone(),
            response: o.response.clone(),
        });
        d.rec.updated_ns = now;
        if o.status_code != 0 {
            d.rec.status_code = o.status_code;
        }
        if d.generation != generation || d.rec.status != DeliveryStatus::Pending {
            return Next::Done;
        }
        if o.success {
            d.rec.status = DeliveryStatus::Succeeded;
            d.rec.next_retry_ns = None;
            d.rec.error.clear();
            return Next::Done;
        }
        d.rec.error.clone_from(&o.error);
        match opts
            .retry_schedule
            .get(d.rec.attempts as usize - 1)
            .copied()
        {
            Some(step) if o.status_code != 410 => {
                let mut wait = jittered(step, opts.jitter);
                if let Some(ra) = o.retry_after {
                    wait = wait.max(ra.min(opts.max_retry_after));
                }
                d.rec.next_retry_ns =
                    Some(now.saturating_add(i64::try_from(wait.as_nanos()).unwrap_or(i64::MAX)));
                Next::Retry(wait)
            }
            _ => {
                d.rec.status = DeliveryStatus::Failed;
                d.rec.next_retry_ns = None;
                Next::Done
            }
        }
    }))?;
    let next = recorded.map_or(Next::Done, |(_, next)| next);
    record_on_hook(s, hook, o, now)?;
    Ok(match next {
        Next::Done => AckKind::Ack,
        Next::Retry(wait) => AckKind::Nak(Some(wait)),
    })
}

/// The webhook's failure clock, 410 Gone, and disabling after
/// `disable_after` without a success.
fn record_on_hook(s: &Shared, hook: WebhookId, o: &Outcome, now: i64) -> Result<(), StorageError> {
    let opts = &s.opts;
    let disable_after = i64::try_from(opts.disable_after.as_nanos()).unwrap_or(i64::MAX);
    let rt = &s.bus.inner;
    // Most attempts change nothing on the webhook: no write then (every
    // write makes each dispatcher reload the registry).
    let Some((current, _)) = rt.block_on(s.stores.hook(hook))? else {
        return Ok(());
    };
    let needed = if o.success {
        current.rec.failing_since_ns.is_some()
    } else {
        current.rec.active
            && (o.status_code == 410
                || current
                    .rec
                    .failing_since_ns
                    .is_none_or(|since| now.saturating_sub(since) >= disable_after))
    };
    if !needed {
        return Ok(());
    }
    let changed = rt
        .block_on(s.stores.modify_hook(hook, |h| {
            if o.success {
                h.rec.failing_since_ns = None;
                return Ok(None);
            }
            if !h.rec.active {
                return Ok(None);
            }
            let reason = if o.status_code == 410 {
                Some("the endpoint answered 410 Gone".to_owned())
            } else {
                let since = *h.rec.failing_since_ns.get_or_insert(o.at_ns);
                (now.saturating_sub(since) >= disable_after).then(|| {
                    format!(
                        "every attempt failed since {} ({} without a success)",
                        crate::time::ts(since),
                        humanize(opts.disable_after)
                    )
                })
            };
            if let Some(r) = &reason {
                h.rec.active = false;
                h.rec.disabled_reason = Some(r.clone());
                h.rec.updated_ns = now;
            }
            Ok(reason)
        }))
        .map_err(|e| match e {
            crate::error::WebhookError::Storage(s) => s,
            other => cluster(other),
        })?;
    if let Some((_, Some(reason))) = changed {
        crate::telemetry::webhook_disabled();
        rt.block_on(
            s.stores
                .fail_pending(hook, &format!("webhook disabled: {reason}")),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_parse_back_and_foreign_ones_do_not() {
        let id = DeliveryId::new();
        assert_eq!(parse_job(format!("{id}:3").as_bytes()), Some((id, 3)));
        assert_eq!(parse_job(b"deli_nope:1"), None);
        assert_eq!(parse_job(format!("{id}").as_bytes()), None);
        assert_eq!(parse_job(format!("{id}:x").as_bytes()), None);
        assert_eq!(parse_job(&[0xff, 0xfe]), None);
    }
}
