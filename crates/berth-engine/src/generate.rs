//! A loaded model ready to answer: tokenizer, chat template, and generation. One request at a
//! time runs through the same scheduler that batches many (see [`crate::scheduler`]), so there is
//! one generation loop.

use crate::constraint::{Constraint, ConstraintSpec, Grammars};
use crate::error::EngineError;
use crate::model::{KvType, TextModel, blocks_for};
pub use crate::request::{FinishReason, GenerationOutput, GenerationRequest, TokenEvent};
use crate::scheduler::{Scheduler, SchedulerConfig, TokenSink};
use crate::template::{ChatTemplate, Message};
use crate::tokenizer::Tokenizer;
use crate::tools::{ToolCall, ToolFormat, ToolPlan};
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// Tokens of a prompt processed per forward pass when one request runs alone, bounding the
/// memory of one step.
const PREFILL_CHUNK: usize = 512;

/// What a chat request asks of the template beyond its messages.
#[derive(Debug, Clone)]
pub struct ChatOptions {
    /// The request's tools, in the model's format.
    pub tools: Option<ToolPlan>,
    /// `enable_thinking` for templates that read it (Qwen3's `/think`, R1-Distill's opened thought).
    pub enable_thinking: bool,
    /// Continue the last message, the assistant's, instead of opening a new turn (vLLM's
    /// `continue_final_message`, an assistant prefill): the prompt ends with its text.
    pub continue_final: bool,
}

impl Default for ChatOptions {
    fn default() -> Self {
        ChatOptions { tools: None, enable_thinking: true, continue_final: false }
    }
}

/// A model with its tokenizer and chat template: what the APIs and `berth run` hold.
pub struct Engine {
    model: Box<dyn TextModel>,
    tokenizer: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
    /// How the template spells tool calls, and whether its model reasons in `<think>` tags: read
    /// from the template once, at load.
    tool_format: ToolFormat,
    reasons: bool,
    /// The grammar compiler, built at the first constrained request (its token trie takes a
    /// moment and memory that a model never asked for structured output does not need).
    grammars: OnceLock<Result<Grammars, String>>,
}

