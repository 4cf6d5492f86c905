//! Embeddings: OpenAI's `/v1/embeddings` (float or base64), Ollama's `/api/embed` and its legacy
//! `/api/embeddings`.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::accounts::{NO_KEY, Outcome, Record};
use crate::error::ApiError;
use crate::models::EmbeddingModel;
use crate::request::JsonBody;

/// Most inputs in one request.
const MAX_INPUTS: usize = 256;

#[derive(Deserialize)]
#[serde(untagged)]
enum Input {
    One(String),
    Many(Vec<String>),
    Tokens(Vec<u32>),
    ManyTokens(Vec<Vec<u32>>),
}

#[derive(Deserialize)]
pub struct OpenAiRequest {
    /// Optional (absent or `null`) where one embedding model is loaded (as llama.cpp's server and
    /// vLLM accept).
    #[serde(default, deserialize_with = "crate::request::optional_model")]
    model: String,
    input: Input,
    #[serde(default)]
    encoding_format: Option<String>,
    dimensions: Option<i64>,
}

#[derive(Deserialize)]
pub struct OllamaRequest {
    model: String,
    input: Option<Input>,
    prompt: Option<String>,
    /// Cut inputs longer than the model takes (Ollama's default) or refuse them (`false`).
    truncate: Option<bool>,
}

/// Ollama's legacy `/api/embeddings`: one `prompt`, one `embedding` (still what both official
/// clients' `embeddings()` call).
#[derive(Deserialize)]
pub struct OllamaLegacyRequest {
    model: String,
    prompt: String,
}

enum Item {
    Text(String),
    Ids(Vec<u32>),
}

fn items(input: Input) -> Result<Vec<Item>, ApiError> {
    let items: Vec<Item> = match input {
        Input::One(s) => vec![Item::Text(s)],
        Input::Many(v) => v.into_iter().map(Item::Text).collect(),
        Input::Tokens(ids) => vec![Item::Ids(ids)],
        Input::ManyTokens(v) => v.into_iter().map(Item::Ids).collect(),
    };
    if items.is_empty() || items.len() > MAX_INPUTS {
        return Err(ApiError::invalid("input", format!("input must hold 1 to {MAX_INPUTS} items")));
    }
    Ok(items)
}

/// What to do with a text longer than the model takes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TooLong {
    /// Cut it to fit (Ollama's `truncate: true`, its default).
    Truncate,
    /// Refuse the request, naming the input (OpenAI's rule, and llama.cpp's).
    Refuse,
}

/// Embed every item on a blocking thread; returns the vectors and the tokens they took. The request
/// is recorded in usage as it ends.
async fn embed_all(
    model: Arc<EmbeddingModel>,
    items: Vec<Item>,
    too_long: TooLong,
) -> Result<(Vec<Vec<f32>>, usize), ApiError> {
    let started = Instant::now();
    let name = model.name.clone();
    let result = embed_on_worker(model, items, too_long).await;
    let (outcome, tokens) = match &result {
        Ok((_, tokens)) => (Outcome::Completed, *tokens as u64),
        Err(_) => (Outcome::Failed, 0),
    };
    let record = Record {
        key_id: NO_KEY,
        model: &name,
        model_version: "",
        outcome,
        prompt_tokens: tokens,
        completion_tokens: 0,
        duration: started.elapsed(),
        time_to_first_token: None,
        hit_length: false,
    };
    crate::run::account(crate::auth::caller().as_ref(), &tracing::Span::current(), record, 0);
    result
}

async fn embed_on_worker(
    model: Arc<EmbeddingModel>,
    items: Vec<Item>,
    too_long: TooLong,
) -> Result<(Vec<Vec<f32>>, usize), ApiError> {
    let several = items.len() > 1;
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::with_capacity(items.len());
        let mut tokens = 0;
        for (i, item) in items.iter().enumerate() {
            let embedded = match (item, too_long) {
                (Item::Text(t), TooLong::Truncate) => model.embedder.embed(t),
                (Item::Text(t), TooLong::Refuse) => model.embedder.embed_whole(t),
                (Item::Ids(ids), _) => model.embedder.embed_ids(ids).map(|v| (v, ids.len())),
            };
            let (v, n) = embedded.map_err(|e| (i, e))?;
            tokens += n;
            out.push(v);
        }
        Ok::<_, (usize, berth_engine::EngineError)>((out, tokens))
    })
    .await
    .map_err(|e| ApiError::internal(format!("embedding stopped: {e}")))?
    .map_err(|(i, e)| {
        let which = if several { format!("input {i}") } else { "the input".to_string() };
        match e {
            berth_engine::EngineError::ContextOverflow { needed, limit } => {
                let hint = match too_long {
                    TooLong::Refuse => "; shorten it",
                    TooLong::Truncate => "",
                };
                ApiError::invalid(
                    "input",
                    format!("{which} is too large: {needed} tokens; this model embeds at most {limit}{hint}"),
                )
            }
            berth_engine::EngineError::BadModel(m) => ApiError::invalid("input", format!("{which}: {m}")),
            other => ApiError::internal(other.to_string()),
        }
    })
}

/// Little-endian f32 bytes, base64-encoded: OpenAI's `encoding_format: "base64"`.
fn base64(v: &[f32]) -> String {
    use base64::Engine as _;
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub async fn openai_embeddings(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<OpenAiRequest>,
) -> Result<Json<Value>, ApiError> {
    let format = req.encoding_format.as_deref().unwrap_or("float");
    if format != "float" && format != "base64" {
        return Err(ApiError::invalid(
            "encoding_format",
            format!("encoding_format must be `float` or `base64`, got `{format}`"),
        ));
    }
    let model = state.models.get_embedder(&req.model).await?;
    if let Some(d) = req.dimensions
        && d != model.embedder.dimensions() as i64
    {
        return Err(ApiError::invalid(
            "dimensions",
            format!("this model's embeddings have {} dimensions and cannot be shortened", model.embedder.dimensions()),
        ));
    }
    let (vectors, tokens) = embed_all(model.clone(), items(req.input)?, TooLong::Refuse).await?;
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if format == "base64" { json!(base64(v)) } else { json!(v) };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": model.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })))
}

pub async fn ollama_embed(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<OllamaRequest>,
) -> Result<Json<Value>, ApiError> {
    let started = Instant::now();
    let input = match (req.input, req.prompt) {
        (Some(i), _) => i,
        (None, Some(p)) => Input::One(p),
        (None, None) => return Err(ApiError::invalid("input", "input is required")),
    };
    let model = state.models.get_embedder(&req.model).await?;
    let too_long = if req.truncate.unwrap_or(true) { TooLong::Truncate } else { TooLong::Refuse };
    let (vectors, tokens) = embed_all(model.clone(), items(input)?, too_long).await?;
    Ok(Json(json!({
        "model": model.name,
        "embeddings": vectors,
        "total_duration": started.elapsed().as_nanos() as u64,
        "load_duration": 0,
        "prompt_eval_count": tokens,
    })))
}

pub async fn ollama_embeddings(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<OllamaLegacyRequest>,
) -> Result<Json<Value>, ApiError> {
    let model = state.models.get_embedder(&req.model).await?;
    // The legacy endpoint always cut long prompts.
    let (mut vectors, _) = embed_all(model, vec![Item::Text(req.prompt)], TooLong::Truncate).await?;
    Ok(Json(json!({"embedding": vectors.pop().unwrap_or_default()})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_of_floats() {
        assert_eq!(base64(&[1.0]), "AACAPw==");
        assert_eq!(base64(&[]), "");
    }
}
