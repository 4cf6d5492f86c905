//! Tool calls in the APIs: reading a request's `tools` and `tool_choice`, and turning a model's
//! answer into text and calls, whole or as it streams.

use berth_engine::tools::{MAX_TOOLS, Tool, ToolCall, ToolChoice, ToolFormat, ToolPlan};
use serde_json::{Value, json};

use crate::error::ApiError;

/// A function name as OpenAI allows it: letters, digits, `_` and `-`, at most 64.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// OpenAI's `tools` (functions only), `tool_choice` and `parallel_tool_calls`; `None` when the
/// request has no tools. The format is the model's: the engine sets it (`Engine::tool_plan`).
pub fn openai_tools(
    tools: &Option<Value>,
    choice: &Option<Value>,
    parallel: &Option<Value>,
) -> Result<Option<ToolPlan>, ApiError> {
    let list = match tools {
        None | Some(Value::Null) => return check_choice_without_tools(choice).map(|_| None),
        Some(Value::Array(items)) if items.is_empty() => return check_choice_without_tools(choice).map(|_| None),
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(ApiError::invalid(
                "tools",
                "tools must be a list of {\"type\": \"function\", \"function\": {...}}",
            ));
        }
    };
    if list.len() > MAX_TOOLS {
        return Err(ApiError::invalid("tools", format!("tools takes at most {MAX_TOOLS} functions")));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let param = format!("tools[{i}]");
        if item.get("type").and_then(Value::as_str) != Some("function") {
            return Err(ApiError::invalid(&param, format!("{param}: only tools of type `function` are supported")));
        }
        let Some(f) = item.get("function").and_then(Value::as_object) else {
            return Err(ApiError::invalid(&param, format!("{param}: a function tool needs a `function` object")));
        };
        let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
        if !valid_name(name) {
            return Err(ApiError::invalid(
                &format!("{param}.function.name"),
                format!("{param}.function.name must be 1 to 64 letters, digits, `_` or `-`, got {name:?}"),
            ));
        }
        if out.iter().any(|t: &Tool| t.name == name) {
            return Err(ApiError::invalid(&param, format!("{param}: the function name `{name}` is used twice")));
        }
        let parameters = match f.get("parameters") {
            None | Some(Value::Null) => json!({}),
            Some(p @ Value::Object(_)) => p.clone(),
            Some(_) => {
                return Err(ApiError::invalid(
                    &format!("{param}.function.parameters"),
                    format!("{param}.function.parameters must be a JSON schema object"),
                ));
            }
        };
        let description = f.get("description").and_then(Value::as_str).map(str::to_string);
        out.push(Tool { name: name.to_string(), description, parameters });
    }
    let choice = match choice {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) if s == "auto" => ToolChoice::Auto,
        Some(Value::String(s)) if s == "none" => ToolChoice::None,
        Some(Value::String(s)) if s == "required" => ToolChoice::Required,
        Some(v @ Value::Object(_)) => {
            let name = v.pointer("/function/name").and_then(Value::as_str).unwrap_or_default();
            if !out.iter().any(|t| t.name == name) {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!("tool_choice names the function {name:?}, which is not among the request's tools"),
                ));
            }
            ToolChoice::Function(name.to_string())
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "tool_choice",
                "tool_choice must be `auto`, `none`, `required` or {\"type\": \"function\", \"function\": {\"name\": ...}}",
            ));
        }
    };
    let parallel = match parallel {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::invalid("parallel_tool_calls", "parallel_tool_calls must be true or false")),
    };
    Ok(Some(ToolPlan { format: ToolFormat::Generic, tools: out, choice, parallel }))
}

fn check_choice_without_tools(choice: &Option<Value>) -> Result<(), ApiError> {
    match choice {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(s)) if s == "none" || s == "auto" => Ok(()),
        Some(_) => Err(ApiError::invalid("tool_choice", "tool_choice needs tools to choose from")),
    }
}

/// Calls in OpenAI's `message.tool_calls` shape.
pub fn openai_calls(calls: &[ToolCall]) -> Value {
    calls
        .iter()
        .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
        .collect()
}

/// The text the parser reads: the answer's text, with a format's opening token written out where
/// it is a control token (which prints as nothing).
pub fn answer_text(
    plan: &ToolPlan,
    tokenizer: &berth_engine::tokenizer::Tokenizer,
    text: &str,
    tokens: &[u32],
) -> String {
    match marker_token(plan, tokenizer) {
        Some((id, marker)) if tokens.contains(&id) => {
            let mut out = String::new();
            let mut bytes = Vec::new();
            for &t in tokens {
                if t == id {
                    out.push_str(&String::from_utf8_lossy(&std::mem::take(&mut bytes)));
                    out.push_str(marker);
                } else {
                    bytes.extend(tokenizer.token_bytes(t));
                }
            }
            out.push_str(&String::from_utf8_lossy(&bytes));
            out
        }
        _ => text.to_string(),
    }
}

