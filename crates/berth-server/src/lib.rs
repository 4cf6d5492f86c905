//! berth's daemon: the OpenAI- and Ollama-compatible HTTP APIs over the engine and the model store.
//!
//! ```no_run
//! # async fn demo() -> Result<(), berth_server::ServerError> {
//! let config = berth_server::ServerConfig { home: berth_store::Store::default_home(), ..Default::default() };
//! berth_server::serve(config).await
//! # }
//! ```

pub mod accounts;
mod anthropic;
mod auth;
mod dashboard;
mod deployments;
mod embeddings;
mod error;
pub mod fuzzing;
pub mod gateway;
mod guard;
mod limits;
mod listener;
mod metrics;
mod models;
mod ollama;
mod ollama_create;
mod openai;
mod pinning;
mod quota;
mod request;
mod request_log;
mod responses;
mod run;
mod shared_db;
mod tokenize;
mod tool_calls;
mod vetting;

pub use vetting::ModelVetting;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{MethodRouter, get, post};

pub use error::ApiError;
pub use limits::{LimitsByModel, ModelLimits};
pub use listener::ConnectionLimits;
pub use models::{KeepAlive, MemoryConfig};

/// How to run the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// Models to load before the server reports ready.
    pub models: Vec<String>,
    /// The largest request body accepted (bytes).
    pub body_limit: usize,
    /// berth's data folder.
    pub home: PathBuf,
    pub batching: BatchingConfig,
    pub memory: models::MemoryConfig,
    /// Host names a loopback server answers to besides localhost's.
    pub allowed_hosts: Vec<String>,
    /// Serve on a non-loopback address without API keys (anyone who reaches it may use it).
    pub allow_insecure_public: bool,
    /// How long the models named in `models` stay loaded when idle.
    pub preload_keep_alive: KeepAlive,
    /// Connections: how many at once, how long for a request's head and body.
    pub connections: ConnectionLimits,
    /// Web origins whose pages may call the API (`http://localhost:*` style patterns); pages of
    /// any other origin are refused.
    pub allowed_origins: Vec<String>,
    /// After SIGTERM or SIGINT, how long requests in flight may take to finish.
    pub drain_timeout: std::time::Duration,
    /// The window of keys' `tokens_per_day` quotas: a day (shorter only to test that quotas recover).
    pub token_quota_window: std::time::Duration,
    /// A PostgreSQL database for keys, usage, quotas and deployments shared with other servers
    /// and gateways (instead of the SQLite database in `home`).
    pub shared_database: Option<Secret>,
    /// Serve the dashboard (`/` and `/ui`); off, those paths are 404.
    pub ui: bool,
}

/// A key or connection string berth passes on: shown as `<redacted>` by `Debug`, so no log of a
/// configuration can carry it.
#[derive(Clone)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// How each model shares itself among concurrent requests.
#[derive(Debug, Clone)]
pub struct BatchingConfig {
    /// Sequences generating at once.
    pub max_running: usize,
    /// Tokens per step (decodes plus prompt chunks).
    pub max_batch_tokens: usize,
    /// Requests that may wait for admission; beyond, 429 with `Retry-After`.
    pub max_queue: usize,
    /// Memory for each model's KV cache.
    pub kv_cache_bytes: u64,
    /// Limit on a request's whole life, waiting included.
    pub request_timeout: Option<std::time::Duration>,
    pub prefix_cache: bool,
    /// How each model's KV cache stores keys and values (a model whose heads q8_0 cannot split
    /// keeps f16, with a warning in the log).
    pub kv_type: berth_engine::model::KvType,
    /// Guess generating requests' next tokens from their own text (prompt lookup) and verify them
    /// in the step, where it pays; answers are the same either way.
    pub speculation: bool,
    /// A fixed price for guessed tokens (see the scheduler's `draft_cost`); `None` measures it.
    pub draft_cost: Option<f64>,
    /// What a step with generating streams aims for (their time between tokens).
    pub step_target: Option<berth_engine::scheduler::pacing::StepTarget>,
    /// Models with limits of their own (threads, concurrency, context).
    pub per_model: LimitsByModel,
}

