//! Which URLs a webhook may target.
//!
//! Two steps, kept apart so registration can check syntax without touching
//! the network:
//!
//! 1. [`validate_url`] checks the URL itself: absolute `http` or `https`, a
//!    host, no credentials, no fragment, a valid port, at most
//!    [`MAX_URL_LEN`] bytes of visible ASCII. Anything [`ureq`] would parse
//!    differently, or that a lenient resolver could read as an IP address
//!    written in an unusual form (`http://2130706433/`, `http://0x7f.1/`), is
//!    refused.
//! 2. [`check_addresses`] resolves the host and refuses the target if **any**
//!    address is forbidden by [`is_forbidden`] (loopback, private, link-local,
//!    and every other special-purpose range), unless
//!    [`UrlPolicy::allow_private`] is set. This keeps webhooks from being
//!    used to reach the control plane's own network (server-side request
//!    forgery).
//!
//! A check is only as good as the connection that follows it: the delivery
//! code should connect to the addresses [`check_addresses`] returned (not
//! resolve the name again, which a hostile DNS server could answer
//! differently) and must not follow redirects.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};

use ureq::http::Uri;

pub use crate::error::UrlError;

/// Longest accepted URL, in bytes.
pub const MAX_URL_LEN: usize = 2048;

/// Longest DNS name, in bytes, without a trailing dot.
const MAX_HOST_LEN: usize = 253;

/// Longest DNS label, in bytes.
const MAX_LABEL_LEN: usize = 63;

/// Where webhooks may deliver.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UrlPolicy {
    /// Permit targets whose addresses [`is_forbidden`] refuses (loopback,
    /// private networks, link-local, …). Off by default; meant for local
    /// development and tests.
    pub allow_private: bool,
}

impl UrlPolicy {
    /// Resolves `target`'s host and checks the addresses against this policy;
    /// the same as [`check_addresses`] with the target's host and port.
    ///
    /// # Errors
    ///
    /// As [`check_addresses`].
    pub fn check(self, target: &ParsedTarget) -> Result<Vec<SocketAddr>, UrlError> {
        check_addresses(&target.host, target.port, self)
    }
}

/// The scheme of a webhook target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// Plain `http`, default port 80.
    Http,
    /// `https`, default port 443.
    Https,
}

impl Scheme {
    /// The scheme as written in a URL: `"http"` or `"https"`.
    #[cfg(test)]
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    /// The port used when the URL gives none: 80 or 443.
    #[must_use]
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

/// A syntactically valid webhook target URL, broken into its parts; made by
/// [`validate_url`].
///
/// Invariants: `host` is non-empty and lowercase, either a DNS name of
/// `[a-z0-9_-]` labels (at least one of which is not purely numeric in the
/// last position), a dotted-quad IPv4 address, or an IPv6 address without
/// brackets or zone; `port` is not 0; `path_and_query` starts with `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedTarget {
    /// The URL as given.
    url: String,
    scheme: Scheme,
    host: String,
    port: u16,
    path_and_query: String,
}

// Read by the tests: production uses the validated URL string.
#[cfg(test)]
impl ParsedTarget {
    /// The URL exactly as given to [`validate_url`].
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.url
    }

    /// The scheme.
    #[must_use]
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// The host, lowercase; an IPv6 address is given without brackets.
    #[must_use]
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port: the explicit one, else the scheme's default.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The path and query, starting with `/` (just `/` if the URL has none).
    #[must_use]
    pub fn path_and_query(&self) -> &str {
        &self.path_and_query
    }

    /// The host as an IP address, if it is written as one.
    #[must_use]
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

