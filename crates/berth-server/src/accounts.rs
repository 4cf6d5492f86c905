//! API keys and usage, kept in SQLite at `$BERTH_HOME/berth.db` so they outlive the server.
//!
//! A key's secret is shown once, when it is made; the database keeps only its SHA-256. A key has
//! scopes (`inference`: generate and embed; `admin`: pull, delete, unload and everything else;
//! `metrics`: scrape `/metrics`) and may have a requests-per-minute quota. Usage is counted per
//! key, model and day, written as each request ends.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum AccountsError {
    #[error("cannot use the accounts database {path}: {source}")]
    Database { path: PathBuf, source: rusqlite::Error },
    #[error("cannot draw a random secret: {0}")]
    Random(String),
    #[error("unknown scope {0:?}; scopes are inference, admin and metrics")]
    Scope(String),
    #[error("no key with id {0:?}; `berth key list` shows them")]
    NoSuchKey(String),
}

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
    pub created: i64,
    pub revoked: Option<i64>,
}

impl ApiKey {
    /// Admin keys may do everything.
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope) || self.scopes.contains(&Scope::Admin)
    }
}

/// One row of the usage report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UsageRow {
    pub key_id: String,
    pub key_name: String,
    pub model: String,
    pub day: String,
    pub requests: u64,
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

