//! Turning request bodies into validated engine requests: JSON parsing with OpenAI-shaped errors,
//! and the sampling fields OpenAI and Ollama share, each checked against its range.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;

use berth_engine::ChatOptions;
use berth_engine::GenerationRequest;
use berth_engine::constraint::ConstraintSpec;
use berth_engine::request::{Param, RequestDraft};
use berth_engine::template::Message;
use berth_engine::tools::ToolGrammar;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::ApiError;
use crate::models::LoadedModel;

/// How long a request's body may take to arrive (set for every request by [`body_limits`]).
#[derive(Debug, Clone, Copy)]
pub struct BodyTimeout(pub std::time::Duration);

/// Before a body is read: a declared `Content-Length` over the limit is a 413 at once (a client
/// that sent `Expect: 100-continue` then never sends the body), and the body's read timeout rides
/// along for [`JsonBody`].
pub async fn body_limits(
    axum::extract::State((limit, timeout)): axum::extract::State<(usize, std::time::Duration)>,
    mut request: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    // Uploads of model files have their own limit, enforced as they stream (`ollama_create`).
    let upload = request.uri().path().starts_with(crate::ollama_create::BLOBS_PATH);
    if declared.is_some_and(|n| n > limit as u64) && !upload {
        return too_large().into_response();
    }
    request.extensions_mut().insert(BodyTimeout(timeout));
    next.run(request).await
}

/// A `model` that may be `null` or absent (then the one model loaded answers), as a string.
pub(crate) fn optional_model<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(<Option<String> as serde::Deserialize>::deserialize(d)?.unwrap_or_default())
}

pub(crate) fn too_large() -> ApiError {
    ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        code: Some("request_too_large"),
        ..ApiError::bad_request("the request body is larger than the server's limit")
    }
}

/// Whether a body of this content type is read as JSON. JSON types are; so are curl's default
/// form type and none at all, but only from clients that are not browsers (no `Origin`, no
/// `Sec-Fetch-Mode`): a web page can send those types cross-site without a preflight.
fn json_content_type(headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    let media = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
    let from_browser = headers.contains_key(axum::http::header::ORIGIN) || headers.contains_key("sec-fetch-mode");
    match media.as_deref() {
        Some("application/json") => Ok(()),
        Some(m) if m.starts_with("application/") && m.ends_with("+json") => Ok(()),
        None | Some("application/x-www-form-urlencoded") if !from_browser => Ok(()),
        _ => Err(ApiError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code: Some("unsupported_media_type"),
            ..ApiError::bad_request("send the body as JSON, with `Content-Type: application/json`")
        }),
    }
}

/// A JSON body whose rejections are API errors: 415 for a body that is not declared JSON, 408
/// for one that does not arrive in time, 413 past the body limit, 400 otherwise.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        json_content_type(req.headers())?;
        let timeout = req.extensions().get::<BodyTimeout>().map_or(std::time::Duration::from_secs(60), |t| t.0);
        let read = tokio::time::timeout(timeout, Bytes::from_request(req, state)).await.map_err(|_| ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            code: Some("request_timeout"),
            ..ApiError::bad_request(format!("the request body did not arrive within {} s", timeout.as_secs()))
        })?;
        let bytes = match read {
            Ok(b) => b,
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => return Err(too_large()),
            Err(e) => return Err(ApiError::bad_request(format!("cannot read the request body: {}", e.body_text()))),
        };
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        let parsed: Result<T, _> = serde_path_to_error::deserialize(&mut de);
        match parsed {
            Ok(v) => match de.end() {
                Ok(()) => Ok(JsonBody(v)),
                Err(e) => Err(ApiError::bad_request(format!("the body is not valid JSON: {e}"))),
            },
            Err(e) => {
                let mut path = e.path().to_string();
                let inner = e.into_inner();
                if path.is_empty() || path == "." || path.contains('?') {
                    // Flattened fields lose their path; name the key the error points into.
                    path = key_before(&bytes, inner.line(), inner.column()).unwrap_or_default();
                }
                let message = if inner.is_syntax() || inner.is_eof() {
                    format!("the body is not valid JSON: {inner}")
                } else {
                    format!("invalid request: {inner}")
                };
                Err(if path.is_empty() || path == "." {
                    ApiError::bad_request(message)
                } else {
                    ApiError::invalid(&path, format!("{path}: {message}"))
                })
            }
        }
    }
}

