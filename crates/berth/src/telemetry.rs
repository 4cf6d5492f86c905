//! The server's logs and traces: log lines on standard error (text for people, JSON for
//! collectors), and, when asked, every span sent to an OpenTelemetry collector over OTLP/HTTP with
//! JSON encoding.
//!
//! The exporter is written here rather than taken from the `opentelemetry` crates: those bring an
//! SDK, a protobuf stack and their own runtime glue for what is one JSON POST per batch, while
//! `tracing` already gives us the spans. Spans are queued without blocking (a full queue drops
//! them and counts the loss) and sent in batches from a thread of their own, so a slow or absent
//! collector never slows a request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Subscriber, warn};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// Spans waiting to be sent; beyond this they are dropped (and counted) rather than block.
const QUEUE: usize = 8192;
/// Spans per POST.
const BATCH: usize = 512;
/// How long a finished span may wait for its batch.
const BATCH_DELAY: Duration = Duration::from_secs(1);

/// Set up logging (`format`: text, json, or auto: text on a terminal), and span export to
/// `otlp_endpoint` if given. Returns the exporter, to flush
/// at exit.
pub fn init(format: &str, otlp_endpoint: Option<&str>, service_name: &str) -> anyhow::Result<Option<Exporter>> {
    // RUST_LOG chooses what is logged; spans are exported whatever it says.
    let log_filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let as_json = format == "json" || (format == "auto" && !terminal);
    let text = (!as_json).then(|| {
        tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(terminal).with_filter(log_filter())
    });
    let json = as_json.then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .json()
            .flatten_event(true)
            .with_filter(log_filter())
    });
    let exporter = otlp_endpoint.map(|e| Exporter::start(e, service_name)).transpose()?;
    let spans = exporter.as_ref().map(|e| {
        // berth's own spans; the libraries' are detail a trace backend does not need.
        let berth_info =
            |m: &tracing::Metadata<'_>| m.target().starts_with("berth") && *m.level() <= tracing::Level::INFO;
        SpanLayer { queue: e.queue.clone(), dropped: e.dropped.clone() }
            .with_filter(tracing_subscriber::filter::filter_fn(berth_info))
    });
    // Already set (a second server in one process): the first one's stays.
    let _ = tracing_subscriber::registry().with(text).with(json).with(spans).try_init();
    Ok(exporter)
}

/// A span as it is built up while it runs.
struct SpanData {
    name: &'static str,
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent_span_id: Option<[u8; 8]>,
    start: SystemTime,
    attributes: Vec<(&'static str, Value)>,
}

/// A finished span, in OTLP's JSON form, or a request to send what is queued now.
enum Message {
    Span(Value),
    Flush(SyncSender<()>),
}

struct SpanLayer {
    queue: SyncSender<Message>,
    dropped: std::sync::Arc<AtomicU64>,
}

struct Attrs<'a>(&'a mut Vec<(&'static str, Value)>);

impl Attrs<'_> {
    fn set(&mut self, field: &Field, value: Value) {
        match self.0.iter_mut().find(|(k, _)| *k == field.name()) {
            Some(slot) => slot.1 = value,
            None => self.0.push((field.name(), value)),
        }
    }
}

impl Visit for Attrs<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.set(field, json!({"stringValue": format!("{value:?}")}));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.set(field, json!({"stringValue": value}));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        // OTLP's JSON carries 64-bit integers as decimal strings.
        self.set(field, json!({"intValue": value.to_string()}));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.set(field, json!({"intValue": value.to_string()}));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.set(field, json!({"doubleValue": value}));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.set(field, json!({"boolValue": value}));
    }
}

fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    // Without the OS's randomness (it does not fail on Linux) the time keeps ids apart.
    if getrandom::fill(&mut bytes).is_err() {
        let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0).to_le_bytes();
        for (b, t) in bytes.iter_mut().zip(t.iter().cycle()) {
            *b = *t;
        }
    }
    bytes
}