impl Accounts {
    /// Open (and create if needed) the database in berth's home.
    pub fn open(home: &Path) -> Result<Accounts, AccountsError> {
        let path = home.join("berth.db");
        let err = |source| AccountsError::Database { path: path.clone(), source };
        std::fs::create_dir_all(home).map_err(|e| err(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
        let db = Connection::open(&path).map_err(err)?;
        // WAL: the server writes usage while `berth usage` and `berth key` read and write.
        db.pragma_update(None, "journal_mode", "WAL").map_err(err)?;
        db.busy_timeout(std::time::Duration::from_secs(5)).map_err(err)?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS api_keys (
                id TEXT PRIMARY KEY,
                name TEXT NOT NULL,
                secret_sha256 BLOB NOT NULL UNIQUE,
                scopes TEXT NOT NULL,
                requests_per_minute INTEGER,
                created INTEGER NOT NULL,
                revoked INTEGER
            );
            CREATE TABLE IF NOT EXISTS usage (
                key_id TEXT NOT NULL,
                model TEXT NOT NULL,
                day TEXT NOT NULL,
                requests INTEGER NOT NULL,
                prompt_tokens INTEGER NOT NULL,
                completion_tokens INTEGER NOT NULL,
                PRIMARY KEY (key_id, model, day)
            );",
        )
        .map_err(err)?;
        Ok(Accounts { path, db })
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> AccountsError + '_ {
        |source| AccountsError::Database { path: self.path.clone(), source }
    }

    /// Make a key; returns it and its secret (shown once).
    pub fn create_key(
        &self,
        name: &str,
        scopes: &[Scope],
        requests_per_minute: Option<u32>,
    ) -> Result<(ApiKey, String), AccountsError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| AccountsError::Random(e.to_string()))?;
        let secret = format!("berth-{}", hex::encode(bytes));
        let id = format!("key-{}", &hex::encode(digest(&secret))[..12]);
        let scope_text: Vec<&str> = scopes.iter().map(|s| s.name()).collect();
        let created = now();
        self.db
            .execute(
                "INSERT INTO api_keys (id, name, secret_sha256, scopes, requests_per_minute, created) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![id, name, digest(&secret), scope_text.join(","), requests_per_minute, created],
            )
            .map_err(self.err())?;
        let key =
            ApiKey { id, name: name.to_string(), scopes: scopes.to_vec(), requests_per_minute, created, revoked: None };
        Ok((key, secret))
    }

    fn row(row: &rusqlite::Row<'_>) -> rusqlite::Result<ApiKey> {
        let scopes: String = row.get(2)?;
        Ok(ApiKey {
            id: row.get(0)?,
            name: row.get(1)?,
            scopes: scopes.split(',').filter_map(|s| Scope::parse(s).ok()).collect(),
            requests_per_minute: row.get(3)?,
            created: row.get(4)?,
            revoked: row.get(5)?,
        })
    }

    pub fn list_keys(&self) -> Result<Vec<ApiKey>, AccountsError> {
        let mut q = self
            .db
            .prepare(
                "SELECT id, name, scopes, requests_per_minute, created, revoked FROM api_keys ORDER BY created, id",
            )
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

    /// The active key with this secret.
    pub fn authenticate(&self, secret: &str) -> Result<Option<ApiKey>, AccountsError> {
        self.db
            .query_row(
                "SELECT id, name, scopes, requests_per_minute, created, revoked FROM api_keys WHERE secret_sha256 = ?1 AND revoked IS NULL",
                params![digest(secret)],
                Self::row,
            )
            .optional()
            .map_err(self.err())
    }

    /// Count one finished request.
    pub fn record(&self, key_id: &str, model: &str, prompt: u64, completion: u64) -> Result<(), AccountsError> {
        let day = chrono::Utc::now().format("%Y-%m-%d").to_string();
        self.db
            .execute(
                "INSERT INTO usage (key_id, model, day, requests, prompt_tokens, completion_tokens) VALUES (?1, ?2, ?3, 1, ?4, ?5)
                 ON CONFLICT (key_id, model, day) DO UPDATE SET requests = requests + 1,
                     prompt_tokens = prompt_tokens + excluded.prompt_tokens,
                     completion_tokens = completion_tokens + excluded.completion_tokens",
                params![key_id, model, day, prompt as i64, completion as i64],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// Usage from `since` (a day, `YYYY-MM-DD`) on, by key, model and day.
    pub fn usage(&self, since: &str) -> Result<Vec<UsageRow>, AccountsError> {
        let mut q = self
            .db
            .prepare(
                "SELECT u.key_id, COALESCE(k.name, ''), u.model, u.day, u.requests, u.prompt_tokens, u.completion_tokens
                 FROM usage u LEFT JOIN api_keys k ON k.id = u.key_id WHERE u.day >= ?1 ORDER BY u.day, u.key_id, u.model",
            )
            .map_err(self.err())?;
        let rows = q
            .query_map(params![since], |r| {
                Ok(UsageRow {
                    key_id: r.get(0)?,
                    key_name: r.get(1)?,
                    model: r.get(2)?,
                    day: r.get(3)?,
                    requests: r.get::<_, i64>(4)? as u64,
                    prompt_tokens: r.get::<_, i64>(5)? as u64,
                    completion_tokens: r.get::<_, i64>(6)? as u64,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_authenticate_until_revoked_and_usage_adds_up() {
        let home = tempfile::tempdir().unwrap();
        let accounts = Accounts::open(home.path()).unwrap();
        assert!(!accounts.any_active().unwrap());
        let (key, secret) = accounts.create_key("ci", &[Scope::Inference], Some(10)).unwrap();
        assert!(secret.starts_with("berth-") && secret.len() == 70);
        assert!(accounts.any_active().unwrap());
        let found = accounts.authenticate(&secret).unwrap().expect("the key");
        assert_eq!(found.id, key.id);
        assert!(found.allows(Scope::Inference) && !found.allows(Scope::Admin));
        assert_eq!(found.requests_per_minute, Some(10));
        assert!(accounts.authenticate("berth-wrong").unwrap().is_none());
        accounts.record(&key.id, "ai/smollm2:latest", 10, 5).unwrap();
        accounts.record(&key.id, "ai/smollm2:latest", 3, 2).unwrap();
        let usage = accounts.usage("2000-01-01").unwrap();
        assert_eq!(usage.len(), 1);
        assert_eq!((usage[0].requests, usage[0].prompt_tokens, usage[0].completion_tokens), (2, 13, 7));
        assert_eq!(usage[0].key_name, "ci");
        accounts.revoke(&key.id).unwrap();
        assert!(accounts.authenticate(&secret).unwrap().is_none());
        assert!(!accounts.any_active().unwrap());
        assert!(matches!(accounts.revoke("key-nope"), Err(AccountsError::NoSuchKey(_))));
        // The database is durable: a second handle sees the same.
        let again = Accounts::open(home.path()).unwrap();
        assert_eq!(again.usage("2000-01-01").unwrap()[0].requests, 2);
    }
}