/// The last `"key":` before a (1-based) line and column of a JSON text.
fn key_before(bytes: &[u8], line: usize, column: usize) -> Option<String> {
    let mut offset = 0;
    for (i, l) in bytes.split(|&b| b == b'\n').enumerate() {
        if i + 1 == line {
            offset += column.min(l.len());
            break;
        }
        offset += l.len() + 1;
    }
    let text = std::str::from_utf8(&bytes[..offset.min(bytes.len())]).ok()?;
    let colon = text.rfind("\":")?;
    let start = text[..colon].rfind('"')?;
    Some(text[start + 1..colon].to_string())
}

/// Sampling fields shared by the OpenAI endpoints. Numbers are read as any JSON value and
/// checked by [`Sampling::draft`]: the fields are flattened into each request, and serde would
/// blame a wrong type on whichever key it read last.
#[derive(Deserialize, Default)]
pub struct Sampling {
    pub max_tokens: Option<Value>,
    pub max_completion_tokens: Option<Value>,
    pub temperature: Option<Value>,
    pub top_p: Option<Value>,
    pub top_k: Option<Value>,
    pub min_p: Option<Value>,
    pub frequency_penalty: Option<Value>,
    pub presence_penalty: Option<Value>,
    pub repetition_penalty: Option<Value>,
    pub seed: Option<Value>,
    pub stop: Option<Value>,
    pub logit_bias: Option<Value>,
    /// Keep generating past the end-of-sequence token up to the token limit (the extension vLLM and
    /// llama-server accept; benchmarks use it for fixed output lengths).
    pub ignore_eos: Option<Value>,
    /// The end user, as OpenAI's clients name it: keeps them on one version during a canary.
    pub user: Option<Value>,
}

/// A JSON number field (`null` is absent).
pub fn number(name: &'static str, v: &Option<Value>) -> Result<Option<Param>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64().map(|x| Param::new(name, x))),
        Some(other) => Err(ApiError::invalid(name, format!("{name} must be a number, got {}", json_kind(other)))),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// `stop`: one string or a list of them.
pub fn stop_strings(v: &Option<Value>) -> Result<Vec<String>, ApiError> {
    let bad = || ApiError::invalid("stop", "stop must be a string or a list of strings");
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => {
            if items.len() > berth_engine::request::MAX_STOPS {
                return Err(ApiError::invalid(
                    "stop",
                    format!(
                        "stop takes at most {} strings of at most {} bytes",
                        berth_engine::request::MAX_STOPS,
                        berth_engine::request::MAX_STOP_BYTES
                    ),
                ));
            }
            items.iter().map(|i| i.as_str().map(str::to_string).ok_or_else(bad)).collect()
        }
        Some(_) => Err(bad()),
    }
}

