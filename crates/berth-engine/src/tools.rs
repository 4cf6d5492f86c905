//! Tool calling: how a model's chat template expects tools and how its output spells a call.
//!
//! The format is read from the template, not from the model's name, as llama.cpp does:
//! - [`ToolFormat::Hermes`]: `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>` (Qwen 2.5,
//!   Qwen3, Hermes 2 Pro/3, SmolLM3, MiMo);
//! - [`ToolFormat::Mistral`]: `[TOOL_CALLS][{"name": …, "arguments": {…}, "id": "…"}]` (Mistral
//!   Nemo, Ministral, Devstral);
//! - [`ToolFormat::Llama3`]: a bare JSON object `{"name": …, "parameters": {…}}`, or
//!   `<|python_tag|>` before it (Llama 3.1–3.3);
//! - [`ToolFormat::CallList`]: `<|tool_call|>[{"name": …, "arguments": {…}}]` (Granite 3.x);
//! - [`ToolFormat::DeepSeekR1`] (DeepSeek-R1 and its distills):
//!   `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME`, the arguments in a json
//!   fence, `<｜tool▁call▁end｜>…<｜tool▁calls▁end｜>`;
//! - [`ToolFormat::XmlFunction`] (Qwen3-Coder, Qwen3.5, Nemotron 3): `<tool_call>\n<function=NAME>\n`,
//!   each argument as `<parameter=KEY>\nVALUE\n</parameter>\n`, then `</function>\n</tool_call>`;
//! - [`ToolFormat::Functools`]: `functools[{"name": …, "arguments": {…}}]` (Phi-4-mini, FireFunction
//!   v2);
//! - [`ToolFormat::ToolCallTags`]: `<TOOLCALL>[{"name": …, "arguments": {…}}]</TOOLCALL>` (Nemotron
//!   Nano 2);
//! - [`ToolFormat::Generic`]: a template that knows no tools (SmolLM2's, for one). The tools are
//!   described in the system message and the whole answer is JSON, `{"tool_calls": […]}` or
//!   `{"response": "…"}`, always grammar-constrained, so every model can call tools.
//!
//! [`ToolPlan`] says, for one request, what the template is given, which grammar constrains the
//! answer (all of it under `required` or a named function; under `auto`, only once the model
//! opens a call: a lazy grammar whose trigger is the format's opening token), and
//! [`ToolPlan::parse`] splits the answer into text and calls.

use serde_json::{Map, Value, json};

use crate::constraint::{ConstraintSpec, Trigger};
use crate::tokenizer::Tokenizer;

/// Most tools one request may declare.
pub const MAX_TOOLS: usize = 128;

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// The arguments' JSON schema (an object schema; `{}` when the tool declares none).
    pub parameters: Value,
}

/// What the request lets the model do with its tools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    Auto,
    None,
    Required,
    Function(String),
}

/// A call the model made.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text (what OpenAI's `function.arguments` carries).
    pub arguments: String,
}

impl ToolCall {
    /// The arguments as templates print them: the JSON value (templates use `tojson` on it), or the
    /// text as it is where it is not JSON.
    pub fn arguments_value(&self) -> Value {
        serde_json::from_str(&self.arguments).unwrap_or_else(|_| Value::String(self.arguments.clone()))
    }
}

/// How a template's model spells tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    Generic,
    Hermes,
    Mistral,
    Llama3,
    CallList,
    DeepSeekR1,
    XmlFunction,
    Functools,
    ToolCallTags,
}

const DEEPSEEK_CALLS_BEGIN: &str = "<｜tool▁calls▁begin｜>";
const DEEPSEEK_CALLS_END: &str = "<｜tool▁calls▁end｜>";
const DEEPSEEK_CALL_BEGIN: &str = "<｜tool▁call▁begin｜>";
const DEEPSEEK_CALL_END: &str = "<｜tool▁call▁end｜>";
const DEEPSEEK_SEP: &str = "<｜tool▁sep｜>";
const FUNCTOOLS: &str = "functools";

impl ToolFormat {
    pub const ALL: [ToolFormat; 9] = [
        ToolFormat::Generic,
        ToolFormat::Hermes,
        ToolFormat::Mistral,
        ToolFormat::Llama3,
        ToolFormat::CallList,
        ToolFormat::DeepSeekR1,
        ToolFormat::XmlFunction,
        ToolFormat::Functools,
        ToolFormat::ToolCallTags,
    ];

