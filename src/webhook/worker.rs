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
    /// The per-webhook cap in force.
    fn per_webhook(&self) -> usize {
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

/// An HTTP agent configured as delivery attempts use it: keep-alive, no
/// redirects followed (a 3xx is a failed attempt), HTTP statuses returned
/// as responses, the given timeouts, the ctrlbus user agent, and a resolver
/// that refuses forbidden addresses unless private targets are allowed (so
/// the check applies to the very addresses connected to).
///
/// No proxy is ever used: ureq would otherwise read `HTTP_PROXY`,
/// `HTTPS_PROXY` and `ALL_PROXY` from the environment and send every
/// delivery to the proxy, so that the address policy would judge only the
/// proxy's address while the proxy connects anywhere.
pub(crate) fn http_agent(opts: &DeliveryOptions) -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .proxy(None)
        .timeout_connect(Some(opts.connect_timeout))
        .timeout_global(Some(opts.timeout))
        .max_redirects(0)
        .max_redirects_will_error(false)
        .http_status_as_error(false)
        .user_agent(USER_AGENT)
        .build();
    ureq::Agent::with_parts(
        config,
        ureq::unversioned::transport::DefaultConnector::new(),
        PolicyResolver {
            policy: UrlPolicy {
                allow_private: opts.allow_private_targets,
            },
            inner: ureq::unversioned::resolver::DefaultResolver::default(),
        },
    )
}

/// Resolves with the default resolver, then applies the URL policy.
#[derive(Debug)]
struct PolicyResolver {
    policy: UrlPolicy,
    inner: ureq::unversioned::resolver::DefaultResolver,
}

impl ureq::unversioned::resolver::Resolver for PolicyResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        let addrs = self.inner.resolve(uri, config, timeout)?;
        if !self.policy.allow_private {
            let found: Vec<SocketAddr> = addrs.iter().copied().collect();
            if let Some(bad) = found.iter().find(|a| is_forbidden(a.ip())) {
                return Err(ureq::Error::Other(Box::new(UrlError::ForbiddenAddress {
                    host: uri.host().unwrap_or_default().to_owned(),
                    addr: bad.ip(),
                })));
            }
        }
        Ok(addrs)
    }
}

/// One attempt to make.
struct Job {
    delivery: [u8; 16],
    hook: [u8; 16],
    url: String,
    event_id: String,
    body: Arc<Vec<u8>>,
    secrets: Vec<super::signing::Secret>,
}

/// What an attempt gave.
struct Outcome {
    delivery: [u8; 16],
    hook: [u8; 16],
    at_ns: i64,
    duration: Duration,
    status_code: u16,
    success: bool,
    error: String,
    response: String,
    retry_after: Option<Duration>,
    /// Not attempted (shutting down): release the claim.
    released: bool,
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
        if opts.workers == 0 {
            return Err(DeliveryError::InvalidOptions(
                "workers must be at least 1".into(),
            ));
        }
        if opts.timeout.is_zero() || opts.connect_timeout.is_zero() {
            return Err(DeliveryError::InvalidOptions(
                "timeouts must be positive".into(),
            ));
        }
        if !(0.0..1.0).contains(&opts.jitter) {
            return Err(DeliveryError::InvalidOptions(
                "jitter must be in [0, 1)".into(),
            ));
        }
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

/// Makes one HTTP attempt.
fn attempt(agent: &ureq::Agent, job: &Job) -> Outcome {
    let at_ns = now_ns();
    let started = Instant::now();
    let mut out = Outcome::blank(job, at_ns, false);
    // The URL was validated at registration; check again (cheap), the
    // address policy is applied by the agent's resolver.
    if let Err(e) = validate_url(&job.url) {
        out.error = e.to_string();
        return out;
    }
    let timestamp = at_ns.div_euclid(1_000_000_000);
    let secrets: Vec<&super::signing::Secret> = job.secrets.iter().collect();
    let signature = signature_header(&secrets, &job.event_id, timestamp, &job.body);
    let result = agent
        .post(&job.url)
        .header(HEADER_ID, &job.event_id)
        .header(HEADER_TIMESTAMP, &timestamp.to_string())
        .header(HEADER_SIGNATURE, &signature)
        .header("content-type", "application/json")
        .send(job.body.as_slice());
    match result {
        Ok(mut resp) => {
            let status = resp.status().as_u16();
            out.status_code = status;
            out.success = (200..300).contains(&status);
            out.retry_after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            let mut kept = Vec::with_capacity(256);
            let mut reader = resp.body_mut().as_reader().take(RESPONSE_DRAIN_BYTES);
            let mut buf = [0u8; 4096];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let room = RESPONSE_LOG_BYTES.saturating_sub(kept.len());
                        kept.extend_from_slice(&buf[..n.min(room)]);
                    }
                    Err(_) => break,
                }
            }
            out.response = String::from_utf8_lossy(&kept).into_owned();
            if !out.success {
                out.error = format!("HTTP {status}");
            }
        }
        Err(e) => {
            out.error = match e {
                ureq::Error::Other(inner) => inner.to_string(),
                other => other.to_string(),
            };
        }
    }
    out.duration = started.elapsed();
    out
}

