//! OpenAI-compatible endpoints: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

use std::convert::Infallible;

use axum::Json;
use axum::extract::{Path, State};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use berth_engine::sampling::TokenLogprob;
use berth_engine::template::Message;
use berth_engine::{FinishReason, GenerationOutput, GenerationRequest};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::AppState;
use crate::error::ApiError;
use crate::models::{LoadedModel, Served, now};
use crate::request::{JsonBody, PromptSource, Sampling, request_id};
use crate::run::Update;
use berth_engine::ChatOptions;
use berth_engine::request::{Param, RequestDraft};
use berth_engine::tools::ToolPlan;

use crate::tool_calls::AnswerStream;

#[derive(Deserialize)]
pub struct ChatRequest {
    /// Optional (absent or `null`) where one model is loaded (as llama.cpp's server and vLLM accept).
    #[serde(default, deserialize_with = "crate::request::optional_model")]
    model: String,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    #[serde(default = "one")]
    n: u32,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<i64>,
    response_format: Option<Value>,
    #[serde(flatten)]
    peer_constraints: crate::request::PeerConstraints,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<Value>,
    /// Variables for the chat template (vLLM's and llama.cpp's extension); berth reads
    /// `enable_thinking`.
    chat_template_kwargs: Option<Value>,
    /// vLLM's switches for continuing the last assistant message (an assistant prefill) instead
    /// of answering in a new turn.
    add_generation_prompt: Option<bool>,
    continue_final_message: Option<bool>,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Deserialize)]
pub struct CompletionRequest {
    #[serde(default, deserialize_with = "crate::request::optional_model")]
    model: String,
    /// `null` (or absent): no prompt, the model starts a document of its own.
    #[serde(default)]
    prompt: Option<PromptField>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    #[serde(default = "one")]
    n: u32,
    #[serde(default)]
    echo: bool,
    logprobs: Option<i64>,
    suffix: Option<String>,
    response_format: Option<Value>,
    #[serde(flatten)]
    peer_constraints: crate::request::PeerConstraints,
    #[serde(flatten)]
    sampling: Sampling,
}

fn one() -> u32 {
    1
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// OpenAI's `prompt`: a string, strings, token ids, or lists of token ids.
#[derive(Deserialize)]
#[serde(untagged)]
enum PromptField {
    One(String),
    Many(Vec<String>),
    Ids(Vec<u32>),
    ManyIds(Vec<Vec<u32>>),
}

/// Prompts one request may hold (each is a generation of its own).
const MAX_PROMPTS: usize = 16;

#[derive(Deserialize)]
pub struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    #[serde(default)]
    tool_calls: Option<Vec<MessageToolCall>>,
    tool_call_id: Option<String>,
    name: Option<String>,
}

/// A call in an assistant message the client sends back.
#[derive(Deserialize)]
struct MessageToolCall {
    id: Option<String>,
    function: MessageFunction,
}

#[derive(Deserialize)]
struct MessageFunction {
    name: String,
    /// JSON text (OpenAI's shape); some clients send an object.
    #[serde(default)]
    arguments: Value,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

impl ChatMessage {
    fn to_message(&self, index: usize) -> Result<Message, ApiError> {
        let param = format!("messages[{index}].content");
        let content = match &self.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => text.push_str(t),
                        (kind, _) => {
                            return Err(ApiError::invalid(
                                &param,
                                format!("content parts of type `{kind}` are not supported; send text"),
                            ));
                        }
                    }
                }
                text
            }
        };
        let role = if self.role == "developer" { "system" } else { self.role.as_str() };
        if !berth_engine::template::ROLES.contains(&role) {
            return Err(ApiError::invalid(&format!("messages[{index}].role"), format!("unknown role `{}`", self.role)));
        }
        let mut message = Message::new(role, &content);
        for (i, c) in self.tool_calls.iter().flatten().enumerate() {
            let arguments = match &c.function.arguments {
                Value::String(s) => s.clone(),
                Value::Null => "{}".to_string(),
                other => other.to_string(),
            };
            let id = c.id.clone().unwrap_or_else(|| format!("call_{index}_{i}"));
            message.tool_calls.push(berth_engine::tools::ToolCall { id, name: c.function.name.clone(), arguments });
        }
        message.tool_call_id = self.tool_call_id.clone();
        message.name = self.name.clone();
        Ok(message)
    }
}

