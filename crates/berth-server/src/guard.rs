//! Who may talk to the server before there are API keys: a server bound to a loopback address
//! answers only requests whose `Host` names this machine, so a web page cannot reach it through
//! DNS rebinding (a name the attacker controls, re-pointed at 127.0.0.1 after the page loaded) —
//! the attack that let pages delete and pull models on other local model servers.

use std::net::IpAddr;

use axum::extract::{Request, State};
use axum::http::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_METHOD, HOST, ORIGIN, VARY,
};
use axum::http::{HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// Names a request may carry in its `Host` header.
#[derive(Debug, Clone)]
pub struct HostGuard {
    /// `None`: any host (the server listens on a non-loopback address, where names are the
    /// operator's business).
    allowed: Option<Vec<String>>,
}

impl HostGuard {
    /// For a server listening on `bind`, with extra names the operator allows.
    pub fn new(bind: &str, extra: &[String]) -> Self {
        if !is_loopback(bind) {
            return Self { allowed: None };
        }
        let mut allowed: Vec<String> = ["localhost", "127.0.0.1", "::1"].iter().map(|s| s.to_string()).collect();
        allowed.push(bind.trim_matches(|c| c == '[' || c == ']').to_ascii_lowercase());
        allowed.extend(extra.iter().map(|h| h.to_ascii_lowercase()));
        Self { allowed: Some(allowed) }
    }

    fn admits(&self, host_header: Option<&str>) -> bool {
        let Some(allowed) = &self.allowed else { return true };
        let Some(host) = host_header else { return false };
        let name = host_name(host).to_ascii_lowercase();
        allowed.contains(&name) || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
}

/// Whether `bind` (an address or a name) is a loopback one.
pub fn is_loopback(bind: &str) -> bool {
    let b = bind.trim_matches(|c| c == '[' || c == ']');
    b.eq_ignore_ascii_case("localhost") || b.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The name in a `Host` header, without the port (`[::1]:8080` → `::1`).
fn host_name(host: &str) -> &str {
    let host = host.trim();
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    }
}

pub async fn check_host(State(guard): State<HostGuard>, request: Request, next: Next) -> Response {
    let host = request.headers().get(HOST).and_then(|h| h.to_str().ok());
    if guard.admits(host) {
        return next.run(request).await;
    }
    ApiError::forbidden(format!(
        "the Host header {:?} is not a name of this machine; berth listens on loopback and answers only to localhost names (allow another with --allowed-host NAME)",
        host.unwrap_or("")
    ))
    .into_response()
}

/// Which web pages may call the API. A browser tells with `Origin` where a request comes from;
/// without this check any page the user opens could drive a local server (a cross-site
/// `text/plain` POST needs no preflight). Pages of the server's own origin may; others only when
/// the operator allows their origin (`--allowed-origin`, like Ollama's OLLAMA_ORIGINS), and then
/// CORS preflights are answered for them.
#[derive(Debug, Clone, Default)]
pub struct OriginGuard {
    /// Allowed origins: exact (`https://app.example`), with any port (`http://localhost:*`), or all (`*`).
    allowed: Vec<String>,
}

impl OriginGuard {
    pub fn new(allowed: &[String]) -> Self {
        Self { allowed: allowed.iter().map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase()).collect() }
    }

    fn admits(&self, origin: &str, host: Option<&str>) -> bool {
        let origin = origin.trim().to_ascii_lowercase();
        let same_origin = host.is_some_and(|h| {
            let h = h.trim().to_ascii_lowercase();
            origin == format!("http://{h}") || origin == format!("https://{h}")
        });
        same_origin
            || self.allowed.iter().any(|a| {
                a == "*"
                    || *a == origin
                    || a.strip_suffix(":*").is_some_and(|base| {
                        origin == base
                            || origin
                                .strip_prefix(base)
                                .and_then(|p| p.strip_prefix(':'))
                                .is_some_and(|port| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
                    })
            })
    }
}

/// Refuse requests from pages of origins not allowed; answer allowed ones' preflights and mark
/// their responses readable by the page.
pub async fn check_origin(State(guard): State<OriginGuard>, request: Request, next: Next) -> Response {
    let Some(origin) = request.headers().get(ORIGIN).and_then(|v| v.to_str().ok()).map(str::to_string) else {
        return next.run(request).await;
    };
    let host = request.headers().get(HOST).and_then(|h| h.to_str().ok());
    if !guard.admits(&origin, host) {
        return ApiError::forbidden(format!(
            "requests from web pages of {origin:?} are refused; allow that origin with --allowed-origin {origin}"
        ))
        .with_code("origin_not_allowed")
        .into_response();
    }
    let preflight =
        request.method() == Method::OPTIONS && request.headers().contains_key(ACCESS_CONTROL_REQUEST_METHOD);
    // The headers the page's client wants to send (the SDKs add their own, `x-stainless-*`,
    // `anthropic-version`): the origin is allowed, so they are too, within a sane length.
    let asked_headers =
        request.headers().get(axum::http::header::ACCESS_CONTROL_REQUEST_HEADERS).filter(|v| v.len() <= 2048).cloned();
    let mut response =
        if preflight { axum::http::StatusCode::NO_CONTENT.into_response() } else { next.run(request).await };
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&origin) {
        headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, value);
    }
    headers.insert(VARY, HeaderValue::from_static("Origin"));
    headers.insert(
        ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("x-request-id, retry-after, x-berth-model-version"),
    );
    if preflight {
        headers.insert(ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, DELETE, OPTIONS"));
        headers.insert(
            ACCESS_CONTROL_ALLOW_HEADERS,
            asked_headers.unwrap_or(HeaderValue::from_static(
                "authorization, content-type, x-request-id, traceparent, x-api-key, anthropic-version, x-berth-session",
            )),
        );
        headers.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_of_other_origins_are_refused_unless_allowed() {
        let none = OriginGuard::new(&[]);
        assert!(none.admits("http://127.0.0.1:12480", Some("127.0.0.1:12480")), "the server's own pages");
        assert!(!none.admits("http://evil.example", Some("127.0.0.1:12480")));
        assert!(!none.admits("null", Some("127.0.0.1:12480")));
        let some = OriginGuard::new(&["http://localhost:*".into(), "https://app.example/".into()]);
        for ok in ["http://localhost:3000", "http://localhost", "https://app.example"] {
            assert!(some.admits(ok, None), "{ok}");
        }
        for bad in
            ["http://localhost.evil:3000", "http://localhost:", "https://app.example.evil", "https://localhost:1"]
        {
            assert!(!some.admits(bad, None), "{bad}");
        }
        assert!(OriginGuard::new(&["*".into()]).admits("http://anything", None));
    }

    #[test]
    fn loopback_servers_answer_only_to_local_names() {
        let g = HostGuard::new("127.0.0.1", &["berth.internal".into()]);
        for ok in ["127.0.0.1:12480", "localhost", "LOCALHOST:80", "[::1]:12480", "127.0.0.2", "berth.internal:1"] {
            assert!(g.admits(Some(ok)), "{ok}");
        }
        for bad in ["evil.example", "evil.example:12480", "127.0.0.1.evil.example", "", "localhost.evil"] {
            assert!(!g.admits(Some(bad)), "{bad}");
        }
        assert!(!g.admits(None));
        assert!(HostGuard::new("0.0.0.0", &[]).admits(Some("anything")));
        assert!(is_loopback("::1") && is_loopback("[::1]") && is_loopback("localhost") && !is_loopback("0.0.0.0"));
    }
}
