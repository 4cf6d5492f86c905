//! The deployment operations, on the model manager that loads the versions: deploy, start a
//! rollout (memory checked up front, then a health gate: the new version must load and answer a
//! smoke request before it gets any traffic), step, promote, abort, rollback, follow a registry
//! tag, and the periodic round that applies guards and automatic steps and resumes what a restart
//! interrupted.
//!
//! A version that stops serving drains: requests on it finish (each holds the loaded model), new
//! ones go to the other version, and it unloads once idle ([`ModelManager::release`]).

use std::sync::Arc;
use std::time::Duration;

use berth_engine::GenerationRequest;
use berth_store::Reference;
use serde::Deserialize;

use super::spec::{Deployment, Follow, Outcome, Policy, Rollout, RolloutState, Version, VersionSettings, now_ms};
use super::{not_deployed, window};
use crate::error::ApiError;
use crate::models::{Loaded, ModelManager, Served};

/// What a deploy or a rollout may set of the deployment's policy.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyOptions {
    pub canary: Option<u8>,
    pub step: Option<u8>,
    pub interval_seconds: Option<u64>,
    pub max_error_rate: Option<f64>,
    pub max_ttft_ratio: Option<f64>,
    pub window_seconds: Option<u64>,
    pub min_requests: Option<u64>,
}

impl PolicyOptions {
    fn apply(&self, policy: &mut Policy) -> Result<(), ApiError> {
        let percent = |name: &str, v: u8| {
            if (1..=100).contains(&v) {
                Ok(v)
            } else {
                Err(ApiError::invalid(name, format!("{name} is a percentage from 1 to 100, got {v}")))
            }
        };
        if let Some(v) = self.canary {
            policy.canary = percent("canary", v)?;
        }
        if let Some(v) = self.step {
            policy.step = percent("step", v)?;
        }
        if let Some(v) = self.interval_seconds {
            if !(1..=7 * 86_400).contains(&v) {
                return Err(ApiError::invalid("interval_seconds", "the step interval is 1 s to 7 days"));
            }
            policy.interval_seconds = Some(v);
        }
        let g = &mut policy.guards;
        if let Some(v) = self.max_error_rate {
            if !(0.0..=1.0).contains(&v) {
                return Err(ApiError::invalid(
                    "max_error_rate",
                    "the error-rate guard is a share from 0 to 1 (0.05 is 5%)",
                ));
            }
            g.max_error_rate = Some(v);
        }
        if let Some(v) = self.max_ttft_ratio {
            if !(v.is_finite() && v >= 1.0) {
                return Err(ApiError::invalid(
                    "max_ttft_ratio",
                    "the TTFT guard is a ratio of at least 1 (2 is twice the stable version's p95)",
                ));
            }
            g.max_ttft_ratio = Some(v);
        }
        if let Some(v) = self.window_seconds {
            if !(1..=86_400).contains(&v) {
                return Err(ApiError::invalid("window_seconds", "the guards' window is 1 s to a day"));
            }
            g.window_seconds = v;
        }
        if let Some(v) = self.min_requests {
            if !(1..=1_000_000).contains(&v) {
                return Err(ApiError::invalid("min_requests", "min_requests is 1 to 1000000"));
            }
            g.min_requests = v;
        }
        Ok(())
    }
}

/// What `deploy` needs.
pub struct DeployOptions {
    pub name: String,
    pub model: String,
    pub settings: VersionSettings,
    pub policy: PolicyOptions,
    /// Follow `model`, a registry tag, checking it this often.
    pub follow_seconds: Option<u64>,
}

/// How long a shared deployment's rollout may stay at its health gate before another server takes
/// the gate over (the one that started it is taken to have stopped).
const GATE_TAKEOVER_MS: i64 = 120_000;

/// A deployment is busy while a health gate or a registry check runs for it; this ends that when
/// dropped, wherever the work ends.
struct Work {
    manager: Arc<ModelManager>,
    name: String,
}

impl Work {
    fn begin(manager: &Arc<ModelManager>, name: &str) -> Option<Work> {
        manager.deployments.begin_work(name).then(|| Work { manager: manager.clone(), name: name.to_string() })
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        self.manager.deployments.end_work(&self.name);
    }
}

fn busy(name: &str) -> ApiError {
    ApiError::conflict(format!(
        "a health gate or a registry check is running for {name}; try again when it ends (`berth rollout status {name}`)"
    ))
}

fn no_rollout(name: &str) -> ApiError {
    ApiError::conflict(format!("{name} has no rollout in progress; start one with `berth rollout {name} --to MODEL`"))
}

