//! Every decoder family end to end with the real binary: its test model (random weights, a real
//! vocabulary and the family's real chat template, berth_testkit::families) packages with
//! `berth package --gguf`, `berth inspect` shows its architecture, parameters and context, and one
//! `berth serve` answers for each through the OpenAI and Ollama APIs with the family's own template.

mod util;

use berth_testkit::families::{FAMILIES, Storage, write_family_model};
use berth_testkit::models;
use serde_json::Value;
use util::Berth;
use util::server::Server;

#[test]
fn every_family_packages_serves_and_answers_through_both_apis() {
    let berth = Berth::new();
    let files = tempfile::tempdir().unwrap();
    for family in FAMILIES {
        let path = files.path().join(format!("{}.gguf", family.arch));
        write_family_model(*family, &models::llamacpp_testdata(), Storage::Q8_0, &path).unwrap();
        berth.ok(&["package", "--gguf", &path.display().to_string(), family.arch]);
        let shown = berth.ok(&["inspect", family.arch]);
        assert!(shown.contains(&format!("Architecture: {}", family.arch)), "{shown}");
        assert!(shown.contains("Context:      1024"), "{shown}");
        assert!(shown.contains("Parameters:"), "{shown}");
    }
    let server = Server::serve(berth, &["--model", "llama"]);
    for family in FAMILIES {
        let chat = format!(
            r#"{{"model":"{}","messages":[{{"role":"user","content":"Name three colours."}}],"max_tokens":5,"temperature":0}}"#,
            family.arch
        );
        let (status, body) = server.post("/v1/chat/completions", &chat);
        assert_eq!(status, 200, "{}: {body}\n{}", family.arch, server.log());
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["model"], format!("ai/{}:latest", family.arch));
        assert_eq!(v["usage"]["completion_tokens"], 5, "{}: {body}", family.arch);
        // The prompt went through the family's template: Gemma's has no system turn and wraps the
        // user's words in its turn markers, which the tokenizer counts as single tokens.
        assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 5, "{}: {body}", family.arch);

        let ollama = format!(
            r#"{{"model":"{}","messages":[{{"role":"user","content":"Name three colours."}}],"stream":false,"options":{{"num_predict":4,"temperature":0}}}}"#,
            family.arch
        );
        let (status, body) = server.post("/api/chat", &ollama);
        assert_eq!(status, 200, "{}: {body}", family.arch);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["eval_count"], 4, "{}: {body}", family.arch);
        assert_eq!(v["message"]["role"], "assistant");
    }
    // Gemma's template refuses a system message its own way: a clear 400, not a crash.
    let (status, body) = server.post(
        "/v1/chat/completions",
        r#"{"model":"gemma2","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"}],"max_tokens":2}"#,
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("System role not supported"), "{body}");
}

/// A reasoning model's thought comes apart from its answer: Qwen3's template thinks in `<think>`
/// tags. (The random-weight model writes a thought only when made to: a regex makes its answer
/// one, so the split is what is tested.) `enable_thinking: false` reaches the template, which then
/// closes the thought in the prompt itself.
#[test]
fn a_reasoning_models_thought_comes_apart_from_its_answer() {
    let berth = Berth::new();
    let files = tempfile::tempdir().unwrap();
    let qwen3 = *FAMILIES.iter().find(|f| f.arch == "qwen3").unwrap();
    let path = files.path().join("qwen3.gguf");
    write_family_model(qwen3, &models::llamacpp_testdata(), Storage::Q8_0, &path).unwrap();
    berth.ok(&["package", "--gguf", &path.display().to_string(), "qwen3"]);
    let server = Server::serve(berth, &["--model", "qwen3"]);
    let (_, listed) = berth_testkit::registry::http_request(server.port, "GET", "/v1/models/qwen3", &[], b"").unwrap();
    assert!(
        util::server::body_of(&listed).contains("\"reasoning\""),
        "Qwen3's template thinks: {}",
        util::server::body_of(&listed)
    );
    let shaped = r#""response_format":{"type":"regex","regex":"<think>\nfirst, think\n</think>\n\nthe answer"}"#;
    let ask = |extra: &str| {
        format!(
            r#"{{"model":"qwen3","messages":[{{"role":"user","content":"Why?"}}],"max_tokens":60,"temperature":1{extra}}}"#
        )
    };
    let (status, body) = server.post("/v1/chat/completions", &ask(&format!(",{shaped}")));
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let message = &v["choices"][0]["message"];
    assert_eq!(message["reasoning_content"], "first, think", "{body}");
    assert_eq!(message["content"], "the answer", "{body}");

    // Streamed: reasoning_content deltas, then content deltas, joined the same.
    let (status, body) = server.post("/v1/chat/completions", &ask(&format!(",{shaped},\"stream\":true")));
    assert_eq!(status, 200, "{body}");
    let (mut reasoning, mut content) = (String::new(), String::new());
    for line in body.lines().filter_map(|l| l.trim_end().strip_prefix("data: ")).filter(|l| *l != "[DONE]") {
        let chunk: Value = serde_json::from_str(line).unwrap();
        let delta = &chunk["choices"][0]["delta"];
        reasoning.push_str(delta["reasoning_content"].as_str().unwrap_or_default());
        content.push_str(delta["content"].as_str().unwrap_or_default());
    }
    assert_eq!((reasoning.as_str(), content.as_str()), ("first, think", "the answer"), "{body}");

    // enable_thinking: false is passed to the template: Qwen3's closes the thought in the prompt.
    let tokens = |extra: &str| {
        let (status, body) =
            server.post("/v1/chat/completions", &ask(extra).replace(r#""max_tokens":60"#, r#""max_tokens":1"#));
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<Value>(&body).unwrap()["usage"]["prompt_tokens"].as_u64().unwrap()
    };
    assert!(
        tokens(r#","chat_template_kwargs":{"enable_thinking":false}"#) > tokens(""),
        "the closed thought is in the prompt"
    );
    let (status, body) = server.post("/api/chat", r#"{"model":"qwen3","messages":[{"role":"user","content":"Why?"}],"stream":false,"think":false,"options":{"num_predict":1}}"#);
    assert_eq!(status, 200, "{body}");
    let thinking_off: Value = serde_json::from_str(&body).unwrap();
    let (_, body) = server.post(
        "/api/chat",
        r#"{"model":"qwen3","messages":[{"role":"user","content":"Why?"}],"stream":false,"options":{"num_predict":1}}"#,
    );
    let thinking_on: Value = serde_json::from_str(&body).unwrap();
    assert!(
        thinking_off["prompt_eval_count"].as_u64() > thinking_on["prompt_eval_count"].as_u64(),
        "{thinking_off} {thinking_on}"
    );
}