struct Plan {
    model: Served,
    /// The request's tools, with the model's format.
    tools: Option<ToolPlan>,
    /// One validated request per prompt.
    requests: Vec<GenerationRequest>,
    echo_texts: Vec<String>,
    n: u32,
    stream: bool,
    include_usage: bool,
    top_logprobs: Option<usize>,
}

/// OpenAI's bound on `n`.
const MAX_N: u32 = 128;

fn check_n(n: u32) -> Result<(), ApiError> {
    if !(1..=MAX_N).contains(&n) {
        return Err(ApiError::invalid("n", format!("n must be between 1 and {MAX_N}, got {n}")));
    }
    Ok(())
}

/// Answers a request may ask for whatever their length: the scheduler runs them beside others
/// as the cache allows, as it runs any request.
const N_ALWAYS: u32 = 8;

/// The `n` answers of each prompt run at once, sharing the prompt's cache blocks: more than
/// [`N_ALWAYS`] of them must fit the model's KV cache together, so that one request cannot hold the
/// cache against every other.
fn check_n_fits(model: &Served, requests: &[GenerationRequest], n: u32) -> Result<(), ApiError> {
    if n <= N_ALWAYS {
        return Ok(());
    }
    let limits = model.model.limits();
    // Every prompt's answers together (a completion may hold several prompts).
    let needed: usize = requests
        .iter()
        .map(|r| r.prompt.len() + n as usize * r.max_tokens.min(limits.context.saturating_sub(r.prompt.len())))
        .sum();
    if needed > limits.kv_tokens {
        return Err(ApiError::invalid(
            "n",
            format!(
                "{n} answers to each of {} prompt(s), with their prompts, need up to {needed} tokens of KV cache; \
                 this model has {}: lower n or max_tokens",
                requests.len(),
                limits.kv_tokens
            ),
        ));
    }
    Ok(())
}

/// What a chat request asks for, checked before any model is involved: the messages and the
/// parameters as a draft (validated against the model in [`LoadedModel::prepare`]), and
/// `top_logprobs`.
pub(crate) fn chat_parts(req: &ChatRequest) -> Result<(PromptSource, RequestDraft, ChatOptions), ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    // vLLM's pair: continuing the last (assistant) message, or opening a new turn; not both.
    let continue_final = req.continue_final_message.unwrap_or(false);
    match (req.add_generation_prompt, continue_final) {
        (Some(true), true) => {
            return Err(ApiError::invalid(
                "continue_final_message",
                "continue_final_message and add_generation_prompt cannot both be true: one continues the last message, the other opens a new turn",
            ));
        }
        (Some(false), false) => {
            return Err(ApiError::invalid(
                "add_generation_prompt",
                "add_generation_prompt: false needs continue_final_message: true (berth answers in a new turn or continues the last message)",
            ));
        }
        _ => {}
    }
    check_n(req.n)?;
    let constraint = crate::request::constraint(&req.response_format, &req.peer_constraints)?;
    let tools = crate::tool_calls::openai_tools(&req.tools, &req.tool_choice, &req.parallel_tool_calls)?;
    if let Some((param, _)) = &constraint
        && tools.as_ref().is_some_and(|t| t.choice != berth_engine::tools::ToolChoice::None)
    {
        return Err(ApiError::invalid(
            param,
            format!("{param} and tools cannot constrain one answer together; send one of them (or tool_choice `none`)"),
        ));
    }
    let top = match (req.logprobs, req.top_logprobs) {
        (_, Some(t)) if !(0..=20).contains(&t) => {
            return Err(ApiError::invalid("top_logprobs", format!("top_logprobs must be between 0 and 20, got {t}")));
        }
        (true, t) => Some(t.unwrap_or(0) as usize),
        (false, Some(_)) => return Err(ApiError::invalid("top_logprobs", "top_logprobs needs logprobs: true")),
        (false, None) => None,
    };
    let messages: Vec<Message> =
        req.messages.iter().enumerate().map(|(i, m)| m.to_message(i)).collect::<Result<_, _>>()?;
    let draft = RequestDraft { constraint, ..req.sampling.draft(top)? };
    let enable_thinking = match req.chat_template_kwargs.as_ref().and_then(|k| k.get("enable_thinking")) {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::invalid(
                "chat_template_kwargs.enable_thinking",
                "chat_template_kwargs.enable_thinking must be true or false",
            ));
        }
    };
    Ok((PromptSource::Chat(messages), draft, ChatOptions { tools, enable_thinking, continue_final }))
}

