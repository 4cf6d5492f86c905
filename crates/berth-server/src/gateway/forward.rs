//! One request through the gateway: read its body (within the limits), plan the replicas to try,
//! send it to the first, and relay the answer back unchanged — status, headers and body, SSE and
//! NDJSON frame by frame as they come, so back-pressure holds end to end. A client that hangs up
//! drops the relay, which closes the connection to the replica, which cancels the generation and
//! frees its sequence.
//!
//! A request that fails before the replica answered (connection refused or reset, the replica
//! killed mid-generation of a non-streamed answer, or before a stream's first event: a stream's
//! head is held back until that event comes) or that a replica declines (503: draining or
//! starting; 404 for a model it does not have) is sent to the next replica in the plan: nothing
//! has reached the client yet. Once the first byte went to the client it never is: a stream the
//! replica cuts ends with an error event in the API's own format instead.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::Gateway;
use super::affinity;
use super::pool::{Outcome, Upstream};
use crate::error::{ApiError, Shape};

pub type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Replicas tried for one request, at most.
const MAX_ATTEMPTS: usize = 3;

/// Plain HTTP for the replicas, HTTPS (the system's CA certificates, `SSL_CERT_FILE` honoured) for
/// a remote endpoint that wants it.
pub fn client() -> Result<HttpClient, rustls::Error> {
    let mut connector = HttpConnector::new();
    // A replica that does not accept within this is treated as down for this request.
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    connector.set_nodelay(true);
    connector.enforce_http(false);
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for cert in found.certs {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        tracing::warn!("no CA certificates found: an https:// remote cannot be reached (set SSL_CERT_FILE)");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(connector);
    Ok(Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(connector))
}

/// Headers that belong to one connection, not to the request or answer (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers the `Connection` header names are hop-by-hop too.
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|n| n.trim().to_ascii_lowercase()))
        .collect();
    for name in HOP_BY_HOP.iter().copied().chain(named.iter().map(String::as_str)) {
        headers.remove(name);
    }
}