impl ModelManager {
    /// A model of the store pinned to the manifest it names now. The pin is also kept in the
    /// store (`repository@digest`), so that moving or removing the tag does not take the
    /// version's files away while a deployment may still serve it.
    fn pin_version(&self, model: &str, settings: VersionSettings) -> Result<Version, ApiError> {
        let reference = Reference::parse(model).map_err(|e| ApiError::invalid("model", e.to_string()))?;
        let store = self.store()?;
        let digest = store.resolve(&reference).map_err(|e| match e {
            berth_store::StoreError::NotFound(_) => ApiError::model_not_found(model, &self.available()),
            other => ApiError::internal(format!("cannot read the store: {other}")),
        })?;
        let pinned = reference.with_digest(digest.clone());
        let failed = |e| ApiError::internal(format!("cannot pin {model}: {e}"));
        let pinned_by_berth = !store.has_ref(&pinned).map_err(failed)?;
        store.set_ref(&pinned, &digest).map_err(failed)?;
        Ok(Version {
            reference: pinned.to_string(),
            digest: digest.to_string(),
            source: reference.familiar(),
            settings,
            pinned_by_berth,
        })
    }

    /// The health gate: the version loads and answers a one-token request. Run in a task of its
    /// own, so that a client hanging up does not stop it half-way, and no request's key or
    /// usage is charged for it.
    async fn smoke(self: &Arc<Self>, name: &str, version: &Version) -> Result<(), ApiError> {
        let (manager, name, version) = (self.clone(), name.to_string(), version.clone());
        tokio::spawn(async move {
            let target = manager.version_target(&name, &version, None)?;
            let Loaded::Chat(model) = manager.load_target(&target, None).await? else {
                return Err(ApiError::invalid(
                    "model",
                    format!(
                        "{} is an embedding model; a deployment serves a model that generates text",
                        version.source
                    ),
                ));
            };
            let prompt = model
                .engine
                .tokenizer()
                .encode("Hello", false)
                .map_err(|e| ApiError::internal(format!("the smoke request cannot be tokenized: {e}")))?;
            let request = GenerationRequest {
                prompt,
                max_tokens: 1,
                sampling: Default::default(),
                stop: Vec::new(),
                stop_token_ids: Vec::new(),
                logprobs: None,
                ignore_eos: true,
                constraint: None,
            };
            let served = Served { model, name };
            crate::run::start(&served, request)?.finish().await.map(|_| ())
        })
        .await
        .map_err(|e| ApiError::internal(format!("the health gate stopped: {e}")))?
    }

    /// Create a deployment, or switch an existing one to another version at once (the old one
    /// drains). The version must pass the health gate first.
    pub async fn deploy(self: &Arc<Self>, options: DeployOptions) -> Result<Deployment, ApiError> {
        super::spec::check_name(&options.name).map_err(|m| ApiError::invalid("name", m))?;
        let name = options.name.clone();
        let _work = match self.deployments.get(&name) {
            Some(_) => Some(Work::begin(self, &name).ok_or_else(|| busy(&name))?),
            None => None,
        };
        if options.follow_seconds.is_some() {
            self.pull(&options.model).await?;
        }
        let version = self.pin_version(&options.model, options.settings.clone())?;
        let follow = options.follow_seconds.map(|s| Follow {
            reference: options.model.clone(),
            interval_seconds: s.clamp(1, 86_400),
            checked_ms: Some(now_ms()),
            error: None,
        });
        if let Some(d) = self.deployments.get(&name) {
            if let Some(r) = &d.rollout {
                return Err(ApiError::conflict(format!(
                    "{name} is rolling out to {} ({}%); promote or abort it first",
                    r.to.source, r.weight
                )));
            }
            if d.stable.digest != version.digest {
                self.can_hold(&self.version_target(&name, &version, None)?).await?;
                self.smoke(&name, &version).await?;
            }
            let (old, d) = self.deployments.update(&name, |d| {
                options.policy.apply(&mut d.policy)?;
                if follow.is_some() {
                    d.follow = follow;
                }
                if d.stable.digest == version.digest {
                    d.stable.settings = version.settings.clone();
                    return Ok(None);
                }
                let old = std::mem::replace(&mut d.stable, version.clone());
                d.log(format!("deployed {} ({}) in place of {}", version.source, version.label(), old.label()));
                d.previous = Some(old.clone());
                Ok(Some(old))
            })?;
            if let Some(old) = old {
                self.release(&old).await;
            }
            return Ok(d);
        }
        let mut policy = Policy::default();
        options.policy.apply(&mut policy)?;
        self.smoke(&name, &version).await?;
        self.deployments.insert(Deployment::new(name, version, policy, follow))
    }

