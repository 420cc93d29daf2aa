//! `examples/axum_control_plane.rs` driven over HTTP: POST handlers publish
//! with `publish_async`, and `GET /events` streams Server-Sent Events from a
//! durable cursor, resuming after `Last-Event-ID`.
#![cfg(feature = "tokio")]

#[path = "../examples/axum_control_plane.rs"]
#[allow(dead_code)]
mod example;

use std::io::{BufRead, BufReader, Read};
use std::time::Duration;

use ctrlbus::DurableBus;

/// A client that never uses a proxy and returns every status as a response.
fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .proxy(None)
        .http_status_as_error(false)
        .build()
        .into()
}

/// POSTs `body` to `url`: (status, body).
fn post(url: &str, headers: &[(&str, &str)], body: &str) -> (u16, serde_json::Value) {
    let mut req = agent().post(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut resp = req.send(body).unwrap();
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

/// One SSE event: (id, event, data).
type Sse = (u64, String, serde_json::Value);

/// Opens `GET /events` and reads `n` events, retrying while the previous
/// connection's cursor is still held (409 until the server notices it
/// closed).
fn read_events(base: &str, query: &str, last_id: Option<u64>, n: usize) -> Vec<Sse> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let resp = loop {
        let mut req = agent().get(&format!("{base}/events?{query}"));
        if let Some(id) = last_id {
            req = req.header("last-event-id", &id.to_string());
        }
        let resp = req.call().unwrap();
        if resp.status().as_u16() != 409 {
            break resp;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the cursor stayed busy"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(resp.status().as_u16(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut lines = BufReader::new(resp.into_body().into_reader()).lines();
    let mut out = Vec::new();
    let (mut id, mut event, mut data) = (None, String::new(), String::new());
    while out.len() < n {
        // Keep-alive comments come every 5 s, so this looks often enough.
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {n} events came: {out:?}",
            out.len()
        );
        let line = lines.next().expect("the stream ended").unwrap();
        if let Some(v) = line.strip_prefix("id: ") {
            id = Some(v.parse().unwrap());
        } else if let Some(v) = line.strip_prefix("event: ") {
            v.clone_into(&mut event);
        } else if let Some(v) = line.strip_prefix("data: ") {
            v.clone_into(&mut data);
        } else if line.is_empty()
            && let Some(seq) = id.take()
        {
            out.push((
                seq,
                std::mem::take(&mut event),
                serde_json::from_str(&data).unwrap(),
            ));
        }
    }
    out
}

#[test]
fn a_control_plane_publishes_over_http_and_streams_sse_that_resumes_after_last_event_id() {
    let dir = tempfile::tempdir().unwrap();
    let bus = DurableBus::open(dir.path().join("log.redb")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    rt.spawn(async move { axum::serve(listener, example::router(bus)).await });

    // Publishing: a deploy, and a generic event (retried: same receipt).
    let (status, r) = post(
        &format!("{base}/instances/web-1/deploy"),
        &[("x-tenant", "acme")],
        r#"{"version":"v2"}"#,
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["seq"], 1);
    let (_, r) = post(
        &format!("{base}/events"),
        &[],
        r#"{"id":"evt_01jddv1r7v0mzg0e3a8m0q0w4h","type":"health.degraded","tenant_id":"acme"}"#,
    );
    assert_eq!(
        (r["seq"].as_u64(), r["duplicate"].as_bool()),
        (Some(2), Some(false))
    );
    let (_, again) = post(
        &format!("{base}/events"),
        &[],
        r#"{"id":"evt_01jddv1r7v0mzg0e3a8m0q0w4h","type":"health.degraded","tenant_id":"acme"}"#,
    );
    assert_eq!(
        (again["seq"].as_u64(), again["duplicate"].as_bool()),
        (Some(2), Some(true))
    );
    let (status, _) = post(&format!("{base}/events"), &[], r#"{"type":"BAD"}"#);
    assert_eq!(status, 400);
    post(
        &format!("{base}/instances/web-2/deploy"),
        &[("x-tenant", "acme")],
        "",
    );

    // The stream: every event, id = seq, event = type, data = the event.
    let got = read_events(&base, "subscriber=ui", None, 3);
    let ids: Vec<u64> = got.iter().map(|e| e.0).collect();
    assert_eq!(ids, [1, 2, 3]);
    assert_eq!(got[0].1, "deploy.started");
    assert_eq!(got[0].2["payload"]["instance"], "web-1");
    assert_eq!(got[0].2["tenant_id"], "acme");
    assert_eq!(got[1].1, "health.degraded");

    // More events; a reconnect with Last-Event-ID: 2 resumes at 3.
    for i in 3..5 {
        post(
            &format!("{base}/instances/web-{i}/deploy"),
            &[("x-tenant", "acme")],
            "",
        );
    }
    let got = read_events(&base, "subscriber=ui", Some(2), 3);
    assert_eq!(got.iter().map(|e| e.0).collect::<Vec<_>>(), [3, 4, 5]);
    // Last-Event-ID moves the cursor back too. (Without it a reconnect
    // resumes from the cursor, which moves as events are written to the
    // connection, read or not: exact resumption is the client's
    // Last-Event-ID, which browsers send.)
    let got = read_events(&base, "subscriber=ui", Some(1), 4);
    assert_eq!(got.iter().map(|e| e.0).collect::<Vec<_>>(), [2, 3, 4, 5]);

    // A filter on the stream: only deploys, for a new subscriber.
    let got = read_events(&base, "subscriber=deploys&type=deploy.*", None, 4);
    assert_eq!(got.iter().map(|e| e.0).collect::<Vec<_>>(), [1, 3, 4, 5]);
    let mut r = agent()
        .get(&format!("{base}/events?subscriber=bad%20name"))
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let _ = r.body_mut().as_reader().read_to_end(&mut Vec::new());
}
