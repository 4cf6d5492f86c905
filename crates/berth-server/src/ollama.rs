//! Ollama-compatible endpoints: `/api/chat`, `/api/generate` (NDJSON streaming), `/api/tags`,
//! `/api/show`, `/api/ps`, `/api/version`.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use berth_engine::constraint::ConstraintSpec;
use berth_engine::template::Message;
use berth_engine::{FinishReason, GenerationOutput, GenerationRequest};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::AppState;
use crate::error::ApiError;
use crate::models::{KeepAlive, Loaded, Served};
use crate::request::{JsonBody, PromptSource};
use crate::run::Update;
use berth_engine::ChatOptions;
use berth_engine::request::{Param, RequestDraft};
use berth_engine::tools::ToolPlan;
use std::sync::atomic::Ordering;

#[derive(Deserialize, Default)]
struct Options {
    temperature: Option<f64>,
    top_k: Option<i64>,
    top_p: Option<f64>,
    min_p: Option<f64>,
    num_predict: Option<i64>,
    seed: Option<i64>,
    stop: Option<Vec<String>>,
    repeat_penalty: Option<f64>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
}

impl Options {
    /// The request's parameters, with Ollama's defaults where it has its own (temperature 0.8,
    /// top_k 40, top_p 0.9, repeat_penalty 1.1) and its names in errors.
    fn draft(&self) -> RequestDraft {
        let p = |name, v: Option<f64>, default: f64| Some(Param::new(name, v.unwrap_or(default)));
        let opt = |name, v: Option<f64>| v.map(|x| Param::new(name, x));
        RequestDraft {
            // Ollama: a negative num_predict (-1, -2) means "until the context is full".
            max_tokens: self.num_predict.filter(|&n| n >= 0).map(|n| Param::new("num_predict", n as f64)),
            temperature: p("temperature", self.temperature, 0.8),
            top_k: p("top_k", self.top_k.map(|k| k as f64), 40.0),
            top_p: p("top_p", self.top_p, 0.9),
            min_p: opt("min_p", self.min_p),
            repeat_penalty: p("repeat_penalty", self.repeat_penalty, 1.1),
            presence_penalty: opt("presence_penalty", self.presence_penalty),
            frequency_penalty: opt("frequency_penalty", self.frequency_penalty),
            seed: opt("seed", self.seed.map(|s| s as f64)),
            stop: self.stop.clone().unwrap_or_default(),
            ..RequestDraft::default()
        }
    }
}

#[derive(Deserialize)]
pub struct ChatRequest {
    model: String,
    #[serde(default)]
    messages: Vec<OllamaMessage>,
    stream: Option<bool>,
    format: Option<Value>,
    #[serde(default)]
    options: Options,
    keep_alive: Option<Value>,
    /// Functions the model may call (OpenAI's shape, as Ollama takes them).
    tools: Option<Value>,
    /// `false`: a reasoning model answers without thinking first.
    think: Option<Value>,
}

#[derive(Deserialize)]
struct OllamaMessage {
    role: String,
    #[serde(default)]
    content: String,
    #[serde(default)]
    images: Option<Vec<String>>,
    /// An assistant's calls, sent back with the conversation.
    #[serde(default)]
    tool_calls: Option<Vec<OllamaToolCall>>,
    /// On a `tool` message: which tool answered.
    tool_name: Option<String>,
}

#[derive(Deserialize)]
struct OllamaToolCall {
    function: OllamaFunction,
}

#[derive(Deserialize)]
struct OllamaFunction {
    name: String,
    #[serde(default)]
    arguments: Value,
}

#[derive(Deserialize)]
pub struct GenerateRequest {
    model: String,
    #[serde(default)]
    prompt: String,
    system: Option<String>,
    #[serde(default)]
    raw: bool,
    stream: Option<bool>,
    format: Option<Value>,
    #[serde(default)]
    options: Options,
    keep_alive: Option<Value>,
    #[serde(default)]
    images: Option<Vec<String>>,
    think: Option<Value>,
    /// The `context` of an earlier answer (its prompt and answer as token ids): this prompt continues it.
    #[serde(default)]
    context: Option<Vec<u32>>,
}