/// Checks that `url` is acceptable as a webhook target, without any network
/// access.
///
/// Accepted: `http://` or `https://` (any case), a host (DNS name, dotted-quad
/// IPv4, or bracketed IPv6 without zone), an optional port 1–65535, an
/// optional path and query; visible ASCII only (percent-encode the rest,
/// write international names in punycode), at most [`MAX_URL_LEN`] bytes.
///
/// # Errors
///
/// * [`UrlError::UnsupportedScheme`] if the scheme is not `http` or `https`;
/// * [`UrlError::MissingHost`] if there is no host;
/// * [`UrlError::CredentialsNotAllowed`] if the URL has a `user:password@`
///   part (even an empty one);
/// * [`UrlError::Invalid`] for anything else: too long, not absolute,
///   whitespace or non-ASCII, a fragment, a bad port, a malformed host, or an
///   all-numeric host that is not a dotted-quad IPv4 address.
pub fn validate_url(url: &str) -> Result<ParsedTarget, UrlError> {
    if url.is_empty() {
        return Err(invalid("the URL is empty"));
    }
    if url.len() > MAX_URL_LEN {
        return Err(invalid(format!(
            "the URL is longer than {MAX_URL_LEN} bytes"
        )));
    }
    if !url.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            "the URL contains whitespace, control or non-ASCII characters",
        ));
    }
    if url.contains('#') {
        return Err(invalid("the URL has a fragment (`#…`)"));
    }
    // Some parsers read `\` as `/`, others as data; refuse the ambiguity.
    if url.contains('\\') {
        return Err(invalid("the URL contains a backslash"));
    }

    // Scheme (RFC 3986: ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ) ":").
    let Some((scheme, rest)) = url.split_once(':') else {
        return Err(invalid("not an absolute URL (no scheme)"));
    };
    let scheme_ok = scheme
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic())
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    if !scheme_ok {
        return Err(invalid("not an absolute URL (no scheme)"));
    }
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        _ => {
            return Err(UrlError::UnsupportedScheme {
                scheme: scheme.to_owned(),
            });
        }
    };
    let Some(rest) = rest.strip_prefix("//") else {
        return Err(invalid("expected `//` after the scheme"));
    };

    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    if authority.contains('@') {
        return Err(UrlError::CredentialsNotAllowed);
    }
    if authority.is_empty() {
        return Err(UrlError::MissingHost);
    }
    let (host, port) = split_host_port(authority)?;
    let port = port.unwrap_or_else(|| scheme.default_port());

    // The HTTP client parses the URL with `http::Uri`; it must accept it too
    // and see the same authority.
    let uri: Uri = url
        .parse()
        .map_err(|e: ureq::http::uri::InvalidUri| invalid(format!("not a valid URI: {e}")))?;
    if uri.authority().map(ureq::http::uri::Authority::as_str) != Some(authority) {
        return Err(invalid("the URL's authority is ambiguous"));
    }

    let path_and_query = match &rest[authority_end..] {
        "" => "/".to_owned(),
        pq if pq.starts_with('?') => format!("/{pq}"),
        pq => pq.to_owned(),
    };

    Ok(ParsedTarget {
        url: url.to_owned(),
        scheme,
        host,
        port,
        path_and_query,
    })
}

/// Splits an authority without userinfo into a validated, lowercase host and
/// an optional port.
fn split_host_port(authority: &str) -> Result<(String, Option<u16>), UrlError> {
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let Some((inner, after)) = bracketed.split_once(']') else {
            return Err(invalid("unterminated `[` in the host"));
        };
        if inner.contains('%') {
            return Err(invalid("IPv6 zone identifiers are not allowed"));
        }
        let ip: Ipv6Addr = inner
            .parse()
            .map_err(|_| invalid(format!("`[{inner}]` is not a valid IPv6 address")))?;
        let port = match after {
            "" => None,
            _ => match after.strip_prefix(':') {
                Some(port) => Some(port),
                None => return Err(invalid("unexpected characters after `]`")),
            },
        };
        (ip.to_string(), port)
    } else {
        if authority.matches(':').count() > 1 {
            return Err(invalid("an IPv6 address must be written in brackets"));
        }
        let (host, port) = match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        };
        (validate_host(host)?, port)
    };
    let port = port.map(parse_port).transpose()?;
    Ok((host, port))
}

/// Parses an explicit port: 1 to 5 ASCII digits, value 1–65535.
fn parse_port(port: &str) -> Result<u16, UrlError> {
    if port.is_empty() {
        return Err(invalid("the port is empty"));
    }
    if port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(format!("`{port}` is not a valid port")));
    }
    match port.parse::<u16>() {
        Ok(0) => Err(invalid("port 0 is not allowed")),
        Ok(p) => Ok(p),
        Err(_) => Err(invalid(format!("port {port} is out of range"))),
    }
}

