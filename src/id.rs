//! Prefixed, sortable identifiers (the `TypeID` string form).
//!
//! An identifier is a 128-bit [ULID](https://github.com/ulid/spec) written as
//! a prefix, an underscore and 26 lowercase Crockford base32 characters, as in
//! [TypeID](https://github.com/jetify-com/typeid): `evt_01h455vb4pex5vsknk084sn02q`.
//! The first character is at most `7`, since 26 base32 characters hold 130
//! bits and a ULID has 128.
//!
//! Invariant: ids made by [`EventId::new`] (and the other `new`s) in one
//! process sort in creation order, byte-wise and as strings, because they come
//! from one monotonic ULID generator.

use std::fmt;
use std::str::FromStr;

use jiff::Timestamp;
use ulid::{Generator, Ulid};

use crate::error::IdError;
use crate::sync::Mutex;

/// Length of the ULID part of an id.
const ULID_CHARS: usize = 26;
/// Lowercase Crockford base32, the `TypeID` alphabet.
const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

static GENERATOR: Mutex<Generator> = Mutex::new(Generator::new());

/// A fresh ULID from the process-wide monotonic generator.
fn next_ulid() -> Ulid {
    next_ulid_at(std::time::SystemTime::now())
}

/// A fresh ULID from the process-wide monotonic generator, for the clock
/// reading `now` (one reading for an event's id and its timestamp: a clock
/// read cost ~100 ns on the VM BENCHMARKS.md measures).
fn next_ulid_at(now: std::time::SystemTime) -> Ulid {
    let mut generator = GENERATOR.lock();
    match generator.generate_from_datetime(now) {
        Ok(ulid) => ulid,
        // More than 2^80 ids in one millisecond: step into the next one, which
        // keeps the order.
        Err(overflow) => overflow.commit_overflow_increment(),
    }
}

fn encode(ulid: Ulid, out: &mut [u8; ULID_CHARS]) {
    let mut value = u128::from(ulid);
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(value & 0x1f) as usize];
        value >>= 5;
    }
}

/// Parses the 26-character ULID part, lowercase only.
fn decode(kind: &'static str, input: &str, s: &str) -> Result<Ulid, IdError> {
    if s.len() != ULID_CHARS {
        return Err(IdError::BadLength {
            kind,
            input: input.to_owned(),
            len: s.len(),
        });
    }
    let mut value: u128 = 0;
    for (i, c) in s.bytes().enumerate() {
        let Some(digit) = ALPHABET.iter().position(|&a| a == c) else {
            return Err(IdError::BadCharacter {
                kind,
                input: input.to_owned(),
                position: i,
            });
        };
        if i == 0 && digit > 7 {
            return Err(IdError::Overflow {
                kind,
                input: input.to_owned(),
            });
        }
        value = (value << 5) | digit as u128;
    }
    Ok(Ulid::from(value))
}