impl Sampling {
    /// The request's parameters, typed and named, for [`berth_engine::request::validate`].
    pub fn draft(&self, logprobs: Option<usize>) -> Result<RequestDraft, ApiError> {
        let max_tokens = match number("max_completion_tokens", &self.max_completion_tokens)? {
            Some(p) => Some(p),
            None => number("max_tokens", &self.max_tokens)?,
        };
        let logit_bias = match &self.logit_bias {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Object(map)) => {
                if map.len() > 1024 {
                    return Err(ApiError::invalid("logit_bias", "logit_bias takes at most 1024 tokens"));
                }
                map.iter()
                    .map(|(k, v)| match v.as_f64() {
                        Some(b) => Ok((k.clone(), b)),
                        None => Err(ApiError::invalid("logit_bias", "logit_bias values must be numbers")),
                    })
                    .collect::<Result<_, _>>()?
            }
            Some(_) => return Err(ApiError::invalid("logit_bias", "logit_bias must be an object of token ids")),
        };
        let ignore_eos = match &self.ignore_eos {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(ApiError::invalid("ignore_eos", "ignore_eos must be true or false")),
        };
        Ok(RequestDraft {
            max_tokens,
            temperature: number("temperature", &self.temperature)?,
            top_p: number("top_p", &self.top_p)?,
            top_k: number("top_k", &self.top_k)?,
            min_p: number("min_p", &self.min_p)?,
            repeat_penalty: number("repetition_penalty", &self.repetition_penalty)?,
            repeat_last_n: None,
            presence_penalty: number("presence_penalty", &self.presence_penalty)?,
            frequency_penalty: number("frequency_penalty", &self.frequency_penalty)?,
            seed: number("seed", &self.seed)?,
            stop: stop_strings(&self.stop)?,
            logit_bias,
            logprobs,
            ignore_eos,
            constraint: None,
        })
    }
}

/// OpenAI's `response_format`: `text`, `json_object`, `json_schema` (`{"json_schema": {"name",
/// "schema", "strict"}}`), and berth's extensions `regex` (`{"type": "regex", "regex": "…"}`) and
/// `grammar` (`{"type": "grammar", "grammar": "<Lark>"}`).
pub fn response_format(v: &Option<Value>) -> Result<Option<ConstraintSpec>, ApiError> {
    const PARAM: &str = "response_format";
    let bad = |m: &str| ApiError::invalid(PARAM, format!("response_format: {m}"));
    let Some(v) = v.as_ref().filter(|v| !v.is_null()) else { return Ok(None) };
    let Some(obj) = v.as_object() else { return Err(bad("must be an object with a `type`")) };
    let text = |key: &str| match obj.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        _ => Err(bad(&format!("type `{key}` needs a non-empty string `{key}`"))),
    };
    match obj.get("type").and_then(Value::as_str) {
        None => Err(bad("must have a `type`: text, json_object, json_schema, regex or grammar")),
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(ConstraintSpec::JsonObject)),
        Some("json_schema") => {
            let Some(inner) = obj.get("json_schema").and_then(Value::as_object) else {
                return Err(bad("type `json_schema` needs a `json_schema` object with the `schema`"));
            };
            match inner.get("schema") {
                // OpenAI's clients always send one; without it any JSON object will do.
                None | Some(Value::Null) => Ok(Some(ConstraintSpec::JsonObject)),
                Some(schema) => Ok(Some(ConstraintSpec::JsonSchema(schema.clone()))),
            }
        }
        Some("regex") => Ok(Some(ConstraintSpec::Regex(text("regex")?))),
        Some("grammar") => Ok(Some(ConstraintSpec::Lark(text("grammar")?))),
        Some(other) => {
            Err(bad(&format!("unknown type `{other}`; use text, json_object, json_schema, regex or grammar")))
        }
    }
}

/// Peers' ways of asking for constrained output besides OpenAI's `response_format`: llama.cpp's
/// server's `json_schema` and `grammar`, vLLM's `guided_json`, `guided_regex`, `guided_choice` and
/// `guided_grammar`. Each maps onto berth's constrained decoding or is refused; none is ignored,
/// since ignoring one would return unconstrained text to a client that parses it.
#[derive(Deserialize, Default)]
pub struct PeerConstraints {
    json_schema: Option<Value>,
    grammar: Option<Value>,
    guided_json: Option<Value>,
    guided_regex: Option<Value>,
    guided_choice: Option<Value>,
    guided_grammar: Option<Value>,
}

