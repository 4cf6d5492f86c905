//! Keys, quotas and usage at the gateway, from the gateway's own home (`berth keys` there, the same
//! SQLite schema as a replica's): once it has a key, every request needs one, with the scope its
//! path needs, within the key's models and request rate; each request's usage is recorded under its
//! key with the tokens its answer reports and where it was served. Replicas behind a gateway that
//! checks keys can run without keys of their own on a private network.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use serde_json::Value;

use super::Gateway;
use crate::accounts::{Outcome, Record, Scope};
use crate::auth::Caller;

/// Paths that manage models or deployments on the replicas.
const ADMIN: [&str; 9] = [
    "/api/pin",
    "/api/pull",
    "/api/push",
    "/api/copy",
    "/api/create",
    "/api/blobs/",
    "/api/delete",
    "/api/deployments",
    "/api/unload",
];

/// The scope a request's path needs; `None` for the probes, which stay open.
fn scope_of(path: &str) -> Option<Scope> {
    match path {
        // The dashboard's page holds no data; its state needs a key like the API.
        "/health" | "/ready" | "/" | "/ui" | "/ui/app.js" | "/ui/app.css" | "/ui/icon.svg" => None,
        "/metrics" | "/gateway/upstreams" => Some(Scope::Metrics),
        p if ADMIN.iter().any(|a| p.starts_with(a)) => Some(Scope::Admin),
        _ => Some(Scope::Inference),
    }
}

pub(super) async fn authorize(State(gateway): State<Arc<Gateway>>, request: Request, next: Next) -> Response {
    match scope_of(request.uri().path()) {
        None => next.run(request).await,
        Some(scope) => crate::auth::authorize(State((gateway.auth.clone(), scope)), request, next).await,
    }
}

/// How much of an answer is kept to read its usage from: its start (Anthropic's stream reports
/// the prompt's tokens first) and its end (where the others report).
const KEEP: usize = 16 << 10;

/// One request's usage, recorded when its answer ends (or its client leaves).
pub(super) struct UsageTap {
    caller: Caller,
    model: String,
    started: Instant,
    first_byte: Option<Duration>,
    status_ok: bool,
    head: Vec<u8>,
    tail: Vec<u8>,
    /// Bytes seen, and how many the answer's length says will come: the client's side stops
    /// reading a body of known length at its last byte, so its end is seen by count.
    seen: u64,
    length: Option<u64>,
    ended: Option<Outcome>,
}

impl UsageTap {
    pub(super) fn new(caller: Caller, model: Option<&str>, started: Instant, status_ok: bool) -> UsageTap {
        UsageTap {
            caller,
            model: model.unwrap_or("").to_string(),
            started,
            first_byte: None,
            status_ok,
            head: Vec::new(),
            tail: Vec::new(),
            seen: 0,
            length: None,
            ended: None,
        }
    }

    /// The answer's `Content-Length`, if it has one.
    pub(super) fn expect(&mut self, length: Option<u64>) {
        self.length = length;
    }

    pub(super) fn saw(&mut self, bytes: &[u8]) {
        self.first_byte.get_or_insert_with(|| self.started.elapsed());
        let room = KEEP.saturating_sub(self.head.len());
        self.head.extend_from_slice(&bytes[..bytes.len().min(room)]);
        self.tail.extend_from_slice(bytes);
        if self.tail.len() > 2 * KEEP {
            self.tail.drain(..self.tail.len() - KEEP);
        }
        self.seen += bytes.len() as u64;
        if self.length.is_some_and(|l| self.seen >= l) {
            self.ended.get_or_insert(Outcome::Completed);
        }
    }

    pub(super) fn ended(&mut self, outcome: Outcome) {
        self.ended.get_or_insert(outcome);
    }
}

impl Drop for UsageTap {
    fn drop(&mut self) {
        let outcome = match self.ended {
            Some(Outcome::Completed) if !self.status_ok => Outcome::Failed,
            Some(o) => o,
            None => Outcome::Aborted,
        };
        let (prompt, completion) = tokens_in(&self.head, &self.tail);
        self.caller.record(
            &Record {
                key_id: self.caller.key_id(),
                model: &self.model,
                model_version: "",
                outcome,
                prompt_tokens: prompt,
                completion_tokens: completion,
                duration: self.started.elapsed(),
                time_to_first_token: self.first_byte,
                hit_length: false,
            },
            0,
        );
    }
}

