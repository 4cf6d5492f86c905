//! The tokenizer built from SmolLM2's GGUF metadata against llama.cpp's ids (../shared/golden).

use berth_engine::tokenizer::Tokenizer;
use berth_formats::gguf::GgufFile;
use berth_testkit::models;
use serde_json::Value;

fn tokenizer() -> Tokenizer {
    let bytes = std::fs::read(models::smollm2_gguf()).unwrap();
    Tokenizer::from_gguf(&GgufFile::parse(&bytes).unwrap()).unwrap()
}

fn golden() -> Value {
    serde_json::from_slice(&std::fs::read(models::golden_dir().join("smollm2-q4_1.llamacpp.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn every_tokenize_case_matches_llama_cpp() {
    let tok = tokenizer();
    let golden = golden();
    let cases = golden["tokenize"].as_array().unwrap();
    assert_eq!(cases.len(), 12);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let got = tok.encode(text, false).unwrap();
        assert_eq!(got, ids(&case["ids"]), "tokenizing {text:?}");
        assert_eq!(tok.decode(&got), text, "round trip of {text:?}");
    }
}

#[test]
fn every_rendered_prompt_tokenizes_like_llama_cpp() {
    let tok = tokenizer();
    for case in golden()["cases"].as_array().unwrap() {
        let text = case["prompt_text"].as_str().unwrap();
        assert_eq!(tok.encode(text, true).unwrap(), ids(&case["prompt_ids"]), "{}", case["name"]);
    }
}

#[test]
fn special_tokens_only_where_asked() {
    let tok = tokenizer();
    let plain = tok.encode("<|im_start|>user", false).unwrap();
    assert!(!plain.contains(&1), "user text keeps <|im_start|> as characters: {plain:?}");
    let special = tok.encode("<|im_start|>user", true).unwrap();
    assert_eq!(special[0], 1);
    assert!(tok.is_end_of_generation(2));
    assert_eq!(tok.decode(&[1, 2]), "", "control tokens print nothing");
}
