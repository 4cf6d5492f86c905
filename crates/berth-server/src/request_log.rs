//! Every request gets an id — the caller's `x-request-id` if it is a sane one, else a fresh one —
//! returned in the response's `x-request-id` header and carried by the request's log line, so a
//! client's report, a proxy's log and berth's log can be matched.

use std::time::Instant;

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;

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

pub async fn with_request_id(mut request: Request, next: Next) -> Response {
    let given = request.headers().get(HEADER).and_then(|v| v.to_str().ok()).filter(|v| acceptable(v));
    let id = given.map(str::to_string).unwrap_or_else(|| crate::request::request_id("req"));
    let value = HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("invalid"));
    request.headers_mut().insert(HEADER, value.clone());
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let started = Instant::now();
    let mut response = REQUEST_ID.scope(id.clone(), next.run(request)).await;
    response.headers_mut().insert(HEADER, value);
    let status = response.status().as_u16();
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
    use super::acceptable;

    #[test]
    fn only_plain_ids_are_kept() {
        assert!(acceptable("abc-123_x.y:z"));
        assert!(!acceptable(""));
        assert!(!acceptable("has space"));
        assert!(!acceptable("new\nline"));
        assert!(!acceptable(&"a".repeat(129)));
    }
}