/// The chat template a GGUF file carries, if any (read from its metadata, nothing loaded).
pub fn chat_template_of(path: &Path) -> Result<Option<String>, EngineError> {
    let io = |source| EngineError::Io { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(io)?;
    // SAFETY: the map is read-only and dropped before this returns; berth's store files are
    // never written in place.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
    let gguf = berth_formats::gguf::GgufFile::parse(&map)
        .map_err(|source| EngineError::Gguf { path: path.to_path_buf(), source })?;
    Ok(gguf.get_str("tokenizer.chat_template").map(str::to_string))
}

/// Vet the chat template a model artifact would run (its template layer when it has one, else
/// the one inside its GGUF file) before the artifact enters a store: see [`crate::template::vet`].
/// A GGUF file without a template passes; an unreadable layer does not.
pub fn vet_artifact_template(gguf: Option<&Path>, layer: Option<&[u8]>) -> Result<(), EngineError> {
    let source = match (layer, gguf) {
        (Some(bytes), _) => {
            if bytes.len() > crate::template::MAX_SOURCE_BYTES {
                return Err(EngineError::Template(format!(
                    "the template layer is {} bytes; a chat template may have at most {}",
                    bytes.len(),
                    crate::template::MAX_SOURCE_BYTES
                )));
            }
            std::str::from_utf8(bytes)
                .map_err(|_| EngineError::Template("the template layer is not UTF-8 text".into()))?
                .to_string()
        }
        (None, Some(path)) => match chat_template_of(path)? {
            Some(text) => text,
            None => return Ok(()),
        },
        (None, None) => return Ok(()),
    };
    crate::template::vet(&source)
}

impl Engine {
    /// Load a GGUF model; `template_override` (an artifact's template layer) replaces the file's.
    pub fn load(path: &Path, template_override: Option<&str>) -> Result<Engine, EngineError> {
        let model = crate::model::load(path)?;
        let tokenizer = Tokenizer::from_gguf(model.metadata())?;
        if tokenizer.vocab_size() != model.vocab_size() {
            return Err(EngineError::BadModel(format!(
                "the tokenizer has {} tokens but the model {}",
                tokenizer.vocab_size(),
                model.vocab_size()
            )));
        }
        let source = template_override.or_else(|| model.metadata().get_str("tokenizer.chat_template"));
        let token = |id: Option<u32>| id.and_then(|i| tokenizer.token_text(i)).unwrap_or_default().to_string();
        let template = match source {
            Some(src) => Some(ChatTemplate::new(src, &token(tokenizer.bos), &token(tokenizer.eos))?),
            None => None,
        };
        let tool_format = template.as_ref().map_or(ToolFormat::Generic, |t| ToolFormat::of_template(t.source()));
        let reasons = template.as_ref().is_some_and(|t| crate::reasoning::template_reasons(t.source()));
        Ok(Engine { model, tokenizer: Arc::new(tokenizer), template, tool_format, reasons, grammars: OnceLock::new() })
    }

    pub fn model(&self) -> &dyn TextModel {
        self.model.as_ref()
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Compile a request's constraint against this model's vocabulary; an error names `param`.
    pub fn constrain(&self, spec: &ConstraintSpec, param: &str) -> Result<Constraint, EngineError> {
        let grammars = self.grammars.get_or_init(|| Grammars::new(self.tokenizer.clone()).map_err(|e| e.to_string()));
        match grammars {
            Ok(g) => g.compile(spec, param),
            Err(e) => Err(EngineError::Grammar(e.clone())),
        }
    }

    /// The chat template in use (the artifact's override, else the file's), if there is one.
    pub fn template(&self) -> Option<&ChatTemplate> {
        self.template.as_ref()
    }

    pub fn context_length(&self) -> usize {
        self.model.context_length()
    }

    /// Tokens of a chat: the template's markers as special tokens, the messages' text as text.
    pub fn chat_prompt(&self, messages: &[Message]) -> Result<Vec<u32>, EngineError> {
        self.chat_prompt_with(messages, &ChatOptions::default())
    }

    /// The same with tools: the template gets them as `tools` (the generic format, for a
    /// template that knows none, describes them in the system message instead), and earlier calls
    /// and results render as the template spells them.
    pub fn chat_prompt_with(&self, messages: &[Message], options: &ChatOptions) -> Result<Vec<u32>, EngineError> {
        let tools = options.tools.clone().map(|t| self.tool_plan(t));
        let tools = tools.as_ref();
        let Some(template) = &self.template else {
            // No template: the messages' text, one per line, as a plain completion prompt.
            let text: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
            return self.text_prompt(&text.join("\n"));
        };
        // Everything in a message comes from users: the special tokens' text in it is defused, so
        // only the template's own markers become special tokens.
        let defuse = |s: &str| self.tokenizer.defuse_specials(s).into_owned();
        let mut messages: Vec<Message> = messages
            .iter()
            .map(|m| Message {
                role: defuse(&m.role),
                content: defuse(&m.content),
                tool_calls: m
                    .tool_calls
                    .iter()
                    .map(|c| ToolCall { id: defuse(&c.id), name: defuse(&c.name), arguments: defuse(&c.arguments) })
                    .collect(),
                tool_call_id: m.tool_call_id.as_deref().map(defuse),
                name: m.name.as_deref().map(defuse),
            })
            .collect();
        let mut extra = serde_json::Map::new();
        // As llama.cpp does: templates that read it think unless asked not to.
        extra.insert("enable_thinking".into(), options.enable_thinking.into());
        match tools {
            Some(plan) if plan.format == ToolFormat::Generic => generic_tool_messages(&mut messages, plan),
            Some(plan) => {
                let tools = plan.template_tools().to_string();
                let tools: serde_json::Value = serde_json::from_str(&defuse(&tools)).unwrap_or_default();
                if plan.format == ToolFormat::Functools {
                    // FireFunction v2's template prints `functions` (the functions as JSON text) and
                    // `datetime`, as llama.cpp gives them.
                    let functions = serde_json::to_string_pretty(&plan.template_functions()).unwrap_or_default();
                    extra.insert("functions".into(), defuse(&functions).into());
                    let now = crate::template::strftime_now("%b %d %Y %H:%M:%S GMT");
                    extra.insert("datetime".into(), now.into());
                }
                extra.insert("tools".into(), tools);
            }
            None => {}
        }
        let mut json: Vec<serde_json::Value> = messages.iter().map(Message::to_template_json).collect();
        if let Some(plan) = tools.filter(|_| template_reads_message_tools(template.source())) {
            system_message_tools(&mut json, plan, &defuse);
        }
        let generic = tools.is_some_and(|p| p.format == ToolFormat::Generic);
        let opening = !options.continue_final;
        let rendered = match template.render_json(json, opening, extra.clone()) {
            // A template that knows only user and assistant turns gets the generic format's system
            // and tool messages folded into user turns: Gemma's raises on other roles, Phi-3.5's
            // leaves them out.
            Ok(text)
                if generic
                    && messages
                        .iter()
                        .any(|m| m.role != "user" && m.role != "assistant" && !text.contains(&m.content)) =>
            {
                self.render_folded(template, messages.clone(), extra, opening).unwrap_or(text)
            }
            Err(e) if generic => self.render_folded(template, messages.clone(), extra, opening).map_err(|_| e)?,
            other => other?,
        };
        let rendered = if options.continue_final { continued(rendered, &messages)? } else { rendered };
        Ok(self.with_bos(self.tokenizer.encode_rendered(&rendered)?))
    }

    fn render_folded(
        &self,
        template: &ChatTemplate,
        messages: Vec<Message>,
        extra: serde_json::Map<String, serde_json::Value>,
        opening: bool,
    ) -> Result<String, EngineError> {
        let json: Vec<serde_json::Value> =
            fold_into_user_turns(messages).iter().map(Message::to_template_json).collect();
        template.render_json(json, opening, extra)
    }

    /// Whether this model thinks in `<think>` tags before it answers (read from its template).
    pub fn reasons(&self) -> bool {
        self.reasons
    }

    /// A request's tools in the format this model's template speaks (requests are read before the
    /// model is known; the format is the model's).
    pub fn tool_plan(&self, plan: ToolPlan) -> ToolPlan {
        ToolPlan { format: self.tool_format, ..plan }
    }

    /// The tool format this model's template speaks.
    pub fn tool_format(&self) -> ToolFormat {
        self.tool_format
    }

    /// Tokens of a raw completion prompt (special-token text stays text). An empty prompt is the
    /// start of a document: the BOS token, or where the model has none its end-of-text token (GPT's
    /// `<|endoftext|>`, what OpenAI's API puts in place of a missing prompt).
    pub fn text_prompt(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        let ids = self.with_bos(self.tokenizer.encode(text, false)?);
        if ids.is_empty() {
            return Ok(self.tokenizer.bos.or(self.tokenizer.eos).into_iter().collect());
        }
        Ok(ids)
    }

    /// The ids with the BOS token in front, where the model's tokenizer adds one to a prompt.
    pub fn with_bos(&self, mut ids: Vec<u32>) -> Vec<u32> {
        if let (true, Some(bos)) = (self.tokenizer.add_bos, self.tokenizer.bos)
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        ids
    }

    /// What a request run by [`Engine::generate`] must fit (it sizes its cache to the request, so
    /// only the context bounds it).
    pub fn request_limits(&self) -> crate::request::RequestLimits {
        let context = self.context_length();
        crate::request::RequestLimits { context, kv_tokens: context, vocab: self.model.vocab_size() }
    }

    /// Cache blocks that hold `tokens` positions.
    pub fn kv_blocks_for(&self, tokens: usize) -> usize {
        blocks_for(tokens).max(1)
    }

    /// Generate one answer by itself, calling `on_token` for every token; it returns `false` to
    /// stop early.
    pub fn generate(
        &self,
        req: &GenerationRequest,
        on_token: &mut dyn FnMut(&TokenEvent) -> bool,
    ) -> Result<GenerationOutput, EngineError> {
        let ctx = self.context_length();
        let config = SchedulerConfig {
            max_batch_tokens: PREFILL_CHUNK,
            max_running: 1,
            kv_blocks: self.kv_blocks_for((req.prompt.len() + req.max_tokens + 1).min(ctx)),
            prefix_cache: false,
            kv_type: KvType::F16,
            speculation: true,
            draft_cost: None,
            target: Some(Default::default()),
        };
        let mut result = None;
        {
            let mut scheduler = Scheduler::new(self, config)?;
            let sink = CallbackSink { on_token, result: &mut result };
            scheduler.submit(req.clone(), Box::new(sink), None);
            while !scheduler.is_idle() {
                scheduler.step();
            }
        }
        result.unwrap_or(Err(EngineError::Stopped))
    }
}

/// Hands a lone generation's tokens to a callback and keeps its end.
struct CallbackSink<'a> {
    on_token: &'a mut dyn FnMut(&TokenEvent) -> bool,
    result: &'a mut Option<Result<GenerationOutput, EngineError>>,
}

impl TokenSink for CallbackSink<'_> {
    fn token(&mut self, event: &TokenEvent) -> bool {
        (self.on_token)(event)
    }

    fn finish(&mut self, result: Result<GenerationOutput, EngineError>) {
        *self.result = Some(result);
    }
}

