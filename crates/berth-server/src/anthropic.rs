//! Anthropic's Messages API: `POST /v1/messages` (text and tool blocks, tools, streaming with
//! Anthropic's event sequence) and `POST /v1/messages/count_tokens`, for clients and coding agents
//! written against it. Errors take Anthropic's shape (crate::error::Shape).

use std::convert::Infallible;

use axum::Json;
use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use berth_engine::ChatOptions;
use berth_engine::request::{Param, RequestDraft};
use berth_engine::template::Message;
use berth_engine::tools::{Tool, ToolCall, ToolChoice, ToolPlan};
use berth_engine::{FinishReason, GenerationOutput};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::AppState;
use crate::error::ApiError;
use crate::models::{LoadedModel, Served};
use crate::request::{JsonBody, PromptSource, number, request_id};
use crate::run::Update;
use crate::tool_calls::AnswerStream;

#[derive(Deserialize)]
pub struct MessagesRequest {
    model: String,
    max_tokens: Option<Value>,
    messages: Vec<InputMessage>,
    system: Option<Value>,
    #[serde(default)]
    stop_sequences: Vec<String>,
    temperature: Option<Value>,
    top_p: Option<Value>,
    top_k: Option<Value>,
    #[serde(default)]
    stream: bool,
    tools: Option<Vec<InputTool>>,
    tool_choice: Option<Value>,
    /// `{"type": "disabled"}`: a reasoning model answers without thinking first.
    thinking: Option<Value>,
    /// `metadata.user_id`: accepted (berth's usage is per key).
    #[allow(dead_code)]
    metadata: Option<Value>,
}

#[derive(Deserialize)]
pub struct CountTokensRequest {
    model: String,
    messages: Vec<InputMessage>,
    system: Option<Value>,
    tools: Option<Vec<InputTool>>,
}

#[derive(Deserialize)]
struct InputMessage {
    role: String,
    content: Value,
}

#[derive(Deserialize)]
struct InputTool {
    name: String,
    description: Option<String>,
    input_schema: Option<Value>,
}

/// Text of a `system` field or a tool result: a string or a list of text blocks.
fn text_of(v: &Value, param: &str) -> Result<String, ApiError> {
    match v {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut text = String::new();
            for b in blocks {
                match (b.get("type").and_then(Value::as_str), b.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    (kind, _) => {
                        return Err(ApiError::invalid(
                            param,
                            format!(
                                "{param}: blocks of type {:?} are not supported here; send text",
                                kind.unwrap_or("?")
                            ),
                        ));
                    }
                }
            }
            Ok(text)
        }
        _ => Err(ApiError::invalid(param, format!("{param} must be a string or a list of text blocks"))),
    }
}

/// Anthropic's messages as berth's: text blocks join, `tool_use` blocks become an assistant's
/// calls, `tool_result` blocks become `tool` messages.
fn messages_of(system: &Option<Value>, input: &[InputMessage]) -> Result<Vec<Message>, ApiError> {
    let mut out = Vec::new();
    if let Some(s) = system {
        let text = text_of(s, "system")?;
        if !text.is_empty() {
            out.push(Message::new("system", &text));
        }
    }
    if input.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    for (i, m) in input.iter().enumerate() {
        let param = format!("messages[{i}]");
        if m.role != "user" && m.role != "assistant" {
            return Err(ApiError::invalid(
                &format!("{param}.role"),
                format!("{param}.role must be `user` or `assistant`, got {:?}", m.role),
            ));
        }
        let blocks = match &m.content {
            Value::String(s) => {
                out.push(Message::new(&m.role, s));
                continue;
            }
            Value::Array(blocks) => blocks,
            _ => {
                return Err(ApiError::invalid(&param, format!("{param}.content must be a string or a list of blocks")));
            }
        };
        let mut message = Message::new(&m.role, "");
        for (j, b) in blocks.iter().enumerate() {
            let at = format!("{param}.content[{j}]");
            match b.get("type").and_then(Value::as_str) {
                Some("text") => message.content.push_str(b.get("text").and_then(Value::as_str).unwrap_or_default()),
                Some("tool_use") if m.role == "assistant" => {
                    let field = |k: &str| b.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
                    let input = b.get("input").cloned().unwrap_or_else(|| json!({}));
                    message.tool_calls.push(ToolCall {
                        id: field("id"),
                        name: field("name"),
                        arguments: input.to_string(),
                    });
                }
                Some("tool_result") if m.role == "user" => {
                    // Text before the results keeps its place; each result is a `tool` message.
                    if !message.content.is_empty() {
                        out.push(std::mem::replace(&mut message, Message::new("user", "")));
                    }
                    let mut result = Message::new("tool", &text_of(b.get("content").unwrap_or(&Value::Null), &at)?);
                    result.tool_call_id = b.get("tool_use_id").and_then(Value::as_str).map(str::to_string);
                    if b.get("is_error").and_then(Value::as_bool) == Some(true) {
                        result.content = format!("Error: {}", result.content);
                    }
                    out.push(result);
                }
                Some("thinking") | Some("redacted_thinking") if m.role == "assistant" => {}
                kind => {
                    return Err(ApiError::invalid(
                        &at,
                        format!(
                            "{at}: content blocks of type {:?} are not supported in a {} message",
                            kind.unwrap_or("?"),
                            m.role
                        ),
                    ));
                }
            }
        }
        if !message.content.is_empty() || !message.tool_calls.is_empty() {
            out.push(message);
        }
    }
    Ok(out)
}

