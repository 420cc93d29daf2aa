//! The on-disk form of log records. Every byte layout of the `events` table
//! lives here, so the encoding (bincode 2 today) can be swapped in one place.
//!
//! A record is:
//!
//! | bytes | content |
//! | --- | --- |
//! | 0 | format version, [`RECORD_VERSION`] |
//! | 1..9 | append time, unix nanoseconds, `i64` big-endian |
//! | 9.. | bincode 2 (standard config, serde) of [`RecordRef`] |
//!
//! The append time sits at a fixed offset so that seeking by time (a binary
//! search over `seq`) reads 8 bytes per probe without decoding the rest. The
//! payload is stored as its compact JSON bytes, since bincode cannot decode a
//! `serde_json::Value`; an empty payload is stored as zero bytes.
//!
//! Records are decoded by bincode and encoded here by hand, into the bytes
//! bincode writes (`put_record`; the tests compare the two on generated
//! records): bincode's serde path writes a `[u8; 16]` one element at a
//! time through the serializer, and encoding was a tenth of a publish's
//! instructions on the publishing thread (callgrind, BENCHMARKS.md).

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::event::{Event, Type};
use crate::id::{EventId, InstanceId};

/// The record format this version writes and reads.
pub(crate) const RECORD_VERSION: u8 = 1;
const HEADER: usize = 9;

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
}

/// A record decoded without copying: strings and the payload borrow from the
/// stored bytes, so filtering costs no allocation.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
pub(crate) struct RecordRef<'a> {
    pub(crate) id: [u8; 16],
    #[serde(borrow)]
    pub(crate) event_type: &'a str,
    #[serde(borrow)]
    pub(crate) tenant_id: &'a str,
    pub(crate) instance_id: Option<[u8; 16]>,
    #[serde(borrow)]
    pub(crate) actor_id: &'a str,
    pub(crate) ts_secs: i64,
    pub(crate) ts_nanos: i32,
    #[serde(borrow)]
    pub(crate) payload: Bytes<'a>,
}

/// Borrowed bytes that serialize as one byte string (not a sequence).
#[derive(Debug, PartialEq)]
pub(crate) struct Bytes<'a>(pub(crate) &'a [u8]);