/// Ollama's `think`: a boolean (or an effort level, which means yes).
fn think(v: &Option<Value>) -> Result<bool, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(true),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) if ["low", "medium", "high"].contains(&s.as_str()) => Ok(true),
        Some(_) => Err(ApiError::invalid("think", "think must be true, false, or low / medium / high")),
    }
}

/// The longest `keep_alive` a request may ask for (a negative value, for ever, is the other way).
const MAX_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);

/// The request's `keep_alive`, if it has one. How long a model stays in memory is everyone's
/// business: with API keys in use, only an admin key may set it.
fn keep_alive(value: &Option<Value>) -> Result<Option<KeepAlive>, ApiError> {
    let Some(value) = value else { return Ok(None) };
    let keep = KeepAlive::parse(value).map_err(|m| ApiError::invalid("keep_alive", m))?;
    if let KeepAlive::For(d) = keep
        && d > MAX_KEEP_ALIVE
    {
        return Err(ApiError::invalid(
            "keep_alive",
            format!("keep_alive may be at most 30 days (720h), or negative for ever; got {value}"),
        ));
    }
    if let Some(key) = crate::auth::caller().and_then(|c| c.key)
        && !key.allows(crate::accounts::Scope::Admin)
    {
        let message = format!(
            "the key `{}` lacks the `admin` scope that keep_alive needs (it sets how long the model stays loaded for everyone); leave keep_alive out",
            key.name
        );
        return Err(ApiError::forbidden_scope(message));
    }
    Ok(Some(keep))
}

/// A request with no prompt and `keep_alive: 0` unloads the model (Ollama's way), without loading
/// it; the answer (or the error in `keep_alive`) is returned.
async fn unload_if_asked(state: &AppState, model: &str, keep: &Option<Value>, chat: bool) -> Option<Response> {
    // keep_alive() refuses keys without the admin scope: unloading is management.
    match keep_alive(keep) {
        Err(e) => return Some(e.into_response()),
        Ok(k) if k != Some(KeepAlive::For(std::time::Duration::ZERO)) => return None,
        Ok(_) => {}
    }
    let reference = match berth_store::Reference::parse(model) {
        Ok(r) => r,
        Err(_) => return Some(ApiError::model_not_found(model, &state.models.available()).into_response()),
    };
    state.models.unload(&reference).await;
    let mut v =
        json!({"model": reference.familiar(), "created_at": created_at(), "done": true, "done_reason": "unload"});
    v[if chat { "message" } else { "response" }] =
        if chat { json!({"role": "assistant", "content": ""}) } else { json!("") };
    Some(Json(v).into_response())
}

/// Ollama's `format`: `"json"` for any JSON object, or a JSON schema.
fn format(format: &Option<Value>) -> Result<Option<(&'static str, ConstraintSpec)>, ApiError> {
    let spec = match format {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) if s.is_empty() => return Ok(None),
        Some(Value::String(s)) if s == "json" => ConstraintSpec::JsonObject,
        Some(Value::Object(_)) => ConstraintSpec::JsonSchema(format.clone().unwrap_or_default()),
        Some(_) => return Err(ApiError::invalid("format", "format must be \"json\" or a JSON schema object")),
    };
    Ok(Some(("format", spec)))
}

