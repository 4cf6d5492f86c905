//! Operating a server: Prometheus, drain on SIGTERM, the memory budget and keep-alive, request ids
//! in logs, per-model limits and request spans.

mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use berth_testkit::models;
use berth_testkit::registry::http_request;
use util::server::*;

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

/// SIGTERM: the listener closes at once (a new connection is refused, which a client or gateway
/// retries elsewhere with nothing lost), the answers being streamed run to their end, and the
/// process exits cleanly.
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
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            Err(e) => panic!("connecting after SIGTERM: {e}"),
            Ok(_) => assert!(Instant::now() < deadline, "the listener was still open 30 s after SIGTERM"),
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!("SIGTERM: new connections refused after {:?}", signalled.elapsed());
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
    // Another manifest (loaded models are keyed by manifest: a package of the same file made in the
    // same second would be the same one and share the first's load).
    server.berth.ok(&[
        "package",
        "--gguf",
        &models::smollm2_gguf().display().to_string(),
        "--context-size",
        "4096",
        "smollm2-copy",
    ]);
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
    // Another manifest (loaded models are keyed by manifest: a package of the same file made in the
    // same second would be the same one and share the first's load).
    pinned.berth.ok(&[
        "package",
        "--gguf",
        &models::smollm2_gguf().display().to_string(),
        "--context-size",
        "4096",
        "smollm2-copy",
    ]);
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