    /// Remove a deployment; its versions unload once idle (the store keeps their models).
    pub async fn undeploy(self: &Arc<Self>, name: &str) -> Result<Deployment, ApiError> {
        let d = self.deployments.remove(name)?;
        let versions = [Some(&d.stable), d.rollout.as_ref().map(|r| &r.to), d.previous.as_ref()];
        for version in versions.into_iter().flatten() {
            self.release(version).await;
        }
        tracing::info!(deployment = %name, "removed");
        Ok(d)
    }

    /// Start a rollout of `to` (a model in the store) and wait for its health gate.
    pub async fn start_rollout(
        self: &Arc<Self>,
        name: &str,
        to: &str,
        settings: Option<VersionSettings>,
        policy: &PolicyOptions,
    ) -> Result<Deployment, ApiError> {
        let current = self.deployments.get(name).ok_or_else(|| not_deployed(name))?;
        let work = Work::begin(self, name).ok_or_else(|| busy(name))?;
        let version = self.pin_version(to, settings.unwrap_or(current.stable.settings))?;
        self.begin_rollout(work, version, policy).await
    }

    /// A rollout's start, with the deployment marked busy (`work`, handed on to the gate).
    async fn begin_rollout(
        self: &Arc<Self>,
        work: Work,
        version: Version,
        policy: &PolicyOptions,
    ) -> Result<Deployment, ApiError> {
        let name = work.name.clone();
        let check = |d: &Deployment| -> Result<(), ApiError> {
            if let Some(r) = &d.rollout {
                return Err(ApiError::conflict(format!(
                    "{name} is already rolling out to {} ({}%); promote or abort it first",
                    r.to.source, r.weight
                )));
            }
            if d.stable.digest == version.digest {
                return Err(ApiError::conflict(format!(
                    "{name} already serves {} ({})",
                    version.source,
                    version.label()
                )));
            }
            Ok(())
        };
        check(&self.deployments.get(&name).ok_or_else(|| not_deployed(&name))?)?;
        policy.apply(&mut Policy::default())?;
        // Both versions must fit beside each other: refuse now rather than evict the stable one.
        self.can_hold(&self.version_target(&name, &version, None)?).await?;
        self.deployments.update(&name, |d| {
            check(d)?;
            policy.apply(&mut d.policy)?;
            let now = now_ms();
            d.rollout = Some(Rollout {
                to: version.clone(),
                weight: d.policy.canary,
                state: RolloutState::Starting,
                started_ms: now,
                stepped_ms: now,
            });
            d.log(format!(
                "rollout to {} ({}) started: loading it for its health gate",
                version.source,
                version.label()
            ));
            Ok(())
        })?;
        let manager = self.clone();
        let _ = tokio::spawn(async move { manager.finish_gate(work).await }).await;
        self.deployments.get(&name).ok_or_else(|| not_deployed(&name))
    }

    /// Run the health gate of a starting rollout: pass, and the canary gets its weight; fail, and
    /// the rollout ends failed with the reason, the stable version serving everything.
    async fn finish_gate(self: &Arc<Self>, work: Work) {
        let name = work.name.clone();
        let Some(to) = self
            .deployments
            .get(&name)
            .and_then(|d| d.rollout)
            .filter(|r| r.state == RolloutState::Starting)
            .map(|r| r.to)
        else {
            return;
        };
        let outcome = self.smoke(&name, &to).await;
        let _ = self.deployments.update(&name, |d| {
            let Some(r) = d.rollout.as_mut().filter(|r| r.to.digest == to.digest && r.state == RolloutState::Starting)
            else {
                return Ok(());
            };
            match &outcome {
                Ok(()) => {
                    r.state = RolloutState::Canary;
                    r.stepped_ms = now_ms();
                    let weight = r.weight;
                    d.log(format!(
                        "{} ({}) passed its health gate; it receives {weight}% of requests",
                        to.source,
                        to.label()
                    ));
                }
                Err(e) => {
                    d.end_rollout(
                        Outcome::Failed,
                        format!("the new version did not pass its health gate: {}", e.message),
                    );
                }
            }
            Ok(())
        });
        if outcome.is_err() {
            self.release(&to).await;
        }
        drop(work);
    }

