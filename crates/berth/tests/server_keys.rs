//! API keys, scopes, quotas and usage accounting. Every test runs twice: with the accounts in
//! the home's SQLite, and in a real PostgreSQL shared through `BERTH_DATABASE_URL`.

mod util;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use berth_testkit::postgres::Postgres;
use berth_testkit::registry::http_request;
use util::Berth;
use util::server::*;

/// A home whose accounts are in the shared database, when there is one.
fn home(db: Option<&Postgres>) -> Berth {
    match db {
        Some(postgres) => Berth::new().env("BERTH_DATABASE_URL", &postgres.url()),
        None => Berth::new(),
    }
}

/// `name::sqlite` and `name::postgres`: the test `name` on each accounts database.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn sqlite() {
                super::$name(None)
            }

            #[test]
            fn postgres() {
                let postgres = super::Postgres::start();
                super::$name(Some(&postgres));
            }
        }
    )*};
}

on_both!(
    api_keys_scopes_quotas_and_usage,
    quotas_refuse_with_retry_after_and_recover,
    usage_counts_requests_without_keys_and_embeddings,
    usage_survives_kill_9_under_load,
    concurrent_requests_stay_within_a_token_quota,
    a_flood_of_refusals_is_counted_without_a_write_each,
);

/// API keys: once one exists every request needs one; scopes decide what a key may do; a key's
/// requests-per-minute quota gives 429 with Retry-After; usage is counted per key and model and
/// outlives the server; revoked keys stop working.
fn api_keys_scopes_quotas_and_usage(db: Option<&Postgres>) {
    let server = Server::start_in(home(db), &[]);
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
/// Quotas: a key past its requests per minute, or past its tokens for the day, gets 429 with the
/// reason and Retry-After, and is served again once that time has passed. A key kept to some models
/// sees only those and is refused the others.
fn quotas_refuse_with_retry_after_and_recover(db: Option<&Postgres>) {
    let server = Server::start_in(home(db), &["--token-quota-window", "20"]);
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

    // Tokens per day: an answer asking for 30 tokens is cut to what is left of the 20 (its prompt
    // counted), so the next request is refused until the answer leaves the window.
    let completion = r#"{"model":"smollm2","prompt":"Hello","max_tokens":30,"temperature":0,"ignore_eos":true}"#;
    let (status, text) = call(&metered, "POST", "/v1/completions", completion);
    assert_eq!(status, 200, "{text}");
    let answer: serde_json::Value = serde_json::from_str(&body_of(text.as_bytes())).unwrap();
    assert_eq!(answer["usage"]["total_tokens"], 20, "cut to the quota: {answer}");
    let cut_to = answer["usage"]["completion_tokens"].as_u64().unwrap();
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
    assert_eq!(metered["completion_tokens"], 2 * cut_to, "{usage}");
    assert_eq!(row("paced")["rejected"], 2, "{usage}");
}

/// Without API keys every request is still recorded, embeddings included, under "(no key)".
fn usage_counts_requests_without_keys_and_embeddings(db: Option<&Postgres>) {
    let server = Server::start_in(home(db), &[]);
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
fn usage_survives_kill_9_under_load(db: Option<&Postgres>) {
    let mut server = Server::start_in(home(db), &[]);
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

/// Concurrency does not stretch a token quota: 20 requests at once, each asking for 30 tokens,
/// against a quota of 100 use at most 100 between them; the rest are refused with 429.
fn concurrent_requests_stay_within_a_token_quota(db: Option<&Postgres>) {
    let server = Server::start_in(home(db), &[]);
    let key = server.berth.ok(&["keys", "create", "--name", "burst", "--tokens-per-day", "100"]).trim().to_string();
    let port = server.port;
    let clients: Vec<_> = (0..20)
        .map(|_| {
            let key = key.clone();
            std::thread::spawn(move || {
                let auth = format!("Bearer {key}");
                let body = r#"{"model":"smollm2","prompt":"Hello","max_tokens":30,"temperature":0,"ignore_eos":true}"#;
                let headers = [("Content-Type", "application/json"), ("Authorization", auth.as_str())];
                let (status, raw) = http_request(port, "POST", "/v1/completions", &headers, body.as_bytes()).unwrap();
                let used = serde_json::from_str::<serde_json::Value>(&body_of(&raw))
                    .ok()
                    .and_then(|v| v["usage"]["total_tokens"].as_u64())
                    .unwrap_or(0);
                (status, used)
            })
        })
        .collect();
    let results: Vec<(u16, u64)> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let served: u64 = results.iter().map(|r| r.1).sum();
    let refused = results.iter().filter(|r| r.0 == 429).count();
    assert!(served <= 100, "the clients were given {served} tokens against a quota of 100: {results:?}");
    assert!(served >= 60 && refused >= 10, "{results:?}");
    assert!(results.iter().all(|r| r.0 == 200 || r.0 == 429), "{results:?}");
    // Every refusal is in usage too, whichever check refused it (refusals are written in batches).
    let deadline = Instant::now() + Duration::from_secs(10);
    let (usage, row) = loop {
        let usage = server.berth.json(&["usage", "--json"]);
        let row = usage.as_array().unwrap().iter().find(|r| r["name"] == "burst").cloned().unwrap();
        if row["rejected"].as_u64() == Some(refused as u64) || Instant::now() > deadline {
            break (usage, row);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(row["rejected"].as_u64(), Some(refused as u64), "{usage}");
    let recorded = row["prompt_tokens"].as_u64().unwrap() + row["completion_tokens"].as_u64().unwrap();
    assert!(recorded <= 100, "usage recorded {recorded} tokens: {usage}");
}

/// A flood of refused requests is counted in usage, but costs a row per key, model and minute and
/// a few commits, not a row and a commit each (1,000 refusals once wrote 3.2 MB of WAL).
fn a_flood_of_refusals_is_counted_without_a_write_each(db: Option<&Postgres>) {
    let server = Server::start_in(home(db), &[]);
    let key = server.berth.ok(&["keys", "create", "--name", "flood", "--rpm", "1"]).trim().to_string();
    let auth = format!("Bearer {key}");
    let wal = server.berth.home().join("berth.db-wal");
    let wal_before = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    let mut refused = 0;
    for _ in 0..1000 {
        let (status, _) =
            http_request(server.port, "GET", "/v1/models", &[("Authorization", auth.as_str())], b"").unwrap();
        if status == 429 {
            refused += 1;
        }
    }
    assert_eq!(refused, 999, "one request per minute passes");
    let deadline = Instant::now() + Duration::from_secs(10);
    let row = loop {
        let usage = server.berth.json(&["usage", "--json"]);
        let row = usage.as_array().unwrap().iter().find(|r| r["name"] == "flood").cloned();
        if let Some(r) = row.filter(|r| r["rejected"] == 999) {
            break r;
        }
        assert!(Instant::now() < deadline, "the refusals were not all recorded: {usage}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(row["requests"], 999, "{row}");
    match db {
        None => {
            let wal_after = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
            assert!(
                wal_after.saturating_sub(wal_before) < 400 << 10,
                "1,000 refusals grew the WAL by {} bytes",
                wal_after.saturating_sub(wal_before)
            );
        }
        Some(postgres) => {
            let rows = postgres.query("SELECT COUNT(*) FROM berth_rejections");
            assert!(["1", "2"].contains(&rows.as_str()), "1,000 refusals made {rows} rows");
        }
    }
}

/// `berth keys create --secret-env VAR`: a secret clients already have (vLLM's and llama.cpp's
/// `--api-key`) becomes a key like any other, never printed back; an unsound or missing one is
/// refused with what to do.
#[test]
fn a_key_with_a_secret_the_operator_brings() {
    let home = Berth::new().env("SUITE_KEY", "sk-this-is-the-secret-key").env("SHORT_KEY", "abc");
    let server = Server::start_in(home, &[]);
    let printed =
        server.berth.ok(&["keys", "create", "--name", "suite", "--scope", "admin", "--secret-env", "SUITE_KEY"]);
    assert!(printed.trim().is_empty(), "the secret is not printed back: {printed}");
    let short = server.berth.fails(&["keys", "create", "--name", "x", "--secret-env", "SHORT_KEY"]);
    assert!(short.contains("16 to 256"), "{short}");
    let unset = server.berth.fails(&["keys", "create", "--name", "x", "--secret-env", "BERTH_NO_SUCH_VARIABLE"]);
    assert!(unset.contains("is not set"), "{unset}");
    let twice = server.berth.fails(&["keys", "create", "--name", "again", "--secret-env", "SUITE_KEY"]);
    assert!(twice.contains("choose another secret"), "{twice}");
    let chat = br#"{"max_tokens":2,"messages":[{"role":"user","content":"Hi"}]}"#;
    for (header, value, expected) in [
        ("Authorization", "Bearer sk-this-is-the-secret-key", 200),
        ("x-api-key", "sk-this-is-the-secret-key", 200),
        ("Authorization", "Bearer sk-this-is-not-the-secret", 401),
    ] {
        let headers = [(header, value), ("Content-Type", "application/json")];
        let (status, raw) = http_request(server.port, "POST", "/v1/chat/completions", &headers, chat).unwrap();
        assert_eq!(status, expected, "{header}: {}", String::from_utf8_lossy(&raw));
    }
}
