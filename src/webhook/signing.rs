//! Webhook signing and verification, [Standard Webhooks] scheme `v1`.
//!
//! Every delivery carries three headers:
//!
//! * `webhook-id`: the message id, identical on every retry of one delivery, so
//!   receivers can de-duplicate on it;
//! * `webhook-timestamp`: Unix seconds when the attempt was signed;
//! * `webhook-signature`: one or more space-separated `v1,<base64>` entries
//!   (more than one while a secret is being rotated).
//!
//! The `v1` signature is HMAC-SHA256, keyed with the secret's decoded bytes,
//! over the UTF-8 string `"{webhook-id}.{webhook-timestamp}.{body}"`, encoded as
//! standard (padded) base64. Secrets are written `whsec_` followed by the
//! base64 of 24 to 64 key bytes.
//!
//! Senders use [`sign`] or [`signature_header`]; receivers use [`verify`]
//! (or [`verify_at`] with an explicit clock). Verification rejects a
//! timestamp further than the tolerance from now in either direction (replay
//! protection) and compares signatures in constant time.
//!
//! Secrets never appear in `Debug` output or error messages; only
//! [`Secret::expose`] returns the encoded secret.
//!
//! [Standard Webhooks]: https://www.standardwebhooks.com

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::BuildHasher;
use std::str::FromStr;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::{DecodePaddingMode, general_purpose};
use hmac::{Hmac, Mac};
use sha2::Sha256;

pub use crate::error::{SecretError, VerifyError};

/// The prefix of an encoded secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// Shortest accepted key, in decoded bytes (Standard Webhooks: 24).
pub const MIN_SECRET_LEN: usize = 24;

/// Longest accepted key, in decoded bytes (Standard Webhooks: 64).
pub const MAX_SECRET_LEN: usize = 64;

/// Key length, in bytes, of secrets made by [`Secret::generate`].
pub const GENERATED_SECRET_LEN: usize = 32;

/// How far a `webhook-timestamp` may be from the receiver's clock, in either
/// direction, before [`verify`] refuses the message: 5 minutes.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(5 * 60);

/// Name of the header that carries the message id.
pub const HEADER_ID: &str = "webhook-id";

/// Name of the header that carries the signing time, in Unix seconds.
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";

/// Name of the header that carries the signatures.
pub const HEADER_SIGNATURE: &str = "webhook-signature";

/// The signature scheme this module produces and checks.
const VERSION: &str = "v1";

type HmacSha256 = Hmac<Sha256>;

/// Standard base64 that decodes with or without `=` padding (some tools strip
/// it); encoding always pads.
const LENIENT_STANDARD: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A webhook signing secret: 24 to 64 key bytes, written `whsec_<base64>`.
///
/// `Debug` prints `Secret(****)`; there is deliberately no `Display`. Use
/// [`Secret::expose`] where the encoded secret must be shown or stored.
#[derive(Clone)]
pub struct Secret {
    /// The decoded key; `MIN_SECRET_LEN..=MAX_SECRET_LEN` bytes.
    key: Vec<u8>,
    /// `whsec_` + standard padded base64 of `key` (canonical form).
    encoded: String,
}

impl Secret {
    /// Makes a new secret of [`GENERATED_SECRET_LEN`] random bytes from the
    /// operating system's random number generator.
    ///
    /// # Panics
    ///
    /// Panics if the operating system cannot supply random bytes, which
    /// leaves no safe way to make a secret.
    #[must_use]
    pub fn generate() -> Secret {
        let mut key = [0u8; GENERATED_SECRET_LEN];
        if let Err(err) = getrandom::fill(&mut key) {
            panic!("the operating system's random number generator failed: {err}");
        }
        Secret::from_key(key.to_vec())
    }

    /// Parses an encoded secret: `whsec_` followed by the standard base64
    /// (padding optional) of 24 to 64 bytes. Surrounding whitespace is not
    /// removed.
    ///
    /// # Errors
    ///
    /// * [`SecretError::MissingPrefix`] if `s` does not start with `whsec_`;
    /// * [`SecretError::InvalidBase64`] if the rest is not standard base64;
    /// * [`SecretError::InvalidLength`] if it decodes to fewer than 24 or
    ///   more than 64 bytes.
    pub fn parse(s: &str) -> Result<Secret, SecretError> {
        let b64 = s
            .strip_prefix(SECRET_PREFIX)
            .ok_or(SecretError::MissingPrefix)?;
        // The decoder's error names the offending byte; don't pass it on, it
        // is part of the secret.
        let key = LENIENT_STANDARD
            .decode(b64)
            .map_err(|_| SecretError::InvalidBase64)?;
        Secret::from_bytes(&key)
    }

