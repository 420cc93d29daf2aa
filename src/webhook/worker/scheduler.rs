//! The scheduler thread: claims due deliveries (fairly, per webhook, past
//! the circuit breaker), hands them to the senders, and records outcomes in
//! batches.

use super::*;
use crate::webhook::store::{Next, transition};

pub(crate) fn jittered(d: Duration, jitter: f64) -> Duration {
    if jitter <= 0.0 {
        return d;
    }
    let r = getrandom::u64().unwrap_or(0) as f64 / u64::MAX as f64; // [0, 1]
    d.mul_f64(1.0 - jitter + 2.0 * jitter * r)
}

/// A reader's error as a storage error (the scan is retried).
pub(super) fn read_error(e: crate::error::ReadError) -> StorageError {
    match e {
        crate::error::ReadError::Storage(s) => s,
        other => StorageError::Corrupted {
            table: "events",
            key: String::new(),
            reason: other.to_string(),
        },
    }
}

pub(super) fn storage_err(e: impl Into<StorageError>) -> StorageError {
    e.into()
}

/// Records a batch of outcomes in one transaction and releases their claims.
/// A failed record leaves the deliveries pending (they are retried).
pub(super) fn settle(
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
pub(super) fn scheduler_loop(inner: &Inner, jobs: Sender<Job>, outcomes: Receiver<Outcome>) {
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
pub(super) fn claim(
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
    // One due entry per pending delivery (`deliveries::transition`).
    crate::telemetry::webhook_pending(redb::ReadableTableMetadata::len(&due)?);
    let deliveries = txn.open_table(DELIVERIES)?;
    let hooks = txn.open_table(WEBHOOKS)?;
    let now = now_ns();
    let now_i = Instant::now();
    let per_webhook = inner.opts.per_webhook();
    // Each webhook is read, judged and its secrets parsed once per pass,
    // not once per due delivery.
    let mut hook_cache: HashMap<[u8; 16], Option<ClaimHook>> = HashMap::new();
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
                    Some(v) => Some(ClaimHook::new(decode_hook(v.value(), &rec.webhook)?, now)),
                    None => None,
                };
                e.insert(h)
            }
        };
        let Some(hook) = hook else {
            orphans.push((id, "webhook deleted".into()));
            continue;
        };
        if !hook.rec.active {
            orphans.push((id, "webhook disabled".into()));
            continue;
        }
        let secrets = match &hook.usable {
            Ok(secrets) => secrets.clone(),
            Err(reason) => {
                orphans.push((id, format!("not sent: the webhook {reason}")));
                continue;
            }
        };
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
        let job = Job {
            delivery: id,
            hook: rec.webhook,
            url: hook.rec.url.clone(),
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
                transition(
                    &mut deliveries,
                    &mut due,
                    id,
                    &mut rec,
                    Next::Failed(reason),
                    now,
                )?;
            }
        }
        txn.commit()?;
    }
    Ok(())
}

/// A webhook as one claiming pass needs it: its record, and its signing
/// secrets or why it can't be delivered to (`HookRec::unsound`).
pub(super) struct ClaimHook {
    rec: crate::webhook::store::HookRec,
    usable: Result<Vec<crate::webhook::signing::Secret>, String>,
}

impl ClaimHook {
    fn new(rec: crate::webhook::store::HookRec, now: i64) -> ClaimHook {
        let usable = match rec.unsound(now) {
            Some(reason) => Err(reason),
            None => rec.signing_secrets(now),
        };
        ClaimHook { rec, usable }
    }
}

/// Records outcomes in one transaction and updates the circuits.
pub(super) fn record(
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
    let mut disabled = 0;
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
        {
            let mut deliveries = txn.open_table(DELIVERIES)?;
            let mut due = txn.open_table(DUE)?;
            let next = if !was_pending {
                // Failed meanwhile: only the attempt count changes.
                None
            } else if o.success {
                circuit_updates.push((o.hook, true, Duration::ZERO));
                Some(Next::Succeeded)
            } else {
                rec.error.clone_from(&o.error);
                match opts.retry_schedule.get(n as usize - 1).copied() {
                    Some(step) if o.status_code != 410 => {
                        let mut wait = jittered(step, opts.jitter);
                        if let Some(ra) = o.retry_after {
                            wait = wait.max(ra.min(opts.max_retry_after));
                        }
                        circuit_updates.push((o.hook, false, wait));
                        Some(Next::Due(now.saturating_add(
                            i64::try_from(wait.as_nanos()).unwrap_or(i64::MAX),
                        )))
                    }
                    _ => {
                        let last = opts
                            .retry_schedule
                            .last()
                            .copied()
                            .unwrap_or(Duration::from_secs(5));
                        circuit_updates.push((o.hook, false, last));
                        Some(Next::Failed(&o.error))
                    }
                }
            };
            match next {
                Some(next) => {
                    transition(&mut deliveries, &mut due, &o.delivery, &mut rec, next, now)?;
                }
                None => {
                    deliveries.insert(o.delivery, encode_record(&rec).as_slice())?;
                }
            }
        }
        // The webhook: failure clock, 410, disabling.
        if let Some(h) = hook.as_mut() {
            if o.success {
                if h.failing_since_ns.take().is_some() {
                    store_hook(&txn, &o.hook, h)?;
                }
            } else if h.active {
                if o.status_code == 410 {
                    disable_in(&txn, &o.hook, h, "the endpoint answered 410 Gone", now)?;
                    disabled += 1;
                } else {
                    let since = *h.failing_since_ns.get_or_insert(o.at_ns);
                    if now.saturating_sub(since) >= disable_after {
                        let reason = format!(
                            "every attempt failed since {} ({} without a success)",
                            crate::webhook::store::ts(since),
                            humanize(opts.disable_after)
                        );
                        disable_in(&txn, &o.hook, h, &reason, now)?;
                        disabled += 1;
                    } else {
                        store_hook(&txn, &o.hook, h)?;
                    }
                }
            }
        }
    }
    let pending = redb::ReadableTableMetadata::len(&txn.open_table(DUE)?)?;
    txn.commit()?;
    crate::telemetry::webhook_pending(pending);
    for _ in 0..disabled {
        crate::telemetry::webhook_disabled();
    }
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

pub(crate) fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 86400 && s.is_multiple_of(86400) {
        format!("{}d", s / 86400)
    } else if s >= 3600 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s >= 60 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{d:?}")
    }
}
