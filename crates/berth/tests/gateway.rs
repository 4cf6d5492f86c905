//! `berth gateway` in front of real `berth serve` replicas: answers relayed unchanged in every API,
//! a replica killed with SIGKILL under 32 streaming clients (requests that had not started are
//! retried elsewhere, streams it cut end with an error event, and its restart is noticed), client
//! hang-ups reaching the replica, and clean errors when no replica can serve.

mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_testkit::registry::http_request;
use util::Berth;
use util::server::{Server, body_of};

/// A `berth gateway` process in front of `upstreams`.
struct Gateway {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
    home: Berth,
}

impl Gateway {
    fn start(upstreams: &[u16], options: &[&str]) -> Gateway {
        Self::start_with_env(upstreams, options, &[])
    }

    fn start_with_env(upstreams: &[u16], options: &[&str], env: &[(&str, &str)]) -> Gateway {
        let mut home = Berth::new();
        for (k, v) in env {
            home = home.env(k, v);
        }
        let port = berth_testkit::free_port();
        let log = home.home().join("gateway.log");
        let file = std::fs::File::create(&log).unwrap();
        let mut args = vec!["gateway".to_string(), "--port".into(), port.to_string()];
        for p in upstreams {
            args.extend(["--upstream".into(), format!("http://127.0.0.1:{p}")]);
        }
        args.extend(options.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = home
            .command(&args)
            .env("RUST_LOG", std::env::var("GATEWAY_LOG").unwrap_or_else(|_| "debug".into()))
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("start berth gateway");
        let gateway = Gateway { child, port, log, home };
        gateway.wait_until("listening", |g| http_request(g.port, "GET", "/health", &[], b"").is_ok_and(|r| r.0 == 200));
        gateway.wait_until("every replica up", |g| {
            let list: Vec<_> = g.upstreams().into_iter().filter(|u| u["remote"] == false).collect();
            list.len() == upstreams.len() && list.iter().all(|u| u["health"] == "up")
        });
        gateway
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn upstreams(&self) -> Vec<serde_json::Value> {
        match http_request(self.port, "GET", "/gateway/upstreams", &[], b"") {
            Ok((200, raw)) => serde_json::from_str::<serde_json::Value>(&body_of(&raw))
                .map(|v| v["upstreams"].as_array().cloned().unwrap_or_default())
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    fn upstream(&self, port: u16) -> serde_json::Value {
        let url = format!("http://127.0.0.1:{port}");
        self.upstreams().into_iter().find(|u| u["url"] == url.as_str()).unwrap_or_default()
    }

    fn wait_until(&self, what: &str, done: impl Fn(&Gateway) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "gateway: not {what} within 60 s: {:?}\nlog:\n{}",
                self.upstreams(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn post(&self, path: &str, body: &str) -> (u16, String) {
        let (status, raw) =
            http_request(self.port, "POST", path, &[("Content-Type", "application/json")], body.as_bytes())
                .expect("request through the gateway");
        (status, String::from_utf8_lossy(&raw).to_string())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn replicas(n: usize) -> Vec<Server> {
    (0..n).map(|_| Server::start_with(&["--kv-cache", "64MiB", "--threads", "1"])).collect()
}

/// Restart a killed replica's `berth serve` on its port, with its home.
fn restart(server: &mut Server) {
    let berth = std::mem::replace(&mut server.berth, Berth::new());
    let port = server.port;
    let restarted = Server::serve_on(berth, port, &["--model", "smollm2", "--kv-cache", "64MiB", "--threads", "1"]);
    let old = std::mem::replace(server, restarted);
    drop(old);
}

#[test]
fn answers_come_through_unchanged_in_every_api() {
    let servers = replicas(2);
    let gateway = Gateway::start(&[servers[0].port, servers[1].port], &[]);

    // OpenAI, non-streamed and streamed; the stream ends as berth's own streams do.
    let (status, raw) = gateway.post(
        "/v1/chat/completions",
        r#"{"model":"smollm2","max_tokens":4,"temperature":0,"messages":[{"role":"user","content":"Hi"}]}"#,
    );
    assert_eq!(status, 200, "{raw}");
    let answer: serde_json::Value = serde_json::from_str(&body_of(raw.as_bytes())).unwrap();
    assert_eq!(answer["object"], "chat.completion");
    let direct = servers[0].post(
        "/v1/chat/completions",
        r#"{"model":"smollm2","max_tokens":4,"temperature":0,"messages":[{"role":"user","content":"Hi"}]}"#,
    );
    let direct: serde_json::Value = serde_json::from_str(&direct.1).unwrap();
    assert_eq!(answer["choices"], direct["choices"], "the same answer as the replica's own");
    let (status, raw) = gateway.post(
        "/v1/chat/completions",
        r#"{"model":"smollm2","max_tokens":4,"stream":true,"messages":[{"role":"user","content":"Hi"}]}"#,
    );
    assert_eq!(status, 200);
    assert!(raw.to_ascii_lowercase().contains("content-type: text/event-stream"), "{raw}");
    assert!(raw.contains("data: [DONE]"), "{raw}");

    // Ollama's NDJSON stream, and Anthropic's events.
    let (status, raw) = gateway.post(
        "/api/chat",
        r#"{"model":"smollm2","options":{"num_predict":3},"messages":[{"role":"user","content":"Hi"}]}"#,
    );
    assert_eq!(status, 200, "{raw}");
    assert!(raw.contains(r#""done":true"#), "{raw}");
    let (status, raw) = gateway.post(
        "/v1/messages",
        r#"{"model":"smollm2","max_tokens":3,"stream":true,"messages":[{"role":"user","content":"Hi"}]}"#,
    );
    assert_eq!(status, 200, "{raw}");
    assert!(raw.contains("event: message_stop"), "{raw}");

    // The replica's own errors pass through in the API's shape; an unknown model is asked of
    // every replica before its 404 is returned.
    let (status, raw) = gateway.post("/api/chat", r#"{"model":"nope","messages":[{"role":"user","content":"Hi"}]}"#);
    assert_eq!(status, 404, "{raw}");
    assert!(body_of(raw.as_bytes()).starts_with(r#"{"error":""#), "Ollama's shape: {raw}");
    let (status, raw) = gateway.post("/v1/completions", r#"{"model":"smollm2","prompt":"x","max_tokens":-3}"#);
    assert_eq!(status, 400, "{raw}");

    // The gateway's own: probes, metrics, replica list.
    assert_eq!(http_request(gateway.port, "GET", "/ready", &[], b"").unwrap().0, 200);
    let (_, raw) = http_request(gateway.port, "GET", "/metrics", &[], b"").unwrap();
    let metrics = body_of(&raw);
    assert!(metrics.contains("berth:gateway_upstream_answered_total{upstream=\"http://127.0.0.1:"), "{metrics}");
    assert!(metrics.contains("berth:gateway_routing_decisions_total{reason=\"prefix_affinity\"}"), "{metrics}");
    let answered: u64 = gateway.upstreams().iter().map(|u| u["answered"].as_u64().unwrap()).sum();
    assert!(answered >= 5, "{:?}", gateway.upstreams());
    // A body over the gateway's limit is refused at the gateway.
    let big = format!(r#"{{"model":"smollm2","prompt":"{}"}}"#, "a".repeat(3 << 20));
    assert_eq!(gateway.post("/v1/completions", &big).0, 413);
}

#[test]
fn requests_with_the_same_prompt_start_go_to_the_same_replica() {
    let servers = replicas(3);
    let gateway = Gateway::start(&servers.iter().map(|s| s.port).collect::<Vec<_>>(), &[]);
    let system = "You are a harbour master who answers questions about ships and tides. ".repeat(20);
    for question in ["What is a keel?", "What is a mast?", "What is a tide?", "What is a berth?"] {
        let body = serde_json::json!({"model": "smollm2", "max_tokens": 1, "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": question}]});
        assert_eq!(gateway.post("/v1/chat/completions", &body.to_string()).0, 200);
    }
    let served: Vec<u64> = gateway.upstreams().iter().map(|u| u["answered"].as_u64().unwrap()).collect();
    assert_eq!(served.iter().filter(|&&n| n > 0).count(), 1, "one replica took all four: {served:?}");
    // It is the one whose prefix cache now holds the system prompt.
    let hits: Vec<u64> = servers.iter().map(|s| s.metric("berth:prefix_cache_hits_total")).collect();
    assert_eq!(hits.iter().filter(|&&h| h > 0).count(), 1, "{hits:?}");
}

#[test]
fn a_replica_killed_under_32_streaming_clients_costs_only_its_own_streams() {
    let mut servers = replicas(3);
    let ports: Vec<u16> = servers.iter().map(|s| s.port).collect();
    let gateway = Gateway::start(&ports, &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, cut) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    // 32 streaming clients, and 4 whose answers are not streamed (their answer head comes last, so
    // any of theirs the killed replica was working on is retried elsewhere).
    let clients: Vec<_> = (0..36)
        .map(|i| {
            let (stop, ok, cut, failures) = (stop.clone(), ok.clone(), cut.clone(), failures.clone());
            let port = gateway.port;
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let body = format!(
                        r#"{{"model":"smollm2","max_tokens":12,"stream":{},"messages":[{{"role":"user","content":"Client {i}, question {n}: tell me about the sea."}}]}}"#,
                        i < 32
                    );
                    match stream_chat(port, &body) {
                        Streamed::Complete => ok.fetch_add(1, Ordering::Relaxed),
                        Streamed::ErrorEvent => cut.fetch_add(1, Ordering::Relaxed),
                        Streamed::Failed(why) => {
                            failures.lock().unwrap().push(why);
                            0
                        }
                    };
                }
            })
        })
        .collect();
    let wait_for = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(120);
        while ok.load(Ordering::Relaxed) < n {
            assert!(
                Instant::now() < deadline,
                "only {} answers; gateway log:\n{}",
                ok.load(Ordering::Relaxed),
                gateway.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for(40);
    let killed = ports[1];
    let before = gateway.upstream(killed)["answered"].as_u64().unwrap();
    assert!(before > 0, "the replica to kill was serving: {:?}", gateway.upstreams());
    servers[1].child.kill().unwrap();
    let _ = servers[1].child.wait();
    let at_kill = ok.load(Ordering::Relaxed);
    wait_for(at_kill + 40);
    let ejected = gateway.upstream(killed);
    assert_ne!(ejected["health"], "up", "{ejected}");

    restart(&mut servers[1]);
    gateway.wait_until("the restarted replica back up", |g| g.upstream(killed)["health"] == "up");
    let back = gateway.upstream(killed)["answered"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while gateway.upstream(killed)["answered"].as_u64().unwrap() <= back {
        assert!(Instant::now() < deadline, "the restarted replica got no traffic: {:?}", gateway.upstreams());
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let failures = failures.lock().unwrap();
    let (ok, cut) = (ok.load(Ordering::Relaxed), cut.load(Ordering::Relaxed));
    eprintln!(
        "32 streaming and 4 other clients, one of 3 replicas killed and restarted: {ok} complete, {cut} ended with an error event, {} failed otherwise; replicas (answered, failed before an answer and retried, cut, ejections): {:?}",
        failures.len(),
        gateway
            .upstreams()
            .iter()
            .map(|u| (u["answered"].clone(), u["failures"].clone(), u["cut"].clone(), u["ejections"].clone()))
            .collect::<Vec<_>>()
    );
    assert!(
        failures.is_empty(),
        "{} requests failed otherwise than by an error event, the first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(cut <= 32, "at most the streams in flight at the killed replica end with an error ({cut})");
    let at_killed = gateway.upstream(killed);
    assert!(at_killed["ejections"].as_u64().unwrap() >= 1, "{at_killed}");
}

enum Streamed {
    Complete,
    ErrorEvent,
    Failed(String),
}

/// A chat completion through the gateway: complete, ended with an error event (streams), or not.
fn stream_chat(port: u16, body: &str) -> Streamed {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return Streamed::Failed("connect".into()) };
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).is_err() {
        return Streamed::Failed("send".into());
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    let status = text.split_whitespace().nth(1).unwrap_or("");
    if !body.contains(r#""stream":true"#) {
        let answer: serde_json::Value = serde_json::from_str(&body_of(&raw)).unwrap_or_default();
        return match (status, answer["choices"][0]["message"]["content"].is_string()) {
            ("200", true) => Streamed::Complete,
            _ => Streamed::Failed(text.chars().take(300).collect()),
        };
    }
    let data: Vec<&str> = text.lines().filter(|l| l.starts_with("data:")).collect();
    match (status, data.last()) {
        ("200", Some(&"data: [DONE]")) if !data.iter().any(|l| l.contains(r#""error""#)) => Streamed::Complete,
        ("200", Some(last)) if last.contains(r#""error""#) && last.contains("stopped before it finished") => {
            Streamed::ErrorEvent
        }
        _ => Streamed::Failed(text.chars().take(300).collect()),
    }
}

#[test]
fn a_client_that_hangs_up_frees_its_sequence_at_the_replica() {
    let servers = replicas(1);
    let gateway = Gateway::start(&[servers[0].port], &[]);
    let body = r#"{"model":"smollm2","prompt":"Once upon a time","max_tokens":4000,"ignore_eos":true,"stream":true}"#;
    let mut s = util::server::send_completion(gateway.port, body);
    let _ = util::server::read_events(&mut s, 2);
    assert_eq!(servers[0].metric("berth:num_requests_running"), 1);
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(10);
    while servers[0].metric("berth:num_requests_running") != 0 {
        assert!(Instant::now() < deadline, "the replica still generates for a client that left");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn with_no_replica_ready_the_gateway_says_so_in_each_apis_shape() {
    let nobody = berth_testkit::free_port();
    let home = Berth::new();
    let port = berth_testkit::free_port();
    let mut child = home
        .command(&["gateway", "--port", &port.to_string(), "--upstream", &format!("http://127.0.0.1:{nobody}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_request(port, "GET", "/health", &[], b"").map(|r| r.0).unwrap_or(0) != 200 {
        assert!(Instant::now() < deadline, "the gateway did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(http_request(port, "GET", "/ready", &[], b"").unwrap().0, 503);
    let ask = |path: &str, body: &str| {
        let (status, raw) =
            http_request(port, "POST", path, &[("Content-Type", "application/json")], body.as_bytes()).unwrap();
        (status, serde_json::from_str::<serde_json::Value>(&body_of(&raw)).unwrap())
    };
    let (status, openai) = ask("/v1/chat/completions", r#"{"model":"m","messages":[]}"#);
    assert_eq!(status, 503);
    assert!(openai["error"]["message"].as_str().unwrap().contains("no replica"), "{openai}");
    let (_, ollama) = ask("/api/chat", r#"{"model":"m","messages":[]}"#);
    assert!(ollama["error"].is_string(), "{ollama}");
    let (_, anthropic) = ask("/v1/messages", r#"{"model":"m","messages":[]}"#);
    assert_eq!(anthropic["type"], "error", "{anthropic}");
    let _ = child.kill();
    let _ = child.wait();

    // Bad replica URLs are refused at start with what to write instead.
    let err = home.fails(&["gateway", "--upstream", "https://10.0.0.1:12480"]);
    assert!(err.contains("http://"), "{err}");
    let err = home.fails(&["gateway"]);
    assert!(err.contains("--upstream"), "{err}");
    let err = home.fails(&["gateway", "--upstream", "http://127.0.0.1:1", "--host", "0.0.0.0"]);
    assert!(err.contains("--allow-insecure-public"), "{err}");
}

#[test]
fn saturated_replicas_overflow_to_a_remote_berth_which_gets_its_own_key() {
    // The remote: a berth with API keys, serving SmolLM2 under another name.
    let remote_home = Berth::new();
    remote_home.ok(&["package", "--gguf", &berth_testkit::models::smollm2_gguf().display().to_string(), "smollm2-big"]);
    let key = remote_home
        .ok(&["keys", "create", "--name", "gateway", "--scope", "inference", "--scope", "metrics"])
        .trim()
        .to_string();
    let remote = Server::serve(remote_home, &["--model", "smollm2-big", "--kv-cache", "64MiB", "--threads", "1"]);
    let local = replicas(1);
    let remote_url = format!("http://127.0.0.1:{}", remote.port);
    let gateway = Gateway::start_with_env(
        &[local[0].port],
        &[
            "--remote",
            &remote_url,
            "--remote-key-env",
            "REMOTE_KEY",
            "--remote-model",
            "smollm2=smollm2-big",
            "--remote-model",
            "big=smollm2-big",
            "--overflow-at",
            "2",
        ],
        &[("REMOTE_KEY", &key)],
    );
    let ask = |model: &str| -> (u16, String) {
        let body = format!(r#"{{"model":"{model}","max_tokens":3,"messages":[{{"role":"user","content":"Hi"}}]}}"#);
        let (status, raw) = http_request(
            gateway.port,
            "POST",
            "/v1/chat/completions",
            &[("Content-Type", "application/json"), ("Authorization", "Bearer the-clients-own-key")],
            body.as_bytes(),
        )
        .unwrap();
        let raw = String::from_utf8_lossy(&raw).to_string();
        let served = raw
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("x-berth-served-by: ").map(|v| v.trim().to_string()))
            .unwrap_or_default();
        assert_eq!(status, 200, "{raw}");
        (status, served)
    };
    assert_eq!(ask("smollm2").1, "replica", "an idle replica serves locally");

    // Two long streams make the one replica saturated (--overflow-at 2): the next request goes to
    // the remote, with the remote's key in place of the client's (which the remote would refuse).
    let long = r#"{"model":"smollm2","prompt":"Once upon a time","max_tokens":4000,"ignore_eos":true,"stream":true}"#;
    let mut streams: Vec<TcpStream> = (0..2).map(|_| util::server::send_completion(gateway.port, long)).collect();
    for s in &mut streams {
        let _ = util::server::read_events(s, 1);
    }
    assert_eq!(ask("smollm2").1, "remote");
    let bearer = format!("Bearer {key}");
    let (_, raw) = http_request(remote.port, "GET", "/metrics", &[("Authorization", &bearer)], b"").unwrap();
    assert!(body_of(&raw).contains("berth:generation_tokens_total{"), "the remote generated");
    drop(streams);
    let deadline = Instant::now() + Duration::from_secs(20);
    while ask("smollm2").1 != "replica" {
        assert!(Instant::now() < deadline, "the replica never took requests again");
        std::thread::sleep(Duration::from_millis(100));
    }

    // A model only the remote has: the replica's 404 sends it there.
    assert_eq!(ask("big").1, "remote");
    // No replica ready: the remote takes it all.
    drop(local);
    gateway
        .wait_until("the replica gone", |g| g.upstreams().iter().any(|u| u["remote"] == false && u["health"] != "up"));
    assert_eq!(ask("smollm2").1, "remote");

    let (_, raw) = http_request(gateway.port, "GET", "/metrics", &[], b"").unwrap();
    let metrics = body_of(&raw);
    assert!(
        metrics.contains(&format!("berth:gateway_upstream_answered_total{{upstream=\"{remote_url}\"}} ")),
        "{metrics}"
    );
    assert!(metrics.contains("berth:gateway_routing_decisions_total{reason=\"overflow\"}"), "{metrics}");
    let log = gateway.log();
    assert!(!log.contains(&key), "the remote's key is in the gateway's log");
    assert!(!log.contains(&key[key.len() - 12..]), "part of the remote's key is in the gateway's log");
}

#[test]
fn a_remote_behind_https_is_checked_against_the_ca_certificates_and_gets_the_remote_key() {
    let remote = Server::start_with(&["--kv-cache", "64MiB", "--threads", "1"]);
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        // A server's certificate, not a CA's: rustls refuses a CA certificate as a server's.
        .args(["-addext", "basicConstraints=critical,CA:FALSE", "-addext", "extendedKeyUsage=serverAuth"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (scripts/install-test-deps installs it)");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let tls_port = berth_testkit::free_port();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/tls_proxy.py");
    let mut proxy = KillOnDrop(
        std::process::Command::new(util::server::python())
            .arg(script)
            .arg(&cert)
            .arg(&key)
            .args([tls_port.to_string(), remote.port.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut ready = [0u8; 5];
    proxy.0.stdout.as_mut().unwrap().read_exact(&mut ready).unwrap();
    let remote_url = format!("https://127.0.0.1:{tls_port}");
    let body = r#"{"model":"smollm2","max_tokens":2,"messages":[{"role":"user","content":"Hi"}]}"#;
    let headers = [("Content-Type", "application/json"), ("Authorization", "Bearer the-clients-own-key")];

    // Trusting the certificate (SSL_CERT_FILE): the request goes over TLS with the remote's key.
    let cert_file = cert.display().to_string();
    let trusting = Gateway::start_with_env(
        &[],
        &["--remote", &remote_url, "--remote-key-env", "REMOTE_KEY"],
        &[("REMOTE_KEY", "remote-secret-key"), ("SSL_CERT_FILE", &cert_file)],
    );
    let (status, raw) = http_request(trusting.port, "POST", "/v1/chat/completions", &headers, body.as_bytes()).unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&raw));
    let seen = std::fs::read_to_string(format!("{cert_file}.auth")).unwrap();
    assert_eq!(seen.trim(), "Bearer remote-secret-key", "the remote got its key, not the client's");

    // Not trusting it (a CA file without it): the certificate is refused and nothing is sent.
    let other = dir.path().join("no-authorities.pem");
    std::fs::write(&other, b"").unwrap();
    let other_file = other.display().to_string();
    let wary = Gateway::start_with_env(
        &[],
        &["--remote", &remote_url, "--remote-key-env", "REMOTE_KEY"],
        &[("REMOTE_KEY", "remote-secret-key"), ("SSL_CERT_FILE", &other_file)],
    );
    let (status, _) = http_request(wary.port, "POST", "/v1/chat/completions", &headers, body.as_bytes()).unwrap();
    assert_eq!(status, 503, "an untrusted certificate is not talked to");
    let seen = std::fs::read_to_string(format!("{cert_file}.auth")).unwrap();
    assert_eq!(seen.lines().count(), 1, "nothing more reached the remote");
}

/// A helper process that goes when the test does, whichever way it ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn when_every_replica_is_full_turns_go_round_the_keys_and_the_queue_is_bounded() {
    // One replica that runs two requests at once: the gateway holds the rest.
    let server = Server::start_with(&["--kv-cache", "64MiB", "--threads", "1", "--max-running", "2"]);
    let gateway = Gateway::start(&[server.port], &["--max-queue", "16"]);
    let send = |key: &'static str, n: usize, finished: Arc<Mutex<Vec<&'static str>>>| {
        let port = gateway.port;
        std::thread::spawn(move || {
            let body = format!(
                r#"{{"model":"smollm2","max_tokens":24,"ignore_eos":true,"messages":[{{"role":"user","content":"{key} {n}"}}]}}"#
            );
            let bearer = format!("Bearer {key}");
            let (status, raw) = http_request(
                port,
                "POST",
                "/v1/chat/completions",
                &[("Content-Type", "application/json"), ("Authorization", &bearer)],
                body.as_bytes(),
            )
            .unwrap();
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&raw));
            finished.lock().unwrap().push(key);
        })
    };
    let finished = Arc::new(Mutex::new(Vec::new()));
    // A busy key sends 10 at once; a light one sends 2 a moment later.
    let mut clients: Vec<_> = (0..10).map(|n| send("busy", n, finished.clone())).collect();
    gateway.wait_until("the busy key's requests queued", |_| {
        let (_, raw) = http_request(gateway.port, "GET", "/metrics", &[], b"").unwrap();
        body_of(&raw).lines().any(|l| l.starts_with("berth:gateway_queue_length{") && !l.ends_with(" 0"))
    });
    clients.extend((0..2).map(|n| send("light", n, finished.clone())));
    for c in clients {
        c.join().unwrap();
    }
    let order = finished.lock().unwrap().clone();
    let last_light = order.iter().rposition(|k| *k == "light").unwrap();
    eprintln!("finishing order: {order:?}");
    // First come, first served would finish the light key last (11th and 12th); turns between
    // keys let each of its requests in after at most one more of the busy key's.
    assert!(last_light <= 8, "the light key waited behind the busy one: {order:?}");

    // Past the queue's length: 429 with Retry-After, in the API's shape.
    let small = Gateway::start(&[server.port], &["--max-queue", "1"]);
    let results: Vec<_> = (0..8)
        .map(|n| {
            let port = small.port;
            std::thread::spawn(move || {
                let body = format!(
                    r#"{{"model":"smollm2","max_tokens":24,"ignore_eos":true,"messages":[{{"role":"user","content":"flood {n}"}}]}}"#
                );
                let (status, raw) =
                    http_request(port, "POST", "/v1/chat/completions", &[("Content-Type", "application/json")], body.as_bytes())
                        .unwrap();
                (status, String::from_utf8_lossy(&raw).to_string())
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    let refused: Vec<&String> = results.iter().filter(|(s, _)| *s == 429).map(|(_, r)| r).collect();
    assert!(!refused.is_empty(), "{results:?}");
    assert!(results.iter().all(|(s, _)| *s == 200 || *s == 429), "{results:?}");
    for raw in refused {
        assert!(raw.to_ascii_lowercase().contains("retry-after: 1") && raw.contains("queue_full"), "{raw}");
    }
}

#[test]
fn a_gateway_with_keys_checks_them_and_records_usage_for_replicas_without_keys() {
    let server = Server::start_with(&["--kv-cache", "64MiB", "--threads", "1"]);
    let gateway = Gateway::start(&[server.port], &[]);
    let app = gateway.home.ok(&["keys", "create", "--name", "app", "--models", "smollm2"]).trim().to_string();
    let other = gateway.home.ok(&["keys", "create", "--name", "other", "--models", "minilm"]).trim().to_string();
    let slow = gateway.home.ok(&["keys", "create", "--name", "slow", "--rpm", "1"]).trim().to_string();
    let ask = |key: Option<&str>, path: &str, body: &str| -> (u16, String) {
        let bearer = key.map(|k| format!("Bearer {k}"));
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(b) = &bearer {
            headers.push(("Authorization", b));
        }
        let (status, raw) = http_request(gateway.port, "POST", path, &headers, body.as_bytes()).unwrap();
        (status, String::from_utf8_lossy(&raw).to_string())
    };
    let chat = r#"{"model":"smollm2","max_tokens":3,"messages":[{"role":"user","content":"Hi"}]}"#;
    let (status, raw) = ask(None, "/v1/chat/completions", chat);
    assert_eq!(status, 401, "{raw}");
    assert!(raw.contains("invalid_api_key"), "{raw}");
    assert_eq!(ask(Some("not-a-key"), "/v1/chat/completions", chat).0, 401);
    assert_eq!(http_request(gateway.port, "GET", "/health", &[], b"").unwrap().0, 200, "probes stay open");
    assert_eq!(http_request(gateway.port, "GET", "/metrics", &[], b"").unwrap().0, 401);
    let (status, raw) = ask(Some(&other), "/v1/chat/completions", chat);
    assert_eq!(status, 403, "the key's models: {raw}");
    let (status, raw) = ask(Some(&app), "/v1/chat/completions", chat);
    assert_eq!(status, 200, "{raw}");
    let (status, raw) = ask(
        Some(&app),
        "/api/chat",
        r#"{"model":"smollm2","options":{"num_predict":4},"messages":[{"role":"user","content":"Hi"}]}"#,
    );
    assert_eq!(status, 200, "{raw}");
    // A stream that did not ask for usage gets none, as from a replica, and is still charged; one
    // that asked gets it.
    let streamed = r#"{"model":"smollm2","max_tokens":5,"ignore_eos":true,"stream":true,"messages":[{"role":"user","content":"Hi"}]}"#;
    let (status, raw) = ask(Some(&app), "/v1/chat/completions", streamed);
    assert_eq!(status, 200, "{raw}");
    assert!(raw.contains("data: [DONE]") && raw.contains("\"finish_reason\":\"length\""), "{raw}");
    assert!(!raw.contains("\"usage\""), "the client did not ask for usage: {raw}");
    let asked = streamed.replace("\"stream\":true", "\"stream\":true,\"stream_options\":{\"include_usage\":true}");
    let (status, raw) = ask(Some(&app), "/v1/chat/completions", &asked.replace("\"max_tokens\":5", "\"max_tokens\":2"));
    assert_eq!(status, 200, "{raw}");
    assert!(raw.contains("\"completion_tokens\":2"), "{raw}");
    assert_eq!(ask(Some(&app), "/api/pull", r#"{"model":"x"}"#).0, 403, "no admin scope");
    assert_eq!(ask(Some(&slow), "/v1/chat/completions", chat).0, 200);
    let (status, raw) = ask(Some(&slow), "/v1/chat/completions", chat);
    assert_eq!(status, 429, "{raw}");
    assert!(raw.to_ascii_lowercase().contains("retry-after"), "{raw}");

    // Usage in the gateway's home, by key, with the tokens the answers reported.
    let deadline = Instant::now() + Duration::from_secs(20);
    let usage = loop {
        let usage = gateway.home.json(&["usage", "--json"]);
        let rows = usage.as_array().cloned().unwrap_or_default();
        let app_row = rows.iter().find(|r| r["name"] == "app").cloned().unwrap_or_default();
        let slow_row = rows.iter().find(|r| r["name"] == "slow").cloned().unwrap_or_default();
        if app_row["completed"] == 4 && slow_row["rejected"] == 1 {
            break usage;
        }
        assert!(Instant::now() < deadline, "usage not recorded: {usage}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let app_row = usage.as_array().unwrap().iter().find(|r| r["name"] == "app").cloned().unwrap();
    assert_eq!(app_row["completion_tokens"], 14, "3 + 4 + 5 + 2 tokens: {usage}");
    assert!(app_row["prompt_tokens"].as_u64().unwrap() > 0, "{usage}");
}

/// Two gateways on one shared PostgreSQL (`BERTH_DATABASE_URL`): a key made at one works at both,
/// its requests per minute and its tokens per day are counted across both, `berth usage` at
/// either adds up what both served, a revocation at one holds at the other on its next request,
/// and the database's password shows in no log or output.
#[test]
fn two_gateways_share_keys_quotas_and_usage_in_postgres() {
    let postgres = berth_testkit::postgres::Postgres::start();
    let url = postgres.url();
    let server = Server::start_with(&["--kv-cache", "64MiB", "--threads", "1"]);
    let shared = [("BERTH_DATABASE_URL", url.as_str())];
    let (a, b) =
        (Gateway::start_with_env(&[server.port], &[], &shared), Gateway::start_with_env(&[server.port], &[], &shared));
    let paced = a.home.ok(&["keys", "create", "--name", "paced", "--rpm", "3"]).trim().to_string();
    let metered = a.home.ok(&["keys", "create", "--name", "metered", "--tokens-per-day", "40"]).trim().to_string();
    let listed = b.home.ok(&["keys", "list"]);
    assert!(listed.contains("paced") && listed.contains("metered"), "{listed}");
    let ask = |gateway: &Gateway, key: Option<&str>, body: &str| -> (u16, String) {
        let bearer = key.map(|k| format!("Bearer {k}"));
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(b) = &bearer {
            headers.push(("Authorization", b));
        }
        let (status, raw) =
            http_request(gateway.port, "POST", "/v1/chat/completions", &headers, body.as_bytes()).unwrap();
        (status, String::from_utf8_lossy(&raw).to_string())
    };
    let chat = r#"{"model":"smollm2","max_tokens":3,"messages":[{"role":"user","content":"Hi"}]}"#;
    // The key made at A's side makes B require keys too.
    assert_eq!(ask(&b, None, chat).0, 401);
    // Three requests a minute, wherever they go.
    for gateway in [&a, &b, &a] {
        let (status, raw) = ask(gateway, Some(&paced), chat);
        assert_eq!(status, 200, "{raw}");
    }
    let (status, raw) = ask(&b, Some(&paced), chat);
    assert_eq!(status, 429, "the fourth in the minute, at the other gateway: {raw}");
    assert!(raw.contains("rate_limit_exceeded") && raw.to_ascii_lowercase().contains("retry-after"), "{raw}");
    // Tokens: the first answer at A uses up the 40 (its prompt and 30 tokens); B refuses the next.
    let long = r#"{"model":"smollm2","max_tokens":30,"ignore_eos":true,"messages":[{"role":"user","content":"Hi"}]}"#;
    let (status, raw) = ask(&a, Some(&metered), long);
    assert_eq!(status, 200, "{raw}");
    let (status, raw) = ask(&b, Some(&metered), chat);
    assert_eq!(status, 429, "{raw}");
    assert!(raw.contains("insufficient_quota") && raw.contains("40 tokens for the day"), "{raw}");

    // Usage, read at either gateway's side, has both gateways' requests.
    let deadline = Instant::now() + Duration::from_secs(20);
    let usage = loop {
        let usage = b.home.json(&["usage", "--json"]);
        let row = |name: &str| usage.as_array().and_then(|r| r.iter().find(|r| r["name"] == name).cloned());
        if row("paced").is_some_and(|r| r["completed"] == 3 && r["rejected"] == 1)
            && row("metered").is_some_and(|r| r["completed"] == 1 && r["rejected"] == 1)
        {
            break usage;
        }
        assert!(Instant::now() < deadline, "usage of both gateways not recorded: {usage}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let metered_row = usage.as_array().unwrap().iter().find(|r| r["name"] == "metered").cloned().unwrap();
    assert_eq!(metered_row["completion_tokens"], 30, "{usage}");
    assert_eq!(a.home.json(&["usage", "--json"]), usage, "the same usage from either side");

    // Revoked at B's side: refused at A on its next request.
    let id = listed.lines().find(|l| l.contains(" paced ")).and_then(|l| l.split_whitespace().next()).unwrap();
    b.home.ok(&["keys", "revoke", id]);
    let (status, raw) = ask(&a, Some(&paced), chat);
    assert_eq!(status, 401, "{raw}");

    let logs = [a.log(), b.log(), server.log(), listed];
    assert!(logs.iter().all(|l| !l.contains(postgres.password())), "the database password was written out");
}

/// The dashboard on a gateway, in chromium: its replicas instead of one server's models, the
/// requests sent through it counted and drawn (of all replicas and of one), a playground answer
/// streamed through it, the usage it recorded for an admin key. See `python/dashboard_gateway.py`.
#[test]
fn the_gateways_dashboard_shows_its_replicas_in_a_real_browser() {
    let server = Server::start_with(&["--kv-cache", "64MiB", "--threads", "1"]);
    let gateway = Gateway::start(&[server.port], &[]);
    let admin = gateway.home.ok(&["keys", "create", "--name", "ops", "--scope", "admin"]).trim().to_string();
    let viewer = gateway.home.ok(&["keys", "create", "--name", "viewer"]).trim().to_string();
    // Pages of other origins are refused at the gateway; its own page's requests go through (the
    // replica, which would judge the origin against its own address, gets them without it).
    let chat = r#"{"model":"smollm2","max_tokens":2,"messages":[{"role":"user","content":"Hi"}]}"#;
    let bearer = format!("Bearer {viewer}");
    let own = format!("http://127.0.0.1:{}", gateway.port);
    for (origin, expected) in [("http://evil.example", 403), (own.as_str(), 200)] {
        let headers = [("Authorization", bearer.as_str()), ("Content-Type", "application/json"), ("Origin", origin)];
        let (status, raw) =
            http_request(gateway.port, "POST", "/v1/chat/completions", &headers, chat.as_bytes()).unwrap();
        assert_eq!(status, expected, "{origin}: {}", String::from_utf8_lossy(&raw));
    }
    let replica = format!("http://127.0.0.1:{}", server.port);
    let shots = tempfile::tempdir().unwrap();
    let args = [gateway.port.to_string(), replica, admin, viewer, shots.path().display().to_string()];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    util::server::run_python("dashboard_gateway.py", &args, &server);
    let png = std::fs::read(shots.path().join("dashboard-gateway.png")).expect("the screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{} bytes", png.len());
    // BERTH_DASHBOARD_SHOTS=docs keeps it (to refresh the README's picture).
    if let Some(keep) = std::env::var_os("BERTH_DASHBOARD_SHOTS") {
        std::fs::write(std::path::Path::new(&keep).join("dashboard-gateway.png"), &png).unwrap();
    }
}
