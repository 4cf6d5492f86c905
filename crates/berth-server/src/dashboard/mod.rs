//! The dashboard: one page at `/ui`, the project's own HTML, CSS and JavaScript embedded in the
//! binary, and the JSON it polls (`/ui/state`): the models in memory, and a 15-minute history the
//! server samples every 5 s. The page holds no data of its own: everything it shows or does goes
//! through the API with the key the user gives it (kept in the tab's session storage), within that
//! key's scopes. Its headers forbid everything it does not need (a strict Content-Security-Policy:
//! its own script and style only, no inline code, no frames).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::AppState;
use crate::accounts::{GroupBy, Scope};
use crate::auth::Auth;
use crate::error::ApiError;
use crate::models::{Loaded, ModelStatus};

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

impl Seen {
    fn of(m: &ModelCounts) -> Seen {
        Seen { tokens: m.tokens, requests: m.requests, ttft: m.ttft.clone(), itl: m.itl.clone() }
    }
}

/// `now - before`, bucket by bucket.
fn delta(now: &[u64], before: &[u64]) -> Vec<u64> {
    now.iter().enumerate().map(|(i, n)| n.saturating_sub(before.get(i).copied().unwrap_or(0))).collect()
}

/// Add `counts` bucket by bucket to `sum`.
fn add_counts(sum: &mut Vec<u64>, counts: &[u64]) {
    sum.resize(sum.len().max(counts.len()), 0);
    for (s, n) in sum.iter_mut().zip(counts) {
        *s += n;
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

/// The bucket bounds of the TTFT and ITL histograms a history is fed.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub ttft: &'static [f64],
    pub itl: &'static [f64],
}

/// A server's: its models' serving histograms (every model's are the same).
const SERVING: Bounds = Bounds { ttft: crate::metrics::TTFT, itl: crate::metrics::ITL };

/// What one model did in one interval, and its state at its end.
#[derive(Debug, Clone, Default)]
struct ModelInterval {
    name: String,
    tokens: u64,
    requests: u64,
    running: u64,
    waiting: u64,
    kv_usage: f64,
    /// The TTFT and ITL histograms' bucket counts of the interval.
    ttft: Vec<u64>,
    itl: Vec<u64>,
}

/// One interval of the history, model by model: a sample is made of the models a caller may see
/// (or the one it asks about) when it is read.
struct Point {
    t: i64,
    seconds: f64,
    models: Vec<ModelInterval>,
}

impl Point {
    fn sample(&self, bounds: &Bounds, include: &dyn Fn(&str) -> bool) -> Sample {
        let (mut tokens, mut requests, mut running, mut waiting, mut kv_usage) = (0, 0, 0, 0, 0.0f64);
        let (mut ttft, mut itl) = (Vec::new(), Vec::new());
        for m in self.models.iter().filter(|m| include(&m.name)) {
            tokens += m.tokens;
            requests += m.requests;
            running += m.running;
            waiting += m.waiting;
            kv_usage = kv_usage.max(m.kv_usage);
            add_counts(&mut ttft, &m.ttft);
            add_counts(&mut itl, &m.itl);
        }
        Sample {
            t: self.t,
            tokens_per_s: tokens as f64 / self.seconds,
            requests_per_s: requests as f64 / self.seconds,
            running,
            waiting,
            kv_usage,
            ttft_p50: quantile(bounds.ttft, &ttft, 0.5),
            ttft_p95: quantile(bounds.ttft, &ttft, 0.95),
            itl_p50: quantile(bounds.itl, &itl, 0.5),
            itl_p95: quantile(bounds.itl, &itl, 0.95),
        }
    }
}

/// A short history of what a server's models (or a gateway's replicas) did, interval by
/// interval, each series by name.
pub struct History {
    bounds: Bounds,
    points: Mutex<VecDeque<Point>>,
    /// Each model's counts at the last sample (a model loaded since starts from zero; one
    /// unloaded and loaded again counts from its new start).
    last: Mutex<HashMap<String, Seen>>,
    /// Tokens and requests over the server's life, by model.
    totals: Mutex<HashMap<String, (u64, u64)>>,
}

impl Default for History {
    fn default() -> Self {
        History::new(SERVING)
    }
}

impl History {
    pub fn new(bounds: Bounds) -> History {
        History { bounds, points: Mutex::default(), last: Mutex::default(), totals: Mutex::default() }
    }

    /// Take the counts the first sample starts from (the models loaded at start).
    pub fn baseline(&self, models: &[ModelCounts]) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        *last = models.iter().map(|m| (m.name.clone(), Seen::of(m))).collect();
    }

    /// Add a sample taken at `t` (Unix seconds), `interval` after the last.
    pub fn add(&self, t: i64, interval: Duration, models: &[ModelCounts]) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let mut totals = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        let mut now = HashMap::new();
        let mut intervals = Vec::new();
        for m in models {
            let mut before = last.get(&m.name).cloned().unwrap_or_default();
            // Counts that went down belong to a model loaded again: it counts from zero.
            if m.tokens < before.tokens || m.requests < before.requests {
                before = Seen::default();
            }
            let interval = ModelInterval {
                name: m.name.clone(),
                tokens: m.tokens - before.tokens,
                requests: m.requests - before.requests,
                running: m.running,
                waiting: m.waiting,
                kv_usage: m.kv_usage,
                ttft: delta(&m.ttft, &before.ttft),
                itl: delta(&m.itl, &before.itl),
            };
            let total = totals.entry(m.name.clone()).or_default();
            *total = (total.0 + interval.tokens, total.1 + interval.requests);
            intervals.push(interval);
            now.insert(m.name.clone(), Seen::of(m));
        }
        *last = now;
        let point = Point { t, seconds: interval.as_secs_f64().max(1e-3), models: intervals };
        let mut points = self.points.lock().unwrap_or_else(|e| e.into_inner());
        if points.len() == KEEP {
            points.pop_front();
        }
        points.push_back(point);
    }

    /// The history of the models `include` lets in, summed.
    pub fn samples(&self, include: &dyn Fn(&str) -> bool) -> Vec<Sample> {
        self.points.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|p| p.sample(&self.bounds, include)).collect()
    }

    /// Tokens generated and requests answered since start by the models `include` lets in.
    pub fn totals(&self, include: &dyn Fn(&str) -> bool) -> (u64, u64) {
        let totals = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        totals.iter().filter(|(name, _)| include(name)).fold((0, 0), |sum, (_, t)| (sum.0 + t.0, sum.1 + t.1))
    }

    /// The models the history has counted, by name.
    pub fn models(&self) -> Vec<String> {
        let mut names: Vec<String> = self.totals.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        names.sort();
        names
    }
}

