//! Deployments: names clients call (`model: "chat"`) that map to versions of a model, with
//! rollouts that move traffic to a new version gradually, a health gate before it gets any,
//! guards that abort it by themselves, and rollback.
//!
//! - [`spec`]: what a deployment is (stored whole, so a restart resumes a rollout as it was);
//! - [`db`]: its row in berth's database (the home's SQLite, or PostgreSQL shared by a fleet);
//! - [`routing`]: which version answers a request (sticky per caller);
//! - [`window`]: what each version answered lately, and the guards that judge it;
//! - [`served`]: the response header naming the version, and following a request to its end;
//! - [`control`]: the operations (deploy, rollout, step, promote, abort, rollback, follow);
//! - [`api`]: the same over HTTP for admin keys.
//!
//! This type holds the deployments in memory beside their rows; every change goes through
//! [`Deployments::update`], which writes the row before the change is seen. With a shared
//! database, [`Deployments::sync`] (every second) takes in what other servers changed, and a change
//! this server makes from a revision another has replaced is refused and the row read again.

pub mod api;
pub mod control;
pub mod db;
pub mod routing;
pub mod served;
pub mod spec;
pub mod window;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::ApiError;
use db::{DbError, DeploymentDb, Stored};
use spec::{Deployment, RolloutState, Version};
use window::{Window, WindowStats};

/// How long after a failed pull of a shared deployment's version it is tried again.
const FETCH_RETRY: Duration = Duration::from_secs(30);

pub struct Deployments {
    db: Mutex<DeploymentDb>,
    live: Mutex<HashMap<String, Live>>,
    /// The shared database's version of the deployments when they were last read.
    synced: Mutex<Option<i64>>,
    /// Changes this server wrote (see [`Deployments::sync`]).
    writes: AtomicU64,
    /// Versions of the shared deployments being pulled (`None`), or whose pull failed (when).
    fetching: Mutex<HashMap<String, Option<Instant>>>,
    /// Digests of the shared deployments' versions not (yet) in this server's store: a canary
    /// missing here gets none of this server's requests, so that its guards judge the version,
    /// not a pull in progress.
    missing: Mutex<HashSet<String>>,
}

struct Live {
    spec: Deployment,
    /// The row's revision the spec was read or written at.
    revision: i64,
    /// Deals anonymous requests out in proportion.
    counter: AtomicU64,
    /// What the stable version and the canary answered since the rollout began.
    stable: Arc<Window>,
    canary: Arc<Window>,
    /// A health gate or a registry check is running for it.
    busy: bool,
}

impl Live {
    fn new(stored: Stored) -> Self {
        Self {
            spec: stored.spec,
            revision: stored.revision,
            counter: AtomicU64::new(0),
            stable: Arc::default(),
            canary: Arc::default(),
            busy: false,
        }
    }

    /// Take a newer spec: what requests see changes at once, and a new rollout's guards judge
    /// only what happens from its start.
    fn replace(&mut self, spec: Deployment, revision: i64) {
        if spec.rollout.as_ref().map(|r| r.started_ms) != self.spec.rollout.as_ref().map(|r| r.started_ms) {
            self.stable = Arc::default();
            self.canary = Arc::default();
        }
        self.spec = spec;
        self.revision = revision;
    }
}

/// The version a request goes to, and where its answer is counted.
pub struct Route {
    pub version: Version,
    pub window: Arc<Window>,
}

fn saving_failed(e: DbError) -> ApiError {
    if let DbError::Conflict(name) = &e {
        return ApiError::conflict(format!(
            "another server changed the deployment {name} at the same moment; it is read again: retry (`berth rollout status {name}` shows it now)"
        ));
    }
    tracing::error!("{e}");
    ApiError::internal("cannot save the deployment in berth's database; the server's log says why")
}