/// Hex of `N` bytes, as an id from a `traceparent` header gives it.
fn from_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let bytes = hex::decode(text).ok()?;
    bytes.try_into().ok()
}

fn nanos(t: SystemTime) -> String {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0).to_string()
}

thread_local! {
    /// Set on the exporter's thread: spans of the HTTP client sending spans are not exported
    /// (that would feed itself).
    static EXPORTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for SpanLayer {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if EXPORTING.get() {
            return;
        }
        let Some(span) = ctx.span(id) else { return };
        let mut attributes = Vec::new();
        attrs.record(&mut Attrs(&mut attributes));
        let inherited = span.parent().and_then(|p| p.extensions().get::<SpanData>().map(|d| (d.trace_id, d.span_id)));
        // A span of its own trace may continue the caller's (`traceparent`, given as fields).
        let mut given = |key: &str| {
            let at = attributes.iter().position(|(k, _)| *k == key)?;
            let (_, value) = attributes.remove(at);
            value["stringValue"].as_str().map(str::to_string)
        };
        let (given_trace, given_parent) = (given("trace_id"), given("parent_span_id"));
        let (trace_id, parent_span_id) = match inherited {
            Some((trace, parent)) => (trace, Some(parent)),
            None => match (given_trace.and_then(|t| from_hex(&t)), given_parent.and_then(|p| from_hex(&p))) {
                (Some(trace), parent) => (trace, parent),
                (None, _) => (random(), None),
            },
        };
        span.extensions_mut().insert(SpanData {
            name: attrs.metadata().name(),
            trace_id,
            span_id: random(),
            parent_span_id,
            start: SystemTime::now(),
            attributes,
        });
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id)
            && let Some(data) = span.extensions_mut().get_mut::<SpanData>()
        {
            values.record(&mut Attrs(&mut data.attributes));
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(data) = span.extensions_mut().remove::<SpanData>() else { return };
        let attributes: Vec<Value> = data.attributes.iter().map(|(k, v)| json!({"key": k, "value": v})).collect();
        // A server error marks the span as failed (OTLP status code 2).
        let status = data.attributes.iter().find(|(k, _)| *k == "http.response.status_code");
        let error = status.and_then(|(_, v)| v["intValue"].as_str()?.parse::<u16>().ok()).is_some_and(|s| s >= 500);
        let mut otlp = json!({
            "traceId": hex::encode(data.trace_id),
            "spanId": hex::encode(data.span_id),
            "name": data.name,
            // A request span is the server side of a call; others are internal.
            "kind": if data.name == "request" { 2 } else { 1 },
            "startTimeUnixNano": nanos(data.start),
            "endTimeUnixNano": nanos(SystemTime::now()),
            "attributes": attributes,
            "status": {"code": if error { 2 } else { 0 }},
        });
        if let Some(parent) = data.parent_span_id {
            otlp["parentSpanId"] = json!(hex::encode(parent));
        }
        if let Err(TrySendError::Full(_)) = self.queue.try_send(Message::Span(otlp)) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The thread that sends spans to the collector.
pub struct Exporter {
    queue: SyncSender<Message>,
    dropped: std::sync::Arc<AtomicU64>,
}

impl Exporter {
    fn start(endpoint: &str, service_name: &str) -> anyhow::Result<Exporter> {
        let url = traces_url(endpoint)?;
        let (queue, rx) = mpsc::sync_channel(QUEUE);
        let dropped = std::sync::Arc::new(AtomicU64::new(0));
        let resource = json!({"attributes": [
            {"key": "service.name", "value": {"stringValue": service_name}},
            {"key": "service.version", "value": {"stringValue": env!("CARGO_PKG_VERSION")}},
        ]});
        let lost = dropped.clone();
        std::thread::Builder::new()
            .name("berth-otlp".into())
            .spawn(move || send_batches(&url, &resource, &rx, &lost))?;
        Ok(Exporter { queue, dropped })
    }

    /// Send what is queued now; wait at most `timeout` for it to go.
    pub fn flush(&self, timeout: Duration) {
        let (done, wait) = mpsc::sync_channel(1);
        if self.queue.send(Message::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(timeout);
        }
        let dropped = self.dropped.load(Ordering::Relaxed);
        if dropped > 0 {
            warn!(dropped, "spans dropped: the OTLP collector did not keep up");
        }
    }
}

/// The collector's trace endpoint: `http://host:4318` becomes `http://host:4318/v1/traces`, as the
/// OpenTelemetry SDKs do with OTEL_EXPORTER_OTLP_ENDPOINT; a URL ending in `/v1/traces` is kept.
fn traces_url(endpoint: &str) -> anyhow::Result<String> {
    let e = endpoint.trim().trim_end_matches('/');
    if !(e.starts_with("http://") || e.starts_with("https://")) || e.len() > 2048 {
        anyhow::bail!("--otlp-endpoint {endpoint:?} is not an http:// or https:// URL (e.g. http://localhost:4318)");
    }
    Ok(if e.ends_with("/v1/traces") { e.to_string() } else { format!("{e}/v1/traces") })
}

fn send_batches(url: &str, resource: &Value, rx: &Receiver<Message>, lost: &AtomicU64) {
    EXPORTING.set(true);
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return eprintln!("berth: cannot start the OTLP exporter: {e}"),
    };
    berth_store::registry::install_crypto_provider();
    let client = match reqwest::Client::builder().timeout(Duration::from_secs(10)).build() {
        Ok(c) => c,
        Err(e) => return eprintln!("berth: cannot start the OTLP exporter: {e}"),
    };
    let mut batch: Vec<Value> = Vec::new();
    let mut oldest: Option<Instant> = None;
    let mut failures: HashMap<String, Instant> = HashMap::new();
    loop {
        let wait = oldest.map_or(BATCH_DELAY, |t| BATCH_DELAY.saturating_sub(t.elapsed()));
        let (flush, ended) = match rx.recv_timeout(wait) {
            Ok(Message::Span(span)) => {
                batch.push(span);
                oldest.get_or_insert_with(Instant::now);
                (None, false)
            }
            Ok(Message::Flush(done)) => (Some(done), false),
            Err(RecvTimeoutError::Timeout) => (None, false),
            Err(RecvTimeoutError::Disconnected) => (None, true),
        };
        let due = oldest.is_some_and(|t| t.elapsed() >= BATCH_DELAY) || batch.len() >= BATCH;
        if !batch.is_empty() && (due || flush.is_some() || ended) {
            let spans = std::mem::take(&mut batch);
            oldest = None;
            let count = spans.len() as u64;
            let body = json!({"resourceSpans": [{
                "resource": resource,
                "scopeSpans": [{"scope": {"name": "berth", "version": env!("CARGO_PKG_VERSION")}, "spans": spans}],
            }]});
            let sent = runtime.block_on(async {
                let response = client.post(url).json(&body).send().await?;
                response.error_for_status().map(|_| ())
            });
            if let Err(e) = sent {
                lost.fetch_add(count, Ordering::Relaxed);
                // One warning a minute per kind of failure, not one per batch.
                let kind = e.status().map(|s| s.to_string()).unwrap_or_else(|| "unreachable".into());
                if failures.get(&kind).is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    failures.insert(kind, Instant::now());
                    warn!("cannot send {count} spans to the OTLP collector at {url}: {e}");
                }
            }
        }
        if let Some(done) = flush {
            let _ = done.send(());
        }
        if ended {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collector_urls_get_the_traces_path() {
        assert_eq!(traces_url("http://localhost:4318").unwrap(), "http://localhost:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/v1/traces/").unwrap(), "http://c:4318/v1/traces");
        assert!(traces_url("localhost:4318").is_err());
        assert!(traces_url("file:///etc/passwd").is_err());
    }
}
