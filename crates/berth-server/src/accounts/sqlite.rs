//! Keys and usage in SQLite at `$BERTH_HOME/berth.db`: one machine's server and CLI. WAL mode with
//! `synchronous = NORMAL`: a committed record survives the process being killed (only a power loss
//! may take the last ones). Quotas are kept in the server's memory (see `auth`), so this store only
//! keeps rows.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, params};

use super::{AccountsError, ApiKey, GroupBy, Record, Scope, UsageRow};

pub(super) struct SqliteStore {
    path: PathBuf,
    db: Connection,
}

/// A connection to berth's database shared by the server and the CLI: WAL, so that the server
/// writes while `berth usage` and `berth keys` read and write, and a wait of up to 5 s for a lock.
pub(crate) fn open_shared(path: &Path) -> rusqlite::Result<Connection> {
    let db = Connection::open(path)?;
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(db)
}

const KEY_COLUMNS: &str = "id, name, scopes, requests_per_minute, created, revoked, tokens_per_day, models";

fn key_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<ApiKey> {
    let scopes: String = row.get(2)?;
    let models: String = row.get(7)?;
    Ok(ApiKey {
        id: row.get(0)?,
        name: row.get(1)?,
        scopes: Scope::parse_list(&scopes),
        requests_per_minute: row.get(3)?,
        created: row.get(4)?,
        revoked: row.get(5)?,
        tokens_per_day: row.get::<_, Option<i64>>(6)?.map(|t| t.max(0) as u64),
        models: super::split_models(&models),
    })
}

impl SqliteStore {
    /// Open (and create if needed) the database in berth's home.
    pub(super) fn open(home: &Path) -> Result<SqliteStore, AccountsError> {
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
        Ok(SqliteStore { path, db })
    }

    pub(super) fn place(&self) -> String {
        self.path.display().to_string()
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> AccountsError + '_ {
        |source| AccountsError::Database { path: self.path.clone(), source }
    }

    pub(super) fn insert_key(&self, key: &ApiKey, secret_sha256: &[u8]) -> Result<(), AccountsError> {
        self.db
            .execute(
                "INSERT INTO api_keys (id, name, secret_sha256, scopes, requests_per_minute, created, tokens_per_day, models)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    key.id,
                    key.name,
                    secret_sha256,
                    Scope::join(&key.scopes),
                    key.requests_per_minute,
                    key.created,
                    key.tokens_per_day.map(|t| t.min(i64::MAX as u64) as i64),
                    key.models.join(","),
                ],
            )
            .map_err(self.err())?;
        Ok(())
    }

    pub(super) fn list_keys(&self) -> Result<Vec<ApiKey>, AccountsError> {
        let mut q =
            self.db.prepare(&format!("SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created, id")).map_err(self.err())?;
        let rows = q.query_map([], key_row).map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// Whether an active key had this id.
    pub(super) fn revoke(&self, id: &str, at: i64) -> Result<bool, AccountsError> {
        let n = self
            .db
            .execute("UPDATE api_keys SET revoked = ?1 WHERE id = ?2 AND revoked IS NULL", params![at, id])
            .map_err(self.err())?;
        Ok(n > 0)
    }

    pub(super) fn any_active(&self) -> Result<bool, AccountsError> {
        self.db
            .query_row("SELECT EXISTS (SELECT 1 FROM api_keys WHERE revoked IS NULL)", [], |r| r.get(0))
            .map_err(self.err())
    }

    pub(super) fn active_keys(&self) -> Result<Vec<(ApiKey, Vec<u8>)>, AccountsError> {
        let mut q = self
            .db
            .prepare(&format!("SELECT {KEY_COLUMNS}, secret_sha256 FROM api_keys WHERE revoked IS NULL"))
            .map_err(self.err())?;
        q.query_map([], |r| Ok((key_row(r)?, r.get::<_, Vec<u8>>(8)?)))
            .map_err(self.err())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.err())
    }

    /// SQLite's count of commits by other connections (`berth keys` in another process).
    pub(super) fn changes_elsewhere(&self) -> Result<i64, AccountsError> {
        self.db.query_row("PRAGMA data_version", [], |r| r.get(0)).map_err(self.err())
    }

    pub(super) fn record(&self, r: &Record<'_>) -> Result<i64, AccountsError> {
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

    pub(super) fn record_rejections(&self, counts: &[((String, String), u64)]) -> Result<(), AccountsError> {
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

    pub(super) fn tokens_since(&self, key_id: &str, since_ms: i64) -> Result<Vec<(i64, u64)>, AccountsError> {
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

    pub(super) fn usage(&self, since: i64, by: GroupBy) -> Result<Vec<UsageRow>, AccountsError> {
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
                let mut counts = [0u64; 8];
                for (i, count) in counts.iter_mut().enumerate() {
                    *count = n(r, i + 2)?;
                }
                Ok(UsageRow::of(r.get(0)?, r.get(1)?, counts))
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }
}
