//! Gateway mode (`berth gateway`): one address in front of several `berth serve` replicas. Each
//! request goes to a replica chosen by its prompt's start (prefix affinity, bounded by load), the
//! replicas' loaded models and their load ([`route`]); the answer comes back unchanged
//! ([`forward`]). The gateway polls every replica's `/load` ([`pool`]), ejects one that fails
//! and admits it again once it answers ready, and retries a request elsewhere when it failed before
//! its first byte. Replicas come from `--upstream` URLs and, for Compose services and Kubernetes
//! headless Services, from a DNS name resolved every few seconds.

pub mod affinity;
mod dashboard;
mod forward;
pub(crate) mod keys;
pub mod pool;
pub mod queue;
pub mod route;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use http_body_util::{BodyExt, Full};

pub use crate::Secret;
use crate::ServerError;
use crate::listener::ConnectionLimits;
use crate::metrics::Families;
use pool::{Load, Upstream};
use route::{Candidate, Policy, Reason};

/// How a gateway runs.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub host: String,
    pub port: u16,
    /// Replicas by URL (`http://host:port`).
    pub upstreams: Vec<String>,
    /// A DNS name and port whose addresses are replicas (looked up every [`DISCOVERY_INTERVAL`]).
    pub discover: Option<(String, u16)>,
    /// The key the gateway polls replicas' `/load` with, when they have keys (a `metrics` scope is
    /// enough). Clients' own `Authorization` goes with their requests unchanged.
    pub upstream_key: Option<Secret>,
    pub policy: Policy,
    pub poll_interval: Duration,
    pub body_limit: usize,
    pub connections: ConnectionLimits,
    pub drain_timeout: Duration,
    /// Listen on a non-loopback address (the replicas' keys, if any, still apply to every request).
    pub allow_insecure_public: bool,
    pub allowed_hosts: Vec<String>,
    /// Web origins whose pages may call through the gateway (as `berth serve --allowed-origin`).
    /// The gateway checks them and forwards without `Origin`: the replicas behind it see the
    /// gateway's requests, not the page's.
    pub allowed_origins: Vec<String>,
    /// Serve the dashboard (`/` and `/ui`); off, those paths are forwarded like any other.
    pub ui: bool,
    /// Where requests overflow to when every replica is saturated or none can serve.
    pub remote: Option<RemoteConfig>,
    /// Requests that may wait in the gateway's fair queue while every replica is full.
    pub max_queue: usize,
    /// How long one may wait there before it gets 429.
    pub queue_timeout: Duration,
    /// The gateway's own home: its keys (`berth keys` there), whose requests it records.
    pub home: std::path::PathBuf,
    /// The span of `tokens_per_day` quotas (a day; shorter only in tests).
    pub token_quota_window: Duration,
    /// A PostgreSQL database for keys, usage and quotas shared with other gateways and servers
    /// (instead of the SQLite database in `home`).
    pub shared_database: Option<Secret>,
}

/// A remote OpenAI-compatible endpoint (another berth, a bigger server, a cloud API) that takes
/// the OpenAI API's generating requests (`/v1/chat/completions`, `/v1/completions`,
/// `/v1/embeddings`, `/v1/responses`) when the replicas cannot: every one is saturated
/// (`overflow_at` requests or more), none is ready, or none has the model (each answered 404).
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// `http(s)://host[:port][/path]`; the request's path is appended (`/v1/chat/completions`).
    pub url: String,
    /// Sent as `Authorization: Bearer` in place of the client's own header; never logged.
    pub key: Option<Secret>,
    /// A local model name and the remote's name for it.
    pub models: Vec<(String, String)>,
    /// Requests a replica holds (running, waiting, or in flight from the gateway) at which it is
    /// saturated.
    pub overflow_at: f64,
}

/// The paths a remote OpenAI-compatible endpoint answers.
const REMOTE_PATHS: [&str; 4] = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"];

/// The remote as the gateway uses it.
pub(crate) struct Remote {
    upstream: Arc<Upstream>,
    authorization: Option<axum::http::HeaderValue>,
    models: Vec<(String, String)>,
    overflow_at: f64,
}

