//! The APIs through the real server: the official openai, ollama and LangChain clients, bad
//! requests, a client that hangs up mid-stream, and `berth bench --url`.

mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use berth_testkit::models;
use berth_testkit::registry::http_request;
use util::Berth;
use util::server::*;

#[test]
fn the_official_openai_client_works() {
    let server = Server::start();
    let golden = models::golden_dir().join("minilm-l6-v2.reference.json").display().to_string();
    run_python(
        "openai_client.py",
        &[&format!("http://127.0.0.1:{}/v1", server.port), "ai/smollm2:latest", "ai/minilm:latest", &golden],
        &server,
    );
}

#[test]
fn the_official_ollama_client_works() {
    // A real registry holding a copy of the model, for /api/pull.
    let registry = berth_testkit::registry::Registry::start();
    let remote = format!("{}/berth-test/smollm2:v1", registry.host());
    let pusher = Berth::new();
    pusher.ok(&["package", "--gguf", &models::smollm2_gguf().display().to_string(), &remote]);
    pusher.ok(&["push", &remote]);
    let server = Server::start();
    let (status, _) = http_request(server.port, "HEAD", "/", &[], b"").unwrap();
    assert_eq!(status, 200);
    run_python(
        "ollama_client.py",
        &[
            &format!("http://127.0.0.1:{}", server.port),
            "ai/smollm2:latest",
            &remote,
            &models::smollm2_gguf().display().to_string(),
        ],
        &server,
    );
}

#[test]
fn structured_output_follows_every_schema_through_real_clients() {
    let server = Server::start();
    let base = format!("http://127.0.0.1:{}", server.port);
    run_python("structured_output.py", &[&format!("{base}/v1"), &base, "ai/smollm2:latest"], &server);
    assert!(server.metric_f64("berth:grammar_mask_seconds_total") > 0.0, "mask time is counted");
}

#[test]
fn tool_calls_through_real_clients() {
    let server = Server::start();
    let base = format!("http://127.0.0.1:{}", server.port);
    run_python("tool_calls.py", &[&format!("{base}/v1"), &base, "ai/smollm2:latest"], &server);
}

#[test]
fn the_official_anthropic_sdk_works() {
    let server = Server::start();
    // With keys, as coding agents send them: `x-api-key`.
    let key = server.berth.ok(&["keys", "create", "--name", "agent"]).trim().to_string();
    run_python(
        "anthropic_client.py",
        &[&format!("http://127.0.0.1:{}", server.port), "ai/smollm2:latest", &key],
        &server,
    );
}

