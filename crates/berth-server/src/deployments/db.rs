//! Deployments in berth's SQLite database, one row each holding the whole deployment as JSON:
//! every change is one write of one row, so a crash leaves a deployment as it was before the
//! change or after it, never half-way.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, params};

use super::spec::{Deployment, now_ms};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot use the deployments in {path}: {source}")]
    Sqlite { path: PathBuf, source: rusqlite::Error },
    #[error("the deployment {name:?} in {path} cannot be read ({message}); remove it with `berth undeploy {name}`")]
    Unreadable { path: PathBuf, name: String, message: String },
}

pub struct DeploymentDb {
    path: PathBuf,
    db: Connection,
}

impl DeploymentDb {
    pub fn open(home: &Path) -> Result<DeploymentDb, DbError> {
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
        Ok(DeploymentDb { path, db })
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> DbError + '_ {
        |source| DbError::Sqlite { path: self.path.clone(), source }
    }

    /// Every deployment. One that cannot be read is an error naming it, not a silent loss.
    pub fn all(&self) -> Result<Vec<Deployment>, DbError> {
        let rows: Vec<(String, String)> = self
            .db
            .prepare("SELECT name, spec FROM deployments ORDER BY name")
            .and_then(|mut q| q.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
            .map_err(self.err())?;
        rows.into_iter()
            .map(|(name, spec)| {
                serde_json::from_str(&spec).map_err(|e| DbError::Unreadable {
                    path: self.path.clone(),
                    name,
                    message: e.to_string(),
                })
            })
            .collect()
    }

    pub fn save(&self, d: &Deployment) -> Result<(), DbError> {
        let spec = serde_json::to_string(d).unwrap_or_default();
        self.db
            .execute(
                "INSERT INTO deployments (name, spec, updated_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT(name) DO UPDATE SET spec = excluded.spec, updated_ms = excluded.updated_ms",
                params![d.name, spec, now_ms()],
            )
            .map_err(self.err())?;
        Ok(())
    }

    pub fn remove(&self, name: &str) -> Result<bool, DbError> {
        let n = self.db.execute("DELETE FROM deployments WHERE name = ?1", params![name]).map_err(self.err())?;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deployments::spec::{Policy, Version, VersionSettings};

    #[test]
    fn deployments_survive_reopening_and_replace_in_place() {
        let home = tempfile::tempdir().unwrap();
        let version = |d: &str| Version {
            reference: format!("ai/m@sha256:{d}"),
            digest: format!("sha256:{d}"),
            source: "ai/m:latest".into(),
            settings: VersionSettings::default(),
            pinned_by_berth: true,
        };
        let mut d = Deployment::new("chat".into(), version("aa"), Policy::default(), None);
        DeploymentDb::open(home.path()).unwrap().save(&d).unwrap();
        d.previous = Some(version("bb"));
        DeploymentDb::open(home.path()).unwrap().save(&d).unwrap();
        let db = DeploymentDb::open(home.path()).unwrap();
        assert_eq!(db.all().unwrap(), vec![d]);
        assert!(db.remove("chat").unwrap());
        assert!(db.all().unwrap().is_empty());
    }

    #[test]
    fn an_unreadable_row_is_named() {
        let home = tempfile::tempdir().unwrap();
        let db = DeploymentDb::open(home.path()).unwrap();
        db.db.execute("INSERT INTO deployments VALUES ('broken', '{', 0)", []).unwrap();
        let e = db.all().unwrap_err().to_string();
        assert!(e.contains("\"broken\"") && e.contains("berth undeploy broken"), "{e}");
    }
}
