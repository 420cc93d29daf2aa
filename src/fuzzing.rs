//! Entry points for the fuzz targets in `fuzz/` and for the test that
//! replays their corpora (`tests/fuzz_corpus.rs`). Not part of the API:
//! hidden from the docs and free to change.
//!
//! Each function takes arbitrary bytes, must never panic, and checks the
//! invariants of what it exercises (a round trip, a signature that verifies)
//! with `assert!`, so a fuzzer finds both crashes and wrong answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::durable::{block_encode, block_records, codec_decode_to_event, codec_encode};
use crate::webhook::{Secret, signature_header, verify_at};
use crate::{Bus, DurableBus, Event, Filter, Pattern, Type, parse_duration, parse_time_at};

/// A stored record for `event` (seed corpora).
pub fn encoded_record(event: &Event, append_ns: i64) -> Vec<u8> {
    codec_encode(event, append_ns)
}

/// Record decoding: bytes from the `events` table.
pub fn record(data: &[u8]) {
    if let Ok((append, event)) = codec_decode_to_event(data) {
        let again = codec_encode(&event, append);
        let (a2, e2) = codec_decode_to_event(&again).expect("re-encoded record decodes");
        assert_eq!((a2, &e2), (append, &event));
    }
}

/// Block layout: bytes from the `event_blocks` table. An accepted block
/// gives back at least one record, and its records encode to the same
/// bytes.
pub fn block(data: &[u8]) {
    if let Ok(records) = block_records(data) {
        assert!(!records.is_empty(), "an accepted block holds a record");
        assert_eq!(block_encode(&records), data, "re-encoded block");
    }
}

/// A stored block of `records` (seed corpora).
pub fn encoded_block(records: &[&[u8]]) -> Vec<u8> {
    block_encode(records)
}

/// Event JSON parsing: a webhook body or a `publish --file` line.
pub fn event_json(data: &[u8]) {
    if let Ok(event) = Event::from_json(data) {
        let json = event.to_json();
        let back = Event::from_json(json.as_bytes()).expect("serialized event parses");
        assert_eq!(back, event);
        assert_eq!(back.to_json(), json);
    }
}

/// Filters and type patterns, as JSON (stored cursors) and as text.
pub fn filter(data: &[u8]) {
    let events = [
        Event::new(Type::DEPLOY_FAILED, "t1"),
        Event::new(Type::HEALTH_DEGRADED, ""),
        Event::new(Type::new("a.b.c").expect("valid"), "t2"),
    ];
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(p) = Pattern::new(s) {
            for e in &events {
                let _ = p.matches(e.event_type.as_str());
            }
            assert_eq!(Pattern::new(p.as_str()).as_ref(), Ok(&p));
        }
        if let Ok(t) = Type::new(s) {
            assert!(
                Pattern::new(t.as_str())
                    .expect("a type is a pattern")
                    .matches(t.as_str())
            );
        }
    }
    if let Ok(f) = serde_json::from_slice::<Filter>(data) {
        for e in &events {
            let _ = f.matches(e);
        }
        let json = serde_json::to_string(&f).expect("filter serializes");
        assert_eq!(
            serde_json::from_str::<Filter>(&json).expect("round trip"),
            f
        );
    }
}

/// TIME and DUR arguments of the command line.
pub fn time(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let now = jiff::Timestamp::from_second(1_800_000_000).expect("valid");
    let _ = parse_time_at(s, now);
    let _ = parse_duration(s);
}

/// Webhook signature headers: arbitrary header values and bodies against a
/// fixed secret, and a sign/verify round trip that must pass.
pub fn signature(data: &[u8]) {
    let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("valid secret");
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let (head, body) = data.split_at(split);
    let head = String::from_utf8_lossy(head).into_owned();
    let now = 1_614_265_330;
    let headers = [
        ("webhook-id", "msg_p5jXN8AQM9LWM0D4loKWxJek"),
        ("webhook-timestamp", "1614265330"),
        ("webhook-signature", head.as_str()),
    ];
    let _ = verify_at(
        &secret,
        &headers[..],
        body,
        std::time::Duration::from_secs(300),
        now,
    );
    let sig = signature_header(&[&secret], "msg_x", now, body);
    let ts = now.to_string();
    let good = [
        ("webhook-id", "msg_x"),
        ("webhook-timestamp", ts.as_str()),
        ("webhook-signature", sig.as_str()),
    ];
    assert!(
        verify_at(
            &secret,
            &good[..],
            body,
            std::time::Duration::from_secs(300),
            now
        )
        .is_ok()
    );
    let _ = Secret::parse(&head);
}