/// The same for a completion request: its prompts (1 to 16) and parameters.
/// `max_tokens` of a text completion that gives none, as OpenAI's API documents it.
const COMPLETION_MAX_TOKENS: usize = 16;

pub(crate) fn completion_parts(req: &CompletionRequest) -> Result<(PromptSource, RequestDraft), ApiError> {
    check_n(req.n)?;
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "suffix (fill-in-the-middle) is not supported"));
    }
    let top = match req.logprobs {
        Some(t) if !(0..=5).contains(&t) => {
            return Err(ApiError::invalid("logprobs", format!("logprobs must be between 0 and 5, got {t}")));
        }
        t => t.map(|t| t as usize),
    };
    let many = || ApiError::invalid("prompt", format!("prompt lists must hold 1 to {MAX_PROMPTS} prompts"));
    let source = match &req.prompt {
        None => PromptSource::Texts(vec![String::new()]),
        Some(PromptField::One(p)) => PromptSource::Texts(vec![p.clone()]),
        Some(PromptField::Many(ps)) if (1..=MAX_PROMPTS).contains(&ps.len()) => PromptSource::Texts(ps.clone()),
        Some(PromptField::Ids(ids)) => PromptSource::Ids(vec![ids.clone()]),
        Some(PromptField::ManyIds(ids)) if (1..=MAX_PROMPTS).contains(&ids.len()) => PromptSource::Ids(ids.clone()),
        Some(PromptField::Many(_) | PromptField::ManyIds(_)) => return Err(many()),
    };
    let prompts = match &source {
        PromptSource::Texts(t) => t.len(),
        PromptSource::Ids(i) => i.len(),
        _ => 1,
    };
    if req.stream && prompts > 1 {
        return Err(ApiError::invalid("prompt", "streaming takes a single prompt"));
    }
    let constraint = crate::request::constraint(&req.response_format, &req.peer_constraints)?;
    let mut draft = RequestDraft { constraint, ..req.sampling.draft(top)? };
    // OpenAI's default for text completions (chat has none: it runs until the model stops).
    draft.max_tokens.get_or_insert(Param::new("max_tokens", COMPLETION_MAX_TOKENS as f64));
    Ok((source, draft))
}

pub async fn chat_completions(State(state): State<AppState>, JsonBody(req): JsonBody<ChatRequest>) -> Response {
    let plan = async {
        let (source, draft, chat) = chat_parts(&req)?;
        let top_logprobs = draft.logprobs;
        crate::deployments::served::set_user(req.sampling.user.as_ref());
        let model = state.models.get(&req.model).await?;
        let tools = chat.tools.clone();
        let requests = model.prepare(source, draft, chat).await?;
        check_n_fits(&model, &requests, req.n)?;
        Ok::<_, ApiError>(Plan {
            model,
            tools,
            requests,
            echo_texts: vec![String::new()],
            n: req.n,
            stream: req.stream,
            include_usage: req.stream_options.is_some_and(|o| o.include_usage),
            top_logprobs,
        })
    }
    .await;
    match plan {
        Ok(plan) => respond(plan, Kind::Chat).await,
        Err(e) => e.into_response(),
    }
}

pub async fn completions(State(state): State<AppState>, JsonBody(req): JsonBody<CompletionRequest>) -> Response {
    let plan = async {
        let (source, draft) = completion_parts(&req)?;
        let top_logprobs = draft.logprobs;
        crate::deployments::served::set_user(req.sampling.user.as_ref());
        let model = state.models.get(&req.model).await?;
        let echo_texts = match (&source, req.echo) {
            (PromptSource::Texts(texts), true) => texts.clone(),
            (PromptSource::Texts(texts), false) => vec![String::new(); texts.len()],
            // Ids echo as the text they stand for (ids outside the vocabulary are refused below).
            (PromptSource::Ids(ids), true) => ids.iter().map(|i| model.engine.tokenizer().decode(i)).collect(),
            (PromptSource::Ids(ids), false) => vec![String::new(); ids.len()],
            (PromptSource::Chat(_) | PromptSource::After(..), _) => vec![String::new()],
        };
        let requests = model.prepare(source, draft, ChatOptions::default()).await?;
        check_n_fits(&model, &requests, req.n)?;
        Ok::<_, ApiError>(Plan {
            model,
            tools: None,
            requests,
            echo_texts,
            n: req.n,
            stream: req.stream,
            include_usage: req.stream_options.is_some_and(|o| o.include_usage),
            top_logprobs,
        })
    }
    .await;
    match plan {
        Ok(plan) => respond(plan, Kind::Completion).await,
        Err(e) => e.into_response(),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Length => "length",
    }
}