macro_rules! prefixed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(Ulid);

        impl $name {
            /// The string prefix, without the underscore.
            pub const PREFIX: &'static str = $prefix;

            /// A fresh id from the monotonic generator: later calls in this
            /// process give larger ids.
            #[allow(clippy::new_without_default)]
            pub fn new() -> Self {
                Self(next_ulid())
            }

            /// Wraps a ULID.
            pub const fn from_ulid(ulid: Ulid) -> Self {
                Self(ulid)
            }

            /// The ULID inside.
            pub const fn ulid(&self) -> Ulid {
                self.0
            }

            /// The id as 16 big-endian bytes: the order of these bytes is the
            /// order of the ids.
            pub const fn to_bytes(&self) -> [u8; 16] {
                self.0.to_bytes()
            }

            /// The id from 16 big-endian bytes (any value is valid).
            pub const fn from_bytes(bytes: [u8; 16]) -> Self {
                Self(Ulid::from_bytes(bytes))
            }

            /// The creation time the ULID carries, to the millisecond.
            pub fn time(&self) -> Timestamp {
                // A ULID's 48-bit millisecond timestamp is always within
                // jiff's range (up to year 9999 is 2.5e14 ms; 2^48 is 2.8e14),
                // so clamp rather than fail for the last few centuries.
                let ms = i64::try_from(self.0.timestamp_ms().min(253_402_207_200_000))
                    .unwrap_or(i64::MAX);
                Timestamp::from_millisecond(ms).unwrap_or(Timestamp::MAX)
            }

            /// Parses `
            #[doc = $prefix]
            /// _` followed by 26 lowercase Crockford base32 characters.
            ///
            /// # Errors
            /// [`IdError`] when the prefix is wrong or missing, the length is
            /// wrong, a character is not lowercase Crockford base32, or the
            /// value does not fit 128 bits.
            pub fn parse(s: &str) -> Result<Self, IdError> {
                let Some((prefix, rest)) = s.rsplit_once('_') else {
                    return Err(IdError::MissingPrefix { kind: $kind, expected: $prefix, input: s.to_owned() });
                };
                if prefix != $prefix {
                    return Err(IdError::WrongPrefix { kind: $kind, expected: $prefix, input: s.to_owned() });
                }
                decode($kind, s, rest).map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut buf = [0u8; ULID_CHARS];
                encode(self.0, &mut buf);
                f.write_str($prefix)?;
                f.write_str("_")?;
                // The alphabet is ASCII, so this never fails.
                f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

prefixed_id!(
    /// The id of an event: `evt_` + ULID. Stable for the life of the event;
    /// webhook deliveries send it as the `webhook-id` header.
    EventId,
    "evt",
    "event id"
);
impl EventId {
    /// A fresh id from the monotonic generator for the clock reading `now`
    /// (it stays above every earlier id even if the clock went back): an
    /// event's id and timestamp from one reading.
    pub(crate) fn new_at(now: std::time::SystemTime) -> EventId {
        EventId(next_ulid_at(now))
    }
}

prefixed_id!(
    /// The id of an instance the control plane manages: `inst_` + ULID.
    InstanceId,
    "inst",
    "instance id"
);
prefixed_id!(
    /// The id of a registered webhook: `hook_` + ULID.
    WebhookId,
    "hook",
    "webhook id"
);
prefixed_id!(
    /// The id of one webhook delivery: `deli_` + ULID.
    DeliveryId,
    "deli",
    "delivery id"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_for_one_clock_reading_or_an_earlier_one_still_grow() {
        let now = std::time::SystemTime::now();
        let back = now - std::time::Duration::from_secs(5);
        let mut last = EventId::new_at(now);
        for i in 0..1000 {
            let id = EventId::new_at(if i % 2 == 0 { now } else { back });
            assert!(id > last, "{id} after {last}");
            last = id;
        }
        assert!(EventId::new() > last);
    }

    #[test]
    fn display_is_typeid_form() {
        let id = EventId::from_ulid(Ulid::from(0x0188_e5f5_a56e_a9ab_8b26_a9cc_0a29_0c35u128));
        let s = id.to_string();
        assert!(s.starts_with("evt_"));
        assert_eq!(s.len(), 30);
        assert!(s[4..].bytes().all(|c| ALPHABET.contains(&c)));
        assert_eq!(EventId::parse(&s).unwrap(), id);
        assert_eq!(
            EventId::from_ulid(Ulid::nil()).to_string(),
            "evt_00000000000000000000000000"
        );
        assert_eq!(
            EventId::from_ulid(Ulid::max()).to_string(),
            "evt_7zzzzzzzzzzzzzzzzzzzzzzzzz"
        );
    }

    #[test]
    fn generated_ids_sort_in_creation_order() {
        let ids: Vec<EventId> = (0..10_000).map(|_| EventId::new()).collect();
        for w in ids.windows(2) {
            assert!(w[0] < w[1]);
            assert!(w[0].to_string() < w[1].to_string());
        }
    }

    #[test]
    fn time_is_extracted() {
        let before = Timestamp::now();
        let id = EventId::new();
        let t = id.time();
        assert!((t.as_millisecond() - before.as_millisecond()).abs() < 2_000);
    }

    #[test]
    fn parse_errors_are_specific() {
        let good = EventId::new().to_string();
        let body = &good[4..];
        assert!(matches!(
            EventId::parse(body),
            Err(IdError::MissingPrefix { .. })
        ));
        assert!(matches!(
            EventId::parse(&format!("inst_{body}")),
            Err(IdError::WrongPrefix { .. })
        ));
        assert!(matches!(
            InstanceId::parse(&good),
            Err(IdError::WrongPrefix { .. })
        ));
        assert!(matches!(
            EventId::parse(&good[..29]),
            Err(IdError::BadLength { len: 25, .. })
        ));
        assert!(matches!(
            EventId::parse(&format!("{good}0")),
            Err(IdError::BadLength { .. })
        ));
        let upper = format!("evt_{}", body.to_uppercase());
        if upper != good {
            assert!(matches!(
                EventId::parse(&upper),
                Err(IdError::BadCharacter { .. })
            ));
        }
        let mut bad = good.clone().into_bytes();
        bad[10] = b'u'; // not in Crockford base32
        assert!(matches!(
            EventId::parse(std::str::from_utf8(&bad).unwrap()),
            Err(IdError::BadCharacter { position: 6, .. })
        ));
        assert!(matches!(
            EventId::parse("evt_80000000000000000000000000"),
            Err(IdError::Overflow { .. })
        ));
        assert!(EventId::parse("").is_err());
    }

    #[test]
    fn serde_is_a_string() {
        let id = WebhookId::new();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        let back: WebhookId = serde_json::from_str(&json).unwrap();
        assert_eq!(back, id);
        assert!(serde_json::from_str::<DeliveryId>(&json).is_err());
    }

    #[test]
    fn bytes_round_trip_and_order() {
        let a = DeliveryId::new();
        let b = DeliveryId::new();
        assert_eq!(DeliveryId::from_bytes(a.to_bytes()), a);
        assert!(a.to_bytes() < b.to_bytes());
    }
}
