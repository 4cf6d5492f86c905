//! API keys and usage, kept in a database so they outlive the server: SQLite at
//! `$BERTH_HOME/berth.db` for one machine, or PostgreSQL shared by a fleet's servers and gateways.
//!
//! A key's secret is shown once, when it is made; the database keeps only its SHA-256. A key has
//! scopes (`inference`: generate and embed; `admin`: pull, delete, unload and everything else;
//! `metrics`: scrape `/metrics`), may be kept to some models, and may have a requests-per-minute and a
//! tokens-per-day quota. Every request is recorded as it ends — finished, aborted by its client,
//! rejected or failed — with its key (or none), model, tokens, timings and outcome, committed before
//! its answer's last byte goes out.

mod postgres;
mod sqlite;

pub(crate) use postgres::PostgresStore;
pub(crate) use sqlite::open_shared;

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum AccountsError {
    #[error("cannot use the accounts database {path}: {source}")]
    Database { path: PathBuf, source: rusqlite::Error },
    #[error("cannot use the shared accounts database {place}: {reason}")]
    Shared { place: String, reason: String },
    #[error("cannot draw a random secret: {0}")]
    Random(String),
    #[error("unknown scope {0:?}; scopes are inference, admin and metrics")]
    Scope(String),
    #[error("no key with id {0:?}; `berth keys list` shows them")]
    NoSuchKey(String),
    #[error("{0:?} is not a model name or pattern; write e.g. ai/smollm2, ai/smollm2:latest or ai/*")]
    ModelPattern(String),
    #[error("a key's secret is {MIN_SECRET} to {MAX_SECRET} visible ASCII characters (no spaces)")]
    Secret,
    #[error("a key was made with this secret before ({0}); choose another secret")]
    SecretTaken(String),
}

/// Bounds of a secret the operator brings (`berth keys create --secret-env`).
pub const MIN_SECRET: usize = 16;
pub const MAX_SECRET: usize = 256;

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

    /// Scopes as the database keeps them: comma-separated names (unknown ones skipped).
    fn parse_list(text: &str) -> Vec<Scope> {
        text.split(',').filter_map(|s| Scope::parse(s).ok()).collect()
    }

    fn join(scopes: &[Scope]) -> String {
        scopes.iter().map(|s| s.name()).collect::<Vec<_>>().join(",")
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
    /// A row from its group, name and [`Self::counts`], as the databases' reports give them.
    fn of(group: String, name: String, counts: [u64; 8]) -> UsageRow {
        let [requests, completed, length, aborted, rejected, failed, prompt_tokens, completion_tokens] = counts;
        UsageRow {
            group,
            name,
            requests,
            completed,
            length,
            aborted,
            rejected,
            failed,
            prompt_tokens,
            completion_tokens,
        }
    }

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

/// Where keys and usage live: SQLite in berth's home (one machine), or a PostgreSQL database that
/// several servers and gateways share (`BERTH_DATABASE_URL`), so that a key made once works at each
/// and its quotas count what it used at all of them.
pub struct Accounts {
    store: Store,
}

enum Store {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PostgresStore),
}