impl Deployments {
    /// The deployments in the shared database `shared` names, or in the home's.
    pub fn open(home: &Path, shared: Option<&str>) -> Result<Deployments, DbError> {
        let db = DeploymentDb::open(home, shared)?;
        let synced = db.version()?;
        let live = db.all()?.into_iter().map(|d| (d.spec.name.clone(), Live::new(d))).collect();
        Ok(Deployments {
            db: Mutex::new(db),
            live: Mutex::new(live),
            synced: Mutex::new(synced),
            writes: AtomicU64::new(0),
            fetching: Mutex::default(),
            missing: Mutex::default(),
        })
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn db(&self) -> std::sync::MutexGuard<'_, DeploymentDb> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_shared(&self) -> bool {
        self.db().is_shared()
    }

    /// Take in what other servers changed in the shared database since the last look (nothing to
    /// do in SQLite): new deployments, changed ones (rollouts, steps, aborts), removed ones.
    pub fn sync(&self) -> Result<(), DbError> {
        // Read without holding the deployments, so that requests never wait on the database.
        let writes = self.writes.load(Ordering::SeqCst);
        let Some((version, rows)) = self.changed_rows()? else { return Ok(()) };
        let mut live = self.live();
        // This server wrote meanwhile: what was read may be older than what it holds. Its write
        // changed the version, so the next round reads again.
        if self.writes.load(Ordering::SeqCst) == writes {
            self.take_rows(&mut live, version, rows);
        }
        Ok(())
    }

    /// The shared database's deployments and their version, if it changed since the last look.
    fn changed_rows(&self) -> Result<Option<(i64, Vec<Stored>)>, DbError> {
        let db = self.db();
        let Some(version) = db.version()? else { return Ok(None) };
        if *self.synced.lock().unwrap_or_else(|e| e.into_inner()) == Some(version) {
            return Ok(None);
        }
        Ok(Some((version, db.all()?)))
    }

    fn take_rows(&self, live: &mut HashMap<String, Live>, version: i64, rows: Vec<Stored>) {
        live.retain(|name, _| rows.iter().any(|r| &r.spec.name == name));
        for row in rows {
            match live.get_mut(&row.spec.name) {
                Some(d) if d.revision == row.revision => {}
                Some(d) => d.replace(row.spec, row.revision),
                None => {
                    live.insert(row.spec.name.clone(), Live::new(row));
                }
            }
        }
        *self.synced.lock().unwrap_or_else(|e| e.into_inner()) = Some(version);
    }

    /// Whether a version of the shared deployments is not in this server's store yet.
    pub fn is_missing(&self, digest: &str) -> bool {
        self.missing.lock().unwrap_or_else(|e| e.into_inner()).contains(digest)
    }

    fn set_missing(&self, digests: HashSet<String>) {
        *self.missing.lock().unwrap_or_else(|e| e.into_inner()) = digests;
    }

    /// Mark a version's pull begun; false if one already runs, or failed less than
    /// [`FETCH_RETRY`] ago.
    fn begin_fetch(&self, digest: &str) -> bool {
        let mut fetching = self.fetching.lock().unwrap_or_else(|e| e.into_inner());
        match fetching.get(digest) {
            Some(None) => false,
            Some(Some(failed)) if failed.elapsed() < FETCH_RETRY => false,
            _ => {
                fetching.insert(digest.to_string(), None);
                true
            }
        }
    }

    fn end_fetch(&self, digest: &str, pulled: bool) {
        let mut fetching = self.fetching.lock().unwrap_or_else(|e| e.into_inner());
        if pulled {
            fetching.remove(digest);
        } else {
            fetching.insert(digest.to_string(), Some(Instant::now()));
        }
    }

    /// A write refused because another server wrote first: read the rows again, so that the next
    /// try starts from what is there.
    fn after_conflict(&self, live: &mut HashMap<String, Live>, e: DbError) -> ApiError {
        if matches!(e, DbError::Conflict(_)) {
            match self.changed_rows() {
                Ok(Some((version, rows))) => self.take_rows(live, version, rows),
                Ok(None) => {}
                Err(reread) => tracing::error!("cannot read the deployments again: {reread}"),
            }
        }
        saving_failed(e)
    }

