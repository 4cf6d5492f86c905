//! Deployments: names clients call (`model: "chat"`) that map to versions of a model, with
//! rollouts that move traffic to a new version gradually, a health gate before it gets any,
//! guards that abort it by themselves, and rollback.
//!
//! - [`spec`]: what a deployment is (stored whole, so a restart resumes a rollout as it was);
//! - [`db`]: its row in berth's SQLite database;
//! - [`routing`]: which version answers a request (sticky per caller);
//! - [`window`]: what each version answered lately, and the guards that judge it;
//! - [`served`]: the response header naming the version, and following a request to its end;
//! - [`control`]: the operations (deploy, rollout, step, promote, abort, rollback, follow);
//! - [`api`]: the same over HTTP for admin keys.
//!
//! This type holds the deployments in memory beside their rows; every change goes through
//! [`Deployments::update`], which writes the row before the change is seen.

pub mod api;
pub mod control;
pub mod db;
pub mod routing;
pub mod served;
pub mod spec;
pub mod window;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::ApiError;
use db::{DbError, DeploymentDb};
use spec::{Deployment, RolloutState, Version};
use window::{Window, WindowStats};

pub struct Deployments {
    db: Mutex<DeploymentDb>,
    live: Mutex<HashMap<String, Live>>,
}

struct Live {
    spec: Deployment,
    /// Deals anonymous requests out in proportion.
    counter: AtomicU64,
    /// What the stable version and the canary answered since the rollout began.
    stable: Arc<Window>,
    canary: Arc<Window>,
    /// A health gate or a registry check is running for it.
    busy: bool,
}

impl Live {
    fn new(spec: Deployment) -> Self {
        Self { spec, counter: AtomicU64::new(0), stable: Arc::default(), canary: Arc::default(), busy: false }
    }
}

/// The version a request goes to, and where its answer is counted.
pub struct Route {
    pub version: Version,
    pub window: Arc<Window>,
}

fn saving_failed(e: DbError) -> ApiError {
    tracing::error!("{e}");
    ApiError::internal("cannot save the deployment in berth's database; the server's log says why")
}

impl Deployments {
    pub fn open(home: &Path) -> Result<Deployments, DbError> {
        let db = DeploymentDb::open(home)?;
        let live = db.all()?.into_iter().map(|d| (d.name.clone(), Live::new(d))).collect();
        Ok(Deployments { db: Mutex::new(db), live: Mutex::new(live) })
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The version that answers a request to `name` from `identity`, if `name` is a deployment.
    pub fn route(&self, name: &str, identity: Option<&str>) -> Option<Route> {
        let live = self.live();
        let d = live.get(name)?;
        match &d.spec.rollout {
            Some(r)
                if r.state == RolloutState::Canary
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
            self.db.lock().unwrap_or_else(|e| e.into_inner()).save(&spec).map_err(saving_failed)?;
            let new_rollout =
                spec.rollout.as_ref().map(|r| r.started_ms) != d.spec.rollout.as_ref().map(|r| r.started_ms);
            if new_rollout {
                // Each rollout's guards judge only what happened since it began.
                d.stable = Arc::default();
                d.canary = Arc::default();
            }
            d.spec = spec;
        }
        Ok((out, d.spec.clone()))
    }

    /// Add a deployment (refused if the name is taken).
    pub fn insert(&self, spec: Deployment) -> Result<Deployment, ApiError> {
        let mut live = self.live();
        if live.contains_key(&spec.name) {
            return Err(ApiError::conflict(format!("a deployment named {} exists", spec.name)));
        }
        self.db.lock().unwrap_or_else(|e| e.into_inner()).save(&spec).map_err(saving_failed)?;
        live.insert(spec.name.clone(), Live::new(spec.clone()));
        Ok(spec)
    }

    pub fn remove(&self, name: &str) -> Result<Deployment, ApiError> {
        let mut live = self.live();
        if !live.contains_key(name) {
            return Err(not_deployed(name));
        }
        self.db.lock().unwrap_or_else(|e| e.into_inner()).remove(name).map_err(saving_failed)?;
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