/// `Retry-After`: delay-seconds or an HTTP date.
fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = jiff::fmt::rfc2822::parse(v).ok()?.timestamp();
    let d = when.duration_since(jiff::Timestamp::now());
    Some(Duration::try_from(d).unwrap_or(Duration::ZERO))
}

fn jittered(d: Duration, jitter: f64) -> Duration {
    if jitter <= 0.0 {
        return d;
    }
    let r = getrandom::u64().unwrap_or(0) as f64 / u64::MAX as f64; // [0, 1]
    d.mul_f64(1.0 - jitter + 2.0 * jitter * r)
}

/// A reader's error as a storage error (the scan is retried).
fn read_error(e: crate::error::ReadError) -> StorageError {
    match e {
        crate::error::ReadError::Storage(s) => s,
        other => StorageError::Corrupted {
            table: "events",
            key: String::new(),
            reason: other.to_string(),
        },
    }
}

fn storage_err(e: impl Into<StorageError>) -> StorageError {
    e.into()
}

/// Records a batch of outcomes in one transaction and releases their claims.
/// A failed record leaves the deliveries pending (they are retried).
fn settle(
    inner: &Inner,
    batch: &[Outcome],
    in_flight: &mut HashSet<[u8; 16]>,
    circuits: &mut HashMap<[u8; 16], Circuit>,
) {
    if batch.is_empty() {
        return;
    }
    if let Err(e) = record(inner, batch, circuits) {
        tracing::error!(error = %e, "recording webhook attempts failed; the deliveries stay pending");
    }
    for o in batch {
        in_flight.remove(&o.delivery);
        if let Some(c) = circuits.get_mut(&o.hook) {
            c.in_flight = c.in_flight.saturating_sub(1);
        }
    }
}

