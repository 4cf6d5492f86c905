//! The deployment operations over HTTP, for admin keys (`berth deploy`, `berth rollout`,
//! `berth rollback` and `berth deployments` call these).
//!
//! - `GET /api/deployments`, `GET|PUT|DELETE /api/deployments/{name}`
//! - `POST /api/deployments/{name}/rollout|step|promote|abort|rollback|refresh`

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use serde::Deserialize;
use serde_json::{Value, json};

use super::control::{DeployOptions, PolicyOptions};
use super::spec::{Deployment, VersionSettings};
use crate::AppState;
use crate::error::ApiError;
use crate::request::JsonBody;

/// A version's own settings as requests give them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsBody {
    pub context: Option<usize>,
    pub keep_alive_seconds: Option<i64>,
    #[serde(default)]
    pub pin: bool,
}

impl SettingsBody {
    fn settings(&self) -> Result<VersionSettings, ApiError> {
        if self.context == Some(0) {
            return Err(ApiError::invalid("context", "context must be at least 1 token"));
        }
        if self.keep_alive_seconds.is_some_and(|k| k > 1_000_000_000) {
            return Err(ApiError::invalid(
                "keep_alive_seconds",
                "keep_alive_seconds is at most 1000000000 (-1: for ever)",
            ));
        }
        Ok(VersionSettings { context: self.context, keep_alive_seconds: self.keep_alive_seconds, pinned: self.pin })
    }

    fn given(&self) -> bool {
        self.context.is_some() || self.keep_alive_seconds.is_some() || self.pin
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployBody {
    pub model: String,
    #[serde(flatten)]
    pub settings: SettingsBody,
    #[serde(default)]
    pub policy: PolicyOptions,
    /// Follow `model` (a registry tag), checking it every this many seconds.
    pub follow_seconds: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutBody {
    pub to: String,
    #[serde(flatten)]
    pub settings: SettingsBody,
    #[serde(default)]
    pub policy: PolicyOptions,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepBody {
    pub weight: Option<u8>,
}

/// A deployment as the API shows it: its stored form, each version's short name, the traffic
/// each version gets, and what each answered within the guards' window.
pub fn view(state: &AppState, d: &Deployment) -> Value {
    let mut v = serde_json::to_value(d).unwrap_or(Value::Null);
    v["stable"]["version"] = json!(d.stable.label());
    if let Some(p) = &d.previous {
        v["previous"]["version"] = json!(p.label());
    }
    let canary_weight = match &d.rollout {
        Some(r) => {
            v["rollout"]["to"]["version"] = json!(r.to.label());
            if r.state == super::spec::RolloutState::Canary { r.weight } else { 0 }
        }
        None => 0,
    };
    let mut traffic = vec![json!({"version": d.stable.label(), "weight": 100 - canary_weight, "role": "stable"})];
    if let Some(r) = &d.rollout {
        traffic.push(json!({"version": r.to.label(), "weight": canary_weight, "role": "canary"}));
    }
    v["traffic"] = json!(traffic);
    let span = Duration::from_secs(d.policy.guards.window_seconds);
    if let Some((stable, canary)) = state.models.deployments.stats(&d.name, span) {
        v["window"] = json!({"seconds": span.as_secs(), "stable": stable, "canary": canary});
    }
    v
}

pub async fn list(State(state): State<AppState>) -> Json<Value> {
    let all: Vec<Value> = state.models.deployments.list().iter().map(|d| view(&state, d)).collect();
    Json(json!({"deployments": all}))
}

pub async fn show(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let d = state.models.deployments.get(&name).ok_or_else(|| super::not_deployed(&name))?;
    Ok(Json(view(&state, &d)))
}

pub async fn deploy(
    State(state): State<AppState>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<DeployBody>,
) -> Result<Json<Value>, ApiError> {
    let options = DeployOptions {
        name,
        model: body.model,
        settings: body.settings.settings()?,
        policy: body.policy,
        follow_seconds: body.follow_seconds,
    };
    let d = state.models.deploy(options).await?;
    Ok(Json(view(&state, &d)))
}

pub async fn undeploy(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let d = state.models.undeploy(&name).await?;
    Ok(Json(json!({"removed": d.name})))
}

pub async fn rollout(
    State(state): State<AppState>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<RolloutBody>,
) -> Result<Json<Value>, ApiError> {
    let settings = if body.settings.given() { Some(body.settings.settings()?) } else { None };
    let d = state.models.start_rollout(&name, &body.to, settings, &body.policy).await?;
    Ok(Json(view(&state, &d)))
}

pub async fn step(
    State(state): State<AppState>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<StepBody>,
) -> Result<Json<Value>, ApiError> {
    let weight = body.weight;
    let d = state.models.step(&name, weight, "by the operator").await?;
    Ok(Json(view(&state, &d)))
}

pub async fn promote(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let d = state.models.promote(&name, "by the operator").await?;
    Ok(Json(view(&state, &d)))
}

pub async fn abort(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let d = state.models.abort(&name, "by the operator").await?;
    Ok(Json(view(&state, &d)))
}

pub async fn rollback(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let d = state.models.rollback(&name).await?;
    Ok(Json(view(&state, &d)))
}

pub async fn refresh(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let d = state.models.refresh(&name).await?;
    Ok(Json(view(&state, &d)))
}
