//! Running a generation on a blocking thread (the engine is synchronous) while the HTTP side waits
//! or streams. A client that goes away closes the channel, the next token's send fails, and the
//! generation stops after at most that one step.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use berth_engine::{GenerationOutput, GenerationRequest, TokenEvent};

use crate::error::ApiError;
use crate::models::LoadedModel;

/// Generate with `model`, calling `on_token` (on the generating thread) for each token; it returns
/// `false` to stop.
pub async fn generate<F>(
    model: Arc<LoadedModel>,
    req: GenerationRequest,
    mut on_token: F,
) -> Result<GenerationOutput, ApiError>
where
    F: FnMut(&TokenEvent) -> bool + Send + 'static,
{
    let permit =
        model.gate.clone().acquire_owned().await.map_err(|_| ApiError::unavailable("the model is shutting down"))?;
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        model.prompt_tokens.fetch_add(req.prompt.len() as u64, Ordering::Relaxed);
        let counter = &model.generated_tokens;
        model.engine.generate(&req, &mut |ev| {
            if ev.token.is_some() {
                counter.fetch_add(1, Ordering::Relaxed);
            }
            on_token(ev)
        })
    })
    .await
    .map_err(|e| ApiError::internal(format!("generation stopped: {e}")))?
    .map_err(ApiError::from)
}