impl Remote {
    fn new(config: &RemoteConfig) -> Result<Remote, ServerError> {
        let base = base_url(&config.url, UrlKind::Remote)?;
        let authorization = config
            .key
            .as_ref()
            .map(|key| bearer(key).ok_or(ServerError::InvalidKey("--remote-key-env")))
            .transpose()?;
        let upstream = Arc::new(Upstream::new(base));
        // No poller asks a remote for its load: it is taken as ready until requests to it fail.
        upstream.polled(Load { ready: true, ..Load::default() }, Instant::now());
        Ok(Remote { upstream, authorization, models: config.models.clone(), overflow_at: config.overflow_at })
    }

    /// The remote's name for `model`.
    fn model_name<'a>(&'a self, model: &'a str) -> &'a str {
        self.models.iter().find(|(local, _)| local == model).map_or(model, |(_, remote)| remote.as_str())
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            host: "127.0.0.1".into(),
            port: 12400,
            upstreams: Vec::new(),
            discover: None,
            upstream_key: None,
            policy: Policy::Balanced,
            poll_interval: Duration::from_millis(100),
            body_limit: 2 << 20,
            connections: ConnectionLimits::default(),
            drain_timeout: Duration::from_secs(30),
            allow_insecure_public: false,
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
            ui: true,
            remote: None,
            max_queue: 1024,
            queue_timeout: Duration::from_secs(60),
            home: berth_store::Store::default_home(),
            token_quota_window: Duration::from_secs(86_400),
            shared_database: None,
        }
    }
}

