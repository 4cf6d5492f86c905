//! Broken or foreign model files are refused with a clear error, never a panic.

use berth_engine::{Engine, EngineError, GenerationRequest, sampling::SamplingParams, template::Message};
use berth_formats::gguf::{GgmlType, Value};
use berth_testkit::synthetic::{LlamaShape, tiny_llama, tiny_llama_without};

fn write(bytes: Vec<u8>) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

fn load(bytes: Vec<u8>) -> Result<Engine, EngineError> {
    let (_dir, path) = write(bytes);
    Engine::load(&path, None)
}

#[test]
fn a_tiny_valid_model_loads_and_generates() {
    let engine = load(tiny_llama(&LlamaShape::default()).build()).expect("the synthetic model loads");
    let prompt = engine.chat_prompt(&[Message::new("user", "hi")]).unwrap();
    let req = GenerationRequest {
        prompt,
        max_tokens: 8,
        sampling: SamplingParams::greedy(),
        stop: vec![],
        stop_token_ids: vec![],
        logprobs: Some(3),
        ignore_eos: true,
        constraint: None,
    };
    let out = engine.generate(&req, &mut |_| true).unwrap();
    assert_eq!(out.tokens.len(), 8);
    assert_eq!(out.logprobs.len(), 8);
}

#[test]
fn an_unknown_architecture() {
    for arch in ["gpt-neox", "mamba"] {
        let shape = LlamaShape { architecture: arch.into(), ..LlamaShape::default() };
        let err = load(tiny_llama(&shape).build()).err().expect("refused");
        assert!(matches!(err, EngineError::UnsupportedArchitecture(ref a) if a == arch), "{err}");
        assert!(err.to_string().contains(arch) && err.to_string().contains("qwen2"), "{err}");
    }
}

#[test]
fn a_missing_tensor() {
    let bytes = tiny_llama_without(&LlamaShape::default(), &["blk.1.ffn_up.weight"]).build();
    let err = load(bytes).err().expect("refused");
    assert!(err.to_string().contains("blk.1.ffn_up.weight"), "{err}");
}

#[test]
fn a_tensor_of_the_wrong_shape() {
    let shape = LlamaShape::default();
    let bytes = tiny_llama_without(&shape, &["blk.0.attn_q.weight"])
        .tensor("blk.0.attn_q.weight", &[64, 32], GgmlType::F32, vec![0u8; 64 * 32 * 4])
        .build();
    let err = load(bytes).err().expect("refused");
    assert!(matches!(err, EngineError::WrongShape { .. }), "{err}");
    assert!(err.to_string().contains("blk.0.attn_q.weight"), "{err}");
}

#[test]
fn a_broken_chat_template() {
    let bytes = tiny_llama(&LlamaShape::default())
        .metadata("tokenizer.chat_template", Value::String("{% for m in messages %}".into()))
        .build();
    // The builder appends a second chat_template key: the GGUF reader refuses duplicates first.
    assert!(load(bytes).is_err());
    let (_d, path) = write(tiny_llama(&LlamaShape::default()).build());
    let err = Engine::load(&path, Some("{% if %}")).err().expect("refused");
    assert!(err.to_string().contains("chat template"), "{err}");
    // Printing an undefined value gives nothing, as in jinja2; reaching into one is an error.
    let engine = Engine::load(&path, Some("{{ undefined_thing.attribute }}")).unwrap();
    let err = engine.chat_prompt(&[Message::new("user", "x")]).unwrap_err();
    assert!(err.to_string().contains("undefined"), "{err}");
}

#[test]
fn a_prompt_longer_than_the_context() {
    let engine = load(tiny_llama(&LlamaShape::default()).build()).unwrap();
    let prompt = engine.text_prompt(&"a".repeat(300)).unwrap();
    let req = GenerationRequest {
        prompt,
        max_tokens: 4,
        sampling: SamplingParams::greedy(),
        stop: vec![],
        stop_token_ids: vec![],
        logprobs: None,
        ignore_eos: false,
        constraint: None,
    };
    let err = engine.generate(&req, &mut |_| true).unwrap_err();
    assert!(matches!(err, EngineError::ContextOverflow { limit: 256, .. }), "{err}");
    assert!(err.to_string().contains("256"), "{err}");
}

/// Hyper-parameters a file sets out of range are refused, not replaced by defaults; a family's
/// own limits (expert counts, layer counts, scaling berth does not run) are clear errors too.
#[test]
fn hyper_parameters_out_of_range() {
    let cases: [(&str, Value, &str); 5] = [
        ("llama.attention.head_count_kv", Value::U32(0), "head_count_kv"),
        ("llama.attention.key_length", Value::U64(1 << 40), "key_length"),
        ("llama.block_count", Value::U32(100_000), "layers"),
        ("llama.rope.scaling.type", Value::String("yarn".into()), "yarn"),
        ("llama.rope.dimension_count", Value::U32(3), "rope dimension"),
    ];
    for (key, value, says) in cases {
        let b = tiny_llama(&LlamaShape::default()).without_metadata(key).metadata(key, value);
        let err = load(b.build()).err().unwrap_or_else(|| panic!("{key} was accepted"));
        assert!(err.to_string().contains(says), "{key}: {err}");
    }
}