impl Default for BatchingConfig {
    fn default() -> Self {
        Self {
            max_running: 64,
            max_batch_tokens: 256,
            max_queue: 256,
            kv_cache_bytes: 2 << 30,
            request_timeout: Some(std::time::Duration::from_secs(600)),
            prefix_cache: true,
            kv_type: Default::default(),
            speculation: true,
            draft_cost: None,
            step_target: Some(Default::default()),
            per_model: LimitsByModel::default(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 12480,
            models: Vec::new(),
            body_limit: 2 << 20,
            home: PathBuf::from("."),
            batching: BatchingConfig::default(),
            memory: models::MemoryConfig {
                budget: 8 << 30,
                keep_alive: models::KeepAlive::For(std::time::Duration::from_secs(300)),
                pinned: Vec::new(),
            },
            allowed_hosts: Vec::new(),
            allow_insecure_public: false,
            allowed_origins: Vec::new(),
            connections: ConnectionLimits::default(),
            preload_keep_alive: KeepAlive::Forever,
            drain_timeout: std::time::Duration::from_secs(30),
            token_quota_window: std::time::Duration::from_secs(86_400),
            shared_database: None,
            ui: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "refusing to listen on {0} without API keys: anyone who can reach it could use and manage your models. Make a key (`berth keys create --name NAME`), listen on 127.0.0.1 (the default), or pass --allow-insecure-public if something in front of berth (a proxy, a private network) does the guarding"
    )]
    Unprotected(String),
    #[error("{0}")]
    Accounts(accounts::AccountsError),
    #[error("{0}")]
    Deployments(String),
    #[error("cannot listen on {addr}: {source} (is another server using the port? choose one with --port)")]
    Bind { addr: String, source: std::io::Error },
    #[error("cannot load {model} at start: {message}")]
    Preload { model: String, message: String },
    #[error("the server stopped: {0}")]
    Serve(std::io::Error),
    #[error(
        "refusing to listen on {0}: the gateway would let anyone who can reach it use the replicas behind it. Listen on 127.0.0.1 (the default), or pass --allow-insecure-public if the replicas have keys or something in front guards the port"
    )]
    UnprotectedGateway(String),
    #[error("cannot use the replica {url:?}: {reason}")]
    Upstream { url: String, reason: String },
    #[error("no replicas: name them with --upstream URL (repeatable) or --upstreams-from dns:NAME:PORT")]
    NoUpstreams,
    #[error("the key in {0} has characters an HTTP header cannot carry")]
    InvalidKey(&'static str),
}

#[derive(Clone)]
pub struct AppState {
    models: Arc<models::ModelManager>,
    ready: Arc<AtomicBool>,
    /// Shutting down: new work gets 503.
    draining: Arc<AtomicBool>,
    auth: Arc<auth::Auth>,
    /// Stored Responses API answers.
    responses: Arc<responses::ResponseStore>,
    /// The dashboard's 15 minutes of samples.
    history: Arc<dashboard::History>,
}

/// Who may call a route: anyone (probes), or a key with a scope once the server has keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    Open,
    Needs(accounts::Scope),
}

