//! Every request gets an id — the caller's `x-request-id` if it is a sane one, else a fresh one —
//! returned in the response's `x-request-id` header and carried by the request's log line, so a
//! client's report, a proxy's log and berth's log can be matched.
//!
//! Every request also runs in a `request` span. A generation holds on to the span until its answer
//! ends (a stream outlives the handler) and records the model, the outcome, token counts and time to
//! first token in it; an exporter (OTLP) sees the span close with all of it. A W3C `traceparent`
//! header makes the span part of the caller's trace.

use std::time::Instant;

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;
use tracing::field::Empty;

const HEADER: &str = "x-request-id";

tokio::task_local! {
    /// The id of the request being handled, for the log lines of work it starts.
    pub static REQUEST_ID: String;
}

/// The id of the request being handled, if any.
pub fn current() -> Option<String> {
    REQUEST_ID.try_with(|id| id.clone()).ok()
}

/// A caller's id is kept if it is short and plain (it goes into logs and headers as is).
fn acceptable(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// The trace and parent span of a W3C `traceparent` header (`00-<32 hex>-<16 hex>-<2 hex>`), if it
/// is well formed and not all zeros.
fn trace_parent(header: &str) -> Option<(&str, &str)> {
    let mut parts = header.trim().split('-');
    let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    let ok = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && nonzero(trace)
        && hex(parent, 16)
        && nonzero(parent)
        && hex(flags, 2)
        && (version != "00" || parts.next().is_none());
    ok.then_some((trace, parent))
}

pub async fn with_request_id(mut request: Request, next: Next) -> Response {
    let given = request.headers().get(HEADER).and_then(|v| v.to_str().ok()).filter(|v| acceptable(v));
    let id = given.map(str::to_string).unwrap_or_else(|| crate::request::request_id("req"));
    let value = HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("invalid"));
    request.headers_mut().insert(HEADER, value.clone());
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let parent = request.headers().get("traceparent").and_then(|v| v.to_str().ok()).and_then(trace_parent);
    // Field names follow OpenTelemetry's conventions; `trace_id` and `parent_span_id` tell an
    // exporter which trace the span belongs to.
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        http.request.method = %method,
        url.path = %path,
        http.response.status_code = Empty,
        model = Empty,
        outcome = Empty,
        prompt_tokens = Empty,
        completion_tokens = Empty,
        ttft_ms = Empty,
        trace_id = parent.map(|p| p.0),
        parent_span_id = parent.map(|p| p.1),
    );
    let started = Instant::now();
    let mut response = REQUEST_ID.scope(id.clone(), next.run(request)).instrument(span.clone()).await;
    response.headers_mut().insert(HEADER, value);
    let status = response.status().as_u16();
    span.record("http.response.status_code", status);
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    // Streams log when their headers go out; their tokens are counted in /metrics.
    if status >= 500 {
        tracing::warn!(request_id = %id, %method, path, status, ms, "request failed");
    } else {
        tracing::info!(request_id = %id, %method, path, status, ms, "request");
    }
    response
}

#[cfg(test)]
mod tests {
    use super::{acceptable, trace_parent};

    #[test]
    fn only_well_formed_trace_parents_are_followed() {
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(trace_parent(&format!("00-{trace}-00f067aa0ba902b7-01")), Some((trace, "00f067aa0ba902b7")));
        for bad in [
            "",
            "00-short-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(trace_parent(bad), None, "{bad}");
        }
    }

    #[test]
    fn only_plain_ids_are_kept() {
        assert!(acceptable("abc-123_x.y:z"));
        assert!(!acceptable(""));
        assert!(!acceptable("has space"));
        assert!(!acceptable("new\nline"));
        assert!(!acceptable(&"a".repeat(129)));
    }
}