impl Serialize for Bytes<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Bytes<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Bytes<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("borrowed bytes")
            }
            fn visit_borrowed_bytes<E: serde::de::Error>(
                self,
                v: &'de [u8],
            ) -> Result<Self::Value, E> {
                Ok(Bytes(v))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// Encodes an event with its append time, into `out` (cleared first, and
/// grown at most once, to the record's exact length).
pub(crate) fn encode(event: &Event, append_ns: i64, payload_json: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let record = RecordRef {
        id: event.id.to_bytes(),
        event_type: event.event_type.as_str(),
        tenant_id: &event.tenant_id,
        instance_id: event.instance_id.map(|i| i.to_bytes()),
        actor_id: &event.actor_id,
        ts_secs: event.timestamp.as_second(),
        ts_nanos: event.timestamp.subsec_nanosecond(),
        payload: Bytes(payload_json),
    };
    out.reserve_exact(HEADER + record_len(&record));
    out.push(RECORD_VERSION);
    out.extend_from_slice(&append_ns.to_be_bytes());
    put_record(&record, out);
}

/// The bytes `put_record` writes for `r`.
fn record_len(r: &RecordRef<'_>) -> usize {
    let bytes = |n: usize| varint_len(n as u64) + n;
    16 + bytes(r.event_type.len())
        + bytes(r.tenant_id.len())
        + if r.instance_id.is_some() { 17 } else { 1 }
        + bytes(r.actor_id.len())
        + varint_len(zigzag(r.ts_secs))
        + varint_len(zigzag(i64::from(r.ts_nanos)))
        + bytes(r.payload.0.len())
}

/// The bytes `put_varint` writes for `v`.
fn varint_len(v: u64) -> usize {
    match v {
        0..=250 => 1,
        251..=0xffff => 3,
        0x1_0000..=0xffff_ffff => 5,
        _ => 9,
    }
}

/// Appends `r` as bincode 2 (standard config: little-endian varints)
/// writes it through serde: the fields in order; a `[u8; 16]` as its
/// bytes; a string or byte string as its length then its bytes; an
/// `Option` as 0, or 1 then the value; signed integers zigzagged.
fn put_record(r: &RecordRef<'_>, out: &mut Vec<u8>) {
    out.extend_from_slice(&r.id);
    put_bytes(r.event_type.as_bytes(), out);
    put_bytes(r.tenant_id.as_bytes(), out);
    match &r.instance_id {
        None => out.push(0),
        Some(id) => {
            out.push(1);
            out.extend_from_slice(id);
        }
    }
    put_bytes(r.actor_id.as_bytes(), out);
    put_varint(zigzag(r.ts_secs), out);
    put_varint(zigzag(i64::from(r.ts_nanos)), out);
    put_bytes(r.payload.0, out);
}

fn put_bytes(b: &[u8], out: &mut Vec<u8>) {
    put_varint(b.len() as u64, out);
    out.extend_from_slice(b);
}

/// bincode's varint: one byte up to 250, else a marker (251, 252, 253)
/// and the value as a little-endian `u16`, `u32` or `u64`.
fn put_varint(v: u64, out: &mut Vec<u8>) {
    if v <= 250 {
        out.push(v as u8);
    } else if let Ok(v) = u16::try_from(v) {
        out.push(251);
        out.extend_from_slice(&v.to_le_bytes());
    } else if let Ok(v) = u32::try_from(v) {
        out.push(252);
        out.extend_from_slice(&v.to_le_bytes());
    } else {
        out.push(253);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// bincode's zigzag for signed integers: 0, -1, 1, -2, … as 0, 1, 2, 3, ….
/// An `i32` zigzagged as an `i64` gives the same value as bincode's `i32`
/// zigzag (both are `2n` or `-2n - 1`).
fn zigzag(v: i64) -> u64 {
    if v < 0 {
        !v.cast_unsigned() * 2 + 1
    } else {
        v.cast_unsigned() * 2
    }
}

/// The append time of a record, reading only its header.
pub(crate) fn append_ns(bytes: &[u8]) -> Result<i64, String> {
    check_header(bytes)?;
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[1..HEADER]);
    Ok(i64::from_be_bytes(b))
}

fn check_header(bytes: &[u8]) -> Result<(), String> {
    match bytes.first() {
        None => Err("empty record".into()),
        Some(&RECORD_VERSION) if bytes.len() >= HEADER => Ok(()),
        Some(&RECORD_VERSION) => Err(format!(
            "record of {} bytes is shorter than its header",
            bytes.len()
        )),
        Some(v) => Err(format!("unknown record format version {v}")),
    }
}

/// Decodes a record's fields without copying.
pub(crate) fn decode_ref(bytes: &[u8]) -> Result<(i64, RecordRef<'_>), String> {
    let append = append_ns(bytes)?;
    let (record, used): (RecordRef<'_>, usize) =
        bincode::serde::borrow_decode_from_slice(&bytes[HEADER..], config())
            .map_err(|e| e.to_string())?;
    if HEADER + used != bytes.len() {
        return Err(format!(
            "{} trailing bytes after the record",
            bytes.len() - HEADER - used
        ));
    }
    Ok((append, record))
}

impl RecordRef<'_> {
    /// The instance id, typed.
    pub(crate) fn instance(&self) -> Option<InstanceId> {
        self.instance_id.map(InstanceId::from_bytes)
    }

    /// The full event, parsing the payload JSON and validating every field.
    pub(crate) fn to_event(&self) -> Result<Event, String> {
        let event_type = Type::new(self.event_type).map_err(|e| e.to_string())?;
        let timestamp = Timestamp::new(self.ts_secs, self.ts_nanos).map_err(|e| e.to_string())?;
        let payload = if self.payload.0.is_empty() {
            serde_json::Map::new()
        } else {
            serde_json::from_slice(self.payload.0).map_err(|e| format!("payload: {e}"))?
        };
        Ok(Event {
            id: EventId::from_bytes(self.id),
            event_type,
            tenant_id: self.tenant_id.to_owned(),
            instance_id: self.instance(),
            actor_id: self.actor_id.to_owned(),
            payload,
            timestamp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Type;

    /// What bincode itself writes for `r`: the reference `put_record`
    /// must equal.
    fn bincode_of(r: &RecordRef<'_>) -> Vec<u8> {
        bincode::serde::encode_to_vec(r, config()).unwrap()
    }

    #[test]
    fn records_are_encoded_as_bincode_encodes_them() {
        // Lengths and integers at each of bincode's varint bounds.
        let lens = [0usize, 1, 250, 251, 252, 65_535, 65_536, 70_000];
        let ints = [
            0i64,
            1,
            -1,
            125,
            -125,
            126,
            -126,
            32_767,
            -32_768,
            32_768,
            i64::from(i32::MAX),
            i64::from(i32::MIN),
            i64::from(u32::MAX),
            i64::MAX,
            i64::MIN,
        ];
        let nanos = [0i32, 1, -1, 125, -126, 999_999_999, i32::MAX, i32::MIN];
        let mut rng = crate::test_rng::xorshift(0xc0dec);
        let text: String = (0..70_000u32)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        for i in 0..400 {
            let mut pick = |n: usize| (rng() % n as u64) as usize;
            let (type_len, tenant_len, actor_len, payload_len) = (
                lens[pick(lens.len())],
                lens[pick(lens.len())].min(300),
                lens[pick(lens.len())].min(300),
                lens[pick(lens.len())],
            );
            let mut id = [0u8; 16];
            id.iter_mut()
                .enumerate()
                .for_each(|(k, x)| *x = (i * 7 + k) as u8);
            let record = RecordRef {
                id,
                event_type: &text[..type_len],
                tenant_id: &text[..tenant_len],
                instance_id: (i % 2 == 0).then_some([i as u8; 16]),
                actor_id: &text[..actor_len],
                ts_secs: ints[pick(ints.len())],
                ts_nanos: nanos[pick(nanos.len())],
                payload: Bytes(&text.as_bytes()[..payload_len]),
            };
            let mut out = vec![9, 9];
            put_record(&record, &mut out);
            assert_eq!(&out[..2], &[9, 9], "appends, never overwrites");
            assert_eq!(out.len() - 2, record_len(&record), "record {i}: its length");
            assert_eq!(
                out[2..],
                bincode_of(&record)[..],
                "record {i}: lengths {type_len} {tenant_len} {actor_len} {payload_len}"
            );
        }
    }

    #[test]
    fn round_trip() {
        let e = Event::new(Type::DEPLOY_FAILED, "t1")
            .with_instance(InstanceId::new())
            .with_actor("bob")
            .with_payload_value("reason", "oom");
        let mut buf = Vec::new();
        encode(&e, 42, &e.payload_json(), &mut buf);
        assert_eq!(buf.capacity(), buf.len(), "one allocation, of its length");
        assert_eq!(append_ns(&buf).unwrap(), 42);
        let (t, r) = decode_ref(&buf).unwrap();
        assert_eq!(t, 42);
        assert_eq!(r.to_event().unwrap(), e);

        let bare = Event::new(Type::HEALTH_PASSED, "");
        encode(&bare, -5, b"", &mut buf);
        assert_eq!(decode_ref(&buf).unwrap().1.to_event().unwrap(), bare);
    }

    #[test]
    fn corruption_is_an_error_not_a_panic() {
        let e = Event::new(Type::DEPLOY_FAILED, "t1").with_payload_value("k", 1);
        let mut buf = Vec::new();
        encode(&e, 1, &e.payload_json(), &mut buf);
        assert!(decode_ref(&[]).is_err());
        assert!(decode_ref(&[9, 0, 0]).is_err());
        assert!(decode_ref(&buf[..5]).is_err());
        for cut in 9..buf.len() {
            assert!(decode_ref(&buf[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = buf.clone();
        long.push(0);
        assert!(decode_ref(&long).is_err());
        let mut other = buf.clone();
        other[0] = 2;
        assert!(decode_ref(&other).unwrap_err().contains("version 2"));
        // Flip every byte in turn: decoding may fail or succeed, never panic.
        for i in 0..buf.len() {
            let mut b = buf.clone();
            b[i] ^= 0xff;
            if let Ok((_, r)) = decode_ref(&b) {
                let _ = r.to_event();
            }
        }
    }
}

/// The event id of a record, reading only its first 16 bytes after the
/// header (bincode writes a `[u8; 16]` as its bytes): what the id index's
/// lookups compare without decoding the rest.
pub(crate) fn id_of(bytes: &[u8]) -> Result<[u8; 16], String> {
    check_header(bytes)?;
    bytes
        .get(HEADER..HEADER + 16)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| "record too short for its id".to_owned())
}

#[cfg(test)]
mod id_tests {
    use super::*;

    #[test]
    fn the_id_sits_right_after_the_header() {
        let e = Event::new(Type::DEPLOY_STARTED, "t").with_payload_value("k", 1);
        let mut out = Vec::new();
        encode(&e, 7, &e.payload_json(), &mut out);
        assert_eq!(id_of(&out).unwrap(), e.id.to_bytes());
        assert_eq!(decode_ref(&out).unwrap().1.id, e.id.to_bytes());
        assert!(id_of(&out[..HEADER + 15]).is_err());
        assert!(id_of(&[]).is_err());
    }
}
