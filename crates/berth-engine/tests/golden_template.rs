//! SmolLM2's own chat template renders every golden case byte for byte.

use berth_engine::template::{ChatTemplate, Message};
use berth_formats::gguf::GgufFile;
use berth_testkit::models;
use serde_json::Value;

#[test]
fn renders_every_golden_prompt_exactly() {
    let bytes = std::fs::read(models::smollm2_gguf()).unwrap();
    let gguf = GgufFile::parse(&bytes).unwrap();
    let source = gguf.get_str("tokenizer.chat_template").expect("SmolLM2 ships a chat template");
    let template = ChatTemplate::new(source, "<|im_start|>", "<|im_end|>").unwrap();
    let golden: Value =
        serde_json::from_slice(&std::fs::read(models::golden_dir().join("smollm2-q4_1.llamacpp.json")).unwrap())
            .unwrap();
    let cases: Value =
        serde_json::from_slice(&std::fs::read(models::golden_dir().join("cases.json")).unwrap()).unwrap();
    let mut rendered = 0;
    for (case, want) in cases.as_array().unwrap().iter().zip(golden["cases"].as_array().unwrap()) {
        let Some(messages) = case["messages"].as_array() else { continue };
        let messages: Vec<Message> = messages
            .iter()
            .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let got = template.render(&messages, true).unwrap();
        assert_eq!(got, want["prompt_text"].as_str().unwrap(), "{}", case["name"]);
        rendered += 1;
    }
    assert_eq!(rendered, 7);
}
