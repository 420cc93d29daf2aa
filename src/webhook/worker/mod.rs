//! Sending deliveries: a scheduler thread and a pool of sender threads.
//!
//! The scheduler owns every piece of in-memory delivery state:
//! - it scans the due queue (`webhook_due`) for deliveries due now, skips
//!   those it has in flight and those of a failing webhook (below), and
//!   hands jobs to the senders over a crossbeam channel;
//! - it receives the senders' outcomes and records them in batches, one
//!   write transaction (one fsync) for every outcome waiting: the attempt
//!   log entry, the delivery's new state and due entry, and the webhook's
//!   failure clock or disabling.
//!
//! Claims are in memory only: a delivery in flight stays `pending` in the
//! file with its due entry. After a crash every pending delivery is due
//! again, and one that was in flight is sent again (at least once; receivers
//! de-duplicate on `webhook-id`, the event id).
//!
//! A failing webhook is not hammered (a circuit breaker, as in Svix): after
//! a failed attempt, none of its deliveries is sent until the failed one's
//! retry time; then one delivery at a time probes it, and the others follow
//! after a success. Other webhooks are not affected: jobs go to a shared
//! pool and each attempt is bounded by the total timeout.
//!
//! Retry-After: on a failed answer carrying `Retry-After` (seconds or an
//! HTTP date), the next attempt waits `max(schedule step, min(Retry-After,
//! max_retry_after))`: a server may slow retries down (up to one hour by
//! default) but never speed them up beyond the schedule.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use redb::{ReadableDatabase, ReadableTable};

use super::dispatch::{Dispatcher, dispatcher};
use super::signing::{HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, signature_header};
use super::store::{
    ATTEMPTS, AttemptRec, DELIVERIES, DUE, DeliveryStatus, WEBHOOKS, decode_deli, decode_hook,
    disable_in, load_hook, now_ns, store_hook, write_txn,
};
use super::url_policy::{UrlPolicy, is_forbidden, validate_url};
use crate::durable::{DurableBus, Position, Shared, encode_record};
use crate::error::{DeliveryError, StorageError, UrlError};
use crate::filter::Filter;
use crate::sync::{Condvar, Mutex, PoisonDart};

mod http;
mod scheduler;

#[cfg(test)]
use http::parse_retry_after;
pub(crate) use http::{attempt, http_agent};
use scheduler::*;
/// The JetStream webhook deliveries share the schedule's rules.
#[cfg(feature = "jetstream")]
pub(crate) use scheduler::{humanize, jittered};

/// How much of a response body is kept in the attempt log.
pub const RESPONSE_LOG_BYTES: usize = 1024;

/// How much of a response body is read (and discarded past the first KiB)
/// so that the connection can be reused.
const RESPONSE_DRAIN_BYTES: u64 = 64 * 1024;

/// The `user-agent` of every delivery.
pub const USER_AGENT: &str = concat!("ctrlbus/", env!("CARGO_PKG_VERSION"));