/// Validates a DNS name or dotted-quad IPv4 host; returns it lowercase.
fn validate_host(host: &str) -> Result<String, UrlError> {
    if host.is_empty() {
        return Err(UrlError::MissingHost);
    }
    let host = host.to_ascii_lowercase();
    let name = host.strip_suffix('.').unwrap_or(&host);
    if name.is_empty() {
        return Err(invalid("the host is empty"));
    }
    if name.len() > MAX_HOST_LEN {
        return Err(invalid(format!(
            "the host is longer than {MAX_HOST_LEN} bytes"
        )));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(invalid(format!("`{host}` has an empty label")));
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(invalid(format!(
                "`{host}` has a label longer than {MAX_LABEL_LEN} bytes"
            )));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(invalid(format!(
                "`{host}` contains characters not allowed in a host name"
            )));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(invalid(format!(
                "`{host}` has a label starting or ending with `-`"
            )));
        }
    }
    // A last label that looks like a number makes resolvers read the whole
    // name as an IPv4 address in one of the inet_aton forms (`127.1`,
    // `2130706433`, `0x7f.0.0.1`, `0177.0.0.1`). Accept only the plain
    // dotted quad, which `is_forbidden` then sees unambiguously.
    let last = name.rsplit('.').next().unwrap_or(name);
    let numeric = last.bytes().all(|b| b.is_ascii_digit())
        || last
            .strip_prefix("0x")
            .is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()));
    if numeric && host.parse::<Ipv4Addr>().is_err() {
        return Err(invalid(format!(
            "`{host}` is neither a host name nor a dotted-quad IPv4 address"
        )));
    }
    Ok(host)
}

fn invalid(reason: impl Into<String>) -> UrlError {
    UrlError::Invalid {
        reason: reason.into(),
    }
}

/// Resolves `host` (a name or an IP address, IPv6 without brackets) with the
/// system resolver and returns its addresses with `port`, if `policy` allows
/// every one of them. An IP address is used as is, without DNS.
///
/// # Errors
///
/// * [`UrlError::Resolve`] if the name cannot be resolved or has no
///   addresses;
/// * [`UrlError::ForbiddenAddress`] if any address is one [`is_forbidden`]
///   refuses and `policy.allow_private` is off. A name with one public and one
///   private address is refused: the client might connect to either.
pub fn check_addresses(
    host: &str,
    port: u16,
    policy: UrlPolicy,
) -> Result<Vec<SocketAddr>, UrlError> {
    let resolve_error = |message: String| UrlError::Resolve {
        host: host.to_owned(),
        message,
    };
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for addr in (host, port)
        .to_socket_addrs()
        .map_err(|e| resolve_error(e.to_string()))?
    {
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    if addrs.is_empty() {
        return Err(resolve_error("no addresses found".to_owned()));
    }
    if !policy.allow_private
        && let Some(bad) = addrs.iter().find(|a| is_forbidden(a.ip()))
    {
        return Err(UrlError::ForbiddenAddress {
            host: host.to_owned(),
            addr: bad.ip(),
        });
    }
    Ok(addrs)
}

/// Whether a webhook must not be delivered to `ip` (unless private targets
/// are allowed): every address that is not ordinary global unicast.
///
/// IPv4: `0.0.0.0/8` (this network, unspecified), `10.0.0.0/8`,
/// `172.16.0.0/12`, `192.168.0.0/16` (private), `100.64.0.0/10` (shared,
/// carrier-grade NAT), `127.0.0.0/8` (loopback), `169.254.0.0/16`
/// (link-local), `192.0.0.0/24` (IETF protocol assignments), `192.0.2.0/24`,
/// `198.51.100.0/24`, `203.0.113.0/24` (documentation), `192.88.99.0/24`
/// (deprecated 6to4 relay), `198.18.0.0/15` (benchmarking), `224.0.0.0/4`
/// (multicast), `240.0.0.0/4` (reserved, including broadcast
/// `255.255.255.255`).
///
/// IPv6: everything outside global unicast `2000::/3`, which covers `::`,
/// `::1`, IPv4-compatible `::/96`, `fc00::/7` (unique local), `fe80::/10`
/// (link-local), `fec0::/10` (site-local), `ff00::/8` (multicast) and
/// `100::/64` (discard); within `2000::/3`: `2001::/23` (IETF protocol
/// assignments: Teredo, benchmarking, ORCHID), `2001:db8::/32` and
/// `3fff::/20` (documentation), `5f00::/16` (`SRv6`). Addresses that embed an
/// IPv4 address are judged by it: IPv4-mapped `::ffff:0:0/96`, NAT64
/// `64:ff9b::/96` and 6to4 `2002::/16`.
#[must_use]
pub fn is_forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_forbidden_v4(v4),
        IpAddr::V6(v6) => is_forbidden_v6(v6),
    }
}