/// Every route with the access it needs. A route is added here or nowhere, so none can miss its
/// scope (authorization fails closed: there is no default).
fn routes() -> Vec<(&'static str, Access, MethodRouter<AppState>)> {
    use Access::{Needs, Open};
    use accounts::Scope::{Admin, Inference, Metrics};
    vec![
        ("/v1/chat/completions", Needs(Inference), post(openai::chat_completions)),
        ("/v1/completions", Needs(Inference), post(openai::completions)),
        ("/v1/models", Needs(Inference), get(openai::list_models)),
        ("/v1/models/{*id}", Needs(Inference), get(openai::get_model)),
        ("/v1/embeddings", Needs(Inference), post(embeddings::openai_embeddings)),
        // The paths without `/v1` that clients written for llama.cpp's server call.
        ("/chat/completions", Needs(Inference), post(openai::chat_completions)),
        ("/completions", Needs(Inference), post(openai::completions)),
        ("/models", Needs(Inference), get(openai::list_models)),
        ("/models/{*id}", Needs(Inference), get(openai::get_model)),
        ("/embeddings", Needs(Inference), post(embeddings::openai_embeddings)),
        ("/v1/messages", Needs(Inference), post(anthropic::messages)),
        ("/v1/responses", Needs(Inference), post(responses::create)),
        ("/v1/responses/{id}", Needs(Inference), get(responses::retrieve).delete(responses::delete)),
        ("/tokenize", Needs(Inference), post(tokenize::tokenize)),
        ("/detokenize", Needs(Inference), post(tokenize::detokenize)),
        ("/v1/messages/count_tokens", Needs(Inference), post(anthropic::count_tokens)),
        ("/api/embed", Needs(Inference), post(embeddings::ollama_embed)),
        ("/api/embeddings", Needs(Inference), post(embeddings::ollama_embeddings)),
        ("/api/chat", Needs(Inference), post(ollama::chat)),
        ("/api/generate", Needs(Inference), post(ollama::generate)),
        ("/api/tags", Needs(Inference), get(ollama::tags)),
        ("/api/show", Needs(Inference), post(ollama::show)),
        ("/api/ps", Needs(Inference), get(ollama::ps)),
        ("/api/version", Needs(Inference), get(ollama::version)),
        ("/api/pull", Needs(Admin), post(ollama::pull)),
        ("/api/push", Needs(Admin), post(ollama::push)),
        ("/api/copy", Needs(Admin), post(ollama::copy)),
        ("/api/create", Needs(Admin), post(ollama_create::create)),
        ("/api/blobs/{digest}", Needs(Admin), post(ollama_create::put_blob).head(ollama_create::has_blob)),
        ("/api/delete", Needs(Admin), axum::routing::delete(ollama::delete)),
        ("/api/pin", Needs(Admin), post(pinning::pin)),
        ("/api/deployments", Needs(Admin), get(deployments::api::list)),
        (
            "/api/deployments/{name}",
            Needs(Admin),
            get(deployments::api::show).put(deployments::api::deploy).delete(deployments::api::undeploy),
        ),
        ("/api/deployments/{name}/rollout", Needs(Admin), post(deployments::api::rollout)),
        ("/api/deployments/{name}/step", Needs(Admin), post(deployments::api::step)),
        ("/api/deployments/{name}/promote", Needs(Admin), post(deployments::api::promote)),
        ("/api/deployments/{name}/abort", Needs(Admin), post(deployments::api::abort)),
        ("/api/deployments/{name}/rollback", Needs(Admin), post(deployments::api::rollback)),
        ("/api/deployments/{name}/refresh", Needs(Admin), post(deployments::api::refresh)),
        ("/metrics", Needs(Metrics), get(metrics)),
        ("/load", Needs(Metrics), get(load)),
        ("/health", Open, get(|| async { "ok" })),
        ("/ready", Open, get(ready)),
        // The dashboard's page holds no data (what it shows comes from /ui/state and the API, with
        // the key the user gives it). At `/` too, where a browser pointed at berth lands.
        ("/", Open, get(dashboard::page)),
        ("/ui", Open, get(dashboard::page)),
        ("/ui/app.js", Open, get(dashboard::script)),
        ("/ui/app.css", Open, get(dashboard::style)),
        ("/ui/icon.svg", Open, get(dashboard::icon)),
        ("/ui/state", Needs(Inference), get(dashboard::state)),
    ]
}

/// The routes, for tests and embedding. `allowed_hosts` adds names a loopback server answers to.
pub fn router(state: AppState, config: &ServerConfig) -> Router {
    let hosts = guard::HostGuard::new(&config.host, &config.allowed_hosts);
    let origins = guard::OriginGuard::new(&config.allowed_origins);
    let mut router = Router::new();
    let dashboard = |path: &str| path == "/" || path == "/ui" || path.starts_with("/ui/");
    for (path, access, handler) in routes().into_iter().filter(|(path, _, _)| config.ui || !dashboard(path)) {
        let handler = match access {
            Access::Open => handler,
            Access::Needs(scope) => {
                handler.layer(axum::middleware::from_fn_with_state((state.auth.clone(), scope), auth::authorize))
            }
        };
        router = router.route(path, handler);
    }
    router
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .layer(axum::middleware::from_fn(deployments::served::tag_response))
        .layer(DefaultBodyLimit::max(config.body_limit))
        .layer(axum::middleware::from_fn_with_state(
            (config.body_limit, config.connections.body_timeout),
            request::body_limits,
        ))
        .layer(axum::middleware::from_fn_with_state(state.draining.clone(), refuse_while_draining))
        .layer(axum::middleware::from_fn_with_state(origins, guard::check_origin))
        .layer(axum::middleware::from_fn_with_state(hosts, guard::check_host))
        .layer(axum::middleware::from_fn(error::with_shape))
        .layer(axum::middleware::from_fn(request_log::with_request_id))
        .with_state(state)
}