fn created_at() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// What an Ollama chat asks for, checked before any model is involved; `None` for no messages
/// (Ollama's way to load a model).
pub(crate) fn chat_parts(req: &ChatRequest) -> Result<Option<(PromptSource, RequestDraft)>, ApiError> {
    let constraint = format(&req.format)?;
    if req.messages.iter().any(|m| m.images.as_ref().is_some_and(|i| !i.is_empty())) {
        return Err(ApiError::invalid("messages", "images are not supported by this model"));
    }
    for (i, m) in req.messages.iter().enumerate() {
        if !berth_engine::template::ROLES.contains(&m.role.as_str()) {
            return Err(ApiError::invalid(
                &format!("messages[{i}].role"),
                format!("unknown role {:?}: a message's role is system, user, assistant or tool", m.role),
            ));
        }
    }
    if req.messages.is_empty() {
        return Ok(None);
    }
    let messages: Vec<Message> = req
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let mut message = Message::new(&m.role, &m.content);
            for (j, c) in m.tool_calls.iter().flatten().enumerate() {
                let arguments = match &c.function.arguments {
                    Value::String(s) => s.clone(),
                    Value::Null => "{}".into(),
                    other => other.to_string(),
                };
                let id = format!("call_{i}_{j}");
                message.tool_calls.push(berth_engine::tools::ToolCall { id, name: c.function.name.clone(), arguments });
            }
            message.name = m.tool_name.clone();
            message
        })
        .collect();
    Ok(Some((PromptSource::Chat(messages), RequestDraft { constraint, ..req.options.draft() })))
}

/// The same for `/api/generate`; `None` for an empty prompt.
pub(crate) fn generate_parts(req: &GenerateRequest) -> Result<Option<(PromptSource, RequestDraft)>, ApiError> {
    let constraint = format(&req.format)?;
    if req.images.as_ref().is_some_and(|i| !i.is_empty()) {
        return Err(ApiError::invalid("images", "images are not supported by this model"));
    }
    if req.prompt.is_empty() {
        return Ok(None);
    }
    let source = if req.raw {
        PromptSource::Texts(vec![req.prompt.clone()])
    } else {
        let mut messages = Vec::new();
        if let Some(s) = &req.system {
            messages.push(Message::new("system", s));
        }
        messages.push(Message::new("user", &req.prompt));
        PromptSource::Chat(messages)
    };
    let source = match &req.context {
        Some(context) if !context.is_empty() => PromptSource::After(context.clone(), Box::new(source)),
        _ => source,
    };
    Ok(Some((source, RequestDraft { constraint, ..req.options.draft() })))
}

pub async fn chat(State(state): State<AppState>, JsonBody(req): JsonBody<ChatRequest>) -> Response {
    if req.messages.is_empty()
        && let Some(r) = unload_if_asked(&state, &req.model, &req.keep_alive, true).await
    {
        return r;
    }
    let prepared = async {
        let parts = chat_parts(&req)?;
        let tools = crate::tool_calls::openai_tools(&req.tools, &None, &None)?;
        let model = state.models.get_keeping(&req.model, keep_alive(&req.keep_alive)?).await?;
        let Some((source, draft)) = parts else {
            // Ollama loads the model and answers with an empty message.
            return Ok((model, None, None));
        };
        if draft.constraint.is_some() && tools.is_some() {
            return Err(ApiError::invalid("format", "format and tools cannot constrain one answer together"));
        }
        let chat = ChatOptions { tools: tools.clone(), enable_thinking: think(&req.think)?, continue_final: false };
        let request = model.prepare(source, draft, chat).await?.pop();
        Ok::<_, ApiError>((model, request, tools))
    }
    .await;
    match prepared {
        Ok((model, request, tools)) => answer(model, request, req.stream.unwrap_or(true), true, tools, None).await,
        Err(e) => e.into_response(),
    }
}

pub async fn generate(State(state): State<AppState>, JsonBody(req): JsonBody<GenerateRequest>) -> Response {
    if req.prompt.is_empty()
        && let Some(r) = unload_if_asked(&state, &req.model, &req.keep_alive, false).await
    {
        return r;
    }
    let prepared = async {
        let parts = generate_parts(&req)?;
        let model = state.models.get_keeping(&req.model, keep_alive(&req.keep_alive)?).await?;
        let Some((source, draft)) = parts else { return Ok((model, None)) };
        let chat = ChatOptions { enable_thinking: think(&req.think)?, ..ChatOptions::default() };
        let request = model.prepare(source, draft, chat).await?.pop();
        Ok::<_, ApiError>((model, request))
    }
    .await;
    match prepared {
        Ok((model, request)) => {
            // Ollama hands back the conversation as token ids (`context`) unless the prompt was raw.
            let context = (!req.raw).then(|| request.as_ref().map(|r| r.prompt.clone())).flatten();
            answer(model, request, req.stream.unwrap_or(true), false, None, context).await
        }
        Err(e) => e.into_response(),
    }
}

