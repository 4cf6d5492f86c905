//! API keys on every request once any key exists: `Authorization: Bearer <secret>`, the scope the
//! endpoint needs, and the key's requests-per-minute and tokens-per-day quotas. Health and readiness
//! stay open (probes carry no keys). The caller rides along in a task-local, so that a model can be
//! refused to a key that may not use it, and a request can charge its usage when it ends (to no key
//! on a server without keys).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::accounts::{Accounts, ApiKey, NO_KEY, Record, Scope};
use crate::error::ApiError;

pub struct Auth {
    accounts: Mutex<Accounts>,
    /// Each key's request times within the last minute, for its quota.
    recent: Mutex<HashMap<String, VecDeque<Instant>>>,
    /// The window of `tokens_per_day` quotas: a day, shorter only in tests.
    token_window: Duration,
}

/// Who is asking: the key (none on a server without keys), and where its usage goes.
#[derive(Clone)]
pub struct Caller {
    pub key: Option<ApiKey>,
    pub auth: Arc<Auth>,
}

impl Caller {
    /// The key id usage is recorded under.
    pub fn key_id(&self) -> &str {
        self.key.as_ref().map_or(NO_KEY, |k| &k.id)
    }

    /// Record an ended request (logged, not fatal, if the database refuses).
    pub fn record(&self, record: &Record<'_>) {
        self.auth.record(record)
    }

    /// Refuse a model the key may not use (403, naming the ones it may).
    pub fn check_model(&self, familiar: &str) -> Result<(), ApiError> {
        match &self.key {
            Some(key) if !key.may_use(familiar) => Err(ApiError::forbidden_model(format!(
                "the key `{}` may not use `{familiar}`; it may use {}",
                key.name,
                key.models.join(", ")
            ))),
            _ => Ok(()),
        }
    }
}

tokio::task_local! {
    pub static CALLER: Option<Caller>;
}

/// The caller of the request being handled, if keys are in use.
pub fn caller() -> Option<Caller> {
    CALLER.try_with(|c| c.clone()).ok().flatten()
}

impl Auth {
    /// `token_window` is the span of `tokens_per_day` quotas (a day, but for tests).
    pub fn new(accounts: Accounts, token_window: Duration) -> Self {
        Self { accounts: Mutex::new(accounts), recent: Mutex::new(HashMap::new()), token_window }
    }

    fn accounts(&self) -> std::sync::MutexGuard<'_, Accounts> {
        self.accounts.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn any_active(&self) -> bool {
        self.accounts().any_active().unwrap_or(true)
    }

    /// Charge an ended request to its key (logged, not fatal, if the database refuses).
    pub fn record(&self, record: &Record<'_>) {
        if let Err(e) = self.accounts().record(record) {
            tracing::error!(key_id = record.key_id, model = record.model, "usage not recorded: {e}");
        }
    }

    /// Seconds until the key's tokens in the window are under its daily quota again, if they are not.
    fn over_token_quota(&self, key: &ApiKey) -> Result<Option<u64>, ApiError> {
        let Some(limit) = key.tokens_per_day else { return Ok(None) };
        let wait = self
            .accounts()
            .token_quota_wait(&key.id, limit, self.token_window)
            .map_err(|e| ApiError::internal(format!("cannot check the key's quota: {e}")))?;
        Ok(wait.map(|w| w.as_secs_f64().ceil().max(1.0) as u64))
    }

    /// Seconds until the key may send again, if its quota is used up; else counts this request.
    fn over_quota(&self, key: &ApiKey) -> Option<u64> {
        let limit = key.requests_per_minute? as usize;
        let now = Instant::now();
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let times = recent.entry(key.id.clone()).or_default();
        while times.front().is_some_and(|&t| now.duration_since(t) >= Duration::from_secs(60)) {
            times.pop_front();
        }
        if times.len() >= limit {
            let oldest = times.front().copied().unwrap_or(now);
            let wait = Duration::from_secs(60).saturating_sub(now.duration_since(oldest));
            // Rounded up: a client that waits exactly this long is served.
            return Some((wait.as_secs_f64().ceil() as u64).max(1));
        }
        times.push_back(now);
        None
    }
}

/// The scope an endpoint needs.
fn scope_for(path: &str) -> Scope {
    match path {
        "/metrics" => Scope::Metrics,
        "/api/pull" | "/api/delete" | "/api/push" | "/api/copy" | "/api/create" => Scope::Admin,
        _ => Scope::Inference,
    }
}

pub async fn authorize(State(auth): State<Arc<Auth>>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if matches!(path, "/health" | "/ready" | "/") || !auth.any_active() {
        let caller = Caller { key: None, auth: auth.clone() };
        return CALLER.scope(Some(caller), next.run(request)).await;
    }
    let secret = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    let Some(secret) = secret else {
        return ApiError::unauthorized(
            "this server needs an API key: send `Authorization: Bearer <key>` (`berth keys create` makes one)",
        )
        .into_response();
    };
    let key = match auth.accounts().authenticate(secret) {
        Ok(Some(key)) => key,
        Ok(None) => return ApiError::unauthorized("the API key is not valid (unknown or revoked)").into_response(),
        Err(e) => return ApiError::internal(format!("cannot check the API key: {e}")).into_response(),
    };
    let needed = scope_for(path);
    if !key.allows(needed) {
        return ApiError::forbidden_scope(format!(
            "the key `{}` lacks the `{}` scope that {path} needs",
            key.name,
            needed.name()
        ))
        .into_response();
    }
    match auth.over_token_quota(&key) {
        Ok(None) => {}
        Ok(Some(seconds)) => {
            auth.record(&Record::rejected(&key.id, "-"));
            return ApiError::overloaded(
                format!(
                    "the key `{}` has used its {} tokens for the day; retry in {seconds} s",
                    key.name,
                    key.tokens_per_day.unwrap_or(0)
                ),
                seconds,
            )
            .with_code("insufficient_quota")
            .into_response();
        }
        Err(e) => return e.into_response(),
    }
    if let Some(seconds) = auth.over_quota(&key) {
        auth.record(&Record::rejected(&key.id, "-"));
        return ApiError::overloaded(
            format!(
                "the key `{}` has used its {} requests per minute; retry in {seconds} s",
                key.name,
                key.requests_per_minute.unwrap_or(0)
            ),
            seconds,
        )
        .with_code("rate_limit_exceeded")
        .into_response();
    }
    let caller = Caller { key: Some(key), auth: auth.clone() };
    CALLER.scope(Some(caller), next.run(request)).await
}
