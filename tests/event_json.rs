//! The event JSON contract: golden files, omission rules, and one error
//! variant per kind of bad input.
//!
//! Golden files live in `tests/golden/`. A `NAME.json` file is canonical:
//! parsing it and serializing again gives exactly its bytes. A
//! `NAME.input.json` file is accepted input whose canonical form is
//! `NAME.json`.

use std::path::PathBuf;

use ctrlbus::{
    Bus, DEFAULT_MAX_PAYLOAD_BYTES, Event, EventError, EventId, IdError, InMemoryBus, InstanceId,
    PublishError, Type,
};
use serde_json::{Map, Value, json};

/// Canonical golden files: parse → serialize is the identity on them.
const CANONICAL: [&str; 5] = ["full", "minimal", "nested_payload", "nanos", "offset"];

fn golden(name: &str) -> String {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests", "golden", name]
        .iter()
        .collect();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.trim().to_owned()
}

fn parse(json: &str) -> Result<Event, EventError> {
    Event::from_json(json.as_bytes())
}

/// A valid event as a JSON object, to break one field at a time.
fn valid() -> Map<String, Value> {
    match serde_json::from_str(&golden("full.json")).unwrap() {
        Value::Object(map) => map,
        _ => unreachable!(),
    }
}

fn with(field: &str, value: Value) -> String {
    let mut map = valid();
    map.insert(field.to_owned(), value);
    Value::Object(map).to_string()
}

fn without(field: &str) -> String {
    let mut map = valid();
    map.remove(field);
    Value::Object(map).to_string()
}

// ---------------------------------------------------------------- golden files

#[test]
fn golden_files_round_trip_byte_for_byte() {
    for name in CANONICAL {
        let text = golden(&format!("{name}.json"));
        let event = parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(event.to_json(), text, "{name}: serialize(parse(golden))");
        assert_eq!(
            serde_json::to_string(&event).unwrap(),
            text,
            "{name}: serde_json::to_string"
        );
        // parse → serialize → parse gives the same event.
        assert_eq!(parse(&event.to_json()).unwrap(), event, "{name}");
        // The serde path agrees with from_json.
        assert_eq!(
            serde_json::from_str::<Event>(&text).unwrap(),
            event,
            "{name}"
        );
    }
}

#[test]
fn built_event_serializes_to_the_full_golden_file() {
    let event = Event::new(Type::DEPLOY_STARTED, "tenant-1")
        .with_id(EventId::parse("evt_01jddv1r7v0mzg0e3a8m0q0w4h").unwrap())
        .with_instance(InstanceId::parse("inst_01jddv1r7v0mzg0e3a8m0q0w4j").unwrap())
        .with_actor("alice")
        .with_workload("w-1")
        .with_template("tpl-1")
        .with_datacenter("dc-1")
        .with_timestamp("2026-11-27T05:12:01.123Z".parse().unwrap());
    assert_eq!(event.to_json(), golden("full.json"));
    assert_eq!(parse(&golden("full.json")).unwrap(), event);
}

#[test]
fn nanosecond_timestamp_is_kept_exactly() {
    let event = parse(&golden("nanos.json")).unwrap();
    assert_eq!(event.timestamp.subsec_nanosecond(), 123_456_789);
    assert_eq!(event.timestamp.as_second(), 1_795_756_321);
}

