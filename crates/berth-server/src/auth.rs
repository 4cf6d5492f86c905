//! API keys on every request once any key exists: `Authorization: Bearer <secret>`, the scope the
//! endpoint needs, and the key's requests-per-minute and tokens-per-day quotas. Health and readiness
//! stay open (probes carry no keys). The caller rides along in a task-local, so that a model can be
//! refused to a key that may not use it, and a request can charge its usage when it ends (to no key
//! on a server without keys). With the accounts in SQLite, the quotas are counted in this process's
//! memory (it is the only server on them); with shared accounts (PostgreSQL), in the database, so
//! that every server and gateway on it counts the same requests and tokens.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::accounts::{Accounts, ActiveKeys, ApiKey, NO_KEY, Outcome, PostgresStore, Record, Scope};
use crate::error::ApiError;
use crate::quota::{TokenLedger, millis, retry_after_seconds};

pub struct Auth {
    accounts: Mutex<Accounts>,
    /// Each key's request times within the last minute, for its quota.
    recent: Mutex<HashMap<String, VecDeque<Instant>>>,
    /// The window of `tokens_per_day` quotas: a day, shorter only in tests.
    token_window: Duration,
    /// What each key with a tokens-per-day quota used within the window. Lock order: this, then
    /// `accounts`.
    ledgers: Mutex<HashMap<String, TokenLedger>>,
    /// The active keys, read again only when another process changed the database (`berth keys`
    /// takes effect on the next request), so a request costs one `PRAGMA data_version`, no table
    /// read. Lock order: this, then `accounts`.
    keys: Mutex<(Option<i64>, Arc<ActiveKeys>)>,
    /// Whether requests need a key: decided by the keys at start, and turned on (never off) when
    /// the first key is made while the server runs.
    keys_required: AtomicBool,
    /// Refused requests not yet written, by key and model ([`Auth::flush_rejections`]).
    rejections: Mutex<HashMap<(String, String), u64>>,
    /// Whether the accounts are shared with other servers (PostgreSQL): then the quotas are
    /// counted in the database, and `recent` and `ledgers` stay empty.
    shared: bool,
    /// When this process last told the shared database that its token holds are still live.
    holds_refreshed: Mutex<Instant>,
}

/// How often a process with shared accounts refreshes its token holds (they count for a minute).
const REFRESH_HOLDS: Duration = Duration::from_secs(10);

