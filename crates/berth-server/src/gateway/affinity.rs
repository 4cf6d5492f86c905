//! What the gateway reads from a request body to route it: the model it names and a hash of the
//! start of its prompt (the system prompt and first turns, as the client sent them). Requests
//! with the same start land on the replica that served it last, whose prefix cache then holds
//! those blocks. The raw messages stand in for the templated prompt: the same messages make the
//! same prompt on every replica of one model.

use serde_json::Value;

/// How much of the prompt's start is hashed: about the first 16 KV blocks of English text. A
/// longer start splits requests that share a system prompt but differ after it; a shorter one
/// keeps together requests that share less.
pub const PREFIX_BYTES: usize = 1024;

/// The routing facts of one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestFacts {
    /// The model named in the body (`model`), if any.
    pub model: Option<String>,
    /// A hash of the model and the prompt's first [`PREFIX_BYTES`], when the body has a prompt.
    pub prefix: Option<u64>,
    /// An OpenAI stream whose client did not ask for usage: the gateway asks for it when it
    /// records the key's usage (see [`super::keys::with_usage_asked`]).
    pub usage_unasked: bool,
}

/// The facts of a body sent to `path`; a body that is not JSON has none (the replica will say
/// what is wrong with it).
pub fn facts(path: &str, body: &[u8]) -> RequestFacts {
    let Ok(value) = serde_json::from_slice::<Value>(body) else { return RequestFacts::default() };
    let model = value.get("model").and_then(Value::as_str).map(str::to_string);
    let usage_unasked = super::keys::is_openai_completion(path)
        && value.get("stream") == Some(&Value::Bool(true))
        && value.pointer("/stream_options/include_usage") != Some(&Value::Bool(true));
    let mut start = Start::default();
    match path {
        "/v1/chat/completions" | "/chat/completions" | "/api/chat" | "/v1/messages" => {
            start.text(value.get("system"));
            if let Some(messages) = value.get("messages").and_then(Value::as_array) {
                for m in messages {
                    start.push(m.get("role").and_then(Value::as_str).unwrap_or(""));
                    start.text(m.get("content"));
                    if start.full() {
                        break;
                    }
                }
            }
        }
        "/v1/completions" | "/completions" | "/api/generate" => {
            start.text(value.get("system"));
            match value.get("prompt") {
                Some(Value::Array(prompts)) => start.text(prompts.first()),
                prompt => start.text(prompt),
            }
        }
        "/v1/responses" => {
            start.text(value.get("instructions"));
            match value.get("input") {
                Some(Value::Array(items)) => {
                    for item in items {
                        start.push(item.get("role").and_then(Value::as_str).unwrap_or(""));
                        start.text(item.get("content"));
                        if start.full() {
                            break;
                        }
                    }
                }
                input => start.text(input),
            }
        }
        _ => {}
    }
    let prefix =
        (!start.bytes.is_empty()).then(|| super::hash64(&[model.as_deref().unwrap_or("").as_bytes(), &start.bytes]));
    RequestFacts { model, prefix, usage_unasked }
}

/// The prompt's start, gathered up to [`PREFIX_BYTES`].
#[derive(Default)]
struct Start {
    bytes: Vec<u8>,
}

impl Start {
    fn full(&self) -> bool {
        self.bytes.len() >= PREFIX_BYTES
    }

    fn push(&mut self, s: &str) {
        let room = PREFIX_BYTES.saturating_sub(self.bytes.len());
        self.bytes.extend_from_slice(&s.as_bytes()[..s.len().min(room)]);
        if !self.full() {
            self.bytes.push(0);
        }
    }

    /// A content value: a string, or parts of which the text ones count.
    fn text(&mut self, value: Option<&Value>) {
        match value {
            Some(Value::String(s)) => self.push(s),
            Some(Value::Array(parts)) => {
                for part in parts {
                    match part {
                        Value::String(s) => self.push(s),
                        other => self.text(other.get("text")),
                    }
                    if self.full() {
                        return;
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(system: &str, user: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({"model": "m", "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": user}]}))
        .unwrap()
    }

    #[test]
    fn a_long_shared_system_prompt_gives_one_key_whatever_follows() {
        let system = "You answer questions about ships. ".repeat(60);
        let a = facts("/v1/chat/completions", &chat(&system, "What is a keel?"));
        let b = facts("/v1/chat/completions", &chat(&system, "What is a mast?"));
        assert_eq!(a.model.as_deref(), Some("m"));
        assert!(a.prefix.is_some());
        assert_eq!(a.prefix, b.prefix);
        let other = facts("/v1/chat/completions", &chat(&"You write poems. ".repeat(80), "What is a keel?"));
        assert_ne!(a.prefix, other.prefix);
    }

    #[test]
    fn short_prompts_that_differ_get_different_keys() {
        let a = facts("/v1/chat/completions", &chat("Be brief.", "What is a keel?"));
        let b = facts("/v1/chat/completions", &chat("Be brief.", "What is a mast?"));
        assert_ne!(a.prefix, b.prefix);
    }

    #[test]
    fn every_api_has_its_prompt_read() {
        let bodies = [
            ("/v1/completions", r#"{"model":"m","prompt":"Once upon a time"}"#),
            ("/v1/completions", r#"{"model":"m","prompt":["Once upon a time"]}"#),
            ("/api/generate", r#"{"model":"m","prompt":"Once upon a time","system":"x"}"#),
            ("/api/chat", r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#),
            (
                "/v1/messages",
                r#"{"model":"m","system":"s","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}"#,
            ),
            ("/v1/responses", r#"{"model":"m","input":"hi"}"#),
            ("/v1/responses", r#"{"model":"m","instructions":"s","input":[{"role":"user","content":"hi"}]}"#),
        ];
        for (path, body) in bodies {
            let f = facts(path, body.as_bytes());
            assert!(f.prefix.is_some() && f.model.as_deref() == Some("m"), "{path} {body}");
        }
        // The same prompt for another model is another key: another cache.
        let a = facts("/v1/completions", br#"{"model":"a","prompt":"x"}"#);
        let b = facts("/v1/completions", br#"{"model":"b","prompt":"x"}"#);
        assert_ne!(a.prefix, b.prefix);
    }

    #[test]
    fn openai_streams_that_did_not_ask_for_usage_are_told_apart() {
        let unasked = |path: &str, body: &str| facts(path, body.as_bytes()).usage_unasked;
        assert!(unasked("/v1/chat/completions", r#"{"model":"m","stream":true,"messages":[]}"#));
        assert!(unasked("/v1/completions", r#"{"stream":true,"stream_options":{"include_usage":false}}"#));
        assert!(!unasked("/v1/chat/completions", r#"{"stream":true,"stream_options":{"include_usage":true}}"#));
        assert!(!unasked("/v1/chat/completions", r#"{"model":"m","messages":[]}"#));
        assert!(!unasked("/api/chat", r#"{"model":"m","stream":true,"messages":[]}"#));
    }

    #[test]
    fn bodies_without_a_prompt_or_not_json_have_no_key() {
        assert_eq!(facts("/v1/chat/completions", b"not json"), RequestFacts::default());
        assert_eq!(facts("/v1/embeddings", br#"{"model":"e","input":"x"}"#).prefix, None);
        let huge = format!(r#"{{"model":"m","prompt":"{}"}}"#, "é".repeat(10_000));
        assert!(
            facts("/v1/completions", huge.as_bytes()).prefix.is_some(),
            "a cut inside a character is fine: bytes are hashed"
        );
    }
}