fn body(model: &Served, chat: bool, text: &str, done: Option<(&GenerationOutput, f64)>) -> Value {
    let mut v = json!({"model": model.name, "created_at": created_at()});
    if chat {
        v["message"] = json!({"role": "assistant", "content": text});
    } else {
        v["response"] = json!(text);
    }
    v["done"] = json!(done.is_some());
    if let Some((out, total)) = done {
        let ns = |d: std::time::Duration| d.as_nanos() as u64;
        v["done_reason"] = json!(match out.finish {
            FinishReason::Length => "length",
            _ => "stop",
        });
        v["total_duration"] = json!((total * 1e9) as u64);
        v["load_duration"] = json!(0);
        v["prompt_eval_count"] = json!(out.prompt_tokens);
        v["prompt_eval_duration"] = json!(ns(out.prefill_time));
        v["eval_count"] = json!(out.tokens.len());
        v["eval_duration"] = json!(ns(out.decode_time));
    }
    v
}

/// Calls in Ollama's shape: arguments as an object.
fn ollama_calls(calls: &[berth_engine::tools::ToolCall]) -> Value {
    calls
        .iter()
        .map(|c| {
            let args: Value = serde_json::from_str(&c.arguments).unwrap_or_else(|_| json!({}));
            json!({"function": {"name": c.name, "arguments": args}})
        })
        .collect()
}

/// A reasoning model's thought (`thinking`) and the calls (on the message), in Ollama's places.
fn with_extras(v: &mut Value, chat: bool, reasoning: &str, calls: &[berth_engine::tools::ToolCall]) {
    if !reasoning.is_empty() {
        if chat {
            v["message"]["thinking"] = json!(reasoning);
        } else {
            v["thinking"] = json!(reasoning);
        }
    }
    if !calls.is_empty() && chat {
        v["message"]["tool_calls"] = ollama_calls(calls);
    }
}