/// Whether `ip` lies in `net/prefix`.
fn in_v4(ip: Ipv4Addr, net: [u8; 4], prefix: u32) -> bool {
    let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
    u32::from(ip) & mask == u32::from(Ipv4Addr::from(net)) & mask
}

/// Whether `ip` lies in `net/prefix`.
fn in_v6(ip: Ipv6Addr, net: [u16; 8], prefix: u32) -> bool {
    let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
    u128::from(ip) & mask == u128::from(Ipv6Addr::from(net)) & mask
}

/// Forbidden IPv4 ranges; see [`is_forbidden`].
const FORBIDDEN_V4: &[([u8; 4], u32)] = &[
    ([0, 0, 0, 0], 8),
    ([10, 0, 0, 0], 8),
    ([100, 64, 0, 0], 10),
    ([127, 0, 0, 0], 8),
    ([169, 254, 0, 0], 16),
    ([172, 16, 0, 0], 12),
    ([192, 0, 0, 0], 24),
    ([192, 0, 2, 0], 24),
    ([192, 88, 99, 0], 24),
    ([192, 168, 0, 0], 16),
    ([198, 18, 0, 0], 15),
    ([198, 51, 100, 0], 24),
    ([203, 0, 113, 0], 24),
    ([224, 0, 0, 0], 4),
    ([240, 0, 0, 0], 4),
];