/// The generic tool format on a template that knows no tools: the tools and the answer's shape
/// go into the system message, earlier calls become the JSON the model was asked to write, and
/// results become `tool` messages holding JSON (as llama.cpp's generic format does).
fn generic_tool_messages(messages: &mut Vec<Message>, plan: &ToolPlan) {
    let instructions = plan.generic_instructions();
    match messages.first_mut() {
        Some(first) if first.role == "system" => first.content = format!("{}\n\n{instructions}", first.content),
        _ => messages.insert(0, Message::new("system", &instructions)),
    }
    for m in messages.iter_mut() {
        if !m.tool_calls.is_empty() {
            let calls: Vec<serde_json::Value> = m
                .tool_calls
                .iter()
                .map(|c| serde_json::json!({"name": c.name, "arguments": c.arguments_value(), "id": c.id}))
                .collect();
            m.content = serde_json::json!({"tool_calls": calls}).to_string();
            m.tool_calls.clear();
        } else if m.role == "tool" {
            m.content =
                serde_json::json!({"tool_response": {"tool": m.name, "id": m.tool_call_id, "content": m.content}})
                    .to_string();
        }
    }
}

/// Whether a template takes the tools from the system message rather than as `tools` (Phi-4-mini's
/// prints `message['tools']` between `<|tool|>` tags).
fn template_reads_message_tools(source: &str) -> bool {
    source.contains("<|tool|>") && (source.contains("message['tools']") || source.contains("message.tools"))
}

