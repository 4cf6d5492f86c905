//! Keys, quotas and usage at the gateway, from the gateway's own home (`berth keys` there, the same
//! SQLite schema as a replica's): once it has a key, every request needs one, with the scope its
//! path needs, within the key's models and request rate; each request's usage is recorded under its
//! key with the tokens its answer reports and where it was served. Replicas behind a gateway that
//! checks keys can run without keys of their own on a private network.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use serde_json::Value;

use super::Gateway;
use crate::accounts::{Outcome, Record, Scope};
use crate::auth::Caller;

/// Paths that manage models or deployments on the replicas.
const ADMIN: [&str; 8] = [
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
        "/health" | "/ready" => None,
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
    fn scopes_by_path() {
        assert_eq!(scope_of("/health"), None);
        assert_eq!(scope_of("/metrics"), Some(Scope::Metrics));
        assert_eq!(scope_of("/api/pull"), Some(Scope::Admin));
        assert_eq!(scope_of("/api/deployments/x/rollout"), Some(Scope::Admin));
        assert_eq!(scope_of("/v1/chat/completions"), Some(Scope::Inference));
        assert_eq!(scope_of("/api/chat"), Some(Scope::Inference));
    }
}
