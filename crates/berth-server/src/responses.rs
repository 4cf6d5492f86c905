//! OpenAI's Responses API, what the OpenAI Agents SDK speaks: `POST /v1/responses` (input as text
//! or items, instructions, function tools, `text.format`, `previous_response_id`, `store`),
//! streamed as Responses events, and `GET` / `DELETE /v1/responses/{id}`.
//!
//! Stored responses live in berth's SQLite database with the conversation that led to them, so a
//! later request can continue it by `previous_response_id`. Each belongs to the key that made it: a
//! key never reads, continues or deletes another key's responses (they answer 404, as if absent).
//! Stored responses are kept for 30 days.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Mutex;

use axum::Json;
use axum::extract::{Path as UrlPath, State};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use berth_engine::ChatOptions;
use berth_engine::constraint::ConstraintSpec;
use berth_engine::template::Message;
use berth_engine::tools::ToolCall;
use berth_engine::{FinishReason, GenerationOutput};
use futures_util::StreamExt;
use rusqlite::{Connection, OptionalExtension, params};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::AppState;
use crate::error::ApiError;
use crate::request::{JsonBody, PromptSource, Sampling, request_id};
use crate::run::Update;
use crate::tool_calls::{AnswerPiece, AnswerStream};

/// How long a stored response is kept (seconds).
const KEEP_SECONDS: i64 = 30 * 86_400;

/// Stored responses, in `$BERTH_HOME/berth.db`.
pub struct ResponseStore {
    db: Mutex<Connection>,
}

impl ResponseStore {
    pub fn open(home: &Path) -> Result<ResponseStore, rusqlite::Error> {
        let db = Connection::open(home.join("berth.db"))?;
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS responses (
                id TEXT PRIMARY KEY,
                key_id TEXT NOT NULL,
                created INTEGER NOT NULL,
                response TEXT NOT NULL,
                conversation TEXT NOT NULL
            );
            CREATE INDEX IF NOT EXISTS responses_created ON responses (created);",
        )?;
        Ok(ResponseStore { db: Mutex::new(db) })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn put(&self, id: &str, key: &str, response: &Value, conversation: &[Message]) -> Result<(), ApiError> {
        let now = chrono::Utc::now().timestamp();
        let conversation = serde_json::to_string(conversation).unwrap_or_else(|_| "[]".into());
        let db = self.db();
        let failed = |e: rusqlite::Error| ApiError::internal(format!("cannot store the response: {e}"));
        db.execute("DELETE FROM responses WHERE created < ?1", params![now - KEEP_SECONDS]).map_err(failed)?;
        db.execute(
            "INSERT OR REPLACE INTO responses (id, key_id, created, response, conversation) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id, key, now, response.to_string(), conversation],
        )
        .map_err(failed)?;
        Ok(())
    }

    /// A stored response of this key, with its conversation.
    fn get(&self, id: &str, key: &str) -> Result<Option<(Value, Vec<Message>)>, ApiError> {
        let row: Option<(String, String)> = self
            .db()
            .query_row(
                "SELECT response, conversation FROM responses WHERE id = ?1 AND key_id = ?2",
                params![id, key],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(|e| ApiError::internal(format!("cannot read stored responses: {e}")))?;
        Ok(row
            .map(|(r, c)| (serde_json::from_str(&r).unwrap_or_default(), serde_json::from_str(&c).unwrap_or_default())))
    }

    fn delete(&self, id: &str, key: &str) -> Result<bool, ApiError> {
        let n = self
            .db()
            .execute("DELETE FROM responses WHERE id = ?1 AND key_id = ?2", params![id, key])
            .map_err(|e| ApiError::internal(format!("cannot delete the response: {e}")))?;
        Ok(n > 0)
    }
}

fn caller_key() -> String {
    crate::auth::caller().map_or(crate::accounts::NO_KEY.to_string(), |c| c.key_id().to_string())
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!(
        "no response with id {id:?} (it was not stored, was deleted, expired, or belongs to another key)"
    ))
}

#[derive(Deserialize)]
pub struct ResponsesRequest {
    model: String,
    #[serde(default)]
    input: Value,
    instructions: Option<String>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<Value>,
    text: Option<Value>,
    max_output_tokens: Option<Value>,
    temperature: Option<Value>,
    top_p: Option<Value>,
    previous_response_id: Option<String>,
    store: Option<bool>,
    #[serde(default)]
    stream: bool,
    metadata: Option<Value>,
}