/// The OpenAI paths whose streams report usage only when asked.
pub(crate) fn is_openai_completion(path: &str) -> bool {
    matches!(path, "/v1/chat/completions" | "/chat/completions" | "/v1/completions" | "/completions")
}

/// An OpenAI stream whose client did not ask for usage (`stream_options.include_usage`) reports
/// none, so its tokens could not be charged to its key: the gateway asks the replica for usage
/// (this body), and takes the usage event out of what the client gets ([`UsageStripper`]), so
/// that the client sees the stream it asked for. `None` when the request needs no change.
/// The gateway calls it only for a request whose facts say so, so the common request's body is
/// read once.
pub(crate) fn with_usage_asked(path: &str, body: &[u8]) -> Option<Vec<u8>> {
    if !is_openai_completion(path) {
        return None;
    }
    let mut value: Value = serde_json::from_slice(body).ok()?;
    if value.get("stream") != Some(&Value::Bool(true))
        || value.pointer("/stream_options/include_usage") == Some(&Value::Bool(true))
    {
        return None;
    }
    match value.get_mut("stream_options") {
        Some(Value::Object(options)) => {
            options.insert("include_usage".into(), Value::Bool(true));
        }
        // Not an object: the replica's answer says what is wrong with it.
        Some(_) => return None,
        None => value["stream_options"] = serde_json::json!({"include_usage": true}),
    }
    serde_json::to_vec(&value).ok()
}

/// Takes the usage event (`"choices": []` with `usage`) out of an OpenAI stream whose client did
/// not ask for it (see [`with_usage_asked`]); every other byte passes unchanged, whole events at a
/// time.
#[derive(Default)]
pub(crate) struct UsageStripper {
    pending: Vec<u8>,
    /// The stream stopped looking like events (one over [`MAX_EVENT`]): passed on as it comes.
    gave_up: bool,
}

/// The longest event the stripper holds back; past it, it lets the stream through unfiltered.
const MAX_EVENT: usize = 1 << 20;

impl UsageStripper {
    /// What of the stream so far may go to the client now.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> Bytes {
        if self.gave_up {
            return Bytes::copy_from_slice(bytes);
        }
        self.pending.extend_from_slice(bytes);
        let mut out = Vec::with_capacity(self.pending.len());
        while let Some(end) = self.pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = self.pending.drain(..end + 2).collect();
            if !is_usage_event(&event) {
                out.extend_from_slice(&event);
            }
        }
        if self.pending.len() > MAX_EVENT {
            self.gave_up = true;
            out.append(&mut self.pending);
        }
        Bytes::from(out)
    }

    /// What is left when the stream ends (an unfinished event, passed on as it is).
    pub(crate) fn finish(&mut self) -> Bytes {
        Bytes::from(std::mem::take(&mut self.pending))
    }
}

fn is_usage_event(event: &[u8]) -> bool {
    let text = String::from_utf8_lossy(event);
    text.lines().filter_map(|l| l.strip_prefix("data:")).any(|data| {
        serde_json::from_str::<Value>(data.trim())
            .is_ok_and(|v| v["choices"].as_array().is_some_and(Vec::is_empty) && v["usage"].is_object())
    })
}

