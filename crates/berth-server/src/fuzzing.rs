//! The request path without HTTP or a model, for the fuzz target `request` (fuzz/): body bytes
//! through the same types and checks the handlers use, to validated requests. The model's
//! template and tokenizer are stood in for by one token per byte of the messages' text.

use berth_engine::request::validate;
use berth_engine::tools::{ToolFormat, ToolPlan};
use berth_engine::{GenerationRequest, RequestLimits};

use crate::request::PromptSource;

/// OpenAI's `tools` as a request's would be read and checked (names, parameters, how many), for
/// the fuzz target `grammar`; `None` where the API would refuse them or there are none.
pub fn openai_tools(tools: &serde_json::Value) -> Option<ToolPlan> {
    crate::tool_calls::openai_tools(&Some(tools.clone()), &None, &None).ok().flatten()
}

/// The endpoints whose bodies become generation requests.
#[derive(Debug, Clone, Copy)]
pub enum Api {
    OpenAiChat,
    OpenAiCompletion,
    OllamaChat,
    OllamaGenerate,
}

/// Parse and check a body for `api`, and validate it against `limits`: the requests the
/// scheduler would get, or the error message a client would.
pub fn validate_body(api: Api, body: &[u8], limits: &RequestLimits) -> Result<Vec<GenerationRequest>, String> {
    let parts = match api {
        Api::OpenAiChat => parse(body).and_then(|r| {
            let (source, draft, chat) = crate::openai::chat_parts(&r)?;
            let tools = chat.tools;
            // The answer parsers of every tool format, on the messages' text as if a model wrote it.
            if let (Some(plan), PromptSource::Chat(messages)) = (tools, &source) {
                for format in ToolFormat::ALL {
                    let plan = ToolPlan { format, ..plan.clone() };
                    for m in messages {
                        plan.parse(&m.content, "fuzz");
                    }
                }
            }
            Ok(Some((source, draft)))
        }),
        Api::OpenAiCompletion => parse(body).and_then(|r| crate::openai::completion_parts(&r).map(Some)),
        Api::OllamaChat => parse(body).and_then(|r| crate::ollama::chat_parts(&r)),
        Api::OllamaGenerate => parse(body).and_then(|r| crate::ollama::generate_parts(&r)),
    }
    .map_err(|e| e.message)?;
    let Some((source, draft)) = parts else { return Ok(Vec::new()) };
    let stand_in = |text: &str| -> Vec<u32> { text.bytes().map(|b| b as u32 % limits.vocab.max(1) as u32).collect() };
    let (earlier, source) = source.split_context(limits.vocab).map_err(|e| e.message)?;
    let prompts: Vec<Vec<u32>> = match &source {
        PromptSource::Chat(messages) => {
            vec![stand_in(&messages.iter().map(|m| format!("{}:{}\n", m.role, m.content)).collect::<String>())]
        }
        PromptSource::Texts(texts) => texts.iter().map(|t| stand_in(t)).collect(),
        PromptSource::Ids(ids) => {
            if ids.iter().flatten().any(|&t| t as usize >= limits.vocab) {
                return Err("a token id outside the vocabulary".into());
            }
            ids.clone()
        }
        PromptSource::After(..) => return Err("a context within a context".into()),
    };
    let prompts = prompts.into_iter().map(|p| [&earlier[..], &p[..]].concat());
    prompts.into_iter().map(|p| validate(&draft, p, limits).map_err(|e| e.to_string())).collect()
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, crate::error::ApiError> {
    serde_json::from_slice(body).map_err(|e| crate::error::ApiError::bad_request(format!("invalid request: {e}")))
}

/// What the gateway reads from outside bytes: a request body's routing facts (its model and the
/// hash of its prompt's start) on every path it reads them for, an answer's token counts, a
/// stream's body asked for usage, and a stream less its usage event.
pub fn gateway_reads(bytes: &[u8]) {
    for path in
        ["/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate", "/v1/messages", "/v1/responses"]
    {
        let facts = crate::gateway::affinity::facts(path, bytes);
        // A model is only ever what the body's own `model` string says.
        if let Some(model) = &facts.model {
            assert!(bytes.len() >= model.len());
        }
    }
    let _ = crate::gateway::keys::tokens_in(bytes, bytes);
    // A stream asked for usage: the request stays what it was but for `include_usage`.
    let asked = crate::gateway::keys::with_usage_asked("/v1/chat/completions", bytes);
    // The routing facts and the rewrite agree on which requests need it.
    assert_eq!(
        asked.is_some(),
        crate::gateway::affinity::facts("/v1/chat/completions", bytes).usage_unasked
            && serde_json::from_slice::<serde_json::Value>(bytes)
                .is_ok_and(|v| v.get("stream_options").is_none_or(serde_json::Value::is_object)),
    );
    if let Some(asked) = asked {
        let v: serde_json::Value = serde_json::from_slice(&asked).expect("the gateway writes JSON");
        assert_eq!(v["stream_options"]["include_usage"], true);
    }
    // An answer less its usage event: in any pieces, never more bytes than came in.
    let mut stripper = crate::gateway::keys::UsageStripper::default();
    let (head, tail) = bytes.split_at(bytes.len() / 2);
    let out = stripper.push(head).len() + stripper.push(tail).len() + stripper.finish().len();
    assert!(out <= bytes.len());
}