/// The default retry schedule (Svix's): the waits after the 1st, 2nd, …
/// failed attempt; 8 attempts in all.
pub const DEFAULT_RETRY_SCHEDULE: [Duration; 7] = [
    Duration::from_secs(5),
    Duration::from_secs(5 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(2 * 3600),
    Duration::from_secs(5 * 3600),
    Duration::from_secs(10 * 3600),
    Duration::from_secs(10 * 3600),
];

/// Options of a [`DeliveryWorker`].
#[derive(Debug, Clone)]
pub struct DeliveryOptions {
    /// Sender threads (default 4): attempts in flight at once.
    pub workers: usize,
    /// Waits between attempts: after the n-th failed attempt the delivery
    /// waits `retry_schedule[n-1]` (±10 % jitter); after
    /// `retry_schedule.len() + 1` failed attempts it is failed. Default
    /// [`DEFAULT_RETRY_SCHEDULE`].
    pub retry_schedule: Vec<Duration>,
    /// Connect timeout per attempt (default 5 s).
    pub connect_timeout: Duration,
    /// Total timeout per attempt, connect to last response byte (default
    /// 15 s).
    pub timeout: Duration,
    /// Deliver to loopback, private, link-local and reserved addresses
    /// (default false). Checked at every attempt, on the addresses actually
    /// connected to.
    pub allow_private_targets: bool,
    /// A webhook whose attempts have failed, without a success, for this
    /// long is disabled, and that is recorded (default 5 days).
    pub disable_after: Duration,
    /// Upper bound on a `Retry-After` wait (default 1 h).
    pub max_retry_after: Duration,
    /// Jitter on retry waits, as a fraction (default 0.1: ±10 %).
    pub jitter: f64,
    /// Attempts in flight to one webhook at once (default 0: half the
    /// workers, at least 1). A slow endpoint holds at most this many
    /// senders, so other webhooks' first attempts start within one
    /// attempt time (G12).
    pub max_in_flight_per_webhook: usize,
}

impl DeliveryOptions {
    /// Refuses unusable options (both backends' workers check them).
    pub(crate) fn validate(&self) -> Result<(), DeliveryError> {
        if self.workers == 0 {
            return Err(DeliveryError::InvalidOptions(
                "workers must be at least 1".into(),
            ));
        }
        if self.timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(DeliveryError::InvalidOptions(
                "timeouts must be positive".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.jitter) {
            return Err(DeliveryError::InvalidOptions(
                "jitter must be in [0, 1)".into(),
            ));
        }
        Ok(())
    }

    /// The per-webhook cap in force.
    pub(crate) fn per_webhook(&self) -> usize {
        match self.max_in_flight_per_webhook {
            0 => (self.workers / 2).max(1),
            n => n,
        }
    }
}

impl Default for DeliveryOptions {
    fn default() -> Self {
        DeliveryOptions {
            workers: 4,
            retry_schedule: DEFAULT_RETRY_SCHEDULE.to_vec(),
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(15),
            allow_private_targets: false,
            disable_after: Duration::from_secs(5 * 24 * 3600),
            max_retry_after: Duration::from_secs(3600),
            jitter: 0.1,
            max_in_flight_per_webhook: 0,
        }
    }
}

/// One attempt to make.
pub(crate) struct Job {
    pub(crate) delivery: [u8; 16],
    pub(crate) hook: [u8; 16],
    pub(crate) url: String,
    pub(crate) event_id: String,
    pub(crate) body: Arc<Vec<u8>>,
    pub(crate) secrets: Vec<super::signing::Secret>,
}

/// What an attempt gave.
pub(crate) struct Outcome {
    pub(crate) delivery: [u8; 16],
    pub(crate) hook: [u8; 16],
    pub(crate) at_ns: i64,
    pub(crate) duration: Duration,
    pub(crate) status_code: u16,
    pub(crate) success: bool,
    pub(crate) error: String,
    pub(crate) response: String,
    pub(crate) retry_after: Option<Duration>,
    /// Not attempted (shutting down): release the claim.
    pub(crate) released: bool,
}

impl Outcome {
    /// An outcome of `job` with nothing recorded yet: no response, no
    /// success.
    fn blank(job: &Job, at_ns: i64, released: bool) -> Outcome {
        Outcome {
            delivery: job.delivery,
            hook: job.hook,
            at_ns,
            duration: Duration::ZERO,
            status_code: 0,
            success: false,
            error: String::new(),
            response: String::new(),
            retry_after: None,
            released,
        }
    }
}

/// Per-webhook circuit state (in memory).
#[derive(Default)]
struct Circuit {
    failing: bool,
    /// While failing: no attempt before this.
    retry_at: Option<Instant>,
    in_flight: usize,
}

struct Idle {
    /// Passes started.
    started: u64,
    /// The last pass that ended with nothing pending and nothing in flight.
    #[allow(clippy::struct_field_names)] // "idle" twice reads right here
    idle_pass: u64,
    stopped: bool,
}

struct Inner {
    shared: Arc<Shared>,
    dispatcher: Arc<Dispatcher>,
    opts: DeliveryOptions,
    stop: std::sync::atomic::AtomicBool,
    idle: Mutex<Idle>,
    idle_cv: Condvar,
}

/// Delivers pending webhook deliveries of one bus until stopped. At most one
/// runs per bus in a process.
///
/// ```no_run
/// # use ctrlbus::{DurableBus, DeliveryWorker, DeliveryOptions};
/// let bus = DurableBus::open("events.redb")?;
/// let worker = DeliveryWorker::start(bus.clone(), DeliveryOptions::default())?;
/// // … publish …
/// worker.stop();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct DeliveryWorker {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
    bus: DurableBus,
}

impl std::fmt::Debug for DeliveryWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryWorker")
            .field("opts", &self.inner.opts)
            .finish()
    }
}

