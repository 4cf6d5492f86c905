//! Deployments in berth's database, one row each holding the whole deployment as JSON: every
//! change is one write of one row, so a crash leaves a deployment as it was before the change or
//! after it, never half-way. The database is the home's SQLite, or the PostgreSQL shared by a
//! fleet's servers (`BERTH_DATABASE_URL`); there each row has a revision, and a write made from an
//! older revision than the row's is refused ([`DbError::Conflict`]), so two servers changing one
//! deployment at once cannot undo each other's change.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, params};

use super::spec::{Deployment, now_ms};
use crate::shared_db::{NOW_MS, SharedDb, SharedDbError};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot use the deployments in {path}: {source}")]
    Sqlite { path: PathBuf, source: rusqlite::Error },
    #[error("the deployment {name:?} in {path} cannot be read ({message}); remove it with `berth undeploy {name}`")]
    Unreadable { path: PathBuf, name: String, message: String },
    #[error(transparent)]
    Shared(#[from] SharedDbError),
    #[error("the deployment {0:?} was changed by another server at the same moment")]
    Conflict(String),
}

const SHARED_SCHEMA: &str = "
    SELECT pg_advisory_xact_lock(hashtextextended('berth-schema', 0));
    CREATE SEQUENCE IF NOT EXISTS berth_deployment_revisions;
    CREATE TABLE IF NOT EXISTS berth_deployments (
        name TEXT PRIMARY KEY,
        spec TEXT NOT NULL,
        revision BIGINT NOT NULL,
        updated_ms BIGINT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS berth_deployments_version (
        one BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
        version BIGINT NOT NULL
    );
    INSERT INTO berth_deployments_version VALUES (true, 0) ON CONFLICT DO NOTHING;
";

/// A deployment as stored, with the revision it was read at (always 0 in SQLite, which one server
/// owns alone).
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub spec: Deployment,
    pub revision: i64,
}

pub struct DeploymentDb {
    store: Store,
}

enum Store {
    Sqlite { path: PathBuf, db: Connection },
    Shared(SharedDb),
}