/// Every request that is not the gateway's own.
pub async fn forward(State(gateway): State<Arc<Gateway>>, request: Request) -> Response {
    let started = Instant::now();
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path().to_string();
    let shape = Shape::of_path(&path);
    let timeout = parts.extensions.get::<crate::request::BodyTimeout>().map_or(Duration::from_secs(60), |t| t.0);
    let body = match tokio::time::timeout(timeout, axum::body::to_bytes(body, gateway.config.body_limit)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => return crate::request::too_large().into_response(),
        Err(_) => return ApiError::bad_request("the request body did not arrive in time").into_response(),
    };
    let facts = affinity::facts(&path, &body);
    let caller = crate::auth::caller();
    if let (Some(caller), Some(model)) = (&caller, &facts.model) {
        let familiar = berth_store::Reference::parse(model).map_or_else(|_| model.clone(), |r| r.familiar());
        if let Err(e) = caller.check_model(&familiar) {
            return e.into_response();
        }
    }
    let mut plan = gateway.plan(&path, &facts);
    // Every replica full of the gateway's requests (or others already waiting): wait for a turn,
    // fair between keys, instead of joining a replica's first-come queue.
    if gateway.must_wait(&plan) {
        let refused = |message: String| {
            gateway.metrics.queue_refused.fetch_add(1, Ordering::Relaxed);
            ApiError::overloaded(message, 1).into_response()
        };
        let Some(turn) = gateway.queue.join(tenant_of(&parts.headers)) else {
            return refused(format!(
                "every replica is busy and {} requests are waiting at the gateway, its limit; retry shortly",
                gateway.config.max_queue
            ));
        };
        if !matches!(tokio::time::timeout(gateway.config.queue_timeout, turn).await, Ok(Ok(()))) {
            return refused(format!(
                "every replica stayed busy for {} s while this request waited at the gateway; retry shortly",
                gateway.config.queue_timeout.as_secs()
            ));
        }
        plan = gateway.plan(&path, &facts);
    }
    if plan.is_empty() {
        gateway.metrics.unserved.fetch_add(1, Ordering::Relaxed);
        return ApiError::unavailable("no replica behind this gateway is ready; retry shortly").into_response();
    }
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::HOST);
    // The page's origin was checked here (the gateway's --allowed-origin); a replica would judge
    // it against its own address and refuse a page the gateway served.
    parts.headers.remove(header::ORIGIN);
    // At most MAX_ATTEMPTS replicas, and the remote where it is the last resort.
    if plan.len() > MAX_ATTEMPTS {
        let fallback = plan.pop().filter(|(u, _)| gateway.remote_of(u).is_some());
        plan.truncate(MAX_ATTEMPTS);
        plan.extend(fallback);
    }
    // Requests whose usage is recorded here: an OpenAI stream is asked for its usage if its client
    // did not ask (the event is taken out again on the way back).
    let usage_asked = caller
        .as_ref()
        .filter(|_| facts.usage_unasked)
        .and_then(|_| super::keys::with_usage_asked(&path, &body))
        .map(Bytes::from);
    let attempts = plan.len();
    for (attempt, (upstream, reason)) in plan.into_iter().enumerate() {
        let last = attempt + 1 == attempts;
        gateway.metrics.decided(reason);
        let in_flight = InFlight::start(&gateway, &upstream);
        let remote = gateway.remote_of(&upstream);
        // Not to the remote: another server's stream may carry usage in other ways.
        let strip_usage = usage_asked.as_ref().filter(|_| remote.is_none());
        let sent = strip_usage.unwrap_or(&body);
        let Some(outgoing) = outgoing(&parts, &upstream.base, sent, facts.model.as_deref(), remote) else {
            return ApiError::bad_request("the request cannot be forwarded").into_response();
        };
        let (head, mut incoming) = match gateway.client.request(outgoing).await {
            Ok(answer) => answer.into_parts(),
            Err(e) => {
                failed_before_answer(&upstream, is_refused(&e), &e);
                continue;
            }
        };
        let events = Events::of(&head.headers, shape, &path);
        // A stream's head is held back until its first event: a replica that dies before that (the
        // request still queued there) has sent the client nothing, so the next replica gets it.
        let mut first = None;
        if events.is_some() && head.status.is_success() {
            match incoming.frame().await {
                Some(Ok(frame)) => first = frame.into_data().ok(),
                Some(Err(e)) => {
                    failed_before_answer(&upstream, false, &e);
                    continue;
                }
                None => {}
            }
        }
        let now = Instant::now();
        upstream.request_ended(Outcome::Answered, now);
        upstream.head_latency.observe(now.duration_since(started).as_secs_f64());
        let declined = head.status == StatusCode::SERVICE_UNAVAILABLE
            || (head.status == StatusCode::NOT_FOUND && parts.method == axum::http::Method::POST);
        if declined && !last {
            tracing::debug!(upstream = %upstream.base, status = %head.status, "declined; trying the next replica");
            continue;
        }
        upstream.answered.fetch_add(1, Ordering::Relaxed);
        // Generating requests are recorded under their key when their answer ends.
        let tap = caller
            .clone()
            .filter(|_| parts.method == axum::http::Method::POST && facts.model.is_some())
            .map(|c| super::keys::UsageTap::new(c, facts.model.as_deref(), started, head.status.is_success()));
        let mut response = relay(head, incoming, first, events, in_flight, tap, strip_usage.is_some());
        let served_by = HeaderValue::from_static(if remote.is_some() { "remote" } else { "replica" });
        response.headers_mut().insert("x-berth-served-by", served_by);
        return response;
    }
    gateway.metrics.unserved.fetch_add(1, Ordering::Relaxed);
    ApiError::unavailable("no replica behind this gateway could take the request; retry shortly").into_response()
}