fn tools_of(tools: &Option<Vec<InputTool>>, choice: &Option<Value>) -> Result<Option<ToolPlan>, ApiError> {
    let Some(list) = tools.as_ref().filter(|t| !t.is_empty()) else {
        return match choice.as_ref().and_then(|c| c.get("type")).and_then(Value::as_str) {
            None | Some("auto") | Some("none") => Ok(None),
            Some(_) => Err(ApiError::invalid("tool_choice", "tool_choice needs tools to choose from")),
        };
    };
    // The same checks as OpenAI's tools, on the same shape.
    let openai: Vec<Value> = list
        .iter()
        .map(|t| {
            json!({"type": "function", "function": {"name": t.name, "description": t.description,
                   "parameters": t.input_schema.clone().unwrap_or_else(|| json!({}))}})
        })
        .collect();
    let plan = crate::tool_calls::openai_tools(&Some(Value::Array(openai)), &None, &None)
        .map_err(|e| ApiError { param: Some("tools".into()), ..e })?;
    let Some(mut plan) = plan else { return Ok(None) };
    plan.tools =
        plan.tools.into_iter().map(|t| Tool { description: t.description.filter(|d| !d.is_empty()), ..t }).collect();
    if let Some(c) = choice {
        plan.choice = match c.get("type").and_then(Value::as_str) {
            Some("auto") | None => ToolChoice::Auto,
            Some("any") => ToolChoice::Required,
            Some("none") => ToolChoice::None,
            Some("tool") => {
                let name = c.get("name").and_then(Value::as_str).unwrap_or_default();
                if !plan.tools.iter().any(|t| t.name == name) {
                    return Err(ApiError::invalid(
                        "tool_choice",
                        format!("tool_choice names the tool {name:?}, which is not among the request's tools"),
                    ));
                }
                ToolChoice::Function(name.to_string())
            }
            Some(other) => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!("tool_choice.type must be auto, any, tool or none, got {other:?}"),
                ));
            }
        };
        plan.parallel = c.get("disable_parallel_tool_use").and_then(Value::as_bool) != Some(true);
    }
    Ok(Some(plan))
}

/// The request as berth's parts, checked before any model is involved.
fn parts(req: &MessagesRequest) -> Result<(PromptSource, RequestDraft, ChatOptions), ApiError> {
    let messages = messages_of(&req.system, &req.messages)?;
    let max_tokens = number("max_tokens", &req.max_tokens)?
        .ok_or_else(|| ApiError::invalid("max_tokens", "max_tokens is required"))?;
    if req.stop_sequences.len() > berth_engine::request::MAX_STOPS {
        return Err(ApiError::invalid(
            "stop_sequences",
            format!("stop_sequences takes at most {} strings", berth_engine::request::MAX_STOPS),
        ));
    }
    let draft = RequestDraft {
        max_tokens: Some(max_tokens),
        // Anthropic's default temperature is 1, its range 0 to 1.
        temperature: Some(match number("temperature", &req.temperature)? {
            Some(p) if !(0.0..=1.0).contains(&p.value) => {
                return Err(ApiError::invalid(
                    "temperature",
                    format!("temperature must be between 0 and 1, got {}", p.value),
                ));
            }
            Some(p) => p,
            None => Param::new("temperature", 1.0),
        }),
        top_p: number("top_p", &req.top_p)?,
        top_k: number("top_k", &req.top_k)?,
        stop: req.stop_sequences.clone(),
        ..RequestDraft::default()
    };
    let enable_thinking = req.thinking.as_ref().and_then(|t| t.get("type")).and_then(Value::as_str) != Some("disabled");
    Ok((
        PromptSource::Chat(messages),
        draft,
        ChatOptions { tools: tools_of(&req.tools, &req.tool_choice)?, enable_thinking, continue_final: false },
    ))
}