    /// The version that answers a request to `name` from `identity`, if `name` is a deployment.
    pub fn route(&self, name: &str, identity: Option<&str>) -> Option<Route> {
        let live = self.live();
        let d = live.get(name)?;
        match &d.spec.rollout {
            Some(r)
                if r.state == RolloutState::Canary
                    && !self.is_missing(&r.to.digest)
                    && routing::to_canary(r.weight, r.started_ms, identity, &d.counter) =>
            {
                Some(Route { version: r.to.clone(), window: d.canary.clone() })
            }
            _ => Some(Route { version: d.spec.stable.clone(), window: d.stable.clone() }),
        }
    }

    /// Manifest digests serving some deployment now (never evicted for other models).
    pub fn serving_digests(&self) -> HashSet<String> {
        self.live().values().flat_map(|d| d.spec.digests().map(str::to_string).collect::<Vec<_>>()).collect()
    }

    /// Whether any deployment may still serve this digest (now, or after a rollback).
    pub fn needs(&self, digest: &str) -> bool {
        self.live().values().any(|d| d.spec.needs(digest))
    }

    pub fn get(&self, name: &str) -> Option<Deployment> {
        self.live().get(name).map(|d| d.spec.clone())
    }

    pub fn list(&self) -> Vec<Deployment> {
        let mut all: Vec<Deployment> = self.live().values().map(|d| d.spec.clone()).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Change a deployment: `change` works on a copy, which is written to the database and only
    /// then replaces what requests see. An error leaves the deployment as it was.
    pub fn update<R>(
        &self,
        name: &str,
        change: impl FnOnce(&mut Deployment) -> Result<R, ApiError>,
    ) -> Result<(R, Deployment), ApiError> {
        let mut live = self.live();
        let d = live.get_mut(name).ok_or_else(|| not_deployed(name))?;
        let mut spec = d.spec.clone();
        let out = change(&mut spec)?;
        if spec != d.spec {
            let saved = self.db().save(&spec, Some(d.revision));
            match saved {
                Ok(revision) => {
                    self.writes.fetch_add(1, Ordering::SeqCst);
                    d.replace(spec, revision)
                }
                Err(e) => return Err(self.after_conflict(&mut live, e)),
            }
        }
        Ok((out, d.spec.clone()))
    }

    /// Add a deployment (refused if the name is taken).
    pub fn insert(&self, spec: Deployment) -> Result<Deployment, ApiError> {
        let mut live = self.live();
        if live.contains_key(&spec.name) {
            return Err(ApiError::conflict(format!("a deployment named {} exists", spec.name)));
        }
        let saved = self.db().save(&spec, None);
        match saved {
            Ok(revision) => {
                self.writes.fetch_add(1, Ordering::SeqCst);
                live.insert(spec.name.clone(), Live::new(Stored { spec: spec.clone(), revision }));
                Ok(spec)
            }
            Err(e) => Err(self.after_conflict(&mut live, e)),
        }
    }

    pub fn remove(&self, name: &str) -> Result<Deployment, ApiError> {
        let mut live = self.live();
        if !live.contains_key(name) {
            return Err(not_deployed(name));
        }
        self.db().remove(name).map_err(saving_failed)?;
        self.writes.fetch_add(1, Ordering::SeqCst);
        live.remove(name).map(|d| d.spec).ok_or_else(|| not_deployed(name))
    }

    /// What the stable version and the canary answered within `span`.
    pub fn stats(&self, name: &str, span: Duration) -> Option<(WindowStats, WindowStats)> {
        let live = self.live();
        let d = live.get(name)?;
        Some((d.stable.stats(span), d.canary.stats(span)))
    }

    /// Mark a deployment busy (a gate or a registry check runs for it); false if it already was.
    fn begin_work(&self, name: &str) -> bool {
        let mut live = self.live();
        match live.get_mut(name) {
            Some(d) if !d.busy => {
                d.busy = true;
                true
            }
            _ => false,
        }
    }

    fn end_work(&self, name: &str) {
        if let Some(d) = self.live().get_mut(name) {
            d.busy = false;
        }
    }
}

pub fn not_deployed(name: &str) -> ApiError {
    ApiError::not_found(format!("no deployment is named {name}; `berth deployments` lists them"))
        .with_code("deployment_not_found")
}