/// The scheduler: claim due deliveries, hand them out, record outcomes.
fn scheduler_loop(inner: &Inner, jobs: Sender<Job>, outcomes: Receiver<Outcome>) {
    // A panic here stops this worker (not the bus): `wait_idle` returns
    // false instead of waiting for a scheduler that is gone.
    let _dart = PoisonDart::new(&inner.stop, "ctrlbus-webhook-scheduler").on_panic(|| {
        inner.idle.lock().stopped = true;
        inner.idle_cv.notify_all();
    });
    let mut in_flight: HashSet<[u8; 16]> = HashSet::new();
    let mut circuits: HashMap<[u8; 16], Circuit> = HashMap::new();
    // Jobs queued ahead of the senders, so that outcomes arrive while the
    // previous batch commits and are recorded together.
    let max_in_flight = (inner.opts.workers * 8).max(16);
    loop {
        let stopping = inner.stop.load(Ordering::Acquire);
        let pass = {
            let mut idle = inner.idle.lock();
            idle.started += 1;
            idle.started
        };
        // 1. Record every outcome waiting, in one transaction.
        let batch: Vec<Outcome> = outcomes.try_iter().collect();
        settle(inner, &batch, &mut in_flight, &mut circuits);
        if stopping {
            if in_flight.is_empty() {
                break;
            }
            // Wait for the senders to finish or release what they hold.
            if let Ok(o) = outcomes.recv_timeout(Duration::from_millis(50)) {
                settle(inner, &[o], &mut in_flight, &mut circuits);
            }
            continue;
        }
        // 2. Claim due deliveries.
        let mut next_wake = Instant::now() + Duration::from_secs(1);
        let mut pending_left = false;
        match claim(
            inner,
            &mut in_flight,
            &mut circuits,
            max_in_flight,
            &jobs,
            &mut next_wake,
            &mut pending_left,
        ) {
            Ok(()) => {}
            Err(e) => tracing::error!(error = %e, "scanning webhook deliveries failed"),
        }
        if !pending_left && in_flight.is_empty() && outcomes.is_empty() {
            let mut idle = inner.idle.lock();
            idle.idle_pass = pass;
            inner.idle_cv.notify_all();
        }
        // 3. Sleep until something happens.
        let wait = next_wake.saturating_duration_since(Instant::now());
        crossbeam_channel::select! {
            recv(outcomes) -> o => {
                if let Ok(o) = o {
                    // Record it with every other outcome already waiting:
                    // one transaction (one fsync) for the lot.
                    let mut batch = vec![o];
                    batch.extend(outcomes.try_iter());
                    settle(inner, &batch, &mut in_flight, &mut circuits);
                }
            }
            recv(inner.dispatcher.wake_rx) -> _ => {}
            default(wait) => {}
        }
    }
    drop(jobs);
    let mut idle = inner.idle.lock();
    idle.stopped = true;
    inner.idle_cv.notify_all();
}

