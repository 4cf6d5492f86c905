//! The dashboard: one page at `/ui`, the project's own HTML, CSS and JavaScript embedded in the
//! binary, and the JSON it polls (`/ui/state`): the models in memory, and a 15-minute history the
//! server samples every 5 s. The page holds no data of its own: everything it shows or does goes
//! through the API with the key the user gives it (kept in the tab's session storage), within that
//! key's scopes. Its headers forbid everything it does not need (a strict Content-Security-Policy:
//! its own script and style only, no inline code, no frames).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::accounts::{GroupBy, Scope};
use crate::error::ApiError;
use crate::models::{KeepAlive, Loaded};

/// How often the server samples its counters for the history.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Samples kept: 15 minutes.
const KEEP: usize = 180;

/// What every loaded model counts now, as a sample reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelCounts {
    pub name: String,
    /// Tokens generated and requests answered since the model loaded.
    pub tokens: u64,
    pub requests: u64,
    pub running: u64,
    pub waiting: u64,
    pub kv_usage: f64,
    /// The TTFT and ITL histograms' bucket counts since the model loaded.
    pub ttft: Vec<u64>,
    pub itl: Vec<u64>,
}

/// One point of the history, over all loaded models.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Sample {
    /// Unix seconds.
    pub t: i64,
    pub tokens_per_s: f64,
    pub requests_per_s: f64,
    pub running: u64,
    pub waiting: u64,
    /// The fullest KV cache (0 to 1).
    pub kv_usage: f64,
    /// TTFT and ITL percentiles of the requests and tokens of the interval, in seconds, to the
    /// histograms' bucket bounds (`None` when there were none).
    pub ttft_p50: Option<f64>,
    pub ttft_p95: Option<f64>,
    pub itl_p50: Option<f64>,
    pub itl_p95: Option<f64>,
}

/// Counts of one model at a sample.
#[derive(Clone, Default)]
struct Seen {
    tokens: u64,
    requests: u64,
    ttft: Vec<u64>,
    itl: Vec<u64>,
}

/// Add `now - before` bucket by bucket to `sum`.
fn add_delta(sum: &mut Vec<u64>, now: &[u64], before: &[u64]) {
    sum.resize(sum.len().max(now.len()), 0);
    for (i, n) in now.iter().enumerate() {
        sum[i] += n.saturating_sub(before.get(i).copied().unwrap_or(0));
    }
}

