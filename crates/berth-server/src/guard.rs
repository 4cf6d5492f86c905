//! Who may talk to the server before there are API keys: a server bound to a loopback address
//! answers only requests whose `Host` names this machine, so a web page cannot reach it through
//! DNS rebinding (a name the attacker controls, re-pointed at 127.0.0.1 after the page loaded) —
//! the attack that let pages delete and pull models on other local model servers.

use std::net::IpAddr;

use axum::extract::{Request, State};
use axum::http::header::HOST;
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

#[cfg(test)]
mod tests {
    use super::*;

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
