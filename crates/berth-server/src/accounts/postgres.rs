//! Keys, usage and quotas in a PostgreSQL database shared by several berth servers and gateways
//! (`BERTH_DATABASE_URL`): a key made once works at each of them, `berth usage` adds up what all of
//! them served, and a key's quotas count its requests and tokens wherever they were served.
//!
//! Quotas are counted in the database, not in each process's memory, under a per-key advisory
//! lock, so two gateways cannot both let the last request of a minute through:
//! - requests per minute: the key's admissions of the last minute (at most its limit of rows);
//! - tokens per day: the tokens used, in buckets of 1/1440 of the window per key (a minute, for a
//!   day: the check reads at most 1,441 rows however busy the key is; a bucket's tokens count as
//!   used when its last request ended, so they leave the window at most one bucket late, never
//!   early), plus what running requests hold (each process's holds, refreshed while it lives and
//!   ignored a minute after it died).
//!
//! Time is the database's clock, so servers whose clocks disagree still agree on a key's minute
//! and day. The connection is [`SharedDb`]'s.

use std::time::Duration;

use postgres::{Client, Transaction};

use super::{AccountsError, ApiKey, GroupBy, NO_KEY, Record, Scope, UsageRow};
use crate::quota::{TokenLedger, millis};
use crate::shared_db::{NOW_MS, SharedDb, SharedDbError};

fn shared(e: SharedDbError) -> AccountsError {
    AccountsError::Shared { place: e.place, reason: e.reason }
}

/// A token hold not refreshed for this long belongs to a process that died: not counted.
const HOLD_STALE_MS: i64 = 60_000;