/// Input items as berth's messages: messages (text or `input_text`/`output_text` parts),
/// `function_call` items (an assistant's call) and `function_call_output` items (a tool result).
fn input_messages(input: &Value) -> Result<Vec<Message>, ApiError> {
    let items = match input {
        Value::String(s) => return Ok(vec![Message::new("user", s)]),
        Value::Array(items) => items,
        Value::Null => return Ok(Vec::new()),
        _ => return Err(ApiError::invalid("input", "input must be a string or a list of items")),
    };
    let mut out: Vec<Message> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("input[{i}]");
        let field = |k: &str| item.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
        match item.get("type").and_then(Value::as_str).unwrap_or("message") {
            "message" => {
                let role = match field("role").as_str() {
                    "developer" | "system" => "system",
                    "user" => "user",
                    "assistant" => "assistant",
                    other => {
                        return Err(ApiError::invalid(
                            &format!("{at}.role"),
                            format!("{at}.role: unknown role {other:?}"),
                        ));
                    }
                };
                let text = match item.get("content") {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Array(parts)) => {
                        let mut text = String::new();
                        for p in parts {
                            match p.get("type").and_then(Value::as_str) {
                                Some("input_text" | "output_text" | "text") => {
                                    text.push_str(p.get("text").and_then(Value::as_str).unwrap_or_default())
                                }
                                Some("refusal") => {}
                                kind => {
                                    return Err(ApiError::invalid(
                                        &format!("{at}.content"),
                                        format!(
                                            "{at}.content: parts of type {:?} are not supported; send text",
                                            kind.unwrap_or("?")
                                        ),
                                    ));
                                }
                            }
                        }
                        text
                    }
                    _ => return Err(ApiError::invalid(&format!("{at}.content"), format!("{at}.content must be text"))),
                };
                out.push(Message::new(role, &text));
            }
            "function_call" => {
                let call = ToolCall { id: field("call_id"), name: field("name"), arguments: field("arguments") };
                // Calls of one turn belong to one assistant message.
                match out.last_mut() {
                    Some(m) if m.role == "assistant" && !m.tool_calls.is_empty() => m.tool_calls.push(call),
                    _ => {
                        let mut m = Message::new("assistant", "");
                        m.tool_calls.push(call);
                        out.push(m);
                    }
                }
            }
            "function_call_output" => {
                let output = match item.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => other.to_string(),
                    None => String::new(),
                };
                let mut m = Message::new("tool", &output);
                m.tool_call_id = Some(field("call_id"));
                out.push(m);
            }
            // A reasoning item from an earlier answer: the model's thought stays out of the prompt.
            "reasoning" => {}
            other => {
                return Err(ApiError::invalid(&at, format!("{at}: items of type {other:?} are not supported")));
            }
        }
    }
    Ok(out)
}