/// Scans the due queue and sends jobs. Sets `pending_left` when any
/// delivery is pending (due later, waiting, or just claimed) and lowers
/// `next_wake` to the earliest time something becomes due.
fn claim(
    inner: &Inner,
    in_flight: &mut HashSet<[u8; 16]>,
    circuits: &mut HashMap<[u8; 16], Circuit>,
    max_in_flight: usize,
    jobs: &Sender<Job>,
    next_wake: &mut Instant,
    pending_left: &mut bool,
) -> Result<(), StorageError> {
    let db = &inner.shared.db;
    let txn = db.begin_read()?;
    let due = txn.open_table(DUE)?;
    let deliveries = txn.open_table(DELIVERIES)?;
    let hooks = txn.open_table(WEBHOOKS)?;
    let now = now_ns();
    let now_i = Instant::now();
    let per_webhook = inner.opts.per_webhook();
    let mut hook_cache: HashMap<[u8; 16], Option<super::store::HookRec>> = HashMap::new();
    let mut orphans: Vec<([u8; 16], String)> = Vec::new();
    for row in due.iter()? {
        let (k, _) = row?;
        let (at, id) = k.value();
        *pending_left = true;
        if at > now {
            let later = now_i + Duration::from_nanos(u64::try_from(at - now).unwrap_or(0));
            *next_wake = (*next_wake).min(later);
            break;
        }
        if in_flight.len() >= max_in_flight {
            break;
        }
        if in_flight.contains(&id) {
            continue;
        }
        let Some(v) = deliveries.get(id)? else {
            continue;
        };
        let rec = decode_deli(v.value(), &id)?;
        if rec.status != DeliveryStatus::Pending {
            continue;
        }
        let hook = match hook_cache.entry(rec.webhook) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let h = match hooks.get(rec.webhook)? {
                    Some(v) => Some(decode_hook(v.value(), &rec.webhook)?),
                    None => None,
                };
                e.insert(h)
            }
        };
        let Some(hook) = hook else {
            orphans.push((id, "webhook deleted".into()));
            continue;
        };
        if !hook.active {
            orphans.push((id, "webhook disabled".into()));
            continue;
        }
        if let Some(reason) = hook.unsound(now) {
            orphans.push((id, format!("not sent: the webhook {reason}")));
            continue;
        }
        let circuit = circuits.entry(rec.webhook).or_default();
        // Fairness (G12): a webhook never holds more than its share of the
        // senders, so a slow endpoint delays only its own deliveries.
        if circuit.in_flight >= per_webhook {
            continue;
        }
        if circuit.failing {
            if circuit.in_flight > 0 {
                continue;
            }
            if let Some(t) = circuit.retry_at
                && t > now_i
            {
                *next_wake = (*next_wake).min(t);
                continue;
            }
        }
        // The body: the event exactly as logged.
        let entry = match crate::durable::LogReader::new(db, Position::Seq(rec.seq), &Filter::all())
            .map(|mut r| r.next())
        {
            // Storage failing now may pass: try again on a later pass.
            Err(e) => return Err(read_error(e)),
            Ok(Some(Err(crate::error::ReadError::Storage(e))))
                if !matches!(e, StorageError::Corrupted { .. }) =>
            {
                return Err(e);
            }
            // A record that can't be decoded never will be: fail it (G11).
            Ok(Some(Err(e))) => {
                orphans.push((
                    id,
                    format!("the event at seq {} can't be read: {e}", rec.seq),
                ));
                continue;
            }
            Ok(Some(Ok(entry)))
                if entry.seq == rec.seq && entry.event.id.to_bytes() == rec.event =>
            {
                entry
            }
            Ok(Some(Ok(entry))) if entry.seq == rec.seq => {
                orphans.push((
                    id,
                    format!(
                        "the event at seq {} is not the one delivered (another id)",
                        rec.seq
                    ),
                ));
                continue;
            }
            // Nothing at that seq: retention removed it.
            Ok(_) => {
                orphans.push((id, "the event is no longer in the log (retention)".into()));
                continue;
            }
        };
        let Ok(secrets) = hook.signing_secrets(now) else {
            continue; // unreachable: `unsound` above checked them
        };
        let job = Job {
            delivery: id,
            hook: rec.webhook,
            url: hook.url.clone(),
            event_id: entry.event.id.to_string(),
            body: Arc::new(entry.event.to_json().into_bytes()),
            secrets,
        };
        in_flight.insert(id);
        circuit.in_flight += 1;
        if jobs.send(job).is_err() {
            in_flight.remove(&id);
            break;
        }
    }
    drop((due, deliveries, hooks, txn));
    if !orphans.is_empty() {
        let txn = write_txn(&inner.shared)?;
        {
            let mut deliveries = txn.open_table(DELIVERIES).map_err(storage_err)?;
            let mut due = txn.open_table(DUE).map_err(storage_err)?;
            for (id, reason) in &orphans {
                let Some(v) = deliveries.get(id)? else {
                    continue;
                };
                let mut rec = decode_deli(v.value(), id)?;
                drop(v);
                if rec.status != DeliveryStatus::Pending {
                    continue;
                }
                if let Some(at) = rec.next_retry_ns.take() {
                    due.remove((at, *id))?;
                }
                rec.status = DeliveryStatus::Failed;
                rec.error = reason.clone();
                rec.updated_ns = now;
                deliveries.insert(id, encode_record(&rec).as_slice())?;
            }
        }
        txn.commit()?;
    }
    Ok(())
}