/// Run the same call on whichever store this is.
macro_rules! on_store {
    ($self:ident, $s:ident => $call:expr) => {
        match &$self.store {
            Store::Sqlite($s) => $call,
            Store::Postgres($s) => $call,
        }
    };
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn digest(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// A key's models as the database keeps them: comma-separated.
fn split_models(models: &str) -> Vec<String> {
    models.split(',').filter(|m| !m.is_empty()).map(str::to_string).collect()
}

impl Accounts {
    /// Open (and create if needed) the database in berth's home.
    pub fn open(home: &Path) -> Result<Accounts, AccountsError> {
        Ok(Accounts { store: Store::Sqlite(sqlite::SqliteStore::open(home)?) })
    }

    /// Open the shared PostgreSQL database `url` names (a `postgres://` URL or `key=value` pairs),
    /// creating berth's tables in it if needed; with `None`, the SQLite database in `home`.
    pub fn open_at(home: &Path, url: Option<&str>) -> Result<Accounts, AccountsError> {
        match url {
            Some(url) => Ok(Accounts { store: Store::Postgres(postgres::PostgresStore::open(url)?) }),
            None => Self::open(home),
        }
    }

    /// Where the accounts are, for messages: the SQLite file, or the PostgreSQL server and database
    /// (never its password).
    pub fn place(&self) -> String {
        match &self.store {
            Store::Sqlite(s) => s.place(),
            Store::Postgres(s) => s.place().to_string(),
        }
    }

    /// The shared database's quota counters, when the accounts are shared: several processes
    /// count a key's requests and tokens there rather than each in its own memory.
    pub(crate) fn shared(&self) -> Option<&postgres::PostgresStore> {
        match &self.store {
            Store::Sqlite(_) => None,
            Store::Postgres(s) => Some(s),
        }
    }

    /// Make a key; returns it and its secret (shown once).
    pub fn create_key(&self, name: &str, spec: &KeySpec) -> Result<(ApiKey, String), AccountsError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| AccountsError::Random(e.to_string()))?;
        self.create_key_with_secret(name, spec, &format!("berth-{}", hex::encode(bytes)))
    }

    /// Make a key with a secret the operator brings: one that clients already have, as vLLM's
    /// and llama.cpp's `--api-key` take. Only its digest is kept, as for any key.
    pub fn create_key_with_secret(
        &self,
        name: &str,
        spec: &KeySpec,
        secret: &str,
    ) -> Result<(ApiKey, String), AccountsError> {
        if !(MIN_SECRET..=MAX_SECRET).contains(&secret.len()) || !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(AccountsError::Secret);
        }
        let id = format!("key-{}", &hex::encode(digest(secret))[..12]);
        // A key's id comes from its secret: one made with it before, revoked or not, holds the id
        // (and a revoked secret must not come back to life).
        if self.list_keys()?.iter().any(|k| k.id == id) {
            return Err(AccountsError::SecretTaken(id));
        }
        let secret = secret.to_string();
        let key = ApiKey {
            id,
            name: name.to_string(),
            scopes: spec.scopes.clone(),
            requests_per_minute: spec.requests_per_minute,
            tokens_per_day: spec.tokens_per_day,
            models: spec.models.clone(),
            created: now(),
            revoked: None,
        };
        on_store!(self, s => s.insert_key(&key, &digest(&secret)))?;
        Ok((key, secret))
    }

    pub fn list_keys(&self) -> Result<Vec<ApiKey>, AccountsError> {
        on_store!(self, s => s.list_keys())
    }

    pub fn revoke(&self, id: &str) -> Result<(), AccountsError> {
        let revoked = on_store!(self, s => s.revoke(id, now()))?;
        if !revoked && !self.list_keys()?.iter().any(|k| k.id == id) {
            return Err(AccountsError::NoSuchKey(id.to_string()));
        }
        Ok(())
    }

    /// Whether any key is active (then every request needs one).
    pub fn any_active(&self) -> Result<bool, AccountsError> {
        on_store!(self, s => s.any_active())
    }

    /// The active key with this secret (see [`ActiveKeys::find`]).
    pub fn authenticate(&self, secret: &str) -> Result<Option<ApiKey>, AccountsError> {
        Ok(self.active_keys()?.find(secret))
    }

    /// Every active key, with the hash of its secret.
    pub fn active_keys(&self) -> Result<ActiveKeys, AccountsError> {
        Ok(ActiveKeys(on_store!(self, s => s.active_keys())?))
    }

    /// A number that changes whenever another connection (`berth keys` in another process, or
    /// another server on the shared database) changes the keys: what was read before may be stale.
    pub fn changes_elsewhere(&self) -> Result<i64, AccountsError> {
        on_store!(self, s => s.changes_elsewhere())
    }

    /// Record one request as it ended; returns the time it is recorded at (Unix milliseconds).
    pub fn record(&self, r: &Record<'_>) -> Result<i64, AccountsError> {
        on_store!(self, s => s.record(r))
    }

    /// Add refused requests (429s: no tokens, no time) to their minute's count, in one
    /// transaction for all of them: a flood of refusals costs a row per key, model and minute, not
    /// a row and a commit each.
    pub fn record_rejections(&self, counts: &[((String, String), u64)]) -> Result<(), AccountsError> {
        if counts.is_empty() {
            return Ok(());
        }
        on_store!(self, s => s.record_rejections(counts))
    }

    /// The key's requests from `since_ms` (Unix milliseconds) on, oldest first: when each ended and
    /// the tokens it used (prompt and completion).
    pub fn tokens_since(&self, key_id: &str, since_ms: i64) -> Result<Vec<(i64, u64)>, AccountsError> {
        on_store!(self, s => s.tokens_since(key_id, since_ms))
    }

    /// Requests from `since` (Unix seconds) on, grouped by key or by model.
    pub fn usage(&self, since: i64, by: GroupBy) -> Result<Vec<UsageRow>, AccountsError> {
        on_store!(self, s => s.usage(since, by))
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
    use std::time::Duration;

    use berth_testkit::postgres::Postgres;
    use rusqlite::Connection;

    /// Each test below runs against SQLite in a home and against a real PostgreSQL: `open` gives
    /// a fresh handle on the same database each time it is called.
    fn on_both(test: impl Fn(&dyn Fn() -> Accounts)) {
        let home = tempfile::tempdir().unwrap();
        test(&|| Accounts::open(home.path()).unwrap());
        let postgres = Postgres::start();
        let url = postgres.url();
        test(&|| Accounts::open_at(home.path(), Some(&url)).unwrap());
    }

    #[test]
    fn a_secret_the_operator_brings_works_once_and_only_if_sound() {
        on_both(|open| {
            let accounts = open();
            let spec = KeySpec { scopes: vec![Scope::Admin], ..KeySpec::default() };
            let (key, secret) = accounts.create_key_with_secret("suite", &spec, "sk-this-is-the-secret-key").unwrap();
            assert_eq!(secret, "sk-this-is-the-secret-key");
            assert_eq!(accounts.authenticate(&secret).unwrap().map(|k| k.id), Some(key.id.clone()));
            for bad in ["short", "has a space in it!!", &"x".repeat(MAX_SECRET + 1), "tab	here-and-long-enough"] {
                assert!(
                    matches!(accounts.create_key_with_secret("x", &spec, bad), Err(AccountsError::Secret)),
                    "{bad}"
                );
            }
            let again = accounts.create_key_with_secret("again", &spec, &secret);
            assert!(matches!(again, Err(AccountsError::SecretTaken(ref id)) if *id == key.id));
            accounts.revoke(&key.id).unwrap();
            let revived = accounts.create_key_with_secret("again", &spec, &secret);
            assert!(matches!(revived, Err(AccountsError::SecretTaken(_))), "a revoked secret stays revoked");
            assert!(accounts.authenticate(&secret).unwrap().is_none());
        });
    }

    #[test]
    fn keys_authenticate_until_revoked_and_usage_adds_up() {
        on_both(|open| {
            let accounts = open();
            assert!(!accounts.any_active().unwrap());
            let spec = KeySpec { scopes: vec![Scope::Inference], requests_per_minute: Some(10), ..KeySpec::default() };
            let before = accounts.changes_elsewhere().unwrap();
            let (key, secret) = accounts.create_key("ci", &spec).unwrap();
            assert!(secret.starts_with("berth-") && secret.len() == 70);
            assert!(accounts.any_active().unwrap());
            let found = accounts.authenticate(&secret).unwrap().expect("the key");
            assert_eq!(found.id, key.id);
            assert!(found.allows(Scope::Inference) && !found.allows(Scope::Admin));
            assert_eq!(found.requests_per_minute, Some(10));
            assert!(accounts.authenticate("berth-wrong").unwrap().is_none());
            // Another handle (another process) sees the change is new.
            let other = open();
            if accounts.shared().is_some() {
                assert_ne!(other.changes_elsewhere().unwrap(), before, "a key made elsewhere changes the version");
            }
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
            accounts.record_rejections(&[((key.id.clone(), "m".into()), 4)]).unwrap();
            other.record_rejections(&[((key.id.clone(), "m".into()), 2)]).unwrap();
            let usage = accounts.usage(0, GroupBy::Key).unwrap();
            assert_eq!(usage.len(), 1);
            let u = &usage[0];
            assert_eq!((u.requests, u.completed, u.aborted, u.rejected, u.failed), (9, 1, 1, 7, 0));
            assert_eq!(u.length, 1);
            assert_eq!((u.prompt_tokens, u.completion_tokens), (13, 7));
            assert_eq!(u.name, "ci");
            let by_model = accounts.usage(0, GroupBy::Model).unwrap();
            assert_eq!(by_model.iter().map(|r| r.group.as_str()).collect::<Vec<_>>(), ["ai/smollm2:latest", "m"]);
            let future = chrono::Utc::now().timestamp() + 3600;
            assert!(accounts.usage(future, GroupBy::Key).unwrap().is_empty());
            accounts.revoke(&key.id).unwrap();
            assert!(other.authenticate(&secret).unwrap().is_none(), "revoked for every handle");
            assert!(!accounts.any_active().unwrap());
            assert!(matches!(accounts.revoke("key-nope"), Err(AccountsError::NoSuchKey(_))));
            // The database is durable: a second handle sees the same.
            assert_eq!(open().usage(0, GroupBy::Key).unwrap()[0].requests, 9);
        });
    }

    #[test]
    fn keys_keep_their_quotas_and_models() {
        on_both(|open| {
            let accounts = open();
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
                let r =
                    Record { prompt_tokens: prompt, completion_tokens: completion, ..Record::rejected(&key.id, "m") };
                accounts.record(&Record { outcome: Outcome::Completed, ..r }).unwrap()
            };
            let first = spend(30, 30);
            let second = spend(20, 30);
            assert!(second >= first);
            assert_eq!(accounts.tokens_since(&key.id, first - 1).unwrap(), [(first, 60), (second, 50)]);
            assert_eq!(accounts.tokens_since(&key.id, second).unwrap(), []);
            assert_eq!(accounts.tokens_since("key-other", 0).unwrap(), []);
        });
    }

    #[test]
    fn old_sqlite_databases_gain_the_columns_added_since() {
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

    /// Two processes on one shared database: a key's request rate and its tokens are counted
    /// across both, running requests' holds included, and a dead process's holds stop counting.
    #[test]
    fn shared_quotas_count_every_process() {
        let postgres = Postgres::start();
        let home = tempfile::tempdir().unwrap();
        let (a, b) = (
            Accounts::open_at(home.path(), Some(&postgres.url())).unwrap(),
            Accounts::open_at(home.path(), Some(&postgres.url())).unwrap(),
        );
        let (a, b) = (a.shared().unwrap(), b.shared().unwrap());
        let minute = Duration::from_secs(60);
        // Requests per minute, 3 between them.
        assert_eq!(a.admit("key-1", 3, minute).unwrap(), None);
        assert_eq!(b.admit("key-1", 3, minute).unwrap(), None);
        assert_eq!(a.admit("key-1", 3, minute).unwrap(), None);
        let wait = b.admit("key-1", 3, minute).unwrap().expect("the fourth is refused");
        assert!(wait <= minute && wait > Duration::from_secs(50), "{wait:?}");
        assert_eq!(a.admit("key-2", 3, minute).unwrap(), None, "each key its own");

        // Tokens per day, 100 between them: what A's running request holds is not B's to use.
        let day = Duration::from_secs(86_400);
        assert_eq!(a.reserve_tokens("key-1", 100, day, 60).unwrap().granted, 60);
        assert_eq!(b.reserve_tokens("key-1", 100, day, 60).unwrap().granted, 40);
        let full = b.reserve_tokens("key-1", 100, day, 0).unwrap();
        assert_eq!(full.wait, Some(Duration::from_secs(1)), "holds alone fill it: they end soon");
        // A's request used 30 of its 60; B gives back all of its 40 unused.
        let used = Record {
            prompt_tokens: 10,
            completion_tokens: 20,
            outcome: Outcome::Completed,
            ..Record::rejected("key-1", "m")
        };
        a.settle(&used, 60, day).unwrap();
        b.release_tokens("key-1", 40).unwrap();
        assert_eq!(b.reserve_tokens("key-1", 100, day, 500).unwrap().granted, 70);
        // Used up by use, not holds: the wait is until the use leaves the window.
        b.settle(&Record { completion_tokens: 70, ..used.clone() }, 70, day).unwrap();
        let wait = a.reserve_tokens("key-1", 100, day, 0).unwrap().wait.expect("used up");
        assert!(wait > day - Duration::from_secs(60) && wait <= day, "{wait:?}");

        // A process that died holding tokens: its hold stops counting once it is a minute stale.
        assert_eq!(a.reserve_tokens("key-3", 100, day, 80).unwrap().granted, 80);
        assert_eq!(b.reserve_tokens("key-3", 100, day, 80).unwrap().granted, 20);
        b.release_tokens("key-3", 20).unwrap();
        let mut direct = ::postgres::Client::connect(&postgres.url(), ::postgres::NoTls).unwrap();
        direct.execute("UPDATE berth_token_holds SET seen_ms = seen_ms - 61000 WHERE key_id = 'key-3'", &[]).unwrap();
        assert_eq!(b.reserve_tokens("key-3", 100, day, 80).unwrap().granted, 80);
        // A live process's refresh keeps its holds counted.
        b.refresh_holds().unwrap();
        assert_eq!(a.reserve_tokens("key-3", 100, day, 80).unwrap().granted, 20);
    }

    /// A shared database that is wrong or gone: a clear error naming the server, never the
    /// password, and a call that fails rather than hangs.
    #[test]
    fn a_shared_database_that_fails_says_where_without_the_password() {
        let postgres = Postgres::start();
        let home = tempfile::tempdir().unwrap();
        let wrong = postgres.url().replace(postgres.password(), "not-the-password");
        let err = Accounts::open_at(home.path(), Some(&wrong)).err().expect("refused").to_string();
        assert!(err.contains(&format!("berth@127.0.0.1:{}/postgres", postgres.port)), "{err}");
        assert!(err.contains("password authentication failed") && !err.contains("not-the-password"), "{err}");
        let err = Accounts::open_at(home.path(), Some("postgres://a:b@[bad")).err().expect("refused").to_string();
        assert!(err.contains("not a PostgreSQL connection string") && !err.contains("a:b"), "{err}");

        let accounts = Accounts::open_at(home.path(), Some(&postgres.url())).unwrap();
        assert!(!accounts.place().contains(postgres.password()));
        let port = postgres.port;
        drop(postgres);
        let started = std::time::Instant::now();
        let err = accounts.any_active().expect_err("the database is gone").to_string();
        assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());
        assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    }
}