/// `--limit`: one model gets its own two threads, one request at a time and a 64-token context,
/// while another model keeps the server's settings; the answers are the same either way.
#[test]
fn a_model_keeps_its_own_limits() {
    let server = Server::start_with(&["--limit", "smollm2=threads:2,max-running:1,context:64"]);
    // Another manifest of the same weights (its package declares a shorter context), so it loads on
    // its own; a second tag of the first manifest would share the first's load.
    let gguf = models::smollm2_gguf().display().to_string();
    server.berth.ok(&["package", "--gguf", &gguf, "--context-size", "4096", "smollm2-copy"]);
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
    assert_eq!(other["context"].as_u64(), Some(4096), "the context its package declares: {ps}");
    // Loaded models are keyed by manifest: another tag of one loads nothing more.
    server.berth.ok(&["tag", "smollm2-copy", "smollm2-alias"]);
    let (status, aliased) = server.post("/v1/completions", &format!(r#"{{"model":"smollm2-alias",{greedy}}}"#));
    assert_eq!(status, 200, "{aliased}");
    assert_eq!(text(&aliased), text(&limited));
    assert_eq!(server.log().lines().filter(|l| l.contains("model loaded")).count(), 2, "{}", server.log());
    let table = server.berth.ok(&["ps", "--url", &url]);
    assert!(table.contains("2 own") && table.contains("0/1"), "{table}");
    // The model's own worker thread is there, by name.
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", server.child.id()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .collect();
    assert!(threads.iter().any(|t| t.trim() == "berth-model-1"), "{threads:?}");

    // The context: a longer prompt is refused, and a chat answer without max_tokens (chat has no
    // default, unlike text completions) stops at 64 tokens.
    let long = "one two three four five six seven eight nine ten ".repeat(8);
    let (status, text) = server.post("/v1/completions", &format!(r#"{{"model":"smollm2","prompt":"{long}"}}"#));
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("context_length_exceeded") && text.contains("64 tokens"), "{text}");
    let (status, text) = server.post(
        "/v1/chat/completions",
        r#"{"model":"smollm2","messages":[{"role":"user","content":"Count:"}],"temperature":0,"ignore_eos":true}"#,
    );
    assert_eq!(status, 200, "{text}");
    let usage = serde_json::from_str::<serde_json::Value>(&text).unwrap()["usage"].clone();
    assert_eq!(usage["total_tokens"], 64, "{text}");

    // One request at a time: three at once, and the other two wait.
    let body = r#"{"model":"smollm2","prompt":"Once","max_tokens":40,"temperature":0,"ignore_eos":true,"stream":true}"#;
    let port = server.port;
    let clients: Vec<_> = (0..3).map(|_| std::thread::spawn(move || stream_completion(port, body))).collect();
    let (mut most_running, mut most_waiting) = (0, 0);
    while !clients.iter().all(|c| c.is_finished()) {
        let running = server.metric(r#"berth:num_requests_running{model_name="ai/smollm2:latest""#);
        let waiting = server.metric(r#"berth:num_requests_waiting{model_name="ai/smollm2:latest""#);
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

/// The KV cache is reserved, not touched, at load: a server with a 4 GiB cache that has answered
/// nothing stays small.
#[test]
fn an_unused_kv_cache_costs_no_memory() {
    let server = Server::start_with(&["--kv-cache", "4GiB"]);
    let peak_mb = server.peak_rss_kb() / 1024;
    assert!(peak_mb < 1024, "an idle server with a 4 GiB KV cache peaked at {peak_mb} MB");
}

/// A model named with `--model` stays loaded (no keep-alive unless `--keep-alive` is given), and
/// the log names it in its one normalised form.
#[test]
fn models_named_at_start_stay_loaded() {
    let server = Server::start();
    let (_, raw) = http_request(server.port, "GET", "/api/ps", &[], b"").unwrap();
    let ps: serde_json::Value = serde_json::from_str(&body_of(&raw)).unwrap();
    let model = &ps["models"][0];
    assert_eq!(model["name"], "ai/smollm2:latest", "{ps}");
    assert_eq!(model["berth"]["keep_alive_seconds"], -1, "{ps}");
    let log = server.log();
    let loaded: Vec<&str> = log.lines().filter(|l| l.contains("loaded")).collect();
    assert!(!loaded.is_empty() && loaded.iter().all(|l| l.contains("ai/smollm2:latest")), "{log}");
    let timed = Server::start_with(&["--keep-alive", "10m"]);
    let (_, raw) = http_request(timed.port, "GET", "/api/ps", &[], b"").unwrap();
    let ps: serde_json::Value = serde_json::from_str(&body_of(&raw)).unwrap();
    assert_eq!(ps["models"][0]["berth"]["keep_alive_seconds"], 600.0, "{ps}");
}

/// The value of the series of `family` whose labels contain `label`.
fn series(server: &Server, family: &str, label: &str) -> f64 {
    let (_, raw) = http_request(server.port, "GET", "/metrics", &[], b"").unwrap();
    let text = body_of(&raw);
    text.lines()
        .find(|l| l.starts_with(family) && l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no series {family}{{{label}}} in /metrics:\n{text}"))
}

/// A request that can never fit the KV cache is refused with 400 before any response starts,
/// streamed or not, on every API; it is counted as invalid, and the server goes on serving.
#[test]
fn a_request_larger_than_the_kv_cache_is_refused_before_its_stream_starts() {
    // Two blocks of 16 tokens.
    let server = Server::start_with(&["--kv-cache", "1MiB"]);
    let prompt = "word ".repeat(200);
    let invalid_before = series(&server, "berth:request_failure_total", "reason=\"invalid\"");
    let requests = [
        ("/v1/completions", serde_json::json!({"model": "smollm2", "prompt": prompt, "max_tokens": 4, "stream": true})),
        ("/v1/completions", serde_json::json!({"model": "smollm2", "prompt": prompt, "max_tokens": 4})),
        (
            "/v1/chat/completions",
            serde_json::json!({"model": "smollm2", "messages": [{"role": "user", "content": prompt}], "stream": true}),
        ),
        ("/api/generate", serde_json::json!({"model": "smollm2", "prompt": prompt, "stream": true})),
    ];
    for (path, body) in &requests {
        let (status, text) = server.post(path, &body.to_string());
        assert_eq!(status, 400, "{path}: {text}");
        assert!(text.contains("--kv-cache") && !text.contains("data:"), "{path}: one JSON error, no stream: {text}");
    }
    let invalid_after = series(&server, "berth:request_failure_total", "reason=\"invalid\"");
    assert_eq!(invalid_after - invalid_before, requests.len() as f64, "each refusal counted as invalid");
    let (status, text) = server.post("/v1/completions", r#"{"model":"smollm2","prompt":"Hi","max_tokens":2}"#);
    assert_eq!(status, 200, "{text}");
}

/// `berth rm` of a model a server holds: requests running finish, new ones get 404, and the
/// server unloads it. Tagging it back loads it again.
#[test]
fn a_model_removed_from_the_store_is_no_longer_served() {
    let server = Server::start();
    let ask = || server.post("/v1/completions", r#"{"model":"smollm2","prompt":"Hi","max_tokens":2}"#);
    assert_eq!(ask().0, 200);
    server.berth.ok(&["tag", "smollm2", "spare"]);
    server.berth.ok(&["rm", "smollm2"]);
    let (status, text) = ask();
    assert_eq!(status, 404, "{text}");
    assert!(text.contains("model_not_found"), "{text}");
    let (_, raw) = http_request(server.port, "GET", "/api/ps", &[], b"").unwrap();
    let ps = body_of(&raw);
    assert!(!ps.contains("ai/smollm2:latest"), "unloaded: {ps}");
    let (_, raw) = http_request(server.port, "GET", "/v1/models", &[], b"").unwrap();
    assert!(!body_of(&raw).contains("ai/smollm2:latest"));
    assert!(server.log().contains("removed from the store"), "{}", server.log());
    // The same weights under another name still answer, and the old name does again once tagged.
    let (status, text) = server.post("/v1/completions", r#"{"model":"spare","prompt":"Hi","max_tokens":2}"#);
    assert_eq!(status, 200, "{text}");
    server.berth.ok(&["tag", "spare", "smollm2"]);
    assert_eq!(ask().0, 200);
}

/// `--kv-type q8_0`: the same KV memory holds 1.88× the positions (34 bytes per 32 values against
/// 64), and the model answers from it.
#[test]
fn a_q8_0_kv_cache_holds_more_positions_in_the_same_memory() {
    let capacity = |server: &Server| server.metric_f64("berth:kv_cache_capacity_tokens");
    let question = r#"{"model":"smollm2","prompt":"The capital of France is","max_tokens":8,"temperature":0}"#;
    let f16 = Server::start_with(&["--kv-cache", "24MiB"]);
    assert_eq!(f16.post("/v1/completions", question).0, 200);
    let q8 = Server::start_with(&["--kv-cache", "24MiB", "--kv-type", "q8_0"]);
    let (status, answer) = q8.post("/v1/completions", question);
    assert_eq!(status, 200, "{answer}");
    let text = serde_json::from_str::<serde_json::Value>(&answer).unwrap()["choices"][0]["text"].clone();
    assert!(text.as_str().is_some_and(|t| t.contains("Paris")), "{answer}");
    let ratio = capacity(&q8) / capacity(&f16);
    assert!((1.8..1.95).contains(&ratio), "q8_0 holds {ratio:.3}× the positions of f16");

    let refused = f16.berth.fails(&["serve", "--kv-type", "q4_0"]);
    assert!(refused.contains("f16 or q8_0"), "{refused}");
}

/// Prompt-lookup speculation through the server: a lone stream copying its input guesses ahead
/// (counted in the metrics), and the answer is the one `--no-speculation` gives.
#[test]
fn speculation_guesses_ahead_without_changing_the_answer() {
    let passage = "The keeper climbed the stairs at dusk, lit the lamp, and wrote the weather in his logbook.";
    let body = serde_json::json!({
        "model": "smollm2",
        "prompt": format!("Text: {passage}\nThe same text again: {passage}\nAnd once more: The keeper"),
        "max_tokens": 32,
        "temperature": 0,
        "logprobs": 2,
    })
    .to_string();
    // Guesses priced at a fixed small share of a step (a hidden flag), not from step times measured
    // on this shared machine: whether the stream guesses must not depend on what else runs.
    let on = Server::start_with(&["--draft-cost", "0.05"]);
    let (status, guessed) = on.post("/v1/completions", &body);
    assert_eq!(status, 200, "{guessed}");
    let off = Server::start_with(&["--no-speculation"]);
    let (status, plain) = off.post("/v1/completions", &body);
    assert_eq!(status, 200, "{plain}");
    let choice = |b: &str| serde_json::from_str::<serde_json::Value>(b).unwrap()["choices"][0].clone();
    assert_eq!(choice(&guessed)["text"], choice(&plain)["text"]);
    assert_eq!(choice(&guessed)["logprobs"], choice(&plain)["logprobs"]);
    let drafted = on.metric_f64("berth:spec_decode_num_draft_tokens_total");
    let accepted = on.metric_f64("berth:spec_decode_num_accepted_tokens_total");
    assert!(accepted > 0.0 && drafted >= accepted, "{accepted} of {drafted} guesses kept");
    assert_eq!(off.metric_f64("berth:spec_decode_num_draft_tokens_total"), 0.0);
}