/// The constraint a request asks for, with the parameter that asked (for errors): OpenAI's
/// `response_format` or one of [`PeerConstraints`], at most one of them.
pub fn constraint(
    format: &Option<Value>,
    peer: &PeerConstraints,
) -> Result<Option<(&'static str, ConstraintSpec)>, ApiError> {
    let given = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null());
    let mut asked: Vec<(&'static str, ConstraintSpec)> = Vec::new();
    if let Some(spec) = response_format(format)? {
        asked.push(("response_format", spec));
    }
    if given(&peer.json_schema) {
        asked.push(("json_schema", schema_of("json_schema", &peer.json_schema)?));
    }
    if given(&peer.guided_json) {
        asked.push(("guided_json", schema_of("guided_json", &peer.guided_json)?));
    }
    if given(&peer.guided_regex) {
        match &peer.guided_regex {
            Some(Value::String(r)) if !r.is_empty() => asked.push(("guided_regex", ConstraintSpec::Regex(r.clone()))),
            _ => return Err(ApiError::invalid("guided_regex", "guided_regex must be a non-empty string")),
        }
    }
    if given(&peer.guided_choice) {
        let bad = || ApiError::invalid("guided_choice", "guided_choice must be a list of 1 to 1024 strings");
        let Some(Value::Array(items)) = &peer.guided_choice else { return Err(bad()) };
        if items.is_empty() || items.len() > 1024 {
            return Err(bad());
        }
        let choices =
            items.iter().map(|c| c.as_str().map(regex_escape).ok_or_else(bad)).collect::<Result<Vec<_>, _>>()?;
        asked.push(("guided_choice", ConstraintSpec::Regex(format!("({})", choices.join("|")))));
    }
    for (param, v) in [("grammar", &peer.grammar), ("guided_grammar", &peer.guided_grammar)] {
        if given(v) {
            return Err(ApiError::invalid(
                param,
                format!(
                    "{param} (a GBNF/EBNF grammar) is not supported; send response_format \
                     {{\"type\": \"grammar\", \"grammar\": \"...\"}} with a Lark grammar, or a JSON schema or regex"
                ),
            ));
        }
    }
    if asked.len() > 1 {
        let names: Vec<&str> = asked.iter().map(|(p, _)| *p).collect();
        return Err(ApiError::invalid(
            asked[1].0,
            format!("send one way of constraining the answer, not {}", names.join(" and ")),
        ));
    }
    Ok(asked.pop())
}

/// A JSON schema given as an object or as the JSON text of one (vLLM accepts both).
fn schema_of(param: &'static str, v: &Option<Value>) -> Result<ConstraintSpec, ApiError> {
    let schema = match v {
        Some(Value::String(text)) => serde_json::from_str(text)
            .map_err(|e| ApiError::invalid(param, format!("{param} is not valid JSON: {e}")))?,
        Some(v @ (Value::Object(_) | Value::Bool(_))) => v.clone(),
        _ => return Err(ApiError::invalid(param, format!("{param} must be a JSON schema (an object)"))),
    };
    Ok(ConstraintSpec::JsonSchema(schema))
}

/// A literal string as a regular expression that matches only it.
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        // The characters special outside a class in the Rust regex syntax llguidance reads.
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// What a request's prompt is made of, before the model's template and tokenizer see it.
pub enum PromptSource {
    Chat(Vec<Message>),
    /// Raw completion prompts, one generation each.
    Texts(Vec<String>),
    /// Completion prompts given as token ids (OpenAI's `prompt: [1, 2]` or `[[1, 2], [3]]`).
    Ids(Vec<Vec<u32>>),
    /// Token ids of an earlier exchange (Ollama's `context`), then this prompt.
    After(Vec<u32>, Box<PromptSource>),
}

