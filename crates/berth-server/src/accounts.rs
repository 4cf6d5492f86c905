//! API keys and usage, kept in SQLite at `$BERTH_HOME/berth.db` so they outlive the server.
//!
//! A key's secret is shown once, when it is made; the database keeps only its SHA-256. A key has
//! scopes (`inference`: generate and embed; `admin`: pull, delete, unload and everything else;
//! `metrics`: scrape `/metrics`), may be kept to some models, and may have a requests-per-minute and a
//! tokens-per-day quota. Every request is recorded as it ends — finished, aborted by its client,
//! rejected or failed — with its key (or none), model, tokens, timings and outcome. The database runs in WAL mode with `synchronous = NORMAL`: a committed record
//! survives the process being killed (only a power loss may take the last ones).

use std::path::{Path, PathBuf};

use rusqlite::{Connection, params};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum AccountsError {
    #[error("cannot use the accounts database {path}: {source}")]
    Database { path: PathBuf, source: rusqlite::Error },
    #[error("cannot draw a random secret: {0}")]
    Random(String),
    #[error("unknown scope {0:?}; scopes are inference, admin and metrics")]
    Scope(String),
    #[error("no key with id {0:?}; `berth keys list` shows them")]
    NoSuchKey(String),
    #[error("{0:?} is not a model name or pattern; write e.g. ai/smollm2, ai/smollm2:latest or ai/*")]
    ModelPattern(String),
}

/// The key id usage records carry for requests made without a key (a server without keys).
pub const NO_KEY: &str = "-";

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Inference,
    Admin,
    Metrics,
}

impl Scope {
    pub fn parse(s: &str) -> Result<Scope, AccountsError> {
        match s {
            "inference" => Ok(Scope::Inference),
            "admin" => Ok(Scope::Admin),
            "metrics" => Ok(Scope::Metrics),
            other => Err(AccountsError::Scope(other.to_string())),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Scope::Inference => "inference",
            Scope::Admin => "admin",
            Scope::Metrics => "metrics",
        }
    }
}

/// A key as stored (never its secret).
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    pub scopes: Vec<Scope>,
    pub requests_per_minute: Option<u32>,
    /// Prompt and completion tokens the key may use in a day (a rolling 24 hours).
    pub tokens_per_day: Option<u64>,
    /// The models the key may use, as names (`ai/smollm2:latest`) or patterns ending in `*`
    /// (`ai/*`); empty: every model.
    pub models: Vec<String>,
    pub created: i64,
    pub revoked: Option<i64>,
}

impl ApiKey {
    /// Admin keys may do everything.
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope) || self.scopes.contains(&Scope::Admin)
    }

    /// Whether the key may use the model named `familiar` (`ai/smollm2:latest`).
    pub fn may_use(&self, familiar: &str) -> bool {
        self.models.is_empty()
            || self.models.iter().any(|m| match m.strip_suffix('*') {
                Some(prefix) => familiar.starts_with(prefix),
                None => m == familiar,
            })
    }
}

/// A model name as a key's `--models` gives it, in the form the server names models by: a
/// reference (`smollm2` becomes `ai/smollm2:latest`), or a prefix pattern ending in `*` kept as
/// written.
pub fn model_pattern(text: &str) -> Result<String, AccountsError> {
    let t = text.trim();
    let bad = || AccountsError::ModelPattern(text.to_string());
    if let Some(prefix) = t.strip_suffix('*') {
        let plain = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/:".contains(c);
        return if prefix.chars().all(plain) && t.len() <= 256 { Ok(t.to_string()) } else { Err(bad()) };
    }
    berth_store::Reference::parse(t).map(|r| r.familiar()).map_err(|_| bad())
}

/// What a new key may do.
#[derive(Debug, Clone, Default)]
pub struct KeySpec {
    pub scopes: Vec<Scope>,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_day: Option<u64>,
    /// Model names or patterns, from [`model_pattern`].
    pub models: Vec<String>,
}

