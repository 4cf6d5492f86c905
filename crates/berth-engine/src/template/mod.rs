//! Chat templates from `tokenizer.chat_template` (or an artifact's template layer), rendered with
//! minijinja the way Hugging Face renders them. A template is code from a registry, so it is
//! held to limits before it runs ([`limits`]: size, depth of its expressions) and while it runs
//! (fuel, an output cap, a stack of known size, and, in the berth binary, a worker process with
//! a memory limit and a deadline: [`sandbox`]). Whatever a template does, the outcome is a
//! [`EngineError::Template`] for that request.

mod limits;
mod pyrepr;
mod render;
pub mod sandbox;
mod strftime;
pub(crate) use strftime::strftime_now;
mod tojson;

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::EngineError;
pub use limits::{MAX_SOURCE_BYTES, MAX_TAG_PARTS};
pub use render::MAX_RENDERED_BYTES;

/// The roles a message may have, in every API (OpenAI's `developer` is its name for `system`).
pub const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    /// The calls an assistant message made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<crate::tools::ToolCall>,
    /// Which call a `tool` message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// The tool's name, on a `tool` message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
        }
    }

    /// The message as chat templates see it (Hugging Face's shape: a call's arguments as an
    /// object, which templates print with `tojson`; text that is not JSON stays a string).
    pub fn to_template_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({"role": self.role, "content": self.content});
        if !self.tool_calls.is_empty() {
            v["tool_calls"] = self
                .tool_calls
                .iter()
                .map(|c| {
                    serde_json::json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments_value()}})
                })
                .collect();
        }
        if let Some(id) = &self.tool_call_id {
            v["tool_call_id"] = serde_json::json!(id);
        }
        if let Some(name) = &self.name {
            v["name"] = serde_json::json!(name);
        }
        v
    }
}

/// A checked, compilable template and the BOS/EOS texts it may print.
#[derive(Clone)]
pub struct ChatTemplate {
    job: render::Job,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Check and compile a template: oversized or over-deep sources and syntax errors are
    /// reported here, not at the first request.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, EngineError> {
        limits::check(source).map_err(EngineError::Template)?;
        let job = render::Job {
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            render: None,
        };
        sandbox::run(&job).map_err(EngineError::Template)?;
        Ok(Self { job })
    }

    /// The template's text.
    pub fn source(&self) -> &str {
        &self.job.source
    }

    /// Render messages; with `add_generation_prompt`, the opening of the assistant's turn follows.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, EngineError> {
        let messages: Vec<serde_json::Value> = messages.iter().map(Message::to_template_json).collect();
        self.render_json(messages, add_generation_prompt, serde_json::Map::new())
    }

    /// Render messages given as JSON objects (with tool calls, names, ...) and more variables
    /// (`tools`, `enable_thinking`, ...), as Hugging Face's `apply_chat_template` does.
    pub fn render_json(
        &self,
        messages: Vec<serde_json::Value>,
        add_generation_prompt: bool,
        extra: serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, EngineError> {
        let job = render::Job {
            render: Some(render::RenderInput { messages, add_generation_prompt, extra }),
            ..self.job.clone()
        };
        sandbox::run(&job).map_err(EngineError::Template)
    }
}

/// Vet a template before it is stored (`berth package`): within the limits, compiled, and able
/// to render a plain conversation in bounded time and memory. Templates that raise for this
/// conversation are refused too: every chat would fail.
pub fn vet(source: &str) -> Result<(), EngineError> {
    let template = ChatTemplate::new(source, "<s>", "</s>")?;
    let conversation = [
        Message::new("user", "Hello"),
        Message::new("assistant", "Hello! How can I help?"),
        Message::new("user", "Bye"),
    ];
    template.render(&conversation, true).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    #[test]
    fn renders() {
        let t = ChatTemplate::new(CHATML, "", "").unwrap();
        let r = t.render(&[Message::new("user", "hi")], true).unwrap();
        assert_eq!(r, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn python_string_methods_work() {
        let t =
            ChatTemplate::new("{{ messages[0].content.strip().upper() }}{{ 'x'.startswith('x') }}", "", "").unwrap();
        assert_eq!(
            t.render(&[Message::new("user", "  a b ")], false).unwrap(),
            "A BTrue",
            "Python spelling of booleans"
        );
    }

    #[test]
    fn bad_templates_fail_clearly() {
        let e = ChatTemplate::new("{% for m in messages %}", "", "").unwrap_err();
        assert!(e.to_string().contains("chat template"), "{e}");
        // As in jinja2: an undefined value prints as nothing, but has no attributes.
        let t = ChatTemplate::new("[{{ nope }}]", "", "").unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "[]");
        let t = ChatTemplate::new("{{ nope.attr }}", "", "").unwrap();
        assert!(t.render(&[], false).unwrap_err().to_string().contains("undefined"));
        let t = ChatTemplate::new("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "", "").unwrap();
        assert!(t.render(&[], false).is_err(), "runaway recursion is stopped");
        let t = ChatTemplate::new(
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        assert!(t.render(&[], false).is_err(), "runaway loops are stopped");
        let t = ChatTemplate::new("{{ raise_exception('only user and assistant roles') }}", "", "").unwrap();
        assert!(t.render(&[], false).unwrap_err().to_string().contains("only user and assistant roles"));
    }

    #[test]
    fn deep_expressions_are_refused_before_they_can_overflow_a_stack() {
        for source in [
            format!("{{{{ 'x'{} }}}}", "|trim".repeat(5000)),
            format!("{{% if {}true %}}x{{% endif %}}", "not ".repeat(5000)),
            format!("{{{{ {}1{} }}}}", "(".repeat(5000), ")".repeat(5000)),
        ] {
            let e = ChatTemplate::new(&source, "", "").unwrap_err().to_string();
            assert!(e.contains("parts"), "{e}");
        }
        // Just under the limit compiles and renders on the renderer's own stack, even when the
        // caller's stack is small.
        let source = format!("{{{{ 'x'{} }}}}", "|trim".repeat(MAX_TAG_PARTS / 2 - 2));
        let rendered = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || ChatTemplate::new(&source, "", "").and_then(|t| t.render(&[], false)))
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(rendered.unwrap(), "x");
    }
}
