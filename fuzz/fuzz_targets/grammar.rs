#![no_main]
//! Any structured-output constraint a client can send (a JSON schema, a Lark grammar, a regex),
//! compiled against a byte-level vocabulary and then driven for a few tokens: a clear error or a
//! grammar whose masks and steps never panic, never allow nothing without saying so, and finish.
//!
//! Tool definitions too: OpenAI's `tools` (a list of `{"type": "function", "function": {"name",
//! "parameters"}}`) become every tool format's grammar (the parameters' names and schemas are a
//! client's, written into Lark).
//!
//! Input: the first byte picks the kind, the rest is the schema (JSON), grammar text or tools.

use std::sync::{Arc, OnceLock};

use berth_engine::constraint::{ConstraintSpec, Grammars};
use berth_engine::tokenizer::Tokenizer;
use berth_engine::tools::{ToolChoice, ToolFormat, ToolGrammar, ToolPlan};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn grammars() -> &'static (Arc<Tokenizer>, Grammars) {
    static GRAMMARS: OnceLock<(Arc<Tokenizer>, Grammars)> = OnceLock::new();
    GRAMMARS.get_or_init(|| {
        let bytes = berth_testkit::synthetic::tiny_llama(&Default::default()).build();
        let gguf = berth_formats::gguf::GgufFile::parse(&bytes).expect("the synthetic model parses");
        let tokenizer = Arc::new(Tokenizer::from_gguf(&gguf).expect("its tokenizer builds"));
        let grammars = Grammars::new(tokenizer.clone()).expect("its grammar vocabulary builds");
        (tokenizer, grammars)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let spec = match pick % 5 {
        0 => match serde_json::from_str(text) {
            Ok(schema) => ConstraintSpec::JsonSchema(schema),
            Err(_) => return,
        },
        1 => ConstraintSpec::Lark(text.to_string()),
        2 => ConstraintSpec::Regex(text.to_string()),
        3 => ConstraintSpec::JsonObject,
        _ => return tool_grammars(text),
    };
    walk(&spec);
});

/// Every format's grammar of the tools in `text` (OpenAI's `tools`, read and checked as the API
/// does; the first four), under `required` and `auto`.
fn tool_grammars(text: &str) {
    let Ok(Value::Array(mut items)) = serde_json::from_str::<Value>(text) else { return };
    items.truncate(4);
    let Some(plan) = berth_server::fuzzing::openai_tools(&Value::Array(items)) else { return };
    for format in ToolFormat::ALL {
        for choice in [ToolChoice::Required, ToolChoice::Auto] {
            let plan = ToolPlan { format, choice, parallel: true, ..plan.clone() };
            match plan.grammar(&grammars().0) {
                ToolGrammar::Whole(spec) => walk(&spec),
                ToolGrammar::Lazy(lazy) => walk(&lazy.spec),
                ToolGrammar::Free => {}
            }
            // What a model might write in this format parses (or is text), never panics.
            plan.parse(text, "fuzz");
        }
    }
}

/// Compile a constraint and drive it a few steps.
fn walk(spec: &ConstraintSpec) {
    let Ok(mut constraint) = grammars().1.compile(spec, "response_format") else { return };
    // Walk the grammar: the lowest allowed token each step (or what it forces).
    for _ in 0..32 {
        if constraint.is_finished() {
            break;
        }
        let Ok(mask) = constraint.allowed() else { break };
        let mut next = None;
        mask.iter_set_entries(|t| {
            if next.is_none() {
                next = Some(t as u32);
            }
        });
        let Some(token) = next else { panic!("a mask with no token must be an error") };
        if constraint.consume(token).is_err() {
            break;
        }
        constraint.forced(8);
    }
}