    /// The format a chat template's text shows (none of them: the generic one).
    pub fn of_template(source: &str) -> ToolFormat {
        if source.contains("<function=") && source.contains("<parameter=") {
            ToolFormat::XmlFunction
        } else if source.contains("<tool_call>") && !source.contains("<function=") {
            ToolFormat::Hermes
        } else if source.contains("[TOOL_CALLS]") {
            ToolFormat::Mistral
        } else if source.contains(DEEPSEEK_CALL_BEGIN) {
            ToolFormat::DeepSeekR1
        } else if source.contains("<TOOLCALL>") {
            ToolFormat::ToolCallTags
        } else if source.contains("<|tool_call|>") {
            ToolFormat::CallList
        } else if source.contains("functools[") || (source.contains("<|tool|>") && source.contains("<|/tool|>")) {
            // FireFunction v2 spells it out; Phi-4-mini's template only takes the tools (in the
            // system message, between `<|tool|>` tags) and its model answers `functools[…]`.
            ToolFormat::Functools
        } else if source.contains("<|python_tag|>")
            || (source.contains("<|start_header_id|>") && source.contains("\"parameters\""))
        {
            ToolFormat::Llama3
        } else {
            ToolFormat::Generic
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ToolFormat::Generic => "generic",
            ToolFormat::Hermes => "hermes",
            ToolFormat::Mistral => "mistral",
            ToolFormat::Llama3 => "llama3",
            ToolFormat::CallList => "call-list",
            ToolFormat::DeepSeekR1 => "deepseek-r1",
            ToolFormat::XmlFunction => "xml-function",
            ToolFormat::Functools => "functools",
            ToolFormat::ToolCallTags => "toolcall-tags",
        }
    }

    /// The text that opens a call, in formats that have one.
    pub fn opening(self) -> Option<&'static str> {
        match self {
            ToolFormat::Hermes => Some("<tool_call>"),
            ToolFormat::Mistral => Some("[TOOL_CALLS]"),
            ToolFormat::CallList => Some("<|tool_call|>"),
            ToolFormat::DeepSeekR1 => Some(DEEPSEEK_CALLS_BEGIN),
            ToolFormat::XmlFunction => Some("<tool_call>"),
            ToolFormat::Functools => Some(FUNCTOOLS),
            ToolFormat::ToolCallTags => Some("<TOOLCALL>"),
            ToolFormat::Generic | ToolFormat::Llama3 => None,
        }
    }
}

/// A grammar that applies only from a token on (the opening of a call under `auto`).
#[derive(Debug, Clone, PartialEq)]
pub struct LazyGrammar {
    pub trigger: Trigger,
    pub spec: ConstraintSpec,
}

/// One request's tools, as the template, the sampler and the answer's parser need them.
#[derive(Debug, Clone)]
pub struct ToolPlan {
    pub format: ToolFormat,
    pub tools: Vec<Tool>,
    pub choice: ToolChoice,
    pub parallel: bool,
}

/// How the answer is constrained.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolGrammar {
    /// The model answers freely (`none`, or `auto` in a format without an opening token).
    Free,
    /// All of the answer.
    Whole(ConstraintSpec),
    /// From the opening token of a call on.
    Lazy(LazyGrammar),
}

impl ToolPlan {
    /// The tools as chat templates take them (`tools`: OpenAI's shape, as Hugging Face passes it).
    pub fn template_tools(&self) -> Value {
        Value::Array(
            self.template_functions().into_iter().map(|f| json!({"type": "function", "function": f})).collect(),
        )
    }

    /// The functions alone (`{"name", "description"?, "parameters"}`), as templates that print
    /// them as JSON text want them (FireFunction's `functions`, Phi-4-mini's system `tools`).
    pub fn template_functions(&self) -> Vec<Value> {
        self.tools
            .iter()
            .map(|t| {
                let mut f = json!({"name": t.name, "parameters": t.parameters});
                if let Some(d) = &t.description {
                    f["description"] = json!(d);
                }
                f
            })
            .collect()
    }

    /// The tools a call may name under this choice.
    fn callable(&self) -> Vec<&Tool> {
        match &self.choice {
            ToolChoice::Function(name) => self.tools.iter().filter(|t| &t.name == name).collect(),
            ToolChoice::None => Vec::new(),
            _ => self.tools.iter().collect(),
        }
    }

    /// The JSON schema of one call in this format's words (`arguments`, or Llama's `parameters`).
    fn call_schema(&self, with_id: bool) -> Value {
        let key = if self.format == ToolFormat::Llama3 { "parameters" } else { "arguments" };
        let options: Vec<Value> = self
            .callable()
            .iter()
            .map(|t| {
                let mut properties = Map::new();
                properties.insert("name".into(), json!({"const": t.name}));
                properties.insert(key.into(), arguments_schema(&t.parameters));
                let mut required = vec![json!("name"), json!(key)];
                if with_id {
                    properties.insert("id".into(), json!({"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"}));
                    required.push(json!("id"));
                }
                json!({"type": "object", "properties": properties, "required": required, "additionalProperties": false})
            })
            .collect();
        if options.len() == 1 { options.into_iter().next().unwrap_or_default() } else { json!({"anyOf": options}) }
    }

