//! The admin API against web pages. A page a developer visits can send
//! requests to their localhost server: a form or `fetch` "simple request"
//! (`text/plain`, no preflight) from another origin, or, through DNS
//! rebinding, a same-origin request to a name the attacker resolves to
//! 127.0.0.1. So, on every `/admin/` request:
//!
//! - an `Origin` that is neither the server's own (its host and port equal
//!   the `Host`'s) nor in `--allowed-origins` is refused with 403;
//! - without API keys (anonymous callers), a `Host` that is not a loopback
//!   name (`localhost`, 127.0.0.0/8, `[::1]`) nor in `--allowed-hosts` is
//!   refused with 403; with keys, only when `--allowed-hosts` is set;
//! - a write (`POST`, `PUT`, `PATCH`, `DELETE`) with a body must say
//!   `content-type: application/json` (415 otherwise), which a page cannot
//!   send to another origin without a CORS preflight, which nothing here
//!   answers.
//!
//! The gRPC admin API needs none of this: browsers cannot speak gRPC.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::Request;
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::body::Body as _;

use super::error::ApiError;
use crate::config::{ListenerConfig, normalize_origin, split_host_port};

/// Who may drive the admin API from a browser.
#[derive(Debug, Clone)]
pub struct AdminGuard {
    /// No API keys: callers are anonymous, so the `Host` is always checked.
    anonymous: bool,
    /// Normalized origins (`scheme://host:port`).
    allowed_origins: Vec<String>,
    /// Lower-case names; `*.domain` for subdomains.
    allowed_hosts: Vec<String>,
}

impl AdminGuard {
    /// The guard for a server with (`anonymous == false`) or without keys.
    pub fn new(cfg: &ListenerConfig, anonymous: bool) -> Self {
        Self {
            anonymous,
            allowed_origins: cfg.allowed_origins.clone(),
            allowed_hosts: cfg.allowed_hosts.clone(),
        }
    }

    /// `routes` (the admin API) with this guard for [`guard`] to find.
    pub fn provide<S: Clone + Send + Sync + 'static>(
        self,
        routes: axum::Router<S>,
    ) -> axum::Router<S> {
        routes.layer(axum::Extension(Arc::new(self)))
    }

    /// Refuses what a web page could have sent; `has_body` says whether the
    /// request carries a body.
    pub fn check(
        &self,
        method: &Method,
        authority: Option<&str>,
        headers: &HeaderMap,
        has_body: bool,
    ) -> Result<(), ApiError> {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or(authority)
            .unwrap_or("");
        if let Some(origin) = headers.get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("");
            if !self.origin_allowed(origin, host) {
                return Err(ApiError::Forbidden(format!(
                    "the admin API refuses requests from web pages of other origins: Origin `{}` is not this server (Host `{}`) nor in --allowed-origins",
                    printable(origin),
                    printable(host)
                )));
            }
        }
        if (self.anonymous || !self.allowed_hosts.is_empty()) && !self.host_allowed(host) {
            return Err(ApiError::Forbidden(format!(
                "the admin API answers to loopback names and --allowed-hosts only{}: Host `{}` is neither (a DNS-rebound name?)",
                if self.anonymous {
                    " when no API keys are configured"
                } else {
                    ""
                },
                printable(host)
            )));
        }
        let write = matches!(
            *method,
            Method::POST | Method::PUT | Method::PATCH | Method::DELETE
        );
        if write && has_body && !is_json(headers) {
            let given = headers
                .get(header::CONTENT_TYPE)
                .map(|v| format!("`{}`", printable(v.to_str().unwrap_or("?"))))
                .unwrap_or_else(|| "none".into());
            return Err(ApiError::UnsupportedMediaType(format!(
                "admin writes with a body must be sent with `content-type: application/json` (got {given})"
            )));
        }
        Ok(())
    }

    fn origin_allowed(&self, origin: &str, host: &str) -> bool {
        let Some(origin) = normalize_origin(origin) else {
            // `null` (a sandboxed page, a file) or garbage: never ours.
            return false;
        };
        if self.allowed_origins.contains(&origin) {
            return true;
        }
        // Same host and port as the request's own authority; the port of a
        // Host without one is the origin's scheme's default.
        let (scheme, rest) = origin.split_once("://").unwrap_or(("", ""));
        let default = if scheme == "https" { 443 } else { 80 };
        let host = host.to_ascii_lowercase();
        match split_host_port(&host) {
            Some((h, p)) => rest == format!("{h}:{}", p.unwrap_or(default)),
            None => false,
        }
    }

    fn host_allowed(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        let Some((name, _)) = split_host_port(&host) else {
            return false;
        };
        if is_loopback(name) {
            return true;
        }
        let name = name.trim_end_matches('.');
        self.allowed_hosts
            .iter()
            .any(|a| match a.strip_prefix("*.") {
                Some(domain) => name
                    .strip_suffix(domain)
                    .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
                None => a == name,
            })
    }
}