impl DeliveryWorker {
    /// Starts the scheduler and `opts.workers` sender threads. Every
    /// pending delivery in the log is due at once (claims do not survive a
    /// restart), then new ones as events are committed.
    ///
    /// # Errors
    /// [`DeliveryError::AlreadyRunning`], [`DeliveryError::InvalidOptions`],
    /// [`DeliveryError::Closed`], [`DeliveryError::Io`].
    pub fn start(bus: DurableBus, opts: DeliveryOptions) -> Result<DeliveryWorker, DeliveryError> {
        opts.validate()?;
        let shared = bus.shared().clone();
        if shared.closed.load(Ordering::Acquire) {
            return Err(DeliveryError::Closed);
        }
        let dispatcher = dispatcher(&shared).ok_or(DeliveryError::Closed)?;
        if dispatcher.worker_running.swap(true, Ordering::AcqRel) {
            return Err(DeliveryError::AlreadyRunning);
        }
        let inner = Arc::new(Inner {
            shared,
            dispatcher,
            opts,
            stop: std::sync::atomic::AtomicBool::new(false),
            idle: Mutex::new(Idle {
                started: 0,
                idle_pass: 0,
                stopped: false,
            }),
            idle_cv: Condvar::new(),
        });
        let agent = http_agent(&inner.opts);
        let (job_tx, job_rx) = crossbeam_channel::unbounded::<Job>();
        let (out_tx, out_rx) = crossbeam_channel::unbounded::<Outcome>();
        let mut threads = Vec::new();
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new().name(name).spawn(f)
        };
        let result = (|| -> std::io::Result<()> {
            for i in 0..inner.opts.workers {
                let (rx, tx, agent, inner) =
                    (job_rx.clone(), out_tx.clone(), agent.clone(), inner.clone());
                threads.push(spawn(
                    format!("ctrlbus-webhook-{i}"),
                    Box::new(move || sender_loop(&inner, &agent, &rx, &tx)),
                )?);
            }
            let sched = inner.clone();
            threads.push(spawn(
                "ctrlbus-webhook-scheduler".into(),
                Box::new(move || scheduler_loop(&sched, job_tx, out_rx)),
            )?);
            Ok(())
        })();
        let worker = DeliveryWorker {
            inner,
            threads,
            bus,
        };
        match result {
            Ok(()) => Ok(worker),
            Err(e) => {
                drop(worker);
                Err(DeliveryError::Io(e))
            }
        }
    }

    /// Starts a worker, waits until no delivery is pending (every one
    /// succeeded or failed), then stops it: the CLI's `deliver --until-idle`.
    /// Deliveries waiting for a retry are waited for.
    ///
    /// # Errors
    /// As [`DeliveryWorker::start`].
    pub fn run_until_idle(bus: DurableBus, opts: DeliveryOptions) -> Result<(), DeliveryError> {
        let worker = DeliveryWorker::start(bus, opts)?;
        worker.wait_idle(None);
        worker.stop();
        Ok(())
    }

    /// Waits until every event acknowledged before this call is in the file
    /// and a scheduling pass that started after that found no pending
    /// delivery and none in flight. Returns false on timeout, if the worker
    /// stopped, or if the log can't apply what was acknowledged (poisoned).
    pub fn wait_idle(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        // Events acknowledged before this call must be in the redb file,
        // with their deliveries, before a pass can call itself idle.
        if let Err(e) = self.bus.sync_reads() {
            // Deliveries of the events not applied can't be seen: not idle.
            tracing::error!(error = %e, "waiting for idle: the log can't apply");
            return false;
        }
        let mut idle = self.inner.idle.lock();
        let target = idle.started + 1;
        self.inner.dispatcher.wake();
        while idle.idle_pass < target {
            if idle.stopped {
                return false;
            }
            match deadline {
                Some(d) => {
                    if self.inner.idle_cv.wait_until(&mut idle, d).timed_out() {
                        return idle.idle_pass >= target;
                    }
                }
                None => self.inner.idle_cv.wait(&mut idle),
            }
        }
        true
    }

    /// Stops gracefully: no new attempt starts; attempts in flight finish
    /// (each within the total timeout) and are recorded; jobs not yet
    /// started are released and stay pending in the log for the next
    /// worker.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        self.inner.dispatcher.wake();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.inner
            .dispatcher
            .worker_running
            .store(false, Ordering::Release);
    }
}

impl Drop for DeliveryWorker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn sender_loop(inner: &Inner, agent: &ureq::Agent, jobs: &Receiver<Job>, out: &Sender<Outcome>) {
    while let Ok(job) = jobs.recv() {
        let outcome = if inner.stop.load(Ordering::Acquire) {
            Outcome::blank(&job, 0, true)
        } else {
            attempt(agent, &job)
        };
        if out.send(outcome).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_per_webhook_cap_defaults_to_half_the_workers_and_an_explicit_one_wins() {
        let cap = |workers, explicit| {
            DeliveryOptions {
                workers,
                max_in_flight_per_webhook: explicit,
                ..DeliveryOptions::default()
            }
            .per_webhook()
        };
        assert_eq!(cap(1, 0), 1, "one worker: never zero");
        assert_eq!(cap(2, 0), 1);
        assert_eq!(cap(3, 0), 1);
        assert_eq!(cap(8, 0), 4);
        assert_eq!(cap(8, 8), 8);
        assert_eq!(cap(2, 5), 5, "an explicit cap is taken as given");
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 3 "), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn jitter_stays_in_bounds() {
        for _ in 0..1000 {
            let d = jittered(Duration::from_secs(100), 0.1);
            assert!(
                d >= Duration::from_secs(90) && d <= Duration::from_secs(110),
                "{d:?}"
            );
        }
        assert_eq!(
            jittered(Duration::from_secs(1), 0.0),
            Duration::from_secs(1)
        );
    }
}