/// The request as it goes to `base`. To the remote endpoint the client's own credentials do not
/// go: its key replaces them, and the model gets the remote's name for it.
fn outgoing(
    parts: &axum::http::request::Parts,
    base: &str,
    body: &Bytes,
    model: Option<&str>,
    remote: Option<&super::Remote>,
) -> Option<axum::http::Request<Full<Bytes>>> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut builder = axum::http::Request::builder().method(parts.method.clone()).uri(format!("{base}{path}"));
    let headers = builder.headers_mut()?;
    headers.extend(parts.headers.clone());
    // The body may have changed on the way (usage asked for, a model renamed): its own length goes.
    headers.remove(header::CONTENT_LENGTH);
    let mut body = body.clone();
    if let Some(remote) = remote {
        for name in [header::AUTHORIZATION, header::COOKIE, header::HeaderName::from_static("x-api-key")] {
            headers.remove(name);
        }
        if let Some(value) = &remote.authorization {
            headers.insert(header::AUTHORIZATION, value.clone());
        }
        if let Some(model) = model
            && remote.model_name(model) != model
            && let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(&body)
        {
            value["model"] = remote.model_name(model).into();
            body = Bytes::from(serde_json::to_vec(&value).ok()?);
        }
    }
    builder.body(Full::new(body)).ok()
}

/// A request that failed at `upstream` before anything reached the client: counted, and the
/// replica ejected when that was one failure too many.
fn failed_before_answer(upstream: &Upstream, refused: bool, error: &dyn std::fmt::Display) {
    upstream.failures.fetch_add(1, Ordering::Relaxed);
    if upstream.request_ended(if refused { Outcome::Refused } else { Outcome::Failed }, Instant::now()) {
        tracing::warn!(upstream = %upstream.base, "replica ejected: a request to it failed ({error})");
    }
    tracing::info!(upstream = %upstream.base, "a request failed there before an answer ({error}); trying the next replica");
}

/// Whether the connection was refused (nothing listens there), as opposed to failing later.
pub(super) fn is_refused(e: &hyper_util::client::legacy::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::ConnectionRefused;
        }
        source = s.source();
    }
    false
}

/// A request the gateway has at a replica: counted in its load until the answer is relayed.
struct InFlight {
    upstream: Arc<Upstream>,
    gateway: Arc<Gateway>,
}

impl InFlight {
    fn start(gateway: &Arc<Gateway>, upstream: &Arc<Upstream>) -> InFlight {
        upstream.in_flight.fetch_add(1, Ordering::Relaxed);
        upstream.requests.fetch_add(1, Ordering::Relaxed);
        gateway.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight { upstream: upstream.clone(), gateway: gateway.clone() }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.upstream.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.gateway.in_flight.fetch_sub(1, Ordering::Relaxed);
        // A slot is free: the next key's turn.
        self.gateway.queue.release();
    }
}

/// Whom a request counts against in the fair queue: its key, hashed (never kept).
fn tenant_of(headers: &HeaderMap) -> super::queue::Tenant {
    let key = headers.get(header::AUTHORIZATION).or_else(|| headers.get("x-api-key"));
    key.map_or(0, |k| super::hash64(&[k.as_bytes()]))
}

/// The replica's answer, relayed as it arrives (`first`: its first piece, already read), less the
/// usage event the gateway asked for on its own when `strip_usage`.
fn relay(
    mut head: axum::http::response::Parts,
    incoming: hyper::body::Incoming,
    first: Option<Bytes>,
    events: Option<Events>,
    in_flight: InFlight,
    mut tap: Option<super::keys::UsageTap>,
    strip_usage: bool,
) -> Response {
    strip_hop_by_hop(&mut head.headers);
    if let Some(tap) = &mut tap {
        let length = head.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok());
        tap.expect(if events.is_some() { None } else { length });
        if let Some(first) = &first {
            tap.saw(first);
        }
    }
    let frames = futures_util::stream::unfold(Some((incoming, in_flight, tap)), move |state| async move {
        let (mut body, in_flight, mut tap) = state?;
        match body.frame().await {
            None => {
                if let Some(tap) = &mut tap {
                    tap.ended(crate::accounts::Outcome::Completed);
                }
                None
            }
            Some(Ok(frame)) => {
                let data = frame.into_data().unwrap_or_default();
                if let Some(tap) = &mut tap {
                    tap.saw(&data);
                }
                Some((Ok::<Bytes, std::io::Error>(data), Some((body, in_flight, tap))))
            }
            Some(Err(e)) => {
                if let Some(tap) = &mut tap {
                    tap.ended(crate::accounts::Outcome::Failed);
                }
                let upstream = &in_flight.upstream;
                upstream.cut.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(upstream = %upstream.base, "the replica cut an answer short: {e}");
                match events {
                    // A stream ends with an error event the client's library understands.
                    Some(kind) => Some((Ok(kind.error_event()), None)),
                    // A plain body cut short stays cut: the client sees an incomplete answer.
                    None => Some((Err(std::io::Error::other(e)), None)),
                }
            }
        }
    });
    let first = futures_util::stream::iter(first.map(Ok::<Bytes, std::io::Error>));
    let answer = first.chain(frames);
    let body = if strip_usage && matches!(events, Some(Events::Sse(_))) {
        Body::from_stream(without_usage_event(answer))
    } else {
        Body::from_stream(answer)
    };
    let mut response = Response::from_parts(head, body);
    if events.is_some() {
        // The error event is appended to the replica's bytes: a length would no longer hold.
        response.headers_mut().remove(header::CONTENT_LENGTH);
        response.headers_mut().insert("x-accel-buffering", HeaderValue::from_static("no"));
    }
    response
}