/// How a request ended, as usage records it. Ordered from best to worst: a request whose parts
/// ended differently is recorded with the worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Answered to the end (a stop or the length limit).
    Completed,
    /// The client went away first.
    Aborted,
    /// Refused before it ran (queue full, quota).
    Rejected,
    /// Ended by an error (time limit, engine).
    Failed,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Aborted => "aborted",
            Outcome::Rejected => "rejected",
            Outcome::Failed => "failed",
        }
    }
}

/// One request as usage records it.
#[derive(Debug, Clone)]
pub struct Record<'a> {
    pub key_id: &'a str,
    pub model: &'a str,
    /// The version that answered (a manifest digest's first 12 hex digits; empty when none did).
    pub model_version: &'a str,
    pub outcome: Outcome,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub duration: std::time::Duration,
    pub time_to_first_token: Option<std::time::Duration>,
    /// Completed at the token limit (`finish_reason: length`) rather than by a stop.
    pub hit_length: bool,
}

impl<'a> Record<'a> {
    /// A request refused before it ran: no tokens, no time.
    pub fn rejected(key_id: &'a str, model: &'a str) -> Self {
        Record {
            key_id,
            model,
            model_version: "",
            outcome: Outcome::Rejected,
            prompt_tokens: 0,
            completion_tokens: 0,
            duration: std::time::Duration::ZERO,
            time_to_first_token: None,
            hit_length: false,
        }
    }
}

impl UsageRow {
    /// The counts in the report's column order: requests, completed, length, aborted, rejected,
    /// failed, prompt tokens, completion tokens.
    pub fn counts(&self) -> [u64; 8] {
        [
            self.requests,
            self.completed,
            self.length,
            self.aborted,
            self.rejected,
            self.failed,
            self.prompt_tokens,
            self.completion_tokens,
        ]
    }
}

/// What `berth usage` groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Key,
    Model,
}

/// One row of the usage report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UsageRow {
    /// The key's id and name, or the model.
    pub group: String,
    pub name: String,
    pub requests: u64,
    pub completed: u64,
    /// Of the completed, those that ended at the token limit.
    pub length: u64,
    pub aborted: u64,
    pub rejected: u64,
    pub failed: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