async fn answer(
    model: Served,
    request: Option<GenerationRequest>,
    stream: bool,
    chat: bool,
    tools: Option<ToolPlan>,
    context: Option<Vec<u32>>,
) -> Response {
    // The prompt's ids and the answer's: what a later request sends back as its `context`.
    let with_context = move |v: &mut Value, out: &GenerationOutput| {
        if let Some(prompt) = &context {
            v["context"] = json!(prompt.iter().chain(&out.tokens).collect::<Vec<_>>());
        }
    };
    let started = Instant::now();
    let Some(request) = request else {
        let mut v = body(&model, chat, "", None);
        v["done"] = json!(true);
        v["done_reason"] = json!("load");
        return Json(v).into_response();
    };
    let mut answer = crate::tool_calls::AnswerStream::new(&model, &request.prompt, tools);
    let mut generation = match crate::run::start(&model, request) {
        Ok(g) => g,
        Err(e) => return e.into_response(),
    };
    if !stream {
        return match generation.finish().await {
            Ok(out) => {
                let elapsed = started.elapsed().as_secs_f64();
                let (piece, calls) = answer.whole(&out, model.engine.tokenizer(), "ollama");
                let mut v = body(&model, chat, &piece.content, Some((&out, elapsed)));
                with_extras(&mut v, chat, &piece.reasoning, &calls);
                with_context(&mut v, &out);
                Json(v).into_response()
            }
            Err(e) => e.into_response(),
        };
    }
    let (tx, rx) = mpsc::channel::<String>(64);
    let m = model.clone();
    tokio::spawn(async move {
        let last = loop {
            let update = tokio::select! {
                // The client hung up: dropping the generation cancels it.
                _ = tx.closed() => return,
                u = generation.next() => u,
            };
            match update {
                Update::Token(ev) => {
                    let piece = answer.push(ev.token, &ev.text);
                    if piece.content.is_empty() && piece.reasoning.is_empty() {
                        continue;
                    }
                    let mut v = body(&m, chat, &piece.content, None);
                    with_extras(&mut v, chat, &piece.reasoning, &[]);
                    if tx.send(format!("{v}\n")).await.is_err() {
                        return;
                    }
                }
                Update::Done(Ok(out)) if out.finish == FinishReason::Cancelled => return,
                Update::Done(Ok(out)) => {
                    // Ollama sends the calls in a message of their own before the last one.
                    let (rest, calls) = answer.finish("ollama");
                    let mut v = body(&m, chat, &rest.content, None);
                    with_extras(&mut v, chat, &rest.reasoning, &calls);
                    let something = !rest.content.is_empty() || !rest.reasoning.is_empty() || !calls.is_empty();
                    if something && tx.send(format!("{v}\n")).await.is_err() {
                        return;
                    }
                    let mut v = body(&m, chat, "", Some((&out, started.elapsed().as_secs_f64())));
                    with_context(&mut v, &out);
                    break v;
                }
                Update::Done(Err(e)) => break json!({"error": e.message}),
            }
        };
        let _ = tx.send(format!("{last}\n")).await;
    });
    let stream = ReceiverStream::new(rx).map(Ok::<_, std::convert::Infallible>);
    ([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(stream)).into_response()
}

fn details(m: &berth_store::ModelSummary) -> Value {
    json!({
        "parent_model": "",
        "format": m.format,
        "family": m.architecture,
        "families": [m.architecture],
        "parameter_size": m.parameters,
        "quantization_level": m.quantization,
    })
}

pub async fn tags(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let models: Vec<Value> = state
        .models
        .list()?
        .iter()
        .map(|m| {
            json!({
                "name": m.reference,
                "model": m.reference,
                "modified_at": m.created.clone().unwrap_or_default(),
                "size": m.size,
                "digest": m.digest.hex(),
                "details": details(m),
            })
        })
        .collect();
    Ok(Json(json!({"models": models})))
}

#[derive(Deserialize)]
pub struct ShowRequest {
    #[serde(alias = "name")]
    model: String,
}

pub async fn show(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<ShowRequest>,
) -> Result<Json<Value>, ApiError> {
    let d = state.models.details(&req.model)?;
    let c = &d.config.config;
    // Only text models have a template; embedding models have none to show.
    let template = match c.format.as_str() {
        "gguf" => {
            state.models.get(&req.model).await.ok().and_then(|m| m.engine.template().map(|t| t.source().to_string()))
        }
        _ => None,
    };
    let info: serde_json::Map<String, Value> = c.gguf.iter().flatten().map(|(k, v)| (k.clone(), json!(v))).collect();
    Ok(Json(json!({
        "license": "",
        "modelfile": format!("FROM {}\n", d.reference),
        "parameters": "",
        "template": template.unwrap_or_default(),
        "details": {
            "parent_model": "",
            "format": c.format,
            "family": c.architecture,
            "families": [c.architecture],
            "parameter_size": c.parameters,
            "quantization_level": c.quantization,
        },
        "model_info": info,
        "capabilities": [if c.format == "gguf" { "completion" } else { "embedding" }],
        "modified_at": d.config.descriptor.created.clone().unwrap_or_default(),
    })))
}

pub async fn ps(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let listed = state.models.list()?;
    let mut models = Vec::new();
    let caller = crate::auth::caller();
    for m in state.models.status().await {
        // A key kept to some models sees only those.
        if caller.as_ref().is_some_and(|c| c.check_model(&m.name).is_err()) {
            continue;
        }
        let summary = listed.iter().find(|s| s.reference == m.name || s.digest.to_string() == m.digest);
        let (running, waiting, limits) = match &m.loaded {
            Some(Loaded::Chat(c)) => {
                let stats = c.runner.stats();
                let config = c.runner.config();
                let limits = json!({
                    "threads": config.threads.unwrap_or_else(berth_engine::threads),
                    "own_threads": config.threads.is_some(),
                    "max_running": config.scheduler.max_running,
                    "context": c.context,
                });
                (stats.running.load(Ordering::Relaxed), stats.waiting.load(Ordering::Relaxed), limits)
            }
            _ => (0, 0, Value::Null),
        };
        // Ollama's `expires_at`: when an idle model will be unloaded.
        let expires_at = match m.unloads_in() {
            Some(left) => {
                let at = chrono::Utc::now() + chrono::Duration::from_std(left).unwrap_or_default();
                at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            }
            _ => "9999-12-31T23:59:59Z".to_string(),
        };
        models.push(json!({
            "name": m.name,
            "model": m.name,
            "size": m.memory,
            "digest": m.digest.strip_prefix("sha256:").unwrap_or(&m.digest),
            "details": summary.map(details).unwrap_or(json!({})),
            "expires_at": expires_at,
            "size_vram": 0,
            "context_length": match &m.loaded {
                Some(Loaded::Chat(c)) => json!(c.context),
                _ => Value::Null,
            },
            "berth": {
                "version": crate::deployments::spec::version_label(&m.digest),
                "state": m.state,
                "memory_bytes": m.memory,
                "running": running,
                "waiting": waiting,
                "idle_seconds": m.idle.map(|d| d.as_secs_f64()),
                "pinned": m.pinned,
                "limits": limits,
                "keep_alive_seconds": match m.keep_alive {
                    KeepAlive::For(d) => json!(d.as_secs_f64()),
                    KeepAlive::Forever => json!(-1),
                },
            },
        }));
    }
    // Deployments and the share of requests each of their versions gets.
    let deployments: Vec<Value> = state
        .models
        .deployments
        .list()
        .iter()
        .filter(|d| caller.as_ref().is_none_or(|c| c.check_model(&d.name).is_ok()))
        .map(|d| {
            let view = crate::deployments::api::view(&state, d);
            json!({"name": d.name, "traffic": view["traffic"], "rollout": view["rollout"]["state"]})
        })
        .collect();
    Ok(Json(json!({"models": models, "deployments": deployments, "memory_budget_bytes": state.models.budget()})))
}

pub async fn version() -> Json<Value> {
    Json(json!({"version": env!("CARGO_PKG_VERSION")}))
}

#[derive(Deserialize)]
pub struct PullRequest {
    #[serde(alias = "name")]
    model: String,
    #[serde(default)]
    insecure: bool,
    stream: Option<bool>,
}

/// `/api/pull`: fetch a model from its registry into the store.
pub async fn pull(State(state): State<AppState>, JsonBody(req): JsonBody<PullRequest>) -> Response {
    let (reference, options) = match registry_target(&req) {
        Ok(target) => target,
        Err(e) => return e.into_response(),
    };
    let home = state.models.home().to_path_buf();
    let pulled = async move {
        let store = berth_store::Store::open(&home).map_err(|e| ApiError::internal(e.to_string()))?;
        berth_store::registry::pull(
            &store,
            &reference,
            &options,
            Arc::new(berth_store::progress::NoProgress),
            &crate::vetting::ModelVetting,
        )
        .await
        .map_err(registry_error)
    };
    registry_answer(req.stream.unwrap_or(true), "pulling manifest", pulled).await
}

/// `/api/push`: send a model of the store to its registry (the reference names the registry, as
/// `berth push` does).
pub async fn push(State(state): State<AppState>, JsonBody(req): JsonBody<PullRequest>) -> Response {
    let (reference, options) = match registry_target(&req) {
        Ok(target) => target,
        Err(e) => return e.into_response(),
    };
    let home = state.models.home().to_path_buf();
    let pushed = async move {
        let store = berth_store::Store::open(&home).map_err(|e| ApiError::internal(e.to_string()))?;
        berth_store::registry::push(&store, &reference, &options, Arc::new(berth_store::progress::NoProgress))
            .await
            .map_err(registry_error)
    };
    registry_answer(req.stream.unwrap_or(true), "retrieving manifest", pushed).await
}

/// A pull's or push's model reference, and the server's registry settings with that registry
/// allowed over plain HTTP when the request says `insecure`.
fn registry_target(
    req: &PullRequest,
) -> Result<(berth_store::Reference, berth_store::registry::RegistryOptions), ApiError> {
    let reference = berth_store::Reference::parse(&req.model).map_err(|e| ApiError::invalid("model", e.to_string()))?;
    let mut options = berth_store::registry::RegistryOptions::from_env();
    if req.insecure {
        options.insecure_registries.push(reference.registry().to_string());
    }
    Ok((reference, options))
}

/// A pull's or push's answer as Ollama gives it: a stream of status lines ending in `success` (or
/// `error`), or one object.
async fn registry_answer(
    stream: bool,
    first: &'static str,
    job: impl std::future::Future<Output = Result<berth_store::Digest, ApiError>> + Send + 'static,
) -> Response {
    if stream {
        let (tx, rx) = mpsc::channel::<String>(4);
        tokio::spawn(async move {
            let _ = tx.send(format!("{}\n", json!({"status": first}))).await;
            let last = match job.await {
                Ok(digest) => json!({"status": "success", "digest": digest.to_string()}),
                Err(e) => json!({"error": e.message}),
            };
            let _ = tx.send(format!("{last}\n")).await;
        });
        let stream = ReceiverStream::new(rx).map(Ok::<_, std::convert::Infallible>);
        return ([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(stream)).into_response();
    }
    match job.await {
        Ok(_) => Json(json!({"status": "success"})).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
pub struct CopyRequest {
    source: String,
    destination: String,
}

/// `/api/copy`: another name for a model of the store (a tag, as `berth tag`).
pub async fn copy(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<CopyRequest>,
) -> Result<Json<Value>, ApiError> {
    let parse =
        |param: &str, s: &str| berth_store::Reference::parse(s).map_err(|e| ApiError::invalid(param, e.to_string()));
    let (source, destination) = (parse("source", &req.source)?, parse("destination", &req.destination)?);
    let store = berth_store::Store::open(state.models.home()).map_err(|e| ApiError::internal(e.to_string()))?;
    match store.tag(&source, &destination) {
        Ok(_) => Ok(Json(json!({}))),
        Err(berth_store::StoreError::NotFound(_)) => {
            Err(ApiError::not_found(format!("model '{}' not found", req.source)))
        }
        Err(e) => Err(ApiError::internal(e.to_string())),
    }
}

/// A failed pull or push as the client sees it: what the registry or the artifact got wrong is the
/// client's to fix (404, 502, 400); the store's own trouble is an internal error (its paths stay in
/// the log).
fn registry_error(e: berth_store::StoreError) -> ApiError {
    use berth_store::StoreError as S;
    use berth_store::registry::RegistryError as R;
    match e {
        S::Registry(R::NotFound { .. }) | S::NotFound(_) => ApiError::not_found(e.to_string()),
        S::Registry(R::Unreachable { .. } | R::Interrupted { .. } | R::Protocol { .. }) => {
            ApiError { status: axum::http::StatusCode::BAD_GATEWAY, ..ApiError::unavailable(e.to_string()) }
        }
        S::Io { .. } | S::CorruptIndex { .. } | S::Registry(R::Credentials { .. }) => ApiError::internal(e.to_string()),
        other => ApiError::bad_request(other.to_string()),
    }
}

#[derive(Deserialize)]
pub struct DeleteRequest {
    #[serde(alias = "name")]
    model: String,
}

/// `/api/delete`: remove a model from the store (and unload it).
pub async fn delete(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<DeleteRequest>,
) -> Result<Json<Value>, ApiError> {
    let reference = berth_store::Reference::parse(&req.model).map_err(|e| ApiError::invalid("model", e.to_string()))?;
    let store = berth_store::Store::open(state.models.home()).map_err(|e| ApiError::internal(e.to_string()))?;
    match store.remove(&reference) {
        Ok(_) => {
            state.models.unload(&reference).await;
            Ok(Json(json!({})))
        }
        Err(berth_store::StoreError::NotFound(_)) => {
            Err(ApiError::not_found(format!("model '{}' not found", req.model)))
        }
        Err(e) => Err(ApiError::internal(e.to_string())),
    }
}