/// Forbidden ranges inside `2000::/3`; see [`is_forbidden`].
const FORBIDDEN_V6_GLOBAL: &[([u16; 8], u32)] = &[
    ([0x2001, 0, 0, 0, 0, 0, 0, 0], 23),
    ([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32),
    ([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20),
    ([0x5f00, 0, 0, 0, 0, 0, 0, 0], 16),
];

fn is_forbidden_v4(ip: Ipv4Addr) -> bool {
    FORBIDDEN_V4
        .iter()
        .any(|&(net, prefix)| in_v4(ip, net, prefix))
}

fn is_forbidden_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_forbidden_v4(v4);
    }
    let bits = u128::from(ip);
    // NAT64 (RFC 6052): the last 32 bits are the IPv4 address.
    if in_v6(ip, [0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96) {
        return is_forbidden_v4(Ipv4Addr::from((bits & 0xffff_ffff) as u32));
    }
    // 6to4 (RFC 3056): bits 16..48 are the IPv4 address.
    if in_v6(ip, [0x2002, 0, 0, 0, 0, 0, 0, 0], 16) {
        return is_forbidden_v4(Ipv4Addr::from(((bits >> 80) & 0xffff_ffff) as u32));
    }
    if !in_v6(ip, [0x2000, 0, 0, 0, 0, 0, 0, 0], 3) {
        return true;
    }
    FORBIDDEN_V6_GLOBAL
        .iter()
        .any(|&(net, prefix)| in_v6(ip, net, prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_forbidden_table() {
        // (address, forbidden)
        let table: &[(&str, bool)] = &[
            // IPv4 public
            ("8.8.8.8", false),
            ("1.1.1.1", false),
            ("93.184.216.34", false),
            ("9.255.255.255", false),
            ("11.0.0.0", false),
            ("100.63.255.255", false),
            ("100.128.0.0", false),
            ("126.255.255.255", false),
            ("128.0.0.0", false),
            ("169.253.255.255", false),
            ("169.255.0.0", false),
            ("172.15.255.255", false),
            ("172.32.0.0", false),
            ("192.0.1.0", false),
            ("192.0.3.0", false),
            ("192.167.255.255", false),
            ("192.169.0.0", false),
            ("198.17.255.255", false),
            ("198.20.0.0", false),
            ("198.51.99.255", false),
            ("198.51.101.0", false),
            ("203.0.112.255", false),
            ("203.0.114.0", false),
            ("223.255.255.255", false),
            // this network / unspecified
            ("0.0.0.0", true),
            ("0.1.2.3", true),
            ("0.255.255.255", true),
            // private
            ("10.0.0.0", true),
            ("10.255.255.255", true),
            ("172.16.0.0", true),
            ("172.31.255.255", true),
            ("192.168.0.1", true),
            ("192.168.255.255", true),
            // shared address space
            ("100.64.0.0", true),
            ("100.127.255.255", true),
            // loopback
            ("127.0.0.1", true),
            ("127.255.255.254", true),
            // link-local (cloud metadata lives here)
            ("169.254.0.0", true),
            ("169.254.169.254", true),
            ("169.254.255.255", true),
            // IETF protocol assignments, documentation, 6to4 relay
            ("192.0.0.8", true),
            ("192.0.2.1", true),
            ("198.51.100.7", true),
            ("203.0.113.255", true),
            ("192.88.99.1", true),
            // benchmarking
            ("198.18.0.0", true),
            ("198.19.255.255", true),
            // multicast, reserved, broadcast
            ("224.0.0.1", true),
            ("239.255.255.255", true),
            ("240.0.0.1", true),
            ("255.255.255.254", true),
            ("255.255.255.255", true),
            // IPv6 public
            ("2606:4700:4700::1111", false),
            ("2001:4860:4860::8888", false),
            ("2a00:1450:4001::1", false),
            ("2001:200::1", false),
            ("2001:db7:ffff::1", false),
            ("2001:db9::1", false),
            ("3ffe::1", false),
            ("3fff:1000::1", false),
            // unspecified, loopback, IPv4-compatible
            ("::", true),
            ("::1", true),
            ("::8.8.8.8", true),
            // unique local
            ("fc00::1", true),
            ("fd12:3456:789a::1", true),
            ("fdff:ffff::1", true),
            // link-local, site-local
            ("fe80::1", true),
            ("febf:ffff::1", true),
            ("fec0::1", true),
            // multicast
            ("ff02::1", true),
            ("ff0e::1", true),
            // discard, local-use NAT64
            ("100::1", true),
            ("64:ff9b:1::1", true),
            // documentation
            ("2001:db8::1", true),
            ("2001:db8:ffff:ffff::1", true),
            ("3fff::1", true),
            ("3fff:fff::1", true),
            // IETF protocol assignments: Teredo, benchmarking, ORCHID
            ("2001::1", true),
            ("2001:0:4136:e378::1", true),
            ("2001:2::1", true),
            ("2001:10::1", true),
            ("2001:1ff::1", true),
            // SRv6
            ("5f00::1", true),
            // outside 2000::/3
            ("4000::1", true),
            ("1000::1", true),
            // IPv4-mapped: judged as IPv4
            ("::ffff:127.0.0.1", true),
            ("::ffff:10.1.2.3", true),
            ("::ffff:169.254.169.254", true),
            ("::ffff:0.0.0.0", true),
            ("::ffff:8.8.8.8", false),
            // NAT64: judged by the embedded IPv4
            ("64:ff9b::8.8.8.8", false),
            ("64:ff9b::127.0.0.1", true),
            ("64:ff9b::a9fe:a9fe", true),
            // 6to4: judged by the embedded IPv4
            ("2002:808:808::1", false),
            ("2002:7f00:1::1", true),
            ("2002:c0a8:101::1", true),
        ];
        for &(addr, forbidden) in table {
            let ip: IpAddr = addr.parse().unwrap_or_else(|_| panic!("{addr}"));
            assert_eq!(is_forbidden(ip), forbidden, "{addr}");
        }
    }

    #[test]
    fn forbidden_agrees_with_std_classifiers() {
        // Whatever std says is special must be forbidden here too.
        let samples = [
            "127.0.0.1",
            "10.0.0.1",
            "172.20.0.1",
            "192.168.1.1",
            "169.254.1.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.251",
            "192.0.2.55",
            "::1",
            "::",
            "ff02::fb",
        ];
        for s in samples {
            let ip: IpAddr = s.parse().unwrap();
            let std_special = match ip {
                IpAddr::V4(v4) => {
                    v4.is_loopback()
                        || v4.is_private()
                        || v4.is_link_local()
                        || v4.is_unspecified()
                        || v4.is_broadcast()
                        || v4.is_multicast()
                        || v4.is_documentation()
                }
                IpAddr::V6(v6) => v6.is_loopback() || v6.is_unspecified() || v6.is_multicast(),
            };
            assert!(std_special, "{s}");
            assert!(is_forbidden(ip), "{s}");
        }
    }

    #[test]
    fn validate_url_accepts() {
        use Scheme::{Http, Https};
        let ok = |url: &str, scheme, host: &str, port, pq: &str| {
            let t = validate_url(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(t.as_str(), url);
            assert_eq!(t.scheme(), scheme, "{url}");
            assert_eq!(t.host(), host, "{url}");
            assert_eq!(t.port(), port, "{url}");
            assert_eq!(t.path_and_query(), pq, "{url}");
        };
        ok("https://example.com", Https, "example.com", 443, "/");
        ok("http://example.com", Http, "example.com", 80, "/");
        ok("https://example.com/", Https, "example.com", 443, "/");
        ok(
            "https://hooks.example.com:8443/in/ctrl?x=1&y=%20",
            Https,
            "hooks.example.com",
            8443,
            "/in/ctrl?x=1&y=%20",
        );
        ok(
            "HTTPS://Example.COM/Path",
            Https,
            "example.com",
            443,
            "/Path",
        );
        ok("https://example.com?q", Https, "example.com", 443, "/?q");
        ok("https://example.com.", Https, "example.com.", 443, "/");
        ok("http://localhost:8080/h", Http, "localhost", 8080, "/h");
        ok(
            "http://my_host-1.internal/",
            Http,
            "my_host-1.internal",
            80,
            "/",
        );
        ok(
            "http://xn--bcher-kva.example/",
            Http,
            "xn--bcher-kva.example",
            80,
            "/",
        );
        ok("http://127.0.0.1:9000/", Http, "127.0.0.1", 9000, "/");
        ok("http://8.8.8.8/", Http, "8.8.8.8", 80, "/");
        ok("http://[::1]:8080/p", Http, "::1", 8080, "/p");
        ok("http://[2001:DB8::1]/", Http, "2001:db8::1", 80, "/");
        ok(
            "http://[::ffff:10.0.0.1]/",
            Http,
            "::ffff:10.0.0.1",
            80,
            "/",
        );
        ok("http://example.com:65535/", Http, "example.com", 65535, "/");
        ok("http://example.com:1/", Http, "example.com", 1, "/");
        ok("http://1example.com/", Http, "1example.com", 80, "/");
        ok("http://example.123abc/", Http, "example.123abc", 80, "/");

        let t = validate_url("http://[::1]/").unwrap();
        assert_eq!(t.ip(), Some(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        assert_eq!(validate_url("http://a.example/").unwrap().ip(), None);
        assert_eq!(
            validate_url("http://10.0.0.1/").unwrap().ip(),
            Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)))
        );

        let long_label = "a".repeat(63);
        ok(
            &format!("http://{long_label}.example/"),
            Http,
            &format!("{long_label}.example"),
            80,
            "/",
        );
        let max = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN - 20));
        assert_eq!(max.len(), MAX_URL_LEN);
        assert!(validate_url(&max).is_ok());
    }

    fn reason(url: &str) -> String {
        match validate_url(url) {
            Err(UrlError::Invalid { reason }) => reason,
            other => panic!("{url}: expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn validate_url_refuses_schemes_hosts_and_credentials() {
        for (url, scheme) in [
            ("ftp://example.com/", "ftp"),
            ("file:///etc/passwd", "file"),
            ("gopher://example.com/", "gopher"),
            ("javascript:alert(1)", "javascript"),
            ("mailto:a@example.com", "mailto"),
            ("ws://example.com/", "ws"),
            ("httpx://example.com/", "httpx"),
        ] {
            assert_eq!(
                validate_url(url),
                Err(UrlError::UnsupportedScheme {
                    scheme: scheme.to_owned()
                }),
                "{url}"
            );
        }
        for url in ["http://", "https:///path", "http://?q", "http://:8080/"] {
            assert_eq!(validate_url(url), Err(UrlError::MissingHost), "{url}");
        }
        for url in [
            "http://user:pass@example.com/",
            "http://user@example.com/",
            "http://@example.com/",
            "http://:@example.com/",
            "http://a@b@example.com/",
            "http://example.com@evil.example/",
        ] {
            assert_eq!(
                validate_url(url),
                Err(UrlError::CredentialsNotAllowed),
                "{url}"
            );
        }
    }

    #[test]
    fn validate_url_refuses_malformed() {
        let too_long = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN));
        let long_label = format!("http://{}.example/", "a".repeat(64));
        let long_host = format!("http://{}/", ["abcdefghi"; 26].join("."));
        for url in [
            "",
            too_long.as_str(),
            long_label.as_str(),
            long_host.as_str(),
            // not absolute
            "example.com",
            "/path",
            "//example.com/",
            "1http://example.com/",
            ":foo",
            "http:example.com",
            "http:/example.com",
            // characters
            "http://exa mple.com/",
            " http://example.com/",
            "http://example.com/ ",
            "http://example.com/\n",
            "http://example.com/\t",
            "http://bücher.example/",
            "http://example.com/ü",
            "http://exa%6dple.com/",
            "http://example.com\\@evil.example/",
            "http://example.com/a\\b",
            // fragments
            "http://example.com/#frag",
            "http://example.com#",
            // ports
            "http://example.com:/",
            "http://example.com:0/",
            "http://example.com:65536/",
            "http://example.com:99999/",
            "http://example.com:123456/",
            "http://example.com:+80/",
            "http://example.com:-1/",
            "http://example.com:8o/",
            "http://example.com:80:80/",
            "http://[::1]:/",
            "http://[::1]x/",
            // hosts
            "http://./",
            "http://../",
            "http://a..b/",
            "http://.example.com/",
            "http://-example.com/",
            "http://example-.com/",
            "http://exa*mple.com/",
            "http://exa!mple.com/",
            "http://[::1/",
            "http://::1/",
            "http://[fe80::1%25eth0]/",
            "http://[127.0.0.1]/",
            "http://[v1.fe]/",
            "http://[]/",
            // numeric hosts that resolvers read as IPv4 in other notations
            "http://2130706433/",
            "http://127.1/",
            "http://0x7f.0.0.1/",
            "http://0x7f000001/",
            "http://0177.0.0.1/",
            "http://127.000.000.001/",
            "http://127.0.0.1./",
            "http://1.2.3.4.5/",
            "http://256.0.0.1/",
            "http://example.0x10/",
            "http://example.123/",
        ] {
            let r = reason(url);
            assert!(!r.is_empty(), "{url}");
        }
        assert!(reason("http://example.com/#x").contains("fragment"));
        assert!(reason("http://example.com:0/").contains("port"));
        assert!(reason("http://example.com:70000/").contains("range"));
        assert!(reason("example.com").contains("absolute"));
    }

    #[test]
    fn check_addresses_literals() {
        let deny = UrlPolicy::default();
        let allow = UrlPolicy {
            allow_private: true,
        };
        assert!(!deny.allow_private);

        assert_eq!(
            check_addresses("8.8.8.8", 443, deny),
            Ok(vec!["8.8.8.8:443".parse().unwrap()])
        );
        assert_eq!(
            check_addresses("2606:4700:4700::1111", 443, deny),
            Ok(vec!["[2606:4700:4700::1111]:443".parse().unwrap()])
        );
        for host in [
            "127.0.0.1",
            "10.1.1.1",
            "169.254.169.254",
            "::1",
            "fd00::1",
            "0.0.0.0",
        ] {
            let ip: IpAddr = host.parse().unwrap();
            assert_eq!(
                check_addresses(host, 80, deny),
                Err(UrlError::ForbiddenAddress {
                    host: host.to_owned(),
                    addr: ip
                }),
                "{host}"
            );
            assert_eq!(
                check_addresses(host, 80, allow),
                Ok(vec![SocketAddr::new(ip, 80)]),
                "{host}"
            );
        }
    }

    #[test]
    fn check_addresses_resolves_names() {
        // `localhost` resolves from /etc/hosts, without DNS.
        let deny = UrlPolicy::default();
        match check_addresses("localhost", 8080, deny) {
            Err(UrlError::ForbiddenAddress { host, addr }) => {
                assert_eq!(host, "localhost");
                assert!(addr.is_loopback(), "{addr}");
            }
            other => panic!("expected ForbiddenAddress, got {other:?}"),
        }
        let allowed = check_addresses(
            "localhost",
            8080,
            UrlPolicy {
                allow_private: true,
            },
        )
        .unwrap();
        assert!(!allowed.is_empty());
        assert!(
            allowed
                .iter()
                .all(|a| a.port() == 8080 && a.ip().is_loopback())
        );
        // No duplicates.
        for (i, a) in allowed.iter().enumerate() {
            assert!(!allowed[i + 1..].contains(a));
        }
    }

    #[test]
    fn check_addresses_resolve_failure() {
        // `.invalid` never resolves (RFC 6761).
        match check_addresses("no-such-host.invalid", 443, UrlPolicy::default()) {
            Err(UrlError::Resolve { host, message }) => {
                assert_eq!(host, "no-such-host.invalid");
                assert!(!message.is_empty());
            }
            other => panic!("expected Resolve, got {other:?}"),
        }
    }

    #[test]
    fn policy_check_uses_target_host_and_port() {
        let t = validate_url("https://[::1]:8443/hook").unwrap();
        assert_eq!(
            UrlPolicy::default().check(&t),
            Err(UrlError::ForbiddenAddress {
                host: "::1".to_owned(),
                addr: IpAddr::V6(Ipv6Addr::LOCALHOST)
            })
        );
        assert_eq!(
            UrlPolicy {
                allow_private: true
            }
            .check(&t),
            Ok(vec!["[::1]:8443".parse().unwrap()])
        );
        let t = validate_url("http://1.1.1.1/").unwrap();
        assert_eq!(
            UrlPolicy::default().check(&t),
            Ok(vec!["1.1.1.1:80".parse().unwrap()])
        );
    }

    #[test]
    fn scheme_helpers() {
        assert_eq!(Scheme::Http.as_str(), "http");
        assert_eq!(Scheme::Https.as_str(), "https");
        assert_eq!(Scheme::Http.default_port(), 80);
        assert_eq!(Scheme::Https.default_port(), 443);
    }

    #[test]
    fn error_messages() {
        let e = UrlError::ForbiddenAddress {
            host: "internal.example".to_owned(),
            addr: "10.0.0.1".parse().unwrap(),
        };
        let text = e.to_string();
        assert!(
            text.contains("internal.example") && text.contains("10.0.0.1"),
            "{text}"
        );
        assert_eq!(
            UrlError::UnsupportedScheme {
                scheme: "ftp".to_owned()
            }
            .to_string(),
            "unsupported webhook URL scheme `ftp` (use http or https)"
        );
        let all = [
            UrlError::Invalid {
                reason: "x".to_owned(),
            },
            UrlError::MissingHost,
            UrlError::CredentialsNotAllowed,
            UrlError::Resolve {
                host: "h".to_owned(),
                message: "m".to_owned(),
            },
            e,
        ];
        for e in all {
            let dynerr: &dyn std::error::Error = &e;
            assert!(!dynerr.to_string().is_empty());
        }
    }
}
