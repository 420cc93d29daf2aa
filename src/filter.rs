//! Which events a subscriber, reader or webhook wants.
//!
//! A [`Filter`] is a set of type patterns, an optional tenant and an optional
//! instance; an event matches when its type matches any pattern (no patterns
//! means every type) and its tenant and instance equal the ones given.
//! Patterns are an exact type (`deploy.failed`), a prefix followed by `.*`
//! (`deploy.*`, which matches `deploy.failed` and `deploy.canary.failed` but
//! not `deploy` itself), or `*` for everything. Matching allocates nothing.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::FilterError;
use crate::event::{Event, Type, check};
use crate::id::InstanceId;

/// One type pattern.
///
/// Invariant: the string is `*`, a valid [`Type`], or a valid type followed by
/// `.*`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Pattern(String);

impl Pattern {
    /// Parses a pattern.
    ///
    /// # Errors
    /// [`FilterError::Pattern`] when the pattern is not `*`, a valid type, or
    /// a valid type followed by `.*` (a `*` anywhere else is refused).
    pub fn new(s: impl Into<String>) -> Result<Pattern, FilterError> {
        let s = s.into();
        let body = if s == "*" {
            return Ok(Pattern(s));
        } else if let Some(prefix) = s.strip_suffix(".*") {
            prefix
        } else {
            s.as_str()
        };
        if let Err(reason) = check(body) {
            return Err(FilterError::Pattern {
                pattern: s.clone(),
                reason: if body.contains('*') {
                    "may hold `*` only as the whole pattern or as a last `.*` segment"
                } else {
                    reason
                },
            });
        }
        Ok(Pattern(s))
    }

    /// Does a type match this pattern?
    pub fn matches(&self, event_type: &str) -> bool {
        let p = self.0.as_str();
        if p == "*" {
            return true;
        }
        match p.strip_suffix('*') {
            // "deploy.*": the type must start with "deploy." and go on.
            Some(prefix) => event_type.len() > prefix.len() && event_type.starts_with(prefix),
            None => p == event_type,
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl Serialize for Pattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Pattern::new(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl From<Type> for Pattern {
    fn from(t: Type) -> Pattern {
        Pattern(t.as_str().to_owned())
    }
}

/// A set of type patterns, and optionally a tenant and an instance.
///
/// JSON: `{"types":["deploy.*"],"tenant_id":"t1","instance_id":"inst_…"}`,
/// with absent parts omitted.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    /// Type patterns; empty means every type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<Pattern>,
    /// Only this tenant's events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    /// Only this instance's events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<InstanceId>,
}

impl Filter {
    /// Matches every event.
    pub fn all() -> Filter {
        Filter::default()
    }

    /// Matches events whose type matches any of `patterns`.
    ///
    /// # Errors
    /// [`FilterError::Pattern`] for the first invalid pattern.
    pub fn types<I, S>(patterns: I) -> Result<Filter, FilterError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let types = patterns
            .into_iter()
            .map(Pattern::new)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Filter {
            types,
            ..Filter::default()
        })
    }

    /// Restricts the filter to one tenant.
    pub fn tenant(mut self, tenant_id: impl Into<String>) -> Filter {
        self.tenant_id = Some(tenant_id.into());
        self
    }

    /// Restricts the filter to one instance.
    pub fn instance(mut self, instance_id: InstanceId) -> Filter {
        self.instance_id = Some(instance_id);
        self
    }

    /// Does the event match?
    #[inline]
    pub fn matches(&self, event: &Event) -> bool {
        self.matches_parts(
            event.event_type.as_str(),
            &event.tenant_id,
            event.instance_id,
        )
    }

    /// Does an event with these fields match? (Lets the log filter records
    /// before decoding their payload.)
    #[inline]
    pub fn matches_parts(
        &self,
        event_type: &str,
        tenant_id: &str,
        instance: Option<InstanceId>,
    ) -> bool {
        if let Some(t) = &self.tenant_id
            && t != tenant_id
        {
            return false;
        }
        if let Some(i) = self.instance_id
            && Some(i) != instance
        {
            return false;
        }
        self.types.is_empty() || self.types.iter().any(|p| p.matches(event_type))
    }

    /// True when the filter matches every event.
    pub fn is_all(&self) -> bool {
        self.tenant_id.is_none()
            && self.instance_id.is_none()
            && (self.types.is_empty() || self.types.iter().any(|p| p.as_str() == "*"))
    }
}

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&serde_json::to_string(self).map_err(|_| fmt::Error)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(t: &str, tenant: &str) -> Event {
        Event::new(Type::new(t).unwrap(), tenant)
    }

    #[test]
    fn patterns() {
        let f = Filter::types(["deploy.*", "health.failed"]).unwrap();
        assert!(f.matches(&ev("deploy.failed", "a")));
        assert!(f.matches(&ev("deploy.canary.failed", "a")));
        assert!(!f.matches(&ev("deploy", "a")));
        assert!(!f.matches(&ev("deployx.failed", "a")));
        assert!(f.matches(&ev("health.failed", "a")));
        assert!(!f.matches(&ev("health.failed.x", "a")));
        assert!(!f.matches(&ev("health.passed", "a")));
        assert!(Filter::types(["*"]).unwrap().matches(&ev("x", "")));
        assert!(Filter::all().matches(&ev("x", "")));
    }

    #[test]
    fn invalid_patterns_are_refused() {
        for bad in [
            "",
            "deploy*",
            "*.failed",
            "deploy.*.x",
            "Deploy.*",
            "**",
            ".*",
            "deploy.**",
        ] {
            assert!(
                matches!(Filter::types([bad]), Err(FilterError::Pattern { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn tenant_and_instance() {
        let inst = InstanceId::new();
        let f = Filter::all().tenant("a").instance(inst);
        assert!(!f.matches(&ev("x", "a")));
        assert!(f.matches(&ev("x", "a").with_instance(inst)));
        assert!(!f.matches(&ev("x", "b").with_instance(inst)));
        assert!(!f.matches(&ev("x", "a").with_instance(InstanceId::new())));
    }

    #[test]
    fn json() {
        let f = Filter::types(["deploy.*"]).unwrap().tenant("t");
        let s = serde_json::to_string(&f).unwrap();
        assert_eq!(s, r#"{"types":["deploy.*"],"tenant_id":"t"}"#);
        assert_eq!(serde_json::from_str::<Filter>(&s).unwrap(), f);
        assert!(serde_json::from_str::<Filter>(r#"{"types":["a*"]}"#).is_err());
        assert_eq!(serde_json::to_string(&Filter::all()).unwrap(), "{}");
    }
}
