//! The dashboard on a gateway: the same page as a server's, fed with the gateway's view — its
//! replicas (health, load, the models they hold, what was sent to each and how it went) and a
//! 15-minute history with one series per replica: the answers it relayed, the tokens it generated,
//! its queue and KV use, and how long its answers took to start (the gateway holds a stream's
//! head until its first event, so for streams that is the time to first token).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::{Query, State};
use serde_json::{Value, json};

use super::{Gateway, Upstream, pool};
use crate::dashboard::{self, ModelCounts, StateQuery};
use crate::error::ApiError;

/// The series the history samples: one per replica (and the remote), by URL.
pub(super) fn counts(gateway: &Gateway) -> Vec<ModelCounts> {
    gateway
        .targets()
        .iter()
        .map(|u| {
            let load = u.last_load();
            ModelCounts {
                name: u.base.clone(),
                tokens: load.generated_tokens,
                requests: u.answered.load(Ordering::Relaxed),
                running: load.running,
                waiting: load.waiting,
                kv_usage: load.kv_cache_usage,
                ttft: u.head_latency.counts(),
                itl: Vec::new(),
            }
        })
        .collect()
}

/// One replica as the gateway sees it; `models` lists only what `may_see` lets through.
pub(super) fn replica_view(gateway: &Gateway, u: &Arc<Upstream>, may_see: &dyn Fn(&str) -> bool) -> Value {
    let load = u.last_load();
    let health = match u.health() {
        pool::Health::Unknown => "unknown",
        pool::Health::Up if u.routable() => "up",
        pool::Health::Up => "not ready",
        pool::Health::Ejected { .. } => "ejected",
    };
    json!({
        "url": u.base, "remote": gateway.remote_of(u).is_some(), "health": health,
        "in_flight": u.in_flight.load(Ordering::Relaxed),
        "requests": u.requests.load(Ordering::Relaxed), "answered": u.answered.load(Ordering::Relaxed),
        "failures": u.failures.load(Ordering::Relaxed), "cut": u.cut.load(Ordering::Relaxed),
        "ejections": u.ejections.load(Ordering::Relaxed),
        "waiting": load.waiting, "running": load.running, "kv_cache_usage": load.kv_cache_usage,
        "max_running": load.max_running,
        "models": load.models.iter().filter(|m| may_see(m)).collect::<Vec<_>>(),
    })
}

/// `/ui/state` on a gateway.
pub(super) async fn state(
    State(gateway): State<Arc<Gateway>>,
    Query(query): Query<StateQuery>,
) -> Result<Json<Value>, ApiError> {
    let caller = crate::auth::caller();
    let admin = dashboard::is_admin(caller.as_ref());
    let may_see_model = |name: &str| caller.as_ref().is_none_or(|c| c.check_model(name).is_ok());
    let replicas: Vec<Value> = gateway.targets().iter().map(|u| replica_view(&gateway, u, &may_see_model)).collect();
    // Every key may see the replicas' series: they are the fleet's, not any model's.
    let chosen = query.of.filter(|of| gateway.targets().iter().any(|u| &u.base == of));
    let mut view = dashboard::common(&gateway.auth, &gateway.history, admin, chosen, &|_| true).await?;
    view["kind"] = "gateway".into();
    view["replicas"] = replicas.into();
    view["gateway"] = json!({
        "in_flight": gateway.in_flight.load(Ordering::Relaxed),
        "queue": gateway.queue.len(),
        "queue_refused": gateway.metrics.queue_refused.load(Ordering::Relaxed),
        "unserved": gateway.metrics.unserved.load(Ordering::Relaxed),
    });
    Ok(Json(view))
}
