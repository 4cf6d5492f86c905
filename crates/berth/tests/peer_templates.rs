//! berth's template engine against the reference: every chat template of llama.cpp's test data
//! (`models/templates/*.jinja` of the llama-cpp-python sdist, real templates of Qwen, Gemma, Phi,
//! Llama, Mistral, DeepSeek, Granite, SmolLM3, ...) rendered for a fixed set of conversations by
//! berth and by Python's jinja2 set up as Hugging Face transformers sets it up
//! (tests/python/render_templates.py). Both must give the same text, or both refuse.

mod util;

use std::collections::BTreeMap;
use std::process::Command;

use berth_engine::template::ChatTemplate;
use berth_testkit::models;
use serde_json::{Value, json};

/// Renderings where berth and transformers part on purpose, and why. Each must still differ (so
/// the list stays true); everything else must be identical.
const KNOWN_DIFFERENCES: &[(&str, &str, &str)] = &[
    (
        "llama-cpp-deepseek-r1.jinja",
        "tools_offered",
        "`tools|map(attribute=...)|tojson`: jinja2's map gives a generator that json.dumps refuses; berth renders the list the template means",
    ),
    ("llama-cpp-deepseek-r1.jinja", "tool_call_and_result", "the same"),
    (
        "meetkai-functionary-medium-v3.1.jinja",
        "tools_offered",
        "`'...'|safe + x|tojson`: Python's Markup HTML-escapes what is added to it (&#34;); berth has no autoescaping and keeps the JSON",
    ),
    ("meetkai-functionary-medium-v3.1.jinja", "tool_call_and_result", "the same"),
];

const BOS: &str = "<s>";
const EOS: &str = "</s>";

fn conversations() -> Value {
    let tools = json!([{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}}, "required": ["city"]}
        }
    }]);
    let call = json!({"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}});
    let conv = |messages: Value, generation: bool, extra: Value| json!({"messages": messages, "add_generation_prompt": generation, "extra": extra, "bos_token": BOS, "eos_token": EOS});
    json!({
        "system_and_user": conv(json!([
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hello!"}
        ]), true, json!({})),
        "user_only": conv(json!([{"role": "user", "content": "What is 2 + 2?"}]), true, json!({})),
        "multi_turn": conv(json!([
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke."}
        ]), true, json!({})),
        "without_generation_prompt": conv(json!([
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there."}
        ]), false, json!({})),
        "tool_call_and_result": conv(json!([
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "{\"temperature\": 21}"}
        ]), true, json!({"tools": tools})),
        "tools_offered": conv(json!([{"role": "user", "content": "Weather in Oslo?"}]), true, json!({"tools": tools})),
        "thinking_off": conv(json!([{"role": "user", "content": "Hi"}]), true, json!({"enable_thinking": false})),
    })
}

#[test]
fn chat_templates_render_as_transformers_renders_them() {
    let dir = models::llamacpp_testdata().join("models/templates");
    let convs = conversations();
    let conv_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(conv_file.path(), convs.to_string()).unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/render_templates.py");
    let out = Command::new(util::server::python()).arg(&script).arg(&dir).arg(conv_file.path()).output().unwrap();
    assert!(out.status.success(), "the reference renderer failed: {}", String::from_utf8_lossy(&out.stderr));
    let reference: BTreeMap<String, BTreeMap<String, Value>> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(reference.len() >= 60, "llama.cpp's templates were not all found: {}", reference.len());

    let mut rows = Vec::new();
    let (mut same_total, mut all_total) = (0, 0);
    let mut differing = Vec::new();
    for (file, expected) in &reference {
        let source = std::fs::read_to_string(dir.join(file)).unwrap();
        let template = ChatTemplate::new(&source, BOS, EOS);
        let mut same = 0;
        for (name, want) in expected {
            let conv = &convs[name];
            let ours = match &template {
                Ok(t) => t.render_json(
                    conv["messages"].as_array().unwrap().clone(),
                    conv["add_generation_prompt"].as_bool().unwrap(),
                    conv["extra"].as_object().unwrap().clone(),
                ),
                Err(e) => Err(berth_engine::EngineError::Template(e.to_string())),
            };
            let agrees = match (&ours, want.get("text")) {
                (Ok(text), Some(Value::String(w))) => text == w,
                (Err(_), None) => true,
                _ => false,
            };
            let known = KNOWN_DIFFERENCES.iter().find(|(f, c, _)| f == file && c == name);
            if let Some((_, _, why)) = known {
                assert!(!agrees, "{file} / {name} now renders identically ({why}): take it off KNOWN_DIFFERENCES");
            }
            if agrees {
                same += 1;
            } else if known.is_none() {
                // Show where the two first part.
                let theirs = want.get("text").and_then(Value::as_str).unwrap_or_default();
                let at = match &ours {
                    Ok(text) => text.chars().zip(theirs.chars()).take_while(|(a, b)| a == b).count(),
                    Err(_) => 0,
                };
                let around = |s: &str| s.chars().skip(at.saturating_sub(60)).take(160).collect::<String>();
                let ours_shown = match &ours {
                    Ok(text) => format!("{:?}", around(text)),
                    Err(e) => format!("error: {e}"),
                };
                let theirs_shown = match want.get("error") {
                    Some(e) => format!("error: {e}"),
                    None => format!("{:?}", around(theirs)),
                };
                differing.push(format!(
                    "{file} / {name} (from character {at}):\n  transformers: {theirs_shown}\n  berth:        {ours_shown}"
                ));
            }
        }
        same_total += same;
        all_total += expected.len();
        rows.push(format!("| {file} | {same} / {} |", expected.len()));
    }
    eprintln!("| template | conversations rendered identically |\n|---|---|");
    for r in &rows {
        eprintln!("{r}");
    }
    eprintln!("total: {same_total} / {all_total} ({} known differences)", KNOWN_DIFFERENCES.len());
    if std::env::var_os("BERTH_TEMPLATE_DEBUG").is_some() {
        for d in &differing {
            eprintln!("{d}");
        }
    }
    assert!(differing.is_empty(), "{} renderings differ; the first:\n{}", differing.len(), differing.first().unwrap());
}