/// A call's opening as a control token (printed as nothing), if it is one in this vocabulary.
fn marker_token(plan: &ToolPlan, tokenizer: &berth_engine::tokenizer::Tokenizer) -> Option<(u32, &'static str)> {
    let m = plan.format.opening()?;
    berth_engine::tools::control_token(tokenizer, m).map(|id| (id, m))
}

/// An answer with tools as it streams: text before a call goes out at once; from where a call may
/// begin it is held, and at the end the calls are parsed.
pub struct ToolStream {
    plan: ToolPlan,
    marker_token: Option<(u32, &'static str)>,
    buffer: String,
    /// Bytes of `buffer` sent as content.
    sent: usize,
    calling: bool,
}

impl ToolStream {
    pub fn new(plan: ToolPlan, tokenizer: &berth_engine::tokenizer::Tokenizer) -> ToolStream {
        let marker_token = marker_token(&plan, tokenizer);
        ToolStream { plan, marker_token, buffer: String::new(), sent: 0, calling: false }
    }

    /// Take a token's text; returns the content that may go out now.
    pub fn push(&mut self, token: Option<u32>, text: &str) -> String {
        if let (Some(t), Some((id, m))) = (token, self.marker_token)
            && t == id
        {
            self.buffer.push_str(m);
        }
        self.buffer.push_str(text);
        let Some(m) = self.plan.format.opening() else { return String::new() };
        if self.calling {
            return String::new();
        }
        let unsent = &self.buffer[self.sent..];
        let safe = match unsent.find(m) {
            Some(at) => {
                self.calling = true;
                at
            }
            // Hold back a tail that may be the start of the marker.
            None => unsent.len() - berth_engine::stop::held_prefix_len(unsent, m),
        };
        let out = unsent[..safe].to_string();
        self.sent += safe;
        out
    }