    /// Move the canary to `weight` percent (or one policy step up); at 100 it is promoted.
    pub async fn step(self: &Arc<Self>, name: &str, weight: Option<u8>, why: &str) -> Result<Deployment, ApiError> {
        if weight.is_some_and(|w| !(1..=100).contains(&w)) {
            return Err(ApiError::invalid(
                "weight",
                "the weight is a percentage from 1 to 100 (abort the rollout to go back to 0)",
            ));
        }
        let (promote, d) = self.deployments.update(name, |d| {
            let step = d.policy.step;
            let r = d.rollout.as_mut().ok_or_else(|| no_rollout(name))?;
            if r.state != RolloutState::Canary {
                return Err(busy(name));
            }
            let w = weight.unwrap_or_else(|| r.weight.saturating_add(step)).min(100);
            if w >= 100 {
                return Ok(true);
            }
            r.weight = w;
            r.stepped_ms = now_ms();
            d.log(format!("canary at {w}% ({why})"));
            Ok(false)
        })?;
        if promote { self.promote(name, why).await } else { Ok(d) }
    }

    /// Make the canary the stable version; the old one drains and unloads.
    pub async fn promote(self: &Arc<Self>, name: &str, why: &str) -> Result<Deployment, ApiError> {
        let (old, d) = self.deployments.update(name, |d| {
            match &d.rollout {
                None => return Err(no_rollout(name)),
                Some(r) if r.state != RolloutState::Canary => return Err(busy(name)),
                Some(_) => {}
            }
            Ok(d.end_rollout(Outcome::Promoted, why.to_string()))
        })?;
        if let Some(old) = old {
            self.release(&old).await;
        }
        Ok(d)
    }

    /// Stop the rollout: the stable version serves everything again; the canary drains.
    pub async fn abort(self: &Arc<Self>, name: &str, why: &str) -> Result<Deployment, ApiError> {
        let (old, d) = self.deployments.update(name, |d| {
            if d.rollout.is_none() {
                return Err(no_rollout(name));
            }
            Ok(d.end_rollout(Outcome::Aborted, why.to_string()))
        })?;
        if let Some(old) = old {
            self.release(&old).await;
        }
        Ok(d)
    }

    /// Undo: abort a rollout in progress, or go back to the version before the last promotion
    /// (which passes the health gate first).
    pub async fn rollback(self: &Arc<Self>, name: &str) -> Result<Deployment, ApiError> {
        let d = self.deployments.get(name).ok_or_else(|| not_deployed(name))?;
        if d.rollout.is_some() {
            return self.abort(name, "rolled back by the operator").await;
        }
        let previous = d
            .previous
            .clone()
            .ok_or_else(|| ApiError::conflict(format!("{name} has no earlier version to roll back to")))?;
        let _work = Work::begin(self, name).ok_or_else(|| busy(name))?;
        self.can_hold(&self.version_target(name, &previous, None)?).await?;
        self.smoke(name, &previous).await?;
        let (old, d) = self.deployments.update(name, |d| {
            if d.rollout.is_some() || d.previous.as_ref() != Some(&previous) {
                return Err(ApiError::conflict(format!(
                    "{name} changed during the rollback; look at `berth rollout status {name}`"
                )));
            }
            let old = std::mem::replace(&mut d.stable, previous.clone());
            d.log(format!("rolled back to {} ({}) from {}", previous.source, previous.label(), old.label()));
            d.previous = Some(old.clone());
            Ok(old)
        })?;
        self.release(&old).await;
        Ok(d)
    }

    /// With deployments shared by a fleet, a version another server deployed may not be in this
    /// server's store: pull it (by its digest, from the registry its reference names) in the
    /// background, one pull per version at a time (a failed one again 30 s later), so that this
    /// server can serve it too. Until then its requests get the store's "model not found".
    fn fetch_missing_versions(self: &Arc<Self>) {
        let Ok(store) = self.store() else { return };
        let mut missing = std::collections::HashSet::new();
        for d in self.deployments.list() {
            let versions = std::iter::once(&d.stable).chain(d.rollout.as_ref().map(|r| &r.to));
            for version in versions {
                let present = Reference::parse(&version.reference).is_ok_and(|r| store.resolve(&r).is_ok());
                if present {
                    continue;
                }
                missing.insert(version.digest.clone());
                if !self.deployments.begin_fetch(&version.digest) {
                    continue;
                }
                let (manager, version) = (self.clone(), version.clone());
                tokio::spawn(async move {
                    let pulled = manager.pull(&version.reference).await;
                    match &pulled {
                        Ok(_) => tracing::info!("pulled {} for the shared deployments", version.reference),
                        Err(e) => tracing::warn!(
                            "cannot get {} for the shared deployments (trying again in 30 s): {}",
                            version.reference,
                            e.message
                        ),
                    }
                    manager.deployments.end_fetch(&version.digest, pulled.is_ok());
                });
            }
        }
        self.deployments.set_missing(missing);
    }

