//! `POST /api/pin`: keep a model in memory (admin keys). Ollama's `keep_alive: -1` keeps a model
//! past idleness but still lets memory pressure evict it; a pin keeps it through both, as
//! `memory.pinned` in the config does for the models named there at start.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::error::ApiError;
use crate::request::JsonBody;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinBody {
    model: String,
    /// `false` unpins.
    #[serde(default = "yes")]
    pin: bool,
}

fn yes() -> bool {
    true
}

pub async fn pin(State(state): State<AppState>, JsonBody(body): JsonBody<PinBody>) -> Result<Json<Value>, ApiError> {
    if body.model.trim().is_empty() {
        return Err(ApiError::invalid("model", "name the model to pin"));
    }
    let name = state.models.pin(&body.model, body.pin).await?;
    Ok(Json(json!({"model": name, "pinned": body.pin})))
}
