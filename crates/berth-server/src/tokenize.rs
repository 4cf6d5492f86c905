//! `POST /tokenize` and `POST /detokenize` in llama.cpp's server's shapes, with berth's `model`
//! field (optional when one model is loaded): text to the model's token ids (`add_special` adds
//! BOS as a prompt would get it, `parse_special` reads control tokens' text as those tokens,
//! `with_pieces` pairs each id with its text), and ids back to text.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::error::ApiError;
use crate::request::JsonBody;

/// Most ids one detokenize request may send.
const MAX_IDS: usize = 1 << 20;

#[derive(Deserialize)]
pub struct TokenizeRequest {
    model: Option<String>,
    content: String,
    #[serde(default)]
    add_special: bool,
    #[serde(default)]
    parse_special: bool,
    #[serde(default)]
    with_pieces: bool,
}

#[derive(Deserialize)]
pub struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
}

pub async fn tokenize(State(state): State<AppState>, JsonBody(req): JsonBody<TokenizeRequest>) -> Response {
    let done = async {
        let model = state.models.get(req.model.as_deref().unwrap_or_default()).await?;
        let tokenizer = model.engine.tokenizer();
        let mut ids = tokenizer.encode(&req.content, req.parse_special).map_err(|e| model.error(e))?;
        if req.add_special {
            ids = model.engine.with_bos(ids);
        }
        let tokens: Vec<Value> = if req.with_pieces {
            ids.iter()
                .map(|&id| {
                    let bytes = tokenizer.token_bytes(id);
                    // A control token prints as nothing; its piece is its text. A piece that is not
                    // whole UTF-8 (part of a character) is its bytes, as llama.cpp gives it.
                    let piece = match (bytes.is_empty(), String::from_utf8(bytes.clone())) {
                        (true, _) => json!(tokenizer.token_text(id).unwrap_or_default()),
                        (false, Ok(text)) => json!(text),
                        (false, Err(_)) => json!(bytes),
                    };
                    json!({"id": id, "piece": piece})
                })
                .collect()
        } else {
            ids.iter().map(|&id| json!(id)).collect()
        };
        Ok::<_, ApiError>(json!({"tokens": tokens}))
    }
    .await;
    match done {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

pub async fn detokenize(State(state): State<AppState>, JsonBody(req): JsonBody<DetokenizeRequest>) -> Response {
    let done = async {
        if req.tokens.len() > MAX_IDS {
            return Err(ApiError::invalid("tokens", format!("tokens takes at most {MAX_IDS} ids")));
        }
        let model = state.models.get(req.model.as_deref().unwrap_or_default()).await?;
        let vocab = model.engine.tokenizer().vocab_size();
        if let Some(bad) = req.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(ApiError::invalid("tokens", format!("token {bad} is outside the vocabulary of {vocab}")));
        }
        Ok(json!({"content": model.engine.tokenizer().decode(&req.tokens)}))
    }
    .await;
    match done {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}