#[test]
fn offset_timestamp_normalizes_to_utc() {
    let input = golden("offset.input.json");
    assert!(input.contains("+02:00"), "the input carries an offset");
    let event = parse(&input).unwrap();
    let out = event.to_json();
    assert_eq!(out, golden("offset.json"));
    assert!(out.contains(r#""timestamp":"2026-11-27T05:12:01.12Z""#));
    // The instant is the same; only its spelling changed.
    assert_eq!(parse(&out).unwrap(), event);
}

#[test]
fn nested_payload_keeps_its_structure() {
    let event = parse(&golden("nested_payload.json")).unwrap();
    let p = &event.payload;
    assert_eq!(p["limits"]["cpu"]["min"], json!(0.25));
    assert_eq!(p["limits"]["memory_mb"], json!([512, 1024, 2048]));
    assert_eq!(p["note"], json!("héllo \"quoted\"\nline ☃"));
    assert_eq!(p["previous"], Value::Null);
    assert_eq!(p["replicas"], json!(-3));
    assert_eq!(p["tags"], json!(["a", {"k": "v"}, [], {}]));
}

// ------------------------------------------------------------ omission rules

#[test]
fn absent_and_empty_fields_are_omitted() {
    let event = Event::new(Type::HEALTH_PASSED, "tenant-2");
    let value: Value = serde_json::from_str(&event.to_json()).unwrap();
    let keys: Vec<&str> = value
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    // serde_json's map is sorted, so compare as a sorted list.
    assert_eq!(keys, ["id", "tenant_id", "timestamp", "type"]);

    let minimal = golden("minimal.json");
    for key in ["instance_id", "actor_id", "payload"] {
        assert!(!minimal.contains(key), "minimal golden omits {key}");
    }
    let event = parse(&minimal).unwrap();
    assert_eq!(event.instance_id, None);
    assert_eq!(event.actor_id, "");
    assert!(event.payload.is_empty());
}

#[test]
fn empty_tenant_is_not_omitted() {
    let event = Event::new(Type::HEALTH_PASSED, "");
    assert!(event.to_json().contains(r#""tenant_id":"""#));
}

#[test]
fn explicit_empty_values_normalize_to_omitted() {
    let minimal = golden("minimal.json");
    let base = r#""id":"evt_01jddv1r7v0mzg0e3a8m0q0w4k","type":"health.passed","tenant_id":"tenant-2","timestamp":"2026-11-27T05:12:01Z""#;
    for extra in [
        r#""instance_id":"","actor_id":"","payload":{}"#,
        r#""instance_id":null,"actor_id":null,"payload":null"#,
    ] {
        let input = format!("{{{base},{extra}}}");
        let event = parse(&input).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(event.to_json(), minimal, "{input}");
    }
}

#[test]
fn missing_tenant_reads_as_empty() {
    let event = parse(&without("tenant_id")).unwrap();
    assert_eq!(event.tenant_id, "");
}

#[test]
fn unknown_fields_are_ignored() {
    // The CLI prints the envelope plus "seq"; reading that back must work.
    let event = parse(&with("seq", json!(42))).unwrap();
    assert_eq!(event.to_json(), golden("full.json"));
}

// ------------------------------------------------------------- parse errors

#[test]
fn missing_required_fields_are_named() {
    for field in ["id", "type", "timestamp"] {
        assert_eq!(
            parse(&without(field)),
            Err(EventError::MissingField(field)),
            "missing {field}"
        );
    }
}

#[test]
fn serde_path_errors_name_the_field() {
    // Through plain serde (`serde(try_from)`), the variant is flattened to a
    // message; it must still say what is wrong.
    let err = serde_json::from_str::<Event>(&without("id")).unwrap_err();
    assert!(err.to_string().contains("missing field `id`"), "{err}");
    let err = serde_json::from_str::<Event>(&with("type", json!("Bad Type"))).unwrap_err();
    assert!(err.to_string().contains("event type"), "{err}");
}

#[test]
fn bad_type_is_refused() {
    for bad in [
        "",
        "Deploy.Started",
        "deploy..started",
        "deploy started",
        "deploy.*",
    ] {
        match parse(&with("type", json!(bad))) {
            Err(EventError::Type(e)) => assert_eq!(e.input, bad),
            other => panic!("type {bad:?}: {other:?}"),
        }
    }
    let long = "a".repeat(129);
    assert!(matches!(
        parse(&with("type", json!(long))),
        Err(EventError::Type(_))
    ));
}

#[test]
fn non_object_payload_is_refused() {
    for bad in [json!([1, 2]), json!("text"), json!(7), json!(true)] {
        assert_eq!(
            parse(&with("payload", bad.clone())),
            Err(EventError::PayloadNotObject),
            "payload {bad}"
        );
    }
}

#[test]
fn bad_timestamp_is_refused() {
    for bad in [
        "",
        "yesterday",
        "2026-11-27T05:12:01",             // no offset
        "2026-11-27",                      // no time
        "2026-13-27T05:12:01Z",            // month 13
        "2026-11-27T25:12:01Z",            // hour 25
        "1795756321",                      // a Unix time is not RFC 3339
        "2026-11-27T05:12:01.1234567891Z", // more than nanoseconds
    ] {
        match parse(&with("timestamp", json!(bad))) {
            Err(EventError::Timestamp(msg)) => assert!(msg.contains("RFC 3339"), "{msg}"),
            other => panic!("timestamp {bad:?}: {other:?}"),
        }
    }
}

/// Does an id error have the expected kind?
type IdCheck = fn(&IdError) -> bool;

#[test]
fn bad_event_id_is_refused() {
    let cases: [(&str, IdCheck); 6] = [
        ("inst_01jddv1r7v0mzg0e3a8m0q0w4h", |e| {
            matches!(
                e,
                IdError::WrongPrefix {
                    kind: "event id",
                    expected: "evt",
                    ..
                }
            )
        }),
        ("EVT_01jddv1r7v0mzg0e3a8m0q0w4h", |e| {
            matches!(e, IdError::WrongPrefix { .. })
        }),
        ("01jddv1r7v0mzg0e3a8m0q0w4h", |e| {
            matches!(
                e,
                IdError::MissingPrefix {
                    kind: "event id",
                    ..
                }
            )
        }),
        ("evt_01jddv1r7v0mzg0e3a8m0q0w4", |e| {
            matches!(e, IdError::BadLength { len: 25, .. })
        }),
        ("evt_01JDDV1R7V0MZG0E3A8M0Q0W4H", |e| {
            matches!(e, IdError::BadCharacter { position: 2, .. })
        }),
        ("evt_81jddv1r7v0mzg0e3a8m0q0w4h", |e| {
            matches!(e, IdError::Overflow { .. })
        }),
    ];
    for (bad, expected) in cases {
        match parse(&with("id", json!(bad))) {
            Err(EventError::Id(e)) => assert!(expected(&e), "id {bad:?}: {e:?}"),
            other => panic!("id {bad:?}: {other:?}"),
        }
    }
}

#[test]
fn bad_instance_id_is_refused() {
    let cases: [(&str, IdCheck); 3] = [
        ("evt_01jddv1r7v0mzg0e3a8m0q0w4j", |e| {
            matches!(
                e,
                IdError::WrongPrefix {
                    kind: "instance id",
                    expected: "inst",
                    ..
                }
            )
        }),
        ("inst_01jddv1r7v0mzg0e3a8m0q0w4u", |e| {
            // `u` is not in Crockford base32.
            matches!(
                e,
                IdError::BadCharacter {
                    kind: "instance id",
                    position: 25,
                    ..
                }
            )
        }),
        ("inst-01jddv1r7v0mzg0e3a8m0q0w4j", |e| {
            matches!(
                e,
                IdError::MissingPrefix {
                    kind: "instance id",
                    ..
                }
            )
        }),
    ];
    for (bad, expected) in cases {
        match parse(&with("instance_id", json!(bad))) {
            Err(EventError::Id(e)) => {
                assert!(expected(&e), "instance id {bad:?}: {e:?}");
                assert!(e.to_string().contains("instance id"), "{e}");
            }
            other => panic!("instance id {bad:?}: {other:?}"),
        }
    }
}

#[test]
fn malformed_json_is_refused() {
    for bad in [
        "",
        "{",
        "[]",
        "null",
        r#"{"id":1}"#,
        &with("tenant_id", json!(5)),
        &with("actor_id", json!(["x"])),
    ] {
        assert!(
            matches!(parse(bad), Err(EventError::Json(_))),
            "{bad}: {:?}",
            parse(bad)
        );
    }
}

#[test]
fn every_error_has_a_message() {
    let errors = [
        parse(&without("id")).unwrap_err(),
        parse(&with("type", json!("X"))).unwrap_err(),
        parse(&with("payload", json!([]))).unwrap_err(),
        parse(&with("timestamp", json!("x"))).unwrap_err(),
        parse(&with("id", json!("inst_01jddv1r7v0mzg0e3a8m0q0w4h"))).unwrap_err(),
        parse("{").unwrap_err(),
    ];
    let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert!(messages[0].contains("`id`"), "{}", messages[0]);
    assert!(messages[1].contains("event type"), "{}", messages[1]);
    assert!(messages[2].contains("payload"), "{}", messages[2]);
    assert!(messages[3].contains("RFC 3339"), "{}", messages[3]);
    assert!(messages[4].contains("evt_"), "{}", messages[4]);
    for m in &messages {
        assert!(m.starts_with("invalid event: "), "{m}");
    }
}

// ------------------------------------------------------------ payload limit

/// An event whose payload, as compact JSON, is exactly `bytes` long.
fn event_with_payload_bytes(bytes: usize) -> Event {
    // {"data":"xxx…"} is 11 bytes around the string.
    let event = Event::new(Type::DEPLOY_STARTED, "tenant-1")
        .with_payload_value("data", "x".repeat(bytes - 11));
    assert_eq!(event.payload_json().len(), bytes);
    event
}

#[test]
fn payload_over_the_limit_is_refused_by_publish() {
    assert_eq!(DEFAULT_MAX_PAYLOAD_BYTES, 1024 * 1024);
    let bus = InMemoryBus::new();
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = calls.clone();
    let _sub = bus
        .subscribe(ctrlbus::Filter::all(), move |_: &Event| {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        })
        .unwrap();

    let too_big = event_with_payload_bytes(DEFAULT_MAX_PAYLOAD_BYTES + 1);
    match bus.publish(too_big) {
        Err(PublishError::Invalid(EventError::PayloadTooLarge { limit })) => {
            assert_eq!(limit, DEFAULT_MAX_PAYLOAD_BYTES);
        }
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    // Refused before anything happened.
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert!(
        bus.recent_events(10, &ctrlbus::Filter::all())
            .unwrap()
            .is_empty()
    );

    // Exactly at the limit is accepted, and takes the first sequence number.
    let at_limit = event_with_payload_bytes(DEFAULT_MAX_PAYLOAD_BYTES);
    let receipt = bus.publish(at_limit).unwrap();
    assert_eq!(receipt.seq, 1);
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[test]
fn payload_size_counts_escaped_json_bytes() {
    // A quote is one character but two bytes of JSON (`\"`).
    let event = Event::new(Type::DEPLOY_STARTED, "t").with_payload_value("q", "\"".repeat(100));
    let size = event.payload_json().len();
    assert_eq!(size, 8 + 200);
    assert!(event.check_payload_size(size).is_ok());
    assert_eq!(
        event.check_payload_size(size - 1),
        Err(EventError::PayloadTooLarge { limit: size - 1 })
    );
}