/// The tools as such a template wants them: a JSON list of functions in the system message's
/// `tools` (a system message is added where the conversation has none).
fn system_message_tools(json: &mut Vec<serde_json::Value>, plan: &ToolPlan, defuse: &dyn Fn(&str) -> String) {
    let text = defuse(&serde_json::Value::Array(plan.template_functions()).to_string());
    if json.first().is_none_or(|m| m["role"] != "system") {
        json.insert(0, serde_json::json!({"role": "system", "content": ""}));
    }
    json[0]["tools"] = serde_json::Value::String(text);
}

/// Only user and assistant turns, alternating: system text goes before the next user turn's,
/// tool results become user turns, and turns of one role in a row are joined.
fn fold_into_user_turns(messages: Vec<Message>) -> Vec<Message> {
    let mut out: Vec<Message> = Vec::new();
    let mut pending_system = String::new();
    for m in messages {
        let role = match m.role.as_str() {
            "system" => {
                pending_system.push_str(&m.content);
                pending_system.push_str("\n\n");
                continue;
            }
            "assistant" => "assistant",
            _ => "user",
        };
        let mut content = m.content;
        if role == "user" && !pending_system.is_empty() {
            content = format!("{}{content}", std::mem::take(&mut pending_system));
        }
        match out.last_mut() {
            Some(last) if last.role == role => last.content = format!("{}\n\n{content}", last.content),
            _ => out.push(Message::new(role, &content)),
        }
    }
    if !pending_system.is_empty() {
        out.push(Message::new("user", pending_system.trim_end()));
    }
    out
}

/// The rendered conversation cut right after the last message's text, which the model then
/// continues (as vLLM and transformers do for `continue_final_message`): what the template writes
/// after it (its end-of-turn marker) goes.
fn continued(mut rendered: String, messages: &[Message]) -> Result<String, EngineError> {
    let invalid = |message: &str| EngineError::InvalidParameter {
        param: "continue_final_message".into(),
        message: message.to_string(),
    };
    let last = messages.last().filter(|m| m.role == "assistant" && !m.content.is_empty());
    let Some(last) = last else {
        return Err(invalid("continuing needs the last message to be the assistant's, with text"));
    };
    let Some(at) = rendered.rfind(&last.content) else {
        return Err(invalid("this model's chat template rewrites the last message, so it cannot be continued"));
    };
    rendered.truncate(at + last.content.len());
    Ok(rendered)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into(), tool_calls: Vec::new(), tool_call_id: None, name: None }
    }

    #[test]
    fn a_continued_conversation_ends_with_the_last_messages_text() {
        let messages = [message("user", "Best book?"), message("assistant", "Whill")];
        let rendered = "<|im_start|>user\nBest book?<|im_end|>\n<|im_start|>assistant\nWhill<|im_end|>\n".to_string();
        assert_eq!(
            continued(rendered.clone(), &messages).unwrap(),
            "<|im_start|>user\nBest book?<|im_end|>\n<|im_start|>assistant\nWhill"
        );
        let ends_with_user = [message("assistant", "Hi"), message("user", "Whill")];
        assert!(continued(rendered.clone(), &ends_with_user).is_err(), "only the assistant's message is continued");
        let rewritten = [message("user", "Best book?"), message("assistant", "Whill ")];
        assert!(continued(rendered, &rewritten).is_err(), "a template that changed the text cannot be continued");
    }
}