fn token_text(model: &LoadedModel, id: u32) -> String {
    String::from_utf8_lossy(&model.engine.tokenizer().token_bytes(id)).into_owned()
}

fn chat_logprobs(model: &LoadedModel, lps: &[TokenLogprob]) -> Value {
    let entry = |id: u32, lp: f32| {
        let bytes = model.engine.tokenizer().token_bytes(id);
        json!({"token": String::from_utf8_lossy(&bytes), "logprob": lp, "bytes": bytes})
    };
    let content: Vec<Value> = lps
        .iter()
        .map(|lp| {
            let mut e = entry(lp.token, lp.logprob);
            e["top_logprobs"] = Value::Array(lp.top.iter().map(|&(id, v)| entry(id, v)).collect());
            e
        })
        .collect();
    json!({"content": content, "refusal": null})
}

fn completion_logprobs(model: &LoadedModel, lps: &[TokenLogprob], offset: usize) -> Value {
    let mut at = offset;
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top = Vec::new();
    let mut offsets = Vec::new();
    for lp in lps {
        let text = token_text(model, lp.token);
        offsets.push(at);
        at += text.len();
        tokens.push(text);
        token_logprobs.push(lp.logprob);
        let mut m = serde_json::Map::new();
        for &(id, v) in &lp.top {
            m.insert(token_text(model, id), json!(v));
        }
        top.push(Value::Object(m));
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets})
}

/// Token counts; `cached` prompt tokens came from the prefix cache (OpenAI's
/// `prompt_tokens_details.cached_tokens`).
fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

async fn respond(plan: Plan, kind: Kind) -> Response {
    if plan.stream {
        return stream(plan, kind);
    }
    let id = request_id(if kind == Kind::Chat { "chatcmpl" } else { "cmpl" });
    let mut choices = Vec::new();
    let (mut prompt_tokens, mut completion_tokens, mut cached_tokens) = (0, 0, 0);
    // Every choice of every prompt is queued at once, so they run as one batch.
    let mut reqs = Vec::new();
    for request in &plan.requests {
        for i in 0..plan.n {
            let mut req = request.clone();
            req.sampling.seed = req.sampling.seed.map(|s| s.wrapping_add(i as u64));
            reqs.push((req, i == 0));
        }
    }
    let mut generations = match crate::run::start_all(&plan.model, reqs) {
        Ok(g) => g.into_iter(),
        Err(e) => return e.into_response(),
    };
    let mut index = 0;
    for p in 0..plan.requests.len() {
        for i in 0..plan.n {
            let Some(generation) = generations.next() else { break };
            let out: GenerationOutput = match generation.finish().await {
                Ok(o) => o,
                Err(e) => return e.into_response(),
            };
            if i == 0 {
                prompt_tokens += out.prompt_tokens;
                cached_tokens += out.cached_tokens;
            }
            completion_tokens += out.tokens.len();
            let choice = match kind {
                Kind::Chat => {
                    let mut message = json!({"role": "assistant", "content": null, "refusal": null});
                    let mut finish = finish_reason(out.finish);
                    // The answer taken apart: thought, text and calls (a plain one is its text).
                    let answer = AnswerStream::new(&plan.model, &plan.requests[p].prompt, plan.tools.clone());
                    let seed = format!("{}{index}", &id[id.len() - 8..]);
                    let (piece, calls) = answer.whole(&out, plan.model.engine.tokenizer(), &seed);
                    message["content"] = json!(piece.content);
                    if !piece.reasoning.is_empty() {
                        message["reasoning_content"] = json!(piece.reasoning);
                    }
                    if !calls.is_empty() {
                        if piece.content.is_empty() {
                            message["content"] = Value::Null;
                        }
                        message["tool_calls"] = crate::tool_calls::openai_calls(&calls);
                        finish = "tool_calls";
                    }
                    json!({
                        "index": index,
                        "message": message,
                        "logprobs": plan.top_logprobs.map(|_| chat_logprobs(&plan.model, &out.logprobs)),
                        "finish_reason": finish,
                    })
                }
                Kind::Completion => {
                    let echo = &plan.echo_texts[p];
                    json!({
                        "index": index,
                        "text": format!("{echo}{}", out.text),
                        "logprobs": plan.top_logprobs.map(|_| completion_logprobs(&plan.model, &out.logprobs, echo.len())),
                        "finish_reason": finish_reason(out.finish),
                    })
                }
            };
            choices.push(choice);
            index += 1;
        }
    }
    let object = if kind == Kind::Chat { "chat.completion" } else { "text_completion" };
    Json(json!({
        "id": id,
        "object": object,
        "created": now(),
        "model": plan.model.name,
        "system_fingerprint": "berth",
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
    }))
    .into_response()
}