impl PromptSource {
    /// The ids of an earlier exchange that go before the prompt (checked against a vocabulary of
    /// `vocab` tokens; empty without one) and the prompt itself, which holds no context of its own.
    pub fn split_context(self, vocab: usize) -> Result<(Vec<u32>, PromptSource), ApiError> {
        let PromptSource::After(ids, then) = self else { return Ok((Vec::new(), self)) };
        if matches!(*then, PromptSource::After(..)) {
            return Err(ApiError::invalid("context", "a context cannot itself hold a context"));
        }
        if ids.iter().any(|&t| t as usize >= vocab) {
            let message = format!("context holds token ids outside the vocabulary (0 to {})", vocab.saturating_sub(1));
            return Err(ApiError::invalid("context", message));
        }
        Ok((ids, *then))
    }
}

impl LoadedModel {
    /// Template, tokenize and validate a request on a blocking thread (a 2 MB body takes real
    /// time, and templates render in a worker process): one [`GenerationRequest`] per prompt, each
    /// checked against the same limits the scheduler applies, so it is never refused later.
    pub async fn prepare(
        self: &Arc<Self>,
        source: PromptSource,
        draft: RequestDraft,
        chat: ChatOptions,
    ) -> Result<Vec<GenerationRequest>, ApiError> {
        let model = self.clone();
        let (earlier, source) = source.split_context(self.engine.model().vocab_size())?;
        let prepared = tokio::task::spawn_blocking(move || {
            let mut prompts = match &source {
                PromptSource::Chat(messages) => vec![model.engine.chat_prompt_with(messages, &chat)?],
                PromptSource::Texts(texts) => {
                    texts.iter().map(|t| model.engine.text_prompt(t)).collect::<Result<Vec<_>, _>>()?
                }
                PromptSource::Ids(ids) => {
                    let vocab = model.engine.model().vocab_size();
                    if let Some(bad) = ids.iter().flatten().find(|&&t| t as usize >= vocab) {
                        let message = format!("token id {bad} is outside the vocabulary (0 to {})", vocab - 1);
                        return Err(berth_engine::EngineError::InvalidParameter { param: "prompt".into(), message });
                    }
                    ids.clone()
                }
                // `split_context` took the context out and refuses one nested in it.
                PromptSource::After(..) => {
                    let message = "a context cannot itself hold a context".to_string();
                    return Err(berth_engine::EngineError::InvalidParameter { param: "context".into(), message });
                }
            };
            for p in &mut prompts {
                p.splice(0..0, earlier.iter().copied());
            }
            let limits = model.limits();
            let mut requests = prompts
                .into_iter()
                .map(|p| berth_engine::request::validate(&draft, p, &limits))
                .collect::<Result<Vec<_>, berth_engine::EngineError>>()?;
            // The request's grammar, or a tool call's (all of the answer, or from a call's opening
            // token on).
            let tools = chat.tools.map(|t| model.engine.tool_plan(t));
            let constraint = match (&draft.constraint, tools.map(|t| t.grammar(model.engine.tokenizer()))) {
                (Some((param, spec)), _) => Some(model.engine.constrain(spec, param)?),
                (None, Some(ToolGrammar::Whole(spec))) => Some(model.engine.constrain(&spec, "tools")?),
                (None, Some(ToolGrammar::Lazy(lazy))) => {
                    Some(model.engine.constrain(&lazy.spec, "tools")?.after(lazy.trigger))
                }
                (None, Some(ToolGrammar::Free) | None) => None,
            };
            // Compiled once; each prompt's answer gets its own copy of the grammar's state.
            if let Some(constraint) = constraint {
                for r in &mut requests {
                    r.constraint = Some(constraint.clone());
                }
            }
            Ok(requests)
        })
        .await
        .map_err(|e| ApiError::internal(format!("preparing the request stopped: {e}")))?;
        prepared.map_err(|e| self.error(e))
    }
}

/// A unique id for a response (`chatcmpl-…`).
pub fn request_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let mut x = (t as u64) ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((std::process::id() as u64) << 40);
    x ^= x >> 33;
    x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^= x >> 33;
    format!("{prefix}-{x:016x}{n:04x}")
}