/// An SSE answer less its usage event (see [`super::keys::UsageStripper`]); no empty piece is
/// sent on.
fn without_usage_event(
    answer: impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let state = (Box::pin(answer), super::keys::UsageStripper::default(), false);
    futures_util::stream::unfold(state, |(mut answer, mut stripper, ended)| async move {
        if ended {
            return None;
        }
        loop {
            match answer.next().await {
                Some(Ok(bytes)) => {
                    let out = stripper.push(&bytes);
                    if !out.is_empty() {
                        return Some((Ok(out), (answer, stripper, false)));
                    }
                }
                Some(Err(e)) => return Some((Err(e), (answer, stripper, true))),
                None => {
                    let rest = stripper.finish();
                    return (!rest.is_empty()).then_some((Ok(rest), (answer, stripper, true)));
                }
            }
        }
    })
}

/// How a streamed answer's events are written, to end one with an error.
#[derive(Debug, Clone, Copy)]
enum Events {
    Sse(Shape),
    Responses,
    NdJson,
}

const CUT: &str = "the replica serving this answer stopped before it finished; send the request again";

impl Events {
    /// How an answer with these headers streams, if it does.
    fn of(headers: &HeaderMap, shape: Shape, path: &str) -> Option<Events> {
        let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        if content_type.starts_with("text/event-stream") {
            Some(if path == "/v1/responses" { Events::Responses } else { Events::Sse(shape) })
        } else if content_type.starts_with("application/x-ndjson") {
            Some(Events::NdJson)
        } else {
            None
        }
    }

    fn error_event(self) -> Bytes {
        let error = ApiError::unavailable(CUT);
        let text = match self {
            Events::Sse(Shape::Anthropic) => format!("event: error\ndata: {}\n\n", error.body_in(Shape::Anthropic)),
            Events::Sse(_) => format!("data: {}\n\n", error.body_in(Shape::OpenAi)),
            Events::Responses => format!(
                "event: error\ndata: {}\n\n",
                serde_json::json!({"type": "error", "code": "upstream_failed", "message": CUT, "param": null})
            ),
            Events::NdJson => format!("{}\n", error.body_in(Shape::Ollama)),
        };
        Bytes::from(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_not_forwarded() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, x-secret-hop"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("authorization", HeaderValue::from_static("Bearer k"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("authorization"));
    }

    #[test]
    fn error_events_are_each_apis_own() {
        let openai = String::from_utf8(Events::Sse(Shape::OpenAi).error_event().to_vec()).unwrap();
        assert!(openai.starts_with("data: {\"error\":{") && openai.ends_with("\n\n"), "{openai}");
        let anthropic = String::from_utf8(Events::Sse(Shape::Anthropic).error_event().to_vec()).unwrap();
        assert!(
            anthropic.starts_with("event: error\ndata: {") && anthropic.contains("overloaded_error"),
            "{anthropic}"
        );
        let ollama = String::from_utf8(Events::NdJson.error_event().to_vec()).unwrap();
        let v: serde_json::Value = serde_json::from_str(ollama.trim()).unwrap();
        assert!(v["error"].as_str().unwrap().contains("stopped"), "{ollama}");
        let responses = String::from_utf8(Events::Responses.error_event().to_vec()).unwrap();
        assert!(responses.contains("\"type\":\"error\""), "{responses}");
    }
}