fn tool_use_block(c: &ToolCall) -> Value {
    let input: Value = serde_json::from_str(&c.arguments).unwrap_or_else(|_| json!({}));
    json!({"type": "tool_use", "id": c.id, "name": c.name, "input": input})
}

/// Anthropic's reason an answer ended, and the stop sequence that ended it.
fn stop_reason(model: &LoadedModel, out: &GenerationOutput, stops: &[String], calls: bool) -> (&'static str, Value) {
    if calls {
        return ("tool_use", Value::Null);
    }
    match out.finish {
        FinishReason::Length => ("max_tokens", Value::Null),
        _ => {
            // The answer's text stops where a stop sequence began: the tokens still spell it.
            let full = model.engine.tokenizer().decode(&out.tokens);
            let tail = full.get(out.text.len()..).unwrap_or_default();
            match stops.iter().find(|s| !s.is_empty() && tail.starts_with(s.as_str())) {
                Some(s) => ("stop_sequence", json!(s)),
                None => ("end_turn", Value::Null),
            }
        }
    }
}

/// Ids as Anthropic writes them (`msg_…`, `toolu_…`).
fn anthropic_ids(calls: &mut [ToolCall], message_id: &str) {
    for (i, c) in calls.iter_mut().enumerate() {
        if !c.id.starts_with("toolu_") {
            c.id = format!("toolu_{}{i}", &message_id[message_id.len().saturating_sub(12)..]);
        }
    }
}

pub async fn messages(State(state): State<AppState>, JsonBody(req): JsonBody<MessagesRequest>) -> Response {
    let prepared = async {
        let (source, draft, chat) = parts(&req)?;
        let model = state.models.get(&req.model).await?;
        let tools = chat.tools.clone();
        let request = model.prepare(source, draft, chat).await?.pop();
        let request = request.ok_or_else(|| ApiError::internal("no request was prepared"))?;
        Ok::<_, ApiError>((model, request, tools))
    }
    .await;
    let (model, request, tools) = match prepared {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let answer = AnswerStream::new(&model, &request.prompt, tools);
    let input_tokens = request.prompt.len();
    let generation = match crate::run::start(&model, request) {
        Ok(g) => g,
        Err(e) => return e.into_response(),
    };
    let id = request_id("msg");
    if req.stream {
        return stream(model, generation, answer, id, req.stop_sequences, input_tokens);
    }
    let out = match generation.finish().await {
        Ok(o) => o,
        Err(e) => return e.into_response(),
    };
    let (piece, mut calls) = answer.whole(&out, model.engine.tokenizer(), "x");
    anthropic_ids(&mut calls, &id);
    let mut blocks = Vec::new();
    if !piece.reasoning.is_empty() {
        // berth signs nothing: the signature is empty, and berth ignores it when the block comes back.
        blocks.push(json!({"type": "thinking", "thinking": piece.reasoning, "signature": ""}));
    }
    if !piece.content.is_empty() || calls.is_empty() {
        blocks.push(json!({"type": "text", "text": piece.content}));
    }
    blocks.extend(calls.iter().map(tool_use_block));
    let (reason, sequence) = stop_reason(&model, &out, &req.stop_sequences, !calls.is_empty());
    Json(json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model.name,
        "content": blocks,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": {"input_tokens": out.prompt_tokens, "output_tokens": out.tokens.len(),
                  "cache_read_input_tokens": out.cached_tokens, "cache_creation_input_tokens": 0},
    }))
    .into_response()
}