async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    if state.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

/// Prometheus text format; names follow vLLM's with the `berth:` prefix, every sample labelled
/// `model_name`.
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let loaded: Vec<Arc<models::LoadedModel>> = state
        .models
        .loaded()
        .await
        .into_iter()
        .filter_map(|m| match m {
            models::Loaded::Chat(m) => Some(m),
            models::Loaded::Embed(_) => None,
        })
        .collect();
    type Read = fn(&berth_engine::scheduler::SchedulerStats) -> f64;
    let families: [(&str, &str, &str, Read); 16] = [
        ("num_requests_running", "gauge", "Requests generating now.", |s| s.running.load(Ordering::Relaxed) as f64),
        ("num_requests_waiting", "gauge", "Requests waiting to be admitted (preempted ones included).", |s| {
            s.waiting.load(Ordering::Relaxed) as f64
        }),
        ("kv_cache_usage_perc", "gauge", "Share of the KV cache blocks held by requests (0 to 1).", |s| s.kv_usage()),
        ("kv_cache_capacity_tokens", "gauge", "Positions the KV cache holds, over all requests.", |s| {
            (s.kv_blocks_total.load(Ordering::Relaxed) * berth_engine::model::BLOCK_TOKENS) as f64
        }),
        ("prompt_tokens_total", "counter", "Prompt tokens run through the model.", |s| {
            s.prefill_tokens.load(Ordering::Relaxed) as f64
        }),
        ("generation_tokens_total", "counter", "Tokens generated.", |s| {
            s.generated_tokens.load(Ordering::Relaxed) as f64
        }),
        ("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.", |s| {
            s.prefix_queried_tokens.load(Ordering::Relaxed) as f64
        }),
        ("prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.", |s| {
            s.prefix_hit_tokens.load(Ordering::Relaxed) as f64
        }),
        ("num_preemptions_total", "counter", "Requests preempted for lack of KV cache blocks.", |s| {
            s.preemptions.load(Ordering::Relaxed) as f64
        }),
        ("engine_steps_total", "counter", "Batched forward passes.", |s| s.steps.load(Ordering::Relaxed) as f64),
        ("engine_step_seconds_total", "counter", "Wall time of the engine's steps.", |s| {
            s.step_nanos.load(Ordering::Relaxed) as f64 / 1e9
        }),
        (
            "grammar_mask_seconds_total",
            "counter",
            "Time constrained requests spent computing grammar masks, summed over requests.",
            |s| s.mask_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        ),
        (
            "paced_steps_total",
            "counter",
            "Steps whose prompt work was cut short to keep the running streams within the ITL target.",
            |s| s.paced_steps.load(Ordering::Relaxed) as f64,
        ),
        ("spec_decode_num_draft_tokens_total", "counter", "Tokens guessed ahead (prompt lookup) and verified.", |s| {
            s.drafted_tokens.load(Ordering::Relaxed) as f64
        }),
        ("spec_decode_num_accepted_tokens_total", "counter", "Guessed tokens the model confirmed.", |s| {
            s.accepted_tokens.load(Ordering::Relaxed) as f64
        }),
        (
            "pace_holds_total",
            "counter",
            "Steps in which a request was kept waiting although it might have fit: one more stream would have slowed every stream without raising throughput.",
            |s| s.pace_holds.load(Ordering::Relaxed) as f64,
        ),
    ];
    let mut out = metrics::Families::default();
    for m in &loaded {
        let labels = format!("model_name=\"{}\",model_version=\"{}\"", label_value(&m.name), label_value(&m.version));
        for (name, kind, help, read) in &families {
            out.sample(&format!("berth:{name}"), kind, help, &labels, read(m.runner.stats()));
        }
        let help = "Memory a loaded model may use, by part.";
        for (part, bytes) in [("weights", m.size), ("kv_cache", m.kv_cache_bytes())] {
            out.sample("berth:model_memory_bytes", "gauge", help, &format!("{labels},part=\"{part}\""), bytes);
        }
        m.metrics.write(&labels, &mut out);
    }
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], out.finish())
}