    /// The end: content not yet sent, and the calls.
    pub fn finish(self, id_seed: &str) -> (String, Vec<ToolCall>) {
        let (content, calls) = self.plan.parse(&self.buffer, id_seed);
        if !calls.is_empty() {
            // Text before the call went out already (formats with a marker); the rest is calls.
            let sent_all = self.plan.format.opening().is_some();
            return (if sent_all { String::new() } else { content }, calls);
        }
        match self.plan.format.opening() {
            Some(_) => (self.buffer[self.sent..].to_string(), calls),
            None => (content, calls),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(format: ToolFormat) -> ToolPlan {
        ToolPlan { format, tools: Vec::new(), choice: ToolChoice::Auto, parallel: true }
    }

    /// A stand-in for the stream's tokenizer-free path (markers as text).
    fn stream(format: ToolFormat, pieces: &[&str]) -> (String, Vec<ToolCall>) {
        let mut s =
            ToolStream { plan: plan(format), marker_token: None, buffer: String::new(), sent: 0, calling: false };
        let mut content: String = pieces.iter().map(|p| s.push(None, p)).collect();
        let (rest, calls) = s.finish("x");
        content.push_str(&rest);
        (content, calls)
    }

    #[test]
    fn text_streams_until_a_call_begins() {
        let (content, calls) = stream(
            ToolFormat::Hermes,
            &["Hello", " <tool", "_call>\n{\"name\": \"f\", \"arguments\": {}}", "\n</tool_call>"],
        );
        assert_eq!(content, "Hello ");
        assert_eq!(calls.len(), 1);
        let (content, calls) = stream(ToolFormat::Hermes, &["a <", "b"]);
        assert_eq!((content.as_str(), calls.len()), ("a <b", 0), "a held-back `<` goes out when no call follows");
        let (content, calls) = stream(ToolFormat::Generic, &["{\"response\": ", "\"hi\"}"]);
        assert_eq!((content.as_str(), calls.len()), ("hi", 0));
        let (content, calls) = stream(
            ToolFormat::XmlFunction,
            &[
                "Sure.\n<tool",
                "_call>\n<function=f>\n<parameter=x>\n",
                "a < b\n</parameter>\n</function>\n</tool_call>",
            ],
        );
        assert_eq!(content, "Sure.\n");
        assert_eq!((calls[0].name.as_str(), calls[0].arguments.as_str()), ("f", r#"{"x":"a < b"}"#));
        let (content, calls) =
            stream(ToolFormat::Functools, &["Ok. func", "tools[{\"name\": \"f\", \"arguments\": {}}]"]);
        assert_eq!((content.as_str(), calls.len()), ("Ok. ", 1));
        let (content, calls) =
            stream(ToolFormat::ToolCallTags, &["<TOOL", "CALL>[{\"name\": \"f\", \"arguments\": {}}]</TOOLCALL>"]);
        assert_eq!((content.as_str(), calls.len()), ("", 1));
    }

    #[test]
    fn tool_requests_are_checked() {
        let tools =
            Some(json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]));
        let named = Some(json!({"type": "function", "function": {"name": "get_weather"}}));
        let p = openai_tools(&tools, &named, &None).unwrap().unwrap();
        assert_eq!(p.choice, ToolChoice::Function("get_weather".into()));
        assert!(p.parallel);
        let other = Some(json!({"type": "function", "function": {"name": "nope"}}));
        assert_eq!(openai_tools(&tools, &other, &None).unwrap_err().param.as_deref(), Some("tool_choice"));
        let bad = Some(json!([{"type": "function", "function": {"name": "has space"}}]));
        assert!(openai_tools(&bad, &None, &None).is_err());
        assert!(openai_tools(&None, &Some(json!("required")), &None).is_err());
    }
}

/// A chat answer as it streams, taken apart: a reasoning model's thought (between `<think>` and
/// `</think>`), the text of the answer, and its tool calls.
pub struct AnswerStream {
    think: Option<berth_engine::reasoning::ThinkSplitter>,
    tools: Option<ToolStream>,
}

/// What one piece of an answer adds.
#[derive(Default)]
pub struct AnswerPiece {
    pub reasoning: String,
    pub content: String,
}

impl AnswerStream {
    /// `prompt`: the request's tokens (whether they opened a thought already).
    pub fn new(model: &crate::models::LoadedModel, prompt: &[u32], tools: Option<ToolPlan>) -> AnswerStream {
        let tokenizer = model.engine.tokenizer();
        let think = model.engine.reasons().then(|| {
            let tail = tokenizer.decode(&prompt[prompt.len().saturating_sub(16)..]);
            berth_engine::reasoning::ThinkSplitter::new(berth_engine::reasoning::prompt_opens_thought(&tail))
        });
        AnswerStream { think, tools: tools.map(|t| ToolStream::new(model.engine.tool_plan(t), tokenizer)) }
    }

    pub fn push(&mut self, token: Option<u32>, text: &str) -> AnswerPiece {
        let (reasoning, content) = match self.think.as_mut() {
            Some(t) => {
                let s = t.push(text);
                (s.reasoning, s.content)
            }
            None => (String::new(), text.to_string()),
        };
        let content = match self.tools.as_mut() {
            // The marker token rides with the text it came with; after a thought it is the answer's.
            Some(ts) => ts.push(token, &content),
            None => content,
        };
        AnswerPiece { reasoning, content }
    }

    /// The end: what is still held, and the calls (the stream is spent after this).
    pub fn finish(&mut self, id_seed: &str) -> (AnswerPiece, Vec<ToolCall>) {
        let mut piece = AnswerPiece::default();
        if let Some(t) = self.think.take() {
            let s = t.finish();
            piece.reasoning = s.reasoning;
            piece.content = match self.tools.as_mut() {
                Some(ts) => ts.push(None, &s.content),
                None => s.content,
            };
        }
        match self.tools.take() {
            Some(ts) => {
                let (rest, calls) = ts.finish(id_seed);
                piece.content.push_str(&rest);
                (piece, calls)
            }
            None => (piece, Vec::new()),
        }
    }

    /// A whole answer taken apart (what the stream would give, at once).
    pub fn whole(
        mut self,
        out: &berth_engine::GenerationOutput,
        tokenizer: &berth_engine::tokenizer::Tokenizer,
        id_seed: &str,
    ) -> (AnswerPiece, Vec<ToolCall>) {
        let text = match &self.tools {
            Some(ts) => answer_text(&ts.plan, tokenizer, &out.text, &out.tokens),
            None => out.text.clone(),
        };
        // The marker is written out in the text already: no token to insert it for.
        let first = self.push(None, &text);
        let (rest, calls) = self.finish(id_seed);
        let mut content = first.content + &rest.content;
        if !calls.is_empty() {
            // The text before a call, without the line break that led into it.
            content.truncate(content.trim_end().len());
        }
        (AnswerPiece { reasoning: first.reasoning + &rest.reasoning, content }, calls)
    }
}