/// Records outcomes in one transaction and updates the circuits.
fn record(
    inner: &Inner,
    batch: &[Outcome],
    circuits: &mut HashMap<[u8; 16], Circuit>,
) -> Result<(), StorageError> {
    if batch.iter().all(|o| o.released) {
        return Ok(());
    }
    let opts = &inner.opts;
    let now = now_ns();
    let disable_after = i64::try_from(opts.disable_after.as_nanos()).unwrap_or(i64::MAX);
    let txn = write_txn(&inner.shared)?;
    // Circuit changes, applied only after the commit.
    let mut circuit_updates: Vec<([u8; 16], bool, Duration)> = Vec::new();
    for o in batch.iter().filter(|o| !o.released) {
        let mut rec = {
            let deliveries = txn.open_table(DELIVERIES)?;
            let Some(v) = deliveries.get(o.delivery)? else {
                continue;
            };
            decode_deli(v.value(), &o.delivery)?
        };
        // A delivery failed meanwhile (webhook deleted or disabled) still
        // gets the attempt logged.
        rec.attempts += 1;
        let n = rec.attempts;
        txn.open_table(ATTEMPTS)?.insert(
            (o.delivery, n),
            encode_record(&AttemptRec {
                at_ns: o.at_ns,
                duration_us: u64::try_from(o.duration.as_micros()).unwrap_or(u64::MAX),
                status_code: o.status_code,
                error: o.error.clone(),
                response: o.response.clone(),
            })
            .as_slice(),
        )?;
        let was_pending = rec.status == DeliveryStatus::Pending;
        rec.updated_ns = now;
        if o.status_code != 0 {
            rec.status_code = o.status_code;
        }
        let mut hook = load_hook(&txn, &o.hook)?;
        if was_pending {
            if let Some(at) = rec.next_retry_ns.take() {
                txn.open_table(DUE)?.remove((at, o.delivery))?;
            }
            if o.success {
                rec.status = DeliveryStatus::Succeeded;
                rec.error = String::new();
                circuit_updates.push((o.hook, true, Duration::ZERO));
            } else {
                rec.error = o.error.clone();
                let step = opts.retry_schedule.get(n as usize - 1).copied();
                match step {
                    Some(step) if o.status_code != 410 => {
                        let mut wait = jittered(step, opts.jitter);
                        if let Some(ra) = o.retry_after {
                            wait = wait.max(ra.min(opts.max_retry_after));
                        }
                        let at =
                            now.saturating_add(i64::try_from(wait.as_nanos()).unwrap_or(i64::MAX));
                        rec.next_retry_ns = Some(at);
                        txn.open_table(DUE)?.insert((at, o.delivery), ())?;
                        circuit_updates.push((o.hook, false, wait));
                    }
                    _ => {
                        rec.status = DeliveryStatus::Failed;
                        let last = opts
                            .retry_schedule
                            .last()
                            .copied()
                            .unwrap_or(Duration::from_secs(5));
                        circuit_updates.push((o.hook, false, last));
                    }
                }
            }
        }
        txn.open_table(DELIVERIES)?
            .insert(o.delivery, encode_record(&rec).as_slice())?;
        // The webhook: failure clock, 410, disabling.
        if let Some(h) = hook.as_mut() {
            if o.success {
                if h.failing_since_ns.take().is_some() {
                    store_hook(&txn, &o.hook, h)?;
                }
            } else if h.active {
                if o.status_code == 410 {
                    disable_in(&txn, &o.hook, h, "the endpoint answered 410 Gone", now)?;
                } else {
                    let since = *h.failing_since_ns.get_or_insert(o.at_ns);
                    if now.saturating_sub(since) >= disable_after {
                        let reason = format!(
                            "every attempt failed since {} ({} without a success)",
                            super::store::ts(since),
                            humanize(opts.disable_after)
                        );
                        disable_in(&txn, &o.hook, h, &reason, now)?;
                    } else {
                        store_hook(&txn, &o.hook, h)?;
                    }
                }
            }
        }
    }
    txn.commit()?;
    let now_i = Instant::now();
    for (hook, ok, wait) in circuit_updates {
        let c = circuits.entry(hook).or_default();
        if ok {
            c.failing = false;
            c.retry_at = None;
        } else {
            c.failing = true;
            c.retry_at = Some(now_i + wait);
        }
    }
    Ok(())
}

fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 86400 && s.is_multiple_of(86400) {
        format!("{}d", s / 86400)
    } else if s >= 3600 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s >= 60 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{:?}", d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