fn event(name: &str, data: Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

/// Anthropic's event sequence: `message_start`, `ping`, then per block `content_block_start`,
/// its deltas (`text_delta`, or `input_json_delta` for a call's input) and `content_block_stop`,
/// then `message_delta` (stop reason, output tokens) and `message_stop`.
fn stream(
    model: Served,
    mut generation: crate::run::Generation,
    answer: AnswerStream,
    id: String,
    stops: Vec<String>,
    input_tokens: usize,
) -> Response {
    let (tx, rx) = mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        // The prompt's tokens are known before the first token, as Anthropic's own stream says.
        let start = json!({"type": "message_start", "message": {
            "id": id, "type": "message", "role": "assistant", "model": model.name, "content": [],
            "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": input_tokens, "output_tokens": 0}}});
        if tx.send(event("message_start", start)).await.is_err()
            || tx.send(event("ping", json!({"type": "ping"}))).await.is_err()
        {
            return;
        }
        let mut answer = answer;
        let mut blocks = Blocks::default();
        let out = loop {
            let update = tokio::select! {
                // The client hung up: dropping the generation cancels it.
                _ = tx.closed() => return,
                u = generation.next() => u,
            };
            match update {
                Update::Token(ev) => {
                    for e in blocks.piece(answer.push(ev.token, &ev.text)) {
                        if tx.send(e).await.is_err() {
                            return;
                        }
                    }
                }
                Update::Done(Ok(out)) if out.finish == FinishReason::Cancelled => return,
                Update::Done(Ok(out)) => break out,
                Update::Done(Err(e)) => {
                    let _ = tx.send(event("error", e.body_in(crate::error::Shape::Anthropic))).await;
                    return;
                }
            }
        };
        let (rest, mut calls) = answer.finish("x");
        anthropic_ids(&mut calls, &id);
        let mut events = blocks.piece(rest);
        if !blocks.had_text && calls.is_empty() {
            // An answer with no text is still one (empty) text block.
            events.extend(blocks.open(Block::Text));
        }
        events.extend(blocks.close());
        for c in &calls {
            let index = blocks.count;
            blocks.count += 1;
            events.push(event(
                "content_block_start",
                json!({"type": "content_block_start", "index": index,
                "content_block": {"type": "tool_use", "id": c.id, "name": c.name, "input": {}}}),
            ));
            events.push(event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index,
                "delta": {"type": "input_json_delta", "partial_json": c.arguments}}),
            ));
            events.push(event("content_block_stop", json!({"type": "content_block_stop", "index": index})));
        }
        let (reason, sequence) = stop_reason(&model, &out, &stops, !calls.is_empty());
        events.push(event(
            "message_delta",
            json!({"type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": sequence},
            "usage": {"input_tokens": out.prompt_tokens, "output_tokens": out.tokens.len()}}),
        ));
        events.push(event("message_stop", json!({"type": "message_stop"})));
        for e in events {
            if tx.send(e).await.is_err() {
                return;
            }
        }
    });
    Sse::new(ReceiverStream::new(rx).map(Ok::<_, Infallible>)).into_response()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Thinking,
    Text,
}

/// The streamed message's content blocks so far: which one is open, how many there are.
#[derive(Default)]
struct Blocks {
    open: Option<Block>,
    count: usize,
    had_text: bool,
}

impl Blocks {
    fn close(&mut self) -> Vec<Event> {
        match self.open.take() {
            Some(_) => {
                vec![event("content_block_stop", json!({"type": "content_block_stop", "index": self.count - 1}))]
            }
            None => Vec::new(),
        }
    }

    fn open(&mut self, kind: Block) -> Vec<Event> {
        if self.open == Some(kind) {
            return Vec::new();
        }
        let mut events = self.close();
        let block = match kind {
            Block::Thinking => json!({"type": "thinking", "thinking": "", "signature": ""}),
            Block::Text => json!({"type": "text", "text": ""}),
        };
        events.push(event(
            "content_block_start",
            json!({"type": "content_block_start", "index": self.count, "content_block": block}),
        ));
        self.open = Some(kind);
        self.count += 1;
        self.had_text |= kind == Block::Text;
        events
    }

    /// Thought into a thinking block, answer text into a text block.
    fn piece(&mut self, piece: crate::tool_calls::AnswerPiece) -> Vec<Event> {
        let mut events = Vec::new();
        if !piece.reasoning.is_empty() {
            events.extend(self.open(Block::Thinking));
            events.push(event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": self.count - 1,
                "delta": {"type": "thinking_delta", "thinking": piece.reasoning}}),
            ));
        }
        if !piece.content.is_empty() {
            events.extend(self.open(Block::Text));
            events.push(event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": self.count - 1,
                "delta": {"type": "text_delta", "text": piece.content}}),
            ));
        }
        events
    }
}

/// `POST /v1/messages/count_tokens`: the prompt's tokens as the model's template renders it.
pub async fn count_tokens(State(state): State<AppState>, JsonBody(req): JsonBody<CountTokensRequest>) -> Response {
    let counted = async {
        let messages = messages_of(&req.system, &req.messages)?;
        let tools = tools_of(&req.tools, &None)?;
        let model = state.models.get(&req.model).await?;
        let m = model.clone();
        let chat = ChatOptions { tools, ..ChatOptions::default() };
        let prompt = tokio::task::spawn_blocking(move || m.engine.chat_prompt_with(&messages, &chat))
            .await
            .map_err(|e| ApiError::internal(format!("counting stopped: {e}")))?
            .map_err(|e| model.error(e))?;
        Ok::<_, ApiError>(prompt.len())
    }
    .await;
    match counted {
        Ok(n) => Json(json!({"input_tokens": n})).into_response(),
        Err(e) => e.into_response(),
    }
}