pub struct Accounts {
    path: PathBuf,
    db: Connection,
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn digest(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// A connection to berth's database shared by the server and the CLI: WAL, so that the server
/// writes while `berth usage` and `berth keys` read and write, and a wait of up to 5 s for a lock.
pub(crate) fn open_shared(path: &Path) -> rusqlite::Result<Connection> {
    let db = Connection::open(path)?;
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(db)
}

impl Accounts {
    /// Open (and create if needed) the database in berth's home.
    pub fn open(home: &Path) -> Result<Accounts, AccountsError> {
        let path = home.join("berth.db");
        let err = |source| AccountsError::Database { path: path.clone(), source };
        std::fs::create_dir_all(home).map_err(|e| err(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
        let db = open_shared(&path).map_err(err)?;
        db.pragma_update(None, "synchronous", "NORMAL").map_err(err)?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS api_keys (
                id TEXT PRIMARY KEY,
                name TEXT NOT NULL,
                secret_sha256 BLOB NOT NULL UNIQUE,
                scopes TEXT NOT NULL,
                requests_per_minute INTEGER,
                created INTEGER NOT NULL,
                revoked INTEGER,
                tokens_per_day INTEGER,
                models TEXT NOT NULL DEFAULT ''
            );
            CREATE TABLE IF NOT EXISTS requests (
                id INTEGER PRIMARY KEY,
                at_ms INTEGER NOT NULL,
                key_id TEXT NOT NULL,
                model TEXT NOT NULL,
                outcome TEXT NOT NULL,
                prompt_tokens INTEGER NOT NULL,
                completion_tokens INTEGER NOT NULL,
                duration_ms REAL NOT NULL,
                ttft_ms REAL,
                hit_length INTEGER NOT NULL DEFAULT 0,
                model_version TEXT NOT NULL DEFAULT ''
            );
            CREATE TABLE IF NOT EXISTS rejections (
                minute_ms INTEGER NOT NULL,
                key_id TEXT NOT NULL,
                model TEXT NOT NULL,
                count INTEGER NOT NULL,
                PRIMARY KEY (minute_ms, key_id, model)
            );
            CREATE INDEX IF NOT EXISTS requests_at ON requests (at_ms);
            CREATE INDEX IF NOT EXISTS requests_key_at ON requests (key_id, at_ms);",
        )
        .map_err(err)?;
        // Databases made by earlier versions gain the columns added since.
        for (table, column, definition) in [
            ("api_keys", "tokens_per_day", "INTEGER"),
            ("api_keys", "models", "TEXT NOT NULL DEFAULT ''"),
            ("requests", "hit_length", "INTEGER NOT NULL DEFAULT 0"),
            ("requests", "model_version", "TEXT NOT NULL DEFAULT ''"),
        ] {
            let columns: Vec<String> = db
                .prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))
                .and_then(|mut q| q.query_map([], |r| r.get(0))?.collect())
                .map_err(err)?;
            if !columns.iter().any(|c| c == column) {
                db.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {definition}")).map_err(err)?;
            }
        }
        Ok(Accounts { path, db })
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> AccountsError + '_ {
        |source| AccountsError::Database { path: self.path.clone(), source }
    }

    /// Make a key; returns it and its secret (shown once).
    pub fn create_key(&self, name: &str, spec: &KeySpec) -> Result<(ApiKey, String), AccountsError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| AccountsError::Random(e.to_string()))?;
        let secret = format!("berth-{}", hex::encode(bytes));
        let id = format!("key-{}", &hex::encode(digest(&secret))[..12]);
        let scope_text: Vec<&str> = spec.scopes.iter().map(|s| s.name()).collect();
        let created = now();
        self.db
            .execute(
                "INSERT INTO api_keys (id, name, secret_sha256, scopes, requests_per_minute, created, tokens_per_day, models)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    id,
                    name,
                    digest(&secret),
                    scope_text.join(","),
                    spec.requests_per_minute,
                    created,
                    spec.tokens_per_day.map(|t| t.min(i64::MAX as u64) as i64),
                    spec.models.join(","),
                ],
            )
            .map_err(self.err())?;
        let key = ApiKey {
            id,
            name: name.to_string(),
            scopes: spec.scopes.clone(),
            requests_per_minute: spec.requests_per_minute,
            tokens_per_day: spec.tokens_per_day,
            models: spec.models.clone(),
            created,
            revoked: None,
        };
        Ok((key, secret))
    }

    const KEY_COLUMNS: &str = "id, name, scopes, requests_per_minute, created, revoked, tokens_per_day, models";

    fn row(row: &rusqlite::Row<'_>) -> rusqlite::Result<ApiKey> {
        let scopes: String = row.get(2)?;
        let models: String = row.get(7)?;
        Ok(ApiKey {
            id: row.get(0)?,
            name: row.get(1)?,
            scopes: scopes.split(',').filter_map(|s| Scope::parse(s).ok()).collect(),
            requests_per_minute: row.get(3)?,
            created: row.get(4)?,
            revoked: row.get(5)?,
            tokens_per_day: row.get::<_, Option<i64>>(6)?.map(|t| t.max(0) as u64),
            models: models.split(',').filter(|m| !m.is_empty()).map(str::to_string).collect(),
        })
    }

    pub fn list_keys(&self) -> Result<Vec<ApiKey>, AccountsError> {
        let mut q = self
            .db
            .prepare(&format!("SELECT {} FROM api_keys ORDER BY created, id", Self::KEY_COLUMNS))
            .map_err(self.err())?;
        let rows = q.query_map([], Self::row).map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    pub fn revoke(&self, id: &str) -> Result<(), AccountsError> {
        let n = self
            .db
            .execute("UPDATE api_keys SET revoked = ?1 WHERE id = ?2 AND revoked IS NULL", params![now(), id])
            .map_err(self.err())?;
        if n == 0 && !self.list_keys()?.iter().any(|k| k.id == id) {
            return Err(AccountsError::NoSuchKey(id.to_string()));
        }
        Ok(())
    }

    /// Whether any key is active (then every request needs one).
    pub fn any_active(&self) -> Result<bool, AccountsError> {
        self.db
            .query_row("SELECT EXISTS (SELECT 1 FROM api_keys WHERE revoked IS NULL)", [], |r| r.get(0))
            .map_err(self.err())
    }

    /// The active key with this secret (see [`ActiveKeys::find`]).
    pub fn authenticate(&self, secret: &str) -> Result<Option<ApiKey>, AccountsError> {
        Ok(self.active_keys()?.find(secret))
    }

    /// Every active key, with the hash of its secret.
    pub fn active_keys(&self) -> Result<ActiveKeys, AccountsError> {
        let mut q = self
            .db
            .prepare(&format!("SELECT {}, secret_sha256 FROM api_keys WHERE revoked IS NULL", Self::KEY_COLUMNS))
            .map_err(self.err())?;
        let rows = q
            .query_map([], |r| Ok((Self::row(r)?, r.get::<_, Vec<u8>>(8)?)))
            .map_err(self.err())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.err())?;
        Ok(ActiveKeys(rows))
    }

    /// A number that changes whenever another connection (`berth keys` in another process) commits
    /// to the database: what was read from it before may be stale.
    pub fn changes_elsewhere(&self) -> Result<i64, AccountsError> {
        self.db.query_row("PRAGMA data_version", [], |r| r.get(0)).map_err(self.err())
    }

    /// Record one request as it ended; returns the time it is recorded at (Unix milliseconds).
    pub fn record(&self, r: &Record<'_>) -> Result<i64, AccountsError> {
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        let at_ms = chrono::Utc::now().timestamp_millis();
        self.db
            .execute(
                "INSERT INTO requests (at_ms, key_id, model, outcome, prompt_tokens, completion_tokens, duration_ms, ttft_ms, hit_length, model_version)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    at_ms,
                    r.key_id,
                    r.model,
                    r.outcome.name(),
                    r.prompt_tokens as i64,
                    r.completion_tokens as i64,
                    ms(r.duration),
                    r.time_to_first_token.map(ms),
                    r.hit_length,
                    r.model_version,
                ],
            )
            .map_err(self.err())?;
        Ok(at_ms)
    }

    /// Add refused requests (429s: no tokens, no time) to their minute's count, in one
    /// transaction for all of them: a flood of refusals costs a row per key, model and minute, not
    /// a row and a commit each.
    pub fn record_rejections(&self, counts: &[((String, String), u64)]) -> Result<(), AccountsError> {
        if counts.is_empty() {
            return Ok(());
        }
        let minute_ms = chrono::Utc::now().timestamp_millis() / 60_000 * 60_000;
        let tx = self.db.unchecked_transaction().map_err(self.err())?;
        {
            let mut q = tx
                .prepare_cached(
                    "INSERT INTO rejections (minute_ms, key_id, model, count) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (minute_ms, key_id, model) DO UPDATE SET count = count + excluded.count",
                )
                .map_err(self.err())?;
            for ((key_id, model), n) in counts {
                q.execute(params![minute_ms, key_id, model, *n as i64]).map_err(self.err())?;
            }
        }
        tx.commit().map_err(self.err())
    }

    /// The key's requests from `since_ms` (Unix milliseconds) on, oldest first: when each ended and
    /// the tokens it used (prompt and completion).
    pub fn tokens_since(&self, key_id: &str, since_ms: i64) -> Result<Vec<(i64, u64)>, AccountsError> {
        let mut q = self
            .db
            .prepare_cached(
                "SELECT at_ms, prompt_tokens + completion_tokens FROM requests
                 WHERE key_id = ?1 AND at_ms > ?2 ORDER BY at_ms",
            )
            .map_err(self.err())?;
        let rows = q
            .query_map(params![key_id, since_ms], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?.max(0) as u64)))
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// Requests from `since` (Unix seconds) on, grouped by key or by model.
    pub fn usage(&self, since: i64, by: GroupBy) -> Result<Vec<UsageRow>, AccountsError> {
        let (group, name) = match by {
            GroupBy::Key => ("r.key_id", "COALESCE(k.name, CASE WHEN r.key_id = '-' THEN '(no key)' ELSE '' END)"),
            GroupBy::Model => ("r.model", "''"),
        };
        // Refusals are counted per minute (see record_rejections); a minute that overlaps
        // `since` counts whole.
        let sql = format!(
            "WITH r AS (
                SELECT key_id, model, outcome, prompt_tokens, completion_tokens, hit_length, 1 AS n
                FROM requests WHERE at_ms >= ?1
                UNION ALL
                SELECT key_id, model, 'rejected', 0, 0, 0, count FROM rejections WHERE minute_ms + 60000 > ?1
             )
             SELECT {group}, {name}, SUM(r.n),
                SUM(r.outcome = 'completed'), SUM(r.outcome = 'completed' AND r.hit_length), SUM(r.outcome = 'aborted'), SUM((r.outcome = 'rejected') * r.n), SUM(r.outcome = 'failed'),
                SUM(r.prompt_tokens), SUM(r.completion_tokens)
             FROM r LEFT JOIN api_keys k ON k.id = r.key_id
             GROUP BY {group} ORDER BY {group}"
        );
        let mut q = self.db.prepare(&sql).map_err(self.err())?;
        let n = |r: &rusqlite::Row<'_>, i| r.get::<_, i64>(i).map(|v| v as u64);
        let rows = q
            .query_map(params![since * 1000], |r| {
                Ok(UsageRow {
                    group: r.get(0)?,
                    name: r.get(1)?,
                    requests: n(r, 2)?,
                    completed: n(r, 3)?,
                    length: n(r, 4)?,
                    aborted: n(r, 5)?,
                    rejected: n(r, 6)?,
                    failed: n(r, 7)?,
                    prompt_tokens: n(r, 8)?,
                    completion_tokens: n(r, 9)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }
}

/// The active keys as read at one moment, with their secrets' hashes.
#[derive(Debug, Clone, Default)]
pub struct ActiveKeys(Vec<(ApiKey, Vec<u8>)>);

impl ActiveKeys {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The key with this secret. Every key's hash is compared, in constant time, so the answer's
    /// timing says nothing about how close a guess came.
    pub fn find(&self, secret: &str) -> Option<ApiKey> {
        let wanted = digest(secret);
        let mut found = None;
        for (key, hash) in &self.0 {
            if constant_time_eq(hash, &wanted) {
                found = Some(key);
            }
        }
        found.cloned()
    }
}

/// Equal bytes, compared without stopping at the first difference.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_authenticate_until_revoked_and_usage_adds_up() {
        let home = tempfile::tempdir().unwrap();
        let accounts = Accounts::open(home.path()).unwrap();
        assert!(!accounts.any_active().unwrap());
        let spec = KeySpec { scopes: vec![Scope::Inference], requests_per_minute: Some(10), ..KeySpec::default() };
        let (key, secret) = accounts.create_key("ci", &spec).unwrap();
        assert!(secret.starts_with("berth-") && secret.len() == 70);
        assert!(accounts.any_active().unwrap());
        let found = accounts.authenticate(&secret).unwrap().expect("the key");
        assert_eq!(found.id, key.id);
        assert!(found.allows(Scope::Inference) && !found.allows(Scope::Admin));
        assert_eq!(found.requests_per_minute, Some(10));
        assert!(accounts.authenticate("berth-wrong").unwrap().is_none());
        let record = |outcome, prompt, completion| Record {
            key_id: &key.id,
            model: "ai/smollm2:latest",
            model_version: "0123456789ab",
            outcome,
            prompt_tokens: prompt,
            completion_tokens: completion,
            duration: std::time::Duration::from_millis(20),
            time_to_first_token: Some(std::time::Duration::from_millis(5)),
            hit_length: outcome == Outcome::Completed,
        };
        accounts.record(&record(Outcome::Completed, 10, 5)).unwrap();
        accounts.record(&record(Outcome::Aborted, 3, 2)).unwrap();
        accounts.record(&record(Outcome::Rejected, 0, 0)).unwrap();
        let usage = accounts.usage(0, GroupBy::Key).unwrap();
        assert_eq!(usage.len(), 1);
        let u = &usage[0];
        assert_eq!((u.requests, u.completed, u.aborted, u.rejected, u.failed), (3, 1, 1, 1, 0));
        assert_eq!(u.length, 1);
        assert_eq!((u.prompt_tokens, u.completion_tokens), (13, 7));
        assert_eq!(u.name, "ci");
        assert_eq!(accounts.usage(0, GroupBy::Model).unwrap()[0].group, "ai/smollm2:latest");
        accounts.revoke(&key.id).unwrap();
        assert!(accounts.authenticate(&secret).unwrap().is_none());
        assert!(!accounts.any_active().unwrap());
        assert!(matches!(accounts.revoke("key-nope"), Err(AccountsError::NoSuchKey(_))));
        // The database is durable: a second handle sees the same.
        let again = Accounts::open(home.path()).unwrap();
        assert_eq!(again.usage(0, GroupBy::Key).unwrap()[0].requests, 3);
    }

    #[test]
    fn keys_keep_their_quotas_and_models_and_old_databases_gain_them() {
        let home = tempfile::tempdir().unwrap();
        let accounts = Accounts::open(home.path()).unwrap();
        let spec = KeySpec {
            scopes: vec![Scope::Inference],
            tokens_per_day: Some(100),
            models: vec![model_pattern("smollm2").unwrap(), model_pattern("team/*").unwrap()],
            ..KeySpec::default()
        };
        let (key, _) = accounts.create_key("metered", &spec).unwrap();
        let listed = &accounts.list_keys().unwrap()[0];
        assert_eq!(listed.tokens_per_day, Some(100));
        assert_eq!(listed.models, ["ai/smollm2:latest", "team/*"]);
        assert!(listed.may_use("ai/smollm2:latest") && listed.may_use("team/any:v2"));
        assert!(!listed.may_use("ai/smollm2:v2") && !listed.may_use("ai/other:latest"));
        assert!(model_pattern("Bad Name").is_err() && model_pattern("a b*").is_err());

        let spend = |prompt, completion| {
            let r = Record { prompt_tokens: prompt, completion_tokens: completion, ..Record::rejected(&key.id, "m") };
            accounts.record(&Record { outcome: Outcome::Completed, ..r }).unwrap()
        };
        let first = spend(30, 30);
        let second = spend(20, 30);
        assert_eq!(accounts.tokens_since(&key.id, 0).unwrap(), [(first, 60), (second, 50)]);
        assert_eq!(accounts.tokens_since(&key.id, second).unwrap(), []);
        assert_eq!(accounts.tokens_since("key-other", 0).unwrap(), []);

        // A database from before the quota columns and the length flag gains them, rows kept.
        let old = tempfile::tempdir().unwrap();
        let db = Connection::open(old.path().join("berth.db")).unwrap();
        db.execute_batch(
            "CREATE TABLE api_keys (id TEXT PRIMARY KEY, name TEXT NOT NULL, secret_sha256 BLOB NOT NULL UNIQUE,
             scopes TEXT NOT NULL, requests_per_minute INTEGER, created INTEGER NOT NULL, revoked INTEGER);
             INSERT INTO api_keys VALUES ('key-1', 'old', x'00', 'inference', NULL, 0, NULL);
             CREATE TABLE requests (id INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL, key_id TEXT NOT NULL,
             model TEXT NOT NULL, outcome TEXT NOT NULL, prompt_tokens INTEGER NOT NULL,
             completion_tokens INTEGER NOT NULL, duration_ms REAL NOT NULL, ttft_ms REAL);
             INSERT INTO requests VALUES (1, 1000, 'key-1', 'm', 'completed', 3, 4, 5.0, NULL);",
        )
        .unwrap();
        drop(db);
        let upgraded = Accounts::open(old.path()).unwrap();
        let keys = upgraded.list_keys().unwrap();
        assert_eq!((keys[0].name.as_str(), keys[0].tokens_per_day, keys[0].models.len()), ("old", None, 0));
        let usage = upgraded.usage(0, GroupBy::Key).unwrap();
        assert_eq!((usage[0].completed, usage[0].length, usage[0].completion_tokens), (1, 0, 4));
    }
}