impl DeploymentDb {
    /// The deployments of the shared database `shared` names, or else of the home's SQLite.
    pub fn open(home: &Path, shared: Option<&str>) -> Result<DeploymentDb, DbError> {
        if let Some(url) = shared {
            return Ok(DeploymentDb { store: Store::Shared(SharedDb::open(url, SHARED_SCHEMA)?) });
        }
        let path = home.join("berth.db");
        let err = |source| DbError::Sqlite { path: path.clone(), source };
        let db = crate::accounts::open_shared(&path).map_err(err)?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS deployments (
                name TEXT PRIMARY KEY,
                spec TEXT NOT NULL,
                updated_ms INTEGER NOT NULL
            );",
        )
        .map_err(err)?;
        Ok(DeploymentDb { store: Store::Sqlite { path, db } })
    }

    pub fn is_shared(&self) -> bool {
        matches!(self.store, Store::Shared(_))
    }

    fn place(&self) -> PathBuf {
        match &self.store {
            Store::Sqlite { path, .. } => path.clone(),
            Store::Shared(db) => PathBuf::from(db.place()),
        }
    }

    /// Every deployment. One that cannot be read is an error naming it, not a silent loss.
    pub fn all(&self) -> Result<Vec<Stored>, DbError> {
        let rows: Vec<(String, String, i64)> = match &self.store {
            Store::Sqlite { path, db } => db
                .prepare("SELECT name, spec FROM deployments ORDER BY name")
                .and_then(|mut q| q.query_map([], |r| Ok((r.get(0)?, r.get(1)?, 0)))?.collect())
                .map_err(|source| DbError::Sqlite { path: path.clone(), source })?,
            Store::Shared(db) => db.call(|c| {
                c.query("SELECT name, spec, revision FROM berth_deployments ORDER BY name", &[])?
                    .iter()
                    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
                    .collect()
            })?,
        };
        rows.into_iter()
            .map(|(name, spec, revision)| match serde_json::from_str(&spec) {
                Ok(spec) => Ok(Stored { spec, revision }),
                Err(e) => Err(DbError::Unreadable { path: self.place(), name, message: e.to_string() }),
            })
            .collect()
    }

    /// Write a deployment read at revision `read_at` (`None`: a new one); its new revision. In
    /// the shared database, a row written by another server since (or, for a new one, a row of
    /// that name) is a [`DbError::Conflict`].
    pub fn save(&self, d: &Deployment, read_at: Option<i64>) -> Result<i64, DbError> {
        let spec = serde_json::to_string(d).unwrap_or_default();
        match &self.store {
            Store::Sqlite { path, db } => {
                db.execute(
                    "INSERT INTO deployments (name, spec, updated_ms) VALUES (?1, ?2, ?3)
                     ON CONFLICT(name) DO UPDATE SET spec = excluded.spec, updated_ms = excluded.updated_ms",
                    params![d.name, spec, now_ms()],
                )
                .map_err(|source| DbError::Sqlite { path: path.clone(), source })?;
                Ok(0)
            }
            Store::Shared(db) => {
                let name = d.name.clone();
                let written = db.transaction(move |tx| {
                    let row = match read_at {
                        Some(revision) => tx.query_opt(
                            &format!(
                                "UPDATE berth_deployments SET spec = $2, revision = nextval('berth_deployment_revisions'),
                                 updated_ms = {NOW_MS} WHERE name = $1 AND revision = $3 RETURNING revision"
                            ),
                            &[&name, &spec, &revision],
                        )?,
                        None => tx.query_opt(
                            &format!(
                                "INSERT INTO berth_deployments (name, spec, revision, updated_ms)
                                 VALUES ($1, $2, nextval('berth_deployment_revisions'), {NOW_MS})
                                 ON CONFLICT (name) DO NOTHING RETURNING revision"
                            ),
                            &[&name, &spec],
                        )?,
                    };
                    if row.is_some() {
                        tx.execute("UPDATE berth_deployments_version SET version = version + 1", &[])?;
                    }
                    row.map(|r| r.try_get::<_, i64>(0)).transpose()
                })?;
                written.ok_or_else(|| DbError::Conflict(d.name.clone()))
            }
        }
    }

    pub fn remove(&self, name: &str) -> Result<bool, DbError> {
        match &self.store {
            Store::Sqlite { path, db } => db
                .execute("DELETE FROM deployments WHERE name = ?1", params![name])
                .map(|n| n > 0)
                .map_err(|source| DbError::Sqlite { path: path.clone(), source }),
            Store::Shared(db) => {
                let name = name.to_string();
                Ok(db.transaction(move |tx| {
                    let n = tx.execute("DELETE FROM berth_deployments WHERE name = $1", &[&name])?;
                    tx.execute("UPDATE berth_deployments_version SET version = version + 1", &[])?;
                    Ok(n > 0)
                })?)
            }
        }
    }

    /// A number that changes whenever any server changes a deployment in the shared database
    /// (`None` in SQLite: only this server changes its deployments).
    pub fn version(&self) -> Result<Option<i64>, DbError> {
        match &self.store {
            Store::Sqlite { .. } => Ok(None),
            Store::Shared(db) => {
                Ok(Some(db.call(|c| c.query_one("SELECT version FROM berth_deployments_version", &[])?.try_get(0))?))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deployments::spec::{Policy, Version, VersionSettings};

    fn version(d: &str) -> Version {
        Version {
            reference: format!("ai/m@sha256:{d}"),
            digest: format!("sha256:{d}"),
            source: "ai/m:latest".into(),
            settings: VersionSettings::default(),
            pinned_by_berth: true,
        }
    }

    #[test]
    fn deployments_survive_reopening_and_replace_in_place() {
        let home = tempfile::tempdir().unwrap();
        let mut d = Deployment::new("chat".into(), version("aa"), Policy::default(), None);
        DeploymentDb::open(home.path(), None).unwrap().save(&d, None).unwrap();
        d.previous = Some(version("bb"));
        DeploymentDb::open(home.path(), None).unwrap().save(&d, Some(0)).unwrap();
        let db = DeploymentDb::open(home.path(), None).unwrap();
        assert_eq!(db.all().unwrap(), vec![Stored { spec: d, revision: 0 }]);
        assert!(db.remove("chat").unwrap());
        assert!(db.all().unwrap().is_empty());
    }

    #[test]
    fn an_unreadable_row_is_named() {
        let home = tempfile::tempdir().unwrap();
        let db = DeploymentDb::open(home.path(), None).unwrap();
        let Store::Sqlite { db: sqlite, .. } = &db.store else { unreachable!() };
        sqlite.execute("INSERT INTO deployments VALUES ('broken', '{', 0)", []).unwrap();
        let e = db.all().unwrap_err().to_string();
        assert!(e.contains("\"broken\"") && e.contains("berth undeploy broken"), "{e}");
    }

    /// Two servers on one shared database: each sees the other's deployments, and a change made
    /// from a revision another server has since replaced is refused, not lost.
    #[test]
    fn shared_deployments_refuse_a_write_from_a_stale_revision() {
        let postgres = berth_testkit::postgres::Postgres::start();
        let home = tempfile::tempdir().unwrap();
        let (a, b) = (
            DeploymentDb::open(home.path(), Some(&postgres.url())).unwrap(),
            DeploymentDb::open(home.path(), Some(&postgres.url())).unwrap(),
        );
        assert!(a.is_shared());
        let before = b.version().unwrap();
        let mut d = Deployment::new("chat".into(), version("aa"), Policy::default(), None);
        let first = a.save(&d, None).unwrap();
        assert!(matches!(b.save(&d, None), Err(DbError::Conflict(_))), "the name is taken");
        assert_ne!(b.version().unwrap(), before);
        assert_eq!(b.all().unwrap(), vec![Stored { spec: d.clone(), revision: first }]);
        d.previous = Some(version("bb"));
        let second = b.save(&d, Some(first)).unwrap();
        assert!(second > first);
        d.previous = None;
        assert!(matches!(a.save(&d, Some(first)), Err(DbError::Conflict(_))), "a stale revision");
        assert_eq!(a.all().unwrap()[0].spec.previous, Some(version("bb")), "b's change stands");
        assert!(a.remove("chat").unwrap());
        assert!(b.all().unwrap().is_empty());
    }
}
