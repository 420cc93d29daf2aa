//! What ctrlbus refuses: every row of README's "What ctrlbus refuses" table
//! is a case here, at its limit (accepted, and read back by every reader)
//! and one past it (refused, naming the limit, with nothing written).

mod common;

use ctrlbus::{
    Bus, DurableBus, Event, EventError, Filter, InMemoryBus, MAX_ACTOR_LEN, MAX_JSON_DEPTH,
    MAX_TENANT_LEN, Position, PublishError, Type,
};
use serde_json::{Value, json};

/// A payload whose value under "k" is nested down to `depth` levels of the
/// whole envelope (the envelope is level 1, the payload object level 2).
fn nested_payload(depth: usize) -> Value {
    let mut v = json!(1);
    for _ in 0..depth - 2 {
        v = json!([v]);
    }
    v
}

fn event_at_depth(depth: usize) -> Event {
    Event::new(Type::DEPLOY_STARTED, "acme").with_payload_value("k", nested_payload(depth))
}

fn refused(result: Result<ctrlbus::Receipt, PublishError>) -> EventError {
    match result {
        Err(PublishError::Invalid(e)) => e,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn every_bus() -> Vec<(&'static str, Box<dyn Bus>, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    let durable = DurableBus::open(dir.path().join("events.redb")).unwrap();
    vec![
        ("memory", Box::new(InMemoryBus::new()), None),
        ("durable", Box::new(durable), Some(dir)),
    ]
}

#[test]
fn nesting_at_the_limit_is_accepted_and_read_back_and_one_past_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bus = DurableBus::open(dir.path().join("events.redb")).unwrap();
    let log = common::Log::default();
    let sub = common::audit(&bus, &log);
    // G4 holds for a caught-up subscriber: wait until it is (on an empty
    // log its catch-up thread switches at once, unless the machine is busy).
    common::wait_until("the subscription to go live", || sub.is_live());
    let deep = event_at_depth(MAX_JSON_DEPTH);
    let receipt = bus.publish(deep.clone()).unwrap();
    // Every reader gives it back: read, a durable subscription, and the JSON
    // line (as `replay` prints it) parses again.
    let read: Vec<_> = bus
        .read(Position::Beginning, &Filter::all())
        .unwrap()
        .map(|e| e.unwrap())
        .collect();
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].seq, receipt.seq);
    assert_eq!(read[0].event, deep);
    let line = read[0].to_json();
    assert_eq!(Event::from_json(line.as_bytes()).unwrap(), deep);
    assert_eq!(*log.lock().unwrap(), vec![deep.id]);

    for (name, bus, _dir) in every_bus() {
        let err = refused(bus.publish(event_at_depth(MAX_JSON_DEPTH + 1)));
        assert_eq!(
            err,
            EventError::TooDeep {
                limit: MAX_JSON_DEPTH
            },
            "{name}"
        );
        assert!(err.to_string().contains("64 levels"), "{err}");
        // Far past it (what used to be stored and never read back).
        refused(bus.publish(event_at_depth(200)));
        assert!(
            bus.recent_events(10, &Filter::all()).unwrap().is_empty(),
            "{name}: nothing written"
        );
    }
}

#[test]
fn nesting_in_json_text_is_refused_before_parsing() {
    let event = event_at_depth(MAX_JSON_DEPTH + 1).to_json();
    assert_eq!(
        Event::from_json(event.as_bytes()),
        Err(EventError::TooDeep {
            limit: MAX_JSON_DEPTH
        })
    );
    let ok = event_at_depth(MAX_JSON_DEPTH).to_json();
    assert!(Event::from_json(ok.as_bytes()).is_ok());
    // A payload given as text (the CLI's --payload) counts from level 2.
    let text = serde_json::to_string(&event_at_depth(MAX_JSON_DEPTH + 1).payload).unwrap();
    assert!(matches!(
        Event::payload_from_json(text.as_bytes()),
        Err(EventError::TooDeep { .. })
    ));
}

