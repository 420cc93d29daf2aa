//! A control plane's HTTP service on the async API (feature `tokio`):
//! handlers publish with `publish_async`, and `GET /events` streams the log
//! as Server-Sent Events from a named durable cursor, resuming after the
//! `Last-Event-ID` the browser sends back on reconnect (the event's `seq`).
//!
//! ```text
//! cargo run --features tokio --example axum_control_plane -- [LOG] [ADDR]
//! curl -X POST localhost:8080/instances/web-1/deploy -H 'x-tenant: acme' -d '{"version":"v2"}'
//! curl -N 'localhost:8080/events?subscriber=ui&type=deploy.*'
//! ```
//!
//! `tests/axum_example.rs` drives it over HTTP.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use ctrlbus::stream::{Delivery, DurableStream};
use ctrlbus::{
    CursorError, DurableBus, Event, Filter, Position, PublishError, SubscribeError, Type,
};
use futures::{Stream, StreamExt};
use serde::Deserialize;

/// The service's state: one bus for every request.
#[derive(Clone)]
pub struct App {
    bus: Arc<DurableBus>,
}

/// The routes: `POST /instances/{id}/deploy`, `POST /events`, `GET /events`.
pub fn router(bus: DurableBus) -> Router {
    Router::new()
        .route("/instances/{id}/deploy", post(deploy))
        .route("/events", post(publish).get(events))
        .with_state(App { bus: Arc::new(bus) })
}

/// `POST /instances/{id}/deploy` (tenant in `x-tenant`, body: the payload
/// object): publishes `deploy.started` and answers with the receipt.
async fn deploy(
    State(app): State<App>,
    Path(instance): Path<String>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let tenant = headers
        .get("x-tenant")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let payload = if body.trim().is_empty() {
        serde_json::Map::new()
    } else {
        match Event::payload_from_json(body.as_bytes()) {
            Ok(p) => p,
            Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
        }
    };
    let mut payload = payload;
    payload.insert("instance".into(), instance.into());
    let event = Event::new(Type::DEPLOY_STARTED, tenant).with_payload(payload);
    answer(app.bus.publish_async(event).await)
}

/// `POST /events` (body: one event as JSON, without id or time if new):
/// publishes it. Posting the same id again is answered with the original
/// receipt (`duplicate: true`), so a client may retry safely.
async fn publish(State(app): State<App>, body: String) -> Response {
    match Event::from_json_or_new(body.as_bytes(), jiff::Timestamp::now()) {
        Ok(event) => answer(app.bus.publish_async(event).await),
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

fn answer(result: Result<ctrlbus::Receipt, PublishError>) -> Response {
    match result {
        Ok(r) => axum::Json(serde_json::json!({
            "seq": r.seq,
            "id": r.id.to_string(),
            "duplicate": r.duplicate,
        }))
        .into_response(),
        Err(e @ PublishError::Invalid(_)) => {
            (StatusCode::BAD_REQUEST, e.to_string()).into_response()
        }
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

#[derive(Deserialize)]
struct EventsQuery {
    /// The durable cursor's name (one reader at a time).
    subscriber: String,
    /// A type pattern (`deploy.*`); all types when absent.
    #[serde(rename = "type")]
    event_type: Option<String>,
    tenant: Option<String>,
}

/// `GET /events?subscriber=NAME[&type=PATTERN][&tenant=T]`: the log from the
/// cursor `NAME` as Server-Sent Events (`id` = seq, `event` = type, `data`
/// = the event's JSON). With `Last-Event-ID: N` it resumes after seq N.
/// An event is acknowledged once the next is asked for: it has been handed
/// to the connection by then, which is not proof the client read it (the
/// socket buffers), so a reconnecting client resumes exactly only with its
/// `Last-Event-ID` (browsers send it); without one, from the cursor.
async fn events(
    State(app): State<App>,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
) -> Response {
    let mut filter = match &q.event_type {
        Some(t) => match Filter::types([t.as_str()]) {
            Ok(f) => f,
            Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
        },
        None => Filter::all(),
    };
    if let Some(t) = &q.tenant {
        filter = filter.tenant(t.clone());
    }
    let last_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let start = match last_id {
        Some(seq) => {
            let next = Position::Seq(seq + 1);
            // An existing cursor is moved to where the client is.
            match app.bus.seek(&q.subscriber, next) {
                Ok(_) | Err(CursorError::Unknown(_)) => next,
                Err(e @ CursorError::Active(_)) => {
                    return (StatusCode::CONFLICT, e.to_string()).into_response();
                }
                Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
            }
        }
        None => Position::Beginning,
    };
    match app.bus.durable_stream(&q.subscriber, filter, start) {
        Ok(stream) => Sse::new(sse(stream))
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(5)))
            .into_response(),
        Err(e @ SubscribeError::AlreadyActive(_)) => {
            (StatusCode::CONFLICT, e.to_string()).into_response()
        }
        Err(e @ SubscribeError::InvalidName(_)) => {
            (StatusCode::BAD_REQUEST, e.to_string()).into_response()
        }
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

/// The deliveries as SSE events, each acknowledged when the next is asked
/// for. Dropping the stream (the client went away) stores the cursor after
/// the last acknowledged event.
fn sse(stream: DurableStream) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    futures::stream::unfold(
        (stream, None::<Delivery>),
        |(mut stream, previous)| async move {
            if let Some(d) = previous {
                // Handed to the connection: acknowledged.
                if d.ack().await.is_err() {
                    return None;
                }
            }
            loop {
                match stream.next().await? {
                    Ok(d) => {
                        let sse = SseEvent::default()
                            .id(d.seq().to_string())
                            .event(d.event().event_type.as_str())
                            .data(d.event().to_json());
                        return Some((Ok(sse), (stream, Some(d))));
                    }
                    // A failed read is retried by the stream itself.
                    Err(e) => eprintln!("events: {e}"),
                }
            }
        },
    )
}

#[allow(dead_code)] // the test uses `router` only
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let log = args.get(1).map_or("control-plane.redb", String::as_str);
    let addr = args.get(2).map_or("127.0.0.1:8080", String::as_str);
    let bus = DurableBus::open(log)?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, router(bus)).await?;
    Ok(())
}
