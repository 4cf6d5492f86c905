//! Each response names the version that answered it (`x-berth-model-version`), and a request
//! routed to a deployment's version is counted in that version's window when it ends.
//!
//! The middleware gives every request a slot the model manager fills when it resolves the model;
//! handlers need not know about versions. A generation that outlives its handler (a stream)
//! carries the slot's [`ServedRequest`] until its end (see `run::start_all`).

use std::sync::{Arc, Mutex};

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

use super::window::{ServedRequest, Window};

pub const VERSION_HEADER: &str = "x-berth-model-version";
/// A client's conversation id: requests carrying the same one stay on one version.
pub const SESSION_HEADER: &str = "x-berth-session";

#[derive(Default)]
struct Slot {
    session: Option<String>,
    /// The request body's `user` (OpenAI's end-user id).
    user: Mutex<Option<String>>,
    served: Mutex<Option<(String, Option<Arc<ServedRequest>>)>>,
}

tokio::task_local! {
    static SLOT: Arc<Slot>;
}

pub async fn tag_response(request: Request, next: Next) -> Response {
    let session = request
        .headers()
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 256)
        .map(str::to_string);
    let slot = Arc::new(Slot { session, ..Slot::default() });
    let mut response = SLOT.scope(slot.clone(), next.run(request)).await;
    let served = slot.served.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some((version, probe)) = served {
        if let Ok(v) = HeaderValue::from_str(&version) {
            response.headers_mut().insert(VERSION_HEADER, v);
        }
        if let Some(probe) = probe
            && counts_against_version(response.status())
        {
            probe.fail();
        }
    }
    response
}

/// A refusal that says nothing about the version (the caller's key, quota, or a full queue) does
/// not count against it; every other error does.
fn counts_against_version(status: StatusCode) -> bool {
    (status.is_client_error() || status.is_server_error())
        && ![StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN, StatusCode::TOO_MANY_REQUESTS].contains(&status)
}

/// The model manager resolved the request's model to `version` (followed in `window` when it is a
/// deployment's).
pub fn note(version: String, window: Option<Arc<Window>>) {
    let _ = SLOT.try_with(|slot| {
        let probe = window.map(|w| Arc::new(ServedRequest::new(w)));
        *slot.served.lock().unwrap_or_else(|e| e.into_inner()) = Some((version, probe));
    });
}

/// The request's follower, for a generation to carry to its end.
pub fn current() -> Option<Arc<ServedRequest>> {
    SLOT.try_with(|slot| slot.served.lock().unwrap_or_else(|e| e.into_inner()).as_ref().and_then(|s| s.1.clone()))
        .ok()
        .flatten()
}

/// The request names its end user (OpenAI's `user`), before the model is resolved.
pub fn set_user(user: Option<&serde_json::Value>) {
    let user = user.and_then(|u| u.as_str()).filter(|u| !u.is_empty() && u.len() <= 256);
    if let Some(user) = user {
        let _ = SLOT.try_with(|slot| *slot.user.lock().unwrap_or_else(|e| e.into_inner()) = Some(user.to_string()));
    }
}

/// Who the request is from, for sticky assignment: its session header, else the `user` its body
/// names, else its API key.
pub fn identity() -> Option<String> {
    let (session, user) = SLOT
        .try_with(|slot| (slot.session.clone(), slot.user.lock().unwrap_or_else(|e| e.into_inner()).clone()))
        .unwrap_or_default();
    session
        .map(|s| format!("session:{s}"))
        .or(user.map(|u| format!("user:{u}")))
        .or_else(|| crate::auth::caller().and_then(|c| c.key.as_ref().map(|k| format!("key:{}", k.id))))
}