#[test]
fn tenant_and_actor_at_their_limit_and_one_past() {
    for (name, bus, _dir) in every_bus() {
        bus.publish(
            Event::new(Type::DEPLOY_STARTED, "t".repeat(MAX_TENANT_LEN))
                .with_actor("a".repeat(MAX_ACTOR_LEN)),
        )
        .unwrap();
        let err = refused(bus.publish(Event::new(
            Type::DEPLOY_STARTED,
            "t".repeat(MAX_TENANT_LEN + 1),
        )));
        assert_eq!(
            err,
            EventError::FieldTooLong {
                field: "tenant_id",
                limit: MAX_TENANT_LEN
            },
            "{name}"
        );
        let err = refused(
            bus.publish(Event::new(Type::DEPLOY_STARTED, "t").with_actor("a".repeat(20 << 20))),
        );
        assert_eq!(
            err,
            EventError::FieldTooLong {
                field: "actor_id",
                limit: MAX_ACTOR_LEN
            },
            "{name}"
        );
        assert_eq!(bus.recent_events(10, &Filter::all()).unwrap().len(), 1);
    }
    // From JSON too.
    let json = Event::new(Type::DEPLOY_STARTED, "t".repeat(MAX_TENANT_LEN + 1)).to_json();
    assert!(matches!(
        Event::from_json(json.as_bytes()),
        Err(EventError::FieldTooLong { .. })
    ));
}

#[test]
fn timestamps_outside_years_0000_to_9999_are_refused() {
    let first: jiff::Timestamp = "0000-01-01T00:00:00Z".parse().unwrap();
    let last = jiff::Timestamp::MAX; // 9999-12-30T22:00:00.999999999Z
    let before: jiff::Timestamp = "-000001-06-01T00:00:00Z".parse().unwrap();
    for (name, bus, _dir) in every_bus() {
        for t in [first, last] {
            bus.publish(Event::new(Type::DEPLOY_STARTED, "t").with_timestamp(t))
                .unwrap();
        }
        let err =
            refused(bus.publish(Event::new(Type::DEPLOY_STARTED, "t").with_timestamp(before)));
        assert!(
            matches!(&err, EventError::Timestamp(m) if m.contains("0000-9999")),
            "{name}: {err}"
        );
        // What was accepted reads back as JSON that parses again.
        for e in bus.recent_events(10, &Filter::all()).unwrap() {
            assert_eq!(Event::from_json(e.to_json().as_bytes()).unwrap(), e);
        }
    }
    for bad in [
        "-000001-06-01T00:00:00Z",
        "+010000-01-01T00:00:00Z",
        "2016-12-31T23:59:60Z",
    ] {
        assert!(
            matches!(ctrlbus::parse_rfc3339(bad), Err(EventError::Timestamp(_))),
            "{bad}"
        );
    }
}

#[test]
fn integers_beyond_64_bits_are_refused_not_rounded() {
    let id = ctrlbus::EventId::new();
    let line = |n: &str| {
        format!(
            r#"{{"id":"{id}","type":"deploy.started","tenant_id":"t","payload":{{"n":{n}}},"timestamp":"2026-01-01T00:00:00Z"}}"#
        )
    };
    for ok in [
        "9223372036854775807",
        "18446744073709551615",
        "-9223372036854775808",
    ] {
        let e = Event::from_json(line(ok).as_bytes()).unwrap();
        assert_eq!(e.payload["n"].to_string(), ok, "kept exactly");
    }
    let e = Event::from_json(line("1e300").as_bytes()).unwrap();
    assert_eq!(
        e.payload["n"].as_f64(),
        Some(1e300),
        "a float stays a float"
    );
    let err = Event::from_json(line("123456789012345678901234567890").as_bytes()).unwrap_err();
    assert_eq!(
        err,
        EventError::NumberOutOfRange("123456789012345678901234567890".into())
    );
    assert!(err.to_string().contains("as a string"), "{err}");
}

#[test]
fn go_zero_values_for_id_and_timestamp_count_as_missing() {
    for id in [r#""id":"","#, r#""id":null,"#, ""] {
        let json = format!(r#"{{{id}"type":"deploy.started","timestamp":"2026-01-01T00:00:00Z"}}"#);
        assert_eq!(
            Event::from_json(json.as_bytes()),
            Err(EventError::MissingField("id")),
            "{json}"
        );
        let now = jiff::Timestamp::now();
        let imported = Event::from_json_or_new(json.as_bytes(), now).unwrap();
        assert!(imported.id.to_string().starts_with("evt_"));
    }
    let json = format!(
        r#"{{"id":"{}","type":"deploy.started","timestamp":null}}"#,
        ctrlbus::EventId::new()
    );
    assert_eq!(
        Event::from_json(json.as_bytes()),
        Err(EventError::MissingField("timestamp"))
    );
    let now = jiff::Timestamp::now();
    assert_eq!(
        Event::from_json_or_new(json.as_bytes(), now)
            .unwrap()
            .timestamp,
        now
    );
}