#[test]
fn tokenize_and_detokenize_in_llama_cpps_shapes_and_models_list_capabilities() {
    let server = Server::start();
    // No `model`: the one loaded model answers.
    let (status, body) = server.post("/tokenize", r#"{"content":"Hello world, <|im_end|>","with_pieces":true}"#);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let pieces: String =
        v["tokens"].as_array().unwrap().iter().map(|t| t["piece"].as_str().unwrap().to_string()).collect();
    assert_eq!(pieces, "Hello world, <|im_end|>", "{body}");
    let ids: Vec<u64> = v["tokens"].as_array().unwrap().iter().map(|t| t["id"].as_u64().unwrap()).collect();
    // parse_special reads the control token's text as the token: fewer ids.
    let (_, special) =
        server.post("/tokenize", r#"{"model":"smollm2","content":"Hello world, <|im_end|>","parse_special":true}"#);
    let special: serde_json::Value = serde_json::from_str(&special).unwrap();
    assert!(special["tokens"].as_array().unwrap().len() < ids.len(), "{special}");
    let (status, body) = server.post("/detokenize", &serde_json::json!({"tokens": ids}).to_string());
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["content"], "Hello world, <|im_end|>");
    let (status, body) = server.post("/detokenize", r#"{"tokens":[99999999]}"#);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("outside the vocabulary"), "{body}");

    let (status, body) = http_request(server.port, "GET", "/v1/models", &[], b"").unwrap();
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body_of(&body)).unwrap();
    let caps = |id: &str| {
        v["data"].as_array().unwrap().iter().find(|m| m["id"] == id).map(|m| m["capabilities"].clone()).unwrap()
    };
    assert_eq!(caps("ai/smollm2:latest"), serde_json::json!(["chat", "completion", "json", "tools"]), "{v}");
    assert_eq!(caps("ai/minilm:latest"), serde_json::json!(["embeddings"]), "{v}");
}

#[test]
fn the_responses_api_and_the_openai_agents_sdk_work() {
    let server = Server::start();
    // Two keys: stored responses are each key's own.
    let one = server.berth.ok(&["keys", "create", "--name", "one"]).trim().to_string();
    let two = server.berth.ok(&["keys", "create", "--name", "two"]).trim().to_string();
    run_python(
        "responses_client.py",
        &[&format!("http://127.0.0.1:{}/v1", server.port), "ai/smollm2:latest", &one, &two],
        &server,
    );
}

#[test]
fn langchain_chat_openai_works() {
    let server = Server::start();
    run_python("langchain_client.py", &[&format!("http://127.0.0.1:{}/v1", server.port), "ai/smollm2:latest"], &server);
}

/// What clients written for llama.cpp's server, vLLM and Ollama expect of the OpenAI surface: no
/// `model` when one is loaded, paths without `/v1`, OpenAI's 16-token default for text completions,
/// and each API's rule for an embedding input longer than the model takes.
#[test]
fn peers_conventions_model_omitted_paths_without_v1_default_lengths_and_long_embeddings() {
    let server = Server::start();
    let json = |body: &str| serde_json::from_str::<serde_json::Value>(body).unwrap();
    // No model, no /v1, no max_tokens: the loaded model writes OpenAI's default 16 tokens.
    let (status, body) = server.post("/completions", r#"{"prompt":"Once upon a time","ignore_eos":true}"#);
    assert_eq!(status, 200, "{body}");
    let v = json(&body);
    assert_eq!(v["usage"]["completion_tokens"], 16, "{body}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{body}");
    assert_eq!(v["model"], "ai/smollm2:latest", "{body}");
    // Chat has no such default; the alias answers as /v1 does.
    let (status, body) =
        server.post("/chat/completions", r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#);
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["object"], "chat.completion", "{body}");
    let (status, body) = http_request(server.port, "GET", "/models", &[], b"").unwrap();
    assert_eq!(status, 200);
    assert!(body_of(&body).contains("ai/smollm2:latest"), "{}", body_of(&body));
    // `model: null` is no model; a stream's first delta is the role with no content yet (null, as
    // OpenAI's tool-call streams and llama.cpp begin: no client sees an empty content delta).
    let (status, body) = server.post(
        "/v1/chat/completions",
        r#"{"model":null,"messages":[{"role":"user","content":"hi"}],"max_tokens":3,"stream":true}"#,
    );
    assert_eq!(status, 200, "{body}");
    let first = body.lines().find_map(|l| l.strip_prefix("data: ")).map(json).unwrap();
    assert_eq!(first["choices"][0]["delta"], serde_json::json!({"role": "assistant", "content": null}), "{body}");
    assert!(!body.contains(r#""content":"""#), "no empty content delta: {body}");

    // OpenAI's other prompt forms: token ids, lists of them (echoed as text), and none at all (the
    // model starts a document: SmolLM2's <|endoftext|>).
    let (status, body) = server.post("/v1/completions", r#"{"prompt":[1780,314],"max_tokens":3}"#);
    assert_eq!((status, &json(&body)["usage"]["prompt_tokens"]), (200, &2.into()), "{body}");
    let (status, body) = server.post("/v1/completions", r#"{"prompt":[[1780],[1780,314]],"max_tokens":2,"echo":true}"#);
    assert_eq!(status, 200, "{body}");
    let texts: Vec<String> =
        json(&body)["choices"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap().to_string()).collect();
    assert!(texts.len() == 2 && texts[0].starts_with("What") && texts[1].starts_with("What is"), "{texts:?}");
    for none in [r#"{"prompt":null,"max_tokens":2}"#, r#"{"max_tokens":2}"#] {
        let (status, body) = server.post("/v1/completions", none);
        assert_eq!((status, &json(&body)["usage"]["prompt_tokens"]), (200, &1.into()), "{body}");
    }
    let (status, body) = server.post("/v1/completions", r#"{"prompt":[4000000000],"max_tokens":2}"#);
    assert_eq!((status, json(&body)["error"]["param"].as_str()), (400, Some("prompt")), "{body}");
    assert!(body.contains("outside the vocabulary"), "{body}");
    // n: up to OpenAI's 128 when the answers fit the KV cache together, refused with why otherwise.
    let (status, body) = server.post("/v1/completions", r#"{"prompt":"Hi","max_tokens":2,"n":20}"#);
    assert_eq!((status, json(&body)["choices"].as_array().map(Vec::len)), (200, Some(20)), "{body}");
    let (status, body) = server.post("/v1/completions", r#"{"prompt":"Hi","max_tokens":8000,"n":128}"#);
    assert_eq!((status, json(&body)["error"]["param"].as_str()), (400, Some("n")), "{body}");
    assert!(body.contains("KV cache"), "{body}");
    let (status, body) = server.post("/v1/completions", r#"{"prompt":"Hi","max_tokens":2,"n":129}"#);
    assert_eq!((status, json(&body)["error"]["param"].as_str()), (400, Some("n")), "{body}");
    // vLLM's continue_final_message: the last (assistant) message is continued, not answered.
    let prefill = r#"{"messages":[{"role":"user","content":"Name a colour."},{"role":"assistant","content":"My favourite colour is"}],
        "continue_final_message":true,"add_generation_prompt":false,"max_tokens":6,"temperature":0}"#;
    let (status, body) = server.post("/v1/chat/completions", prefill);
    assert_eq!(status, 200, "{body}");
    let new_turn = prefill.replace(r#""continue_final_message":true,"add_generation_prompt":false,"#, "");
    let (_, answered) = server.post("/v1/chat/completions", &new_turn);
    let tokens = |b: &str| json(b)["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(tokens(&body) < tokens(&answered), "no end of turn nor new turn after the prefill: {body} {answered}");
    for (request, param) in [
        (r#"{"messages":[{"role":"user","content":"Hi"}],"continue_final_message":true}"#, "continue_final_message"),
        (
            r#"{"messages":[{"role":"assistant","content":"Hi"}],"continue_final_message":true,"add_generation_prompt":true}"#,
            "continue_final_message",
        ),
        (r#"{"messages":[{"role":"user","content":"Hi"}],"add_generation_prompt":false}"#, "add_generation_prompt"),
    ] {
        let (status, body) = server.post("/v1/chat/completions", request);
        assert_eq!((status, json(&body)["error"]["param"].as_str()), (400, Some(param)), "{body}");
    }

    // Peers' constraint fields: vLLM's guided_choice (special characters taken literally) and
    // guided_json, llama.cpp's json_schema; GBNF is refused rather than ignored, as is asking twice.
    let (status, body) = server.post(
        "/v1/chat/completions",
        r#"{"messages":[{"role":"user","content":"Is it raining?"}],"guided_choice":["yes","no (maybe.)"],"temperature":1}"#,
    );
    assert_eq!(status, 200, "{body}");
    let answer = json(&body)["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(answer == "yes" || answer == "no (maybe.)", "{answer}");
    for field in ["guided_json", "json_schema"] {
        let request = serde_json::json!({"prompt": "A number:", "max_tokens": 20, field:
            {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}});
        let (status, body) = server.post("/v1/completions", &request.to_string());
        assert_eq!(status, 200, "{body}");
        let text = json(&body)["choices"][0]["text"].as_str().unwrap().to_string();
        if json(&body)["choices"][0]["finish_reason"] == "stop" {
            assert!(json(&text)["n"].is_i64(), "{field}: {text}");
        }
    }
    let (status, body) = server.post("/v1/completions", r#"{"prompt":"x","grammar":"root ::= \"a\""}"#);
    assert_eq!((status, json(&body)["error"]["param"].as_str()), (400, Some("grammar")), "{body}");
    let (status, body) = server
        .post("/v1/completions", r#"{"prompt":"x","guided_regex":"a+","response_format":{"type":"json_object"}}"#);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("one way of constraining"), "{body}");

    // Embeddings: no embedding model loaded yet, so one must be named.
    let (status, body) = server.post("/embeddings", r#"{"input":"hi"}"#);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("model is required") && body.contains("minilm"), "{body}");
    let long = "word ".repeat(2000);
    // OpenAI's rule: too long is an error that says how long, never a silent cut.
    let (status, body) =
        server.post("/v1/embeddings", &serde_json::json!({"model": "minilm", "input": long}).to_string());
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("too large: 2002 tokens") && body.contains("at most 256"), "{body}");
    assert_eq!(json(&body)["error"]["param"], "input", "{body}");
    // Now loaded, it is the default for embeddings (and the chat model still for chat).
    let (status, body) = server.post("/embeddings", r#"{"input":["a","b"]}"#);
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["model"], "ai/minilm:latest", "{body}");
    // Ollama's rule: cut by default, refused with truncate: false (in Ollama's error shape).
    let (status, body) = server.post("/api/embed", &serde_json::json!({"model": "minilm", "input": long}).to_string());
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["prompt_eval_count"], 256, "{body}");
    let (status, body) = server
        .post("/api/embed", &serde_json::json!({"model": "minilm", "input": long, "truncate": false}).to_string());
    assert_eq!(status, 400, "{body}");
    assert!(json(&body)["error"].as_str().unwrap().contains("2002 tokens"), "{body}");
    // Ollama's legacy endpoint, still what its clients' embeddings() call.
    let (status, body) = server.post("/api/embeddings", r#"{"model":"minilm","prompt":"hello"}"#);
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["embedding"].as_array().unwrap().len(), 384, "{body}");
}

#[test]
fn bad_requests_get_clear_errors_and_the_server_keeps_serving() {
    let server = Server::start();
    let chat = |extra: &str| {
        format!(r#"{{"model":"smollm2","messages":[{{"role":"user","content":"hi"}}],"max_tokens":4{extra}}}"#)
    };
    let long_prompt =
        format!(r#"{{"model":"smollm2","messages":[{{"role":"user","content":"{}"}}]}}"#, "hello ".repeat(100_000));
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("invalid JSON", "{not json".into(), 400, "not valid JSON"),
        ("wrong type", chat(r#","temperature":"hot""#), 400, "temperature"),
        ("negative max_tokens", chat(r#","max_tokens":-5"#).replace(r#""max_tokens":4,"#, ""), 400, "max_tokens"),
        ("huge max_tokens", chat("").replace(r#""max_tokens":4"#, r#""max_tokens":100000000"#), 400, "context"),
        ("top_logprobs 21", chat(r#","logprobs":true,"top_logprobs":21"#), 400, "top_logprobs"),
        ("temperature -1", chat(r#","temperature":-1"#), 400, "temperature"),
        ("empty messages", r#"{"model":"smollm2","messages":[]}"#.into(), 400, "messages"),
        ("unknown model", chat("").replace("smollm2", "nope"), 404, "nope"),
        ("100k-token prompt", long_prompt, 400, "context"),
        ("json_schema", chat(r#","response_format":{"type":"json_schema"}"#), 400, "response_format"),
        // Each wrong field is named, not the last one serde happened to read.
        (
            "max_tokens 1e308",
            chat(r#","temperature":0.5"#).replace(r#""max_tokens":4"#, r#""max_tokens":1e308"#),
            400,
            "max_tokens is 1e308",
        ),
        (
            "fractional max_tokens",
            chat("").replace(r#""max_tokens":4"#, r#""max_tokens":2.5"#),
            400,
            "max_tokens must be a whole number",
        ),
        ("top_k as text", chat(r#","top_k":"many","temperature":0.5"#), 400, "top_k must be a number"),
        ("stop as a number", chat(r#","stop":5"#), 400, "stop must be"),
        ("five stops", chat(r#","stop":["a","b","c","d","e"]"#), 400, "at most 4"),
        ("logit_bias off the vocabulary", chat(r#","logit_bias":{"999999":1}"#), 400, "logit_bias"),
        ("seed 0.5", chat(r#","seed":0.5"#), 400, "seed must be a whole number"),
        (
            "tool_choice naming no tool",
            chat(
                r#","tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":{"type":"function","function":{"name":"g"}}"#,
            ),
            400,
            "not among the request's tools",
        ),
        (
            "unenforceable schema",
            chat(
                r#","response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"array","uniqueItems":true}}}"#,
            ),
            400,
            "uniqueItems",
        ),
    ];
    for (name, body, status, needle) in cases {
        let (got, text) = server.post("/v1/chat/completions", &body);
        assert_eq!(got, status, "{name}: {text}");
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: not JSON ({e}): {text}"));
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{name}: {message}");
        assert!(v["error"]["type"].is_string(), "{name}: OpenAI error shape: {text}");
    }

    // Every 400 above carries the parameter it blames.
    let (_, text) =
        server.post("/v1/chat/completions", &chat("").replace(r#""max_tokens":4"#, r#""max_tokens":1e308"#));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["param"], "max_tokens", "{text}");
    // Tools the model may ignore still get an answer in text.
    let (status, text) = server.post(
        "/v1/chat/completions",
        &chat(r#","tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"auto""#),
    );
    assert_eq!(status, 200, "{text}");

    // Ollama: the same checks, in Ollama's names; images are refused, not ignored.
    let ollama_cases = [
        ("/api/generate", r#"{"model":"smollm2","prompt":"hi","images":["aGk="],"stream":false}"#, "images"),
        (
            "/api/chat",
            r#"{"model":"smollm2","messages":[{"role":"user","content":"hi","images":["aGk="]}],"stream":false}"#,
            "images",
        ),
        (
            "/api/generate",
            r#"{"model":"smollm2","prompt":"hi","stream":false,"options":{"temperature":7}}"#,
            "temperature",
        ),
        (
            "/api/generate",
            r#"{"model":"smollm2","prompt":"hi","stream":false,"options":{"num_predict":1e9}}"#,
            "num_predict",
        ),
        (
            "/api/chat",
            r#"{"model":"smollm2","messages":[{"role":"user","content":"hi"}],"stream":true,"options":{"top_k":-3}}"#,
            "top_k",
        ),
    ];
    for (path, body, needle) in ollama_cases {
        let (status, text) = server.post(path, body);
        assert_eq!(status, 400, "{path} {body}: {text}");
        // Ollama's shape: the message as a string (its clients show `error` as it is).
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        assert!(v["error"].as_str().is_some_and(|m| m.contains(needle)), "{path} {body}: {text}");
    }
    let (status, text) = server.post("/api/chat", r#"{"model":"nope","messages":[{"role":"user","content":"hi"}]}"#);
    assert_eq!(status, 404, "{text}");
    assert!(serde_json::from_str::<serde_json::Value>(&text).unwrap()["error"].is_string(), "{text}");

    // A 10 MB body is refused at the limit.
    let huge = format!(r#"{{"model":"smollm2","messages":[{{"role":"user","content":"{}"}}]}}"#, "a".repeat(10 << 20));
    let (status, _) = server.post("/v1/chat/completions", &huge);
    assert_eq!(status, 413);

    // A 1 MB header is refused by the HTTP layer.
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let header = format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {}\r\n\r\n", "a".repeat(1 << 20));
    let _ = s.write_all(header.as_bytes());
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let head = String::from_utf8_lossy(&resp[..resp.len().min(40)]).to_string();
    assert!(head.is_empty() || head.contains(" 431 ") || head.contains(" 400 "), "big header: {head}");

    // Unknown fields are ignored, and the server still answers.
    let (status, text) = server.post("/v1/chat/completions", &chat(r#","no_such_field":{"x":1}"#));
    assert_eq!(status, 200, "{text}");
    let (status, _) = http_request(server.port, "GET", "/health", &[], b"").unwrap();
    assert_eq!(status, 200);
}

#[test]
fn a_client_that_hangs_up_stops_its_generation() {
    let server = Server::start();
    let before = server.metric("berth:generation_tokens_total");
    let body = r#"{"model":"smollm2","messages":[{"role":"user","content":"Write a long story about a dragon."}],"max_tokens":500,"stream":true,"temperature":0}"#;
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    // Read until a few content chunks arrived, then hang up.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(&seen).matches("\"content\"").count() < 4 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    drop(s);
    std::thread::sleep(Duration::from_millis(1500));
    let after_hangup = server.metric("berth:generation_tokens_total");
    std::thread::sleep(Duration::from_millis(1500));
    let later = server.metric("berth:generation_tokens_total");
    assert_eq!(after_hangup, later, "generation went on after the client left");
    let received = String::from_utf8_lossy(&seen).matches("\"content\"").count() as u64;
    // At most one decoding step runs after the hang-up is noticed (plus chunks in flight).
    assert!(
        after_hangup - before <= received + 8,
        "generated {} tokens for a client that read {received}",
        after_hangup - before
    );
    assert!(after_hangup - before < 500, "the generation ran to its end");
}

/// `berth bench --url` against the real server: every request completes, the counts are the
/// server's (fixed output length through ignore_eos), and the latencies are consistent.
#[test]
fn bench_url_measures_a_running_server() {
    let server = Server::start();
    let url = format!("http://127.0.0.1:{}", server.port);
    let args = ["bench", "smollm2", "--url", &url, "--requests", "6", "--concurrency", "3", "--prompt-tokens", "32"];
    let report = server.berth.json(&[&args[..], &["--gen-tokens", "12", "--json"]].concat());
    assert_eq!(report["completed"], 6, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["mean_prompt_tokens"], 32.0, "{report}");
    assert_eq!(report["mean_output_tokens"], 12.0, "{report}");
    let ms = |k: &str, p: &str| report[k][p].as_f64().unwrap_or(-1.0);
    assert!(ms("ttft_ms", "p50") > 0.0 && ms("ttft_ms", "p99") >= ms("ttft_ms", "p50"), "{report}");
    assert!(ms("e2e_ms", "p50") >= ms("ttft_ms", "p50") && ms("itl_ms", "p50") > 0.0, "{report}");
    assert!(ms("tpot_ms", "mean") > 0.0 && report["output_token_throughput"].as_f64().unwrap_or(0.0) > 0.0);
    // Poisson arrivals, and a model the server does not have: every failure is counted and named.
    let poisson = server.berth.json(&[
        "bench",
        "smollm2",
        "--url",
        &url,
        "--requests",
        "3",
        "--rate",
        "20",
        "--prompt-tokens",
        "16",
        "--gen-tokens",
        "4",
        "--json",
    ]);
    assert_eq!(poisson["completed"], 3, "{poisson}");
    let err = server.berth.fails(&["bench", "nosuch", "--url", &url, "--requests", "2", "--gen-tokens", "4"]);
    assert!(err.contains("no request completed") && err.contains("does not exist"), "{err}");
}

/// A client that waits for `/health` (llama.cpp's clients do) and then asks without `model` gets
/// the model `--model` names, even while it is still loading: the request waits for the load.
#[test]
fn a_request_without_model_waits_for_the_model_loading_at_start() {
    let berth = Berth::new();
    berth.ok(&["package", "--gguf", &models::smollm2_gguf().display().to_string(), "smollm2"]);
    let port = berth_testkit::free_port();
    let mut child = berth
        .command(&["serve", "--port", &port.to_string(), "--model", "smollm2"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start berth serve");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !matches!(http_request(port, "GET", "/health", &[], b""), Ok((200, _))) {
        assert!(std::time::Instant::now() < deadline, "berth serve did not come up");
        std::thread::sleep(Duration::from_millis(5));
    }
    let body = r#"{"messages":[{"role":"user","content":"Hi"}],"max_tokens":2}"#;
    let headers = [("Content-Type", "application/json")];
    let (status, raw) = http_request(port, "POST", "/v1/chat/completions", &headers, body.as_bytes()).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, 200, "{}", body_of(&raw));
    assert!(body_of(&raw).contains("ai/smollm2:latest"), "{}", body_of(&raw));
}