    /// Pull a model from its registry through the store's verified pull.
    pub(crate) async fn pull(&self, model: &str) -> Result<berth_store::Digest, ApiError> {
        let reference = Reference::parse(model).map_err(|e| ApiError::invalid("model", e.to_string()))?;
        let store = self.store()?;
        berth_store::registry::pull(
            &store,
            &reference,
            &berth_store::registry::RegistryOptions::from_env(),
            Arc::new(berth_store::progress::NoProgress),
            &crate::vetting::ModelVetting,
        )
        .await
        .map_err(|e| ApiError::unavailable(format!("cannot pull {model}: {e}")).with_code("registry_error"))
    }

    /// Check the registry tag a deployment follows now; a new digest there starts a rollout under
    /// the deployment's policy.
    pub async fn refresh(self: &Arc<Self>, name: &str) -> Result<Deployment, ApiError> {
        let work = Work::begin(self, name).ok_or_else(|| busy(name))?;
        self.check_follow(work).await
    }

    async fn check_follow(self: &Arc<Self>, work: Work) -> Result<Deployment, ApiError> {
        let name = work.name.clone();
        let d = self.deployments.get(&name).ok_or_else(|| not_deployed(&name))?;
        let follow = d
            .follow
            .clone()
            .ok_or_else(|| ApiError::conflict(format!("{name} follows no registry tag (deploy it with --follow)")))?;
        let pulled = self.pull(&follow.reference).await;
        let (_, d) = self.deployments.update(&name, |d| {
            if let Some(f) = d.follow.as_mut() {
                f.checked_ms = Some(now_ms());
                f.error = pulled.as_ref().err().map(|e| e.message.clone());
            }
            Ok(())
        })?;
        let digest = pulled?.to_string();
        let new = digest != d.stable.digest && d.rollout.as_ref().is_none_or(|r| r.to.digest != digest);
        if !new || d.rollout.is_some() {
            return Ok(d);
        }
        let version = self.pin_version(&follow.reference, d.stable.settings.clone())?;
        tracing::info!(deployment = %name, "{} moved to {}", follow.reference, version.label());
        self.begin_rollout(work, version, &PolicyOptions::default()).await
    }

    /// One round of the deployments' upkeep (every second): guards, automatic steps, registry
    /// checks that are due, and health gates a restart interrupted.
    pub async fn tend_deployments(self: &Arc<Self>) {
        if let Err(e) = self.deployments.sync() {
            tracing::warn!("cannot read the shared deployments: {e}");
        }
        if self.deployments.is_shared() {
            self.fetch_missing_versions();
        }
        let now = now_ms();
        for d in self.deployments.list() {
            let name = d.name.clone();
            match &d.rollout {
                Some(r) if r.state == RolloutState::Starting => {
                    // Shared deployments: the server that started the rollout runs its gate; another
                    // takes it over only once it looks abandoned (that server stopped), and only
                    // with the version in its own store.
                    let abandoned = now - r.started_ms > GATE_TAKEOVER_MS && !self.deployments.is_missing(&r.to.digest);
                    if self.deployments.is_shared() && !abandoned {
                        continue;
                    }
                    if let Some(work) = Work::begin(self, &name) {
                        let manager = self.clone();
                        tokio::spawn(async move { manager.finish_gate(work).await });
                    }
                    continue;
                }
                Some(r) => {
                    let guards = &d.policy.guards;
                    let span = Duration::from_secs(guards.window_seconds);
                    if let Some((stable, canary)) = self.deployments.stats(&name, span)
                        && let Some(why) = window::breach(guards, &canary, &stable)
                    {
                        tracing::warn!(deployment = %name, "aborting the rollout: {why}");
                        let _ = self.abort(&name, &why).await;
                        continue;
                    }
                    if let Some(every) = d.policy.interval_seconds
                        && now - r.stepped_ms >= (every as i64) * 1000
                    {
                        let _ = self.step(&name, None, "automatic step").await;
                    }
                }
                None => {}
            }
            if let Some(f) = &d.follow {
                let due = f.checked_ms.is_none_or(|t| now - t >= (f.interval_seconds as i64) * 1000);
                if due && let Some(work) = Work::begin(self, &name) {
                    let manager = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = manager.check_follow(work).await {
                            tracing::warn!(deployment = %name, "checking the followed tag: {}", e.message);
                        }
                    });
                }
            }
        }
    }
}