    /// One or more calls as a JSON list (one at most without parallel calls).
    fn call_array(&self, with_id: bool) -> Value {
        let mut array = json!({"type": "array", "items": self.call_schema(with_id), "minItems": 1});
        if !self.parallel {
            array["maxItems"] = json!(1);
        }
        array
    }

    /// The generic format's whole answer: calls, or (unless a call is required) a reply.
    fn generic_schema(&self) -> Value {
        let call = self.call_schema(false);
        let calls = if self.parallel {
            json!({"type": "object", "properties": {"tool_calls": {"type": "array", "items": call, "minItems": 1}},
                   "required": ["tool_calls"], "additionalProperties": false})
        } else {
            json!({"type": "object", "properties": {"tool_call": call}, "required": ["tool_call"],
                   "additionalProperties": false})
        };
        match self.choice {
            ToolChoice::Required | ToolChoice::Function(_) => calls,
            _ => json!({"anyOf": [calls, {"type": "object", "properties": {"response": {"type": "string"}},
                                          "required": ["response"], "additionalProperties": false}]}),
        }
    }

    /// The grammar for this request's answer; `tokenizer` finds the format's opening token.
    pub fn grammar(&self, tokenizer: &Tokenizer) -> ToolGrammar {
        if self.choice == ToolChoice::None || self.callable().is_empty() {
            return ToolGrammar::Free;
        }
        let forced = matches!(self.choice, ToolChoice::Required | ToolChoice::Function(_));
        let json = crate::constraint::lark_json;
        // More calls after the first, where parallel calls are allowed.
        let more = |call_with_separator: String| {
            if self.parallel { format!(" ({call_with_separator})*") } else { String::new() }
        };
        match self.format {
            ToolFormat::Generic => ToolGrammar::Whole(ConstraintSpec::JsonSchema(self.generic_schema())),
            ToolFormat::Hermes => {
                let call = json(&self.call_schema(false));
                let open = special(tokenizer, "<tool_call>");
                let rest = format!(
                    "\"\\n\" {call} \"\\n</tool_call>\"{}",
                    more(format!("\"\\n\" {open} \"\\n\" {call} \"\\n</tool_call>\""))
                );
                self.opened(tokenizer, forced, "<tool_call>", &rest)
            }
            ToolFormat::Mistral => self.opened(tokenizer, forced, "[TOOL_CALLS]", &json(&self.call_array(true))),
            ToolFormat::CallList => self.opened(tokenizer, forced, "<|tool_call|>", &json(&self.call_array(false))),
            ToolFormat::DeepSeekR1 => {
                let literal = |text: String| serde_json::to_string(&text).unwrap_or_default();
                let call = self
                    .callable()
                    .iter()
                    .map(|t| {
                        format!(
                            "({} \"function\" {} {} {} \"```\" {})",
                            special(tokenizer, DEEPSEEK_CALL_BEGIN),
                            special(tokenizer, DEEPSEEK_SEP),
                            literal(format!("{}\n```json\n", t.name)),
                            json(&arguments_schema(&t.parameters)),
                            special(tokenizer, DEEPSEEK_CALL_END)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(" | ");
                let rest = format!("({call}){} {}", more(call.clone()), special(tokenizer, DEEPSEEK_CALLS_END));
                self.opened(tokenizer, forced, DEEPSEEK_CALLS_BEGIN, &rest)
            }
            ToolFormat::Functools => self.opened(tokenizer, forced, FUNCTOOLS, &json(&self.call_array(false))),
            ToolFormat::ToolCallTags => {
                let rest = format!("{} {}", json(&self.call_array(false)), special(tokenizer, "</TOOLCALL>"));
                self.opened(tokenizer, forced, "<TOOLCALL>", &rest)
            }
            ToolFormat::XmlFunction => {
                let (call, rules) = self.xml_call();
                let open = special(tokenizer, "<tool_call>");
                let rest = format!(
                    "\"\\n\" {call} \"\\n</tool_call>\"{}\n{rules}",
                    more(format!("\"\\n\" {open} \"\\n\" {call} \"\\n</tool_call>\""))
                );
                self.opened(tokenizer, forced, "<tool_call>", &rest)
            }
            ToolFormat::Llama3 => {
                // A call is a bare JSON object with no opening token: constrained only when a
                // call is required; under `auto` the answer is parsed as it comes.
                if forced {
                    let call = json(&self.call_schema(false));
                    ToolGrammar::Whole(ConstraintSpec::Lark(format!("start: {call}{}", more(format!("\"; \" {call}")))))
                } else {
                    ToolGrammar::Free
                }
            }
        }
    }

    /// One call in the XML format as a Lark expansion, and the rules it uses: each declared
    /// parameter in its own tag, required ones always, optional ones maybe; a string's value is
    /// raw text up to its closing tag (a lazy rule), any other value JSON of its schema.
    fn xml_call(&self) -> (String, String) {
        let json = crate::constraint::lark_json;
        let literal = |text: String| serde_json::to_string(&text).unwrap_or_default();
        let mut rules = Vec::new();
        let calls: Vec<String> = self
            .callable()
            .iter()
            .map(|t| {
                let schema = arguments_schema(&t.parameters);
                let required: Vec<&str> =
                    schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
                let mut params = String::new();
                for (key, property) in schema["properties"].as_object().into_iter().flatten() {
                    let open = literal(format!("<parameter={key}>\n"));
                    let value = if is_raw_text_schema(property) {
                        let rule = format!("xml_text_{}", rules.len());
                        let body = match property["maxLength"].as_u64() {
                            Some(n) if n <= 1000 => format!("/(.|\\n){{0,{n}}}/"),
                            _ => "/(.|\\n)*/".to_string(),
                        };
                        rules.push(format!("{rule}[suffix=\"\\n</parameter>\\n\"]: {body}"));
                        rule
                    } else {
                        format!("{} \"\\n</parameter>\\n\"", json(property))
                    };
                    let param = format!("{open} {value}");
                    if required.contains(&key.as_str()) {
                        params.push_str(&format!(" {param}"));
                    } else {
                        params.push_str(&format!(" ({param})?"));
                    }
                }
                format!("({}{params} \"</function>\")", literal(format!("<function={}>\n", t.name)))
            })
            .collect();
        (format!("({})", calls.join(" | ")), rules.join("\n"))
    }

    /// A format whose calls open with `opening`: all of the answer is the call when one is forced;
    /// otherwise the grammar waits for the opening (a lazy grammar).
    fn opened(&self, tokenizer: &Tokenizer, forced: bool, opening_text: &str, rest: &str) -> ToolGrammar {
        if forced {
            ToolGrammar::Whole(ConstraintSpec::Lark(format!("start: {} {rest}", special(tokenizer, opening_text))))
        } else {
            ToolGrammar::Lazy(LazyGrammar {
                trigger: opening(tokenizer, opening_text),
                spec: ConstraintSpec::Lark(format!("start: {rest}")),
            })
        }
    }

    /// The system message the generic format adds: the tools and how to answer.
    pub fn generic_instructions(&self) -> String {
        let tools: Vec<Value> = self
            .tools
            .iter()
            .map(|t| json!({"name": t.name, "description": t.description, "parameters": t.parameters}))
            .collect();
        let example = if self.parallel {
            r#"{"tool_calls": [{"name": "tool_name", "arguments": {"arg1": "some_value"}}]}"#
        } else {
            r#"{"tool_call": {"name": "tool_name", "arguments": {"arg1": "some_value"}}}"#
        };
        format!(
            "You can call any of the following tools to satisfy the user's requests: {}\n\nExample tool call syntax:\n\n{example}\n\nRespond in JSON format, either with `tool_call` (a request to call tools) or with `response` reply to the user's request",
            serde_json::to_string_pretty(&tools).unwrap_or_default()
        )
    }

    /// Split an answer into its text and its calls (ids made up where the format has none).
    pub fn parse(&self, text: &str, id_seed: &str) -> (String, Vec<ToolCall>) {
        let (content, raw) = match self.format {
            ToolFormat::Generic => parse_generic(text),
            ToolFormat::Hermes => parse_hermes(text),
            ToolFormat::Mistral => parse_mistral(text),
            ToolFormat::Llama3 => parse_llama3(text),
            ToolFormat::CallList => parse_call_list(text),
            ToolFormat::DeepSeekR1 => parse_deepseek(text),
            ToolFormat::XmlFunction => parse_xml_function(text, &self.tools),
            ToolFormat::Functools => parse_list_after(text, FUNCTOOLS),
            ToolFormat::ToolCallTags => parse_list_after(text, "<TOOLCALL>"),
        };
        let calls = raw
            .into_iter()
            .enumerate()
            .map(|(i, (name, args, id))| ToolCall {
                id: id.unwrap_or_else(|| format!("call_{id_seed}_{i}")),
                name,
                arguments: serde_json::to_string(&args).unwrap_or_else(|_| "{}".into()),
            })
            .collect();
        (content, calls)
    }
}

/// A tool's parameters as the schema of its arguments (no parameters: an empty object).
fn arguments_schema(parameters: &Value) -> Value {
    match parameters {
        Value::Object(m) if !m.is_empty() => parameters.clone(),
        _ => json!({"type": "object", "properties": {}, "additionalProperties": false}),
    }
}

/// Whether a parameter's values are written as raw text in the XML format: strings with no rule
/// but a length limit. A string with an enum, a pattern or a format is written as JSON under the
/// grammar so the rule holds (the parser reads a raw one too: text that is not JSON stays text).
fn is_raw_text_schema(schema: &Value) -> bool {
    let is_string = match &schema["type"] {
        Value::String(t) => t == "string",
        Value::Array(types) => types.len() == 1 && types[0] == "string",
        _ => false,
    };
    const NO_RULE: [&str; 6] = ["type", "maxLength", "description", "title", "default", "examples"];
    is_string && schema.as_object().is_some_and(|o| o.keys().all(|k| NO_RULE.contains(&k.as_str())))
}

/// A token in Lark: a special (control) token by its id, otherwise its text as a literal.
fn special(tokenizer: &Tokenizer, text: &str) -> String {
    match control_token(tokenizer, text) {
        Some(id) => format!("<[{id}]>"),
        None => serde_json::to_string(text).unwrap_or_default(),
    }
}

/// The control token whose text is `text` (it prints as nothing), if the vocabulary has one.
pub fn control_token(tokenizer: &Tokenizer, text: &str) -> Option<u32> {
    tokenizer_token(tokenizer, text).filter(|&id| tokenizer.token_type(id) == crate::tokenizer::token_type::CONTROL)
}

/// A call's opening as a lazy grammar waits for it: its token, or its text where the vocabulary
/// spells it in pieces.
fn opening(tokenizer: &Tokenizer, text: &str) -> Trigger {
    match tokenizer_token(tokenizer, text) {
        Some(id) => Trigger::Token(id),
        None => Trigger::Text(text.to_string()),
    }
}

/// The id of the token whose whole text is `text`, if the vocabulary has one.
fn tokenizer_token(tokenizer: &Tokenizer, text: &str) -> Option<u32> {
    match tokenizer.encode(text, true) {
        Ok(ids) if ids.len() == 1 => Some(ids[0]),
        _ => None,
    }
}

type RawCall = (String, Value, Option<String>);

/// A JSON value at the start of `text` and the rest after it.
fn json_prefix(text: &str) -> Option<(Value, &str)> {
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    let value = stream.next()?.ok()?;
    let end = stream.byte_offset();
    Some((value, &text[end..]))
}

/// `{"name": …, "arguments"|"parameters": …, "id"?: …}` as a call.
fn call_of(v: &Value) -> Option<RawCall> {
    let obj = v.as_object()?;
    let name = obj.get("name")?.as_str()?.to_string();
    let args = obj.get("arguments").or_else(|| obj.get("parameters")).cloned().unwrap_or_else(|| json!({}));
    // Some models write the arguments as a JSON string.
    let args = match args {
        Value::String(s) => serde_json::from_str(&s).unwrap_or(Value::String(s)),
        other => other,
    };
    let id = obj.get("id").and_then(Value::as_str).map(str::to_string);
    Some((name, args, id))
}

fn parse_generic(text: &str) -> (String, Vec<RawCall>) {
    let Some((v, _)) = json_prefix(text.trim_start()) else { return (text.to_string(), Vec::new()) };
    if let Some(calls) = v.get("tool_calls").and_then(Value::as_array) {
        return (String::new(), calls.iter().filter_map(call_of).collect());
    }
    if let Some(call) = v.get("tool_call").and_then(call_of) {
        return (String::new(), vec![call]);
    }
    match v.get("response") {
        Some(Value::String(s)) => (s.clone(), Vec::new()),
        Some(other) => (other.to_string(), Vec::new()),
        None => (text.to_string(), Vec::new()),
    }
}

fn parse_hermes(text: &str) -> (String, Vec<RawCall>) {
    let Some(start) = text.find("<tool_call>") else { return (text.to_string(), Vec::new()) };
    let content = text[..start].trim_end().to_string();
    let mut calls = Vec::new();
    let mut rest = &text[start..];
    while let Some(open) = rest.find("<tool_call>") {
        let body = rest[open + "<tool_call>".len()..].trim_start();
        // A call cut off (the answer ran out of tokens) ends the list: the whole ones stand.
        let Some((c, after)) = json_prefix(body).and_then(|(v, after)| Some((call_of(&v)?, after))) else { break };
        calls.push(c);
        rest = after.trim_start().strip_prefix("</tool_call>").unwrap_or(after);
    }
    if calls.is_empty() {
        return (text.to_string(), Vec::new());
    }
    (content, calls)
}

fn parse_mistral(text: &str) -> (String, Vec<RawCall>) {
    let Some(start) = text.find("[TOOL_CALLS]") else { return (text.to_string(), Vec::new()) };
    let content = text[..start].trim_end().to_string();
    let body = text[start + "[TOOL_CALLS]".len()..].trim_start();
    match json_prefix(body) {
        Some((Value::Array(items), _)) => (content, items.iter().filter_map(call_of).collect()),
        Some((v @ Value::Object(_), _)) => (content, call_of(&v).into_iter().collect()),
        _ => (text.to_string(), Vec::new()),
    }
}

fn parse_call_list(text: &str) -> (String, Vec<RawCall>) {
    parse_list_after(text, "<|tool_call|>")
}

/// A JSON list of calls (or one call) after a marker: Granite's `<|tool_call|>`, `functools`,
/// Nemotron's `<TOOLCALL>` (whose closing tag is left alone).
fn parse_list_after(text: &str, marker: &str) -> (String, Vec<RawCall>) {
    let Some(start) = text.find(marker) else { return (text.to_string(), Vec::new()) };
    let content = text[..start].trim_end().to_string();
    match json_prefix(text[start + marker.len()..].trim_start()) {
        Some((Value::Array(items), _)) => (content, items.iter().filter_map(call_of).collect()),
        Some((v @ Value::Object(_), _)) => (content, call_of(&v).into_iter().collect()),
        _ => (text.to_string(), Vec::new()),
    }
}

fn parse_deepseek(text: &str) -> (String, Vec<RawCall>) {
    let Some(start) = text.find(DEEPSEEK_CALLS_BEGIN) else { return (text.to_string(), Vec::new()) };
    let content = text[..start].trim_end().to_string();
    let mut calls = Vec::new();
    for piece in text[start..].split(DEEPSEEK_CALL_BEGIN).skip(1) {
        let parsed =
            piece.split_once(DEEPSEEK_SEP).and_then(|(_, after)| after.split_once('\n')).and_then(|(name, body)| {
                let body = body.trim_start();
                let body = body.strip_prefix("```json").unwrap_or(body).trim_start();
                json_prefix(body).map(|(args, _)| (name.trim().to_string(), args, None))
            });
        match parsed {
            Some(call) => calls.push(call),
            // A call cut off (the answer ran out of tokens): the whole ones before it stand.
            None => break,
        }
    }
    if calls.is_empty() {
        return (text.to_string(), Vec::new());
    }
    (content, calls)
}

/// Calls in the XML format. Some models leave out the first `<tool_call>` and start at
/// `<function=`; text before a call is kept as written then (llama.cpp's test-chat.cpp cases).
/// A value is a string where the tool declares one, otherwise JSON where it parses.
fn parse_xml_function(text: &str, tools: &[Tool]) -> (String, Vec<RawCall>) {
    let start = match (text.find("<tool_call>"), text.find("<function=")) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => return (text.to_string(), Vec::new()),
    };
    let content = if text[start..].starts_with("<tool_call>") { text[..start].trim_end() } else { &text[..start] };
    let mut calls = Vec::new();
    let mut rest = &text[start..];
    while let Some(at) = rest.find("<function=") {
        let Some((name, after)) = rest[at + "<function=".len()..].split_once('>') else { break };
        // A call cut off (the answer ran out of tokens) ends the list: the whole ones stand.
        let Some((mut body, after)) = after.split_once("</function>") else { break };
        let name = name.trim();
        let properties = tools.iter().find(|t| t.name == name).map(|t| &t.parameters["properties"]);
        let mut args = Map::new();
        while let Some(p) = body.find("<parameter=") {
            let Some((key, value)) = body[p + "<parameter=".len()..].split_once('>') else { break };
            let Some((value, next)) = value.split_once("</parameter>") else { break };
            let value = value.strip_prefix('\n').unwrap_or(value);
            let value = value.strip_suffix('\n').unwrap_or(value);
            let key = key.trim();
            let raw = properties.is_some_and(|p| is_raw_text_schema(&p[key]));
            let value = if raw {
                Value::String(value.to_string())
            } else {
                serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()))
            };
            args.insert(key.to_string(), value);
            body = next;
        }
        calls.push((name.to_string(), Value::Object(args), None));
        rest = after;
    }
    if calls.is_empty() {
        return (text.to_string(), Vec::new());
    }
    (content.to_string(), calls)
}

