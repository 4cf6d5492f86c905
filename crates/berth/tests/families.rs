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