/// Sample `counts` every [`SAMPLE_EVERY`] into `history`, for ever (the caller aborts the task).
pub(crate) async fn keep_sampling<F, Fut>(history: &History, mut counts: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Vec<ModelCounts>>,
{
    let mut every = tokio::time::interval(SAMPLE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    history.baseline(&counts().await);
    let mut last = std::time::Instant::now();
    loop {
        every.tick().await;
        let now_counts = counts().await;
        let now = std::time::Instant::now();
        history.add(chrono::Utc::now().timestamp(), now - last, &now_counts);
        last = now;
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

#[derive(Debug, Deserialize)]
pub struct StateQuery {
    /// The one model (of a gateway: the one replica) whose history to show; all the caller may
    /// see when absent.
    pub of: Option<String>,
}

/// Whether the caller may manage models (every caller may, on a server without keys).
pub(crate) fn is_admin(caller: Option<&crate::auth::Caller>) -> bool {
    caller.and_then(|c| c.key.as_ref()).is_none_or(|k| k.allows(Scope::Admin))
}

/// What the page shows: who is asking (and whether they may manage models), the models of the
/// store and those in memory that the key may see, the history of those models (or of the one
/// asked about), the totals, and for admins every key's and model's usage.
pub async fn state(State(state): State<AppState>, Query(query): Query<StateQuery>) -> Result<Json<Value>, ApiError> {
    let caller = crate::auth::caller();
    let admin = is_admin(caller.as_ref());
    let may_see = |name: &str| caller.as_ref().is_none_or(|c| c.check_model(name).is_ok());
    // Each of the store's models the key may use (its list keeps to them already), with what is
    // in memory of its manifest; then what is in memory under no name of the store.
    let in_memory: Vec<ModelStatus> = state.models.status().await.into_iter().filter(|m| may_see(&m.name)).collect();
    let mut models = Vec::new();
    let mut shown = Vec::new();
    // References by digest are the versions berth keeps for deployments: the deployments section
    // shows them, and what of them is in memory is listed under the name it serves.
    for m in state.models.list()?.into_iter().filter(|m| !m.reference.contains('@')) {
        let digest = m.digest.to_string();
        let mut row = match in_memory.iter().find(|s| s.digest == digest) {
            Some(status) => {
                shown.push(digest);
                in_memory_row(status)
            }
            None => json!({
                "version": short_version(&digest),
                "loaded": false,
                "state": "on disk",
                "size": m.size,
                "kind": if m.format == "gguf" { "chat" } else { "embedding" },
            }),
        };
        row["name"] = m.reference.into();
        models.push(row);
    }
    models.extend(in_memory.iter().filter(|s| !shown.contains(&s.digest)).map(in_memory_row));
    let chosen = query.of.filter(|m| may_see(m));
    let mut view = common(&state.auth, &state.history, admin, chosen, &may_see).await?;
    view["kind"] = "server".into();
    view["models"] = models.into();
    Ok(Json(view))
}

/// What the page shows of a server and of a gateway alike: who asks, the history of what they may
/// see (of `chosen` alone when given), its totals, and for admins every key's and model's usage.
pub(crate) async fn common(
    auth: &Arc<Auth>,
    history: &History,
    admin: bool,
    chosen: Option<String>,
    may_see: &(dyn Fn(&str) -> bool + Sync),
) -> Result<Value, ApiError> {
    let key = crate::auth::caller().and_then(|c| c.key);
    let include = |name: &str| may_see(name) && chosen.as_deref().is_none_or(|c| c == name);
    let (tokens, requests) = history.totals(&include);
    // Usage is every key's business: admins only.
    let usage = if admin { usage_report(auth.clone()).await? } else { Value::Null };
    Ok(json!({
        "usage": usage,
        "caller": key.map(|k| json!({
            "name": k.name,
            "scopes": k.scopes.iter().map(|s| s.name()).collect::<Vec<_>>(),
        })),
        "admin": admin,
        "history": {
            "interval_seconds": SAMPLE_EVERY.as_secs(),
            "of": chosen,
            "choices": history.models().into_iter().filter(|m| may_see(m)).collect::<Vec<_>>(),
            "samples": history.samples(&include),
        },
        "totals": {"generated_tokens": tokens, "requests": requests},
    }))
}

/// Every key's and every model's usage, today (since UTC midnight) and over 7 days.
async fn usage_report(auth: Arc<Auth>) -> Result<Value, ApiError> {
    let read = tokio::task::spawn_blocking(move || {
        let now = chrono::Utc::now();
        let midnight = now.date_naive().and_hms_opt(0, 0, 0).map_or(0, |t| t.and_utc().timestamp());
        let week = (now - chrono::Duration::days(7)).timestamp();
        let mut usage = json!({});
        for (group, by) in [("key", GroupBy::Key), ("model", GroupBy::Model)] {
            usage[group] = json!({"today": auth.usage(midnight, by)?, "week": auth.usage(week, by)?});
        }
        Ok::<_, crate::accounts::AccountsError>(usage)
    })
    .await
    .map_err(|e| ApiError::internal(format!("reading usage stopped: {e}")))?;
    read.map_err(|e| {
        tracing::error!("cannot read usage for the dashboard: {e}");
        ApiError::unavailable("the accounts database is unavailable; retry shortly")
    })
}

/// A model in memory as the page shows it.
fn in_memory_row(m: &ModelStatus) -> Value {
    let mut row = json!({
        "name": m.name,
        "loaded_as": m.name,
        "version": short_version(&m.digest),
        "loaded": true,
        "state": m.state,
        "memory": m.memory,
        "pinned": m.pinned,
        "idle_seconds": m.idle.map(|d| d.as_secs()),
        "unloads_in_seconds": m.unloads_in().map(|d| d.as_secs()),
    });
    match &m.loaded {
        Some(Loaded::Chat(c)) => {
            let stats = c.runner.stats();
            row["running"] = stats.running.load(Ordering::Relaxed).into();
            row["waiting"] = stats.waiting.load(Ordering::Relaxed).into();
            row["kv_usage"] = stats.kv_usage().into();
            row["context"] = c.context.into();
            row["max_running"] = c.runner.config().scheduler.max_running.into();
            row["kind"] = "chat".into();
        }
        Some(Loaded::Embed(_)) => row["kind"] = "embedding".into(),
        None => {}
    }
    row
}

/// The first 12 hex digits of a manifest digest: how `berth ls` names a version.
fn short_version(digest: &str) -> &str {
    digest.trim_start_matches("sha256:").get(..12).unwrap_or("")
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
        let s = history.samples(&|_| true)[0];
        assert_eq!((s.ttft_p50, s.ttft_p95, s.itl_p50), (Some(0.01), Some(1.0), None));
        now[2] += 1;
        history.add(10, five, &[with(now)]);
        assert_eq!(history.samples(&|_| true)[1].ttft_p95, Some(0.01));
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
        let rates: Vec<(f64, f64)> =
            history.samples(&|_| true).iter().map(|s| (s.tokens_per_s, s.requests_per_s)).collect();
        assert_eq!(rates, [(20.0, 0.4), (12.0, 0.6), (1.0, 0.2)]);
        assert_eq!(history.totals(&|_| true), (100 + 60 + 5, 2 + 3 + 1));
        // Model by model: `b` alone, as a key kept to it (or the page's model choice) sees it.
        let only_b: Vec<f64> = history.samples(&|m| m == "b").iter().map(|s| s.tokens_per_s).collect();
        assert_eq!(only_b, [0.0, 2.0, 0.0]);
        assert_eq!(history.totals(&|m| m == "a"), (100 + 50 + 5, 2 + 2 + 1));
        assert_eq!(history.models(), ["a", "b"]);
        let last = history.samples(&|_| true)[2];
        assert_eq!((last.running, last.waiting, last.kv_usage), (1, 2, 0.25));
        for t in 0..KEEP as i64 + 10 {
            history.add(t, five, &[]);
        }
        assert_eq!(history.samples(&|_| true).len(), KEEP, "15 minutes are kept");
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