    /// Makes a secret from raw key bytes.
    ///
    /// # Errors
    ///
    /// [`SecretError::InvalidLength`] if `key` is shorter than 24 or longer
    /// than 64 bytes.
    pub fn from_bytes(key: &[u8]) -> Result<Secret, SecretError> {
        if !(MIN_SECRET_LEN..=MAX_SECRET_LEN).contains(&key.len()) {
            return Err(SecretError::InvalidLength { len: key.len() });
        }
        Ok(Secret::from_key(key.to_vec()))
    }

    /// Returns the encoded secret, `whsec_<base64>`, in canonical (padded)
    /// form. Named to make every place that reveals the secret easy to find.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.encoded
    }

    /// Builds the secret; `key` must already have a valid length.
    fn from_key(key: Vec<u8>) -> Secret {
        let encoded = format!("{SECRET_PREFIX}{}", STANDARD.encode(&key));
        Secret { key, encoded }
    }

    /// A MAC keyed with this secret, already fed with the signed content.
    /// `timestamp` is the decimal text exactly as sent.
    fn mac(&self, msg_id: &str, timestamp: &str, body: &[u8]) -> HmacSha256 {
        // HMAC takes keys of any length, so this cannot fail.
        let Ok(mut mac) = HmacSha256::new_from_slice(&self.key) else {
            unreachable!("HMAC accepts keys of any length")
        };
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(****)")
    }
}

impl FromStr for Secret {
    type Err = SecretError;

    /// Same as [`Secret::parse`].
    fn from_str(s: &str) -> Result<Secret, SecretError> {
        Secret::parse(s)
    }
}

/// Signs one message: returns `v1,<base64 HMAC-SHA256>` over
/// `"{msg_id}.{timestamp}.{body}"`, the value of one `webhook-signature` entry.
#[must_use]
pub fn sign(secret: &Secret, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    let tag = secret
        .mac(msg_id, &timestamp.to_string(), body)
        .finalize()
        .into_bytes();
    format!("{VERSION},{}", general_purpose::STANDARD.encode(tag))
}

