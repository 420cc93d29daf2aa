//! Subjects: the tenant and the type of each event in its subject, so that
//! filters run on the server.
//!
//! An event's subject is `<stream>.ev.<tenant>.<type>`: the type's dotted
//! segments are subject tokens (a type is `[a-z0-9_.-]` in non-empty
//! segments, all safe in a subject), and the tenant, any string, is one
//! token `t<base64url>` (`t` alone for the empty tenant), which holds none
//! of `.`, `*`, `>` or whitespace whatever the tenant is.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::event::Event;
use crate::filter::Filter;

/// The token a tenant is written as.
pub(crate) fn tenant_token(tenant: &str) -> String {
    format!("t{}", URL_SAFE_NO_PAD.encode(tenant.as_bytes()))
}

/// The subject `event` is stored under in `stream`.
pub(crate) fn of_event(stream: &str, event: &Event) -> String {
    format!(
        "{stream}.ev.{}.{}",
        tenant_token(&event.tenant_id),
        event.event_type.as_str()
    )
}

/// Every event of `stream`.
pub(crate) fn all(stream: &str) -> String {
    format!("{stream}.ev.>")
}

/// True if `subjects` (from [`of_filter`]) take every event of `stream`:
/// those of the unrestricted filter.
pub(crate) fn is_every_event(stream: &str, subjects: &[String]) -> bool {
    subjects == of_filter(stream, &Filter::all())
}

/// The subjects that hold exactly the events of `filter`'s types and
/// tenant (its instance, if any, is checked on the client).
pub(crate) fn of_filter(stream: &str, filter: &Filter) -> Vec<String> {
    let tenant = filter
        .tenant_id
        .as_deref()
        .map_or_else(|| "*".to_owned(), tenant_token);
    if filter.types.is_empty() || filter.types.iter().any(|p| p.as_str() == "*") {
        return vec![format!("{stream}.ev.{tenant}.>")];
    }
    let mut out: Vec<String> = filter
        .types
        .iter()
        .map(|p| match p.as_str().strip_suffix(".*") {
            // `deploy.*` is `deploy.` and at least one more character: one
            // or more tokens.
            Some(prefix) => format!("{stream}.ev.{tenant}.{prefix}.>"),
            None => format!("{stream}.ev.{tenant}.{}", p.as_str()),
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A valid stream name: 1–64 of `[A-Za-z0-9_-]` (a subject token and a
/// JetStream stream name both).
pub(crate) fn valid_stream_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Type;

    #[test]
    fn only_an_unrestricted_filter_takes_every_event() {
        let every = |f: &Filter| is_every_event("s", &of_filter("s", f));
        assert!(every(&Filter::all()));
        assert!(every(&Filter::types(["*"]).unwrap()));
        assert!(!every(&Filter::all().tenant("acme")));
        assert!(!every(&Filter::types(["deploy.*"]).unwrap()));
        assert!(!every(
            &Filter::types(["deploy.failed", "*"]).unwrap().tenant("a")
        ));
    }

    #[test]
    fn any_tenant_is_one_safe_token() {
        for t in ["", "acme", "a.b", "*", ">", "with space", "ünï", "a\tb\nc"] {
            let tok = tenant_token(t);
            assert!(tok.starts_with('t'));
            assert!(
                tok.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'),
                "{t:?} → {tok}"
            );
        }
        assert_ne!(tenant_token("a"), tenant_token("b"));
        assert_eq!(tenant_token(""), "t");
    }

    #[test]
    fn filters_become_subjects() {
        let f = Filter::types(["deploy.*", "health.failed"])
            .unwrap()
            .tenant("acme");
        assert_eq!(
            of_filter("log", &f),
            ["log.ev.tYWNtZQ.deploy.>", "log.ev.tYWNtZQ.health.failed"]
        );
        assert_eq!(of_filter("log", &Filter::all()), ["log.ev.*.>"]);
        let e = Event::new(Type::DEPLOY_ROLLED_BACK, "acme");
        assert_eq!(of_event("log", &e), "log.ev.tYWNtZQ.deploy.rolled_back");
    }

    #[test]
    fn stream_names() {
        assert!(valid_stream_name("ctrlbus"));
        assert!(valid_stream_name("prod-events_2"));
        for bad in ["", "a.b", "a b", "a*", &"x".repeat(65)] {
            assert!(!valid_stream_name(bad), "{bad:?}");
        }
    }
}