/// The prompt and completion tokens an answer reports, in any of the APIs' shapes: a JSON body, or
/// SSE/NDJSON events (OpenAI's `usage` when the stream carries it, Ollama's counts, Anthropic's
/// `message_start` and `message_delta`, the Responses API's `response.completed`).
pub(crate) fn tokens_in(head: &[u8], tail: &[u8]) -> (u64, u64) {
    let (mut prompt, mut completion) = (0u64, 0u64);
    let mut take = |v: &Value| {
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        for usage in [&v["usage"], &v["message"]["usage"], &v["response"]["usage"]] {
            prompt = prompt.max(n(&usage["prompt_tokens"])).max(n(&usage["input_tokens"]));
            completion = completion.max(n(&usage["completion_tokens"])).max(n(&usage["output_tokens"]));
        }
        prompt = prompt.max(n(&v["prompt_eval_count"]));
        completion = completion.max(n(&v["eval_count"]));
    };
    for part in [head, tail] {
        let text = String::from_utf8_lossy(part);
        if let Ok(v) = serde_json::from_str::<Value>(&text) {
            take(&v);
            continue;
        }
        for line in text.lines() {
            let line = line.strip_prefix("data:").unwrap_or(line).trim();
            if line.starts_with('{')
                && let Ok(v) = serde_json::from_str::<Value>(line)
            {
                take(&v);
            }
        }
    }
    (prompt, completion)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_read_from_each_apis_answers() {
        let openai = br#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17}}"#;
        assert_eq!(tokens_in(openai, openai), (12, 5));
        let stream = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n";
        assert_eq!(tokens_in(b"", stream), (3, 2));
        let ollama = b"{\"message\":{\"content\":\"a\"},\"done\":false}\n{\"done\":true,\"prompt_eval_count\":9,\"eval_count\":4}\n";
        assert_eq!(tokens_in(b"", ollama), (9, 4));
        let anthropic_head = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":7,\"output_tokens\":1}}}\n\n";
        let anthropic_tail =
            b"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":6}}\n\n";
        assert_eq!(tokens_in(anthropic_head, anthropic_tail), (7, 6));
        let responses = b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":8,\"output_tokens\":3}}}\n\n";
        assert_eq!(tokens_in(b"", responses), (8, 3));
        assert_eq!(tokens_in(b"not json", b"data: {broken"), (0, 0));
    }

    #[test]
    fn usage_is_asked_for_and_its_event_taken_out_of_openai_streams_only() {
        let asked = with_usage_asked("/v1/chat/completions", br#"{"model":"m","stream":true,"messages":[]}"#).unwrap();
        let v: Value = serde_json::from_slice(&asked).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!((v["model"].as_str(), v["stream"].as_bool()), (Some("m"), Some(true)));
        let kept = with_usage_asked("/v1/completions", br#"{"stream":true,"stream_options":{"x":1}}"#).unwrap();
        let v: Value = serde_json::from_slice(&kept).unwrap();
        assert_eq!(
            (v["stream_options"]["x"].as_i64(), v["stream_options"]["include_usage"].as_bool()),
            (Some(1), Some(true))
        );
        for (path, body) in [
            ("/v1/chat/completions", r#"{"stream":false}"#),
            ("/v1/chat/completions", r#"{"stream":true,"stream_options":{"include_usage":true}}"#),
            ("/v1/chat/completions", r#"{"stream":true,"stream_options":"odd"}"#),
            ("/v1/chat/completions", "not json"),
            ("/api/chat", r#"{"stream":true}"#),
        ] {
            assert_eq!(with_usage_asked(path, body.as_bytes()), None, "{path} {body}");
        }

        let content = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n";
        let usage = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n";
        let done = "data: [DONE]\n\n";
        let stream = format!("{content}{usage}{done}");
        // Whatever the pieces the stream arrives in, the client gets it whole, less the usage event.
        for cut in [1, 7, content.len(), content.len() + 5, stream.len() - 3] {
            let mut stripper = UsageStripper::default();
            let mut out = stripper.push(&stream.as_bytes()[..cut]).to_vec();
            out.extend_from_slice(&stripper.push(&stream.as_bytes()[cut..]));
            out.extend_from_slice(&stripper.finish());
            assert_eq!(String::from_utf8(out).unwrap(), format!("{content}{done}"), "cut at {cut}");
        }
        // An endless line is let through rather than held.
        let mut stripper = UsageStripper::default();
        assert!(stripper.push(&vec![b'x'; MAX_EVENT + 1]).len() > MAX_EVENT);
        assert_eq!(stripper.push(b"y").as_ref(), b"y");
    }

    #[test]
    fn scopes_by_path() {
        assert_eq!(scope_of("/health"), None);
        assert_eq!(scope_of("/metrics"), Some(Scope::Metrics));
        assert_eq!(scope_of("/api/pull"), Some(Scope::Admin));
        assert_eq!(scope_of("/api/deployments/x/rollout"), Some(Scope::Admin));
        assert_eq!(scope_of("/v1/chat/completions"), Some(Scope::Inference));
        assert_eq!(scope_of("/api/chat"), Some(Scope::Inference));
    }
}