/// The `webhook-signature` header value for a message signed with each of
/// `secrets` (several while a secret is being rotated): the [`sign`] results
/// separated by single spaces, in the order given. Empty if `secrets` is.
#[must_use]
pub fn signature_header(secrets: &[&Secret], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets
        .iter()
        .map(|secret| sign(secret, msg_id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Read access to a request's headers, for [`verify`].
///
/// Implemented for slices, arrays and `Vec`s of `(name, value)` pairs, for
/// `HashMap` and `BTreeMap` with string keys and values, and for
/// `http::HeaderMap`. Where a name occurs more than once, the first value
/// counts.
pub trait Headers {
    /// The value of the header called `name`, comparing names without regard
    /// to ASCII case; `None` if there is none (or, for `http::HeaderMap`, if
    /// the value is not visible ASCII).
    fn header(&self, name: &str) -> Option<&str>;
}

impl<T: Headers + ?Sized> Headers for &T {
    fn header(&self, name: &str) -> Option<&str> {
        (**self).header(name)
    }
}

/// Case-insensitive lookup over `(name, value)` pairs.
fn find_pair<'a, K, V, I>(pairs: I, name: &str) -> Option<&'a str>
where
    K: AsRef<str> + 'a,
    V: AsRef<str> + 'a,
    I: IntoIterator<Item = (&'a K, &'a V)>,
{
    pairs
        .into_iter()
        .find(|(k, _)| k.as_ref().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_ref())
}

impl<K: AsRef<str>, V: AsRef<str>> Headers for [(K, V)] {
    fn header(&self, name: &str) -> Option<&str> {
        find_pair(self.iter().map(|(k, v)| (k, v)), name)
    }
}

impl<K: AsRef<str>, V: AsRef<str>, const N: usize> Headers for [(K, V); N] {
    fn header(&self, name: &str) -> Option<&str> {
        self.as_slice().header(name)
    }
}

impl<K: AsRef<str>, V: AsRef<str>> Headers for Vec<(K, V)> {
    fn header(&self, name: &str) -> Option<&str> {
        self.as_slice().header(name)
    }
}

impl<K: AsRef<str>, V: AsRef<str>, S: BuildHasher> Headers for HashMap<K, V, S> {
    fn header(&self, name: &str) -> Option<&str> {
        find_pair(self.iter(), name)
    }
}

impl<K: AsRef<str>, V: AsRef<str>> Headers for BTreeMap<K, V> {
    fn header(&self, name: &str) -> Option<&str> {
        find_pair(self.iter(), name)
    }
}

impl Headers for ureq::http::HeaderMap {
    fn header(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Verifies a received webhook against the current system clock; see
/// [`verify_at`]. Use [`DEFAULT_TOLERANCE`] unless there is a reason not to.
///
/// # Errors
///
/// As [`verify_at`].
pub fn verify<H: Headers + ?Sized>(
    secret: &Secret,
    headers: &H,
    body: &[u8],
    tolerance: Duration,
) -> Result<(), VerifyError> {
    verify_at(
        secret,
        headers,
        body,
        tolerance,
        jiff::Timestamp::now().as_second(),
    )
}

/// Verifies a received webhook, taking `now` (Unix seconds) as the current
/// time.
///
/// Reads `webhook-id`, `webhook-timestamp` and `webhook-signature`, checks
/// that the timestamp is within `tolerance` of `now` in both directions, and
/// succeeds if any `v1` entry of the signature header is the signature of
/// `"{id}.{timestamp}.{body}"` under `secret` (compared in constant time).
/// Entries of other versions are ignored.
///
/// # Errors
///
/// * [`VerifyError::MissingHeader`] if one of the three headers is absent;
/// * [`VerifyError::InvalidTimestamp`] if `webhook-timestamp` is not a
///   decimal integer;
/// * [`VerifyError::TimestampTooOld`] / [`VerifyError::TimestampTooNew`] if
///   it is more than `tolerance` before / after `now` (possibly a replay, or a
///   skewed clock);
/// * [`VerifyError::InvalidSignatureHeader`] if the signature header is
///   blank or an entry is not `<version>,<signature>`;
/// * [`VerifyError::NoMatchingSignature`] if no `v1` entry matches: wrong
///   secret, or the id, timestamp or body was altered.
///
/// On any error the message must be treated as not authentic.
pub fn verify_at<H: Headers + ?Sized>(
    secret: &Secret,
    headers: &H,
    body: &[u8],
    tolerance: Duration,
    now: i64,
) -> Result<(), VerifyError> {
    let msg_id = headers
        .header(HEADER_ID)
        .ok_or(VerifyError::MissingHeader(HEADER_ID))?;
    let timestamp = headers
        .header(HEADER_TIMESTAMP)
        .ok_or(VerifyError::MissingHeader(HEADER_TIMESTAMP))?;
    let signatures = headers
        .header(HEADER_SIGNATURE)
        .ok_or(VerifyError::MissingHeader(HEADER_SIGNATURE))?;

    let timestamp_text = timestamp;
    let timestamp = parse_timestamp(timestamp)?;
    let tolerance = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
    if timestamp < now.saturating_sub(tolerance) {
        return Err(VerifyError::TimestampTooOld);
    }
    if timestamp > now.saturating_add(tolerance) {
        return Err(VerifyError::TimestampTooNew);
    }

    let entries = parse_signature_header(signatures)?;
    // Sign the header's text as received, as the sender did.
    let mac = secret.mac(msg_id, timestamp_text, body);
    let matched = entries
        .iter()
        .filter(|(version, _)| *version == VERSION)
        .filter_map(|(_, sig)| general_purpose::STANDARD.decode(sig).ok())
        // `verify_slice` compares in constant time. Don't stop at the first
        // match, so the time taken does not tell which entry matched.
        .fold(false, |matched, tag| {
            mac.clone().verify_slice(&tag).is_ok() | matched
        });
    if matched {
        Ok(())
    } else {
        Err(VerifyError::NoMatchingSignature)
    }
}

/// Parses a `webhook-timestamp` value: ASCII digits only, fitting an `i64`.
fn parse_timestamp(s: &str) -> Result<i64, VerifyError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(VerifyError::InvalidTimestamp);
    }
    s.parse().map_err(|_| VerifyError::InvalidTimestamp)
}

/// Splits a `webhook-signature` value into `(version, signature)` entries.
/// Entries are separated by spaces (runs of spaces are tolerated).
fn parse_signature_header(s: &str) -> Result<Vec<(&str, &str)>, VerifyError> {
    let entries = s
        .split(' ')
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            entry
                .split_once(',')
                .filter(|(version, sig)| !version.is_empty() && !sig.is_empty())
                .ok_or(VerifyError::InvalidSignatureHeader)
        })
        .collect::<Result<Vec<_>, _>>()?;
    if entries.is_empty() {
        return Err(VerifyError::InvalidSignatureHeader);
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// The vectors, as committed beside the tests (works on a fresh clone).
    const FIXTURE: &str = include_str!("../../tests/fixtures/standard-webhooks.json");

    /// All vector files available: the committed fixture, plus the shared
    /// original when this checkout sits next to it.
    fn vector_files() -> Vec<(String, serde_json::Value)> {
        let mut files = vec![(
            "tests/fixtures/standard-webhooks.json".to_owned(),
            serde_json::from_str(FIXTURE).expect("fixture is JSON"),
        )];
        let shared = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/vectors/standard-webhooks.json");
        if let Ok(text) = std::fs::read_to_string(&shared) {
            let json = serde_json::from_str(&text).expect("shared vectors are JSON");
            files.push((shared.display().to_string(), json));
        }
        files
    }

    struct Vector {
        name: String,
        secret: String,
        id: String,
        timestamp: i64,
        body: String,
        expected: String,
        must_fail: Vec<String>,
    }

    fn vectors() -> Vec<Vector> {
        let mut out = Vec::new();
        for (file, json) in vector_files() {
            let list = json["vectors"].as_array().expect("`vectors` array");
            assert!(!list.is_empty(), "{file}: no vectors");
            for v in list {
                let s = |k: &str| {
                    v[k].as_str()
                        .unwrap_or_else(|| panic!("{file}: `{k}` missing"))
                        .to_owned()
                };
                out.push(Vector {
                    name: format!("{file}: {}", s("name")),
                    secret: s("secret"),
                    id: s("webhook_id"),
                    timestamp: v["webhook_timestamp"].as_i64().expect("timestamp"),
                    body: s("body"),
                    expected: s("expected"),
                    must_fail: v["must_fail"]
                        .as_array()
                        .map(|a| a.iter().map(|x| x.as_str().unwrap().to_owned()).collect())
                        .unwrap_or_default(),
                });
            }
        }
        out
    }

    fn headers(id: &str, ts: i64, sig: &str) -> Vec<(String, String)> {
        vec![
            (HEADER_ID.to_owned(), id.to_owned()),
            (HEADER_TIMESTAMP.to_owned(), ts.to_string()),
            (HEADER_SIGNATURE.to_owned(), sig.to_owned()),
        ]
    }

    fn secret_a() -> Secret {
        Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap()
    }

    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TS: i64 = 1_614_265_330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;

    #[test]
    fn fixture_matches_shared_vectors_when_present() {
        let files = vector_files();
        if let [(_, fixture), (_, shared)] = files.as_slice() {
            assert_eq!(
                fixture, shared,
                "tests/fixtures/standard-webhooks.json is out of date"
            );
        }
    }

    #[test]
    fn vectors_sign_exactly() {
        let vectors = vectors();
        assert!(vectors.len() >= 2);
        for v in &vectors {
            let secret = Secret::parse(&v.secret).unwrap();
            let sig = sign(&secret, &v.id, v.timestamp, v.body.as_bytes());
            assert_eq!(sig, v.expected, "{}", v.name);
        }
    }

    #[test]
    fn vectors_verify() {
        for v in vectors() {
            let secret = Secret::parse(&v.secret).unwrap();
            let h = headers(&v.id, v.timestamp, &v.expected);
            verify_at(
                &secret,
                &h,
                v.body.as_bytes(),
                DEFAULT_TOLERANCE,
                v.timestamp,
            )
            .unwrap_or_else(|e| panic!("{}: {e}", v.name));
        }
    }

    #[test]
    fn vectors_must_fail_are_rejected() {
        let mut n = 0;
        for v in vectors() {
            let secret = Secret::parse(&v.secret).unwrap();
            for bad in &v.must_fail {
                n += 1;
                let h = headers(&v.id, v.timestamp, bad);
                assert_eq!(
                    verify_at(
                        &secret,
                        &h,
                        v.body.as_bytes(),
                        DEFAULT_TOLERANCE,
                        v.timestamp
                    ),
                    Err(VerifyError::NoMatchingSignature),
                    "{}: {bad}",
                    v.name
                );
            }
        }
        assert!(n >= 2, "expected must_fail entries");
    }

    #[test]
    fn vectors_round_trip_secret_encoding() {
        for v in vectors() {
            assert_eq!(Secret::parse(&v.secret).unwrap().expose(), v.secret);
        }
    }

    #[test]
    fn wrong_secret_fails() {
        let sig = sign(&secret_a(), ID, TS, BODY);
        let other = Secret::generate();
        let h = headers(ID, TS, &sig);
        assert_eq!(
            verify_at(&other, &h, BODY, DEFAULT_TOLERANCE, TS),
            Err(VerifyError::NoMatchingSignature)
        );
    }

    #[test]
    fn tampered_body_id_or_timestamp_fails() {
        let s = secret_a();
        let sig = sign(&s, ID, TS, BODY);
        let err = Err(VerifyError::NoMatchingSignature);
        let tol = DEFAULT_TOLERANCE;
        assert_eq!(
            verify_at(
                &s,
                &headers(ID, TS, &sig),
                br#"{"test": 2432232315}"#,
                tol,
                TS
            ),
            err
        );
        assert_eq!(verify_at(&s, &headers(ID, TS, &sig), b"", tol, TS), err);
        assert_eq!(
            verify_at(&s, &headers("msg_other", TS, &sig), BODY, tol, TS),
            err
        );
        assert_eq!(
            verify_at(&s, &headers(ID, TS + 1, &sig), BODY, tol, TS),
            err
        );
    }

    #[test]
    fn timestamp_tolerance_both_directions() {
        let s = secret_a();
        let sig = sign(&s, ID, TS, BODY);
        let h = headers(ID, TS, &sig);
        let tol = Duration::from_secs(300);
        // Exactly at the edges passes.
        assert_eq!(verify_at(&s, &h, BODY, tol, TS + 300), Ok(()));
        assert_eq!(verify_at(&s, &h, BODY, tol, TS - 300), Ok(()));
        // One second beyond fails.
        assert_eq!(
            verify_at(&s, &h, BODY, tol, TS + 301),
            Err(VerifyError::TimestampTooOld)
        );
        assert_eq!(
            verify_at(&s, &h, BODY, tol, TS - 301),
            Err(VerifyError::TimestampTooNew)
        );
        // Zero tolerance: only the exact second.
        assert_eq!(verify_at(&s, &h, BODY, Duration::ZERO, TS), Ok(()));
        assert_eq!(
            verify_at(&s, &h, BODY, Duration::ZERO, TS + 1),
            Err(VerifyError::TimestampTooOld)
        );
        // A huge tolerance or extreme clock does not overflow.
        assert_eq!(verify_at(&s, &h, BODY, Duration::MAX, 0), Ok(()));
        assert_eq!(verify_at(&s, &h, BODY, Duration::MAX, i64::MAX), Ok(()));
        assert_eq!(
            verify_at(&s, &h, BODY, Duration::MAX, i64::MIN),
            Err(VerifyError::TimestampTooNew)
        );
        assert_eq!(
            verify_at(&s, &h, BODY, tol, i64::MAX),
            Err(VerifyError::TimestampTooOld)
        );
    }

    #[test]
    fn verify_uses_the_system_clock() {
        let s = Secret::generate();
        let now = jiff::Timestamp::now().as_second();
        let h = headers(ID, now, &sign(&s, ID, now, BODY));
        assert_eq!(verify(&s, &h, BODY, DEFAULT_TOLERANCE), Ok(()));
        let old = now - 3600;
        let h = headers(ID, old, &sign(&s, ID, old, BODY));
        assert_eq!(
            verify(&s, &h, BODY, DEFAULT_TOLERANCE),
            Err(VerifyError::TimestampTooOld)
        );
        let new = now + 3600;
        let h = headers(ID, new, &sign(&s, ID, new, BODY));
        assert_eq!(
            verify(&s, &h, BODY, DEFAULT_TOLERANCE),
            Err(VerifyError::TimestampTooNew)
        );
    }

    #[test]
    fn multiple_signatures_one_matching_passes() {
        let s = secret_a();
        let old = Secret::generate();
        let new = Secret::generate();
        let header = signature_header(&[&old, &s, &new], ID, TS, BODY);
        assert_eq!(header.split(' ').count(), 3);
        let h = headers(ID, TS, &header);
        for secret in [&s, &old, &new] {
            assert_eq!(verify_at(secret, &h, BODY, DEFAULT_TOLERANCE, TS), Ok(()));
        }
        assert_eq!(
            verify_at(&Secret::generate(), &h, BODY, DEFAULT_TOLERANCE, TS),
            Err(VerifyError::NoMatchingSignature)
        );
    }

    #[test]
    fn signature_header_formats() {
        let s = secret_a();
        assert_eq!(signature_header(&[], ID, TS, BODY), "");
        assert_eq!(
            signature_header(&[&s], ID, TS, BODY),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        let two = signature_header(&[&s, &s], ID, TS, BODY);
        assert_eq!(
            two,
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE= \
             v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn other_versions_and_bad_entries_are_ignored() {
        let s = secret_a();
        let good = sign(&s, ID, TS, BODY);
        let b64 = good.strip_prefix("v1,").unwrap();
        let check = |sig: &str| verify_at(&s, &headers(ID, TS, sig), BODY, DEFAULT_TOLERANCE, TS);
        // Other schemes are skipped, even with the right bytes.
        assert_eq!(
            check(&format!("v2,{b64}")),
            Err(VerifyError::NoMatchingSignature)
        );
        assert_eq!(
            check(&format!("v1a,{b64}")),
            Err(VerifyError::NoMatchingSignature)
        );
        assert_eq!(check(&format!("v1a,{b64} {good}")), Ok(()));
        // Undecodable or truncated v1 entries don't match but don't mask others.
        assert_eq!(check(&format!("v1,!!notbase64!! {good}")), Ok(()));
        assert_eq!(check(&format!("v1,{} {good}", &b64[..20])), Ok(()));
        assert_eq!(
            check("v1,!!notbase64!!"),
            Err(VerifyError::NoMatchingSignature)
        );
        // A truncated or extended tag does not match.
        assert_eq!(check("v1,AAAA"), Err(VerifyError::NoMatchingSignature));
        assert_eq!(
            check(&format!(
                "v1,{}",
                general_purpose::STANDARD.encode([0u8; 33])
            )),
            Err(VerifyError::NoMatchingSignature)
        );
        // Extra spaces between entries are tolerated.
        assert_eq!(check(&format!("  v2,abc   {good}  ")), Ok(()));
        // The signature itself is case-sensitive.
        assert_eq!(
            check(&good.to_ascii_lowercase()),
            Err(VerifyError::NoMatchingSignature)
        );
    }

    #[test]
    fn malformed_signature_header() {
        let s = secret_a();
        let good = sign(&s, ID, TS, BODY);
        for bad in [
            String::new(),
            "   ".to_owned(),
            "v1".to_owned(),
            "v1,".to_owned(),
            ",abc".to_owned(),
            format!("{good} garbage"),
            good.replacen(',', "=", 1),
        ] {
            assert_eq!(
                verify_at(&s, &headers(ID, TS, &bad), BODY, DEFAULT_TOLERANCE, TS),
                Err(VerifyError::InvalidSignatureHeader),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn missing_headers() {
        let s = secret_a();
        let sig = sign(&s, ID, TS, BODY);
        let full = headers(ID, TS, &sig);
        for (i, name) in [HEADER_ID, HEADER_TIMESTAMP, HEADER_SIGNATURE]
            .into_iter()
            .enumerate()
        {
            let mut h = full.clone();
            h.remove(i);
            assert_eq!(
                verify_at(&s, &h, BODY, DEFAULT_TOLERANCE, TS),
                Err(VerifyError::MissingHeader(name))
            );
        }
        let none: [(&str, &str); 0] = [];
        assert_eq!(
            verify_at(&s, &none, BODY, DEFAULT_TOLERANCE, TS),
            Err(VerifyError::MissingHeader(HEADER_ID))
        );
    }

    #[test]
    fn invalid_timestamps() {
        let s = secret_a();
        let sig = sign(&s, ID, TS, BODY);
        for bad in [
            "",
            " 1614265330",
            "1614265330 ",
            "+1614265330",
            "-1614265330",
            "1614265330.0",
            "0x60379ef2",
            "abc",
            "99999999999999999999",
        ] {
            let h = [
                (HEADER_ID, ID),
                (HEADER_TIMESTAMP, bad),
                (HEADER_SIGNATURE, sig.as_str()),
            ];
            assert_eq!(
                verify_at(&s, &h, BODY, DEFAULT_TOLERANCE, TS),
                Err(VerifyError::InvalidTimestamp),
                "{bad:?}"
            );
        }
        // Leading zeros parse, but the text differs from what was signed.
        let h = [
            (HEADER_ID, ID),
            (HEADER_TIMESTAMP, "01614265330"),
            (HEADER_SIGNATURE, sig.as_str()),
        ];
        assert_eq!(
            verify_at(&s, &h, BODY, DEFAULT_TOLERANCE, TS),
            Err(VerifyError::NoMatchingSignature)
        );
        // The header's text is what is signed, so a sender that signed that
        // exact text is verified.
        let tag = s.mac(ID, "01614265330", BODY).finalize().into_bytes();
        let sig = format!("v1,{}", general_purpose::STANDARD.encode(tag));
        let h = [
            (HEADER_ID, ID),
            (HEADER_TIMESTAMP, "01614265330"),
            (HEADER_SIGNATURE, sig.as_str()),
        ];
        assert_eq!(verify_at(&s, &h, BODY, DEFAULT_TOLERANCE, TS), Ok(()));
    }

    #[test]
    fn header_names_are_case_insensitive_for_every_container() {
        let s = secret_a();
        let sig = sign(&s, ID, TS, BODY);
        let ts = TS.to_string();
        let check = |h: &dyn Fn() -> Result<(), VerifyError>| assert_eq!(h(), Ok(()));

        let arr = [
            ("Webhook-Id", ID),
            ("WEBHOOK-TIMESTAMP", ts.as_str()),
            ("webhook-Signature", sig.as_str()),
        ];
        check(&|| verify_at(&s, &arr, BODY, DEFAULT_TOLERANCE, TS));
        check(&|| verify_at(&s, &arr[..], BODY, DEFAULT_TOLERANCE, TS));
        check(&|| verify_at(&s, &&arr[..], BODY, DEFAULT_TOLERANCE, TS));

        let v: Vec<(String, String)> = arr
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        check(&|| verify_at(&s, &v, BODY, DEFAULT_TOLERANCE, TS));

        let hm: HashMap<String, String> = v.iter().cloned().collect();
        check(&|| verify_at(&s, &hm, BODY, DEFAULT_TOLERANCE, TS));
        let hm: HashMap<&str, &str> = arr.iter().copied().collect();
        check(&|| verify_at(&s, &hm, BODY, DEFAULT_TOLERANCE, TS));

        let bm: BTreeMap<String, String> = v.iter().cloned().collect();
        check(&|| verify_at(&s, &bm, BODY, DEFAULT_TOLERANCE, TS));

        let mut map = ureq::http::HeaderMap::new();
        for (k, val) in arr {
            map.insert(
                ureq::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                ureq::http::HeaderValue::from_str(val).unwrap(),
            );
        }
        check(&|| verify_at(&s, &map, BODY, DEFAULT_TOLERANCE, TS));

        // The first of duplicated names counts.
        let dup = [
            (HEADER_ID, ID),
            (HEADER_ID, "msg_other"),
            (HEADER_TIMESTAMP, ts.as_str()),
            (HEADER_SIGNATURE, sig.as_str()),
        ];
        check(&|| verify_at(&s, &dup, BODY, DEFAULT_TOLERANCE, TS));
    }

    #[test]
    fn generate_makes_distinct_valid_secrets() {
        let a = Secret::generate();
        let b = Secret::generate();
        assert_ne!(a.expose(), b.expose());
        for s in [&a, &b] {
            let enc = s.expose();
            assert!(enc.starts_with(SECRET_PREFIX));
            // 32 bytes -> 44 base64 characters, padded.
            assert_eq!(enc.len(), SECRET_PREFIX.len() + 44);
            let parsed = Secret::parse(enc).unwrap();
            assert_eq!(parsed.expose(), enc);
            assert_eq!(parsed.key, s.key);
            assert_eq!(parsed.key.len(), GENERATED_SECRET_LEN);
        }
    }

    #[test]
    fn parse_errors() {
        let b64 = |n: usize| general_purpose::STANDARD.encode(vec![7u8; n]);
        assert_eq!(
            Secret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap_err(),
            SecretError::MissingPrefix
        );
        assert_eq!(Secret::parse("").unwrap_err(), SecretError::MissingPrefix);
        assert_eq!(
            Secret::parse("WHSEC_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap_err(),
            SecretError::MissingPrefix
        );
        assert_eq!(
            Secret::parse(" whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap_err(),
            SecretError::MissingPrefix
        );
        for bad in [
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaS!",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n",
            "whsec_MfKQ9r8GKYqrTwjU PD8ILPZIo2LaLaSw",
            // URL-safe alphabet is not standard base64.
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLa_-",
            // Impossible length.
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwA",
        ] {
            assert_eq!(
                Secret::parse(bad).unwrap_err(),
                SecretError::InvalidBase64,
                "{bad:?}"
            );
        }
        assert_eq!(
            Secret::parse("whsec_").unwrap_err(),
            SecretError::InvalidLength { len: 0 }
        );
        assert_eq!(
            Secret::parse(&format!("whsec_{}", b64(23))).unwrap_err(),
            SecretError::InvalidLength { len: 23 }
        );
        assert_eq!(
            Secret::parse(&format!("whsec_{}", b64(65))).unwrap_err(),
            SecretError::InvalidLength { len: 65 }
        );
        assert_eq!(
            Secret::from_bytes(&[0; 10]).unwrap_err(),
            SecretError::InvalidLength { len: 10 }
        );
        for n in [24, 32, 33, 64] {
            let enc = format!("whsec_{}", b64(n));
            assert_eq!(Secret::parse(&enc).unwrap().expose(), enc);
            assert_eq!(Secret::from_bytes(&vec![7u8; n]).unwrap().expose(), enc);
        }
        // `FromStr` agrees with `parse`.
        assert_eq!(
            "nope".parse::<Secret>().unwrap_err(),
            SecretError::MissingPrefix
        );
        assert!(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
                .parse::<Secret>()
                .is_ok()
        );
    }

    #[test]
    fn parse_accepts_missing_padding_and_canonicalizes() {
        let padded = format!("whsec_{}", general_purpose::STANDARD.encode([9u8; 32]));
        assert!(padded.ends_with('='));
        let unpadded = padded.trim_end_matches('=');
        let s = Secret::parse(unpadded).unwrap();
        assert_eq!(s.expose(), padded);
    }

    #[test]
    fn secret_is_never_printed() {
        let s = secret_a();
        assert_eq!(format!("{s:?}"), "Secret(****)");
        assert_eq!(format!("{s:#?}"), "Secret(****)");
        assert_eq!(format!("{:?}", Some(&s)), "Some(Secret(****))");
        // Errors don't echo any of the input either.
        let bad = "whsec_SECRETSECRETSECRET!";
        let err = Secret::parse(bad).unwrap_err();
        for text in [err.to_string(), format!("{err:?}")] {
            assert!(!text.contains("SECRET"), "{text}");
        }
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            SecretError::MissingPrefix.to_string(),
            "webhook secret must start with `whsec_`"
        );
        assert_eq!(
            SecretError::InvalidLength { len: 3 }.to_string(),
            "webhook secret key is 3 bytes; it must be 24 to 64 bytes"
        );
        assert_eq!(
            VerifyError::MissingHeader("webhook-id").to_string(),
            "missing `webhook-id` header"
        );
        let all = [
            VerifyError::MissingHeader(HEADER_SIGNATURE),
            VerifyError::InvalidTimestamp,
            VerifyError::TimestampTooOld,
            VerifyError::TimestampTooNew,
            VerifyError::InvalidSignatureHeader,
            VerifyError::NoMatchingSignature,
        ];
        for e in all {
            let dynerr: &dyn std::error::Error = &e;
            assert!(!dynerr.to_string().is_empty());
            assert!(dynerr.source().is_none());
        }
        let e: Box<dyn std::error::Error + Send + Sync> = Box::new(SecretError::InvalidBase64);
        assert!(e.to_string().contains("base64"));
    }
}