/// The middleware of the admin routes, after the role check (so a caller
/// without the admin role is told that first), before any body is read. The
/// guard comes from [`AdminGuard::provide`]; without one, the strictest:
/// loopback hosts and the server's own origin only.
pub async fn guard(req: Request, next: Next) -> Response {
    static STRICT: std::sync::LazyLock<Arc<AdminGuard>> = std::sync::LazyLock::new(|| {
        Arc::new(AdminGuard {
            anonymous: true,
            allowed_origins: vec![],
            allowed_hosts: vec![],
        })
    });
    let g = req
        .extensions()
        .get::<Arc<AdminGuard>>()
        .unwrap_or(&*STRICT)
        .clone();
    let body = req.body();
    let has_body = !body.is_end_stream() && body.size_hint().exact() != Some(0);
    let checked = g.check(
        req.method(),
        req.uri().authority().map(|a| a.as_str()),
        req.headers(),
        has_body,
    );
    match checked {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// `application/json`, with or without parameters.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

/// `localhost`, 127.0.0.0/8, `[::1]` (and IPv4-mapped loopback).
fn is_loopback(name: &str) -> bool {
    let name = name.trim_end_matches('.');
    if name == "localhost" {
        return true;
    }
    let ip = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    match ip.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4.is_loopback(),
        Ok(IpAddr::V6(v6)) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        Err(_) => false,
    }
}

/// A header value for an error message: at most 200 characters, controls
/// dropped.
fn printable(v: &str) -> String {
    v.chars().filter(|c| !c.is_control()).take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(anonymous: bool, origins: &[&str], hosts: &[&str]) -> AdminGuard {
        AdminGuard {
            anonymous,
            allowed_origins: origins
                .iter()
                .map(|o| normalize_origin(o).unwrap())
                .collect(),
            allowed_hosts: hosts.iter().map(|h| h.to_string()).collect(),
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    /// (case, anonymous, method, headers, has a body, the status or OK).
    type Case = (
        &'static str,
        bool,
        &'static str,
        &'static [(&'static str, &'static str)],
        bool,
        Option<u16>,
    );

    #[rustfmt::skip] // one row a case
    const CASES: &[Case] = &[
        ("a JSON write from curl", true, "POST", &[("host", "127.0.0.1:8080"), ("content-type", "application/json")], true, None),
        ("charset parameter", true, "PUT", &[("host", "localhost:8080"), ("content-type", "Application/JSON; charset=utf-8")], true, None),
        ("text/plain write", true, "POST", &[("host", "127.0.0.1:8080"), ("content-type", "text/plain")], true, Some(415)),
        ("form write", false, "PUT", &[("host", "box.lan:8080"), ("content-type", "application/x-www-form-urlencoded")], true, Some(415)),
        ("no content type with a body", true, "POST", &[("host", "127.0.0.1:8080")], true, Some(415)),
        ("a body-less POST", true, "POST", &[("host", "127.0.0.1:8080")], false, None),
        ("a body-less DELETE", true, "DELETE", &[("host", "[::1]:8080")], false, None),
        ("a read needs no content type", true, "GET", &[("host", "127.0.0.1:8080")], false, None),
        ("same origin", true, "POST", &[("host", "127.0.0.1:8080"), ("origin", "http://127.0.0.1:8080"), ("content-type", "application/json")], true, None),
        ("same origin, default port", false, "POST", &[("host", "a.corp.example"), ("origin", "https://a.corp.example"), ("content-type", "application/json")], true, None),
        ("with keys and hosts listed, another host", false, "GET", &[("host", "llm.example")], false, Some(403)),
        ("foreign origin", true, "POST", &[("host", "127.0.0.1:8080"), ("origin", "https://evil.example"), ("content-type", "application/json")], true, Some(403)),
        ("foreign origin, with keys", false, "DELETE", &[("host", "127.0.0.1:8080"), ("origin", "http://127.0.0.1:3000")], false, Some(403)),
        ("foreign origin on a read", false, "GET", &[("host", "127.0.0.1:8080"), ("origin", "https://evil.example")], false, Some(403)),
        ("null origin", true, "POST", &[("host", "127.0.0.1:8080"), ("origin", "null"), ("content-type", "application/json")], true, Some(403)),
        ("allowed origin", true, "POST", &[("host", "127.0.0.1:8080"), ("origin", "HTTPS://Console.Example:443"), ("content-type", "application/json")], true, None),
        ("rebound name, anonymous", true, "POST", &[("host", "attacker.example:8080"), ("content-type", "application/json")], true, Some(403)),
        ("rebound name on a read", true, "GET", &[("host", "attacker.example:8080")], false, Some(403)),
        ("no host, anonymous", true, "GET", &[], false, Some(403)),
        ("127/8, anonymous", true, "POST", &[("host", "127.1.2.3:8080"), ("content-type", "application/json")], true, None),
        ("allowed host, anonymous", true, "POST", &[("host", "box.lan:8080"), ("content-type", "application/json")], true, None),
        ("allowed subdomain", true, "GET", &[("host", "a.corp.example")], false, None),
        ("the bare wildcard domain is not its subdomain", true, "GET", &[("host", "corp.example")], false, Some(403)),
        ("a look-alike suffix", true, "GET", &[("host", "evilcorp.example")], false, Some(403)),
    ];

    #[test]
    fn admin_requests_a_web_page_could_send_are_refused() {
        for &(case, anonymous, method, hdrs, has_body, want) in CASES {
            let g = guard(
                anonymous,
                &["https://console.example"],
                &["box.lan", "*.corp.example"],
            );
            let method: Method = method.parse().unwrap();
            let got = g.check(&method, None, &headers(hdrs), has_body);
            match (got, want) {
                (Ok(()), None) => {}
                (Err(e), Some(status)) => {
                    assert_eq!(e.status().as_u16(), status, "{case}: {e}")
                }
                (got, want) => panic!("{case}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn with_keys_any_host_is_served_unless_hosts_are_listed() {
        let open = guard(false, &[], &[]);
        let h = headers(&[("host", "llm.internal:8080")]);
        assert!(open.check(&Method::GET, None, &h, false).is_ok());
        let listed = guard(false, &[], &["llm.prod"]);
        assert!(listed.check(&Method::GET, None, &h, false).is_err());
        let h = headers(&[("host", "LLM.prod.:443")]);
        assert!(listed.check(&Method::GET, None, &h, false).is_ok());
        // HTTP/2 carries the host in the authority.
        let anonymous = guard(true, &[], &[]);
        let none = HeaderMap::new();
        assert!(
            anonymous
                .check(&Method::GET, Some("localhost:8080"), &none, false)
                .is_ok()
        );
    }
}