/// The first 8 bytes of the SHA-256 of `parts` (each followed by a 0 byte, so that ("ab", "c") and
/// ("a", "bc") differ): a stable, well-spread 64-bit name for a prefix, a replica or a key.
pub(crate) fn hash64(parts: &[&[u8]]) -> u64 {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    for part in parts {
        hash.update(part);
        hash.update([0]);
    }
    let digest = hash.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// Most replicas one DNS name may bring in: a name that answers with thousands of addresses (a
/// mistake, or a hostile resolver) must not make the gateway poll thousands of hosts.
pub const MAX_DISCOVERED: usize = 256;

/// How often a DNS name of replicas is looked up again.
pub const DISCOVERY_INTERVAL: Duration = Duration::from_secs(5);

/// The gateway's state, shared by its requests and its poller.
pub struct Gateway {
    config: GatewayConfig,
    client: forward::HttpClient,
    upstreams: RwLock<Vec<Arc<Upstream>>>,
    /// Turns ties and round-robin.
    turn: AtomicUsize,
    in_flight: AtomicUsize,
    draining: AtomicBool,
    metrics: GatewayMetrics,
    remote: Option<Remote>,
    queue: queue::FairQueue,
    auth: Arc<crate::auth::Auth>,
    /// The replicas named with `--upstream`, which DNS discovery never removes.
    fixed: Vec<String>,
    /// What `/load` polls send when the replicas have keys.
    upstream_authorization: Option<axum::http::HeaderValue>,
    /// The dashboard's 15 minutes, replica by replica.
    history: crate::dashboard::History,
}

#[derive(Default)]
struct GatewayMetrics {
    /// Routing decisions by reason, in [`REASONS`] order.
    decisions: [AtomicU64; 6],
    /// Requests no replica took.
    unserved: AtomicU64,
    /// Requests refused for a full queue or a wait too long.
    queue_refused: AtomicU64,
}

const REASONS: [Reason; 6] =
    [Reason::Affinity, Reason::AffinitySpill, Reason::LeastLoaded, Reason::RoundRobin, Reason::Retry, Reason::Overflow];

impl GatewayMetrics {
    fn decided(&self, reason: Reason) {
        if let Some(i) = REASONS.iter().position(|&r| r == reason) {
            self.decisions[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What a base URL names: a replica (plain HTTP on a private network, `http://host:port` and
/// nothing after) or the remote endpoint (HTTP or HTTPS, with a path if it has one).
#[derive(Clone, Copy, PartialEq, Eq)]
enum UrlKind {
    Replica,
    Remote,
}

/// A replica URL as the gateway uses it: `http://host:port`, nothing after.
pub fn upstream_base(url: &str) -> Result<String, ServerError> {
    base_url(url, UrlKind::Replica)
}

/// A base URL without its trailing slash; the request's path is appended to it. Neither kind
/// carries credentials or a query: keys come from the environment.
fn base_url(url: &str, kind: UrlKind) -> Result<String, ServerError> {
    let bad = |reason: &str| ServerError::Upstream { url: url.to_string(), reason: reason.to_string() };
    let uri: axum::http::Uri = url.trim_end_matches('/').parse().map_err(|_| bad("not a URL"))?;
    let scheme = match (uri.scheme_str(), kind) {
        (Some("http"), _) => "http",
        (Some("https"), UrlKind::Remote) => "https",
        (Some(_), UrlKind::Replica) => return Err(bad("replicas are reached over http:// (on a private network)")),
        (Some(_), UrlKind::Remote) => return Err(bad("write it as https://host[/path] or http://host:port")),
        (None, _) => return Err(bad("write it as http://host:port")),
    };
    let authority = uri.authority().ok_or_else(|| bad("it names no host"))?;
    if authority.as_str().contains('@') || uri.query().is_some() {
        return Err(bad(match kind {
            UrlKind::Replica => "a replica URL has no user, password or query (give a key with --upstream-key-env)",
            UrlKind::Remote => "give the key with --remote-key-env, not in the URL",
        }));
    }
    let path = uri.path().trim_end_matches('/');
    if kind == UrlKind::Replica && !path.is_empty() {
        return Err(bad("a replica URL has no path"));
    }
    Ok(format!("{scheme}://{authority}{path}"))
}

/// The replicas a DNS answer names, at most [`MAX_DISCOVERED`], each once.
fn discovered_bases(addresses: &[std::net::SocketAddr]) -> Vec<String> {
    let mut bases: Vec<String> = Vec::new();
    for a in addresses {
        let base = match a {
            std::net::SocketAddr::V4(v4) => format!("http://{v4}"),
            std::net::SocketAddr::V6(v6) => format!("http://[{}]:{}", v6.ip(), v6.port()),
        };
        if !bases.contains(&base) {
            bases.push(base);
        }
        if bases.len() == MAX_DISCOVERED {
            break;
        }
    }
    bases
}

/// `Authorization: Bearer <key>`, marked sensitive; `None` for a key a header cannot carry.
fn bearer(key: &Secret) -> Option<axum::http::HeaderValue> {
    let mut value = axum::http::HeaderValue::from_str(&format!("Bearer {}", key.0)).ok()?;
    value.set_sensitive(true);
    Some(value)
}

impl Gateway {
    pub fn new(config: GatewayConfig) -> Result<Arc<Gateway>, ServerError> {
        let mut fixed: Vec<String> = Vec::new();
        for url in &config.upstreams {
            let base = upstream_base(url)?;
            if !fixed.contains(&base) {
                fixed.push(base);
            }
        }
        let upstreams: Vec<Arc<Upstream>> = fixed.iter().map(|b| Arc::new(Upstream::new(b.clone()))).collect();
        let upstream_authorization = config
            .upstream_key
            .as_ref()
            .map(|key| bearer(key).ok_or(ServerError::InvalidKey("--upstream-key-env")))
            .transpose()?;
        let remote = config.remote.as_ref().map(Remote::new).transpose()?;
        if upstreams.is_empty() && config.discover.is_none() && remote.is_none() {
            return Err(ServerError::NoUpstreams);
        }
        let queue = queue::FairQueue::new(config.max_queue.max(1));
        let shared = config.shared_database.as_ref().map(|s| s.0.as_str());
        let accounts = crate::accounts::Accounts::open_at(&config.home, shared).map_err(ServerError::Accounts)?;
        let keys = accounts.any_active().map_err(ServerError::Accounts)?;
        let auth = Arc::new(crate::auth::Auth::new(accounts, config.token_quota_window, keys));
        Ok(Arc::new(Gateway {
            config,
            client: forward::client()
                .map_err(|e| ServerError::Upstream { url: String::new(), reason: format!("cannot set up TLS: {e}") })?,
            upstreams: RwLock::new(upstreams),
            turn: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            metrics: GatewayMetrics::default(),
            remote,
            queue,
            auth,
            fixed,
            upstream_authorization,
            history: crate::dashboard::History::new(crate::dashboard::Bounds { ttft: pool::HEAD_LATENCY, itl: &[] }),
        }))
    }

    fn upstreams(&self) -> Vec<Arc<Upstream>> {
        self.upstreams.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The replicas, and the remote if there is one: what the gateway reports on.
    fn targets(&self) -> Vec<Arc<Upstream>> {
        let mut all = self.upstreams();
        all.extend(self.remote.as_ref().map(|r| r.upstream.clone()));
        all
    }

    /// Whether `upstream` is the remote endpoint.
    fn remote_of(&self, upstream: &Arc<Upstream>) -> Option<&Remote> {
        self.remote.as_ref().filter(|r| Arc::ptr_eq(&r.upstream, upstream))
    }

    /// The replicas to try for a request to `path`, in order, each with why: the remote first when
    /// every replica is saturated or none is ready, else last (for a model no replica has).
    fn plan(&self, path: &str, facts: &affinity::RequestFacts) -> Vec<(Arc<Upstream>, Reason)> {
        let mut plan = self.local_plan(facts);
        if let Some(remote) = &self.remote
            && REMOTE_PATHS.contains(&path)
        {
            remote.upstream.half_open(Instant::now());
            if remote.upstream.routable() {
                let saturated = plan.iter().all(|(u, _)| u.load() >= remote.overflow_at || u.full());
                if saturated {
                    plan.insert(0, (remote.upstream.clone(), Reason::Overflow));
                } else {
                    plan.push((remote.upstream.clone(), Reason::Retry));
                }
            }
        }
        plan
    }

    /// Whether a request with this plan waits in the fair queue: it would go to a replica that is
    /// full while every replica is, or others are waiting already (so it does not jump them).
    fn must_wait(&self, plan: &[(Arc<Upstream>, Reason)]) -> bool {
        let Some((first, _)) = plan.first() else { return false };
        if self.remote_of(first).is_some() {
            return false;
        }
        let locals: Vec<&Arc<Upstream>> = plan.iter().map(|(u, _)| u).filter(|u| self.remote_of(u).is_none()).collect();
        !self.queue.is_empty() || locals.iter().all(|u| u.full())
    }

    fn local_plan(&self, facts: &affinity::RequestFacts) -> Vec<(Arc<Upstream>, Reason)> {
        let routable: Vec<Arc<Upstream>> = self.upstreams().into_iter().filter(|u| u.routable()).collect();
        let candidates: Vec<Candidate> = routable
            .iter()
            .map(|u| Candidate {
                id: u.id,
                load: u.load(),
                has_model: facts.model.as_deref().is_some_and(|m| u.has_model(m)),
                full: u.full(),
            })
            .collect();
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        route::plan(&candidates, facts.prefix, self.config.policy, turn)
            .into_iter()
            .map(|(i, reason)| (routable[i].clone(), reason))
            .collect()
    }

    /// Ask every replica for its load once.
    async fn poll(self: &Arc<Self>) {
        let polls = self.upstreams().into_iter().map(|upstream| {
            let gateway = self.clone();
            async move {
                let result = tokio::time::timeout(Duration::from_secs(1), gateway.load_of(&upstream)).await;
                let now = Instant::now();
                match result {
                    Ok(Ok(load)) => {
                        if upstream.polled(load, now) {
                            tracing::info!(upstream = %upstream.base, "replica ready: taking requests");
                        }
                    }
                    Ok(Err(refused)) => {
                        if upstream.poll_failed(refused, now) {
                            tracing::warn!(upstream = %upstream.base, "replica ejected: it does not answer");
                        }
                    }
                    Err(_) => {
                        if upstream.poll_failed(false, now) {
                            tracing::warn!(upstream = %upstream.base, "replica ejected: its load did not come within 1 s");
                        }
                    }
                }
            }
        });
        futures_util::future::join_all(polls).await;
        // Room that opened otherwise than by a request ending (a replica back, or new) goes to
        // the requests waiting, as many as there are free slots.
        let free: u64 = self
            .upstreams()
            .iter()
            .filter(|u| u.routable())
            .map(|u| u.last_load().max_running.saturating_sub(u.in_flight.load(Ordering::Relaxed) as u64))
            .sum();
        for _ in 0..free.min(self.queue.len() as u64) {
            self.queue.release();
        }
    }

    /// A replica's `/load`; the error says whether the connection was refused.
    async fn load_of(&self, upstream: &Upstream) -> Result<Load, bool> {
        let mut request = axum::http::Request::get(format!("{}/load", upstream.base));
        if let Some(value) = &self.upstream_authorization {
            request = request.header(axum::http::header::AUTHORIZATION, value.clone());
        }
        let request = request.body(Full::new(axum::body::Bytes::new())).map_err(|_| false)?;
        let answer = self.client.request(request).await.map_err(|e| forward::is_refused(&e))?;
        if !answer.status().is_success() {
            if answer.status() == StatusCode::UNAUTHORIZED {
                tracing::warn!(upstream = %upstream.base, "the replica wants a key for /load: give one with --upstream-key-env");
            }
            return Err(false);
        }
        let limited = http_body_util::Limited::new(answer.into_body(), 64 << 10);
        let bytes = limited.collect().await.map_err(|_| false)?.to_bytes();
        serde_json::from_slice(&bytes).map_err(|_| false)
    }

    /// Look the DNS name up again: new addresses join, vanished ones leave.
    async fn discover(&self, name: &str, port: u16) {
        let addresses = match tokio::net::lookup_host((name, port)).await {
            Ok(a) => a.collect::<Vec<_>>(),
            Err(e) => {
                tracing::warn!("cannot look up the replicas' name {name}: {e}");
                return;
            }
        };
        if addresses.len() > MAX_DISCOVERED {
            tracing::warn!("{name} names {} addresses; the first {MAX_DISCOVERED} are used", addresses.len());
        }
        let bases = discovered_bases(&addresses);
        let mut upstreams = self.upstreams.write().unwrap_or_else(|e| e.into_inner());
        upstreams.retain(|u| {
            let keep = bases.contains(&u.base) || self.fixed.contains(&u.base);
            if !keep {
                tracing::info!(upstream = %u.base, "replica left {name}");
            }
            keep
        });
        for base in bases {
            if !upstreams.iter().any(|u| u.base == base) {
                tracing::info!(upstream = %base, "replica found under {name}");
                upstreams.push(Arc::new(Upstream::new(base)));
            }
        }
    }
}

/// The gateway's routes: its own probes, metrics and replica list; everything else is forwarded.
pub fn router(gateway: Arc<Gateway>) -> Router {
    let hosts = crate::guard::HostGuard::new(&gateway.config.host, &gateway.config.allowed_hosts);
    let origins = crate::guard::OriginGuard::new(&gateway.config.allowed_origins);
    let limits = (gateway.config.body_limit, gateway.config.connections.body_timeout);
    let mut router = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/gateway/upstreams", get(upstreams));
    if gateway.config.ui {
        // The dashboard: the same page as a server's; its data from the gateway's own view.
        router = router
            .route("/", get(crate::dashboard::page))
            .route("/ui", get(crate::dashboard::page))
            .route("/ui/app.js", get(crate::dashboard::script))
            .route("/ui/app.css", get(crate::dashboard::style))
            .route("/ui/icon.svg", get(crate::dashboard::icon))
            .route("/ui/state", get(dashboard::state));
    }
    router
        .fallback(forward::forward)
        .layer(axum::middleware::from_fn_with_state(gateway.clone(), keys::authorize))
        .layer(axum::middleware::from_fn_with_state(limits, crate::request::body_limits))
        .layer(axum::middleware::from_fn_with_state(origins, crate::guard::check_origin))
        .layer(axum::middleware::from_fn_with_state(hosts, crate::guard::check_host))
        .layer(axum::middleware::from_fn(crate::error::with_shape))
        .layer(axum::middleware::from_fn(crate::request_log::with_request_id))
        .with_state(gateway)
}

/// Ready while a replica is.
async fn ready(State(gateway): State<Arc<Gateway>>) -> impl IntoResponse {
    let any = gateway.upstreams().iter().any(|u| u.routable());
    if any && !gateway.draining.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no replica is ready")
    }
}

/// Each replica as the gateway sees it.
async fn upstreams(State(gateway): State<Arc<Gateway>>) -> axum::Json<serde_json::Value> {
    let list: Vec<serde_json::Value> =
        gateway.targets().iter().map(|u| dashboard::replica_view(&gateway, u, &|_| true)).collect();
    axum::Json(serde_json::json!({ "upstreams": list }))
}

async fn metrics(State(gateway): State<Arc<Gateway>>) -> impl IntoResponse {
    let mut out = Families::default();
    for u in gateway.targets() {
        let labels = format!("upstream=\"{}\"", crate::label_value(&u.base));
        let counters: [(&str, &str, &AtomicU64); 5] = [
            ("requests_total", "Requests sent to the replica (retries included).", &u.requests),
            ("answered_total", "Answers relayed from the replica.", &u.answered),
            ("failures_total", "Requests that failed at the replica before an answer.", &u.failures),
            ("cut_total", "Answers the replica cut short after their first byte.", &u.cut),
            ("ejections_total", "Times the replica was ejected (its circuit opened).", &u.ejections),
        ];
        for (name, help, value) in counters {
            let name = format!("berth:gateway_upstream_{name}");
            out.sample(&name, "counter", help, &labels, value.load(Ordering::Relaxed));
        }
        let gauges = [
            ("berth:gateway_upstream_up", "Whether the replica takes requests (1) or not (0).", u.routable() as u64),
            (
                "berth:gateway_upstream_in_flight",
                "Requests the gateway has at the replica.",
                u.in_flight.load(Ordering::Relaxed) as u64,
            ),
        ];
        for (name, help, value) in gauges {
            out.sample(name, "gauge", help, &labels, value);
        }
        let name = "berth:gateway_upstream_head_latency_seconds";
        let text = out.entry(name, "histogram", "From a request's arrival to the replica's answer head.");
        u.head_latency.write(text, name, &labels);
    }
    for (reason, count) in REASONS.iter().zip(&gateway.metrics.decisions) {
        out.sample(
            "berth:gateway_routing_decisions_total",
            "counter",
            "Replicas chosen, by why.",
            &format!("reason=\"{}\"", reason.label()),
            count.load(Ordering::Relaxed),
        );
    }
    out.sample(
        "berth:gateway_unserved_total",
        "counter",
        "Requests no replica could take (503).",
        "",
        gateway.metrics.unserved.load(Ordering::Relaxed),
    );
    out.sample(
        "berth:gateway_in_flight",
        "gauge",
        "Requests being answered.",
        "",
        gateway.in_flight.load(Ordering::Relaxed),
    );
    out.sample(
        "berth:gateway_queue_length",
        "gauge",
        "Requests waiting in the gateway's fair queue for a replica with room.",
        "",
        gateway.queue.len(),
    );
    out.sample(
        "berth:gateway_queue_refused_total",
        "counter",
        "Requests refused (429) for a full queue or a wait past its timeout.",
        "",
        gateway.metrics.queue_refused.load(Ordering::Relaxed),
    );
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], out.finish())
}

/// Bind and forward until SIGTERM or Ctrl-C; then close the listener and let the answers in flight
/// finish for at most the drain timeout.
pub async fn serve(config: GatewayConfig) -> Result<(), ServerError> {
    if !crate::guard::is_loopback(&config.host) && !config.allow_insecure_public {
        return Err(ServerError::UnprotectedGateway(config.host.clone()));
    }
    let addr = format!("{}:{}", config.host, config.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|source| ServerError::Bind { addr: addr.clone(), source })?;
    let gateway = Gateway::new(config)?;
    tracing::info!(
        "berth gateway listening on http://{addr} in front of {} replica(s){}",
        gateway.upstreams().len(),
        gateway.config.discover.as_ref().map(|(n, p)| format!(" and those under {n}:{p}")).unwrap_or_default()
    );
    let poller = {
        let gateway = gateway.clone();
        tokio::spawn(async move {
            let mut discovered: Option<Instant> = None;
            let mut flushed = Instant::now();
            loop {
                // Refused requests counted since the last round go to usage in one write.
                if flushed.elapsed() >= Duration::from_secs(1) {
                    let auth = gateway.auth.clone();
                    let _ = tokio::task::spawn_blocking(move || auth.flush_rejections()).await;
                    flushed = Instant::now();
                }
                if let Some((name, port)) = &gateway.config.discover
                    && discovered.is_none_or(|t| t.elapsed() >= DISCOVERY_INTERVAL)
                {
                    gateway.discover(name, *port).await;
                    discovered = Some(Instant::now());
                }
                gateway.poll().await;
                tokio::time::sleep(gateway.config.poll_interval).await;
            }
        })
    };
    let _stop_poller = crate::AbortOnDrop(poller);
    let sampler = {
        let gateway = gateway.clone();
        tokio::spawn(async move {
            crate::dashboard::keep_sampling(&gateway.history, || std::future::ready(dashboard::counts(&gateway))).await
        })
    };
    let _stop_sampler = crate::AbortOnDrop(sampler);
    let app = router(gateway.clone());
    let shutdown = {
        let gateway = gateway.clone();
        async move {
            crate::stop_signal().await;
            gateway.draining.store(true, Ordering::SeqCst);
            tracing::info!("stopping: no new connections; relaying the answers in flight");
        }
    };
    let server = crate::listener::serve(listener, app, &gateway.config.connections, shutdown);
    let timeout = gateway.config.drain_timeout;
    tokio::pin!(server);
    tokio::select! {
        _ = &mut server => {}
        _ = async {
            while !gateway.draining.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::select! {
                _ = tokio::time::sleep(timeout) => tracing::warn!("answers still in flight after the drain timeout; ending them"),
                _ = crate::stop_signal() => tracing::warn!("second signal; ending the answers in flight now"),
            }
        } => {}
    }
    gateway.auth.flush_rejections();
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_urls_are_plain_http_addresses() {
        assert_eq!(upstream_base("http://10.0.0.5:12480/").unwrap(), "http://10.0.0.5:12480");
        assert_eq!(upstream_base("http://berth-1:12480").unwrap(), "http://berth-1:12480");
        for bad in ["10.0.0.5:12480", "https://10.0.0.5", "http://10.0.0.5/v1", "http://u:p@10.0.0.5", "http://x?y=1"] {
            assert!(upstream_base(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_dns_answer_brings_in_at_most_its_share_of_replicas() {
        let flood: Vec<std::net::SocketAddr> = (0..5000u32)
            .map(|i| std::net::SocketAddr::from((std::net::Ipv4Addr::from(0x0a00_0000 + i), 12480)))
            .collect();
        let bases = discovered_bases(&flood);
        assert_eq!(bases.len(), MAX_DISCOVERED);
        assert_eq!(bases[0], "http://10.0.0.0:12480");
        let twice = [flood[1], flood[1], std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 1))];
        assert_eq!(discovered_bases(&twice), vec!["http://10.0.0.1:12480".to_string(), "http://[::1]:1".to_string()]);
    }

    #[test]
    fn keys_never_show_in_a_configuration_printed() {
        let config = GatewayConfig {
            upstream_key: Some(Secret("replica-secret".into())),
            remote: Some(RemoteConfig {
                url: "https://api.example.com".into(),
                key: Some(Secret("remote-secret".into())),
                models: vec![("a".into(), "b".into())],
                overflow_at: 16.0,
            }),
            ..GatewayConfig::default()
        };
        let printed = format!("{config:?}");
        assert!(!printed.contains("secret") && printed.contains("<redacted>"), "{printed}");
    }

    #[test]
    fn remote_urls_keep_their_path_and_refuse_credentials() {
        let remote = |url: &str| {
            Remote::new(&RemoteConfig { url: url.into(), key: None, models: vec![], overflow_at: 1.0 })
                .map(|r| r.upstream.base.clone())
        };
        assert_eq!(remote("https://api.example.com/openai/").unwrap(), "https://api.example.com/openai");
        assert_eq!(remote("http://10.0.1.9:12480").unwrap(), "http://10.0.1.9:12480");
        assert!(remote("ftp://x").is_err() && remote("https://u:p@x").is_err() && remote("https://x?key=1").is_err());
        let mapped = Remote::new(&RemoteConfig {
            url: "http://r".into(),
            key: Some(Secret("k\nx".into())),
            models: vec![],
            overflow_at: 1.0,
        });
        assert!(mapped.is_err(), "a key a header cannot carry is refused at start");
        let home = tempfile::tempdir().unwrap();
        let polling = Gateway::new(GatewayConfig {
            upstreams: vec!["http://127.0.0.1:1".into()],
            upstream_key: Some(Secret("k\nx".into())),
            home: home.path().to_path_buf(),
            ..GatewayConfig::default()
        });
        assert!(matches!(polling, Err(ServerError::InvalidKey("--upstream-key-env"))), "the replicas' key too");
    }
}