/// An in-memory redb backend that fails every read, write or sync after a
/// countdown, as redb's own fuzzer does.
#[derive(Clone)]
struct FailingMemory {
    bytes: Arc<crate::sync::RwLock<Vec<u8>>>,
    countdown: Arc<AtomicU64>,
}

impl std::fmt::Debug for FailingMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FailingMemory")
    }
}

impl FailingMemory {
    fn tick(&self) -> Result<(), std::io::Error> {
        let left = self.countdown.load(Ordering::Acquire);
        if left == 0 {
            return Err(std::io::Error::other("injected I/O failure"));
        }
        self.countdown.store(left - 1, Ordering::Release);
        Ok(())
    }
}

impl redb::StorageBackend for FailingMemory {
    fn len(&self) -> Result<u64, std::io::Error> {
        Ok(self.bytes.read().len() as u64)
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        let b = self.bytes.read();
        let start = usize::try_from(offset).map_err(|_| std::io::Error::other("offset"))?;
        let src = b
            .get(start..start + out.len())
            .ok_or_else(|| std::io::Error::other("read past end"))?;
        out.copy_from_slice(src);
        Ok(())
    }
    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.tick()?;
        self.bytes.write().resize(len as usize, 0);
        Ok(())
    }
    fn sync_data(&self) -> Result<(), std::io::Error> {
        self.tick()
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.tick()?;
        let mut b = self.bytes.write();
        let start = offset as usize;
        if b.len() < start + data.len() {
            return Err(std::io::Error::other("write past end"));
        }
        b[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }
}

/// Publishes events to a log whose storage fails after a countdown taken
/// from the input; then reopens the storage and checks that every
/// acknowledged event is there, in order, and that the log is sound.
pub fn storage(data: &[u8]) {
    let countdown = u64::from(data.first().copied().unwrap_or(0)) * 4
        + u64::from(data.get(1).copied().unwrap_or(0));
    let events = data.len().clamp(1, 64);
    let mem = FailingMemory {
        bytes: Arc::new(crate::sync::RwLock::new(Vec::new())),
        countdown: Arc::new(AtomicU64::new(u64::MAX)),
    };
    let open = |m: &FailingMemory| {
        DurableBus::builder()
            .shared_reads(false)
            .cache_bytes(1 << 20)
            .open_backend(m.clone())
    };
    let Ok(bus) = open(&mem) else { return };
    mem.countdown.store(countdown, Ordering::Release);
    let mut acked = Vec::new();
    for i in 0..events {
        let e = Event::new(
            Type::DEPLOY_STARTED,
            format!("t{}", data.get(i).copied().unwrap_or(0) % 3),
        );
        let batch = data.get(i).is_some_and(|b| b & 0x80 != 0);
        let result = if batch {
            bus.publish_batch(vec![e.clone(), Event::new(Type::HEALTH_PASSED, "t")])
                .map(|r| r.into_iter().map(|r| (r.seq, r.id)).collect::<Vec<_>>())
        } else {
            bus.publish(e).map(|r| vec![(r.seq, r.id)])
        };
        match result {
            Ok(r) => acked.extend(r),
            Err(_) => break,
        }
    }
    drop(bus);
    mem.countdown.store(u64::MAX, Ordering::Release);
    let bus = open(&mem).expect("the storage reopens after failures");
    let log: Vec<(u64, crate::EventId)> = bus
        .read(crate::Position::Beginning, &Filter::all())
        .expect("readable")
        .map(|e| {
            e.map(|e| (e.seq, e.event.id))
                .expect("every record decodes")
        })
        .collect();
    for (i, (seq, _)) in log.iter().enumerate() {
        assert_eq!(*seq, i as u64 + 1, "seqs are contiguous from 1");
    }
    for a in &acked {
        assert!(log.contains(a), "acknowledged event {a:?} survived");
    }
    let report = bus.check(&mut |_, _| {}).expect("check runs");
    assert!(report.is_sound(), "{:?}", report.problems);
    let _ = bus.recent_events(3, &Filter::all());
}
