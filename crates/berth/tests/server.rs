//! `berth serve` through the real binary on a free port: the official openai and ollama Python
//! clients, bad requests, and a client that hangs up mid-stream.

mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth_testkit::models;
use berth_testkit::registry::http_request;
use util::Berth;

struct Server {
    child: Child,
    port: u16,
    log: PathBuf,
    berth: Berth,
}

impl Server {
    /// Package SmolLM2 into a fresh home and serve it.
    fn start() -> Server {
        Self::start_with(&[])
    }

    /// The same, with more `berth serve` options.
    fn start_with(options: &[&str]) -> Server {
        let berth = Berth::new();
        berth.ok(&["package", "--gguf", &models::smollm2_gguf().display().to_string(), "smollm2"]);
        berth.ok(&["package", "--safetensors-dir", &models::minilm_dir().display().to_string(), "minilm"]);
        let port = berth_testkit::free_port();
        let log = berth.home().join("server.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = berth
            .command(&[&["serve", "--port", &port.to_string(), "--model", "smollm2"][..], options].concat())
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("start berth serve");
        let mut server = Server { child, port, log, berth };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = http_request(port, "GET", "/ready", &[], b"") {
                break;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("berth serve exited with {status}; log:\n{}", server.log());
            }
            assert!(Instant::now() < deadline, "berth serve was not ready within 60 s; log:\n{}", server.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn post(&self, path: &str, body: &str) -> (u16, String) {
        let (status, raw) =
            http_request(self.port, "POST", path, &[("Content-Type", "application/json")], body.as_bytes())
                .expect("request");
        (status, body_of(&raw))
    }

    fn metric(&self, name: &str) -> u64 {
        self.metric_f64(name) as u64
    }

    fn metric_f64(&self, name: &str) -> f64 {
        let (_, raw) = http_request(self.port, "GET", "/metrics", &[], b"").expect("metrics");
        body_of(&raw)
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// Wait (at most 30 s) for the server to exit on its own, and return how it did.
    fn wait_for_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "berth serve did not exit; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server process's peak resident memory (kB), from the kernel.
    fn peak_rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn body_of(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
}

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("BERTH_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(
        venv.exists(),
        "the Python clients for the API tests are missing: run .ci/run, or `python3 -m venv .venv && .venv/bin/pip install openai ollama` at the repository root (or set BERTH_TEST_PYTHON)"
    );
    venv
}

fn run_python(script: &str, args: &[&str], server: &Server) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python").join(script);
    let out = Command::new(python()).arg(&path).args(args).output().expect("run python");
    assert!(
        out.status.success(),
        "{script} failed ({}):\n--- stdout\n{}\n--- stderr\n{}\n--- server log\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
}

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
        &[&format!("http://127.0.0.1:{}", server.port), "ai/smollm2:latest", &remote],
        &server,
    );
}

#[test]
fn langchain_chat_openai_works() {
    let server = Server::start();
    run_python("langchain_client.py", &[&format!("http://127.0.0.1:{}/v1", server.port), "ai/smollm2:latest"], &server);
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

/// Send a completion request on its own connection (closed by the server when the answer ends).
fn send_completion(port: u16, body: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("send");
    s
}

/// Read a streamed answer until `events` text events have arrived; returns what was read.
fn read_events(s: &mut TcpStream, events: usize) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(&seen).matches(r#""text""#).count() < events {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "the stream ended early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    seen
}

/// Read what is left of a response until the server closes the connection.
fn read_rest(s: &mut TcpStream, seen: &mut Vec<u8>) {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

/// A completion on its own connection: status, the raw response (headers and body).
fn stream_completion(port: u16, body: &str) -> (u16, String) {
    let mut s = send_completion(port, body);
    let mut raw = Vec::new();
    read_rest(&mut s, &mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text)
}

/// 200 requests at once against a queue of 32: the excess is refused with 429 and Retry-After,
/// every admitted request runs to its end, and memory stays within the KV budget.
#[test]
fn overload_is_refused_with_retry_after_and_admitted_requests_complete() {
    let server = Server::start_with(&["--max-running", "8", "--max-queue", "32", "--kv-cache", "32MiB"]);
    let port = server.port;
    let clients = 200;
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(clients));
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let body = format!(
                    r#"{{"model":"smollm2","prompt":"Request {i}: tell me about ships","max_tokens":8,"temperature":0,"ignore_eos":true,"stream":true}}"#
                );
                barrier.wait();
                stream_completion(port, &body)
            })
        })
        .collect();
    let results: Vec<(u16, String)> = threads.into_iter().map(|t| t.join().expect("client thread")).collect();
    let (mut ok, mut refused) = (0, 0);
    for (status, raw) in &results {
        match status {
            200 => {
                assert!(raw.contains("data: [DONE]"), "an admitted request did not finish: {raw}");
                assert_eq!(raw.matches(r#""finish_reason":"length""#).count(), 1, "{raw}");
                ok += 1;
            }
            429 => {
                let lower = raw.to_ascii_lowercase();
                let retry = lower.lines().find_map(|l| l.strip_prefix("retry-after:")).map(str::trim);
                assert!(retry.and_then(|r| r.parse::<u64>().ok()).is_some_and(|s| s >= 1), "no Retry-After: {raw}");
                assert!(raw.contains(r#""code":"queue_full""#) && raw.contains("--max-queue"), "{raw}");
                refused += 1;
            }
            other => panic!("unexpected status {other}: {raw}\n--- server log\n{}", server.log()),
        }
    }
    eprintln!("overload: {ok} admitted and completed, {refused} refused with 429");
    assert_eq!(ok + refused, clients);
    assert!(ok >= 32, "at least the queue's worth of requests is admitted: {ok}");
    assert!(refused >= 100, "the excess is refused: {refused}");
    assert_eq!(server.metric("berth:num_requests_running"), 0);
    assert_eq!(server.metric("berth:num_requests_waiting"), 0);
    assert_eq!(server.metric_f64("berth:kv_cache_usage_perc"), 0.0);
    // The model (~100 MB mapped), a 32 MiB KV cache, and the server itself.
    let peak = server.peak_rss_kb();
    eprintln!("overload: peak resident memory {} MB", peak / 1024);
    assert!(peak > 0 && peak < 600 * 1024, "peak resident memory {peak} kB");
}

/// 32 streaming clients hang up mid-answer at once: their sequences stop and their blocks are free
/// within a few scheduler steps.
#[test]
fn thirty_two_clients_hanging_up_free_every_block() {
    let server = Server::start();
    let port = server.port;
    let clients = 32;
    let reading = std::sync::Arc::new(std::sync::Barrier::new(clients + 1));
    let hang_up = std::sync::Arc::new(std::sync::Barrier::new(clients + 1));
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let (reading, hang_up) = (reading.clone(), hang_up.clone());
            std::thread::spawn(move || {
                let body = format!(
                    r#"{{"model":"smollm2","prompt":"Story {i}: once upon a time","max_tokens":2000,"temperature":0,"ignore_eos":true,"stream":true}}"#
                );
                let mut s = send_completion(port, &body);
                read_events(&mut s, 2);
                reading.wait();
                hang_up.wait();
                drop(s);
            })
        })
        .collect();
    reading.wait();
    assert_eq!(server.metric("berth:num_requests_running"), clients as u64, "all 32 stream at once");
    let steps_before = server.metric("berth:engine_steps_total");
    let started = Instant::now();
    hang_up.wait();
    for t in threads {
        t.join().expect("client thread");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.metric("berth:num_requests_running") > 0 || server.metric_f64("berth:kv_cache_usage_perc") > 0.0 {
        assert!(Instant::now() < deadline, "sequences kept running after their clients left");
        std::thread::sleep(Duration::from_millis(20));
    }
    let elapsed = started.elapsed();
    let steps = server.metric("berth:engine_steps_total") - steps_before;
    eprintln!("hang-ups: all blocks free {} ms and {steps} steps after 32 clients left", elapsed.as_millis());
    // Writing to a closed connection fails at the next token or the one after; the step after that
    // frees the blocks.
    assert!(steps <= 6, "{steps} steps ran after the clients left");
    assert_eq!(server.metric("berth:num_requests_waiting"), 0);
}

/// Two requests sharing a long prefix: the second reuses its cached blocks, and says so in its
/// usage (`prompt_tokens_details.cached_tokens`) and in the metrics.
#[test]
fn a_shared_prefix_is_served_from_the_cache() {
    let server = Server::start();
    let prefix = " hello".repeat(1000);
    let ask = |question: &str| {
        let body = format!(r#"{{"model":"smollm2","prompt":"{prefix}{question}","max_tokens":4,"temperature":0}}"#);
        // A 1,000-token prefill may take a while on a busy machine: a long read timeout.
        let (status, raw) = stream_completion(server.port, &body);
        assert_eq!(status, 200, "{raw}");
        serde_json::from_str::<serde_json::Value>(&body_of(raw.as_bytes())).expect("JSON")
    };
    let cold = ask(" Who are you?");
    let warm = ask(" Where are you?");
    let cached = |v: &serde_json::Value| v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0);
    assert_eq!(cached(&cold), 0, "{cold}");
    assert!(cached(&warm) >= 992, "the shared 1,000 tokens (62 full blocks) came from the cache: {warm}");
    assert!(server.metric("berth:prefix_cache_hits_total") >= 992);
    assert!(server.metric("berth:prefix_cache_queries_total") >= 2000);
}

/// Percent-encode a query parameter (everything but unreserved characters).
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A real Prometheus (Debian's package) scrapes berth: the vLLM-named series arrive with their
/// `model_name` label, histograms included.
#[test]
fn a_real_prometheus_scrapes_the_metrics() {
    let binary =
        ["/usr/bin/prometheus", "/usr/local/bin/prometheus"].into_iter().find(|p| std::path::Path::new(p).exists());
    let binary = binary.expect("prometheus is missing: `apt-get install prometheus` (.ci/run installs it)");
    let server = Server::start();
    for i in 0..3 {
        let body =
            format!(r#"{{"model":"smollm2","prompt":"Count {i}:","max_tokens":6,"temperature":0,"ignore_eos":true}}"#);
        assert_eq!(server.post("/v1/completions", &body).0, 200);
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: berth\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
            server.port
        ),
    )
    .unwrap();
    let port = berth_testkit::free_port();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let mut prometheus = Command::new(binary)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start prometheus");
    let query = |q: &str| -> serde_json::Value {
        match http_request(port, "GET", &format!("/api/v1/query?query={}", url_encode(q)), &[], b"") {
            Ok((200, raw)) => serde_json::from_str(&body_of(&raw)).unwrap_or_default(),
            _ => serde_json::Value::Null,
        }
    };
    let value = |v: &serde_json::Value| -> Option<f64> { v["data"]["result"][0]["value"][1].as_str()?.parse().ok() };
    let deadline = Instant::now() + Duration::from_secs(90);
    let tokens = loop {
        let v = query("berth:generation_tokens_total");
        if let Some(n) = value(&v) {
            assert_eq!(v["data"]["result"][0]["metric"]["model_name"], "ai/smollm2:latest", "{v}");
            break n;
        }
        if Instant::now() > deadline {
            let _ = prometheus.kill();
            let log = std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
            panic!("Prometheus never scraped berth; its log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(tokens >= 18.0, "3 requests × 6 tokens, got {tokens}");
    let checks = [
        (r#"berth:request_success_total{finished_reason="length"}"#, 3.0),
        ("berth:time_to_first_token_seconds_count", 3.0),
        ("berth:e2e_request_latency_seconds_count", 3.0),
        (r#"berth:model_memory_bytes{part="weights"}"#, 1e6),
        ("berth:kv_cache_usage_perc", 0.0),
        ("berth:num_requests_running", 0.0),
    ];
    for (q, at_least) in checks {
        let got = value(&query(q));
        assert!(got.is_some_and(|g| g >= at_least), "{q}: {got:?}");
    }
    // Quantiles work on the histograms as on vLLM's.
    let median = value(&query("histogram_quantile(0.5, sum by (le) (berth:time_to_first_token_seconds_bucket))"));
    assert!(median.is_some_and(|m| m > 0.0 && m.is_finite()), "{median:?}");
    let _ = prometheus.kill();
    let _ = prometheus.wait();
}

/// SIGTERM: `/ready` turns 503 and new work is refused at once, the answer being streamed runs to
/// its end, and the process exits cleanly.
#[test]
fn sigterm_drains_the_requests_in_flight() {
    // A drain timeout no loaded test machine reaches: every stream must end on its own.
    let mut server = Server::start_with(&["--drain-timeout", "120"]);
    let port = server.port;
    let body = r#"{"model":"smollm2","prompt":"Once upon a time","max_tokens":60,"temperature":0,"ignore_eos":true,"stream":true,"stream_options":{"include_usage":true}}"#;
    // 16 streams, each under way before the signal.
    let mut streams: Vec<(TcpStream, Vec<u8>)> = (0..16).map(|_| (send_completion(port, body), Vec::new())).collect();
    for (s, seen) in &mut streams {
        *seen = read_events(s, 1);
    }
    // SAFETY: sending a signal to the child process this test started.
    assert_eq!(unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) }, 0);
    let signalled = Instant::now();
    let deadline = signalled + Duration::from_secs(30);
    while http_request(port, "GET", "/ready", &[], b"").map(|r| r.0).unwrap_or(0) != 503 {
        assert!(Instant::now() < deadline, "/ready did not turn 503 after SIGTERM");
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!("SIGTERM: /ready answered 503 after {:?}", signalled.elapsed());
    let (status, text) = server.post("/v1/completions", r#"{"model":"smollm2","prompt":"Hi","max_tokens":2}"#);
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("shutting down"), "{text}");
    for (s, seen) in &mut streams {
        read_rest(s, seen);
        let text = String::from_utf8_lossy(seen);
        let last = text.lines().rfind(|l| l.starts_with("data:")).unwrap_or_default();
        assert_eq!(last, "data: [DONE]", "a stream did not finish: {text}");
        assert!(text.contains(r#""completion_tokens":60"#), "{text}");
    }
    let status = server.wait_for_exit();
    assert!(status.success(), "exit status {status}; log:\n{}", server.log());
    assert!(server.log().contains("stopping"), "{}", server.log());
}

/// Answers still running when the drain timeout passes end with a final error event, not a cut.
#[test]
fn the_drain_timeout_ends_long_answers_with_an_error_event() {
    let mut server = Server::start_with(&["--drain-timeout", "1"]);
    let body = r#"{"model":"smollm2","prompt":"Once upon a time","max_tokens":5000,"temperature":0,"ignore_eos":true,"stream":true}"#;
    let mut s = send_completion(server.port, body);
    let mut seen = read_events(&mut s, 2);
    // SAFETY: sending a signal to the child process this test started.
    assert_eq!(unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) }, 0);
    read_rest(&mut s, &mut seen);
    let text = String::from_utf8_lossy(&seen);
    let last = text.lines().rfind(|l| l.starts_with("data:")).unwrap_or_default();
    assert!(last.contains("error") && last.contains("shut down"), "the stream must end with an error event: {last}");
    let status = server.wait_for_exit();
    assert!(status.success(), "exit status {status}; log:\n{}", server.log());
}

/// The memory budget: an idle model is unloaded to make room for another, a pinned one is not (the
/// load is refused, saying why), `keep_alive` unloads idle models, and `berth ps` / `berth unload`
/// show and change it.
#[test]
fn models_share_a_memory_budget_and_unload_when_idle() {
    // One SmolLM2 needs ~94 MiB of weights + 16 MiB of KV cache + 64 MiB working memory: two do not
    // fit in 240 MiB.
    let budget = ["--kv-cache", "16MiB", "--memory-budget", "240MiB"];
    let server = Server::start_with(&budget);
    let url = format!("http://127.0.0.1:{}", server.port);
    server.berth.ok(&["package", "--gguf", &models::smollm2_gguf().display().to_string(), "smollm2-copy"]);
    let names = |server: &Server| -> Vec<String> {
        let ps = server.berth.json(&["ps", "--url", &format!("http://127.0.0.1:{}", server.port), "--json"]);
        ps["models"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(names(&server), ["ai/smollm2:latest"]);
    let ask = |server: &Server, model: &str, extra: &str| {
        let body =
            format!(r#"{{"model":"{model}","prompt":"Hi","stream":false,"options":{{"num_predict":3}}{extra}}}"#);
        server.post("/api/generate", &body)
    };
    let (status, text) = ask(&server, "smollm2-copy", "");
    assert_eq!(status, 200, "{text}");
    assert_eq!(names(&server), ["ai/smollm2-copy:latest"], "the idle model made room");
    let table = server.berth.ok(&["ps", "--url", &url]);
    assert!(
        table.contains("ai/smollm2-copy:latest") && table.contains("ready") && table.contains("memory:"),
        "{table}"
    );

    // keep_alive 0 on a request: unloaded once it is answered.
    let (status, text) = ask(&server, "smollm2", r#","keep_alive":0"#);
    assert_eq!(status, 200, "{text}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !names(&server).is_empty() {
        assert!(Instant::now() < deadline, "keep_alive 0 did not unload: {:?}", names(&server));
        std::thread::sleep(Duration::from_millis(100));
    }
    // `berth unload` lets go of a loaded model.
    assert_eq!(ask(&server, "smollm2", "").0, 200);
    let out = server.berth.ok(&["unload", "smollm2", "--url", &url]);
    assert!(out.contains("Unloaded"), "{out}");
    assert!(names(&server).is_empty());

    // A pinned model stays: the other one is refused with the reason.
    let pinned = Server::start_with(&[&budget[..], &["--pin", "smollm2", "--keep-alive", "1s"]].concat());
    pinned.berth.ok(&["package", "--gguf", &models::smollm2_gguf().display().to_string(), "smollm2-copy"]);
    let (status, text) = ask(&pinned, "smollm2-copy", "");
    assert_eq!(status, 503, "{text}");
    assert!(
        text.contains("insufficient_memory") && text.contains("pinned") && text.contains("--memory-budget"),
        "{text}"
    );
    // Idle past the keep-alive of 1 s, yet pinned: still loaded.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(names(&pinned), ["ai/smollm2:latest"]);
}

/// `--keep-alive`: a model idle for longer is unloaded without being asked.
#[test]
fn idle_models_unload_after_their_keep_alive() {
    let server = Server::start_with(&["--keep-alive", "1s"]);
    let (status, _) = server.post("/v1/completions", r#"{"model":"smollm2","prompt":"Hi","max_tokens":2}"#);
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ps = server.berth.json(&["ps", "--url", &format!("http://127.0.0.1:{}", server.port), "--json"]);
        if ps["models"].as_array().is_some_and(|m| m.is_empty()) {
            break;
        }
        assert!(Instant::now() < deadline, "still loaded: {ps}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(server.log().contains("idle past its keep-alive"), "{}", server.log());
}

/// Without API keys berth stays on loopback, and there it answers only to this machine's names:
/// a page on `evil.example` re-pointed at 127.0.0.1 (DNS rebinding) gets 403 for every endpoint.
#[test]
fn foreign_host_names_and_public_addresses_are_refused() {
    let server = Server::start();
    for path in ["/api/tags", "/v1/models", "/api/ps"] {
        let (status, raw) = http_request(server.port, "GET", path, &[("Host", "evil.example:12480")], b"").unwrap();
        let body = body_of(&raw);
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.contains("host_not_allowed") && body.contains("--allowed-host"), "{body}");
    }
    let (status, raw) =
        http_request(server.port, "POST", "/api/delete", &[("Host", "evil.example")], br#"{"model":"smollm2"}"#)
            .unwrap();
    assert_eq!(status, 403, "{}", body_of(&raw));
    assert_eq!(server.berth.ok(&["list"]).matches("smollm2").count(), 1, "the model is still there");
    let (status, _) = http_request(server.port, "GET", "/v1/models", &[("Host", "localhost")], b"").unwrap();
    assert_eq!(status, 200);

    let err = server.berth.fails(&["serve", "--host", "0.0.0.0", "--port", &berth_testkit::free_port().to_string()]);
    assert!(err.contains("without API keys") && err.contains("--allow-insecure-public"), "{err}");
}

/// Every response carries an `x-request-id` (the caller's, or a fresh one), and the server's log line
/// for the request carries it too; `--log-format json` writes one JSON object per line.
#[test]
fn requests_carry_their_id_into_json_logs() {
    let server = Server::start_with(&["--log-format", "json"]);
    let (status, raw) = http_request(server.port, "GET", "/v1/models", &[("x-request-id", "trace-42.a")], b"").unwrap();
    assert_eq!(status, 200);
    let head = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    assert!(head.contains("x-request-id: trace-42.a"), "{head}");
    let (_, raw) = http_request(server.port, "GET", "/health", &[("x-request-id", "has a space")], b"").unwrap();
    let head = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    assert!(head.contains("x-request-id: req-"), "a fresh id replaces an unusable one: {head}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.log().contains("trace-42.a") {
        assert!(Instant::now() < deadline, "the request's id is not in the log:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    for line in server.log().lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{line}");
    }
    // A generation logs its end with the request's id, the model, tokens and timings.
    let headers = [("x-request-id", "gen-7"), ("Content-Type", "application/json")];
    let body = br#"{"model":"smollm2","prompt":"Hi","max_tokens":3,"temperature":0,"ignore_eos":true}"#;
    assert_eq!(http_request(server.port, "POST", "/v1/completions", &headers, body).unwrap().0, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    let generation = loop {
        let log = server.log();
        let line = log.lines().find(|l| l.contains("gen-7") && l.contains(r#""message":"generation""#));
        if let Some(line) = line {
            break serde_json::from_str::<serde_json::Value>(line).unwrap();
        }
        assert!(Instant::now() < deadline, "no generation line:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(generation["model"], "ai/smollm2:latest", "{generation}");
    assert_eq!(generation["completion_tokens"], 3, "{generation}");
    assert!(generation["ttft_ms"].as_f64().is_some() && generation["duration_ms"].as_f64().is_some(), "{generation}");
    let logged = server.log().lines().find(|l| l.contains("trace-42.a")).unwrap_or_default().to_string();
    let v: serde_json::Value = serde_json::from_str(&logged).unwrap();
    assert_eq!(v["request_id"], "trace-42.a", "{logged}");
    assert_eq!(v["path"], "/v1/models", "{logged}");
    assert_eq!(v["status"], 200, "{logged}");
}

/// API keys: once one exists every request needs one; scopes decide what a key may do; a key's
/// requests-per-minute quota gives 429 with Retry-After; usage is counted per key and model and
/// outlives the server; revoked keys stop working.
#[test]
fn api_keys_scopes_quotas_and_usage() {
    let server = Server::start();
    let make = |args: &[&str]| server.berth.ok(&[&["keys", "create"][..], args].concat()).trim().to_string();
    let user = make(&["--name", "app", "--rpm", "3"]);
    let admin = make(&["--name", "ops", "--scope", "admin"]);
    assert!(user.starts_with("berth-") && admin.starts_with("berth-"));
    let listed = server.berth.ok(&["keys", "list"]);
    assert!(
        listed.contains("app") && listed.contains("inference") && listed.contains("ops") && !listed.contains(&user)
    );

    let call = |method: &str, path: &str, key: Option<&str>, body: &str| {
        let auth = key.map(|k| format!("Bearer {k}"));
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(a) = &auth {
            headers.push(("Authorization", a.as_str()));
        }
        let (status, raw) = http_request(server.port, method, path, &headers, body.as_bytes()).expect("request");
        (status, String::from_utf8_lossy(&raw).to_string())
    };
    let (status, text) = call("GET", "/v1/models", None, "");
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("invalid_api_key") && text.contains("berth keys create"), "{text}");
    assert_eq!(call("GET", "/v1/models", Some("berth-00"), "").0, 401);
    assert_eq!(call("GET", "/health", None, "").0, 200, "probes need no key");
    // The inference key may generate but not delete, nor scrape metrics.
    let (status, text) = call("DELETE", "/api/delete", Some(&user), r#"{"model":"smollm2"}"#);
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("insufficient_scope") && text.contains("admin"), "{text}");
    let completion = r#"{"model":"smollm2","prompt":"Hello","max_tokens":4,"temperature":0,"ignore_eos":true}"#;
    for _ in 0..2 {
        let (status, text) = call("POST", "/v1/completions", Some(&user), completion);
        assert_eq!(status, 200, "{text}");
    }
    assert_eq!(call("GET", "/metrics", Some(&user), "").0, 403);
    assert_eq!(call("GET", "/metrics", Some(&admin), "").0, 200);
    // The third request in the minute uses up the quota of 3 (the 403 did not count: it was refused
    // before the quota); the fourth is refused.
    assert_eq!(call("POST", "/v1/completions", Some(&user), completion).0, 200);
    let (status, text) = call("POST", "/v1/completions", Some(&user), completion);
    assert_eq!(status, 429, "{text}");
    assert!(text.to_ascii_lowercase().contains("retry-after:") && text.contains("rate_limit_exceeded"), "{text}");
    // The admin key has no quota. This answer ends at its token limit; the chat ends by itself.
    assert_eq!(call("POST", "/v1/completions", Some(&admin), completion).0, 200);
    let chat =
        r#"{"model":"smollm2","messages":[{"role":"user","content":"Say hi"}],"max_tokens":100,"temperature":0}"#;
    let (status, text) = call("POST", "/v1/chat/completions", Some(&admin), chat);
    assert_eq!(status, 200, "{text}");
    assert!(text.contains(r#""finish_reason":"stop""#), "{text}");

    // Unloading is management: an inference key may not.
    let viewer = make(&["--name", "viewer"]);
    let (status, text) = call("POST", "/api/generate", Some(&viewer), r#"{"model":"smollm2","keep_alive":0}"#);
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("admin"), "{text}");
    // A client of the admin key hangs up mid-answer: recorded as aborted.
    let body = r#"{"model":"smollm2","prompt":"Tell a story","max_tokens":500,"stream":true,"ignore_eos":true}"#;
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {admin}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    read_events(&mut s, 2);
    drop(s);

    // Usage matches what the clients saw: 3 answers cut at their limit and 1 refusal for `app`; 1 answer
    // cut at its limit, 1 that ended by itself and 1 hang-up for `ops`.
    let deadline = Instant::now() + Duration::from_secs(30);
    let usage = loop {
        let usage = server.berth.json(&["usage", "--json"]);
        let ops = usage.as_array().and_then(|rows| rows.iter().find(|r| r["name"] == "ops").cloned());
        if ops.is_some_and(|r| r["aborted"] == 1) {
            break usage;
        }
        assert!(Instant::now() < deadline, "the hang-up was not recorded: {usage}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let rows = usage.as_array().expect("rows");
    let app = rows.iter().find(|r| r["name"] == "app").expect("the app key's usage");
    assert_eq!(app["requests"], 4, "{usage}");
    assert_eq!(app["completed"], 3, "{usage}");
    assert_eq!(app["length"], 3, "{usage}");
    assert_eq!(app["rejected"], 1, "{usage}");
    assert_eq!(app["completion_tokens"], 12, "{usage}");
    assert!(app["prompt_tokens"].as_u64().unwrap_or(0) >= 3);
    let ops = rows.iter().find(|r| r["name"] == "ops").expect("the ops key's usage");
    assert_eq!((ops["completed"].as_u64(), ops["length"].as_u64()), (Some(2), Some(1)), "{usage}");
    // The CLI speaks to a keyed server with a key.
    let url = format!("http://127.0.0.1:{}", server.port);
    let err = server.berth.fails(&["ps", "--url", &url]);
    assert!(err.contains("401") && err.contains("API key"), "{err}");
    let table = server.berth.ok(&["ps", "--url", &url, "--api-key", &admin]);
    assert!(table.contains("ai/smollm2:latest"), "{table}");
    let by_model = server.berth.ok(&["usage", "--by", "model", "--csv"]);
    assert!(
        by_model.starts_with("model,name,requests,completed,length") && by_model.contains("ai/smollm2:latest,"),
        "{by_model}"
    );

    let id =
        listed.lines().find(|l| l.contains(" app ")).and_then(|l| l.split_whitespace().next()).unwrap().to_string();
    server.berth.ok(&["keys", "revoke", &id]);
    assert_eq!(call("GET", "/v1/models", Some(&user), "").0, 401, "revoked");
    assert_eq!(call("GET", "/v1/models", Some(&admin), "").0, 200);
}

/// `--limit`: one model gets its own two threads, one request at a time and a 64-token context,
/// while another model keeps the server's settings; the answers are the same either way.
#[test]
fn a_model_keeps_its_own_limits() {
    let server = Server::start_with(&["--limit", "smollm2=threads:2,max-running:1,context:64"]);
    server.berth.ok(&["package", "--gguf", &models::smollm2_gguf().display().to_string(), "smollm2-copy"]);
    let greedy = r#""prompt":"The capital of France is","max_tokens":12,"temperature":0"#;
    let (status, limited) = server.post("/v1/completions", &format!(r#"{{"model":"smollm2",{greedy}}}"#));
    assert_eq!(status, 200, "{limited}");
    // Six first requests at once for a model not loaded yet share one load.
    let port = server.port;
    let body = format!(r#"{{"model":"smollm2-copy",{greedy}}}"#);
    let firsts: Vec<_> = (0..6)
        .map(|_| {
            let body = body.clone();
            std::thread::spawn(move || {
                let headers = [("Content-Type", "application/json")];
                let (status, raw) = http_request(port, "POST", "/v1/completions", &headers, body.as_bytes()).unwrap();
                (status, body_of(&raw))
            })
        })
        .collect();
    let text = |body: &str| serde_json::from_str::<serde_json::Value>(body).unwrap()["choices"][0]["text"].clone();
    for first in firsts {
        let (status, shared) = first.join().unwrap();
        assert_eq!(status, 200, "{shared}");
        assert_eq!(text(&limited), text(&shared), "its own threads give the same answer");
    }
    let loads = server.log().lines().filter(|l| l.contains("model loaded") && l.contains("smollm2-copy")).count();
    assert_eq!(loads, 1, "{}", server.log());

    let url = format!("http://127.0.0.1:{}", server.port);
    let ps = server.berth.json(&["ps", "--url", &url, "--json"]);
    let limits = |name: &str| {
        let models = ps["models"].as_array().unwrap();
        models.iter().find(|m| m["name"] == name).map(|m| m["berth"]["limits"].clone()).unwrap()
    };
    let own = limits("ai/smollm2:latest");
    assert_eq!((own["threads"].as_u64(), own["own_threads"].as_bool()), (Some(2), Some(true)), "{ps}");
    assert_eq!((own["max_running"].as_u64(), own["context"].as_u64()), (Some(1), Some(64)), "{ps}");
    let other = limits("ai/smollm2-copy:latest");
    assert_eq!((other["own_threads"].as_bool(), other["max_running"].as_u64()), (Some(false), Some(64)), "{ps}");
    assert_eq!(other["context"].as_u64(), Some(8192), "{ps}");
    let table = server.berth.ok(&["ps", "--url", &url]);
    assert!(table.contains("2 own") && table.contains("0/1"), "{table}");
    // The model's own worker thread is there, by name.
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", server.child.id()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .collect();
    assert!(threads.iter().any(|t| t.trim() == "berth-model-1"), "{threads:?}");

    // The context: a longer prompt is refused, and an answer without max_tokens stops at 64 tokens.
    let long = "one two three four five six seven eight nine ten ".repeat(8);
    let (status, text) = server.post("/v1/completions", &format!(r#"{{"model":"smollm2","prompt":"{long}"}}"#));
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("context_length_exceeded") && text.contains("64 tokens"), "{text}");
    let (status, text) =
        server.post("/v1/completions", r#"{"model":"smollm2","prompt":"Count:","temperature":0,"ignore_eos":true}"#);
    assert_eq!(status, 200, "{text}");
    let usage = serde_json::from_str::<serde_json::Value>(&text).unwrap()["usage"].clone();
    assert_eq!(usage["total_tokens"], 64, "{text}");

    // One request at a time: three at once, and the other two wait.
    let body = r#"{"model":"smollm2","prompt":"Once","max_tokens":40,"temperature":0,"ignore_eos":true,"stream":true}"#;
    let port = server.port;
    let clients: Vec<_> = (0..3).map(|_| std::thread::spawn(move || stream_completion(port, body))).collect();
    let (mut most_running, mut most_waiting) = (0, 0);
    while !clients.iter().all(|c| c.is_finished()) {
        let running = server.metric(r#"berth:num_requests_running{model_name="ai/smollm2:latest"}"#);
        let waiting = server.metric(r#"berth:num_requests_waiting{model_name="ai/smollm2:latest"}"#);
        (most_running, most_waiting) = (most_running.max(running), most_waiting.max(waiting));
        std::thread::sleep(Duration::from_millis(20));
    }
    for client in clients {
        let (status, text) = client.join().unwrap();
        assert_eq!(status, 200, "{text}");
        assert!(text.contains("data: [DONE]"), "{text}");
    }
    assert_eq!(most_running, 1, "never more than one running");
    assert!(most_waiting >= 1, "the others waited");
}

/// Quotas: a key past its requests per minute, or past its tokens for the day, gets 429 with the
/// reason and Retry-After, and is served again once that time has passed. A key kept to some models
/// sees only those and is refused the others.
#[test]
fn quotas_refuse_with_retry_after_and_recover() {
    let server = Server::start_with(&["--token-quota-window", "20"]);
    let make = |args: &[&str]| server.berth.ok(&[&["keys", "create"][..], args].concat()).trim().to_string();
    let paced = make(&["--name", "paced", "--rpm", "2"]);
    let metered = make(&["--name", "metered", "--tokens-per-day", "20", "--models", "smollm2"]);
    let listed = server.berth.ok(&["keys", "list"]);
    assert!(listed.contains("ai/smollm2:latest") && listed.contains(" 20 "), "{listed}");
    let call = |key: &str, method: &str, path: &str, body: &str| {
        let auth = format!("Bearer {key}");
        let headers = [("Content-Type", "application/json"), ("Authorization", auth.as_str())];
        let (status, raw) = http_request(server.port, method, path, &headers, body.as_bytes()).expect("request");
        (status, String::from_utf8_lossy(&raw).to_string())
    };
    let retry_after = |text: &str| -> u64 {
        let line = text.lines().find(|l| l.to_ascii_lowercase().starts_with("retry-after:")).expect("Retry-After");
        line.split(':').nth(1).unwrap().trim().parse().unwrap()
    };

    // Requests per minute: the third within the minute is refused.
    assert_eq!(call(&paced, "GET", "/v1/models", "").0, 200);
    assert_eq!(call(&paced, "GET", "/v1/models", "").0, 200);
    let (status, text) = call(&paced, "GET", "/v1/models", "");
    let refused_at = Instant::now();
    assert_eq!(status, 429, "{text}");
    assert!(text.contains("rate_limit_exceeded") && text.contains("2 requests per minute"), "{text}");
    let paced_wait = retry_after(&text);
    assert!((1..=60).contains(&paced_wait), "{text}");

    // The metered key sees only SmolLM2, and is refused the embedding model.
    let (status, text) = call(&metered, "GET", "/v1/models", "");
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("ai/smollm2:latest") && !text.contains("minilm"), "{text}");
    let (status, text) = call(&metered, "POST", "/v1/embeddings", r#"{"model":"minilm","input":"hi"}"#);
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("model_not_allowed") && text.contains("ai/smollm2:latest"), "{text}");
    // Another key loads the embedding model; the metered key's /api/ps does not show it.
    let open = make(&["--name", "open"]);
    assert_eq!(call(&open, "POST", "/v1/embeddings", r#"{"model":"minilm","input":"hi"}"#).0, 200);
    let (_, everything) = call(&open, "GET", "/api/ps", "");
    let (status, text) = call(&metered, "GET", "/api/ps", "");
    assert_eq!(status, 200, "{text}");
    assert!(everything.contains("ai/minilm:latest") && !text.contains("minilm"), "{text}");
    assert!(text.contains("ai/smollm2:latest"), "{text}");

    // Tokens per day: one answer of 30 tokens uses up 20, so the next request is refused until the
    // answer leaves the window.
    let completion = r#"{"model":"smollm2","prompt":"Hello","max_tokens":30,"temperature":0,"ignore_eos":true}"#;
    let (status, text) = call(&metered, "POST", "/v1/completions", completion);
    assert_eq!(status, 200, "{text}");
    let (status, text) = call(&metered, "POST", "/v1/completions", completion);
    assert_eq!(status, 429, "{text}");
    assert!(text.contains("insufficient_quota") && text.contains("20 tokens for the day"), "{text}");
    let metered_wait = retry_after(&text);
    assert!((1..=20).contains(&metered_wait), "{text}");
    let (status, text) = call(&paced, "GET", "/v1/models", "");
    assert_eq!(status, 429, "{text}");

    std::thread::sleep(Duration::from_secs(metered_wait) + Duration::from_millis(200));
    let (status, text) = call(&metered, "POST", "/v1/completions", completion);
    assert_eq!(status, 200, "the token quota recovered after its window: {text}");

    std::thread::sleep((refused_at + Duration::from_secs(paced_wait) + Duration::from_millis(200)) - Instant::now());
    assert_eq!(call(&paced, "GET", "/v1/models", "").0, 200, "the rate limit recovered after its minute");

    let usage = server.berth.json(&["usage", "--json"]);
    let row = |name: &str| usage.as_array().unwrap().iter().find(|r| r["name"] == name).cloned().unwrap();
    let metered = row("metered");
    assert_eq!((metered["completed"].as_u64(), metered["rejected"].as_u64()), (Some(2), Some(1)), "{usage}");
    assert_eq!(metered["completion_tokens"], 60, "{usage}");
    assert_eq!(row("paced")["rejected"], 2, "{usage}");
}

/// Without API keys every request is still recorded, embeddings included, under "(no key)".
#[test]
fn usage_counts_requests_without_keys_and_embeddings() {
    let server = Server::start();
    let (status, text) =
        server.post("/v1/completions", r#"{"model":"smollm2","prompt":"Hi","max_tokens":5,"ignore_eos":true}"#);
    assert_eq!(status, 200, "{text}");
    let first: serde_json::Value = serde_json::from_str(&text).unwrap();
    // Three choices of one prompt are one request, and its prompt counts once, as the client sees.
    let body =
        r#"{"model":"smollm2","messages":[{"role":"user","content":"Hi"}],"n":3,"max_tokens":4,"ignore_eos":true}"#;
    let (status, text) = server.post("/v1/chat/completions", body);
    assert_eq!(status, 200, "{text}");
    let second: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(second["usage"]["completion_tokens"], 12, "{text}");
    let (status, text) = server.post("/v1/embeddings", r#"{"model":"minilm","input":["one","two words"]}"#);
    assert_eq!(status, 200, "{text}");
    let embedded: serde_json::Value = serde_json::from_str(&text).unwrap();
    let by_model = server.berth.json(&["usage", "--by", "model", "--json"]);
    let row = |name: &str| by_model.as_array().unwrap().iter().find(|r| r["group"] == name).cloned().unwrap();
    let minilm = row("ai/minilm:latest");
    assert_eq!(minilm["completed"], 1, "{by_model}");
    assert_eq!(minilm["prompt_tokens"], embedded["usage"]["prompt_tokens"], "{by_model}");
    let smollm2 = row("ai/smollm2:latest");
    assert_eq!(smollm2["requests"], 2, "{by_model}");
    assert_eq!(smollm2["completion_tokens"], 17, "{by_model}");
    let prompt_tokens = |v: &serde_json::Value| v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(smollm2["prompt_tokens"].as_u64(), Some(prompt_tokens(&first) + prompt_tokens(&second)), "{by_model}");
    let by_key = server.berth.ok(&["usage"]);
    assert!(by_key.contains("(no key)"), "{by_key}");
}

/// kill -9 in the middle of a load loses no usage record of an answer a client received: each is
/// committed before its response goes out.
#[test]
fn usage_survives_kill_9_under_load() {
    let mut server = Server::start();
    let key = server.berth.ok(&["keys", "create", "--name", "load"]).trim().to_string();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered_so_far = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let port = server.port;
    let clients: Vec<_> = (0..6)
        .map(|i| {
            let (stop, key, answered_so_far) = (stop.clone(), key.clone(), answered_so_far.clone());
            std::thread::spawn(move || {
                let (mut answered, mut sent) = (0u64, 0u64);
                let auth = format!("Bearer {key}");
                let headers = [("Content-Type", "application/json"), ("Authorization", auth.as_str())];
                let body =
                    format!(r#"{{"model":"smollm2","prompt":"Client {i} says","max_tokens":4,"ignore_eos":true}}"#);
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    sent += 1;
                    match http_request(port, "POST", "/v1/completions", &headers, body.as_bytes()) {
                        Ok((200, raw)) if body_of(&raw).contains("\"usage\"") => {
                            answered += 1;
                            answered_so_far.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                (answered, sent)
            })
        })
        .collect();
    // Let the load run until a good number of answers are in, then kill the server outright.
    let deadline = Instant::now() + Duration::from_secs(60);
    while answered_so_far.load(std::sync::atomic::Ordering::SeqCst) < 12 {
        assert!(Instant::now() < deadline, "the load did not get going; log:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    server.child.kill().expect("kill -9");
    server.child.wait().unwrap();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (mut answered, mut sent) = (0, 0);
    for c in clients {
        let (a, s) = c.join().unwrap();
        answered += a;
        sent += s;
    }
    let usage = server.berth.json(&["usage", "--json"]);
    let row = usage.as_array().unwrap().iter().find(|r| r["name"] == "load").cloned().expect("the key's usage");
    let completed = row["completed"].as_u64().unwrap();
    eprintln!("kill -9: {sent} requests sent, {answered} answers received, {completed} completed records: {row}");
    assert!(answered >= 12, "{answered} answers");
    assert!(completed >= answered, "{completed} recorded, but the clients received {answered}: {usage}");
    assert!(row["requests"].as_u64().unwrap() <= sent, "more records than requests: {usage}");
    assert_eq!(row["completion_tokens"].as_u64(), Some(completed * 4), "{usage}");
}

/// Collects what an OpenTelemetry collector would be sent: each POST's path, content type and body.
struct OtlpReceiver {
    port: u16,
    posts: std::sync::Arc<std::sync::Mutex<Vec<(String, String, String)>>>,
}

impl OtlpReceiver {
    fn start() -> OtlpReceiver {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let posts = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = posts.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let sink = sink.clone();
                std::thread::spawn(move || Self::serve(conn, &sink));
            }
        });
        OtlpReceiver { port, posts }
    }

    /// Answer every request on a kept-alive connection with 200.
    fn serve(mut conn: TcpStream, sink: &std::sync::Mutex<Vec<(String, String, String)>>) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                match conn.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                continue;
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let header = |name: &str| {
                head.lines()
                    .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)))
                    .map(|(_, v)| v.trim().to_string())
                    .unwrap_or_default()
            };
            let length: usize = header("content-length").parse().unwrap_or(0);
            while buf.len() < end + 4 + length {
                match conn.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + length]).to_string();
            let path = head.split_whitespace().nth(1).unwrap_or_default().to_string();
            sink.lock().unwrap().push((path, header("content-type"), body));
            buf.drain(..end + 4 + length);
            if conn
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
                .is_err()
            {
                return;
            }
        }
    }

    /// Every span received so far, with its resource.
    fn spans(&self) -> Vec<(serde_json::Value, serde_json::Value)> {
        let posts = self.posts.lock().unwrap();
        let mut out = Vec::new();
        for (path, content_type, body) in posts.iter() {
            assert_eq!((path.as_str(), content_type.as_str()), ("/v1/traces", "application/json"));
            let v: serde_json::Value = serde_json::from_str(body).expect("OTLP JSON");
            for rs in v["resourceSpans"].as_array().expect("resourceSpans") {
                for ss in rs["scopeSpans"].as_array().expect("scopeSpans") {
                    for span in ss["spans"].as_array().expect("spans") {
                        out.push((rs["resource"].clone(), span.clone()));
                    }
                }
            }
        }
        out
    }
}

fn attribute(span: &serde_json::Value, key: &str) -> serde_json::Value {
    let attrs = span["attributes"].as_array().cloned().unwrap_or_default();
    attrs.into_iter().find(|a| a["key"] == key).map(|a| a["value"].clone()).unwrap_or_default()
}

/// `--otlp-endpoint`: every request's span reaches the collector with its id, model, tokens,
/// status and timings, in the caller's trace when it sent a `traceparent`.
#[test]
fn request_spans_go_to_an_otlp_collector() {
    let collector = OtlpReceiver::start();
    let endpoint = format!("http://127.0.0.1:{}", collector.port);
    let server = Server::start_with(&["--otlp-endpoint", &endpoint]);
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{trace}-00f067aa0ba902b7-01");
    let body = br#"{"model":"smollm2","prompt":"Hi","max_tokens":5,"ignore_eos":true,"stream":true}"#;
    let headers = [("Content-Type", "application/json"), ("x-request-id", "span-1"), ("traceparent", &traceparent)];
    let (status, raw) = http_request(server.port, "POST", "/v1/completions", &headers, body).unwrap();
    assert_eq!(status, 200, "{}", body_of(&raw));
    let (status, _) = http_request(server.port, "GET", "/v1/models", &[("x-request-id", "span-2")], b"").unwrap();
    assert_eq!(status, 200);

    let find = |id: &str| collector.spans().into_iter().find(|(_, s)| attribute(s, "request_id")["stringValue"] == id);
    let deadline = Instant::now() + Duration::from_secs(30);
    while find("span-1").is_none() || find("span-2").is_none() {
        assert!(Instant::now() < deadline, "no spans arrived: {:?}; log:\n{}", collector.spans(), server.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (resource, span) = find("span-1").unwrap();
    let service = resource["attributes"].as_array().unwrap().iter().find(|a| a["key"] == "service.name").cloned();
    assert_eq!(service.unwrap()["value"]["stringValue"], "berth", "{resource}");
    assert_eq!(span["name"], "request", "{span}");
    assert_eq!(span["kind"], 2, "{span}");
    assert_eq!(span["traceId"], trace, "{span}");
    assert_eq!(span["parentSpanId"], "00f067aa0ba902b7", "{span}");
    assert_eq!(span["spanId"].as_str().unwrap().len(), 16, "{span}");
    assert_eq!(attribute(&span, "model")["stringValue"], "ai/smollm2:latest", "{span}");
    assert_eq!(attribute(&span, "outcome")["stringValue"], "completed", "{span}");
    assert_eq!(attribute(&span, "completion_tokens")["intValue"], "5", "{span}");
    assert_eq!(attribute(&span, "http.response.status_code")["intValue"], "200", "{span}");
    assert_eq!(attribute(&span, "url.path")["stringValue"], "/v1/completions", "{span}");
    let ttft = attribute(&span, "ttft_ms")["doubleValue"].as_f64().expect("time to first token");
    let time = |k: &str| span[k].as_str().unwrap().parse::<u128>().unwrap();
    let (start, end) = (time("startTimeUnixNano"), time("endTimeUnixNano"));
    // The span lasts as long as the stream, which is longer than its first token took.
    assert!(end > start && (end - start) as f64 / 1e6 >= ttft, "{span}");

    let (_, plain) = find("span-2").unwrap();
    let own_trace = plain["traceId"].as_str().unwrap();
    assert!(own_trace.len() == 32 && own_trace != trace, "{plain}");
    assert!(plain.get("parentSpanId").is_none(), "{plain}");
}