/// The upper bound of the bucket holding the `q` quantile of `counts`.
fn quantile(bounds: &[f64], counts: &[u64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let wanted = (q * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (bound, n) in bounds.iter().zip(counts) {
        seen += n;
        if seen >= wanted {
            return Some(*bound);
        }
    }
    bounds.last().copied()
}

impl Seen {
    fn of(m: &ModelCounts) -> Seen {
        Seen { tokens: m.tokens, requests: m.requests, ttft: m.ttft.clone(), itl: m.itl.clone() }
    }
}

/// The serving histograms' bucket bounds (every model's are the same).
const TTFT_BOUNDS: &[f64] = crate::metrics::TTFT;
const ITL_BOUNDS: &[f64] = crate::metrics::ITL;

#[derive(Default)]
pub struct History {
    samples: Mutex<VecDeque<Sample>>,
    /// Each model's counts at the last sample (a model loaded since starts from zero; one
    /// unloaded and loaded again counts from its new start).
    last: Mutex<HashMap<String, Seen>>,
    /// Tokens and requests over the server's life, of every model it loaded.
    totals: Mutex<(u64, u64)>,
}

impl History {
    /// Take the counts the first sample starts from (the models loaded at start).
    pub fn baseline(&self, models: &[ModelCounts]) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        *last = models.iter().map(|m| (m.name.clone(), Seen::of(m))).collect();
    }

    /// Add a sample taken at `t` (Unix seconds), `interval` after the last.
    pub fn add(&self, t: i64, interval: Duration, models: &[ModelCounts]) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let (mut tokens, mut requests) = (0u64, 0u64);
        let (mut ttft, mut itl) = (Vec::new(), Vec::new());
        let mut now = HashMap::new();
        for m in models {
            let mut before = last.get(&m.name).cloned().unwrap_or_default();
            // Counts that went down belong to a model loaded again: it counts from zero.
            if m.tokens < before.tokens || m.requests < before.requests {
                before = Seen::default();
            }
            tokens += m.tokens - before.tokens;
            requests += m.requests - before.requests;
            add_delta(&mut ttft, &m.ttft, &before.ttft);
            add_delta(&mut itl, &m.itl, &before.itl);
            now.insert(m.name.clone(), Seen::of(m));
        }
        *last = now;
        {
            let mut totals = self.totals.lock().unwrap_or_else(|e| e.into_inner());
            *totals = (totals.0 + tokens, totals.1 + requests);
        }
        let seconds = interval.as_secs_f64().max(1e-3);
        let sample = Sample {
            t,
            tokens_per_s: tokens as f64 / seconds,
            requests_per_s: requests as f64 / seconds,
            running: models.iter().map(|m| m.running).sum(),
            waiting: models.iter().map(|m| m.waiting).sum(),
            kv_usage: models.iter().map(|m| m.kv_usage).fold(0.0, f64::max),
            ttft_p50: quantile(TTFT_BOUNDS, &ttft, 0.5),
            ttft_p95: quantile(TTFT_BOUNDS, &ttft, 0.95),
            itl_p50: quantile(ITL_BOUNDS, &itl, 0.5),
            itl_p95: quantile(ITL_BOUNDS, &itl, 0.95),
        };
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.len() == KEEP {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap_or_else(|e| e.into_inner()).iter().copied().collect()
    }

    pub fn totals(&self) -> (u64, u64) {
        *self.totals.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the loaded models count now.
pub async fn counts(state: &AppState) -> Vec<ModelCounts> {
    let mut out = Vec::new();
    for model in state.models.loaded().await {
        if let Loaded::Chat(m) = model {
            let stats = m.runner.stats();
            out.push(ModelCounts {
                name: m.name.clone(),
                tokens: stats.generated_tokens.load(Ordering::Relaxed),
                requests: m.metrics.finished(),
                running: stats.running.load(Ordering::Relaxed) as u64,
                waiting: stats.waiting.load(Ordering::Relaxed) as u64,
                kv_usage: stats.kv_usage(),
                ttft: m.metrics.ttft.counts(),
                itl: m.metrics.itl.counts(),
            });
        }
    }
    out
}

/// The page's own sources, embedded.
const PAGE: &str = include_str!("page/index.html");
const SCRIPT: &str = include_str!("page/app.js");
const STYLE: &str = include_str!("page/app.css");
const ICON: &str = include_str!("page/icon.svg");

/// The headers of everything the page is made of: only its own script, style and API; nothing
/// inline, no frames, no referrer, no caching of a page that may change with the binary.
fn with_page_headers(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, content_type),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; \
             base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

pub async fn page() -> Response {
    with_page_headers("text/html; charset=utf-8", PAGE)
}

pub async fn script() -> Response {
    with_page_headers("text/javascript; charset=utf-8", SCRIPT)
}

pub async fn style() -> Response {
    with_page_headers("text/css; charset=utf-8", STYLE)
}

pub async fn icon() -> Response {
    with_page_headers("image/svg+xml", ICON)
}

/// What the page shows: who is asking (and whether they may manage models), the models in memory
/// the key may see, the history, and the totals.
pub async fn state(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let caller = crate::auth::caller();
    let key = caller.as_ref().and_then(|c| c.key.clone());
    let admin = key.as_ref().is_none_or(|k| k.allows(Scope::Admin));
    let mut models = Vec::new();
    for m in state.models.status().await {
        if caller.as_ref().is_some_and(|c| c.check_model(&m.name).is_err()) {
            continue;
        }
        let mut model = json!({
            "name": m.name,
            "version": m.digest.trim_start_matches("sha256:").get(..12).unwrap_or(""),
            "state": m.state,
            "memory": m.memory,
            "pinned": m.pinned,
            "idle_seconds": m.idle.map(|d| d.as_secs()),
            "unloads_in_seconds": match (m.keep_alive, m.idle, m.pinned) {
                (KeepAlive::For(d), Some(idle), false) => Some(d.saturating_sub(idle).as_secs()),
                _ => None,
            },
        });
        if let Some(Loaded::Chat(c)) = &m.loaded {
            let stats = c.runner.stats();
            model["running"] = stats.running.load(Ordering::Relaxed).into();
            model["waiting"] = stats.waiting.load(Ordering::Relaxed).into();
            model["kv_usage"] = stats.kv_usage().into();
            model["context"] = c.context.into();
            model["max_running"] = c.runner.config().scheduler.max_running.into();
            model["kind"] = "chat".into();
        } else {
            model["kind"] = "embedding".into();
        }
        models.push(model);
    }
    let (tokens, requests) = state.history.totals();
    // Usage is every key's business: admins only.
    let usage = if admin {
        let auth = state.auth.clone();
        let read = tokio::task::spawn_blocking(move || {
            let now = chrono::Utc::now();
            let midnight = now.date_naive().and_hms_opt(0, 0, 0).map_or(0, |t| t.and_utc().timestamp());
            let week = (now - chrono::Duration::days(7)).timestamp();
            Ok::<_, crate::accounts::AccountsError>(json!({
                "today": auth.usage(midnight, GroupBy::Key)?,
                "week": auth.usage(week, GroupBy::Key)?,
            }))
        })
        .await
        .map_err(|e| ApiError::internal(format!("reading usage stopped: {e}")))?;
        read.map_err(|e| {
            tracing::error!("cannot read usage for the dashboard: {e}");
            ApiError::unavailable("the accounts database is unavailable; retry shortly")
        })?
    } else {
        Value::Null
    };
    Ok(Json(json!({
        "usage": usage,
        "caller": key.map(|k| json!({
            "name": k.name,
            "scopes": k.scopes.iter().map(|s| s.name()).collect::<Vec<_>>(),
        })),
        "admin": admin,
        "models": models,
        "history": {"interval_seconds": SAMPLE_EVERY.as_secs(), "samples": state.history.samples()},
        "totals": {"generated_tokens": tokens, "requests": requests},
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(name: &str, tokens: u64, requests: u64) -> ModelCounts {
        ModelCounts {
            name: name.into(),
            tokens,
            requests,
            running: 1,
            waiting: 2,
            kv_usage: 0.25,
            ttft: Vec::new(),
            itl: Vec::new(),
        }
    }

    #[test]
    fn percentiles_are_of_the_interval_to_the_bucket_bounds() {
        let history = History::default();
        let five = Duration::from_secs(5);
        let with = |ttft: Vec<u64>| ModelCounts { ttft, ..counts("a", 0, 0) };
        // Before the interval: 100 slow first tokens (bucket 0.5 s); in it: 9 at 0.01 s, 1 at 1 s.
        history.baseline(&[with(vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 100])]);
        let mut now = vec![0, 0, 9, 0, 0, 0, 0, 0, 0, 100, 0, 1];
        history.add(5, five, &[with(now.clone())]);
        let s = history.samples()[0];
        assert_eq!((s.ttft_p50, s.ttft_p95, s.itl_p50), (Some(0.01), Some(1.0), None));
        now[2] += 1;
        history.add(10, five, &[with(now)]);
        assert_eq!(history.samples()[1].ttft_p95, Some(0.01));
        assert_eq!(quantile(&[1.0, 2.0], &[0, 0], 0.5), None);
    }

    #[test]
    fn the_history_counts_rates_across_models_loads_and_unloads() {
        let history = History::default();
        let five = Duration::from_secs(5);
        history.add(0, five, &[counts("a", 100, 2)]);
        history.add(5, five, &[counts("a", 150, 4), counts("b", 10, 1)]);
        // `a` unloaded and loaded again: its counts start over.
        history.add(10, five, &[counts("a", 5, 1)]);
        let rates: Vec<(f64, f64)> = history.samples().iter().map(|s| (s.tokens_per_s, s.requests_per_s)).collect();
        assert_eq!(rates, [(20.0, 0.4), (12.0, 0.6), (1.0, 0.2)]);
        assert_eq!(history.totals(), (100 + 60 + 5, 2 + 3 + 1));
        let last = history.samples()[2];
        assert_eq!((last.running, last.waiting, last.kv_usage), (1, 2, 0.25));
        for t in 0..KEEP as i64 + 10 {
            history.add(t, five, &[]);
        }
        assert_eq!(history.samples().len(), KEEP, "15 minutes are kept");
    }

    #[test]
    fn the_page_allows_only_its_own_script_and_style() {
        let response = with_page_headers("text/html; charset=utf-8", PAGE);
        let csp = response.headers()[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'") && !csp.contains("unsafe"));
        // No inline script or style the policy would block, and nothing fetched from elsewhere.
        for source in [PAGE, SCRIPT, STYLE] {
            assert!(!source.contains("http://") && !source.contains("https://"), "no outside address");
        }
        assert!(ICON.starts_with("<svg") && !ICON.contains("<script"), "the icon is a picture");
        assert!(!PAGE.contains("<script>") && !PAGE.contains("style=") && !PAGE.contains("<style"));
        assert!(!SCRIPT.contains("innerHTML") && !SCRIPT.contains("eval("), "text goes in as text");
        assert!(!SCRIPT.contains("localStorage"), "the key lives in the tab's session only");
    }
}
