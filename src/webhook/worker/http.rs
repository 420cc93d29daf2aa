//! One HTTP attempt: the agent deliveries use (no environment proxy, no
//! redirects, the address policy applied by its resolver to the very
//! addresses connected to), the signed POST, and `Retry-After`.

use super::*;
use crate::telemetry::Attempt;

/// An HTTP agent configured as delivery attempts use it: keep-alive, no
/// redirects followed (a 3xx is a failed attempt), HTTP statuses returned
/// as responses, the given timeouts, the ctrlbus user agent, and a resolver
/// that refuses forbidden addresses unless private targets are allowed (so
/// the check applies to the very addresses connected to).
///
/// No proxy is ever used: ureq would otherwise read `HTTP_PROXY`,
/// `HTTPS_PROXY` and `ALL_PROXY` from the environment and send every
/// delivery to the proxy, so that the address policy would judge only the
/// proxy's address while the proxy connects anywhere.
pub(crate) fn http_agent(opts: &DeliveryOptions) -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .proxy(None)
        .timeout_connect(Some(opts.connect_timeout))
        .timeout_global(Some(opts.timeout))
        .max_redirects(0)
        .max_redirects_will_error(false)
        .http_status_as_error(false)
        .user_agent(USER_AGENT)
        .build();
    ureq::Agent::with_parts(
        config,
        ureq::unversioned::transport::DefaultConnector::new(),
        PolicyResolver {
            policy: UrlPolicy {
                allow_private: opts.allow_private_targets,
            },
            inner: ureq::unversioned::resolver::DefaultResolver::default(),
        },
    )
}

/// Resolves with the default resolver, then applies the URL policy.
#[derive(Debug)]
pub(super) struct PolicyResolver {
    policy: UrlPolicy,
    inner: ureq::unversioned::resolver::DefaultResolver,
}

impl ureq::unversioned::resolver::Resolver for PolicyResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        let addrs = self.inner.resolve(uri, config, timeout)?;
        if !self.policy.allow_private {
            let found: Vec<SocketAddr> = addrs.iter().copied().collect();
            if let Some(bad) = found.iter().find(|a| is_forbidden(a.ip())) {
                return Err(ureq::Error::Other(Box::new(UrlError::ForbiddenAddress {
                    host: uri.host().unwrap_or_default().to_owned(),
                    addr: bad.ip(),
                })));
            }
        }
        Ok(addrs)
    }
}

/// Makes one HTTP attempt.
pub(crate) fn attempt(agent: &ureq::Agent, job: &Job) -> Outcome {
    let _span = tracing::debug_span!(
        "delivery",
        delivery = %crate::DeliveryId::from_bytes(job.delivery),
        event = %job.event_id,
    )
    .entered();
    let (out, kind) = send(agent, job);
    crate::telemetry::webhook_attempt(kind, out.duration);
    tracing::debug!(status = out.status_code, ?kind, "delivery attempt");
    out
}

fn send(agent: &ureq::Agent, job: &Job) -> (Outcome, Attempt) {
    let at_ns = now_ns();
    let started = Instant::now();
    let mut out = Outcome::blank(job, at_ns, false);
    // The URL was validated at registration; check again (cheap), the
    // address policy is applied by the agent's resolver.
    if let Err(e) = validate_url(&job.url) {
        out.error = e.to_string();
        return (out, Attempt::Refused);
    }
    let timestamp = at_ns.div_euclid(1_000_000_000);
    let secrets: Vec<&crate::webhook::signing::Secret> = job.secrets.iter().collect();
    let signature = signature_header(&secrets, &job.event_id, timestamp, &job.body);
    let result = agent
        .post(&job.url)
        .header(HEADER_ID, &job.event_id)
        .header(HEADER_TIMESTAMP, &timestamp.to_string())
        .header(HEADER_SIGNATURE, &signature)
        .header("content-type", "application/json")
        .send(job.body.as_slice());
    let kind = match result {
        Ok(mut resp) => {
            let status = resp.status().as_u16();
            out.status_code = status;
            out.success = (200..300).contains(&status);
            out.retry_after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            let mut kept = Vec::with_capacity(256);
            let mut reader = resp.body_mut().as_reader().take(RESPONSE_DRAIN_BYTES);
            let mut buf = [0u8; 4096];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let room = RESPONSE_LOG_BYTES.saturating_sub(kept.len());
                        kept.extend_from_slice(&buf[..n.min(room)]);
                    }
                }
            }
            out.response = String::from_utf8_lossy(&kept).into_owned();
            if out.success {
                Attempt::Success
            } else {
                out.error = format!("HTTP {status}");
                Attempt::Failure
            }
        }
        Err(e) => {
            let kind = match &e {
                ureq::Error::Timeout(_) => Attempt::Timeout,
                ureq::Error::Other(inner) if inner.downcast_ref::<UrlError>().is_some() => {
                    Attempt::Refused
                }
                _ => Attempt::Failure,
            };
            out.error = match e {
                ureq::Error::Other(inner) => inner.to_string(),
                other => other.to_string(),
            };
            kind
        }
    };
    out.duration = started.elapsed();
    (out, kind)
}

/// `Retry-After`: delay-seconds or an HTTP date.
pub(super) fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = jiff::fmt::rfc2822::parse(v).ok()?.timestamp();
    let d = when.duration_since(jiff::Timestamp::now());
    Some(Duration::try_from(d).unwrap_or(Duration::ZERO))
}