/// Readiness and load in one small answer, for a gateway that polls every replica about ten times
/// a second (`/metrics` says more, at many times the cost): requests waiting and running, how many
/// may run at once, and the fullest KV cache, over the loaded models, and those models' names.
async fn load(State(state): State<AppState>) -> axum::Json<serde_json::Value> {
    let (mut waiting, mut running, mut kv_usage, mut max_running) = (0u64, 0u64, 0f64, 0u64);
    let mut names = Vec::new();
    for model in state.models.loaded().await {
        if let models::Loaded::Chat(m) = &model {
            let stats = m.runner.stats();
            waiting += stats.waiting.load(Ordering::Relaxed) as u64;
            running += stats.running.load(Ordering::Relaxed) as u64;
            kv_usage = kv_usage.max(stats.kv_usage());
            max_running += m.runner.config().scheduler.max_running as u64;
        }
        names.push(model.name().to_string());
    }
    axum::Json(serde_json::json!({
        "ready": state.ready.load(Ordering::SeqCst),
        "draining": state.draining.load(Ordering::SeqCst),
        "waiting": waiting,
        "running": running,
        "kv_cache_usage": kv_usage,
        "max_running": max_running,
        "models": names,
        // Since start, as of the dashboard's last sample (a gateway's dashboard draws its rate).
        "generated_tokens": state.history.totals(&|_| true).0,
    }))
}