const SCHEMA: &str = "
    SELECT pg_advisory_xact_lock(hashtextextended('berth-schema', 0));
    CREATE TABLE IF NOT EXISTS berth_api_keys (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        secret_sha256 BYTEA NOT NULL UNIQUE,
        scopes TEXT NOT NULL,
        requests_per_minute BIGINT,
        created BIGINT NOT NULL,
        revoked BIGINT,
        tokens_per_day BIGINT,
        models TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE IF NOT EXISTS berth_key_version (
        one BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
        version BIGINT NOT NULL
    );
    INSERT INTO berth_key_version VALUES (true, 0) ON CONFLICT DO NOTHING;
    CREATE TABLE IF NOT EXISTS berth_requests (
        id BIGSERIAL PRIMARY KEY,
        at_ms BIGINT NOT NULL,
        key_id TEXT NOT NULL,
        model TEXT NOT NULL,
        outcome TEXT NOT NULL,
        prompt_tokens BIGINT NOT NULL,
        completion_tokens BIGINT NOT NULL,
        duration_ms DOUBLE PRECISION NOT NULL,
        ttft_ms DOUBLE PRECISION,
        hit_length BOOLEAN NOT NULL DEFAULT false,
        model_version TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX IF NOT EXISTS berth_requests_at ON berth_requests (at_ms);
    CREATE INDEX IF NOT EXISTS berth_requests_key_at ON berth_requests (key_id, at_ms);
    CREATE TABLE IF NOT EXISTS berth_rejections (
        minute_ms BIGINT NOT NULL,
        key_id TEXT NOT NULL,
        model TEXT NOT NULL,
        count BIGINT NOT NULL,
        PRIMARY KEY (minute_ms, key_id, model)
    );
    CREATE TABLE IF NOT EXISTS berth_admissions (
        key_id TEXT NOT NULL,
        at_ms BIGINT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS berth_admissions_key_at ON berth_admissions (key_id, at_ms);
    CREATE TABLE IF NOT EXISTS berth_token_use (
        key_id TEXT NOT NULL,
        bucket_ms BIGINT NOT NULL,
        tokens BIGINT NOT NULL,
        last_ms BIGINT NOT NULL,
        PRIMARY KEY (key_id, bucket_ms)
    );
    CREATE TABLE IF NOT EXISTS berth_token_holds (
        holder TEXT NOT NULL,
        key_id TEXT NOT NULL,
        tokens BIGINT NOT NULL,
        seen_ms BIGINT NOT NULL,
        PRIMARY KEY (holder, key_id)
    );
";

pub struct PostgresStore {
    db: SharedDb,
    /// This process's name on its token holds.
    holder: String,
}

/// What a key's tokens-per-day quota allows now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TokenCheck {
    /// Tokens reserved for the request that asked.
    pub granted: u64,
    /// When nothing is left: how long until some is.
    pub wait: Option<Duration>,
}

fn key_row(row: &postgres::Row) -> Result<ApiKey, postgres::Error> {
    Ok(ApiKey {
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        scopes: Scope::parse_list(row.try_get(2)?),
        requests_per_minute: row.try_get::<_, Option<i64>>(3)?.and_then(|n| u32::try_from(n).ok()),
        created: row.try_get(4)?,
        revoked: row.try_get(5)?,
        tokens_per_day: row.try_get::<_, Option<i64>>(6)?.map(|t| t.max(0) as u64),
        models: super::split_models(row.try_get(7)?),
    })
}

const KEY_COLUMNS: &str = "id, name, scopes, requests_per_minute, created, revoked, tokens_per_day, models";

/// One request as the store's thread writes it (the caller's borrowed record, owned).
struct Row {
    key_id: String,
    model: String,
    model_version: String,
    outcome: &'static str,
    prompt_tokens: i64,
    completion_tokens: i64,
    duration_ms: f64,
    ttft_ms: Option<f64>,
    hit_length: bool,
}

impl Row {
    fn of(r: &Record<'_>) -> Row {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        Row {
            key_id: r.key_id.to_string(),
            model: r.model.to_string(),
            model_version: r.model_version.to_string(),
            outcome: r.outcome.name(),
            prompt_tokens: r.prompt_tokens.min(i64::MAX as u64) as i64,
            completion_tokens: r.completion_tokens.min(i64::MAX as u64) as i64,
            duration_ms: ms(r.duration),
            ttft_ms: r.time_to_first_token.map(ms),
            hit_length: r.hit_length,
        }
    }

    fn tokens(&self) -> i64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }

    /// Insert it; returns when it ended by the database's clock.
    fn insert(&self, tx: &mut Transaction<'_>) -> Result<i64, postgres::Error> {
        let row = tx.query_one(
            &format!(
                "INSERT INTO berth_requests (at_ms, key_id, model, outcome, prompt_tokens, completion_tokens, duration_ms, ttft_ms, hit_length, model_version)
                 VALUES ({NOW_MS}, $1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING at_ms"
            ),
            &[
                &self.key_id,
                &self.model,
                &self.outcome,
                &self.prompt_tokens,
                &self.completion_tokens,
                &self.duration_ms,
                &self.ttft_ms,
                &self.hit_length,
                &self.model_version,
            ],
        )?;
        row.try_get(0)
    }
}

/// The width of a token bucket for a quota window: 1/1440 of it (a minute of a day), at least 1 ms.
fn bucket_ms(window: Duration) -> i64 {
    (millis(window) / 1440).max(1)
}

/// Hold the key's quota lock until the transaction ends.
fn lock_key(tx: &mut Transaction<'_>, key_id: &str) -> Result<i64, postgres::Error> {
    tx.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", &[&format!("berth-quota:{key_id}")])?;
    tx.query_one(&format!("SELECT {NOW_MS}"), &[])?.try_get(0)
}

impl PostgresStore {
    /// Connect to the database `url` names and create berth's tables in it if needed.
    pub(super) fn open(url: &str) -> Result<PostgresStore, AccountsError> {
        let db = SharedDb::open(url, SCHEMA).map_err(shared)?;
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).map_err(|e| AccountsError::Random(e.to_string()))?;
        Ok(PostgresStore { db, holder: format!("{}-{}", std::process::id(), hex::encode(bytes)) })
    }

    pub(super) fn place(&self) -> &str {
        self.db.place()
    }

    fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, postgres::Error> + Send + 'static,
    ) -> Result<T, AccountsError> {
        self.db.call(f).map_err(shared)
    }

    fn transaction<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<T, postgres::Error> + Send + 'static,
    ) -> Result<T, AccountsError> {
        self.db.transaction(f).map_err(shared)
    }

    pub(super) fn insert_key(&self, key: &ApiKey, secret_sha256: &[u8]) -> Result<(), AccountsError> {
        let (key, secret) = (key.clone(), secret_sha256.to_vec());
        self.transaction(move |tx| {
            tx.execute(
                "INSERT INTO berth_api_keys (id, name, secret_sha256, scopes, requests_per_minute, created, tokens_per_day, models)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[
                    &key.id,
                    &key.name,
                    &secret,
                    &Scope::join(&key.scopes),
                    &key.requests_per_minute.map(i64::from),
                    &key.created,
                    &key.tokens_per_day.map(|t| t.min(i64::MAX as u64) as i64),
                    &key.models.join(","),
                ],
            )?;
            tx.execute("UPDATE berth_key_version SET version = version + 1", &[])?;
            Ok(())
        })
    }

    pub(super) fn list_keys(&self) -> Result<Vec<ApiKey>, AccountsError> {
        self.call(|c| {
            c.query(&format!("SELECT {KEY_COLUMNS} FROM berth_api_keys ORDER BY created, id"), &[])?
                .iter()
                .map(key_row)
                .collect()
        })
    }

    /// Whether an active key had this id.
    pub(super) fn revoke(&self, id: &str, at: i64) -> Result<bool, AccountsError> {
        let id = id.to_string();
        self.transaction(move |tx| {
            let n =
                tx.execute("UPDATE berth_api_keys SET revoked = $1 WHERE id = $2 AND revoked IS NULL", &[&at, &id])?;
            tx.execute("UPDATE berth_key_version SET version = version + 1", &[])?;
            Ok(n > 0)
        })
    }

    pub(super) fn any_active(&self) -> Result<bool, AccountsError> {
        self.call(|c| {
            c.query_one("SELECT EXISTS (SELECT 1 FROM berth_api_keys WHERE revoked IS NULL)", &[])?.try_get(0)
        })
    }

    pub(super) fn active_keys(&self) -> Result<Vec<(ApiKey, Vec<u8>)>, AccountsError> {
        self.call(|c| {
            c.query(&format!("SELECT {KEY_COLUMNS}, secret_sha256 FROM berth_api_keys WHERE revoked IS NULL"), &[])?
                .iter()
                .map(|r| Ok((key_row(r)?, r.try_get(8)?)))
                .collect()
        })
    }

    /// Bumped in the same transaction as every change to the keys, by whichever process made it.
    pub(super) fn changes_elsewhere(&self) -> Result<i64, AccountsError> {
        self.call(|c| c.query_one("SELECT version FROM berth_key_version", &[])?.try_get(0))
    }

    pub(super) fn record(&self, r: &Record<'_>) -> Result<i64, AccountsError> {
        let row = Row::of(r);
        self.transaction(move |tx| row.insert(tx))
    }

    pub(super) fn record_rejections(&self, counts: &[((String, String), u64)]) -> Result<(), AccountsError> {
        let counts = counts.to_vec();
        self.transaction(move |tx| {
            let insert = tx.prepare(&format!(
                "INSERT INTO berth_rejections (minute_ms, key_id, model, count) VALUES ({NOW_MS} / 60000 * 60000, $1, $2, $3)
                 ON CONFLICT (minute_ms, key_id, model) DO UPDATE SET count = berth_rejections.count + excluded.count"
            ))?;
            for ((key_id, model), n) in &counts {
                tx.execute(&insert, &[key_id, model, &(*n as i64)])?;
            }
            Ok(())
        })
    }

    pub(super) fn tokens_since(&self, key_id: &str, since_ms: i64) -> Result<Vec<(i64, u64)>, AccountsError> {
        let key_id = key_id.to_string();
        self.call(move |c| {
            c.query(
                "SELECT at_ms, prompt_tokens + completion_tokens FROM berth_requests
                 WHERE key_id = $1 AND at_ms > $2 ORDER BY at_ms",
                &[&key_id, &since_ms],
            )?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get::<_, i64>(1)?.max(0) as u64)))
            .collect()
        })
    }

    pub(super) fn usage(&self, since: i64, by: GroupBy) -> Result<Vec<UsageRow>, AccountsError> {
        let (group, name) = match by {
            GroupBy::Key => ("r.key_id", "MAX(COALESCE(k.name, CASE WHEN r.key_id = '-' THEN '(no key)' ELSE '' END))"),
            GroupBy::Model => ("r.model", "''"),
        };
        // As in SQLite: refusals are counted per minute, and a minute that overlaps `since` counts whole.
        let sql = format!(
            "WITH r AS (
                SELECT key_id, model, outcome, prompt_tokens, completion_tokens, hit_length, 1::bigint AS n
                FROM berth_requests WHERE at_ms >= $1
                UNION ALL
                SELECT key_id, model, 'rejected', 0, 0, false, count FROM berth_rejections WHERE minute_ms + 60000 > $1
             )
             SELECT {group}, {name}, SUM(r.n)::bigint,
                COUNT(*) FILTER (WHERE r.outcome = 'completed'),
                COUNT(*) FILTER (WHERE r.outcome = 'completed' AND r.hit_length),
                COUNT(*) FILTER (WHERE r.outcome = 'aborted'),
                COALESCE(SUM(r.n) FILTER (WHERE r.outcome = 'rejected'), 0)::bigint,
                COUNT(*) FILTER (WHERE r.outcome = 'failed'),
                SUM(r.prompt_tokens)::bigint, SUM(r.completion_tokens)::bigint
             FROM r LEFT JOIN berth_api_keys k ON k.id = r.key_id
             GROUP BY {group} ORDER BY {group}"
        );
        let since_ms = since.saturating_mul(1000);
        self.call(move |c| {
            let n = |r: &postgres::Row, i| r.try_get::<_, i64>(i).map(|v| v.max(0) as u64);
            c.query(&sql, &[&since_ms])?
                .iter()
                .map(|r| {
                    let mut counts = [0u64; 8];
                    for (i, count) in counts.iter_mut().enumerate() {
                        *count = n(r, i + 2)?;
                    }
                    Ok(UsageRow::of(r.try_get(0)?, r.try_get(1)?, counts))
                })
                .collect()
        })
    }

    /// Count a request of the key against `limit` per `window`, wherever it was sent; or, when the
    /// window is full, say how long until its oldest request leaves it (a refused request does not
    /// count).
    pub(crate) fn admit(&self, key_id: &str, limit: u32, window: Duration) -> Result<Option<Duration>, AccountsError> {
        let key_id = key_id.to_string();
        let window_ms = millis(window);
        self.transaction(move |tx| {
            let now = lock_key(tx, &key_id)?;
            tx.execute(
                "DELETE FROM berth_admissions WHERE key_id = $1 AND at_ms <= $2",
                &[&key_id, &(now - window_ms)],
            )?;
            let row =
                tx.query_one("SELECT COUNT(*), MIN(at_ms) FROM berth_admissions WHERE key_id = $1", &[&key_id])?;
            let (count, oldest): (i64, Option<i64>) = (row.try_get(0)?, row.try_get(1)?);
            if count >= i64::from(limit) {
                let wait_ms = oldest.unwrap_or(now).saturating_add(window_ms).saturating_sub(now).max(0);
                return Ok(Some(Duration::from_millis(wait_ms as u64)));
            }
            tx.execute("INSERT INTO berth_admissions (key_id, at_ms) VALUES ($1, $2)", &[&key_id, &now])?;
            Ok(None)
        })
    }

    /// Reserve up to `wanted` tokens of the key's quota of `limit` per `window` for a request that
    /// starts (with `wanted` 0, only check): what was granted, and how long to wait when nothing is
    /// left. The tokens are held, under this process's name, until [`Self::settle`] or
    /// [`Self::release_tokens`].
    pub(crate) fn reserve_tokens(
        &self,
        key_id: &str,
        limit: u64,
        window: Duration,
        wanted: u64,
    ) -> Result<TokenCheck, AccountsError> {
        let (key_id, holder) = (key_id.to_string(), self.holder.clone());
        let window_ms = millis(window);
        self.transaction(move |tx| {
            let now = lock_key(tx, &key_id)?;
            let used = tx.query(
                "SELECT last_ms, tokens FROM berth_token_use WHERE key_id = $1 AND last_ms > $2 ORDER BY last_ms",
                &[&key_id, &(now - window_ms)],
            )?;
            let held: i64 = tx
                .query_one(
                    "SELECT COALESCE(SUM(tokens), 0)::bigint FROM berth_token_holds WHERE key_id = $1 AND seen_ms > $2",
                    &[&key_id, &(now - HOLD_STALE_MS)],
                )?
                .try_get(0)?;
            let mut ledger = TokenLedger::default();
            for row in &used {
                let (last, tokens): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
                ledger.add(last, tokens.max(0) as u64);
            }
            ledger.reserve(held.max(0) as u64);
            let wait = ledger.wait(limit, window, now);
            let granted = if wanted == 0 { 0 } else { wanted.min(ledger.left(limit, window, now)) };
            if granted > 0 {
                tx.execute(
                    "INSERT INTO berth_token_holds (holder, key_id, tokens, seen_ms) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (holder, key_id) DO UPDATE SET tokens = berth_token_holds.tokens + excluded.tokens, seen_ms = excluded.seen_ms",
                    &[&holder, &key_id, &(granted as i64), &now],
                )?;
            }
            Ok(TokenCheck { granted, wait })
        })
    }

    /// Give back tokens held for a request that did not run.
    pub(crate) fn release_tokens(&self, key_id: &str, tokens: u64) -> Result<(), AccountsError> {
        let (key_id, holder) = (key_id.to_string(), self.holder.clone());
        self.transaction(move |tx| {
            lock_key(tx, &key_id)?;
            tx.execute(
                "UPDATE berth_token_holds SET tokens = GREATEST(tokens - $3, 0) WHERE holder = $1 AND key_id = $2",
                &[&holder, &key_id, &(tokens.min(i64::MAX as u64) as i64)],
            )?;
            Ok(())
        })
    }

    /// Record an ended request, add its tokens to its key's use in the window's bucket of now, and
    /// let go of what it held, in one transaction (so no check sees the tokens both held and used,
    /// or neither). Returns when it ended by the database's clock.
    pub(crate) fn settle(&self, r: &Record<'_>, held: u64, window: Duration) -> Result<i64, AccountsError> {
        let (row, holder) = (Row::of(r), self.holder.clone());
        let (window_ms, width) = (millis(window), bucket_ms(window));
        self.transaction(move |tx| {
            if row.key_id == NO_KEY {
                return row.insert(tx);
            }
            let now = lock_key(tx, &row.key_id)?;
            let at_ms = row.insert(tx)?;
            if row.tokens() > 0 {
                tx.execute(
                    "INSERT INTO berth_token_use (key_id, bucket_ms, tokens, last_ms) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (key_id, bucket_ms) DO UPDATE SET tokens = berth_token_use.tokens + excluded.tokens,
                        last_ms = GREATEST(berth_token_use.last_ms, excluded.last_ms)",
                    &[&row.key_id, &(now / width * width), &row.tokens(), &now],
                )?;
                // Buckets long out of any window go (a key's rows stay at most two windows' worth).
                tx.execute(
                    "DELETE FROM berth_token_use WHERE key_id = $1 AND bucket_ms < $2",
                    &[&row.key_id, &(now - 2 * window_ms)],
                )?;
            }
            if held > 0 {
                tx.execute(
                    "UPDATE berth_token_holds SET tokens = GREATEST(tokens - $3, 0) WHERE holder = $1 AND key_id = $2",
                    &[&holder, &row.key_id, &(held.min(i64::MAX as u64) as i64)],
                )?;
            }
            Ok(at_ms)
        })
    }

    /// Tell the other processes this one still lives: its holds stay counted. Holds left by
    /// processes that died long ago, and empty ones, go.
    pub(crate) fn refresh_holds(&self) -> Result<(), AccountsError> {
        let holder = self.holder.clone();
        self.transaction(move |tx| {
            tx.execute(&format!("UPDATE berth_token_holds SET seen_ms = {NOW_MS} WHERE holder = $1"), &[&holder])?;
            tx.execute(
                &format!("DELETE FROM berth_token_holds WHERE tokens <= 0 OR seen_ms < {NOW_MS} - $1"),
                &[&(10 * HOLD_STALE_MS)],
            )?;
            Ok(())
        })
    }
}