/// A request refused because the accounts database failed: the details go to the log, the
/// client hears that the service is unavailable for now.
fn accounts_unavailable(what: &str, e: impl std::fmt::Display) -> ApiError {
    tracing::error!("cannot {what}: {e}");
    ApiError::unavailable(format!("cannot {what} now: the accounts database is unavailable; retry shortly"))
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

    /// Record an ended request (logged, not fatal, if the database refuses), releasing the
    /// tokens it had reserved.
    pub fn record(&self, record: &Record<'_>, reserved: u64) {
        self.auth.settle(record, reserved)
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

/// The caller of the request being handled (none outside a request, as when preloading).
pub fn caller() -> Option<Caller> {
    CALLER.try_with(|c| c.clone()).ok().flatten()
}

impl Auth {
    /// `token_window` is the span of `tokens_per_day` quotas (a day, but for tests).
    pub fn new(accounts: Accounts, token_window: Duration, keys_required: bool) -> Self {
        Self {
            shared: accounts.shared().is_some(),
            holds_refreshed: Mutex::new(Instant::now()),
            keys_required: AtomicBool::new(keys_required),
            rejections: Mutex::new(HashMap::new()),
            accounts: Mutex::new(accounts),
            recent: Mutex::new(HashMap::new()),
            token_window,
            ledgers: Mutex::new(HashMap::new()),
            keys: Mutex::new((None, Arc::new(ActiveKeys::default()))),
        }
    }

    fn accounts(&self) -> std::sync::MutexGuard<'_, Accounts> {
        self.accounts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What was used from `since` (Unix seconds) on, grouped by key or model.
    pub fn usage(
        &self,
        since: i64,
        by: crate::accounts::GroupBy,
    ) -> Result<Vec<crate::accounts::UsageRow>, crate::accounts::AccountsError> {
        self.accounts().usage(since, by)
    }

    /// Run `f` on the shared database, if the accounts are shared.
    fn with_shared<T>(&self, f: impl FnOnce(&PostgresStore) -> T) -> Option<T> {
        if !self.shared {
            return None;
        }
        self.accounts().shared().map(f)
    }

    /// The active keys as the database has them now.
    fn active_keys(&self) -> Result<Arc<ActiveKeys>, ApiError> {
        let mut cache = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let accounts = self.accounts();
        let failed = |e| accounts_unavailable("check the API key", e);
        let version = accounts.changes_elsewhere().map_err(failed)?;
        if cache.0 != Some(version) {
            *cache = (Some(version), Arc::new(accounts.active_keys().map_err(failed)?));
        }
        Ok(cache.1.clone())
    }

    fn ledgers(&self) -> std::sync::MutexGuard<'_, HashMap<String, TokenLedger>> {
        self.ledgers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Charge an ended request to its key (logged, not fatal, if the database refuses).
    pub fn record(&self, record: &Record<'_>) {
        self.settle(record, 0)
    }

    /// Charge an ended request to its key and let go of the tokens it had reserved, in one step
    /// (so no other request sees the quota without both).
    pub fn settle(&self, record: &Record<'_>, reserved: u64) {
        if record.outcome == Outcome::Rejected && record.prompt_tokens + record.completion_tokens == 0 {
            // Counted in memory and written in batches: a flood of 429s must not become a flood
            // of commits. (Nothing was reserved for a request refused before it ran.)
            if reserved > 0 {
                self.release_tokens(record.key_id, reserved);
            }
            let mut pending = self.rejections.lock().unwrap_or_else(|e| e.into_inner());
            *pending.entry((record.key_id.to_string(), record.model.to_string())).or_default() += 1;
            return;
        }
        // Shared accounts: the row, the key's token use and the release of its hold in one
        // transaction there.
        if let Some(settled) = self.with_shared(|db| db.settle(record, reserved, self.token_window)) {
            if let Err(e) = settled {
                tracing::error!(key_id = record.key_id, model = record.model, "usage not recorded: {e}");
            }
            return;
        }
        // The ledger is held across the write, so a ledger being loaded sees the row either in
        // the database or as added here, never both.
        let mut ledgers = self.ledgers();
        if reserved > 0
            && let Some(ledger) = ledgers.get_mut(record.key_id)
        {
            ledger.release(reserved);
        }
        match self.accounts().record(record) {
            Ok(at_ms) => {
                if let Some(ledger) = ledgers.get_mut(record.key_id) {
                    ledger.add(at_ms, record.prompt_tokens.saturating_add(record.completion_tokens));
                }
            }
            Err(e) => tracing::error!(key_id = record.key_id, model = record.model, "usage not recorded: {e}"),
        }
    }

    /// Write the refusals counted since the last flush (the server calls this a few times a
    /// second, and at shutdown).
    pub fn flush_rejections(&self) {
        self.refresh_holds();
        let pending: Vec<_> = {
            let mut pending = self.rejections.lock().unwrap_or_else(|e| e.into_inner());
            if pending.is_empty() {
                return;
            }
            pending.drain().collect()
        };
        if let Err(e) = self.accounts().record_rejections(&pending) {
            let lost: u64 = pending.iter().map(|p| p.1).sum();
            tracing::error!("{lost} refused requests not recorded in usage: {e}");
        }
    }

    /// With shared accounts, every [`REFRESH_HOLDS`]: tell the database this process's token holds
    /// are still live.
    fn refresh_holds(&self) {
        {
            let mut last = self.holds_refreshed.lock().unwrap_or_else(|e| e.into_inner());
            if !self.shared || last.elapsed() < REFRESH_HOLDS {
                return;
            }
            *last = Instant::now();
        }
        if let Some(Err(e)) = self.with_shared(|db| db.refresh_holds()) {
            tracing::warn!("cannot refresh this process's token holds: {e}");
        }
    }

    /// Seconds until the key's tokens in the window are under its daily quota again, if they are not.
    fn over_token_quota(&self, key: &ApiKey) -> Result<Option<u64>, ApiError> {
        let Some(limit) = key.tokens_per_day else { return Ok(None) };
        if let Some(check) = self.with_shared(|db| db.reserve_tokens(&key.id, limit, self.token_window, 0)) {
            let check = check.map_err(|e| accounts_unavailable("check the key's quota", e))?;
            return Ok(check.wait.map(retry_after_seconds));
        }
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut ledgers = self.ledgers();
        let ledger = self.ledger_of(&mut ledgers, key, now_ms)?;
        let wait = ledger.wait(limit, self.token_window, now_ms);
        Ok(wait.map(retry_after_seconds))
    }

    /// Reserve up to `wanted` tokens of the key's daily quota for a request that starts: how many
    /// were granted (all of them for a key without a quota), or the seconds to wait when none are left.
    pub fn reserve_tokens(&self, key: &ApiKey, wanted: u64) -> Result<u64, ApiError> {
        let Some(limit) = key.tokens_per_day else { return Ok(wanted) };
        if let Some(check) = self.with_shared(|db| db.reserve_tokens(&key.id, limit, self.token_window, wanted)) {
            return Ok(check.map_err(|e| accounts_unavailable("check the key's quota", e))?.granted);
        }
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut ledgers = self.ledgers();
        let ledger = self.ledger_of(&mut ledgers, key, now_ms)?;
        let granted = wanted.min(ledger.left(limit, self.token_window, now_ms));
        ledger.reserve(granted);
        Ok(granted)
    }

    /// Give back a reservation that was not used (the request was refused before it ran).
    pub fn release_tokens(&self, key_id: &str, tokens: u64) {
        if let Some(released) = self.with_shared(|db| db.release_tokens(key_id, tokens)) {
            if let Err(e) = released {
                tracing::error!(
                    key_id,
                    "{tokens} held tokens not released (they are let go a minute after this process stops): {e}"
                );
            }
            return;
        }
        if let Some(ledger) = self.ledgers().get_mut(key_id) {
            ledger.release(tokens);
        }
    }

    /// The key's ledger, loaded from its usage rows on first use.
    fn ledger_of<'l>(
        &self,
        ledgers: &'l mut HashMap<String, TokenLedger>,
        key: &ApiKey,
        now_ms: i64,
    ) -> Result<&'l mut TokenLedger, ApiError> {
        Ok(match ledgers.entry(key.id.clone()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let used = self
                    .accounts()
                    .tokens_since(&key.id, now_ms.saturating_sub(millis(self.token_window)))
                    .map_err(|e| accounts_unavailable("check the key's quota", e))?;
                e.insert(TokenLedger::new(used))
            }
        })
    }

    /// 429 for a key past a quota (`used` says which), recorded as a rejected request.
    fn refuse_over_quota(&self, key: &ApiKey, used: &str, seconds: u64, code: &'static str) -> Response {
        self.record(&Record::rejected(&key.id, "-"));
        let message = format!("the key `{}` has used its {used}; retry in {seconds} s", key.name);
        ApiError::overloaded(message, seconds).with_code(code).into_response()
    }

    /// Seconds until the key may send again, if its quota is used up; else counts this request.
    fn over_quota(&self, key: &ApiKey) -> Result<Option<u64>, ApiError> {
        let Some(limit) = key.requests_per_minute else { return Ok(None) };
        if let Some(admitted) = self.with_shared(|db| db.admit(&key.id, limit, Duration::from_secs(60))) {
            let wait = admitted.map_err(|e| accounts_unavailable("check the key's request rate", e))?;
            return Ok(wait.map(retry_after_seconds));
        }
        Ok(self.over_local_quota(&key.id, limit as usize))
    }

    /// [`Self::over_quota`] counted in this process's memory.
    fn over_local_quota(&self, key_id: &str, limit: usize) -> Option<u64> {
        let now = Instant::now();
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let times = recent.entry(key_id.to_string()).or_default();
        while times.front().is_some_and(|&t| now.duration_since(t) >= Duration::from_secs(60)) {
            times.pop_front();
        }
        if times.len() >= limit {
            let oldest = times.front().copied().unwrap_or(now);
            let wait = Duration::from_secs(60).saturating_sub(now.duration_since(oldest));
            return Some(retry_after_seconds(wait));
        }
        times.push_back(now);
        None
    }
}