/// Responses tools (`{"type": "function", "name", "parameters"}`) in chat's shape, for the shared checks.
fn chat_tools(tools: &Option<Value>) -> Result<Option<Value>, ApiError> {
    let Some(Value::Array(list)) = tools else { return Ok(tools.clone()) };
    list.iter()
        .enumerate()
        .map(|(i, t)| match t.get("type").and_then(Value::as_str) {
            Some("function") => {
                Ok(json!({"type": "function", "function": {"name": t.get("name"), "description": t.get("description"),
                                                                           "parameters": t.get("parameters")}}))
            }
            other => Err(ApiError::invalid(
                &format!("tools[{i}]"),
                format!("tools[{i}]: only function tools are supported, got {:?}", other.unwrap_or("?")),
            )),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(|v| Some(Value::Array(v)))
}

/// `tool_choice` as chat writes it (`{"type": "function", "name"}` → `{"function": {"name"}}`).
fn chat_tool_choice(choice: &Option<Value>) -> Option<Value> {
    match choice {
        Some(Value::Object(o)) if o.get("name").is_some() => {
            Some(json!({"type": "function", "function": {"name": o.get("name")}}))
        }
        other => other.clone(),
    }
}

/// `text.format` as a constraint: `json_schema` (flat: `{"type", "name", "schema", "strict"}`),
/// `json_object`, or berth's `regex` / `grammar`.
fn text_format(text: &Option<Value>) -> Result<Option<ConstraintSpec>, ApiError> {
    let Some(format) = text.as_ref().and_then(|t| t.get("format")) else { return Ok(None) };
    let as_chat = match format.get("type").and_then(Value::as_str) {
        Some("json_schema") => json!({"type": "json_schema", "json_schema": {"schema": format.get("schema")}}),
        _ => format.clone(),
    };
    crate::request::response_format(&Some(as_chat)).map_err(|e| ApiError { param: Some("text.format".into()), ..e })
}

pub async fn create(State(state): State<AppState>, JsonBody(req): JsonBody<ResponsesRequest>) -> Response {
    let key = caller_key();
    let prepared = async {
        let mut conversation = match &req.previous_response_id {
            Some(id) => state.responses.get(id, &key)?.ok_or_else(|| not_found(id))?.1,
            None => Vec::new(),
        };
        // The instructions are this request's: an earlier one's do not carry over.
        conversation.retain(|m| m.role != "system");
        if let Some(i) = req.instructions.as_deref().filter(|i| !i.is_empty()) {
            conversation.insert(0, Message::new("system", i));
        }
        conversation.extend(input_messages(&req.input)?);
        if conversation.iter().all(|m| m.role == "system") {
            return Err(ApiError::invalid("input", "input must hold at least one message"));
        }
        let constraint = text_format(&req.text)?;
        let tools = crate::tool_calls::openai_tools(
            &chat_tools(&req.tools)?,
            &chat_tool_choice(&req.tool_choice),
            &req.parallel_tool_calls,
        )?;
        if constraint.is_some() && tools.as_ref().is_some_and(|t| t.choice != berth_engine::tools::ToolChoice::None) {
            return Err(ApiError::invalid("text.format", "text.format and tools cannot constrain one answer together"));
        }
        let sampling = Sampling {
            max_tokens: req.max_output_tokens.clone(),
            temperature: req.temperature.clone(),
            top_p: req.top_p.clone(),
            ..Sampling::default()
        };
        let draft = berth_engine::RequestDraft {
            constraint: constraint.map(|c| ("text.format", c)),
            ..sampling.draft(None).map_err(|e| {
                if e.param.as_deref() == Some("max_tokens") {
                    ApiError { param: Some("max_output_tokens".into()), ..e }
                } else {
                    e
                }
            })?
        };
        let model = state.models.get(&req.model).await?;
        let chat = ChatOptions { tools: tools.clone(), ..ChatOptions::default() };
        let request = model
            .prepare(PromptSource::Chat(conversation.clone()), draft, chat)
            .await?
            .pop()
            .ok_or_else(|| ApiError::internal("no request was prepared"))?;
        Ok::<_, ApiError>((model, request, tools, conversation))
    }
    .await;
    let (model, request, tools, conversation) = match prepared {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let answer = AnswerStream::new(&model, &request.prompt, tools.clone());
    let generation = match crate::run::start(&model, request) {
        Ok(g) => g,
        Err(e) => return e.into_response(),
    };
    let shell = Shell {
        id: request_id("resp"),
        created: crate::models::now(),
        model: model.name.clone(),
        request: echo(&req),
        store: req.store.unwrap_or(true),
        key,
        conversation,
    };
    if req.stream {
        return stream(state, generation, answer, shell);
    }
    let out = match generation.finish().await {
        Ok(o) => o,
        Err(e) => return e.into_response(),
    };
    let (piece, calls) = answer.whole(&out, model.engine.tokenizer(), &shell.id[shell.id.len() - 8..]);
    let response = shell.finished(&out, &piece, &calls);
    if let Err(e) = shell.save(&state, &response, &piece, &calls) {
        return e.into_response();
    }
    Json(response).into_response()
}

/// The request's settings as a response repeats them.
fn echo(req: &ResponsesRequest) -> Value {
    json!({
        "instructions": req.instructions,
        "tools": req.tools.clone().unwrap_or_else(|| json!([])),
        "tool_choice": req.tool_choice.clone().unwrap_or_else(|| json!("auto")),
        "parallel_tool_calls": req.parallel_tool_calls.clone().unwrap_or(json!(true)),
        "temperature": req.temperature.clone().unwrap_or(json!(1.0)),
        "top_p": req.top_p.clone().unwrap_or(json!(1.0)),
        "max_output_tokens": req.max_output_tokens,
        "previous_response_id": req.previous_response_id,
        "text": req.text.clone().unwrap_or_else(|| json!({"format": {"type": "text"}})),
        "metadata": req.metadata.clone().unwrap_or_else(|| json!({})),
        "store": req.store.unwrap_or(true),
        "truncation": "disabled",
        "reasoning": {"effort": null, "summary": null},
    })
}

/// What every form of one response shares.
struct Shell {
    id: String,
    created: u64,
    model: String,
    request: Value,
    store: bool,
    key: String,
    conversation: Vec<Message>,
}

impl Shell {
    fn object(&self, status: &str, output: Vec<Value>, usage: Value) -> Value {
        let mut v = json!({
            "id": self.id, "object": "response", "created_at": self.created, "status": status, "model": self.model,
            "output": output, "usage": usage, "error": null, "incomplete_details": null,
        });
        if let (Some(o), Some(r)) = (v.as_object_mut(), self.request.as_object()) {
            for (k, val) in r {
                o.insert(k.clone(), val.clone());
            }
        }
        v
    }

    fn message_id(&self) -> String {
        format!("msg_{}", &self.id[5..])
    }

    fn output(&self, piece: &AnswerPiece, calls: &[ToolCall]) -> Vec<Value> {
        let mut output = Vec::new();
        if !piece.reasoning.is_empty() {
            output.push(json!({"type": "reasoning", "id": format!("rs_{}", &self.id[5..]), "summary": [],
                               "content": [{"type": "reasoning_text", "text": piece.reasoning}]}));
        }
        if !piece.content.is_empty() || calls.is_empty() {
            output.push(message_item(&self.message_id(), &piece.content, "completed"));
        }
        output.extend(calls.iter().map(|c| call_item(c, &self.id, "completed")));
        output
    }

    fn finished(&self, out: &GenerationOutput, piece: &AnswerPiece, calls: &[ToolCall]) -> Value {
        let usage = json!({
            "input_tokens": out.prompt_tokens, "input_tokens_details": {"cached_tokens": out.cached_tokens},
            "output_tokens": out.tokens.len(), "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": out.prompt_tokens + out.tokens.len(),
        });
        let length = out.finish == FinishReason::Length && calls.is_empty();
        let mut v = self.object(if length { "incomplete" } else { "completed" }, self.output(piece, calls), usage);
        if length {
            v["incomplete_details"] = json!({"reason": "max_output_tokens"});
        }
        v
    }

    /// Keep the response and the conversation it ends (with its own answer) for later turns.
    fn save(
        &self,
        state: &AppState,
        response: &Value,
        piece: &AnswerPiece,
        calls: &[ToolCall],
    ) -> Result<(), ApiError> {
        if !self.store {
            return Ok(());
        }
        let mut conversation = self.conversation.clone();
        let mut answer = Message::new("assistant", &piece.content);
        answer.tool_calls = calls.to_vec();
        conversation.push(answer);
        state.responses.put(&self.id, &self.key, response, &conversation)
    }
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({"type": "message", "id": id, "status": status, "role": "assistant",
           "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]})
}

fn call_item(c: &ToolCall, response_id: &str, status: &str) -> Value {
    let suffix = &c.id[c.id.len().saturating_sub(10)..];
    json!({"type": "function_call", "id": format!("fc_{}{suffix}", &response_id[5..13.min(response_id.len())]),
           "call_id": c.id, "name": c.name, "arguments": c.arguments, "status": status})
}

/// The Responses event sequence: `response.created`, `response.in_progress`, then for the text
/// `response.output_item.added`, `response.content_part.added`, `response.output_text.delta`…,
/// `response.output_text.done`, `response.content_part.done`, `response.output_item.done`; for each
/// call `response.output_item.added`, `response.function_call_arguments.delta` and `.done`,
/// `response.output_item.done`; and `response.completed` with the whole response.
fn stream(state: AppState, mut generation: crate::run::Generation, answer: AnswerStream, shell: Shell) -> Response {
    let (tx, rx) = mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let mut seq = 0u64;
        let mut ev = |kind: &str, mut data: Value| {
            data["type"] = json!(kind);
            data["sequence_number"] = json!(seq);
            seq += 1;
            Event::default().event(kind).data(data.to_string())
        };
        let shell_now = shell.object("in_progress", Vec::new(), Value::Null);
        for e in [
            ev("response.created", json!({"response": shell_now})),
            ev("response.in_progress", json!({"response": shell_now})),
        ] {
            if tx.send(e).await.is_err() {
                return;
            }
        }
        let mut answer = answer;
        let message_id = shell.message_id();
        // The message item opens with its first text; its index among the output items.
        let mut text_index: Option<usize> = None;
        let mut text = String::new();
        let mut items = 0usize;
        let mut reasoning = String::new();
        let out = loop {
            let update = tokio::select! {
                _ = tx.closed() => return,
                u = generation.next() => u,
            };
            let piece = match update {
                Update::Token(t) => answer.push(t.token, &t.text),
                Update::Done(Ok(out)) if out.finish == FinishReason::Cancelled => return,
                Update::Done(Ok(out)) => break out,
                Update::Done(Err(e)) => {
                    let _ = tx.send(ev("error", json!({"code": e.code, "message": e.message, "param": e.param}))).await;
                    return;
                }
            };
            reasoning.push_str(&piece.reasoning);
            for e in text_events(&mut ev, &message_id, &piece.content, false, &mut text_index, &mut items, &mut text) {
                if tx.send(e).await.is_err() {
                    return;
                }
            }
        };
        let (rest, calls) = answer.finish(&shell.id[shell.id.len() - 8..]);
        reasoning.push_str(&rest.reasoning);
        // An answer with no text and no calls is still a message (an empty one).
        let empty = text_index.is_none() && calls.is_empty();
        let mut events =
            text_events(&mut ev, &message_id, &rest.content, empty, &mut text_index, &mut items, &mut text);
        if let Some(index) = text_index {
            let part = json!({"type": "output_text", "text": text, "annotations": []});
            events.push(ev(
                "response.output_text.done",
                json!({"item_id": message_id, "output_index": index, "content_index": 0, "text": text}),
            ));
            events.push(ev(
                "response.content_part.done",
                json!({"item_id": message_id, "output_index": index, "content_index": 0, "part": part}),
            ));
            events.push(ev(
                "response.output_item.done",
                json!({"output_index": index, "item": message_item(&message_id, &text, "completed")}),
            ));
        }
        for c in &calls {
            let index = items;
            items += 1;
            let mut item = call_item(c, &shell.id, "in_progress");
            let item_id = item["id"].clone();
            item["arguments"] = json!("");
            events.push(ev("response.output_item.added", json!({"output_index": index, "item": item})));
            events.push(ev(
                "response.function_call_arguments.delta",
                json!({"item_id": item_id, "output_index": index, "delta": c.arguments}),
            ));
            events.push(ev(
                "response.function_call_arguments.done",
                json!({"item_id": item_id, "output_index": index, "arguments": c.arguments}),
            ));
            events.push(ev(
                "response.output_item.done",
                json!({"output_index": index, "item": call_item(c, &shell.id, "completed")}),
            ));
        }
        let piece = AnswerPiece { reasoning, content: text };
        let response = shell.finished(&out, &piece, &calls);
        if let Err(e) = shell.save(&state, &response, &piece, &calls) {
            tracing::warn!("the streamed response was not stored: {}", e.message);
        }
        let kind = if response["status"] == "incomplete" { "response.incomplete" } else { "response.completed" };
        events.push(ev(kind, json!({"response": response})));
        for e in events {
            if tx.send(e).await.is_err() {
                return;
            }
        }
    });
    Sse::new(ReceiverStream::new(rx).map(Ok::<_, Infallible>)).into_response()
}

/// Events for text of the answer: the message item and its part open with the first text (or
/// `open_empty`), then each piece is a delta.
fn text_events(
    ev: &mut dyn FnMut(&str, Value) -> Event,
    message_id: &str,
    delta: &str,
    open_empty: bool,
    text_index: &mut Option<usize>,
    items: &mut usize,
    text: &mut String,
) -> Vec<Event> {
    let mut events = Vec::new();
    if delta.is_empty() && !open_empty {
        return events;
    }
    let index = match *text_index {
        Some(i) => i,
        None => {
            let i = *items;
            *items += 1;
            *text_index = Some(i);
            let mut item = message_item(message_id, "", "in_progress");
            item["content"] = json!([]);
            events.push(ev("response.output_item.added", json!({"output_index": i, "item": item})));
            events.push(ev(
                "response.content_part.added",
                json!({"item_id": message_id, "output_index": i, "content_index": 0,
                       "part": {"type": "output_text", "text": "", "annotations": []}}),
            ));
            i
        }
    };
    if !delta.is_empty() {
        text.push_str(delta);
        events.push(ev(
            "response.output_text.delta",
            json!({"item_id": message_id, "output_index": index, "content_index": 0, "delta": delta, "logprobs": []}),
        ));
    }
    events
}

pub async fn retrieve(State(state): State<AppState>, UrlPath(id): UrlPath<String>) -> Response {
    match state.responses.get(&id, &caller_key()) {
        Ok(Some((response, _))) => Json(response).into_response(),
        Ok(None) => not_found(&id).into_response(),
        Err(e) => e.into_response(),
    }
}

pub async fn delete(State(state): State<AppState>, UrlPath(id): UrlPath<String>) -> Response {
    match state.responses.delete(&id, &caller_key()) {
        Ok(true) => Json(json!({"id": id, "object": "response.deleted", "deleted": true})).into_response(),
        Ok(false) => not_found(&id).into_response(),
        Err(e) => e.into_response(),
    }
}