fn parse_llama3(text: &str) -> (String, Vec<RawCall>) {
    let body = text.trim_start();
    let body = body.strip_prefix("<|python_tag|>").unwrap_or(body);
    let mut calls = Vec::new();
    let mut rest = body;
    while let Some((v, after)) = json_prefix(rest) {
        let Some(call) = call_of(&v) else { break };
        calls.push(call);
        rest = after.trim_start().trim_start_matches(';').trim_start();
        if rest.is_empty() {
            return (String::new(), calls);
        }
    }
    (text.to_string(), Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(format: ToolFormat) -> ToolPlan {
        ToolPlan { format, tools: Vec::new(), choice: ToolChoice::Auto, parallel: true }
    }

    fn call(name: &str, args: &str) -> (String, String) {
        (name.to_string(), args.to_string())
    }

    fn calls(plan: &ToolPlan, text: &str) -> (String, Vec<(String, String)>) {
        let (content, calls) = plan.parse(text, "x");
        (content, calls.into_iter().map(|c| (c.name, c.arguments)).collect())
    }

    // Cases from llama.cpp's tests/test-chat.cpp (llama-cpp-python 0.3.36's vendor tree), the
    // "MiMo-VL / Hermes 3 / Qwen 2.5", "Reka Edge" and "mistralai-Mistral-Nemo-Instruct-2407"
    // blocks: the model output, and the message it must parse into.
    #[test]
    fn parses_llama_cpp_test_chat_cases() {
        let hermes = plan(ToolFormat::Hermes);
        assert_eq!(calls(&hermes, "Hello, world!\nWhat's up?"), ("Hello, world!\nWhat's up?".into(), vec![]));
        assert_eq!(
            calls(&hermes, "<tool_call>\n{\"name\": \"special_function\", \"arguments\": {\"arg1\": 1}}\n</tool_call>"),
            (String::new(), vec![call("special_function", r#"{"arg1":1}"#)])
        );
        assert_eq!(
            calls(
                &hermes,
                "Hello, world!\nWhat's up?\n<tool_call>\n{\"name\": \"special_function\", \"arguments\": {\"arg1\": 1}}\n</tool_call>"
            ),
            ("Hello, world!\nWhat's up?".into(), vec![call("special_function", r#"{"arg1":1}"#)])
        );
        assert_eq!(
            calls(
                &hermes,
                "<tool_call>\n{\"name\": \"special_function\", \"arguments\": {\"arg1\": 1}}\n</tool_call>\n<tool_call>\n{\"name\": \"special_function_with_opt\", \"arguments\": {\"arg1\": 1, \"arg2\": 2}}\n</tool_call>"
            ),
            (
                String::new(),
                vec![
                    call("special_function", r#"{"arg1":1}"#),
                    call("special_function_with_opt", r#"{"arg1":1,"arg2":2}"#)
                ]
            )
        );
        let mistral = plan(ToolFormat::Mistral);
        assert_eq!(calls(&mistral, "Hello, world!\nWhat's up?"), ("Hello, world!\nWhat's up?".into(), vec![]));
        let (content, parsed) = mistral.parse(
            "[TOOL_CALLS][{\"name\": \"special_function\", \"arguments\": {\"arg1\": 1}, \"id\": \"123456789\"}]",
            "x",
        );
        assert_eq!(content, "");
        assert_eq!(
            parsed,
            vec![ToolCall {
                id: "123456789".into(),
                name: "special_function".into(),
                arguments: r#"{"arg1":1}"#.into()
            }]
        );
        // Generic: llama.cpp's generic format (common/chat.cpp).
        let generic = plan(ToolFormat::Generic);
        assert_eq!(
            calls(&generic, r#"{"tool_calls": [{"name": "special_function", "arguments": {"arg1": 1}}]}"#),
            (String::new(), vec![call("special_function", r#"{"arg1":1}"#)])
        );
        assert_eq!(calls(&generic, r#"{"response": "Hello, world!\nWhat's up?"}"#).0, "Hello, world!\nWhat's up?");
        let llama = plan(ToolFormat::Llama3);
        assert_eq!(
            calls(&llama, r#"{"name": "special_function", "parameters": {"arg1": 1}}"#),
            (String::new(), vec![call("special_function", r#"{"arg1":1}"#)])
        );
        assert_eq!(
            calls(&llama, r#"<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": "y"}}"#)
                .1,
            vec![call("a", "{}"), call("b", r#"{"x":"y"}"#)]
        );
        assert_eq!(calls(&llama, "Hello, world!\nWhat's up?").0, "Hello, world!\nWhat's up?");
        // "llama-cpp-deepseek-r1" and "DeepSeek R1 Distill Qwen 32B" blocks (after the thought).
        let r1 = plan(ToolFormat::DeepSeekR1);
        assert_eq!(
            calls(
                &r1,
                "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>special_function\n```json\n{\"arg1\": 1}```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
            ),
            (String::new(), vec![call("special_function", r#"{"arg1":1}"#)])
        );
        assert_eq!(calls(&r1, "Hello, world!\nWhat's up?").0, "Hello, world!\nWhat's up?");
        // Granite 3.x's list after <|tool_call|>.
        let list = plan(ToolFormat::CallList);
        assert_eq!(
            calls(&list, r#"<|tool_call|>[{"name": "special_function", "arguments": {"arg1": 1}}]"#),
            (String::new(), vec![call("special_function", r#"{"arg1":1}"#)])
        );
    }

    // test-chat.cpp's "Qwen3-Coder (tool calling with XML-style format)", "FireFunction" and
    // "NVIDIA-Nemotron-Nano-v2" blocks; Phi-4-mini answers as FireFunction does.
    #[test]
    fn parses_llama_cpp_test_chat_cases_of_more_formats() {
        let tool = |name: &str, properties: Value| Tool {
            name: name.into(),
            description: None,
            parameters: json!({"type": "object", "properties": properties}),
        };
        let xml = ToolPlan {
            tools: vec![
                tool("special_function", json!({"arg1": {"type": "integer"}})),
                tool("special_function_with_opt", json!({"arg1": {"type": "integer"}, "arg2": {"type": "integer"}})),
                tool("write", json!({"path": {"type": "string"}, "text": {"type": "string"}})),
            ],
            ..plan(ToolFormat::XmlFunction)
        };
        assert_eq!(calls(&xml, "Hello, world!\nWhat's up?"), ("Hello, world!\nWhat's up?".into(), vec![]));
        let one = "<function=special_function>\n<parameter=arg1>\n1\n</parameter>\n</function>\n</tool_call>";
        let expected = vec![call("special_function", r#"{"arg1":1}"#)];
        assert_eq!(calls(&xml, &format!("<tool_call>\n{one}")), (String::new(), expected.clone()));
        // Some models skip the first <tool_call>; text before the call is kept as written.
        assert_eq!(calls(&xml, one), (String::new(), expected.clone()));
        assert_eq!(calls(&xml, &format!("Let me call it.\n{one}")), ("Let me call it.\n".into(), expected));
        let two = format!(
            "{one}\n<tool_call>\n<function=special_function_with_opt>\n<parameter=arg1>\n1\n</parameter>\n<parameter=arg2>\n2\n</parameter>\n</function>\n</tool_call>"
        );
        assert_eq!(
            calls(&xml, &two).1,
            vec![
                call("special_function", r#"{"arg1":1}"#),
                call("special_function_with_opt", r#"{"arg1":1,"arg2":2}"#)
            ]
        );
        // A string parameter is raw text, newlines and JSON-looking text included.
        let code = "<tool_call>\n<function=write>\n<parameter=path>\n42\n</parameter>\n<parameter=text>\nif a < b:\n    print(\"{}\")\n</parameter>\n</function>\n</tool_call>";
        assert_eq!(calls(&xml, code).1, vec![call("write", r#"{"path":"42","text":"if a < b:\n    print(\"{}\")"}"#)]);

        // A string with a rule is JSON under the grammar; written raw by a model, it is still text.
        let modes = ToolPlan {
            tools: vec![tool("open", json!({"mode": {"type": "string", "enum": ["r", "w"]}}))],
            ..plan(ToolFormat::XmlFunction)
        };
        for value in ["\"w\"", "w"] {
            let text = format!(
                "<tool_call>\n<function=open>\n<parameter=mode>\n{value}\n</parameter>\n</function>\n</tool_call>"
            );
            assert_eq!(calls(&modes, &text).1, vec![call("open", r#"{"mode":"w"}"#)]);
        }

        let functools = plan(ToolFormat::Functools);
        assert_eq!(
            calls(&functools, " functools[{\"name\": \"special_function\", \"arguments\": {\"arg1\": 1}}]"),
            (String::new(), vec![call("special_function", r#"{"arg1":1}"#)])
        );
        assert_eq!(calls(&functools, "Hello, world!\nWhat's up?").0, "Hello, world!\nWhat's up?");

        let tags = plan(ToolFormat::ToolCallTags);
        for text in [
            "<TOOLCALL>[{\"name\": \"special_function\", \"arguments\": {\"arg1\": 1}}]</TOOLCALL>",
            "\n<TOOLCALL>[{\"name\": \"special_function\", \"arguments\": {\"arg1\": 1}}]</TOOLCALL>\n",
        ] {
            assert_eq!(calls(&tags, text), (String::new(), vec![call("special_function", r#"{"arg1":1}"#)]));
        }
    }

    #[test]
    fn the_format_comes_from_the_template() {
        assert_eq!(ToolFormat::of_template("{{ '<tool_call>' }}"), ToolFormat::Hermes);
        assert_eq!(ToolFormat::of_template("{{ '[TOOL_CALLS]' }}"), ToolFormat::Mistral);
        assert_eq!(ToolFormat::of_template("{{ '<|python_tag|>' }}"), ToolFormat::Llama3);
        assert_eq!(ToolFormat::of_template("{{ '<|tool_call|>' }}"), ToolFormat::CallList);
        assert_eq!(ToolFormat::of_template("{{ '<｜tool▁call▁begin｜>' }}"), ToolFormat::DeepSeekR1);
        assert_eq!(
            ToolFormat::of_template("{{ '<tool_call>\n<function=' }}{{ '<parameter=' }}"),
            ToolFormat::XmlFunction
        );
        assert_eq!(ToolFormat::of_template("{{ ' functools[' }}"), ToolFormat::Functools);
        assert_eq!(ToolFormat::of_template("{{ '<|tool|>' + message['tools'] + '<|/tool|>' }}"), ToolFormat::Functools);
        assert_eq!(ToolFormat::of_template("{{ '<TOOLCALL>' }}"), ToolFormat::ToolCallTags);
        assert_eq!(ToolFormat::of_template("{% for m in messages %}{{ m.content }}{% endfor %}"), ToolFormat::Generic);
    }
}