/// Check the caller of a route that needs `scope`: once the server has keys, a valid key with
/// that scope and within its quotas.
pub async fn authorize(State((auth, needed)): State<(Arc<Auth>, Scope)>, request: Request, next: Next) -> Response {
    let keys = match auth.active_keys() {
        Ok(keys) => keys,
        Err(e) => return e.into_response(),
    };
    // Keys on, keys kept on: a server that had keys never opens up because the last was revoked.
    if !keys.is_empty() {
        auth.keys_required.store(true, Ordering::SeqCst);
    }
    if !auth.keys_required.load(Ordering::SeqCst) {
        let caller = Caller { key: None, auth: auth.clone() };
        return CALLER.scope(Some(caller), next.run(request)).await;
    }
    let secret = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        // Anthropic's clients send the key as `x-api-key`.
        .or_else(|| request.headers().get("x-api-key").and_then(|v| v.to_str().ok()))
        .map(str::trim);
    let Some(secret) = secret else {
        return ApiError::unauthorized(
            "this server needs an API key: send `Authorization: Bearer <key>` or `x-api-key: <key>` (`berth keys create` makes one)",
        )
        .into_response();
    };
    let Some(key) = keys.find(secret) else {
        if keys.is_empty() {
            return ApiError::unauthorized(
                "every API key of this server was revoked; it still requires one: `berth keys create` makes one",
            )
            .into_response();
        }
        return ApiError::unauthorized("the API key is not valid (unknown or revoked)").into_response();
    };
    if !key.allows(needed) {
        return ApiError::forbidden_scope(format!(
            "the key `{}` lacks the `{}` scope that {} needs",
            key.name,
            needed.name(),
            request.uri().path()
        ))
        .into_response();
    }
    match auth.over_token_quota(&key) {
        Ok(None) => {}
        Ok(Some(seconds)) => {
            let used = format!("{} tokens for the day", key.tokens_per_day.unwrap_or(0));
            return auth.refuse_over_quota(&key, &used, seconds, "insufficient_quota");
        }
        Err(e) => return e.into_response(),
    }
    let over_quota = match auth.over_quota(&key) {
        Ok(over) => over,
        Err(e) => return e.into_response(),
    };
    if let Some(seconds) = over_quota {
        let used = format!("{} requests per minute", key.requests_per_minute.unwrap_or(0));
        return auth.refuse_over_quota(&key, &used, seconds, "rate_limit_exceeded");
    }
    let caller = Caller { key: Some(key), auth: auth.clone() };
    CALLER.scope(Some(caller), next.run(request)).await
}