/// Seconds since the epoch of an RFC 3339 time (`2026-11-28T18:43:01Z`).
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    chrono::DateTime::parse_from_rfc3339(s).ok().and_then(|t| u64::try_from(t.timestamp()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_store_timestamps() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2026-11-28T18:43:01Z"), Some(1_795_891_381));
        assert_eq!(parse_rfc3339("nonsense"), None);
    }

    #[test]
    fn ids_are_unique() {
        assert_ne!(request_id("x"), request_id("x"));
    }

    /// Peers' constraint fields, badly formed: each a 400 naming the field, never a panic or a
    /// request run without the constraint the client asked for.
    #[test]
    fn malformed_peer_constraints_are_refused_by_name() {
        let peer = |v: serde_json::Value| serde_json::from_value::<PeerConstraints>(v).expect("fields");
        let refused = |v: serde_json::Value| {
            let e = constraint(&None, &peer(v.clone())).expect_err(&v.to_string());
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{v}");
            e.param.unwrap_or_default()
        };
        let many: Vec<String> = (0..1025).map(|i| i.to_string()).collect();
        for (body, param) in [
            (serde_json::json!({"guided_choice": "yes"}), "guided_choice"),
            (serde_json::json!({"guided_choice": []}), "guided_choice"),
            (serde_json::json!({"guided_choice": many}), "guided_choice"),
            (serde_json::json!({"guided_choice": ["yes", 2]}), "guided_choice"),
            (serde_json::json!({"guided_json": "{not json"}), "guided_json"),
            (serde_json::json!({"guided_json": 7}), "guided_json"),
            (serde_json::json!({"json_schema": [1]}), "json_schema"),
            (serde_json::json!({"guided_regex": ""}), "guided_regex"),
            (serde_json::json!({"guided_regex": {"a": 1}}), "guided_regex"),
            (serde_json::json!({"guided_grammar": "root ::= x"}), "guided_grammar"),
        ] {
            assert_eq!(refused(body), param);
        }
        // 1,024 choices are allowed, and null means "not given", as OpenAI's own fields do.
        let most: Vec<String> = (0..1024).map(|i| format!("c{i}")).collect();
        assert!(constraint(&None, &peer(serde_json::json!({"guided_choice": most}))).expect("1024").is_some());
        assert!(constraint(&None, &peer(serde_json::json!({"guided_json": null}))).expect("null").is_none());
        // A schema as the JSON text of one (vLLM accepts both).
        let text = peer(serde_json::json!({"guided_json": "{\"type\": \"integer\"}"}));
        assert!(matches!(constraint(&None, &text), Ok(Some(("guided_json", ConstraintSpec::JsonSchema(_))))));
    }

    /// Ollama's `context` from a client: ids past the vocabulary and a context inside a context are
    /// refused by name; a good one comes out in front of its prompt.
    #[test]
    fn a_context_is_checked_before_it_reaches_the_model() {
        let texts = || PromptSource::Texts(vec!["hi".into()]);
        let after = |ids: Vec<u32>, then| PromptSource::After(ids, Box::new(then));
        let e = after(vec![1, 50_000], texts()).split_context(49_152).err().expect("outside the vocabulary");
        assert_eq!((e.status, e.param.as_deref()), (StatusCode::BAD_REQUEST, Some("context")));
        let e = after(vec![1], after(vec![2], texts())).split_context(10).err().expect("nested");
        assert_eq!(e.param.as_deref(), Some("context"));
        let (ids, rest) = after(vec![3, 4], texts()).split_context(10).expect("good");
        assert_eq!(ids, vec![3, 4]);
        assert!(matches!(rest, PromptSource::Texts(t) if t == ["hi"]));
        let (ids, _) = texts().split_context(10).expect("none");
        assert!(ids.is_empty());
    }
}