/// Stream the choices one after another (all of them queued at once, so they run as one batch).
fn stream(plan: Plan, kind: Kind) -> Response {
    let reqs = (0..plan.n).map(|i| {
        let mut req = plan.requests[0].clone();
        req.sampling.seed = req.sampling.seed.map(|s| s.wrapping_add(i as u64));
        (req, i == 0)
    });
    let generations = match crate::run::start_all(&plan.model, reqs.collect()) {
        Ok(g) => g,
        Err(e) => return e.into_response(),
    };
    let (tx, rx) = mpsc::channel::<Event>(64);
    let id = request_id(if kind == Kind::Chat { "chatcmpl" } else { "cmpl" });
    let stream_id = id.clone();
    let object = if kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
    let created = now();
    let name = plan.model.name.clone();
    let chunk = move |choices: Value, usage: Option<Value>| -> Event {
        let mut v = json!({"id": id, "object": object, "created": created, "model": name, "system_fingerprint": "berth", "choices": choices});
        if let Some(u) = usage {
            v["usage"] = u;
        }
        Event::default().data(v.to_string())
    };
    tokio::spawn(async move {
        let (mut prompt_tokens, mut completion_tokens, mut cached_tokens) = (0, 0, 0);
        let with_lp = plan.top_logprobs.is_some();
        for (index, mut generation) in generations.into_iter().enumerate() {
            // A chat answer is taken apart as it streams (completions are text as it comes).
            let mut answer = (kind == Kind::Chat)
                .then(|| AnswerStream::new(&plan.model, &plan.requests[0].prompt, plan.tools.clone()));
            if kind == Kind::Chat {
                // The role, and no content yet: `null`, as OpenAI's tool-call streams and
                // llama.cpp's server begin, so no client sees an empty content delta.
                let first = json!([{"index": index, "delta": {"role": "assistant", "content": null}, "logprobs": null, "finish_reason": null}]);
                if tx.send(chunk(first, None)).await.is_err() {
                    return;
                }
            } else if !plan.echo_texts[0].is_empty() {
                let echo =
                    json!([{"index": index, "text": plan.echo_texts[0], "logprobs": null, "finish_reason": null}]);
                if tx.send(chunk(echo, None)).await.is_err() {
                    return;
                }
            }
            let out = loop {
                let update = tokio::select! {
                    // The client hung up: dropping the generations cancels them.
                    _ = tx.closed() => return,
                    u = generation.next() => u,
                };
                let ev = match update {
                    Update::Token(ev) => ev,
                    Update::Done(Ok(out)) => break out,
                    Update::Done(Err(e)) => {
                        let _ = tx.send(Event::default().data(e.body().to_string())).await;
                        return;
                    }
                };
                let (ev, reasoning) = match answer.as_mut() {
                    Some(a) => {
                        let piece = a.push(ev.token, &ev.text);
                        (berth_engine::TokenEvent { text: piece.content, ..ev }, piece.reasoning)
                    }
                    None => (ev, String::new()),
                };
                if !reasoning.is_empty() {
                    let choice = json!([{"index": index, "delta": {"reasoning_content": reasoning}, "logprobs": null, "finish_reason": null}]);
                    if tx.send(chunk(choice, None)).await.is_err() {
                        return;
                    }
                }
                if ev.text.is_empty() && !with_lp {
                    continue;
                }
                let lp = match (&ev.logprob, with_lp) {
                    (Some(lp), true) => match kind {
                        Kind::Chat => chat_logprobs(&plan.model, std::slice::from_ref(lp)),
                        Kind::Completion => completion_logprobs(&plan.model, std::slice::from_ref(lp), 0),
                    },
                    _ => Value::Null,
                };
                let choice = match kind {
                    Kind::Chat => {
                        json!([{"index": index, "delta": {"content": ev.text}, "logprobs": lp, "finish_reason": null}])
                    }
                    Kind::Completion => {
                        json!([{"index": index, "text": ev.text, "logprobs": lp, "finish_reason": null}])
                    }
                };
                if tx.send(chunk(choice, None)).await.is_err() {
                    return;
                }
            };
            if index == 0 {
                prompt_tokens = out.prompt_tokens;
                cached_tokens = out.cached_tokens;
            }
            completion_tokens += out.tokens.len();
            if out.finish == FinishReason::Cancelled {
                return;
            }
            let mut finish = finish_reason(out.finish);
            if let Some(mut a) = answer.take() {
                let (rest, calls) = a.finish(&format!("{}{index}", &stream_id[stream_id.len() - 8..]));
                let mut deltas = Vec::new();
                if !rest.reasoning.is_empty() {
                    deltas.push(json!({"reasoning_content": rest.reasoning}));
                }
                if !rest.content.is_empty() {
                    deltas.push(json!({"content": rest.content}));
                }
                // OpenAI's chunks for a call: its id, type and name with empty arguments, then the
                // arguments (a fragment each; berth sends them whole once the call has parsed).
                for (i, c) in calls.iter().enumerate() {
                    deltas.push(json!({"tool_calls": [{"index": i, "id": c.id, "type": "function",
                                                        "function": {"name": c.name, "arguments": ""}}]}));
                    deltas.push(json!({"tool_calls": [{"index": i, "function": {"arguments": c.arguments}}]}));
                }
                if !calls.is_empty() {
                    finish = "tool_calls";
                }
                for delta in deltas {
                    let choice = json!([{"index": index, "delta": delta, "logprobs": null, "finish_reason": null}]);
                    if tx.send(chunk(choice, None)).await.is_err() {
                        return;
                    }
                }
            }
            let last = match kind {
                Kind::Chat => {
                    json!([{"index": index, "delta": {}, "logprobs": null, "finish_reason": finish}])
                }
                Kind::Completion => {
                    json!([{"index": index, "text": "", "logprobs": null, "finish_reason": finish}])
                }
            };
            if tx.send(chunk(last, None)).await.is_err() {
                return;
            }
        }
        if plan.include_usage {
            let _ = tx.send(chunk(json!([]), Some(usage(prompt_tokens, completion_tokens, cached_tokens)))).await;
        }
        let _ = tx.send(Event::default().data("[DONE]")).await;
    });
    Sse::new(ReceiverStream::new(rx).map(Ok::<_, Infallible>)).into_response()
}

pub async fn list_models(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let models = state.models.list()?;
    let data: Vec<Value> = models
        .iter()
        .map(|m| {
            let mut v = model_object(m);
            v["capabilities"] = json!(state.models.capabilities(m));
            v
        })
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

fn model_object(m: &berth_store::ModelSummary) -> Value {
    let created = m.created.as_deref().and_then(crate::request::parse_rfc3339).unwrap_or(0);
    json!({"id": m.reference, "object": "model", "created": created, "owned_by": "berth"})
}

pub async fn get_model(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let models = state.models.list()?;
    let wanted = berth_store::Reference::parse(&id).map(|r| r.familiar()).unwrap_or(id.clone());
    let found = models.iter().find(|m| m.reference == wanted);
    match found {
        Some(m) => {
            let mut v = model_object(m);
            v["capabilities"] = json!(state.models.capabilities(m));
            Ok(Json(v))
        }
        None => Err(ApiError::model_not_found(&id, &models.iter().map(|m| m.reference.clone()).collect::<Vec<_>>())),
    }
}