/// A label value in the exposition format: backslash, quote and newline escaped.
pub(crate) fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Bind, load the named models, and serve until the process is stopped.
pub async fn serve(config: ServerConfig) -> Result<(), ServerError> {
    let shared = config.shared_database.as_ref().map(|s| s.0.as_str());
    let accounts = accounts::Accounts::open_at(&config.home, shared).map_err(ServerError::Accounts)?;
    let keys = accounts.any_active().map_err(ServerError::Accounts)?;
    if !guard::is_loopback(&config.host) && !keys && !config.allow_insecure_public {
        return Err(ServerError::Unprotected(config.host.clone()));
    }
    let addr = format!("{}:{}", config.host, config.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|source| ServerError::Bind { addr: addr.clone(), source })?;
    let state = AppState {
        models: Arc::new(
            models::ModelManager::new(config.home.clone(), config.batching.clone(), config.memory.clone(), shared)
                .map_err(|e| ServerError::Deployments(e.to_string()))?,
        ),
        ready: Arc::new(AtomicBool::new(false)),
        draining: Arc::new(AtomicBool::new(false)),
        auth: Arc::new(auth::Auth::new(accounts, config.token_quota_window, keys)),
        responses: Arc::new(responses::ResponseStore::open(&config.home).map_err(|source| {
            ServerError::Accounts(accounts::AccountsError::Database { path: config.home.join("berth.db"), source })
        })?),
        history: Arc::default(),
    };
    let app = router(state.clone(), &config);
    let local: SocketAddr = listener.local_addr().map_err(ServerError::Serve)?;
    tracing::info!("listening on http://{local}");
    let preload = {
        let state = state.clone();
        async move {
            for model in &config.models {
                state
                    .models
                    .pull_if_missing(model)
                    .await
                    .map_err(|e| ServerError::Preload { model: model.clone(), message: e.message })?;
                state
                    .models
                    .preload(model, config.preload_keep_alive)
                    .await
                    .map_err(|e| ServerError::Preload { model: model.clone(), message: e.message })?;
                let name = berth_store::Reference::parse(model).map_or_else(|_| model.clone(), |r| r.familiar());
                tracing::info!(model = %name, "loaded");
            }
            state.ready.store(true, Ordering::SeqCst);
            Ok::<(), ServerError>(())
        }
    };
    // SIGTERM or SIGINT: not ready at once and the listener closes (a new connection is refused,
    // so a client or gateway retries it on another replica with nothing lost; a request arriving
    // on a connection kept alive from before gets a 503), while the requests in flight finish for
    // at most the drain timeout; those still running then end with a final error event. A second
    // signal skips the waiting. In Kubernetes a preStop sleep keeps the pod serving until the
    // endpoints no longer name it.
    let stop_accepting = Arc::new(tokio::sync::Notify::new());
    let drain = {
        let (state, stop_accepting, timeout) = (state.clone(), stop_accepting.clone(), config.drain_timeout);
        async move {
            stop_signal().await;
            state.ready.store(false, Ordering::SeqCst);
            state.draining.store(true, Ordering::SeqCst);
            stop_accepting.notify_one();
            tracing::info!(
                "stopping: no new connections; finishing the requests in flight (at most {} s; a second signal stops at once)",
                timeout.as_secs()
            );
            let finished = async {
                while state.models.in_flight().await > 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            };
            tokio::select! {
                _ = finished => {}
                _ = tokio::time::sleep(timeout) => {
                    tracing::warn!("requests still running after the drain timeout; ending them");
                }
                _ = stop_signal() => tracing::warn!("second signal; ending the requests in flight now"),
            }
            // Whatever still runs ends with an error event; give the streams a moment to send it.
            state.models.abort_all();
            let ended = async {
                while state.models.in_flight().await > 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), ended).await;
        }
    };
    let drain_task = AbortOnDrop(tokio::spawn(drain));
    // Models idle past their keep-alive are unloaded; refused requests counted since the last
    // round are written to usage.
    let reaper = {
        let (models, auth) = (state.models.clone(), state.auth.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                models.reap().await;
                let auth = auth.clone();
                let _ = tokio::task::spawn_blocking(move || auth.flush_rejections()).await;
            }
        })
    };
    let _stop_reaper = AbortOnDrop(reaper);
    // Deployments: guards, automatic steps, followed tags, and rollouts a restart interrupted.
    let tender = {
        let models = state.models.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                models.tend_deployments().await;
            }
        })
    };
    let _stop_tender = AbortOnDrop(tender);
    // The dashboard's history: the loaded models' counters every few seconds.
    let sampler = {
        let state = state.clone();
        tokio::spawn(async move { dashboard::keep_sampling(&state.history, || dashboard::counts(&state)).await })
    };
    let _stop_sampler = AbortOnDrop(sampler);
    let shutdown = async move { stop_accepting.notified().await };
    let server = listener::serve(listener, app, &config.connections, shutdown);
    tokio::pin!(server);
    tokio::select! {
        _ = &mut server => {
            state.auth.flush_rejections();
            return Ok(());
        }
        p = preload => p?,
    }
    // Connections still open after the streams ended (idle keep-alives) do not hold the exit up.
    tokio::select! {
        _ = &mut server => {}
        _ = async {
            while !drain_task.0.is_finished() {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        } => {}
    }
    state.auth.flush_rejections();
    tracing::info!("stopped");
    Ok(())
}

/// While the server drains, a request on a connection kept alive from before is refused (probes
/// and metrics still answer).
async fn refuse_while_draining(
    State(draining): State<Arc<AtomicBool>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let probe = matches!(request.uri().path(), "/health" | "/ready" | "/metrics");
    if draining.load(Ordering::SeqCst) && !probe {
        return ApiError::unavailable(
            "the server is shutting down; send the request to another instance or retry later",
        )
        .into_response();
    }
    next.run(request).await
}

pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// SIGTERM (what orchestrators send) or SIGINT (Ctrl-C).
pub(crate) async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_probes_and_the_dashboards_sources_are_open_and_management_needs_admin() {
        let table = routes();
        let open: Vec<&str> = table.iter().filter(|r| r.1 == Access::Open).map(|r| r.0).collect();
        // The dashboard's page, script, style and icon hold no data; what they show needs a key.
        assert_eq!(open, ["/health", "/ready", "/", "/ui", "/ui/app.js", "/ui/app.css", "/ui/icon.svg"]);
        for (path, access, _) in &table {
            if ["/api/pull", "/api/push", "/api/copy", "/api/create", "/api/blobs/{digest}", "/api/delete"]
                .contains(path)
                || path.starts_with("/api/deployments")
            {
                assert_eq!(*access, Access::Needs(accounts::Scope::Admin), "{path}");
            }
        }
    }
}
